//! Atomic `sys/init` across a cluster: three `vha server` processes on one shared store get
//! `PUT /v1/sys/init` at the same instant (three threads released by one barrier, each on a
//! connection opened beforehand), round after round, on lockd and on etcd. Exactly one
//! answers 200 with keys, the others 400 "Vault is already initialized", and the winner's key
//! unseals all three (so nobody's half-written init survived).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::Value;
use vha_testkit::etcd::TestEtcd;
use vha_testkit::node::Storage;
use vha_testkit::{TestLockd, TestNode};

/// Rounds per store: each is a fresh, uninitialized store and three fresh nodes.
const ROUNDS: usize = 20;

/// `host:port` of a node's `http://host:port` address.
fn sock(addr: &str) -> SocketAddr {
    addr.trim_start_matches("http://").parse().expect("node address")
}

/// One `PUT /v1/sys/init` on an already connected stream: `(status, body)`.
fn init_on(mut s: TcpStream, start: &Barrier) -> (u16, Value) {
    let body = br#"{"secret_shares":1,"secret_threshold":1}"#;
    let mut req = format!(
        "PUT /v1/sys/init HTTP/1.1\r\nHost: vha\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    start.wait();
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// Races three inits, checks the outcome and that the winner's key unseals every node.
async fn race(nodes: &[TestNode], round: usize) {
    let start = Arc::new(Barrier::new(nodes.len()));
    let threads: Vec<_> = nodes
        .iter()
        .map(|n| {
            let conn = TcpStream::connect(sock(&n.addr)).expect("connect");
            let start = start.clone();
            std::thread::spawn(move || init_on(conn, &start))
        })
        .collect();
    let answers: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<&Value> = answers.iter().filter(|(s, _)| *s == 200).map(|(_, v)| v).collect();
    assert_eq!(
        winners.len(),
        1,
        "round {round}: exactly one init succeeds: {answers:?}"
    );
    for (s, v) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*s, 400, "round {round}: the others get 400: {v}");
        assert_eq!(v["errors"][0], "Vault is already initialized", "round {round}: {v}");
    }
    let key = winners[0]["keys"][0].as_str().expect("key").to_string();
    for n in nodes {
        n.unseal(std::slice::from_ref(&key)).await;
    }
}

/// Proves: on one lockd (with its token), 20 rounds of three simultaneous inits give exactly
/// one 200 and two 400s each, and the winner's key unseals all three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_init_on_lockd_is_atomic() {
    for round in 0..ROUNDS {
        let lockd = TestLockd::start();
        let stanza = format!(
            "storage \"lockd\" {{\n  address = \"{}\"\n  lock_ttl = \"3s\"\n{}}}",
            lockd.address(),
            lockd.stanza_auth()
        );
        let nodes = futures::future::join_all(
            (0..3).map(|_| TestNode::builder().storage(Storage::Raw(stanza.clone())).start()),
        )
        .await;
        race(&nodes, round).await;
    }
}

/// Proves: on etcd (HA enabled, a fresh path per round), 20 rounds of three simultaneous
/// inits give exactly one 200 and two 400s each, and the winner's key unseals all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_init_on_etcd_is_atomic() {
    let etcd = TestEtcd::cluster(1);
    for round in 0..ROUNDS {
        let stanza = format!(
            "storage \"etcd\" {{\n  address = \"{}\"\n  path = \"init-{round}/\"\n  ha_enabled = \"true\"\n  lock_timeout = \"5s\"\n}}",
            etcd.address()
        );
        let nodes = futures::future::join_all(
            (0..3).map(|_| TestNode::builder().storage(Storage::Raw(stanza.clone())).start()),
        )
        .await;
        race(&nodes, round).await;
    }
}

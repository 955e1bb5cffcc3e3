//! Hostile HTTP input through the PROXY of a pair; `t80_hostile_node`
//! covers the same at a node's own listener. Both the active's pair (the proxy passes to
//! its local node) and a standby's pair (the proxy forwards over the cluster channel) are
//! attacked; each input gets a clear 4xx (or the connection is closed, for protocol abuse),
//! within bounds, and nothing is half-written.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use vha_testkit::hostile::{attack, read_head, slow_headers, slow_headers_on};
use vha_testkit::{TestCluster, TestNode};

const ELECTION_BOUND: Duration = Duration::from_secs(40);
const MAX_REQUEST_SIZE: usize = 4096;

/// Malformed JSON, bodies over `max_request_size` (announced: 413 with one byte sent;
/// chunked: 413 without waiting for the body's end), invalid UTF-8 in paths, `..` in KV
/// paths, CL/TE smuggling, header counts and sizes over limits, a huge
/// `X-Vault-No-Request-Forwarding`, and invalid tokens, sent to the active's pair and to a
/// standby's (forwarding) pair: each a clear 4xx or a closed connection, and the secret
/// written before is unchanged (version 1, original value) everywhere afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_through_proxies() {
    hostile_input("h1").await;
}

/// The same hostile input with the proxies forwarding over h2
/// (`VHA_PROXY_FORWARD_PROTOCOL=h2`): in particular a chunked body over `max_request_size`
/// sent to a standby's pair gets its 413 at once (Pingora's h2 forwarding used to keep
/// waiting for the active's answer, and the client hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_through_h2_forwarding() {
    hostile_input("h2").await;
}

/// Attacks the active's and a standby's pair of a 3-pair cluster whose proxies forward with
/// `protocol`, then checks that nothing was written.
async fn hostile_input(protocol: &str) {
    let template = TestNode::builder()
        .listener_extra(format!("max_request_size = {MAX_REQUEST_SIZE}"))
        .config_extra("step_down_wait = \"2s\"");
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .template(template)
        .proxies()
        .proxy_env("VHA_PROXY_FORWARD_PROTOCOL", protocol)
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    let s = (a + 1) % 3;
    let root = c.root_token().to_string();
    c.mount_secret(a).await;
    let (st, v) = c.nodes[a]
        .request(
            "POST",
            "secret/data/keep",
            Some(&root),
            Some(json!({"data": {"v": "original"}})),
        )
        .await;
    assert!(st.is_success(), "{v}");

    for (label, i) in [("active's proxy", a), ("standby's proxy", s)] {
        attack(label, &c.nodes[i], c.proxies[i].listen, &root, MAX_REQUEST_SIZE).await;
    }

    for i in 0..3 {
        let (st, v) = c.nodes[i].request("GET", "secret/data/keep", Some(&root), None).await;
        assert_eq!(st, StatusCode::OK, "pair {i}: {v}");
        assert_eq!(v["data"]["data"]["v"], "original", "pair {i}: half-written");
        assert_eq!(v["data"]["metadata"]["version"], 1, "pair {i}: a hostile write landed");
    }
    for (i, p) in c.proxies.iter().enumerate() {
        assert!(p.is_running(), "proxy {i} died");
    }
}

/// A kept-alive connection: the first request is answered, then the second head is
/// dribbled one byte every 200 ms; returns how long until the proxy cut it off.
fn slow_second_head(addr: SocketAddr) -> Duration {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let first = read_head(&mut s);
    assert!(first.contains("200"), "first request on the connection: {first:?}");
    // Drain the small health body so the next read sees only what follows.
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut sink = [0u8; 4096];
    let _ = s.read(&mut sink);
    slow_headers_on(s)
}

/// A head sent in full, then a 12-byte body dribbled over ~12 s (longer than the head
/// deadline): the body is not timed by the head deadline, so the request gets its answer.
fn slow_body(addr: SocketAddr, token: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = br#"{"v":"slow"}"#;
    let head = format!(
        "PUT /v1/secret/data/slowbody HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        br#"{"data":{"v":"slow"}}"#.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(br#"{"data":"#).unwrap();
    for b in body.iter() {
        std::thread::sleep(Duration::from_secs(1)); // pacing the attack, not waiting for a condition
        s.write_all(&[*b]).unwrap();
    }
    s.write_all(b"}").unwrap();
    read_head(&mut s)
}

/// Slowloris at a proxy, in three shapes run side by side on one pair: a new connection
/// whose head is dribbled one byte every 200 ms, and a kept-alive connection whose *second*
/// head is dribbled, are both cut off soon after the 10 s head deadline (well under 60 s);
/// a request whose head is complete but whose body is dribbled over 12 s is answered
/// (bodies are not timed by the head deadline); and the pair keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_through_proxy_are_cut_off() {
    let c = TestCluster::builder().nodes(1).lock_ttl("2s").proxies().start().await;
    let addr = c.proxies[0].listen;
    let token = c.root_token().to_string();
    c.mount_secret(0).await;
    let first = tokio::task::spawn_blocking(move || slow_headers(addr));
    let second = tokio::task::spawn_blocking(move || slow_second_head(addr));
    let body = tokio::task::spawn_blocking(move || slow_body(addr, &token));
    let (first, second, body) = (first.await.unwrap(), second.await.unwrap(), body.await.unwrap());
    eprintln!("slow first head cut off after {first:?}, slow second head after {second:?}; slow body: {body}");
    for (what, took) in [("first head", first), ("second head", second)] {
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(30),
            "slow {what}: the proxy cut it off after {took:?} (deadline 10 s)"
        );
    }
    assert!(
        body.contains(" 200") || body.contains(" 204"),
        "slow body request: {body:?}"
    );
    let (st, _) = c.nodes[0].request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::OK);
}

/// `max_request_duration` bounds a whole forwarded request, not each read: a client that
/// sends a head and part of its body through a standby's proxy, then stalls (the proxy's
/// per-read timeout alone would wait 60 s), gets 503 "context deadline exceeded" from the
/// active node soon after the 2 s bound, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_forwarded_body_ends_at_max_request_duration() {
    let template = TestNode::builder().listener_extra("max_request_duration = \"2s\"");
    let c = TestCluster::builder()
        .nodes(2)
        .lock_ttl("2s")
        .template(template)
        .proxies()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    let s = 1 - a;
    let root = c.root_token().to_string();
    c.mount_secret(a).await;
    let addr = c.proxies[s].listen;
    let head = format!(
        "POST /v1/secret/data/stalled HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 100\r\n\r\n{{\"data\":"
    );
    let (status, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let start = Instant::now();
        s.write_all(head.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&buf).contains("deadline") {
                break;
            }
        }
        (String::from_utf8_lossy(&buf).into_owned(), start.elapsed())
    })
    .await
    .unwrap();
    eprintln!("stalled body answered after {took:?}: {status:?}");
    assert!(status.starts_with("HTTP/1.1 503"), "{status:?}");
    assert!(status.contains("context deadline exceeded"), "{status:?}");
    assert!(took < Duration::from_secs(10), "took {took:?} (bound 2 s)");
    let (st, _) = c.nodes[a]
        .request("GET", "secret/data/stalled", Some(&root), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

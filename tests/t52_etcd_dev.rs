//! `vha dev --storage etcd`: a 3-member etcd cluster instead of lockd, nodes on it
//! with HA, one active serving KV v2, and every process (etcd members included) stopped on
//! Ctrl-C.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use vha_core::advert::LOCK_KEY;
use vha_core::storage::etcd::EtcdBackend;
use vha_core::storage::HaBackend;
use vha_testkit::{pid_alive, TestDev};

/// The dev cluster on etcd comes up with three etcd members and no lockd, the nodes report
/// `storage_type = etcd`, the HA lock is held in etcd by the active, KV v2 works through it,
/// and Ctrl-C stops the nodes and every etcd member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_on_etcd() {
    let mut dev = TestDev::start(
        &["--storage", "etcd", "--nodes", "2", "--lock-ttl", "5s"],
        Duration::from_secs(90),
    );
    let cluster = dev.cluster.clone();
    assert!(cluster["lockd"].is_null(), "no lockd with --storage etcd: {cluster}");
    let members = cluster["etcd"].as_array().expect("etcd members").clone();
    assert_eq!(members.len(), 3, "a 3-member etcd cluster");
    for m in &members {
        assert!(pid_alive(m["pid"].as_u64().unwrap()), "etcd member running: {m}");
    }
    let token = cluster["root_token"].as_str().unwrap().to_string();
    let nodes = cluster["nodes"].as_array().unwrap().clone();
    let http = reqwest::Client::new();
    let mut active = None;
    for n in &nodes {
        let a = n["api_addr"].as_str().unwrap();
        let st: Value = http
            .get(format!("{a}/v1/sys/seal-status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["storage_type"], "etcd");
        let v: Value = http
            .get(format!("{a}/v1/sys/leader"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["is_self"] == true {
            active = Some(a.to_string());
        }
    }
    let active = active.expect("an active node");
    let r = http
        .post(format!("{active}/v1/secret/data/dev"))
        .header("X-Vault-Token", &token)
        .json(&json!({"data": {"hello": "etcd"}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "KV v2 at secret/: {}", r.status());
    let addrs: Vec<&str> = members.iter().map(|m| m["addr"].as_str().unwrap()).collect();
    let b = EtcdBackend::connect(&addrs.join(",")).unwrap();
    assert!(
        b.holder(LOCK_KEY).await.unwrap().is_some(),
        "the HA lock is held in etcd"
    );

    dev.proc.signal(Signal::SIGINT);
    let status = dev
        .proc
        .wait_exit(Duration::from_secs(60))
        .expect("vha dev exits after Ctrl-C");
    assert!(status.success(), "clean exit: {status:?}");
    let pids = nodes
        .iter()
        .map(|n| n["node_pid"].as_u64().unwrap())
        .chain(members.iter().map(|m| m["pid"].as_u64().unwrap()));
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} still running after vha dev stopped");
    }
}

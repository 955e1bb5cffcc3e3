//! Hostile HTTP input straight at a node's listener: each gets a clear 4xx (or a closed
//! connection for protocol abuse), nothing is half-written, and the node keeps serving.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use vha_testkit::hostile::{attack, raw, slow_headers};
use vha_testkit::TestNode;

/// The hostile battery of [`attack`] (malformed JSON, oversized bodies announced and
/// chunked, bad UTF-8 in paths, `..` in KV paths, smuggling, oversized headers, bad tokens)
/// at a node's own listener: each gets a clear client error (431 exactly for too many header
/// fields), and a KV secret written before is untouched afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors() {
    let node = TestNode::builder()
        .listener_extra("max_request_size = 4096")
        .storage(vha_testkit::node::Storage::Inmem)
        .start()
        .await;
    let keys = node.init_unsealed().await;
    let root = keys.root_token.as_str();
    node.mount_kv(root, "secret", "2").await;
    let (st, v) = node
        .request(
            "POST",
            "secret/data/keep",
            Some(root),
            Some(json!({"data": {"v": "original"}})),
        )
        .await;
    assert!(st.is_success(), "{st} {v}");

    let addr = SocketAddr::from(([127, 0, 0, 1], node.port));
    attack("node", &node, addr, root, 4096).await;
    // The node's own limits answer with their exact status: 431 for too many header fields.
    let mut req = String::from("GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let head = raw(addr, req.as_bytes());
    assert!(head.is_empty() || head.contains(" 431 "), "too many headers: {head:?}");

    // Nothing was half-written and the node still serves.
    let (st, v) = node.request("GET", "secret/data/keep", Some(root), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["data"]["v"], "original");
    assert_eq!(v["data"]["metadata"]["version"], 1);
}

/// A client that dribbles its request head (slowloris) is cut off at the header-read
/// deadline instead of holding the connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let node = TestNode::builder().start().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], node.port));
    let elapsed = tokio::task::spawn_blocking(move || slow_headers(addr)).await.unwrap();
    assert!(
        elapsed < Duration::from_secs(30),
        "slow client held the connection for {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(5),
        "cut off only at the deadline, not at once: {elapsed:?}"
    );
    let (st, _) = node.request("GET", "sys/health", None, None).await;
    assert_ne!(st.as_u16(), 0, "node still serves");
}

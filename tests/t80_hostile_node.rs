//! Hostile HTTP input straight at a node's listener: each gets a clear 4xx (or a closed
//! connection for protocol abuse), nothing is half-written, and the node keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use vha_testkit::TestNode;

/// Sends raw bytes and returns the response head (status line) or "" if the server closed.
fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Malformed JSON, bad UTF-8 in paths, `..` in KV paths, oversized bodies and headers,
/// smuggling attempts and bad tokens all get a clear client error; a KV secret written
/// before is untouched afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors() {
    let node = TestNode::builder()
        .listener_extra("max_request_size = 4096")
        .storage(vha_testkit::node::Storage::Inmem)
        .start()
        .await;
    let keys = node.init_unsealed().await;
    let root = keys.root_token.as_str();
    let (st, v) = node
        .request(
            "POST",
            "sys/mounts/secret",
            Some(root),
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let (st, v) = node
        .request(
            "POST",
            "secret/data/keep",
            Some(root),
            Some(json!({"data": {"v": "original"}})),
        )
        .await;
    assert!(st.is_success(), "{st} {v}");

    // Malformed JSON -> 400, nothing written.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/secret/data/keep", node.addr))
        .header("X-Vault-Token", root)
        .body("{\"data\": {\"v\": ")
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    // Over max_request_size, announced: 413 at once, without the body being sent.
    let head = raw(
        node.port,
        format!(
            "POST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 1073741824\r\n\r\n{{"
        )
        .as_bytes(),
    );
    assert!(head.contains(" 413 "), "announced oversized body: {head:?}");
    // Invalid UTF-8 in the path -> 400.
    let head = raw(
        node.port,
        format!("GET /v1/secret/data/%FF%FE HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert!(head.contains(" 400 "), "bad UTF-8: {head:?}");
    // `..` in a KV path is never resolved into another path.
    // (Raw requests: HTTP clients would resolve the dot segments before sending.)
    let head = raw(node.port, format!("POST /v1/secret/data/a/../keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 21\r\nConnection: close\r\n\r\n{{\"data\":{{\"v\":\"evil\"}}}}").as_bytes());
    assert!(head.contains(" 4"), "dot-dot path: {head:?}");
    let head = raw(node.port, format!("POST /v1/secret/data/x/%2e%2e/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 21\r\nConnection: close\r\n\r\n{{\"data\":{{\"v\":\"evil\"}}}}").as_bytes());
    assert!(head.contains(" 4"), "encoded dot-dot: {head:?}");
    // Conflicting Content-Length / Transfer-Encoding -> 400 (no smuggling).
    let head = raw(
        node.port,
        b"POST /v1/sys/unseal HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(
        head.is_empty() || head.contains(" 400 "),
        "CL+TE must be refused: {head:?}"
    );
    let head = raw(
        node.port,
        b"POST /v1/sys/unseal HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    );
    assert!(
        head.is_empty() || head.contains(" 400 "),
        "duplicate CL must be refused: {head:?}"
    );
    // Too many header fields -> 431 (or the connection is refused).
    let mut req = String::from("GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let head = raw(node.port, req.as_bytes());
    assert!(head.is_empty() || head.contains(" 431 "), "too many headers: {head:?}");
    // A huge X-Vault-No-Request-Forwarding value is bounded like any header.
    let huge = "y".repeat(1024 * 1024);
    let head = raw(node.port, format!("GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Vault-No-Request-Forwarding: {huge}\r\nConnection: close\r\n\r\n").as_bytes());
    assert!(
        head.is_empty() || head.contains(" 431 ") || head.contains(" 400 "),
        "huge header: {head:?}"
    );
    // Invalid tokens: 403, whatever their shape.
    for bad in ["hvs.AAAAAAAAAAAAAAAAAAAAAAAA", "x", "hvs.", &"z".repeat(4000)] {
        let (st, _) = node.request("GET", "secret/data/keep", Some(bad), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "token {bad:.10}");
    }

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
    let port = node.port;
    let elapsed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let start = Instant::now();
        let _ = s.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n");
        let mut buf = [0u8; 256];
        // One header byte every 200 ms; bounded at 60 s.
        while start.elapsed() < Duration::from_secs(60) {
            if s.write_all(b"X").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        start.elapsed()
    })
    .await
    .unwrap();
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

//! Hostile clients shared by the hostile-input tests (a node's own listener in
//! `t80_hostile_node`, a pair's proxy in `t93_hostile_proxy`): raw HTTP/1.1 requests, a
//! slowloris head, and one battery of malformed, oversized and smuggling requests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::TestNode;

/// Sends raw bytes, half-closes nothing, and returns the response head (status line), or ""
/// if the server closed without answering. Reads for at most 20 s.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    read_head(&mut s)
}

/// Reads a response head from `s` (until the empty line or EOF: some answers keep the
/// connection open); returns its status line.
pub fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Slowloris: dribbles a request head to `addr` one byte every 200 ms; returns when the
/// server answers or closes (or after 60 s).
pub fn slow_headers(addr: SocketAddr) -> Duration {
    slow_headers_on(TcpStream::connect(addr).unwrap())
}

/// Dribbles a request head on `s` one byte every 200 ms; returns when the server answers or
/// closes (or after 60 s).
pub fn slow_headers_on(mut s: TcpStream) -> Duration {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let start = Instant::now();
    let _ = s.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n");
    let mut buf = [0u8; 256];
    while start.elapsed() < Duration::from_secs(60) {
        if s.write_all(b"X").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    start.elapsed()
}

/// Sends hostile input to `addr` (a node's listener or a pair's proxy; `target` is the
/// same endpoint for client requests): malformed JSON and JSON of the wrong shape; bodies over
/// `max_request_size` (announced: 413 with one byte sent; chunked: 413 without waiting for
/// the body's end); invalid UTF-8 in paths (encoded and raw); `..` in KV paths; CL/TE
/// smuggling; header counts and sizes over limits; a huge `X-Vault-No-Request-Forwarding`;
/// invalid tokens on reads and writes. Each must get a clear 4xx or a closed connection,
/// never a 2xx or 5xx. `secret/` must be a KV v2 mount whose `keep` the caller checks
/// afterwards: every hostile write aims at it.
pub async fn attack(label: &str, target: &TestNode, addr: SocketAddr, root: &str, max_request_size: usize) {
    // Malformed JSON -> 400.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/secret/data/keep", target.addr))
        .header("X-Vault-Token", root)
        .body("{\"data\": {\"v\": ")
        .send()
        .await
        .unwrap();
    let st = resp.status();
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "{label}: malformed JSON: {}",
        resp.text().await.unwrap_or_default()
    );
    // JSON of the wrong shape -> 400.
    let (st, v) = target
        .request_raw("POST", "secret/data/keep", b"[1,2,3]".to_vec())
        .await;
    assert!(st.is_client_error(), "{label}: wrong JSON shape: {st} {v}");

    // Announced oversized body: 413 at once, with only one byte of the gigabyte sent.
    let t0 = Instant::now();
    let head = raw(
        addr,
        format!("POST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 1073741824\r\n\r\n{{")
            .as_bytes(),
    );
    assert!(head.contains(" 413 "), "{label}: announced oversized body: {head:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{label}: 413 took {:?}",
        t0.elapsed()
    );
    // Chunked, no length announced: 413 once the limit is passed, without waiting for the
    // end of the body (we stop sending mid-body and keep the connection open).
    let t0 = Instant::now();
    let head = tokio::task::spawn_blocking({
        let root = root.to_string();
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let _ = s.write_all(
                format!("POST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .as_bytes(),
            );
            let chunk = format!("1000\r\n{}\r\n", "a".repeat(0x1000));
            for _ in 0..(4 * max_request_size / 0x1000 + 2) {
                if s.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
            }
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
        }
    })
    .await
    .unwrap();
    assert!(
        head.contains(" 413 ") || head.is_empty(),
        "{label}: chunked oversized body: {head:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(14),
        "{label}: chunked 413 waited {:?}",
        t0.elapsed()
    );

    // Invalid UTF-8 in the path -> 400.
    let head = raw(
        addr,
        format!("GET /v1/secret/data/%FF%FE HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert!(head.contains(" 400 "), "{label}: bad UTF-8: {head:?}");
    // Raw invalid UTF-8 bytes in the request target: a 4xx or a closed connection.
    let mut req = b"GET /v1/secret/data/\xff\xfe HTTP/1.1\r\nHost: x\r\nX-Vault-Token: ".to_vec();
    req.extend_from_slice(root.as_bytes());
    req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let head = raw(addr, &req);
    assert!(
        head.is_empty() || head.contains(" 4"),
        "{label}: raw bad UTF-8: {head:?}"
    );

    // `..` (plain and percent-encoded) in a KV path is never resolved into another path.
    for p in ["a/../keep", "x/%2e%2e/keep", "x/%2E%2E/keep"] {
        let head = raw(
            addr,
            format!(
                "POST /v1/secret/data/{p} HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 21\r\nConnection: close\r\n\r\n{{\"data\":{{\"v\":\"evil\"}}}}"
            )
            .as_bytes(),
        );
        assert!(head.contains(" 4"), "{label}: dot-dot path {p}: {head:?}");
    }

    // Smuggling: CL + TE, two different CLs, TE with an obfuscated value -> 400 or closed.
    let head = raw(
        addr,
        format!("POST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nPOST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 21\r\n\r\n{{\"data\":{{\"v\":\"evil\"}}}}").as_bytes(),
    );
    assert!(head.is_empty() || head.contains(" 400 "), "{label}: CL+TE: {head:?}");
    let head = raw(
        addr,
        format!("POST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Length: 21\r\nContent-Length: 5\r\n\r\n{{\"data\":{{\"v\":\"evil\"}}}}").as_bytes(),
    );
    assert!(
        head.is_empty() || head.contains(" 400 "),
        "{label}: duplicate CL: {head:?}"
    );
    let head = raw(
        addr,
        format!("POST /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nTransfer-Encoding: xchunked\r\nContent-Length: 21\r\n\r\n{{\"data\":{{\"v\":\"evil\"}}}}").as_bytes(),
    );
    assert!(
        head.is_empty() || head.contains(" 4"),
        "{label}: obfuscated TE: {head:?}"
    );

    // Header count and size over limits: 4xx or closed, never a 2xx/5xx.
    let mut req = String::from("GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let head = raw(addr, req.as_bytes());
    assert!(
        head.is_empty() || head.contains(" 4"),
        "{label}: too many headers: {head:?}"
    );
    let big = "b".repeat(128 * 1024);
    let head = raw(
        addr,
        format!("GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(head.is_empty() || head.contains(" 4"), "{label}: huge header: {head:?}");
    // A huge X-Vault-No-Request-Forwarding on a forwarded path.
    let huge = "y".repeat(1024 * 1024);
    let head = raw(
        addr,
        format!("GET /v1/secret/data/keep HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nX-Vault-No-Request-Forwarding: {huge}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(
        head.is_empty() || head.contains(" 4"),
        "{label}: huge no-forward header: {head:?}"
    );

    // Invalid tokens -> 403, whatever their shape.
    for bad in ["hvs.AAAAAAAAAAAAAAAAAAAAAAAA", "x", "hvs.", &"z".repeat(4000)] {
        let (st, _) = target.request("GET", "secret/data/keep", Some(bad), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{label}: token {bad:.10}");
        let (st, _) = target
            .request(
                "POST",
                "secret/data/keep",
                Some(bad),
                Some(json!({"data": {"v": "evil"}})),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{label}: write with token {bad:.10}");
    }
}

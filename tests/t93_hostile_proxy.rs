//! Hostile HTTP input through the PROXY of a pair (issue 11, must-have 4); `t80_hostile_node`
//! covers the same at a node's own listener. Both the active's pair (the proxy passes to
//! its local node) and a standby's pair (the proxy forwards over the cluster channel) are
//! attacked; each input gets a clear 4xx (or the connection is closed, for protocol abuse),
//! within bounds, and nothing is half-written.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use vha_testkit::{TestCluster, TestNode};

const ELECTION_BOUND: Duration = Duration::from_secs(40);
const MAX_REQUEST_SIZE: usize = 4096;

/// Sends raw bytes, half-closes nothing, and returns the response head (status line), or ""
/// if the server closed without answering. Reads for at most 20 s.
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    read_head(&mut s)
}

/// Attacks one pair (the proxy at `addr`); `keep` must stay at version 1 = "original".
async fn attack(label: &str, pair: &TestNode, addr: SocketAddr, root: &str) {
    // Malformed JSON -> 400.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/secret/data/keep", pair.addr))
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
    let (st, v) = pair.request_raw("POST", "secret/data/keep", b"[1,2,3]".to_vec()).await;
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
            for _ in 0..(4 * MAX_REQUEST_SIZE / 0x1000 + 2) {
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
        let (st, _) = pair.request("GET", "secret/data/keep", Some(bad), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{label}: token {bad:.10}");
        let (st, _) = pair
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

/// Slowloris through a proxy: a client dribbling its request head one byte every 200 ms
/// is cut off by a timeout, well before 60 s.
fn slow_headers(addr: SocketAddr) -> Duration {
    slow_headers_on(TcpStream::connect(addr).unwrap())
}

/// Dribbles a request head on `s` one byte every 200 ms; returns when the server answers or
/// closes (or after 60 s).
fn slow_headers_on(mut s: TcpStream) -> Duration {
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

/// Malformed JSON, bodies over `max_request_size` (announced: 413 with one byte sent;
/// chunked: 413 without waiting for the body's end), invalid UTF-8 in paths, `..` in KV
/// paths, CL/TE smuggling, header counts and sizes over limits, a huge
/// `X-Vault-No-Request-Forwarding`, and invalid tokens, sent to the active's pair and to a
/// standby's (forwarding) pair: each a clear 4xx or a closed connection, and the secret
/// written before is unchanged (version 1, original value) everywhere afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_through_proxies() {
    let template = TestNode::builder()
        .listener_extra(format!("max_request_size = {MAX_REQUEST_SIZE}"))
        .config_extra("step_down_wait = \"2s\"");
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .template(template)
        .proxies()
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

    attack("active's proxy", &c.nodes[a], c.proxies[a].listen, &root).await;
    attack("standby's proxy", &c.nodes[s], c.proxies[s].listen, &root).await;

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

/// Reads a response head from `s` (until the empty line or EOF: some answers keep the
/// connection open); returns its status line.
fn read_head(s: &mut TcpStream) -> String {
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

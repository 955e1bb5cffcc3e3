//! Streaming through a standby's proxy: lockd (data and HA lock, `max_value_size` raised) +
//! 3 pairs of `vha server` + `vha proxy`. A 256 MiB KV secret goes up and comes back
//! through a STANDBY's proxy (forwarded over the mTLS cluster channel to the active) while the
//! proxy's peak RSS stays far below the body size, and a chunked body over
//! `max_request_size` is refused with 413 before the client has finished sending it, without
//! the proxy buffering it and without anything being written.
//!
//! lockd's value limit is 32 MiB by default (its protocol carries a value in one JSON
//! body); the large round trip raises `max_value_size` on lockd and in the nodes' stanzas,
//! as an operator who stores such secrets would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use vha_testkit::{TestCluster, TestNode};

/// Size of the secret's value in the large round trip.
const VALUE_LEN: usize = 256 * 1024 * 1024;
/// `max_request_size` for the large round trip: the 256 MiB value plus JSON framing.
const BIG_MAX_REQUEST_SIZE: u64 = 257 * 1024 * 1024;
/// `max_request_size` for the refusal test, and how much the client tries to send there.
const SMALL_MAX_REQUEST_SIZE: u64 = 8 * 1024 * 1024;
const OVERSIZED_BODY: u64 = 64 * 1024 * 1024;
/// Upload chunk size (one generated chunk in flight at a time in the test).
const CHUNK: usize = 1024 * 1024;

/// Bound on the proxy's peak RSS (`VmHWM`) over its whole life, including a 256 MiB upload and
/// download through it. Measured here (debug build, 2 cores): about 31 MiB after start-up and
/// 35-36 MiB after the round trip, i.e. only a few MiB of buffers in flight. A proxy that
/// buffered the body would need at least 256 MiB; 96 MiB leaves a wide margin (allocator and
/// thread-stack noise, a slower machine) while staying far below one copy of the body.
const PROXY_PEAK_RSS_BOUND: u64 = 96 * 1024 * 1024;

/// The whole round trip must fit in this (the goal for a debug build on 2 cores).
const ROUND_TRIP_BOUND: Duration = Duration::from_secs(90);
const ELECTION_BOUND: Duration = Duration::from_secs(40);
/// The HA lease: the default of a deployment (10 s), not the tests' usual 3 s. Parsing,
/// encrypting and sending a 256 MiB value keeps the active's and lockd's two cores busy for
/// seconds (debug build), which can hold a renewal past a 3 s lease's holder deadline
/// (TTL - TTL/5 after the last renewal sent) and move the active mid-upload.
const LOCK_TTL: &str = "10s";

/// The two tests each start a cluster and move a lot of data: run them one after the other
/// so their timings do not depend on each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// lockd (values up to `max`) and 3 pairs (node behind its own proxy) with
/// `max_request_size = max`. Returns the cluster (initialized, unsealed, one active, KV v1
/// mounted at `big/`) and the index of the active.
async fn cluster(max: u64) -> (TestCluster, usize) {
    let c = TestCluster::builder()
        .nodes(3)
        .max_value_size(max as usize)
        .lock_ttl(LOCK_TTL)
        .template(TestNode::builder().listener_extra(format!("max_request_size = {max}")))
        .proxies()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.nodes[a].mount_kv(c.root_token(), "big", "1").await;
    (c, a)
}

/// `VmHWM` (peak resident set) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|r| r.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The value's content: chunk `i` is a window of one random block of letters at an offset
/// that depends on `i`, so chunks differ and a lost, repeated or reordered chunk changes the
/// hash, without the test holding more than the block and one chunk.
struct Content {
    block: Vec<u8>,
}

impl Content {
    fn new() -> Content {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let block = (0..CHUNK + 256)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 26) as u8
            })
            .collect();
        Content { block }
    }

    fn chunk(&self, i: usize) -> &[u8] {
        let off = (i * 97) % 256;
        &self.block[off..off + CHUNK]
    }

    fn chunks(&self) -> usize {
        VALUE_LEN / CHUNK
    }

    fn sha256(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        for i in 0..self.chunks() {
            h.update(self.chunk(i));
        }
        h.finalize().to_vec()
    }
}

/// Picks the value of `"v"` out of a streamed KV v1 read response: everything up to
/// `"v":"` is kept (small), then exactly `VALUE_LEN` bytes are hashed without being kept,
/// then the rest is kept. The value has no escapes (letters only), so a shorter value would
/// put its closing quote inside the hashed bytes and a longer one would not end at the quote.
struct Extract {
    head: Vec<u8>,
    in_value: bool,
    hashed: usize,
    hasher: Sha256,
    tail: Vec<u8>,
}

const MARKER: &[u8] = b"\"v\":\"";

impl Extract {
    fn new() -> Extract {
        Extract {
            head: Vec::new(),
            in_value: false,
            hashed: 0,
            hasher: Sha256::new(),
            tail: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        if self.in_value {
            let take = (VALUE_LEN - self.hashed).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.hashed += take;
            self.tail.extend_from_slice(&bytes[take..]);
            assert!(self.tail.len() < 64 * 1024, "response continues past the value");
            return;
        }
        self.head.extend_from_slice(bytes);
        if let Some(pos) = self.head.windows(MARKER.len()).position(|w| w == MARKER) {
            let rest = self.head.split_off(pos + MARKER.len());
            self.in_value = true;
            self.feed(&rest);
        } else {
            assert!(
                self.head.len() < 64 * 1024,
                "no \"v\" in the first 64 KiB of the response"
            );
        }
    }

    /// The response with the value replaced by `"x"` (parsed), and the value's hash.
    fn finish(self) -> (Value, Vec<u8>) {
        assert!(self.in_value, "no \"v\" in the response");
        assert_eq!(self.hashed, VALUE_LEN, "value shorter than {VALUE_LEN} bytes");
        let mut doc = self.head; // ends with the marker
        doc.push(b'x');
        doc.extend_from_slice(&self.tail);
        let v = serde_json::from_slice(&doc).unwrap_or_else(|e| {
            panic!(
                "response around the value is not the expected JSON ({e}): {}",
                String::from_utf8_lossy(&doc)
            )
        });
        (v, self.hasher.finalize().to_vec())
    }
}

/// Proves: with `max_request_size` raised to 257 MiB, a 256 MiB KV secret can be written and
/// read back through a standby's proxy (streamed up as a generated body, streamed down and
/// hashed; forwarded over mTLS to the active both ways), the value comes back with the same
/// length and SHA-256, the round trip takes under 90 s, and the standby's proxy never holds
/// the body: its peak RSS stays under `PROXY_PEAK_RSS_BOUND`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_secret_round_trip_through_standby_proxy() {
    let _serial = SERIAL.lock().await;
    let (c, a) = cluster(BIG_MAX_REQUEST_SIZE).await;
    let s = (a + 1) % 3;
    let root = c.root_token().to_string();
    let proxy_pid = c.proxies[s].pid();
    let rss_before = peak_rss(proxy_pid);

    let content = Arc::new(Content::new());
    let want = content.sha256();
    let http = reqwest::Client::builder().timeout(ROUND_TRIP_BOUND).build().unwrap();

    // Upload: `{"v":"<256 MiB>"}`, one generated chunk at a time.
    let len = b"{\"v\":\"".len() + VALUE_LEN + b"\"}".len();
    let parts = content.chunks() + 2;
    let gen = Arc::clone(&content);
    let body = futures::stream::iter(0..parts).map(move |i| {
        Ok::<_, std::io::Error>(match i {
            0 => b"{\"v\":\"".to_vec(),
            i if i == parts - 1 => b"\"}".to_vec(),
            i => gen.chunk(i - 1).to_vec(),
        })
    });
    let t0 = Instant::now();
    let resp = http
        .put(format!("{}/v1/big/blob", c.proxies[s].addr))
        .header("X-Vault-Token", &root)
        .header("Content-Type", "application/json")
        .header("Content-Length", len.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("upload");
    let st = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(st, StatusCode::NO_CONTENT, "upload through standby {s}'s proxy: {text}");
    let up = t0.elapsed();
    let rss_after_up = peak_rss(proxy_pid);
    let node_after_up = peak_rss(c.nodes[a].pid());

    // Download through the same standby's proxy, streamed and hashed.
    let t1 = Instant::now();
    let resp = http
        .get(format!("{}/v1/big/blob", c.proxies[s].addr))
        .header("X-Vault-Token", &root)
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), StatusCode::OK, "download through standby {s}'s proxy");
    let mut stream = resp.bytes_stream();
    let mut ex = Extract::new();
    while let Some(chunk) = stream.next().await {
        ex.feed(&chunk.expect("download body"));
    }
    let (doc, got) = ex.finish();
    let down = t1.elapsed();
    assert_eq!(doc["data"]["v"], "x", "response shape: {doc}");
    assert_eq!(hex(&got), hex(&want), "the value came back changed");

    let rss_peak = peak_rss(proxy_pid);
    let node_peak = peak_rss(c.nodes[a].pid());
    eprintln!(
        "256 MiB through standby {s}'s proxy: upload {up:.2?}, download {down:.2?}; proxy VmHWM {:.1} MiB \
         before, {:.1} MiB after upload, {:.1} MiB at the end; active node VmHWM {:.1} MiB after upload, \
         {:.1} MiB at the end",
        mib(rss_before),
        mib(rss_after_up),
        mib(rss_peak),
        mib(node_after_up),
        mib(node_peak)
    );
    assert!(
        up + down < ROUND_TRIP_BOUND,
        "round trip took {:?} (bound {ROUND_TRIP_BOUND:?})",
        up + down
    );
    assert!(
        rss_peak < PROXY_PEAK_RSS_BOUND,
        "standby proxy peak RSS {:.1} MiB >= bound {:.1} MiB: it buffers bodies",
        mib(rss_peak),
        mib(PROXY_PEAK_RSS_BOUND)
    );
    // Still the same active (the large request did not cost it the lock), and every pair
    // still serves.
    assert_eq!(
        c.wait_one_active(ELECTION_BOUND).await,
        a,
        "the active changed during the round trip"
    );
    for (i, p) in c.proxies.iter().enumerate() {
        assert!(p.is_running(), "proxy {i} died");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the oversized chunked upload saw.
struct Refusal {
    /// The response's status line ("" if the connection closed without one).
    status: String,
    /// Body bytes the client had sent when the status line arrived.
    sent_at_status: u64,
    /// Whether the client managed to send the whole oversized body.
    sent_all: bool,
}

/// Sends `OVERSIZED_BODY` bytes of a chunked KV write to `addr` from one thread while reading
/// the response on another.
fn oversized_chunked_upload(addr: SocketAddr, root: &str) -> Refusal {
    let mut w = TcpStream::connect(addr).unwrap();
    let mut r = w.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    w.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let head = format!(
        "PUT /v1/big/refused HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {root}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let writer = std::thread::spawn({
        let sent = Arc::clone(&sent);
        move || {
            w.write_all(head.as_bytes()).ok()?;
            let data = vec![b'a'; 64 * 1024];
            let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
            frame.extend_from_slice(&data);
            frame.extend_from_slice(b"\r\n");
            w.write_all(b"6\r\n{\"v\":\"\r\n").ok()?;
            while sent.load(Ordering::SeqCst) < OVERSIZED_BODY {
                w.write_all(&frame).ok()?;
                sent.fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            w.write_all(b"2\r\n\"}\r\n0\r\n\r\n").ok()?;
            Some(())
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut sent_at_status = None;
    while let Ok(n) = r.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(2).any(|w| w == b"\r\n") {
            sent_at_status = Some(sent.load(Ordering::SeqCst));
            break;
        }
    }
    let sent_at_status = sent_at_status.unwrap_or_else(|| sent.load(Ordering::SeqCst));
    // Closing our side ends a writer blocked on a full socket buffer.
    let _ = r.shutdown(std::net::Shutdown::Both);
    let sent_all = writer.join().unwrap().is_some();
    Refusal {
        status: String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        sent_at_status,
        sent_all,
    }
}

/// Proves: a chunked (length not announced) body over `max_request_size` (8 MiB) sent to a
/// standby's proxy is answered 413 while the client is still sending (well before its 64 MiB
/// are out), the proxy does not buffer it (peak RSS under `PROXY_PEAK_RSS_BOUND`, far below
/// the 64 MiB offered), and nothing is written (the path reads 404 through both pairs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunked_body_is_refused_without_buffering() {
    let _serial = SERIAL.lock().await;
    let (c, a) = cluster(SMALL_MAX_REQUEST_SIZE).await;
    let s = (a + 1) % 3;
    let root = c.root_token().to_string();
    let addr = c.proxies[s].listen;
    let t0 = Instant::now();
    let r = tokio::task::spawn_blocking({
        let root = root.clone();
        move || oversized_chunked_upload(addr, &root)
    })
    .await
    .unwrap();
    let rss = peak_rss(c.proxies[s].pid());
    eprintln!(
        "oversized chunked body: {:?} after {:?}, {:.1} MiB sent by then (all sent: {}); proxy VmHWM {:.1} MiB",
        r.status,
        t0.elapsed(),
        mib(r.sent_at_status),
        r.sent_all,
        mib(rss)
    );
    assert!(r.status.contains(" 413 "), "expected 413, got {:?}", r.status);
    assert!(
        r.sent_at_status < OVERSIZED_BODY,
        "413 came only after the whole {} MiB body was sent",
        OVERSIZED_BODY >> 20
    );
    assert!(
        rss < PROXY_PEAK_RSS_BOUND,
        "standby proxy peak RSS {:.1} MiB >= bound {:.1} MiB",
        mib(rss),
        mib(PROXY_PEAK_RSS_BOUND)
    );
    for i in [s, a] {
        let (st, v) = c.nodes[i].request("GET", "big/refused", Some(&root), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "pair {i}: the refused body was written: {v}");
    }
    assert!(c.proxies[s].is_running(), "standby proxy died");
}

/// Proves: with lockd as the data store at its default 32 MiB value limit and
/// `max_request_size` raised to 64 MiB, a 40 MiB secret sent through a standby's proxy is
/// refused with a clear 400 naming the storage limit (not a 5xx or a dropped connection), and
/// nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_over_network_store_limit_is_a_clear_400() {
    let _serial = SERIAL.lock().await;
    let template = TestNode::builder()
        .listener_extra("max_request_size = 67108864")
        .config_extra("step_down_wait = \"2s\"");
    let c = TestCluster::builder()
        .nodes(3)
        .template(template)
        .proxies()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    let s = (a + 1) % 3;
    let root = c.root_token().to_string();
    c.nodes[a].mount_kv(&root, "big", "1").await;
    let mut body = b"{\"v\":\"".to_vec();
    body.resize(body.len() + 40 * 1024 * 1024, b'a');
    body.extend_from_slice(b"\"}");
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/big/too-big", c.proxies[s].addr))
        .header("X-Vault-Token", &root)
        .body(body)
        .send()
        .await
        .expect("upload");
    let st = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["errors"][0].as_str().unwrap_or_default();
    assert!(msg.contains("exceeds the") && msg.contains("limit"), "{v}");
    let (st, v) = c.nodes[s].request("GET", "big/too-big", Some(&root), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

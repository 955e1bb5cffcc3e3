//! The Pingora proxy of each pair, with real processes: lockd + 3 pairs of
//! `vha server` + `vha proxy`. Forwarding over the mTLS cluster channel, Vault's 307,
//! failover while writing through a standby's proxy (with early lock release), forged
//! advertisements, term changes, the TLS fallback, and header hygiene.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use vha_core::advert::{leader_path, Advertisement, LOCK_KEY};
use vha_core::barrier::Keyring;
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::storage::{Backend, HaBackend};
use vha_testkit::{wait_until_async, Fault, TestCluster};

/// Wide bound for an election in tests (debug builds on two busy cores).
const ELECTION_BOUND: Duration = Duration::from_secs(30);
/// The proxy's default hold bound (`proxy.hold_timeout`, 10 s) plus slack for a debug build:
/// no request through a proxy may take longer than this.
const REQUEST_BOUND: Duration = Duration::from_secs(14);

async fn cluster() -> (TestCluster, usize) {
    let c = TestCluster::builder().nodes(3).proxies().start().await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    (c, a)
}

/// Refused TLS handshakes counted by node `i`'s cluster listener (all reasons).
async fn handshake_failures(c: &TestCluster, i: usize) -> f64 {
    let (st, _, v) = c.nodes[i]
        .request_full("GET", "sys/metrics?format=prometheus", Some(c.root_token()), None, &[])
        .await;
    assert_eq!(st, StatusCode::OK);
    let text = v.as_str().unwrap_or_default().to_string();
    text.lines()
        .filter(|l| l.starts_with("vha_node_cluster_handshake_failures_total"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// A standby of active `a`.
fn standby(a: usize) -> usize {
    (a + 1) % 3
}

/// Masks what legitimately differs between two otherwise equal responses.
fn mask(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        if o.contains_key("request_id") {
            o.insert("request_id".into(), json!("<masked>"));
        }
    }
    v
}

fn relevant(h: &reqwest::header::HeaderMap) -> Vec<(String, String)> {
    ["content-type", "cache-control", "location"]
        .iter()
        .filter_map(|k| h.get(*k).map(|v| (k.to_string(), v.to_str().unwrap_or("").to_string())))
        .collect()
}

/// Through a standby's proxy, KV v2 write, read, list and delete (forwarded over mTLS to
/// the active) answer exactly as the same requests through the active's proxy: same
/// status (200, 204), same body but the request id, same relevant headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_proxy_kv_equals_active_proxy() {
    let (c, a) = cluster().await;
    let s = standby(a);
    let t = Some(c.root_token());
    let via = |i: usize| &c.nodes[i];
    // Write: same path, version 1 each (distinct paths), created_time differs: compare shape.
    let (st_s, h_s, w_s) = via(s)
        .request_full("POST", "secret/data/p-s", t, Some(json!({"data": {"k": "v"}})), &[])
        .await;
    let (st_a, h_a, w_a) = via(a)
        .request_full("POST", "secret/data/p-a", t, Some(json!({"data": {"k": "v"}})), &[])
        .await;
    assert_eq!(st_s, StatusCode::OK, "{w_s}");
    assert_eq!(st_s, st_a);
    assert_eq!(relevant(&h_s), relevant(&h_a));
    let strip_time = |mut v: Value| {
        v["data"]["created_time"] = json!("<t>");
        mask(v)
    };
    assert_eq!(strip_time(w_s), strip_time(w_a));
    // Read and list of the same data: identical but for request_id.
    for (m, p) in [
        ("GET", "secret/data/p-s"),
        ("GET", "secret/data/p-a"),
        ("LIST", "secret/metadata"),
        ("GET", "secret/metadata?list=true"),
        ("GET", "secret/data/missing"),
    ] {
        let (st_s, h_s, v_s) = via(s).request_full(m, p, t, None, &[]).await;
        let (st_a, h_a, v_a) = via(a).request_full(m, p, t, None, &[]).await;
        assert_eq!(st_s, st_a, "{m} {p}: {v_s} vs {v_a}");
        assert_eq!(relevant(&h_s), relevant(&h_a), "{m} {p}");
        assert_eq!(mask(v_s), mask(v_a), "{m} {p}");
    }
    let (_, _, keys) = via(s).request_full("LIST", "secret/metadata", t, None, &[]).await;
    let keys: BTreeSet<_> = keys["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["p-a".to_string(), "p-s".to_string()].into());
    // Delete: 204 both ways, empty body, and the data is gone.
    let (st_s, h_s, b_s) = via(s).request_full("DELETE", "secret/metadata/p-s", t, None, &[]).await;
    let (st_a, h_a, b_a) = via(a).request_full("DELETE", "secret/metadata/p-a", t, None, &[]).await;
    assert_eq!(st_s, StatusCode::NO_CONTENT);
    assert_eq!(st_a, StatusCode::NO_CONTENT);
    assert_eq!((b_s, relevant(&h_s)), (b_a, relevant(&h_a)));
    let (st, _) = via(s).request("GET", "secret/data/p-s", t, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Errors are forwarded verbatim too (403 without a token).
    let (st_s, _, v_s) = via(s).request_full("GET", "secret/data/p-a", None, None, &[]).await;
    let (st_a, _, v_a) = via(a).request_full("GET", "secret/data/p-a", None, None, &[]).await;
    assert_eq!((st_s, mask(v_s)), (st_a, mask(v_a)));
    // Counted once each response has gone out (Pingora's logging phase): polled.
    wait_until_async(
        || async {
            (c.proxies[s]
                .metric("vha_proxy_requests_total{class=\"2xx\",route=\"forward\"}")
                .await
                >= 5.0)
                .then_some(())
        },
        "the standby's proxy counts 5 forwarded 2xx",
        vha_testkit::proxy::METRICS_SETTLE,
    )
    .await;
}

/// With a non-empty `X-Vault-No-Request-Forwarding`, a standby's proxy answers 307 with
/// `Location` = the active's api_addr + the original path and query, byte for byte, and an
/// empty body; a client following it keeps method, body and token (the write lands); an
/// empty header value is forwarded, not redirected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_307_exact_location_and_follow() {
    let (c, a) = cluster().await;
    let s = standby(a);
    let t = Some(c.root_token());
    let hdr = [("X-Vault-No-Request-Forwarding", "true")];
    let (st, h, body) = c.nodes[s]
        .request_full(
            "POST",
            "secret/data/r?x=1&y=%2Fz&e=",
            t,
            Some(json!({"data": {"a": 1}})),
            &hdr,
        )
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        h["location"].to_str().unwrap(),
        format!("{}/v1/secret/data/r?x=1&y=%2Fz&e=", c.nodes[a].addr)
    );
    assert_eq!(body, Value::Null, "307 has an empty body");
    // Nothing was written by the redirect itself.
    let (st, _) = c.nodes[a].request("GET", "secret/data/r", t, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // A following client (reqwest keeps method, body and X-Vault-Token on 307).
    let follow = reqwest::Client::builder().timeout(REQUEST_BOUND).build().unwrap();
    let resp = follow
        .post(format!("{}/v1/secret/data/r", c.nodes[s].addr))
        .header("X-Vault-Token", c.root_token())
        .header("X-Vault-No-Request-Forwarding", "1")
        .json(&json!({"data": {"followed": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.url().as_str(),
        format!("{}/v1/secret/data/r", c.nodes[a].addr),
        "ended at the active"
    );
    let (st, v) = c.nodes[a].request("GET", "secret/data/r", t, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["data"], json!({"followed": true}));

    // An empty value is not a request for a redirect: forwarded.
    let (st, _, v) = c.nodes[s]
        .request_full(
            "GET",
            "secret/data/r",
            t,
            None,
            &[("X-Vault-No-Request-Forwarding", "")],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["data"], json!({"followed": true}));
    assert!(
        c.proxies[s]
            .metric("vha_proxy_redirects_total{reason=\"header\"}")
            .await
            >= 2.0
    );
}

/// SIGKILL of the active node while a client writes through a standby's proxy: requests
/// that were not yet sent are held and succeed on the new active; no request takes longer
/// than the hold bound; every acknowledged write is readable afterwards. The failover runs
/// on the early lock release by the dead node's own proxy (proof of death), so the write gap
/// stays well under the 10 s lease TTL. The previous term's certificate is never used after
/// the failover: the new active's cluster listener refuses no handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sigkill_active_while_writing_through_standby() {
    let mut c = TestCluster::builder().nodes(3).proxies().lock_ttl("10s").start().await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    // Write through a standby's proxy (its node may or may not become the next active).
    let s = standby(a);
    let writer_addr = c.nodes[s].addr.clone();
    let token = c.root_token().to_string();
    let http = reqwest::Client::builder().timeout(REQUEST_BOUND).build().unwrap();
    let killed_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed_seen = killed_flag.clone();
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        let mut max_latency = Duration::ZERO;
        let mut after_kill = 0usize;
        let mut i = 0usize;
        // 30 acknowledged writes sent after the kill (or give up after 5000 writes).
        while after_kill < 30 && i < 5000 {
            let sent_after_kill = killed_seen.load(std::sync::atomic::Ordering::SeqCst);
            let started = Instant::now();
            let r = http
                .post(format!("{writer_addr}/v1/secret/data/f{i}"))
                .header("X-Vault-Token", &token)
                .json(&json!({"data": {"i": i}}))
                .send()
                .await;
            max_latency = max_latency.max(started.elapsed());
            match r {
                Ok(resp) if resp.status() == StatusCode::OK => {
                    acked.push(i);
                    after_kill += usize::from(sent_after_kill);
                }
                Ok(resp) => failed.push((i, resp.status().as_u16(), resp.text().await.unwrap_or_default())),
                Err(e) => failed.push((i, 0, e.to_string())),
            }
            i += 1;
        }
        (acked, failed, max_latency)
    });
    // Kill the active node (not its proxy) once 20 writes went through.
    wait_until_async(
        || async {
            (c.proxies[s]
                .metric("vha_proxy_requests_total{class=\"2xx\",route=\"forward\"}")
                .await
                >= 20.0)
                .then_some(())
        },
        "20 writes through the standby",
        ELECTION_BOUND,
    )
    .await;
    let killed = Instant::now();
    c.nodes[a].kill();
    killed_flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, failed, max_latency) = writer.await.unwrap();
    let n = c.wait_new_active(a, ELECTION_BOUND).await;
    eprintln!(
        "failover through proxy: {} acked, {} failed, max request latency {:?}, total {:?}; failures: {failed:?}",
        acked.len(),
        failed.len(),
        max_latency,
        killed.elapsed()
    );
    assert!(
        max_latency < REQUEST_BOUND,
        "a request hung past the bound: {max_latency:?}"
    );
    assert!(
        max_latency < Duration::from_secs(8),
        "early release should beat the 10 s lease TTL: {max_latency:?}"
    );
    // Only a request already in flight at the kill may fail, and only with a clear 502/503.
    if failed.len() > 1 {
        eprintln!(
            "standby's proxy log:\n{}\nnew active's log:\n{}",
            c.proxies[s].output(),
            c.nodes[n].output()
        );
    }
    assert!(
        failed.len() <= 1,
        "requests not yet sent must be held, not failed: {failed:?}"
    );
    for (_, st, body) in &failed {
        assert!(matches!(st, 502 | 503), "unexpected failure {st}: {body}");
        assert!(body.contains("errors"), "failure without a clear error: {body}");
    }
    // No acknowledged write is lost.
    for i in &acked {
        let (st, v) = c.nodes[n]
            .request("GET", &format!("secret/data/f{i}"), Some(c.root_token()), None)
            .await;
        assert_eq!(st, StatusCode::OK, "acknowledged write f{i} lost: {v}");
        assert_eq!(v["data"]["data"]["i"], json!(i));
    }
    // The old term's certificate was never used against the new active: its cluster
    // listener refused no handshake. Nothing waited out the hold bound.
    assert_eq!(
        handshake_failures(&c, n).await,
        0.0,
        "the new active refused a cluster handshake"
    );
    assert_eq!(
        c.proxies[s]
            .metric("vha_proxy_redirects_total{reason=\"hold_bound\"}")
            .await,
        0.0
    );
}

/// After a step-down the old active stays up (as a standby) and a new term starts with a
/// new certificate: the other pairs' proxies switch to the new advertisement and forward
/// with the new identity only: every write succeeds and the new active's cluster listener
/// never refuses a handshake (an old-term certificate would be refused by the pin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_term_cert_never_used_after_step_down() {
    let (c, a) = cluster().await;
    let t = Some(c.root_token());
    let (st, v) = c.nodes[a].request("PUT", "sys/step-down", t, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let n = c.wait_new_active(a, ELECTION_BOUND).await;
    let third = (0..3).find(|i| *i != a && *i != n).unwrap();
    for i in 0..20 {
        let (st, v) = c.nodes[third]
            .request(
                "POST",
                &format!("secret/data/sd{i}"),
                t,
                Some(json!({"data": {"i": i}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "write {i} through {third} after step-down: {v}");
    }
    // Writes through the old active's pair are forwarded to the new active as well.
    let (st, v) = c.nodes[a]
        .request("POST", "secret/data/sd-old", t, Some(json!({"data": {"x": 1}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        handshake_failures(&c, n).await,
        0.0,
        "the new active refused a cluster handshake"
    );
}

/// Step-downs under write load fail no request: writers through all three pairs keep
/// writing while the active steps down three times. Requests in flight at a step-down
/// finish (the cluster listener drains them before the lock is released); requests that
/// reach a node which is no longer active (on a pooled cluster connection, or at the old
/// active's own pair before its proxy saw the role change) are refused by the node's loop
/// guard as "not active", held by the proxy and sent to the next active. So every request
/// gets its 200 within the hold bound, and every acknowledged write is readable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_downs_under_write_load_fail_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (c, mut a) = cluster().await;
    let token = c.root_token().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..3 {
        let addr = c.nodes[w].addr.clone();
        let token = token.clone();
        let stop = stop.clone();
        let acked_total = acked_total.clone();
        let http = reqwest::Client::builder().timeout(REQUEST_BOUND).build().unwrap();
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed, mut max_latency) = (Vec::new(), Vec::new(), Duration::ZERO);
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && i < 4000 {
                let started = Instant::now();
                let r = http
                    .post(format!("{addr}/v1/secret/data/w{w}-{i}"))
                    .header("X-Vault-Token", &token)
                    .json(&json!({"data": {"i": i}}))
                    .send()
                    .await;
                max_latency = max_latency.max(started.elapsed());
                match r {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        acked.push(i);
                        acked_total.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => failed.push((i, resp.status().as_u16(), resp.text().await.unwrap_or_default())),
                    Err(e) => failed.push((i, 0, e.to_string())),
                }
                i += 1;
            }
            (w, acked, failed, max_latency)
        }));
    }
    for round in 0..3 {
        let before = acked_total.load(Ordering::SeqCst);
        wait_until_async(
            || async { (acked_total.load(Ordering::SeqCst) >= before + 30).then_some(()) },
            "30 more writes before the step-down",
            ELECTION_BOUND,
        )
        .await;
        let (st, v) = c.nodes[a].request("PUT", "sys/step-down", Some(&token), None).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "step-down {round}: {v}");
        a = c.wait_new_active(a, ELECTION_BOUND).await;
    }
    let before = acked_total.load(Ordering::SeqCst);
    wait_until_async(
        || async { (acked_total.load(Ordering::SeqCst) >= before + 30).then_some(()) },
        "30 more writes after the last step-down",
        ELECTION_BOUND,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut refusals = 0.0;
    for p in &c.proxies {
        refusals += p.metric("vha_proxy_forward_errors_total{kind=\"not_active\"}").await;
    }
    for writer in writers {
        let (w, acked, failed, max_latency) = writer.await.unwrap();
        eprintln!(
            "writer {w}: {} acked, {} failed, max latency {max_latency:?}; not-active refusals held and resent (all proxies): {refusals}",
            acked.len(),
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "writer {w}: requests failed across step-downs: {failed:?}"
        );
        assert!(
            max_latency < REQUEST_BOUND,
            "writer {w}: a request took {max_latency:?}"
        );
        for i in acked {
            let (st, v) = c.nodes[a]
                .request("GET", &format!("secret/data/w{w}-{i}"), Some(&token), None)
                .await;
            assert_eq!(st, StatusCode::OK, "acknowledged write w{w}-{i} lost: {v}");
            assert_eq!(v["data"]["data"]["i"], json!(i));
        }
    }
}

/// An advertisement written straight into storage without the barrier key (here: sealed
/// with another keyring, pointing at a listener the test owns) is ignored: proxies that
/// authenticated the real one keep forwarding to it, a freshly started proxy refuses the
/// forgery (counted), and nobody ever connects to the forged cluster address. A real new
/// term (step-down) is picked up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_advertisement_ignored() {
    let (mut c, a) = cluster().await;
    let s = standby(a);
    let root = c.root_token().to_string();
    let t = Some(root.as_str());
    // Make s's proxy authenticate the real advertisement first.
    let (st, v) = c.nodes[s]
        .request("POST", "secret/data/before", t, Some(json!({"data": {"x": 1}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let store = c.lockd.as_ref().unwrap().client();
    let holder = store.holder(LOCK_KEY).await.unwrap().expect("a holder");
    let id = ClusterIdentity::generate(&holder.value).unwrap();
    let forged = Advertisement {
        redirect_addr: "http://127.0.0.1:1".into(),
        cluster_addr: format!("https://{trap_addr}"),
        cluster_cert: id.cert_der.clone(),
        cluster_key_params: Some(id.params.clone()),
    };
    let path = leader_path(&holder.value);
    let sealed = Keyring::generate().encrypt(&path, &serde_json::to_vec(&forged).unwrap());
    store.put(&path, sealed, None).await.expect("forge");

    // Proxies that hold the authenticated advertisement keep using it.
    for i in 0..5 {
        let (st, v) = c.nodes[s]
            .request(
                "POST",
                &format!("secret/data/forged{i}"),
                t,
                Some(json!({"data": {"i": i}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    // A restarted proxy reads the forged entry and refuses it.
    c.proxies[s].restart();
    wait_until_async(
        || async { (c.proxies[s].metric("vha_proxy_advertisement_rejected_total").await >= 1.0).then_some(()) },
        "the restarted proxy rejects the forged advertisement",
        ELECTION_BOUND,
    )
    .await;
    assert_eq!(
        c.proxies[s].metric("vha_proxy_active_known").await,
        0.0,
        "forgery must not be believed"
    );
    // Nobody connected to the forged address.
    assert!(
        trap.accept().is_err(),
        "a proxy connected to the forged cluster address"
    );

    // A real new term: forwarding resumes through the restarted proxy.
    let (st, v) = c.nodes[a].request("PUT", "sys/step-down", t, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let n = c.wait_new_active(a, ELECTION_BOUND).await;
    let _ = n;
    let (st, v) = c.nodes[s]
        .request("POST", "secret/data/after", t, Some(json!({"data": {"x": 2}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        trap.accept().is_err(),
        "a proxy connected to the forged cluster address"
    );
}

/// A TLS failure on the cluster channel (the relay in front of the active's cluster
/// listener accepts and closes every connection) makes the standby's proxy fall back to
/// Vault's 307 to the active's api_addr at once, and count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_tls_failure_falls_back_to_307() {
    let c = TestCluster::builder().nodes(3).proxies().relay_cluster().start().await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    let s = standby(a);
    c.cluster_relays[a].set(Fault::Drop);
    let started = Instant::now();
    let (st, h, body) = c.nodes[s]
        .request_full("GET", "secret/data/x?v=1", Some(c.root_token()), None, &[])
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT, "{body}");
    assert_eq!(
        h["location"].to_str().unwrap(),
        format!("{}/v1/secret/data/x?v=1", c.nodes[a].addr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "TLS fallback must not wait for the hold bound"
    );
    assert!(
        c.proxies[s]
            .metric("vha_proxy_forward_errors_total{kind=\"tls\"}")
            .await
            >= 1.0
    );
    assert!(
        c.proxies[s]
            .metric("vha_proxy_redirects_total{reason=\"tls_fallback\"}")
            .await
            >= 1.0
    );
    // Healed: forwarding again.
    c.cluster_relays[a].heal();
    let (st, _) = c.nodes[s]
        .request("GET", "secret/data/x", Some(c.root_token()), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "forwarded again (404: no such secret)");
}

fn raw_http(addr: std::net::SocketAddr, req: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Header hygiene: a client-supplied internal client-address header never reaches a node
/// (the audit log of the active shows the real peer, through the active's proxy and through
/// a standby's forwarding proxy); conflicting `Content-Length` + `Transfer-Encoding`, or two
/// different `Content-Length`s, are refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_hygiene() {
    let (c, a) = cluster().await;
    let s = standby(a);
    let t = Some(c.root_token());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let (st, v) = c.nodes[a]
        .request(
            "PUT",
            "sys/audit/file",
            t,
            Some(json!({"type": "file", "options": {"file_path": log.to_str().unwrap()}})),
        )
        .await;
    assert!(st.is_success(), "{st} {v}");
    for i in [a, s] {
        let (st, _, v) = c.nodes[i]
            .request_full(
                "GET",
                "sys/mounts",
                t,
                None,
                &[("x-vha-client-addr", "6.6.6.6:6666"), ("X-Forwarded-For", "7.7.7.7")],
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let addrs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["request"]["path"] == "sys/mounts")
        .map(|e| e["request"]["remote_address"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        addrs.len() >= 4,
        "request+response entries for both requests: {addrs:?}\n{text}"
    );
    assert!(
        addrs.iter().all(|a| a == "127.0.0.1"),
        "spoofed client address reached the node: {addrs:?}"
    );

    for i in [a, s] {
        let listen = c.proxies[i].listen;
        let resp = raw_http(
            listen,
            b"POST /v1/secret/data/smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "CL+TE via proxy {i}: {resp}");
        let resp = raw_http(
            listen,
            b"POST /v1/secret/data/smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "CL+CL via proxy {i}: {resp}");
    }
    let (st, _) = c.nodes[a].request("GET", "secret/data/smuggle", t, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "nothing was written");
}

/// Local-only paths are answered by the pair's own node in every state (a standby's
/// sys/leader, its own refusal of sys/seal, its health). When the pair's node is down, its
/// proxy answers local paths with a quick 503 and keeps forwarding everything else with the
/// last advertisement it authenticated; when the node comes back (a new process, sealed),
/// its health says sealed while the proxy goes on forwarding with the keyring the previous
/// process handed over, and it is unsealed through the proxy. A seal by request of the
/// process that handed the keyring over (the active's `sys/seal`) drops keyring and
/// advertisement: that pair answers 503 "Vault is sealed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_paths_and_node_down() {
    let (mut c, a) = cluster().await;
    let s = standby(a);
    let root = c.root_token().to_string();
    let t = Some(root.as_str());
    let (st, v) = c.nodes[s].request("GET", "sys/leader", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["is_self"], false);
    assert_eq!(v["leader_address"], c.nodes[a].addr.as_str());
    let (st, v) = c.nodes[s].request("PUT", "sys/seal", t, None).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        v["errors"][0],
        "cannot seal when in standby mode; please restart instead"
    );
    wait_until_async(
        || async {
            (c.nodes[s]
                .request("GET", "sys/health?standbyok=true", None, None)
                .await
                .0
                == StatusCode::OK)
                .then_some(())
        },
        "standby health through its proxy",
        ELECTION_BOUND,
    )
    .await;

    // Node down: local paths 503 at once, other paths still forwarded.
    c.nodes[s].kill();
    let started = Instant::now();
    let (st, v) = c.nodes[s].request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let (st, v) = c.nodes[s]
        .request("POST", "secret/data/down", t, Some(json!({"data": {"x": 1}})))
        .await;
    assert_eq!(
        st,
        StatusCode::OK,
        "forwarding with the last advertisement while the node is down: {v}"
    );

    // Back as a new process, sealed: health says so, the rest is still forwarded.
    c.nodes[s].restart().await;
    wait_until_async(
        || async { (c.proxies[s].metric("vha_proxy_local_role{role=\"restarting\"}").await == 1.0).then_some(()) },
        "the proxy sees its node restarted and sealed",
        ELECTION_BOUND,
    )
    .await;
    let (st, v) = c.nodes[s].request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "a sealed node's health: {v}");
    assert_eq!(v["sealed"], true, "{v}");
    let (st, v) = c.nodes[s].request("GET", "secret/data/down", t, None).await;
    assert_eq!(st, StatusCode::OK, "forwarded while the restarted node is sealed: {v}");
    c.unseal(s).await;
    wait_until_async(
        || async { (c.nodes[s].request("GET", "secret/data/down", t, None).await.0 == StatusCode::OK).then_some(()) },
        "forwarding after unseal",
        ELECTION_BOUND,
    )
    .await;

    // The active sealed by request: its pair drops keyring and advertisement.
    let (st, v) = c.nodes[a].request("PUT", "sys/seal", t, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    wait_until_async(
        || async {
            let (st, v) = c.nodes[a].request("GET", "secret/data/down", t, None).await;
            (st == StatusCode::SERVICE_UNAVAILABLE && v["errors"][0] == "Vault is sealed").then_some(())
        },
        "the sealed pair answers 503 Vault is sealed",
        ELECTION_BOUND,
    )
    .await;
}

/// The client-facing listener with TLS (`tls_cert_file`/`tls_key_file`): a standby's proxy
/// serves HTTPS and forwards over the cluster channel, and its 307 points at the active's
/// https `api_addr`; a client that opens a connection and never finishes the TLS handshake
/// (half a ClientHello) is cut off soon after the 10 s deadline (Pingora alone would wait
/// forever); plain HTTP sent to the TLS port only gets a closed connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_https_and_bounds_handshakes() {
    let c = TestCluster::builder()
        .nodes(2)
        .template(vha_testkit::TestNode::builder().listener_tls())
        .proxies()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    let s = 1 - a;
    let listen = c.proxies[s].listen;
    let stalled = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(listen).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let start = Instant::now();
        // A TLS record header announcing a ClientHello that never comes.
        tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x50]).unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        start.elapsed()
    });
    c.mount_secret(a).await;
    assert!(c.nodes[s].addr.starts_with("https://"), "{}", c.nodes[s].addr);
    let (st, v) = c.nodes[s]
        .request(
            "POST",
            "secret/data/tls",
            Some(c.root_token()),
            Some(json!({"data": {"x": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "write over https through the standby's proxy: {v}");
    let (st, v) = c.nodes[a]
        .request("GET", "secret/data/tls", Some(c.root_token()), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["data"]["x"], 1);
    let (st, h, _) = c.nodes[s]
        .request_full(
            "GET",
            "secret/data/tls",
            Some(c.root_token()),
            None,
            &[("X-Vault-No-Request-Forwarding", "1")],
        )
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    let location = h.get("location").and_then(|l| l.to_str().ok()).unwrap_or_default();
    assert_eq!(location, format!("{}/v1/secret/data/tls", c.nodes[a].addr));
    // Plain HTTP to the TLS port: the handshake fails, the connection closes, no answer.
    let plain = raw_http(listen, b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        !plain.contains("HTTP/1.1 200"),
        "plain HTTP answered on the TLS port: {plain:?}"
    );
    let took = stalled.await.unwrap();
    eprintln!("stalled TLS handshake cut off after {took:?}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(30),
        "stalled handshake held for {took:?} (deadline 10 s)"
    );
}

/// Property: a proxy whose listen address another process holds exits 1, with a message that
/// names the address, instead of running on without a listener: Pingora gives up binding
/// after its own retries (about 30 s) in a service thread and the process would live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_that_cannot_listen_exits_nonzero() {
    let node = vha_testkit::TestNode::builder().behind_proxy().start().await;
    // The proxy's address, held by the test (no proxy was started for this node).
    let held = std::net::TcpListener::bind(("127.0.0.1", node.port)).expect("hold the proxy's port");
    let mut cmd = std::process::Command::new(vha_testkit::vha_binary());
    cmd.arg("proxy")
        .arg("--config")
        .arg(&node.config_path)
        .env("NO_COLOR", "1");
    let mut proxy = vha_testkit::ChildProc::spawn("vha proxy (port taken)", cmd, &node.dir().join("proxy-taken.log"));
    // Pingora's bind retries (30 s), the proxy's listen bound (45 s), and room for a busy CI.
    let status = proxy.wait_exit(Duration::from_secs(120));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "exit status {status:?}; output:\n{}",
        proxy.output()
    );
    let listen = format!("not listening on 127.0.0.1:{}", node.port);
    assert!(
        proxy.output().contains(&listen),
        "the error names the address: {}",
        proxy.output()
    );
    drop(held);
}

/// KV v2 value of `secret/data/{key}` read through node `i`'s proxy.
async fn read_v(c: &TestCluster, i: usize, key: &str) -> Value {
    let (st, v) = c.nodes[i]
        .request("GET", &format!("secret/data/{key}"), Some(c.root_token()), None)
        .await;
    assert_eq!(st, StatusCode::OK, "read {key} through {i}: {v}");
    v["data"]["data"]["v"].clone()
}

/// The active's read cache never serves a value from before a failover: node A reads a
/// secret until its cache answers (`vault_cache_hit` moves), steps down (its cache is empty
/// at once), B writes a new value, A (now a standby, forwarding) reads the new value, B
/// steps down, and A, active again, still reads the new value, never its cached old one. A
/// seal and unseal leave the cache empty too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cache_never_serves_a_value_from_before_a_failover() {
    let c = TestCluster::builder().nodes(2).proxies().start().await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    let b = 1 - a;
    c.mount_secret(a).await;
    let t = Some(c.root_token());
    let write = |i: usize, v: u32| {
        let c = &c;
        async move {
            let (st, body) = c.nodes[i]
                .request("POST", "secret/data/cached", t, Some(json!({"data": {"v": v}})))
                .await;
            assert_eq!(st, StatusCode::OK, "write {v} through {i}: {body}");
        }
    };
    // Node i's own metrics: sys/metrics is local-only, its proxy never forwards it.
    let metric = |i: usize, name: &'static str| {
        let c = &c;
        async move {
            let (st, _, v) = c.nodes[i]
                .request_full("GET", "sys/metrics?format=prometheus", t, None, &[])
                .await;
            assert_eq!(st, StatusCode::OK, "metrics of {i}: {v}");
            vha_testkit::prometheus::series_value(v.as_str().unwrap_or_default(), name, &[])
        }
    };

    write(a, 1).await;
    let hits = metric(a, "vault_cache_hit").await;
    for _ in 0..3 {
        assert_eq!(read_v(&c, a, "cached").await, json!(1));
    }
    assert!(
        metric(a, "vault_cache_hit").await > hits,
        "the active's cache never answered a read"
    );
    assert!(metric(a, "vha_node_cache_entries").await > 0.0);

    let (st, v) = c.nodes[a].request("PUT", "sys/step-down", t, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(c.wait_new_active(a, ELECTION_BOUND).await, b);
    assert_eq!(
        metric(a, "vha_node_cache_entries").await,
        0.0,
        "a standby keeps no cache"
    );
    write(b, 2).await;
    assert_eq!(
        read_v(&c, a, "cached").await,
        json!(2),
        "through the old active, now a standby"
    );

    let (st, v) = c.nodes[b].request("PUT", "sys/step-down", t, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(c.wait_new_active(b, ELECTION_BOUND).await, a);
    for _ in 0..3 {
        assert_eq!(read_v(&c, a, "cached").await, json!(2), "the old active, active again");
    }
    assert!(metric(a, "vha_node_cache_entries").await > 0.0);

    let (st, v) = c.nodes[a].request("PUT", "sys/seal", t, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    c.unseal(a).await;
    assert_eq!(
        metric(a, "vha_node_cache_entries").await,
        0.0,
        "an unsealed node starts empty"
    );
    // The seal ended a's term: b takes the lock, and a's proxy learns that its node is
    // unsealed (until then it answers 503 sealed); the first answer it serves is the value.
    c.wait_one_active(ELECTION_BOUND).await;
    let v = wait_until_async(
        || async {
            let (st, v) = c.nodes[a]
                .request("GET", "secret/data/cached", Some(c.root_token()), None)
                .await;
            (st != StatusCode::SERVICE_UNAVAILABLE).then_some((st, v))
        },
        "a's proxy serves again after the unseal",
        ELECTION_BOUND,
    )
    .await;
    assert_eq!(v.0, StatusCode::OK, "{}", v.1);
    assert_eq!(v.1["data"]["data"]["v"], json!(2));
}

/// `THP_enabled` of a running process (`/proc/PID/status`: 0 once `PR_SET_THP_DISABLE` is
/// set for it).
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled line for {pid}: {status}"))
        .trim()
        .to_string()
}

/// Property: `vha server` and `vha proxy` run with transparent huge pages off (the kernel's
/// per-process flag, `vha_core::huge_pages`), so an idle pair stays small; lockd keeps them
/// (its heap holds the whole data set), which also shows the flag is not simply off for
/// every process on this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_proxy_run_without_huge_pages() {
    let (c, _) = cluster().await;
    for n in &c.nodes {
        assert_eq!(thp_enabled(n.pid()), "0", "vha server {}", n.pid());
    }
    assert!(!c.proxies.is_empty());
    for p in &c.proxies {
        assert_eq!(thp_enabled(p.pid()), "0", "vha proxy {}", p.pid());
    }
    let lockd = c.lockd.as_ref().expect("the cluster's lockd");
    assert_eq!(thp_enabled(lockd.pid()), "1", "vha lockd {}", lockd.pid());
}

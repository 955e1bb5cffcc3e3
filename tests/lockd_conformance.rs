//! lockd through its real process: core's conformance suites with `LockdBackend` clients,
//! watch latency, compare-and-put, bad input, metrics and snapshots.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vha_core::storage::conformance::{exercise_backend, exercise_ha_backend};
use vha_core::storage::lockd::{CancellationToken, LockdBackend};
use vha_core::storage::{Backend, Fence, HaBackend, StorageError, WatchEvent};
use vha_testkit::lockd::run_lockd_cmd;
use vha_testkit::TestLockd;

fn client(l: &TestLockd) -> LockdBackend {
    l.client()
}

/// `vha lockd snapshot save FILE` from `l` (with its credentials): `(success, output)`.
fn snapshot_save(l: &TestLockd, file: &Path) -> (bool, String) {
    let mut args = vec!["snapshot".to_string(), "save".to_string(), file.display().to_string()];
    args.extend(l.client_args());
    run_lockd_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `vha lockd snapshot restore FILE --data-dir DIR`: `(success, output)`.
fn snapshot_restore(file: &Path, dir: &Path) -> (bool, String) {
    run_lockd_cmd(&[
        "snapshot",
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        dir.to_str().unwrap(),
    ])
}

/// The KV conformance suite (get/put/delete/list, fencing, limits, watch) passes against a
/// real lockd, twice in a row (persistent store, namespaced keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_conformance() {
    let l = TestLockd::start();
    let b = client(&l);
    exercise_backend(&b).await;
    exercise_backend(&b).await;
}

/// The HA conformance suite passes with two *separate* clients (two connections) of one
/// lockd: mutual exclusion, holder reads, increasing tokens, release hand-over, cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_conformance() {
    let l = TestLockd::start();
    let (b1, b2) = (client(&l), client(&l));
    exercise_ha_backend(&b1, &b2).await;
}

/// Watch events arrive well under 100 ms after the write is acknowledged (median of 30,
/// with a generous ceiling on the slowest so a busy CI machine does not flake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_latency_under_100ms() {
    let l = TestLockd::start();
    let (w, b) = (client(&l), client(&l));
    let mut rx = w.watch("lat/").await.unwrap();
    let mut lat = Vec::new();
    for i in 0..30 {
        let key = format!("lat/{i}");
        let t = Instant::now();
        b.put(&key, b"x".to_vec(), None).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(WatchEvent::Put(k))) if k == key => break,
                Ok(Some(_)) => continue,
                other => panic!("no watch event for {key}: {other:?}"),
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!("watch latency (put sent -> event): p50 {:?} max {:?}", lat[15], lat[29]);
    assert!(
        lat[15] < Duration::from_millis(100),
        "median watch latency {:?}",
        lat[15]
    );
    assert!(lat[29] < Duration::from_secs(1), "slowest watch latency {:?}", lat[29]);
}

/// A watch survives a lockd restart: the client re-establishes it and yields `Resync`, then
/// later events flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resyncs_after_restart() {
    let mut l = TestLockd::start();
    let (w, b) = (client(&l), client(&l));
    let mut rx = w.watch("rs/").await.unwrap();
    l.restart();
    let deadline = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(deadline, rx.recv()).await {
            Ok(Some(WatchEvent::Resync)) => break,
            Ok(Some(_)) => continue,
            other => panic!("expected Resync after restart, got {other:?}"),
        }
    }
    b.put("rs/after", b"1".to_vec(), None).await.unwrap();
    loop {
        match tokio::time::timeout(deadline, rx.recv()).await {
            Ok(Some(WatchEvent::Put(k))) if k == "rs/after" => break,
            Ok(Some(_)) => continue,
            other => panic!("no event after resync: {other:?}"),
        }
    }
}

/// Compare-and-put applies only on the expected revision (0 = absent) and records the
/// writer's fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_put() {
    let l = TestLockd::start();
    let b = client(&l);
    let r1 = b
        .compare_and_put("cas/k", b"1".to_vec(), 0, None)
        .await
        .expect("create when absent");
    assert!(matches!(
        b.compare_and_put("cas/k", b"x".to_vec(), 0, None).await,
        Err(StorageError::Invalid(_))
    ));
    let f = Fence {
        lock: "cas/lock".into(),
        token: 3,
    };
    let r2 = b
        .compare_and_put("cas/k", b"2".to_vec(), r1, Some(&f))
        .await
        .expect("update at revision");
    assert!(r2 > r1);
    assert!(
        b.compare_and_put("cas/k", b"3".to_vec(), r1, None).await.is_err(),
        "old revision rejected"
    );
    let e = b.get("cas/k").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.fence_token), (&b"2"[..], Some(3)));
}

async fn raw(http: &reqwest::Client, l: &TestLockd, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = http
        .post(format!("{}{path}", l.address()))
        .bearer_auth(l.token().expect("token"))
        .body(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

/// Sends only a request head declaring `len` body bytes and reads lockd's answer.
async fn oversized_head(l: &TestLockd, len: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = l.address().trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&host).await.expect("connect");
    let head = format!(
        "POST /v1/kv/put HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n",
        l.token().expect("token")
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("lockd answers an oversized head without waiting for the body")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Bad input gets clear 4xx JSON errors with a typed code, nothing is written, and lockd
/// keeps serving: malformed JSON, unknown fields, bad base64, oversized key and value,
/// stale fencing tokens, renewing an expired or unknown lease, releasing a stale token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_cleanly() {
    let l = TestLockd::builder().arg("--min-lease-ttl").arg("50ms").start();
    let http = reqwest::Client::new();
    let code = |v: &Value| v["code"].as_str().unwrap_or("").to_string();

    let (s, v) = raw(&http, &l, "/v1/kv/put", "{not json").await;
    assert_eq!((s, code(&v).as_str()), (400, "malformed"), "{v}");
    assert!(v["errors"][0].as_str().is_some(), "Vault-shaped errors array: {v}");
    let (s, v) = raw(&http, &l, "/v1/kv/put", r#"{"key":"a","value":"","bogus":1}"#).await;
    assert_eq!((s, code(&v).as_str()), (400, "malformed"), "{v}");
    let (s, v) = raw(&http, &l, "/v1/kv/put", r#"{"key":"a","value":"%%%"}"#).await;
    assert_eq!((s, code(&v).as_str()), (400, "malformed"), "{v}");
    let long = "k".repeat(2000);
    let (s, v) = raw(&http, &l, "/v1/kv/put", json!({"key": long, "value": ""}).to_string()).await;
    assert_eq!((s, code(&v).as_str()), (400, "invalid"), "{v}");
    let (s, v) = raw(&http, &l, "/v1/kv/put", json!({"key": "../x", "value": ""}).to_string()).await;
    assert_eq!((s, code(&v).as_str()), (400, "invalid"), "{v}");
    // A declared body over the limit is refused before any of it is read: the request head
    // alone gets the 413 (a client streaming the body would otherwise race the close).
    let (s, v) = oversized_head(&l, 46 * 1024 * 1024).await;
    assert_eq!((s, code(&v).as_str()), (413, "too_large"), "{v}");
    // A chunked body with no declared length is cut off once it passes the limit.
    // 46 MiB in 64 KiB chunks, made as they are sent.
    let chunks = std::iter::repeat_with(|| Ok::<_, std::io::Error>(vec![b'a'; 64 * 1024])).take(736);
    let stream = futures::stream::iter(chunks);
    match http
        .post(format!("{}/v1/kv/put", l.address()))
        .bearer_auth(l.token().expect("token"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
    {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        // The server answered and closed while the rest of the body was still in flight.
        Err(e) => assert!(e.is_request(), "chunked oversize body: {e:?}"),
    }
    let (s, _) = raw(&http, &l, "/v1/nope", "{}").await;
    assert_eq!(s, 404);

    // Stale fencing token: 409 with both token numbers, value unchanged.
    let b = client(&l);
    b.put(
        "f/k",
        b"v9".to_vec(),
        Some(&Fence {
            lock: "f/lock".into(),
            token: 9,
        }),
    )
    .await
    .unwrap();
    let (s, v) = raw(
        &http,
        &l,
        "/v1/kv/put",
        json!({"key": "f/k", "value": "AA==", "fence": {"lock": "f/lock", "token": 8}}).to_string(),
    )
    .await;
    assert_eq!(
        (s, code(&v).as_str(), v["token"].as_u64(), v["highest"].as_u64()),
        (409, "fenced", Some(8), Some(9))
    );
    assert_eq!(
        b.get("f/k").await.unwrap().unwrap().value,
        b"v9",
        "fenced write not applied"
    );

    // Leases: unknown token, expired lease, stale release.
    let (s, v) = raw(
        &http,
        &l,
        "/v1/lock/renew",
        json!({"key": "lk", "token": 77}).to_string(),
    )
    .await;
    assert_eq!((s, code(&v).as_str()), (404, "unknown_lease"), "{v}");
    let (s, v) = raw(
        &http,
        &l,
        "/v1/lock/acquire",
        json!({"key": "lk", "value": "a", "ttl_ms": 50}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_u64().unwrap();
    // Wait (by reading the holder, which does not renew) until the lease has expired.
    vha_testkit::wait_until_async(
        || {
            let b = b.clone();
            async move { b.holder("lk").await.ok().filter(|h| h.is_none()).map(|_| ()) }
        },
        "the 50 ms lease expires",
        Duration::from_secs(10),
    )
    .await;
    let (s, expired) = raw(
        &http,
        &l,
        "/v1/lock/renew",
        json!({"key": "lk", "token": token}).to_string(),
    )
    .await;
    assert_eq!(s, 409, "{expired}");
    assert_eq!(code(&expired), "lease_expired", "{expired}");
    let (s, v) = raw(
        &http,
        &l,
        "/v1/lock/release",
        json!({"key": "lk", "token": token}).to_string(),
    )
    .await;
    assert_eq!((s, code(&v).as_str()), (409, "lease_expired"), "{v}");
    let (s, v) = raw(
        &http,
        &l,
        "/v1/lock/acquire",
        json!({"key": "lk", "value": "a", "ttl_ms": 1}).to_string(),
    )
    .await;
    assert_eq!((s, code(&v).as_str()), (400, "invalid"), "ttl below the minimum: {v}");
    let (s, v) = raw(&http, &l, "/v1/watch", json!({"prefix": "a", "lock": "b"}).to_string()).await;
    assert_eq!((s, code(&v).as_str()), (400, "invalid"), "{v}");

    assert!(l.is_ready(), "lockd still serving after bad input");
    assert!(
        b.list("").await.unwrap().iter().all(|k| k == "f/"),
        "nothing but f/k was written"
    );
}

/// Tokens are strictly increasing per lock across grants by different clients, the holder
/// value and token are readable, and release-by-token frees the lock for a waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_by_token_frees_lock() {
    let l = TestLockd::start();
    let (a, b) = (client(&l), client(&l));
    let g = a.acquire("rbt", "node-a", Default::default()).await.unwrap().unwrap();
    let h = b.holder("rbt").await.unwrap().unwrap();
    assert_eq!((h.value.as_str(), h.token), ("node-a", g.fence().token));
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire("rbt", "node-b", Default::default()).await }
    });
    // A third party with proof of death releases by key + token.
    client(&l).release_token("rbt", h.token).await.unwrap();
    let g2 = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(g2.fence().token > h.token);
    std::mem::forget(g);
}

/// `/metrics` exposes the vha_lockd_* series (ops by outcome, fsync histogram, leases,
/// watches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exposed() {
    let l = TestLockd::start();
    let b = client(&l);
    b.put("m/k", b"1".to_vec(), None).await.unwrap();
    let _g = b.acquire("m/lock", "x", Default::default()).await.unwrap().unwrap();
    let _w = b.watch("m/").await.unwrap();
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", l.address()))
        .bearer_auth(l.token().expect("token"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "vha_lockd_ops_total{op=\"put\",outcome=\"ok\"} 1",
        "vha_lockd_fsync_seconds_bucket{le=\"0.00005\"}",
        "vha_lockd_fsync_seconds_bucket{le=\"5\"}",
        "vha_lockd_active_leases 1",
        "vha_lockd_watches 1",
        "vha_lockd_lease_expiries_total",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
}

/// `snapshot save` from a running lockd and offline `snapshot restore` into a new data dir
/// reproduce the data, entry tokens and lock tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_and_restore() {
    let l = TestLockd::start();
    let b = client(&l);
    b.put(
        "s/a",
        b"1".to_vec(),
        Some(&Fence {
            lock: "s/lock".into(),
            token: 4,
        }),
    )
    .await
    .unwrap();
    b.put("s/b/c", vec![0, 255], None).await.unwrap();
    let g = b.acquire("s/lock", "x", Default::default()).await.unwrap().unwrap();
    assert_eq!(g.fence().token, 5, "grant exceeds the highest token seen");
    let file = l.scratch().join("backup.snap");
    let (ok, out) = snapshot_save(&l, &file);
    assert!(ok, "{out}");
    let dir = l.scratch().join("restored");
    let (ok, out) = snapshot_restore(&file, &dir);
    assert!(ok, "{out}");
    // Restoring into a directory a running lockd holds is refused.
    let (ok, out) = snapshot_restore(&file, l.data_dir());
    assert!(!ok && out.contains("in use"), "{out}");
    let r = TestLockd::builder().data_dir(&dir).start();
    let c = client(&r);
    let e = c.get("s/a").await.unwrap().unwrap();
    assert_eq!((e.value, e.fence_token), (b"1".to_vec(), Some(4)));
    assert_eq!(c.get("s/b/c").await.unwrap().unwrap().value, vec![0, 255]);
    assert_eq!(
        c.holder("s/lock").await.unwrap().map(|h| h.token),
        Some(5),
        "lease restored as held"
    );
    std::mem::forget(g);
}

/// A snapshot of several megabytes (many of lockd's 1 MiB stream chunks) arrives whole
/// through `snapshot save` and restores byte for byte; a save that fails (lockd gone) leaves
/// the previous backup as it was and no partial file beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_of_many_chunks_restores_whole_and_a_failed_save_keeps_the_backup() {
    const ENTRIES: usize = 48;
    let mut l = TestLockd::start();
    let b = client(&l);
    let value = |i: usize| -> Vec<u8> { (0..64 * 1024).map(|j| (i * 31 + j * 7) as u8).collect() };
    for i in 0..ENTRIES {
        b.put(&format!("big/{i}"), value(i), None).await.unwrap();
    }
    let file = l.scratch().join("big.snap");
    let (ok, out) = snapshot_save(&l, &file);
    assert!(ok, "{out}");
    let backup = std::fs::read(&file).unwrap();
    assert!(backup.len() > 3 << 20, "snapshot of {} bytes", backup.len());

    l.stop();
    let (ok, out) = snapshot_save(&l, &file);
    assert!(!ok, "save from a stopped lockd succeeded: {out}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        backup,
        "a failed save changed the backup"
    );
    assert!(
        !file.with_extension("tmp").exists(),
        "a failed save left a partial file"
    );

    let dir = l.scratch().join("restored-big");
    let (ok, out) = snapshot_restore(&file, &dir);
    assert!(ok, "{out}");
    let r = TestLockd::builder().data_dir(&dir).start();
    let c = client(&r);
    for i in 0..ENTRIES {
        assert_eq!(
            c.get(&format!("big/{i}")).await.unwrap().unwrap().value,
            value(i),
            "big/{i}"
        );
    }
}

/// Restoring an older snapshot over a data directory never lowers its fence-token marks:
/// a token the newer state had already superseded stays fenced, a token never granted stays
/// invalid, and the next grant comes after every token granted before the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_keeps_highest_token_marks() {
    let mut l = TestLockd::start();
    let b = client(&l);
    let fence = |token| Fence {
        lock: "r/lock".into(),
        token,
    };
    let g1 = b.acquire("r/lock", "one", Default::default()).await.unwrap().unwrap();
    assert_eq!(g1.fence().token, 1);
    b.put("r/k", b"1".to_vec(), Some(&fence(1))).await.unwrap();
    let file = l.scratch().join("old.snap");
    let (ok, out) = snapshot_save(&l, &file);
    assert!(ok, "{out}");
    g1.release().await.unwrap();
    let g2 = b.acquire("r/lock", "two", Default::default()).await.unwrap().unwrap();
    assert_eq!(g2.fence().token, 2);
    b.put("r/k", b"2".to_vec(), Some(&fence(2))).await.unwrap();
    std::mem::forget(g2);
    assert!(l.stop(), "lockd stops cleanly:\n{}", l.output());
    let (ok, out) = snapshot_restore(&file, l.data_dir());
    assert!(ok && out.contains("kept 2 higher fence-token mark"), "{out}");
    l.start_again();
    let c = client(&l);
    assert_eq!(c.get("r/k").await.unwrap().unwrap().value, b"1", "the snapshot's data");
    assert!(
        matches!(
            c.put("r/k", b"x".to_vec(), Some(&fence(1))).await,
            Err(StorageError::Fenced { highest: 2, .. })
        ),
        "the snapshot's own holder (token 1) was superseded before the restore"
    );
    assert!(
        matches!(
            c.put("r/k", b"x".to_vec(), Some(&fence(3))).await,
            Err(StorageError::Invalid(_))
        ),
        "token 3 was never granted"
    );
    c.release_token("r/lock", 1).await.unwrap();
    let g3 = c.acquire("r/lock", "three", Default::default()).await.unwrap().unwrap();
    assert_eq!(
        g3.fence().token,
        3,
        "the next grant follows every token granted before the restore"
    );
    assert_eq!(
        c.get("r/k").await.unwrap().unwrap().value,
        b"1",
        "refused writes changed nothing"
    );
    g3.release().await.unwrap();
}

/// A fenced write with a token lockd never granted for that lock (u64::MAX, or the next
/// token) gets 400 `invalid` and changes nothing; the holder keeps writing, and the next
/// grant is the previous token + 1 (no overflow, no lock fenced out for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_fence_tokens_refused() {
    let l = TestLockd::start();
    let http = reqwest::Client::new();
    let b = client(&l);
    let g = b
        .acquire("fx/lock", "holder", Default::default())
        .await
        .unwrap()
        .unwrap();
    let t = g.fence().token;
    b.put("fx/k", b"ok".to_vec(), Some(g.fence())).await.unwrap();
    for forged in [u64::MAX, t + 1] {
        let (s, v) = raw(
            &http,
            &l,
            "/v1/kv/put",
            json!({"key": "fx/k", "value": "AA==", "fence": {"lock": "fx/lock", "token": forged}}).to_string(),
        )
        .await;
        assert_eq!((s, v["code"].as_str()), (400, Some("invalid")), "token {forged}: {v}");
        let (s, v) = raw(
            &http,
            &l,
            "/v1/kv/delete",
            json!({"key": "fx/k", "fence": {"lock": "fx/lock", "token": forged}}).to_string(),
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("invalid")),
            "delete, token {forged}: {v}"
        );
    }
    assert_eq!(b.get("fx/k").await.unwrap().unwrap().value, b"ok", "nothing changed");
    b.put("fx/k", b"still".to_vec(), Some(g.fence()))
        .await
        .expect("the holder keeps writing");
    g.release().await.unwrap();
    let g2 = b.acquire("fx/lock", "next", Default::default()).await.unwrap().unwrap();
    assert_eq!(g2.fence().token, t + 1);
    g2.release().await.unwrap();
}

/// A blocked acquire that the client cancels never keeps the lock, even when lockd grants
/// it in the instant of the cancel (the holder releases right as the last waiter cancels):
/// the client cancels the whole attempt (`lock/cancel`), which releases such a grant, so the
/// lock ends up free within moments instead of stuck for a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_acquire_never_keeps_lock() {
    let l = TestLockd::start();
    let (a, b) = (client(&l), client(&l));
    for round in 0..5 {
        let g = a.acquire("cx", "holder", Default::default()).await.unwrap().unwrap();
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let t = tokio::spawn({
            let b = b.clone();
            async move { b.acquire("cx", "waiter", c2).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Race the release against the cancel.
        let (r, ()) = tokio::join!(g.release(), async { cancel.cancel() });
        r.unwrap();
        if let Some(g) = t.await.unwrap().unwrap() {
            // The waiter won the race before the cancel: it holds legitimately.
            g.release().await.unwrap();
        }
        vha_testkit::wait_until_async(
            || {
                let a = a.clone();
                async move { a.holder("cx").await.ok().filter(|h| h.is_none()).map(|_| ()) }
            },
            &format!("round {round}: the lock is free again (no cancelled waiter keeps it)"),
            Duration::from_secs(3),
        )
        .await;
    }
}

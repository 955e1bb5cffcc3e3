//! HA in the node with real `vha server` processes on a real `vha lockd`:
//! one active, failover, step-down, graceful SIGTERM, the P-521 cluster listener's mTLS,
//! fencing of a deposed active, partitions through the fault relay, and split mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use vha_core::advert::{leader_path, Advertisement, LEADER_PREFIX};
use vha_core::barrier::Barrier;
use vha_core::cluster_tls::{ClusterIdentity, PinnedCert};
use vha_core::storage::Backend;
use vha_testkit::fencing::{deposed_active_writes_fail, Freeze};
use vha_testkit::node::log_time;
use vha_testkit::{wait_until_async, Fault, TestCluster};

/// Wide bound for a failover in tests: lock TTL (2-3 s) plus debug-build startup on two
/// busy cores. The measured figure is reported by the bench, not asserted here.
const FAILOVER_BOUND: Duration = Duration::from_secs(20);

/// Opens the cluster's barrier from the test process (it knows the unseal key), to read
/// advertisements exactly as a standby does.
async fn test_barrier(c: &TestCluster) -> Barrier {
    let backend: Arc<dyn Backend> = Arc::new(c.lockd.as_ref().expect("lockd").client());
    let b = Barrier::new(backend);
    let key = base64::engine::general_purpose::STANDARD
        .decode(&c.keys.as_ref().unwrap().keys_base64[0])
        .unwrap();
    b.unseal(&key).await.expect("unseal test barrier");
    b
}

/// The advertisement entries present now (uuid -> advertisement).
async fn advertisements(b: &Barrier) -> Vec<(String, Advertisement)> {
    let mut out = Vec::new();
    for k in b.list(LEADER_PREFIX).await.unwrap() {
        if let Some(bytes) = b.get(&leader_path(&k)).await.unwrap() {
            out.push((k, serde_json::from_slice(&bytes).unwrap()));
        }
    }
    out
}

/// Exactly one node is active, every node's `sys/leader` names it, standbys answer 429 on
/// `sys/health` (200 with `standbyok`), report the active in `sys/ha-status` through their
/// heartbeats, redirect with 307 keeping path and query, and refuse `sys/seal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_and_standby_behaviour() {
    let c = TestCluster::builder().nodes(3).start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let s = (a + 1) % 3;
    let (st, v) = c.nodes[s].request("GET", "sys/health", None, None).await;
    // 429 once the heartbeat reached the active (474 before the first echo).
    let st = if st.as_u16() == 474 {
        wait_until_async(
            || async { (c.nodes[s].request("GET", "sys/health", None, None).await.0.as_u16() == 429).then_some(()) },
            "standby health 429 after first heartbeat",
            Duration::from_secs(10),
        )
        .await;
        StatusCode::TOO_MANY_REQUESTS
    } else {
        st
    };
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["standby"], true);
    let (st, _) = c.nodes[s].request("GET", "sys/health?standbyok=true", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = c.nodes[a].request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::OK);

    // 307 with the exact Location, empty body, for any non-local path (token or not).
    let (st, hdrs, body) = c.nodes[s]
        .request_full(
            "POST",
            "secret/data/x?a=1&b=%2F",
            Some(c.root_token()),
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        hdrs["location"].to_str().unwrap(),
        format!("{}/v1/secret/data/x?a=1&b=%2F", c.nodes[a].addr)
    );
    assert_eq!(body, Value::Null, "307 has an empty body");

    // sys/seal on a standby: Vault's error.
    let (st, v) = c.nodes[s].request("PUT", "sys/seal", Some(c.root_token()), None).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        v["errors"][0],
        "cannot seal when in standby mode; please restart instead"
    );

    // ha-status on the active lists itself and both standbys (heartbeats).
    let v = wait_until_async(
        || async {
            let (st, v) = c.nodes[a]
                .request("GET", "sys/ha-status", Some(c.root_token()), None)
                .await;
            (st == StatusCode::OK && v["nodes"].as_array().is_some_and(|n| n.len() == 3)).then_some(v)
        },
        "ha-status lists three nodes",
        Duration::from_secs(10),
    )
    .await;
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.iter().filter(|n| n["active_node"] == true).count(), 1);
    for n in nodes {
        for f in [
            "hostname",
            "api_address",
            "cluster_address",
            "active_node",
            "last_echo",
            "version",
        ] {
            assert!(n.get(f).is_some(), "ha-status node lacks {f}: {n}");
        }
    }
    // The configuration page: storage type and HA availability.
    let (st, v) = c.nodes[a]
        .request("GET", "sys/config/state/sanitized", Some(c.root_token()), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["storage"]["type"], "lockd");
    assert_eq!(v["data"]["ha_available"], true);
    // Metrics: the active says so.
    let (st, _, _) = c.nodes[a]
        .request_full("GET", "sys/metrics?format=prometheus", Some(c.root_token()), None, &[])
        .await;
    assert_eq!(st, StatusCode::OK);
}

/// SIGKILL of the active: another node becomes active within the lease bound, everyone
/// follows it, and the dead node's advertisement is removed by the new active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_active_fails_over() {
    let mut c = TestCluster::builder().nodes(3).lock_ttl("2s").start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let b = test_barrier(&c).await;
    let before = advertisements(&b).await;
    assert_eq!(before.len(), 1, "one advertisement while one node is active");
    assert_eq!(before[0].1.redirect_addr, c.nodes[a].addr);

    let t0 = Instant::now();
    c.nodes[a].kill();
    let n = c.wait_new_active(a, FAILOVER_BOUND).await;
    eprintln!("failover after SIGKILL took {:?}", t0.elapsed());
    let n2 = c.wait_one_active(FAILOVER_BOUND).await;
    assert_eq!(n, n2);
    let ads = wait_until_async(
        || async {
            let ads = advertisements(&b).await;
            (ads.len() == 1).then_some(ads)
        },
        "exactly one advertisement after failover",
        Duration::from_secs(10),
    )
    .await;
    assert_ne!(ads[0].0, before[0].0, "old advertisement gone");
    assert_eq!(ads[0].1.redirect_addr, c.nodes[n].addr);
}

/// `sys/step-down` on the active moves leadership to another node; on a standby it is
/// redirected (307) to the active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_down_moves_leadership() {
    let c = TestCluster::builder().nodes(3).start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let s = (a + 1) % 3;
    let (st, _) = c.nodes[s]
        .request("PUT", "sys/step-down", Some(c.root_token()), None)
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT, "standby redirects step-down");
    let (st, _) = c.nodes[a].request("PUT", "sys/step-down", None, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "step-down needs a token");
    let (st, v) = c.nodes[a]
        .request("PUT", "sys/step-down", Some(c.root_token()), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let n = c.wait_new_active(a, FAILOVER_BOUND).await;
    assert_ne!(n, a);
    assert_eq!(c.wait_one_active(FAILOVER_BOUND).await, n);
}

/// SIGTERM of the active: it drains, steps down and exits 0; a client that follows 307s
/// and retries refused connections and 503s never sees a failed read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_active_no_failed_reads() {
    let mut c = TestCluster::builder().nodes(3).start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    c.mount_secret(a).await;
    let (st, v) = c.nodes[a]
        .request(
            "POST",
            "secret/data/app",
            Some(c.root_token()),
            Some(json!({"data": {"v": "1"}})),
        )
        .await;
    assert!(st.is_success(), "{v}");

    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    let token = c.root_token().to_string();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (mut ok, mut failed) = (0u32, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0usize;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline && ok < 100_000 {
            i += 1;
            let mut url = format!("{}/v1/secret/data/app", addrs[i % addrs.len()]);
            // One logical read: follow 307s, retry connection errors and 503s (bounded).
            let mut done = false;
            for _ in 0..200 {
                match http.get(&url).header("X-Vault-Token", &token).send().await {
                    Ok(r) if r.status() == StatusCode::TEMPORARY_REDIRECT => {
                        url = r.headers()["location"].to_str().unwrap().to_string();
                    }
                    Ok(r) if r.status() == StatusCode::OK => {
                        done = true;
                        break;
                    }
                    Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                        url = format!("{}/v1/secret/data/app", addrs[(i + 1) % addrs.len()]);
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    Ok(r) => {
                        failed.push(format!("{} {}", r.status(), r.text().await.unwrap_or_default()));
                        done = true;
                        break;
                    }
                    Err(_) => {
                        url = format!("{}/v1/secret/data/app", addrs[(i + 1) % addrs.len()]);
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
            }
            if !done {
                failed.push("gave up after 200 attempts".into());
            }
            ok += 1;
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = c.nodes[a]
        .stop(Duration::from_secs(30))
        .expect("active exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let n = c.wait_new_active(a, FAILOVER_BOUND).await;
    // Keep reading for a moment on the new active.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, failed) = reader.await.unwrap();
    assert!(failed.is_empty(), "failed reads: {failed:?}");
    assert!(reads > 10, "reader made progress ({reads} reads)");
    assert_ne!(n, a);
    let out = c.nodes[a].output();
    assert!(
        out.contains("stepped down from active"),
        "the active stepped down before exiting:\n{out}"
    );
}

fn client_config_without_cert(server_cert: &[u8]) -> Arc<rustls::ClientConfig> {
    let provider = vha_core::cluster_tls::provider();
    let verifier = Arc::new(PinnedCert::new(
        rustls::pki_types::CertificateDer::from(server_cert.to_vec()),
        &provider,
    ));
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

/// Connects with `cfg` and performs one HTTP/1.1 request; Ok(status line) or Err(reason).
async fn tls_request(addr: &str, uuid: &str, cfg: Arc<rustls::ClientConfig>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = addr.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(format!("fw-{uuid}")).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET /v1/sys/leader HTTP/1.1\r\nHost: fw\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf).to_string();
    text.lines()
        .next()
        .map(str::to_string)
        .filter(|l| l.starts_with("HTTP/1.1"))
        .ok_or(format!("no response: {text}"))
}

/// In the spirit of Vault's TestCluster_ListenForRequests: the active's cluster listener
/// accepts the advertised certificate (mutual TLS 1.2), and refuses no client certificate,
/// a foreign P-521 certificate, and the previous term's certificate after a failover; a
/// standby has nothing listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_listener_mtls() {
    let mut c = TestCluster::builder().nodes(3).lock_ttl("2s").start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let b = test_barrier(&c).await;
    let (uuid, adv) = advertisements(&b).await.remove(0);
    let id = ClusterIdentity::from_advertisement(&uuid, &adv).unwrap();

    let ok = tls_request(&adv.cluster_addr, &uuid, id.client_config(&[b"http/1.1"]).unwrap()).await;
    assert_eq!(ok.as_deref(), Ok("HTTP/1.1 200 OK"), "advertised cert is accepted");

    let no_cert = tls_request(&adv.cluster_addr, &uuid, client_config_without_cert(&adv.cluster_cert)).await;
    assert!(no_cert.is_err(), "no client cert must be refused: {no_cert:?}");

    let evil = ClusterIdentity::generate(&uuid).unwrap();
    // Trust the real server cert but present the attacker's own P-521 cert.
    let evil_adv = Advertisement {
        cluster_cert: evil.cert_der.clone(),
        cluster_key_params: Some(evil.params.clone()),
        ..adv.clone()
    };
    let evil_id = ClusterIdentity::from_advertisement(&uuid, &evil_adv).unwrap();
    let mut evil_cfg = (*evil_id.client_config(&[b"http/1.1"]).unwrap()).clone();
    let provider = vha_core::cluster_tls::provider();
    evil_cfg
        .dangerous()
        .set_certificate_verifier(Arc::new(PinnedCert::new(adv.cluster_cert.clone().into(), &provider)));
    let foreign = tls_request(&adv.cluster_addr, &uuid, Arc::new(evil_cfg)).await;
    assert!(foreign.is_err(), "foreign P-521 cert must be refused: {foreign:?}");

    // Standbys have no cluster listener: a node that is a standby now (on two busy cores
    // the lease may have moved since `a` was found; this checks a current standby).
    let mut s = None;
    for i in 0..3 {
        if c.leader_of(i).await.is_some_and(|v| v["is_self"] == false) {
            s = Some(i);
            break;
        }
    }
    let s = s.expect("a standby node");
    let standby_cluster = format!("127.0.0.1:{}", c.nodes[s].cluster_port);
    assert!(
        tokio::net::TcpStream::connect(&standby_cluster).await.is_err(),
        "standby must not listen"
    );

    let (st, _, metrics) = c.nodes[a]
        .request_full("GET", "sys/metrics?format=prometheus", Some(c.root_token()), None, &[])
        .await;
    assert_eq!(st, StatusCode::OK);
    let text = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("vha_node_cluster_handshake_failures_total"),
        "handshake failures counted:\n{text}"
    );

    // After failover, the previous term's certificate opens nothing.
    c.nodes[a].kill();
    let n = c.wait_new_active(a, FAILOVER_BOUND).await;
    let ads = wait_until_async(
        || async {
            let ads = advertisements(&b).await;
            (ads.len() == 1 && ads[0].0 != uuid).then_some(ads)
        },
        "new advertisement",
        Duration::from_secs(10),
    )
    .await;
    let new_addr = &ads[0].1.cluster_addr;
    assert_eq!(ads[0].1.redirect_addr, c.nodes[n].addr);
    let old = tls_request(new_addr, &ads[0].0, id.client_config(&[b"http/1.1"]).unwrap()).await;
    assert!(old.is_err(), "previous term's cert must be refused: {old:?}");
    let new_id = ClusterIdentity::from_advertisement(&ads[0].0, &ads[0].1).unwrap();
    let fresh = tls_request(new_addr, &ads[0].0, new_id.client_config(&[b"http/1.1"]).unwrap()).await;
    assert_eq!(fresh.as_deref(), Ok("HTTP/1.1 200 OK"));
}

/// Fencing end to end, frozen: writes queued at the active's own node listener while it
/// is SIGSTOPped past its lease all fail once it resumes (another node took over and wrote
/// the same keys meanwhile), none is visible, every refusal the store made shows in the
/// node's `vha_node_fencing_rejections_total`, and the old active steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_active_cannot_write() {
    let c = TestCluster::builder().nodes(3).lock_ttl("2s").start().await;
    deposed_active_writes_fail(&c, Freeze::Stop, FAILOVER_BOUND)
        .await
        .assert_fenced();
}

/// Fencing at lockd as the data store (split mode, HA lock on a second lockd): the
/// active's grant is released at the HA lockd while its link to it is held, so it still
/// believes it is active; another node takes the lock and writes; every write of the old
/// active then reaches the data lockd with the old fence and is refused there (the only
/// thing between it and the data); the node answers 503 "leadership lost", counts each in
/// `vha_node_fencing_rejections_total`, and the first refusal ends its term (later writes
/// are refused by the node itself); none lands, and the new active's values stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_fence_refused_by_lockd_data_store() {
    let c = TestCluster::builder()
        .nodes(2)
        .split()
        .relay_store()
        .lock_ttl("10s")
        .start()
        .await;
    let out = deposed_active_writes_fail(&c, Freeze::LockMoved, FAILOVER_BOUND).await;
    out.assert_fenced();
    // The first stale write to reach lockd is refused there and ends the term at once; the
    // rest meet a node that knows it is no longer active.
    assert!(
        out.fenced >= 1,
        "lockd refused the stale writes that reached it: {out:?}"
    );
}

/// Through the relay: an active cut from the store stops acting before the lock could be
/// granted elsewhere (its "leadership lost" precedes the new active's `active_time`), a
/// standby takes over, and the old active serves nothing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_cut_from_store_steps_down_first() {
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("3s")
        .relay_store()
        .start()
        .await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    c.store_relays[a].set(Fault::Blackhole);
    let n = c.wait_new_active(a, FAILOVER_BOUND).await;
    let new_active_time = {
        let v = c.leader_of(n).await.expect("new active answers");
        humantime::parse_rfc3339(v["active_time"].as_str().unwrap()).unwrap()
    };
    let lost_line = c.nodes[a].wait_log_line("leadership lost", FAILOVER_BOUND).await;
    let lost_at = log_time(&lost_line).expect("timestamp");
    assert!(
        lost_at < new_active_time,
        "old active stopped at {lost_at:?}, new became active at {new_active_time:?}"
    );
    // The old active serves nothing now.
    let (st, _) = c.nodes[a].request("GET", "sys/health", None, None).await;
    assert_ne!(st, StatusCode::OK, "cut-off node must not report active");
    c.store_relays[a].heal();
    c.wait_one_active(FAILOVER_BOUND).await;
}

/// Through the relay: standbys cut from the active's cluster listener report 474 on
/// `sys/health`, and 429 again once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_cut_from_active_reports_474() {
    let c = TestCluster::builder().nodes(2).relay_cluster().start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let s = 1 - a;
    let code = || async { c.nodes[s].request("GET", "sys/health", None, None).await.0.as_u16() };
    wait_until_async(
        || async { (code().await == 429).then_some(()) },
        "standby healthy (429)",
        Duration::from_secs(15),
    )
    .await;
    c.cluster_relays[a].set(Fault::Blackhole);
    wait_until_async(
        || async { (code().await == 474).then_some(()) },
        "standby reports 474",
        Duration::from_secs(15),
    )
    .await;
    let (st, _) = c.nodes[s]
        .request("GET", "sys/health?haunhealthycode=299", None, None)
        .await;
    assert_eq!(st.as_u16(), 299, "haunhealthycode overrides");
    c.cluster_relays[a].heal();
    wait_until_async(
        || async { (code().await == 429).then_some(()) },
        "standby healthy again",
        Duration::from_secs(15),
    )
    .await;
}

/// Split data/HA mode with two lockd instances: the banner names both, one node is active,
/// data lands in the data store with the active's fencing token, the lock in the HA store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_two_lockds() {
    let c = TestCluster::builder().nodes(2).split().start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let out = c.nodes[a].output();
    assert!(out.contains("Storage: lockd\n"), "{out}");
    assert!(out.contains("HA Storage: lockd\n"), "{out}");
    c.mount_secret(a).await;
    let (st, _) = c.nodes[a]
        .request(
            "POST",
            "secret/data/s",
            Some(c.root_token()),
            Some(json!({"data": {"k": "v"}})),
        )
        .await;
    assert!(st.is_success());
    // The lock lives in the HA lockd, not in the data lockd.
    let ha = c.ha_lockd.as_ref().unwrap().client();
    let data = c.lockd.as_ref().unwrap().client();
    use vha_core::storage::HaBackend;
    let holder = ha
        .holder("core/lock")
        .await
        .unwrap()
        .expect("lock held in the HA store");
    assert!(
        data.holder("core/lock").await.unwrap().is_none(),
        "no lock in the data store"
    );
    // Data entries written by the active carry its fencing token.
    let adv = data
        .get(&leader_path(&holder.value))
        .await
        .unwrap()
        .expect("advertisement in the data store");
    assert_eq!(
        adv.fence_token,
        Some(holder.token),
        "fenced write recorded with the holder's token"
    );
}

/// Only `core/leader/<current core/lock value>` is believed: an advertisement written
/// under another UUID later (a replayed or stale one, even correctly encrypted) does not
/// move any standby, and a standby learns a new active through its watch, not a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_current_holders_advertisement_is_believed() {
    let mut c = TestCluster::builder().nodes(3).lock_ttl("2s").start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let b = test_barrier(&c).await;
    let (_, real) = advertisements(&b).await.remove(0);
    let fake = Advertisement {
        redirect_addr: "http://127.0.0.1:9".into(),
        ..real.clone()
    };
    b.put(
        &leader_path("00000000-0000-0000-0000-000000000000"),
        &serde_json::to_vec(&fake).unwrap(),
        None,
    )
    .await
    .unwrap();
    // Give a (wrong) watcher every chance to pick it up, then check nobody did.
    let s = (a + 1) % 3;
    for _ in 0..10 {
        let v = c.leader_of(s).await.unwrap();
        assert_eq!(
            v["leader_address"],
            c.nodes[a].addr.as_str(),
            "stale advertisement must be ignored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Failover: the remaining standby follows the new active promptly (watch).
    c.nodes[a].kill();
    let n = c.wait_new_active(a, FAILOVER_BOUND).await;
    let other = (0..3).find(|i| *i != a && *i != n).unwrap();
    let active_time = humantime::parse_rfc3339(c.leader_of(n).await.unwrap()["active_time"].as_str().unwrap()).unwrap();
    let seen = wait_until_async(
        || async {
            let v = c.leader_of(other).await?;
            (v["leader_address"] == c.nodes[n].addr.as_str()).then(std::time::SystemTime::now)
        },
        "standby follows the new active",
        FAILOVER_BOUND,
    )
    .await;
    let lag = seen.duration_since(active_time).unwrap_or_default();
    eprintln!("standby learned the new active {lag:?} after it became active (includes 20 ms polling)");
    assert!(lag < Duration::from_secs(2), "watch, not a multi-second poll: {lag:?}");
}

/// Leader changes the way a load balancer sees them: polling every node's `sys/health`
/// every 10 ms across 10 step-downs, no answer is ever 474 (a standby that learned of a new
/// active is healthy at once: its first heartbeat goes out the moment it learns, and 474
/// needs two missed periods) and every answer is 200 or 429; after each change the new
/// active's `sys/ha-status` lists all three nodes within one heartbeat period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_never_blips_across_leader_changes() {
    const CHANGES: usize = 10;
    /// Health polling period, as the measurement polled.
    const POLL: Duration = Duration::from_millis(10);
    let c = Arc::new(TestCluster::builder().nodes(3).start().await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut codes: std::collections::BTreeMap<u16, usize> = Default::default();
            // Bounded: stops when told, or after 10 minutes at the latest.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let c = &c;
                let answers = futures::future::join_all(
                    (0..3).map(|i| async move { c.nodes[i].request("GET", "sys/health", None, None).await.0.as_u16() }),
                )
                .await;
                for code in answers {
                    *codes.entry(code).or_default() += 1;
                }
                tokio::time::sleep(POLL).await;
            }
            codes
        })
    };
    let mut a = c.wait_one_active(FAILOVER_BOUND).await;
    let mut listed_after = Vec::new();
    for _ in 0..CHANGES {
        let (st, v) = c.nodes[a]
            .request("PUT", "sys/step-down", Some(c.root_token()), None)
            .await;
        assert!(st.is_success(), "step-down: {st} {v}");
        let n = c.wait_new_active(a, FAILOVER_BOUND).await;
        let found = Instant::now();
        // The moment the new active lists every node (its standbys' first heartbeats).
        wait_until_async(
            || async {
                let (st, v) = c.nodes[n]
                    .request("GET", "sys/ha-status", Some(c.root_token()), None)
                    .await;
                (st == StatusCode::OK && v["nodes"].as_array().is_some_and(|l| l.len() == 3)).then_some(())
            },
            "the new active lists every node",
            FAILOVER_BOUND,
        )
        .await;
        listed_after.push(found.elapsed());
        a = n;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes = poller.await.unwrap();
    eprintln!("health answers across {CHANGES} leader changes: {codes:?}; new active seen to full ha-status: {listed_after:?}");
    assert_eq!(
        codes.get(&474),
        None,
        "a standby reported 474 while an active existed: {codes:?}"
    );
    assert!(
        codes.keys().all(|c| *c == 200 || *c == 429),
        "every answer is 200 (active) or 429 (standby): {codes:?}"
    );
    assert!(
        codes.values().sum::<usize>() >= 3 * CHANGES,
        "the poller ran: {codes:?}"
    );
    // One heartbeat period (1 s): what a standby that waited for its next tick, or an old
    // active that sat out `step_down_wait` (2 s here) without heartbeating, would take.
    let slowest = listed_after.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(1),
        "the new active listed every node only after {slowest:?}"
    );
}

/// The pair contract's local-only paths (`vha_core::pair::LOCAL_ONLY`, which the proxy
/// never forwards) are each answered by a standby's own node: sent to a standby's node
/// listener with a method they do not take, every one gets the local handler's 405, while a
/// path outside the list gets the standby's 307 to the active instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_only_paths_are_answered_by_a_standby_itself() {
    let c = TestCluster::builder().nodes(2).start().await;
    let a = c.wait_one_active(FAILOVER_BOUND).await;
    let s = 1 - a;
    for path in vha_core::pair::LOCAL_ONLY {
        let (st, v) = c.nodes[s].request("PATCH", path, Some(c.root_token()), None).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED, "{path} on a standby: {st} {v}");
    }
    let (st, v) = c.nodes[s]
        .request("PATCH", "sys/mounts", Some(c.root_token()), None)
        .await;
    assert_eq!(
        st,
        StatusCode::TEMPORARY_REDIRECT,
        "a path only the active serves: {st} {v}"
    );
}

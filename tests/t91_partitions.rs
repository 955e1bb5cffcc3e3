//! Partitions on loopback through the harness's fault relay, beyond
//! `t30_ha::active_cut_from_store_steps_down_first` (blackhole both ways) and
//! `t30_ha::standby_cut_from_active_reports_474` (node view only):
//! - the standbys cut from the active's cluster listener: 474 through the pair, and the
//!   pair's proxy falls back per its route rules (hold, then Vault's 307 to the active);
//! - the active cut one way from the store (its renewals arrive, the answers do not): it
//!   stops being active before anyone else is, and a standby takes over;
//! - a slow store (every chunk to and from lockd delayed) below the documented threshold:
//!   no false failover, writes keep succeeding.
//!
//! The threshold (documented in the README's Guarantees): the lockd client renews every
//! lock_ttl/10 and gives the lock up at `last renewal sent + lock_ttl - lock_ttl/5`; so a
//! chain of renewals survives as long as one renewal round trip stays under
//! `(lock_ttl - lock_ttl/5) / 2 = 0.4 x lock_ttl`. The relay delays each chunk, so a round
//! trip under load can take up to four delays: a one-way delay of lock_ttl/20 (round trip at
//! most lock_ttl/5) is safely inside it.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use vha_core::advert::LOCK_KEY;
use vha_core::storage::HaBackend;
use vha_testkit::{wait_until_async, Fault, TestCluster, TestNode};

const ELECTION_BOUND: Duration = Duration::from_secs(40);
/// `max_request_duration` in the partition test: the proxy's read bound on a forward.
const MAX_REQUEST_DURATION: Duration = Duration::from_secs(12);
/// The larger of the proxy's hold bound (10 s, plus a failed handshake) and
/// `MAX_REQUEST_DURATION`, plus slack for a debug build.
const REQUEST_BOUND: Duration = Duration::from_secs(20);

fn no_redirect_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_BOUND + Duration::from_secs(10))
        .build()
        .unwrap()
}

/// With the active's cluster listener blackholed (standbys' heartbeats and the proxies'
/// forwards both go through that relay), a standby pair answers `sys/health` 474 through
/// its proxy; KV reads through that proxy end within the configured bounds: a read already
/// sent on the pooled connection may get a clear 502/504 at `max_request_duration`, later
/// ones Vault's 307 to the active's
/// address (path and query kept), never a hang; once healed, health is 429 again and the
/// proxy forwards (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_cut_from_active_proxy_falls_back() {
    // The configured bound on a stalled forward: `max_request_duration` (Vault's default is
    // 90 s; shortened here so the test stays quick).
    let template = TestNode::builder()
        .listener_extra(format!(
            "max_request_duration = \"{}s\"",
            MAX_REQUEST_DURATION.as_secs()
        ))
        .config_extra("step_down_wait = \"2s\"");
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .template(template)
        .proxies()
        .relay_cluster()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    let root = c.root_token().to_string();
    let s = (a + 1) % 3;
    let (st, v) = c.nodes[a]
        .request("POST", "secret/data/p", Some(&root), Some(json!({"data": {"v": 1}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // Warm the standby proxy's forwarding path.
    let (st, v) = c.nodes[s].request("GET", "secret/data/p", Some(&root), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    c.cluster_relays[a].set(Fault::Blackhole);
    wait_until_async(
        || async {
            let (st, _) = c.nodes[s].try_request("GET", "sys/health", None, None).await?;
            (st.as_u16() == 474).then_some(())
        },
        "the cut standby's pair answers 474",
        ELECTION_BOUND,
    )
    .await;
    // The active itself is unaffected.
    assert_eq!(
        c.actives().await,
        vec![a],
        "a cut cluster channel must not move leadership"
    );

    let http = no_redirect_client();
    let url = format!("{}/v1/secret/data/p?version=1", c.nodes[s].addr);
    let want_location = format!("{}/v1/secret/data/p?version=1", c.nodes[a].addr);
    // The first read may ride the proxy's pooled cluster connection, which went silent
    // after the request was sent: that one may end in a clear 502/504 once
    // `max_request_duration` passes (the proxy cannot know whether the active got it). The
    // next ones open a new connection, whose handshake gets no answer: Vault's 307 to the
    // active (or a clear 503), within the bound.
    let mut outcomes = Vec::new();
    for attempt in 0..3 {
        let t0 = Instant::now();
        let resp = http
            .get(&url)
            .header("X-Vault-Token", &root)
            .send()
            .await
            .expect("bounded answer");
        let took = t0.elapsed();
        let st = resp.status();
        let loc = resp.headers().get("location").map(|l| l.to_str().unwrap().to_string());
        let body = resp.text().await.unwrap_or_default();
        eprintln!("standby proxy, cluster channel cut, attempt {attempt}: {st} after {took:?}, location {loc:?}");
        assert!(took <= REQUEST_BOUND, "the proxy held the request {took:?}");
        match st.as_u16() {
            307 => assert_eq!(
                loc.as_deref(),
                Some(want_location.as_str()),
                "307 must keep path and query"
            ),
            503 => assert!(body.contains("errors"), "503 without a Vault error body: {body}"),
            502 | 504 if attempt == 0 => assert!(body.contains("errors"), "{st} without a Vault error body: {body}"),
            other => panic!("attempt {attempt}: unexpected fallback {other}: {body}"),
        }
        outcomes.push(st.as_u16());
    }
    assert!(
        outcomes[1..].contains(&307),
        "no 307 fallback to the active: {outcomes:?}"
    );

    c.cluster_relays[a].heal();
    wait_until_async(
        || async {
            let (st, _) = c.nodes[s].try_request("GET", "sys/health", None, None).await?;
            (st.as_u16() == 429).then_some(())
        },
        "the standby's pair answers 429 again once healed",
        ELECTION_BOUND,
    )
    .await;
    wait_until_async(
        || async {
            let (st, v) = c.nodes[s]
                .try_request("GET", "secret/data/p", Some(&root), None)
                .await?;
            (st == StatusCode::OK && v["data"]["data"]["v"] == 1).then_some(())
        },
        "the standby's proxy forwards again",
        ELECTION_BOUND,
    )
    .await;
}

/// The active cut one way from the store (its requests, renewals included, reach lockd;
/// lockd's answers never come back): no instant exists where two nodes say they are active;
/// the old active stops saying so before the new one starts; the new active takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_cut_one_way_from_store_steps_down_first() {
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .relay_store()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    let root = c.root_token().to_string();

    c.store_relays[a].set(Fault::CutDownstream);
    let t0 = Instant::now();
    let mut last_old_active: Option<Duration> = None;
    let mut first_new_active: Option<(usize, Duration)> = None;
    let mut both = Vec::new();
    // Poll every node concurrently until a new active is seen and the old one has stopped.
    while t0.elapsed() < ELECTION_BOUND {
        let polls = futures::future::join_all((0..3).map(|i| c.leader_of(i))).await;
        let now = t0.elapsed();
        let act: Vec<usize> = polls
            .iter()
            .enumerate()
            .filter(|(_, v)| v.as_ref().is_some_and(|v| v["is_self"] == Value::Bool(true)))
            .map(|(i, _)| i)
            .collect();
        if act.len() > 1 {
            both.push((now, act.clone()));
        }
        if act.contains(&a) {
            last_old_active = Some(now);
        }
        if let Some(n) = act.iter().find(|i| **i != a) {
            first_new_active.get_or_insert((*n, now));
        }
        if first_new_active.is_some() && !act.contains(&a) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (n, new_at) = first_new_active.expect("a standby took over");
    eprintln!("one-way store cut: old active last seen at {last_old_active:?}, node {n} active at {new_at:?}");
    assert!(both.is_empty(), "two nodes said they were active at once: {both:?}");
    if let Some(old) = last_old_active {
        assert!(old < new_at, "the old active was still active when the new one started");
    }
    let (st, v) = c.nodes[n]
        .request(
            "POST",
            "secret/data/after-cut",
            Some(&root),
            Some(json!({"data": {"v": 2}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    c.store_relays[a].heal();
    c.wait_one_active(ELECTION_BOUND).await;
}

/// A slow store below the documented threshold (every chunk between each node and lockd
/// delayed by lock_ttl/20) causes no false failover: for four lock TTLs the same node stays
/// active under the same fencing token, and sequential writes through it keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_store_below_threshold_no_false_failover() {
    const TTL: Duration = Duration::from_secs(3);
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("3s")
        .relay_store()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    let root = c.root_token().to_string();
    // A direct (not relayed) view of the lock.
    let store = c.lockd.as_ref().unwrap().client();
    let before = store.holder(LOCK_KEY).await.unwrap().expect("holder");

    let delay = TTL / 20;
    for r in &c.store_relays {
        r.set(Fault::Delay(delay));
    }
    let t0 = Instant::now();
    let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
    for i in 0..1000u32 {
        if t0.elapsed() > TTL * 4 {
            break;
        }
        let w0 = Instant::now();
        let r = c.nodes[a]
            .try_request("POST", "secret/data/slow", Some(&root), Some(json!({"data": {"i": i}})))
            .await;
        slowest = slowest.max(w0.elapsed());
        match r {
            Some((st, _)) if st.is_success() => ok += 1,
            _ => failed += 1,
        }
        let h = store.holder(LOCK_KEY).await.unwrap();
        assert_eq!(
            h.as_ref().map(|h| h.token),
            Some(before.token),
            "false failover under a {delay:?} store delay"
        );
    }
    for r in &c.store_relays {
        r.heal();
    }
    eprintln!("slow store ({delay:?} per chunk): {ok} writes ok, {failed} failed, slowest {slowest:?}");
    assert_eq!(c.actives().await, vec![a], "leadership moved under a slow store");
    assert_eq!(
        store.holder(LOCK_KEY).await.unwrap().map(|h| h.token),
        Some(before.token)
    );
    assert_eq!(failed, 0, "writes failed under a slow (not failed) store");
    assert!(ok > 0);
}

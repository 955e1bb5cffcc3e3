//! HA on etcd with real processes: a 3-member etcd 3.4 cluster and 3 `vha server`
//! nodes on 127.0.0.1. Failover after kill -9 of the vha active, an etcd leader crash that
//! must not move the vha active, quorum loss (the active steps down, no acknowledged write is
//! lost), a deposed active fenced by the lock key's create revision, and every split pair.
//!
//! The lock lease (`lock_timeout`) is 5 s here, etcd's documented minimum for the backend.

use std::time::{Duration, Instant};

use vha_core::advert::LOCK_KEY;
use vha_core::storage::etcd::EtcdBackend;
use vha_core::storage::{Backend, HaBackend};
use vha_testkit::fencing::{deposed_active_writes_fail, Freeze};
use vha_testkit::node::{log_time, Store};
use vha_testkit::{wait_until_async, TestCluster};

/// The lease TTL the clusters here run with (`lock_timeout`).
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Documented failover bound after kill -9 of the active node with no proxy to release its
/// lock: the lease TTL (etcd expires it within ~0.5 s after, its lessor's check period), the
/// watch wake-up of a standby (milliseconds) and the new active's unseal-side setup; the slack
/// covers debug builds on two busy cores. The measured figure is printed.
const KILL_FAILOVER_BOUND: Duration = Duration::from_secs(5 + 7);
/// Wide bound for waits that are not the property under test.
const BOUND: Duration = Duration::from_secs(30);

/// Writes through the current active until one is acknowledged.
async fn write_eventually(c: &TestCluster, key: &str, v: &str) {
    wait_until_async(
        || async {
            let a = *c.actives().await.first()?;
            c.kv_put(a, key, v).await.filter(|st| st.is_success()).map(|_| ())
        },
        "a write acknowledged by the active",
        BOUND,
    )
    .await;
}

/// `active_time` reported by node `i` (changes on every new term).
async fn active_time(c: &TestCluster, i: usize) -> Option<String> {
    c.leader_of(i)
        .await
        .and_then(|v| v["active_time"].as_str().map(str::to_string))
}

/// kill -9 of the vha active: a standby becomes active within the documented bound
/// (lease TTL + slack), every node then follows it, and writes go on through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_active_node_fails_over_within_bound() {
    let mut c = TestCluster::builder().etcd(3).nodes(3).start().await;
    let a = c.wait_one_active(BOUND).await;
    c.mount_secret(a).await;
    assert!(c.kv_put(a, "before", "1").await.unwrap().is_success());
    let t0 = Instant::now();
    c.nodes[a].kill();
    let n = c.wait_new_active(a, KILL_FAILOVER_BOUND).await;
    let took = t0.elapsed();
    println!("etcd failover after kill -9 of the active: {took:?} (lock_timeout {LOCK_TIMEOUT:?})");
    write_eventually(&c, "after", "2").await;
    assert_eq!(c.kv_get(n, "before").await.as_deref(), Some("1"));
    assert_eq!(c.kv_get(n, "after").await.as_deref(), Some("2"));
}

/// Pairs (proxy + node) on etcd: kill -9 of the active node makes its proxy prove the death
/// and release the lock by token (`force_release`, a create-revision compare in etcd), so a
/// standby takes over well before the lease TTL; writes go on through any proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_kill_active_node_released_by_proxy() {
    let mut c = TestCluster::builder().etcd(3).nodes(3).proxies().start().await;
    let a = c.wait_one_active(BOUND).await;
    c.mount_secret(a).await;
    assert!(c.kv_put(a, "before", "1").await.unwrap().is_success());
    let t0 = Instant::now();
    c.nodes[a].kill();
    let n = c.wait_new_active(a, KILL_FAILOVER_BOUND).await;
    let took = t0.elapsed();
    println!("etcd pairs: failover after kill -9 of the active node: {took:?} (lock_timeout {LOCK_TIMEOUT:?})");
    assert!(took < LOCK_TIMEOUT, "the proxy's release beats the lease TTL: {took:?}");
    write_eventually(&c, "after", "2").await;
    assert_eq!(c.kv_get(n, "before").await.as_deref(), Some("1"));
}

/// kill -9 of the etcd raft leader: the vha active keeps its lock through etcd's election
/// (same node, same term: `active_time` unchanged, never two actives nor another one), and
/// writes are acknowledged again once etcd has a new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_crash_keeps_vha_active() {
    let mut c = TestCluster::builder().etcd(3).nodes(3).start().await;
    let a = c.wait_one_active(BOUND).await;
    c.mount_secret(a).await;
    let term = active_time(&c, a).await.expect("active_time");
    let etcd = c.etcd.as_mut().unwrap();
    let old = etcd.wait_leader(BOUND);
    let t0 = Instant::now();
    etcd.kill(old);
    let new = etcd.wait_leader(BOUND);
    assert_ne!(new, old);
    println!(
        "etcd elected member {new} {:?} after kill -9 of leader {old}",
        t0.elapsed()
    );
    // Writes continue through the same active, and nobody else became active meanwhile.
    let mut acked = 0;
    let deadline = Instant::now() + LOCK_TIMEOUT * 2;
    while Instant::now() < deadline {
        let actives = c.actives().await;
        assert!(
            actives.iter().all(|x| *x == a),
            "the vha active must not change: {actives:?}"
        );
        if c.kv_put(a, &format!("k{acked}"), "v")
            .await
            .is_some_and(|s| s.is_success())
        {
            acked += 1;
        }
    }
    assert!(acked > 0, "writes continue after etcd's election");
    println!(
        "{acked} writes acknowledged in the {:?} after the etcd leader crash",
        LOCK_TIMEOUT * 2
    );
    assert_eq!(
        active_time(&c, a).await.as_deref(),
        Some(term.as_str()),
        "same term: the lock was kept"
    );
    assert!(!c.nodes[a].output().contains("leadership lost"), "no step-down");
    let etcd = c.etcd.as_mut().unwrap();
    etcd.restart(old);
    assert_eq!(c.wait_one_active(BOUND).await, a, "still the same active");
}

/// Quorum loss (2 of 3 etcd members killed): the vha active steps down by its holder-side
/// deadline (within the lease TTL of the crash), before etcd could hand the lock to anyone
/// (the next term's `active_time` is later); every write acknowledged before, during and
/// after is in etcd afterwards; once the members are back there is a single active again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_steps_down_and_loses_no_acknowledged_write() {
    let mut c = TestCluster::builder().etcd(3).nodes(3).start().await;
    let a = c.wait_one_active(BOUND).await;
    c.mount_secret(a).await;
    let leader = c.etcd.as_ref().unwrap().wait_leader(BOUND);
    // The leader and one follower: no quorum left.
    let gone = [leader, (leader + 1) % 3];
    let mut acked: Vec<String> = Vec::new();
    for i in 0..5 {
        let k = format!("pre{i}");
        assert!(c.kv_put(a, &k, &k).await.unwrap().is_success());
        acked.push(k);
    }
    let killed_at = std::time::SystemTime::now();
    for m in gone {
        c.etcd.as_mut().unwrap().kill(m);
    }
    // Keep writing through the old active while waiting for it to step down.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let writer = async {
        let mut mine = Vec::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let k = format!("during{i}");
            i += 1;
            if c.kv_put(a, &k, &k).await.is_some_and(|s| s.is_success()) {
                mine.push(k);
            }
        }
        mine
    };
    let watcher = async {
        let line = c.nodes[a].wait_log_line("leadership lost", BOUND).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        line
    };
    let (during, lost_line) = tokio::join!(writer, watcher);
    acked.extend(during);
    let lost_at = log_time(&lost_line).expect("timestamp on the log line");
    let took = lost_at.duration_since(killed_at).unwrap_or_default();
    println!("active stepped down {took:?} after quorum loss (lock_timeout {LOCK_TIMEOUT:?}): {lost_line}");
    assert!(took < LOCK_TIMEOUT, "steps down within the lease TTL, took {took:?}");
    assert!(c.actives().await.is_empty(), "no active without quorum");
    for m in gone {
        c.etcd.as_mut().unwrap().start_member(m);
    }
    c.etcd.as_mut().unwrap().wait_all_healthy(BOUND);
    let n = c.wait_one_active(BOUND).await;
    let new_term = humantime::parse_rfc3339(&active_time(&c, n).await.unwrap()).unwrap();
    assert!(
        new_term > lost_at,
        "the next term began after the old active stepped down"
    );
    for k in &acked {
        assert_eq!(
            c.kv_get(n, k).await.as_deref(),
            Some(k.as_str()),
            "acknowledged write {k} lost"
        );
    }
    let raw = EtcdBackend::connect(&c.etcd.as_ref().unwrap().address()).unwrap();
    assert!(!raw.list("").await.unwrap().is_empty(), "the data lives in etcd");
    println!(
        "{} acknowledged writes all present after quorum loss and recovery",
        acked.len()
    );
}

/// Fencing end to end on etcd, frozen: writes queued at the active's own node listener
/// while it is SIGSTOPped past its lease all fail once it resumes (another node took over
/// and wrote the same keys), none is visible, the store's refusals (the transaction compare
/// on the lock's create revision) show in `vha_node_fencing_rejections_total`, and the old
/// active steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_active_cannot_write() {
    let c = TestCluster::builder().etcd(3).nodes(3).start().await;
    deposed_active_writes_fail(&c, Freeze::Stop, BOUND)
        .await
        .assert_fenced();
}

/// Fencing at etcd as the data store (split mode, HA lock on lockd): the active's grant is
/// released at lockd while its link to lockd is held, so it still believes it is active;
/// another node takes the lock and writes; every write of the old active then reaches
/// etcd with the old fence and etcd's fence transaction (the high-water mark of the lock's
/// tokens) refuses it; the node answers 503 "leadership lost", counts each, and the first
/// refusal ends its term (later writes are refused by the node itself); none lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_fence_refused_by_etcd_data_store() {
    let c = TestCluster::builder()
        .split_stores(Store::Etcd, Store::Lockd)
        .lock_ttl("10s")
        .relay_store()
        .nodes(2)
        .start()
        .await;
    let out = deposed_active_writes_fail(&c, Freeze::LockMoved, BOUND).await;
    out.assert_fenced();
    // The first stale write to reach etcd is refused there and ends the term at once; the
    // rest meet a node that knows it is no longer active.
    assert!(
        out.fenced >= 1,
        "etcd refused the stale writes that reached it: {out:?}"
    );
}

/// Every sensible split pair works: data and lock in the named stores, one active, kill -9
/// failover, writes before and after readable; the lock lives only in the HA store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_pairs() {
    for (data, ha) in [
        (Store::Lockd, Store::Etcd),
        (Store::Etcd, Store::Lockd),
        (Store::Etcd, Store::Etcd),
    ] {
        let mut c = TestCluster::builder().split_stores(data, ha).nodes(2).start().await;
        let a = c.wait_one_active(BOUND).await;
        c.mount_secret(a).await;
        assert!(c.kv_put(a, "x", "1").await.unwrap().is_success(), "{data:?}+{ha:?}");
        let e = c.etcd.as_ref().unwrap();
        let etcd_ha = EtcdBackend::connect(&e.address())
            .unwrap()
            .with_config(|cfg| cfg.path = "vault-ha/".into())
            .unwrap();
        match ha {
            Store::Etcd => assert!(etcd_ha.holder(LOCK_KEY).await.unwrap().is_some(), "lock in etcd"),
            Store::Lockd => {
                let l = c.lockd.as_ref().unwrap().client();
                assert!(l.holder(LOCK_KEY).await.unwrap().is_some(), "lock in lockd");
                assert!(etcd_ha.holder(LOCK_KEY).await.unwrap().is_none());
            }
        }
        if data == Store::Etcd {
            let raw = EtcdBackend::connect(&e.address()).unwrap();
            assert!(
                !raw.list("").await.unwrap().is_empty(),
                "data in etcd ({data:?}+{ha:?})"
            );
        }
        c.nodes[a].kill();
        let n = c.wait_new_active(a, BOUND).await;
        write_eventually(&c, "y", "2").await;
        assert_eq!(c.kv_get(n, "x").await.as_deref(), Some("1"), "{data:?}+{ha:?}");
        assert_eq!(c.kv_get(n, "y").await.as_deref(), Some("2"), "{data:?}+{ha:?}");
        println!("split {data:?} data + {ha:?} HA: ok");
    }
}

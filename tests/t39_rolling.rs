//! Rolling upgrade of a whole cluster under client load, on real processes: for each pair in
//! turn, the proxy is upgraded in place (Pingora's socket hand-over) and then the node is
//! restarted (SIGTERM: it drains, ends its term if active, exits; the new process starts
//! sealed and is unsealed), as the README's "Operations" section tells operators to do.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vha_testkit::load::{finish, kv_writes, LoadBounds, LoadResult};
use vha_testkit::{TestCluster, TestClusterBuilder};

/// Bound on an election, an unseal taking effect, or a proxy following the new view.
const BOUND: Duration = Duration::from_secs(40);
/// Hard caps on each load loop, whatever happens to the test.
const LOOP_BOUNDS: LoadBounds = LoadBounds {
    max_writes: 20_000,
    max_time: Duration::from_secs(240),
};
/// Successful writes each loop must add after a pair is back before the next one is
/// restarted (the load really flows through every pair at every step).
const WRITES_PER_STEP: u64 = 5;

/// Waits until every counter in `done` grew by [`WRITES_PER_STEP`] from `from`.
async fn wait_progress(done: &[Arc<AtomicU64>], why: &str) {
    let from: Vec<u64> = done.iter().map(|d| d.load(Ordering::Relaxed)).collect();
    vha_testkit::wait_until_async(
        || async {
            done.iter()
                .zip(&from)
                .all(|(d, f)| d.load(Ordering::Relaxed) >= f + WRITES_PER_STEP)
                .then_some(())
        },
        why,
        BOUND,
    )
    .await;
}

/// Property: restarting every pair of a 3-pair cluster in turn, standbys first and the
/// active last (proxy upgrade, then node SIGTERM, start, unseal), under writes through every pair's proxy fails no client
/// request and loses no acknowledged write; a standby's restart leaves the active (and its
/// term) where it was, and the active's restart moves the active exactly once (on lockd,
/// whose fencing tokens count grants, the term goes up by exactly one).
async fn rolling_restart(builder: TestClusterBuilder, tokens_count_grants: bool) {
    let mut c = builder.nodes(3).proxies().start().await;
    let mut a = c.wait_one_active(BOUND).await;
    c.mount_secret(a).await;
    let token = c.root_token().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let done: Vec<Arc<AtomicU64>> = (0..c.proxies.len()).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let loops: Vec<_> = c
        .proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokio::spawn(kv_writes(
                p.addr.clone(),
                token.clone(),
                format!("roll-p{i}"),
                stop.clone(),
                done[i].clone(),
                LOOP_BOUNDS,
            ))
        })
        .collect();
    wait_progress(&done, "writes flow through every pair before the first restart").await;
    let mut moves = 0;
    // Standbys first, the active last (the README's procedure): the active moves once.
    let mut order: Vec<usize> = (0..c.nodes.len()).filter(|&i| i != a).collect();
    order.push(a);
    for i in order {
        let term_before = c.node_metric(a, "vha_node_term").await.expect("active's term");
        // The proxy first: its successor takes the listening socket over.
        let mut old = c.proxies[i].upgrade();
        let status = old.wait_exit(BOUND);
        assert!(
            status.is_some_and(|s| s.success()),
            "pair {i}: the old proxy drains and exits ({status:?}); its output:\n{}",
            old.output()
        );
        // Then the node: SIGTERM (drain, end the term if active), a new process, unseal.
        c.nodes[i].restart().await;
        c.unseal(i).await;
        let now = c.wait_one_active(BOUND).await;
        c.wait_ready(now, BOUND).await;
        let term_after = c.node_metric(now, "vha_node_term").await.expect("active's term");
        if i == a {
            assert_ne!(now, a, "pair {i} was active: its restart hands the term over");
            if tokens_count_grants {
                assert_eq!(
                    term_after,
                    term_before + 1.0,
                    "the active's restart moves the active exactly once"
                );
            }
            moves += 1;
        } else {
            assert_eq!(now, a, "restarting standby {i} moved the active");
            assert_eq!(term_after, term_before, "restarting standby {i} started a new term");
        }
        a = now;
        wait_progress(&done, "writes flow through every pair after a restart").await;
    }
    let LoadResult { acked, errors } = finish(&stop, loops).await;
    eprintln!(
        "rolling restart of {} pairs: {} writes acknowledged, {} client errors, active moved {moves} time(s)",
        c.nodes.len(),
        acked.len(),
        errors.len()
    );
    if !errors.is_empty() {
        // What the proxies said about it (their warnings: a failed forward names its cause).
        for (i, p) in c.proxies.iter().enumerate() {
            for l in p.output().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
                eprintln!("proxy {i}: {l}");
            }
        }
    }
    assert!(
        errors.is_empty(),
        "client errors during the rolling restart: {errors:?}"
    );
    assert_eq!(moves, 1, "the active moves once, when its own pair restarts");
    for key in &acked {
        assert_eq!(
            c.kv_get(a, key).await.as_deref(),
            Some(key.as_str()),
            "acknowledged write {key} lost"
        );
    }
}

/// [`rolling_restart`] with lockd as storage and HA store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_on_lockd_fails_no_request() {
    rolling_restart(TestCluster::builder(), true).await;
}

/// [`rolling_restart`] with a 3-member etcd cluster as storage and HA store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_on_etcd_fails_no_request() {
    rolling_restart(TestCluster::builder().etcd(3), false).await;
}

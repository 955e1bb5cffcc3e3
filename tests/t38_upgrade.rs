//! Graceful upgrade of `vha proxy` (Pingora's: the successor takes the listening socket over
//! from the running process, which drains and exits) under client load, on real processes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vha_testkit::load::{kv_writes, LoadBounds};
use vha_testkit::{TestCluster, TestNode};

/// Bound on electing the first active node.
const ELECTION_BOUND: Duration = Duration::from_secs(30);
/// Bound on the old process exiting after SIGQUIT: its close timeout (5 s) and shutdown
/// timeout (5 s), with room for a debug build on two busy cores.
const DRAIN_BOUND: Duration = Duration::from_secs(40);
/// Load loops per proxy (each on its own keep-alive client).
const LOOPS_PER_PROXY: usize = 2;
/// Hard caps on each load loop, whatever happens to the test.
const LOOP_BOUNDS: LoadBounds = LoadBounds {
    max_writes: 200_000,
    max_time: Duration::from_secs(120),
};

/// Property: upgrading a pair's proxy in place (successor with `--upgrade`, SIGQUIT to the
/// running one) under steady writes and reads through both pairs, on the active's proxy and
/// then on the standby's (which forwards), fails no request: no connection error, no
/// non-2xx, no wrong read; the old process drains and exits by itself; and the successor
/// serves its metrics on the same address once the old one let go of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_under_load_fails_no_request() {
    let mut c = TestCluster::builder()
        .nodes(2)
        .template(TestNode::builder())
        .proxies()
        .start()
        .await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    c.mount_secret(a).await;
    let token = c.root_token().to_string();
    for target in [a, 1 - a] {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut loops = Vec::new();
        for (i, p) in c.proxies.iter().enumerate() {
            for l in 0..LOOPS_PER_PROXY {
                loops.push(tokio::spawn(kv_writes(
                    p.addr.clone(),
                    token.clone(),
                    format!("up{target}-p{i}-l{l}"),
                    stop.clone(),
                    done.clone(),
                    LOOP_BOUNDS,
                )));
            }
        }
        // Load is flowing (a few successes per loop on average) before the upgrade starts.
        let want = (c.proxies.len() * LOOPS_PER_PROXY * 5) as u64;
        vha_testkit::wait_until_async(
            || async { (done.load(Ordering::Relaxed) >= want).then_some(()) },
            "load flows before the upgrade",
            DRAIN_BOUND,
        )
        .await;
        let mut old = c.proxies[target].upgrade();
        let status = old.wait_exit(DRAIN_BOUND);
        assert!(
            status.is_some_and(|s| s.success()),
            "the old proxy drains and exits cleanly ({status:?}); its output:\n{}",
            old.output()
        );
        stop.store(true, Ordering::Relaxed);
        let mut ok = 0;
        let mut errors = Vec::new();
        for l in loops {
            let r = l.await.expect("load loop");
            ok += r.acked.len();
            errors.extend(r.errors);
        }
        eprintln!(
            "upgrade of pair {target}: {ok} writes acknowledged (each read back), {} failures",
            errors.len()
        );
        assert!(ok > 0, "load ran");
        assert!(
            errors.is_empty(),
            "requests failed across the upgrade of pair {target}: {errors:?}"
        );
        assert!(c.proxies[target].is_running(), "the successor runs");
        vha_testkit::wait_until_async(
            || async {
                c.proxies[target]
                    .metrics()
                    .await
                    .contains("vha_proxy_requests_total")
                    .then_some(())
            },
            "the successor serves metrics on the same address",
            DRAIN_BOUND,
        )
        .await;
    }
}

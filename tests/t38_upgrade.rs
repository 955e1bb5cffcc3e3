//! Graceful upgrade of `vha proxy` (Pingora's: the successor takes the listening socket over
//! from the running process, which drains and exits) under client load, on real processes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vha_testkit::load::{finish, kv_writes, LoadBounds, LoadResult};
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
        let LoadResult { acked, errors } = finish(&stop, loops).await;
        let ok = acked.len();
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

/// A proxy this test started through `--daemon` (not its child): SIGTERM by PID on drop,
/// SIGKILL if it is still there after the bound.
struct DaemonPid(u32);

impl Drop for DaemonPid {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        if alive(self.0) {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = std::time::Instant::now() + DRAIN_BOUND;
            while alive(self.0) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(self.0) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    vha_testkit::pid_alive(u64::from(pid))
}

/// The unit's `key=` command lines, in order.
fn unit_lines(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key))
        .map(str::to_string)
        .collect()
}

/// Runs a `vha proxy` command line of the unit (binary, config and run directory swapped
/// for the test's) to its end; its output, and the daemon's (inherited), go to `log`.
fn run_unit_line(line: &str, config: &std::path::Path, dir: &std::path::Path, log: &std::path::Path) -> bool {
    let line = line
        .replace("/etc/vha/vha.hcl", &config.display().to_string())
        .replace("/run/vha-proxy", &dir.display().to_string());
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/vha"), "{line}");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let status = std::process::Command::new(vha_testkit::vha_binary())
        .args(words)
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .status()
        .expect("run the unit's command");
    status.success()
}

/// Property: the systemd `Type=forking` procedure of `examples/deploy/vha-proxy.service`
/// works as the unit runs it (its `ExecStart=` and `ExecReload=` lines are read from the
/// file and run, `$MAINPID` being the PID file's content before the reload). `--daemon` returns 0 once the proxy it started is ready, and
/// the PID file names that proxy (not the invoked process). `--daemon --upgrade`
/// (`ExecReload=`, line one) returns 0 once the successor waits for the hand-over, the PID
/// file already naming the successor. SIGQUIT to the first (line two) hands the listener
/// over under writes and reads through the pair with no failed request. The first process
/// exits, and the successor serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_forking_reload_upgrades_under_load() {
    let node = TestNode::builder().behind_proxy().start().await;
    let run = tempfile::tempdir().expect("run dir");
    let log = node.dir().join("proxy-daemon.log");
    let pid_file = run.path().join("vha-proxy.pid");
    let read_pid = || -> Option<u32> { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok() };
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy/vha-proxy.service"),
    )
    .expect("unit");
    assert!(unit.contains("\nType=forking\n"), "{unit}");
    assert!(unit.contains("\nPIDFile=/run/vha-proxy/vha-proxy.pid\n"), "{unit}");
    let start = unit_lines(&unit, "ExecStart=");
    let reload = unit_lines(&unit, "ExecReload=");
    assert_eq!(start.len(), 1, "{unit}");
    assert_eq!(reload.len(), 2, "{unit}");
    assert_eq!(reload[1], "/bin/kill -QUIT $MAINPID", "the second reload line");

    assert!(
        run_unit_line(&start[0], &node.config_path, run.path(), &log),
        "--daemon starts the proxy: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let first = DaemonPid(read_pid().expect("the PID file names the proxy"));
    assert!(alive(first.0), "the PID file names a running process");
    let token = node.init_unsealed().await.root_token;
    node.mount_kv(&token, "secret", "2").await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let loops: Vec<_> = (0..LOOPS_PER_PROXY)
        .map(|l| {
            tokio::spawn(kv_writes(
                node.addr.clone(),
                token.clone(),
                format!("daemon-l{l}"),
                stop.clone(),
                done.clone(),
                LOOP_BOUNDS,
            ))
        })
        .collect();
    let progress = |n: u64| {
        let done = done.clone();
        async move {
            let from = done.load(Ordering::Relaxed);
            vha_testkit::wait_until_async(
                || async { (done.load(Ordering::Relaxed) >= from + n).then_some(()) },
                "writes flow through the pair",
                DRAIN_BOUND,
            )
            .await;
        }
    };
    progress(10).await;

    assert!(
        run_unit_line(&reload[0], &node.config_path, run.path(), &log),
        "--daemon --upgrade starts the successor: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let second = DaemonPid(read_pid().expect("the PID file names the successor"));
    assert_ne!(
        second.0, first.0,
        "the PID file names the successor before the hand-over"
    );
    assert!(
        run.path().join("vha-proxy-upgrade.sock").exists(),
        "the successor waits on its socket"
    );
    // The second line, `kill -QUIT $MAINPID`: the main PID is still the first proxy.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0 as i32),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .expect("SIGQUIT the first proxy");
    vha_testkit::wait_until_async(
        || async { (!alive(first.0)).then_some(()) },
        "the first proxy drains and exits",
        DRAIN_BOUND,
    )
    .await;
    progress(10).await;
    let LoadResult { acked, errors } = finish(&stop, loops).await;
    let ok = acked.len();
    eprintln!(
        "systemd-style reload: {ok} writes acknowledged, {} failures",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "requests failed across the reload: {errors:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(alive(second.0), "the successor serves on");
    assert_eq!(read_pid(), Some(second.0), "the PID file still names the successor");
}

//! `TestProxy`: a real `vha proxy --config <node config>` process in front of a
//! [`crate::TestNode`] built `.behind_proxy()`, on the node's test host when it has one.
//! Started after its node; waits until the
//! proxy's listener accepts TCP connections (the proxy answers even while its node is down
//! or sealed, so readiness is the listener, not an API status).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::net::{command_on, NetHost};
use crate::process::{vha_binary, ChildProc};
use crate::prometheus::series_value;
use crate::wait::wait_until_async;

/// How long a finished request may take to show in the proxy's counters (it is counted in
/// Pingora's logging phase, right after the response); generous for a loaded CI machine.
pub const METRICS_SETTLE: Duration = Duration::from_secs(10);

/// How long a proxy may take to listen (Pingora start-up in a debug build on 2 busy cores).
pub const PROXY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `vha proxy`.
pub struct TestProxy {
    /// The proxy's listener (`http://127.0.0.1:<port>`), the pair's api address.
    pub addr: String,
    pub listen: SocketAddr,
    /// `proxy.metrics_address` from the config, if any.
    pub metrics_addr: Option<String>,
    config_path: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    /// The test host it runs on (`None`: the test's own namespace).
    host: Option<NetHost>,
    proc: Option<ChildProc>,
    starts: u32,
}

impl TestProxy {
    /// Starts `vha proxy` with the node's config file (`listen` = the listener address in it).
    pub fn start(config_path: &Path, listen: SocketAddr) -> TestProxy {
        TestProxy::start_with_env(config_path, listen, Vec::new())
    }

    /// Like [`TestProxy::start`] with extra environment variables.
    pub fn start_with_env(config_path: &Path, listen: SocketAddr, env: Vec<(String, String)>) -> TestProxy {
        TestProxy::start_in(None, config_path, listen, env)
    }

    /// Like [`TestProxy::start_with_env`], on test host `host` when given (the node's host:
    /// a pair shares one host).
    pub fn start_in(
        host: Option<NetHost>,
        config_path: &Path,
        listen: SocketAddr,
        env: Vec<(String, String)>,
    ) -> TestProxy {
        let cfg = std::fs::read_to_string(config_path).unwrap_or_default();
        let metrics_addr = cfg
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("metrics_address = \"")
                    .and_then(|r| r.strip_suffix('"'))
            })
            .map(|a| format!("http://{a}"));
        let mut p = TestProxy {
            addr: format!("http://{listen}"),
            listen,
            metrics_addr,
            config_path: config_path.to_path_buf(),
            dir: config_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            env,
            host,
            proc: None,
            starts: 0,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let mut cmd = command_on(self.host.as_ref(), vha_binary());
        cmd.arg("proxy")
            .arg("--config")
            .arg(&self.config_path)
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let log = self.dir.join(format!("proxy-{}.log", self.starts));
        self.starts += 1;
        self.proc = Some(ChildProc::spawn("vha proxy", cmd, &log));
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let deadline = std::time::Instant::now() + PROXY_START_TIMEOUT;
        loop {
            let listen = self.listen;
            let up = match &self.host {
                Some(h) => h.tcp_connects(listen, Duration::from_millis(200)),
                None => TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok(),
            };
            if up {
                return;
            }
            let running = self.proc.as_mut().is_some_and(|p| p.is_running());
            if !running || std::time::Instant::now() >= deadline {
                panic!(
                    "vha proxy did not start listening on {} (running: {running}); output:\n{}",
                    self.listen,
                    self.output()
                );
            }
            std::thread::sleep(crate::wait::POLL_INTERVAL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// Captured output of the current run.
    pub fn output(&self) -> String {
        self.proc.as_ref().map(|p| p.output()).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| p.is_running_shared())
    }

    /// Pingora's graceful upgrade: starts a successor with `--upgrade`, waits until it
    /// listens for the hand-over (its upgrade socket appears), then sends the running
    /// process SIGQUIT so it hands its listening socket over. Returns the old process, which
    /// drains and exits on its own; the caller waits for that (and it is killed on drop).
    pub fn upgrade(&mut self) -> ChildProc {
        let upgrade_sock = self.dir.join("vha-proxy-upgrade.sock");
        let _ = std::fs::remove_file(&upgrade_sock);
        let mut cmd = command_on(self.host.as_ref(), vha_binary());
        cmd.arg("proxy")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--upgrade")
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let log = self.dir.join(format!("proxy-{}.log", self.starts));
        self.starts += 1;
        let successor = ChildProc::spawn("vha proxy (successor)", cmd, &log);
        let old = self.proc.replace(successor).expect("a running proxy to upgrade");
        crate::wait::wait_until(
            || upgrade_sock.exists().then_some(()),
            "the successor waits for the listener on its upgrade socket",
            PROXY_START_TIMEOUT,
        );
        old.signal(nix::sys::signal::Signal::SIGQUIT);
        old
    }

    /// Sends a signal to the process (by its PID).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(p) = &self.proc {
            p.signal(sig);
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.proc.as_mut().and_then(|p| p.terminate(grace))
    }

    /// Stops (SIGTERM) and starts again on the same address.
    pub fn restart(&mut self) {
        self.stop(Duration::from_secs(10));
        self.spawn();
    }

    /// The metrics text (empty when there is no metrics address or it does not answer).
    pub async fn metrics(&self) -> String {
        let Some(m) = &self.metrics_addr else {
            return String::new();
        };
        match reqwest::get(format!("{m}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The metrics text once this proxy has counted `requests` more requests than in
    /// `before` (a scrape): the proxy counts a request (and observes its forward latency)
    /// after the response has gone out, so a client can hold its answer a moment before the
    /// count moves. Waits at most [`METRICS_SETTLE`].
    pub async fn metrics_after(&self, before: &str, requests: u32) -> String {
        let want = series_value(before, "vha_proxy_requests_total", &[]) + f64::from(requests);
        wait_until_async(
            || async {
                let m = self.metrics().await;
                (series_value(&m, "vha_proxy_requests_total", &[]) >= want).then_some(m)
            },
            &format!("proxy {} counts {requests} more request(s)", self.addr),
            METRICS_SETTLE,
        )
        .await
    }

    /// The value of one metric series (exact name with labels as rendered), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|r| r.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

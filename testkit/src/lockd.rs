//! `TestLockd`: a real `vha lockd` process on a free 127.0.0.1 port with a temp data dir.
//! Waits until it answers `GET /v1/health` (polling, never sleeping blind); `kill()` sends
//! SIGKILL, `stop()` SIGTERM, `restart()` brings it back on the same port and data dir.
//! Generic on purpose: lockd tests and the node harness both use it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{free_port, vha_binary, ChildProc};
use crate::wait::wait_until;

/// How long lockd may take to answer after start: recovery of a test-sized log is
/// milliseconds; the margin covers debug builds on 2 busy cores.
pub const LOCKD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Builder for [`TestLockd`].
#[derive(Clone, Debug, Default)]
pub struct TestLockdBuilder {
    args: Vec<String>,
    data_dir: Option<PathBuf>,
}

impl TestLockdBuilder {
    /// Default lease TTL (`--lease-ttl`).
    pub fn lease_ttl(self, ttl: &str) -> Self {
        self.arg("--lease-ttl").arg(ttl)
    }
    /// Log size that triggers compaction (`--compact-bytes`).
    pub fn compact_bytes(self, n: u64) -> Self {
        self.arg("--compact-bytes").arg(&n.to_string())
    }
    /// Use this data directory instead of a fresh temp one.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }
    /// Any extra argument for `vha lockd`.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn start(self) -> TestLockd {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = self.data_dir.clone().unwrap_or_else(|| tmp.path().join("data"));
        let mut l = TestLockd {
            port: free_port(),
            tmp,
            data_dir,
            args: self.args,
            proc: None,
            starts: 0,
        };
        l.spawn();
        l
    }
}

/// A running `vha lockd`.
pub struct TestLockd {
    pub port: u16,
    tmp: tempfile::TempDir,
    data_dir: PathBuf,
    args: Vec<String>,
    proc: Option<ChildProc>,
    starts: u32,
}

impl TestLockd {
    pub fn builder() -> TestLockdBuilder {
        TestLockdBuilder::default()
    }

    /// A lockd with default settings.
    pub fn start() -> TestLockd {
        Self::builder().start()
    }

    /// `http://127.0.0.1:PORT`
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The append-only log file in the data dir.
    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// A scratch directory that lives as long as this value.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// The current process's captured output.
    pub fn output(&self) -> String {
        self.proc.as_ref().map(|p| p.output()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(vha_binary());
        cmd.arg("lockd")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let log = self.tmp.path().join(format!("lockd-{}.log", self.starts));
        let mut p = ChildProc::spawn("lockd", cmd, &log);
        let port = self.port;
        wait_until(
            || {
                if !p.is_running() {
                    panic!("lockd exited during start:\n{}", p.output());
                }
                health(port).then_some(())
            },
            "lockd answers /v1/health",
            LOCKD_START_TIMEOUT,
        );
        self.proc = Some(p);
    }

    /// Whether lockd answers its health endpoint now.
    pub fn is_ready(&self) -> bool {
        health(self.port)
    }

    /// SIGKILL (no flush, no cleanup): what a crash looks like.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 10 s). True when it exited by
    /// itself with status 0.
    pub fn stop(&mut self) -> bool {
        match self.proc.take() {
            Some(mut p) => p.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()),
            None => false,
        }
    }

    /// Starts a stopped (or killed) lockd again on the same port and data dir.
    pub fn start_again(&mut self) {
        if self.proc.is_none() {
            self.spawn();
        }
    }

    /// Sends `sig` (e.g. SIGSTOP/SIGCONT) to the process.
    pub fn signal(&self, sig: Signal) {
        if let Some(p) = &self.proc {
            p.signal(sig);
        }
    }

    /// Starts lockd again on the same port and data dir (killing it first if running).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// A blocking `GET /v1/health` over HTTP/1.1 (lockd speaks both HTTP/1.1 and h2c).
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: lockd\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 32];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf[..got].starts_with(b"HTTP/1.1 200")
}

/// Runs `vha lockd ARGS...` to completion (snapshot save/restore), returning
/// `(success, stdout+stderr)`.
pub fn run_lockd_cmd(args: &[&str]) -> (bool, String) {
    let out = Command::new(vha_binary())
        .arg("lockd")
        .args(args)
        .output()
        .expect("running vha lockd");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Starts the hidden `vha lockd hold` helper: a separate process that holds `key` with
/// `value` and a lease of `ttl`, printing `acquired token=N unix_ms=T` and later
/// `lost deadline_unix_ms=D unix_ms=T`.
pub fn spawn_holder(address: &str, key: &str, value: &str, ttl: &str, log: &Path) -> ChildProc {
    let mut cmd = Command::new(vha_binary());
    cmd.args([
        "lockd",
        "hold",
        "--address",
        address,
        "--key",
        key,
        "--value",
        value,
        "--ttl",
        ttl,
    ]);
    ChildProc::spawn("holder", cmd, log)
}

/// Parses `name=NUMBER` from a line of holder output.
pub fn field(line: &str, name: &str) -> Option<u128> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Sends a signal to a child process.
pub fn signal(p: &ChildProc, sig: Signal) {
    p.signal(sig);
}

//! `TestLockd`: a real `vha lockd` process on a free 127.0.0.1 port (or a test host's
//! address, [`TestLockdBuilder::host`]) with a temp data dir.
//! Waits until it answers `GET /v1/health` (polling, never sleeping blind); `kill()` sends
//! SIGKILL, `stop()` SIGTERM, `restart()` brings it back on the same port and data dir.
//! Generic on purpose: lockd tests and the node harness both use it.
//!
//! Authentication is on by default, as it should be everywhere: lockd requires a bearer
//! token (a random one per instance, in a token file); `.mtls()` adds TLS with required
//! client certificates from a test CA; `.no_auth()` is for the tests of the unauthenticated
//! case itself. [`TestLockd::client`] and [`TestLockd::stanza_auth`] carry the credentials.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use vha_core::storage::lockd::{LockdBackend, LockdCredentials};

use crate::net::{command_on, NetHost};
use crate::pki::{CertFiles, TestCa};
use crate::process::{free_port, vha_binary, ChildProc};
use crate::wait::wait_until;

/// How long lockd may take to answer after start: recovery of a test-sized log is
/// milliseconds; the margin covers debug builds on 2 busy cores.
pub const LOCKD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Builder for [`TestLockd`].
#[derive(Clone, Debug)]
pub struct TestLockdBuilder {
    args: Vec<String>,
    data_dir: Option<PathBuf>,
    token: bool,
    mtls: bool,
    host: Option<NetHost>,
}

impl Default for TestLockdBuilder {
    fn default() -> Self {
        TestLockdBuilder {
            args: Vec::new(),
            data_dir: None,
            token: true,
            mtls: false,
            host: None,
        }
    }
}

/// The TLS material of a lockd started with `.mtls()`.
pub struct LockdTls {
    /// The CA that signs lockd's server certificate and the clients' certificates.
    pub ca: TestCa,
    pub server: CertFiles,
    /// A client certificate lockd accepts.
    pub client: CertFiles,
}

impl TestLockdBuilder {
    /// Runs lockd on test host `host`, listening on the host's address.
    pub fn host(mut self, host: NetHost) -> Self {
        self.host = Some(host);
        self
    }
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
    /// No bearer token (and no TLS unless `.mtls()`): lockd accepts anyone on loopback.
    pub fn no_auth(mut self) -> Self {
        self.token = false;
        self
    }
    /// TLS with required client certificates from a test CA (with the token unless
    /// `.no_auth()` comes after).
    pub fn mtls(mut self) -> Self {
        self.mtls = true;
        self
    }
    pub fn start(self) -> TestLockd {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = self.data_dir.clone().unwrap_or_else(|| tmp.path().join("data"));
        let mut args = self.args;
        let token = self.token.then(|| {
            let token = random_token();
            let file = tmp.path().join("lockd.token");
            std::fs::write(&file, format!("{token}\n")).expect("write token file");
            args.extend(["--token-file".to_string(), file.display().to_string()]);
            (token, file)
        });
        let tls = self.mtls.then(|| {
            let ca = TestCa::new(&tmp.path().join("pki"), "lockd");
            let server = ca.server("server", &["127.0.0.1", "localhost"]);
            let client = ca.client("client", "vha-node");
            args.extend([
                "--tls-cert-file".to_string(),
                server.cert.display().to_string(),
                "--tls-key-file".to_string(),
                server.key.display().to_string(),
                "--tls-client-ca-file".to_string(),
                ca.ca_file.display().to_string(),
            ]);
            LockdTls { ca, server, client }
        });
        let mut l = TestLockd {
            port: free_port(),
            tmp,
            data_dir,
            args,
            host: self.host,
            proc: None,
            starts: 0,
            token,
            tls,
        };
        l.spawn();
        l
    }
}

/// 32 random bytes, hex: a token no test could guess.
fn random_token() -> String {
    use std::fmt::Write as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A running `vha lockd`.
pub struct TestLockd {
    pub port: u16,
    tmp: tempfile::TempDir,
    data_dir: PathBuf,
    args: Vec<String>,
    host: Option<NetHost>,
    proc: Option<ChildProc>,
    starts: u32,
    /// The bearer token and its file, unless started `.no_auth()`.
    token: Option<(String, PathBuf)>,
    tls: Option<LockdTls>,
}

impl TestLockd {
    pub fn builder() -> TestLockdBuilder {
        TestLockdBuilder::default()
    }

    /// A lockd with default settings.
    pub fn start() -> TestLockd {
        Self::builder().start()
    }

    /// `http://127.0.0.1:PORT` (the host's address when on a test host; `https://` with
    /// `.mtls()`).
    pub fn address(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.listen())
    }

    /// The listen address: 127.0.0.1, or the test host's address.
    fn listen(&self) -> SocketAddr {
        let ip = self.host.as_ref().map_or(Ipv4Addr::LOCALHOST, |h| h.ip);
        SocketAddr::from((ip, self.port))
    }

    /// The bearer token lockd requires, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|(t, _)| t.as_str())
    }

    /// The file holding the token, if any.
    pub fn token_file(&self) -> Option<&Path> {
        self.token.as_ref().map(|(_, f)| f.as_path())
    }

    /// The TLS material (`.mtls()` only).
    pub fn tls(&self) -> Option<&LockdTls> {
        self.tls.as_ref()
    }

    /// Credentials that lockd accepts.
    pub fn credentials(&self) -> LockdCredentials {
        let mut c = match self.token() {
            Some(t) => LockdCredentials::token(t).expect("valid test token"),
            None => LockdCredentials::default(),
        };
        if let Some(tls) = &self.tls {
            c.tls_ca_file = Some(tls.ca.ca_file.clone());
            c.tls_cert_file = Some(tls.client.cert.clone());
            c.tls_key_file = Some(tls.client.key.clone());
        }
        c
    }

    /// A client with this lockd's credentials.
    pub fn client(&self) -> LockdBackend {
        LockdBackend::connect_with(&self.address(), &self.credentials()).expect("lockd client")
    }

    /// The credential lines of a `storage "lockd"` / `ha_storage "lockd"` stanza for this
    /// lockd (empty when it needs none), each ending in a newline.
    pub fn stanza_auth(&self) -> String {
        let mut s = String::new();
        if let Some(f) = self.token_file() {
            s.push_str(&format!("  token_file = \"{}\"\n", f.display()));
        }
        if let Some(tls) = &self.tls {
            s.push_str(&format!(
                "  tls_ca_file = \"{}\"\n  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n",
                tls.ca.ca_file.display(),
                tls.client.cert.display(),
                tls.client.key.display()
            ));
        }
        s
    }

    /// `vha lockd` client arguments with this lockd's credentials (`snapshot save`, `hold`).
    pub fn client_args(&self) -> Vec<String> {
        let mut a = vec!["--address".to_string(), self.address()];
        if let Some(f) = self.token_file() {
            a.extend(["--token-file".to_string(), f.display().to_string()]);
        }
        if let Some(tls) = &self.tls {
            a.extend([
                "--tls-ca-file".to_string(),
                tls.ca.ca_file.display().to_string(),
                "--tls-cert-file".to_string(),
                tls.client.cert.display().to_string(),
                "--tls-key-file".to_string(),
                tls.client.key.display().to_string(),
            ]);
        }
        a
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
        let mut cmd = command_on(self.host.as_ref(), vha_binary());
        cmd.arg("lockd")
            .arg("--listen")
            .arg(self.listen().to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let log = self.tmp.path().join(format!("lockd-{}.log", self.starts));
        let mut p = ChildProc::spawn("lockd", cmd, &log);
        let tls = self.tls.is_some();
        wait_until(
            || {
                if !p.is_running() {
                    panic!("lockd exited during start:\n{}", p.output());
                }
                // With TLS a plain probe cannot pass the handshake: lockd prints its
                // address once it listens.
                let ready = if tls {
                    p.output().contains("lockd listening on")
                } else {
                    self.is_ready()
                };
                ready.then_some(())
            },
            "lockd answers /v1/health",
            LOCKD_START_TIMEOUT,
        );
        self.proc = Some(p);
    }

    /// Whether lockd answers its health endpoint now (asked from its own host; plain HTTP
    /// lockd only).
    pub fn is_ready(&self) -> bool {
        let addr = self.listen();
        match &self.host {
            Some(h) => h.run(|| health(addr)),
            None => health(addr),
        }
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
fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
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

/// Starts the `vha-lock-holder` test helper (built beside `vha`): a separate process that
/// holds `key` with `value` and a lease of `ttl`, printing `acquired token=N unix_ms=T` and
/// later `lost deadline_unix_ms=D unix_ms=T`.
pub fn spawn_holder(l: &TestLockd, key: &str, value: &str, ttl: &str, log: &Path) -> ChildProc {
    let mut cmd = Command::new(vha_binary().with_file_name("vha-lock-holder"));
    cmd.args(l.client_args())
        .args(["--key", key, "--value", value, "--ttl", ttl]);
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

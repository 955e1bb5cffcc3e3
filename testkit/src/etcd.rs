//! `TestEtcd`: real etcd members (`/usr/bin/etcd`, Debian's `etcd-server` 3.4) on free
//! 127.0.0.1 ports (or each on its own test host, [`TestEtcd::cluster_on`]) with temp data dirs, single-member or an n-member raft cluster, plain or
//! TLS with client certificates. Health and leadership are read over plain HTTP on each
//! member's metrics port (`/health`, `/metrics`), polling, never sleeping blind. Each member
//! can be killed (SIGKILL), stopped (SIGTERM), paused (SIGSTOP) and restarted by PID on its
//! ports and data dir; [`TestEtcd::leader`] finds the raft leader.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::net::{command_on, NetHost};
use crate::process::{free_port, ChildProc};
use crate::wait::wait_until;

/// How long a cluster may take to elect its first leader and answer `/health`: etcd starts in
/// well under a second; the margin covers debug test binaries saturating 2 cores.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `PATH` (scripts/install-deps.sh installs it).
pub fn etcd_binary() -> PathBuf {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!("etcd not found on PATH (run scripts/install-deps.sh, or set ETCD_BIN)");
}

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics` (`--listen-metrics-urls`), also with TLS clients.
    pub metrics_port: u16,
    scheme: &'static str,
    data_dir: PathBuf,
    /// The test host it runs on (`None`: 127.0.0.1 of the test's own namespace).
    host: Option<NetHost>,
    proc: Option<ChildProc>,
    starts: u32,
}

impl EtcdMember {
    /// `http://127.0.0.1:CLIENT_PORT` (`https://` with TLS; the host's address on a test host).
    pub fn address(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.ip(), self.client_port)
    }

    /// 127.0.0.1, or the test host's address.
    fn ip(&self) -> Ipv4Addr {
        self.host.as_ref().map_or(Ipv4Addr::LOCALHOST, |h| h.ip)
    }

    /// A GET on the member's plain-HTTP metrics listener, from its own host.
    fn get(&self, path: &str) -> Option<String> {
        let addr = SocketAddr::from((self.ip(), self.metrics_port));
        match &self.host {
            Some(h) => h.run(|| http_get(addr, path)),
            None => http_get(addr, path),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The current process's captured output.
    pub fn output(&self) -> String {
        self.proc.as_ref().map(|p| p.output()).unwrap_or_default()
    }
}

/// A running etcd cluster (one or more members).
pub struct TestEtcd {
    pub members: Vec<EtcdMember>,
    tmp: tempfile::TempDir,
    initial_cluster: String,
    token: String,
    extra: Vec<String>,
}

/// Server-side TLS of a [`TestEtcd`]: PEM files for the client listener; clients must present
/// a certificate that chains to (or is) `client_ca`.
#[derive(Clone, Debug)]
pub struct EtcdTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TestEtcd {
    /// A single-member etcd.
    pub fn single() -> TestEtcd {
        Self::cluster(1)
    }

    /// An `n`-member cluster; returns once every member answers `/health` (a leader exists).
    pub fn cluster(n: usize) -> TestEtcd {
        Self::cluster_with(n, &[])
    }

    /// Like [`TestEtcd::cluster`] with extra etcd flags for every member. Ports are picked
    /// free a moment before etcd binds them; when another process wins that race the whole
    /// cluster is started again on new ports.
    pub fn cluster_with(n: usize, extra: &[&str]) -> TestEtcd {
        Self::start_cluster(n, extra, None)
    }

    /// A cluster with member `i` on test host `hosts[i]`, listening on the host's address.
    pub fn cluster_on(hosts: &[NetHost]) -> TestEtcd {
        Self::start_cluster(hosts.len(), &[], Some(hosts))
    }

    fn start_cluster(n: usize, extra: &[&str], hosts: Option<&[NetHost]>) -> TestEtcd {
        assert!(n >= 1, "an etcd cluster needs a member");
        for attempt in 1.. {
            let mut e = Self::prepare(n, extra, "http", hosts);
            for i in 0..n {
                e.spawn(i);
            }
            match (0..n).try_for_each(|i| e.wait_healthy(i)) {
                Ok(()) => return e,
                Err(out) if attempt < 3 && out.contains("address already in use") => continue,
                Err(out) => panic!("etcd cluster did not start:\n{out}"),
            }
        }
        unreachable!()
    }

    /// A single member serving clients over TLS with client-certificate authentication.
    pub fn single_tls(tls: &EtcdTlsFiles) -> TestEtcd {
        let extra = [
            "--cert-file".to_string(),
            tls.cert.display().to_string(),
            "--key-file".to_string(),
            tls.key.display().to_string(),
            "--trusted-ca-file".to_string(),
            tls.client_ca.display().to_string(),
            "--client-cert-auth".to_string(),
        ];
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut e = Self::prepare(1, &extra, "https", None);
        e.spawn(0);
        if let Err(out) = e.wait_healthy(0) {
            panic!("{out}");
        }
        e
    }

    fn prepare(n: usize, extra: &[&str], scheme: &'static str, hosts: Option<&[NetHost]>) -> TestEtcd {
        let tmp = tempfile::tempdir().expect("temp dir");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                scheme,
                data_dir: tmp.path().join(format!("m{i}.etcd")),
                host: hosts.map(|h| h[i].clone()),
                proc: None,
                starts: 0,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.ip(), m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        TestEtcd {
            members,
            tmp,
            initial_cluster,
            token: format!("vha-test-{}", std::process::id()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// All client URLs, comma-separated (the `address` option of the stanza).
    pub fn address(&self) -> String {
        self.members.iter().map(|m| m.address()).collect::<Vec<_>>().join(",")
    }

    /// Client URLs as a list.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.address()).collect()
    }

    /// A scratch directory that lives as long as this value.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.starts += 1;
        let client = m.address();
        let peer = format!("http://{}:{}", m.ip(), m.peer_port);
        let mut cmd = command_on(m.host.as_ref(), etcd_binary());
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--listen-metrics-urls")
            .arg(format!("http://{}:{}", m.ip(), m.metrics_port))
            .args(&self.extra);
        let log = self.tmp.path().join(format!("{}-{}.log", m.name, m.starts));
        m.proc = Some(ChildProc::spawn(&format!("etcd {}", m.name), cmd, &log));
    }

    /// Waits until member `i` answers `/health`; `Err(its output)` when it exits first.
    fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let m = &mut self.members[i];
        let deadline = std::time::Instant::now() + ETCD_START_TIMEOUT;
        loop {
            let p = m.proc.as_mut().expect("member started");
            if !p.is_running() {
                return Err(format!("etcd {} exited during start:\n{}", m.name, p.output()));
            }
            if healthy(m) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "etcd {} not healthy after {ETCD_START_TIMEOUT:?}:\n{}",
                    m.name,
                    m.output()
                ));
            }
            std::thread::sleep(crate::wait::POLL_INTERVAL);
        }
    }

    /// SIGKILL member `i` (a crash: no flush, no leadership transfer).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// SIGTERM member `i` and wait for it to exit (SIGKILL after 10 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }

    /// Sends `sig` (SIGSTOP/SIGCONT) to member `i`.
    pub fn signal(&self, i: usize, sig: Signal) {
        if let Some(p) = &self.members[i].proc {
            p.signal(sig);
        }
    }

    /// Starts member `i` again on its ports and data dir (killing it first if running). Does
    /// not wait for health: with quorum lost, one member alone never becomes healthy.
    pub fn start_member(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Restarts member `i` and waits until it is healthy (needs a quorum of members up).
    pub fn restart(&mut self, i: usize) {
        self.start_member(i);
        if let Err(out) = self.wait_healthy(i) {
            panic!("{out}");
        }
    }

    /// Waits until every running member answers `/health` (the cluster has a leader).
    pub fn wait_all_healthy(&mut self, timeout: Duration) {
        wait_until(
            || {
                self.members
                    .iter()
                    .filter(|m| m.is_running())
                    .all(healthy)
                    .then_some(())
            },
            "every running etcd member healthy",
            timeout,
        );
    }

    /// The index of the member that is raft leader now, if a running member says it is.
    pub fn leader(&self) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.is_running() && metric(m, "etcd_server_is_leader") == Some(1.0))
    }

    /// Waits until some running member is raft leader; returns its index.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        wait_until(|| self.leader(), "an etcd raft leader", timeout)
    }
}

/// A blocking GET to an etcd member; the body on 200. HTTP/1.0, so the answer is never
/// chunked (`/metrics` is large).
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: etcd\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// `/health` says `"health":"true"` (etcd 3.4: a leader exists and the member serves).
fn healthy(m: &EtcdMember) -> bool {
    m.get("/health").is_some_and(|b| b.contains("\"health\":\"true\""))
}

/// One unlabelled Prometheus metric of a member.
fn metric(m: &EtcdMember, name: &str) -> Option<f64> {
    let body = m.get("/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

//! `TestNet`: test hosts in network namespaces, for running pairs, stores, a load balancer and
//! a client on separate network hosts of one machine.
//!
//! Layout: one namespace per host, each with an `eth0` holding the address the test assigns
//! on a private /24 ([`SUBNET_PREFIX`]), and loopback up. The hosts' `eth0`s are veth pairs
//! whose other ends sit on a bridge inside a separate "switch" namespace. Nothing is attached
//! to the root namespace and no host has a route beyond its /24, so no packet leaves the
//! test's namespaces. Names carry the test process's PID and a counter
//! (`vhat<pid>x<n>-<host>`); each `TestNet` claims its own /24 (an exclusive `flock` on a
//! file per subnet under [`CLAIM_DIR`], held while the net lives and released by the kernel
//! when its process dies), so parallel tests and parallel test binaries never share
//! addresses.
//!
//! Processes run inside a host through `ip netns exec` ([`NetHost::command`]), which execs:
//! the child's PID is the process's own, stopped by PID through
//! [`crate::process::ChildProc`]. Test code runs inside a host on a thread that entered the
//! host's namespace ([`NetHost::run`], [`TestNet::block_on`]): sockets belong to the
//! namespace of the thread that creates them, and threads inherit it from their creator.
//!
//! Partitions: a host's link down ([`TestNet::link_down`]), or nftables rules in the hosts'
//! namespaces ([`TestNet::partition`]). Which host drops which sources is decided by the pure
//! [`drop_sources`] and rendered by [`nft_script`]; only applying them is I/O. Drops happen
//! on the receiving host's input hook, so a cut link loses packets silently, as a real
//! partition does (a drop on output would fail the sender's `send` at once instead).
//!
//! Everything is removed on drop, also while unwinding from a panic; leftovers of earlier
//! runs whose process is gone (a crashed or killed test binary) are removed when a `TestNet`
//! is created. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): [`require_root`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;

use crate::process::pid_alive;

/// Where `ip netns` keeps its named namespaces (`NETNS_RUN_DIR` of iproute2).
pub const NETNS_DIR: &str = "/var/run/netns";

/// One lock file per claimed /24 (its content: the claiming PID and the net's id, for
/// people). Under /run, a tmpfs, so a reboot clears it together with the namespaces.
pub const CLAIM_DIR: &str = "/run/vha-testnet";

/// Every test net uses `10.200.N.0/24` with N its claimed subnet: a private (RFC 1918) range
/// that no other part of the test suite uses.
pub const SUBNET_PREFIX: [u8; 2] = [10, 200];

/// How many /24s can be claimed at once (N in `10.200.N.0/24`).
const SUBNETS: u16 = 256;

/// Host `i` gets `.FIRST_HOST + i`; low addresses are left free as a real network would.
const FIRST_HOST: u8 = 10;

/// Prefix of every namespace a `TestNet` creates, followed by `<pid>x<counter>`.
const NAME_PREFIX: &str = "vhat";

/// The nftables table that holds a host's partition rules.
const NFT_TABLE: &str = "vha_partition";

/// Bound on one blocking HTTP exchange inside a host ([`NetHost::http_get`]): connect and
/// every read. Local to the machine, so seconds are far above any real answer time.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Fails the test with a clear message unless it runs as root: network namespaces, veth
/// links and nftables need CAP_SYS_ADMIN and CAP_NET_ADMIN. CI runs the suite as root; a
/// test that needs root never passes or skips silently without it.
pub fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what} needs root (network namespaces, veth, nftables); CI runs the tests as root: run this test as root (e.g. `sudo -E cargo test ...`)"
    );
}

/// A system tool (`ip`, `nft`, `haproxy`): found on `PATH` or in the sbin directories
/// (which a non-login shell may leave off `PATH`).
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"]);
    for dir in dirs {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found on PATH or in /usr/sbin (run scripts/install-deps.sh)");
}

/// Runs `cmd` to completion; `Err` with its stderr when it fails.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS...`, panicking with ip's message on failure (set-up steps that must work).
fn ip(args: &[&str]) {
    if let Err(e) = run(Command::new(tool("ip")).args(args)) {
        panic!("{e}");
    }
}

/// Moves the calling thread into the named network namespace (only this thread; threads it
/// creates afterwards start there too).
fn enter_netns(netns: &str) {
    let path = Path::new(NETNS_DIR).join(netns);
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns into {netns}: {e}"));
}

/// One test host: a network namespace and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetHost {
    /// The name the test gave it (`client`, `p0`, `lockd`, ...).
    pub name: String,
    /// The namespace (`vhat<pid>x<n>-<name>`).
    pub netns: String,
    /// Its address on the net's /24.
    pub ip: Ipv4Addr,
}

impl NetHost {
    /// `program` to be run inside this host (`ip netns exec NETNS program`). Arguments,
    /// environment and I/O are set on the returned command as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(tool("ip"));
        c.arg("netns").arg("exec").arg(&self.netns).arg(program);
        c
    }

    /// `ip:port` on this host.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// Runs `f` on a fresh thread inside this host's namespace and returns what it returns
    /// (a panic in `f` is resumed here). Blocks the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let netns = self.netns.as_str();
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                enter_netns(netns);
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// [`NetHost::run`] for async callers: the thread's result is awaited, not blocked on.
    pub async fn run_async<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let netns = self.netns.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                enter_netns(&netns);
                f()
            }));
            let _ = tx.send(r);
        });
        match rx.await.expect("namespace thread ends by sending its result") {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Whether a TCP connection to `addr` opens from inside this host within `timeout`.
    pub fn tcp_connects(&self, addr: SocketAddr, timeout: Duration) -> bool {
        self.run(|| TcpStream::connect_timeout(&addr, timeout).is_ok())
    }

    /// A blocking HTTP/1.0 GET from inside this host (for listeners only reachable there,
    /// such as a node's loopback `node_address`): `(status, body)`, `None` when it cannot
    /// connect or the answer is not HTTP.
    pub fn http_get(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
        self.run(|| http_get(addr, path, headers))
    }

    /// [`NetHost::http_get`] for async callers.
    pub async fn http_get_async(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<(u16, String)> {
        let path = path.to_string();
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.run_async(move || {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            http_get(addr, &path, &h)
        })
        .await
    }
}

/// `program` as a command inside `host`, or in the test's own namespace when `None`: how the
/// harness's process starters place a process.
pub fn command_on(host: Option<&NetHost>, program: impl AsRef<OsStr>) -> Command {
    match host {
        Some(h) => h.command(program),
        None => Command::new(program),
    }
}

/// A blocking HTTP/1.0 GET in the caller's namespace (HTTP/1.0: the body ends at close and
/// is never chunked).
fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).ok()?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(HTTP_TIMEOUT)).ok()?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.")?
        .get(2..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// One partition rule: which hosts stop hearing which. Composed in a list; the empty list
/// is a healed network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Neither host hears the other.
    Between(String, String),
    /// Packets from `from` no longer reach `to`; the other direction still works.
    OneWay { from: String, to: String },
    /// `host` hears none of `others` and none of them hears `host`; the others still hear
    /// each other.
    Isolate { host: String, others: Vec<String> },
}

impl Cut {
    /// A symmetric cut between two hosts.
    pub fn between(a: &str, b: &str) -> Cut {
        Cut::Between(a.into(), b.into())
    }

    /// Packets from `from` are lost on the way to `to`; `to` still reaches `from`.
    pub fn one_way(from: &str, to: &str) -> Cut {
        Cut::OneWay {
            from: from.into(),
            to: to.into(),
        }
    }

    /// `host` cut both ways from each of `others`.
    pub fn isolate(host: &str, others: &[&str]) -> Cut {
        Cut::Isolate {
            host: host.into(),
            others: others.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The active pair's host cut from the store's hosts (it cannot renew its lock; the
    /// standbys still reach the store and the active).
    pub fn active_from_store(active: &str, stores: &[&str]) -> Cut {
        Cut::isolate(active, stores)
    }

    /// The active pair's host cut from the standby pairs' hosts (heartbeats and forwards
    /// fail; everyone still reaches the store).
    pub fn active_from_standbys(active: &str, standbys: &[&str]) -> Cut {
        Cut::isolate(active, standbys)
    }

    /// The store's host cut from every other host.
    pub fn store_from_everyone(store: &str, everyone: &[&str]) -> Cut {
        Cut::isolate(store, everyone)
    }

    /// The directed links `(from, to)` this cut blocks.
    fn links(&self) -> Vec<(&str, &str)> {
        match self {
            Cut::Between(a, b) => vec![(a, b), (b, a)],
            Cut::OneWay { from, to } => vec![(from, to)],
            Cut::Isolate { host, others } => others
                .iter()
                .flat_map(|o| [(host.as_str(), o.as_str()), (o.as_str(), host.as_str())])
                .collect(),
        }
    }
}

/// For every host, the source addresses whose packets it must drop so that exactly the
/// directed links of `cuts` are lost (a host with an empty set drops nothing). Errors on an
/// unknown host name or a host cut from itself.
pub fn drop_sources(hosts: &[NetHost], cuts: &[Cut]) -> Result<BTreeMap<String, BTreeSet<Ipv4Addr>>, String> {
    let mut out: BTreeMap<String, BTreeSet<Ipv4Addr>> =
        hosts.iter().map(|h| (h.name.clone(), BTreeSet::new())).collect();
    let find = |name: &str| {
        hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| format!("no host named {name:?} in this net"))
    };
    for cut in cuts {
        for (from, to) in cut.links() {
            if from == to {
                return Err(format!("{cut:?}: a host cannot be cut from itself"));
            }
            let src = find(from)?.ip;
            find(to)?;
            out.entry(to.to_string()).or_default().insert(src);
        }
    }
    Ok(out)
}

/// The nftables script that makes a host drop exactly the packets from `sources`: it
/// replaces the whole [`NFT_TABLE`] table in one transaction (create if absent, delete,
/// create with the new rules), so applying it again or with fewer sources never leaves old
/// rules behind; an empty set leaves no table at all.
pub fn nft_script(sources: &BTreeSet<Ipv4Addr>) -> String {
    let mut s = format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n");
    if !sources.is_empty() {
        let list = sources.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(", ");
        s.push_str(&format!(
            "table inet {NFT_TABLE} {{\n  chain input {{\n    type filter hook input priority filter; policy accept;\n    ip saddr {{ {list} }} drop\n  }}\n}}\n"
        ));
    }
    s
}

/// Counter in the names of the nets one test process creates.
static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// A set of test hosts joined by a switch. See the module header.
pub struct TestNet {
    /// `vhat<pid>x<n>`: the prefix of every namespace of this net.
    id: String,
    /// The third octet of this net's /24.
    subnet: u8,
    hosts: Vec<NetHost>,
    /// Namespaces created so far (hosts and switch), for removal.
    namespaces: Vec<String>,
    /// The switch namespace holding the bridge.
    switch: String,
    /// The subnet claim: its file, locked while this net lives.
    claim: (PathBuf, Flock<std::fs::File>),
}

impl TestNet {
    /// Creates the hosts `names` (short lowercase names, unique), their links and the
    /// switch; host `i` gets `10.200.N.(10 + i)`. Removes leftovers of dead test processes
    /// first. Panics (with the reason) when not root or a step fails; whatever was created
    /// by then is removed.
    pub fn new(names: &[&str]) -> TestNet {
        require_root("TestNet");
        tool("ip");
        tool("nft");
        assert!(
            !names.is_empty() && names.len() <= usize::from(u8::MAX - FIRST_HOST),
            "a TestNet has 1 to {} hosts",
            u8::MAX - FIRST_HOST
        );
        for (i, n) in names.iter().enumerate() {
            assert!(
                !n.is_empty() && n.len() <= 16 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "host name {n:?}: 1-16 characters of a-z and 0-9"
            );
            assert!(!names[..i].contains(n), "host name {n:?} given twice");
        }
        remove_leftovers();
        let id = format!(
            "{NAME_PREFIX}{}x{}",
            std::process::id(),
            NEXT_NET.fetch_add(1, Ordering::SeqCst)
        );
        let (subnet, claim) = claim_subnet(&id);
        let mut net = TestNet {
            switch: format!("{id}-sw"),
            id,
            subnet,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            claim,
        };
        // From here on, Drop removes whatever exists if a step panics.
        net.add_namespace(&net.switch.clone());
        ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.switch, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let host = NetHost {
                name: name.to_string(),
                netns: format!("{}-{name}", net.id),
                ip: Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], net.subnet, FIRST_HOST + i as u8),
            };
            net.add_namespace(&host.netns);
            let port = format!("port{i}");
            // The veth pair is created inside the switch namespace with its peer moved
            // straight into the host's: neither end ever exists in the root namespace.
            ip(&[
                "-n",
                &net.switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ]);
            ip(&["-n", &net.switch, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host.netns, "link", "set", "eth0", "up"]);
            net.hosts.push(host);
        }
        net
    }

    /// Creates a namespace with loopback up and records it for removal.
    fn add_namespace(&mut self, netns: &str) {
        ip(&["netns", "add", netns]);
        self.namespaces.push(netns.to_string());
        ip(&["-n", netns, "link", "set", "lo", "up"]);
    }

    /// `vhat<pid>x<n>`, the prefix of this net's namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The net's /24 (`10.200.N.0/24`).
    pub fn subnet(&self) -> String {
        format!("{}.{}.{}.0/24", SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.subnet)
    }

    pub fn hosts(&self) -> &[NetHost] {
        &self.hosts
    }

    /// The host named `name` (panics if there is none).
    pub fn host(&self, name: &str) -> &NetHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host named {name:?} in this net"))
    }

    /// The namespace of the switch (the bridge and the hosts' ports).
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    /// Every namespace of this net (hosts and switch).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The switch port of host `name`.
    fn port(&self, name: &str) -> String {
        let i = self
            .hosts
            .iter()
            .position(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host named {name:?} in this net"));
        format!("port{i}")
    }

    /// Takes host `name`'s switch port down: the host loses its link (cable pulled); its
    /// own configuration is untouched.
    pub fn link_down(&self, name: &str) {
        ip(&["-n", &self.switch, "link", "set", &self.port(name), "down"]);
    }

    /// Brings host `name`'s switch port back up.
    pub fn link_up(&self, name: &str) {
        ip(&["-n", &self.switch, "link", "set", &self.port(name), "up"]);
    }

    /// Makes `cuts` the partition in force (replacing any earlier one) by installing the
    /// rules [`drop_sources`] decides in every host. `partition(&[])` removes all rules.
    pub fn partition(&self, cuts: &[Cut]) {
        let plan = drop_sources(&self.hosts, cuts).unwrap_or_else(|e| panic!("partition: {e}"));
        let nft = tool("nft");
        for h in &self.hosts {
            let script = nft_script(&plan[&h.name]);
            let mut child = h
                .command(&nft)
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("nft in {}: {e}", h.name));
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(script.as_bytes())
                .expect("write nft script");
            let out = child.wait_with_output().expect("nft exit");
            assert!(
                out.status.success(),
                "nft in {}: {}\nscript:\n{script}",
                h.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Removes every partition rule and brings every link up.
    pub fn heal(&self) {
        self.partition(&[]);
        for h in &self.hosts {
            self.link_up(&h.name);
        }
    }

    /// The nftables rules host `name` has now (`nft list ruleset` inside it).
    pub fn ruleset(&self, name: &str) -> String {
        run(self.host(name).command(tool("nft")).args(["list", "ruleset"])).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the future `f()` makes on a tokio runtime (2 worker threads) inside host `name`:
    /// every connection it opens comes from that host. The test's usual body: the cluster is
    /// built and used in there, and dropped (its processes killed) before this returns. A
    /// panic inside is resumed here, after the runtime is gone.
    pub fn block_on<F, Fut, T>(&self, name: &str, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        self.host(name).run(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Hosts first, the switch last (removing a namespace removes its veth ends, and with
        // them their peers).
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
        // Unlinked while still locked (the lock is released when the field drops): a
        // claimant that opened the old file meanwhile sees it is no longer at the path.
        let _ = std::fs::remove_file(&self.claim.0);
    }
}

/// Kills any process still inside `netns` (the test's own, left by a crashed run) and
/// removes the namespace. Never panics: it runs in `Drop`.
fn remove_namespace(netns: &str) {
    if let Ok(pids) = run(Command::new(tool("ip")).args(["netns", "pids", netns])) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    if let Err(e) = run(Command::new(tool("ip")).args(["netns", "del", netns])) {
        eprintln!("TestNet: removing namespace {netns}: {e}");
    }
}

/// The PID in a name `vhat<pid>x<n>...`.
fn owner_pid(name: &str) -> Option<u64> {
    name.strip_prefix(NAME_PREFIX)?.split('x').next()?.parse().ok()
}

/// Removes namespaces of test processes that are gone, and claim files nobody holds.
fn remove_leftovers() {
    if let Ok(dir) = std::fs::read_dir(NETNS_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|p| !pid_alive(p)) {
                remove_namespace(&name);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(CLAIM_DIR) {
        for e in dir.flatten() {
            if let Some(lock) = try_claim(&e.path()) {
                let _ = std::fs::remove_file(e.path());
                drop(lock);
            }
        }
    }
}

/// Takes the claim at `path` if nobody holds it: an exclusive non-blocking `flock` on the
/// file, kept only if the locked file is still the one at `path` (its previous holder may
/// have unlinked it between our open and our lock).
fn try_claim(path: &Path) -> Option<Flock<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()?;
    let held = lock.metadata().ok()?.ino();
    (std::fs::metadata(path).ok()?.ino() == held).then_some(lock)
}

/// Claims a free /24 for net `id` ([`try_claim`] on `CLAIM_DIR/N`). Starts at a point spread
/// by PID and counter so that parallel claimants rarely try the same file first.
fn claim_subnet(id: &str) -> (u8, (PathBuf, Flock<std::fs::File>)) {
    std::fs::create_dir_all(CLAIM_DIR).unwrap_or_else(|e| panic!("create {CLAIM_DIR}: {e}"));
    let start = (std::process::id() as u16)
        .wrapping_mul(31)
        .wrapping_add(NEXT_NET.load(Ordering::SeqCst) as u16);
    for k in 0..SUBNETS {
        let n = (start.wrapping_add(k) % SUBNETS) as u8;
        let path = Path::new(CLAIM_DIR).join(n.to_string());
        if let Some(mut lock) = try_claim(&path) {
            lock.set_len(0).expect("truncate subnet claim");
            lock.write_all(format!("{} {id}\n", std::process::id()).as_bytes())
                .expect("write subnet claim");
            return (n, (path, lock));
        }
    }
    panic!("no free test subnet: all {SUBNETS} claims under {CLAIM_DIR} are held by live processes");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<NetHost> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| NetHost {
                name: n.to_string(),
                netns: format!("ns-{n}"),
                ip: Ipv4Addr::new(10, 200, 0, 10 + i as u8),
            })
            .collect()
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, last)
    }

    fn set(ips: &[u8]) -> BTreeSet<Ipv4Addr> {
        ips.iter().map(|i| ip(*i)).collect()
    }

    /// No cut: every host drops nothing (the healed network), and every host is listed so
    /// that applying the plan clears old rules everywhere.
    #[test]
    fn no_cut_drops_nothing_on_every_host() {
        let h = hosts(&["a", "b", "c"]);
        let plan = drop_sources(&h, &[]).unwrap();
        assert_eq!(plan.len(), 3);
        assert!(plan.values().all(BTreeSet::is_empty));
    }

    /// A symmetric cut makes each of the two drop the other; nobody else drops anything.
    #[test]
    fn between_drops_on_both_sides() {
        let h = hosts(&["a", "b", "c"]);
        let plan = drop_sources(&h, &[Cut::between("a", "b")]).unwrap();
        assert_eq!(plan["a"], set(&[11]));
        assert_eq!(plan["b"], set(&[10]));
        assert!(plan["c"].is_empty());
    }

    /// A one-way cut drops only on the receiving side: `to` drops `from`, `from` still hears
    /// `to`.
    #[test]
    fn one_way_drops_only_at_the_receiver() {
        let h = hosts(&["a", "b", "c"]);
        let plan = drop_sources(&h, &[Cut::one_way("a", "b")]).unwrap();
        assert!(plan["a"].is_empty());
        assert_eq!(plan["b"], set(&[10]));
        assert!(plan["c"].is_empty());
    }

    /// The named scenarios: the active cut from the store (and only the store), the active
    /// cut from the standbys (the store still reaches everyone), the store cut from
    /// everyone (the others still reach each other).
    #[test]
    fn named_scenarios_cut_exactly_their_links() {
        let h = hosts(&["client", "lockd", "p0", "p1", "p2"]);
        let plan = drop_sources(&h, &[Cut::active_from_store("p0", &["lockd"])]).unwrap();
        assert_eq!(plan["p0"], set(&[11]));
        assert_eq!(plan["lockd"], set(&[12]));
        assert!(plan["p1"].is_empty() && plan["p2"].is_empty() && plan["client"].is_empty());

        let plan = drop_sources(&h, &[Cut::active_from_standbys("p1", &["p0", "p2"])]).unwrap();
        assert_eq!(plan["p1"], set(&[12, 14]));
        assert_eq!(plan["p0"], set(&[13]));
        assert_eq!(plan["p2"], set(&[13]));
        assert!(plan["lockd"].is_empty() && plan["client"].is_empty());

        let plan = drop_sources(&h, &[Cut::store_from_everyone("lockd", &["client", "p0", "p1", "p2"])]).unwrap();
        assert_eq!(plan["lockd"], set(&[10, 12, 13, 14]));
        for other in ["client", "p0", "p1", "p2"] {
            assert_eq!(plan[other], set(&[11]), "{other}");
        }
    }

    /// Cuts compose: overlapping links are dropped once, distinct ones all apply.
    #[test]
    fn cuts_compose_without_duplicates() {
        let h = hosts(&["a", "b", "c"]);
        let plan = drop_sources(
            &h,
            &[Cut::between("a", "b"), Cut::one_way("a", "b"), Cut::one_way("c", "b")],
        )
        .unwrap();
        assert_eq!(plan["a"], set(&[11]));
        assert_eq!(plan["b"], set(&[10, 12]));
        assert!(plan["c"].is_empty());
    }

    /// Unknown host names and self-cuts are errors that name the problem, never a silent
    /// no-op.
    #[test]
    fn bad_cuts_are_errors() {
        let h = hosts(&["a", "b"]);
        let e = drop_sources(&h, &[Cut::between("a", "x")]).unwrap_err();
        assert!(e.contains("\"x\""), "{e}");
        let e = drop_sources(&h, &[Cut::one_way("x", "a")]).unwrap_err();
        assert!(e.contains("\"x\""), "{e}");
        let e = drop_sources(&h, &[Cut::isolate("a", &["a"])]).unwrap_err();
        assert!(e.contains("itself"), "{e}");
    }

    /// The script replaces the table atomically: it always deletes the old table first; with
    /// sources it drops exactly them on input; without, it leaves no table.
    #[test]
    fn nft_script_replaces_the_table() {
        let empty = nft_script(&BTreeSet::new());
        assert_eq!(empty, "table inet vha_partition {}\ndelete table inet vha_partition\n");
        let s = nft_script(&set(&[12, 10]));
        assert!(s.starts_with(&empty), "{s}");
        assert!(s.contains("hook input"), "{s}");
        assert!(s.contains("ip saddr { 10.200.0.10, 10.200.0.12 } drop"), "{s}");
        assert!(!s.contains("hook output"), "drops happen at the receiver: {s}");
    }

    /// The PID is read back from names this module makes, and nothing else is mistaken for
    /// a leftover.
    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("vhat1234x0-p0"), Some(1234));
        assert_eq!(owner_pid("vhat1234x17-sw"), Some(1234));
        assert_eq!(owner_pid("vhatx0-p0"), None);
        assert_eq!(owner_pid("other-ns"), None);
    }
}

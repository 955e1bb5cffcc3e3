//! `TestNode`: one real `vha server` process on a free 127.0.0.1 port (or on a test host's
//! address, [`TestNodeBuilder::host`]) with its own temp directory and config file, plus the
//! Vault API calls tests need (init, unseal, raw requests). `TestCluster` groups several
//! nodes on shared storage (grows with HA); [`TestClusterBuilder::on_hosts`] deploys it on
//! test hosts, one pair per host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::net::{command_on, NetHost};
use crate::process::{free_port, vha_binary, ChildProc};
use crate::prometheus::series_value;
use crate::wait::wait_until_async;

/// The RFC 3339 timestamp that starts a log line of a node.
pub fn log_time(line: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

/// How long a node may take to start answering. Debug builds on 2 busy cores start in well
/// under a second; the margin covers a loaded CI machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Which data store a test node uses.
#[derive(Clone, Debug)]
pub enum Storage {
    /// `storage "file"` in the node's temp dir.
    File,
    /// `storage "inmem"` (HA inside one process).
    Inmem,
    /// Any stanza text, for backends added later (`storage "lockd" { address = ... }`).
    Raw(String),
}

/// Builder for [`TestNode`].
#[derive(Clone, Debug)]
pub struct TestNodeBuilder {
    storage: Storage,
    ha_storage: Option<String>,
    listener_extra: String,
    top_extra: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    ports: Option<(u16, u16)>,
    advertise_cluster: Option<String>,
    behind_proxy: bool,
    /// The client-facing listener serves TLS (a fresh self-signed certificate).
    listener_tls: bool,
    /// Extra lines inside the `proxy {}` block (with `behind_proxy`).
    proxy_extra: String,
    /// The pair socket's path (with `behind_proxy`; default `node.sock` in the temp dir).
    node_socket: Option<PathBuf>,
    /// The umask the node process starts with (default: the test's).
    umask: Option<u32>,
    /// The test host the node (and its proxy) runs on; `None`: 127.0.0.1 of the test's own
    /// namespace.
    host: Option<NetHost>,
    /// The advertised `api_addr` (default: the pair's own listener).
    api_addr: Option<String>,
}

impl Default for TestNodeBuilder {
    fn default() -> Self {
        TestNodeBuilder {
            storage: Storage::File,
            ha_storage: None,
            listener_extra: String::new(),
            top_extra: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            ports: None,
            advertise_cluster: None,
            behind_proxy: false,
            listener_tls: false,
            proxy_extra: String::new(),
            node_socket: None,
            umask: None,
            host: None,
            api_addr: None,
        }
    }
}

impl TestNodeBuilder {
    pub fn storage(mut self, s: Storage) -> Self {
        self.storage = s;
        self
    }
    /// A raw `ha_storage "<type>" {...}` stanza.
    pub fn ha_storage(mut self, stanza: impl Into<String>) -> Self {
        self.ha_storage = Some(stanza.into());
        self
    }
    /// Extra lines inside the `listener "tcp"` block (e.g. `max_request_size = 1024`).
    pub fn listener_extra(mut self, hcl: impl Into<String>) -> Self {
        self.listener_extra.push_str(&hcl.into());
        self.listener_extra.push('\n');
        self
    }
    /// Extra top-level config lines.
    pub fn config_extra(mut self, hcl: impl Into<String>) -> Self {
        self.top_extra.push_str(&hcl.into());
        self.top_extra.push('\n');
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Extra command-line arguments for `vha server`.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// Fixed API and cluster listener ports (default: [`crate::free_port`]).
    pub fn ports(mut self, api: u16, cluster: u16) -> Self {
        self.ports = Some((api, cluster));
        self
    }
    /// The advertised `cluster_addr` (e.g. a relay in front of the cluster listener).
    pub fn advertise_cluster(mut self, addr: impl Into<String>) -> Self {
        self.advertise_cluster = Some(addr.into());
        self
    }

    /// The client-facing listener (the proxy's, with `behind_proxy`) serves TLS with a fresh
    /// self-signed certificate for 127.0.0.1 (`TestNode::ca_pem`); `addr` is `https://...`
    /// and the node's own client trusts that certificate.
    pub fn listener_tls(mut self) -> Self {
        self.listener_tls = true;
        self
    }

    /// Runs the node (and, with `behind_proxy`, its proxy) on test host `host`: the listener,
    /// the cluster listener, `api_addr`, `cluster_addr` and the proxy's metrics address use
    /// the host's address (the proxy's `node_address` stays on the host's loopback).
    pub fn host(mut self, host: NetHost) -> Self {
        self.host = Some(host);
        self
    }

    /// The advertised `api_addr` (for example a load balancer's address shared by every
    /// node); default: the pair's own listener.
    pub fn api_addr(mut self, url: impl Into<String>) -> Self {
        self.api_addr = Some(url.into());
        self
    }

    /// Run as the node of a proxy + node pair: the config gets a `proxy {}` block (socket in
    /// the node's temp dir, `node_address` on a free loopback port); the api address then
    /// belongs to the proxy, which the caller starts (`vha proxy --config <config_path>`).
    pub fn behind_proxy(mut self) -> Self {
        self.behind_proxy = true;
        self
    }

    /// Extra lines inside the `proxy {}` block (with [`TestNodeBuilder::behind_proxy`]),
    /// e.g. `allowed_uid = 65534` or `hold_timeout = "3s"`.
    pub fn proxy_extra(mut self, hcl: impl Into<String>) -> Self {
        self.proxy_extra.push_str(&hcl.into());
        self.proxy_extra.push('\n');
        self
    }

    /// The pair socket at `path` instead of `node.sock` in the node's temp dir (with
    /// [`TestNodeBuilder::behind_proxy`]).
    pub fn node_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.node_socket = Some(path.into());
        self
    }

    /// Starts the node process with this umask (through `sh -c 'umask ...; exec ...'`, so
    /// the process is still the node's own PID).
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Writes the config, starts the process and waits until it answers HTTP.
    pub async fn start(self) -> TestNode {
        let dir = tempfile::Builder::new().prefix("vha-node-").tempdir().expect("tempdir");
        let (port, cluster_port) = self.ports.unwrap_or_else(|| (free_port(), free_port()));
        let ip = self.host.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |h| h.ip);
        let advertised = self
            .advertise_cluster
            .clone()
            .unwrap_or_else(|| format!("https://{ip}:{cluster_port}"));
        let storage = match &self.storage {
            Storage::File => format!(
                "storage \"file\" {{\n  path = \"{}\"\n}}",
                dir.path().join("data").display()
            ),
            Storage::Inmem => "storage \"inmem\" {}".to_string(),
            Storage::Raw(s) => s.clone(),
        };
        let ha = self.ha_storage.clone().unwrap_or_default();
        let node_port = free_port();
        let socket = self.node_socket.clone().unwrap_or_else(|| dir.path().join("node.sock"));
        let proxy_block = if self.behind_proxy {
            format!(
                "proxy {{\n  node_socket = \"{}\"\n  node_address = \"127.0.0.1:{node_port}\"\n  metrics_address = \"{ip}:{}\"\n{}}}\n",
                socket.display(),
                free_port(),
                self.proxy_extra
            )
        } else {
            String::new()
        };
        let ca_pem = self.listener_tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec![ip.to_string(), "localhost".to_string()])
                .expect("self-signed certificate");
            let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
            std::fs::write(dir.path().join("listener.crt"), &cert).expect("write cert");
            std::fs::write(dir.path().join("listener.key"), key).expect("write key");
            cert
        });
        let (tls_lines, scheme) = if ca_pem.is_some() {
            (
                format!(
                    "  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n",
                    dir.path().join("listener.crt").display(),
                    dir.path().join("listener.key").display()
                ),
                "https",
            )
        } else {
            ("  tls_disable = true\n".to_string(), "http")
        };
        let addr = format!("{scheme}://{ip}:{port}");
        let api_addr = self.api_addr.clone().unwrap_or_else(|| addr.clone());
        let config = format!(
            "{storage}\n{ha}\nlistener \"tcp\" {{\n  address = \"{ip}:{port}\"\n  cluster_address = \"{ip}:{cluster_port}\"\n{tls_lines}{}}}\napi_addr = \"{api_addr}\"\ncluster_addr = \"{advertised}\"\nlog_level = \"debug\"\n{}{proxy_block}",
            self.listener_extra, self.top_extra
        );
        let mut http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30));
        if let Some(pem) = &ca_pem {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("listener cert"));
        }
        let config_path = dir.path().join("node.hcl");
        std::fs::write(&config_path, &config).expect("write config");
        let mut node = TestNode {
            node_addr: if self.behind_proxy {
                format!("http://127.0.0.1:{node_port}")
            } else {
                format!("http://{ip}:{port}")
            },
            socket: self.behind_proxy.then_some(socket),
            addr,
            api_addr,
            ca_pem,
            port,
            cluster_port,
            config_path,
            builder: self,
            proc: None,
            http: http.build().expect("http client"),
            dir,
            restarts: 0,
        };
        node.spawn().await;
        node
    }
}

/// A running `vha server`.
pub struct TestNode {
    /// The pair's api address (the node itself, or its proxy when `behind_proxy`).
    pub addr: String,
    /// The node's advertised `api_addr`: `addr`, or what the builder set (a load balancer).
    pub api_addr: String,
    /// Where the node process itself answers HTTP (`node_address` behind a proxy).
    pub node_addr: String,
    /// The listener's self-signed certificate (PEM) with `listener_tls`.
    pub ca_pem: Option<String>,
    /// The proxy <-> node unix socket, when behind a proxy.
    pub socket: Option<PathBuf>,
    pub port: u16,
    pub cluster_port: u16,
    pub config_path: PathBuf,
    builder: TestNodeBuilder,
    proc: Option<ChildProc>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    restarts: u32,
}

/// What `sys/init` returned.
#[derive(Clone, Debug)]
pub struct InitKeys {
    pub keys: Vec<String>,
    pub keys_base64: Vec<String>,
    pub root_token: String,
}

impl TestNode {
    pub fn builder() -> TestNodeBuilder {
        TestNodeBuilder::default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// The process's captured stdout+stderr so far (all runs).
    pub fn output(&self) -> String {
        self.proc.as_ref().map(|p| p.output()).unwrap_or_default()
    }

    /// Waits until a line of the node's output contains `needle`; returns the first such
    /// line (see [`log_time`] for its timestamp).
    pub async fn wait_log_line(&self, needle: &str, timeout: Duration) -> String {
        wait_until_async(
            || async { self.output().lines().find(|l| l.contains(needle)).map(str::to_string) },
            &format!("{} logs {needle:?}", self.addr),
            timeout,
        )
        .await
    }

    /// The test host the node runs on (`None`: the test's own namespace).
    pub fn host(&self) -> Option<&NetHost> {
        self.builder.host.as_ref()
    }

    fn command(&self) -> Command {
        let mut cmd = match self.builder.umask {
            Some(mask) => {
                let mut c = command_on(self.host(), "sh");
                c.arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(vha_binary());
                c
            }
            None => command_on(self.host(), vha_binary()),
        };
        cmd.arg("server")
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.builder.args);
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.builder.env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn spawn(&mut self) {
        let log = self.dir.path().join(format!("node-{}.log", self.restarts));
        self.proc = Some(ChildProc::spawn("vha server", self.command(), &log));
        self.wait_ready().await;
    }

    /// Polls `sys/seal-status` until the node answers (or panics with its log).
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if self.get_node_local("sys/seal-status", None).await.is_some() {
                return;
            }
            let running = self.proc.as_mut().map(|p| p.is_running()).unwrap_or(false);
            if !running || tokio::time::Instant::now() >= deadline {
                panic!(
                    "vha server did not become ready (running: {running}); output:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| p.is_running_shared())
    }

    /// GET `path` (after `/v1/`) from the node process itself (`node_addr`), asked from the
    /// node's own host: a loopback `node_address` is reachable only there. `(status, body)`,
    /// `None` when it does not answer.
    pub async fn get_node_local(&self, path: &str, token: Option<&str>) -> Option<(u16, String)> {
        let headers: Vec<(&str, &str)> = token.map(|t| ("X-Vault-Token", t)).into_iter().collect();
        match self.host() {
            Some(h) => {
                let addr: std::net::SocketAddr = self.node_addr.strip_prefix("http://")?.parse().ok()?;
                h.http_get_async(addr, &format!("/v1/{path}"), &headers).await
            }
            None => {
                let mut rb = self
                    .http
                    .get(format!("{}/v1/{path}", self.node_addr))
                    .timeout(Duration::from_secs(5));
                for (k, v) in headers {
                    rb = rb.header(k, v);
                }
                let r = rb.send().await.ok()?;
                let status = r.status().as_u16();
                Some((status, r.text().await.unwrap_or_default()))
            }
        }
    }

    /// Like [`TestNode::request`], but `None` when the node cannot be reached.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Option<(StatusCode, Value)> {
        let m = Method::from_bytes(method.as_bytes()).ok()?;
        let url = format!("{}/v1/{}", self.addr, path.trim_start_matches('/'));
        let mut rb = self.http.request(m, url).timeout(Duration::from_secs(5));
        if let Some(t) = token {
            rb = rb.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.ok()?;
        let status = resp.status();
        let bytes = resp.bytes().await.ok()?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Some((status, v))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM and wait for a clean exit (returns the exit status; `None` if it had to be
    /// killed after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.proc.as_mut().and_then(|p| p.terminate(grace))
    }

    /// SIGSTOP, returning once every thread of the node is stopped.
    pub fn freeze(&self, bound: Duration) {
        if let Some(p) = &self.proc {
            p.freeze(bound);
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(p) = &self.proc {
            p.signal(sig);
        }
    }

    /// Stops (SIGTERM) if running, then starts again with the same config and data.
    pub async fn restart(&mut self) {
        self.stop(Duration::from_secs(15));
        self.restarts += 1;
        self.spawn().await;
    }

    /// Any request; returns status and JSON body (`Value::Null` for an empty body).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (st, _, v) = self.request_full(method, path, token, body, &[]).await;
        (st, v)
    }

    /// Mounts a KV engine (`version` "1" or "2") at `path`; panics unless it answers 204.
    pub async fn mount_kv(&self, token: &str, path: &str, version: &str) {
        let (st, v) = self
            .request(
                "POST",
                &format!("sys/mounts/{path}"),
                Some(token),
                Some(serde_json::json!({"type": "kv", "options": {"version": version}})),
            )
            .await;
        assert_eq!(st, reqwest::StatusCode::NO_CONTENT, "mount {path}: {v}");
    }

    /// Any request with extra headers; returns status, headers and JSON body.
    pub async fn request_full(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let url = format!("{}/v1/{}", self.addr, path.trim_start_matches('/'));
        let mut rb = self.http.request(m, url);
        if let Some(t) = token {
            rb = rb.header("X-Vault-Token", t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status();
        let hdrs = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, hdrs, v)
    }

    /// Raw request with a byte body (for malformed input tests).
    pub async fn request_raw(&self, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let resp = self
            .http
            .request(m, format!("{}/v1/{}", self.addr, path))
            .body(body)
            .send()
            .await
            .expect("send");
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// `PUT sys/init`.
    pub async fn init(&self, shares: u64, threshold: u64) -> InitKeys {
        let (st, v) = self
            .request(
                "PUT",
                "sys/init",
                None,
                Some(serde_json::json!({"secret_shares": shares, "secret_threshold": threshold})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "init failed: {v}");
        let strs = |k: &str| {
            v[k].as_array()
                .expect(k)
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        InitKeys {
            keys: strs("keys"),
            keys_base64: strs("keys_base64"),
            root_token: v["root_token"].as_str().unwrap().to_string(),
        }
    }

    /// Submits unseal keys until unsealed; panics if it stays sealed.
    pub async fn unseal(&self, keys: &[String]) {
        for k in keys {
            let (st, v) = self
                .request("PUT", "sys/unseal", None, Some(serde_json::json!({ "key": k })))
                .await;
            assert_eq!(st, StatusCode::OK, "unseal failed: {v}");
            if v["sealed"] == Value::Bool(false) {
                return;
            }
        }
        panic!("still sealed after {} keys", keys.len());
    }

    /// Initializes (1 share), unseals, and waits until the node serves requests (with HA
    /// storage it first has to win the lock); returns the keys (root token inside).
    pub async fn init_unsealed(&self) -> InitKeys {
        let k = self.init(1, 1).await;
        self.unseal(&k.keys).await;
        wait_until_async(
            || async { (self.request("GET", "sys/health", None, None).await.0 == StatusCode::OK).then_some(()) },
            "node active after unseal",
            START_TIMEOUT,
        )
        .await;
        k
    }

    /// Waits until `sys/seal-status` satisfies `pred`.
    pub async fn wait_seal_status(&self, pred: impl Fn(&Value) -> bool, why: &str) -> Value {
        wait_until_async(
            || async {
                let (st, v) = self.request("GET", "sys/seal-status", None, None).await;
                (st == StatusCode::OK && pred(&v)).then_some(v)
            },
            why,
            START_TIMEOUT,
        )
        .await
    }
}

/// Several [`TestNode`]s on shared storage: lockd (default) with optional relays between
/// each node and the store and in front of each cluster listener.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub lockd: Option<crate::lockd::TestLockd>,
    /// A second lockd for the HA lock in split mode.
    pub ha_lockd: Option<crate::lockd::TestLockd>,
    /// The etcd cluster, when the builder asked for etcd (`etcd(n)` or an etcd split pair).
    pub etcd: Option<crate::etcd::TestEtcd>,
    /// Relay i sits between node i and the (HA) store, when requested (with etcd, relay
    /// `i * members + j` sits between node i and member j).
    pub store_relays: Vec<crate::relay::Relay>,
    /// Relay i sits in front of node i's cluster listener (its advertised cluster_addr).
    pub cluster_relays: Vec<crate::relay::Relay>,
    pub keys: Option<InitKeys>,
    /// Proxy i fronts node i (`.proxies()`); node i's `addr` is then the proxy's address.
    pub proxies: Vec<crate::proxy::TestProxy>,
}

/// Builder for [`TestCluster`].
pub struct TestClusterBuilder {
    nodes: usize,
    lock_ttl: String,
    relay_store: bool,
    relay_cluster: bool,
    split: bool,
    template: TestNodeBuilder,
    init: bool,
    /// Members of the etcd cluster to start, when etcd is used.
    etcd_members: Option<usize>,
    /// Which store holds data and which the HA lock (`None`: lockd, or etcd for both).
    stores: Option<(Store, Store)>,
    /// Run each node behind its own `vha proxy`.
    proxies: bool,
    /// Extra environment of every proxy (`proxy_env`).
    proxy_env: Vec<(String, String)>,
    /// lockd's and the stanzas' `max_value_size` (large secrets), when set.
    max_value_size: Option<usize>,
    /// Test hosts for the pairs and the store (`on_hosts`).
    hosts: Option<HostLayout>,
    /// Every node's advertised `api_addr` (`api_addr`).
    api_addr: Option<String>,
}

/// Where a cluster's processes run on a [`crate::TestNet`] ([`TestClusterBuilder::on_hosts`]):
/// pair `i` (node and proxy) on `pairs[i]`, lockd on `stores[0]` or etcd member `j` on
/// `stores[j]`.
#[derive(Clone, Debug)]
pub struct HostLayout {
    pub pairs: Vec<NetHost>,
    pub stores: Vec<NetHost>,
}

/// The API port of every pair on a test host: each host has its own addresses, so the pairs
/// use Vault's standard ports as a real deployment does.
pub const HOST_API_PORT: u16 = 8200;
/// The cluster port of every pair on a test host (Vault's standard).
pub const HOST_CLUSTER_PORT: u16 = 8201;

/// A store kind for [`TestClusterBuilder::split_stores`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Lockd,
    Etcd,
}

impl TestCluster {
    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder {
            nodes: 3,
            lock_ttl: "3s".into(),
            relay_store: false,
            relay_cluster: false,
            split: false,
            template: TestNodeBuilder::default().config_extra("step_down_wait = \"2s\""),
            init: true,
            etcd_members: None,
            stores: None,
            proxies: false,
            proxy_env: Vec::new(),
            max_value_size: None,
            hosts: None,
            api_addr: None,
        }
    }

    /// Starts `n` nodes from the same builder template (no shared HA store).
    pub async fn start(n: usize, builder: TestNodeBuilder) -> TestCluster {
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(builder.clone().start().await);
        }
        TestCluster {
            nodes,
            lockd: None,
            ha_lockd: None,
            etcd: None,
            store_relays: Vec::new(),
            cluster_relays: Vec::new(),
            proxies: Vec::new(),
            keys: None,
        }
    }

    pub fn root_token(&self) -> &str {
        &self.keys.as_ref().expect("cluster initialized").root_token
    }

    /// Mounts KV v2 at `secret/` through node `i` with the root token.
    pub async fn mount_secret(&self, i: usize) {
        self.nodes[i].mount_kv(self.root_token(), "secret", "2").await;
    }

    /// `sys/leader` of node `i` (`None` if it does not answer 200).
    pub async fn leader_of(&self, i: usize) -> Option<Value> {
        if !self.nodes[i].is_running() {
            return None;
        }
        let (st, v) = self.nodes[i].try_request("GET", "sys/leader", None, None).await?;
        (st == StatusCode::OK).then_some(v)
    }

    /// Indexes of the nodes that say they are active.
    pub async fn actives(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for i in 0..self.nodes.len() {
            if let Some(v) = self.leader_of(i).await {
                if v["is_self"] == Value::Bool(true) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// Waits until exactly one node is active, every running unsealed node's `sys/leader`
    /// names it and, with `.proxies()`, every running proxy routes by it
    /// ([`TestCluster::wait_proxies_follow`]); returns its index.
    pub async fn wait_one_active(&self, timeout: Duration) -> usize {
        let a = wait_until_async(
            || async {
                let actives = self.actives().await;
                let [a] = actives.as_slice() else { return None };
                let want = self.nodes[*a].api_addr.clone();
                for i in 0..self.nodes.len() {
                    if !self.nodes[i].is_running() {
                        continue;
                    }
                    let v = self.leader_of(i).await?;
                    if v["leader_address"].as_str() != Some(want.as_str()) {
                        return None;
                    }
                }
                Some(*a)
            },
            "exactly one active node that every node agrees on",
            timeout,
        )
        .await;
        self.wait_proxies_follow(a, timeout).await;
        a
    }

    /// Writes `{"v": v}` to the KV v2 key `secret/data/<key>` through node (or pair) `i`
    /// with the root token: its status, or `None` when nothing answered.
    pub async fn kv_put(&self, i: usize, key: &str, v: &str) -> Option<StatusCode> {
        self.nodes[i]
            .try_request(
                "POST",
                &format!("secret/data/{key}"),
                Some(self.root_token()),
                Some(serde_json::json!({"data": {"v": v}})),
            )
            .await
            .map(|(st, _)| st)
    }

    /// Reads `secret/data/<key>` through node (or pair) `i`: the stored `v` on 200.
    pub async fn kv_get(&self, i: usize, key: &str) -> Option<String> {
        let (st, v) = self.nodes[i]
            .try_request("GET", &format!("secret/data/{key}"), Some(self.root_token()), None)
            .await?;
        (st == StatusCode::OK).then(|| v["data"]["data"]["v"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until the cluster is ready as a load balancer sees it, with node `a` active:
    /// every other running node answers 429 on `sys/health` (it reaches the active) and the
    /// active's `sys/ha-status` lists every running node (as `vha dev` waits before "up").
    pub async fn wait_ready(&self, a: usize, timeout: Duration) {
        let running = self.nodes.iter().filter(|n| n.is_running()).count();
        wait_until_async(
            || async {
                for (i, n) in self.nodes.iter().enumerate() {
                    if i != a && n.is_running() && n.request("GET", "sys/health", None, None).await.0.as_u16() != 429 {
                        return None;
                    }
                }
                let (st, v) = self.nodes[a]
                    .request("GET", "sys/ha-status", Some(self.root_token()), None)
                    .await;
                let listed = v["nodes"].as_array().map_or(0, |n| n.len());
                (st == StatusCode::OK && listed == running).then_some(())
            },
            "every standby healthy (429) and listed in sys/ha-status",
            timeout,
        )
        .await;
    }

    /// With `.proxies()`: waits until every running pair's proxy routes by node `a` being
    /// active: proxy `a` says its local node is active, every other one that its node is a
    /// standby, and each uses the advertisement of `a`'s current term. A node and its proxy
    /// learn of a new term separately; without this, a request sent right after
    /// [`TestCluster::wait_one_active`] could reach a proxy still routing by the old view.
    pub async fn wait_proxies_follow(&self, a: usize, timeout: Duration) {
        if self.proxies.is_empty() {
            return;
        }
        wait_until_async(
            || async {
                let term = self.node_term(a).await;
                for (i, p) in self.proxies.iter().enumerate() {
                    if !p.is_running() || !self.nodes[i].is_running() {
                        continue;
                    }
                    let m = p.metrics().await;
                    let role = if i == a { "active" } else { "standby" };
                    if series_value(&m, "vha_proxy_local_role", &[("role", role)]) != 1.0
                        || series_value(&m, "vha_proxy_active_known", &[]) != 1.0
                    {
                        return None;
                    }
                    if let Some(t) = term {
                        if series_value(&m, "vha_proxy_advertisement_term", &[]) != t {
                            return None;
                        }
                    }
                }
                Some(())
            },
            "every running proxy routes by the active node's current advertisement",
            timeout,
        )
        .await
    }

    /// Node `i`'s `vha_node_term`, read with the root token; `None` when the cluster was not
    /// initialized here or the node does not answer.
    async fn node_term(&self, i: usize) -> Option<f64> {
        self.node_metric(i, "vha_node_term").await
    }

    /// Node `i`'s unlabelled metric `name` (0 when absent), read from its own listener with
    /// the root token; `None` when the cluster was not initialized here or the node does
    /// not answer.
    pub async fn node_metric(&self, i: usize, name: &str) -> Option<f64> {
        let token = &self.keys.as_ref()?.root_token;
        let (status, text) = self.nodes[i]
            .get_node_local("sys/metrics?format=prometheus", Some(token))
            .await?;
        if status != 200 {
            return None;
        }
        Some(series_value(&text, name, &[]))
    }

    /// Waits until a node other than `old` is active; returns it.
    pub async fn wait_new_active(&self, old: usize, timeout: Duration) -> usize {
        wait_until_async(
            || async {
                let a = self.actives().await;
                match a.as_slice() {
                    [x] if *x != old => Some(*x),
                    _ => None,
                }
            },
            "a new active node",
            timeout,
        )
        .await
    }

    /// Unseals node `i` with the cluster's keys.
    pub async fn unseal(&self, i: usize) {
        let keys = self.keys.as_ref().expect("initialized");
        self.nodes[i].unseal(&keys.keys).await;
    }
}

impl TestClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    /// lockd lease TTL for the HA lock (`lock_ttl` in the stanza).
    pub fn lock_ttl(mut self, ttl: &str) -> Self {
        self.lock_ttl = ttl.into();
        self
    }
    /// A relay between each node and the store (lockd: `store_relays[i]` for node `i`;
    /// etcd: `store_relays[i * members + j]` between node `i` and member `j`).
    pub fn relay_store(mut self) -> Self {
        self.relay_store = true;
        self
    }
    /// A relay in front of each node's cluster listener (advertised as its cluster_addr).
    pub fn relay_cluster(mut self) -> Self {
        self.relay_cluster = true;
        self
    }
    /// Values up to `bytes` in lockd (`--max-value-size` and the stanzas' `max_value_size`),
    /// for large secrets.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = Some(bytes);
        self
    }
    /// Split mode: data on one lockd, the HA lock on a second lockd.
    pub fn split(mut self) -> Self {
        self.split = true;
        self
    }
    /// Data and HA lock on an etcd cluster of `members` real etcd processes
    /// (`storage "etcd" { address = "...", ha_enabled = "true", lock_timeout = <lock_ttl> }`).
    /// `lock_ttl` is etcd's `lock_timeout` here and must be at least 5 s.
    pub fn etcd(mut self, members: usize) -> Self {
        self.etcd_members = Some(members);
        if self.lock_ttl == "3s" {
            self.lock_ttl = "5s".into();
        }
        self
    }
    /// Split mode with the given stores for data and for the HA lock (any pair of lockd and
    /// etcd; etcd + etcd uses one etcd cluster under two paths). Implies `etcd(3)` when etcd
    /// is involved and no member count was set.
    pub fn split_stores(mut self, data: Store, ha: Store) -> Self {
        self.stores = Some((data, ha));
        if (data == Store::Etcd || ha == Store::Etcd) && self.etcd_members.is_none() {
            self = self.etcd(3);
        }
        self
    }
    /// The per-node template (extra config, env).
    pub fn template(mut self, t: TestNodeBuilder) -> Self {
        self.template = t;
        self
    }
    /// Leave the cluster uninitialized.
    pub fn no_init(mut self) -> Self {
        self.init = false;
        self
    }
    /// Run every node behind its own `vha proxy` (a pair per node): each node is built
    /// `.behind_proxy()` and a [`crate::proxy::TestProxy`] is started for it.
    pub fn proxies(mut self) -> Self {
        self.proxies = true;
        self
    }

    /// With `.proxies()`: sets `key=value` in every proxy's environment (for example
    /// `VHA_PROXY_FORWARD_PROTOCOL=h2`).
    pub fn proxy_env(mut self, key: &str, value: &str) -> Self {
        self.proxy_env.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs the cluster as users deploy it, on test hosts: pair `i` on `pairs[i]` (its
    /// listener on the host's address at [`HOST_API_PORT`], the cluster listener at
    /// [`HOST_CLUSTER_PORT`], `api_addr` and `cluster_addr` the host's own), lockd on
    /// `stores[0]` (with `etcd(n)`: member `j` on `stores[j]`). The caller reaches them from a host of the same net
    /// ([`crate::TestNet::block_on`]). Not combinable with relays, split mode or file data.
    pub fn on_hosts(mut self, pairs: Vec<NetHost>, stores: Vec<NetHost>) -> Self {
        self.hosts = Some(HostLayout { pairs, stores });
        self
    }

    /// Every node advertises `url` as its `api_addr` (a load balancer in front of all pairs).
    pub fn api_addr(mut self, url: impl Into<String>) -> Self {
        self.api_addr = Some(url.into());
        self
    }

    pub async fn start(self) -> TestCluster {
        if let Some(h) = &self.hosts {
            assert!(
                !self.relay_store && !self.relay_cluster && !self.split,
                "on_hosts: relays and split mode are not supported on test hosts"
            );
            assert!(
                h.pairs.len() >= self.nodes,
                "on_hosts: a host for each of the {} pairs",
                self.nodes
            );
            assert!(!h.stores.is_empty(), "on_hosts: a host for the store");
        }
        if self.etcd_members.is_some() {
            return self.start_etcd().await;
        }
        let mut lockd = crate::lockd::TestLockd::builder();
        if let Some(h) = &self.hosts {
            lockd = lockd.host(h.stores[0].clone());
        }
        if let Some(n) = self.max_value_size {
            lockd = lockd.arg("--max-value-size").arg(&n.to_string());
        }
        let lockd = lockd.start();
        let ha_lockd = self.split.then(crate::lockd::TestLockd::start);
        let lock_store = ha_lockd.as_ref().unwrap_or(&lockd);
        let mut store_relays = Vec::new();
        let mut lock_addrs = Vec::new();
        for _ in 0..self.nodes {
            if self.relay_store {
                let r = crate::relay::Relay::start(([127, 0, 0, 1], lock_store.port).into()).await;
                lock_addrs.push(format!("http://{}", r.addr()));
                store_relays.push(r);
            } else {
                lock_addrs.push(lock_store.address());
            }
        }
        let ttl = &self.lock_ttl;
        let lock_auth = lock_store.stanza_auth();
        let max_value = self
            .max_value_size
            .map(|n| format!("  max_value_size = {n}\n"))
            .unwrap_or_default();
        let ha_stanza = |block: &str, addr: &str| {
            format!("{block} \"lockd\" {{\n  address = \"{addr}\"\n  lock_ttl = \"{ttl}\"\n{max_value}{lock_auth}}}")
        };
        let (nodes, proxies, cluster_relays) = self
            .start_pairs(|i, b| {
                let lock_addr = &lock_addrs[i];
                if self.split {
                    b.storage(Storage::Raw(format!(
                        "storage \"lockd\" {{\n  address = \"{}\"\n  ha_enabled = \"false\"\n{}}}",
                        lockd.address(),
                        lockd.stanza_auth()
                    )))
                    .ha_storage(ha_stanza("ha_storage", lock_addr))
                } else {
                    b.storage(Storage::Raw(ha_stanza("storage", lock_addr)))
                }
            })
            .await;
        let c = TestCluster {
            nodes,
            lockd: Some(lockd),
            ha_lockd,
            etcd: None,
            store_relays,
            cluster_relays,
            proxies,
            keys: None,
        };
        self.finish(c).await
    }

    /// `start` when etcd is involved: one etcd cluster, plus one lockd when a split pair
    /// names lockd.
    async fn start_etcd(self) -> TestCluster {
        let members = self.etcd_members.unwrap_or(3);
        let etcd = match &self.hosts {
            Some(h) => {
                assert!(
                    self.stores.is_none() && h.stores.len() >= members,
                    "on_hosts with etcd: a store host for each of the {members} members, no split mode"
                );
                crate::etcd::TestEtcd::cluster_on(&h.stores[..members])
            }
            None => crate::etcd::TestEtcd::cluster(members),
        };
        let (data, ha) = self.stores.unwrap_or((Store::Etcd, Store::Etcd));
        let split = self.stores.is_some();
        // The relays sit in front of the store that holds the lock.
        let relay_etcd = self.relay_store && ha == Store::Etcd;
        assert!(
            !self.relay_store || self.hosts.is_none() && (!split || ha == Store::Lockd),
            "relay_store with etcd: on 127.0.0.1, etcd for both data and lock or the lock on lockd"
        );
        // With `relay_store` and the lock in etcd: node i reaches every member through
        // relays of its own (store_relays[i * members + j] in front of member j), so one node
        // can be cut from the whole etcd cluster.
        let mut store_relays = Vec::new();
        let mut etcd_addrs = Vec::new();
        for _ in 0..self.nodes {
            if relay_etcd {
                let mut addrs = Vec::new();
                for m in &etcd.members {
                    let r = crate::relay::Relay::start(([127, 0, 0, 1], m.client_port).into()).await;
                    addrs.push(format!("http://{}", r.addr()));
                    store_relays.push(r);
                }
                etcd_addrs.push(addrs.join(","));
            } else {
                etcd_addrs.push(etcd.address());
            }
        }
        let lockd = (data == Store::Lockd || ha == Store::Lockd).then(crate::lockd::TestLockd::start);
        let lockd_addr = lockd.as_ref().map(|l| l.address()).unwrap_or_default();
        let lockd_auth = lockd.as_ref().map(|l| l.stanza_auth()).unwrap_or_default();
        // With `relay_store` and the lock on lockd (split mode): store_relays[i] sits between
        // node i and lockd.
        if self.relay_store && ha == Store::Lockd {
            let port = lockd.as_ref().expect("lockd holds the HA lock").port;
            for _ in 0..self.nodes {
                store_relays.push(crate::relay::Relay::start(([127, 0, 0, 1], port).into()).await);
            }
        }
        let ha_lockd_addrs: Vec<String> = if ha == Store::Lockd {
            store_relays.iter().map(|r| format!("http://{}", r.addr())).collect()
        } else {
            Vec::new()
        };
        let ttl = &self.lock_ttl;
        let stanza = |i: usize, block: &str, store: Store, ha_enabled: bool, path: &str, lockd_addr: &str| -> String {
            match store {
                Store::Etcd => format!(
                    "{block} \"etcd\" {{\n  address = \"{}\"\n  path = \"{path}\"\n  ha_enabled = \"{ha_enabled}\"\n  lock_timeout = \"{ttl}\"\n}}",
                    etcd_addrs[i]
                ),
                Store::Lockd => format!(
                    "{block} \"lockd\" {{\n  address = \"{lockd_addr}\"\n  ha_enabled = \"{ha_enabled}\"\n  lock_ttl = \"{ttl}\"\n{lockd_auth}}}"
                ),
            }
        };
        let (nodes, proxies, cluster_relays) = self
            .start_pairs(|i, b| {
                let ha_lockd = ha_lockd_addrs.get(i).unwrap_or(&lockd_addr);
                if split {
                    b.storage(Storage::Raw(stanza(i, "storage", data, false, "vault/", &lockd_addr)))
                        .ha_storage(stanza(i, "ha_storage", ha, true, "vault-ha/", ha_lockd))
                } else {
                    b.storage(Storage::Raw(stanza(
                        i,
                        "storage",
                        Store::Etcd,
                        true,
                        "vault/",
                        &lockd_addr,
                    )))
                }
            })
            .await;
        let c = TestCluster {
            nodes,
            lockd,
            ha_lockd: None,
            etcd: Some(etcd),
            store_relays,
            cluster_relays,
            proxies,
            keys: None,
        };
        self.finish(c).await
    }

    /// Starts the nodes, node `i` with the store stanzas `stores(i, template)` adds; with
    /// `proxies` each behind its own `vha proxy`, with `relay_cluster` a relay in front of
    /// each cluster listener. Both start paths share this.
    async fn start_pairs(
        &self,
        stores: impl Fn(usize, TestNodeBuilder) -> TestNodeBuilder,
    ) -> (Vec<TestNode>, Vec<crate::proxy::TestProxy>, Vec<crate::relay::Relay>) {
        let mut cluster_relays = Vec::new();
        let mut nodes = Vec::new();
        let mut proxies = Vec::new();
        for i in 0..self.nodes {
            let (api, cluster) = match &self.hosts {
                Some(_) => (HOST_API_PORT, HOST_CLUSTER_PORT),
                None => (free_port(), free_port()),
            };
            let mut b = self.template.clone().ports(api, cluster);
            if let Some(h) = &self.hosts {
                b = b.host(h.pairs[i].clone());
            }
            if let Some(a) = &self.api_addr {
                b = b.api_addr(a.clone());
            }
            if self.proxies {
                b = b.behind_proxy();
            }
            if self.relay_cluster {
                let r = crate::relay::Relay::start(([127, 0, 0, 1], cluster).into()).await;
                b = b.advertise_cluster(format!("https://{}", r.addr()));
                cluster_relays.push(r);
            }
            let node = stores(i, b).start().await;
            if self.proxies {
                let ip = node.host().map_or(std::net::Ipv4Addr::LOCALHOST, |h| h.ip);
                proxies.push(crate::proxy::TestProxy::start_in(
                    node.host().cloned(),
                    &node.config_path,
                    (ip, api).into(),
                    self.proxy_env.clone(),
                ));
            }
            nodes.push(node);
        }
        (nodes, proxies, cluster_relays)
    }

    /// Unless `no_init`: initializes through node 0, unseals every node and waits for one
    /// active node.
    async fn finish(&self, mut c: TestCluster) -> TestCluster {
        if self.init {
            let keys = c.nodes[0].init(1, 1).await;
            c.keys = Some(keys);
            for i in 0..c.nodes.len() {
                c.unseal(i).await;
            }
            let a = c.wait_one_active(START_TIMEOUT).await;
            c.wait_ready(a, START_TIMEOUT).await;
        }
        c
    }
}

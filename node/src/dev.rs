//! `vha dev [--nodes N] [--dir DIR] [--storage lockd|etcd]`: a local HA cluster in one command.
//! Starts lockd (or, with `--storage etcd`, a 3-member etcd cluster) and N
//! nodes on 127.0.0.1, initializes (one unseal key), unseals every node, mounts KV v2 at
//! `secret/`, prints the addresses and the active node, writes `DIR/cluster.json` (0600:
//! it holds the root token and unseal key; dev only) and `DIR/prometheus.yml` (a scrape
//! config for this cluster; `--prometheus` also starts Prometheus with it), and stops
//! everything on Ctrl-C.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// How long the dev cluster may take to come up (release build: about a second).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll period while waiting for processes to answer.
const POLL: Duration = Duration::from_millis(50);
/// Grace period for SIGTERM before SIGKILL when stopping.
const STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(name = "vha dev", about = "Run a local HA cluster: lockd + N nodes on 127.0.0.1")]
struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Directory for configs, data, logs and cluster.json.
    #[arg(long, default_value = ".vha-dev")]
    dir: PathBuf,
    /// First API port; node i listens on base + 10*i (cluster port +1), lockd on base + 100.
    /// 0 picks free ports (below the kernel's ephemeral range; tests).
    #[arg(long, default_value_t = 8200)]
    port_base: u16,
    /// lockd lease TTL for the HA lock (etcd: `lock_timeout`, at least 5s).
    #[arg(long, default_value = "10s")]
    lock_ttl: String,
    /// Store for data and the HA lock: `lockd`, or `etcd` (a 3-member etcd cluster on
    /// 127.0.0.1, client ports base + 101/103/105, from `etcd` on PATH).
    #[arg(long, default_value = "lockd", value_parser = ["lockd", "etcd"])]
    storage: String,
    /// Also start `prometheus` (from PATH) with `DIR/prometheus.yml` on 127.0.0.1 (port
    /// base + 90, or a free port with --port-base 0), storing its data in `DIR/prometheus`.
    #[arg(long)]
    prometheus: bool,
    /// Nodes only, without their proxies (each node serves its api_addr itself and a
    /// standby answers 307 instead of forwarding).
    #[arg(long)]
    no_proxy: bool,
}

/// Members of the `--storage etcd` cluster: three, so it survives the loss of any one.
const ETCD_MEMBERS: u16 = 3;

struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(args: &[&str], log: &Path) -> std::io::Result<Proc> {
        let exe = std::env::current_exe()?;
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Proc { child })
    }

    /// Spawns another program (etcd) with output to `log`.
    fn spawn_program(program: &str, args: &[String], log: &Path) -> std::io::Result<Proc> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Proc { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Entry point of `vha dev`.
pub fn main(args: Vec<String>) -> ExitCode {
    let args = match DevArgs::try_parse_from(std::iter::once("vha dev".to_string()).chain(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if args.nodes == 0 || args.nodes > 9 {
        eprintln!("vha dev: --nodes must be 1..=9");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vha dev: {e}");
            return ExitCode::from(1);
        }
    };
    let mut procs: Vec<Proc> = Vec::new();
    let res = rt.block_on(run(&args, &mut procs));
    let code = match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vha dev: {e}");
            ExitCode::from(1)
        }
    };
    // Nodes first (they release the lock), lockd last.
    for p in procs.iter_mut().rev() {
        p.stop();
    }
    println!("vha dev: stopped");
    code
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(
    http: &HttpClient,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let mut b = http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header("X-Vault-Token", t);
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| format!("{method} {url}: timed out"))?
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Ok((status, v))
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

async fn run(args: &DevArgs, procs: &mut Vec<Proc>) -> Result<(), String> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let port = |offset: u16| -> Result<u16, String> {
        if args.port_base == 0 {
            vha_core::ports::free_port()
        } else {
            args.port_base
                .checked_add(offset)
                .ok_or_else(|| "port out of range".to_string())
        }
    };
    let etcd = args.storage == "etcd";
    let (mut lockd_addr, mut lockd_pid) = (String::new(), 0);
    // lockd requires a bearer token, as a deployment should: a fresh random one per run,
    // in a 0600 file that lockd and every node read.
    let token_file = dir.join("lockd.token");
    let mut etcd_members: Vec<(String, u32)> = Vec::new();
    if etcd {
        etcd_members = start_etcd(&dir, &http, procs, &port).await?;
    } else {
        let lockd_port = port(100)?;
        lockd_addr = format!("http://127.0.0.1:{lockd_port}");
        let lockd_data = dir.join("lockd");
        let token = zeroize::Zeroizing::new(hex::encode(rand::random::<[u8; 32]>()));
        write_private(&token_file, format!("{}\n", token.as_str()).as_bytes())
            .map_err(|e| format!("{}: {e}", token_file.display()))?;
        let lockd = Proc::spawn(
            &[
                "lockd",
                "--listen",
                &format!("127.0.0.1:{lockd_port}"),
                "--data-dir",
                &lockd_data.to_string_lossy(),
                "--token-file",
                &token_file.to_string_lossy(),
            ],
            &dir.join("lockd.log"),
        )
        .map_err(|e| format!("starting lockd: {e}"))?;
        lockd_pid = lockd.pid();
        procs.push(lockd);
        wait_for("lockd", || async {
            call(&http, "GET", &format!("{lockd_addr}/v1/health"), None, None)
                .await
                .ok()
        })
        .await?;
    }
    let storage_stanza = if etcd {
        let addrs = etcd_members
            .iter()
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "storage \"etcd\" {{\n  address      = \"{addrs}\"\n  path         = \"vault/\"\n  ha_enabled   = \"true\"\n  lock_timeout = \"{}\"\n}}",
            args.lock_ttl
        )
    } else {
        format!(
            "storage \"lockd\" {{\n  address    = \"{lockd_addr}\"\n  lock_ttl   = \"{}\"\n  token_file = \"{}\"\n}}",
            args.lock_ttl,
            token_file.display()
        )
    };

    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let api_port = port(10 * i as u16)?;
        let cluster_port = if args.port_base == 0 { port(0)? } else { api_port + 1 };
        let api_addr = format!("http://127.0.0.1:{api_port}");
        let cluster_addr = format!("https://127.0.0.1:{cluster_port}");
        // A pair: the proxy owns api_addr; the node serves it on a private socket and on a
        // loopback node_address (the bench's "node" scenario).
        let (node_addr, proxy_metrics, proxy_block) = if args.no_proxy {
            (api_addr.clone(), None, String::new())
        } else {
            let node_port = if args.port_base == 0 { port(0)? } else { api_port + 2 };
            let metrics_port = if args.port_base == 0 { port(0)? } else { api_port + 3 };
            let sock = dir.join(format!("node-{i}.sock"));
            (
                format!("http://127.0.0.1:{node_port}"),
                Some(format!("127.0.0.1:{metrics_port}")),
                format!(
                    "\nproxy {{\n  node_socket     = \"{}\"\n  node_address    = \"127.0.0.1:{node_port}\"\n  metrics_address = \"127.0.0.1:{metrics_port}\"\n}}\n",
                    sock.display()
                ),
            )
        };
        let cfg = format!(
            "{storage_stanza}\n\nlistener \"tcp\" {{\n  address         = \"127.0.0.1:{api_port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable     = true\n  telemetry {{\n    unauthenticated_metrics_access = true\n  }}\n}}\n\napi_addr     = \"{api_addr}\"\ncluster_addr = \"{cluster_addr}\"\ncluster_name = \"vha-dev\"\nstep_down_wait = \"2s\"\n{proxy_block}"
        );
        let cfg_path = dir.join(format!("node-{i}.hcl"));
        std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
        let p = Proc::spawn(
            &["server", "--config", &cfg_path.to_string_lossy()],
            &dir.join(format!("node-{i}.log")),
        )
        .map_err(|e| format!("starting node {i}: {e}"))?;
        nodes.push(json!({
            "name": format!("node-{i}"),
            "api_addr": api_addr,
            "cluster_addr": cluster_addr,
            "node_addr": node_addr,
            "node_pid": p.pid(),
            "proxy_pid": Value::Null,
            "proxy_run_dir": Value::Null,
            "proxy_metrics_addr": proxy_metrics,
            "config": cfg_path.display().to_string(),
        }));
        procs.push(p);
    }
    for (i, n) in nodes.iter().enumerate() {
        let url = format!("{}/v1/sys/seal-status", n["node_addr"].as_str().unwrap_or_default());
        // The answer must come from our node (on our store), not from whatever else owns the port.
        wait_for("node to answer", || async {
            let (_, v) = call(&http, "GET", &url, None, None).await.ok()?;
            (v["storage_type"] == args.storage.as_str()).then_some(())
        })
        .await
        .map_err(|e| format!("node-{i}: {e}; see {}", dir.join(format!("node-{i}.log")).display()))?;
    }
    if !args.no_proxy {
        for (i, n) in nodes.iter_mut().enumerate() {
            let cfg_path = n["config"].as_str().unwrap_or_default().to_string();
            // Each proxy's PID file and upgrade socket in a directory of its own (the
            // configs share one).
            let run_dir = dir.join(format!("proxy-{i}.run"));
            std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
            let p = Proc::spawn(
                &["proxy", "--config", &cfg_path, "--run-dir", &run_dir.to_string_lossy()],
                &dir.join(format!("proxy-{i}.log")),
            )
            .map_err(|e| format!("starting proxy {i}: {e}"))?;
            n["proxy_run_dir"] = json!(run_dir.display().to_string());
            n["proxy_pid"] = json!(p.pid());
            procs.push(p);
            let url = format!("{}/v1/sys/seal-status", n["api_addr"].as_str().unwrap_or_default());
            wait_for("proxy to answer", || async {
                let (_, v) = call(&http, "GET", &url, None, None).await.ok()?;
                (v["storage_type"] == args.storage.as_str()).then_some(())
            })
            .await
            .map_err(|e| format!("proxy-{i}: {e}; see {}", dir.join(format!("proxy-{i}.log")).display()))?;
        }
    }
    let first = nodes[0]["api_addr"].as_str().unwrap_or_default().to_string();
    let (st, init) = call(
        &http,
        "PUT",
        &format!("{first}/v1/sys/init"),
        None,
        Some(json!({"secret_shares": 1, "secret_threshold": 1})),
    )
    .await?;
    if st != 200 {
        return Err(format!("init failed ({st}): {init}"));
    }
    let key = init["keys_base64"][0].as_str().unwrap_or_default().to_string();
    let root = init["root_token"].as_str().unwrap_or_default().to_string();
    for n in &nodes {
        let a = n["api_addr"].as_str().unwrap_or_default();
        let (st, v) = call(
            &http,
            "PUT",
            &format!("{a}/v1/sys/unseal"),
            None,
            Some(json!({ "key": key })),
        )
        .await?;
        if st != 200 || v["sealed"] != Value::Bool(false) {
            return Err(format!("unseal of {a} failed ({st}): {v}"));
        }
    }
    let active = wait_for("an active node", || async {
        for n in &nodes {
            let a = n["api_addr"].as_str().unwrap_or_default();
            if let Ok((200, v)) = call(&http, "GET", &format!("{a}/v1/sys/leader"), None, None).await {
                if v["is_self"] == Value::Bool(true) {
                    return Some(a.to_string());
                }
            }
        }
        None
    })
    .await?;
    let (st, v) = call(
        &http,
        "POST",
        &format!("{active}/v1/sys/mounts/secret"),
        Some(&root),
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await?;
    if !(200..300).contains(&st) {
        return Err(format!("mounting secret/ failed ({st}): {v}"));
    }
    // Up means ready for a load balancer: every standby answers 429 on sys/health (it
    // reaches the active) and the active's sys/ha-status lists every node.
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| n["api_addr"].as_str().unwrap_or_default().to_string())
        .collect();
    wait_for(
        "every standby to report healthy (429) and sys/ha-status to list every node",
        || async {
            for a in addrs.iter().filter(|a| **a != active) {
                match call(&http, "GET", &format!("{a}/v1/sys/health"), None, None).await {
                    Ok((429, _)) => {}
                    _ => return None,
                }
            }
            let (st, v) = call(&http, "GET", &format!("{active}/v1/sys/ha-status"), Some(&root), None)
                .await
                .ok()?;
            let listed = v["nodes"].as_array().map_or(0, |n| n.len());
            (st == 200 && listed == addrs.len()).then_some(())
        },
    )
    .await?;
    let cluster = json!({
        "root_token": root,
        "unseal_keys_b64": [key],
        "lockd": if etcd {
            Value::Null
        } else {
            json!({ "addr": lockd_addr, "pid": lockd_pid, "token_file": token_file })
        },
        "etcd": etcd_members.iter().map(|(a, p)| json!({ "addr": a, "pid": p })).collect::<Vec<_>>(),
        "nodes": nodes,
    });
    let path = dir.join("cluster.json");
    write_private(
        &path,
        serde_json::to_string_pretty(&cluster).unwrap_or_default().as_bytes(),
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let prom_path = dir.join("prometheus.yml");
    std::fs::write(&prom_path, prometheus_config(&cluster)).map_err(|e| format!("{}: {e}", prom_path.display()))?;
    let mut prom_addr = None;
    if args.prometheus {
        let prom_port = port(90)?;
        let p = Proc::spawn_program(
            "prometheus",
            &[
                format!("--config.file={}", prom_path.display()),
                format!("--storage.tsdb.path={}", dir.join("prometheus").display()),
                format!("--web.listen-address=127.0.0.1:{prom_port}"),
            ],
            &dir.join("prometheus.log"),
        )
        .map_err(|e| format!("starting prometheus (is it installed? scripts/install-deps.sh): {e}"))?;
        procs.push(p);
        prom_addr = Some(format!("http://127.0.0.1:{prom_port}"));
    }

    println!("==> vha dev cluster is up\n");
    if etcd {
        for (i, (a, p)) in etcd_members.iter().enumerate() {
            println!("    etcd m{i}: {a} (pid {p})");
        }
    } else {
        println!("    lockd:  {lockd_addr} (pid {lockd_pid})");
    }
    for n in cluster["nodes"].as_array().into_iter().flatten() {
        let a = n["api_addr"].as_str().unwrap_or_default();
        let role = if a == active { "active" } else { "standby" };
        println!(
            "    {}: {a} ({role}, pid {})",
            n["name"].as_str().unwrap_or_default(),
            n["node_pid"]
        );
    }
    println!("\n    export VAULT_ADDR={active}");
    println!("    export VAULT_TOKEN={root}");
    println!(
        "\n    cluster.json: {}  (root token and unseal key: dev only)",
        path.display()
    );
    let prom_shown = prom_path.display();
    println!("    prometheus.yml: {prom_shown}  (scrape config for this cluster)");
    if let Some(a) = &prom_addr {
        println!("    prometheus: {a}");
    }
    println!("    KV v2 is mounted at secret/. Press Ctrl-C to stop.\n");
    let _ = std::io::stdout().flush();

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    println!("vha dev: stopping");
    Ok(())
}

/// `DIR/prometheus.yml`: a Prometheus scrape config for the cluster described by
/// `cluster.json` (job names as in `grafana/prometheus.example.yml`, which the dashboards
/// expect): every node's `sys/metrics` (token-less: dev listeners set
/// `unauthenticated_metrics_access`), proxies' metrics listeners when present
/// (`nodes[].proxy_metrics_addr`), lockd's or the etcd members' `/metrics`. 5 s scrapes.
fn prometheus_config(cluster: &Value) -> String {
    let host = |a: &str| -> String {
        let a = a.split_once("://").map_or(a, |(_, r)| r);
        format!("\"{}\"", a.trim_end_matches('/'))
    };
    let nodes = cluster["nodes"].as_array().cloned().unwrap_or_default();
    let list = |key: &str| -> Vec<String> { nodes.iter().filter_map(|n| n[key].as_str()).map(host).collect() };
    let job = |name: &str, path: &str, params: &str, targets: &[String]| -> String {
        format!(
            "  - job_name: {name}\n    metrics_path: {path}\n{params}    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        )
    };
    // lockd's /metrics needs its bearer token.
    let bearer = |file: &str| format!("    authorization:\n      type: Bearer\n      credentials_file: \"{file}\"\n");
    let mut y = String::from(
        "# Written by `vha dev` for the cluster it started (see grafana/README.md).\nglobal:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nscrape_configs:\n",
    );
    y += &job(
        "vha-node",
        "/v1/sys/metrics",
        "    params:\n      format: [prometheus]\n",
        &list("api_addr"),
    );
    let proxies = list("proxy_metrics_addr");
    if !proxies.is_empty() {
        y += &job("vha-proxy", "/metrics", "", &proxies);
    }
    if let Some(a) = cluster["lockd"]["addr"].as_str() {
        let auth = cluster["lockd"]["token_file"].as_str().map(bearer).unwrap_or_default();
        y += &job("vha-lockd", "/metrics", &auth, &[host(a)]);
    }
    let etcd: Vec<String> = cluster["etcd"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["addr"].as_str())
        .map(host)
        .collect();
    if !etcd.is_empty() {
        y += &job("etcd", "/metrics", "", &etcd);
    }
    y
}

/// Starts the 3-member etcd cluster of `--storage etcd` (data in `DIR/etcd-mN`) and waits
/// until every member reports a leader; returns each member's client URL and PID.
async fn start_etcd(
    dir: &Path,
    http: &HttpClient,
    procs: &mut Vec<Proc>,
    port: &dyn Fn(u16) -> Result<u16, String>,
) -> Result<Vec<(String, u32)>, String> {
    let mut ports = Vec::new();
    for i in 0..ETCD_MEMBERS {
        ports.push((port(101 + 2 * i)?, port(102 + 2 * i)?));
    }
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut out = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let data = dir.join(format!("etcd-m{i}"));
        let args: Vec<String> = [
            "--name",
            &format!("m{i}"),
            "--data-dir",
            &data.to_string_lossy(),
            "--listen-client-urls",
            &c,
            "--advertise-client-urls",
            &c,
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            "vha-dev",
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn_program("etcd", &args, &dir.join(format!("etcd-m{i}.log")))
            .map_err(|e| format!("starting etcd (is etcd-server installed?): {e}"))?;
        out.push((c, proc.pid()));
        procs.push(proc);
    }
    for (a, _) in &out {
        wait_for("etcd member health", || async {
            let (st, v) = call(http, "GET", &format!("{a}/health"), None, None).await.ok()?;
            (st == 200 && v["health"] == "true").then_some(())
        })
        .await?;
    }
    Ok(out)
}

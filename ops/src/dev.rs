//! `vha dev [--nodes N] [--dir DIR] [--storage lockd|etcd]`: a local HA cluster in one command.
//! Starts lockd (or, with `--storage etcd`, a 3-member etcd cluster) and N
//! nodes on 127.0.0.1, initializes (one unseal key), unseals every node, mounts KV v2 at
//! `secret/`, prints the addresses and the active node, writes `DIR/cluster.json` (0600:
//! it holds the root token and unseal key; dev only) and `DIR/prometheus.yml` (a scrape
//! config for this cluster; `--prometheus` also starts Prometheus with it), and stops
//! everything on Ctrl-C.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

use crate::client::{Client, Method};
use crate::cluster::{new_lockd_token, ClusterFile, EtcdMember, LockdInfo, NodeInfo};
use crate::etcd;
use crate::process::{wait_until, Child};

/// How long the dev cluster may take to come up (release build: about a second).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace period for SIGTERM before SIGKILL when stopping: a node's step-down waits up to
/// `step_down_wait` (2 s here) and lockd syncs its log; 15 s leaves room on a busy machine.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Bound on one request to a starting server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Starts `vha ARGS` (this binary) with output into `log`.
fn spawn_vha(name: &str, args: &[&str], log: &Path) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    Ok(Child::spawn(name, cmd, Some(log))?.with_grace(STOP_GRACE))
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
    let mut procs: Vec<Child> = Vec::new();
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

/// Waits, within the start-up bound, until `f` gives a value.
async fn wait_for<T, F, Fut>(what: &str, f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_until(what, START_TIMEOUT, f).await
}

async fn run(args: &DevArgs, procs: &mut Vec<Child>) -> Result<(), String> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    let api = Client::new(&Default::default(), REQUEST_TIMEOUT)?;

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
    let mut lockd = None;
    let mut etcd_members: Vec<EtcdMember> = Vec::new();
    if etcd {
        let members = (0..ETCD_MEMBERS)
            .map(|i| {
                Ok(etcd::Member {
                    name: format!("m{i}"),
                    client_port: port(101 + 2 * i)?,
                    peer_port: port(102 + 2 * i)?,
                    data_dir: dir.join(format!("etcd-m{i}")),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let started = etcd::start("etcd", &members, "vha-dev", Some(&dir)).await?;
        for (m, p) in members.iter().zip(started) {
            etcd_members.push(EtcdMember {
                addr: m.client_url(),
                pid: Some(p.pid()),
            });
            procs.push(p.with_grace(STOP_GRACE));
        }
    } else {
        // lockd requires a bearer token, as a deployment should: a fresh random one per
        // run, in a 0600 file that lockd and every node read.
        let token_file = dir.join("lockd.token");
        let lockd_port = port(100)?;
        let addr = format!("http://127.0.0.1:{lockd_port}");
        new_lockd_token(&token_file)?;
        let p = spawn_vha(
            "lockd",
            &[
                "lockd",
                "--listen",
                &format!("127.0.0.1:{lockd_port}"),
                "--data-dir",
                &dir.join("lockd").to_string_lossy(),
                "--token-file",
                &token_file.to_string_lossy(),
            ],
            &dir.join("lockd.log"),
        )?;
        let health = format!("{addr}/v1/health");
        wait_for("lockd", || async { api.get(&health).await.ok() }).await?;
        lockd = Some(LockdInfo {
            addr,
            pid: Some(p.pid()),
            token_file: Some(token_file),
        });
        procs.push(p);
    }
    let storage_stanza = match &lockd {
        None => {
            let addrs = etcd_members
                .iter()
                .map(|m| m.addr.as_str())
                .collect::<Vec<_>>()
                .join(",");
            format!(
                "storage \"etcd\" {{\n  address      = \"{addrs}\"\n  path         = \"vault/\"\n  ha_enabled   = \"true\"\n  lock_timeout = \"{}\"\n}}",
                args.lock_ttl
            )
        }
        Some(l) => format!(
            "storage \"lockd\" {{\n  address    = \"{}\"\n  lock_ttl   = \"{}\"\n  token_file = \"{}\"\n}}",
            l.addr,
            args.lock_ttl,
            l.token_file.as_deref().unwrap_or(Path::new("")).display()
        ),
    };

    let mut nodes: Vec<NodeInfo> = Vec::new();
    for i in 0..args.nodes {
        let api_port = port(10 * i as u16)?;
        let cluster_port = if args.port_base == 0 { port(0)? } else { api_port + 1 };
        let mut n = NodeInfo::new(&format!("node-{i}"), &format!("http://127.0.0.1:{api_port}"));
        n.cluster_addr = Some(format!("https://127.0.0.1:{cluster_port}"));
        // A pair: the proxy owns api_addr; the node serves it on a private socket and on a
        // loopback node_address (the bench's "node" scenario).
        let proxy_block = if args.no_proxy {
            n.node_addr = Some(n.api_addr.clone());
            String::new()
        } else {
            let node_port = if args.port_base == 0 { port(0)? } else { api_port + 2 };
            let metrics_port = if args.port_base == 0 { port(0)? } else { api_port + 3 };
            let sock = dir.join(format!("node-{i}.sock"));
            n.node_addr = Some(format!("http://127.0.0.1:{node_port}"));
            n.proxy_metrics_addr = Some(format!("127.0.0.1:{metrics_port}"));
            format!(
                "\nproxy {{\n  node_socket     = \"{}\"\n  node_address    = \"127.0.0.1:{node_port}\"\n  metrics_address = \"127.0.0.1:{metrics_port}\"\n}}\n",
                sock.display()
            )
        };
        let cfg = format!(
            "{storage_stanza}\n\nlistener \"tcp\" {{\n  address         = \"127.0.0.1:{api_port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable     = true\n  telemetry {{\n    unauthenticated_metrics_access = true\n  }}\n}}\n\napi_addr     = \"{}\"\ncluster_addr = \"https://127.0.0.1:{cluster_port}\"\ncluster_name = \"vha-dev\"\nstep_down_wait = \"2s\"\n{proxy_block}",
            n.api_addr
        );
        let cfg_path = dir.join(format!("node-{i}.hcl"));
        std::fs::write(&cfg_path, cfg).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let p = spawn_vha(
            &format!("node {i}"),
            &["server", "--config", &cfg_path.to_string_lossy()],
            &dir.join(format!("node-{i}.log")),
        )?;
        n.node_pid = Some(p.pid());
        n.config = Some(cfg_path.display().to_string());
        nodes.push(n);
        procs.push(p);
    }
    // The answer must come from our node (on our store), not from whatever else owns the port.
    let ours = |url: String| {
        let api = api.clone();
        async move {
            let (_, v) = api.get(&url).await.ok()?;
            (v["storage_type"] == args.storage.as_str()).then_some(())
        }
    };
    for (i, n) in nodes.iter().enumerate() {
        let url = format!("{}/v1/sys/seal-status", n.node_url());
        wait_for("node to answer", || ours(url.clone()))
            .await
            .map_err(|e| format!("node-{i}: {e}; see {}", dir.join(format!("node-{i}.log")).display()))?;
    }
    if !args.no_proxy {
        for (i, n) in nodes.iter_mut().enumerate() {
            let cfg_path = n.config.clone().unwrap_or_default();
            // Each proxy's PID file and upgrade socket in a directory of its own (the
            // configs share one).
            let run_dir = dir.join(format!("proxy-{i}.run"));
            std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
            let p = spawn_vha(
                &format!("proxy {i}"),
                &["proxy", "--config", &cfg_path, "--run-dir", &run_dir.to_string_lossy()],
                &dir.join(format!("proxy-{i}.log")),
            )?;
            n.proxy_run_dir = Some(run_dir.display().to_string());
            n.proxy_pid = Some(p.pid());
            procs.push(p);
            let url = format!("{}/v1/sys/seal-status", n.api_addr);
            wait_for("proxy to answer", || ours(url.clone()))
                .await
                .map_err(|e| format!("proxy-{i}: {e}; see {}", dir.join(format!("proxy-{i}.log")).display()))?;
        }
    }
    let first = nodes[0].api_addr.clone();
    let (st, init) = api
        .call(
            Method::PUT,
            &format!("{first}/v1/sys/init"),
            Some(&json!({"secret_shares": 1, "secret_threshold": 1})),
        )
        .await?;
    if st != 200 {
        return Err(format!("init failed ({st}): {init}"));
    }
    let key = init["keys_base64"][0].as_str().unwrap_or_default().to_string();
    let root = init["root_token"].as_str().unwrap_or_default().to_string();
    for n in &nodes {
        let a = &n.api_addr;
        let (st, v) = api
            .call(Method::PUT, &format!("{a}/v1/sys/unseal"), Some(&json!({ "key": key })))
            .await?;
        if st != 200 || v["sealed"] != Value::Bool(false) {
            return Err(format!("unseal of {a} failed ({st}): {v}"));
        }
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.api_addr.clone()).collect();
    let active = wait_for("an active node", || async {
        for a in &addrs {
            if let Ok((200, v)) = api.get(&format!("{a}/v1/sys/leader")).await {
                if v["is_self"] == Value::Bool(true) {
                    return Some(a.clone());
                }
            }
        }
        None
    })
    .await?;
    let rooted = api.with_token(Some(root.clone()));
    let (st, v) = rooted
        .call(
            Method::POST,
            &format!("{active}/v1/sys/mounts/secret"),
            Some(&json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await?;
    if !(200..300).contains(&st) {
        return Err(format!("mounting secret/ failed ({st}): {v}"));
    }
    // Up means ready for a load balancer: every standby answers 429 on sys/health (it
    // reaches the active) and the active's sys/ha-status lists every node.
    wait_for(
        "every standby to report healthy (429) and sys/ha-status to list every node",
        || async {
            for a in addrs.iter().filter(|a| **a != active) {
                match api.get(&format!("{a}/v1/sys/health")).await {
                    Ok((429, _)) => {}
                    _ => return None,
                }
            }
            let (st, v) = rooted.get(&format!("{active}/v1/sys/ha-status")).await.ok()?;
            let listed = v["nodes"].as_array().map_or(0, |n| n.len());
            (st == 200 && listed == addrs.len()).then_some(())
        },
    )
    .await?;
    let path = dir.join("cluster.json");
    let cluster = ClusterFile {
        root_token: root.clone(),
        unseal_keys_b64: vec![key],
        lockd,
        etcd: etcd_members,
        nodes,
        extra: Default::default(),
        path: Some(path.clone()),
    };
    cluster.save()?;
    let prom_path = dir.join("prometheus.yml");
    std::fs::write(&prom_path, prometheus_config(&cluster)).map_err(|e| format!("{}: {e}", prom_path.display()))?;
    let mut prom_addr = None;
    if args.prometheus {
        let prom_port = port(90)?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", prom_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"));
        let p = Child::spawn("prometheus", cmd, Some(&dir.join("prometheus.log")))
            .map_err(|e| format!("{e} (is it installed? scripts/install-deps.sh)"))?;
        procs.push(p.with_grace(STOP_GRACE));
        prom_addr = Some(format!("http://127.0.0.1:{prom_port}"));
    }

    println!("==> vha dev cluster is up\n");
    for (i, m) in cluster.etcd.iter().enumerate() {
        println!("    etcd m{i}: {} (pid {})", m.addr, m.pid.unwrap_or_default());
    }
    if let Some(l) = &cluster.lockd {
        println!("    lockd:  {} (pid {})", l.addr, l.pid.unwrap_or_default());
    }
    for n in &cluster.nodes {
        let role = if n.api_addr == active { "active" } else { "standby" };
        println!(
            "    {}: {} ({role}, pid {})",
            n.name,
            n.api_addr,
            n.node_pid.unwrap_or_default()
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

/// `DIR/prometheus.yml`: a Prometheus scrape config for the cluster of `cluster.json` (job
/// names as in `grafana/prometheus.example.yml`, which the dashboards expect): every node's
/// `sys/metrics` (token-less: dev listeners set `unauthenticated_metrics_access`), the
/// proxies' metrics listeners when present, lockd's or the etcd members' `/metrics`. 5 s
/// scrapes.
fn prometheus_config(cluster: &ClusterFile) -> String {
    let host = |a: &str| -> String {
        let a = a.split_once("://").map_or(a, |(_, r)| r);
        format!("\"{}\"", a.trim_end_matches('/'))
    };
    let job = |name: &str, path: &str, params: &str, targets: &[String]| -> String {
        format!(
            "  - job_name: {name}\n    metrics_path: {path}\n{params}    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        )
    };
    let mut y = String::from(
        "# Written by `vha dev` for the cluster it started (see grafana/README.md).\nglobal:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nscrape_configs:\n",
    );
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| host(&n.api_addr)).collect();
    y += &job(
        "vha-node",
        "/v1/sys/metrics",
        "    params:\n      format: [prometheus]\n",
        &nodes,
    );
    let proxies: Vec<String> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.proxy_metrics_addr.as_deref())
        .map(host)
        .collect();
    if !proxies.is_empty() {
        y += &job("vha-proxy", "/metrics", "", &proxies);
    }
    if let Some(l) = &cluster.lockd {
        // lockd's /metrics needs its bearer token.
        let auth = l
            .token_file
            .as_deref()
            .map(|f| {
                format!(
                    "    authorization:\n      type: Bearer\n      credentials_file: \"{}\"\n",
                    f.display()
                )
            })
            .unwrap_or_default();
        y += &job("vha-lockd", "/metrics", &auth, &[host(&l.addr)]);
    }
    let etcd: Vec<String> = cluster.etcd.iter().map(|m| host(&m.addr)).collect();
    if !etcd.is_empty() {
        y += &job("etcd", "/metrics", "", &etcd);
    }
    y
}

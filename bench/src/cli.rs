//! `vha bench`: parses flags, finds the targets (cluster.json or `--target`), starts peers,
//! runs the scenarios interleaved round by round (A B C A B C ...), then the failover trials,
//! and writes the table, `--json` and `--html`.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::cost::Watched;
use crate::failover::{self, Control};
use crate::load::{self, Live, Mode, RunSpec};
use crate::peers::{Nginx, OpenBao};
use crate::report::{self, Collector, Machine, Progress, Report, RoundReport};
use crate::scenario::{self, ClusterFile, HttpClient, Kind, NodeInfo, Scenario};
use crate::workload::{self, Workload};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "vha bench",
    about = "Load-test forwarding throughput side by side: direct, forward, redirect, redirect-follow, node; failover; peers",
    after_help = "Example: vha dev &  vha bench --cluster .vha-dev/cluster.json --rounds 5 --duration 10s --workload kv-write --failover 10 --peer openbao --peer nginx --json bench.json --html bench.html"
)]
pub struct Args {
    /// cluster.json written by `vha dev`.
    #[arg(long, default_value = ".vha-dev/cluster.json")]
    pub cluster: PathBuf,
    /// Explicit target instead of cluster.json discovery: NAME=URL with NAME one of the
    /// scenarios (repeatable). With any --target, only the given scenarios run.
    #[arg(long = "target", value_name = "NAME=URL")]
    pub targets: Vec<String>,
    /// Token (default: cluster.json's root token, else $VAULT_TOKEN).
    #[arg(long, env = "VAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Scenarios, comma separated, run interleaved in this order each round.
    #[arg(
        long,
        default_value = "direct,forward,redirect,redirect-follow,node",
        value_delimiter = ','
    )]
    pub scenarios: Vec<String>,
    /// Rounds (each round runs every scenario once).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured time per scenario per round.
    #[arg(long, default_value = "10s", value_parser = vha_core::duration::parse)]
    pub duration: Duration,
    /// Also stop a run after this many operations.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured warm-up before each run.
    #[arg(long, default_value = "1s", value_parser = vha_core::duration::parse)]
    pub warmup: Duration,
    /// Closed loop: concurrent request loops.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Open loop: requests per second (coordinated-omission corrected latencies).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: most requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = vha_core::duration::parse)]
    pub timeout: Duration,
    /// health | kv-read | kv-write | mixed.
    #[arg(long, default_value = "kv-read")]
    pub workload: String,
    /// Percentage of reads in the mixed workload.
    #[arg(long, default_value_t = 90)]
    pub read_pct: u8,
    /// KV value size in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Keys the KV workloads cycle over.
    #[arg(long, default_value_t = 100)]
    pub keys: u64,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Client runtime threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Failover trials (kill -9 of the active node) after the scenarios.
    #[arg(long, default_value_t = 0)]
    pub failover: usize,
    /// Concurrent writers during failover trials.
    #[arg(long, default_value_t = 8)]
    pub failover_writers: usize,
    /// Concurrency sweep after the rounds: each scenario once per level (closed loop, same
    /// duration), e.g. `1,4,16,64,256`; req/s and p99 against connections in the reports.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    /// Peers to run in the same invocation: openbao, nginx (repeatable). OpenBao runs the
    /// chosen scenarios but `node`; nginx always runs both of its own, `nginx:direct` and
    /// `nginx:forward`.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Working directory for peers (configs, data, logs).
    #[arg(long, default_value = ".vha-bench")]
    pub peer_dir: PathBuf,
    /// Skip the server-side request-count cross-check (`sys/metrics`).
    #[arg(long)]
    pub no_server_metrics: bool,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the self-contained HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `vha bench ...`
pub fn main(args: Vec<String>) -> ExitCode {
    let cmdline = format!("vha bench {}", args.join(" "));
    let args = match Args::try_parse_from(std::iter::once("vha bench".to_string()).chain(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vha bench: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args, cmdline)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vha bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the whole benchmark; returns the report (also written to --json/--html).
pub async fn run(args: Args, cmdline: String) -> Result<(), String> {
    let kinds: Vec<Kind> = args.scenarios.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let wkind: workload::Kind = match args.workload.parse()? {
        workload::Kind::Mixed { .. } => workload::Kind::Mixed {
            read_pct: args.read_pct.min(100),
        },
        k => k,
    };
    let w = Workload::new(wkind, args.payload, args.keys);
    if args.rounds == 0 || args.duration.is_zero() {
        return Err("--rounds and --duration must be positive".into());
    }
    let mut notes = Vec::new();

    // Targets.
    let mut cluster = None;
    let mut scenarios: Vec<Scenario> = Vec::new();
    let token;
    let mut active = 0;
    if args.targets.is_empty() {
        let c = ClusterFile::load(&args.cluster)?;
        token = args.token.clone().unwrap_or_else(|| c.root_token.clone());
        let probe = HttpClient::new(&token, false, 2);
        active = scenario::find_active(&probe, &c.nodes)
            .await
            .ok_or("no active node in cluster.json answers sys/leader")?;
        scenarios = scenario::vha_scenarios(&c.nodes, active, &kinds, "vha");
        if !c.has_proxies() {
            notes.push("cluster.json has no proxies (proxy_pid null): standbys answer 307 themselves, so `forward` measures that 307 (counted as errors), not forwarding".into());
        }
        cluster = Some(c);
    } else {
        token = args.token.clone().unwrap_or_default();
        for t in &args.targets {
            let (name, url) = t
                .split_once('=')
                .ok_or_else(|| format!("--target {t:?}: want NAME=URL"))?;
            let kind: Kind = name.parse()?;
            scenarios.push(Scenario {
                name: name.into(),
                kind,
                target: url.trim_end_matches('/').into(),
                system: "vha".into(),
            });
        }
    }
    let pool = args
        .concurrency
        .max(args.failover_writers)
        .max(args.sweep.iter().copied().max().unwrap_or(0));
    let http = HttpClient::new(&token, args.http2, pool);
    let direct = scenarios
        .iter()
        .find(|s| s.kind == Kind::Direct)
        .map(|s| s.target.clone());
    let seed_target = cluster
        .as_ref()
        .map(|c| c.nodes[active].node_url().to_string())
        .or(direct.clone());
    if let Some(base) = &seed_target {
        seed(&http, base, &w).await?;
    }
    let node_urls: Vec<String> = cluster
        .as_ref()
        .map(|c| c.nodes.iter().map(|n| n.node_url().to_string()).collect())
        .unwrap_or_default();
    let server_metrics = !args.no_server_metrics && !node_urls.is_empty();

    // Peers.
    let mut bao: Option<OpenBao> = None;
    let mut bao_http: Option<HttpClient> = None;
    let mut nginx: Option<Nginx> = None;
    for p in &args.peers {
        match p.as_str() {
            "openbao" => {
                eprintln!(
                    "peer openbao: starting a 3-node raft cluster in {}",
                    args.peer_dir.join("openbao").display()
                );
                let ob = OpenBao::start(&args.peer_dir.join("openbao"), 3).await?;
                let h = HttpClient::new(&ob.root_token, args.http2, pool);
                let probe = h.clone();
                let a = scenario::find_active(&probe, &ob.nodes)
                    .await
                    .ok_or("openbao: no active node")?;
                seed(&h, &ob.nodes[a].api_addr, &w).await?;
                let bao_kinds: Vec<Kind> = kinds.iter().copied().filter(|k| *k != Kind::Node).collect();
                scenarios.extend(scenario::vha_scenarios(&ob.nodes, a, &bao_kinds, "openbao"));
                bao_http = Some(h);
                bao = Some(ob);
            }
            "nginx" => {
                let up = seed_target
                    .clone()
                    .ok_or("peer nginx needs the active node (cluster.json or --target direct=URL)")?;
                eprintln!("peer nginx: mTLS (P-521, pinned) front -> {up}, and a plain hop -> {up}");
                let n = Nginx::start(&args.peer_dir.join("nginx"), &up).await?;
                scenarios.push(Scenario {
                    name: "nginx:direct".into(),
                    kind: Kind::Direct,
                    target: n.local.clone(),
                    system: "nginx".into(),
                });
                scenarios.push(Scenario {
                    name: "nginx:forward".into(),
                    kind: Kind::Forward,
                    target: n.front.clone(),
                    system: "nginx".into(),
                });
                nginx = Some(n);
            }
            other => return Err(format!("unknown peer {other:?} (openbao, nginx)")),
        }
    }

    let mode = match args.rate {
        Some(rate) => Mode::Open {
            rate,
            max_inflight: args.max_inflight,
        },
        None => Mode::Closed {
            workers: args.concurrency,
        },
    };
    let spec = RunSpec {
        mode,
        duration: args.duration,
        requests: args.requests,
        warmup: args.warmup,
        timeout: args.timeout,
    };
    // OpenBao's scenarios use its own root token.
    let client_for = |sc: &Scenario| {
        if sc.system == "openbao" {
            bao_http.clone().unwrap_or_else(|| http.clone())
        } else {
            http.clone()
        }
    };
    let watched = watch_list(cluster.as_ref(), bao.as_ref(), nginx.as_ref());
    let ticks = crate::cost::clock_ticks();
    let before_load = crate::cost::sample(&watched);
    let idle_memory = crate::cost::costs(&watched, &before_load, &before_load, 0, ticks);
    let mut col = Collector::default();
    for round in 0..args.rounds {
        for sc in &scenarios {
            let client = client_for(sc);
            let counted = server_metrics && sc.system != "openbao";
            let before = if counted {
                scenario::server_request_count(&http, &node_urls).await
            } else {
                None
            };
            let label = format!("r{}/{} {}", round + 1, args.rounds, sc.name);
            let cpu_before = crate::cost::sample(&watched);
            let res = measure(&spec, &client, sc, &w, &label, &args).await;
            let cpu_after = crate::cost::sample(&watched);
            let after = if counted {
                scenario::server_request_count(&http, &node_urls).await
            } else {
                None
            };
            // Each node's "before" scrape is counted by the node in the "after" scrape.
            let server = before
                .zip(after)
                .map(|(b, a)| a.saturating_sub(b).saturating_sub(node_urls.len() as u64));
            if !args.quiet {
                eprintln!(
                    "{label:>28}: {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                    res.throughput(),
                    res.latency.summary().p50_ms,
                    res.latency.summary().p99_ms,
                    res.errors
                );
            }
            let mut rr = RoundReport::from_run(round, &res, server);
            rr.cost = crate::cost::costs(
                &watched,
                &cpu_before,
                &cpu_after,
                res.http_requests + res.warmup_http_requests,
                ticks,
            )
            .into_iter()
            .filter(|c| serves(&sc.system, &c.system))
            .collect();
            col.add(sc, rr, &res.latency);
        }
    }

    // Concurrency sweep.
    let mut sweep = Vec::new();
    for &level in &args.sweep {
        let spec = RunSpec {
            mode: Mode::Closed { workers: level.max(1) },
            ..spec.clone()
        };
        for sc in &scenarios {
            let client = client_for(sc);
            let label = format!("sweep c={level} {}", sc.name);
            let res = measure(&spec, &client, sc, &w, &label, &args).await;
            let l = res.latency.summary();
            if !args.quiet {
                eprintln!(
                    "{label:>28}: {:>9.0} req/s  p99 {:.2} ms  errors {}",
                    res.throughput(),
                    l.p99_ms,
                    res.errors
                );
            }
            sweep.push(report::SweepPoint {
                scenario: sc.name.clone(),
                connections: level,
                throughput: res.throughput(),
                p99_ms: l.p99_ms,
                errors: res.errors,
            });
        }
    }

    // Failover.
    let mut fo = Vec::new();
    if args.failover > 0 {
        if let Some(c) = &cluster {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let cfgs: Vec<PathBuf> = (0..c.nodes.len()).map(|i| c.config_of(i)).collect();
            let cfile = Arc::new(std::sync::Mutex::new(c.clone()));
            let log_dir = c
                .path
                .as_deref()
                .and_then(|p| p.parent())
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| PathBuf::from("."));
            let mut ctl = Control {
                system: "vha".into(),
                nodes: c.nodes.clone(),
                unseal_keys: c.unseal_keys_b64.clone(),
                restart_cmd: Box::new(move |i| {
                    let mut cmd = Command::new(&exe);
                    cmd.arg("server").arg("--config").arg(&cfgs[i]);
                    cmd
                }),
                log_dir,
                children: Default::default(),
                on_restart: Some(Box::new(move |nodes: &[NodeInfo]| {
                    if let Ok(mut f) = cfile.lock() {
                        f.nodes = nodes.to_vec();
                        let _ = f.save();
                    }
                })),
            };
            let r = failover::run(&mut ctl, &http, args.failover, args.failover_writers, args.quiet).await;
            let pids: Vec<String> = ctl.children.keys().map(|p| p.to_string()).collect();
            if !pids.is_empty() {
                notes.push(format!(
                    "vha nodes restarted by the bench keep running (pids {}; cluster.json updated)",
                    pids.join(", ")
                ));
            }
            // Restarted vha nodes belong to the dev cluster now: detach them.
            for (_, c) in ctl.children.drain() {
                c.detach();
            }
            fo.push(r);
        } else {
            notes.push("--failover needs cluster.json (pids and configs); skipped".into());
        }
        if let (Some(ob), Some(h)) = (&bao, &bao_http) {
            let bin = ob.bin.clone();
            let cfgs: Vec<PathBuf> = (0..ob.nodes.len()).map(|i| ob.config(i)).collect();
            let mut ctl = Control {
                system: "openbao".into(),
                nodes: ob.nodes.clone(),
                unseal_keys: ob.unseal_keys.clone(),
                restart_cmd: Box::new(move |i| {
                    let mut cmd = Command::new(&bin);
                    cmd.arg("server").arg(format!("-config={}", cfgs[i].display()));
                    cmd
                }),
                log_dir: ob.dir.clone(),
                children: Default::default(),
                on_restart: None,
            };
            let r = failover::run(&mut ctl, h, args.failover, args.failover_writers, args.quiet).await;
            // Restarted OpenBao nodes stop with their handles.
            ctl.children.clear();
            fo.push(r);
        }
    }
    drop(nginx);
    drop(bao);

    let mut rep = Report {
        version: 1,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: Machine::detect(),
        command: cmdline,
        config: serde_json::json!({
            "mode": match mode { Mode::Closed { .. } => "closed", Mode::Open { .. } => "open" },
            "concurrency": args.concurrency,
            "rate": args.rate,
            "max_inflight": args.max_inflight,
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "rounds": args.rounds,
            "workload": w.label(),
            "payload": args.payload,
            "keys": args.keys,
            "http2": args.http2,
            "threads": args.threads,
            "proxies": cluster.as_ref().map(|c| c.has_proxies()),
            "peers": args.peers,
        }),
        scenarios: col.finish(),
        sweep,
        http_requests_total: 0,
        failover: fo,
        idle_memory,
        notes,
    };
    rep.http_requests_total = http.sent();
    for sc in &rep.scenarios {
        if sc.total.errors > 0 {
            let mut st: std::collections::BTreeMap<&str, u64> = Default::default();
            for r in &sc.rounds {
                for (k, v) in &r.statuses {
                    *st.entry(k.as_str()).or_default() += v;
                }
            }
            let timeouts: u64 = sc.rounds.iter().map(|r| r.timeouts).sum();
            rep.notes.push(format!(
                "{}: {} failed operations (statuses of all answers {st:?}, timeouts {timeouts})",
                sc.name, sc.total.errors
            ));
        }
    }
    println!("\n{}", report::table(&rep.scenarios));
    let costs = report::cost_table(&rep.idle_memory, &rep.scenarios);
    if !costs.is_empty() {
        println!("{costs}");
    }
    let sweep = report::sweep_table(&rep.sweep);
    if !sweep.is_empty() {
        println!("{sweep}");
    }
    for f in &rep.failover {
        println!(
            "failover {}: {} trials, first ack after kill p50 {:.0} ms p99 {:.0} ms max {:.0} ms; errors {}; held {}; acked writes {}, lost {}",
            f.system,
            f.trials.len(),
            f.downtime_p50_ms,
            f.downtime_p99_ms,
            f.downtime_max_ms,
            f.trials.iter().map(|t| t.errors).sum::<u64>(),
            f.trials.iter().map(|t| t.held).sum::<u64>(),
            f.acked_writes,
            f.lost_writes
        );
    }
    for n in &rep.notes {
        println!("note: {n}");
    }
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(p) = &args.html {
        std::fs::write(p, report::html(&rep)).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// One run of `sc` under `spec` (warm-up included) with a progress bar labelled `label`.
async fn measure(
    spec: &RunSpec,
    client: &HttpClient,
    sc: &Scenario,
    w: &Workload,
    label: &str,
    args: &Args,
) -> load::RunResult {
    let live = Arc::new(Live::default());
    let _progress = Progress::start(label, args.warmup + args.duration, live.clone(), args.quiet);
    load::run(spec, scenario::op(client, sc, w), live).await
}

/// The processes the cost view reads: vha's proxies, nodes and store (from cluster.json),
/// OpenBao's nodes, nginx's master and workers, and the bench itself.
fn watch_list(cluster: Option<&ClusterFile>, bao: Option<&OpenBao>, nginx: Option<&Nginx>) -> Vec<Watched> {
    let mut w = Vec::new();
    if let Some(c) = cluster {
        w.extend(
            c.nodes
                .iter()
                .filter_map(|n| n.proxy_pid)
                .map(|p| Watched::new(p, "vha", "vha proxy")),
        );
        w.extend(
            c.nodes
                .iter()
                .filter_map(|n| n.node_pid)
                .map(|p| Watched::new(p, "vha", "vha node")),
        );
        w.extend(
            c.lockd
                .iter()
                .filter_map(|l| l.pid)
                .map(|p| Watched::new(p, "vha", "vha store")),
        );
        w.extend(
            c.etcd
                .iter()
                .filter_map(|m| m.pid)
                .map(|p| Watched::new(p, "vha", "vha store")),
        );
    }
    if let Some(b) = bao {
        w.extend(b.pids().into_iter().map(|p| Watched::new(p, "openbao", "openbao")));
    }
    if let Some(n) = nginx {
        w.push(Watched {
            children: true,
            ..Watched::new(n.pid(), "nginx", "nginx")
        });
    }
    w.push(Watched::new(std::process::id(), "bench", "bench client"));
    w
}

/// Whether processes of `role_system` serve requests of a `scenario_system` scenario (nginx
/// forwards to vha's active node, so vha's roles count for it too).
fn serves(scenario_system: &str, role_system: &str) -> bool {
    role_system == scenario_system || role_system == "bench" || (scenario_system == "nginx" && role_system == "vha")
}

/// Writes the keys the read workloads need.
async fn seed(http: &HttpClient, base: &str, w: &Workload) -> Result<(), String> {
    for r in w.seed_requests() {
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            http.send(&format!("{base}{}", r.path), &r, false),
        )
        .await
        .map_err(|_| format!("seeding {base}: timed out"))??;
        if !resp.status.is_success() {
            return Err(format!(
                "seeding {}{}: {} {}",
                base,
                r.path,
                resp.status,
                String::from_utf8_lossy(&resp.body)
            ));
        }
    }
    Ok(())
}

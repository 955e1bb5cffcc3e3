//! `vha lockd bench`: guarded writes per second and latency percentiles of lockd,
//! side by side with etcd (Debian's `etcd-server`, plain puts through its JSON gateway) in
//! one run, on the same disk, both fsyncing every acknowledged write.
//!
//! It starts both servers itself as child processes (lockd from this binary; etcd from
//! `PATH`) in a fresh directory under `--dir`, runs each concurrency level against lockd and
//! then etcd, prints one table row per level, and stops both. Each lockd op is a put fenced
//! with a held lock's token (what an active node does); each etcd op is a plain `/v3/kv/put`.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use vha_core::storage::lockd::{LockdBackend, LockdCredentials};
use vha_core::storage::{Backend, HaBackend};

use vha_core::ports::free_port;

use crate::etcd;
use crate::process::{wait_until, Child};

/// Warm-up before each measured run: connections open, caches and the allocator settle.
const WARMUP: Duration = Duration::from_millis(500);

/// One level's result.
struct Stats {
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

impl Stats {
    fn from(mut lat: Vec<Duration>, errors: u64, elapsed: Duration) -> Stats {
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
        };
        Stats {
            ops_per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
            p50: pct(0.50).unwrap_or_default(),
            p99: pct(0.99).unwrap_or_default(),
            errors,
        }
    }
}

/// Runs `op` from `clients` concurrent tasks for `secs` (after a warm-up).
async fn drive<F, Fut>(clients: usize, secs: u64, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now() + WARMUP;
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut n) = (Vec::new(), 0u64, 0u64);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = op(c, n).await;
                n += 1;
                if t >= start {
                    if ok {
                        lat.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    Stats::from(all, errors, Duration::from_secs(secs))
}

/// Arguments of `vha lockd bench`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "vha lockd bench",
    about = "Guarded writes of lockd beside etcd, or lockd filled with --entries (see lockd/PROTOCOL.md)"
)]
pub struct BenchArgs {
    /// Where the servers' data directories go (same disk for both: same fsync cost).
    #[arg(long, default_value = ".")]
    pub dir: std::path::PathBuf,
    /// The etcd binary (Debian: `etcd-server`).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: String,
    /// Benchmark lockd only.
    #[arg(long)]
    pub no_etcd: bool,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub clients: Vec<usize>,
    /// Seconds per level and server.
    #[arg(long, default_value = "5")]
    pub secs: u64,
    /// Value size in bytes.
    #[arg(long, default_value = "256")]
    pub value_size: usize,
    #[command(flatten)]
    pub scale: crate::lockd_scale::ScaleArgs,
}

/// Entry point of `vha lockd bench`.
pub fn main(args: Vec<String>) -> std::process::ExitCode {
    use clap::Parser;
    let b = match BenchArgs::try_parse_from(std::iter::once("vha lockd bench".to_string()).chain(args)) {
        Ok(b) => b,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let res = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(run(&b)));
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vha lockd bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark and prints the table.
pub async fn run(b: &BenchArgs) -> Result<(), String> {
    let root = b.dir.join(format!("lockd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    if b.scale.entries.is_some() {
        let res = crate::lockd_scale::run(&root, &b.scale, b.value_size, &b.etcd_bin).await;
        let _ = std::fs::remove_dir_all(&root);
        return res;
    }
    let lport = free_port()?;
    // With a bearer token, as a deployment runs lockd (and as `vha dev` does).
    let token_file = root.join("lockd.token");
    let creds = LockdCredentials::token(crate::cluster::new_lockd_token(&token_file)?.as_str())?;
    let cmd = crate::scale_store::lockd_command(lport, &root.join("lockd"), &token_file)?;
    let _lockd = Child::spawn("lockd", cmd, None)?;
    let laddr = format!("http://127.0.0.1:{lport}");
    let connect = || LockdBackend::connect_with(&laddr, &creds).map_err(|e| e.to_string());
    let probe = connect()?;
    wait_until("lockd", crate::scale_store::START_TIMEOUT, || async {
        probe.get("bench/ready").await.ok()
    })
    .await?;

    let etcd_url = if b.no_etcd {
        None
    } else {
        let member = etcd::Member {
            name: "default".into(),
            client_port: free_port()?,
            peer_port: free_port()?,
            data_dir: root.join("etcd"),
        };
        let procs = etcd::start(&b.etcd_bin, std::slice::from_ref(&member), "vha-lockd-bench", None)
            .await
            .map_err(|e| format!("{e} (or pass --no-etcd)"))?;
        Some((procs, member.client_url()))
    };
    let http: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    // The guard: a lock held for the whole run, its token on every lockd write.
    let holder = connect()?;
    let guard = holder
        .acquire("bench/lock", "bench", Default::default())
        .await
        .map_err(|e| e.to_string())?
        .ok_or("bench lock not acquired")?;
    let fence = guard.fence().clone();
    let value = vec![b'v'; b.value_size];

    println!(
        "guarded writes, {} B values, {} s per level (lockd: fenced put; etcd {}: plain put via JSON gateway)",
        b.value_size,
        b.secs,
        etcd_version(&b.etcd_bin)
    );
    println!(
        "{:>7} | {:>11} {:>9} {:>9} | {:>11} {:>9} {:>9} | {:>10}",
        "clients", "lockd op/s", "p50", "p99", "etcd op/s", "p50", "p99", "lockd/etcd"
    );
    for &clients in &b.clients {
        let conns: Vec<LockdBackend> = (0..clients).map(|_| connect()).collect::<Result<_, _>>()?;
        let conns = Arc::new(conns);
        let (f, v) = (fence.clone(), value.clone());
        let l = drive(clients, b.secs, move |c, n| {
            let (conns, f, v) = (conns.clone(), f.clone(), v.clone());
            async move {
                conns[c]
                    .put(&format!("bench/c{c}/k{}", n % 1000), v, Some(&f))
                    .await
                    .is_ok()
            }
        })
        .await;
        let e = match &etcd_url {
            Some((_, url)) => {
                let (http, url, v) = (http.clone(), url.clone(), value.clone());
                Some(
                    drive(clients, b.secs, move |c, n| {
                        let (http, url, v) = (http.clone(), url.clone(), v.clone());
                        async move { etcd_put(&http, &url, &format!("bench/c{c}/k{}", n % 1000), &v).await }
                    })
                    .await,
                )
            }
            None => None,
        };
        let ms = |d: Duration| format!("{:.2}ms", d.as_secs_f64() * 1000.0);
        match e {
            Some(e) => println!(
                "{clients:>7} | {:>11.0} {:>9} {:>9} | {:>11.0} {:>9} {:>9} | {:>9.2}x{}",
                l.ops_per_sec,
                ms(l.p50),
                ms(l.p99),
                e.ops_per_sec,
                ms(e.p50),
                ms(e.p99),
                l.ops_per_sec / e.ops_per_sec.max(1e-9),
                if l.errors + e.errors > 0 {
                    format!("  (errors: lockd {}, etcd {})", l.errors, e.errors)
                } else {
                    String::new()
                }
            ),
            None => println!(
                "{clients:>7} | {:>11.0} {:>9} {:>9} | (etcd skipped)",
                l.ops_per_sec,
                ms(l.p50),
                ms(l.p99)
            ),
        }
    }
    let _ = guard.release().await;
    drop(etcd_url);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn etcd_version(bin: &str) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

async fn etcd_put(http: &Client<HttpConnector, Full<Bytes>>, url: &str, key: &str, value: &[u8]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({"key": b64.encode(key), "value": b64.encode(value)}).to_string();
    let Ok(req) = hyper::Request::post(format!("{url}/v3/kv/put"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
    else {
        return false;
    };
    match http.request(req).await {
        Ok(r) => {
            let ok = r.status().is_success();
            let _ = r.into_body().collect().await;
            ok
        }
        Err(_) => false,
    }
}

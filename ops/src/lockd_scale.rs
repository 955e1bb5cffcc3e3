//! `vha lockd bench --entries N`: lockd at scale. Fills a lockd child process with
//! `N` store entries through the real protocol and reports what a user with that much data
//! feels: write and lease-renewal latency percentiles while compactions happen, whether a
//! short lease (1 s) would have been lost, lockd's memory high-water against the live data,
//! the size on disk, and how long a `kill -9`-ed lockd takes to serve again.
//!
//! The data is shaped like KV v2 secrets: each secret is two store entries, written one
//! after the other like the node does (the version entry, then the metadata that makes it
//! current), every write fenced with the token of a lease that a separate task renews every
//! TTL/10, as an active node does. `N` counts store entries, so `--entries 2000000` is a
//! million secrets. Values are pseudo-random bytes (ciphertext does not compress).
//!
//! The measuring (percentiles, `/proc/<pid>/status` and Prometheus text parsing, the
//! holder's lost-lease rule) is in small pure functions tested at the bottom; the driving
//! around them is I/O.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use vha_core::storage::lockd::{LockdBackend, LockdCredentials};
use vha_core::storage::{Backend, Fence};

use crate::process::{status_bytes, Child};

/// How long lockd may take to answer after it starts (a debug build on a busy machine
/// starts within a few seconds).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of the scale run (flattened into `vha lockd bench`).
#[derive(clap::Args, Debug, Clone)]
pub struct ScaleArgs {
    /// Scale run: fill lockd with this many store entries (two per KV v2 secret) instead of
    /// the lockd-vs-etcd throughput table.
    #[arg(long)]
    pub entries: Option<u64>,
    /// Concurrent writers of the scale run (each its own connection, like `wrk -c32`).
    #[arg(long, default_value = "32")]
    pub writers: usize,
    /// TTL of the renewed lease whose token fences every write.
    #[arg(long, default_value = "1s")]
    pub lease_ttl: String,
    /// lockd's `compact_bytes` for the run (default: lockd's own default).
    #[arg(long)]
    pub compact_bytes: Option<u64>,
    /// Give up filling after this many seconds (the run still reports what it measured).
    #[arg(long, default_value = "3600")]
    pub max_secs: u64,
    /// How many times lockd is killed (`kill -9`) and restarted after the fill, each timed
    /// to the last key served; the table shows the slowest.
    #[arg(long, default_value = "3")]
    pub restarts: usize,
}

/// What a KV v2 write adds around the user's bytes in the version entry: the `{"data":{..}}`
/// JSON wrapper (about 15 bytes) and the barrier envelope (17-byte header + 16-byte tag).
pub(crate) const VERSION_OVERHEAD: usize = 48;
/// Size of a KV v2 metadata entry with one version: the serialized `KeyMetadata` (three
/// RFC 3339 timestamps, counters, flags: about 330 bytes) plus the barrier envelope.
pub(crate) const METADATA_LEN: usize = 360;
/// Renewal interval as a fraction of the TTL: what the lockd client does (TTL/10).
const RENEW_DIVISOR: u32 = 10;
/// How often a long fill reports its progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// The restart measurement polls for the last key this often (the resolution of the
/// reported restart time).
const RESTART_POLL: Duration = Duration::from_millis(5);
/// Longest a restarted lockd may take to serve before the run reports failure.
const RESTART_LIMIT: Duration = Duration::from_secs(300);

/// Latency summary of one kind of operation.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// The nearest-rank percentile `p` (0..=1) of `sorted` (ascending); zero when empty.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    pub(crate) fn of(mut lat: Vec<Duration>) -> Summary {
        lat.sort_unstable();
        Summary {
            count: lat.len(),
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
            max: lat.last().copied().unwrap_or_default(),
        }
    }
}

/// The value of an unlabelled series in Prometheus text exposition.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The lockd client's rule for when a holder gives up (see PROTOCOL.md, "Holder side"): its
/// deadline is the send time of the last successful renewal plus TTL - TTL/5. A renewal
/// answered after that deadline came too late: the holder had already stepped down.
pub(crate) fn renewal_too_late(last_ok_sent: Duration, answered: Duration, ttl: Duration) -> bool {
    answered > last_ok_sent + ttl - ttl / 5
}

/// The two store keys of secret `i`, shaped like KV v2's (`versions/<sha256 hex>/1` and
/// `metadata/<path>` under a mount's storage prefix).
pub(crate) fn secret_keys(i: u64) -> (String, String) {
    let h = |x: u64| {
        // splitmix64: spreads consecutive secrets over the key space like SHA-256 would.
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let hex = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        h(4 * i),
        h(4 * i + 1),
        h(4 * i + 2),
        h(4 * i + 3)
    );
    (
        format!("logical/5c0ffee0-bench/versions/{hex}/1"),
        format!("logical/5c0ffee0-bench/metadata/bench/secret-{i:08}"),
    )
}

/// `n` pseudo-random bytes (xorshift64 from `seed`): incompressible, like ciphertext.
pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Total size of the regular files under `dir` (recursively).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// The lockd under test (stopped when dropped, so no error path leaves it running).
struct Lockd {
    child: Child,
    port: u16,
    dir: PathBuf,
    compact_bytes: Option<u64>,
    /// lockd's bearer token file (outside its data directory), as a deployment runs it.
    token_file: PathBuf,
    creds: LockdCredentials,
}

impl Lockd {
    fn spawn(port: u16, dir: &Path, compact_bytes: Option<u64>) -> Result<Lockd, String> {
        let token_file = dir.with_extension("token");
        let token = crate::cluster::new_lockd_token(&token_file)?;
        Ok(Lockd {
            child: Lockd::start(port, dir, compact_bytes, &token_file)?,
            port,
            dir: dir.to_path_buf(),
            compact_bytes,
            token_file,
            creds: LockdCredentials::token(token.as_str())?,
        })
    }

    fn start(port: u16, dir: &Path, compact_bytes: Option<u64>, token_file: &Path) -> Result<Child, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args(["lockd", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir)
            .args(["--min-lease-ttl", "100ms", "--token-file"])
            .arg(token_file)
            .env("RUST_LOG", "warn");
        if let Some(c) = compact_bytes {
            cmd.args(["--compact-bytes", &c.to_string()]);
        }
        Child::spawn("lockd", cmd, None)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `kill -9`, reap, start again on the same directory and port.
    /// Returns whether the killed lockd left a `log.prev` (a compaction was in flight; the
    /// file's name is part of lockd's on-disk layout, `lockd/PROTOCOL.md`).
    fn kill_and_respawn(&mut self) -> Result<bool, String> {
        self.child.kill();
        let prev_left = self.dir.join("log.prev").exists();
        self.child = Lockd::start(self.port, &self.dir, self.compact_bytes, &self.token_file)?;
        Ok(prev_left)
    }

    /// A store client with lockd's token.
    fn client(&self) -> Result<LockdBackend, String> {
        LockdBackend::connect_with(&self.url(), &self.creds).map_err(|e| e.to_string())
    }

    /// A raw HTTP client that sends lockd's token.
    fn http(&self) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            creds: self.creds.clone(),
        }
    }
}

/// A write at least this slow is listed with its start time (the scale goal's bound on
/// the slowest write).
const SLOW_WRITE: Duration = Duration::from_millis(250);

/// Raw HTTP to lockd (lease calls and metrics), with its bearer token.
#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    creds: LockdCredentials,
}

impl Http {
    fn request(
        &self,
        b: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<hyper_util::client::legacy::ResponseFuture, String> {
        let token = self.creds.token.as_ref().map_or("", |t| t.as_str());
        let req = b
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        Ok(self.client.request(req))
    }
}

async fn post(http: &Http, url: &str, path: &str, body: Value) -> Result<(u16, Value), String> {
    let req = hyper::Request::post(format!("{url}{path}")).header("content-type", "application/json");
    let r = http
        .request(req, Bytes::from(body.to_string()))?
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let b = r.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&b).unwrap_or(Value::Null)))
}

async fn get_text(http: &Http, url: &str) -> Option<String> {
    let r = http.request(hyper::Request::get(url), Bytes::new()).ok()?.await.ok()?;
    let b = r.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(b.to_vec()).ok()
}

async fn compactions(http: &Http, url: &str) -> f64 {
    get_text(http, &format!("{url}/metrics"))
        .await
        .and_then(|t| metric_value(&t, "vha_lockd_compactions_total"))
        .unwrap_or(0.0)
}

/// Acquires `key` with `ttl` (no waiting) and returns the token.
async fn acquire(http: &Http, url: &str, key: &str, ttl: Duration) -> Result<u64, String> {
    let (status, v) = post(
        http,
        url,
        "/v1/lock/acquire",
        json!({"key": key, "value": format!("scale-{}", std::process::id()), "ttl_ms": ttl.as_millis() as u64, "wait_ms": 0}),
    )
    .await?;
    match v.get("token").and_then(Value::as_u64) {
        Some(t) if status == 200 && v["granted"] == true => Ok(t),
        _ => Err(format!("acquiring {key}: {status} {v}")),
    }
}

/// The renewer's findings.
#[derive(Default)]
struct Renewals {
    lat: Vec<Duration>,
    /// Renewals answered after the holder's own deadline (client rule).
    late: u64,
    /// Renewals lockd refused (`lease_expired`/`unknown_lease`): the lease was gone.
    refused: u64,
}

/// Renews `key` every TTL/10 until `stop`; on a refusal re-acquires and publishes the new
/// token so writers keep going.
async fn renewer(
    http: Http,
    url: String,
    key: String,
    ttl: Duration,
    token: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Renewals {
    let origin = Instant::now();
    let mut r = Renewals::default();
    let mut last_ok_sent = origin.elapsed();
    let mut tick = tokio::time::interval(ttl / RENEW_DIVISOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let sent = origin.elapsed();
        let t = Instant::now();
        let res = post(
            &http,
            &url,
            "/v1/lock/renew",
            json!({"key": key, "token": token.load(Ordering::Relaxed)}),
        )
        .await;
        let answered = origin.elapsed();
        match res {
            Ok((200, _)) => {
                r.lat.push(t.elapsed());
                if renewal_too_late(last_ok_sent, answered, ttl) {
                    r.late += 1;
                }
                last_ok_sent = sent;
            }
            Ok((409 | 404, _)) => {
                r.refused += 1;
                if let Ok(t) = acquire(&http, &url, &key, ttl).await {
                    token.store(t, Ordering::Relaxed);
                    last_ok_sent = origin.elapsed();
                }
            }
            _ => {}
        }
    }
    r
}

/// What a scale run measured.
struct Outcome {
    secrets: u64,
    fill: Duration,
    writes: Summary,
    write_errors: u64,
    renewals: Summary,
    late: u64,
    refused: u64,
    compactions: f64,
    hwm: u64,
    rss: u64,
    live: u64,
    disk: u64,
    /// Each restart: how long it took, and whether the killed lockd left a `log.prev` (a
    /// compaction in flight, folded again by the restarted one).
    restarts: Vec<(Duration, bool)>,
    restart_hwm: u64,
    /// Writes that took [`SLOW_WRITE`] or more: when they started (since the fill began)
    /// and how long they took, to set beside the compactions in the progress lines.
    slow: Vec<(Duration, Duration)>,
}

async fn run_once(root: &Path, args: &ScaleArgs, value_size: usize, port: u16) -> Result<Outcome, String> {
    let entries = args.entries.unwrap_or(0);
    let secrets = entries.div_ceil(2);
    let ttl = vha_core::duration::parse(&args.lease_ttl).map_err(|e| e.to_string())?;
    let dir = root.join("scale");
    let mut lockd = Lockd::spawn(port, &dir, args.compact_bytes)?;
    let url = lockd.url();
    let http = lockd.http();
    let probe = lockd.client()?;
    crate::process::wait_until("lockd", START_TIMEOUT, || async { probe.get("bench/ready").await.ok() }).await?;

    let lock = "bench/scale-lock".to_string();
    let token = Arc::new(AtomicU64::new(acquire(&http, &url, &lock, ttl).await?));
    let stop = Arc::new(AtomicBool::new(false));
    let renew_task = tokio::spawn(renewer(
        http.clone(),
        url.clone(),
        lock.clone(),
        ttl,
        token.clone(),
        stop.clone(),
    ));
    let c0 = compactions(&http, &url).await;

    let next = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_secs);
    let mut tasks = Vec::new();
    for _ in 0..args.writers.max(1) {
        let b = lockd.client()?;
        let (next, live, token, lock) = (next.clone(), live.clone(), token.clone(), lock.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut slow) = (Vec::new(), 0u64, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= secrets || Instant::now() >= deadline {
                    break;
                }
                let (vk, mk) = secret_keys(i);
                for (k, v) in [
                    (vk, noise(2 * i, value_size + VERSION_OVERHEAD)),
                    (mk, noise(2 * i + 1, METADATA_LEN)),
                ] {
                    let size = (k.len() + v.len()) as u64;
                    let f = Fence {
                        lock: lock.clone(),
                        token: token.load(Ordering::Relaxed),
                    };
                    let t = Instant::now();
                    match b.put(&k, v, Some(&f)).await {
                        Ok(()) => {
                            let took = t.elapsed();
                            if took >= SLOW_WRITE {
                                slow.push((t.duration_since(started), took));
                            }
                            lat.push(took);
                            live.fetch_add(size, Ordering::Relaxed);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (lat, errors, slow)
        }));
    }
    // Progress on stderr, so a long run shows it is alive (aborted when the fill ends).
    let progress = {
        let (next, http, url) = (next.clone(), http.clone(), url.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let n = next.load(Ordering::Relaxed).min(secrets);
                let c = compactions(&http, &url).await - c0;
                eprintln!(
                    "  {:>5.0}s: {n} secrets, {c} compactions",
                    started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let (mut lat, mut write_errors, mut slow) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        let (l, e, sl) = t.await.map_err(|e| e.to_string())?;
        lat.extend(l);
        write_errors += e;
        slow.extend(sl);
    }
    let fill = started.elapsed();
    progress.abort();
    stop.store(true, Ordering::Relaxed);
    let ren = renew_task.await.map_err(|e| e.to_string())?;
    let compactions = compactions(&http, &url).await - c0;
    let status = proc_status(lockd.pid());
    let (hwm, rss) = (
        status_bytes(&status, "VmHWM").unwrap_or(0),
        status_bytes(&status, "VmRSS").unwrap_or(0),
    );
    let disk = dir_bytes(&dir);
    let done = next.load(Ordering::Relaxed).min(secrets);

    // Restarts: kill -9, start again, time until the last key written is served.
    let (_, last_key) = secret_keys(done.saturating_sub(1));
    drop(probe);
    let mut restarts = Vec::new();
    for _ in 0..args.restarts.max(1) {
        let t = Instant::now();
        let prev_left = lockd.kill_and_respawn()?;
        let c = lockd.client()?.with_request_timeout(Duration::from_secs(1));
        let took = loop {
            if let Ok(Some(_)) = c.get(&last_key).await {
                break t.elapsed();
            }
            if t.elapsed() > RESTART_LIMIT {
                return Err(format!(
                    "restarted lockd did not serve {last_key} within {RESTART_LIMIT:?}"
                ));
            }
            tokio::time::sleep(RESTART_POLL).await;
        };
        restarts.push((took, prev_left));
    }
    let restart_hwm = status_bytes(&proc_status(lockd.pid()), "VmHWM").unwrap_or(0);
    drop(lockd);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Outcome {
        secrets: done,
        fill,
        writes: Summary::of(lat),
        write_errors,
        renewals: Summary::of(ren.lat),
        late: ren.late,
        refused: ren.refused,
        compactions,
        hwm,
        rss,
        live: live.load(Ordering::Relaxed),
        disk,
        restarts,
        restart_hwm,
        slow,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mb(b: u64) -> String {
    format!("{:.0}", b as f64 / 1e6)
}

/// Runs the scale benchmark and prints its row.
pub(crate) async fn run(root: &Path, args: &ScaleArgs, value_size: usize) -> Result<(), String> {
    let entries = args.entries.unwrap_or(0);
    println!(
        "scale: {entries} store entries = {} KV v2 secrets (version entry {} B + metadata entry {} B), \
         {} writers, every write fenced by a lease with TTL {} renewed every TTL/{RENEW_DIVISOR}",
        entries.div_ceil(2),
        value_size + VERSION_OVERHEAD,
        METADATA_LEN,
        args.writers,
        args.lease_ttl
    );
    let port = vha_core::ports::free_port()?;
    let o = run_once(root, args, value_size, port).await?;
    println!(
        "{:>8} {:>6} {:>6} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>4} {:>5} | {:>4} | {:>6} {:>6} {:>6} {:>5} | {:>6} | {:>7} {:>6}",
        "secrets", "fill s", "w/s", "w p50", "w p99", "w max", "r p50", "r p99", "r max", "late", "lost", "cmp",
        "HWM MB", "RSS MB", "live", "HWM/l", "disk", "restart", "r HWM"
    );
    {
        println!(
            "{:>8} {:>6.0} {:>6.0} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>4} {:>5} | {:>4} | {:>6} {:>6} {:>6} {:>5.2} | {:>6} | {:>7} {:>6}{}",
            o.secrets,
            o.fill.as_secs_f64(),
            o.writes.count as f64 / o.fill.as_secs_f64().max(1e-9),
            ms(o.writes.p50),
            ms(o.writes.p99),
            ms(o.writes.max),
            ms(o.renewals.p50),
            ms(o.renewals.p99),
            ms(o.renewals.max),
            o.late,
            o.refused,
            o.compactions,
            mb(o.hwm),
            mb(o.rss),
            mb(o.live),
            o.hwm as f64 / o.live.max(1) as f64,
            mb(o.disk),
            format!("{}ms", ms(o.restarts.iter().map(|r| r.0).max().unwrap_or_default())),
            mb(o.restart_hwm),
            if o.write_errors > 0 {
                format!("  ({} write errors)", o.write_errors)
            } else {
                String::new()
            }
        );
    }
    let each: Vec<String> = o
        .restarts
        .iter()
        .map(|(took, prev)| format!("{}ms{}", ms(*took), if *prev { " (log.prev left)" } else { "" }))
        .collect();
    println!("restarts, kill -9 to the last key served: {}", each.join(", "));
    if !o.slow.is_empty() {
        let mut slow = o.slow.clone();
        slow.sort();
        let shown: Vec<String> = slow
            .iter()
            .take(20)
            .map(|(at, took)| format!("{:.1}s:{}ms", at.as_secs_f64(), ms(*took)))
            .collect();
        println!(
            "writes of {}ms or more: {} (start since fill began: took) {}{}",
            ms(SLOW_WRITE),
            slow.len(),
            shown.join(" "),
            if slow.len() > shown.len() { " ..." } else { "" }
        );
    }
    println!(
        "(latencies in ms; w = fenced put, r = lease renewal; late = renewals answered after the holder's \
         own deadline, lost = renewals refused because the lease had ended; cmp = compactions crossed; \
         live = key + value bytes written; disk = data dir after the fill; restart = the slowest of the restarts, kill -9 to the last key served; \
         r HWM = memory high-water of the restarted lockd)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Nearest-rank percentiles: p50 of 1..=100 ms is 50 ms, p99 is 99 ms, the max is the
    /// largest; one sample is every percentile; none gives zeros.
    #[test]
    fn percentiles_by_nearest_rank() {
        let lat: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let s = Summary::of(lat);
        assert_eq!((s.count, s.p50, s.p99, s.max), (100, ms(50), ms(99), ms(100)));
        let one = Summary::of(vec![ms(7)]);
        assert_eq!((one.p50, one.p99, one.max), (ms(7), ms(7), ms(7)));
        assert_eq!(Summary::of(Vec::new()), Summary::default());
        // A single slow outlier in 1000 shows in max, not p99.
        let mut lat = vec![ms(1); 999];
        lat.push(ms(4500));
        let s = Summary::of(lat);
        assert_eq!((s.p99, s.max), (ms(1), ms(4500)));
    }

    /// Unlabelled series are found by exact name (not by a longer name sharing the prefix).
    #[test]
    fn prometheus_values() {
        let text = "# HELP vha_lockd_compactions_total x\n# TYPE vha_lockd_compactions_total counter\n\
                    vha_lockd_compactions_total_extra 9\nvha_lockd_compactions_total 4\n";
        assert_eq!(metric_value(text, "vha_lockd_compactions_total"), Some(4.0));
        assert_eq!(metric_value(text, "vha_lockd_log_bytes"), None);
    }

    /// A 1 s lease: a renewal answered 799 ms after the last good one was sent is in time,
    /// one answered after 800 ms (TTL - TTL/5) is too late for the holder.
    #[test]
    fn late_renewal_rule() {
        let ttl = Duration::from_secs(1);
        assert!(!renewal_too_late(ms(1000), ms(1799), ttl));
        assert!(!renewal_too_late(ms(1000), ms(1800), ttl));
        assert!(renewal_too_late(ms(1000), ms(1801), ttl));
    }

    /// Secret keys are valid store keys, distinct, and shaped like KV v2's two entries; the
    /// noise is deterministic per seed and of the asked length.
    #[test]
    fn secret_shape() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let (v, m) = secret_keys(i);
            vha_core::storage::validate_key(&v).unwrap();
            vha_core::storage::validate_key(&m).unwrap();
            assert!(v.contains("/versions/") && v.ends_with("/1") && m.contains("/metadata/"));
            assert!(seen.insert(v) && seen.insert(m));
        }
        assert_eq!(noise(3, 301).len(), 301);
        assert_eq!(noise(3, 64), noise(3, 64));
        assert_ne!(noise(3, 64), noise(4, 64));
    }
}

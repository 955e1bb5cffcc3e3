//! `vha lockd bench --entries N`: lockd at scale. Fills a lockd child process (or, with
//! `--stores lockd,etcd`, lockd and then one etcd member, side by side from one run; see
//! [`crate::scale_store`]) with `N` store entries through the real protocol and reports
//! what a user with that much data feels: write and lease-renewal latency percentiles while
//! compactions happen, whether a short lease (`--lease-ttl`, 1 s; etcd raises it to its
//! 2 s minimum) would have been lost, the store's memory
//! high-water against the live data, the size on disk, and how long a `kill -9`-ed store
//! takes to serve again.
//!
//! The data is shaped like KV v2 secrets: each secret is two store entries, written one
//! after the other like the node does (the version entry, then the metadata that makes it
//! current), every write fenced with the token of a lease that a separate task renews every
//! TTL/10, as an active node does. `N` counts store entries, so `--entries 2000000` is a
//! million secrets. Values are pseudo-random bytes (ciphertext does not compress).
//!
//! The measuring (percentiles, `/proc/<pid>/status` parsing, the
//! holder's lost-lease rule) is in small pure functions tested at the bottom; the driving
//! around them is I/O.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vha_core::storage::Fence;

use crate::process::status_bytes;
use crate::scale_store::{Lease, Renewed, ScaleStore, Target};

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
    /// TTL of the renewed lease (on lockd its token fences every write; on etcd the writes
    /// are fenced by vha's etcd HA lock at that backend's default TTL, 10 s, and this lease
    /// is renewed beside them).
    #[arg(long, default_value = "1s")]
    pub lease_ttl: String,
    /// lockd's `compact_bytes` for the run (default: lockd's own default).
    #[arg(long)]
    pub compact_bytes: Option<u64>,
    /// Give up filling after this many seconds (the run still reports what it measured).
    #[arg(long, default_value = "3600")]
    pub max_secs: u64,
    /// How many times the store is killed (`kill -9`) and restarted after the fill, each
    /// timed to the last key served; the table shows the slowest.
    #[arg(long, default_value = "3")]
    pub restarts: usize,
    /// The stores to fill, one after the other on the same disk (`lockd,etcd`: side by side
    /// from one run; etcd is one member from Debian's `etcd-server`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "lockd")]
    pub stores: Vec<ScaleStore>,
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
/// Longest a restarted store may take to serve before the run reports failure.
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

/// A write at least this slow is listed with its start time (the scale goal's bound on
/// the slowest write).
const SLOW_WRITE: Duration = Duration::from_millis(250);

/// The renewer's findings.
#[derive(Default)]
struct Renewals {
    lat: Vec<Duration>,
    /// Renewals answered after the holder's own deadline (client rule).
    late: u64,
    /// Renewals the store refused (lockd `lease_expired`/`unknown_lease`, etcd a result
    /// without TTL): the lease was gone.
    refused: u64,
}

/// Renews `lease` (id in `id`) every TTL/10 until `stop`; on a refusal grants it again and
/// publishes the new id (on lockd the new token, so writers keep going).
async fn renewer(mut lease: Lease, ttl: Duration, id: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Renewals {
    let origin = Instant::now();
    let mut r = Renewals::default();
    let mut last_ok_sent = origin.elapsed();
    let mut tick = tokio::time::interval(lease.ttl / RENEW_DIVISOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let sent = origin.elapsed();
        let t = Instant::now();
        let res = lease.renew(id.load(Ordering::Relaxed)).await;
        let answered = origin.elapsed();
        match res {
            Ok(Renewed::Yes) => {
                r.lat.push(t.elapsed());
                if renewal_too_late(last_ok_sent, answered, lease.ttl) {
                    r.late += 1;
                }
                last_ok_sent = sent;
            }
            Ok(Renewed::Refused) => {
                r.refused += 1;
                if let Ok(t) = lease.grant(ttl).await {
                    id.store(t, Ordering::Relaxed);
                    last_ok_sent = origin.elapsed();
                }
            }
            Err(_) => {}
        }
    }
    r
}

/// What a scale run measured.
struct Outcome {
    store: ScaleStore,
    /// The lease TTL the store granted (etcd raises a TTL below its minimum).
    ttl: Duration,
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

async fn run_once(
    root: &Path,
    args: &ScaleArgs,
    value_size: usize,
    store: ScaleStore,
    etcd_bin: &str,
) -> Result<Outcome, String> {
    let entries = args.entries.unwrap_or(0);
    let secrets = entries.div_ceil(2);
    let ttl = vha_core::duration::parse(&args.lease_ttl).map_err(|e| e.to_string())?;
    let dir = root.join(format!("scale-{}", store.name()));
    let mut target = Target::start(store, &dir, args.compact_bytes, etcd_bin).await?;

    let mut lease = target.lease();
    let lease_id = Arc::new(AtomicU64::new(lease.grant(ttl).await?));
    let granted = lease.ttl;
    let (lock, token) = target.fence(&lease_id);
    let stop = Arc::new(AtomicBool::new(false));
    let renew_task = tokio::spawn(renewer(lease, ttl, lease_id, stop.clone()));
    let counter = target.compaction_counter();
    let c0 = counter.get().await;

    let next = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicU64::new(0));
    // Secrets whose two entries were both written, and the highest such index + 1 (the key
    // the restarts wait for): a claimed index is not a written one once the deadline ends
    // the fill or a write fails.
    let written = Arc::new(AtomicU64::new(0));
    let highest = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_secs);
    let mut tasks = Vec::new();
    for _ in 0..args.writers.max(1) {
        let b = target.writer()?;
        let (next, live, token, lock) = (next.clone(), live.clone(), token.clone(), lock.clone());
        let (written, highest) = (written.clone(), highest.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut slow) = (Vec::new(), 0u64, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= secrets || Instant::now() >= deadline {
                    break;
                }
                let (vk, mk) = secret_keys(i);
                let mut both = true;
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
                        Err(_) => {
                            errors += 1;
                            both = false;
                        }
                    }
                }
                if both {
                    written.fetch_add(1, Ordering::Relaxed);
                    highest.fetch_max(i + 1, Ordering::Relaxed);
                }
            }
            (lat, errors, slow)
        }));
    }
    // Progress on stderr, so a long run shows it is alive (aborted when the fill ends).
    let progress = {
        let (written, counter) = (written.clone(), counter.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let n = written.load(Ordering::Relaxed);
                let c = counter.get().await - c0;
                eprintln!(
                    "  {}: {:>5.0}s: {n} secrets, {c} compactions",
                    store.name(),
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
    let _ = progress.await;
    stop.store(true, Ordering::Relaxed);
    let ren = renew_task.await.map_err(|e| e.to_string())?;
    let compactions = counter.get().await - c0;
    let fence_lost = target.fence_lost();
    let status = proc_status(target.pid());
    let (hwm, rss) = (
        status_bytes(&status, "VmHWM").unwrap_or(0),
        status_bytes(&status, "VmRSS").unwrap_or(0),
    );
    let disk = dir_bytes(target.dir());
    let done = written.load(Ordering::Relaxed);

    // Restarts: kill -9, start again, time until the last key written is served (none when
    // nothing was written: there is no key to wait for).
    let (_, last_key) = secret_keys(highest.load(Ordering::Relaxed).saturating_sub(1));
    let rounds = if done == 0 { 0 } else { args.restarts.max(1) };
    let mut restarts = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let prev_left = target.kill_and_respawn()?;
        let c = target.probe_client()?;
        let took = loop {
            if let Ok(Some(_)) = c.get(&last_key).await {
                break t.elapsed();
            }
            if t.elapsed() > RESTART_LIMIT {
                return Err(format!(
                    "restarted {} did not serve {last_key} within {RESTART_LIMIT:?}",
                    store.name()
                ));
            }
            tokio::time::sleep(RESTART_POLL).await;
        };
        restarts.push((took, prev_left));
    }
    let restart_hwm = status_bytes(&proc_status(target.pid()), "VmHWM").unwrap_or(0);
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Outcome {
        store,
        ttl: granted,
        secrets: done,
        fill,
        writes: Summary::of(lat),
        write_errors,
        renewals: Summary::of(ren.lat),
        late: ren.late,
        refused: ren.refused + u64::from(fence_lost),
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

/// Runs the scale benchmark on each of `args.stores`, one after the other on the same disk,
/// and prints one row per store.
pub(crate) async fn run(root: &Path, args: &ScaleArgs, value_size: usize, etcd_bin: &str) -> Result<(), String> {
    let entries = args.entries.unwrap_or(0);
    println!(
        "scale: {entries} store entries = {} KV v2 secrets (version entry {} B + metadata entry {} B), \
         {} writers, every write fenced; a lease with TTL {} renewed every TTL/{RENEW_DIVISOR}",
        entries.div_ceil(2),
        value_size + VERSION_OVERHEAD,
        METADATA_LEN,
        args.writers,
        args.lease_ttl
    );
    let (mut outcomes, mut failures) = (Vec::new(), Vec::new());
    for &store in &args.stores {
        match run_once(root, args, value_size, store, etcd_bin).await {
            Ok(o) => outcomes.push(o),
            Err(e) => failures.push(format!("{}: {e}", store.name())),
        }
    }
    println!(
        "{:>5} {:>8} {:>6} {:>6} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>4} {:>5} | {:>4} | {:>6} {:>6} {:>6} {:>5} | {:>6} | {:>7} {:>6}",
        "store", "secrets", "fill s", "w/s", "w p50", "w p99", "w max", "r p50", "r p99", "r max", "late", "lost", "cmp",
        "HWM MB", "RSS MB", "live", "HWM/l", "disk", "restart", "r HWM"
    );
    for o in &outcomes {
        println!(
            "{:>5} {:>8} {:>6.0} {:>6.0} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>4} {:>5} | {:>4} | {:>6} {:>6} {:>6} {:>5.2} | {:>6} | {:>7} {:>6}{}",
            o.store.name(),
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
    for o in &outcomes {
        let each: Vec<String> = o
            .restarts
            .iter()
            .map(|(took, prev)| format!("{}ms{}", ms(*took), if *prev { " (log.prev left)" } else { "" }))
            .collect();
        println!(
            "{}: lease TTL granted {:?}; restarts, kill -9 to the last key served: {}",
            o.store.name(),
            o.ttl,
            each.join(", ")
        );
        if !o.slow.is_empty() {
            let mut slow = o.slow.clone();
            slow.sort();
            let shown: Vec<String> = slow
                .iter()
                .take(20)
                .map(|(at, took)| format!("{:.1}s:{}ms", at.as_secs_f64(), ms(*took)))
                .collect();
            println!(
                "{}: writes of {}ms or more: {} (start since fill began: took) {}{}",
                o.store.name(),
                ms(SLOW_WRITE),
                slow.len(),
                shown.join(" "),
                if slow.len() > shown.len() { " ..." } else { "" }
            );
        }
    }
    println!(
        "(latencies in ms; w = fenced put, r = lease renewal (etcd: one keep-alive request through its JSON gateway, \
         a new gateway stream each time; vha's etcd holder keeps one gRPC keep-alive stream instead); \
         late = renewals answered after the holder's own deadline, lost = renewals refused because the lease had ended \
         (etcd: also its 10 s fencing lock lost); cmp = compactions crossed (etcd: raft snapshots); \
         live = key + value bytes written; disk = data dir after the fill; restart = the slowest of the restarts, \
         kill -9 to the last key served; r HWM = memory high-water of the restarted store)"
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
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

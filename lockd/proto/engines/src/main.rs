//! Prototype measurement for lockd's storage design: does an embedded storage engine
//! (fjall, an LSM tree; redb, a copy-on-write B-tree) keep lockd's group commit fast and
//! its latency flat at a million KV v2 secrets, and what do memory and restart cost?
//!
//! The harness is lockd's write path without the protocol: `--writers` threads each write
//! one secret at a time as two entries (version entry then metadata entry, the same keys
//! and sizes as `vha lockd bench --entries`), handing each write to one committer thread
//! and waiting for its acknowledgement; the committer takes everything queued, makes it
//! durable in one batch (one fsync), and acknowledges the batch: group commit. The `append`
//! engine is lockd's own log reduced to its core (append + fdatasync, no state): the floor.
//!
//! `run ENGINE DIR ENTRIES WRITERS`: fills in a child process (so its memory is its own),
//! `kill -9`s it, and times a fresh process opening the data and reading the last key.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable};

const VERSION_LEN: usize = 304;
const METADATA_LEN: usize = 360;

fn secret_keys(i: u64) -> (String, String) {
    let h = |x: u64| {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let hex = format!("{:016x}{:016x}{:016x}{:016x}", h(4 * i), h(4 * i + 1), h(4 * i + 2), h(4 * i + 3));
    (
        format!("logical/5c0ffee0-bench/versions/{hex}/1"),
        format!("logical/5c0ffee0-bench/metadata/bench/secret-{i:08}"),
    )
}

fn noise(seed: u64, n: usize) -> Vec<u8> {
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

trait Engine: Send {
    /// Makes `batch` durable atomically (one fsync).
    fn commit(&mut self, batch: &[(String, Vec<u8>)]);
    fn get(&self, key: &str) -> Option<Vec<u8>>;
}

struct Append(std::fs::File);
impl Engine for Append {
    fn commit(&mut self, batch: &[(String, Vec<u8>)]) {
        let mut buf = Vec::new();
        for (k, v) in batch {
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(k.as_bytes());
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
        self.0.write_all(&buf).unwrap();
        self.0.sync_data().unwrap();
    }
    fn get(&self, _key: &str) -> Option<Vec<u8>> {
        None
    }
}

struct Fjall {
    db: fjall::Database,
    ks: fjall::Keyspace,
}
impl Engine for Fjall {
    fn commit(&mut self, batch: &[(String, Vec<u8>)]) {
        let mut b = self.db.batch().durability(Some(fjall::PersistMode::SyncData));
        for (k, v) in batch {
            b.insert(&self.ks, k.as_bytes(), v.as_slice());
        }
        b.commit().unwrap();
    }
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.ks.get(key).unwrap().map(|v| v.to_vec())
    }
}

const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");
struct Redb(redb::Database);
impl Engine for Redb {
    fn commit(&mut self, batch: &[(String, Vec<u8>)]) {
        let tx = self.0.begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (k, v) in batch {
                t.insert(k.as_str(), v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let tx = self.0.begin_read().unwrap();
        let t = tx.open_table(TABLE).ok()?;
        t.get(key).unwrap().map(|v| v.value().to_vec())
    }
}

/// Cache sizes: fjall's block cache and redb's page cache both 64 MiB, so neither holds the
/// data set in RAM (the point of an engine) and memory figures compare.
const CACHE: u64 = 64 << 20;

fn open(engine: &str, dir: &Path) -> Box<dyn Engine> {
    std::fs::create_dir_all(dir).unwrap();
    match engine {
        "append" => Box::new(Append(
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log")).unwrap(),
        )),
        "fjall" => {
            let db = fjall::Database::builder(dir.join("fjall")).cache_size(CACHE).open().unwrap();
            let ks = db.keyspace("kv", fjall::KeyspaceCreateOptions::default).unwrap();
            Box::new(Fjall { db, ks })
        }
        "redb" => {
            let p = dir.join("redb");
            let db = redb::Database::builder().set_cache_size(CACHE as usize).create(p).unwrap();
            Box::new(Redb(db))
        }
        e => panic!("unknown engine {e}"),
    }
}

fn status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

struct Queue {
    items: Mutex<(Vec<(String, Vec<u8>)>, Vec<Arc<(Mutex<bool>, Condvar)>>)>,
    wake: Condvar,
}

/// Child: fill, print the results line and `FILLED`, then wait to be killed.
fn fill(engine: &str, dir: &Path, entries: u64, writers: usize) {
    let mut eng = open(engine, dir);
    let q = Arc::new(Queue {
        items: Mutex::new((Vec::new(), Vec::new())),
        wake: Condvar::new(),
    });
    let commits = Arc::new(Mutex::new(Vec::<(Duration, usize)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = {
        let (q, commits, stop) = (q.clone(), commits.clone(), stop.clone());
        std::thread::spawn(move || {
            loop {
                let (batch, waiters) = {
                    let mut g = q.items.lock().unwrap();
                    while g.0.is_empty() && !stop.load(Ordering::Relaxed) {
                        g = q.wake.wait(g).unwrap();
                    }
                    if g.0.is_empty() {
                        return eng;
                    }
                    (std::mem::take(&mut g.0), std::mem::take(&mut g.1))
                };
                let t = Instant::now();
                eng.commit(&batch);
                commits.lock().unwrap().push((t.elapsed(), batch.len()));
                for w in waiters {
                    *w.0.lock().unwrap() = true;
                    w.1.notify_one();
                }
            }
        })
    };
    let secrets = entries.div_ceil(2);
    let next = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (q, next, live) = (q.clone(), next.clone(), live.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let me = Arc::new((Mutex::new(false), Condvar::new()));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= secrets {
                        return lat;
                    }
                    let (vk, mk) = secret_keys(i);
                    for (k, v) in [(vk, noise(2 * i, VERSION_LEN)), (mk, noise(2 * i + 1, METADATA_LEN))] {
                        live.fetch_add((k.len() + v.len()) as u64, Ordering::Relaxed);
                        let t = Instant::now();
                        *me.0.lock().unwrap() = false;
                        {
                            let mut g = q.items.lock().unwrap();
                            g.0.push((k, v));
                            g.1.push(me.clone());
                        }
                        q.wake.notify_one();
                        let mut d = me.0.lock().unwrap();
                        while !*d {
                            d = me.1.wait(d).unwrap();
                        }
                        lat.push(t.elapsed());
                    }
                }
            })
        })
        .collect();
    let progress = {
        let (next, engine) = (next.clone(), engine.to_string());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(20));
            let n = next.load(Ordering::Relaxed);
            eprintln!("  {engine}: {:.0}s {} secrets", start.elapsed().as_secs_f64(), n.min(secrets));
            if n >= secrets {
                return;
            }
        })
    };
    let mut lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    q.wake.notify_one();
    let eng = committer.join().unwrap();
    drop(progress);
    lat.sort_unstable();
    let mut c = commits.lock().unwrap().clone();
    let batches = c.len();
    let avg_batch = c.iter().map(|x| x.1).sum::<usize>() as f64 / batches.max(1) as f64;
    let mut ct: Vec<Duration> = c.drain(..).map(|x| x.0).collect();
    ct.sort_unstable();
    let (last_key, _) = secret_keys(secrets - 1);
    let check = eng.get(&last_key).is_some();
    println!(
        "RESULT engine={engine} entries={} secs={:.1} wps={:.0} w_p50={:.1} w_p99={:.1} w_max={:.1} commit_p50={:.1} commit_p99={:.1} commit_max={:.1} batch={avg_batch:.1} hwm_mb={:.0} rss_mb={:.0} live_mb={:.0} disk_mb={:.0} readback={check}",
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        pct(&ct, 0.5),
        pct(&ct, 0.99),
        pct(&ct, 1.0),
        status("VmHWM") as f64 / 1e6,
        status("VmRSS") as f64 / 1e6,
        live.load(Ordering::Relaxed) as f64 / 1e6,
        dir_bytes(dir) as f64 / 1e6,
    );
    println!("FILLED");
    std::io::stdout().flush().unwrap();
    // Wait for the parent's kill -9 (the engine is not closed cleanly).
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
    std::mem::forget(eng);
    std::process::exit(0);
}

/// Child: open after the kill -9 and read the last key; print the time and memory.
fn reopen(engine: &str, dir: &Path, key: &str) {
    let t = Instant::now();
    let eng = open(engine, dir);
    let found = eng.get(key).is_some();
    println!(
        "REOPEN engine={engine} secs={:.3} found={found} hwm_mb={:.0}",
        t.elapsed().as_secs_f64(),
        status("VmHWM") as f64 / 1e6
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let exe = std::env::current_exe().unwrap();
    match a.get(1).map(String::as_str) {
        Some("fill") => fill(&a[2], Path::new(&a[3]), a[4].parse().unwrap(), a[5].parse().unwrap()),
        Some("reopen") => reopen(&a[2], Path::new(&a[3]), &a[4]),
        Some("run") => {
            let root = PathBuf::from(&a[3]);
            let entries: u64 = a[4].parse().unwrap();
            for engine in a[2].split(',') {
                let dir = root.join(format!("proto-{engine}"));
                let _ = std::fs::remove_dir_all(&dir);
                let mut child = Command::new(&exe)
                    .args(["fill", engine])
                    .arg(&dir)
                    .args([&a[4], &a[5]])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let out = BufReader::new(child.stdout.take().unwrap());
                for line in out.lines() {
                    let line = line.unwrap();
                    if line == "FILLED" {
                        break;
                    }
                    println!("{line}");
                }
                child.kill().unwrap();
                child.wait().unwrap();
                let (last, _) = secret_keys(entries.div_ceil(2) - 1);
                let o = Command::new(&exe).args(["reopen", engine]).arg(&dir).arg(&last).output().unwrap();
                print!("{}", String::from_utf8_lossy(&o.stdout));
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        _ => eprintln!("usage: run ENGINES DIR ENTRIES WRITERS"),
    }
}

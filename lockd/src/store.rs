//! The durable state machine: KV map + lease table, an append-only log with group commit,
//! and snapshot-based compaction.
//!
//! Writers mutate the in-memory state and append a record under one mutex (so log order is
//! apply order), then wait until a single writer thread has written and fsynced the batch
//! their record is in: concurrent writers share one fsync (group commit). Reads wait until
//! everything they could have seen is durable, and watch events are published only after
//! the fsync, so nobody observes a write that a crash could still take back. When the log
//! outgrows [`StoreOptions::compact_bytes`] (and half the last snapshot) it is compacted in
//! the background: the KV map is persistent ([`KvMap`]), so compaction takes an O(1) view of
//! the state under the lock, moves the log aside (`log` -> `log.prev`) and starts a fresh
//! one, and a background thread streams the view into the snapshot (atomic rename), then
//! removes `log.prev`. Writers never wait for it. Recovery streams snapshot, `log.prev` and
//! `log` in that order (one thread reads and decodes, another applies); a torn or corrupt
//! tail is truncated; held leases restart with a full TTL; a left-over `log.prev` is folded
//! by a background compaction once the store serves. (The design before this one
//! serialized the state under the lock; PROTOCOL.md has the measurements that replaced it.)

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch, Notify};
use vha_core::storage::lockd::protocol::{PutRequest, WireEntry, WireHolder};
use vha_core::storage::{list_children, validate_key, validate_value_len, Fence, MAX_KEY_LEN, MAX_LOCAL_VALUE_LEN};

use crate::error::{LockdError, StoreError};
use crate::kvmap::{KvMap, Stored};
use crate::lease::{Effect, EndReason, LeaseTable};
use crate::log::{self, Record};
use crate::metrics::Metrics;

/// Log size below which no compaction starts: small logs replay in well under a second, and
/// each compaction rewrites the whole snapshot, so a small store is not rewritten for every
/// few writes.
pub const DEFAULT_COMPACT_BYTES: u64 = 64 * 1024 * 1024;
/// How many watch events may queue for a slow watcher before it gets `resync` instead.
pub const EVENT_QUEUE: usize = 4096;
/// How long a cancelled acquire attempt is remembered: longer than any request of it can
/// still be running (a blocking acquire waits at most 30 s, plus its fsync).
pub const CANCEL_MEMORY: Duration = Duration::from_secs(120);
/// Longest lock holder value (Vault uses a UUID): keeps the lease table small.
pub const MAX_HOLDER_VALUE: usize = MAX_KEY_LEN;

const LOG_FILE: &str = "log";
/// The log being folded into a snapshot by a background compaction.
const PREV_LOG_FILE: &str = "log.prev";
/// Read and write buffer for streamed snapshots and log replay.
const STREAM_BUF: usize = 1 << 20;
const SNAPSHOT_FILE: &str = "snapshot";
const LOCK_FILE: &str = "LOCK";

/// Where and how the store keeps its data.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub compact_bytes: u64,
}

/// A change, published to watchers once durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// A lock (grant/end) rather than a KV key.
    pub lock: bool,
    pub key: String,
    /// Put (or grant) vs delete (or release/expiry).
    pub put: bool,
}

struct State {
    kv: KvMap,
    leases: LeaseTable,
    /// Per lock key: the `(token, attempt)` of the current grant, when the acquire carried an
    /// attempt id (in memory: requests do not outlive a restart).
    grant_attempts: std::collections::HashMap<String, (u64, u64)>,
    /// Cancelled acquire attempts `(key, attempt)` and when, pruned after [`CANCEL_MEMORY`].
    cancelled: std::collections::HashMap<(String, u64), Duration>,
}

impl State {
    fn new() -> State {
        State {
            kv: KvMap::default(),
            leases: LeaseTable::default(),
            grant_attempts: Default::default(),
            cancelled: Default::default(),
        }
    }
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    notes: Vec<Note>,
    records: usize,
    last_lsn: u64,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    pending: Mutex<Pending>,
    wake_writer: Condvar,
    durable: watch::Sender<u64>,
    events: broadcast::Sender<Arc<Note>>,
    /// Fired when a lease ends, so blocked acquirers retry.
    released: Notify,
    /// Fired when a lease is granted, so the expiry timer re-arms.
    granted: Notify,
    origin: Instant,
    metrics: Arc<Metrics>,
    dir: PathBuf,
    compact_bytes: u64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    _dir_lock: nix::fcntl::Flock<File>,
    closed: AtomicBool,
}

/// A frozen view of the store's state at one LSN, to stream as a snapshot.
pub struct SnapshotView {
    kv: KvMap,
    leases: LeaseTable,
    lsn: u64,
}

impl SnapshotView {
    /// Streams the view into `out` in the snapshot format, frame by frame (no image in
    /// memory); returns the snapshot's size in bytes. Blocking: run it off the async runtime.
    pub fn write_to<W: Write>(&self, out: W) -> std::io::Result<(W, u64)> {
        let mut w = log::SnapshotWriter::new(out, self.lsn)?;
        for r in view_records(&self.kv, &self.leases) {
            w.push(&r)?;
        }
        w.finish()
    }
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock would leave a half-applied op; every mutation here is
    // validated before it starts, so continuing is safe and beats wedging the daemon.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn apply_record(st: &mut State, rec: Record) {
    match rec {
        Record::Put {
            key,
            value,
            fence,
            revision,
        } => {
            if let Some(f) = &fence {
                if !f.lock.is_empty() {
                    st.leases.replay(&Effect::Observed {
                        lock: f.lock.clone(),
                        token: f.token,
                    });
                }
            }
            st.kv.insert(key, Stored::new(value, fence.map(|f| f.token), revision));
        }
        Record::Delete { key, fence } => {
            if let Some(f) = fence {
                st.leases.replay(&Effect::Observed {
                    lock: f.lock,
                    token: f.token,
                });
            }
            st.kv.remove(&key);
        }
        Record::Lease(e) => st.leases.replay(&e),
        Record::SnapHeader { .. } | Record::SnapEnd { .. } => {}
    }
}

/// The records that rebuild `kv` and `leases` (a snapshot's body), produced lazily.
fn view_records<'a>(kv: &'a KvMap, leases: &'a LeaseTable) -> impl Iterator<Item = Record> + 'a {
    let entries = kv.iter().map(|(k, s)| Record::Put {
        key: k.to_string(),
        value: s.value.clone(),
        // Empty lock name: carries the entry's token without observing any lock.
        fence: s.fence_token().map(|token| Fence {
            lock: String::new(),
            token,
        }),
        revision: s.revision(),
    });
    // Both marks of every lock, then the leases held.
    let marks = leases.mark_effects().into_iter().map(Record::Lease);
    let held = leases.iter().filter_map(|(k, _, lease)| {
        lease.map(|l| {
            Record::Lease(Effect::Granted {
                key: k.to_string(),
                value: l.value.clone(),
                token: l.token,
                ttl: l.ttl,
            })
        })
    });
    entries.chain(marks).chain(held)
}

/// Streams a snapshot of `kv` + `leases` at `lsn` into `DIR/snapshot` (temp file, fsync,
/// atomic rename, directory fsync); returns its size.
fn write_snapshot_file(dir: &Path, lsn: u64, kv: &KvMap, leases: &LeaseTable) -> Result<u64, StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| StoreError::io(tmp.display(), e);
    let f = PacedSync {
        file: File::create(&tmp).map_err(io)?,
        unsynced: 0,
    };
    let mut w = log::SnapshotWriter::new(BufWriter::with_capacity(STREAM_BUF, f), lsn).map_err(io)?;
    for r in view_records(kv, leases) {
        w.push(&r).map_err(io)?;
    }
    let (out, size) = w.finish().map_err(io)?;
    let f = out.into_inner().map_err(|e| io(e.into_error()))?;
    f.file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(|e| StoreError::io(path.display(), e))?;
    log::sync_dir(&path)?;
    Ok(size)
}

/// Snapshot bytes written between two `fdatasync`s of the snapshot file while it is being
/// written. Syncing as it goes keeps the kernel from collecting hundreds of MB of dirty
/// pages that the final sync would write at once, with every fsync of the log (the writes
/// clients wait for) queued behind that burst on the same disk.
const SNAPSHOT_SYNC_EVERY: u64 = 16 * 1024 * 1024;

/// The snapshot file, synced every [`SNAPSHOT_SYNC_EVERY`] bytes.
struct PacedSync {
    file: File,
    unsynced: u64,
}

impl Write for PacedSync {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SNAPSHOT_SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Removes `path` if it exists and makes the removal durable.
fn remove_durably(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => log::sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(path.display(), e)),
    }
}

fn open_reader(path: &Path) -> Result<Option<BufReader<File>>, StoreError> {
    match File::open(path) {
        Ok(f) => Ok(Some(BufReader::with_capacity(STREAM_BUF, f))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path.display(), e)),
    }
}

/// What recovery found.
struct Recovered {
    st: State,
    last_lsn: u64,
    /// The log's good length (the caller truncates the log there).
    good_len: u64,
    /// A `log.prev` was left over by a compaction cut short: the store folds it into a
    /// snapshot of the recovered state in the background, as its first compaction.
    fold_prev: bool,
}

/// Records per batch handed from recovery's reader thread to the thread applying them:
/// large enough that the channel costs nothing per record, small enough (a few MB of
/// values at most) that the batches in flight add nothing to the memory high-water.
const RECOVERY_BATCH: usize = 4096;
/// Batches that may wait between the two threads before the reader blocks.
const RECOVERY_QUEUE: usize = 4;

/// Recovery's reader side: hands records to the applier in batches, in order.
struct Batches {
    batch: Vec<Record>,
    tx: std::sync::mpsc::SyncSender<Vec<Record>>,
}

impl Batches {
    fn push(&mut self, rec: Record) {
        self.batch.push(rec);
        if self.batch.len() == RECOVERY_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let b = std::mem::replace(&mut self.batch, Vec::with_capacity(RECOVERY_BATCH));
        // A closed channel means the applier is gone (it only stops by panicking).
        let _ = self.tx.send(b);
    }
}

/// What recovery's reader found besides the records: the last LSN, the log's good length,
/// and whether a `log.prev` was left over.
fn read_for_recovery(dir: &Path, out: &mut Batches) -> Result<(u64, u64, bool), StoreError> {
    let snap_path = dir.join(SNAPSHOT_FILE);
    let mut last_lsn = 0;
    if let Some(r) = open_reader(&snap_path)? {
        last_lsn = log::read_snapshot(r, |rec| out.push(rec)).map_err(|msg| StoreError::Corrupt {
            path: snap_path.display().to_string(),
            msg,
        })?;
    }
    let prev_path = dir.join(PREV_LOG_FILE);
    let prev = open_reader(&prev_path)?;
    let had_prev = prev.is_some();
    let log_path = dir.join(LOG_FILE);
    let mut good_len = 0;
    for (path, r) in [(&prev_path, prev), (&log_path, open_reader(&log_path)?)] {
        let Some(r) = r else { continue };
        let (good, last, stopped) = log::scan_reader(r, last_lsn, |_, rec| out.push(rec));
        if let Some(why) = &stopped {
            tracing::warn!(log = %path.display(), good_bytes = good, "truncating the log's torn or corrupt tail: {why}");
        }
        last_lsn = last;
        if path == &log_path {
            good_len = good;
        }
    }
    out.flush();
    Ok((last_lsn, good_len, had_prev))
}

/// Background-compaction recovery: streams the snapshot, then `log.prev` (a compaction that did
/// not finish), then the log, never holding a file's whole image. Two threads share the
/// work: one reads, checks and decodes the frames, the other applies the records to the
/// map in the same order (restart time is the larger of the two, not their sum).
fn recover_streaming(dir: &Path) -> Result<Recovered, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Record>>(RECOVERY_QUEUE);
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("lockd-recover".into())
            .spawn_scoped(scope, move || {
                let mut out = Batches {
                    batch: Vec::with_capacity(RECOVERY_BATCH),
                    tx,
                };
                read_for_recovery(dir, &mut out)
            })
            .map_err(|e| StoreError::io("recovery thread", e))?;
        let mut st = State::new();
        for batch in rx {
            batch.into_iter().for_each(|rec| apply_record(&mut st, rec));
        }
        let (last_lsn, good_len, fold_prev) = reader
            .join()
            .map_err(|_| StoreError::io("recovery thread", std::io::Error::other("panicked")))??;
        Ok(Recovered {
            st,
            last_lsn,
            good_len,
            fold_prev,
        })
    })
}

/// What an offline restore did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The LSN the snapshot covers up to.
    pub lsn: u64,
    /// How many of the replaced directory's lock marks were above the snapshot's and kept.
    pub kept_marks: usize,
}

/// The lock marks of `old` that are above those of `new`, as effects that raise them: a
/// restore never lowers a fence high-water mark, so an older snapshot cannot let a token
/// that was already superseded (or a token already granted) be granted or accepted again.
fn raised_marks(old: &LeaseTable, new: &LeaseTable) -> Vec<Effect> {
    let mut out = Vec::new();
    for (k, m, _) in old.iter() {
        if m.granted > new.granted(k) {
            out.push(Effect::GrantedUpTo {
                key: k.to_string(),
                token: m.granted,
            });
        }
        if m.highest > new.highest(k) {
            out.push(Effect::Observed {
                lock: k.to_string(),
                token: m.highest,
            });
        }
    }
    out
}

/// Checks a snapshot file and installs it as the state of `data_dir` (offline restore): the
/// directory then holds exactly the snapshot's data, plus a log that keeps every lock mark
/// of the replaced state that was higher than the snapshot's (fence tokens never go back).
pub fn restore_snapshot(image: &[u8], data_dir: &Path) -> Result<Restored, StoreError> {
    let (lsn, recs) = log::parse_snapshot(image).map_err(|msg| StoreError::Corrupt {
        path: "snapshot image".into(),
        msg,
    })?;
    std::fs::create_dir_all(data_dir).map_err(|e| StoreError::io(data_dir.display(), e))?;
    let _guard = lock_dir(data_dir)?;
    let old = recover_streaming(data_dir)?.st;
    let mut new = State::new();
    recs.into_iter().for_each(|r| apply_record(&mut new, r));
    let kept = raised_marks(&old.leases, &new.leases);
    let logp = data_dir.join(LOG_FILE);
    remove_durably(&data_dir.join(PREV_LOG_FILE))?;
    if kept.is_empty() {
        log::write_atomic(&data_dir.join(SNAPSHOT_FILE), image)?;
        remove_durably(&logp)?;
    } else {
        let mut buf = Vec::new();
        for (i, e) in kept.iter().enumerate() {
            log::encode(&mut buf, lsn + 1 + i as u64, &Record::Lease(e.clone()));
        }
        // The log goes first: until the snapshot is replaced, its records (LSNs after the new
        // snapshot's) are skipped or continue the old state, which only raises marks.
        log::write_atomic(&logp, &buf)?;
        log::write_atomic(&data_dir.join(SNAPSHOT_FILE), image)?;
    }
    Ok(Restored {
        lsn,
        kept_marks: kept.len(),
    })
}

fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>, StoreError> {
    let p = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| StoreError::io(p.display(), e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| StoreError::Locked {
        path: dir.display().to_string(),
    })
}

impl Store {
    /// Opens (or creates) the store in `opts.data_dir` and recovers its state.
    pub fn open(opts: StoreOptions, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let dir = opts.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(dir.display(), e))?;
        let dir_lock = lock_dir(&dir)?;
        let log_path = dir.join(LOG_FILE);
        let Recovered {
            mut st,
            last_lsn,
            good_len,
            fold_prev,
        } = recover_streaming(&dir)?;
        let file = log::open_log_at(&log_path, good_len)?;
        st.leases.recovered(Duration::ZERO);
        metrics.active_leases.set(st.leases.active_leases() as i64);
        metrics.log_bytes.set(good_len as i64);
        tracing::info!(dir = %dir.display(), keys = st.kv.len(), lsn = last_lsn, "lockd store recovered");

        let (durable, _) = watch::channel(last_lsn);
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let inner = Arc::new(Inner {
            state: Mutex::new(st),
            pending: Mutex::new(Pending {
                last_lsn,
                ..Default::default()
            }),
            wake_writer: Condvar::new(),
            durable,
            events,
            released: Notify::new(),
            granted: Notify::new(),
            origin: Instant::now(),
            metrics,
            dir,
            compact_bytes: opts.compact_bytes,
            writer: Mutex::new(None),
            _dir_lock: dir_lock,
            closed: AtomicBool::new(false),
        });
        let w = inner.clone();
        let log_len = good_len;
        let handle = std::thread::Builder::new()
            .name("lockd-log".into())
            .spawn(move || writer_loop(w, file, log_len, fold_prev))
            .map_err(|e| StoreError::io("writer thread", e))?;
        *lock(&inner.writer) = Some(handle);
        Ok(Store { inner })
    }

    /// The lease clock: monotonic time since the store opened.
    pub fn now(&self) -> Duration {
        self.inner.origin.elapsed()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn append(&self, p: &mut Pending, rec: impl FnOnce(u64) -> Record, note: Option<Note>) -> u64 {
        p.last_lsn += 1;
        let lsn = p.last_lsn;
        log::encode(&mut p.bytes, lsn, &rec(lsn));
        p.records += 1;
        p.notes.extend(note);
        self.inner.wake_writer.notify_one();
        lsn
    }

    /// Logs one put (its record and its watch note) and returns its LSN with the map entry
    /// it makes, which the caller inserts once the pending lock is released.
    fn log_put(&self, p: &mut Pending, key: &str, value: Arc<[u8]>, fence: Option<Fence>) -> (u64, Stored) {
        let token = fence.as_ref().map(|f| f.token);
        let note = Note {
            lock: false,
            key: key.to_string(),
            put: true,
        };
        let record = |lsn| Record::Put {
            key: key.to_string(),
            value: value.clone(),
            fence,
            revision: lsn,
        };
        let lsn = self.append(p, record, Some(note));
        (lsn, Stored::new(value, token, lsn))
    }

    /// Logs lease effects (renewals are skipped) and returns the last LSN.
    fn log_effects(&self, p: &mut Pending, effects: &[Effect]) -> u64 {
        let mut lsn = p.last_lsn;
        for e in effects {
            let note = match e {
                Effect::Granted { key, .. } => Some(Note {
                    lock: true,
                    key: key.clone(),
                    put: true,
                }),
                Effect::Ended { key, reason, .. } => {
                    if *reason == EndReason::Expired {
                        self.inner.metrics.lease_expiries.inc();
                    }
                    Some(Note {
                        lock: true,
                        key: key.clone(),
                        put: false,
                    })
                }
                Effect::Observed { .. } | Effect::GrantedUpTo { .. } => None,
                Effect::Renewed { .. } => continue,
            };
            lsn = self.append(p, |_| Record::Lease(e.clone()), note);
        }
        lsn
    }

    fn after_lease_change(&self, st: &State, effects: &[Effect]) {
        self.inner.metrics.active_leases.set(st.leases.active_leases() as i64);
        if effects.iter().any(|e| matches!(e, Effect::Ended { .. })) {
            self.inner.released.notify_waiters();
        }
        if effects
            .iter()
            .any(|e| matches!(e, Effect::Granted { .. } | Effect::Renewed { .. }))
        {
            self.inner.granted.notify_one();
        }
    }

    /// Waits until every record up to `lsn` is on disk.
    async fn durable(&self, lsn: u64) -> Result<(), LockdError> {
        let mut rx = self.inner.durable.subscribe();
        rx.wait_for(|d| *d >= lsn)
            .await
            .map(|_| ())
            .map_err(|_| LockdError::Unavailable("lockd is shutting down".into()))
    }

    fn check_open(&self) -> Result<(), LockdError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(LockdError::Unavailable("lockd is shutting down".into()));
        }
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<WireEntry>, LockdError> {
        validate_key(key)?;
        let (e, lsn) = {
            let st = lock(&self.inner.state);
            let e = st.kv.get(key).map(|s| WireEntry {
                key: key.to_string(),
                value: s.value.to_vec(),
                fence_token: s.fence_token(),
                revision: s.revision(),
            });
            (e, lock(&self.inner.pending).last_lsn)
        };
        self.durable(lsn).await?;
        Ok(e)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, LockdError> {
        if prefix.len() > MAX_KEY_LEN {
            return Err(LockdError::Invalid(format!(
                "prefix exceeds the {MAX_KEY_LEN}-byte limit"
            )));
        }
        let (keys, lsn) = {
            let st = lock(&self.inner.state);
            let keys = list_children(prefix, st.kv.keys_from(prefix).take_while(|k| k.starts_with(prefix)));
            (keys, lock(&self.inner.pending).last_lsn)
        };
        self.durable(lsn).await?;
        Ok(keys)
    }

    /// Put, fenced and/or compare-and-put. Nothing is applied when a check fails.
    pub async fn put(&self, req: PutRequest) -> Result<u64, LockdError> {
        self.check_open()?;
        validate_key(&req.key)?;
        // The server enforces the configured `max_value_size`; this is the absolute bound.
        validate_value_len(&req.value, MAX_LOCAL_VALUE_LEN)?;
        if let Some(f) = &req.fence {
            validate_key(&f.lock)?;
        }
        let lsn = {
            let mut st = lock(&self.inner.state);
            if let Some(f) = &req.fence {
                st.leases.check_fence(&f.lock, f.token)?;
            }
            if let Some(expected) = req.prev_revision {
                let actual = st.kv.get(&req.key).map(Stored::revision).unwrap_or(0);
                if actual != expected {
                    return Err(LockdError::CasMismatch {
                        key: req.key,
                        expected,
                        actual,
                    });
                }
            }
            if let Some(f) = &req.fence {
                st.leases.fence(&f.lock, f.token)?;
            }
            // One exact allocation shared by the map entry and the log record.
            let value: Arc<[u8]> = Arc::from(req.value);
            let mut p = lock(&self.inner.pending);
            let (lsn, stored) = self.log_put(&mut p, &req.key, value, req.fence);
            drop(p);
            st.kv.insert(req.key, stored);
            lsn
        };
        self.durable(lsn).await?;
        Ok(lsn)
    }

    /// Writes every entry in order under one fence check and one durable commit (their
    /// records go to the log together). A refused fence writes nothing. Returns the last
    /// entry's revision.
    pub async fn put_batch(&self, puts: Vec<(String, Vec<u8>)>, fence: Option<Fence>) -> Result<u64, LockdError> {
        self.check_open()?;
        vha_core::storage::check_batch_len(puts.len()).map_err(|e| LockdError::Invalid(e.to_string()))?;
        for (key, value) in &puts {
            validate_key(key)?;
            validate_value_len(value, MAX_LOCAL_VALUE_LEN)?;
        }
        if let Some(f) = &fence {
            validate_key(&f.lock)?;
        }
        let lsn = {
            let mut st = lock(&self.inner.state);
            if let Some(f) = &fence {
                st.leases.fence(&f.lock, f.token)?;
            }
            let mut p = lock(&self.inner.pending);
            let mut last = 0;
            let mut stored = Vec::with_capacity(puts.len());
            for (key, value) in puts {
                let (lsn, entry) = self.log_put(&mut p, &key, Arc::from(value), fence.clone());
                last = lsn;
                stored.push((key, entry));
            }
            drop(p);
            for (key, s) in stored {
                st.kv.insert(key, s);
            }
            last
        };
        self.durable(lsn).await?;
        Ok(lsn)
    }

    /// Delete (fenced or not). Returns whether the key existed.
    pub async fn delete(&self, key: &str, fence: Option<Fence>) -> Result<bool, LockdError> {
        self.check_open()?;
        validate_key(key)?;
        if let Some(f) = &fence {
            validate_key(&f.lock)?;
        }
        let (existed, lsn) = {
            let mut st = lock(&self.inner.state);
            let observed = match &fence {
                Some(f) => st.leases.fence(&f.lock, f.token)?.is_some(),
                None => false,
            };
            let existed = st.kv.remove(key);
            let mut p = lock(&self.inner.pending);
            let lsn = if existed || observed {
                let note = existed.then(|| Note {
                    lock: false,
                    key: key.to_string(),
                    put: false,
                });
                self.append(
                    &mut p,
                    |_| Record::Delete {
                        key: key.to_string(),
                        fence: fence.clone(),
                    },
                    note,
                )
            } else {
                p.last_lsn
            };
            (existed, lsn)
        };
        self.durable(lsn).await?;
        Ok(existed)
    }

    /// One acquire attempt: `Ok(Some((token, ttl)))` when granted (durably), `Ok(None)` when
    /// held by another value.
    pub async fn try_acquire(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        attempt: Option<u64>,
    ) -> Result<Option<(u64, Duration)>, LockdError> {
        self.check_open()?;
        validate_key(key)?;
        if value.len() > MAX_HOLDER_VALUE {
            return Err(LockdError::Invalid(format!(
                "lock value exceeds the {MAX_HOLDER_VALUE}-byte limit"
            )));
        }
        let now = self.now();
        let (res, lsn) = {
            let mut st = lock(&self.inner.state);
            if let Some(a) = attempt {
                if st.cancelled.contains_key(&(key.to_string(), a)) {
                    return Err(LockdError::Invalid(format!(
                        "acquire attempt {a} on {key:?} was cancelled"
                    )));
                }
            }
            match st.leases.acquire(key, value, ttl, now) {
                Ok(effects) => {
                    let mut p = lock(&self.inner.pending);
                    let lsn = self.log_effects(&mut p, &effects);
                    drop(p);
                    self.after_lease_change(&st, &effects);
                    let granted = st.leases.holder(key).map(|l| (l.token, l.ttl));
                    for e in &effects {
                        if let (Effect::Granted { token, .. }, Some(a)) = (e, attempt) {
                            st.grant_attempts.insert(key.to_string(), (*token, a));
                        }
                    }
                    (granted, lsn)
                }
                Err(LockdError::LockHeld { .. }) => (None, lock(&self.inner.pending).last_lsn),
                Err(e) => return Err(e),
            }
        };
        self.durable(lsn).await?;
        Ok(res)
    }

    /// Cancels acquire `attempt` on `key`: later requests of it are refused, and a grant it
    /// already got is released. Race-free because both happen under the state lock: a grant
    /// is either made before (and released here) or refused after.
    pub async fn cancel(&self, key: &str, attempt: u64) -> Result<bool, LockdError> {
        self.check_open()?;
        validate_key(key)?;
        let now = self.now();
        let (released, lsn) = {
            let mut st = lock(&self.inner.state);
            st.cancelled.retain(|_, t| now.saturating_sub(*t) < CANCEL_MEMORY);
            st.cancelled.insert((key.to_string(), attempt), now);
            let current = st.leases.holder(key).map(|l| l.token);
            match st.grant_attempts.get(key).copied() {
                Some((token, a)) if a == attempt && current == Some(token) => {
                    st.grant_attempts.remove(key);
                    let effects = st.leases.release(key, token, now)?;
                    let mut p = lock(&self.inner.pending);
                    let lsn = self.log_effects(&mut p, &effects);
                    drop(p);
                    self.after_lease_change(&st, &effects);
                    (true, lsn)
                }
                _ => (false, lock(&self.inner.pending).last_lsn),
            }
        };
        self.durable(lsn).await?;
        Ok(released)
    }

    /// A future that completes when some lease ends; create it *before* an acquire attempt.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.released.notified()
    }

    /// Renews a lease (in memory only).
    pub fn renew(&self, key: &str, token: u64) -> Result<Duration, LockdError> {
        self.check_open()?;
        validate_key(key)?;
        let now = self.now();
        let mut st = lock(&self.inner.state);
        match st.leases.renew(key, token, now) {
            Ok(Effect::Renewed { ttl, .. }) => Ok(ttl),
            Ok(_) => Err(LockdError::Internal("renew produced an unexpected effect".into())),
            Err(e) => Err(e),
        }
    }

    /// Releases a lease by key and token.
    pub async fn release(&self, key: &str, token: u64) -> Result<(), LockdError> {
        self.check_open()?;
        validate_key(key)?;
        let now = self.now();
        let lsn = {
            let mut st = lock(&self.inner.state);
            let effects = st.leases.release(key, token, now);
            let effects = effects?;
            let mut p = lock(&self.inner.pending);
            let lsn = self.log_effects(&mut p, &effects);
            drop(p);
            self.after_lease_change(&st, &effects);
            lsn
        };
        self.durable(lsn).await
    }

    pub async fn holder(&self, key: &str) -> Result<Option<WireHolder>, LockdError> {
        validate_key(key)?;
        let now = self.now();
        let (h, lsn) = {
            let st = lock(&self.inner.state);
            let h = st.leases.holder(key).filter(|l| now < l.deadline).map(|l| WireHolder {
                value: l.value.clone(),
                token: l.token,
                remaining_ms: (l.deadline - now).as_millis() as u64,
            });
            (h, lock(&self.inner.pending).last_lsn)
        };
        self.durable(lsn).await?;
        Ok(h)
    }

    /// Ends expired leases; returns the next deadline to wake at.
    pub fn tick(&self) -> Option<Duration> {
        let now = self.now();
        let mut st = lock(&self.inner.state);
        let effects = st.leases.tick(now);
        if !effects.is_empty() {
            let mut p = lock(&self.inner.pending);
            self.log_effects(&mut p, &effects);
            drop(p);
            self.after_lease_change(&st, &effects);
        }
        st.leases.next_deadline()
    }

    /// Runs the expiry timer until the store closes: sleeps until the earliest deadline (or a
    /// new grant), never polls.
    pub async fn run_expiry(self) {
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return;
            }
            let granted = self.inner.granted.notified();
            let next = self.tick();
            // A renewal only moves deadlines later, so waking at a stale (earlier) deadline
            // just re-checks; a new grant with an earlier deadline wakes us via `granted`.
            let wait = next
                .map(|d| d.saturating_sub(self.now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = granted => {}
            }
        }
    }

    /// Subscribes to durable changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Note>> {
        self.inner.events.subscribe()
    }

    /// A consistent view of the durable state (for `snapshot save`): taken in O(1) under the
    /// lock, returned once everything it holds is durable; writers go on meanwhile.
    pub async fn snapshot_view(&self) -> Result<SnapshotView, LockdError> {
        let view = {
            let st = lock(&self.inner.state);
            SnapshotView {
                kv: st.kv.view(),
                leases: st.leases.clone(),
                lsn: lock(&self.inner.pending).last_lsn,
            }
        };
        self.durable(view.lsn).await?;
        Ok(view)
    }

    /// Stops accepting writes, flushes the log and stops the writer thread.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        lock(&self.inner.pending).shutdown = true;
        self.inner.wake_writer.notify_one();
        self.inner.granted.notify_one();
        if let Some(h) = lock(&self.inner.writer).take() {
            let _ = h.join();
        }
    }
}

fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    // After a failed write or fsync the kernel may have dropped the dirty pages: the state
    // on disk is unknown, and retrying the fsync can falsely succeed. The only safe move is
    // to stop and let recovery re-read the log (what PostgreSQL does since "fsyncgate").
    tracing::error!("lockd log {what} failed: {e}; exiting so recovery can re-read the log");
    eprintln!("lockd: log {what} failed: {e}; exiting");
    std::process::exit(70)
}

/// The state to snapshot, in O(1) under the locks: the KV view, the lease table and the LSN
/// of the last record appended (fsynced or still pending).
fn view_now(inner: &Inner) -> (KvMap, LeaseTable, u64) {
    let st = lock(&inner.state);
    let p = lock(&inner.pending);
    (st.kv.view(), st.leases.clone(), p.last_lsn)
}

/// Starts a background compaction of a view at `lsn`: streams it into the snapshot, then
/// removes `log.prev` (whose records the snapshot now covers). Its handle answers the
/// snapshot's size.
fn spawn_compaction(inner: &Arc<Inner>, (kv, leases, lsn): (KvMap, LeaseTable, u64)) -> std::thread::JoinHandle<u64> {
    let bg = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("lockd-snapshot".into())
        .spawn(move || {
            let t = Instant::now();
            let size = match write_snapshot_file(&bg.dir, lsn, &kv, &leases) {
                Ok(n) => n,
                Err(e) => fatal("snapshot", e),
            };
            drop((kv, leases));
            if let Err(e) = remove_durably(&bg.dir.join(PREV_LOG_FILE)) {
                fatal("snapshot", e);
            }
            bg.metrics.compactions.inc();
            tracing::info!(
                lsn,
                snapshot_bytes = size,
                secs = t.elapsed().as_secs_f64(),
                "log compacted in the background"
            );
            size
        });
    match spawned {
        Ok(h) => h,
        Err(e) => fatal("snapshot", e),
    }
}

fn writer_loop(inner: Arc<Inner>, mut file: File, mut log_len: u64, fold_prev: bool) {
    let log_path = inner.dir.join(LOG_FILE);
    let snap_path = inner.dir.join(SNAPSHOT_FILE);
    let mut snapshot_len: u64 = std::fs::metadata(&snap_path).map(|m| m.len()).unwrap_or(0);
    // The background compaction in flight, answering the snapshot's size. A `log.prev` left
    // by a compaction cut short is folded first, while the store already serves: the
    // snapshot of the recovered state covers both logs, `log` is not rotated (recovery
    // skips the records at its start that the snapshot covers), and no other compaction
    // starts until this one is done, so one `log.prev` slot is enough.
    let mut compaction = fold_prev.then(|| spawn_compaction(&inner, view_now(&inner)));
    loop {
        let (bytes, notes, records, upto, shutdown) = {
            let mut p = lock(&inner.pending);
            while p.bytes.is_empty() && !p.shutdown {
                p = inner.wake_writer.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            let bytes = std::mem::take(&mut p.bytes);
            let notes = std::mem::take(&mut p.notes);
            let records = std::mem::take(&mut p.records);
            (bytes, notes, records, p.last_lsn, p.shutdown)
        };
        if !bytes.is_empty() {
            if let Err(e) = file.write_all(&bytes) {
                fatal("write", e);
            }
            let t = Instant::now();
            if let Err(e) = file.sync_data() {
                fatal("fsync", e);
            }
            inner.metrics.fsync_seconds.observe(t.elapsed().as_secs_f64());
            inner.metrics.batch_records.observe(records as f64);
            log_len += bytes.len() as u64;
            inner.metrics.log_bytes.set(log_len as i64);
        }
        inner.durable.send_replace(upto);
        for n in notes {
            let _ = inner.events.send(Arc::new(n));
        }
        if compaction.as_ref().is_some_and(|h| h.is_finished() || shutdown) {
            if let Some(h) = compaction.take() {
                snapshot_len = h
                    .join()
                    .unwrap_or_else(|_| fatal("snapshot", "snapshot thread panicked"));
            }
        }
        if shutdown {
            return;
        }
        // A view costs O(1) under the lock, so compaction can run often: once the log
        // is half the snapshot, which bounds replay at restart to 1.5x the live data.
        if compaction.is_none() && log_len > inner.compact_bytes && log_len > snapshot_len / 2 {
            let prev_path = inner.dir.join(PREV_LOG_FILE);
            let view = view_now(&inner);
            // Everything written to `log` is fsynced; records still pending (some <= lsn)
            // go to the fresh log, where recovery skips those the snapshot covers.
            if let Err(e) = std::fs::rename(&log_path, &prev_path) {
                fatal("rotate", e);
            }
            file = match log::open_log_at(&log_path, 0) {
                Ok(f) => f,
                Err(e) => fatal("rotate", e),
            };
            log_len = 0;
            inner.metrics.log_bytes.set(0);
            compaction = Some(spawn_compaction(&inner, view));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, compact_bytes: u64) -> Store {
        Store::open(
            StoreOptions {
                data_dir: dir.to_path_buf(),
                compact_bytes,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    fn put_req(key: &str, value: &[u8], fence: Option<(&str, u64)>) -> PutRequest {
        PutRequest {
            key: key.into(),
            value: value.to_vec(),
            fence: fence.map(|(l, t)| Fence {
                lock: l.into(),
                token: t,
            }),
            prev_revision: None,
        }
    }

    /// Group commit: 64 concurrent writers are acknowledged with far fewer fsyncs than
    /// writes, and every acknowledged write is there after reopening.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_batches_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.put(put_req(&format!("g/{i}"), b"v", None)).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let fsyncs = s.metrics().fsync_seconds.get_sample_count();
        assert!(fsyncs < 64, "64 concurrent writes took {fsyncs} fsyncs: no batching");
        s.close();
        drop(s);
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        for i in 0..64 {
            assert!(s.get(&format!("g/{i}")).await.unwrap().is_some(), "g/{i} durable");
        }
    }

    /// Compaction (a tiny threshold) replaces the log with a snapshot and keeps every latest
    /// value, entry token, highest fence token and held lease across a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 2048);
        for round in 0..30u32 {
            for i in 0..10 {
                let v = format!("{round}-{}", "x".repeat(64));
                s.put(put_req(&format!("c/{i}"), v.as_bytes(), Some(("c/lock", 3))))
                    .await
                    .unwrap();
            }
        }
        s.try_acquire("c/held", "me", Duration::from_secs(60), None)
            .await
            .unwrap()
            .unwrap();
        // Closing waits for a background compaction still streaming its snapshot.
        s.close();
        assert!(s.metrics().compactions.get() > 0, "compaction ran");
        drop(s);
        assert!(dir.path().join(SNAPSHOT_FILE).exists(), "a snapshot was written");
        assert!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len() < 8192,
            "log bounded"
        );
        let s = open(dir.path(), 2048);
        for i in 0..10 {
            let e = s.get(&format!("c/{i}")).await.unwrap().unwrap();
            assert!(
                e.value.starts_with(b"29-") && e.fence_token == Some(3),
                "c/{i} latest value and token"
            );
        }
        assert!(matches!(
            s.put(put_req("c/0", b"old", Some(("c/lock", 2)))).await,
            Err(LockdError::Fenced { highest: 3, .. })
        ));
        assert_eq!(
            s.holder("c/held").await.unwrap().map(|h| h.value),
            Some("me".to_string())
        );
    }

    /// A compaction interrupted by a crash (the log moved aside to `log.prev`, no new
    /// snapshot yet, newer records in `log`) recovers every record of both logs and serves
    /// them at once; the background fold writes a snapshot of both and removes `log.prev`,
    /// and the store reopened after it (the log's covered records skipped) has the same
    /// state and fence marks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interrupted_background_compaction_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        for i in 0..10 {
            s.put(put_req(&format!("p/{i}"), b"old", Some(("p/lock", 2))))
                .await
                .unwrap();
        }
        s.close();
        drop(s);
        std::fs::rename(dir.path().join(LOG_FILE), dir.path().join(PREV_LOG_FILE)).unwrap();
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        for i in 5..15 {
            s.put(put_req(&format!("p/{i}"), b"new", None)).await.unwrap();
        }
        s.close();
        drop(s);
        // Crash state: log.prev holds p/0..9, log holds the overwrites and p/10..14.
        let prev = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert!(!dir.path().join(PREV_LOG_FILE).exists(), "log.prev folded at open");
        std::fs::rename(dir.path().join(LOG_FILE), dir.path().join(PREV_LOG_FILE)).unwrap();
        for round in ["served while folding", "after the fold"] {
            let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
            for i in 0..15 {
                let want: &[u8] = if i < 5 { b"old" } else { b"new" };
                assert_eq!(
                    s.get(&format!("p/{i}")).await.unwrap().unwrap().value,
                    want,
                    "{round}: p/{i}"
                );
            }
            assert!(
                matches!(
                    s.put(put_req("p/0", b"stale", Some(("p/lock", 1)))).await,
                    Err(LockdError::Fenced { highest: 2, .. })
                ),
                "{round}"
            );
            // Closing waits for the fold.
            s.close();
            drop(s);
            assert!(!dir.path().join(PREV_LOG_FILE).exists(), "{round}: log.prev folded");
            assert!(dir.path().join(LOG_FILE).exists(), "{round}: the log is kept");
        }
        assert_ne!(std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap(), prev);
    }

    /// A fenced or compare-and-put write that fails applies nothing and logs nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_checks_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        s.put(put_req("k", b"1", Some(("l", 5)))).await.unwrap();
        let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(s.put(put_req("k", b"2", Some(("l", 4)))).await.is_err());
        let mut cas = put_req("k", b"3", None);
        cas.prev_revision = Some(99);
        assert!(matches!(s.put(cas).await, Err(LockdError::CasMismatch { .. })));
        assert!(s
            .delete(
                "k",
                Some(Fence {
                    lock: "l".into(),
                    token: 1
                })
            )
            .await
            .is_err());
        assert_eq!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
            len,
            "nothing logged"
        );
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"1");
    }

    /// A batch is one durable commit (one fsync for both entries), keeps its order in
    /// revisions and its fence token on every entry, survives a reopen whole, and a batch
    /// with a stale token logs and applies nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_one_commit_and_a_stale_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        s.put(put_req("k", b"0", Some(("l", 5)))).await.unwrap();
        let fsyncs = s.metrics().fsync_seconds.get_sample_count();
        let fence = |t| Fence {
            lock: "l".into(),
            token: t,
        };
        let rev = s
            .put_batch(
                vec![("v/1".into(), b"data".to_vec()), ("m".into(), b"meta".to_vec())],
                Some(fence(5)),
            )
            .await
            .unwrap();
        assert_eq!(s.metrics().fsync_seconds.get_sample_count(), fsyncs + 1, "one commit");
        let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(matches!(
            s.put_batch(
                vec![("v/2".into(), b"x".to_vec()), ("m".into(), b"y".to_vec())],
                Some(fence(4))
            )
            .await,
            Err(LockdError::Fenced { .. })
        ));
        assert_eq!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
            len,
            "nothing logged"
        );
        s.close();
        drop(s);
        let s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        let (d, m) = (s.get("v/1").await.unwrap().unwrap(), s.get("m").await.unwrap().unwrap());
        assert_eq!((d.value.as_slice(), m.value.as_slice()), (&b"data"[..], &b"meta"[..]));
        assert_eq!((d.revision + 1, m.revision), (rev, rev), "in order");
        assert_eq!((d.fence_token, m.fence_token), (Some(5), Some(5)));
        assert!(s.get("v/2").await.unwrap().is_none());
    }

    /// A second store on the same directory is refused while the first is open.
    #[test]
    fn data_dir_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let _s = open(dir.path(), DEFAULT_COMPACT_BYTES);
        let r = Store::open(
            StoreOptions {
                data_dir: dir.path().to_path_buf(),
                compact_bytes: DEFAULT_COMPACT_BYTES,
            },
            Arc::new(Metrics::new()),
        );
        assert!(matches!(r, Err(StoreError::Locked { .. })));
    }
}

//! The active node's read cache over its store (Vault's physical cache, config keys
//! `cache_size` and `disable_cache`): the barrier's ciphertext entries by path, filled by the
//! node's own reads and writes, so a read of a recently read or written secret does not
//! leave the process.
//!
//! Why it is safe: while a node holds the HA lock it is the only writer of the store (every
//! write carries its fence). So the cache serves only between [`ReadCache::enable`] (the
//! term's start) and [`ReadCache::disable`] (the term's end, a seal), is emptied at both,
//! and stops serving at once when the term's `lost` signal fires. A standby never enables
//! it. Paths under `core/` (seal configuration, keyring, advertisements that every node
//! writes in its own term) are never cached.
//!
//! Concurrent reads and writes of one path stay linearizable:
//! - a write removes the path when it begins and, when it ends, caches what it wrote only
//!   if no other write of the path overlapped it (two overlapping writes could have reached
//!   the store in either order); a write whose outcome is unknown (an error) leaves the path
//!   uncached;
//! - a read that missed fills the cache only if no write of any path began or ended while it
//!   read (a generation counter) and none of its path is still running.
//!
//! Entries are ciphertext, as in the store: the cache holds no plaintext secret.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tokio_util::sync::CancellationToken;

/// Vault's default `cache_size`: 131072 entries.
pub const DEFAULT_CACHE_SIZE: usize = 131_072;

/// Paths the cache never holds: what other nodes write in their own terms, and the seal.
const UNCACHED_PREFIX: &str = "core/";

/// A cached value: the envelope, or `None` when the path is known to be absent.
pub type Cached = Option<Arc<[u8]>>;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The cache answers (the value, or that the path is absent).
    Hit(Cached),
    /// Read the store, then offer what it said with [`ReadCache::fill`].
    Miss(Ticket),
    /// The cache does not serve (off, not the active's term, or an uncached path).
    Off,
}

/// A miss's permission to fill, valid while no write began or ended.
#[derive(Debug)]
pub struct Ticket {
    generation: u64,
}

/// Writes of one path that have begun and not ended.
#[derive(Default)]
struct Running {
    count: u32,
    /// Another write of the path overlapped one of these.
    overlapped: bool,
}

struct State {
    lru: Option<LruCache<String, Cached>>,
    /// Set while the node is the active: the term's `lost` signal.
    term: Option<CancellationToken>,
    generation: u64,
    running: HashMap<String, Running>,
}

/// The cache (see the module header). Capacity 0 is `disable_cache`: it never serves.
pub struct ReadCache {
    state: Mutex<State>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters for the node's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
}

impl ReadCache {
    /// A cache of up to `capacity` entries (0: never serves).
    pub fn new(capacity: usize) -> ReadCache {
        ReadCache {
            state: Mutex::new(State {
                lru: None,
                term: None,
                generation: 0,
                running: HashMap::new(),
            }),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_path(path: &str) -> bool {
        !path.starts_with(UNCACHED_PREFIX)
    }

    /// The node became active: the cache starts empty and serves until `term` fires or
    /// [`ReadCache::disable`].
    pub fn enable(&self, term: CancellationToken) {
        let mut st = self.state();
        st.generation += 1;
        st.lru = NonZeroUsize::new(self.capacity).map(LruCache::new);
        st.term = st.lru.as_ref().map(|_| term);
    }

    /// The term ended or the barrier sealed: empty, and off until the next `enable`.
    pub fn disable(&self) {
        let mut st = self.state();
        st.generation += 1;
        st.lru = None;
        st.term = None;
    }

    /// Whether the cache serves now.
    fn serving(st: &mut State) -> bool {
        match &st.term {
            Some(t) if !t.is_cancelled() => true,
            Some(_) => {
                // The term is lost: nothing cached may be served again.
                st.lru = None;
                st.term = None;
                st.generation += 1;
                false
            }
            None => false,
        }
    }

    pub fn lookup(&self, path: &str) -> Lookup {
        if !Self::cached_path(path) {
            return Lookup::Off;
        }
        let mut st = self.state();
        if !Self::serving(&mut st) {
            return Lookup::Off;
        }
        let generation = st.generation;
        match st.lru.as_mut().and_then(|l| l.get(path)) {
            Some(v) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Lookup::Hit(v.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss(Ticket { generation })
            }
        }
    }

    /// What the store answered for a miss; kept only if nothing was written meanwhile.
    pub fn fill(&self, path: &str, ticket: Ticket, value: Cached) {
        let mut st = self.state();
        if ticket.generation != st.generation || st.running.contains_key(path) || !Self::serving(&mut st) {
            return;
        }
        if let Some(l) = st.lru.as_mut() {
            l.put(path.to_string(), value);
        }
    }

    /// A write of `path` is about to reach the store.
    pub fn write_begins(&self, path: &str) {
        if !Self::cached_path(path) {
            return;
        }
        let mut st = self.state();
        st.generation += 1;
        if let Some(l) = st.lru.as_mut() {
            l.pop(path);
        }
        let r = st.running.entry(path.to_string()).or_default();
        r.count += 1;
        if r.count > 1 {
            r.overlapped = true;
        }
    }

    /// The write of `path` begun with [`ReadCache::write_begins`] ended: `Some(value)` when the
    /// store applied it (`Some(None)` for a delete), `None` when its outcome is unknown.
    pub fn write_ends(&self, path: &str, outcome: Option<Cached>) {
        if !Self::cached_path(path) {
            return;
        }
        let mut st = self.state();
        st.generation += 1;
        let overlapped = match st.running.get_mut(path) {
            Some(r) => {
                r.count = r.count.saturating_sub(1);
                let o = r.overlapped;
                if r.count == 0 {
                    st.running.remove(path);
                }
                o
            }
            None => true,
        };
        let serving = Self::serving(&mut st);
        if let Some(l) = st.lru.as_mut() {
            match outcome {
                Some(v) if serving && !overlapped => {
                    l.put(path.to_string(), v);
                }
                _ => {
                    l.pop(path);
                }
            }
        }
    }

    /// Whether a write's value is worth copying for the cache now.
    pub fn wants_values(&self, path: &str) -> bool {
        Self::cached_path(path) && self.state().term.is_some()
    }

    pub fn stats(&self) -> CacheStats {
        let entries = self.state().lru.as_ref().map_or(0, |l| l.len() as u64);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn v(x: u8) -> Cached {
        Some(Arc::from(vec![x]))
    }

    /// Off until enabled, then hits what was written and filled; a disabled (or lost) term
    /// serves nothing and starts empty when enabled again; `core/` is never cached;
    /// capacity 0 never serves.
    #[test]
    fn serves_only_inside_a_term_and_starts_empty() {
        let c = ReadCache::new(8);
        assert!(matches!(c.lookup("a"), Lookup::Off));
        let term = CancellationToken::new();
        c.enable(term.clone());
        let Lookup::Miss(t) = c.lookup("a") else { panic!() };
        c.fill("a", t, v(1));
        assert!(matches!(c.lookup("a"), Lookup::Hit(Some(x)) if x[..] == [1]));
        c.write_begins("b");
        c.write_ends("b", Some(None));
        assert!(matches!(c.lookup("b"), Lookup::Hit(None)));
        c.write_begins("core/leader/x");
        c.write_ends("core/leader/x", Some(v(2)));
        assert!(matches!(c.lookup("core/leader/x"), Lookup::Off));
        assert_eq!(c.stats().entries, 2);
        c.disable();
        assert!(matches!(c.lookup("a"), Lookup::Off));
        assert_eq!(c.stats().entries, 0);
        c.enable(term.clone());
        assert!(matches!(c.lookup("a"), Lookup::Miss(_)));
        term.cancel();
        assert!(matches!(c.lookup("a"), Lookup::Off));
        assert_eq!(c.stats().entries, 0);

        let none = ReadCache::new(0);
        none.enable(CancellationToken::new());
        assert!(matches!(none.lookup("a"), Lookup::Off));
    }

    /// One step of a schedule: reads and writes are split into their parts so a property
    /// test can interleave them as concurrent tasks would.
    #[derive(Clone, Debug)]
    enum Op {
        /// Task `t` starts reading `k` (lookup; on a hit the value is checked at once).
        ReadStart(usize, u8),
        /// Task `t`'s read reaches the store.
        ReadStore(usize),
        /// Task `t`'s read offers what it read.
        ReadFill(usize),
        /// Task `t` starts writing `k` (a value, or a delete when `None`).
        WriteStart(usize, u8, Option<u8>),
        /// Task `t`'s write reaches the store (`fail`: it is applied but reported failed).
        WriteStore(usize, bool),
        /// Task `t`'s write ends.
        WriteEnd(usize),
        /// The term ends; another node writes `k` while this one is standby; a new term.
        TermChange(u8, u8),
        /// The term's lost signal fires (the next TermChange starts a new one).
        Lost,
    }

    fn op() -> impl Strategy<Value = Op> {
        let t = 0usize..4;
        let k = 0u8..3;
        prop_oneof![
            4 => (t.clone(), k.clone()).prop_map(|(t, k)| Op::ReadStart(t, k)),
            4 => t.clone().prop_map(Op::ReadStore),
            4 => t.clone().prop_map(Op::ReadFill),
            3 => (t.clone(), k.clone(), proptest::option::of(0u8..200)).prop_map(|(t, k, v)| Op::WriteStart(t, k, v)),
            3 => (t.clone(), any::<bool>()).prop_map(|(t, f)| Op::WriteStore(t, f)),
            3 => t.clone().prop_map(Op::WriteEnd),
            1 => (k, 0u8..200).prop_map(|(k, v)| Op::TermChange(k, v)),
            1 => Just(Op::Lost),
        ]
    }

    enum Task {
        Reading {
            key: String,
            ticket: Option<Ticket>,
            read: Option<Cached>,
        },
        Writing {
            key: String,
            value: Cached,
            applied: Option<bool>,
        },
    }

    proptest! {
        /// Random interleavings of reads, writes (some reported failed), term changes with
        /// foreign writes, and lost terms, run against the cache and the store side by side:
        /// every hit equals the store's value at that moment, and no write is running on
        /// that path (a hit is never stale and never earlier than a read already answered).
        #[test]
        fn a_hit_is_never_stale(ops in proptest::collection::vec(op(), 1..200)) {
            let cache = ReadCache::new(2);
            let mut store: BTreeMap<String, Cached> = BTreeMap::new();
            let mut term = CancellationToken::new();
            cache.enable(term.clone());
            let mut tasks: HashMap<usize, Task> = HashMap::new();
            for op in ops {
                match op {
                    Op::ReadStart(t, k) if !tasks.contains_key(&t) => {
                        let key = format!("p/{k}");
                        match cache.lookup(&key) {
                            Lookup::Hit(v) => {
                                let now = store.get(&key).cloned().flatten();
                                prop_assert_eq!(v, now, "stale hit for {}", key);
                                let writing = tasks.values().any(|x| matches!(x, Task::Writing { key: wk, .. } if *wk == key));
                                prop_assert!(!writing, "hit on {} while a write of it runs", key);
                            }
                            Lookup::Miss(ticket) => {
                                tasks.insert(t, Task::Reading { key, ticket: Some(ticket), read: None });
                            }
                            Lookup::Off => {}
                        }
                    }
                    Op::ReadStore(t) => {
                        if let Some(Task::Reading { key, read, .. }) = tasks.get_mut(&t) {
                            if read.is_none() {
                                *read = Some(store.get(key).cloned().flatten());
                            }
                        }
                    }
                    Op::ReadFill(t) => {
                        if let Some(Task::Reading { read: Some(_), .. }) = tasks.get(&t) {
                            if let Some(Task::Reading { key, ticket, read }) = tasks.remove(&t) {
                                cache.fill(&key, ticket.expect("ticket"), read.expect("read"));
                            }
                        }
                    }
                    Op::WriteStart(t, k, val) if !tasks.contains_key(&t) => {
                        let key = format!("p/{k}");
                        cache.write_begins(&key);
                        tasks.insert(t, Task::Writing { key, value: val.and_then(v), applied: None });
                    }
                    Op::WriteStore(t, fail) => {
                        if let Some(Task::Writing { key, value, applied }) = tasks.get_mut(&t) {
                            if applied.is_none() {
                                store.insert(key.clone(), value.clone());
                                *applied = Some(!fail);
                            }
                        }
                    }
                    Op::WriteEnd(t) => {
                        if let Some(Task::Writing { applied: Some(_), .. }) = tasks.get(&t) {
                            if let Some(Task::Writing { key, value, applied }) = tasks.remove(&t) {
                                let ok = applied.expect("applied");
                                cache.write_ends(&key, ok.then_some(value));
                            }
                        }
                    }
                    Op::TermChange(k, val) => {
                        // Running tasks of the old term finish first (drained), then another
                        // node writes while this one is standby.
                        // Reads stay in flight across the change (their fills must fail).
                        let writers: Vec<usize> = tasks
                            .iter()
                            .filter(|(_, x)| matches!(x, Task::Writing { .. }))
                            .map(|(t, _)| *t)
                            .collect();
                        for t in writers {
                            if let Some(Task::Writing { key, value, applied }) = tasks.remove(&t) {
                                if applied.is_none() {
                                    store.insert(key.clone(), value.clone());
                                }
                                cache.write_ends(&key, Some(value));
                            }
                        }
                        cache.disable();
                        store.insert(format!("p/{k}"), v(val));
                        term = CancellationToken::new();
                        cache.enable(term.clone());
                    }
                    Op::Lost => term.cancel(),
                    _ => {}
                }
            }
        }
    }
}

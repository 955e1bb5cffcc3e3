//! Storage and HA-lock traits, fencing tokens, and the built-in backends.
//!
//! Modelled on Vault's `physical.Backend` (untrusted key/value store that only the barrier
//! calls), `HABackend` (a lock inside the store) and `FencingHABackend` (writes of the active
//! carry a token the store checks). Backends: [`inmem`] (with HA, for tests), [`file`]
//! (durable, no HA). lockd and etcd clients plug in through the same traits.
//! `conformance` is the suite every backend runs: built for this crate's tests and, with the
//! `conformance` feature, for the workspace's tests; never part of a production build.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod etcd;
pub mod factory;
pub mod file;
pub mod inmem;
pub mod lease;
pub mod lockd;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use crate::error::StorageError;

/// Longest key a backend must accept. Vault's own paths stay far below; the bound keeps a
/// hostile client from making the store index huge keys.
pub const MAX_KEY_LEN: usize = 1024;
/// Most entries one `put_batch` takes: far above what a caller batches (a KV v2 write is
/// two), and far below etcd's default limit of 128 operations per transaction.
pub const MAX_BATCH: usize = 64;

/// A batch written one put at a time, in order, stopping at the first failure: the default
/// `put_batch`, and what a batching store does with a batch too large for one request.
pub async fn put_each<B: Backend + ?Sized>(
    b: &B,
    puts: Vec<(String, Vec<u8>)>,
    fence: Option<&Fence>,
) -> Result<(), StorageError> {
    for (key, value) in puts {
        b.put(&key, value, fence).await?;
    }
    Ok(())
}

/// Refuses an empty batch and one longer than [`MAX_BATCH`].
pub fn check_batch_len(n: usize) -> Result<(), StorageError> {
    if n == 0 || n > MAX_BATCH {
        return Err(StorageError::Invalid(format!(
            "a batch holds 1 to {MAX_BATCH} entries, not {n}"
        )));
    }
    Ok(())
}
/// Largest value a backend must accept: 32 MiB (Vault's default `max_request_size`) plus
/// room for the barrier's envelope. The limit of the network stores (lockd, etcd), whose
/// protocols and logs are sized for it.
pub const MAX_VALUE_LEN: usize = 32 * 1024 * 1024 + 4096;
/// Largest value the local stores (`file`, `inmem`) accept: 1 GiB plus envelope room, so an
/// operator who raises `max_request_size` (e.g. to 256 MiB) can store such secrets there. A
/// write holds the value in memory a few times over (JSON, ciphertext, file image), so the
/// bound keeps one request with `max_request_size = -1` from exhausting the node's memory.
pub const MAX_LOCAL_VALUE_LEN: usize = 1024 * 1024 * 1024 + 4096;
const _: () = assert!(MAX_LOCAL_VALUE_LEN > MAX_VALUE_LEN);

/// A fencing token: which lock it was granted for, and the grant number. Grant numbers for one
/// lock strictly increase, also across store restarts. A store rejects a write whose token is
/// lower than the highest it has seen for the same lock.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub lock: String,
    pub token: u64,
}

/// A stored entry, as the backend returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The fencing token the entry was written with, where the backend records it.
    pub fence_token: Option<u64>,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or overwritten.
    Put(String),
    /// The key was deleted (or its lease expired).
    Delete(String),
    /// Events may have been missed (reconnect, overflow): re-read what you care about.
    Resync,
}

/// The receiving end of a watch. Closed when the backend shuts down.
pub type WatchStream = tokio::sync::mpsc::Receiver<WatchEvent>;

/// Who holds a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The value the holder acquired with (Vault: a fresh UUID per attempt).
    pub value: String,
    /// The holder's fencing token.
    pub token: u64,
}

/// Checks a key against the limits every backend enforces, so all reject the same input.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    if key.is_empty() {
        return Err(StorageError::Invalid("empty key".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StorageError::Invalid(format!(
            "key of {} bytes exceeds the {MAX_KEY_LEN}-byte limit",
            key.len()
        )));
    }
    if key.starts_with('/') || key.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(StorageError::Invalid(format!(
            "key {key:?} is not a clean relative path"
        )));
    }
    if key.chars().any(|c| c.is_control()) {
        return Err(StorageError::Invalid(format!(
            "key {key:?} contains control characters"
        )));
    }
    Ok(())
}

/// Checks a value against [`MAX_VALUE_LEN`] (the network stores' limit).
pub fn validate_value(value: &[u8]) -> Result<(), StorageError> {
    validate_value_len(value, MAX_VALUE_LEN)
}

/// Checks a value against a backend's own limit (`MAX_VALUE_LEN` or [`MAX_LOCAL_VALUE_LEN`]).
pub fn validate_value_len(value: &[u8], limit: usize) -> Result<(), StorageError> {
    if value.len() > limit {
        return Err(StorageError::Invalid(format!(
            "value of {} bytes exceeds the {limit}-byte limit of this storage backend",
            value.len()
        )));
    }
    Ok(())
}

/// Vault's list semantics: the immediate children of `prefix`, sub-folders with a trailing
/// `/`, sorted, without duplicates. Shared by backends that store flat keys.
pub fn list_children<'a>(prefix: &str, keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = keys
        .filter_map(|k| k.strip_prefix(prefix))
        .filter(|rest| !rest.is_empty())
        .map(|rest| match rest.find('/') {
            Some(i) => rest[..=i].to_string(),
            None => rest.to_string(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// An untrusted key/value store. Only the barrier calls it; everything it holds except the
/// seal configuration is ciphertext.
///
/// # Correctness
/// - `put` and `delete` are durable when they return `Ok` (for durable backends).
/// - A write carrying a [`Fence`] is rejected with [`StorageError::Fenced`] when the store has
///   seen a higher token for the same lock; it is then not applied at all.
/// - `list` returns immediate children only (Vault semantics, see [`list_children`]).
/// - `create` is atomic: of any number of concurrent creates of one key (from any process)
///   exactly one returns `Ok(true)` and writes; the others return `Ok(false)` and write
///   nothing. A stale fence is refused first, as for `put`.
/// - `put_batch` writes its entries in order: a stale fence writes none of them; a failure
///   part-way (or a crash) may leave a prefix written, never a later entry without an
///   earlier one, so callers order entries such that every prefix is consistent.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for banners and `sys/seal-status` (`file`, `inmem`, `lockd`, `etcd`).
    fn kind(&self) -> &'static str;
    async fn get(&self, key: &str) -> Result<Option<Entry>, StorageError>;
    async fn put(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<(), StorageError>;
    /// Writes `value` at `key` only if `key` does not exist: `Ok(true)` when it was created,
    /// `Ok(false)` when the key existed (nothing written).
    async fn create(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<bool, StorageError>;
    async fn delete(&self, key: &str, fence: Option<&Fence>) -> Result<(), StorageError>;
    /// Writes up to [`MAX_BATCH`] entries in order under one fence check. lockd and etcd take
    /// them in one request (one durable commit); the default writes them one by one, which
    /// is what the local stores need (no round trip to save).
    async fn put_batch(&self, puts: Vec<(String, Vec<u8>)>, fence: Option<&Fence>) -> Result<(), StorageError> {
        check_batch_len(puts.len())?;
        put_each(self, puts, fence).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
    /// Watches every key starting with `prefix`. Events arrive in write order; after a gap the
    /// stream yields [`WatchEvent::Resync`]. Backends without watches return `Unsupported`.
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StorageError> {
        let _ = prefix;
        Err(StorageError::Unsupported {
            backend: self.kind(),
            what: "watch",
        })
    }
}

/// A store that can hold the HA lock (Vault's `HABackend`).
///
/// # Correctness
/// - At most one [`LockGuard`] per key is live at any instant in the store's view.
/// - Each grant's token is strictly greater than every earlier grant for that key.
/// - A holder learns of loss through [`LockGuard::lost`] *before* the store could grant the
///   lock to someone else (holder-side deadline), so it can stop acting in time.
#[async_trait]
pub trait HaBackend: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Blocks until the lock on `key` is held with `value` (`Some`), or `cancel` fires (`None`).
    async fn acquire(
        &self,
        key: &str,
        value: &str,
        cancel: CancellationToken,
    ) -> Result<Option<LockGuard>, StorageError>;
    /// The current holder of `key`, if any.
    async fn holder(&self, key: &str) -> Result<Option<Holder>, StorageError>;
    /// Watches the lock key: `Put` when a holder is granted, `Delete` when released or expired.
    async fn watch_lock(&self, key: &str) -> Result<WatchStream, StorageError>;
    /// Releases the grant `token` of `key` on behalf of a holder that is provably gone (its
    /// own proxy on the same host saw the process exit). A no-op when `token` is no longer
    /// the current grant, so a stale call can never release a newer holder's lock.
    async fn force_release(&self, key: &str, token: u64) -> Result<(), StorageError> {
        let _ = (key, token);
        Err(StorageError::Unsupported {
            backend: self.kind(),
            what: "force_release",
        })
    }
}

/// Holder-side lease timing shared by the lock clients (lockd, etcd): renew every TTL/10 so
/// many attempts fit before the deadline, and give up TTL/5 before the store's earliest
/// possible re-grant (time for the node to stop acting after `lost()` fires, plus
/// clock-rate slack). The holder's deadline is *last renewal sent + TTL - margin*.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockTiming {
    /// The lease TTL asked of the store.
    pub ttl: Duration,
    /// How often a held lease is renewed (TTL/10).
    pub renew_interval: Duration,
    /// How long before the store's earliest possible re-grant the holder gives up (TTL/5).
    pub margin: Duration,
}

impl LockTiming {
    /// Timing derived from a TTL (renew every TTL/10, margin TTL/5).
    pub fn from_ttl(ttl: Duration) -> LockTiming {
        LockTiming {
            ttl,
            renew_interval: ttl / 10,
            margin: ttl / 5,
        }
    }

    /// The TTL in whole seconds, rounded up, at least 1 (for stores that count seconds).
    pub fn ttl_secs(&self) -> i64 {
        let ms = self.ttl.as_millis().max(1);
        i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX)
    }
}

/// Releases a held lock; implemented by each HA backend.
#[async_trait]
pub trait LockRelease: Send + Sync + 'static {
    async fn release(&self) -> Result<(), StorageError>;
}

/// A held lock. Carries the fencing token every write of the holder must present.
/// [`LockGuard::lost`] fires when the holder must stop acting. Dropping the guard without
/// [`LockGuard::release`] releases it in the background (best effort).
pub struct LockGuard {
    fence: Fence,
    value: String,
    lost: CancellationToken,
    release: Option<Arc<dyn LockRelease>>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("fence", &self.fence)
            .field("value", &self.value)
            .finish()
    }
}

impl LockGuard {
    pub fn new(fence: Fence, value: String, lost: CancellationToken, release: Arc<dyn LockRelease>) -> Self {
        LockGuard {
            fence,
            value,
            lost,
            release: Some(release),
        }
    }
    pub fn fence(&self) -> &Fence {
        &self.fence
    }
    pub fn value(&self) -> &str {
        &self.value
    }
    /// Fires when the lock is (or may be) lost: stop acting as holder at once.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }
    /// Releases the lock now and waits for the store to confirm.
    pub async fn release(mut self) -> Result<(), StorageError> {
        self.lost.cancel();
        match self.release.take() {
            Some(r) => r.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.lost.cancel();
        if let Some(r) = self.release.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = r.release().await {
                        tracing::warn!(error = %e, "releasing dropped lock failed");
                    }
                });
            }
        }
    }
}

/// The storage a node runs on: the data backend and, when HA is available, the HA backend
/// (the same store or a separate `ha_storage`).
#[derive(Clone)]
pub struct Stores {
    pub data: Arc<dyn Backend>,
    pub ha: Option<Arc<dyn HaBackend>>,
    /// True when `ha_storage` was configured separately (split data/HA mode).
    pub split: bool,
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    /// Each backend's value limit: the network stores keep `MAX_VALUE_LEN`, the local ones
    /// allow more; one byte over a limit is a clear `Invalid` error naming it.
    #[test]
    fn value_limits() {
        assert!(validate_value_len(&[0; 10], 10).is_ok());
        let e = validate_value_len(&[0; 11], 10).unwrap_err().to_string();
        assert!(e.contains("value of 11 bytes exceeds the 10-byte limit"), "{e}");
        assert!(validate_value(&[]).is_ok());
    }
}

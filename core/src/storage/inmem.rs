//! In-memory backend with HA, for tests and `-dev`-style experiments.
//!
//! One process-local map plus a lock table. Locks never expire (there is no process to die
//! separately), so `lost` fires only on release. Fencing follows the same rule as every store:
//! a write whose token is lower than the highest seen for its lock is rejected.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::{
    list_children, validate_key, validate_value_len, Backend, Entry, Fence, HaBackend, Holder, LockGuard, LockRelease,
    StorageError, WatchEvent, WatchStream, MAX_LOCAL_VALUE_LEN,
};

/// Capacity of a watcher's queue; a watcher that falls further behind gets `Resync`.
const WATCH_QUEUE: usize = 1024;

#[derive(Default)]
struct State {
    data: BTreeMap<String, (Vec<u8>, Option<u64>)>,
    /// Highest token granted or seen per lock key.
    highest: HashMap<String, u64>,
    locks: HashMap<String, (Holder, CancellationToken)>,
    watchers: Vec<(String, mpsc::Sender<WatchEvent>)>,
}

impl State {
    fn check_fence(&mut self, fence: Option<&Fence>) -> Result<(), StorageError> {
        if let Some(f) = fence {
            let highest = self.highest.entry(f.lock.clone()).or_insert(0);
            if f.token < *highest {
                return Err(StorageError::Fenced {
                    lock: f.lock.clone(),
                    token: f.token,
                    highest: *highest,
                });
            }
            *highest = f.token;
        }
        Ok(())
    }

    fn notify(&mut self, ev: WatchEvent) {
        let key = match &ev {
            WatchEvent::Put(k) | WatchEvent::Delete(k) => k.clone(),
            WatchEvent::Resync => return,
        };
        self.watchers.retain(|(prefix, tx)| {
            if !key.starts_with(prefix.as_str()) {
                return !tx.is_closed();
            }
            match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The watcher missed events; it will re-read on the Resync it gets once it
                    // drains (best effort: a full queue means it is far behind).
                    let _ = tx.try_send(WatchEvent::Resync);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// The in-memory backend. Cheap to clone; clones share state.
#[derive(Clone, Default)]
pub struct InmemBackend {
    state: Arc<Mutex<State>>,
    released: Arc<Notify>,
}

impl InmemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere while holding it; the map itself is still
        // consistent (every mutation is a single insert/remove), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Backend for InmemBackend {
    fn kind(&self) -> &'static str {
        "inmem"
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StorageError> {
        validate_key(key)?;
        let st = self.lock_state();
        Ok(st.data.get(key).map(|(v, t)| Entry {
            key: key.to_string(),
            value: v.clone(),
            fence_token: *t,
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<(), StorageError> {
        validate_key(key)?;
        validate_value_len(&value, MAX_LOCAL_VALUE_LEN)?;
        let mut st = self.lock_state();
        st.check_fence(fence)?;
        st.data.insert(key.to_string(), (value, fence.map(|f| f.token)));
        st.notify(WatchEvent::Put(key.to_string()));
        Ok(())
    }

    async fn create(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<bool, StorageError> {
        validate_key(key)?;
        validate_value_len(&value, MAX_LOCAL_VALUE_LEN)?;
        let mut st = self.lock_state();
        st.check_fence(fence)?;
        if st.data.contains_key(key) {
            return Ok(false);
        }
        st.data.insert(key.to_string(), (value, fence.map(|f| f.token)));
        st.notify(WatchEvent::Put(key.to_string()));
        Ok(true)
    }

    async fn delete(&self, key: &str, fence: Option<&Fence>) -> Result<(), StorageError> {
        validate_key(key)?;
        let mut st = self.lock_state();
        st.check_fence(fence)?;
        if st.data.remove(key).is_some() {
            st.notify(WatchEvent::Delete(key.to_string()));
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let st = self.lock_state();
        Ok(list_children(
            prefix,
            st.data.range(prefix.to_string()..).map(|(k, _)| k.as_str()),
        ))
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StorageError> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        self.lock_state().watchers.push((prefix.to_string(), tx));
        Ok(rx)
    }
}

struct InmemRelease {
    backend: InmemBackend,
    key: String,
    token: u64,
}

#[async_trait]
impl LockRelease for InmemRelease {
    async fn release(&self) -> Result<(), StorageError> {
        let mut st = self.backend.lock_state();
        let ours = matches!(st.locks.get(&self.key), Some((h, _)) if h.token == self.token);
        if ours {
            if let Some((_, lost)) = st.locks.remove(&self.key) {
                lost.cancel();
            }
            st.notify(WatchEvent::Delete(self.key.clone()));
        }
        drop(st);
        self.backend.released.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl HaBackend for InmemBackend {
    fn kind(&self) -> &'static str {
        "inmem"
    }

    async fn acquire(
        &self,
        key: &str,
        value: &str,
        cancel: CancellationToken,
    ) -> Result<Option<LockGuard>, StorageError> {
        validate_key(key)?;
        loop {
            // Register for the wake-up before checking, so a release in between is not missed.
            let released = self.released.notified();
            {
                let mut st = self.lock_state();
                if !st.locks.contains_key(key) {
                    let token = st.highest.get(key).copied().unwrap_or(0) + 1;
                    st.highest.insert(key.to_string(), token);
                    let lost = CancellationToken::new();
                    let holder = Holder {
                        value: value.to_string(),
                        token,
                    };
                    st.locks.insert(key.to_string(), (holder, lost.clone()));
                    st.notify(WatchEvent::Put(key.to_string()));
                    let release = Arc::new(InmemRelease {
                        backend: self.clone(),
                        key: key.to_string(),
                        token,
                    });
                    return Ok(Some(LockGuard::new(
                        Fence {
                            lock: key.to_string(),
                            token,
                        },
                        value.to_string(),
                        lost,
                        release,
                    )));
                }
            }
            tokio::select! {
                _ = released => {}
                _ = cancel.cancelled() => return Ok(None),
            }
        }
    }

    async fn holder(&self, key: &str) -> Result<Option<Holder>, StorageError> {
        Ok(self.lock_state().locks.get(key).map(|(h, _)| h.clone()))
    }

    async fn watch_lock(&self, key: &str) -> Result<WatchStream, StorageError> {
        Backend::watch(self, key).await
    }

    async fn force_release(&self, key: &str, token: u64) -> Result<(), StorageError> {
        InmemRelease {
            backend: self.clone(),
            key: key.to_string(),
            token,
        }
        .release()
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    /// inmem passes the shared KV conformance suite.
    #[tokio::test]
    async fn conformance_kv() {
        conformance::exercise_backend(&InmemBackend::new()).await;
    }

    /// inmem passes the shared HA conformance suite (two handles on one store).
    #[tokio::test]
    async fn conformance_ha() {
        let b = InmemBackend::new();
        conformance::exercise_ha_backend(&b, &b.clone()).await;
    }
}

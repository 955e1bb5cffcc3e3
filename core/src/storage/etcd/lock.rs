//! The HA lock on etcd: a lease kept alive by the holder plus one key created under it.
//!
//! ```text
//!  acquire:  grant lease ──► txn: create_revision(key) == 0 ? put(key, value, lease) : get(key)
//!               │                     │ succeeded: token = txn revision  ──► held
//!               │                     └ failed: revoke lease, watch key from the txn's
//!               └──────────────────────── revision until it is deleted, then try again
//!  held:     keep-alive every TTL/10; holder deadline = last keep-alive *sent* + TTL - TTL/5
//!            lost() fires at the deadline, when etcd says the lease is gone (TTL <= 0), or
//!            when the key is deleted or re-created under us (watched).
//!  release:  txn: create_revision(key) == token ? delete(key); then revoke the lease.
//! ```
//!
//! # Lease safety on the holder side
//! etcd starts a lease's clock when its leader applies the grant and restarts it when the
//! leader receives a keep-alive, in both cases no earlier than we sent the request. So etcd
//! cannot expire the lease, and hand the key to anyone, before `sent + TTL`; the holder gives
//! up `TTL/5` before that. A new etcd leader extends every lease by a full TTL ("promote"),
//! so an etcd election delays expiry and never advances it. A broken keep-alive stream is
//! not loss by itself: the holder re-opens it (the balanced channel moves to a live member)
//! until the deadline.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{first_get, map_err, to_u64, EtcdBackend, BACKOFF_MAX, BACKOFF_MIN};
use crate::storage::{
    lease, validate_key, Fence, HaBackend, Holder, LockGuard, LockRelease, LockTiming, StorageError, WatchStream,
};

/// How long one wait for the holder's key to go away lasts before the contender re-reads
/// (a safety net: the watch normally wakes it within milliseconds).
const WAIT_RECHECK: Duration = Duration::from_secs(10);

impl EtcdBackend {
    /// Acquires like [`HaBackend::acquire`] and also returns the holder-side deadline as it
    /// moves (for tools and tests that report when the holder gave up).
    pub async fn acquire_lease(
        &self,
        key: &str,
        value: &str,
        cancel: CancellationToken,
    ) -> Result<Option<(LockGuard, watch::Receiver<Instant>)>, StorageError> {
        validate_key(key)?;
        let lk = self.lock_key(key);
        let timing = self.timing();
        let mut backoff = BACKOFF_MIN;
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            match self.try_acquire(&lk, value, timing).await {
                Ok(Attempt::Granted {
                    token,
                    lease,
                    sent,
                    ttl,
                }) => {
                    self.note_own_lock(key);
                    let (guard, dl) = self.guard(key, value, token, lease, sent, ttl);
                    if cancel.is_cancelled() {
                        let _ = guard.release().await;
                        return Ok(None);
                    }
                    return Ok(Some((guard, dl)));
                }
                Ok(Attempt::Held { after }) => {
                    backoff = BACKOFF_MIN;
                    tokio::select! {
                        r = self.wait_deleted(&lk, after) => {
                            if let Err(e) = r {
                                tracing::debug!(error = %e, "etcd lock wait failed; retrying");
                                tokio::select! {
                                    _ = tokio::time::sleep(backoff) => {}
                                    _ = cancel.cancelled() => return Ok(None),
                                }
                            }
                        }
                        _ = cancel.cancelled() => return Ok(None),
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "etcd lock attempt failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return Ok(None),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn try_acquire(&self, lk: &str, value: &str, timing: LockTiming) -> Result<Attempt, StorageError> {
        let mut c = self.client().await?;
        let sent = Instant::now();
        let lease = self.call("lease grant", c.lease_grant(timing.ttl_secs(), None)).await?;
        let ttl =
            Duration::from_secs(u64::try_from(lease.ttl()).unwrap_or(0)).min(timing.ttl.max(Duration::from_secs(1)));
        let id = lease.id();
        let txn = Txn::new()
            .when([Compare::create_revision(lk, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(lk, value, Some(PutOptions::new().with_lease(id)))])
            .or_else([TxnOp::get(lk, None)]);
        let r = match self.call("lock txn", c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke_later(id);
                return Err(e);
            }
        };
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        if r.succeeded() {
            return Ok(Attempt::Granted {
                token: to_u64(rev),
                lease: id,
                sent,
                ttl,
            });
        }
        self.revoke_later(id);
        Ok(Attempt::Held { after: rev })
    }

    fn revoke_later(&self, id: i64) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Ok(mut c) = me.client().await {
                let _ = me.call("lease revoke", c.lease_revoke(id)).await;
            }
        });
    }

    /// Waits until lock key `lk` is deleted after revision `after` (or `WAIT_RECHECK` passes).
    async fn wait_deleted(&self, lk: &str, after: i64) -> Result<(), StorageError> {
        let mut c = self.client().await?;
        let opts = WatchOptions::new().with_start_revision(after + 1);
        let mut s = self.call("lock watch", c.watch(lk, Some(opts))).await?;
        let deadline = Instant::now() + WAIT_RECHECK;
        loop {
            let msg = match tokio::time::timeout_at(deadline, s.message()).await {
                Err(_) => return Ok(()),
                Ok(m) => m.map_err(|e| map_err("lock watch", e))?,
            };
            let Some(resp) = msg else {
                return Err(StorageError::Unavailable("etcd lock watch closed".into()));
            };
            if resp.canceled() {
                return Err(StorageError::Unavailable(format!(
                    "etcd lock watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                return Ok(());
            }
        }
    }

    fn guard(
        &self,
        key: &str,
        value: &str,
        token: u64,
        lease: i64,
        sent: Instant,
        ttl: Duration,
    ) -> (LockGuard, watch::Receiver<Instant>) {
        let timing = LockTiming::from_ttl(ttl);
        let lost = CancellationToken::new();
        let (dl_tx, dl_rx) = watch::channel(sent + timing.ttl - timing.margin);
        let me = self.clone();
        let lost2 = lost.clone();
        let lk = self.lock_key(key);
        tokio::spawn(async move {
            tokio::join!(
                lease::keep_lease(
                    &lk,
                    EtcdRenew {
                        client: me.clone(),
                        lease,
                        stream: None,
                    },
                    sent,
                    timing,
                    lost2.clone(),
                    dl_tx
                ),
                me.watch_own_key(lk.clone(), token, lost2),
            );
        });
        let release = Arc::new(EtcdRelease {
            client: self.clone(),
            key: key.to_string(),
            token,
            lease,
        });
        let guard = LockGuard::new(
            Fence {
                lock: key.to_string(),
                token,
            },
            value.to_string(),
            lost,
            release,
        );
        (guard, dl_rx)
    }

    /// One keep-alive round trip; returns the TTL etcd reports (<= 0: lease gone).
    async fn keep_alive_once(
        &self,
        lease: i64,
        stream: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> Result<i64, KeepAliveError> {
        if let Some((keeper, s)) = stream.as_mut() {
            keeper
                .keep_alive()
                .await
                .map_err(|e| KeepAliveError::Transport(e.to_string()))?;
            return match s.message().await {
                Ok(Some(r)) => Ok(r.ttl()),
                Ok(None) => Err(KeepAliveError::Transport("keep-alive stream closed".into())),
                Err(e) => Err(KeepAliveError::Transport(e.to_string())),
            };
        }
        let mut c = self
            .client()
            .await
            .map_err(|e| KeepAliveError::Transport(e.to_string()))?;
        match c.lease_keep_alive(lease).await {
            // Opening the stream sends one keep-alive and waits for its answer.
            Ok((k, s)) => {
                *stream = Some((k, s));
                Ok(1)
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Err(KeepAliveError::Gone),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Err(KeepAliveError::Gone)
            }
            Err(e) => Err(KeepAliveError::Transport(e.to_string())),
        }
    }

    /// Fires `lost` when the lock key is deleted or re-created by someone else (a forced
    /// release, an operator). Re-establishes the watch when it breaks.
    async fn watch_own_key(self, lk: String, token: u64, lost: CancellationToken) {
        let mut from = i64::try_from(token).unwrap_or(i64::MAX);
        loop {
            let r = tokio::select! {
                _ = lost.cancelled() => return,
                r = self.watch_own_key_once(&lk, token, &mut from) => r,
            };
            match r {
                Ok(()) => {
                    tracing::warn!(lock = %lk, token, "etcd lock key was deleted or replaced; lock lost");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "etcd lock-key watch broke; re-establishing");
                    tokio::select! {
                        _ = lost.cancelled() => return,
                        _ = tokio::time::sleep(BACKOFF_MAX / 4) => {}
                    }
                }
            }
        }
    }

    async fn watch_own_key_once(&self, lk: &str, token: u64, from: &mut i64) -> Result<(), StorageError> {
        let mut c = self.client().await?;
        let opts = WatchOptions::new().with_start_revision(*from);
        let mut s = c.watch(lk, Some(opts)).await.map_err(|e| map_err("lock watch", e))?;
        loop {
            let Some(resp) = s.message().await.map_err(|e| map_err("lock watch", e))? else {
                return Err(StorageError::Unavailable("etcd lock watch closed".into()));
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    // Compacted past our start: re-check the key directly.
                    let mut c = self.client().await?;
                    let r = self.call("get", c.get(lk, None)).await?;
                    if r.kvs().first().map(|kv| to_u64(kv.create_revision())) != Some(token) {
                        return Ok(());
                    }
                    *from = r.header().map(|h| h.revision()).unwrap_or(*from);
                }
                return Err(StorageError::Unavailable(format!(
                    "etcd lock watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                *from = (*from).max(kv.mod_revision() + 1);
                match ev.event_type() {
                    EventType::Delete => return Ok(()),
                    EventType::Put if to_u64(kv.create_revision()) != token => return Ok(()),
                    EventType::Put => {}
                }
            }
        }
    }

    /// Releases grant `token` of lock `key` if it is still the current one; revokes `lease`
    /// when known. Already-ended grants count as released.
    pub async fn release_token(&self, key: &str, token: u64, lease: Option<i64>) -> Result<(), StorageError> {
        validate_key(key)?;
        let lk = self.lock_key(key);
        let mut c = self.client().await?;
        let t = i64::try_from(token).unwrap_or(i64::MAX);
        let txn = Txn::new()
            .when([Compare::create_revision(lk.clone(), CompareOp::Equal, t)])
            .and_then([TxnOp::get(lk.clone(), None), TxnOp::delete(lk, None)]);
        let r = self.call("lock release", c.txn(txn)).await?;
        let lease = lease.or_else(|| r.succeeded().then(|| first_get(&r).map(|kv| kv.lease())).flatten());
        if let Some(id) = lease.filter(|id| *id != 0) {
            // The key is gone already; revoking only frees the lease early.
            let _ = self.call("lease revoke", c.lease_revoke(id)).await;
        }
        Ok(())
    }
}

enum Attempt {
    Granted {
        token: u64,
        lease: i64,
        sent: Instant,
        ttl: Duration,
    },
    /// Someone else holds the lock; the answer was read at this revision.
    Held { after: i64 },
}

enum KeepAliveError {
    /// etcd says the lease does not exist (expired or revoked).
    Gone,
    Transport(String),
}

/// etcd's renewal call for [`lease::keep_lease`]: one keep-alive on a kept-open stream
/// (reopened after a failure).
struct EtcdRenew {
    client: EtcdBackend,
    lease: i64,
    stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
}

impl lease::Renew for EtcdRenew {
    async fn renew(&mut self, budget: Duration) -> lease::Renewal {
        match tokio::time::timeout(budget, self.client.keep_alive_once(self.lease, &mut self.stream)).await {
            Ok(Ok(ttl)) if ttl > 0 => lease::Renewal::Granted(Duration::from_secs(u64::try_from(ttl).unwrap_or(0))),
            Ok(Ok(_)) | Ok(Err(KeepAliveError::Gone)) => lease::Renewal::Ended,
            Ok(Err(KeepAliveError::Transport(e))) => {
                self.stream = None;
                lease::Renewal::Failed(e)
            }
            Err(_) => {
                self.stream = None;
                lease::Renewal::Failed("no keep-alive answer before the holder deadline".into())
            }
        }
    }
}

struct EtcdRelease {
    client: EtcdBackend,
    key: String,
    token: u64,
    lease: i64,
}

#[async_trait]
impl LockRelease for EtcdRelease {
    /// One attempt now; when etcd cannot be reached (no quorum, members down) the release is
    /// retried in the background for one lease TTL, so a lock given up at the holder deadline
    /// frees as soon as etcd is back instead of lingering until its lease expires. Retrying
    /// is safe: the delete compares the grant's create revision and never touches a newer one.
    async fn release(&self) -> Result<(), StorageError> {
        match self.client.release_token(&self.key, self.token, Some(self.lease)).await {
            Err(StorageError::Unavailable(m)) => {
                let (client, key, token, lease) = (self.client.clone(), self.key.clone(), self.token, self.lease);
                tokio::spawn(async move {
                    let until = Instant::now() + client.timing().ttl;
                    let mut backoff = BACKOFF_MIN;
                    while Instant::now() < until {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        if client.release_token(&key, token, Some(lease)).await.is_ok() {
                            tracing::info!(lock = %key, token, "released the lock once etcd was reachable again");
                            return;
                        }
                    }
                });
                Err(StorageError::Unavailable(m))
            }
            other => other,
        }
    }
}

#[async_trait]
impl HaBackend for EtcdBackend {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn acquire(
        &self,
        key: &str,
        value: &str,
        cancel: CancellationToken,
    ) -> Result<Option<LockGuard>, StorageError> {
        Ok(self.acquire_lease(key, value, cancel).await?.map(|(g, _)| g))
    }

    async fn holder(&self, key: &str) -> Result<Option<Holder>, StorageError> {
        validate_key(key)?;
        let mut c = self.client().await?;
        let r = self.call("holder", c.get(self.lock_key(key), None)).await?;
        Ok(r.kvs().first().map(|kv| Holder {
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            token: to_u64(kv.create_revision()),
        }))
    }

    async fn watch_lock(&self, key: &str) -> Result<WatchStream, StorageError> {
        validate_key(key)?;
        self.open_watch(self.lock_key(key), false, self.inner.lock_prefix.clone())
            .await
    }

    async fn force_release(&self, key: &str, token: u64) -> Result<(), StorageError> {
        self.release_token(key, token, None).await
    }
}

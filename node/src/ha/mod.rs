//! High availability: the node's lock loop, its active/standby state, the advertisement it
//! writes when active, and what a standby knows about the active.
//!
//! ```text
//!                 init            unseal
//!  uninitialized ─────► sealed ◄────────────────────────────┐ seal (standby: refused)
//!                         │ unseal                          │
//!                         ▼                                 │
//!                  ┌──► standby ── contend core/lock ──► active ──┐
//!                  │      ▲  (fresh UUID per attempt)        │     │
//!                  │      └── lock lost / storage down ──────┘     │ SIGTERM: drain,
//!                  │                                               │ step down, exit
//!                  └── step-down (wait step_down_wait) ◄───────────┘
//! ```
//! Sealed nodes never contend, advertise or serve forwarded requests. Becoming active, in
//! order: new P-521 key + non-CA cert, bind the cluster listener, write the advertisement
//! `core/leader/<uuid>` through the barrier with the fencing token, delete stale ones. Losing
//! the lock: stop serving at once (the role flips before anything else), close the cluster
//! listener, best-effort delete our advertisement, record the term, re-contend.

pub mod leader;
pub mod state;
pub mod term;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use vha_core::advert::{leader_path, Advertisement, LEADER_PREFIX, LOCK_KEY};
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::storage::{LockGuard, StorageError};
use vha_core::BarrierError;

use crate::node::Node;
use state::{LeaderInfo, Role};
use term::{GiveUp, Next, TermEnd};

/// Longest wait at the end of a term for logical requests already running to finish with
/// the term's fence (normal requests take milliseconds; a request still running after this
/// has its writes refused).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed lock attempt (storage unreachable) before trying again: short
/// enough to take over quickly once the store is back, long enough not to hammer it.
const ACQUIRE_RETRY: Duration = Duration::from_millis(250);
/// Pause after a failed leadership setup (listener bind or advertisement write failed).
const SETUP_RETRY: Duration = Duration::from_secs(1);
/// Bound on the best-effort delete of our own advertisement when a term ends: the store may
/// be the very thing that is unreachable; the next active deletes stale entries anyway.
const ADVERT_DELETE_TIMEOUT: Duration = Duration::from_secs(2);

/// Room for a serialized advertisement: about 1.5 KiB (a P-521 certificate and key in
/// base64, two addresses); twice that so it never needs to grow.
const ADVERTISEMENT_CAPACITY: usize = 4096;

/// The cluster channel a term opens for the standbys' proxies to forward over. The server
/// wiring names the implementation (the cluster listener), so the lock loop stays below the
/// HTTP stack that serves forwarded requests.
pub trait ClusterChannel: Sized + Send + 'static {
    /// A closed channel's connections, still lingering until they are done.
    type Closed: Send + 'static;
    /// Opens the channel with the term's identity, ready before the advertisement names it.
    fn open(node: Arc<Node>, identity: Arc<ClusterIdentity>) -> impl Future<Output = std::io::Result<Self>> + Send;
    /// Stops accepting; what is already open lingers (dropping the result leaves that to
    /// finish in the background).
    fn close(self) -> impl Future<Output = Self::Closed> + Send;
    /// Resolves once every lingering connection is done.
    fn lingered(closed: Self::Closed) -> impl Future<Output = ()> + Send;
}

/// The lock loop. Runs for the life of the process when HA is enabled.
pub async fn run<C: ClusterChannel>(node: Arc<Node>) {
    let Some(ha_backend) = node.stores().ha.clone() else {
        return;
    };
    let handle = node.ha();
    let mut sealed_rx = handle.sealed.subscribe();
    let shutdown = node.shutdown.clone();
    // How long the next standby phase waits before contending: after a step-down (Vault's
    // `step_down_wait`) or a failed attempt. The node is a standby meanwhile: it follows the
    // active and heartbeats to it, so `sys/health` and `sys/ha-status` see it at once.
    let mut hold_off = Duration::ZERO;
    loop {
        // Sealed: wait for unseal (or shutdown).
        tokio::select! {
            r = sealed_rx.wait_for(|s| !*s) => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        handle.update(|s| {
            s.role = Role::Standby;
            s.fence = None;
            s.active_since = None;
        });
        // Standby: learn who leads, heartbeat to it, and contend.
        let standby_cancel = shutdown.child_token();
        let watcher = tokio::spawn(leader::standby_tasks(node.clone(), standby_cancel.clone()));
        let uuid = uuid::Uuid::new_v4().to_string();
        let contend = tokio::select! {
            _ = tokio::time::sleep(std::mem::take(&mut hold_off)) => true,
            _ = sealed_rx.wait_for(|s| *s) => false,
            _ = shutdown.cancelled() => false,
        };
        let contend_start = Instant::now();
        let acquired = if contend {
            tokio::select! {
                r = ha_backend.acquire(LOCK_KEY, &uuid, standby_cancel.clone()) => r,
                _ = sealed_rx.wait_for(|s| *s) => Ok(None),
            }
        } else {
            Ok(None)
        };
        standby_cancel.cancel();
        let _ = watcher.await;
        let guard = match acquired {
            Ok(Some(g)) => g,
            Ok(None) => {
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "contending for the HA lock failed; retrying");
                hold_off = ACQUIRE_RETRY;
                continue;
            }
        };
        node.metrics()
            .lock_acquire
            .observe(contend_start.elapsed().as_secs_f64());
        if *sealed_rx.borrow() || shutdown.is_cancelled() {
            let _ = guard.release().await;
            if shutdown.is_cancelled() {
                return;
            }
            continue;
        }
        match active_term::<C>(&node, guard, &uuid, &mut sealed_rx).await {
            Ok((_, Next::Exit)) => return,
            Ok((end, Next::Contend { after })) => {
                hold_off = after;
                if end == TermEnd::StepDown {
                    tracing::info!(wait = ?hold_off, "stepped down; following the new active before contending again");
                }
            }
            Err(e) => {
                node.metrics().leadership_setup_failed.inc();
                tracing::error!(error = %e, "leadership setup failed; back to standby");
                hold_off = SETUP_RETRY;
            }
        }
    }
}

/// Errors while setting up leadership.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("cluster identity: {0}")]
    Tls(#[from] vha_core::cluster_tls::ClusterTlsError),
    #[error("cluster listener: {0}")]
    Listener(std::io::Error),
    #[error("advertisement: {0}")]
    Barrier(#[from] BarrierError),
}

/// One active term: set up, serve until it ends, tear down.
async fn active_term<C: ClusterChannel>(
    node: &Arc<Node>,
    guard: LockGuard,
    uuid: &str,
    sealed_rx: &mut watch::Receiver<bool>,
) -> Result<(TermEnd, Next), SetupError> {
    let handle = node.ha();
    let fence = guard.fence().clone();
    tracing::info!(token = fence.token, %uuid, "acquired lock, enabling active operation");
    let started = Instant::now();

    // 1. A fresh key and certificate for this term.
    let uuid_owned = uuid.to_string();
    let identity = tokio::task::spawn_blocking(move || ClusterIdentity::generate(&uuid_owned))
        .await
        .map_err(|e| SetupError::Listener(std::io::Error::other(e.to_string())))??;
    let identity = Arc::new(identity);
    // 2. The cluster listener, ready before anyone can read the advertisement.
    let listener = if node.config().disable_clustering {
        None
    } else {
        let l = C::open(node.clone(), identity.clone())
            .await
            .map_err(SetupError::Listener);
        match l {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = guard.release().await;
                return Err(e);
            }
        }
    };
    // 3. The advertisement, written with our fencing token.
    let adv = Advertisement {
        redirect_addr: node.config().api_addr.as_str().trim_end_matches('/').to_string(),
        cluster_addr: node.config().cluster_addr.as_str().trim_end_matches('/').to_string(),
        cluster_cert: identity.cert_der.clone(),
        cluster_key_params: Some(identity.params.clone()),
    };
    let path = leader_path(uuid);
    let write = async {
        // The plaintext carries the term's private key: zeroized once written, and sized
        // up front so that growing it leaves no copy behind.
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(ADVERTISEMENT_CAPACITY));
        serde_json::to_writer(&mut *bytes, &adv).map_err(|e| BarrierError::InvalidParameters(e.to_string()))?;
        node.barrier().put(&path, &bytes, Some(&fence)).await?;
        // 4. Stale advertisements from earlier terms.
        for key in node.barrier().list(LEADER_PREFIX).await? {
            if key != uuid && !key.ends_with('/') {
                node.barrier().delete(&leader_path(&key), Some(&fence)).await?;
            }
        }
        Ok::<_, BarrierError>(())
    };
    if let Err(e) = write.await {
        if let Some(l) = listener {
            // Nothing was advertised: no proxy has a connection to linger for.
            drop(l.close().await);
        }
        note_fenced(node, &e);
        let _ = guard.release().await;
        return Err(e.into());
    }
    *handle.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(identity.clone());
    // The previous active may have changed policies, mounts, tokens: read them afresh.
    node.clear_caches();
    // Standbys heard in an earlier term of this node are not this term's standbys.
    handle.echoes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    // The gate opens before the role flips, so whatever passes the role check is admitted.
    node.in_flight().set_open(true);
    let signals = handle.begin_term();
    handle.update(|s| {
        s.role = Role::Active;
        s.fence = Some(fence.clone());
        s.active_since = Some(SystemTime::now());
        s.leader = Some(Arc::new(LeaderInfo {
            uuid: uuid.to_string(),
            adv: adv.clone(),
        }));
        s.last_echo = None;
        s.leader_since = None;
    });
    node.metrics().core_active.set(1);
    node.metrics().term.set(i64::try_from(fence.token).unwrap_or(i64::MAX));
    tracing::info!("active operation enabled in {:?}", started.elapsed());

    // Serve until the term ends.
    let lost = guard.lost();
    let end = tokio::select! {
        _ = lost.cancelled() => TermEnd::Lost,
        _ = signals.fenced.cancelled() => TermEnd::Lost,
        _ = signals.step_down.cancelled() => TermEnd::StepDown,
        _ = sealed_rx.wait_for(|s| *s) => TermEnd::Sealed,
        _ = node.shutdown.cancelled() => TermEnd::Shutdown,
    };
    handle.end_term();
    let plan = term::plan(end, node.config().step_down_wait);
    let step_down_started = Instant::now();
    // Stop serving at once: the role flips before anything else, so no new request is
    // admitted. (Standby even when sealing: `Sealed` is reported only once the teardown
    // below is done.) Requests already running keep the term's fence until they finish
    // (bounded), then the fence goes: nothing this node runs later can write.
    handle.update(|s| {
        s.role = Role::Standby;
        s.active_since = None;
        s.leader = None;
    });
    node.in_flight().set_open(false);
    node.metrics().core_active.set(0);
    node.metrics().term.set(0);
    let term_len = started.elapsed();
    if end == TermEnd::Lost {
        node.metrics().leadership_lost.observe(term_len.as_secs_f64());
        tracing::warn!(?term_len, "leadership lost, stopping active operation");
    }
    if plan.drain
        && tokio::time::timeout(DRAIN_TIMEOUT, node.in_flight().wait_idle())
            .await
            .is_err()
    {
        tracing::warn!(
            running = node.in_flight().count(),
            "requests still running {DRAIN_TIMEOUT:?} after the term ended; the store refuses their writes once the lock is released"
        );
    }
    handle.update(|s| s.fence = None);
    *handle.identity.write().unwrap_or_else(|e| e.into_inner()) = None;
    let lingering = match listener {
        Some(l) => Some(l.close().await),
        None => None,
    };
    // Best effort: remove our advertisement (a deposed writer is fenced out anyway). The
    // barrier may already be sealed; then the entry stays until the next active cleans up.
    match tokio::time::timeout(ADVERT_DELETE_TIMEOUT, node.barrier().delete(&path, Some(&fence))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not delete own advertisement"),
        Err(_) => tracing::debug!("deleting own advertisement timed out"),
    }
    match plan.give_up {
        GiveUp::Abandon => drop(guard),
        GiveUp::Release => {
            if let Err(e) = guard.release().await {
                tracing::warn!(error = %e, "releasing the HA lock failed");
            }
            if end == TermEnd::StepDown {
                node.metrics()
                    .step_down
                    .observe(step_down_started.elapsed().as_secs_f64());
            }
            tracing::info!(reason = ?end, ?term_len, "stepped down from active");
        }
    }
    if let (true, Some(l)) = (plan.wait_linger, lingering) {
        // The lock is free and the next active on its way; this process stays until the
        // proxies' open forwards were refused, not reset (see `cluster`'s module header).
        C::lingered(l).await;
    }
    if end == TermEnd::Sealed || *sealed_rx.borrow() {
        handle.update(|s| {
            s.role = Role::Sealed;
            s.last_echo = None;
            s.leader_since = None;
        });
    }
    Ok((end, plan.next))
}

/// Counts a fencing rejection.
pub(crate) fn note_fenced(node: &Node, e: &BarrierError) {
    if matches!(e, BarrierError::Storage(StorageError::Fenced { .. })) {
        node.metrics().fencing_rejections.inc();
        node.ha().fenced();
    }
}

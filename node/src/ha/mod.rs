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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use vha_core::advert::{leader_path, Advertisement, LEADER_PREFIX, LOCK_KEY};
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::storage::{Fence, LockGuard, StorageError};
use vha_core::BarrierError;

use crate::cluster::ClusterListener;
use crate::node::Node;

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
/// How long a standby heartbeat record stays in `sys/ha-status` without a new echo.
pub const ECHO_RETENTION: Duration = Duration::from_secs(30);

/// Room for a serialized advertisement: about 1.5 KiB (a P-521 certificate and key in
/// base64, two addresses); twice that so it never needs to grow.
const ADVERTISEMENT_CAPACITY: usize = 4096;

/// The node's HA role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The storage has no HA: the node is active whenever unsealed.
    Disabled,
    Sealed,
    Standby,
    Active,
}

/// The active node as known to this node (itself, when active).
#[derive(Clone, Debug)]
pub struct LeaderInfo {
    /// The lock value of the active's term (its `core/leader/<uuid>`).
    pub uuid: String,
    pub adv: Advertisement,
}

/// A snapshot of the HA state.
#[derive(Clone, Debug)]
pub struct HaStatus {
    pub role: Role,
    /// This node's fencing token, while active.
    pub fence: Option<Fence>,
    /// When this node became active.
    pub active_since: Option<SystemTime>,
    /// The known active node (this node when active).
    pub leader: Option<Arc<LeaderInfo>>,
    /// Standby: last successful heartbeat to the active.
    pub last_echo: Option<Instant>,
    /// Standby: when it learned of the active it knows now (a new active resets the
    /// heartbeat record, and the first heartbeat to it goes out at once).
    pub leader_since: Option<Instant>,
}

impl HaStatus {
    /// `sys/health`'s 474: a standby that knows an active node and has not reached it for
    /// two heartbeat periods, counted from its last heartbeat or, before the first one to
    /// this active, from when it learned of it. A leader change alone is never unhealthy.
    pub fn ha_unhealthy(&self, now: Instant) -> bool {
        if self.role != Role::Standby || self.leader.is_none() {
            return false;
        }
        match self.last_echo.or(self.leader_since) {
            Some(t) => now.saturating_duration_since(t) > 2 * leader::ECHO_INTERVAL,
            None => true,
        }
    }
}

/// A standby seen through its heartbeats (for `sys/ha-status`).
#[derive(Clone, Debug, Serialize)]
pub struct EchoRecord {
    pub hostname: String,
    pub api_address: String,
    pub cluster_address: String,
    pub version: String,
    #[serde(skip)]
    pub seen: Option<Instant>,
    pub last_echo: String,
}

/// Why an active term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TermEnd {
    Lost,
    StepDown,
    Sealed,
    Shutdown,
}

/// The HA state shared between the lock loop, the API and the cluster listener.
pub struct HaHandle {
    status: watch::Sender<HaStatus>,
    sealed: watch::Sender<bool>,
    /// The running term's end signals (`None` between terms): a signal belongs to one term,
    /// so a step-down or fencing report that arrives as a term ends for another reason is
    /// dropped with it and can never end the next term.
    term: Mutex<Option<TermSignals>>,
    echoes: Mutex<BTreeMap<String, EchoRecord>>,
    identity: RwLock<Option<Arc<ClusterIdentity>>>,
    enabled: bool,
}

impl HaHandle {
    pub fn new(enabled: bool) -> HaHandle {
        let status = HaStatus {
            role: Role::Sealed,
            fence: None,
            active_since: None,
            leader: None,
            last_echo: None,
            leader_since: None,
        };
        HaHandle {
            status: watch::channel(status).0,
            sealed: watch::channel(true).0,
            term: Mutex::new(None),
            echoes: Mutex::new(BTreeMap::new()),
            identity: RwLock::new(None),
            enabled,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn status(&self) -> HaStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<HaStatus> {
        self.status.subscribe()
    }

    pub fn role(&self) -> Role {
        self.status.borrow().role
    }

    /// True when this node may serve requests itself (active, or unsealed without HA).
    pub fn serves_requests(&self) -> bool {
        matches!(self.role(), Role::Active | Role::Disabled)
    }

    pub fn is_standby(&self) -> bool {
        self.role() == Role::Standby
    }

    /// The fencing token every write of this node must carry (`None` without HA).
    pub fn fence(&self) -> Option<Fence> {
        self.status.borrow().fence.clone()
    }

    /// The fence for a write, or `Err` when this node must not write at all: HA is on, the
    /// barrier is open, and the node holds no fence (not active, or its term ended and its
    /// last requests were drained): nothing may fall back to unfenced writes.
    pub fn write_fence(&self) -> Result<Option<Fence>, crate::error::ApiError> {
        let st = self.status.borrow();
        match (self.enabled, st.role, &st.fence) {
            // A standby with a fence is an active draining its last requests (see the lock
            // loop); without one, no HA node writes (init uses its own unfenced view).
            (true, _, None) => Err(crate::error::ApiError::NotActive),
            (_, _, f) => Ok(f.clone()),
        }
    }

    /// This term's cluster identity (active only).
    pub fn identity(&self) -> Option<Arc<ClusterIdentity>> {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tells the lock loop about a seal/unseal. An active node is not flipped here: its
    /// term ends in the loop, which tears down (listener, advertisement, lock) while the
    /// barrier is still open and then reports [`Role::Sealed`].
    pub(crate) fn set_sealed(&self, sealed: bool) {
        self.sealed.send_replace(sealed);
        if sealed {
            self.update(|s| {
                if s.role != Role::Active {
                    // The fence stays with the lock loop (it may be draining a term).
                    s.role = Role::Sealed;
                    s.active_since = None;
                    s.leader = None;
                    s.last_echo = None;
                    s.leader_since = None;
                }
            });
        } else if !self.enabled {
            self.update(|s| s.role = Role::Disabled);
        } else {
            // Unsealed with HA: a standby until the lock loop wins the lock.
            self.update(|s| {
                if s.role == Role::Sealed {
                    s.role = Role::Standby;
                }
            });
        }
    }

    /// Waits until a seal requested with [`HaHandle::set_sealed`] has taken effect (the
    /// active term, if any, is torn down).
    pub(crate) async fn wait_sealed(&self, timeout: Duration) -> bool {
        if !self.enabled {
            return true;
        }
        let mut rx = self.subscribe();
        let ok = tokio::time::timeout(timeout, rx.wait_for(|s| s.role == Role::Sealed))
            .await
            .is_ok();
        ok
    }

    fn update(&self, f: impl FnOnce(&mut HaStatus)) {
        self.status.send_modify(f);
    }

    /// Sets the known leader (standby) unless this node is active.
    pub(crate) fn set_leader(&self, leader: Option<Arc<LeaderInfo>>) {
        self.status.send_if_modified(|s| {
            if s.role != Role::Standby {
                return false;
            }
            let changed = match (&s.leader, &leader) {
                (Some(a), Some(b)) => a.uuid != b.uuid || a.adv != b.adv,
                (None, None) => false,
                _ => true,
            };
            if changed {
                s.last_echo = None;
                s.leader_since = leader.as_ref().map(|_| Instant::now());
            }
            s.leader = leader;
            changed
        });
    }

    pub(crate) fn echo_ok(&self) {
        self.status.send_if_modified(|s| {
            s.last_echo = Some(Instant::now());
            false
        });
    }

    /// Records a standby's heartbeat (on the active).
    pub fn record_echo(&self, mut rec: EchoRecord) {
        rec.seen = Some(Instant::now());
        rec.last_echo = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut e = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        e.retain(|_, r| r.seen.is_some_and(|t| t.elapsed() < ECHO_RETENTION));
        // Keyed by the cluster address: each node's own, while behind a load balancer every
        // node may advertise the same api_addr.
        e.insert(rec.cluster_address.clone(), rec);
    }

    /// Standbys heard from recently.
    pub fn echoes(&self) -> Vec<EchoRecord> {
        let e = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        e.values()
            .filter(|r| r.seen.is_some_and(|t| t.elapsed() < ECHO_RETENTION))
            .cloned()
            .collect()
    }

    /// Reports that the store refused a write as fenced: the running term, if any, ends as
    /// lost at once.
    pub fn fenced(&self) {
        if let Some(t) = self.term.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            t.fenced.cancel();
        }
    }

    /// Asks the lock loop to step down; resolves once this node is no longer active
    /// (bounded by `timeout`). Between terms it asks nothing of the next one.
    pub async fn step_down(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        if let Some(t) = self.term.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            t.step_down.cancel();
        }
        let ok = tokio::time::timeout(timeout, rx.wait_for(|s| s.role != Role::Active))
            .await
            .is_ok();
        ok
    }

    /// A new term's end signals, installed before the role turns active.
    fn begin_term(&self) -> TermSignals {
        let t = TermSignals::default();
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.clone());
        t
    }

    /// The term is over: later signals have no term to end.
    fn end_term(&self) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// How a running term is asked to end from outside the lock loop.
#[derive(Clone, Default)]
struct TermSignals {
    /// The store refused one of the term's writes as fenced: it was deposed.
    fenced: CancellationToken,
    /// `sys/step-down` or SIGTERM asked it to step down.
    step_down: CancellationToken,
}

/// The lock loop. Runs for the life of the process when HA is enabled.
pub async fn run(node: Arc<Node>) {
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
        match active_term(&node, guard, &uuid, &mut sealed_rx).await {
            Ok(TermEnd::Shutdown) => return,
            Ok(TermEnd::StepDown) => {
                hold_off = node.config().step_down_wait;
                tracing::info!(wait = ?hold_off, "stepped down; following the new active before contending again");
            }
            Ok(TermEnd::Lost | TermEnd::Sealed) => {}
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
async fn active_term(
    node: &Arc<Node>,
    guard: LockGuard,
    uuid: &str,
    sealed_rx: &mut watch::Receiver<bool>,
) -> Result<TermEnd, SetupError> {
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
        let l = ClusterListener::start(node.clone(), identity.clone())
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
            drop(l.stop().await);
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
        // Not drained: the fence is stale, the store refuses the term's writes anyway.
        node.metrics().leadership_lost.observe(term_len.as_secs_f64());
        tracing::warn!(?term_len, "leadership lost, stopping active operation");
    } else if tokio::time::timeout(DRAIN_TIMEOUT, node.in_flight().wait_idle())
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
        Some(l) => Some(l.stop().await),
        None => None,
    };
    // Best effort: remove our advertisement (a deposed writer is fenced out anyway). The
    // barrier may already be sealed; then the entry stays until the next active cleans up.
    match tokio::time::timeout(ADVERT_DELETE_TIMEOUT, node.barrier().delete(&path, Some(&fence))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not delete own advertisement"),
        Err(_) => tracing::debug!("deleting own advertisement timed out"),
    }
    match end {
        TermEnd::Lost => drop(guard),
        _ => {
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
    if let (TermEnd::Shutdown, Some(l)) = (end, lingering) {
        // The lock is free and the next active on its way; this process stays until the
        // proxies' open forwards were refused, not reset (see `cluster`'s module header).
        l.wait().await;
    }
    if end == TermEnd::Sealed || *sealed_rx.borrow() {
        handle.update(|s| {
            s.role = Role::Sealed;
            s.last_echo = None;
            s.leader_since = None;
        });
    }
    Ok(end)
}

/// Counts a fencing rejection.
pub(crate) fn note_fenced(node: &Node, e: &BarrierError) {
    if matches!(e, BarrierError::Storage(StorageError::Fenced { .. })) {
        node.metrics().fencing_rejections.inc();
        node.ha().fenced();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(leader: bool, leader_since: Option<Instant>, last_echo: Option<Instant>) -> HaStatus {
        HaStatus {
            role: Role::Standby,
            fence: None,
            active_since: None,
            leader: leader.then(|| {
                Arc::new(LeaderInfo {
                    uuid: "u".into(),
                    adv: Advertisement {
                        redirect_addr: String::new(),
                        cluster_addr: String::new(),
                        cluster_cert: Vec::new(),
                        cluster_key_params: None,
                    },
                })
            }),
            last_echo,
            leader_since,
        }
    }

    /// A standby that just learned of a new active is healthy before its first heartbeat
    /// (the leader change alone never gives 474) and turns unhealthy only after two periods
    /// without reaching it.
    #[test]
    fn new_leader_has_two_periods_of_grace() {
        let t0 = Instant::now();
        let s = standby(true, Some(t0), None);
        assert!(!s.ha_unhealthy(t0));
        assert!(!s.ha_unhealthy(t0 + 2 * leader::ECHO_INTERVAL));
        assert!(s.ha_unhealthy(t0 + 2 * leader::ECHO_INTERVAL + Duration::from_millis(1)));
    }

    /// The last heartbeat, once there is one, is what counts: a recent echo is healthy, a
    /// stale one is not.
    #[test]
    fn last_echo_decides_after_the_first_heartbeat() {
        let t0 = Instant::now();
        let echo = t0 + Duration::from_secs(5);
        let s = standby(true, Some(t0), Some(echo));
        assert!(!s.ha_unhealthy(echo + leader::ECHO_INTERVAL));
        assert!(s.ha_unhealthy(echo + 3 * leader::ECHO_INTERVAL));
    }

    /// A fencing report or step-down request that arrives while one term ends (or between
    /// terms) ends that term only: the next term starts with fresh signals. (With a stored
    /// notification permit, the next term was ended right after it began.)
    #[tokio::test]
    async fn a_late_signal_never_ends_the_next_term() {
        let h = HaHandle::new(true);
        let first = h.begin_term();
        h.fenced();
        assert!(
            first.fenced.is_cancelled(),
            "the running term is ended by a fencing report"
        );
        // The term ends by another branch (say, lease lost) while the reports race in.
        h.end_term();
        h.fenced();
        h.step_down(Duration::ZERO).await;
        let next = h.begin_term();
        assert!(!next.fenced.is_cancelled(), "a late fencing report ended the next term");
        assert!(!next.step_down.is_cancelled(), "a late step-down ended the next term");
        h.step_down(Duration::ZERO).await;
        assert!(next.step_down.is_cancelled(), "a step-down during a term ends it");
    }

    /// Without a known active, or in any role but standby, the node is never HA-unhealthy.
    #[test]
    fn only_a_standby_with_an_active_can_be_unhealthy() {
        let late = Instant::now() + Duration::from_secs(60);
        assert!(!standby(false, None, None).ha_unhealthy(late));
        for role in [Role::Active, Role::Sealed, Role::Disabled] {
            let mut s = standby(true, None, None);
            s.role = role;
            assert!(!s.ha_unhealthy(late), "{role:?}");
        }
        assert!(
            standby(true, None, None).ha_unhealthy(late),
            "no record at all is unhealthy"
        );
    }
}

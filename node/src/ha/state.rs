//! The node's HA state, shared by the lock loop (which changes it), the API, the cluster
//! listener and the local socket (which read it): the role, the fence of the running term,
//! the known active, the standbys heard, and the running term's end signals.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use vha_core::advert::Advertisement;
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::storage::Fence;

/// Heartbeat period. `sys/health` reports 474 after two missed periods; 1 s keeps that
/// window (2 s) well inside a client's retry budget while costing one tiny request per
/// second per standby.
pub(crate) const ECHO_INTERVAL: Duration = Duration::from_secs(1);
/// How long a standby heartbeat record stays in `sys/ha-status` without a new echo.
pub(crate) const ECHO_RETENTION: Duration = Duration::from_secs(30);

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
            Some(t) => now.saturating_duration_since(t) > 2 * ECHO_INTERVAL,
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

/// The HA state shared between the lock loop, the API and the cluster listener.
pub struct HaHandle {
    status: watch::Sender<HaStatus>,
    pub(super) sealed: watch::Sender<bool>,
    /// The running term's end signals (`None` between terms): a signal belongs to one term,
    /// so a step-down or fencing report that arrives as a term ends for another reason is
    /// dropped with it and can never end the next term.
    term: Mutex<Option<TermSignals>>,
    pub(super) echoes: Mutex<BTreeMap<String, EchoRecord>>,
    pub(super) identity: RwLock<Option<Arc<ClusterIdentity>>>,
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

    pub(super) fn update(&self, f: impl FnOnce(&mut HaStatus)) {
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
    pub(super) fn begin_term(&self) -> TermSignals {
        let t = TermSignals::default();
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.clone());
        t
    }

    /// The term is over: later signals have no term to end.
    pub(super) fn end_term(&self) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// How a running term is asked to end from outside the lock loop.
#[derive(Clone, Default)]
pub(super) struct TermSignals {
    /// The store refused one of the term's writes as fenced: it was deposed.
    pub(super) fenced: CancellationToken,
    /// `sys/step-down` or SIGTERM asked it to step down.
    pub(super) step_down: CancellationToken,
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
        assert!(!s.ha_unhealthy(t0 + 2 * ECHO_INTERVAL));
        assert!(s.ha_unhealthy(t0 + 2 * ECHO_INTERVAL + Duration::from_millis(1)));
    }

    /// The last heartbeat, once there is one, is what counts: a recent echo is healthy, a
    /// stale one is not.
    #[test]
    fn last_echo_decides_after_the_first_heartbeat() {
        let t0 = Instant::now();
        let echo = t0 + Duration::from_secs(5);
        let s = standby(true, Some(t0), Some(echo));
        assert!(!s.ha_unhealthy(echo + ECHO_INTERVAL));
        assert!(s.ha_unhealthy(echo + 3 * ECHO_INTERVAL));
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

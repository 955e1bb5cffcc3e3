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

pub(crate) mod leader;
pub(crate) mod machine;
pub(crate) mod state;
pub(crate) mod term;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use vha_core::advert::{leader_path, Advertisement, LEADER_PREFIX, LOCK_KEY};
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::storage::{Fence, HaBackend, LockGuard, StorageError};
use vha_core::BarrierError;

use crate::node::Node;
use machine::{Command, Event, Machine, Observation};
use state::{LeaderInfo, Role};
use term::GiveUp;

/// Longest wait at the end of a term for logical requests already running to finish with
/// the term's fence (normal requests take milliseconds; a request still running after this
/// has its writes refused).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the best-effort delete of our own advertisement when a term ends: the store may
/// be the very thing that is unreachable; the next active deletes stale entries anyway.
const ADVERT_DELETE_TIMEOUT: Duration = Duration::from_secs(2);

/// Room for a serialized advertisement: about 1.5 KiB (a P-521 certificate and key in
/// base64, two addresses); twice that so it never needs to grow.
const ADVERTISEMENT_CAPACITY: usize = 4096;

/// The cluster channel a term opens for the standbys' proxies to forward over. The server
/// wiring names the implementation (the cluster listener), so the lock loop stays below the
/// HTTP stack that serves forwarded requests.
pub(crate) trait ClusterChannel: Sized + Send + 'static {
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

/// The lock loop. Runs for the life of the process when HA is enabled: it turns the seal
/// state, the shutdown token and the outcome of its one pending operation into events for
/// the [`Machine`], and carries out the commands the machine returns.
pub(crate) async fn run<C: ClusterChannel>(node: Arc<Node>) {
    let Some(backend) = node.stores().ha.clone() else {
        return;
    };
    let mut sealed_rx = node.ha().sealed.subscribe();
    let shutdown = node.shutdown.clone();
    let mut machine = Machine::new(node.config().step_down_wait);
    let mut carrier = Carrier::<C>::new(node, backend);
    while !machine.exited() {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !machine.shutting_down() => Event::Shutdown,
            r = sealed_rx.wait_for(|s| *s != machine.sealed()) => match r {
                Ok(s) if *s => Event::Sealed,
                Ok(_) => Event::Unsealed,
                // The sender lives in the node this loop holds: never dropped while it runs.
                Err(_) => return,
            },
            event = carrier.outcome() => event,
        };
        for command in machine.on(event, Instant::now()) {
            carrier.carry_out(command).await;
        }
    }
}

/// What the one pending operation of the loop came to.
enum Outcome<C> {
    HoldOffElapsed,
    Acquired(Result<Option<LockGuard>, StorageError>),
    /// The term's identity and advertisement, and its open channel (none with
    /// `disable_clustering`).
    SetUp(Result<(SetUpTerm, Option<C>), SetupError>),
    Drained,
    /// A signal of the running term (already an [`Event`] with its term).
    TermEnded(Event),
}

type Pending<C> = Pin<Box<dyn Future<Output = Outcome<C>> + Send>>;

/// What a set-up term advertises.
struct SetUpTerm {
    identity: Arc<ClusterIdentity>,
    adv: Advertisement,
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

/// Carries the machine's commands out, and holds what they hold: the follower task, the
/// pending operation, the lock, the term's channel and lock value.
struct Carrier<C: ClusterChannel> {
    node: Arc<Node>,
    backend: Arc<dyn HaBackend>,
    pending: Option<Pending<C>>,
    /// Stops the pending lock attempt.
    contend_stop: Option<CancellationToken>,
    follower: Option<(CancellationToken, JoinHandle<()>)>,
    /// The lock value of the latest attempt (names the term's advertisement).
    uuid: String,
    guard: Option<LockGuard>,
    fence: Option<Fence>,
    set_up: Option<SetUpTerm>,
    channel: Option<C>,
    lingering: Option<C::Closed>,
    /// When the running term became active (for its log line).
    active_at: Option<Instant>,
}

impl<C: ClusterChannel> Carrier<C> {
    fn new(node: Arc<Node>, backend: Arc<dyn HaBackend>) -> Self {
        Carrier {
            node,
            backend,
            pending: None,
            contend_stop: None,
            follower: None,
            uuid: String::new(),
            guard: None,
            fence: None,
            set_up: None,
            channel: None,
            lingering: None,
            active_at: None,
        }
    }

    /// The pending operation's outcome, as an event (never resolves while none is pending).
    /// Cancel-safe: the operation stays pending when this future is dropped.
    async fn outcome(&mut self) -> Event {
        let outcome = match self.pending.as_mut() {
            Some(op) => op.await,
            None => std::future::pending().await,
        };
        self.pending = None;
        match outcome {
            Outcome::HoldOffElapsed => Event::HoldOffElapsed,
            Outcome::Acquired(Ok(Some(guard))) => {
                let term = guard.fence().token;
                self.fence = Some(guard.fence().clone());
                self.guard = Some(guard);
                Event::Acquired { term }
            }
            // Only a stopped attempt returns no lock; the machine waits for none then.
            Outcome::Acquired(Ok(None)) => Event::AcquireFailed,
            Outcome::Acquired(Err(e)) => {
                tracing::warn!(error = %e, "contending for the HA lock failed; retrying");
                Event::AcquireFailed
            }
            Outcome::SetUp(Ok((t, channel))) => {
                self.set_up = Some(t);
                self.channel = channel;
                Event::SetUp
            }
            Outcome::SetUp(Err(e)) => {
                tracing::error!(error = %e, "leadership setup failed; back to standby");
                Event::SetupFailed
            }
            Outcome::Drained => Event::Drained,
            Outcome::TermEnded(e) => e,
        }
    }

    fn wait_for(&mut self, op: impl Future<Output = Outcome<C>> + Send + 'static) {
        debug_assert!(self.pending.is_none(), "one operation pending at a time");
        self.pending = Some(Box::pin(op));
    }

    async fn carry_out(&mut self, command: Command) {
        let node = self.node.clone();
        let handle = node.ha();
        match command {
            Command::FollowActive => {
                handle.update(|s| {
                    s.role = Role::Standby;
                    s.fence = None;
                    s.active_since = None;
                });
                // The last term's channel has nothing more to wait for here.
                self.lingering = None;
                let stop = node.shutdown.child_token();
                let task = tokio::spawn(leader::standby_tasks(node.clone(), stop.clone()));
                self.follower = Some((stop, task));
            }
            Command::StopFollowing => {
                if let Some((stop, task)) = self.follower.take() {
                    stop.cancel();
                    let _ = task.await;
                }
            }
            Command::HoldOff(wait) => self.wait_for(async move {
                tokio::time::sleep(wait).await;
                Outcome::HoldOffElapsed
            }),
            Command::Contend => {
                self.uuid = uuid::Uuid::new_v4().to_string();
                let stop = node.shutdown.child_token();
                self.contend_stop = Some(stop.clone());
                let (backend, uuid) = (self.backend.clone(), self.uuid.clone());
                self.wait_for(async move { Outcome::Acquired(backend.acquire(LOCK_KEY, &uuid, stop).await) });
            }
            Command::Cancel => {
                self.pending = None;
                if let Some(stop) = self.contend_stop.take() {
                    stop.cancel();
                }
            }
            Command::SetUp => {
                let Some(fence) = self.fence.clone() else {
                    return;
                };
                tracing::info!(token = fence.token, uuid = %self.uuid, "acquired lock, enabling active operation");
                let uuid = self.uuid.clone();
                self.wait_for(async move { Outcome::SetUp(set_up::<C>(&node, &uuid, &fence).await) });
            }
            Command::Activate => self.activate(),
            Command::StopServing => {
                // Stop serving at once: the role flips before anything else, so no new
                // request is admitted. Requests already running keep the term's fence until
                // they drain (bounded); then the fence goes.
                self.pending = None;
                handle.end_term();
                handle.update(|s| {
                    s.role = Role::Standby;
                    s.active_since = None;
                    s.leader = None;
                });
                node.in_flight().set_open(false);
                // Another node may write from now on: nothing cached may be served.
                node.barrier().cache().disable();
                node.metrics().core_active.set(0);
                node.metrics().term.set(0);
            }
            Command::Drain => self.wait_for(async move {
                if tokio::time::timeout(DRAIN_TIMEOUT, node.in_flight().wait_idle())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        running = node.in_flight().count(),
                        "requests still running {DRAIN_TIMEOUT:?} after the term ended; the store refuses their writes once the lock is released"
                    );
                }
                Outcome::Drained
            }),
            Command::DropFence => {
                handle.update(|s| s.fence = None);
                *handle.identity.write().unwrap_or_else(|e| e.into_inner()) = None;
                self.set_up = None;
            }
            Command::CloseChannel => {
                if let Some(channel) = self.channel.take() {
                    self.lingering = Some(channel.close().await);
                }
            }
            Command::DeleteAdvertisement => {
                // Best effort: a deposed writer is fenced out anyway. The barrier may already
                // be sealed; then the entry stays until the next active cleans up.
                let path = leader_path(&self.uuid);
                let delete = node.barrier().delete(&path, self.fence.as_ref());
                match tokio::time::timeout(ADVERT_DELETE_TIMEOUT, delete).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "could not delete own advertisement"),
                    Err(_) => tracing::debug!("deleting own advertisement timed out"),
                }
            }
            Command::GiveUp(how) => {
                self.fence = None;
                let Some(guard) = self.guard.take() else {
                    return;
                };
                match how {
                    GiveUp::Abandon => drop(guard),
                    GiveUp::Release => {
                        if let Err(e) = guard.release().await {
                            tracing::warn!(error = %e, "releasing the HA lock failed");
                        }
                        if let Some(at) = self.active_at.take() {
                            tracing::info!(term_len = ?at.elapsed(), "stepped down from active");
                        }
                    }
                }
                self.active_at = None;
            }
            Command::WaitLinger => {
                // The lock is free and the next active on its way; this process stays until
                // the proxies' open forwards were refused, not reset (see `cluster`'s module
                // header).
                if let Some(closed) = self.lingering.take() {
                    C::lingered(closed).await;
                }
            }
            Command::ReportSealed => {
                self.lingering = None;
                handle.update(|s| {
                    s.role = Role::Sealed;
                    s.active_since = None;
                    s.leader = None;
                    s.last_echo = None;
                    s.leader_since = None;
                });
            }
            Command::Observe(o) => observe(&node, o),
            Command::Exit => {}
        }
    }

    /// The term is set up: admit requests and report active.
    fn activate(&mut self) {
        let (Some(t), Some(fence), Some(guard)) = (self.set_up.as_ref(), self.fence.clone(), self.guard.as_ref())
        else {
            return;
        };
        let node = self.node.clone();
        let handle = node.ha();
        *handle.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(t.identity.clone());
        // The previous active may have changed policies, mounts, tokens: read them afresh.
        node.clear_caches();
        // The store's read cache starts empty and serves only while this term's lock holds.
        node.barrier().cache().enable(guard.lost());
        // Standbys heard in an earlier term of this node are not this term's standbys.
        handle.echoes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // The gate opens before the role flips, so whatever passes the role check is admitted.
        node.in_flight().set_open(true);
        let signals = handle.begin_term();
        let leader = Arc::new(LeaderInfo {
            uuid: self.uuid.clone(),
            adv: t.adv.clone(),
        });
        handle.update(|s| {
            s.role = Role::Active;
            s.fence = Some(fence.clone());
            s.active_since = Some(SystemTime::now());
            s.leader = Some(leader);
            s.last_echo = None;
            s.leader_since = None;
        });
        node.metrics().core_active.set(1);
        node.metrics().term.set(i64::try_from(fence.token).unwrap_or(i64::MAX));
        self.active_at = Some(Instant::now());
        tracing::info!(token = fence.token, "active operation enabled");
        // The term ends by one of its own signals (or by a seal or the shutdown, which the
        // loop watches itself).
        let term = fence.token;
        let lost = guard.lost();
        self.wait_for(async move {
            Outcome::TermEnded(tokio::select! {
                _ = lost.cancelled() => Event::Lost { term },
                _ = signals.fenced.cancelled() => Event::Fenced { term },
                _ = signals.step_down.cancelled() => Event::StepDown { term },
            })
        });
    }
}

/// Sets a term up, in order: a fresh key and certificate, the cluster channel (ready before
/// anyone can read the advertisement), the advertisement written with the term's fence,
/// stale advertisements deleted. On failure nothing stays advertised or open.
async fn set_up<C: ClusterChannel>(
    node: &Arc<Node>,
    uuid: &str,
    fence: &Fence,
) -> Result<(SetUpTerm, Option<C>), SetupError> {
    let uuid_owned = uuid.to_string();
    let identity = tokio::task::spawn_blocking(move || ClusterIdentity::generate(&uuid_owned))
        .await
        .map_err(|e| SetupError::Listener(std::io::Error::other(e.to_string())))??;
    let identity = Arc::new(identity);
    let channel = if node.config().disable_clustering {
        None
    } else {
        Some(
            C::open(node.clone(), identity.clone())
                .await
                .map_err(SetupError::Listener)?,
        )
    };
    let adv = Advertisement {
        redirect_addr: node.config().api_addr.as_str().trim_end_matches('/').to_string(),
        cluster_addr: node.config().cluster_addr.as_str().trim_end_matches('/').to_string(),
        cluster_cert: identity.cert_der.clone(),
        cluster_key_params: Some(identity.params.clone()),
    };
    let write = async {
        // The plaintext carries the term's private key: zeroized once written, and sized
        // up front so that growing it leaves no copy behind.
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(ADVERTISEMENT_CAPACITY));
        serde_json::to_writer(&mut *bytes, &adv).map_err(|e| BarrierError::InvalidParameters(e.to_string()))?;
        node.barrier().put(&leader_path(uuid), &bytes, Some(fence)).await?;
        for key in node.barrier().list(LEADER_PREFIX).await? {
            if key != uuid && !key.ends_with('/') {
                node.barrier().delete(&leader_path(&key), Some(fence)).await?;
            }
        }
        Ok::<_, BarrierError>(())
    };
    if let Err(e) = write.await {
        if let Some(c) = channel {
            // Nothing was advertised: no proxy has a connection to linger for.
            drop(c.close().await);
        }
        note_fenced(node, &e);
        return Err(e.into());
    }
    Ok((SetUpTerm { identity, adv }, channel))
}

/// Records what the machine measured.
fn observe(node: &Node, o: Observation) {
    match o {
        Observation::LockAcquired(d) => node.metrics().lock_acquire.observe(d.as_secs_f64()),
        Observation::TermLost(term_len) => {
            node.metrics().leadership_lost.observe(term_len.as_secs_f64());
            tracing::warn!(?term_len, "leadership lost, stopping active operation");
        }
        Observation::SteppedDown { since } => {
            node.metrics().step_down.observe(since.elapsed().as_secs_f64());
            tracing::info!(wait = ?node.config().step_down_wait, "stepped down; following the new active before contending again");
        }
        Observation::SetupFailed => node.metrics().leadership_setup_failed.inc(),
    }
}

/// Counts a fencing rejection.
pub(crate) fn note_fenced(node: &Node, e: &BarrierError) {
    if matches!(e, BarrierError::Storage(StorageError::Fenced { .. })) {
        node.metrics().fencing_rejections.inc();
        node.ha().fenced();
    }
}

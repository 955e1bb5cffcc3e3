//! The controller: the proxy's picture of its pair and of the active node, published as a
//! [`View`] on a `watch` channel that every request reads.
//!
//! It merges the local node's state stream ([`crate::local`]) with two storage watches (the
//! `core/lock` holder and the `core/leader/` prefix), never polling. On every event it
//! re-resolves the advertisement: only `core/leader/<current core/lock value>` is read, and
//! it is believed only if it decrypts with the barrier keyring (AEAD with the path as
//! associated data: decrypting it IS its authentication). A forged or unreadable entry is
//! ignored: the last authenticated advertisement of the same holder stays in use.
//!
//! The keyring lives only here, in memory; it is dropped (and zeroized, see
//! `vha_core::barrier::keyring`) as soon as the node process that handed it over reports
//! sealed, together with the advertisement (whose cluster key is secret). While the node is
//! down, and while a restarted node process is still sealed
//! ([`crate::route::keeps_keyring_when_sealed`]), the last authenticated advertisement and
//! the keyring are kept, so forwarding goes on through a restart of the node.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::tls::CaType;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use tokio::sync::{mpsc, watch};

use vha_core::advert::{leader_path, Advertisement, LEADER_PREFIX, LOCK_KEY};
use vha_core::barrier::Keyring;
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::local::LocalState;
use vha_core::storage::{Stores, WatchEvent};

use crate::error::ProxyError;
use crate::local::{LocalEvent, NodeSocket};
use crate::metrics::Metrics;
use crate::route::LocalRole;

/// Delay before re-opening a storage watch that closed or could not be opened.
const WATCH_RETRY: Duration = Duration::from_millis(200);
/// Poll period for a store that cannot watch: a new advertisement must be in use within
/// 100 ms; a poll is one lock-holder read (the advertisement is read only when it changed).
const POLL_UNWATCHABLE: Duration = Duration::from_millis(100);

/// An authenticated active node, ready to forward to.
pub(crate) struct Target {
    /// Local sequence number of this advertisement (a new one for every new term seen);
    /// also the connection-pool group, so connections of an old term are never reused.
    pub seq: u64,
    /// The lock value (term UUID) the advertisement was stored under.
    pub uuid: String,
    /// The lock holder's fencing token when the advertisement was accepted (the term).
    pub term: u64,
    /// When this proxy accepted the advertisement (the advertisement carries no timestamp).
    pub accepted: Instant,
    /// The active's `api_addr` (307 target).
    pub redirect_addr: String,
    /// The active's cluster listener.
    pub addr: SocketAddr,
    /// `fw-<uuid>`: SNI and the name checked in the pinned certificate. Never empty.
    pub sni: String,
    /// The advertised certificate and key, presented as our client identity.
    pub cert_key: Arc<CertKey>,
    /// The advertised certificate as the only trust anchor.
    pub ca: Arc<CaType>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("seq", &self.seq)
            .field("uuid", &self.uuid)
            .field("term", &self.term)
            .field("addr", &self.addr)
            .field("redirect_addr", &self.redirect_addr)
            .finish_non_exhaustive()
    }
}

static SEQ: AtomicU64 = AtomicU64::new(1);

impl Target {
    /// Builds the forwarding material from an authenticated advertisement of the lock holder
    /// `uuid` whose fencing token is `term`.
    pub(crate) fn from_advertisement(uuid: &str, term: u64, adv: &Advertisement) -> Result<Target, ProxyError> {
        let bad = |m: String| ProxyError::BadAdvertisement(m);
        let id = ClusterIdentity::from_advertisement(uuid, adv).map_err(|e| bad(e.to_string()))?;
        if x509_parser::parse_x509_certificate(&adv.cluster_cert).is_err() {
            return Err(bad("cluster certificate is not valid DER".into()));
        }
        let url = url::Url::parse(&adv.cluster_addr).map_err(|e| bad(format!("cluster_addr: {e}")))?;
        let host = url.host_str().ok_or_else(|| bad("cluster_addr has no host".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port_or_known_default().unwrap_or(8201);
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| bad(format!("cluster_addr {host}:{port}: {e}")))?
            .next()
            .ok_or_else(|| bad(format!("cluster_addr {host}:{port} resolves to nothing")))?;
        let cert_key = Arc::new(CertKey::new(vec![adv.cluster_cert.clone()], id.key_pkcs8().to_vec()));
        let ca: Arc<CaType> = Arc::from(vec![WrappedX509::new(adv.cluster_cert.clone(), parse_x509)]);
        Ok(Target {
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            uuid: uuid.to_string(),
            term,
            accepted: Instant::now(),
            redirect_addr: adv.redirect_addr.trim_end_matches('/').to_string(),
            addr,
            sni: id.server_name(),
            cert_key,
            ca,
        })
    }
}

/// What every request reads.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub local: LocalRole,
    pub disable_clustering: bool,
    /// The authenticated active node, if one is known.
    pub active: Option<Arc<Target>>,
}

impl View {
    pub(crate) fn initial() -> View {
        View {
            local: LocalRole::Down,
            disable_clustering: false,
            active: None,
        }
    }
}

fn same(a: &View, b: &View) -> bool {
    a.local == b.local
        && a.disable_clustering == b.disable_clustering
        && a.active.as_ref().map(|t| t.seq) == b.active.as_ref().map(|t| t.seq)
}

/// Runs the controller until the process ends.
pub(crate) async fn run(stores: Stores, socket: Arc<NodeSocket>, tx: watch::Sender<Arc<View>>, metrics: Metrics) {
    let (local_tx, mut local_rx) = mpsc::channel::<LocalEvent>(16);
    tokio::spawn(crate::local::run(socket, local_tx, stores.ha.clone()));
    let (dirty_tx, mut dirty_rx) = mpsc::channel::<()>(1);
    if let Some(ha) = stores.ha.clone() {
        let d = dirty_tx.clone();
        tokio::spawn(async move {
            follow_watch(
                || {
                    let ha = ha.clone();
                    async move { ha.watch_lock(LOCK_KEY).await }
                },
                d,
                "lock",
            )
            .await
        });
    }
    {
        let data = stores.data.clone();
        let d = dirty_tx.clone();
        tokio::spawn(async move {
            follow_watch(
                || {
                    let data = data.clone();
                    async move { data.watch(LEADER_PREFIX).await }
                },
                d,
                "advertisement",
            )
            .await
        });
    }
    drop(dirty_tx);
    let mut keyring: Option<HeldKeyring> = None;
    let mut view = View::initial();
    loop {
        tokio::select! {
            ev = local_rx.recv() => match ev {
                Some(LocalEvent::State(st)) => apply_state(*st, &mut view, &mut keyring),
                Some(LocalEvent::Gone) => view.local = LocalRole::Down,
                None => return,
            },
            d = dirty_rx.recv() => if d.is_none() { return },
        }
        // Drain whatever else is queued before touching storage.
        while let Ok(ev) = local_rx.try_recv() {
            match ev {
                LocalEvent::State(st) => apply_state(*st, &mut view, &mut keyring),
                LocalEvent::Gone => view.local = LocalRole::Down,
            }
        }
        while dirty_rx.try_recv().is_ok() {}
        if view.local != LocalRole::Sealed {
            view.active = resolve(
                &stores,
                keyring.as_ref().map(|h| &h.keyring),
                view.active.clone(),
                &metrics,
            )
            .await;
        }
        let changed = !same(&tx.borrow(), &view);
        if changed {
            tracing::info!(local = ?view.local, active = ?view.active, "view changed");
            // The view is published first, so a scrape that shows it is never ahead of
            // the routes.
            tx.send_replace(Arc::new(view.clone()));
            metrics.set_active_known(view.active.is_some());
            metrics.set_local_role(view.local);
            metrics.set_advertisement(view.active.as_ref().map(|t| (t.term, t.accepted)));
        }
    }
}

/// The keyring and the node process that handed it over.
struct HeldKeyring {
    keyring: Keyring,
    /// [`LocalState::instance`] of the process it came from.
    from: u64,
}

/// Applies one state line: role, clustering, and the keyring (taken while unsealed, dropped
/// together with the advertisement when the process that handed it over is sealed).
fn apply_state(mut st: LocalState, view: &mut View, held: &mut Option<HeldKeyring>) {
    view.local = LocalRole::parse(&st.role, st.sealed);
    view.disable_clustering = st.disable_clustering;
    if view.local == LocalRole::Sealed {
        if crate::route::keeps_keyring_when_sealed(held.as_ref().map(|h| h.from), st.instance) {
            view.local = LocalRole::Restarting;
        } else {
            *held = None;
            view.active = None;
        }
    } else if let Some(wire) = st.keyring.take() {
        // `wire` and every intermediate of the decoding are zeroized when dropped.
        match wire.decode() {
            Ok(keyring) => {
                *held = Some(HeldKeyring {
                    keyring,
                    from: st.instance,
                })
            }
            Err(e) => tracing::warn!(error = %e, "the local node sent an unusable keyring"),
        }
    }
}

/// Who holds the lock and what it advertised, authenticated. Keeps `current` when the
/// holder is unchanged (a forged or rewritten entry under the same UUID cannot replace an
/// authenticated one) or when storage cannot be read (the last authenticated view stands).
async fn resolve(
    stores: &Stores,
    keyring: Option<&Keyring>,
    current: Option<Arc<Target>>,
    metrics: &Metrics,
) -> Option<Arc<Target>> {
    let ha = stores.ha.as_ref()?;
    let holder = match ha.holder(LOCK_KEY).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "reading the lock holder failed; keeping the last advertisement");
            return current;
        }
    };
    let holder = holder?;
    if let Some(cur) = current.as_ref().filter(|c| c.uuid == holder.value) {
        return Some(cur.clone());
    }
    let keyring = keyring?;
    let path = leader_path(&holder.value);
    let entry = match stores.data.get(&path).await {
        Ok(Some(e)) => e,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "reading the advertisement failed");
            return None;
        }
    };
    let plain = match keyring.decrypt(&path, &entry.value) {
        Ok(p) => zeroize::Zeroizing::new(p),
        Err(e) => {
            metrics.advert_rejected.inc();
            tracing::warn!(%path, error = %e, "ignoring an advertisement that does not authenticate");
            return None;
        }
    };
    let adv: Advertisement = match serde_json::from_slice(&plain) {
        Ok(a) => a,
        Err(e) => {
            metrics.advert_rejected.inc();
            tracing::warn!(%path, error = %e, "ignoring an unparseable advertisement");
            return None;
        }
    };
    match Target::from_advertisement(&holder.value, holder.token, &adv) {
        Ok(t) => {
            tracing::info!(uuid = %t.uuid, term = t.term, addr = %t.addr, "new active node advertisement");
            Some(Arc::new(t))
        }
        Err(e) => {
            metrics.advert_rejected.inc();
            tracing::warn!(%path, error = %e, "ignoring an unusable advertisement");
            None
        }
    }
}

/// Keeps one storage watch open, signalling `dirty` on every event and on every (re)open.
/// A store that cannot watch (`file`, `inmem` as a shared data store) is polled instead,
/// every [`POLL_UNWATCHABLE`].
async fn follow_watch<F, Fut>(open: F, dirty: mpsc::Sender<()>, what: &'static str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<vha_core::storage::WatchStream, vha_core::storage::StorageError>>,
{
    loop {
        match open().await {
            Err(vha_core::storage::StorageError::Unsupported { backend, .. }) => {
                tracing::info!(
                    what,
                    backend,
                    "this store cannot watch; polling it every {POLL_UNWATCHABLE:?}"
                );
                while !dirty.is_closed() {
                    tokio::time::sleep(POLL_UNWATCHABLE).await;
                    let _ = dirty.try_send(());
                }
                return;
            }
            Ok(mut s) => {
                let _ = dirty.try_send(());
                while let Some(ev) = s.recv().await {
                    if let WatchEvent::Resync = ev {
                        tracing::debug!(what, "watch resync");
                    }
                    let _ = dirty.try_send(());
                }
                tracing::info!(what, "storage watch closed; reopening");
            }
            Err(e) => tracing::warn!(what, error = %e, "storage watch failed; retrying"),
        }
        if dirty.is_closed() {
            return;
        }
        tokio::time::sleep(WATCH_RETRY).await;
    }
}

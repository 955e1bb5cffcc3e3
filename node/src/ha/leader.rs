//! What a standby does while it waits for the lock: learn who the active is (watching the
//! lock and `core/leader/`, never polling on backends that watch), and heartbeat to the
//! active over the mutually-authenticated cluster channel so `sys/health` can answer 474
//! when the active is unreachable and the active can list standbys in `sys/ha-status`.
//!
//! Only `core/leader/<current core/lock value>` is believed, and only if it decrypts through
//! the barrier (path-bound AEAD): forged, moved or replayed advertisements are ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use vha_core::advert::{leader_path, Advertisement, LEADER_PREFIX, LOCK_KEY};
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::storage::{StorageError, WatchEvent, WatchStream};

use super::state::{HaStatus, LeaderInfo, ECHO_INTERVAL};
use crate::node::Node;

/// A heartbeat slower than this counts as failed.
const ECHO_TIMEOUT: Duration = Duration::from_secs(2);
/// Re-read period when the backend cannot watch (no such built-in backend does HA; kept
/// for third-party ones).
const POLL_FALLBACK: Duration = Duration::from_millis(500);
/// Pause before re-establishing a closed watch.
const REWATCH_DELAY: Duration = Duration::from_millis(200);
/// The cluster-channel path of the heartbeat.
pub(crate) const ECHO_PATH: &str = "/cluster/echo";

/// Runs the leader watcher and the heartbeat until `stop` fires.
pub(crate) async fn standby_tasks(node: Arc<Node>, stop: CancellationToken) {
    tokio::join!(watch_leader(node.clone(), stop.clone()), heartbeat(node, stop));
}

/// The active node as storage says now: the lock holder's advertisement, decrypted.
/// `Err` when storage could not be asked (the caller keeps what it knew).
pub(crate) async fn current_leader(node: &Node) -> Result<Option<Arc<LeaderInfo>>, StorageError> {
    let Some(ha) = node.stores().ha.clone() else {
        return Ok(None);
    };
    let Some(holder) = ha.holder(LOCK_KEY).await? else {
        return Ok(None);
    };
    let bytes = match node.barrier().get(&leader_path(&holder.value)).await {
        // The plaintext carries the term's private key.
        Ok(Some(b)) => zeroize::Zeroizing::new(b),
        Ok(None) => return Ok(None),
        Err(vha_core::BarrierError::Storage(e)) => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, holder = %holder.value, "ignoring advertisement that does not decrypt");
            return Ok(None);
        }
    };
    match serde_json::from_slice::<Advertisement>(&bytes) {
        Ok(adv) => Ok(Some(Arc::new(LeaderInfo {
            uuid: holder.value,
            adv,
        }))),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring malformed advertisement");
            Ok(None)
        }
    }
}

async fn next_event(rx: &mut Option<WatchStream>) -> Option<WatchEvent> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn watch_leader(node: Arc<Node>, stop: CancellationToken) {
    let Some(ha) = node.stores().ha.clone() else { return };
    let data = node.stores().data.clone();
    while !stop.is_cancelled() {
        let mut lock_rx = ha.watch_lock(LOCK_KEY).await.ok();
        let mut adv_rx = data.watch(LEADER_PREFIX).await.ok();
        let poll = lock_rx.is_none() || adv_rx.is_none();
        loop {
            match current_leader(&node).await {
                Ok(l) => node.ha().set_leader(l),
                Err(e) => tracing::debug!(error = %e, "could not read the leader; keeping the last one known"),
            }
            let closed = tokio::select! {
                ev = next_event(&mut lock_rx) => ev.is_none(),
                ev = next_event(&mut adv_rx) => ev.is_none(),
                _ = tokio::time::sleep(POLL_FALLBACK), if poll => false,
                _ = stop.cancelled() => return,
            };
            if closed {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REWATCH_DELAY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

type EchoClient =
    Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Full<bytes::Bytes>>;

fn echo_client(identity: &ClusterIdentity) -> Option<EchoClient> {
    // hyper-rustls sets ALPN itself (http/1.1 here) and refuses a preset list.
    let cfg = identity.client_config(&[]).ok()?;
    let name = rustls::pki_types::ServerName::try_from(identity.server_name()).ok()?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*cfg).clone())
        .https_only()
        .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        .enable_http1()
        .build();
    Some(Client::builder(TokioExecutor::new()).build(connector))
}

async fn heartbeat(node: Arc<Node>, stop: CancellationToken) {
    let mut client: Option<(String, EchoClient)> = None;
    let hostname = hostname();
    let mut tick = tokio::time::interval(ECHO_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = node.ha().subscribe();
    // The active the last heartbeat went to: a new one gets its first heartbeat at once, so
    // it lists this standby and this standby counts as reaching it without waiting a period.
    let mut sent_to: Option<String> = None;
    loop {
        let new_leader = |s: &HaStatus| s.leader.as_ref().is_some_and(|l| sent_to.as_ref() != Some(&l.uuid));
        tokio::select! {
            _ = tick.tick() => {}
            r = status.wait_for(new_leader) => {
                if r.is_err() {
                    return;
                }
                tick.reset();
            }
            _ = stop.cancelled() => return,
        }
        let Some(leader) = node.ha().status().leader else {
            continue;
        };
        sent_to = Some(leader.uuid.clone());
        if client.as_ref().is_none_or(|(u, _)| *u != leader.uuid) {
            client = ClusterIdentity::from_advertisement(&leader.uuid, &leader.adv)
                .ok()
                .and_then(|id| echo_client(&id))
                .map(|c| (leader.uuid.clone(), c));
        }
        let Some((_, c)) = client.as_ref() else { continue };
        let body = serde_json::json!({
            "hostname": hostname,
            "api_address": node.config().api_addr.as_str().trim_end_matches('/'),
            "cluster_address": node.config().cluster_addr.as_str().trim_end_matches('/'),
            "version": vha_core::VERSION,
        });
        let req = http::Request::post(format!("{}{ECHO_PATH}", leader.adv.cluster_addr.trim_end_matches('/')))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body.to_string())));
        let Ok(req) = req else { continue };
        let start = Instant::now();
        let ok = match tokio::time::timeout(ECHO_TIMEOUT, c.request(req)).await {
            Ok(Ok(resp)) => {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                ok
            }
            _ => false,
        };
        if ok {
            node.metrics().rpc_client_echo.observe(start.elapsed().as_secs_f64());
            node.ha().echo_ok();
        } else {
            node.metrics().rpc_client_echo_errors.inc();
        }
    }
}

/// This machine's host name (for `sys/ha-status`).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

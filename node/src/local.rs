//! The node's side of the pair's private channel (see `vha_core::local`): a unix socket
//! where the node serves its own proxy. API requests arriving here are
//! [`Origin::LocalProxy`] (the client-address header is trusted); `GET /vha/local/state`
//! streams the node's state, with the keyring while unsealed.
//!
//! Two gates, both closed from the first instant: the socket appears at its path already
//! with its final mode (bound in a fresh 0700 directory, then renamed into place), and every
//! accepted connection's peer credentials must name the node's own user or `allowed_uid`;
//! any other peer is dropped before a byte is read or written, counted in
//! `vha_node_local_socket_refused_total{reason}` and logged.
//!
//! On shutdown the socket path is removed and the state stream ends (the proxy then routes
//! as for a node that is down); for [`LINGER`] the socket still answers the proxy's open
//! connections and those already queued, refusing every new request "not active" (nothing
//! runs, the proxy sends it on elsewhere), while the requests already running finish.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use vha_core::local::{node_accepts, socket_mode, LocalState, WireKeyring, STATE_PATH};

use crate::ha::state::Role;
use crate::http::{handle_http, Limits, DRAIN_TIMEOUT};
use crate::node::Node;
use crate::request::Origin;
use vha_core::pair::PairRole;

type Body = BoxBody<Bytes, Infallible>;

/// The state line for the node as it is now.
pub(crate) async fn current_state(node: &Node) -> LocalState {
    let initialized = node.barrier().initialized().await.unwrap_or(false);
    let keyring = node.barrier().keyring().map(|k| WireKeyring::encode(&k));
    let st = node.ha().status();
    let sealed = node.barrier().is_sealed();
    let role = match (sealed, st.role) {
        (true, _) | (_, Role::Sealed) => PairRole::Sealed,
        (false, Role::Disabled) => PairRole::Disabled,
        (false, Role::Standby) => PairRole::Standby,
        (false, Role::Active) => PairRole::Active,
    };
    LocalState {
        initialized,
        sealed,
        role: role.as_str().to_string(),
        keyring,
        fence: st.fence,
        pid: std::process::id(),
        instance: vha_core::local::instance_id(),
        disable_clustering: node.config().disable_clustering,
    }
}

/// How many fresh names are tried for the private directory the socket is bound in before
/// giving up (a name is taken only by a leftover of a crash or by someone squatting it).
const PRIVATE_DIR_ATTEMPTS: u32 = 16;

/// After shutdown begins, how long the socket keeps answering, refusing every new request as
/// "not active" (on the proxy's open connections, and on connections already queued when the
/// socket path was removed), before the listener and the connections are closed. Closing at
/// once would race the proxy writing a request on a connection it took from its pool (or
/// just opened) a moment earlier, and a write lost that way cannot be sent again (it may
/// have run). The proxy stops routing here within milliseconds of the state stream ending;
/// this leaves ample room on a loaded machine.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// The pair socket, bound and not yet served (see [`bind_unix`]).
#[derive(Debug)]
pub(crate) struct LocalListener {
    listener: UnixListener,
    path: PathBuf,
    own_uid: u32,
    allowed_uid: Option<u32>,
}

/// Binds the socket (replacing a stale one) with mode 0600, or 0666 when another
/// `allowed_uid` must reach it. Called before the node prints that it started and before
/// its TCP listener serves: once anything answers, the proxy can reach the node too (a
/// stale socket of a killed node would otherwise refuse the proxy for a moment).
pub(crate) fn bind_unix(path: PathBuf, allowed_uid: Option<u32>) -> std::io::Result<LocalListener> {
    let own_uid = nix::unistd::geteuid().as_raw();
    if allowed_uid.is_some() && allowed_uid == overflow_uid() {
        tracing::warn!(
            allowed_uid,
            "proxy.allowed_uid is the kernel's overflow uid: a process of another user namespace \
             whose uid is not mapped here shows as that uid too; give the proxy a user of its own"
        );
    }
    let listener = bind_private(&path, socket_mode(own_uid, allowed_uid))?;
    tracing::info!(path = %path.display(), own_uid, allowed_uid, "serving the local proxy socket");
    Ok(LocalListener {
        listener,
        path,
        own_uid,
        allowed_uid,
    })
}

/// Serves the bound socket until `shutdown`, lingers (see [`LINGER`]), then drains
/// (bounded). Only peers that [`node_accepts`] are served.
pub(crate) async fn serve_unix(node: Arc<Node>, bound: LocalListener, limits: Limits, shutdown: CancellationToken) {
    let LocalListener {
        listener,
        path,
        own_uid,
        allowed_uid,
    } = bound;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut lingering_until: Option<tokio::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket accept failed");
                    continue;
                }
            },
            // No new connection finds the socket from now on; those already queued are
            // still accepted, and every request is refused (see `serve`) until the linger
            // ends.
            _ = shutdown.cancelled(), if lingering_until.is_none() => {
                let _ = std::fs::remove_file(&path);
                lingering_until = Some(tokio::time::Instant::now() + LINGER);
                continue;
            }
            _ = tokio::time::sleep_until(lingering_until.unwrap_or_else(tokio::time::Instant::now)),
                if lingering_until.is_some() => break,
        };
        // Before anything is read: who is there, by the kernel's word.
        match stream.peer_cred() {
            Ok(cred) if node_accepts(cred.uid(), own_uid, allowed_uid) => {}
            Ok(cred) => {
                node.metrics().local_socket_refused.with_label_values(&["uid"]).inc();
                tracing::warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    own_uid,
                    allowed_uid,
                    "refused a local socket connection from a user that is not this node's proxy"
                );
                continue;
            }
            Err(e) => {
                node.metrics()
                    .local_socket_refused
                    .with_label_values(&["no_credentials"])
                    .inc();
                tracing::warn!(error = %e, "refused a local socket connection whose peer credentials are unknown");
                continue;
            }
        }
        let node = node.clone();
        let stop = shutdown.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let node = node.clone();
            let stop = stop.clone();
            async move { Ok::<_, Infallible>(serve(node, req, limits, stop).await) }
        });
        let conn = crate::http::conn_builder()
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "local connection ended with error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
}

/// The uid the kernel reports for a peer whose uid has no mapping in this user namespace
/// (`/proc/sys/kernel/overflowuid`, 65534 unless changed).
fn overflow_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Creates the listening socket at `path` so that it never exists there with another mode
/// than `mode`, not even for an instant: it is bound inside a fresh directory of mode 0700
/// next to `path` (nobody else can reach a socket in there, whatever mode `bind` gave it
/// under the process umask), set to `mode`, then renamed over `path` (atomic: a stale socket
/// is replaced, there is no moment without a socket or with a wider one), and the directory
/// is removed. The process umask is left alone: it is process-wide, and the node runs many
/// threads.
fn bind_private(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut attempt = 0;
    let private = loop {
        let candidate = dir.join(format!(".vha-sock-{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => break candidate,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt + 1 < PRIVATE_DIR_ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    // A short name inside: a unix socket path must fit in 108 bytes.
    let tmp = private.join("s");
    let bound = (|| {
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir(&private);
    bound
}

async fn serve(node: Arc<Node>, req: Request<Incoming>, limits: Limits, stop: CancellationToken) -> Response<Body> {
    if stop.is_cancelled() {
        // Shutting down (see LINGER): refused before anything runs, and the connection is
        // closed after this answer.
        let mut resp = crate::http::stopped_refusal();
        resp.headers_mut()
            .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        return resp.map(|b| b.boxed());
    }
    if req.uri().path() == STATE_PATH && req.method() == http::Method::GET {
        return state_stream(node, stop);
    }
    handle_http(&node, req, None, limits, Origin::LocalProxy)
        .await
        .map(|b| b.boxed())
}

/// The NDJSON state stream: a line now and on every HA status change.
fn state_stream(node: Arc<Node>, stop: CancellationToken) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut status = node.ha().subscribe();
        let mut last: Option<LocalState> = None;
        loop {
            let st = current_state(&node).await;
            if last.as_ref() != Some(&st) {
                let line = match st.to_line() {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "serializing the local state failed");
                        return;
                    }
                };
                // The buffer itself goes out (zeroized once the connection is done with it).
                if tx.send(Bytes::from_owner(line)).await.is_err() {
                    return;
                }
                last = Some(st);
            }
            tokio::select! {
                r = status.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

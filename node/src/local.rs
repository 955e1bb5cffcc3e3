//! The node's side of the pair's private channel (see `vha_core::local`): a unix socket,
//! mode 0600, where the node serves its own proxy. API requests arriving here are
//! [`Origin::LocalProxy`] (the client-address header is trusted); `GET /vha/local/state`
//! streams the node's state, with the keyring while unsealed.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use vha_core::local::{LocalState, STATE_PATH};

use crate::api::Origin;
use crate::ha::Role;
use crate::http::{handle_http, Limits, DRAIN_TIMEOUT};
use crate::node::Node;

type Body = BoxBody<Bytes, Infallible>;

/// The state line for the node as it is now.
pub async fn current_state(node: &Node) -> LocalState {
    let initialized = node.barrier().initialized().await.unwrap_or(false);
    let keyring = node
        .barrier()
        .keyring()
        .map(|k| base64::engine::general_purpose::STANDARD.encode(k.to_bytes().as_slice()));
    let st = node.ha().status();
    let sealed = node.barrier().is_sealed();
    let role = match (sealed, st.role) {
        (true, _) | (_, Role::Sealed) => "sealed",
        (false, Role::Disabled) => "disabled",
        (false, Role::Standby) => "standby",
        (false, Role::Active) => "active",
    };
    LocalState {
        initialized,
        sealed,
        role: role.to_string(),
        keyring,
        fence: st.fence,
        pid: std::process::id(),
        disable_clustering: node.config().disable_clustering,
    }
}

/// Binds the socket (replacing a stale one), restricts it to 0600, and serves until
/// `shutdown`, then drains (bounded).
pub async fn serve_unix(
    node: Arc<Node>,
    path: PathBuf,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = bind_private(&path)?;
    tracing::info!(path = %path.display(), "serving the local proxy socket");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
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
    let _ = std::fs::remove_file(&path);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    Ok(())
}

/// Creates the unix socket with mode 0600 (the umask is tightened around `bind` so the
/// socket never exists with wider permissions).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve(node: Arc<Node>, req: Request<Incoming>, limits: Limits, stop: CancellationToken) -> Response<Body> {
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
                let mut line = serde_json::to_vec(&st).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
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

//! The cluster listener: runs only while this node is active, on the listener's
//! `cluster_address`. Mutual TLS 1.2 with the term's pinned P-521 certificate (see
//! `vha_core::cluster_tls`); ALPN h2 and http/1.1. It serves forwarded API requests (the
//! client-address header is trusted here) and standby heartbeats.
//!
//! Stopping it (the role is already standby and the term's requests drained by then)
//! stops accepting and returns; the open connections linger for [`LINGER`] in the
//! background, where every request gets the loop guard's 503 marked "not active" (nothing
//! runs), which proxies hold and send to the next active, and are then closed. A node that
//! is not active runs nothing that arrives on them. A node that is exiting waits for the
//! linger ([`Lingering::wait`]): its exit would otherwise close those connections under
//! requests the proxies are sending on them (a TLS stream ended without close_notify, which
//! a proxy cannot tell from a request that ran, so it answers 502).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use vha_core::cluster_tls::ClusterIdentity;

use crate::ha::leader::ECHO_PATH;
use crate::ha::state::EchoRecord;
use crate::http::{handle_http, Limits};
use crate::node::Node;
use crate::request::Origin;

/// A TLS handshake must finish within this, or the connection is dropped (slow or stuck
/// peers cannot pin sockets on the active).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped listener's connections keep answering "not active" before they are
/// closed: longer than a proxy needs to see the next advertisement (a watch event, ~ms), so
/// requests a proxy sends on pooled connections meanwhile are refused cleanly rather than
/// reset (a reset POST cannot be retried: it may have run).
const LINGER: Duration = Duration::from_secs(3);
/// Largest heartbeat body accepted.
const MAX_ECHO_BODY: usize = 16 * 1024;

/// A running cluster listener.
pub(crate) struct ClusterListener {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Lingering>,
    pub local_addr: std::net::SocketAddr,
}

/// A stopped listener's connections, lingering (see [`LINGER`]); dropping this leaves them
/// to finish in the background.
#[must_use = "dropping it leaves the linger to run in the background"]
pub(crate) struct Lingering(Option<tokio::task::JoinHandle<()>>);

impl Lingering {
    /// Resolves once every lingering connection is closed (at most [`LINGER`] and a
    /// moment after the stop).
    pub(crate) async fn wait(self) {
        if let Some(t) = self.0 {
            let _ = t.await;
        }
    }
}

impl ClusterListener {
    /// Binds the cluster address and starts serving with `identity`.
    pub(crate) async fn start(node: Arc<Node>, identity: Arc<ClusterIdentity>) -> std::io::Result<ClusterListener> {
        let addr = node.config().listener().cluster_address;
        let tcp = TcpListener::bind(addr).await?;
        let local_addr = tcp.local_addr()?;
        let cfg = identity
            .server_config()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let acceptor = TlsAcceptor::from(cfg);
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(node, tcp, acceptor, stop.clone()));
        tracing::info!(%local_addr, "cluster listener started");
        Ok(ClusterListener { stop, task, local_addr })
    }

    /// Stops accepting; open connections answer "not active" for [`LINGER`], then close
    /// (see the module header).
    pub(crate) async fn stop(self) -> Lingering {
        self.stop.cancel();
        let lingering = self.task.await.unwrap_or(Lingering(None));
        tracing::info!(local_addr = %self.local_addr, "cluster listener stopped");
        lingering
    }
}

impl crate::ha::ClusterChannel for ClusterListener {
    type Closed = Lingering;
    async fn open(node: Arc<Node>, identity: Arc<ClusterIdentity>) -> std::io::Result<Self> {
        ClusterListener::start(node, identity).await
    }
    async fn close(self) -> Lingering {
        self.stop().await
    }
    async fn lingered(closed: Lingering) {
        closed.wait().await
    }
}

/// Classifies a refused handshake for the metrics (bounded label set).
fn handshake_reason(e: &std::io::Error) -> &'static str {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_cert",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_cert",
        Some(rustls::Error::PeerIncompatible(_) | rustls::Error::InappropriateHandshakeMessage { .. }) => "protocol",
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => "protocol",
        Some(_) => "tls_other",
        None => "io",
    }
}

async fn accept_loop(node: Arc<Node>, tcp: TcpListener, acceptor: TlsAcceptor, stop: CancellationToken) -> Lingering {
    let mut conns = JoinSet::new();
    let limits = Limits {
        max_request_size: node.config().listener().max_request_size,
        max_request_duration: node.config().listener().max_request_duration,
    };
    loop {
        let (stream, peer) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster accept failed");
                    continue;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let node = node.clone();
        let stopped = stop.clone();
        conns.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    let reason = handshake_reason(&e);
                    node.metrics()
                        .cluster_handshake_failures
                        .with_label_values(&[reason])
                        .inc();
                    tracing::info!(%peer, reason, error = %e, "cluster handshake refused");
                    return;
                }
                Err(_) => {
                    node.metrics()
                        .cluster_handshake_failures
                        .with_label_values(&["timeout"])
                        .inc();
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let node = node.clone();
                let stopped = stopped.clone();
                async move { Ok::<_, Infallible>(serve(&node, req, peer, limits, &stopped).await) }
            });
            if let Err(e) = crate::http::conn_builder()
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "cluster connection ended with error");
            }
        });
    }
    drop(tcp);
    Lingering(Some(tokio::spawn(async move {
        // Bounded linger (see LINGER), then every connection is closed.
        let _ = tokio::time::timeout(LINGER, async { while conns.join_next().await.is_some() {} }).await;
        conns.shutdown().await;
    })))
}

async fn serve(
    node: &Node,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
    limits: Limits,
    stopped: &CancellationToken,
) -> Response<Full<Bytes>> {
    if stopped.is_cancelled() {
        // A stopped listener's lingering connection (even if this node is active again in
        // a later term): refused, nothing runs.
        return crate::http::stopped_refusal();
    }
    if req.uri().path() == ECHO_PATH {
        return echo(node, req).await;
    }
    handle_http(node, req, Some(peer), limits, Origin::Cluster).await
}

/// A standby's heartbeat: record it, answer 200 (only while active).
async fn echo(node: &Node, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if node.ha().role() != crate::ha::state::Role::Active {
        return crate::http::error_response(StatusCode::SERVICE_UNAVAILABLE, "node not active");
    }
    let body = match Limited::new(req.into_body(), MAX_ECHO_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return crate::http::error_response(StatusCode::BAD_REQUEST, "bad heartbeat"),
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .chars()
            .take(256)
            .collect::<String>()
    };
    node.ha().record_echo(EchoRecord {
        hostname: field("hostname"),
        api_address: field("api_address"),
        cluster_address: field("cluster_address"),
        version: field("version"),
        seen: None,
        last_echo: String::new(),
    });
    let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

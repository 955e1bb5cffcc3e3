//! The lockd daemon: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN over TLS) + JSON in
//! front of the [`Store`]. Routing, body limits, long-poll acquire, NDJSON watch streams and
//! the error mapping live here; the state machine lives in `store` and `lease`.
//!
//! Nothing here panics on input: bodies are size-limited before they are read, JSON errors
//! become 400 `malformed`, and every failure goes through [`LockdError`]'s single mapping.
//! Every request but `/v1/health` is authenticated first ([`crate::auth`]); a refused one
//! reads nothing and changes nothing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use vha_core::storage::lockd::protocol::{
    paths, AcquireRequest, AcquireResponse, BatchRequest, CancelRequest, CancelResponse, DeleteRequest, DeleteResponse,
    GetResponse, HolderResponse, KeyRequest, LeaseRequest, ListRequest, ListResponse, PutRequest, PutResponse,
    RenewResponse, WatchRequest, WireEvent, MAX_ACQUIRE_WAIT_MS, WATCH_PING_MS,
};
use vha_core::storage::validate_value_len;

use crate::auth::{Refusal, TokenCheck};
use crate::error::LockdError;
use crate::store::Store;

/// Largest request body for a value limit: a maximal value base64-encoded (4/3) plus room for
/// the key, fence and JSON punctuation. Bodies are cut off at this size before being parsed.
pub(crate) fn max_body(max_value: usize) -> usize {
    max_value.div_ceil(3) * 4 + 64 * 1024
}
/// Depth of a watch stream's outgoing queue; a client that does not read gets `resync`
/// semantics through the store's broadcast lag instead of unbounded memory.
const WATCH_OUT_QUEUE: usize = 256;

/// Limits the server enforces: lease TTLs on acquire requests, the size of a value.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub default_ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Largest value a put may carry (`max_value_size`).
    pub max_value: usize,
}

type Body = BoxBody<Bytes, Infallible>;

/// How clients are authenticated: TLS (with or without required client certificates, as the
/// acceptor is configured) and the bearer token.
pub(crate) struct Security {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub tokens: TokenCheck,
}

struct App {
    store: Store,
    limits: Limits,
    tokens: TokenCheck,
}

/// Why a TLS handshake failed, as an auth-failure reason.
fn handshake_refusal(e: &std::io::Error) -> Refusal {
    use rustls::{CertificateError, Error as TlsError};
    match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(TlsError::NoCertificatesPresented) => Refusal::NoClientCert,
        Some(TlsError::InvalidCertificate(CertificateError::UnknownIssuer)) | Some(TlsError::InvalidCertificate(_)) => {
            Refusal::BadClientCert
        }
        _ => Refusal::TlsHandshake,
    }
}

/// Serves `listener` until `shutdown` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    store: Store,
    limits: Limits,
    security: Security,
    shutdown: CancellationToken,
) {
    let Security { tls, tokens } = security;
    let app = Arc::new(App {
        store: store.clone(),
        limits,
        tokens,
    });
    tokio::spawn(store.clone().run_expiry());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match tls {
                Some(acc) => match acc.accept(stream).await {
                    Ok(s) => serve_conn(TokioIo::new(s), app, peer, shutdown).await,
                    Err(e) => {
                        let why = handshake_refusal(&e);
                        app.store
                            .metrics()
                            .auth_failures
                            .with_label_values(&[why.label()])
                            .inc();
                        tracing::warn!(%peer, reason = why.label(), error = %e, "TLS handshake refused");
                    }
                },
                None => serve_conn(TokioIo::new(stream), app, peer, shutdown).await,
            }
        });
    }
}

async fn serve_conn<I>(io: I, app: Arc<App>, peer: SocketAddr, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(handle(app, req, peer).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, svc);
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended") },
        _ = shutdown.cancelled() => {}
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error_response(e: &LockdError) -> Response<Body> {
    let mut r = json(e.status(), &e.body());
    if matches!(e, LockdError::TooLarge { .. }) {
        // The rest of the body is never read, so the connection ends with this answer; the
        // client is told, or it could send its next request on a connection being closed.
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    if matches!(e, LockdError::Unauthorized(_)) {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

async fn read_json<T: DeserializeOwned>(app: &App, req: Request<Incoming>) -> Result<T, LockdError> {
    let limit = max_body(app.limits.max_value);
    // A declared length over the limit is refused before any of the body is read, so the
    // client gets its 413 instead of a reset while it is still sending.
    if vha_core::announced_body_len(req.headers()).is_some_and(|n| n > limit as u64) {
        return Err(LockdError::TooLarge { limit });
    }
    let body = Limited::new(req.into_body(), limit).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            LockdError::TooLarge { limit }
        } else {
            LockdError::Malformed(format!("reading body: {e}"))
        }
    })?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| LockdError::Malformed(e.to_string()))
}

fn op_name(path: &str) -> &'static str {
    match path {
        paths::KV_GET => "get",
        paths::KV_PUT => "put",
        paths::KV_DELETE => "delete",
        paths::KV_LIST => "list",
        paths::LOCK_ACQUIRE => "acquire",
        paths::LOCK_RENEW => "renew",
        paths::LOCK_RELEASE => "release",
        paths::LOCK_HOLDER => "holder",
        paths::LOCK_CANCEL => "cancel",
        paths::WATCH => "watch",
        paths::SNAPSHOT => "snapshot",
        paths::HEALTH => "health",
        paths::METRICS => "metrics",
        _ => "unknown",
    }
}

/// Checks the request's credentials (all paths but health), counting and logging a refusal
/// without what was presented.
fn authenticate(app: &App, req: &Request<Incoming>, peer: SocketAddr) -> Result<(), LockdError> {
    if req.uri().path() == paths::HEALTH {
        return Ok(());
    }
    let presented = req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes());
    app.tokens.check(presented).map_err(|why| {
        app.store
            .metrics()
            .auth_failures
            .with_label_values(&[why.label()])
            .inc();
        tracing::warn!(%peer, reason = why.label(), path = %req.uri().path(), "request refused: bad credentials");
        LockdError::Unauthorized(why)
    })
}

async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    if let Err(e) = authenticate(&app, &req, peer) {
        return error_response(&e);
    }
    let op = op_name(req.uri().path());
    let timer = app
        .store
        .metrics()
        .request_seconds
        .with_label_values(&[op])
        .start_timer();
    let res = route(&app, req).await;
    timer.observe_duration();
    match res {
        Ok(r) => {
            if op != "metrics" && op != "health" {
                app.store.metrics().op(op, "ok");
            }
            r
        }
        Err(e) => {
            app.store.metrics().op(op, e.code());
            error_response(&e)
        }
    }
}

async fn route(app: &App, req: Request<Incoming>) -> Result<Response<Body>, LockdError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let get_ok = matches!(path.as_str(), paths::METRICS | paths::HEALTH | paths::SNAPSHOT);
    if method != Method::POST && !(get_ok && method == Method::GET) {
        return Err(LockdError::NotFound(format!("{method} {path}")));
    }
    let store = &app.store;
    match path.as_str() {
        paths::HEALTH => Ok(json(StatusCode::OK, &serde_json::json!({"ok": true}))),
        paths::METRICS => Ok(Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(store.metrics().render())).boxed())
            .map_err(|e| LockdError::Internal(e.to_string()))?),
        paths::SNAPSHOT => snapshot(store).await,
        paths::KV_GET => {
            let r: KeyRequest = read_json(app, req).await?;
            Ok(json(
                StatusCode::OK,
                &GetResponse {
                    entry: store.get(&r.key).await?,
                },
            ))
        }
        paths::KV_PUT => {
            let r: PutRequest = read_json(app, req).await?;
            validate_value_len(&r.value, app.limits.max_value)?;
            let revision = store.put(r).await?;
            Ok(json(StatusCode::OK, &PutResponse { revision }))
        }
        paths::KV_BATCH => {
            let r: BatchRequest = read_json(app, req).await?;
            // The batch's values together stay within `max_value_size` (the request body's
            // bound); a larger batch is the client's to split.
            let total: usize = r.puts.iter().map(|p| p.value.len()).sum();
            if total > app.limits.max_value {
                return Err(LockdError::Invalid(format!(
                    "the batch's values total {total} bytes, over max_value_size ({})",
                    app.limits.max_value
                )));
            }
            let puts = r.puts.into_iter().map(|p| (p.key, p.value)).collect();
            let revision = store.put_batch(puts, r.fence).await?;
            Ok(json(StatusCode::OK, &PutResponse { revision }))
        }
        paths::KV_DELETE => {
            let r: DeleteRequest = read_json(app, req).await?;
            let deleted = store.delete(&r.key, r.fence).await?;
            Ok(json(StatusCode::OK, &DeleteResponse { deleted }))
        }
        paths::KV_LIST => {
            let r: ListRequest = read_json(app, req).await?;
            Ok(json(
                StatusCode::OK,
                &ListResponse {
                    keys: store.list(&r.prefix).await?,
                },
            ))
        }
        paths::LOCK_ACQUIRE => {
            let r: AcquireRequest = read_json(app, req).await?;
            acquire(app, r).await.map(|a| json(StatusCode::OK, &a))
        }
        paths::LOCK_RENEW => {
            let r: LeaseRequest = read_json(app, req).await?;
            let ttl = store.renew(&r.key, r.token)?;
            Ok(json(
                StatusCode::OK,
                &RenewResponse {
                    ttl_ms: ttl.as_millis() as u64,
                },
            ))
        }
        paths::LOCK_RELEASE => {
            // Release-by-token. Anyone presenting the lock key and the *current* token may end
            // the lease. Safety: the token identifies one grant; releasing it only makes the
            // lock free earlier than its TTL would. That is safe exactly when the grant's
            // holder can no longer act: either it asks itself (normal release), or a party
            // with proof that the holder process is gone (its same-host proxy saw the node
            // process exit) asks. Writes of any later holder carry a higher token, so even a
            // mistaken early release cannot let the old holder's writes land after the new
            // holder's first fenced write. A stale token never releases a newer grant.
            let r: LeaseRequest = read_json(app, req).await?;
            store.release(&r.key, r.token).await?;
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        paths::LOCK_CANCEL => {
            let r: CancelRequest = read_json(app, req).await?;
            let released = store.cancel(&r.key, r.attempt).await?;
            Ok(json(StatusCode::OK, &CancelResponse { released }))
        }
        paths::LOCK_HOLDER => {
            let r: KeyRequest = read_json(app, req).await?;
            Ok(json(
                StatusCode::OK,
                &HolderResponse {
                    holder: store.holder(&r.key).await?,
                },
            ))
        }
        paths::WATCH => {
            let r: WatchRequest = read_json(app, req).await?;
            watch(app, r)
        }
        _ => Err(LockdError::NotFound(format!("{method} {path}"))),
    }
}

/// Try or long-poll acquire. A long-poll waits for lease ends (no polling) until granted or
/// its wait runs out (`granted: false`; the client asks again). When the client cancels (h2
/// RST_STREAM, or a closed HTTP/1.1 connection) hyper drops this future and no grant happens
/// after that point.
async fn acquire(app: &App, r: AcquireRequest) -> Result<AcquireResponse, LockdError> {
    let lim = &app.limits;
    let ttl = r.ttl_ms.map(Duration::from_millis).unwrap_or(lim.default_ttl);
    if ttl < lim.min_ttl || ttl > lim.max_ttl {
        return Err(LockdError::Invalid(format!(
            "ttl_ms {} outside the allowed range {}..={} ms",
            ttl.as_millis(),
            lim.min_ttl.as_millis(),
            lim.max_ttl.as_millis()
        )));
    }
    let wait = Duration::from_millis(r.wait_ms.min(MAX_ACQUIRE_WAIT_MS));
    let start = tokio::time::Instant::now();
    let deadline = start + wait;
    loop {
        let released = app.store.released();
        tokio::pin!(released);
        released.as_mut().enable();
        // Measured before the attempt: a lower bound of the grant time, the safe direction.
        let waited_ms = start.elapsed().as_millis() as u64;
        if let Some((token, ttl)) = app.store.try_acquire(&r.key, &r.value, ttl, r.attempt).await? {
            return Ok(AcquireResponse {
                granted: true,
                token,
                ttl_ms: ttl.as_millis() as u64,
                waited_ms,
            });
        }
        if wait.is_zero() {
            return Ok(AcquireResponse {
                granted: false,
                token: 0,
                ttl_ms: 0,
                waited_ms,
            });
        }
        tokio::select! {
            _ = released => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(AcquireResponse { granted: false, token: 0, ttl_ms: 0, waited_ms: 0 });
            }
        }
    }
}

/// A response body fed by a channel (the watch stream).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn line(ev: &WireEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Size of the chunks a snapshot is sent in (and what one chunk holds in memory).
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Chunks a snapshot may have queued for a slow client before its writer waits.
const SNAPSHOT_QUEUE: usize = 4;

/// `Write` into a response body: fills a chunk, hands it to the body's channel (waiting while
/// the client is slow), and fails with `BrokenPipe` once the client is gone.
struct ChunkSender {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(SNAPSHOT_CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(SNAPSHOT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == SNAPSHOT_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Streams a consistent snapshot of the store: the view is taken at once, then a thread
/// serializes it into the response a chunk at a time, so the image is never whole in
/// memory. A failure mid-stream ends the body early; the snapshot's end record (with its
/// record count) is then missing, and `snapshot save` refuses the file.
async fn snapshot(store: &Store) -> Result<Response<Body>, LockdError> {
    let view = store.snapshot_view().await?;
    let (tx, rx) = mpsc::channel(SNAPSHOT_QUEUE);
    std::thread::Builder::new()
        .name("lockd-snapshot-send".into())
        .spawn(move || {
            let out = ChunkSender {
                tx,
                buf: Vec::with_capacity(SNAPSHOT_CHUNK),
            };
            if let Err(e) = view.write_to(out) {
                tracing::warn!(error = %e, "snapshot stream ended early");
            }
        })
        .map_err(|e| LockdError::Internal(format!("snapshot thread: {e}")))?;
    Response::builder()
        .header("content-type", "application/octet-stream")
        .body(ChannelBody { rx }.boxed())
        .map_err(|e| LockdError::Internal(e.to_string()))
}

struct WatchGauge(Store);
impl Drop for WatchGauge {
    fn drop(&mut self) {
        self.0.metrics().watches.dec();
    }
}

/// Starts an NDJSON watch stream. The subscription exists before the response head is
/// sent, so a client that saw the head sees every later change.
fn watch(app: &App, r: WatchRequest) -> Result<Response<Body>, LockdError> {
    let (lock, key) = match (r.prefix, r.lock) {
        (Some(p), None) => (false, p),
        (None, Some(l)) => (true, l),
        _ => return Err(LockdError::Invalid("watch needs exactly one of prefix or lock".into())),
    };
    if key.len() > vha_core::storage::MAX_KEY_LEN {
        return Err(LockdError::Invalid("watch key exceeds the key limit".into()));
    }
    let mut sub = app.store.subscribe();
    let (tx, rx) = mpsc::channel(WATCH_OUT_QUEUE);
    app.store.metrics().watches.inc();
    let gauge = WatchGauge(app.store.clone());
    tokio::spawn(async move {
        let _gauge = gauge;
        let mut ping = tokio::time::interval(Duration::from_millis(WATCH_PING_MS));
        ping.tick().await;
        loop {
            let out = tokio::select! {
                _ = tx.closed() => return,
                _ = ping.tick() => WireEvent::Ping,
                ev = sub.recv() => match ev {
                    Ok(n) => {
                        let hit = n.lock == lock && if lock { n.key == key } else { n.key.starts_with(&key) };
                        if !hit { continue; }
                        if n.put { WireEvent::Put { key: n.key.clone() } } else { WireEvent::Delete { key: n.key.clone() } }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => WireEvent::Resync,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(line(&out)).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(ChannelBody { rx }.boxed())
        .map_err(|e| LockdError::Internal(e.to_string()))
}

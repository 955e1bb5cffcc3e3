//! The node's HTTP front: a hyper server (HTTP/1.1 and h2) that bounds every request (body
//! size checked before and while reading, total duration), turns it into an
//! [`ApiRequest`](crate::request::ApiRequest), and writes Vault's JSON responses. Graceful
//! shutdown: stop accepting, let in-flight requests finish (bounded), then return.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::error::ApiError;
use crate::node::Node;
use crate::request::{ApiRequest, ApiResponse, Origin, CLIENT_ADDR_HEADER};

/// How long shutdown waits for in-flight requests before closing connections anyway. Long
/// enough for any normal request, short enough for a rolling restart to stay quick.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) use vha_core::HEADER_READ_TIMEOUT;
/// Most header fields accepted in one request (hyper's default, explicit here); more is 431.
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest request head accepted (bytes): the HTTP/2 header list, and the HTTP/1.1 read
/// buffer that must hold the whole head.
pub(crate) const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// The connection builder every node listener uses: HTTP/1.1 and h2 with the header limits
/// and the header-read deadline above.
pub(crate) fn conn_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        // The same head-size bound as h2 (hyper's h1 default is ~400 KB): more is 431.
        .max_buf_size(MAX_HEADER_LIST_SIZE as usize);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    b
}

/// Per-listener request limits (from the `listener` block).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_request_size: Option<u64>,
    pub max_request_duration: Option<Duration>,
}

/// Serves the API on `listener` until `shutdown` fires, then drains.
pub(crate) async fn serve(node: Arc<Node>, listener: TcpListener, limits: Limits, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and similar: log and keep accepting.
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        let svc = hyper::service::service_fn(move |req| {
            let node = node.clone();
            async move { Ok::<_, Infallible>(handle_http(&node, req, Some(peer), limits, Origin::Public).await) }
        });
        let builder = conn_builder();
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}; closing");
    }
}

/// One HTTP request -> one HTTP response.
pub(crate) async fn handle_http(
    node: &Node,
    req: Request<Incoming>,
    peer: Option<SocketAddr>,
    limits: Limits,
    origin: Origin,
) -> Response<Full<Bytes>> {
    let start = Instant::now();
    let method = req.method().clone();
    let raw_path = req.uri().path().to_string();
    let fut = async {
        let api_req = read_request(req, peer, limits, origin).await?;
        Ok::<_, ApiError>(api::handle(node, api_req).await)
    };
    let resp = match limits.max_request_duration {
        Some(d) => match tokio::time::timeout(d, fut).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Unavailable("context deadline exceeded".into())),
        },
        None => fut.await,
    };
    let resp = resp.unwrap_or_else(|e| ApiResponse::error(&e));
    // DEBUG, not INFO: a line per request is an access log, which Vault leaves to audit
    // devices; at INFO it cost a log line for every request served.
    tracing::debug!(
        target: "vha::http",
        %method, path = %raw_path, status = resp.status.as_u16(),
        elapsed_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    to_http(resp, method == http::Method::HEAD)
}

/// Bounds and reads the request into an [`ApiRequest`].
async fn read_request(
    req: Request<Incoming>,
    peer: Option<SocketAddr>,
    limits: Limits,
    origin: Origin,
) -> Result<ApiRequest, ApiError> {
    let (mut parts, body) = req.into_parts();
    // The client address: from the internal header only on trusted hops, else the peer.
    // The header is removed either way so nothing downstream sees a client-supplied copy.
    let forwarded_client = parts
        .headers
        .remove(CLIENT_ADDR_HEADER)
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<SocketAddr>().ok()));
    let client_addr = match origin {
        Origin::Cluster | Origin::LocalProxy => forwarded_client.or(peer),
        Origin::Public => peer,
    };
    let raw_path_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let path = parts
        .uri
        .path()
        .strip_prefix("/v1/")
        .ok_or_else(|| ApiError::NotFound(String::new()))?;
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| ApiError::BadRequest("path is not valid UTF-8".into()))?
        .into_owned();
    let query = parts
        .uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if let Some(max) = limits.max_request_size {
        // Refuse an announced oversized body before reading a byte of it.
        if vha_core::announced_body_len(&parts.headers).is_some_and(|n| n > max) {
            return Err(ApiError::PayloadTooLarge);
        }
    }
    let body = match limits.max_request_size {
        Some(max) => Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::BadRequest(format!("failed to read request body: {e}"))
                }
            })?,
        None => body
            .collect()
            .await
            .map_err(|e| ApiError::BadRequest(format!("failed to read request body: {e}")))?,
    }
    .to_bytes();
    Ok(ApiRequest {
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body,
        client_addr,
        origin,
        raw_path_query,
    })
}

fn to_http(resp: ApiResponse, head: bool) -> Response<Full<Bytes>> {
    let body = match (&resp.raw, &resp.body, head) {
        (_, _, true) => Bytes::new(),
        (Some(raw), _, false) => raw.clone(),
        (None, Some(v), false) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
        (None, None, false) => Bytes::new(),
    };
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = resp.status;
    *out.headers_mut() = resp.headers;
    let h = out.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if resp.body.is_some() && !h.contains_key(header::CONTENT_TYPE) {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    out
}

/// The answer of a listener that stopped (its connections linger): 503 "node not active",
/// marked as refused before anything ran (`x-vha-not-active`), so the proxy holds the
/// request and sends it to the next active: the API's loop-guard answer
/// (`api::not_active_refusal`), one definition for both.
pub(crate) fn stopped_refusal() -> Response<Full<Bytes>> {
    to_http(api::not_active_refusal(), false)
}

/// A plain error response, for callers outside the API (e.g. connection-level limits).
pub(crate) fn error_response(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "errors": [msg] });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

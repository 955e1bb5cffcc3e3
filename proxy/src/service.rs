//! The thin Pingora layer: gathers the inputs of the route decision ([`crate::route`]) for
//! each request and carries out what it decides. Two helpers do the work of every phase:
//! `decide_holding` (one bounded hold over the view, for the first decision and for the one
//! after a failed attempt alike) and `answer` (every 307 and error the proxy writes itself,
//! with its metric labels taken from the answer).
//!
//! Request life cycle (Pingora phases):
//! - `request_filter`: framing and size checks, then the first decision: an upstream, or an
//!   answer written at once (`Ok(true)` = response sent).
//! - `upstream_peer`: the local node's socket, or the active's cluster listener (mTLS). After
//!   an attempt failed before anything ran (the forward could not be sent, the upstream
//!   refused as not active, the local socket was unreachable), it decides again after that
//!   attempt, within the same hold bound.
//! - `fail_to_connect`: classifies the failure (TLS -> 307 at once, unreachable -> decide
//!   again).
//! - `upstream_request_filter`: hop-by-hop headers out, the internal client-address header
//!   set from the TCP peer (or a trusted `X-Forwarded-For`), never from the client.
//! - `fail_to_proxy`: writes the decided answer, or 502 for a request whose forward broke
//!   after it was sent (never replayed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use tokio::sync::watch;

use crate::advert::{Target, View};
use crate::error::ProxyError;
use crate::local::NodeSocket;
use crate::metrics::{class, Metrics};
use crate::route::{
    self, after_failure, ActiveSeen, Answer, Attempt, ForwardFailure, LocalRole, Route, RouteInput, Step,
};
use crate::tls::{forward_peer, local_peer, ForwardProtocol};
use crate::xff::TrustedForwarders;

use vha_core::pair::{CLIENT_ADDR_HEADER, NO_FORWARD_HEADER};
/// Hop-by-hop headers (RFC 9110 section 7.6.1) removed before a request goes upstream, in
/// addition to those the `Connection` header names. `Transfer-Encoding` framing is redone
/// by Pingora for each hop.
const HOP_BY_HOP: [&str; 5] = ["connection", "keep-alive", "proxy-connection", "upgrade", "te"];

/// Static settings of the service.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub local_socket: Arc<NodeSocket>,
    pub hold_timeout: Duration,
    pub max_request_size: Option<u64>,
    pub max_request_duration: Option<Duration>,
    /// `x_forwarded_for_authorized_addrs`, replaced on SIGHUP.
    pub xff_trusted: Arc<TrustedForwarders>,
    pub forward_protocol: ForwardProtocol,
    /// Set when a graceful upgrade hands the listener to a successor: responses then close
    /// their connection (see `cli.rs`).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// The proxy service.
pub(crate) struct VhaProxy {
    view: watch::Receiver<Arc<View>>,
    settings: Settings,
    metrics: Metrics,
}

impl VhaProxy {
    pub(crate) fn new(view: watch::Receiver<Arc<View>>, settings: Settings, metrics: Metrics) -> VhaProxy {
        VhaProxy {
            view,
            settings,
            metrics,
        }
    }
}

/// Where the request goes.
#[derive(Clone, Debug, Default)]
pub(crate) enum Upstream {
    #[default]
    None,
    /// The local node, with the role the view gave it when the request was routed there.
    Local(LocalRole),
    Active(Arc<Target>),
}

/// Per-request state.
pub(crate) struct Ctx {
    upstream: Upstream,
    /// Route label for metrics.
    route: &'static str,
    /// The answer `fail_to_proxy` writes if this attempt is the last.
    fallback: Option<Answer>,
    /// The attempt that failed before anything ran (the next `upstream_peer` decides again
    /// after it); `None` while nothing failed.
    failed: Option<Attempt>,
    /// One hold bound per request, however many holds it goes through.
    hold_deadline: Option<tokio::time::Instant>,
    started: Instant,
    body_bytes: u64,
}

/// Whether the downstream connection stays open after this response.
trait KeepaliveHint {
    fn will_keepalive_hint(&self) -> bool;
}

impl KeepaliveHint for Session {
    fn will_keepalive_hint(&self) -> bool {
        // Only HTTP/1 has a `Connection` header (h2 streams are independent).
        self.as_downstream().as_http1().is_none() || self.as_downstream().get_keepalive().is_some()
    }
}

fn path_and_query(session: &Session) -> String {
    let uri = &session.req_header().uri;
    uri.path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into())
}

/// Both `Content-Length` and `Transfer-Encoding` in the raw request head. Pingora drops the
/// `Content-Length` in that case (RFC 9112 allows it); a Vault front refuses the request
/// instead, as such framing is the stuff of request smuggling.
fn conflicting_framing(session: &Session) -> bool {
    if !session
        .req_header()
        .headers
        .contains_key(http::header::TRANSFER_ENCODING)
    {
        return false;
    }
    let Some(h1) = session.as_downstream().as_http1() else {
        return false;
    };
    let raw = h1.get_headers_raw_bytes();
    raw.split(|b| *b == b'\n')
        .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
}

async fn write_simple(session: &mut Session, status: u16, location: Option<&str>, body: &[u8]) -> pingora::Result<()> {
    let mut h = ResponseHeader::build(status, Some(5))?;
    if !session.will_keepalive_hint() {
        // Say so: a client must not send its next request on a connection we close.
        h.insert_header(http::header::CONNECTION, "close")?;
    }
    if let Some(l) = location {
        h.insert_header(http::header::LOCATION, l)?;
    }
    if !body.is_empty() {
        h.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    }
    h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    h.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    let empty = body.is_empty() || session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(h), empty).await?;
    if !empty {
        session
            .write_response_body(Some(Bytes::copy_from_slice(body)), true)
            .await?;
    }
    Ok(())
}

async fn write_error(session: &mut Session, e: &ProxyError) -> pingora::Result<()> {
    write_simple(session, e.status(), None, &e.body()).await
}

/// Waits for the view to change, until `deadline`; `false` when the deadline passed.
async fn wait_change(rx: &mut watch::Receiver<Arc<View>>, deadline: tokio::time::Instant) -> bool {
    matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(())))
}

/// The fallback error a Pingora error stands for: stops retries and is written by
/// `fail_to_proxy`.
fn stop(what: &'static str) -> Box<Error> {
    Error::explain(ErrorType::Custom("vha-fallback"), what)
}

/// The active the view advertises, as the route decision sees it.
fn active_seen(view: &View) -> Option<ActiveSeen<'_>> {
    view.active.as_deref().map(|t| ActiveSeen {
        seq: t.seq,
        redirect_addr: &t.redirect_addr,
    })
}

fn classify(e: &Error) -> ForwardFailure {
    match e.etype() {
        ErrorType::TLSHandshakeFailure
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError
        | ErrorType::TLSWantX509Lookup => ForwardFailure::Tls,
        _ => ForwardFailure::Unreachable,
    }
}

impl VhaProxy {
    fn decide(&self, view: &View, session: &Session, pq: &str) -> Route {
        let no_forward = session
            .req_header()
            .headers
            .get(NO_FORWARD_HEADER)
            .map(|v| v.as_bytes());
        route::route(&RouteInput {
            path: session.req_header().uri.path(),
            path_and_query: pq,
            no_forward,
            local: view.local,
            disable_clustering: view.disable_clustering,
            active_redirect: view.active.as_ref().map(|t| t.redirect_addr.as_str()),
        })
    }

    /// Decides where the request goes after `attempt`, holding while the view has nothing
    /// to go to, until the request's hold bound: the upstream (and its route label) go into
    /// `ctx`; `Some` is the answer to write instead.
    async fn decide_holding(&self, session: &Session, ctx: &mut Ctx, attempt: Attempt) -> Option<Answer> {
        let pq = path_and_query(session);
        let mut rx = self.view.clone();
        let mut hold: Option<crate::metrics::Hold> = None;
        let mut changed = false;
        let (step, view) = loop {
            let view = rx.borrow_and_update().clone();
            let s = route::step(
                self.decide(&view, session, &pq),
                attempt,
                active_seen(&view),
                changed,
                view.disable_clustering,
            );
            if !matches!(s, Step::Wait) {
                break (s, view);
            }
            hold.get_or_insert_with(|| self.metrics.hold_started());
            let deadline = *ctx
                .hold_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.settings.hold_timeout);
            if wait_change(&mut rx, deadline).await {
                changed = true;
                continue;
            }
            let view = rx.borrow().clone();
            break (route::at_bound(attempt, active_seen(&view), &pq), view);
        };
        if let Some(h) = hold {
            h.end(step.hold_outcome());
        }
        let (upstream, label) = match step {
            Step::Local => (Upstream::Local(view.local), "local"),
            Step::Forward => match view.active.clone() {
                Some(t) => (Upstream::Active(t), "forward"),
                None => return Some(Answer::Error(ProxyError::NoActiveNode)),
            },
            Step::Answer(a) => return Some(a),
            // `at_bound` never waits.
            Step::Wait => return Some(Answer::Error(ProxyError::NoActiveNode)),
        };
        ctx.upstream = upstream;
        ctx.route = label;
        None
    }

    /// Writes an answer of the proxy's own (every 307 and error it sends goes through
    /// here): the route label and the redirect reason come from the answer.
    async fn answer(&self, session: &mut Session, ctx: &mut Ctx, a: &Answer) -> pingora::Result<()> {
        if let Some(label) = a.route_label() {
            ctx.route = label;
        }
        match a {
            Answer::Redirect { location, reason } => {
                self.metrics.redirects.with_label_values(&[reason.label()]).inc();
                write_simple(session, 307, Some(location), b"").await
            }
            Answer::Error(e) => write_error(session, e).await,
        }
    }

    /// The client address the node should see (see `xff`).
    fn client_addr(&self, session: &Session) -> Option<SocketAddr> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied()?;
        let xff = session.req_header().headers.get_all("x-forwarded-for");
        Some(self.settings.xff_trusted.client_addr(peer, xff.iter()))
    }
}

#[async_trait]
impl ProxyHttp for VhaProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            upstream: Upstream::None,
            route: "none",
            fallback: None,
            failed: None,
            hold_deadline: None,
            started: Instant::now(),
            body_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        if self.settings.draining.load(std::sync::atomic::Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        if conflicting_framing(session) {
            session.set_keepalive(None);
            self.answer(session, ctx, &Answer::Error(ProxyError::BadFraming))
                .await?;
            return Ok(true);
        }
        if let Some(max) = self.settings.max_request_size {
            if vha_core::announced_body_len(&session.req_header().headers).is_some_and(|n| n > max) {
                session.set_keepalive(None);
                self.answer(session, ctx, &Answer::Error(ProxyError::PayloadTooLarge))
                    .await?;
                return Ok(true);
            }
        }
        match self.decide_holding(session, ctx, Attempt::First).await {
            None => Ok(false),
            Some(a) => {
                self.answer(session, ctx, &a).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<Box<HttpPeer>> {
        // Each attempt starts afresh: Pingora replays the buffered body through the body
        // filter again, and an earlier attempt's fallback no longer applies.
        ctx.body_bytes = 0;
        ctx.fallback = None;
        if let Some(failed) = ctx.failed.take() {
            if let Some(a) = self.decide_holding(session, ctx, failed).await {
                ctx.fallback = Some(a);
                return Err(stop("answered after a failed attempt"));
            }
        }
        let mut peer = match &ctx.upstream {
            Upstream::Local(_) => local_peer(&self.settings.local_socket)?,
            Upstream::Active(t) => forward_peer(t, self.settings.forward_protocol),
            Upstream::None => return Err(stop("no upstream decided")),
        };
        if let Some(d) = self.settings.max_request_duration {
            // Bounds a stalled upstream; the node enforces the whole duration itself.
            peer.options.read_timeout = Some(d);
            peer.options.write_timeout = Some(d);
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(&self, session: &mut Session, _peer: &HttpPeer, ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
        match &ctx.upstream {
            Upstream::Active(t) => {
                let f = classify(&e);
                match after_failure(f, &t.redirect_addr, &path_and_query(session)) {
                    Some(answer) => {
                        tracing::warn!(error = %e, active = %t.addr, "forward failed in TLS; falling back to 307");
                        self.metrics.forward_error("tls");
                        ctx.fallback = Some(answer);
                        e.set_retry(false);
                    }
                    None => {
                        tracing::info!(error = %e, active = %t.addr, "active node unreachable; holding for a new one");
                        self.metrics.forward_error("unreachable");
                        ctx.failed = Some(Attempt::Forward {
                            seq: t.seq,
                            refused: false,
                        });
                        e.set_retry(true);
                    }
                }
            }
            // By the role the request was routed with: the view may have turned to "down" in
            // the meantime, and then the request must be decided again, not refused.
            Upstream::Local(role) if !route::hold_after_local_unreachable(*role) => {
                // Known to be down: say so at once (a health check must not wait).
                ctx.fallback = Some(Answer::Error(ProxyError::LocalUnavailable));
                e.set_retry(false);
            }
            Upstream::Local(_) => {
                // The view still has the node up, and nothing was sent: it is stopping or
                // was just killed. Hold until the view changes (its state stream ends, a
                // new active is advertised) and decide again; unchanged at the hold
                // bound, 503.
                tracing::info!(error = %e, "local node unreachable; holding for a new view");
                ctx.failed = Some(Attempt::Local { unreachable: true });
                ctx.fallback = Some(Answer::Error(ProxyError::LocalUnavailable));
                e.set_retry(true);
            }
            Upstream::None => e.set_retry(false),
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if upstream_response.status != http::StatusCode::SERVICE_UNAVAILABLE
            || !upstream_response.headers.contains_key(vha_core::NOT_ACTIVE_HEADER)
        {
            return Ok(());
        }
        // A node that is not active refused before running anything (its loop guard): hold
        // for the next term and send the request there (`error_while_proxy` decides whether
        // its body can be replayed).
        match &ctx.upstream {
            Upstream::Active(t) => {
                tracing::info!(active = %t.addr, "advertised active refused the forward as not active; holding for a new one");
                self.metrics.forward_error("not_active");
                ctx.failed = Some(Attempt::Forward {
                    seq: t.seq,
                    refused: true,
                });
            }
            Upstream::Local(_) => {
                tracing::info!("local node is no longer active; deciding again");
                ctx.failed = Some(Attempt::Local { unreachable: false });
            }
            Upstream::None => return Ok(()),
        }
        Err(Error::explain(
            ErrorType::Custom("vha-not-active"),
            "the node is not active",
        ))
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.failed.is_some_and(|a| a.refused()) {
            // Refused before running, so any method may go again, if its body is still
            // whole in Pingora's retry buffer (64 KiB); otherwise 503, never half a body.
            // The fallback stands if this was the last attempt (or the body cannot go again).
            e.set_retry(!session.as_ref().retry_buffer_truncated());
            ctx.fallback = Some(Answer::Error(ProxyError::NotActive));
        } else if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
            // Pingora's default: only idempotent requests whose body is still whole, and
            // only when a reused (possibly stale) pooled connection failed.
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if let (Some(b), Some(max)) = (body.as_ref(), self.settings.max_request_size) {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > max {
                ctx.fallback = Some(Answer::Error(ProxyError::PayloadTooLarge));
                // Marked as the client's error: Pingora's h2 forwarding treats any other
                // body error as the upstream's and keeps waiting for its response (the
                // client would hang); this way both protocols end the request at once.
                return Err(Error::explain(ErrorType::HTTPStatus(413), "request body too large").into_down());
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        // Headers named by Connection are hop-by-hop too.
        let named: Vec<String> = upstream
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        for h in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
            if h == "te" {
                let trailers_only = upstream
                    .headers
                    .get("te")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
                if trailers_only {
                    continue;
                }
            }
            if h == "transfer-encoding" || h == "content-length" {
                continue;
            }
            upstream.remove_header(h);
        }
        upstream.remove_header(CLIENT_ADDR_HEADER);
        if let Some(addr) = self.client_addr(session) {
            upstream.insert_header(CLIENT_ADDR_HEADER, addr.to_string())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let already = session.response_written().is_some();
        let fallback = ctx.fallback.take().or_else(|| match (e.esource(), &ctx.upstream) {
            (ErrorSource::Upstream, Upstream::Active(_)) => {
                self.metrics.forward_error("broken");
                // The client gets the kind and the root cause; the peer, SNI and certificate
                // details stay in the log.
                tracing::warn!(error = %e, "forwarded request failed before a response");
                Some(Answer::Error(ProxyError::ForwardBroken(format!(
                    "{}: {}",
                    e.etype().as_str(),
                    e.root_cause()
                ))))
            }
            (ErrorSource::Upstream, Upstream::Local(_)) => Some(Answer::Error(ProxyError::LocalUnavailable)),
            _ => None,
        });
        // The connection is not reused after a failed proxy attempt (Pingora's rule); the
        // response says so with `Connection: close`.
        session.set_keepalive(None);
        let code = match (&fallback, already) {
            (_, true) => 0,
            (Some(a), false) => {
                let _ = self.answer(session, ctx, a).await;
                a.status()
            }
            (None, false) => {
                let code = match e.etype() {
                    ErrorType::HTTPStatus(c) => *c,
                    _ => match e.esource() {
                        ErrorSource::Downstream => match e.etype() {
                            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                            _ => 400,
                        },
                        _ => 500,
                    },
                };
                if code > 0 {
                    let _ = session.respond_error(code).await;
                }
                code
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Counts the request's upstream connection (new or reused from Pingora's pool) and
    /// remembers a new one for the open-connections gauge.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let upstream = match ctx.upstream {
            Upstream::Local(_) => "local",
            Upstream::Active(_) => "active",
            Upstream::None => return Ok(()),
        };
        self.metrics.upstream_connection(upstream, reused, fd);
        Ok(())
    }

    /// A client that closes its connection (or sends something unreadable) is the client's
    /// doing, not a proxy failure: Pingora's ERROR line is left out and the event goes to
    /// DEBUG. Upstream and internal failures keep their ERROR line.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        let downstream = *e.esource() == ErrorSource::Downstream;
        if downstream {
            tracing::debug!(error = %e, "client connection ended");
        }
        downstream
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0);
        if matches!(ctx.upstream, Upstream::Active(_)) && ctx.route == "forward" {
            self.metrics.observe_forward(ctx.started.elapsed().as_secs_f64());
        }
        // Last: once a scrape shows the request counted, everything else about it is in.
        self.metrics
            .requests
            .with_label_values(&[ctx.route, class(status)])
            .inc();
    }
}

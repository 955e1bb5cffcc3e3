//! Whole-request-head deadline for downstream HTTP/1.1 connections.
//!
//! Pingora applies its downstream read timeout to each read, so a client that dribbles its
//! request head a byte at a time (slowloris) can hold a connection for as long as the head
//! size limit allows. [`HeadDeadlineApp`] wraps the proxy's server app: every HTTP/1.1
//! connection's stream is wrapped in a [`HeadDeadline`] that fails reads with `TimedOut`
//! once [`vha_core::HEADER_READ_TIMEOUT`] has passed without a complete head (the end of the
//! head is found by scanning the bytes read for an empty line). The first head is timed from
//! the accept, later heads on a kept-alive connection from their first byte (idle keep-alive
//! time is bounded by Pingora's keep-alive timeout). Bodies are not timed here:
//! `max_request_duration` bounds them.
//!
//! HTTP/2 connections (TLS with ALPN h2) get the same deadline on their connection preface
//! (it ends with an empty line as well) and are then run by the wrapped app, whose h2 idle
//! timeout closes connections without streams; header frames are bounded by the h2 codec.
//! With TLS the handshake runs here too (Pingora's TLS listener puts no time bound on it),
//! under the same deadline; the first head's deadline then runs from the handshake's end.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Seconds an idle kept-alive downstream connection stays open (Pingora's default, stated).
const KEEPALIVE_SECS: u64 = 60;

/// When the head clock starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Timed from a fixed instant (a new connection: from its accept).
    Head,
    /// Waiting for the first byte of the next head on a kept-alive connection.
    Idle,
    /// The head is complete: reads pass through untimed.
    Body,
}

/// The end-of-head scanner: an empty line (`\r\n\r\n` or a bare `\n\n`) after at least one
/// other byte (leading empty lines, which HTTP/1.1 servers skip, must not end the head).
#[derive(Clone, Copy, Debug, Default)]
struct EndOfHead {
    /// Whether any byte other than CR/LF was seen in this head.
    started: bool,
    /// The last two bytes seen.
    prev: [u8; 2],
}

impl EndOfHead {
    /// Feeds bytes; returns the index just past the end of the head if it is in `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                let empty_line = self.prev[1] == b'\n' || (self.prev[1] == b'\r' && self.prev[0] == b'\n');
                if self.started && empty_line {
                    *self = EndOfHead::default();
                    return Some(i + 1);
                }
            } else if b != b'\r' {
                self.started = true;
            }
            self.prev = [self.prev[1], b];
        }
        None
    }
}

/// A downstream stream whose reads fail once the request head is overdue.
pub(crate) struct HeadDeadline {
    inner: Stream,
    limit: Duration,
    phase: Phase,
    scan: EndOfHead,
    /// Armed while a head is being read; its deadline is the head's.
    timer: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

impl HeadDeadline {
    /// Wraps a new connection's stream: its first head is due `limit` after now.
    pub(crate) fn new(inner: Stream, limit: Duration) -> HeadDeadline {
        HeadDeadline {
            inner,
            limit,
            phase: Phase::Head,
            scan: EndOfHead::default(),
            timer: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }

    /// Expects another head on the same connection, timed from its first byte.
    fn next_head(&mut self) {
        self.phase = Phase::Idle;
        self.scan = EndOfHead::default();
        self.timer = None;
    }

    fn overdue() -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, "request head not received in time")
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Body {
            return Pin::new(&mut *this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut *this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if this.phase == Phase::Idle {
                    this.phase = Phase::Head;
                    this.timer = Some(Box::pin(tokio::time::sleep(this.limit)));
                }
                if this.scan.feed(new).is_some() {
                    this.phase = Phase::Body;
                    this.timer = None;
                } else if this.timer.as_ref().is_some_and(|t| t.deadline() <= Instant::now()) {
                    return Poll::Ready(Err(HeadDeadline::overdue()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let due = this.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if due {
                    Poll::Ready(Err(HeadDeadline::overdue()))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// A server app that runs `A`'s HTTP/1.1 connections with a [`HeadDeadline`] on each head,
/// and, with `tls`, the TLS handshake itself under the same deadline (Pingora's TLS
/// listener has none, so the listener is plain TCP and the handshake happens here).
pub(crate) struct HeadDeadlineApp<A> {
    inner: Arc<A>,
    limit: Duration,
    tls: Option<Acceptor>,
}

impl<A> HeadDeadlineApp<A> {
    pub(crate) fn new(inner: A, limit: Duration, tls: Option<Acceptor>) -> HeadDeadlineApp<A> {
        HeadDeadlineApp {
            inner: Arc::new(inner),
            limit,
            tls,
        }
    }
}

#[async_trait]
impl<A> ServerApp for HeadDeadlineApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let stream: Stream = match &self.tls {
            None => stream,
            Some(acceptor) => {
                // The listener is plain TCP: its streams are Pingora's L4 streams.
                let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
                    tracing::warn!("client connection is not a TCP stream; closing");
                    return None;
                };
                match tokio::time::timeout(self.limit, acceptor.tls_handshake(*tcp)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "client TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        tracing::debug!("client TLS handshake not finished in time; closing");
                        return None;
                    }
                }
            }
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // The h2 connection preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") ends with an
            // empty line too: the same deadline bounds the handshake; after it, the h2 idle
            // timeout (set on the app's server options) closes connections with no stream.
            let guarded: Stream = Box::new(HeadDeadline::new(stream, self.limit));
            return ServerApp::process_new(&self.inner, guarded, shutdown).await;
        }
        // Pingora's own HTTP/1.1 loop (`impl ServerApp for HttpServerApp`), with the head
        // deadline re-armed before each request.
        let reuse_limit = self.inner.server_options().and_then(|o| o.keepalive_request_limit);
        let guarded = HeadDeadline::new(stream, self.limit);
        let mut session = ServerSession::new_http1(Box::new(guarded));
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(KEEPALIVE_SECS) });
        session.set_keepalive_reuses_remaining(reuse_limit);
        loop {
            let reused = self.inner.process_new_http(session, shutdown).await?;
            let (stream, settings) = reused.consume();
            let mut guarded = match stream.into_any().downcast::<HeadDeadline>() {
                Ok(g) => *g,
                Err(_) => return None,
            };
            guarded.next_head();
            session = ServerSession::new_http1(Box::new(guarded));
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The end of a head is found exactly once, right after its empty line, for CRLF and
    /// bare-LF heads, wherever the bytes are split.
    #[test]
    fn end_of_head_found_after_the_empty_line() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\nHost: a\n\n",
        ] {
            for split in 0..=head.len() {
                let mut s = EndOfHead::default();
                let first = s.feed(&head[..split]);
                let second = s.feed(&head[split..]).map(|i| i + split);
                assert_eq!(first.or(second), Some(head.len()), "split at {split}");
            }
        }
    }

    /// Leading empty lines (which servers skip) do not end a head: a slowloris client
    /// cannot disarm the deadline by sending CRLFCRLF first.
    #[test]
    fn leading_empty_lines_do_not_end_the_head() {
        let mut s = EndOfHead::default();
        assert_eq!(s.feed(b"\r\n\r\n\r\n\n\n"), None);
        assert_eq!(s.feed(b"G"), None);
        assert_eq!(s.feed(b"ET / HTTP/1.1\r\n"), None);
        assert_eq!(s.feed(b"\r\n"), Some(2));
    }

    proptest! {
        /// Bytes without an empty line after content never end a head, however split.
        #[test]
        fn no_empty_line_no_end(line in "[a-zA-Z: /.0-9]{1,40}", n in 1usize..20, split in 0usize..2000) {
            let mut bytes = Vec::new();
            for _ in 0..n {
                bytes.extend_from_slice(line.as_bytes());
                bytes.extend_from_slice(b"\r\n");
            }
            let split = split.min(bytes.len());
            let mut s = EndOfHead::default();
            prop_assert_eq!(s.feed(&bytes[..split]), None);
            prop_assert_eq!(s.feed(&bytes[split..]), None);
        }
    }
}

//! TLS on both sides of the proxy: the client-facing listener (`tls_cert_file` /
//! `tls_key_file`, or plain with `tls_disable`) and the upstream peers: the local node over
//! its unix socket, and the active node's cluster listener over mutual TLS with the
//! advertised certificate as client identity and as the only trust anchor.

use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::tls::Acceptor;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use vha_core::served_cert::ServedCert;

use crate::advert::Target;
use crate::error::ProxyError;
use crate::local::{CheckedConnect, NodeSocket};

/// TCP connect bound to the active's cluster listener. A refused connection fails at once;
/// this bounds a blackholed one, after which the proxy holds for a new advertisement.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect + TLS handshake bound (a P-521 handshake takes a few ms on loopback).
const FORWARD_TOTAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections are closed after this. Connections of an old term are never
/// picked again anyway (the pool key contains the term's SNI, certificate serial and group).
///
/// Half the node's [`vha_core::HEADER_READ_TIMEOUT`]: the node's HTTP/1 server starts that
/// timer as soon as a kept-alive connection goes idle and closes the connection when it
/// fires. The side that sends requests must give up an idle connection first, or a request
/// written at the moment the node closes it fails, and a write cannot be sent again (it may
/// have run).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(vha_core::HEADER_READ_TIMEOUT.as_secs() / 2);
const _: () =
    assert!(POOL_IDLE_TIMEOUT.as_secs() > 0 && POOL_IDLE_TIMEOUT.as_secs() < vha_core::HEADER_READ_TIMEOUT.as_secs());
/// Connect bound to the local node's unix socket.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// h2 streams per upstream connection when forwarding over h2.
pub(crate) const H2_STREAMS: usize = 128;

/// Which protocol forwarded requests use on the cluster channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ForwardProtocol {
    /// Pooled keep-alive HTTP/1.1 connections (one request in flight per connection).
    H1,
    /// HTTP/2, up to [`H2_STREAMS`] concurrent streams per connection.
    H2,
}

/// The client-facing listener's TLS over `served` (the pair from `tls_cert_file` and
/// `tls_key_file`, replaceable on SIGHUP, see [`vha_core::served_cert`]): TLS 1.2 and 1.3,
/// ALPN h2 and http/1.1, aws-lc-rs. The handshake itself runs in
/// [`crate::head::HeadDeadlineApp`], under a deadline.
pub(crate) fn listener_acceptor(served: Arc<ServedCert>) -> Result<Acceptor, ProxyError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(vha_core::cluster_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| ProxyError::Config(format!("listener TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(served);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Acceptor::from_server_config(Arc::new(cfg)))
}

/// The peer for forwarding to `t`: mTLS with the advertised certificate and key, that same
/// certificate as the only CA, SNI `fw-<uuid>` (never empty: an empty SNI would disable
/// verification), hostname checked, and the term as pool group.
pub(crate) fn forward_peer(t: &Target, proto: ForwardProtocol) -> HttpPeer {
    debug_assert!(!t.sni.is_empty());
    let mut p = HttpPeer::new_mtls(t.addr, t.sni.clone(), t.cert_key.clone());
    p.group_key = t.seq;
    let o = &mut p.options;
    o.verify_cert = true;
    o.verify_hostname = true;
    o.ca = Some(t.ca.clone());
    o.connection_timeout = Some(FORWARD_CONNECT_TIMEOUT);
    o.total_connection_timeout = Some(FORWARD_TOTAL_CONNECT_TIMEOUT);
    o.idle_timeout = Some(POOL_IDLE_TIMEOUT);
    match proto {
        ForwardProtocol::H1 => o.alpn = ALPN::H1,
        ForwardProtocol::H2 => {
            o.alpn = ALPN::H2;
            o.max_h2_streams = H2_STREAMS;
        }
    }
    p
}

/// The peer for the local node: plain HTTP/1.1 on the pair's unix socket, pooled, every
/// new connection checked to be the node's ([`CheckedConnect`]).
pub(crate) fn local_peer(socket: &Arc<NodeSocket>) -> pingora::Result<HttpPeer> {
    // Addressed by the node's bound name so Pingora pools the connections (see
    // `NodeSocket::pool_address`); the connector below always dials the configured path.
    let mut p = HttpPeer::new_uds(&socket.pool_address(), false, String::new())?;
    p.options.custom_l4 = Some(Arc::new(CheckedConnect {
        socket: socket.clone(),
        timeout: LOCAL_CONNECT_TIMEOUT,
    }));
    p.options.connection_timeout = Some(LOCAL_CONNECT_TIMEOUT);
    p.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
    Ok(p)
}

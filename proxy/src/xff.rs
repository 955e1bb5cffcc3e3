//! The client address a node is told (`X-Vault-`-style client-address header, audit
//! `remote_address`): the TCP peer, or, when the peer is one of the listener's
//! `x_forwarded_for_authorized_addrs` (a load balancer in front), the last
//! `X-Forwarded-For` hop. The authorized list is swapped whole on SIGHUP (see `reload`):
//! a request is judged by one list, the old or the new.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use http::HeaderValue;
use vha_core::config::IpNet;

/// The authorized forwarders, replaceable while the proxy runs.
#[derive(Debug, Default)]
pub(crate) struct TrustedForwarders(RwLock<Arc<[IpNet]>>);

impl TrustedForwarders {
    pub(crate) fn new(nets: Vec<IpNet>) -> TrustedForwarders {
        TrustedForwarders(RwLock::new(nets.into()))
    }

    /// Installs `nets` for every request decided from now on.
    pub(crate) fn set(&self, nets: Vec<IpNet>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = nets.into();
    }

    /// The address the node should see for a request from `peer` carrying the
    /// `X-Forwarded-For` values `xff`.
    pub(crate) fn client_addr<'a>(&self, peer: SocketAddr, xff: impl Iterator<Item = &'a HeaderValue>) -> SocketAddr {
        let nets = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        client_addr(&nets, peer, xff)
    }
}

/// The pure decision: the last non-empty `X-Forwarded-For` hop (the one the trusted peer
/// itself added) when `peer` is in `trusted` and that hop is an IP address; `peer` otherwise.
pub(crate) fn client_addr<'a>(
    trusted: &[IpNet],
    peer: SocketAddr,
    xff: impl Iterator<Item = &'a HeaderValue>,
) -> SocketAddr {
    if !trusted.iter().any(|n| n.contains(peer.ip())) {
        return peer;
    }
    let last = xff
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .last();
    match last.and_then(|s| s.parse::<IpAddr>().ok()) {
        Some(ip) => SocketAddr::new(ip, 0),
        None => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        IpNet::parse(s).expect("net")
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).expect("header")
    }

    /// A peer outside the authorized list is what the node sees, whatever it claims.
    #[test]
    fn untrusted_peer_is_the_client() {
        let h = [hv("7.7.7.7")];
        assert_eq!(
            client_addr(&[net("10.0.0.0/8")], peer("127.0.0.1:5000"), h.iter()),
            peer("127.0.0.1:5000")
        );
        assert_eq!(client_addr(&[], peer("10.1.1.1:5000"), h.iter()), peer("10.1.1.1:5000"));
    }

    /// A trusted peer's last hop wins (the one it added), across repeated headers and lists;
    /// a last hop that is not an address leaves the peer.
    #[test]
    fn trusted_peer_gives_the_last_hop() {
        let t = [net("127.0.0.0/8")];
        let h = [hv("1.1.1.1, 2.2.2.2"), hv(" 3.3.3.3 ,")];
        assert_eq!(client_addr(&t, peer("127.0.0.1:1"), h.iter()), peer("3.3.3.3:0"));
        let h = [hv("1.1.1.1, not-an-ip")];
        assert_eq!(client_addr(&t, peer("127.0.0.1:1"), h.iter()), peer("127.0.0.1:1"));
        assert_eq!(client_addr(&t, peer("127.0.0.1:1"), [].iter()), peer("127.0.0.1:1"));
    }

    /// `set` changes the decision for the next request.
    #[test]
    fn set_replaces_the_list() {
        let f = TrustedForwarders::new(vec![]);
        let h = [hv("7.7.7.7")];
        assert_eq!(f.client_addr(peer("127.0.0.1:9"), h.iter()), peer("127.0.0.1:9"));
        f.set(vec![net("127.0.0.1/32")]);
        assert_eq!(f.client_addr(peer("127.0.0.1:9"), h.iter()), peer("7.7.7.7:0"));
        f.set(vec![]);
        assert_eq!(f.client_addr(peer("127.0.0.1:9"), h.iter()), peer("127.0.0.1:9"));
    }
}

//! The contract between a pair's proxy and its node (and between nodes on the cluster
//! channel), in one place: the headers each side sets and trusts, the roles a node reports
//! on its state stream, and the paths a node answers itself whatever its role.

/// The internal header carrying the original client address across a hop (proxy to node,
/// standby's proxy to the active over the cluster channel). A node trusts it only from
/// its pair socket and the cluster channel, and removes it from everything else.
pub const CLIENT_ADDR_HEADER: &str = "x-vha-client-addr";

/// Vault's header that asks a standby for a 307 to the active instead of forwarding.
pub const NO_FORWARD_HEADER: &str = "x-vault-no-request-forwarding";

/// Response header a node sets on its loop guard's 503 "node not active" to a forwarded
/// request: the request was refused before anything ran, so the forwarding proxy may send
/// it again to the next active.
pub const NOT_ACTIVE_HEADER: &str = "x-vha-not-active";

/// The `Location` of a standby's 307 (the proxy's and the node's alike): the active's
/// `api_addr` (scheme, host, port; any trailing slash dropped) followed by the original path
/// and query, byte for byte.
pub fn redirect_location(redirect_addr: &str, path_and_query: &str) -> String {
    format!("{}{}", redirect_addr.trim_end_matches('/'), path_and_query)
}

/// Paths under `/v1/` the local node answers whatever its state (Vault's sealed-safe and
/// node-local endpoints): the proxy never forwards them, and the node's local handler
/// (`vha_node::api::sys::handle_local`) answers each. `sys/seal` is here because a standby
/// must answer Vault's "cannot seal when in standby mode" error itself rather than seal the
/// active.
pub const LOCAL_ONLY: [&str; 7] = [
    "sys/health",
    "sys/leader",
    "sys/seal-status",
    "sys/unseal",
    "sys/init",
    "sys/seal",
    "sys/metrics",
];

/// A node's HA role as it reports it to its proxy (`LocalState::role` on the state stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairRole {
    /// Sealed or not initialized.
    Sealed,
    Standby,
    Active,
    /// HA not available: the node serves everything itself once unsealed.
    Disabled,
}

impl PairRole {
    /// Every role, for exhaustive checks.
    pub const ALL: [PairRole; 4] = [
        PairRole::Sealed,
        PairRole::Standby,
        PairRole::Active,
        PairRole::Disabled,
    ];

    /// The wire string of the state stream.
    pub fn as_str(self) -> &'static str {
        match self {
            PairRole::Sealed => "sealed",
            PairRole::Standby => "standby",
            PairRole::Active => "active",
            PairRole::Disabled => "disabled",
        }
    }

    /// The role a wire string names (`None` for anything else).
    pub fn parse(s: &str) -> Option<PairRole> {
        PairRole::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every role survives the wire: what the node writes, the proxy reads back as the same
    /// role; an unknown string is no role.
    #[test]
    fn roles_round_trip() {
        for r in PairRole::ALL {
            assert_eq!(PairRole::parse(r.as_str()), Some(r));
        }
        assert_eq!(PairRole::parse("leader"), None);
    }
}

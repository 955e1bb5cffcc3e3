//! The route decision: what the proxy does with one request, as a pure function of the
//! request line, one header and what the proxy knows about its local node and the active
//! node. No Pingora types, no I/O: [`crate::service`] gathers the inputs and carries out the
//! [`Route`]; this module is unit- and property-tested on its own.
//!
//! ```text
//! local-only path (sys/health, sys/leader, ...) ─────────────► Local (any state)
//! local node active or HA-disabled ──────────────────────────► Local
//! local node sealed ─────────────────────────────────────────► Sealed (503)
//! standby, node down or restarting, and no active known ─────► Hold (bounded, then 503)
//! standby + non-empty X-Vault-No-Request-Forwarding ─────────► Redirect (307)
//! standby + disable_clustering ──────────────────────────────► Redirect (307)
//! standby ───────────────────────────────────────────────────► Forward (mTLS cluster channel)
//! ```

use vha_core::pair::PairRole;
pub use vha_core::pair::LOCAL_ONLY;

/// What the local node last said about itself (or that it is not reachable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalRole {
    /// No state stream (node crashed, restarting, not started yet).
    Down,
    /// Sealed or not initialized.
    Sealed,
    /// A new node process (it restarted) that is still sealed, while the proxy holds the
    /// keyring the previous process handed over ([`keeps_keyring_when_sealed`]): it serves
    /// the local-only paths (so `sys/unseal` reaches it and `sys/health` says sealed) and
    /// forwards the rest, as while the node is down.
    Restarting,
    Standby,
    Active,
    /// HA not available: the node serves everything itself once unsealed.
    Disabled,
}

impl LocalRole {
    /// From the state stream's `role` field ([`PairRole`]); sealed, or a role this proxy
    /// does not know, is `Sealed` (serve nothing but the local-only paths).
    pub fn parse(role: &str, sealed: bool) -> LocalRole {
        match (sealed, PairRole::parse(role)) {
            (true, _) | (_, None | Some(PairRole::Sealed)) => LocalRole::Sealed,
            (false, Some(PairRole::Active)) => LocalRole::Active,
            (false, Some(PairRole::Standby)) => LocalRole::Standby,
            (false, Some(PairRole::Disabled)) => LocalRole::Disabled,
        }
    }
}

/// Everything the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct RouteInput<'a> {
    /// The request path as received (`/v1/secret/data/x`), undecoded.
    pub path: &'a str,
    /// The original path and query, undecoded (what a 307 `Location` keeps).
    pub path_and_query: &'a str,
    /// The value of `X-Vault-No-Request-Forwarding`, if the header is present.
    pub no_forward: Option<&'a [u8]>,
    pub local: LocalRole,
    /// The local node's `disable_clustering` (last known).
    pub disable_clustering: bool,
    /// The authenticated active node's `api_addr`, when one is known.
    pub active_redirect: Option<&'a str>,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Pass to the local node over the pair's socket.
    Local,
    /// 503 `{"errors":["Vault is sealed"]}`.
    Sealed,
    /// 307 with this `Location`, empty body.
    Redirect(String),
    /// Stream to the active node's cluster listener over mTLS.
    Forward,
    /// Wait (bounded) for an active node to be advertised, then decide again.
    Hold,
}

/// The API path after `/v1/`, percent-decoded and without trailing slashes, as the node
/// matches it; `None` for paths outside `/v1/` (which the local node answers).
pub fn api_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/")?;
    let decoded = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
    Some(decoded.trim_end_matches('/').to_string())
}

/// Whether the local node must answer `path` itself, whatever its state.
pub fn is_local_only(path: &str) -> bool {
    match api_path(path) {
        Some(p) => LOCAL_ONLY.contains(&p.as_str()),
        None => true,
    }
}

/// The 307 `Location` (the pair contract's, shared with the node).
pub use vha_core::pair::redirect_location as location;

/// The route decision (see the module diagram).
pub fn route(i: &RouteInput<'_>) -> Route {
    if is_local_only(i.path) {
        return Route::Local;
    }
    match i.local {
        LocalRole::Active | LocalRole::Disabled => return Route::Local,
        LocalRole::Sealed => return Route::Sealed,
        LocalRole::Standby | LocalRole::Down | LocalRole::Restarting => {}
    }
    let Some(active) = i.active_redirect else {
        return Route::Hold;
    };
    let wants_redirect = i.no_forward.is_some_and(|v| !v.is_empty());
    if wants_redirect || i.disable_clustering {
        return Route::Redirect(location(active, i.path_and_query));
    }
    Route::Forward
}

/// Why a forward could not be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardFailure {
    /// The TLS handshake or the pinned certificate check failed.
    Tls,
    /// Connection refused, timed out, or reset before the request was sent: the active may
    /// be gone.
    Unreachable,
    /// The target answered the loop guard's "node not active" before reading the request.
    NotActive,
}

/// What to do after a forward could not be sent, before any hold: TLS failures fall back to
/// Vault's 307 at once; an unreachable or deposed active means holding for a new term.
pub fn after_failure(f: ForwardFailure, redirect_addr: &str, path_and_query: &str) -> Route {
    match f {
        ForwardFailure::Tls => Route::Redirect(location(redirect_addr, path_and_query)),
        ForwardFailure::Unreachable | ForwardFailure::NotActive => Route::Hold,
    }
}

/// Where a hold that followed a failed forward ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldEnd<'a> {
    /// A different term is advertised now.
    NewActive,
    /// The bound passed and the same advertisement (whose forward failed) is still current.
    SameAtBound { redirect_addr: &'a str },
    /// The bound passed with no active known.
    NoneAtBound,
    /// The bound passed and the same advertisement is still current, but its node refused
    /// the forward as not active (a deposed active whose term is not yet replaced): a 307
    /// there would only bounce, so this is a 503 like [`HoldEnd::NoneAtBound`].
    RefusedAtBound,
}

/// The decision once a post-failure hold ends: forward to the new active, Vault's 307 to
/// the old one if nothing changed (it may still serve clients directly), or 503.
pub fn after_hold(end: HoldEnd<'_>, path_and_query: &str) -> Option<Route> {
    match end {
        HoldEnd::NewActive => Some(Route::Forward),
        HoldEnd::SameAtBound { redirect_addr } => Some(Route::Redirect(location(redirect_addr, path_and_query))),
        HoldEnd::NoneAtBound | HoldEnd::RefusedAtBound => None,
    }
}

/// Whether the proxy keeps its keyring (and so goes on forwarding) when the node reports
/// sealed. `keyring_from` is the node process ([`vha_core::local::LocalState::instance`])
/// that handed the keyring over, `instance` the one reporting sealed. Kept only when a new
/// process reports it (the node restarted and starts sealed, as every node does): the
/// proxy held that keyring while the node was down anyway. Dropped when the process that
/// handed it over is sealed (by request, or by itself), or when the instance is unknown
/// (`0`, a node that does not send one).
pub fn keeps_keyring_when_sealed(keyring_from: Option<u64>, instance: u64) -> bool {
    matches!(keyring_from, Some(from) if from != instance && instance != 0)
}

/// Whether a request whose connect to the local node's socket failed (nothing was sent)
/// holds for the view to change, by the role `local` the request was routed with: yes when
/// the node was up then (it is stopping, restarting or was just killed; the state stream
/// says so in a moment, and the request is decided again); no when it was routed to a node
/// already known to be down (a local-only path: 503 at once, so a health check never waits).
pub fn hold_after_local_unreachable(local: LocalRole) -> bool {
    local != LocalRole::Down
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input<'a>(path: &'a str, local: LocalRole, active: Option<&'a str>) -> RouteInput<'a> {
        RouteInput {
            path,
            path_and_query: path,
            no_forward: None,
            local,
            disable_clustering: false,
            active_redirect: active,
        }
    }

    const A: Option<&str> = Some("http://10.0.0.1:8200");

    /// The keyring survives a restart of the node (a new instance reporting sealed), never a
    /// seal of the process that handed it over, and never an unknown instance.
    #[test]
    fn keyring_kept_only_across_a_restart() {
        assert!(keeps_keyring_when_sealed(Some(1), 2));
        assert!(!keeps_keyring_when_sealed(Some(1), 1));
        assert!(!keeps_keyring_when_sealed(Some(1), 0));
        assert!(!keeps_keyring_when_sealed(None, 2));
    }

    /// A local connect failure holds only while the view still believes the node is up.
    #[test]
    fn local_connect_failure_holds_unless_known_down() {
        assert!(!hold_after_local_unreachable(LocalRole::Down));
        for up in [
            LocalRole::Sealed,
            LocalRole::Restarting,
            LocalRole::Standby,
            LocalRole::Active,
            LocalRole::Disabled,
        ] {
            assert!(hold_after_local_unreachable(up), "{up:?}");
        }
    }

    /// Local-only paths go to the local node in every state, including encoded and
    /// trailing-slash spellings the node would match the same way.
    #[test]
    fn local_only_paths_always_local() {
        for role in [
            LocalRole::Down,
            LocalRole::Sealed,
            LocalRole::Standby,
            LocalRole::Active,
            LocalRole::Disabled,
        ] {
            for p in [
                "/v1/sys/health",
                "/v1/sys/leader/",
                "/v1/sys/seal-status",
                "/v1/sys/unseal",
                "/v1/sys/init",
                "/v1/sys/seal",
                "/v1/sys/metrics",
                "/v1/sys%2Fhealth",
                "/ui/",
                "/",
            ] {
                assert_eq!(route(&input(p, role, None)), Route::Local, "{p} {role:?}");
                assert_eq!(route(&input(p, role, A)), Route::Local, "{p} {role:?}");
            }
        }
    }

    /// The Vault table for a non-local path.
    #[test]
    fn state_table() {
        let p = "/v1/secret/data/x";
        assert_eq!(route(&input(p, LocalRole::Active, A)), Route::Local);
        assert_eq!(route(&input(p, LocalRole::Disabled, None)), Route::Local);
        assert_eq!(route(&input(p, LocalRole::Sealed, A)), Route::Sealed);
        assert_eq!(route(&input(p, LocalRole::Standby, A)), Route::Forward);
        assert_eq!(
            route(&input(p, LocalRole::Down, A)),
            Route::Forward,
            "node down: keep forwarding"
        );
        assert_eq!(route(&input(p, LocalRole::Standby, None)), Route::Hold);
        assert_eq!(route(&input(p, LocalRole::Down, None)), Route::Hold);
        assert_eq!(
            route(&input(p, LocalRole::Restarting, A)),
            Route::Forward,
            "restarted, still sealed, keyring kept: keep forwarding"
        );
        assert_eq!(route(&input("/v1/sys/unseal", LocalRole::Restarting, A)), Route::Local);
        // sys/step-down and sys/ha-status are forwarded like any other path.
        assert_eq!(
            route(&input("/v1/sys/step-down", LocalRole::Standby, A)),
            Route::Forward
        );
        assert_eq!(route(&input("/v1/sys/sealx", LocalRole::Standby, A)), Route::Forward);
    }

    /// A non-empty no-forwarding header or disable_clustering gives a 307 keeping path and
    /// query byte for byte; an empty header value is forwarded.
    #[test]
    fn redirects() {
        let mut i = input("/v1/secret/data/x", LocalRole::Standby, Some("https://a.example:8200/"));
        i.path_and_query = "/v1/secret/data/x?version=2&q=%2F";
        i.no_forward = Some(b"true");
        assert_eq!(
            route(&i),
            Route::Redirect("https://a.example:8200/v1/secret/data/x?version=2&q=%2F".into())
        );
        i.no_forward = Some(b"");
        assert_eq!(route(&i), Route::Forward);
        i.disable_clustering = true;
        assert!(matches!(route(&i), Route::Redirect(_)));
        // No active known: hold even when a redirect is asked for.
        i.active_redirect = None;
        assert_eq!(route(&i), Route::Hold);
    }

    /// Failures before sending: TLS -> 307 now; unreachable or not active -> hold; after the
    /// hold: new term -> forward, same term -> 307, nobody -> 503 (None).
    #[test]
    fn failures_and_holds() {
        let r = "http://10.0.0.1:8200";
        assert_eq!(
            after_failure(ForwardFailure::Tls, r, "/v1/a?b"),
            Route::Redirect("http://10.0.0.1:8200/v1/a?b".into())
        );
        assert_eq!(after_failure(ForwardFailure::Unreachable, r, "/v1/a"), Route::Hold);
        assert_eq!(after_failure(ForwardFailure::NotActive, r, "/v1/a"), Route::Hold);
        assert_eq!(after_hold(HoldEnd::NewActive, "/v1/a"), Some(Route::Forward));
        assert_eq!(
            after_hold(HoldEnd::SameAtBound { redirect_addr: r }, "/v1/a?x=1"),
            Some(Route::Redirect("http://10.0.0.1:8200/v1/a?x=1".into()))
        );
        assert_eq!(after_hold(HoldEnd::NoneAtBound, "/v1/a"), None);
        assert_eq!(after_hold(HoldEnd::RefusedAtBound, "/v1/a"), None);
    }

    fn role() -> impl Strategy<Value = LocalRole> {
        prop_oneof![
            Just(LocalRole::Down),
            Just(LocalRole::Sealed),
            Just(LocalRole::Restarting),
            Just(LocalRole::Standby),
            Just(LocalRole::Active),
            Just(LocalRole::Disabled)
        ]
    }

    proptest! {
        /// For any path, header, state and knowledge of the active:
        /// - a Redirect's Location is exactly the active's address + the original path+query;
        /// - Forward and Redirect happen only on a standby (or down, or restarting) node with an
        ///   active known;
        /// - Sealed only when the node says sealed, Hold only when no active is known;
        /// - an active node serves every request itself.
        #[test]
        fn route_invariants(
            seg in "[a-z0-9%/._-]{0,40}",
            query in proptest::option::of("[a-z0-9=&%]{0,20}"),
            hdr in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
            local in role(),
            dc in any::<bool>(),
            active in proptest::option::of("https?://[a-z0-9.]{1,12}(:[0-9]{1,5})?/?"),
        ) {
            let path = format!("/v1/{seg}");
            let pq = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let i = RouteInput {
                path: &path,
                path_and_query: &pq,
                no_forward: hdr.as_deref(),
                local,
                disable_clustering: dc,
                active_redirect: active.as_deref(),
            };
            let r = route(&i);
            let local_only = is_local_only(&path);
            match &r {
                Route::Local => prop_assert!(local_only || matches!(local, LocalRole::Active | LocalRole::Disabled)),
                Route::Sealed => prop_assert!(!local_only && local == LocalRole::Sealed),
                Route::Hold => prop_assert!(!local_only && active.is_none()
                    && matches!(local, LocalRole::Standby | LocalRole::Down | LocalRole::Restarting)),
                Route::Forward => {
                    prop_assert!(!local_only && active.is_some() && !dc);
                    prop_assert!(matches!(local, LocalRole::Standby | LocalRole::Down | LocalRole::Restarting));
                    prop_assert!(hdr.as_ref().is_none_or(|h| h.is_empty()));
                }
                Route::Redirect(loc) => {
                    let a = active.as_deref().unwrap();
                    prop_assert_eq!(loc, &format!("{}{}", a.trim_end_matches('/'), pq));
                    prop_assert!(dc || hdr.as_ref().is_some_and(|h| !h.is_empty()));
                }
            }
            if matches!(local, LocalRole::Active | LocalRole::Disabled) {
                prop_assert_eq!(r, Route::Local);
            }
        }
    }
}

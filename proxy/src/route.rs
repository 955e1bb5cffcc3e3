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
//! Around that table, [`step`] decides each attempt of a request (go, answer, or wait for
//! the view to change) from the route and the attempt that failed before it, and
//! [`at_bound`] ends a wait at the hold bound; every answer the proxy writes itself is an
//! [`Answer`] that carries its own metric labels.

use crate::error::ProxyError;
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

/// Why the proxy answered 307 itself (the `reason` label of `vha_proxy_redirects_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectReason {
    /// The client sent `X-Vault-No-Request-Forwarding`.
    Header,
    /// The local node has `disable_clustering`: it never forwards.
    DisableClustering,
    /// A hold after a failed forward reached its bound with the same active still advertised.
    HoldBound,
    /// The forward failed in TLS: Vault's fallback is the 307.
    TlsFallback,
}

impl RedirectReason {
    /// Every reason, so each series of the counter exists at 0 from the start.
    pub const ALL: [RedirectReason; 4] = [
        RedirectReason::Header,
        RedirectReason::DisableClustering,
        RedirectReason::HoldBound,
        RedirectReason::TlsFallback,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RedirectReason::Header => "header",
            RedirectReason::DisableClustering => "disable_clustering",
            RedirectReason::HoldBound => "hold_bound",
            RedirectReason::TlsFallback => "tls_fallback",
        }
    }
}

/// A response the proxy writes itself instead of proxying.
#[derive(Debug)]
pub enum Answer {
    /// 307 to `location`, empty body.
    Redirect { location: String, reason: RedirectReason },
    /// A Vault-style error.
    Error(ProxyError),
}

impl Answer {
    /// The HTTP status written.
    pub fn status(&self) -> u16 {
        match self {
            Answer::Redirect { .. } => 307,
            Answer::Error(e) => e.status(),
        }
    }

    /// The `route` label of `vha_proxy_requests_total` for this answer; `None` keeps the
    /// label of the upstream the request was on (an answer about that attempt).
    pub fn route_label(&self) -> Option<&'static str> {
        match self {
            Answer::Redirect { .. } => Some("redirect"),
            Answer::Error(ProxyError::Sealed) => Some("sealed"),
            Answer::Error(ProxyError::NoActiveNode | ProxyError::LocalUnavailable) => Some("unavailable"),
            Answer::Error(ProxyError::BadFraming | ProxyError::PayloadTooLarge) => Some("rejected"),
            Answer::Error(_) => None,
        }
    }
}

/// What a request's decision comes after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Nothing was tried yet.
    First,
    /// The forward to advertisement `seq` could not be sent; `refused`: its node answered
    /// the loop guard's "not active" (nothing ran there).
    Forward { seq: u64, refused: bool },
    /// The local node refused as not active (the view was stale), or (`unreachable`) its
    /// socket could not be reached though the view had it up.
    Local { unreachable: bool },
}

impl Attempt {
    /// The upstream refused the request as not active (its loop guard): nothing ran there,
    /// so the request may be sent again whatever its method.
    pub fn refused(self) -> bool {
        matches!(
            self,
            Attempt::Forward { refused: true, .. } | Attempt::Local { unreachable: false }
        )
    }
}

/// One step of a decision that may hold: go to an upstream, answer, or wait for the view
/// to change (bounded by the request's hold deadline).
#[derive(Debug)]
pub enum Step {
    Local,
    Forward,
    Answer(Answer),
    Wait,
}

impl Step {
    /// The outcome label of `vha_proxy_holds_total` when a hold ends with this step.
    /// Every label [`Step::hold_outcome`] answers.
    pub const HOLD_OUTCOMES: [&'static str; 4] = ["resolved", "no_active", "same_active", "sealed"];

    pub fn hold_outcome(&self) -> &'static str {
        match self {
            Step::Answer(Answer::Redirect {
                reason: RedirectReason::HoldBound,
                ..
            }) => "same_active",
            Step::Answer(Answer::Error(ProxyError::Sealed)) => "sealed",
            Step::Answer(Answer::Error(_)) => "no_active",
            Step::Local | Step::Forward | Step::Answer(Answer::Redirect { .. }) | Step::Wait => "resolved",
        }
    }
}

/// What the proxy knows of the active when a step is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveSeen<'a> {
    /// The advertisement's sequence number (a new term's advertisement has a new one).
    pub seq: u64,
    /// Its `api_addr`.
    pub redirect_addr: &'a str,
}

/// The step for the route the view gives now (`route`), after `attempt`:
/// - a first attempt takes the route as it is; a hold (no active known) waits;
/// - after a failed forward, only a different advertisement is forwarded to (the failed
///   one waits), while the local node may serve at once (it became active);
/// - after the local node refused, it is tried again only once the view changed, and any
///   known active is forwarded to;
/// - 307s and "sealed" are answered whatever came before.
pub fn step(
    route: Route,
    attempt: Attempt,
    active: Option<ActiveSeen<'_>>,
    changed: bool,
    disable_clustering: bool,
) -> Step {
    match route {
        Route::Local => match attempt {
            Attempt::Local { .. } if !changed => Step::Wait,
            _ => Step::Local,
        },
        Route::Forward => match (attempt, active) {
            (Attempt::Forward { seq, .. }, Some(a)) if a.seq == seq => Step::Wait,
            (_, Some(_)) => Step::Forward,
            (_, None) => Step::Wait,
        },
        Route::Redirect(location) => Step::Answer(Answer::Redirect {
            location,
            reason: if disable_clustering {
                RedirectReason::DisableClustering
            } else {
                RedirectReason::Header
            },
        }),
        Route::Sealed => Step::Answer(Answer::Error(ProxyError::Sealed)),
        Route::Hold => Step::Wait,
    }
}

/// The step once the hold bound passed and [`step`] still waits: Vault's 307 to the same
/// active if a forward to it could not be sent (it may still serve clients directly), the
/// forward if a new term is advertised after all, and otherwise 503: no active node, or
/// the local node unavailable when its socket was what failed. A deposed active that
/// refused as not active gets no 307 (it would only bounce).
pub fn at_bound(attempt: Attempt, active: Option<ActiveSeen<'_>>, path_and_query: &str) -> Step {
    match (attempt, active) {
        (Attempt::Forward { seq, refused: false }, Some(a)) if a.seq == seq => Step::Answer(Answer::Redirect {
            location: location(a.redirect_addr, path_and_query),
            reason: RedirectReason::HoldBound,
        }),
        (Attempt::Forward { seq, refused: true }, Some(a)) if a.seq == seq => {
            Step::Answer(Answer::Error(ProxyError::NoActiveNode))
        }
        (Attempt::Forward { .. }, Some(_)) => Step::Forward,
        (Attempt::Local { unreachable: true }, _) => Step::Answer(Answer::Error(ProxyError::LocalUnavailable)),
        (Attempt::First | Attempt::Forward { .. } | Attempt::Local { unreachable: false }, _) => {
            Step::Answer(Answer::Error(ProxyError::NoActiveNode))
        }
    }
}

/// What to do after a forward could not be sent, before any hold: TLS failures fall back to
/// Vault's 307 at once (`Some`); an unreachable or deposed active means holding for a new
/// term (`None`).
pub fn after_failure(f: ForwardFailure, redirect_addr: &str, path_and_query: &str) -> Option<Answer> {
    match f {
        ForwardFailure::Tls => Some(Answer::Redirect {
            location: location(redirect_addr, path_and_query),
            reason: RedirectReason::TlsFallback,
        }),
        ForwardFailure::Unreachable | ForwardFailure::NotActive => None,
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

    /// Every step's hold outcome is one of `HOLD_OUTCOMES` (the series created at 0).
    #[test]
    fn hold_outcomes_are_listed() {
        let steps = [
            Step::Local,
            Step::Forward,
            Step::Wait,
            Step::Answer(Answer::Redirect {
                location: String::new(),
                reason: RedirectReason::HoldBound,
            }),
            Step::Answer(Answer::Redirect {
                location: String::new(),
                reason: RedirectReason::Header,
            }),
            Step::Answer(Answer::Error(ProxyError::Sealed)),
            Step::Answer(Answer::Error(ProxyError::NoActiveNode)),
        ];
        for s in &steps {
            assert!(Step::HOLD_OUTCOMES.contains(&s.hold_outcome()), "{s:?}");
        }
        let seen: std::collections::BTreeSet<_> = steps.iter().map(Step::hold_outcome).collect();
        assert_eq!(seen.len(), Step::HOLD_OUTCOMES.len());
    }

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

    fn redirect(s: &Step) -> Option<(&str, RedirectReason)> {
        match s {
            Step::Answer(Answer::Redirect { location, reason }) => Some((location, *reason)),
            _ => None,
        }
    }

    fn error(s: &Step) -> Option<&ProxyError> {
        match s {
            Step::Answer(Answer::Error(e)) => Some(e),
            _ => None,
        }
    }

    /// Failures before sending: TLS -> 307 now, labelled `tls_fallback`; unreachable or not
    /// active -> hold.
    #[test]
    fn failures_before_sending() {
        let r = "http://10.0.0.1:8200";
        match after_failure(ForwardFailure::Tls, r, "/v1/a?b") {
            Some(Answer::Redirect { location, reason }) => {
                assert_eq!(location, "http://10.0.0.1:8200/v1/a?b");
                assert_eq!(reason, RedirectReason::TlsFallback);
            }
            other => panic!("{other:?}"),
        }
        assert!(after_failure(ForwardFailure::Unreachable, r, "/v1/a").is_none());
        assert!(after_failure(ForwardFailure::NotActive, r, "/v1/a").is_none());
    }

    /// At the hold bound: the same active whose forward failed -> 307 (`hold_bound`, hold
    /// outcome `same_active`), unless it refused as not active -> 503; a new term -> forward;
    /// nobody -> 503 no active node; a local socket failure -> 503 local node unavailable.
    #[test]
    fn hold_bound_answers() {
        let same = Some(ActiveSeen {
            seq: 4,
            redirect_addr: "http://10.0.0.1:8200",
        });
        let newer = Some(ActiveSeen {
            seq: 5,
            redirect_addr: "http://10.0.0.2:8200",
        });
        let failed = Attempt::Forward { seq: 4, refused: false };
        let s = at_bound(failed, same, "/v1/a?x=1");
        assert_eq!(
            redirect(&s),
            Some(("http://10.0.0.1:8200/v1/a?x=1", RedirectReason::HoldBound))
        );
        assert_eq!(s.hold_outcome(), "same_active");
        let s = at_bound(Attempt::Forward { seq: 4, refused: true }, same, "/v1/a");
        assert!(matches!(error(&s), Some(ProxyError::NoActiveNode)), "{s:?}");
        assert_eq!(s.hold_outcome(), "no_active");
        assert!(matches!(at_bound(failed, newer, "/v1/a"), Step::Forward));
        assert!(matches!(
            error(&at_bound(failed, None, "/v1/a")),
            Some(ProxyError::NoActiveNode)
        ));
        assert!(matches!(
            error(&at_bound(Attempt::First, newer, "/v1/a")),
            Some(ProxyError::NoActiveNode)
        ));
        let local = Attempt::Local { unreachable: true };
        assert!(matches!(
            error(&at_bound(local, same, "/v1/a")),
            Some(ProxyError::LocalUnavailable)
        ));
        let local = Attempt::Local { unreachable: false };
        assert!(matches!(
            error(&at_bound(local, same, "/v1/a")),
            Some(ProxyError::NoActiveNode)
        ));
    }

    /// A redirect is labelled by why it happened, the same before and after a failed
    /// forward: `disable_clustering` when the node has it, `header` otherwise.
    #[test]
    fn redirect_reason_does_not_depend_on_the_attempt() {
        for attempt in [
            Attempt::First,
            Attempt::Forward { seq: 1, refused: false },
            Attempt::Local { unreachable: false },
        ] {
            for (dc, reason) in [
                (true, RedirectReason::DisableClustering),
                (false, RedirectReason::Header),
            ] {
                let s = step(Route::Redirect("http://a/v1/x".into()), attempt, None, false, dc);
                assert_eq!(redirect(&s), Some(("http://a/v1/x", reason)), "{attempt:?}");
            }
        }
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

        /// For any route, attempt and view: a step never forwards to the advertisement
        /// whose forward just failed, never sends back to a local node that refused before
        /// the view changed, and never forwards with no active known; the hold bound always
        /// ends the wait (`at_bound` never waits).
        #[test]
        fn steps_never_repeat_a_failed_attempt(
            r in prop_oneof![Just(Route::Local), Just(Route::Forward), Just(Route::Sealed), Just(Route::Hold),
                             Just(Route::Redirect("http://a/v1/x".into()))],
            kind in 0u8..3,
            failed_seq in 0u64..3,
            refused in any::<bool>(),
            seen in proptest::option::of(0u64..3),
            changed in any::<bool>(),
            dc in any::<bool>(),
        ) {
            let attempt = match kind {
                0 => Attempt::First,
                1 => Attempt::Forward { seq: failed_seq, refused },
                _ => Attempt::Local { unreachable: refused },
            };
            let active = seen.map(|seq| ActiveSeen { seq, redirect_addr: "http://a" });
            match step(r, attempt, active, changed, dc) {
                Step::Forward => {
                    prop_assert!(active.is_some());
                    if let Attempt::Forward { seq, .. } = attempt {
                        prop_assert_ne!(Some(seq), seen);
                    }
                }
                Step::Local => prop_assert!(changed || !matches!(attempt, Attempt::Local { .. }), "local again unchanged"),
                Step::Answer(_) | Step::Wait => {}
            }
            prop_assert!(!matches!(at_bound(attempt, active, "/v1/x"), Step::Wait));
        }
    }
}

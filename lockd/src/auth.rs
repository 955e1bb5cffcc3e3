//! Who may talk to lockd: the pure decision over a request's credentials, and the reasons a
//! refusal is counted under.
//!
//! Mutual TLS is enforced by the TLS handshake itself (a client certificate signed by
//! `tls_client_ca_file`, see `lib.rs`); a bearer token (`token_file`) is checked here on every
//! request, in constant time. `/v1/health` stays open so load balancers can probe; every other
//! path (data, locks, watches, snapshots, `/metrics`) needs the configured credentials.

use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;
use vha_core::storage::lockd::auth::BEARER;
use zeroize::Zeroizing;

/// Why a client was refused: the `reason` label of `vha_lockd_auth_failures_total`. Every
/// value exists at 0 from start, so a dashboard shows 0 rather than "no data".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A token is required and the request carried no `Authorization` header.
    MissingToken,
    /// `Authorization` is present but not `Bearer <token>`.
    BadScheme,
    /// The bearer token does not match.
    BadToken,
    /// The TLS handshake ended without a client certificate.
    NoClientCert,
    /// The client certificate is not signed by the client CA (or is otherwise invalid).
    BadClientCert,
    /// The TLS handshake failed for another reason (plain HTTP on the TLS port, versions).
    TlsHandshake,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::MissingToken,
        Refusal::BadScheme,
        Refusal::BadToken,
        Refusal::NoClientCert,
        Refusal::BadClientCert,
        Refusal::TlsHandshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::BadScheme => "bad_scheme",
            Refusal::BadToken => "bad_token",
            Refusal::NoClientCert => "no_client_cert",
            Refusal::BadClientCert => "bad_client_cert",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }

    /// The message of the 401 answer (never echoes what was presented).
    pub fn message(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing client token: send Authorization: Bearer <token>",
            Refusal::BadScheme => "unsupported authorization scheme: send Authorization: Bearer <token>",
            Refusal::BadToken => "permission denied: invalid token",
            Refusal::NoClientCert | Refusal::BadClientCert | Refusal::TlsHandshake => {
                "TLS client authentication failed"
            }
        }
    }
}

/// The bearer token lockd expects, if any. Cheap to clone (clones share the token, so a
/// [`TokenCheck::replace`] on SIGHUP reaches every connection); each token is zeroized when
/// the last reference to it goes.
#[derive(Clone, Default)]
pub(crate) struct TokenCheck {
    token: Option<Arc<RwLock<Arc<Tokens>>>>,
}

/// The accepted tokens (one, or old and new during a rotation).
type Tokens = Vec<Zeroizing<String>>;

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TokenCheck {
    pub(crate) fn new(tokens: Option<Vec<Zeroizing<String>>>) -> TokenCheck {
        TokenCheck {
            token: tokens.map(|t| Arc::new(RwLock::new(Arc::new(t)))),
        }
    }

    /// Requires one of `token` from now on. Refused when no token was configured at start:
    /// turning authentication on or off takes a restart.
    pub(crate) fn replace(&self, token: Vec<Zeroizing<String>>) -> Result<(), &'static str> {
        let Some(slot) = &self.token else {
            return Err("token_file was not set at start; adding it takes a restart");
        };
        *slot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(token);
        Ok(())
    }

    pub(crate) fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Decides over a request's `Authorization` header (raw bytes, `None` when absent).
    /// With no token configured every request passes (mutual TLS, if any, was checked at
    /// the handshake).
    pub(crate) fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let Some(slot) = &self.token else {
            return Ok(());
        };
        let expected = slot.read().unwrap_or_else(|p| p.into_inner()).clone();
        let presented = authorization.ok_or(Refusal::MissingToken)?;
        let scheme = BEARER.as_bytes();
        if presented.len() < scheme.len() || !presented[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Err(Refusal::BadScheme);
        }
        let presented = presented[scheme.len()..].trim_ascii();
        // Every accepted token is compared (no early exit): the time taken does not say
        // which one matched.
        let matched = expected
            .iter()
            .fold(false, |m, t| m | equal_secrets(presented, t.as_bytes()));
        if matched {
            Ok(())
        } else {
            Err(Refusal::BadToken)
        }
    }
}

/// Compares two secrets in constant time, also hiding their lengths: both are hashed first,
/// so the comparison always looks at 32 bytes.
fn equal_secrets(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.as_slice().ct_eq(hb.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a configured token every request passes; with one, only `Bearer <token>`
    /// (scheme case-insensitive, as HTTP defines it) passes, and each kind of wrong header
    /// gets its own reason.
    #[test]
    fn token_decisions() {
        assert_eq!(TokenCheck::default().check(None), Ok(()));
        let t = TokenCheck::new(Some(vec![Zeroizing::new("0123456789abcdef-token".into())]));
        assert_eq!(t.check(Some(b"Bearer 0123456789abcdef-token")), Ok(()));
        assert_eq!(t.check(Some(b"bearer 0123456789abcdef-token")), Ok(()));
        assert_eq!(t.check(None), Err(Refusal::MissingToken));
        assert_eq!(t.check(Some(b"Basic 0123456789abcdef-token")), Err(Refusal::BadScheme));
        assert_eq!(t.check(Some(b"0123456789abcdef-token")), Err(Refusal::BadScheme));
        assert_eq!(t.check(Some(b"Bear")), Err(Refusal::BadScheme));
        assert_eq!(t.check(Some(b"Bearer 0123456789abcdef-tokeN")), Err(Refusal::BadToken));
        assert_eq!(
            t.check(Some(b"Bearer 0123456789abcdef-token-and-more")),
            Err(Refusal::BadToken)
        );
        assert_eq!(t.check(Some(b"Bearer ")), Err(Refusal::BadToken));
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }

    /// During a rotation (two tokens listed) either passes, anything else does not; after
    /// `replace` with only the new one, the old one is refused.
    #[test]
    fn rotation_accepts_old_and_new_until_replaced() {
        let old = || Zeroizing::new("old-token-0123456789".to_string());
        let new = || Zeroizing::new("new-token-0123456789".to_string());
        let t = TokenCheck::new(Some(vec![old(), new()]));
        assert_eq!(t.check(Some(b"Bearer old-token-0123456789")), Ok(()));
        assert_eq!(t.check(Some(b"Bearer new-token-0123456789")), Ok(()));
        assert_eq!(t.check(Some(b"Bearer other-token-0123456789")), Err(Refusal::BadToken));
        t.replace(vec![new()]).unwrap();
        assert_eq!(t.check(Some(b"Bearer old-token-0123456789")), Err(Refusal::BadToken));
        assert_eq!(t.check(Some(b"Bearer new-token-0123456789")), Ok(()));
    }

    /// Every refusal has a distinct label, and no message can carry what the client sent.
    #[test]
    fn refusal_labels_are_distinct() {
        let mut labels: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }
}

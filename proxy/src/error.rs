//! The proxy's errors, and the one place they become HTTP responses (Vault's wire format,
//! `{"errors":[...]}`): [`ProxyError::status`] and [`ProxyError::body`].

use thiserror::Error;

/// Everything that can go wrong in the proxy, at start-up or for one request.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The configuration cannot run a proxy.
    #[error("configuration: {0}")]
    Config(String),
    /// The node's unix socket could not be reached.
    #[error("local node socket: {0}")]
    LocalSocket(#[source] std::io::Error),
    /// The process listening on the node's socket is not the node: it runs as another user.
    #[error(
        "the process at the node socket (pid {}) runs as uid {uid}, not as the node's uid {expected}",
        pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
    )]
    LocalImpostor { uid: u32, pid: Option<i32>, expected: u32 },
    /// The node's state stream failed.
    #[error("local node state stream: {0}")]
    LocalStream(String),
    /// An authenticated advertisement that cannot be used (bad key, address or certificate).
    #[error("unusable advertisement: {0}")]
    BadAdvertisement(String),
    /// Opening storage or the listeners failed.
    #[error("start-up: {0}")]
    Startup(String),
    /// The local node is sealed (or not initialized).
    #[error("Vault is sealed")]
    Sealed,
    /// No active node was advertised within the hold bound.
    #[error("no active node")]
    NoActiveNode,
    /// The local node did not answer (crashed, restarting) for a path only it can serve.
    #[error("local node unavailable")]
    LocalUnavailable,
    /// The request reached the active node but its answer did not come back (the active
    /// died or the channel broke mid-request). Never replayed: the request may have run.
    #[error(
        "request forwarded to the active node failed before a response (it may have run; it was not retried): {0}"
    )]
    ForwardBroken(String),
    /// Conflicting or invalid message framing (`Content-Length` with `Transfer-Encoding`).
    #[error("conflicting Content-Length and Transfer-Encoding")]
    BadFraming,
    /// The body is larger than `max_request_size`.
    #[error("http: request body too large")]
    PayloadTooLarge,
    /// The advertised active refused a forwarded request as not active (it was deposed) and
    /// the request's body was too large to send again to the next active. Nothing ran.
    #[error("active node stepped down before running the request; nothing was applied, retry it")]
    NotActive,
}

impl ProxyError {
    /// The HTTP status for request-level errors (500 for start-up kinds, which never reach
    /// a client).
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::Sealed | ProxyError::NoActiveNode | ProxyError::LocalUnavailable | ProxyError::NotActive => 503,
            ProxyError::ForwardBroken(_) => 502,
            ProxyError::BadFraming => 400,
            ProxyError::PayloadTooLarge => 413,
            _ => 500,
        }
    }

    /// Vault's error body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "errors": [self.to_string()] })).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statuses and bodies match Vault's wording where Vault has one.
    #[test]
    fn statuses_and_bodies() {
        assert_eq!(ProxyError::Sealed.status(), 503);
        assert_eq!(ProxyError::Sealed.body(), br#"{"errors":["Vault is sealed"]}"#);
        assert_eq!(ProxyError::NoActiveNode.body(), br#"{"errors":["no active node"]}"#);
        assert_eq!(ProxyError::BadFraming.status(), 400);
        assert_eq!(ProxyError::PayloadTooLarge.status(), 413);
        assert_eq!(ProxyError::ForwardBroken("x".into()).status(), 502);
    }
}

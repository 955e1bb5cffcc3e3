//! lockd's errors and the one place that maps them to HTTP status codes and Vault-shaped
//! JSON bodies (`{"errors":[...],"code":"..."}`; see `PROTOCOL.md`).
//!
//! Every variant carries the values that explain it (the stale token and the highest seen,
//! the key and its limit), so a client can act on the `code` and an operator on the message.

use hyper::StatusCode;
use thiserror::Error;
use vha_core::storage::lockd::protocol::{codes, ErrorBody};

/// What a lockd request can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LockdError {
    /// The body is not the JSON the endpoint expects.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A key, value, TTL or argument breaks a documented rule.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request body exceeds the limit.
    #[error("request body exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// A fenced write with a token below the highest seen for its lock.
    #[error("fenced: write with token {token} for lock {lock:?} is stale (highest seen {highest})")]
    Fenced { lock: String, token: u64, highest: u64 },
    /// A compare-and-put whose expected revision did not match.
    #[error("compare-and-put on {key:?} failed: expected revision {expected}, found {actual}")]
    CasMismatch { key: String, expected: u64, actual: u64 },
    /// A try-acquire on a held lock.
    #[error("lock {key:?} is held (token {token})")]
    LockHeld { key: String, token: u64 },
    /// Renew/release of a lease that has ended (expired, released, or superseded).
    #[error("lease {token} on lock {key:?} has expired or was released")]
    LeaseExpired { key: String, token: u64 },
    /// Renew/release with a token lockd never granted for that key.
    #[error("lock {key:?} has no lease with token {token}")]
    UnknownLease { key: String, token: u64 },
    /// lockd is shutting down or its log failed.
    #[error("lockd unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The request carried no credentials or wrong ones (nothing was read or changed).
    #[error("{}", .0.message())]
    Unauthorized(crate::auth::Refusal),
}

impl LockdError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            LockdError::Malformed(_) | LockdError::Invalid(_) => StatusCode::BAD_REQUEST,
            LockdError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            LockdError::NotFound(_) => StatusCode::NOT_FOUND,
            LockdError::Fenced { .. }
            | LockdError::CasMismatch { .. }
            | LockdError::LockHeld { .. }
            | LockdError::LeaseExpired { .. } => StatusCode::CONFLICT,
            LockdError::UnknownLease { .. } => StatusCode::NOT_FOUND,
            LockdError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            LockdError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            LockdError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }

    /// The typed code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            LockdError::Malformed(_) => codes::MALFORMED,
            LockdError::Invalid(_) => codes::INVALID,
            LockdError::TooLarge { .. } => codes::TOO_LARGE,
            LockdError::NotFound(_) => codes::NOT_FOUND,
            LockdError::Fenced { .. } => codes::FENCED,
            LockdError::CasMismatch { .. } => codes::CAS_MISMATCH,
            LockdError::LockHeld { .. } => codes::LOCK_HELD,
            LockdError::LeaseExpired { .. } => codes::LEASE_EXPIRED,
            LockdError::UnknownLease { .. } => codes::UNKNOWN_LEASE,
            LockdError::Unavailable(_) => codes::UNAVAILABLE,
            LockdError::Internal(_) => codes::INTERNAL,
            LockdError::Unauthorized(_) => codes::UNAUTHORIZED,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        let mut b = ErrorBody {
            errors: vec![self.to_string()],
            code: self.code().to_string(),
            token: None,
            highest: None,
            lock: None,
        };
        match self {
            LockdError::Fenced { lock, token, highest } => {
                b.token = Some(*token);
                b.highest = Some(*highest);
                b.lock = Some(lock.clone());
            }
            LockdError::LockHeld { key, token }
            | LockdError::LeaseExpired { key, token }
            | LockdError::UnknownLease { key, token } => {
                b.token = Some(*token);
                b.lock = Some(key.clone());
            }
            _ => {}
        }
        b
    }
}

impl From<vha_core::StorageError> for LockdError {
    fn from(e: vha_core::StorageError) -> Self {
        match e {
            vha_core::StorageError::Invalid(m) => LockdError::Invalid(m),
            other => LockdError::Internal(other.to_string()),
        }
    }
}

/// Errors opening or recovering the data directory (fatal at start).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("{path}: data directory is in use by another lockd")]
    Locked { path: String },
}

impl StoreError {
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_string(),
            source,
        }
    }
}

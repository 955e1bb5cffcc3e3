//! The node's API errors and the one place they become HTTP: Vault's status codes and its
//! `{"errors":[...]}` body.

use http::StatusCode;
use thiserror::Error;
use vha_core::{BarrierError, StorageError};

/// Everything a request can fail with, by the status Vault answers.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the request is malformed or its parameters are invalid.
    #[error("{0}")]
    BadRequest(String),
    /// 403: missing/invalid token or not allowed by policy.
    #[error("permission denied")]
    PermissionDenied,
    /// 404: no such path or entry. The message may be empty (Vault's `{"errors":[]}`).
    #[error("{0}")]
    NotFound(String),
    /// 405: the path exists but not for this method.
    #[error("unsupported operation")]
    MethodNotAllowed,
    /// 413: the body is larger than `max_request_size`.
    #[error("http: request body too large")]
    PayloadTooLarge,
    /// 503: the barrier is sealed (or not initialized).
    #[error("Vault is sealed")]
    Sealed,
    /// 503: temporarily unable to serve (storage down, shutting down, no active node).
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected backend failure.
    #[error("{0}")]
    Internal(String),
    /// 503: a request arrived on the cluster listener of a node that is not active (loop
    /// guard: it is never forwarded again).
    #[error("node not active")]
    NotActive,
    /// 503: the store rejected this node's write because its fencing token is stale: it
    /// was deposed and must not act as active.
    #[error("local node not active: leadership lost")]
    Fenced,
    /// 503: a standby knows no active node to redirect to.
    #[error("no active node")]
    NoActiveNode,
    /// 403: the token is valid but its policies do not allow the request (Vault's
    /// multierror text).
    #[error("1 error occurred:\n\t* permission denied\n\n")]
    AclDenied,
    /// 403 with a specific message (e.g. `sys/internal/ui/mounts` preflight).
    #[error("{0}")]
    Forbidden(String),
    /// 403: a token given as a parameter is unknown or expired (`auth/token/lookup`).
    #[error("bad token")]
    BadToken,
    /// 405: the path exists but not for this operation (Vault's multierror text).
    #[error("1 error occurred:\n\t* unsupported operation\n\n")]
    UnsupportedOperation,
    /// 404: no such endpoint under a known backend (`sys/`, `auth/token/`).
    #[error("1 error occurred:\n\t* unsupported path\n\n")]
    UnsupportedPath,
    /// 415: e.g. a KV v2 PATCH without `application/merge-patch+json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 500: no enabled audit device could record the request; it is refused (no unaudited
    /// access). Details go to the server log, not the client.
    #[error("internal error")]
    AuditFailed,
}

/// Vault's one-error multierror text (`1 error occurred:\n\t* <msg>\n\n`).
pub(crate) fn multierror(msg: &str) -> String {
    format!("1 error occurred:\n\t* {msg}\n\n")
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PermissionDenied | ApiError::AclDenied | ApiError::Forbidden(_) | ApiError::BadToken => {
                StatusCode::FORBIDDEN
            }
            ApiError::UnsupportedOperation => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedPath => StatusCode::NOT_FOUND,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::AuditFailed => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Sealed
            | ApiError::Unavailable(_)
            | ApiError::NotActive
            | ApiError::Fenced
            | ApiError::NoActiveNode => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The messages for the `errors` array (empty for a bare 404, as Vault).
    pub fn messages(&self) -> Vec<String> {
        match self {
            ApiError::NotFound(m) if m.is_empty() => Vec::new(),
            other => vec![other.to_string()],
        }
    }

    /// Vault's error body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "errors": self.messages() })
    }
}

impl From<BarrierError> for ApiError {
    fn from(e: BarrierError) -> Self {
        match e {
            BarrierError::Sealed | BarrierError::NotInitialized => ApiError::Sealed,
            BarrierError::AlreadyInitialized => ApiError::BadRequest("Vault is already initialized".into()),
            BarrierError::InvalidKey(m) => ApiError::BadRequest(m),
            BarrierError::InvalidParameters(m) => ApiError::BadRequest(format!("invalid seal configuration: {m}")),
            BarrierError::Storage(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Invalid(m) => ApiError::BadRequest(m),
            StorageError::Unavailable(m) => ApiError::Unavailable(format!("storage unavailable: {m}")),
            StorageError::Fenced { .. } | StorageError::LockLost(_) => ApiError::Fenced,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

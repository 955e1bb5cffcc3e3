//! Typed errors of the shared core: storage and barrier. Configuration errors live in
//! [`crate::config::ConfigError`] because they carry file/line/key positions.

use thiserror::Error;

/// What can go wrong talking to a storage or HA backend.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A write carried a fencing token lower than the highest the store has seen for that lock:
    /// the writer was deposed and must stop acting as active.
    #[error("fenced: write with token {token} for lock {lock:?} is stale (highest seen {highest})")]
    Fenced { lock: String, token: u64, highest: u64 },
    /// The store could not be reached or did not answer in time.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The store refused the client's credentials (missing or wrong token or certificate).
    #[error("storage refused the credentials: {0}")]
    Unauthorized(String),
    /// A key, value or argument broke a documented limit or format.
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// Stored data failed an integrity check.
    #[error("storage data corrupt: {0}")]
    Corrupt(String),
    /// The backend cannot do this (for example HA on `file`).
    #[error("operation not supported by the {backend} backend: {what}")]
    Unsupported { backend: &'static str, what: &'static str },
    /// A held lock was lost (lease expired, released elsewhere).
    #[error("lock {0:?} lost")]
    LockLost(String),
    /// Local I/O failed.
    #[error("storage I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Helper for I/O errors that names the path involved.
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// What can go wrong at the barrier (the encryption layer over storage).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BarrierError {
    #[error("Vault is sealed")]
    Sealed,
    #[error("Vault is already initialized")]
    AlreadyInitialized,
    #[error("Vault is not initialized")]
    NotInitialized,
    /// Authentication of a ciphertext failed: wrong key, tampered data, or a ciphertext that
    /// was moved to another path.
    #[error("failed to decrypt entry at {path:?}: integrity check failed")]
    Integrity { path: String },
    #[error("entry at {path:?} was encrypted with unknown key term {term}")]
    UnknownTerm { path: String, term: u32 },
    #[error("malformed ciphertext at {path:?}")]
    Malformed { path: String },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("invalid seal parameters: {0}")]
    InvalidParameters(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A listener certificate or key that cannot be served: it names the config key and the
/// file, so an operator sees which of the two to fix.
#[derive(Debug, Error)]
#[error("{key} {file}: {message}")]
pub struct CertError {
    /// `tls_cert_file` or `tls_key_file`.
    pub key: &'static str,
    pub file: String,
    pub message: String,
}

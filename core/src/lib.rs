//! vha-core: everything a vha node and its proxy share.
//!
//! - [`config`]: Vault's HCL server configuration, parsed and validated once.
//! - [`storage`]: the untrusted storage and HA-lock traits (modelled on Vault's
//!   `physical.Backend` / `HABackend`), fencing tokens, and the built-in backends.
//! - [`barrier`]: the AES-256-GCM keyring, the Shamir seal and the encrypted view of storage.
//! - [`advert`]: the active node's advertisement, as written under `core/leader/<uuid>`.
//! - [`pair`]: the headers a proxy and its node (and nodes among themselves) agree on.

pub mod advert;
pub mod barrier;
pub mod cluster_tls;
pub mod config;
pub mod duration;
pub mod error;
pub mod huge_pages;
pub mod local;
pub mod logging;
pub mod pair;
pub mod ports;
pub mod served_cert;
pub mod storage;

pub use error::{BarrierError, CertError, StorageError};

/// A client must send its whole request head within this, or the connection is closed, at
/// the node's listeners and at the proxy (slowloris-style dribbling cannot pin connections).
/// Vault's `http_read_header_timeout` default.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub use pair::NOT_ACTIVE_HEADER;

/// The body length a request announces in `Content-Length`, if it names one: the node, its
/// proxy and lockd refuse an announced oversized body before reading a byte of it.
pub fn announced_body_len(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The version every vha binary reports (`sys/health`, `sys/seal-status`, banner).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

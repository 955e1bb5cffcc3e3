//! vha-core: everything a vha node and its proxy share.
//!
//! - [`config`]: Vault's HCL server configuration, parsed and validated once.
//! - [`storage`]: the untrusted storage and HA-lock traits (modelled on Vault's
//!   `physical.Backend` / `HABackend`), fencing tokens, and the built-in backends.
//! - [`barrier`]: the AES-256-GCM keyring, the Shamir seal and the encrypted view of storage.
//! - [`advert`]: the active node's advertisement, as written under `core/leader/<uuid>`.

pub mod advert;
pub mod barrier;
pub mod cluster_tls;
pub mod config;
pub mod error;
pub mod local;
pub mod storage;

pub use error::{BarrierError, StorageError};

/// A client must send its whole request head within this, or the connection is closed, at
/// the node's listeners and at the proxy (slowloris-style dribbling cannot pin connections).
/// Vault's `http_read_header_timeout` default.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Response header a node sets on its loop guard's 503 "node not active" to a forwarded
/// request: the request was refused before anything ran, so the forwarding proxy may send
/// it again to the next active.
pub const NOT_ACTIVE_HEADER: &str = "x-vha-not-active";

/// The version every vha binary reports (`sys/health`, `sys/seal-status`, banner).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

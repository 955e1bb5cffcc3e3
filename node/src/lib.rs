//! vha-node: the node half of a proxy + node pair. It owns the seal/barrier, the secrets
//! and the Vault-compatible HTTP API (and, with HA, the lock and the cluster listener).
//!
//! - [`node`]: shared state (config, stores, barrier, unseal progress, tokens).
//! - [`api`]: transport-free request handling; [`http`]: the hyper server around it.
//! - [`cli`]: `vha server`: config, banner, listeners, signals.
//! - [`error`]: the API's error type and its mapping to Vault's statuses.

pub mod api;
pub(crate) mod audit;
pub mod cli;
pub(crate) mod cluster;
pub(crate) mod error;
pub(crate) mod ha;
pub(crate) mod http;
pub(crate) mod inflight;
pub(crate) mod local;
pub(crate) mod metrics;
pub mod mounts;
pub(crate) mod node;
pub(crate) mod policy;
pub(crate) mod request;
pub(crate) mod time;
pub(crate) mod token;
pub(crate) mod view;

pub use error::ApiError;
pub use node::Node;

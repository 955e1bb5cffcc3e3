//! vha-node: the node half of a proxy + node pair. It owns the seal/barrier, the secrets
//! and the Vault-compatible HTTP API (and, with HA, the lock and the cluster listener).
//!
//! - [`node`]: shared state (config, stores, barrier, unseal progress, tokens).
//! - [`api`]: transport-free request handling; [`http`]: the hyper server around it.
//! - [`cli`]: `vha server`: config, banner, listeners, signals.
//! - [`error`]: the API's error type and its mapping to Vault's statuses.

pub mod api;
pub mod audit;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod dev;
pub mod error;
pub mod ha;
pub mod http;
pub mod inflight;
pub mod local;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod policy;
pub mod request;
pub mod time;
pub mod token;
pub mod view;

pub use error::ApiError;
pub use node::Node;

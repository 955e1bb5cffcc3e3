//! vha-proxy: the Pingora front layer of a proxy + node pair.
//!
//! The proxy owns the client-facing `listener "tcp"`. It passes requests for its own node
//! over the pair's unix socket, forwards a standby's requests to the active node over the
//! mutually-authenticated P-521 cluster channel, or answers Vault's 307 / 503, holding
//! requests (bounded) while no active node is known. It learns the active node from the
//! encrypted advertisement in storage, which it decrypts with the keyring its node hands it.
//!
//! - [`route`]: the pure route decision (unit- and property-tested).
//! - [`local`]: the node's state stream; early lock release on proof of the node's death.
//! - [`advert`]: the controller: storage watches, advertisement authentication, [`advert::View`].
//! - [`service`]: the thin Pingora `ProxyHttp`.
//! - [`head`]: the whole-request-head deadline (slowloris) around Pingora's HTTP/1.1 loop.
//! - [`tls`]: listener TLS and upstream peers. [`xff`]: the client address a node is told.
//!   [`reload`]: SIGHUP. [`daemon`]: `--daemon` (PID file). [`metrics`], [`error`], [`cli`].

pub(crate) mod advert;
pub mod cli;
pub(crate) mod daemon;
pub(crate) mod error;
pub(crate) mod head;
pub(crate) mod local;
pub(crate) mod metrics;
pub(crate) mod reload;
pub mod route;
pub(crate) mod service;
pub(crate) mod tls;
pub(crate) mod xff;

/// The upstream pool's idle bound, for `examples/pingora_floor.rs` (it measures Pingora
/// with the proxy's own pool settings).
pub use tls::POOL_IDLE_TIMEOUT;

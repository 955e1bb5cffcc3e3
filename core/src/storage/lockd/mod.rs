//! The lockd storage backend: a client of the `vha lockd` daemon (the embedded HA store).
//!
//! [`LockdBackend`] implements [`Backend`](super::Backend) (KV, fenced writes, watches) and
//! [`HaBackend`](super::HaBackend) (leased locks with fencing tokens). [`protocol`] holds the
//! wire types the server (`vha-lockd`) shares, so they are defined once. A node uses it with
//! `storage "lockd" { address = "http://127.0.0.1:8300" }` and/or `ha_storage "lockd" {...}`.

pub mod auth;
pub mod client;
pub mod protocol;

/// Re-exported so callers of `acquire` need no direct tokio-util dependency.
pub use tokio_util::sync::CancellationToken;

pub use crate::storage::LockTiming;
pub use auth::LockdCredentials;
pub use client::{LockdBackend, DEFAULT_LOCK_TTL, DEFAULT_REQUEST_TIMEOUT, TOKEN_ENV};

//! vha's shared test harness: starts the real `vha` binary (and later lockd, etcd, proxies)
//! on 127.0.0.1 ephemeral ports, waits on conditions instead of sleeping, and stops every
//! process it started by PID (also when a test panics: [`process::ChildProc`] kills on drop).
//!
//! - [`process`]: spawning, signalling and reaping processes; locating the `vha` binary.
//! - [`wait`]: `wait_until(condition, why, timeout)`.
//! - [`node`]: `TestNode` / `TestCluster` builders for `vha server`.

pub mod node;
pub mod process;
pub mod wait;

pub use node::{TestCluster, TestNode};
pub use process::{free_port, vha_binary, ChildProc};
pub use wait::{wait_until, wait_until_async};

//! vha's shared test harness: starts the real `vha` binary (and later lockd, etcd, proxies)
//! on free 127.0.0.1 ports ([`free_port`]), waits on conditions instead of sleeping, and stops every
//! process it started by PID (also when a test panics: [`process::ChildProc`] kills on drop).
//!
//! - [`process`]: spawning, signalling and reaping processes; locating the `vha` binary.
//! - [`wait`]: `wait_until(condition, why, timeout)`.
//! - [`dev`]: `TestDev` for a whole `vha dev` cluster.
//! - [`etcd`]: `TestEtcd` for real etcd members (single or 3-member raft, kill/stop/restart).
//! - [`hostile`]: raw HTTP, slowloris and the hostile-input battery of t80/t93.
//! - [`lockd`]: `TestLockd` for `vha lockd` (start, kill -9, restart, stop).
//! - [`node`]: `TestNode` / `TestCluster` builders for `vha server`.
//! - [`prometheus`]: `TestPrometheus`, a real Prometheus scraping the test's processes.
//! - [`proxy`]: `TestProxy` for `vha proxy` in front of a node (`TestCluster::builder().proxies()`).

pub mod dev;
pub mod etcd;
pub mod hostile;
pub mod lockd;
pub mod node;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod relay;
pub mod wait;

pub use dev::TestDev;
pub use etcd::TestEtcd;
pub use lockd::TestLockd;
pub use node::{TestCluster, TestNode};
pub use process::{free_port, pid_alive, vha_binary, ChildProc};
pub use prometheus::{ScrapeJob, TestPrometheus};
pub use proxy::TestProxy;
pub use relay::{Fault, Relay};
pub use wait::{wait_until, wait_until_async};

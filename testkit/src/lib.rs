//! vha's shared test harness: starts the real `vha` binary (and later lockd, etcd, proxies)
//! on free 127.0.0.1 ports ([`free_port`]), waits on conditions instead of sleeping, and stops every
//! process it started by PID (also when a test panics: [`process::ChildProc`] kills on drop).
//!
//! - [`process`]: spawning, signalling and reaping processes; locating the `vha` binary.
//! - [`wait`]: `wait_until(condition, why, timeout)`.
//! - [`dev`]: `TestDev` for a whole `vha dev` cluster.
//! - [`etcd`]: `TestEtcd` for real etcd members (single or 3-member raft, kill/stop/restart).
//! - [`history`]: the checked history: a recorder of client operations on KV v2 keys and a
//!   per-key linearizability check (stateright's tester); the `check-history` binary re-checks
//!   a saved one.
//! - [`haproxy`]: `TestHaproxy`, a real HAProxy load balancer on a test host.
//! - [`hostile`]: raw HTTP, slowloris and the hostile-input battery of t80/t93.
//! - [`load`]: bounded write-and-read-back client loops (`kv_writes`).
//! - [`lockd`]: `TestLockd` for `vha lockd` (start, kill -9, restart, stop).
//! - [`net`]: `TestNet`, test hosts in network namespaces (pairs, stores, load balancer and
//!   client on separate network hosts), with partitions by link or nftables.
//! - [`node`]: `TestNode` / `TestCluster` builders for `vha server`.
//! - [`prometheus`]: `TestPrometheus`, a real Prometheus scraping the test's processes.
//! - [`proxy`]: `TestProxy` for `vha proxy` in front of a node (`TestCluster::builder().proxies()`).

pub mod dev;
pub mod etcd;
pub mod fencing;
pub mod haproxy;
pub mod history;
pub mod hostile;
pub mod load;
pub mod lockd;
pub mod net;
pub mod node;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod relay;
pub mod wait;

pub use dev::TestDev;
pub use etcd::TestEtcd;
pub use haproxy::{HealthCheck, LbFrontend, TestHaproxy};
pub use lockd::TestLockd;
pub use net::{Cut, NetHost, TestNet};
pub use node::{TestCluster, TestClusterBuilder, TestNode};
pub use process::{free_port, pid_alive, vha_binary, ChildProc};
pub use prometheus::{ScrapeJob, TestPrometheus};
pub use proxy::TestProxy;
pub use relay::{Fault, Relay};
pub use wait::{wait_until, wait_until_async};

//! vha-ops: the operations tooling, in one home above the node, the proxy and lockd.
//!
//! - [`dev`]: `vha dev`, a local HA cluster in one command; it writes the [`cluster`] file.
//! - [`cmd`]: `vha status` and `vha operator ...`, Vault's CLI commands.
//! - [`lockd_bench`] and [`lockd_scale`]: `vha lockd bench`, lockd beside etcd, and lockd
//!   filled with many entries.
//!
//! What they share, written once: [`process`] (the handle on a child process and the wait
//! for a server to answer), [`client`] (a small Vault API client), [`cluster`] (the typed
//! `cluster.json`) and [`etcd`] (starting an etcd cluster). Ports come from the one picker,
//! `vha_core::ports::free_port`; durations parse with `vha_core::duration`. `vha bench`
//! (crate `vha-bench`) uses the same process handle and cluster file.

pub(crate) mod client;
pub mod cluster;
pub mod cmd;
pub mod dev;
pub(crate) mod etcd;
pub mod lockd_bench;
pub(crate) mod lockd_scale;
pub mod process;
pub(crate) mod scale_store;

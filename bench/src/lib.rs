//! vha-bench: the side-by-side load generator behind `vha bench`.
//!
//! - [`load`]: closed-loop and open-loop (coordinated-omission corrected) engines;
//! - [`hist`]: HDR histograms and percentiles;
//! - [`workload`]: sys/health, KV v2 read/write/mixed with payload sizes;
//! - [`scenario`]: direct / forward / redirect / redirect-follow / node targets and the client;
//! - [`failover`]: kill -9 trials under write load, with read-back of acknowledged writes;
//! - [`peers`]: OpenBao raft cluster and nginx mTLS front in the same run;
//! - [`cost`]: CPU time per request and memory of each process role, from `/proc`;
//! - [`report`]: progress bar, table, JSON, self-contained HTML.

pub mod cli;
pub(crate) mod cost;
pub(crate) mod failover;
pub(crate) mod hist;
pub(crate) mod load;
pub(crate) mod peers;
pub(crate) mod report;
pub(crate) mod scenario;
pub(crate) mod workload;

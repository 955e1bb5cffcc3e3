//! vha-bench: the forwarding-throughput load generator (issue 9). Not built yet; the crate
//! exists so the workspace has its final shape.

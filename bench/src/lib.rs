//! vha-bench

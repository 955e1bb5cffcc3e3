//! vha-node

//! vha-proxy

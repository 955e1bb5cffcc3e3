//! vha-lockd

//! vha-testkit

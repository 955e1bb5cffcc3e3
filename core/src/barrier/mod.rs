//! Barrier (being written).

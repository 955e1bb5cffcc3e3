//! vha-proxy: the Pingora front layer of a proxy + node pair (issue 6). Not built yet; the
//! crate exists so the workspace has its final shape.

//! The node's Vault-compatible API, transport-free: an [`ApiRequest`] (already bounded and
//! read) goes in, an [`ApiResponse`] comes out. [`crate::http`] does the HTTP around it.
//!
//! Routing: the `sys/` endpoints that work while sealed (init, unseal, seal-status, health,
//! leader) are matched first; everything else needs an unsealed barrier.

pub mod auth_token;
pub mod logical;
pub mod sys;
pub mod sys_audit;
pub mod sys_ha;
pub mod sys_mounts;
pub mod sys_policy;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::node::Node;

/// Vault's LIST verb (also reachable as GET with `?list=true`).
pub fn list_method() -> Method {
    Method::from_bytes(b"LIST").expect("LIST is a valid method token")
}

/// A request as the API sees it.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    /// The path after `/v1/`, percent-decoded, without leading slash.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The client's address as the node trusts it.
    pub client_addr: Option<SocketAddr>,
    /// Where the request came in.
    pub origin: Origin,
    /// The original path and query, undecoded (for 307 `Location`).
    pub raw_path_query: String,
}

/// Where a request entered the node. The internal client-address header is trusted only
/// from [`Origin::Cluster`] and [`Origin::LocalProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The node's own TCP listener (clients reaching the node directly).
    Public,
    /// The cluster listener: forwarded by a standby's proxy over mTLS. Never forwarded again.
    Cluster,
    /// The local socket from this node's own proxy.
    LocalProxy,
}

/// The internal header carrying the original client address across a hop. Removed from
/// everything that does not come from a trusted origin.
pub const CLIENT_ADDR_HEADER: &str = "x-vha-client-addr";
/// Vault's header that asks a standby for a 307 instead of forwarding.
pub const NO_FORWARD_HEADER: &str = "x-vault-no-request-forwarding";

impl ApiRequest {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The client token: `X-Vault-Token`, or `Authorization: Bearer <token>`.
    pub fn token(&self) -> Option<&str> {
        if let Some(t) = self.headers.get("x-vault-token").and_then(|v| v.to_str().ok()) {
            if !t.is_empty() {
                return Some(t);
            }
        }
        self.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// The JSON body; an empty body reads as `{}` (Vault accepts that for optional bodies).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("failed to parse JSON input: {e}")))
    }

    /// True for LIST, or GET with `?list=true`.
    pub fn is_list(&self) -> bool {
        self.method == list_method()
            || (self.method == Method::GET && self.query("list").and_then(vha_core::config::parse_bool) == Some(true))
    }
}

/// A response as the API produces it.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `None` = empty body (204, HEAD, 307).
    pub body: Option<serde_json::Value>,
    /// A non-JSON body (Prometheus text); wins over `body` when set.
    pub raw: Option<Bytes>,
}

impl ApiResponse {
    pub fn json(status: StatusCode, body: serde_json::Value) -> Self {
        ApiResponse {
            status,
            headers: HeaderMap::new(),
            body: Some(body),
            raw: None,
        }
    }
    pub fn ok(body: serde_json::Value) -> Self {
        Self::json(StatusCode::OK, body)
    }
    pub fn no_content() -> Self {
        ApiResponse {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: None,
            raw: None,
        }
    }
    pub fn error(e: &ApiError) -> Self {
        Self::json(e.status(), e.body())
    }
}

/// Handles one API request: local `sys/` endpoints in any state; the loop guard for
/// forwarded requests; a standby's fallback (307 / 503); HA endpoints; then routing.
pub async fn handle(node: &Node, req: ApiRequest) -> ApiResponse {
    let start = std::time::Instant::now();
    // The term this request was admitted in (its fencing token), if any.
    let mut admitted_in = None;
    let res = async {
        if let Some(resp) = sys::handle_local(node, &req).await? {
            return Ok(resp);
        }
        let role = node.ha().role();
        // The same for a request from this node's own proxy that still thought it active
        // (it decides again on this answer).
        let stale_local = req.origin == Origin::LocalProxy && role == crate::ha::Role::Standby;
        if (req.origin == Origin::Cluster && role != crate::ha::Role::Active) || stale_local {
            // Loop guard: a forwarded request is never forwarded or redirected again.
            return Ok(not_active_refusal());
        }
        if role == crate::ha::Role::Standby {
            return Ok(sys_ha::standby_fallback(node, &req));
        }
        if let Some(resp) = sys_ha::handle(node, &req).await? {
            return Ok(resp);
        }
        // Admitted and counted so a step-down lets it finish with the term's fence (not
        // sys/step-down itself, above, which waits for the term to end). Refused, with
        // nothing run, once the term is ending (or on an HA node that is not active).
        let Some(_running) = node.in_flight().enter() else {
            if node.barrier().is_sealed() {
                return Err(ApiError::Sealed);
            }
            return Ok(not_active_refusal());
        };
        admitted_in = node.ha().fence().map(|f| f.token);
        route(node, &req).await
    }
    .await;
    node.metrics().handle_request.observe(start.elapsed().as_secs_f64());
    match res {
        Ok(resp) => resp,
        Err(e) => {
            if matches!(e, ApiError::Fenced) {
                node.metrics().fencing_rejections.inc();
                // Only a rejection of the current term's token ends the current term (a
                // request of an earlier term that outlived its drain must not).
                if admitted_in.is_some() && node.ha().fence().map(|f| f.token) == admitted_in {
                    node.ha().fenced();
                }
            }
            ApiResponse::error(&e)
        }
    }
}

/// The loop guard's 503 "node not active", marked as refused before anything ran, so the
/// forwarding proxy may send the request to the next active.
fn not_active_refusal() -> ApiResponse {
    let mut resp = ApiResponse::error(&ApiError::NotActive);
    resp.headers
        .insert(vha_core::NOT_ACTIVE_HEADER, http::HeaderValue::from_static("1"));
    resp
}

async fn route(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    if let Some(resp) = sys::handle_local(node, req).await? {
        return Ok(resp);
    }
    if node.barrier().is_sealed() {
        return Err(ApiError::Sealed);
    }
    // Token, ACL, audit, then sys/policy, sys/mounts, sys/audit, auth/token and mounts.
    logical::serve(node, req).await
}

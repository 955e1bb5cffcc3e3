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

/// A request as the API sees it. `Debug` shows no header value, query value or body: they
/// carry tokens, unseal keys and secrets.
#[derive(Clone)]
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

pub use vha_core::pair::CLIENT_ADDR_HEADER;

/// Header names without their values (for redacted `Debug` output).
struct HeaderNames<'a>(&'a HeaderMap);

impl std::fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys().map(|k| k.as_str())).finish()
    }
}

impl std::fmt::Debug for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field(
                "query_keys",
                &self.query.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("header_names", &HeaderNames(&self.headers))
            .field("body_len", &self.body.len())
            .field("client_addr", &self.client_addr)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ApiResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiResponse")
            .field("status", &self.status)
            .field("header_names", &HeaderNames(&self.headers))
            .field("body", &self.body.as_ref().map(|_| format_args!("<redacted>")))
            .field("raw_len", &self.raw.as_ref().map(Bytes::len))
            .finish()
    }
}

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

/// A response as the API produces it. `Debug` shows no header value and no body: they
/// carry root tokens, unseal keys and secrets.
#[derive(Clone)]
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
pub(crate) fn not_active_refusal() -> ApiResponse {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `Debug` of a request and of a response shows neither a token (header), nor a body
    /// (unseal key, secret), nor a query value; method, path and status stay readable.
    #[test]
    fn debug_redacts_tokens_and_bodies() {
        let mut headers = HeaderMap::new();
        headers.insert("x-vault-token", "hvs.TOKENSECRET1".parse().unwrap());
        headers.insert(http::header::AUTHORIZATION, "Bearer TOKENSECRET2".parse().unwrap());
        let req = ApiRequest {
            method: Method::PUT,
            path: "sys/unseal".into(),
            query: vec![("wrap".into(), "QUERYSECRET".into())],
            headers: headers.clone(),
            body: Bytes::from_static(br#"{"key":"UNSEALSECRET"}"#),
            client_addr: None,
            origin: Origin::LocalProxy,
            raw_path_query: "/v1/sys/unseal?wrap=QUERYSECRET".into(),
        };
        let resp = ApiResponse {
            status: StatusCode::OK,
            headers,
            body: Some(serde_json::json!({"root_token": "ROOTSECRET"})),
            raw: Some(Bytes::from_static(b"RAWSECRET")),
        };
        let dbg = format!("{req:?} {resp:?} {req:#?} {resp:#?}");
        // Every secret above contains the word.
        assert!(!dbg.contains("SECRET"), "{dbg}");
        for shown in [
            "sys/unseal",
            "PUT",
            "x-vault-token",
            "authorization",
            "200",
            "<redacted>",
            "LocalProxy",
        ] {
            assert!(dbg.contains(shown), "{shown} missing: {dbg}");
        }
    }
}

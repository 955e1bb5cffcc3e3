//! The node's Vault-compatible API, transport-free: an [`ApiRequest`] (already bounded and
//! read) goes in, an [`ApiResponse`] comes out. [`crate::http`] does the HTTP around it.
//!
//! Routing: the `sys/` endpoints that work while sealed (init, unseal, seal-status, health,
//! leader) are matched first; everything else needs an unsealed barrier.

pub mod sys;

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

/// A response as the API produces it.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `None` = empty body (204, HEAD, 307).
    pub body: Option<serde_json::Value>,
}

impl ApiResponse {
    pub fn json(status: StatusCode, body: serde_json::Value) -> Self {
        ApiResponse {
            status,
            headers: HeaderMap::new(),
            body: Some(body),
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
        }
    }
    pub fn error(e: &ApiError) -> Self {
        Self::json(e.status(), e.body())
    }
}

/// Handles one API request.
pub async fn handle(node: &Node, req: ApiRequest) -> ApiResponse {
    match route(node, &req).await {
        Ok(resp) => resp,
        Err(e) => ApiResponse::error(&e),
    }
}

async fn route(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    if let Some(resp) = sys::handle_local(node, req).await? {
        return Ok(resp);
    }
    if node.barrier().is_sealed() {
        return Err(ApiError::Sealed);
    }
    Err(ApiError::NotFound(format!(
        "no handler for route {:?}. route entry not found.",
        req.path
    )))
}

//! What goes into the node's API and what comes out of it, below everything that handles a
//! request (the API's routing, the mounts, the audit devices): an [`ApiRequest`] (already
//! bounded and read), the [`ApiResponse`] the HTTP layer writes, and the [`LogicalResponse`]
//! a handler answers before the API wraps it into Vault's envelope.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::ApiError;

/// Vault's LIST verb (also reachable as GET with `?list=true`).
pub(crate) fn list_method() -> Method {
    Method::from_bytes(b"LIST").expect("LIST is a valid method token")
}

/// A new request ID (a random UUID, as Vault's). Drawn from the thread's CSPRNG (seeded and
/// reseeded from the OS) instead of one `getrandom(2)` per request, as `Uuid::new_v4` does:
/// an ID names a request in responses and audit lines and guards nothing.
pub(crate) fn request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string()
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

pub(crate) use vha_core::pair::CLIENT_ADDR_HEADER;

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

/// What a handler answers, before the envelope. `Debug` shows neither `data` nor `auth`
/// (secrets, client tokens).
#[derive(Clone)]
pub struct LogicalResponse {
    pub status: StatusCode,
    pub data: Option<Value>,
    pub auth: Option<Value>,
    pub warnings: Vec<String>,
    pub lease_duration: u64,
    /// An error body (`{"errors": [...]}`) instead of the envelope.
    pub error: bool,
    pub errors: Vec<String>,
    /// No body at all (204, or a bare 404).
    pub empty: bool,
    /// Also copy `data`'s fields to the top level (Vault does this for the old `sys/`
    /// endpoints: mounts, policy, capabilities, audit).
    pub merge_top: bool,
}

impl std::fmt::Debug for LogicalResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<Value>| v.as_ref().map(|_| format_args!("<redacted>"));
        f.debug_struct("LogicalResponse")
            .field("status", &self.status)
            .field("data", &redacted(&self.data))
            .field("auth", &redacted(&self.auth))
            .field("warnings", &self.warnings)
            .field("lease_duration", &self.lease_duration)
            .field("error", &self.error)
            .field("errors", &self.errors)
            .field("empty", &self.empty)
            .field("merge_top", &self.merge_top)
            .finish()
    }
}

impl LogicalResponse {
    pub fn data(v: Value) -> Self {
        LogicalResponse {
            status: StatusCode::OK,
            data: Some(v),
            auth: None,
            warnings: Vec::new(),
            lease_duration: 0,
            error: false,
            errors: Vec::new(),
            empty: false,
            merge_top: false,
        }
    }
    pub fn no_content() -> Self {
        LogicalResponse {
            status: StatusCode::NO_CONTENT,
            empty: true,
            data: None,
            ..Self::data(Value::Null)
        }
    }
    pub fn empty_status(status: StatusCode) -> Self {
        LogicalResponse {
            status,
            ..Self::no_content()
        }
    }
    pub fn error_status(status: StatusCode, errors: Vec<String>) -> Self {
        LogicalResponse {
            status,
            error: true,
            errors,
            data: None,
            ..Self::data(Value::Null)
        }
    }
    /// An envelope with no data and only warnings (200).
    pub fn warnings(w: Vec<String>) -> Self {
        LogicalResponse {
            data: None,
            warnings: w,
            ..Self::data(Value::Null)
        }
    }
    pub fn merged(mut self) -> Self {
        self.merge_top = true;
        self
    }

    /// The body clients see (`None` = empty).
    pub fn body(&self, request_id: &str, mount_type: &str) -> Option<Value> {
        if self.empty {
            return None;
        }
        if self.error {
            return Some(json!({ "errors": self.errors }));
        }
        let mut v = json!({
            "request_id": request_id,
            "lease_id": "",
            "renewable": false,
            "lease_duration": self.lease_duration,
            "data": self.data,
            "wrap_info": null,
            "warnings": if self.warnings.is_empty() { Value::Null } else { json!(self.warnings) },
            "auth": self.auth,
            "mount_type": mount_type,
        });
        if self.merge_top {
            if let (Some(Value::Object(d)), Some(top)) = (&self.data, v.as_object_mut()) {
                for (k, x) in d {
                    top.entry(k.clone()).or_insert_with(|| x.clone());
                }
            }
        }
        Some(v)
    }
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

    /// `Debug` of a handler's answer shows neither its data (a secret) nor its auth block
    /// (a client token); status and warnings stay readable.
    #[test]
    fn debug_redacts_data_and_auth() {
        let mut r = LogicalResponse::data(json!({"password": "DATASECRET"}));
        r.auth = Some(json!({"client_token": "hvs.TOKENSECRET"}));
        r.warnings = vec!["a warning".into()];
        let dbg = format!("{r:?} {r:#?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
        assert!(
            dbg.contains("<redacted>") && dbg.contains("a warning") && dbg.contains("200"),
            "{dbg}"
        );
    }
}

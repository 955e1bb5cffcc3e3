//! HA endpoints and a standby's fallback: `sys/step-down`, `sys/ha-status`,
//! `sys/config/state/sanitized` (the seed's "Configuration page": storage types and whether
//! HA is available), `sys/metrics`, and the 307 / 503 a standby answers for everything it
//! cannot serve locally.

use http::{header, HeaderValue, Method, StatusCode};
use serde_json::json;

use crate::error::ApiError;
use crate::ha::state::Role;
use crate::node::Node;
use crate::policy::Operation;
use crate::request::{ApiRequest, ApiResponse};

/// How long `sys/step-down` waits for the term to end before answering anyway.
const STEP_DOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A standby's answer to what it cannot serve: 307 to the active's `api_addr` with the
/// original path and query (never 301/302: clients would turn POST into GET), or 503 when
/// no active node is known.
pub fn standby_fallback(node: &Node, req: &ApiRequest) -> ApiResponse {
    match node.ha().status().leader {
        Some(leader) => redirect_to(&leader.adv.redirect_addr, &req.raw_path_query),
        None => ApiResponse::error(&ApiError::NoActiveNode),
    }
}

/// A 307 to `base` + `path_query`, empty body.
pub fn redirect_to(base: &str, path_query: &str) -> ApiResponse {
    let location = vha_core::pair::redirect_location(base, path_query);
    let mut resp = ApiResponse {
        status: StatusCode::TEMPORARY_REDIRECT,
        headers: Default::default(),
        body: None,
        raw: None,
    };
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers.insert(header::LOCATION, v);
    }
    resp
}

/// Handles the HA endpoints on an active (or non-HA) node; `Ok(None)` for other paths.
pub async fn handle(node: &Node, req: &ApiRequest) -> Result<Option<ApiResponse>, ApiError> {
    let path = req.path.trim_end_matches('/');
    let m = &req.method;
    let resp = match path {
        "sys/step-down" => match *m {
            Method::PUT | Method::POST => step_down(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/ha-status" => match *m {
            Method::GET => ha_status(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/config/state/sanitized" => match *m {
            Method::GET => sanitized_config(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        _ => return Ok(None),
    };
    Ok(Some(resp))
}

async fn step_down(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let caller = super::logical::authorize(node, req, "sys/step-down", Operation::Update, true).await?;
    let result = if node.ha().role() == Role::Active && !node.ha().step_down(STEP_DOWN_TIMEOUT).await {
        Err(ApiError::Internal("step-down did not complete in time".into()))
    } else {
        Ok(ApiResponse::no_content())
    };
    caller.answer(node, result).await
}

async fn ha_status(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let caller = super::logical::authorize(node, req, "sys/ha-status", Operation::Read, false).await?;
    let cfg = node.config();
    let mut nodes = vec![json!({
        "hostname": crate::ha::leader::hostname(),
        "api_address": cfg.api_addr.as_str().trim_end_matches('/'),
        "cluster_address": cfg.cluster_addr.as_str().trim_end_matches('/'),
        "active_node": node.ha().role() == Role::Active || node.ha().role() == Role::Disabled,
        "last_echo": serde_json::Value::Null,
        "version": vha_core::VERSION,
        "upgrade_version": vha_core::VERSION,
    })];
    for e in node.ha().echoes() {
        nodes.push(json!({
            "hostname": e.hostname,
            "api_address": e.api_address,
            "cluster_address": e.cluster_address,
            "active_node": false,
            "last_echo": e.last_echo,
            "version": e.version,
        }));
    }
    caller
        .answer(node, Ok(ApiResponse::ok(json!({ "nodes": nodes }))))
        .await
}

fn stanza_json(st: &vha_core::config::Stanza) -> serde_json::Value {
    json!({ "type": st.kind })
}

async fn sanitized_config(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let caller = super::logical::authorize(node, req, "sys/config/state/sanitized", Operation::Read, true).await?;
    let cfg = node.config();
    let ha_available = node.ha().enabled();
    let mut storage = stanza_json(&cfg.storage);
    storage["redirect_addr"] = json!(cfg.api_addr.as_str().trim_end_matches('/'));
    storage["cluster_addr"] = json!(cfg.cluster_addr.as_str().trim_end_matches('/'));
    storage["disable_clustering"] = json!(cfg.disable_clustering);
    storage["ha_available"] = json!(ha_available && cfg.ha_storage.is_none());
    let listeners: Vec<_> = cfg
        .listeners
        .iter()
        .map(|l| {
            json!({
                "type": "tcp",
                "config": {
                    "address": l.address.to_string(),
                    "cluster_address": l.cluster_address.to_string(),
                    "tls_disable": l.tls_disable,
                    "max_request_size": l.max_request_size,
                    "max_request_duration": l.max_request_duration.map(|d| d.as_secs()),
                }
            })
        })
        .collect();
    let data = json!({
        "api_addr": cfg.api_addr.as_str().trim_end_matches('/'),
        "cluster_addr": cfg.cluster_addr.as_str().trim_end_matches('/'),
        "cluster_name": cfg.cluster_name.clone().unwrap_or_default(),
        "disable_clustering": cfg.disable_clustering,
        "log_level": cfg.log_level.as_str(),
        "storage": storage,
        "ha_storage": cfg.ha_storage.as_ref().map(|h| {
            let mut v = stanza_json(h);
            v["ha_available"] = json!(ha_available);
            v
        }),
        "ha_available": ha_available,
        "listeners": listeners,
    });
    caller.answer(node, Ok(ApiResponse::ok(envelope(data)))).await
}

/// Vault's response envelope for non-secret data.
pub fn envelope(data: serde_json::Value) -> serde_json::Value {
    json!({
        "request_id": crate::request::request_id(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": null,
    })
}

/// `sys/metrics`: Prometheus text with `format=prometheus` (the only format served); needs a
/// token unless the listener sets `telemetry { unauthenticated_metrics_access = true }`.
/// Local on every node (each node reports its own role).
pub async fn metrics(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let caller = if node.config().listener().unauthenticated_metrics_access {
        None
    } else {
        if node.barrier().is_sealed() {
            return Err(ApiError::Sealed);
        }
        Some(super::logical::authorize(node, req, "sys/metrics", Operation::Read, false).await?)
    };
    let result = render_metrics(node, req);
    match caller {
        Some(caller) => caller.answer(node, result).await,
        None => result,
    }
}

/// The Prometheus text of `sys/metrics`.
fn render_metrics(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    match req.query("format") {
        Some("prometheus") | None => {}
        Some(other) => return Err(ApiError::BadRequest(format!("unsupported metrics format {other:?}"))),
    }
    let mut resp = ApiResponse {
        status: StatusCode::OK,
        headers: Default::default(),
        body: None,
        raw: None,
    };
    resp.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    node.metrics().observe_cache(node.barrier().cache().stats());
    resp.raw = Some(bytes::Bytes::from(node.metrics().render()));
    Ok(resp)
}

//! `sys/mounts` (list), `sys/mounts/<path>` (read, enable, disable), `sys/mounts/<path>/tune`
//! and `sys/internal/ui/mounts/<path>` (which the Vault CLI's `kv` commands use to find a
//! mount's KV version).

use std::collections::BTreeMap;

use http::Method;
use serde_json::{Map, Value};

use super::ctx::Ctx;
use crate::error::ApiError;
use crate::mounts::{sys_mount_json, EnableParams, MountConfig};
use crate::request::LogicalResponse;
use crate::time::parse_duration_value;

pub(crate) async fn list(ctx: &Ctx<'_>) -> Result<LogicalResponse, ApiError> {
    if ctx.req.method != Method::GET {
        return Err(ApiError::UnsupportedOperation);
    }
    let mut data = Map::new();
    for m in ctx.node.mounts().entries(&ctx.node.view()).await?.iter() {
        data.insert(m.path.clone(), m.to_json());
    }
    data.insert("sys/".into(), sys_mount_json());
    Ok(LogicalResponse::data(Value::Object(data)).merged())
}

/// `sys/auth`: the one auth method vha has, the token store (read-only).
pub(crate) async fn auth_list(ctx: &Ctx<'_>) -> Result<LogicalResponse, ApiError> {
    if ctx.req.method != Method::GET {
        return Err(ApiError::UnsupportedOperation);
    }
    let token = serde_json::json!({
        "accessor": "auth_token_00000000",
        "config": {"default_lease_ttl": 0, "force_no_cache": false, "max_lease_ttl": 0, "token_type": "default-service"},
        "description": "token based credentials",
        "external_entropy_access": false,
        "local": false,
        "options": null,
        "plugin_version": "",
        "running_plugin_version": format!("v{}+builtin.vha", vha_core::VERSION),
        "running_sha256": "",
        "seal_wrap": false,
        "type": "token",
        "uuid": "00000000-0000-0000-0000-000000000001",
    });
    Ok(LogicalResponse::data(serde_json::json!({ "token/": token })).merged())
}

fn str_map(v: Option<&Value>, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(o)) => Ok(o
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()),
        Some(_) => Err(ApiError::BadRequest(format!(
            "error converting input for field {field:?}: expected a map"
        ))),
    }
}

fn ttl_field(o: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "system" || s.is_empty() => Ok(Some(0)),
        Some(v) => parse_duration_value(v).map(Some),
    }
}

fn bool_field(o: &Map<String, Value>, name: &str) -> bool {
    o.get(name).and_then(Value::as_bool).unwrap_or(false)
}

pub(crate) async fn one(ctx: &Ctx<'_>, path: &str) -> Result<LogicalResponse, ApiError> {
    let view = ctx.node.view();
    match ctx.req.method {
        Method::GET => match ctx.node.mounts().get(&view, path).await? {
            Some(m) => Ok(LogicalResponse::data(m.to_json()).merged()),
            None => Err(ApiError::BadRequest(format!(
                "No secret engine mount at {}/",
                path.trim_end_matches('/')
            ))),
        },
        Method::POST | Method::PUT => {
            let body: Value = ctx.req.json()?;
            let o = body.as_object().cloned().unwrap_or_default();
            let kind = match o.get("type") {
                Some(Value::String(s)) => s.clone(),
                _ => String::new(),
            };
            let config = match o.get("config") {
                Some(Value::Object(c)) => MountConfig {
                    default_lease_ttl: ttl_field(c, "default_lease_ttl")?.unwrap_or(0),
                    max_lease_ttl: ttl_field(c, "max_lease_ttl")?.unwrap_or(0),
                },
                _ => MountConfig::default(),
            };
            let params = EnableParams {
                kind,
                description: o.get("description").and_then(Value::as_str).unwrap_or("").to_string(),
                options: str_map(o.get("options"), "options")?,
                config,
                local: bool_field(&o, "local"),
                seal_wrap: bool_field(&o, "seal_wrap"),
            };
            ctx.node.mounts().enable(&view, path, params).await?;
            Ok(LogicalResponse::no_content())
        }
        Method::DELETE => {
            ctx.node.mounts().disable(&view, path).await?;
            Ok(LogicalResponse::no_content())
        }
        _ => Err(ApiError::UnsupportedOperation),
    }
}

pub(crate) async fn tune(ctx: &Ctx<'_>, path: &str) -> Result<LogicalResponse, ApiError> {
    let view = ctx.node.view();
    match ctx.req.method {
        Method::GET => match ctx.node.mounts().get(&view, path).await? {
            Some(m) => Ok(LogicalResponse::data(m.tune_json()).merged()),
            None => Err(ApiError::BadRequest(format!(
                "cannot fetch sysview for path {:?}",
                format!("{}/", path.trim_end_matches('/'))
            ))),
        },
        Method::POST | Method::PUT => {
            let body: Value = ctx.req.json()?;
            let o = body.as_object().cloned().unwrap_or_default();
            let version = str_map(o.get("options"), "options")?.get("version").cloned();
            ctx.node
                .mounts()
                .tune(
                    &view,
                    path,
                    ttl_field(&o, "default_lease_ttl")?,
                    ttl_field(&o, "max_lease_ttl")?,
                    o.get("description").and_then(Value::as_str).map(str::to_string),
                    version,
                )
                .await?;
            Ok(LogicalResponse::no_content())
        }
        _ => Err(ApiError::UnsupportedOperation),
    }
}

/// The mount serving `path`, if the token has any capability under it.
pub(crate) async fn ui_mount(ctx: &Ctx<'_>, path: &str) -> Result<LogicalResponse, ApiError> {
    if ctx.req.method != Method::GET {
        return Err(ApiError::UnsupportedOperation);
    }
    let view = ctx.node.view();
    let Some((m, _)) = ctx.node.mounts().route(&view, path.trim_start_matches('/')).await? else {
        return Err(ApiError::BadRequest(format!("no mount found for path {path:?}")));
    };
    let prefix = m.path.clone();
    let allowed = ctx.acl.is_root() || ctx.acl.has_any_under(&prefix);
    if !allowed {
        return Err(ApiError::Forbidden(format!(
            "preflight capability check returned 403, please ensure client's policies grant access to path {prefix:?}"
        )));
    }
    let mut d = m.to_json();
    d["path"] = Value::String(prefix);
    Ok(LogicalResponse::data(d))
}

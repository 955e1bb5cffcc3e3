//! `sys/policy` (the old API: `rules`, data copied to the top level), `sys/policies/acl`
//! (the current API: `policy`), and `sys/capabilities{,-self,-accessor}`.

use http::Method;
use serde_json::{json, Value};

use super::ctx::{CapsKind, Ctx};
use crate::error::ApiError;
use crate::policy::store::normalize_name;
use crate::policy::Operation;
use crate::request::LogicalResponse;

pub(crate) async fn list(ctx: &Ctx<'_>, legacy: bool) -> Result<LogicalResponse, ApiError> {
    let names = ctx.node.policies().list(&ctx.node.view()).await?;
    if legacy {
        if ctx.op != Operation::Read && ctx.op != Operation::List {
            return Err(ApiError::UnsupportedOperation);
        }
        return Ok(LogicalResponse::data(json!({ "keys": names, "policies": names })).merged());
    }
    if ctx.op != Operation::List {
        return Err(ApiError::UnsupportedOperation);
    }
    Ok(LogicalResponse::data(json!({ "keys": names })))
}

pub(crate) async fn one(ctx: &Ctx<'_>, name: &str, legacy: bool) -> Result<LogicalResponse, ApiError> {
    let view = ctx.node.view();
    let store = ctx.node.policies();
    let field = if legacy { "rules" } else { "policy" };
    match ctx.req.method {
        Method::GET => {
            let name = normalize_name(name)?;
            if name == "root" {
                let d = json!({
                    "name": "root", field: "", "version": 0, "cas_required": false,
                    "allow_slashes_in_identity_templates": false, "allow_wildcards_in_identity_templates": false,
                });
                let r = LogicalResponse::data(d);
                return Ok(if legacy { r.merged() } else { r });
            }
            let Some(p) = store.get_stored(&view, &name).await? else {
                return Ok(LogicalResponse::error_status(http::StatusCode::NOT_FOUND, Vec::new()));
            };
            let d = json!({
                "name": p.name, field: p.policy, "version": p.version, "modified": p.modified, "cas_required": false,
                "allow_slashes_in_identity_templates": false, "allow_wildcards_in_identity_templates": false,
            });
            let r = LogicalResponse::data(d);
            Ok(if legacy { r.merged() } else { r })
        }
        Method::PUT | Method::POST => {
            let body: Value = ctx.req.json()?;
            let mut warnings = Vec::new();
            let text = match (
                body.get("policy").and_then(Value::as_str),
                body.get("rules").and_then(Value::as_str),
            ) {
                (Some(p), _) if !p.is_empty() => p.to_string(),
                (_, Some(r)) if !r.is_empty() => {
                    warnings.push("'rules' is deprecated, please use 'policy' instead".to_string());
                    r.to_string()
                }
                _ => return Err(ApiError::BadRequest("'policy' parameter not supplied or empty".into())),
            };
            // Vault accepts base64-encoded policy text too.
            let text = decode_maybe_base64(&text);
            store.put(&view, name, &text).await?;
            if warnings.is_empty() {
                Ok(LogicalResponse::no_content())
            } else {
                Ok(LogicalResponse::warnings(warnings))
            }
        }
        Method::DELETE => {
            store.delete(&view, name).await?;
            Ok(LogicalResponse::no_content())
        }
        _ => Err(ApiError::UnsupportedOperation),
    }
}

fn decode_maybe_base64(s: &str) -> String {
    use base64::Engine;
    let t = s.trim();
    if t.contains('"') || t.contains('{') {
        return s.to_string();
    }
    base64::engine::general_purpose::STANDARD
        .decode(t)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| s.to_string())
}

/// `sys/capabilities-self` (`paths` or `path`), `sys/capabilities` (`token`) and
/// `sys/capabilities-accessor` (`accessor`).
pub(crate) async fn capabilities(ctx: &Ctx<'_>, kind: CapsKind) -> Result<LogicalResponse, ApiError> {
    if !matches!(ctx.req.method, Method::PUT | Method::POST) {
        return Err(ApiError::UnsupportedOperation);
    }
    let body: Value = ctx.req.json()?;
    let view = ctx.node.view();
    let mut paths: Vec<String> = match body.get("paths") {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        _ => Vec::new(),
    };
    if let Some(p) = body.get("path").and_then(Value::as_str) {
        paths.push(p.to_string());
    }
    if paths.is_empty() {
        return Err(ApiError::BadRequest("missing paths".into()));
    }
    let policies = match kind {
        CapsKind::SelfToken => ctx.auth.policies.clone(),
        CapsKind::Token => {
            let t = body.get("token").and_then(Value::as_str).unwrap_or("");
            match ctx.node.tokens().lookup(&view, t).await? {
                Some(e) => e.policies,
                None => return Err(ApiError::BadRequest(crate::error::multierror("invalid token"))),
            }
        }
        CapsKind::Accessor => {
            let a = body.get("accessor").and_then(Value::as_str).unwrap_or("");
            match ctx.node.tokens().lookup_accessor(&view, a).await? {
                Some(e) => e.policies,
                None => return Err(ApiError::BadRequest(crate::error::multierror("invalid accessor"))),
            }
        }
    };
    let acl = ctx.node.policies().acl(&view, &policies).await?;
    let mut data = serde_json::Map::new();
    let mut last = Vec::new();
    for p in &paths {
        let p = p.trim_start_matches('/');
        let caps = if acl.is_root() {
            vec!["root".to_string()]
        } else {
            acl.capabilities(p).names()
        };
        data.insert(p.to_string(), json!(caps));
        last = caps;
    }
    if body.get("path").is_some() {
        data.insert("capabilities".into(), json!(last));
    }
    Ok(LogicalResponse::data(Value::Object(data)).merged())
}

//! `sys/audit` (list), `sys/audit/<path>` (enable, disable) and `sys/audit-hash/<path>`.
//! Enabling and disabling need sudo (checked by the pipeline, as Vault's root paths).

use std::collections::BTreeMap;

use http::Method;
use serde_json::{json, Map, Value};

use super::ctx::Ctx;
use crate::error::ApiError;
use crate::request::LogicalResponse;

pub(crate) async fn list(ctx: &Ctx<'_>) -> Result<LogicalResponse, ApiError> {
    if ctx.req.method != Method::GET {
        return Err(ApiError::UnsupportedOperation);
    }
    let mut data = Map::new();
    for d in ctx.node.audit().devices(&ctx.node.view()).await?.iter() {
        data.insert(d.entry.path.clone(), d.entry.to_json());
    }
    Ok(LogicalResponse::data(Value::Object(data)).merged())
}

pub(crate) async fn one(ctx: &Ctx<'_>, path: &str) -> Result<LogicalResponse, ApiError> {
    let view = ctx.node.view();
    match ctx.req.method {
        Method::PUT | Method::POST => {
            let body: Value = ctx.req.json()?;
            let o = body.as_object().cloned().unwrap_or_default();
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("").to_string();
            let options: BTreeMap<String, String> = match o.get("options") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
                        )
                    })
                    .collect(),
                Some(_) => return Err(ApiError::BadRequest("options must be a map".into())),
            };
            let description = o.get("description").and_then(Value::as_str).unwrap_or("").to_string();
            let local = o.get("local").and_then(Value::as_bool).unwrap_or(false);
            ctx.node
                .audit()
                .enable(&view, path, &kind, description, options, local)
                .await?;
            Ok(LogicalResponse::no_content())
        }
        Method::DELETE => {
            ctx.node.audit().disable(&view, path).await?;
            Ok(LogicalResponse::no_content())
        }
        _ => Err(ApiError::UnsupportedOperation),
    }
}

pub(crate) async fn hash(ctx: &Ctx<'_>, path: &str) -> Result<LogicalResponse, ApiError> {
    if !matches!(ctx.req.method, Method::PUT | Method::POST) {
        return Err(ApiError::UnsupportedOperation);
    }
    let body: Value = ctx.req.json()?;
    let input = body.get("input").and_then(Value::as_str).unwrap_or("");
    let Some(dev) = ctx.node.audit().device(&ctx.node.view(), path).await? else {
        return Err(ApiError::BadRequest(format!(
            "unknown audit backend {:?}",
            format!("{}/", path.trim_matches('/'))
        )));
    };
    Ok(LogicalResponse::data(json!({ "hash": dev.hash(input) })).merged())
}

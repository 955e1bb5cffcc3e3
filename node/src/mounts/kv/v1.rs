//! KV version 1: each key holds one JSON object, stored as-is at `<mount data>/<key>`.
//! Read, write (whole-object replace), list, delete. A read's `lease_duration` is the
//! object's `ttl` field when it parses, else the mount's default TTL (Vault).

use super::{body_object, list_response, not_found, unsupported, KvRequest};
use crate::error::ApiError;
use crate::policy::Operation;
use crate::request::LogicalResponse;
use crate::token::DEFAULT_TTL_SECS;
use crate::view::View;

pub async fn exists(view: &View<'_>, rel: &str) -> Result<bool, ApiError> {
    if rel.is_empty() || rel.ends_with('/') {
        return Ok(false);
    }
    Ok(view.get(rel).await?.is_some())
}

pub async fn handle(r: KvRequest<'_>) -> Result<LogicalResponse, ApiError> {
    let key = r.rel;
    match r.op {
        Operation::List => {
            let prefix = if key.is_empty() || key.ends_with('/') {
                key.to_string()
            } else {
                format!("{key}/")
            };
            Ok(list_response(r.view.list(&prefix).await?))
        }
        Operation::Read => {
            if key.is_empty() || key.ends_with('/') {
                return Ok(not_found());
            }
            let Some(v) = r.view.get_json::<serde_json::Value>(key).await? else {
                return Ok(not_found());
            };
            let default = if r.mount.config.default_lease_ttl > 0 {
                r.mount.config.default_lease_ttl
            } else {
                DEFAULT_TTL_SECS
            };
            let lease = v
                .get("ttl")
                .or_else(|| v.get("lease"))
                .and_then(|t| crate::time::parse_duration_value(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(default);
            let mut resp = LogicalResponse::data(v);
            resp.lease_duration = lease;
            Ok(resp)
        }
        Operation::Create | Operation::Update => {
            if key.is_empty() || key.ends_with('/') {
                return Err(ApiError::BadRequest("cannot write to a path ending in '/'".into()));
            }
            let body = body_object(r.req)?;
            if body.is_empty() {
                return Err(ApiError::BadRequest("missing data fields".into()));
            }
            // By value: dropped once serialized, before encryption.
            r.view.put_json(key, body).await?;
            Ok(LogicalResponse::no_content())
        }
        Operation::Delete => {
            if key.is_empty() || key.ends_with('/') {
                return Err(unsupported());
            }
            r.view.delete(key).await?;
            Ok(LogicalResponse::no_content())
        }
        Operation::Patch => Err(unsupported()),
    }
}

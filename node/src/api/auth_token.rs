//! `auth/token/*`: create (and create-orphan), lookup (self, by token, by accessor), renew
//! (self, by token, by accessor), revoke (self, by token, orphan, by accessor) and the
//! accessor list. Field names, defaults and errors follow Vault's token store.

use std::collections::BTreeMap;

use http::Method;
use serde_json::{Map, Value};

use super::ctx::Ctx;
use crate::error::ApiError;
use crate::policy::Operation;
use crate::request::LogicalResponse;
use crate::time::parse_duration_value;
use crate::token::{CreateParams, TokenEntry};

pub(crate) async fn handle(ctx: &Ctx<'_>, sub: &str) -> Result<LogicalResponse, ApiError> {
    let sub = sub.trim_end_matches('/');
    let post = matches!(ctx.req.method, Method::POST | Method::PUT);
    match (sub, post) {
        ("create", true) => create(ctx, false).await,
        ("create-orphan", true) => create(ctx, true).await,
        ("lookup-self", _) if ctx.op == Operation::Read || post => {
            Ok(LogicalResponse::data(ctx.auth.lookup_data(&ctx.token)))
        }
        ("lookup", _) if ctx.op == Operation::Read || post => {
            let body = body(ctx)?;
            let t = body.get("token").and_then(Value::as_str).unwrap_or("").trim();
            if t.is_empty() {
                return Ok(LogicalResponse::data(ctx.auth.lookup_data(&ctx.token)));
            }
            let e = ctx
                .node
                .tokens()
                .lookup(&ctx.node.view(), t)
                .await?
                .ok_or(ApiError::BadToken)?;
            Ok(LogicalResponse::data(e.lookup_data(t)))
        }
        ("lookup-accessor", true) => {
            let e = by_accessor(ctx).await?;
            Ok(LogicalResponse::data(e.lookup_data("")))
        }
        ("renew-self", true) => renew(ctx, ctx.auth.clone(), ctx.token.clone()).await,
        ("renew", true) => {
            let body = body(ctx)?;
            let t = body
                .get("token")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim()
                .to_string();
            if t.is_empty() {
                return Err(ApiError::BadRequest("missing token".into()));
            }
            let e = ctx
                .node
                .tokens()
                .lookup(&ctx.node.view(), &t)
                .await?
                .ok_or(ApiError::BadToken)?;
            renew(ctx, e, t).await
        }
        ("renew-accessor", true) => {
            let e = by_accessor(ctx).await?;
            renew(ctx, e, String::new()).await
        }
        ("revoke-self", true) => {
            ctx.node.tokens().revoke_tree(&ctx.node.view(), &ctx.auth.hash).await?;
            Ok(LogicalResponse::no_content())
        }
        ("revoke", true) => {
            let t = token_param(ctx)?;
            if let Some(e) = ctx.node.tokens().lookup(&ctx.node.view(), &t).await? {
                ctx.node.tokens().revoke_tree(&ctx.node.view(), &e.hash).await?;
            }
            Ok(LogicalResponse::no_content())
        }
        ("revoke-orphan", true) => {
            // Vault: root or sudo on this path.
            if !ctx.acl.allows("auth/token/revoke-orphan", Operation::Update, true) {
                return Err(ApiError::BadRequest(
                    "root or sudo privileges required to revoke and orphan".into(),
                ));
            }
            let t = token_param(ctx)?;
            if let Some(e) = ctx.node.tokens().lookup(&ctx.node.view(), &t).await? {
                ctx.node.tokens().revoke_orphan(&ctx.node.view(), &e.hash).await?;
            }
            Ok(LogicalResponse::no_content())
        }
        ("revoke-accessor", true) => {
            let body = body(ctx)?;
            let a = body.get("accessor").and_then(Value::as_str).unwrap_or("");
            match ctx.node.tokens().lookup_accessor(&ctx.node.view(), a).await? {
                Some(e) => {
                    ctx.node.tokens().revoke_tree(&ctx.node.view(), &e.hash).await?;
                    Ok(LogicalResponse::no_content())
                }
                None => Ok(LogicalResponse::warnings(vec![
                    "No token found with this accessor".into()
                ])),
            }
        }
        ("tidy", true) => {
            let n = ctx.node.tokens().tidy(&ctx.node.view()).await?;
            tracing::info!(revoked = n, "token tidy finished");
            let mut r = LogicalResponse::warnings(vec![
                "Tidy operation successfully started. Any information from the operation will be printed to Vault's server logs.".into(),
            ]);
            r.status = http::StatusCode::ACCEPTED;
            Ok(r)
        }
        ("accessors", _) if ctx.op == Operation::List => {
            let keys = ctx.node.tokens().list_accessors(&ctx.node.view()).await?;
            Ok(LogicalResponse::data(serde_json::json!({ "keys": keys })))
        }
        (
            "create" | "create-orphan" | "lookup-self" | "lookup" | "lookup-accessor" | "renew-self" | "renew"
            | "renew-accessor" | "revoke-self" | "revoke" | "revoke-orphan" | "revoke-accessor" | "accessors" | "tidy",
            _,
        ) => Err(ApiError::UnsupportedOperation),
        _ => Err(ApiError::UnsupportedPath),
    }
}

fn body(ctx: &Ctx<'_>) -> Result<Map<String, Value>, ApiError> {
    let v: Value = ctx.req.json()?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::BadRequest(
            "failed to decode JSON input: expected an object".into(),
        )),
    }
}

fn token_param(ctx: &Ctx<'_>) -> Result<String, ApiError> {
    let body = body(ctx)?;
    let t = body
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string();
    if t.is_empty() {
        return Err(ApiError::BadRequest("missing token ID".into()));
    }
    Ok(t)
}

async fn by_accessor(ctx: &Ctx<'_>) -> Result<TokenEntry, ApiError> {
    let body = body(ctx)?;
    let a = body.get("accessor").and_then(Value::as_str).unwrap_or("");
    if a.is_empty() {
        return Err(ApiError::BadRequest(crate::error::multierror("missing accessor")));
    }
    ctx.node
        .tokens()
        .lookup_accessor(&ctx.node.view(), a)
        .await?
        .ok_or_else(|| ApiError::BadRequest(crate::error::multierror("invalid accessor")))
}

async fn renew(ctx: &Ctx<'_>, e: TokenEntry, token: String) -> Result<LogicalResponse, ApiError> {
    let body = body(ctx)?;
    let inc = match body.get("increment") {
        Some(v) => parse_duration_value(v)?,
        None => 0,
    };
    let (e, warnings) = ctx.node.tokens().renew(&ctx.node.view(), e, inc).await?;
    let mut r = LogicalResponse::warnings(warnings);
    r.auth = Some(e.auth_block(&token));
    Ok(r)
}

fn bool_param(o: &Map<String, Value>, k: &str, default: bool) -> Result<bool, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => vha_core::config::parse_bool(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "error converting input for field {k:?}: cannot parse {s:?} as bool"
            ))
        }),
        Some(_) => Err(ApiError::BadRequest(format!(
            "error converting input for field {k:?}: expected a bool"
        ))),
    }
}

async fn create(ctx: &Ctx<'_>, orphan_path: bool) -> Result<LogicalResponse, ApiError> {
    let o = body(ctx)?;
    let policies = match o.get("policies") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::BadRequest("policies must be strings".into()))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(_) => return Err(ApiError::BadRequest("policies must be a list of strings".into())),
    };
    let num_uses = match o.get("num_uses") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ApiError::BadRequest("num_uses must be an integer".into()))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| ApiError::BadRequest("num_uses must be an integer".into()))?,
        Some(_) => return Err(ApiError::BadRequest("num_uses must be an integer".into())),
    };
    let meta = match o.get("meta") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        ),
        Some(_) => return Err(ApiError::BadRequest("meta must be a map of strings".into())),
    };
    if o.get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty() && t != "service" && t != "default")
    {
        return Err(ApiError::BadRequest("only service tokens are supported by vha".into()));
    }
    if o.get("id").and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::BadRequest("custom token ids are not supported by vha".into()));
    }
    if o.get("period").map(parse_duration_value).transpose()?.unwrap_or(0) > 0 {
        return Err(ApiError::BadRequest("periodic tokens are not supported by vha".into()));
    }
    let no_parent = bool_param(&o, "no_parent", false)?;
    if no_parent && !orphan_path && !ctx.acl.allows("auth/token/create", Operation::Update, true) {
        return Err(ApiError::BadRequest(
            "root or sudo privileges required to create orphan token".into(),
        ));
    }
    let params = CreateParams {
        policies,
        no_default_policy: bool_param(&o, "no_default_policy", false)?,
        ttl: o
            .get("ttl")
            .or_else(|| o.get("lease"))
            .map(parse_duration_value)
            .transpose()?
            .unwrap_or(0),
        explicit_max_ttl: o
            .get("explicit_max_ttl")
            .map(parse_duration_value)
            .transpose()?
            .unwrap_or(0),
        renewable: bool_param(&o, "renewable", true)?,
        num_uses,
        orphan: orphan_path || no_parent,
        display_name: o.get("display_name").and_then(Value::as_str).unwrap_or("").to_string(),
        meta,
    };
    let view = ctx.node.view();
    let (token, entry, mut warnings) = ctx.node.tokens().create(&view, &ctx.auth, params).await?;
    for p in &entry.policies {
        if p != "default" && p != "root" && ctx.node.policies().get(&view, p).await?.is_none() {
            warnings.insert(0, format!("Policy {p:?} does not exist"));
        }
    }
    let mut r = LogicalResponse::warnings(warnings);
    r.auth = Some(entry.auth_block(&token));
    Ok(r)
}

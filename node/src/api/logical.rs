//! The authenticated request pipeline, for everything except the local `sys/` endpoints:
//!
//! ```text
//! classify path -> operation (create/update by existence) -> token -> ACL -> audit request
//!   -> dispatch (sys/policy, sys/mounts, sys/audit, sys/capabilities, auth/token, mounts)
//!   -> revoke a token whose last use this was -> audit response -> Vault's envelope
//! ```
//! The gates are the same for the `sys/` endpoints outside this pipeline ([`authorize`]):
//! `authenticate`, then `admit` (the ACL's decision, audited), then [`Authorized::answer`].
//!
//! Handlers return a [`LogicalResponse`]; this module wraps it into Vault's response envelope
//! (`request_id, lease_id, renewable, lease_duration, data, wrap_info, warnings, auth,
//! mount_type`). Nothing is dispatched unless the request was audited first.

use http::Method;

use super::ctx::{CapsKind, Ctx};
use crate::error::ApiError;
use crate::mounts::kv::{self, KvRequest};
use crate::mounts::MountEntry;
use crate::node::Node;
use crate::policy::Operation;
use crate::request::{ApiRequest, ApiResponse, LogicalResponse};
use crate::token::TokenEntry;

/// Where a request goes.
enum Target {
    SysPolicyList,
    SysPolicy(String),
    SysAclList,
    SysAcl(String),
    SysCapabilities(CapsKind),
    SysMounts,
    SysAuthList,
    SysMount(String),
    SysMountTune(String),
    SysAuditList,
    SysAudit(String),
    SysAuditHash(String),
    SysUiMounts(String),
    SysUnknown,
    AuthToken(String),
    Mount(Box<MountEntry>, String),
    NoRoute,
}

impl Target {
    fn mount_type(&self) -> &'static str {
        match self {
            Target::AuthToken(_) => "token",
            Target::Mount(..) => "kv",
            _ => "system",
        }
    }
}

async fn classify(node: &Node, path: &str) -> Result<Target, ApiError> {
    let p = path.trim_start_matches('/');
    let t = p.trim_end_matches('/');
    if let Some(rest) = t.strip_prefix("sys/") {
        return Ok(match rest {
            "policy" => Target::SysPolicyList,
            "policies/acl" => Target::SysAclList,
            "capabilities-self" => Target::SysCapabilities(CapsKind::SelfToken),
            "capabilities" => Target::SysCapabilities(CapsKind::Token),
            "capabilities-accessor" => Target::SysCapabilities(CapsKind::Accessor),
            "mounts" => Target::SysMounts,
            "auth" => Target::SysAuthList,
            "audit" => Target::SysAuditList,
            _ => {
                if let Some(n) = rest.strip_prefix("policy/") {
                    Target::SysPolicy(n.to_string())
                } else if let Some(n) = rest.strip_prefix("policies/acl/") {
                    Target::SysAcl(n.to_string())
                } else if let Some(m) = rest.strip_prefix("mounts/") {
                    match m.strip_suffix("/tune") {
                        Some(m) => Target::SysMountTune(m.to_string()),
                        None => Target::SysMount(m.to_string()),
                    }
                } else if let Some(a) = rest.strip_prefix("audit-hash/") {
                    Target::SysAuditHash(a.to_string())
                } else if let Some(a) = rest.strip_prefix("audit/") {
                    Target::SysAudit(a.to_string())
                } else if let Some(m) = rest.strip_prefix("internal/ui/mounts/") {
                    Target::SysUiMounts(m.to_string())
                } else {
                    Target::SysUnknown
                }
            }
        });
    }
    if t == "sys" {
        return Ok(Target::SysUnknown);
    }
    if let Some(rest) = p.strip_prefix("auth/token/") {
        return Ok(Target::AuthToken(rest.to_string()));
    }
    match node.mounts().route(&node.view(), p).await? {
        Some((m, rel)) => {
            let rel = rel.to_string();
            Ok(Target::Mount(Box::new(m), rel))
        }
        None => Ok(Target::NoRoute),
    }
}

/// The request's operation from its method (writes refined by existence later).
fn base_operation(req: &ApiRequest) -> Result<Operation, ApiError> {
    if req.is_list() {
        return Ok(Operation::List);
    }
    Ok(match req.method {
        Method::GET | Method::HEAD => Operation::Read,
        Method::POST | Method::PUT => Operation::Update,
        Method::DELETE => Operation::Delete,
        Method::PATCH => Operation::Patch,
        _ => return Err(ApiError::MethodNotAllowed),
    })
}

/// Paths that need `sudo` besides the operation's capability (Vault's root paths).
fn needs_sudo(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    p == "sys/audit"
        || p.starts_with("sys/audit/")
        || p == "sys/seal"
        || p == "sys/step-down"
        || p == "sys/rotate"
        || p.starts_with("sys/raw")
        || p.starts_with("auth/token/accessors")
        || p.starts_with("auth/token/revoke-orphan/")
}

/// Authenticates `req` and checks `op` on `path` (with sudo when `sudo`), for endpoints
/// outside this pipeline (`sys/seal`, `sys/step-down`, `sys/ha-status`, `sys/metrics`,
/// `sys/config/state/sanitized`). The request is audited before the caller acts, so an audit
/// failure stops it; a refusal is audited as the response at once. An allowed caller answers
/// through [`Authorized::answer`], which audits the response as [`serve`] does.
pub async fn authorize(
    node: &Node,
    req: &ApiRequest,
    path: &str,
    op: Operation,
    sudo: bool,
) -> Result<Authorized, ApiError> {
    let view = node.view();
    let info = crate::audit::RequestInfo::new(&crate::request::request_id(), req, path, "system");
    let entry = authenticate(node, &info, req.token(), op).await?;
    let acl = node.policies().acl(&view, &entry.policies).await?;
    let allowed = acl.allows(path, op, sudo);
    admit(node, info, entry, op, allowed).await
}

/// The first gate of every authenticated call: who is calling. A missing or invalid token
/// is Vault's plain "permission denied", audited as request and response at once.
async fn authenticate(
    node: &Node,
    info: &crate::audit::RequestInfo,
    token: Option<&str>,
    op: Operation,
) -> Result<TokenEntry, ApiError> {
    let view = node.view();
    match node.tokens().resolve(&view, token).await {
        Ok(e) => Ok(e),
        Err(e) => {
            node.audit().log_request(info, None, op, &view).await?;
            node.audit().log_response(info, None, op, Some(&e), None, &view).await?;
            Err(e)
        }
    }
}

/// The second gate: the ACL's decision (`allowed`), audited. The request line is written
/// before anything else happens, so a failed audit write stops the call; a refusal is
/// audited as the response at once; an allowed call counts its use (only allowed calls do,
/// as in Vault) and answers through [`Authorized::answer`].
async fn admit(
    node: &Node,
    info: crate::audit::RequestInfo,
    entry: TokenEntry,
    op: Operation,
    allowed: bool,
) -> Result<Authorized, ApiError> {
    let view = node.view();
    node.audit().log_request(&info, Some(&entry), op, &view).await?;
    if !allowed {
        let e = ApiError::AclDenied;
        node.audit()
            .log_response(&info, Some(&entry), op, Some(&e), None, &view)
            .await?;
        return Err(e);
    }
    let entry = node.tokens().consume_use(&view, entry).await?;
    Ok(Authorized { entry, info, op })
}

/// A caller [`authorize`] let through, whose response is still to be audited.
#[must_use = "an authorized call answers through `answer`, which audits the response"]
pub struct Authorized {
    /// The caller's token entry (after counting this use).
    pub entry: TokenEntry,
    info: crate::audit::RequestInfo,
    op: Operation,
}

impl Authorized {
    /// Revokes the token if this call was its last allowed use (Vault's behaviour), audits
    /// the outcome the client is about to get (its JSON body hashed like any response; a
    /// non-JSON body such as Prometheus text is not written) and hands it back. A failed
    /// audit write replaces the answer with the audit's error: no unaudited answer.
    pub async fn answer(self, node: &Node, result: Result<ApiResponse, ApiError>) -> Result<ApiResponse, ApiError> {
        let view = node.view();
        if self.entry.num_uses < 0 {
            node.tokens().revoke_tree(&view, &self.entry.hash).await?;
        }
        let (err, body) = match &result {
            Ok(r) => (None, r.body.as_ref()),
            Err(e) => (Some(e), None),
        };
        node.audit()
            .log_response(&self.info, Some(&self.entry), self.op, err, body, &view)
            .await?;
        result
    }
}

/// The pipeline (see the module docs).
pub async fn serve(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let request_id = crate::request::request_id();
    let path = req.path.trim_start_matches('/').to_string();
    let view = node.view();
    let mut op = base_operation(req)?;
    // Response wrapping is not implemented: refuse rather than hand out an unwrapped secret
    // to a client that asked for a wrapping token.
    if req.headers.get("x-vault-wrap-ttl").is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::BadRequest("response wrapping is not supported by vha".into()));
    }
    let target = classify(node, &path).await?;
    let mount_type = target.mount_type();

    let audit_req = crate::audit::RequestInfo::new(&request_id, req, &path, mount_type);
    let token = req.token().map(str::to_string);
    let auth = authenticate(node, &audit_req, token.as_deref(), op).await?;
    let token = token.unwrap_or_default();

    if let (Target::Mount(m, rel), Operation::Update) = (&target, op) {
        if !kv::exists(&view.sub(&m.data_prefix()), m, rel).await? {
            op = Operation::Create;
        }
    }
    let acl = node.policies().acl(&view, &auth.policies).await?;
    let allowed = match &target {
        // Answers only about mounts the token can use (checked in the handler).
        Target::SysUiMounts(_) => true,
        _ => {
            // Parameter constraints apply to writes, against the JSON body's top level
            // (borrowed from the audit's parse: a large body is not copied again).
            let empty = serde_json::Map::new();
            let params = match op {
                Operation::Create | Operation::Update | Operation::Patch => match audit_req.data.as_ref() {
                    Some(serde_json::Value::Object(m)) => Some(m),
                    _ => Some(&empty),
                },
                _ => None,
            };
            acl.allows_request(&path, op, needs_sudo(&path), params)
        }
    };
    let authorized = admit(node, audit_req, auth, op, allowed).await?;
    let ctx = Ctx {
        node,
        req,
        request_id: request_id.clone(),
        auth: authorized.entry.clone(),
        token,
        acl,
        op,
    };
    let result = dispatch(&ctx, target).await.map(|resp| ApiResponse {
        status: resp.status,
        headers: Default::default(),
        body: resp.body(&request_id, mount_type),
        raw: None,
    });
    authorized.answer(node, result).await
}

async fn dispatch(ctx: &Ctx<'_>, target: Target) -> Result<LogicalResponse, ApiError> {
    use super::{auth_token, sys_audit, sys_mounts, sys_policy};
    match target {
        Target::SysPolicyList => sys_policy::list(ctx, true).await,
        Target::SysAclList => sys_policy::list(ctx, false).await,
        Target::SysPolicy(n) => sys_policy::one(ctx, &n, true).await,
        Target::SysAcl(n) => sys_policy::one(ctx, &n, false).await,
        Target::SysCapabilities(k) => sys_policy::capabilities(ctx, k).await,
        Target::SysMounts => sys_mounts::list(ctx).await,
        Target::SysAuthList => sys_mounts::auth_list(ctx).await,
        Target::SysMount(p) => sys_mounts::one(ctx, &p).await,
        Target::SysMountTune(p) => sys_mounts::tune(ctx, &p).await,
        Target::SysUiMounts(p) => sys_mounts::ui_mount(ctx, &p).await,
        Target::SysAuditList => sys_audit::list(ctx).await,
        Target::SysAudit(p) => sys_audit::one(ctx, &p).await,
        Target::SysAuditHash(p) => sys_audit::hash(ctx, &p).await,
        Target::SysUnknown => Err(ApiError::UnsupportedPath),
        Target::AuthToken(sub) => auth_token::handle(ctx, &sub).await,
        Target::Mount(m, rel) => {
            let view = ctx.node.view().sub(&m.data_prefix());
            let r = KvRequest {
                view,
                mount: &m,
                rel: &rel,
                req: ctx.req,
                op: ctx.op,
            };
            kv::handle(r, ctx.node.kv_locks()).await
        }
        Target::NoRoute => Err(ApiError::NotFound(format!(
            "no handler for route {:?}. route entry not found.",
            ctx.req.path.trim_start_matches('/')
        ))),
    }
}

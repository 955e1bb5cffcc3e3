//! The `sys/` endpoints that work while sealed: `init`, `unseal`, `seal-status`, `seal`,
//! `health`, `leader`. Status codes, parameters and JSON fields follow Vault (checked against
//! OpenBao 2.7.2, `vha bench`'s peer).

use base64::Engine;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::error::ApiError;
use crate::ha::state::Role;
use crate::node::Node;
use crate::request::{ApiRequest, ApiResponse};

/// How long sealing an active node waits for its term to be torn down.
const SEAL_STEP_DOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Handles the path if it is one of the local `sys/` endpoints; `Ok(None)` otherwise.
pub async fn handle_local(node: &Node, req: &ApiRequest) -> Result<Option<ApiResponse>, ApiError> {
    let m = &req.method;
    let resp = match req.path.trim_end_matches('/') {
        "sys/init" => match *m {
            Method::GET => init_status(node).await?,
            Method::PUT | Method::POST => init(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/unseal" => match *m {
            Method::PUT | Method::POST => unseal(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/seal-status" => match *m {
            Method::GET => ApiResponse::ok(seal_status(node).await?),
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/seal" => match *m {
            Method::PUT | Method::POST => seal(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/health" => match *m {
            Method::GET | Method::HEAD => health(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/leader" => match *m {
            Method::GET => leader(node)?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        "sys/metrics" => match *m {
            Method::GET => super::sys_ha::metrics(node, req).await?,
            _ => return Err(ApiError::MethodNotAllowed),
        },
        _ => return Ok(None),
    };
    Ok(Some(resp))
}

async fn init_status(node: &Node) -> Result<ApiResponse, ApiError> {
    Ok(ApiResponse::ok(
        json!({ "initialized": node.barrier().initialized().await? }),
    ))
}

#[derive(Deserialize)]
struct InitRequest {
    #[serde(default)]
    secret_shares: u64,
    #[serde(default)]
    secret_threshold: u64,
    /// PGP encryption of shares is not supported; a non-empty list is refused rather than
    /// silently handing out plaintext keys.
    #[serde(default)]
    pgp_keys: Option<Vec<String>>,
    #[serde(default)]
    root_token_pgp_key: Option<String>,
}

async fn init(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let body: InitRequest = req.json()?;
    if body.pgp_keys.as_ref().is_some_and(|k| !k.is_empty())
        || body.root_token_pgp_key.as_ref().is_some_and(|k| !k.is_empty())
    {
        return Err(ApiError::BadRequest(
            "PGP-encrypted keys are not supported by vha".into(),
        ));
    }
    let (shares, root_token) = node.initialize(body.secret_shares, body.secret_threshold).await?;
    let keys: Vec<String> = shares.iter().map(|s| hex::encode(s.as_slice())).collect();
    let keys_b64: Vec<String> = shares
        .iter()
        .map(|s| base64::engine::general_purpose::STANDARD.encode(s.as_slice()))
        .collect();
    tracing::info!(
        shares = body.secret_shares,
        threshold = body.secret_threshold,
        "vault initialized"
    );
    Ok(ApiResponse::ok(json!({
        "keys": keys,
        "keys_base64": keys_b64,
        "root_token": root_token.as_str(),
    })))
}

#[derive(Deserialize)]
struct UnsealRequest {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    reset: bool,
    #[serde(default)]
    #[allow(dead_code)]
    migrate: bool,
}

/// Decodes an unseal key part: hex first (Vault's `keys`), then base64 (`keys_base64`).
fn decode_key(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    let s = s.trim();
    if let Ok(b) = hex::decode(s) {
        return Some(Zeroizing::new(b));
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .map(Zeroizing::new)
}

async fn unseal(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let body: UnsealRequest = req.json()?;
    if !node.barrier().initialized().await? {
        return Err(ApiError::BadRequest("Vault is not initialized".into()));
    }
    if body.reset {
        node.reset_unseal();
        return Ok(ApiResponse::ok(seal_status(node).await?));
    }
    let key = body.key.map(Zeroizing::new).ok_or_else(|| {
        ApiError::BadRequest("'key' must be specified in request body as JSON, or 'reset' set to true".into())
    })?;
    let part =
        decode_key(&key).ok_or_else(|| ApiError::BadRequest("'key' must be a valid hex or base64 string".into()))?;
    node.submit_unseal_key(part).await?;
    Ok(ApiResponse::ok(seal_status(node).await?))
}

/// `sys/seal-status` body (also the answer to every `sys/unseal`).
pub async fn seal_status(node: &Node) -> Result<serde_json::Value, ApiError> {
    let cfg = node.barrier().seal_config().await?;
    let sealed = node.barrier().is_sealed();
    let p = node.progress();
    let mut v = json!({
        "type": "shamir",
        "initialized": cfg.is_some(),
        "sealed": sealed,
        "t": cfg.as_ref().map(|c| c.secret_threshold).unwrap_or(0),
        "n": cfg.as_ref().map(|c| c.secret_shares).unwrap_or(0),
        "progress": p.progress,
        "nonce": p.nonce,
        "version": vha_core::VERSION,
        "build_date": "",
        "migration": false,
        "recovery_seal": false,
        "storage_type": node.storage_type(),
    });
    if let (false, Some(info)) = (sealed, node.cluster_info()) {
        v["cluster_name"] = json!(info.name);
        v["cluster_id"] = json!(info.id);
    }
    Ok(v)
}

async fn seal(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    if node.barrier().is_sealed() {
        return Err(ApiError::Sealed);
    }
    if node.ha().role() == Role::Standby {
        // Vault's rule: only the active node seals through the API; a standby is restarted.
        return Err(ApiError::Internal(
            "cannot seal when in standby mode; please restart instead".into(),
        ));
    }
    // sys/seal needs update + sudo on the path (Vault).
    let caller = super::logical::authorize(node, req, "sys/seal", crate::policy::Operation::Update, true).await?;
    // The response is audited before the barrier seals (sealing cannot fail from here on,
    // and a sealed node reads no audit table): an audit failure leaves the node unsealed.
    let resp = caller.answer(node, Ok(ApiResponse::no_content())).await?;
    node.seal_after_step_down(SEAL_STEP_DOWN_TIMEOUT).await;
    Ok(resp)
}

/// Parses a `sys/health` status-code override: a valid HTTP status (100-599).
fn code_param(req: &ApiRequest, name: &str, default: u16) -> Result<u16, ApiError> {
    match req.query(name) {
        None | Some("") => Ok(default),
        Some(v) => match v.parse::<u16>() {
            Ok(c) if (100..600).contains(&c) => Ok(c),
            _ => Err(ApiError::BadRequest(String::new())),
        },
    }
}

fn bool_param(req: &ApiRequest, name: &str) -> Result<bool, ApiError> {
    match req.query(name) {
        None | Some("") => Ok(false),
        Some(v) => vha_core::config::parse_bool(v).ok_or_else(|| ApiError::BadRequest(String::new())),
    }
}

/// `sys/health`: 501 uninitialized > 503 sealed > 474 standby without the active (HA) >
/// 429 standby (unless `standbyok`) > 200 active. HEAD answers the same code, no body.
async fn health(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let health_err = |e: ApiError| match e {
        // Vault answers a bad parameter with 400 and an empty error list.
        ApiError::BadRequest(m) if m.is_empty() => {
            ApiResponse::json(StatusCode::BAD_REQUEST, json!({ "errors": Vec::<String>::new() }))
        }
        other => ApiResponse::error(&other),
    };
    let params = (|| {
        Ok::<_, ApiError>((
            bool_param(req, "standbyok")?,
            bool_param(req, "perfstandbyok")?,
            code_param(req, "activecode", 200)?,
            code_param(req, "standbycode", 429)?,
            code_param(req, "sealedcode", 503)?,
            code_param(req, "uninitcode", 501)?,
            code_param(req, "haunhealthycode", 474)?,
            code_param(req, "performancestandbycode", 473)?,
            code_param(req, "drsecondarycode", 472)?,
        ))
    })();
    // Performance-standby and DR codes are validated (a bad one is 400, as Vault) but never
    // chosen: vha has no performance standbys or DR secondaries.
    let (standby_ok, _perf_ok, active, standby_code, sealed_code, uninit, ha_unhealthy_code, _perf, _dr) = match params
    {
        Ok(p) => p,
        Err(e) => return Ok(health_err(e)),
    };
    // An unsealed barrier was initialized: only a sealed node asks the store, so a load
    // balancer's polling costs the store nothing while the node serves.
    let sealed = node.barrier().is_sealed();
    let initialized = !sealed || node.barrier().initialized().await?;
    let status = node.ha().status();
    let standby = !sealed && status.role == Role::Standby;
    let ha_unhealthy = !sealed && status.ha_unhealthy(std::time::Instant::now());
    let code = if !initialized {
        uninit
    } else if sealed {
        sealed_code
    } else if ha_unhealthy {
        ha_unhealthy_code
    } else if standby && !standby_ok {
        standby_code
    } else {
        active
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut body = json!({
        "initialized": initialized,
        "sealed": sealed,
        "standby": sealed || standby,
        "performance_standby": false,
        "replication_performance_mode": if sealed { "unknown" } else { "disabled" },
        "replication_dr_mode": if sealed { "unknown" } else { "disabled" },
        "server_time_utc": now,
        "version": vha_core::VERSION,
    });
    if let (false, Some(info)) = (sealed, node.cluster_info()) {
        body["cluster_name"] = json!(info.name);
        body["cluster_id"] = json!(info.id);
    }
    let status = StatusCode::from_u16(code).map_err(|e| ApiError::Internal(e.to_string()))?;
    if req.method == Method::HEAD {
        return Ok(ApiResponse {
            status,
            headers: Default::default(),
            body: None,
            raw: None,
        });
    }
    Ok(ApiResponse::json(status, body))
}

/// `sys/leader`: sealed -> 503; otherwise who leads: `is_self` on the active, the
/// advertised addresses on a standby (empty while no active is known).
fn leader(node: &Node) -> Result<ApiResponse, ApiError> {
    if node.barrier().is_sealed() {
        return Err(ApiError::Sealed);
    }
    let st = node.ha().status();
    let (addr, cluster_addr) = match &st.leader {
        Some(l) => (l.adv.redirect_addr.clone(), l.adv.cluster_addr.clone()),
        None => (String::new(), String::new()),
    };
    let active_time = st
        .active_since
        .map(|t| humantime::format_rfc3339_nanos(t).to_string())
        .unwrap_or_else(|| "0001-01-01T00:00:00Z".into());
    Ok(ApiResponse::ok(json!({
        "ha_enabled": node.ha().enabled(),
        "is_self": st.role == Role::Active,
        "active_time": active_time,
        "leader_address": addr,
        "leader_cluster_address": cluster_addr,
        "performance_standby": false,
        "performance_standby_last_remote_wal": 0,
    })))
}

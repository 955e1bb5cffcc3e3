//! The KV secrets engine, versions 1 ([`v1`]: one JSON map per key) and 2 ([`v2`]: versioned
//! data, metadata, soft delete, destroy, check-and-set). Both store through a [`View`]
//! scoped to the mount's `logical/<uuid>/` prefix, so every byte is barrier-encrypted and
//! every write carries the node's fence.

pub mod v1;
pub mod v2;

use http::StatusCode;
use serde_json::{Map, Value};

use super::MountEntry;
use crate::error::ApiError;
use crate::policy::Operation;
use crate::request::{ApiRequest, LogicalResponse};
use crate::view::View;

/// One request to a KV mount.
pub struct KvRequest<'a> {
    /// Scoped to the mount's data prefix.
    pub view: View<'a>,
    pub mount: &'a MountEntry,
    /// The path below the mount (`data/app/x` for v2, `app/x` for v1).
    pub rel: &'a str,
    pub req: &'a ApiRequest,
    pub op: Operation,
}

/// Does the target exist? Decides `create` vs `update` for the ACL check of writes.
pub async fn exists(view: &View<'_>, mount: &MountEntry, rel: &str) -> Result<bool, ApiError> {
    match mount.kv_version() {
        2 => v2::exists(view, rel).await,
        _ => v1::exists(view, rel).await,
    }
}

/// Lock stripes for KV writes. Far more than the concurrent writers a node sees (benchmarks
/// run 32-64), so writes to unrelated keys rarely share one; 256 idle mutexes cost ~10 KiB.
const KEY_LOCK_STRIPES: usize = 256;

/// Per-key write locks: writes to one key are serialized (version numbers, check-and-set),
/// writes to different keys run concurrently, so the store can batch their commits.
pub struct KeyLocks {
    stripes: Box<[tokio::sync::Mutex<()>]>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks {
            stripes: (0..KEY_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
}

impl KeyLocks {
    /// Locks `key` of the mount whose data lives under `scope`.
    pub async fn lock(&self, scope: &str, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (scope, key).hash(&mut h);
        let i = usize::try_from(h.finish() % KEY_LOCK_STRIPES as u64).unwrap_or(0);
        self.stripes[i].lock().await
    }
}

/// Serves one request on a KV mount.
pub async fn handle(r: KvRequest<'_>, lock: &KeyLocks) -> Result<LogicalResponse, ApiError> {
    match r.mount.kv_version() {
        2 => v2::handle(r, lock).await,
        _ => v1::handle(r).await,
    }
}

/// The request body as a JSON object (Vault: `failed to decode JSON input`).
pub(crate) fn body_object(req: &ApiRequest) -> Result<Map<String, Value>, ApiError> {
    let v: Value = req.json()?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::BadRequest(format!(
            "failed to decode JSON input: json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
            json_kind(&other)
        ))),
    }
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Vault's 405 for an operation a path does not support.
pub(crate) fn unsupported() -> ApiError {
    ApiError::UnsupportedOperation
}

/// A plain 404 with an empty error list.
pub(crate) fn not_found() -> LogicalResponse {
    LogicalResponse::error_status(StatusCode::NOT_FOUND, Vec::new())
}

/// A LIST result: `{"keys": [...]}`, or a bare 404 when empty (Vault).
pub(crate) fn list_response(keys: Vec<String>) -> LogicalResponse {
    if keys.is_empty() {
        return not_found();
    }
    LogicalResponse::data(serde_json::json!({ "keys": keys }))
}

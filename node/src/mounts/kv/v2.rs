//! KV version 2: versioned secrets (Vault's `kv-v2` API).
//!
//! Layout under the mount's data prefix:
//! - `config`: mount-wide `max_versions`, `cas_required`, `delete_version_after`;
//! - `metadata/<key>`: [`KeyMetadata`] (versions, current version, custom metadata);
//! - `versions/<sha256(key)>/<n>`: the data of version `n`.
//!
//! # Correctness
//! - A write stores the new version's data before the metadata that points at it: a crash in
//!   between leaves an unreferenced blob and the previous version readable.
//! - Destroy and trimming update the metadata first, then delete the data: a destroyed
//!   version is never readable again, whatever happens after.
//! - All writes on one mount are serialized (check-and-set needs read-modify-write).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{body_object, json_kind, list_response, not_found, unsupported, KvRequest};
use crate::error::ApiError;
use crate::policy::Operation;
use crate::request::LogicalResponse;
use crate::time::{format_duration, now_rfc3339, parse_duration_value, parse_rfc3339, rfc3339};
use crate::view::View;

/// Versions kept per key when neither the key nor the mount sets `max_versions` (Vault).
pub const DEFAULT_MAX_VERSIONS: u64 = 10;
/// Vault's limits on `custom_metadata`: 64 keys, 128-byte keys, 512-byte values.
const MAX_CUSTOM_KEYS: usize = 64;
const MAX_CUSTOM_KEY_LEN: usize = 128;
const MAX_CUSTOM_VALUE_LEN: usize = 512;
const CONFIG_KEY: &str = "config";

/// Mount-wide settings (`<mount>/config`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvConfig {
    #[serde(default)]
    pub max_versions: u64,
    #[serde(default)]
    pub cas_required: bool,
    /// Seconds; 0 = never.
    #[serde(default)]
    pub delete_version_after: u64,
}

/// One version's bookkeeping.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionMeta {
    pub created_time: String,
    /// Empty = not deleted; may lie in the future (`delete_version_after`).
    #[serde(default)]
    pub deletion_time: String,
    #[serde(default)]
    pub destroyed: bool,
}

impl VersionMeta {
    /// Soft-deleted as of `now`.
    pub fn is_deleted(&self, now: SystemTime) -> bool {
        !self.deletion_time.is_empty() && parse_rfc3339(&self.deletion_time).is_none_or(|t| t <= now)
    }
}

/// A key's metadata.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyMetadata {
    pub versions: BTreeMap<u64, VersionMeta>,
    pub current_version: u64,
    #[serde(default)]
    pub oldest_version: u64,
    #[serde(default)]
    pub max_versions: u64,
    #[serde(default)]
    pub cas_required: bool,
    #[serde(default)]
    pub delete_version_after: u64,
    #[serde(default)]
    pub custom_metadata: Option<BTreeMap<String, String>>,
    pub created_time: String,
    pub updated_time: String,
    #[serde(default)]
    pub current_metadata_version: u64,
}

impl KeyMetadata {
    fn new(now: &str) -> Self {
        KeyMetadata {
            created_time: now.into(),
            updated_time: now.into(),
            ..Default::default()
        }
    }

    /// The version metadata block of data responses.
    fn version_json(&self, v: u64) -> Value {
        let vm = self.versions.get(&v).cloned().unwrap_or_default();
        json!({
            "created_time": vm.created_time,
            "custom_metadata": self.custom_metadata,
            "deletion_time": vm.deletion_time,
            "destroyed": vm.destroyed,
            "version": v,
        })
    }

    fn to_json(&self) -> Value {
        let versions: Map<String, Value> = self
            .versions
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!({"created_time": v.created_time, "deletion_time": v.deletion_time, "destroyed": v.destroyed}),
                )
            })
            .collect();
        json!({
            "cas_required": self.cas_required,
            "created_time": self.created_time,
            "current_metadata_version": self.current_metadata_version,
            "current_version": self.current_version,
            "custom_metadata": self.custom_metadata,
            "delete_version_after": format_duration(self.delete_version_after),
            "max_versions": self.max_versions,
            "metadata_cas_required": false,
            "oldest_version": self.oldest_version,
            "updated_time": self.updated_time,
            "versions": versions,
        })
    }

    /// Adds version `current + 1` and returns its number and the versions trimmed to honour
    /// the effective `max_versions`.
    pub fn add_version(&mut self, cfg: &KvConfig, now: SystemTime) -> (u64, Vec<u64>) {
        let v = self.current_version + 1;
        let dva = if self.delete_version_after > 0 {
            self.delete_version_after
        } else {
            cfg.delete_version_after
        };
        let deletion_time = if dva > 0 {
            rfc3339(now + Duration::from_secs(dva))
        } else {
            String::new()
        };
        self.versions.insert(
            v,
            VersionMeta {
                created_time: rfc3339(now),
                deletion_time,
                destroyed: false,
            },
        );
        self.current_version = v;
        self.updated_time = rfc3339(now);
        let max = [self.max_versions, cfg.max_versions]
            .into_iter()
            .find(|m| *m > 0)
            .unwrap_or(DEFAULT_MAX_VERSIONS);
        let mut trimmed = Vec::new();
        while self.versions.len() as u64 > max {
            if let Some((&oldest, _)) = self.versions.iter().next() {
                self.versions.remove(&oldest);
                trimmed.push(oldest);
            }
        }
        if !trimmed.is_empty() {
            self.oldest_version = self.versions.keys().next().copied().unwrap_or(0);
        }
        (v, trimmed)
    }
}

fn versions_dir(key: &str) -> String {
    format!("versions/{}/", hex::encode(Sha256::digest(key.as_bytes())))
}

fn version_key(key: &str, v: u64) -> String {
    format!("{}{v}", versions_dir(key))
}

fn meta_key(key: &str) -> String {
    format!("metadata/{key}")
}

async fn load_config(view: &View<'_>) -> Result<KvConfig, ApiError> {
    Ok(view.get_json(CONFIG_KEY).await?.unwrap_or_default())
}

async fn load_meta(view: &View<'_>, key: &str) -> Result<Option<KeyMetadata>, ApiError> {
    view.get_json(&meta_key(key)).await
}

/// Splits `data/app/x` into (`data`, `app/x`).
fn split(rel: &str) -> (&str, &str) {
    match rel.find('/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (rel, ""),
    }
}

pub async fn exists(view: &View<'_>, rel: &str) -> Result<bool, ApiError> {
    let (kind, key) = split(rel);
    match kind {
        "data" | "metadata" if !key.is_empty() && !key.ends_with('/') => Ok(load_meta(view, key).await?.is_some()),
        // Paths without an existence check count as updates (Vault's router).
        _ => Ok(true),
    }
}

pub async fn handle(r: KvRequest<'_>, lock: &super::KeyLocks) -> Result<LogicalResponse, ApiError> {
    let (kind, key) = split(r.rel);
    let write = matches!(
        r.op,
        Operation::Create | Operation::Update | Operation::Patch | Operation::Delete
    );
    // Serialize writers per key (a key's versions and metadata change together; the mount
    // config is its own key, ""); reads need no lock (every write leaves a readable state).
    let _guard = if write {
        Some(lock.lock(&r.mount.data_prefix(), key).await)
    } else {
        None
    };
    let v = &r.view;
    match (kind, r.op) {
        ("config", Operation::Read) if key.is_empty() => {
            let c = load_config(v).await?;
            Ok(LogicalResponse::data(json!({
                "cas_required": c.cas_required,
                "delete_version_after": format_duration(c.delete_version_after),
                "max_versions": c.max_versions,
                "metadata_cas_required": false,
            })))
        }
        ("config", Operation::Create | Operation::Update) if key.is_empty() => write_config(&r).await,
        ("data", Operation::Read) => read_data(&r, key).await,
        ("subkeys", Operation::Read) => subkeys(&r, key).await,
        ("data", Operation::Create | Operation::Update) => write_data(&r, key, None).await,
        ("data", Operation::Patch) => patch_data(&r, key).await,
        ("data", Operation::Delete) => {
            check_key(key)?;
            soft_delete(v, key, None).await
        }
        ("delete", Operation::Create | Operation::Update) => {
            check_key(key)?;
            let versions = versions_param(&r, "No version number provided")?;
            soft_delete(v, key, Some(versions)).await
        }
        ("undelete", Operation::Create | Operation::Update) => {
            check_key(key)?;
            let versions = versions_param(&r, "no version number provided")?;
            undelete(v, key, versions).await
        }
        ("destroy", Operation::Create | Operation::Update) => {
            check_key(key)?;
            let versions = versions_param(&r, "no version number provided")?;
            destroy(v, key, versions).await
        }
        ("metadata", Operation::List) => {
            let prefix = if key.is_empty() || key.ends_with('/') {
                key.to_string()
            } else {
                format!("{key}/")
            };
            Ok(list_response(v.list(&meta_key(&prefix)).await?))
        }
        ("metadata", Operation::Read) => {
            if key.is_empty() {
                let mut resp = not_found();
                resp.error = false;
                resp.warnings
                    .push("Non-listing operations on the root of a K/V v2 mount are not supported.".into());
                return Ok(resp);
            }
            match load_meta(v, key).await? {
                Some(m) => Ok(LogicalResponse::data(m.to_json())),
                None => Ok(not_found()),
            }
        }
        ("metadata", Operation::Create | Operation::Update) => write_metadata(&r, key).await,
        ("metadata", Operation::Delete) => {
            check_key(key)?;
            delete_metadata(v, key).await
        }
        ("config" | "data" | "delete" | "undelete" | "destroy" | "metadata" | "subkeys", _) => Err(unsupported()),
        _ => {
            let mut resp = not_found();
            resp.data = None;
            resp.error = false;
            resp.warnings.push(
                "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the Vault CLI, use 'vault kv get' for this operation."
                    .into(),
            );
            Ok(resp)
        }
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.ends_with('/') {
        return Err(ApiError::BadRequest("cannot write to a path ending in '/'".into()));
    }
    Ok(())
}

fn versions_param(r: &KvRequest<'_>, missing: &str) -> Result<Vec<u64>, ApiError> {
    let body = body_object(r.req)?;
    let list = match body.get("versions") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::Number(n) => n.as_u64().ok_or(()),
                Value::String(s) => s.trim().parse::<u64>().map_err(|_| ()),
                _ => Err(()),
            })
            .collect::<Result<Vec<u64>, ()>>()
            .map_err(|_| ApiError::BadRequest("error converting input for field \"versions\"".into()))?,
        Some(Value::String(s)) => s
            .split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| x.trim().parse::<u64>())
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|_| ApiError::BadRequest("error converting input for field \"versions\"".into()))?,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "error converting input for field \"versions\": got unconvertible type '{}'",
                json_kind(other)
            )))
        }
    };
    if list.is_empty() {
        return Err(ApiError::BadRequest(missing.into()));
    }
    Ok(list)
}

/// An integer query parameter (absent or empty = 0), with Vault's validation message.
fn int_query(r: &KvRequest<'_>, name: &str) -> Result<u64, ApiError> {
    match r.req.query(name) {
        None | Some("") => Ok(0),
        Some(s) => s.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "Field validation failed: error converting input for field {name:?}: '' cannot parse value as 'int': strconv.ParseInt: invalid syntax"
            ))
        }),
    }
}

async fn read_data(r: &KvRequest<'_>, key: &str) -> Result<LogicalResponse, ApiError> {
    if key.is_empty() {
        return Ok(not_found());
    }
    let requested = int_query(r, "version")?;
    read_version(&r.view, key, requested).await
}

/// `subkeys/<key>`: the version's key structure with every leaf value replaced by `null`,
/// down to `depth` levels (0 = all).
async fn subkeys(r: &KvRequest<'_>, key: &str) -> Result<LogicalResponse, ApiError> {
    let (version, depth) = (int_query(r, "version")?, int_query(r, "depth")?);
    if key.is_empty() {
        return Ok(not_found());
    }
    let mut resp = read_version(&r.view, key, version).await?;
    if let Some(d) = resp.data.as_mut() {
        let keys = d.get("data").filter(|v| !v.is_null()).map(|v| subkeys_of(v, depth, 1));
        if let Some(o) = d.as_object_mut() {
            o.remove("data");
            o.insert("subkeys".into(), keys.unwrap_or(Value::Null));
        }
    }
    Ok(resp)
}

fn subkeys_of(v: &Value, depth: u64, level: u64) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| {
                    let sub = if x.is_object() && (depth == 0 || level < depth) {
                        subkeys_of(x, depth, level + 1)
                    } else {
                        Value::Null
                    };
                    (k.clone(), sub)
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// Reads version `requested` of `key` (0 = current): 404 without body when unknown, 404 with
/// the version's metadata when deleted or destroyed.
pub async fn read_version(view: &View<'_>, key: &str, requested: u64) -> Result<LogicalResponse, ApiError> {
    let Some(meta) = load_meta(view, key).await? else {
        return Ok(not_found());
    };
    let v = if requested == 0 {
        meta.current_version
    } else {
        requested
    };
    let Some(vm) = meta.versions.get(&v) else {
        return Ok(not_found());
    };
    let gone = |meta: &KeyMetadata| {
        let mut resp = LogicalResponse::data(json!({ "data": null, "metadata": meta.version_json(v) }));
        resp.status = StatusCode::NOT_FOUND;
        resp
    };
    if vm.destroyed || vm.is_deleted(SystemTime::now()) {
        return Ok(gone(&meta));
    }
    let Some(stored) = view.get_json::<Value>(&version_key(key, v)).await? else {
        return Ok(gone(&meta));
    };
    let data = stored.get("data").cloned().unwrap_or(Value::Null);
    Ok(LogicalResponse::data(
        json!({ "data": data, "metadata": meta.version_json(v) }),
    ))
}

/// The `options.cas` of a write body (`None` when absent).
fn cas_option(body: &Map<String, Value>) -> Result<Option<u64>, ApiError> {
    let Some(opts) = body.get("options") else {
        return Ok(None);
    };
    let opts = match opts {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        other => {
            return Err(ApiError::BadRequest(format!(
                "error converting input for field \"options\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                json_kind(other)
            )))
        }
    };
    match opts.get("cas") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest("invalid cas value".into())),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest("invalid cas value".into())),
        Some(_) => Err(ApiError::BadRequest("invalid cas value".into())),
    }
}

/// Validates and writes a new version (`patched` = data computed by a PATCH).
async fn write_data(
    r: &KvRequest<'_>,
    key: &str,
    patched: Option<(Map<String, Value>, Option<u64>)>,
) -> Result<LogicalResponse, ApiError> {
    check_key(key)?;
    let (data, cas) = match patched {
        Some(p) => p,
        None => {
            // Vault answers any non-object body here with "no data provided".
            let body = match r.req.json::<Value>()? {
                Value::Object(m) => m,
                Value::Array(_) => body_object(r.req)?,
                _ => return Err(ApiError::BadRequest("no data provided".into())),
            };
            let data = match body.get("data") {
                None | Some(Value::Null) => return Err(ApiError::BadRequest("no data provided".into())),
                Some(Value::Object(m)) => m.clone(),
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "error converting input for field \"data\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                        json_kind(other)
                    )))
                }
            };
            (data, cas_option(&body)?)
        }
    };
    store_version(&r.view, key, data, cas).await
}

/// Stores `data` as the next version of `key` after the check-and-set rules; the previous
/// version stays current unless the metadata write succeeds (see the module's Correctness).
pub async fn store_version(
    view: &View<'_>,
    key: &str,
    data: Map<String, Value>,
    cas: Option<u64>,
) -> Result<LogicalResponse, ApiError> {
    let cfg = load_config(view).await?;
    let now = SystemTime::now();
    let mut meta = load_meta(view, key)
        .await?
        .unwrap_or_else(|| KeyMetadata::new(&rfc3339(now)));
    if (cfg.cas_required || meta.cas_required) && cas.is_none() {
        return Err(ApiError::BadRequest(
            "check-and-set parameter required for this call".into(),
        ));
    }
    if let Some(c) = cas {
        if c != meta.current_version {
            return Err(ApiError::BadRequest(
                "check-and-set parameter did not match the current version".into(),
            ));
        }
    }
    let (version, trimmed) = meta.add_version(&cfg, now);
    // Data first, then the metadata that makes it current (one store round trip where the
    // store takes batches; a failure leaves at most the data, never metadata without it),
    // then garbage.
    let enc = |v: Result<Vec<u8>, serde_json::Error>| v.map_err(|e| ApiError::Internal(e.to_string()));
    let version_bytes = enc(serde_json::to_vec(&json!({ "data": data })))?;
    let meta_bytes = enc(serde_json::to_vec(&meta))?;
    view.put_batch(&[
        (&version_key(key, version), &version_bytes),
        (&meta_key(key), &meta_bytes),
    ])
    .await?;
    for t in trimmed {
        view.delete(&version_key(key, t)).await?;
    }
    Ok(LogicalResponse::data(meta.version_json(version)))
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

async fn patch_data(r: &KvRequest<'_>, key: &str) -> Result<LogicalResponse, ApiError> {
    let ct = r
        .req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/merge-patch+json")
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "PATCH requires Content-Type of application/merge-patch+json, provided {ct}"
        )));
    }
    check_key(key)?;
    let body = body_object(r.req)?;
    let patch = match body.get("data") {
        None | Some(Value::Null) => return Err(ApiError::BadRequest("no data provided".into())),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "error converting input for field \"data\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                json_kind(other)
            )))
        }
    };
    let cas = cas_option(&body)?;
    let Some(meta) = load_meta(&r.view, key).await? else {
        return Ok(LogicalResponse::empty_status(StatusCode::NOT_FOUND));
    };
    let v = meta.current_version;
    let live = meta
        .versions
        .get(&v)
        .is_some_and(|vm| !vm.destroyed && !vm.is_deleted(SystemTime::now()));
    let stored = if live {
        r.view.get_json::<Value>(&version_key(key, v)).await?
    } else {
        None
    };
    let Some(stored) = stored else {
        return Ok(LogicalResponse::empty_status(StatusCode::NOT_FOUND));
    };
    let mut data = stored.get("data").cloned().unwrap_or_else(|| Value::Object(Map::new()));
    merge_patch(&mut data, &patch);
    let data = match data {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    write_data(r, key, Some((data, cas))).await
}

async fn soft_delete(view: &View<'_>, key: &str, versions: Option<Vec<u64>>) -> Result<LogicalResponse, ApiError> {
    let Some(mut meta) = load_meta(view, key).await? else {
        return Ok(LogicalResponse::no_content());
    };
    let now = SystemTime::now();
    let targets = versions.unwrap_or_else(|| vec![meta.current_version]);
    let mut changed = false;
    for v in targets {
        if let Some(vm) = meta.versions.get_mut(&v) {
            if !vm.destroyed && !vm.is_deleted(now) {
                vm.deletion_time = rfc3339(now);
                changed = true;
            }
        }
    }
    if changed {
        view.put_json(&meta_key(key), &meta).await?;
    }
    Ok(LogicalResponse::no_content())
}

async fn undelete(view: &View<'_>, key: &str, versions: Vec<u64>) -> Result<LogicalResponse, ApiError> {
    let Some(mut meta) = load_meta(view, key).await? else {
        return Ok(LogicalResponse::no_content());
    };
    let mut changed = false;
    for v in versions {
        if let Some(vm) = meta.versions.get_mut(&v) {
            if !vm.destroyed && !vm.deletion_time.is_empty() {
                vm.deletion_time.clear();
                changed = true;
            }
        }
    }
    if changed {
        view.put_json(&meta_key(key), &meta).await?;
    }
    Ok(LogicalResponse::no_content())
}

async fn destroy(view: &View<'_>, key: &str, versions: Vec<u64>) -> Result<LogicalResponse, ApiError> {
    let Some(mut meta) = load_meta(view, key).await? else {
        return Ok(LogicalResponse::no_content());
    };
    let mut gone = Vec::new();
    for v in versions {
        if let Some(vm) = meta.versions.get_mut(&v) {
            if !vm.destroyed {
                vm.destroyed = true;
                gone.push(v);
            }
        }
    }
    if !gone.is_empty() {
        // Metadata first: once it says destroyed, the version is never served again.
        view.put_json(&meta_key(key), &meta).await?;
        for v in gone {
            view.delete(&version_key(key, v)).await?;
        }
    }
    Ok(LogicalResponse::no_content())
}

async fn delete_metadata(view: &View<'_>, key: &str) -> Result<LogicalResponse, ApiError> {
    let Some(meta) = load_meta(view, key).await? else {
        return Ok(LogicalResponse::no_content());
    };
    // The key disappears with its metadata; the version blobs are then unreachable garbage.
    view.delete(&meta_key(key)).await?;
    for v in meta.versions.keys() {
        view.delete(&version_key(key, *v)).await?;
    }
    Ok(LogicalResponse::no_content())
}

fn u64_field(body: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "error converting input for field {name:?}: cannot parse value as 'int'"
            ))
        }),
        Some(Value::String(s)) => s.trim().parse::<u64>().map(Some).map_err(|_| {
            ApiError::BadRequest(format!(
                "error converting input for field {name:?}: '' cannot parse value as 'int': strconv.ParseInt: invalid syntax"
            ))
        }),
        Some(other) => Err(ApiError::BadRequest(format!(
            "error converting input for field {name:?}: got unconvertible type '{}'",
            json_kind(other)
        ))),
    }
}

fn bool_field(body: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => vha_core::config::parse_bool(s).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "error converting input for field {name:?}: cannot parse {s:?} as 'bool'"
            ))
        }),
        Some(other) => Err(ApiError::BadRequest(format!(
            "error converting input for field {name:?}: got unconvertible type '{}'",
            json_kind(other)
        ))),
    }
}

async fn write_config(r: &KvRequest<'_>) -> Result<LogicalResponse, ApiError> {
    let body = body_object(r.req)?;
    let mut cfg = load_config(&r.view).await?;
    if let Some(m) = u64_field(&body, "max_versions")? {
        cfg.max_versions = m;
    }
    if let Some(c) = bool_field(&body, "cas_required")? {
        cfg.cas_required = c;
    }
    if let Some(d) = body.get("delete_version_after") {
        cfg.delete_version_after = parse_duration_value(d)?;
    }
    r.view.put_json(CONFIG_KEY, &cfg).await?;
    Ok(LogicalResponse::no_content())
}

fn custom_metadata_field(body: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    let Some(v) = body.get("custom_metadata") else {
        return Ok(None);
    };
    let obj = match v {
        Value::Null => return Ok(Some(BTreeMap::new())),
        Value::Object(o) => o,
        other => {
            return Err(ApiError::BadRequest(format!(
                "error converting input for field \"custom_metadata\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                json_kind(other)
            )))
        }
    };
    if obj.len() > MAX_CUSTOM_KEYS {
        return Err(ApiError::BadRequest(format!(
            "custom_metadata has more than {MAX_CUSTOM_KEYS} keys"
        )));
    }
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let s = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if k.is_empty() || k.len() > MAX_CUSTOM_KEY_LEN || s.len() > MAX_CUSTOM_VALUE_LEN {
            return Err(ApiError::BadRequest(format!(
                "custom_metadata key {k:?}: keys must be 1-{MAX_CUSTOM_KEY_LEN} bytes and values at most {MAX_CUSTOM_VALUE_LEN} bytes"
            )));
        }
        out.insert(k.clone(), s);
    }
    Ok(Some(out))
}

async fn write_metadata(r: &KvRequest<'_>, key: &str) -> Result<LogicalResponse, ApiError> {
    check_key(key)?;
    let body = body_object(r.req)?;
    // Validate every field before touching storage.
    let max_versions = u64_field(&body, "max_versions")?;
    let cas_required = bool_field(&body, "cas_required")?;
    let dva = body.get("delete_version_after").map(parse_duration_value).transpose()?;
    let custom = custom_metadata_field(&body)?;
    let now = now_rfc3339();
    let mut meta = load_meta(&r.view, key).await?.unwrap_or_else(|| KeyMetadata::new(&now));
    if let Some(m) = max_versions {
        meta.max_versions = m;
    }
    if let Some(c) = cas_required {
        meta.cas_required = c;
    }
    if let Some(d) = dva {
        meta.delete_version_after = d;
    }
    if let Some(c) = custom {
        meta.custom_metadata = if c.is_empty() { None } else { Some(c) };
    }
    meta.updated_time = now;
    meta.current_metadata_version += 1;
    r.view.put_json(&meta_key(key), &meta).await?;
    Ok(LogicalResponse::no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use vha_core::barrier::{shamir, Barrier};
    use vha_core::storage::inmem::InmemBackend;
    use vha_core::storage::{Backend, Entry, Fence, StorageError};

    /// An inmem backend whose writes (puts or deletes) fail for keys containing a marker.
    struct Faulty {
        inner: InmemBackend,
        fail_put: Mutex<Option<&'static str>>,
        fail_delete: Mutex<Option<&'static str>>,
    }

    #[async_trait]
    impl Backend for Faulty {
        fn kind(&self) -> &'static str {
            "faulty"
        }
        async fn get(&self, key: &str) -> Result<Option<Entry>, StorageError> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<(), StorageError> {
            if self.fail_put.lock().unwrap().is_some_and(|m| key.contains(m)) {
                return Err(StorageError::Unavailable("injected".into()));
            }
            self.inner.put(key, value, fence).await
        }
        async fn create(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<bool, StorageError> {
            if self.fail_put.lock().unwrap().is_some_and(|m| key.contains(m)) {
                return Err(StorageError::Unavailable("injected".into()));
            }
            self.inner.create(key, value, fence).await
        }
        async fn delete(&self, key: &str, fence: Option<&Fence>) -> Result<(), StorageError> {
            if self.fail_delete.lock().unwrap().is_some_and(|m| key.contains(m)) {
                return Err(StorageError::Unavailable("injected".into()));
            }
            self.inner.delete(key, fence).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
            self.inner.list(prefix).await
        }
    }

    async fn faulty_barrier() -> (Arc<Faulty>, Barrier) {
        let f = Arc::new(Faulty {
            inner: InmemBackend::new(),
            fail_put: Mutex::new(None),
            fail_delete: Mutex::new(None),
        });
        let b = Barrier::new(f.clone());
        let (out, cfg) = b
            .initialize(1, 1, vha_core::barrier::InitClaim::Exclusive)
            .await
            .unwrap();
        b.commit_init(&cfg, vha_core::barrier::InitClaim::Exclusive)
            .await
            .unwrap();
        b.unseal(&shamir::combine(&out.key_shares, 1).unwrap()).await.unwrap();
        (f, b)
    }

    fn data(v: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("v".into(), json!(v));
        m
    }

    /// A write that fails after storing the new version's data but before its metadata
    /// (a crash in between) leaves the previous version current and readable; the next
    /// write takes the same version number.
    #[tokio::test]
    async fn failed_write_leaves_previous_version() {
        let (f, b) = faulty_barrier().await;
        let view = View::new(&b, None).sub("logical/m/");
        store_version(&view, "k", data("one"), None).await.unwrap();
        *f.fail_put.lock().unwrap() = Some("metadata/");
        assert!(store_version(&view, "k", data("two"), None).await.is_err());
        *f.fail_put.lock().unwrap() = None;
        let r = read_version(&view, "k", 0).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let d = r.data.unwrap();
        assert_eq!(
            (d["data"]["v"].clone(), d["metadata"]["version"].clone()),
            (json!("one"), json!(1))
        );
        let r = store_version(&view, "k", data("two"), Some(1)).await.unwrap();
        assert_eq!(r.data.unwrap()["version"], 2);
        assert_eq!(
            read_version(&view, "k", 0).await.unwrap().data.unwrap()["data"]["v"],
            "two"
        );
    }

    /// A destroy whose data deletion fails still never serves the version again: the
    /// metadata saying "destroyed" is written first.
    #[tokio::test]
    async fn destroy_is_final_even_if_cleanup_fails() {
        let (f, b) = faulty_barrier().await;
        let view = View::new(&b, None).sub("logical/m/");
        store_version(&view, "k", data("one"), None).await.unwrap();
        store_version(&view, "k", data("two"), None).await.unwrap();
        *f.fail_delete.lock().unwrap() = Some("versions/");
        assert!(destroy(&view, "k", vec![1]).await.is_err());
        let r = read_version(&view, "k", 1).await.unwrap();
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.data.unwrap()["metadata"]["destroyed"], true);
        assert_eq!(read_version(&view, "k", 2).await.unwrap().status, StatusCode::OK);
    }

    /// Versions count up from 1, and the oldest are trimmed beyond the effective maximum
    /// (key setting, else mount setting, else 10).
    #[test]
    fn add_version_trims_to_max() {
        let now = SystemTime::now();
        let mut m = KeyMetadata::new("t");
        let cfg = KvConfig::default();
        for i in 1..=12 {
            let (v, _) = m.add_version(&cfg, now);
            assert_eq!(v, i);
        }
        assert_eq!(m.versions.len() as u64, DEFAULT_MAX_VERSIONS);
        assert_eq!(m.versions.keys().next(), Some(&3));
        m.max_versions = 2;
        let (v, trimmed) = m.add_version(&cfg, now);
        assert_eq!(v, 13);
        assert_eq!(trimmed.len(), 9);
        assert_eq!(m.versions.keys().copied().collect::<Vec<_>>(), vec![12, 13]);
        assert_eq!(m.oldest_version, 12);
    }

    /// `delete_version_after` schedules a deletion in the future: the version is live now and
    /// deleted once that time passes.
    #[test]
    fn delete_version_after_schedules_deletion() {
        let now = SystemTime::now();
        let mut m = KeyMetadata::new("t");
        m.delete_version_after = 60;
        let (v, _) = m.add_version(&KvConfig::default(), now);
        let vm = &m.versions[&v];
        assert!(!vm.is_deleted(now));
        assert!(vm.is_deleted(now + Duration::from_secs(61)));
    }

    /// JSON merge patch: null removes, objects merge recursively, scalars replace.
    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 4});
        merge_patch(&mut t, &json!({"a": null, "b": {"c": 9}, "f": "x"}));
        assert_eq!(t, json!({"b": {"c": 9, "d": 3}, "e": 4, "f": "x"}));
    }
}

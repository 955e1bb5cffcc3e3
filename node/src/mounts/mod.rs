//! The mount table: which secrets engine serves which path prefix. Kept through the barrier
//! at `core/mounts` (Vault's key), cached in memory until seal. Each mount's data lives under
//! `logical/<uuid>/` (Vault's layout), reached through a [`View`] scoped to that prefix.
//!
//! Only `kv` (versions 1 and 2, [`kv`]) is mountable. `sys/`, `auth/`, `cubbyhole/` and
//! `identity/` are reserved. Disabling a mount removes it from the table first and then its
//! data, so a crash in between leaves only unreachable ciphertext.

pub mod kv;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::token::{DEFAULT_TTL_SECS, MAX_TTL_SECS};
use crate::view::View;

/// Where the mount table lives (through the barrier).
const MOUNT_TABLE_PATH: &str = "core/mounts";
/// Prefixes no engine may take (Vault's protected mounts).
const RESERVED: &[&str] = &["sys/", "auth/", "cubbyhole/", "identity/"];
/// Longest mount path; keeps storage keys and the table bounded.
const MAX_MOUNT_PATH_LEN: usize = 256;

/// A mount's tunables (0 = the system default).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountConfig {
    #[serde(default)]
    pub default_lease_ttl: u64,
    #[serde(default)]
    pub max_lease_ttl: u64,
}

/// One mount.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountEntry {
    /// With trailing slash: `secret/`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub description: String,
    pub accessor: String,
    pub uuid: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub config: MountConfig,
    #[serde(default)]
    pub local: bool,
    #[serde(default)]
    pub seal_wrap: bool,
}

impl MountEntry {
    /// The KV version (1 unless `options.version` says 2).
    pub fn kv_version(&self) -> u8 {
        match self.options.get("version").map(String::as_str) {
            Some("2") => 2,
            _ => 1,
        }
    }

    /// The storage prefix of this mount's data.
    pub fn data_prefix(&self) -> String {
        format!("logical/{}/", self.uuid)
    }

    /// The JSON of `sys/mounts` entries (Vault's field set).
    pub fn to_json(&self) -> Value {
        json!({
            "accessor": self.accessor,
            "config": {
                "default_lease_ttl": self.config.default_lease_ttl,
                "force_no_cache": false,
                "max_lease_ttl": self.config.max_lease_ttl,
            },
            "deprecation_status": "supported",
            "description": self.description,
            "external_entropy_access": false,
            "local": self.local,
            "options": self.options,
            "plugin_version": "",
            "running_plugin_version": format!("v{}+builtin.vha", vha_core::VERSION),
            "running_sha256": "",
            "seal_wrap": self.seal_wrap,
            "type": self.kind,
            "uuid": self.uuid,
        })
    }

    /// The `sys/mounts/<path>/tune` answer: effective TTLs (system defaults filled in).
    pub fn tune_json(&self) -> Value {
        let d = if self.config.default_lease_ttl == 0 {
            DEFAULT_TTL_SECS
        } else {
            self.config.default_lease_ttl
        };
        let m = if self.config.max_lease_ttl == 0 {
            MAX_TTL_SECS
        } else {
            self.config.max_lease_ttl
        };
        json!({
            "default_lease_ttl": d,
            "description": self.description,
            "force_no_cache": false,
            "max_lease_ttl": m,
            "options": self.options,
        })
    }
}

/// The JSON of the built-in `sys/` mount in listings.
pub fn sys_mount_json() -> Value {
    json!({
        "accessor": "system_00000000",
        "config": {"default_lease_ttl": 0, "force_no_cache": false, "max_lease_ttl": 0, "passthrough_request_headers": ["Accept"]},
        "description": "system endpoints used for control, policy and debugging",
        "external_entropy_access": false,
        "local": false,
        "options": null,
        "plugin_version": "",
        "running_plugin_version": format!("v{}+builtin.vha", vha_core::VERSION),
        "running_sha256": "",
        "seal_wrap": true,
        "type": "system",
        "uuid": "00000000-0000-0000-0000-000000000000",
    })
}

#[derive(Default, Serialize, Deserialize)]
struct MountTableFile {
    entries: Vec<MountEntry>,
}

/// What `sys/mounts/<path>` (enable) takes, validated.
#[derive(Clone, Debug, Default)]
pub struct EnableParams {
    pub kind: String,
    pub description: String,
    pub options: BTreeMap<String, String>,
    pub config: MountConfig,
    pub local: bool,
    pub seal_wrap: bool,
}

/// The mount table.
#[derive(Default)]
pub struct MountTable {
    cache: RwLock<Option<Arc<Vec<MountEntry>>>>,
    /// Serializes table changes (read-modify-write of one key).
    write: tokio::sync::Mutex<()>,
}

/// Normalizes a mount path: no leading slash, exactly one trailing slash.
pub fn normalize_path(p: &str) -> Result<String, ApiError> {
    let t = p.trim_matches('/');
    if t.is_empty() {
        return Err(ApiError::BadRequest("mount path cannot be empty".into()));
    }
    if t.len() > MAX_MOUNT_PATH_LEN
        || t.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        || t.chars().any(|c| c.is_control())
    {
        return Err(ApiError::BadRequest(format!("invalid mount path {t:?}")));
    }
    Ok(format!("{t}/"))
}

impl MountTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear_cache(&self) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// All mounts, sorted by path.
    pub async fn entries(&self, view: &View<'_>) -> Result<Arc<Vec<MountEntry>>, ApiError> {
        if let Some(t) = self.cache.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(t);
        }
        let file: MountTableFile = view.get_json(MOUNT_TABLE_PATH).await?.unwrap_or_default();
        let mut entries = file.entries;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let t = Arc::new(entries);
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Some(t.clone());
        Ok(t)
    }

    async fn save(&self, view: &View<'_>, entries: Vec<MountEntry>) -> Result<(), ApiError> {
        let file = MountTableFile { entries };
        view.put_json(MOUNT_TABLE_PATH, &file).await?;
        let mut entries = file.entries;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(entries));
        Ok(())
    }

    /// The mount serving `path` (longest prefix) and the path relative to it.
    pub async fn route<'p>(&self, view: &View<'_>, path: &'p str) -> Result<Option<(MountEntry, &'p str)>, ApiError> {
        let entries = self.entries(view).await?;
        let best = entries
            .iter()
            .filter(|m| path.starts_with(m.path.as_str()) || path == m.path.trim_end_matches('/'))
            .max_by_key(|m| m.path.len());
        Ok(best.map(|m| {
            let rel = path.get(m.path.len()..).unwrap_or("");
            (m.clone(), rel)
        }))
    }

    pub async fn get(&self, view: &View<'_>, path: &str) -> Result<Option<MountEntry>, ApiError> {
        let p = normalize_path(path)?;
        Ok(self.entries(view).await?.iter().find(|m| m.path == p).cloned())
    }

    /// Enables a mount. Everything is validated before the table is written.
    pub async fn enable(&self, view: &View<'_>, path: &str, p: EnableParams) -> Result<MountEntry, ApiError> {
        let path = normalize_path(path)?;
        let mut options = p.options;
        match p.kind.as_str() {
            "" => {
                return Err(ApiError::BadRequest(
                    "backend type must be specified as a string".into(),
                ))
            }
            "kv" => {}
            "kv-v2" => {
                options.insert("version".into(), "2".into());
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "plugin not found in the catalog: {other}"
                )))
            }
        }
        match options.get("version").map(String::as_str) {
            None | Some("") | Some("1") | Some("2") => {}
            Some(v) => {
                return Err(ApiError::BadRequest(format!(
                    "invalid kv version {v:?}: must be 1 or 2"
                )))
            }
        }
        validate_ttls(&p.config)?;
        for r in RESERVED {
            if path.starts_with(r) || r.starts_with(path.as_str()) {
                return Err(ApiError::BadRequest(format!("cannot mount {r:?}")));
            }
        }
        let _g = self.write.lock().await;
        let mut entries: Vec<MountEntry> = self.entries(view).await?.as_ref().clone();
        if let Some(e) = entries
            .iter()
            .find(|e| path.starts_with(e.path.as_str()) || e.path.starts_with(path.as_str()))
        {
            return Err(ApiError::BadRequest(format!("path is already in use at {}", e.path)));
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        let entry = MountEntry {
            path,
            kind: "kv".into(),
            description: p.description,
            accessor: format!("kv_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            uuid,
            options,
            config: p.config,
            local: p.local,
            seal_wrap: p.seal_wrap,
        };
        entries.push(entry.clone());
        self.save(view, entries).await?;
        Ok(entry)
    }

    /// Disables a mount and deletes its data. Unknown paths are fine (Vault answers 204).
    pub async fn disable(&self, view: &View<'_>, path: &str) -> Result<(), ApiError> {
        let path = normalize_path(path)?;
        if RESERVED.iter().any(|r| *r == path) {
            return Err(ApiError::BadRequest(format!("cannot unmount {path:?}")));
        }
        let _g = self.write.lock().await;
        let mut entries: Vec<MountEntry> = self.entries(view).await?.as_ref().clone();
        let Some(i) = entries.iter().position(|e| e.path == path) else {
            return Ok(());
        };
        let gone = entries.remove(i);
        self.save(view, entries).await?;
        view.delete_tree(&gone.data_prefix()).await
    }

    /// Tunes a mount: TTLs and description (`None` = unchanged).
    pub async fn tune(
        &self,
        view: &View<'_>,
        path: &str,
        default_ttl: Option<u64>,
        max_ttl: Option<u64>,
        description: Option<String>,
        version: Option<String>,
    ) -> Result<(), ApiError> {
        let path = normalize_path(path)?;
        let _g = self.write.lock().await;
        let mut entries: Vec<MountEntry> = self.entries(view).await?.as_ref().clone();
        let e = entries
            .iter_mut()
            .find(|e| e.path == path)
            .ok_or_else(|| ApiError::BadRequest(format!("tune of path {path:?} failed: no mount entry found")))?;
        let mut cfg = e.config.clone();
        if let Some(d) = default_ttl {
            cfg.default_lease_ttl = d;
        }
        if let Some(m) = max_ttl {
            cfg.max_lease_ttl = m;
        }
        validate_ttls(&cfg)?;
        if let Some(v) = version.filter(|v| !v.is_empty()) {
            if e.options.get("version") != Some(&v) {
                return Err(ApiError::BadRequest(
                    "changing the kv version of a mount is not supported by vha".into(),
                ));
            }
        }
        e.config = cfg;
        if let Some(d) = description {
            e.description = d;
        }
        self.save(view, entries).await
    }
}

fn validate_ttls(c: &MountConfig) -> Result<(), ApiError> {
    let max = if c.max_lease_ttl == 0 {
        MAX_TTL_SECS
    } else {
        c.max_lease_ttl
    };
    if c.max_lease_ttl > MAX_TTL_SECS {
        return Err(ApiError::BadRequest(
            "max_lease_ttl cannot be greater than the system max lease TTL".into(),
        ));
    }
    if c.default_lease_ttl > max {
        return Err(ApiError::BadRequest(
            "default_lease_ttl cannot be greater than max_lease_ttl".into(),
        ));
    }
    Ok(())
}

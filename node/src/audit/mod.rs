//! Audit devices (Vault's `file` type): every authenticated request is written as a JSON line
//! (`type: request`) before it is served, and its outcome (`type: response`) after.
//!
//! Sensitive values are HMAC-SHA256'd with a per-device salt and written as
//! `hmac-sha256:<hex>`: the client token and its accessor, and every string inside request
//! and response `data` and the response's `auth` token fields (Vault's rules; `log_raw`
//! turns this off, `hmac_accessor = false` leaves accessors plain). `sys/audit-hash` computes
//! the same hash, so an operator can find a known value in the log.
//!
//! The device table lives through the barrier at `core/audit` (salts included). Vault's rule
//! applies: if devices are enabled and none can record a request, the request fails.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex, RwLock};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use crate::error::ApiError;
use crate::policy::Operation;
use crate::request::ApiRequest;
use crate::token::TokenEntry;
use crate::view::View;

/// Where the audit table lives (through the barrier).
const AUDIT_TABLE_PATH: &str = "core/audit";
/// Default file mode of a new log file (Vault's `mode` default): owner read/write only,
/// since the log names every path and caller.
const DEFAULT_MODE: u32 = 0o600;
/// The prefix Vault puts on every hashed value.
pub(crate) const HMAC_PREFIX: &str = "hmac-sha256:";

/// One enabled device, as stored. `Debug` does not show the salt (the HMAC key).
#[derive(Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// With trailing slash: `file/`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub local: bool,
    /// Hex HMAC key, generated at enable time.
    pub salt: String,
}

impl std::fmt::Debug for AuditEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditEntry")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("description", &self.description)
            .field("options", &self.options)
            .field("local", &self.local)
            .field("salt", &format_args!("<redacted>"))
            .finish()
    }
}

impl AuditEntry {
    /// The `sys/audit` listing entry (no salt).
    pub fn to_json(&self) -> Value {
        json!({
            "type": self.kind,
            "description": self.description,
            "options": self.options,
            "local": self.local,
            "path": self.path,
        })
    }
    fn file_path(&self) -> &str {
        self.options
            .get("file_path")
            .or_else(|| self.options.get("path"))
            .map(String::as_str)
            .unwrap_or("")
    }
    fn opt_bool(&self, k: &str, default: bool) -> bool {
        self.options
            .get(k)
            .and_then(|v| vha_core::config::parse_bool(v))
            .unwrap_or(default)
    }
}

#[derive(Default, Serialize, Deserialize)]
struct AuditTableFile {
    entries: Vec<AuditEntry>,
}

/// A device ready to write.
pub struct Device {
    pub entry: AuditEntry,
    salt: Vec<u8>,
    lock: Mutex<()>,
}

fn open_log(path: &str, mode: u32) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(mode).open(path)
}

fn parse_mode(entry: &AuditEntry) -> Result<u32, ApiError> {
    match entry.options.get("mode") {
        None => Ok(DEFAULT_MODE),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ApiError::BadRequest(format!("invalid mode {m:?}: must be an octal file mode"))),
    }
}

impl Device {
    fn new(entry: AuditEntry) -> Result<Device, ApiError> {
        let salt = hex::decode(&entry.salt).map_err(|e| ApiError::Internal(format!("corrupt audit salt: {e}")))?;
        Ok(Device {
            entry,
            salt,
            lock: Mutex::new(()),
        })
    }

    /// `hmac-sha256:<hex>` of `s` under this device's salt.
    pub fn hash(&self, s: &str) -> String {
        hash_with(&self.salt, s)
    }

    /// Appends one line. The file is opened for each line (append mode), so a rotated or
    /// replaced log file is picked up at once, and a path that stopped being writable fails
    /// the request instead of writing into an unlinked inode.
    fn write_line(&self, line: &[u8]) -> std::io::Result<()> {
        let target = self.entry.file_path();
        if target == "discard" {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        // One writer at a time per device, so lines never interleave.
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if target == "stdout" {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf)?;
            return out.flush();
        }
        let mode = parse_mode(&self.entry).unwrap_or(DEFAULT_MODE);
        let mut f = open_log(target, mode)?;
        f.write_all(&buf)?;
        f.flush()
    }

    /// HMACs every string inside `v` (recursively), unless `log_raw`.
    fn hash_value(&self, v: &Value) -> Value {
        if self.entry.opt_bool("log_raw", false) {
            return v.clone();
        }
        hash_strings(&self.salt, v)
    }
}

fn hash_with(salt: &[u8], s: &str) -> String {
    // HMAC accepts keys of any length; the fallback is unreachable but avoids a panic path.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(salt) else {
        return format!("{HMAC_PREFIX}invalid-salt");
    };
    mac.update(s.as_bytes());
    format!("{HMAC_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
}

/// Replaces every string in `v` (at any depth) by its HMAC; other scalars stay (Vault).
pub(crate) fn hash_strings(salt: &[u8], v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(hash_with(salt, s)),
        Value::Array(a) => Value::Array(a.iter().map(|x| hash_strings(salt, x)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), hash_strings(salt, x))).collect()),
        other => other.clone(),
    }
}

/// What every audit line repeats about the request.
pub struct RequestInfo {
    pub id: String,
    pub path: String,
    pub mount_type: String,
    pub remote_address: Option<String>,
    pub remote_port: Option<u16>,
    /// The request body when it is JSON (hashed per device before writing).
    pub data: Option<Value>,
    /// The presented token (hashed per device; never written plain).
    token: Option<String>,
}

impl RequestInfo {
    pub fn new(id: &str, req: &ApiRequest, path: &str, mount_type: &str) -> Self {
        let data = if req.body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice::<Value>(&req.body).ok()
        };
        RequestInfo {
            id: id.to_string(),
            path: path.to_string(),
            mount_type: mount_type.to_string(),
            remote_address: req.client_addr.map(|a| a.ip().to_string()),
            remote_port: req.client_addr.map(|a| a.port()),
            data,
            token: req.token().map(str::to_string),
        }
    }
}

/// The audit broker: the enabled devices (loaded from the table on first use after unseal).
#[derive(Default)]
pub struct AuditBroker {
    devices: RwLock<Option<Arc<Vec<Arc<Device>>>>>,
    write: tokio::sync::Mutex<()>,
}

impl AuditBroker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear_cache(&self) {
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub async fn devices(&self, view: &View<'_>) -> Result<Arc<Vec<Arc<Device>>>, ApiError> {
        if let Some(d) = self.devices.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(d);
        }
        let table: AuditTableFile = view.get_json(AUDIT_TABLE_PATH).await?.unwrap_or_default();
        let devs = Arc::new(
            table
                .entries
                .into_iter()
                .map(Device::new)
                .map(|d| d.map(Arc::new))
                .collect::<Result<Vec<_>, _>>()?,
        );
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = Some(devs.clone());
        Ok(devs)
    }

    pub async fn device(&self, view: &View<'_>, path: &str) -> Result<Option<Arc<Device>>, ApiError> {
        let p = normalize(path)?;
        Ok(self.devices(view).await?.iter().find(|d| d.entry.path == p).cloned())
    }

    /// Enables a `file` device. The file is opened (created) before the table is written,
    /// so a device that cannot log is never enabled.
    pub async fn enable(
        &self,
        view: &View<'_>,
        path: &str,
        kind: &str,
        description: String,
        options: BTreeMap<String, String>,
        local: bool,
    ) -> Result<(), ApiError> {
        let path = normalize(path)?;
        if kind.is_empty() {
            return Err(ApiError::BadRequest(
                "backend type must be specified as a string".into(),
            ));
        }
        if kind != "file" {
            return Err(ApiError::BadRequest(format!("unknown backend type: {kind:?}")));
        }
        if options.get("format").is_some_and(|f| f != "json") {
            return Err(ApiError::BadRequest("only the json format is supported by vha".into()));
        }
        let salt = hex::encode(vha_core::barrier::keyring::random_key());
        let entry = AuditEntry {
            path: path.clone(),
            kind: kind.into(),
            description,
            options,
            local,
            salt,
        };
        let fp = entry.file_path().to_string();
        if fp.is_empty() {
            return Err(ApiError::BadRequest("file_path is required".into()));
        }
        let mode = parse_mode(&entry)?;
        if fp != "stdout" && fp != "discard" {
            open_log(&fp, mode).map_err(|e| {
                ApiError::BadRequest(format!("sanity check failed; unable to open {fp:?} for writing: {e}"))
            })?;
        }
        let _g = self.write.lock().await;
        let mut entries: Vec<AuditEntry> = self.devices(view).await?.iter().map(|d| d.entry.clone()).collect();
        if entries.iter().any(|e| e.path == path) {
            return Err(ApiError::BadRequest(format!("path already in use: {path:?}")));
        }
        entries.push(entry);
        self.save(view, entries).await
    }

    pub async fn disable(&self, view: &View<'_>, path: &str) -> Result<(), ApiError> {
        let path = normalize(path)?;
        let _g = self.write.lock().await;
        let mut entries: Vec<AuditEntry> = self.devices(view).await?.iter().map(|d| d.entry.clone()).collect();
        let before = entries.len();
        entries.retain(|e| e.path != path);
        if entries.len() == before {
            return Ok(());
        }
        self.save(view, entries).await
    }

    async fn save(&self, view: &View<'_>, mut entries: Vec<AuditEntry>) -> Result<(), ApiError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        view.put_json(
            AUDIT_TABLE_PATH,
            &AuditTableFile {
                entries: entries.clone(),
            },
        )
        .await?;
        let devs = entries
            .into_iter()
            .map(Device::new)
            .map(|d| d.map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(devs));
        Ok(())
    }

    /// Logs a request line. Fails (500) when devices exist and none recorded it.
    pub async fn log_request(
        &self,
        info: &RequestInfo,
        auth: Option<&TokenEntry>,
        op: Operation,
        view: &View<'_>,
    ) -> Result<(), ApiError> {
        self.log(info, auth, op, None, None, view, false).await
    }

    /// Logs a response line (with `error` when the request failed).
    pub async fn log_response(
        &self,
        info: &RequestInfo,
        auth: Option<&TokenEntry>,
        op: Operation,
        err: Option<&ApiError>,
        body: Option<&Value>,
        view: &View<'_>,
    ) -> Result<(), ApiError> {
        self.log(info, auth, op, err, body, view, true).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn log(
        &self,
        info: &RequestInfo,
        auth: Option<&TokenEntry>,
        op: Operation,
        err: Option<&ApiError>,
        body: Option<&Value>,
        view: &View<'_>,
        response: bool,
    ) -> Result<(), ApiError> {
        let devices = self.devices(view).await?;
        if devices.is_empty() {
            return Ok(());
        }
        let mut ok = 0usize;
        for d in devices.iter() {
            let line = entry_json(d, info, auth, op, err, body, response);
            let bytes = serde_json::to_vec(&line).map_err(|e| ApiError::Internal(e.to_string()))?;
            match d.write_line(&bytes) {
                Ok(()) => ok += 1,
                Err(e) => tracing::error!(device = %d.entry.path, error = %e, "audit device failed to log"),
            }
        }
        if ok == 0 {
            tracing::error!(request_id = %info.id, "no audit device recorded the request; refusing it");
            return Err(ApiError::AuditFailed);
        }
        Ok(())
    }
}

fn normalize(path: &str) -> Result<String, ApiError> {
    let t = path.trim_matches('/');
    if t.is_empty() || t.len() > 128 || t.chars().any(|c| c.is_control()) {
        return Err(ApiError::BadRequest(format!("invalid audit device path {path:?}")));
    }
    Ok(format!("{t}/"))
}

/// One audit line for device `d` (Vault's JSON format).
fn entry_json(
    d: &Device,
    info: &RequestInfo,
    auth: Option<&TokenEntry>,
    op: Operation,
    err: Option<&ApiError>,
    body: Option<&Value>,
    response: bool,
) -> Value {
    let raw = d.entry.opt_bool("log_raw", false);
    let hash = |s: &str| if raw { s.to_string() } else { d.hash(s) };
    let hash_acc = |s: &str| {
        if raw || !d.entry.opt_bool("hmac_accessor", true) {
            s.to_string()
        } else {
            d.hash(s)
        }
    };
    let token_h = info.token.as_deref().map(hash);
    let auth_json = match auth {
        Some(a) => json!({
            "client_token": token_h,
            "accessor": hash_acc(&a.accessor),
            "display_name": a.display_name,
            "policies": a.policies,
            "token_policies": a.policies,
            "metadata": a.meta,
            "entity_id": "",
            "token_type": "service",
            "token_ttl": a.ttl,
            "token_issue_time": crate::time::secs_rfc3339(a.creation_time),
        }),
        None => json!({ "client_token": token_h }),
    };
    let mut request = json!({
        "id": info.id,
        "operation": op.as_str(),
        "mount_type": info.mount_type,
        "client_token": token_h,
        "client_token_accessor": auth.map(|a| hash_acc(&a.accessor)),
        "namespace": { "id": "root" },
        "path": info.path,
        "data": info.data.as_ref().map(|v| d.hash_value(v)),
        "remote_address": info.remote_address,
        "remote_port": info.remote_port,
    });
    if request["data"].is_null() {
        if let Some(o) = request.as_object_mut() {
            o.remove("data");
        }
    }
    let mut line = Map::new();
    line.insert("time".into(), json!(crate::time::now_rfc3339()));
    line.insert("type".into(), json!(if response { "response" } else { "request" }));
    line.insert("auth".into(), auth_json);
    line.insert("request".into(), request.take());
    if response {
        let mut resp = Map::new();
        resp.insert("mount_type".into(), json!(info.mount_type));
        if let Some(b) = body {
            if let Some(data) = b.get("data").filter(|v| !v.is_null()) {
                resp.insert("data".into(), d.hash_value(data));
            }
            if let Some(a) = b.get("auth").filter(|v| !v.is_null()) {
                let mut a = a.clone();
                if let Some(t) = a.get("client_token").and_then(Value::as_str).map(hash) {
                    a["client_token"] = json!(t);
                }
                if let Some(t) = a.get("accessor").and_then(Value::as_str).map(hash_acc) {
                    a["accessor"] = json!(t);
                }
                resp.insert("auth".into(), a);
            }
            if let Some(w) = b.get("warnings").filter(|v| !v.is_null()) {
                resp.insert("warnings".into(), w.clone());
            }
        }
        line.insert("response".into(), Value::Object(resp));
        if let Some(e) = err {
            line.insert("error".into(), json!(e.to_string()));
        }
    }
    Value::Object(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Debug` of a device never shows its salt (the key of every hash in its log).
    #[test]
    fn debug_redacts_the_salt() {
        let e = AuditEntry {
            path: "file/".into(),
            kind: "file".into(),
            description: String::new(),
            options: BTreeMap::from([("file_path".to_string(), "/tmp/audit.log".to_string())]),
            local: false,
            salt: "5a17".repeat(16),
        };
        let dbg = format!("{e:?} {e:#?}");
        assert!(!dbg.contains("5a17"), "{dbg}");
        assert!(dbg.contains("<redacted>") && dbg.contains("/tmp/audit.log"), "{dbg}");
    }

    /// Every string at any depth is replaced by a prefixed HMAC that depends on the salt;
    /// numbers, booleans and keys stay readable.
    #[test]
    fn hashes_all_strings_with_the_device_salt() {
        let v = json!({"password": "hunter2", "nested": {"list": ["a", 1]}, "n": 5, "b": true});
        let h1 = hash_strings(b"salt-one", &v);
        let h2 = hash_strings(b"salt-two", &v);
        let s = h1.to_string();
        assert!(!s.contains("hunter2"));
        assert!(h1["password"]
            .as_str()
            .is_some_and(|p| p.starts_with(HMAC_PREFIX) && p.len() == HMAC_PREFIX.len() + 64));
        assert_eq!(h1["n"], json!(5));
        assert_eq!(h1["b"], json!(true));
        assert_eq!(h1["nested"]["list"][1], json!(1));
        assert_ne!(h1["password"], h2["password"]);
        assert_eq!(h1["password"], json!(hash_with(b"salt-one", "hunter2")));
    }

    /// The hash is HMAC-SHA256 (RFC 4231 test case 2), hex, with Vault's prefix.
    #[test]
    fn hmac_matches_rfc4231() {
        assert_eq!(
            hash_with(b"Jefe", "what do ya want for nothing?"),
            "hmac-sha256:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! The policy store: ACL policies kept through the barrier at `sys/policy/<name>` (Vault's
//! layout), parsed on first use and cached until the node seals or the policy is written.
//! `root` is built in (never stored, cannot be written or deleted); `default` is written at
//! init and can be edited but not deleted.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::{parse, Acl, Policy};
use crate::error::ApiError;
use crate::view::View;

/// Storage prefix of policies.
const POLICY_PREFIX: &str = "sys/policy/";
/// Longest accepted policy name; Vault has no documented limit, this keeps keys bounded.
const MAX_NAME_LEN: usize = 128;

/// A stored policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub name: String,
    /// The policy text exactly as submitted.
    pub policy: String,
    /// Bumped on every write (OpenBao reports it as `version`).
    #[serde(default)]
    pub version: u64,
    /// RFC 3339 time of the last write.
    #[serde(default)]
    pub modified: String,
}

/// The policy store (a cache in front of the barrier).
#[derive(Default)]
pub struct PolicyStore {
    cache: RwLock<HashMap<String, Arc<Policy>>>,
}

/// Vault lowercases policy names; a name is one path segment.
pub(crate) fn normalize_name(name: &str) -> Result<String, ApiError> {
    let n = name.trim().to_lowercase();
    if n.is_empty() {
        return Err(ApiError::BadRequest("policy name must be provided".into()));
    }
    if n.len() > MAX_NAME_LEN || n.contains('/') || n.chars().any(|c| c.is_control()) || n == "." || n == ".." {
        return Err(ApiError::BadRequest(format!("invalid policy name {n:?}")));
    }
    Ok(n)
}

impl PolicyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every cached policy (on seal, and when another node may have written).
    pub fn clear_cache(&self) {
        self.cache.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub async fn get_stored(&self, view: &View<'_>, name: &str) -> Result<Option<StoredPolicy>, ApiError> {
        view.get_json(&format!("{POLICY_PREFIX}{name}")).await
    }

    /// The parsed policy `name`, or `None` when it does not exist (`root` is not a stored
    /// policy: callers handle it).
    pub async fn get(&self, view: &View<'_>, name: &str) -> Result<Option<Arc<Policy>>, ApiError> {
        if let Some(p) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(Some(p.clone()));
        }
        let Some(stored) = self.get_stored(view, name).await? else {
            return Ok(None);
        };
        // A stored policy that no longer parses (hand-edited storage) grants nothing.
        let parsed = Arc::new(parse(name, &stored.policy).map_err(|e| ApiError::Internal(e.to_string()))?);
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), parsed.clone());
        Ok(Some(parsed))
    }

    /// Validates then writes a policy. `root` cannot be written.
    pub async fn put(&self, view: &View<'_>, name: &str, text: &str) -> Result<(), ApiError> {
        let name = normalize_name(name)?;
        if name == "root" {
            return Err(ApiError::BadRequest("cannot update \"root\" policy".into()));
        }
        if text.trim().is_empty() {
            return Err(ApiError::BadRequest("'policy' parameter not supplied or empty".into()));
        }
        let parsed = parse(&name, text).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let version = self.get_stored(view, &name).await?.map(|p| p.version).unwrap_or(0) + 1;
        let stored = StoredPolicy {
            name: name.clone(),
            policy: text.to_string(),
            version,
            modified: crate::time::now_rfc3339(),
        };
        view.put_json(&format!("{POLICY_PREFIX}{name}"), &stored).await?;
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, Arc::new(parsed));
        Ok(())
    }

    /// Deletes a policy (missing is fine, as Vault); `root` and `default` are refused.
    pub async fn delete(&self, view: &View<'_>, name: &str) -> Result<(), ApiError> {
        let name = normalize_name(name)?;
        match name.as_str() {
            "root" => return Err(ApiError::BadRequest("cannot delete \"root\" policy".into())),
            "default" => return Err(ApiError::BadRequest("cannot delete default policy".into())),
            _ => {}
        }
        view.delete(&format!("{POLICY_PREFIX}{name}")).await?;
        self.cache.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
        Ok(())
    }

    /// Stored policy names, sorted, then `root` (Vault's order).
    pub async fn list(&self, view: &View<'_>) -> Result<Vec<String>, ApiError> {
        let mut names: Vec<String> = view
            .list(POLICY_PREFIX)
            .await?
            .into_iter()
            .filter(|n| !n.ends_with('/'))
            .collect();
        names.sort();
        names.push("root".into());
        Ok(names)
    }

    /// The ACL of a token's policies. Unknown policy names grant nothing (Vault).
    pub async fn acl(&self, view: &View<'_>, names: &[String]) -> Result<Acl, ApiError> {
        let root = names.iter().any(|n| n == "root");
        let mut policies = Vec::new();
        if !root {
            for n in names {
                if let Some(p) = self.get(view, n).await? {
                    policies.push(p);
                }
            }
        }
        Ok(Acl::new(policies.iter().map(|p| p.as_ref()), root))
    }

    /// Creates the `default` policy at init.
    pub async fn create_default(&self, view: &View<'_>) -> Result<(), ApiError> {
        self.put(view, "default", super::DEFAULT_POLICY).await
    }
}

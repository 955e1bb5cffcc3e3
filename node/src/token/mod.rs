//! The token store. Only a salted HMAC-SHA256 of a token is ever stored, so neither the
//! storage backend nor a backup reveals a usable token; stored hashes are compared in
//! constant time. Layout (through the barrier):
//! - `sys/token/salt`: the HMAC key, created at init;
//! - `sys/token/id/<hash>`: the [`TokenEntry`];
//! - `sys/token/accessor/<hmac(accessor)>`: accessor -> token hash;
//! - `sys/token/parent/<parent hash>/<child hash>`: the child index, for tree revocation.
//!
//! A token is valid only while it and every ancestor exist and are unexpired, so revoking or
//! expiring a parent invalidates its whole subtree at once, before the cleanup finishes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use rand::{distributions::Alphanumeric, Rng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::ApiError;
use crate::time::{now_secs, secs_rfc3339};
use crate::view::View;

/// Where the token salt lives (through the barrier).
const SALT_PATH: &str = "sys/token/salt";
const ID_PREFIX: &str = "sys/token/id/";
const ACCESSOR_PREFIX: &str = "sys/token/accessor/";
const PARENT_PREFIX: &str = "sys/token/parent/";
/// Random characters in a token after its prefix: 24 alphanumerics, ~143 bits, as Vault.
const TOKEN_RANDOM_LEN: usize = 24;
/// Vault's service-token prefix.
pub(crate) const TOKEN_PREFIX: &str = "hvs.";
/// Longest string accepted as a token; longer input cannot be one of ours, and bounding it
/// bounds the HMAC work an unauthenticated client can cause.
const MAX_TOKEN_LEN: usize = 512;
/// Vault's system `default_lease_ttl` and `max_lease_ttl`: 768h (32 days).
pub(crate) const DEFAULT_TTL_SECS: u64 = 768 * 3600;
pub(crate) const MAX_TTL_SECS: u64 = 768 * 3600;
/// Deepest token tree accepted. The ancestry walk on every use is bounded by it.
const MAX_DEPTH: u32 = 64;

/// A stored token (keyed by its salted hash). `Debug` shows neither its hash nor its
/// parent's (each is the lookup key of a token in storage).
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Hex HMAC of the token; repeated inside so a lookup can compare in constant time.
    pub hash: String,
    pub accessor: String,
    pub policies: Vec<String>,
    pub display_name: String,
    /// Unix seconds.
    pub creation_time: u64,
    /// The parent's hash; `None` for orphans (root tokens included).
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    /// The TTL at creation (seconds, 0 = none).
    #[serde(default)]
    pub ttl: u64,
    #[serde(default)]
    pub explicit_max_ttl: u64,
    /// Unix seconds after which the token is invalid; `None` = never.
    #[serde(default)]
    pub expire_time: Option<u64>,
    /// Uses left: 0 = unlimited, >0 = remaining, -1 = last use consumed (being revoked).
    #[serde(default)]
    pub num_uses: i64,
    #[serde(default)]
    pub renewable: bool,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub depth: u32,
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("hash", &format_args!("<redacted>"))
            .field("accessor", &self.accessor)
            .field("policies", &self.policies)
            .field("display_name", &self.display_name)
            .field("creation_time", &self.creation_time)
            .field("parent", &self.parent.as_ref().map(|_| format_args!("<redacted>")))
            .field("meta", &self.meta)
            .field("ttl", &self.ttl)
            .field("explicit_max_ttl", &self.explicit_max_ttl)
            .field("expire_time", &self.expire_time)
            .field("num_uses", &self.num_uses)
            .field("renewable", &self.renewable)
            .field("path", &self.path)
            .field("depth", &self.depth)
            .finish()
    }
}

impl TokenEntry {
    pub fn is_root(&self) -> bool {
        self.policies.iter().any(|p| p == "root")
    }
    pub fn is_orphan(&self) -> bool {
        self.parent.is_none()
    }
    fn expired(&self, now: u64) -> bool {
        self.expire_time.is_some_and(|t| now >= t) || self.num_uses < 0
    }
    /// Seconds left (0 when it never expires).
    pub fn ttl_left(&self, now: u64) -> u64 {
        self.expire_time.map(|t| t.saturating_sub(now)).unwrap_or(0)
    }

    /// The `data` of `auth/token/lookup*` (Vault's field set). `id` is the token when the
    /// caller presented it, empty for accessor lookups (the store never has it).
    pub fn lookup_data(&self, id: &str) -> Value {
        let now = now_secs();
        json!({
            "accessor": self.accessor,
            "creation_time": self.creation_time,
            "creation_ttl": self.ttl,
            "display_name": self.display_name,
            "entity_id": "",
            "expire_time": self.expire_time.map(secs_rfc3339),
            "explicit_max_ttl": self.explicit_max_ttl,
            "id": id,
            "issue_time": secs_rfc3339(self.creation_time),
            "meta": self.meta,
            "num_uses": self.num_uses,
            "orphan": self.is_orphan(),
            "path": self.path,
            "policies": self.policies,
            "renewable": self.renewable,
            "ttl": self.ttl_left(now),
            "type": "service",
        })
    }

    /// The `auth` block of a create or renew response.
    pub fn auth_block(&self, token: &str) -> Value {
        json!({
            "client_token": token,
            "accessor": self.accessor,
            "policies": self.policies,
            "token_policies": self.policies,
            "metadata": self.meta,
            "lease_duration": self.ttl_left(now_secs()),
            "renewable": self.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": self.is_orphan(),
            "mfa_requirement": null,
            "num_uses": self.num_uses,
        })
    }
}

/// The parameters of `auth/token/create` after validation.
#[derive(Clone, Debug, Default)]
pub struct CreateParams {
    /// `None`: inherit the parent's policies.
    pub policies: Option<Vec<String>>,
    pub no_default_policy: bool,
    pub ttl: u64,
    pub explicit_max_ttl: u64,
    pub renewable: bool,
    pub num_uses: i64,
    pub orphan: bool,
    pub display_name: String,
    pub meta: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize)]
struct AccessorEntry {
    accessor: String,
    hash: String,
}

/// The token store. Holds only the salt (cached after first use, dropped on seal).
#[derive(Default)]
pub struct TokenStore {
    salt: Mutex<Option<Zeroizing<Vec<u8>>>>,
    /// Serializes use-count decrements so a limited-use token cannot be used twice for its
    /// last use by concurrent requests.
    uses: tokio::sync::Mutex<()>,
}

fn random_string(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// Vault's display names: `token` or `token-<name>`, lowercased, non-alphanumerics -> `-`.
fn display_name(requested: &str) -> String {
    let clean: String = requested
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "token".into()
    } else {
        format!("token-{clean}")
    }
}

impl TokenStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops the cached salt (on seal).
    pub fn clear_cache(&self) {
        *self.salt.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn salt(&self, view: &View<'_>) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        if let Some(s) = self.salt.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(s.clone());
        }
        let salt = match view.get(SALT_PATH).await? {
            Some(s) => Zeroizing::new(s),
            None => {
                let salt = Zeroizing::new(vha_core::barrier::keyring::random_key().to_vec());
                view.put(SALT_PATH, &salt).await?;
                salt
            }
        };
        *self.salt.lock().unwrap_or_else(|e| e.into_inner()) = Some(salt.clone());
        Ok(salt)
    }

    /// The salted hash under which `token` (or an accessor) is stored.
    pub async fn hash(&self, view: &View<'_>, token: &str) -> Result<String, ApiError> {
        let salt = self.salt(view).await?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&salt).map_err(|e| ApiError::Internal(e.to_string()))?;
        mac.update(token.as_bytes());
        // Once per request: a table lookup per byte instead of `hex::encode`'s string built a
        // char at a time. 32 bytes fill the 64 digits exactly and hex digits are ASCII, so
        // neither error below can happen; they are mapped rather than unwrapped.
        let mut hex = [0u8; 64];
        hex::encode_to_slice(mac.finalize().into_bytes(), &mut hex).map_err(|e| ApiError::Internal(e.to_string()))?;
        String::from_utf8(hex.to_vec()).map_err(|e| ApiError::Internal(e.to_string()))
    }

    async fn store(&self, view: &View<'_>, e: &TokenEntry) -> Result<(), ApiError> {
        view.put_json(&format!("{ID_PREFIX}{}", e.hash), e).await
    }

    /// Writes a new entry and its indexes. The index entries go first: an index pointing
    /// at a missing token is harmless, a token missing from its parent's index would
    /// survive the parent's revocation cleanup (though still invalid by ancestry).
    async fn insert(&self, view: &View<'_>, e: &TokenEntry) -> Result<(), ApiError> {
        let acc_hash = self.hash(view, &e.accessor).await?;
        view.put_json(
            &format!("{ACCESSOR_PREFIX}{acc_hash}"),
            &AccessorEntry {
                accessor: e.accessor.clone(),
                hash: e.hash.clone(),
            },
        )
        .await?;
        if let Some(p) = &e.parent {
            view.put(&format!("{PARENT_PREFIX}{p}/{}", e.hash), b"{}").await?;
        }
        self.store(view, e).await
    }

    /// Creates the root token (at init). Returns the token itself, shown once.
    pub async fn create_root(&self, view: &View<'_>) -> Result<Zeroizing<String>, ApiError> {
        let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", random_string(TOKEN_RANDOM_LEN)));
        let hash = self.hash(view, &token).await?;
        let entry = TokenEntry {
            hash,
            accessor: random_string(TOKEN_RANDOM_LEN),
            policies: vec!["root".into()],
            display_name: "root".into(),
            creation_time: now_secs(),
            parent: None,
            meta: None,
            ttl: 0,
            explicit_max_ttl: 0,
            expire_time: None,
            num_uses: 0,
            renewable: false,
            path: "auth/token/root".into(),
            depth: 0,
        };
        self.insert(view, &entry).await?;
        Ok(token)
    }

    /// Creates a child of `parent` (or an orphan). Returns the token, its entry and
    /// warnings. Validation is complete before anything is written.
    pub async fn create(
        &self,
        view: &View<'_>,
        parent: &TokenEntry,
        p: CreateParams,
    ) -> Result<(Zeroizing<String>, TokenEntry, Vec<String>), ApiError> {
        let mut warnings = Vec::new();
        if p.num_uses < 0 {
            return Err(ApiError::BadRequest("number of uses cannot be negative".into()));
        }
        let mut policies: Vec<String> = match &p.policies {
            Some(list) => list
                .iter()
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            None => parent.policies.clone(),
        };
        if !parent.is_root() {
            if policies.iter().any(|x| x == "root") {
                return Err(ApiError::BadRequest(
                    "root tokens may not be created from a non-root token".into(),
                ));
            }
            if policies.iter().any(|x| x != "default" && !parent.policies.contains(x)) {
                return Err(ApiError::BadRequest("child policies must be subset of parent".into()));
            }
        }
        if !p.no_default_policy && !policies.iter().any(|x| x == "root") && !policies.iter().any(|x| x == "default") {
            policies.push("default".into());
        }
        if p.no_default_policy {
            policies.retain(|x| x != "default");
        }
        policies.sort();
        policies.dedup();
        if policies.is_empty() {
            return Err(ApiError::BadRequest("token must have at least one policy".into()));
        }
        let depth = if p.orphan { 0 } else { parent.depth + 1 };
        if depth > MAX_DEPTH {
            return Err(ApiError::BadRequest(format!(
                "token tree deeper than {MAX_DEPTH} levels"
            )));
        }
        // TTL: requested, else none for root-policy tokens, else the system default; capped
        // by explicit_max_ttl and the system max (Vault warns when it caps).
        let is_root = policies.iter().any(|x| x == "root");
        let mut ttl = p.ttl;
        if ttl == 0 && !is_root {
            ttl = DEFAULT_TTL_SECS;
        }
        if ttl == 0 && is_root && p.explicit_max_ttl > 0 {
            ttl = p.explicit_max_ttl;
        }
        let max = if p.explicit_max_ttl > 0 {
            p.explicit_max_ttl.min(MAX_TTL_SECS)
        } else {
            MAX_TTL_SECS
        };
        if ttl > max && !(is_root && p.ttl == 0) {
            if p.ttl > 0 {
                warnings.push(format!(
                    "TTL of {:?} exceeded the effective max_ttl of {:?}; TTL value is capped accordingly",
                    crate::time::format_duration(p.ttl)
                        .replace("m0s", "m")
                        .replace("h0m", "h"),
                    crate::time::format_duration(max)
                        .replace("m0s", "m")
                        .replace("h0m", "h"),
                ));
            }
            ttl = max;
        }
        let now = now_secs();
        let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", random_string(TOKEN_RANDOM_LEN)));
        let hash = self.hash(view, &token).await?;
        let entry = TokenEntry {
            hash,
            accessor: random_string(TOKEN_RANDOM_LEN),
            policies,
            display_name: display_name(&p.display_name),
            creation_time: now,
            parent: if p.orphan { None } else { Some(parent.hash.clone()) },
            meta: p.meta,
            ttl,
            explicit_max_ttl: p.explicit_max_ttl,
            expire_time: if ttl > 0 { Some(now + ttl) } else { None },
            num_uses: p.num_uses,
            renewable: p.renewable && ttl > 0,
            path: "auth/token/create".into(),
            depth,
        };
        self.insert(view, &entry).await?;
        Ok((token, entry, warnings))
    }

    async fn get_by_hash(&self, view: &View<'_>, hash: &str) -> Result<Option<TokenEntry>, ApiError> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let Some(entry) = view.get_json::<TokenEntry>(&format!("{ID_PREFIX}{hash}")).await? else {
            return Ok(None);
        };
        if bool::from(entry.hash.as_bytes().ct_eq(hash.as_bytes())) {
            Ok(Some(entry))
        } else {
            Ok(None)
        }
    }

    /// A valid entry by hash: unexpired, uses left, and every ancestor valid. An expired
    /// token found here is revoked (with its subtree).
    async fn valid_by_hash(&self, view: &View<'_>, hash: &str) -> Result<Option<TokenEntry>, ApiError> {
        let Some(entry) = self.get_by_hash(view, hash).await? else {
            return Ok(None);
        };
        let now = now_secs();
        if entry.expire_time.is_some_and(|t| now >= t) {
            self.revoke_tree(view, &entry.hash).await?;
            return Ok(None);
        }
        if entry.num_uses < 0 {
            return Ok(None);
        }
        let mut parent = entry.parent.clone();
        let mut steps = 0;
        while let Some(ph) = parent {
            steps += 1;
            if steps > MAX_DEPTH + 1 {
                break;
            }
            match self.get_by_hash(view, &ph).await? {
                Some(pe) if !pe.expired(now) => parent = pe.parent,
                Some(pe) if pe.num_uses < 0 => parent = pe.parent,
                _ => {
                    // An ancestor is gone or expired: the whole branch is revoked.
                    self.revoke_tree(view, &ph).await?;
                    return Ok(None);
                }
            }
        }
        Ok(Some(entry))
    }

    /// Looks a token up; `None` when unknown, expired or orphaned by a revoked ancestor.
    pub async fn lookup(&self, view: &View<'_>, token: &str) -> Result<Option<TokenEntry>, ApiError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Ok(None);
        }
        let hash = self.hash(view, token).await?;
        self.valid_by_hash(view, &hash).await
    }

    /// Looks a token up by accessor.
    pub async fn lookup_accessor(&self, view: &View<'_>, accessor: &str) -> Result<Option<TokenEntry>, ApiError> {
        if accessor.is_empty() || accessor.len() > MAX_TOKEN_LEN {
            return Ok(None);
        }
        let acc_hash = self.hash(view, accessor).await?;
        let Some(a) = view
            .get_json::<AccessorEntry>(&format!("{ACCESSOR_PREFIX}{acc_hash}"))
            .await?
        else {
            return Ok(None);
        };
        if !bool::from(a.accessor.as_bytes().ct_eq(accessor.as_bytes())) {
            return Ok(None);
        }
        self.valid_by_hash(view, &a.hash).await
    }

    /// The entry for a request's token (no use counted), or 403.
    pub async fn resolve(&self, view: &View<'_>, token: Option<&str>) -> Result<TokenEntry, ApiError> {
        let Some(t) = token else {
            return Err(ApiError::PermissionDenied);
        };
        self.lookup(view, t).await?.ok_or(ApiError::PermissionDenied)
    }

    /// The entry for a request's token, with one use counted, or 403 ([`Self::resolve`] then
    /// [`Self::consume_use`]).
    pub async fn authenticate(&self, view: &View<'_>, token: Option<&str>) -> Result<TokenEntry, ApiError> {
        let entry = self.resolve(view, token).await?;
        self.consume_use(view, entry).await
    }

    /// Counts one use of a limited-use token (Vault counts only requests its ACL allowed).
    /// A token whose last use this is comes back with `num_uses == -1`: the caller revokes
    /// it after the request. Unlimited tokens pass through untouched.
    pub async fn consume_use(&self, view: &View<'_>, entry: TokenEntry) -> Result<TokenEntry, ApiError> {
        if entry.num_uses == 0 {
            return Ok(entry);
        }
        let _guard = self.uses.lock().await;
        // Re-read under the lock: another request may have used it meanwhile.
        let Some(mut entry) = self.get_by_hash(view, &entry.hash).await? else {
            return Err(ApiError::PermissionDenied);
        };
        if entry.num_uses < 0 {
            return Err(ApiError::PermissionDenied);
        }
        entry.num_uses = if entry.num_uses == 1 { -1 } else { entry.num_uses - 1 };
        self.store(view, &entry).await?;
        Ok(entry)
    }

    /// Every accessor (for `auth/token/accessors`).
    pub async fn list_accessors(&self, view: &View<'_>) -> Result<Vec<String>, ApiError> {
        let mut out = Vec::new();
        for k in view.list(ACCESSOR_PREFIX).await? {
            if let Some(a) = view.get_json::<AccessorEntry>(&format!("{ACCESSOR_PREFIX}{k}")).await? {
                out.push(a.accessor);
            }
        }
        Ok(out)
    }

    /// Deletes one token's entry and indexes (entry first: it is what makes it valid).
    async fn delete_one(&self, view: &View<'_>, hash: &str) -> Result<(), ApiError> {
        let entry = self.get_by_hash(view, hash).await?;
        view.delete(&format!("{ID_PREFIX}{hash}")).await?;
        if let Some(e) = entry {
            let acc_hash = self.hash(view, &e.accessor).await?;
            view.delete(&format!("{ACCESSOR_PREFIX}{acc_hash}")).await?;
            if let Some(p) = &e.parent {
                view.delete(&format!("{PARENT_PREFIX}{p}/{hash}")).await?;
            }
        }
        Ok(())
    }

    /// Revokes a token and all its descendants. The root of the subtree goes first, which
    /// invalidates every descendant at once (ancestry check); the rest is cleanup.
    pub async fn revoke_tree(&self, view: &View<'_>, hash: &str) -> Result<(), ApiError> {
        let mut stack = vec![hash.to_string()];
        let mut visited = 0usize;
        while let Some(h) = stack.pop() {
            visited += 1;
            // Bound the work on a corrupted (cyclic) index.
            if visited > 1_000_000 {
                return Err(ApiError::Internal("token tree too large to revoke".into()));
            }
            self.delete_one(view, &h).await?;
            for child in view.list(&format!("{PARENT_PREFIX}{h}/")).await? {
                if !child.ends_with('/') {
                    view.delete(&format!("{PARENT_PREFIX}{h}/{child}")).await?;
                    stack.push(child);
                }
            }
        }
        Ok(())
    }

    /// Revokes a token but keeps its children, which become orphans (they are re-parented
    /// before the token goes, so no child is invalid in between).
    pub async fn revoke_orphan(&self, view: &View<'_>, hash: &str) -> Result<(), ApiError> {
        for child in view.list(&format!("{PARENT_PREFIX}{hash}/")).await? {
            if child.ends_with('/') {
                continue;
            }
            if let Some(mut ce) = self.get_by_hash(view, &child).await? {
                ce.parent = None;
                ce.depth = 0;
                self.store(view, &ce).await?;
            }
            view.delete(&format!("{PARENT_PREFIX}{hash}/{child}")).await?;
        }
        self.delete_one(view, hash).await
    }

    /// Vault's `auth/token/tidy`: revokes expired tokens (and the subtrees of expired or
    /// missing parents) and drops index entries that point at missing tokens. Returns how
    /// many tokens were revoked. Safe to run at any time: it only removes what is invalid.
    pub async fn tidy(&self, view: &View<'_>) -> Result<usize, ApiError> {
        let mut revoked = 0;
        for h in view.list(ID_PREFIX).await? {
            if h.ends_with('/') {
                continue;
            }
            if self.get_by_hash(view, &h).await?.is_some() && self.valid_by_hash(view, &h).await?.is_none() {
                revoked += 1;
            }
        }
        for k in view.list(ACCESSOR_PREFIX).await? {
            let key = format!("{ACCESSOR_PREFIX}{k}");
            if let Some(a) = view.get_json::<AccessorEntry>(&key).await? {
                if self.get_by_hash(view, &a.hash).await?.is_none() {
                    view.delete(&key).await?;
                }
            }
        }
        for parent in view.list(PARENT_PREFIX).await? {
            let Some(p) = parent.strip_suffix('/') else { continue };
            let parent_gone = self.get_by_hash(view, p).await?.is_none();
            for child in view.list(&format!("{PARENT_PREFIX}{parent}")).await? {
                if parent_gone || self.get_by_hash(view, &child).await?.is_none() {
                    if parent_gone {
                        // Children of a vanished parent are invalid by ancestry: finish the job.
                        self.revoke_tree(view, &child).await?;
                    }
                    view.delete(&format!("{PARENT_PREFIX}{parent}{child}")).await?;
                }
            }
        }
        Ok(revoked)
    }

    /// Renews a token: a new TTL of `increment` (or its creation TTL) from now, capped by
    /// `explicit_max_ttl` and the system max, both counted from creation.
    pub async fn renew(
        &self,
        view: &View<'_>,
        mut e: TokenEntry,
        increment: u64,
    ) -> Result<(TokenEntry, Vec<String>), ApiError> {
        if !e.renewable || e.expire_time.is_none() {
            return Err(ApiError::BadRequest("lease is not renewable".into()));
        }
        let now = now_secs();
        let want = if increment > 0 { increment } else { e.ttl };
        let mut limit = e.creation_time + MAX_TTL_SECS;
        if e.explicit_max_ttl > 0 {
            limit = limit.min(e.creation_time + e.explicit_max_ttl);
        }
        let mut warnings = Vec::new();
        let mut expire = now + want;
        if expire > limit {
            expire = limit;
            warnings.push("TTL of the token was capped by its maximum TTL".to_string());
        }
        e.expire_time = Some(expire);
        self.store(view, &e).await?;
        Ok((e, warnings))
    }
}

#[cfg(test)]
mod tests;

//! Tokens: creation and lookup. Only a salted HMAC-SHA256 of a token is ever stored
//! (`sys/token/id/<hmac>` through the barrier), so neither the storage backend nor a backup
//! reveals a usable token; the stored hash is compared in constant time.
//!
//! This module holds the root token flow of `sys/init`; the full token API (create, lookup,
//! renew, revoke, accessors, TTLs) builds on the same entry type.

use hmac::{Hmac, Mac};
use rand::{distributions::Alphanumeric, Rng};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use vha_core::barrier::Barrier;

use crate::error::ApiError;

/// Where the token salt lives (through the barrier).
const SALT_PATH: &str = "sys/token/salt";
const ID_PREFIX: &str = "sys/token/id/";
/// Random characters in a token after its prefix: 24 alphanumerics, ~143 bits, as Vault.
const TOKEN_RANDOM_LEN: usize = 24;
/// Vault's service-token prefix.
pub const TOKEN_PREFIX: &str = "hvs.";

/// A stored token (keyed by its salted hash).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Hex HMAC of the token; repeated inside so a lookup can compare in constant time.
    pub hash: String,
    pub accessor: String,
    pub policies: Vec<String>,
    pub display_name: String,
    /// Unix seconds.
    pub creation_time: u64,
}

impl TokenEntry {
    pub fn is_root(&self) -> bool {
        self.policies.iter().any(|p| p == "root")
    }
}

/// The token store.
#[derive(Default)]
pub struct TokenStore {}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_string(n: usize) -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(n).map(char::from).collect()
}

impl TokenStore {
    pub fn new() -> Self {
        TokenStore {}
    }

    async fn salt(&self, barrier: &Barrier) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        if let Some(s) = barrier.get(SALT_PATH).await? {
            return Ok(Zeroizing::new(s));
        }
        let salt = vha_core::barrier::keyring::random_key().to_vec();
        barrier.put(SALT_PATH, &salt, None).await?;
        Ok(Zeroizing::new(salt))
    }

    /// The salted hash under which `token` is stored.
    pub async fn hash(&self, barrier: &Barrier, token: &str) -> Result<String, ApiError> {
        let salt = self.salt(barrier).await?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&salt).map_err(|e| ApiError::Internal(e.to_string()))?;
        mac.update(token.as_bytes());
        Ok(hex::encode(mac.finalize().into_bytes()))
    }

    /// Creates the root token (at init). Returns the token itself, shown once.
    pub async fn create_root(&self, barrier: &Barrier) -> Result<Zeroizing<String>, ApiError> {
        let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", random_string(TOKEN_RANDOM_LEN)));
        let hash = self.hash(barrier, &token).await?;
        let entry = TokenEntry {
            hash: hash.clone(),
            accessor: random_string(TOKEN_RANDOM_LEN),
            policies: vec!["root".into()],
            display_name: "root".into(),
            creation_time: now_secs(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|e| ApiError::Internal(e.to_string()))?;
        barrier.put(&format!("{ID_PREFIX}{hash}"), &bytes, None).await?;
        Ok(token)
    }

    /// Looks a token up; `None` when unknown. The stored hash is compared in constant time.
    pub async fn lookup(&self, barrier: &Barrier, token: &str) -> Result<Option<TokenEntry>, ApiError> {
        if token.is_empty() || token.len() > 512 {
            return Ok(None);
        }
        let hash = self.hash(barrier, token).await?;
        let Some(bytes) = barrier.get(&format!("{ID_PREFIX}{hash}")).await? else { return Ok(None) };
        let entry: TokenEntry = serde_json::from_slice(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
        if bool::from(entry.hash.as_bytes().ct_eq(hash.as_bytes())) {
            Ok(Some(entry))
        } else {
            Ok(None)
        }
    }

    /// The entry for a request's token, or 403.
    pub async fn authenticate(&self, barrier: &Barrier, token: Option<&str>) -> Result<TokenEntry, ApiError> {
        match token {
            Some(t) => self.lookup(barrier, t).await?.ok_or(ApiError::PermissionDenied),
            None => Err(ApiError::PermissionDenied),
        }
    }
}

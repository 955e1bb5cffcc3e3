//! The security barrier: the encrypted view of the untrusted storage backend, and the seal.
//!
//! Layout in storage (Vault's names where it has them):
//! - `core/seal-config`: plaintext JSON (type, shares, threshold). Written LAST during init,
//!   so its presence means "initialized" and a crash mid-init leaves nothing half-done.
//! - `core/keyring`: the keyring, encrypted under the root key (the Shamir-combined unseal
//!   key), path as associated data.
//! - everything else: barrier envelopes under the keyring's active term.
//!
//! Sealed, the barrier holds no key material; every data operation returns
//! [`BarrierError::Sealed`]. Unsealing decrypts the keyring; sealing drops (and zeroizes) it.
//!
//! Init is atomic on every store: the keyring and the seal configuration are written with
//! create-if-absent, and the caller holds an [`InitClaim`]: the store's init lock (whose
//! fence every init write carries, so an initializer that lost the lock cannot write), or
//! the store to itself (no HA). Under the claim, a keyring without a seal configuration is
//! what an interrupted init left behind, and is replaced.

pub mod cache;
pub mod keyring;
pub mod shamir;

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use keyring::{Keyring, KEY_LEN};

use crate::error::BarrierError;
use crate::storage::{Backend, Fence};
use cache::{Lookup, ReadCache};

/// Where the seal configuration lives (plaintext, like Vault's).
pub const SEAL_CONFIG_PATH: &str = "core/seal-config";
/// Where the encrypted keyring lives.
pub const KEYRING_PATH: &str = "core/keyring";
/// The root key's term in its one-key keyring; data terms start at 1.
const ROOT_TERM: u32 = 0;

/// The seal configuration (Vault's `SealConfig`, Shamir only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealConfig {
    #[serde(rename = "type")]
    pub kind: String,
    pub secret_shares: u8,
    pub secret_threshold: u8,
}

/// What `initialize` hands back: the unseal key parts (shown to the operator once).
pub struct InitOutput {
    pub key_shares: Vec<Zeroizing<Vec<u8>>>,
}

/// Why no other initializer can be writing while this one runs.
#[derive(Clone, Copy, Debug)]
pub enum InitClaim<'a> {
    /// The caller holds the store's init lock: every init write carries its fence.
    Locked(&'a Fence),
    /// The store belongs to this process alone (no HA: one node), and the process runs one
    /// init at a time.
    Exclusive,
    /// A shared store without an HA lock: only create-if-absent decides, and an existing
    /// keyring (another init running, or an interrupted one) is never replaced.
    Unlocked,
}

impl InitClaim<'_> {
    pub fn fence(&self) -> Option<&Fence> {
        match self {
            InitClaim::Locked(f) => Some(f),
            InitClaim::Exclusive | InitClaim::Unlocked => None,
        }
    }
}

/// The barrier over one backend.
pub struct Barrier {
    backend: Arc<dyn Backend>,
    keyring: RwLock<Option<Arc<Keyring>>>,
    /// The active node's read cache (off until the HA layer enables it for a term).
    cache: ReadCache,
}

impl Barrier {
    pub fn new(backend: Arc<dyn Backend>) -> Barrier {
        Barrier::with_cache(backend, 0)
    }

    /// A barrier whose read cache holds up to `cache_size` entries while enabled (0: none).
    pub fn with_cache(backend: Arc<dyn Backend>, cache_size: usize) -> Barrier {
        Barrier {
            backend,
            keyring: RwLock::new(None),
            cache: ReadCache::new(cache_size),
        }
    }

    /// The read cache, which the HA layer enables for each term of this node as the active
    /// (and disables when the term ends); see [`cache`].
    pub fn cache(&self) -> &ReadCache {
        &self.cache
    }

    /// The untrusted backend underneath (for its `kind`, and for the HA layer's raw reads).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn is_sealed(&self) -> bool {
        self.keyring.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// The current keyring, while unsealed (shared with the local proxy).
    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn require_keyring(&self) -> Result<Arc<Keyring>, BarrierError> {
        self.keyring().ok_or(BarrierError::Sealed)
    }

    /// The seal configuration, or `None` when not initialized.
    pub async fn seal_config(&self) -> Result<Option<SealConfig>, BarrierError> {
        match self.backend.get(SEAL_CONFIG_PATH).await? {
            None => Ok(None),
            Some(e) => serde_json::from_slice(&e.value)
                .map(Some)
                .map_err(|_| BarrierError::Malformed {
                    path: SEAL_CONFIG_PATH.into(),
                }),
        }
    }

    pub async fn initialized(&self) -> Result<bool, BarrierError> {
        Ok(self.seal_config().await?.is_some())
    }

    /// Phase one of init: a fresh root key and keyring; the keyring is written encrypted
    /// (create-if-absent; under `claim` an interrupted init's keyring is replaced) and
    /// installed (unsealed) so the caller can write its first entries (the root token). The
    /// barrier only counts as initialized after [`Barrier::commit_init`].
    pub async fn initialize(
        &self,
        shares: u64,
        threshold: u64,
        claim: InitClaim<'_>,
    ) -> Result<(InitOutput, SealConfig), BarrierError> {
        if self.initialized().await? {
            return Err(BarrierError::AlreadyInitialized);
        }
        let (n, k) = shamir::validate(shares, threshold)?;
        let root = keyring::random_key();
        let keyring = Keyring::generate();
        let sealed_ring = Keyring::from_key(ROOT_TERM, &root).encrypt(KEYRING_PATH, &keyring.to_bytes());
        let fence = claim.fence();
        if !self.backend.create(KEYRING_PATH, sealed_ring.clone(), fence).await? {
            // A keyring without a seal configuration. Under a lock or alone, its initializer
            // is gone (its lock lost and its writes fenced, or it was this process), so its
            // init was interrupted; without either, another init may be running.
            if matches!(claim, InitClaim::Unlocked) {
                return Err(BarrierError::AlreadyInitialized);
            }
            tracing::warn!("replacing the keyring of an interrupted init");
            self.backend.put(KEYRING_PATH, sealed_ring, fence).await?;
        }
        let key_shares = shamir::split(root.as_ref(), n, k)?;
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keyring));
        Ok((
            InitOutput { key_shares },
            SealConfig {
                kind: "shamir".into(),
                secret_shares: n,
                secret_threshold: k,
            },
        ))
    }

    /// Phase two of init: marks the barrier initialized (create-if-absent) and seals it
    /// (Vault leaves a freshly initialized server sealed).
    pub async fn commit_init(&self, config: &SealConfig, claim: InitClaim<'_>) -> Result<(), BarrierError> {
        let bytes = serde_json::to_vec(config).map_err(|e| BarrierError::InvalidParameters(e.to_string()))?;
        let created = self.backend.create(SEAL_CONFIG_PATH, bytes, claim.fence()).await;
        self.seal();
        if !created? {
            return Err(BarrierError::AlreadyInitialized);
        }
        Ok(())
    }

    /// Unseals with the combined root key. A wrong key leaves the barrier sealed.
    pub async fn unseal(&self, root_key: &[u8]) -> Result<(), BarrierError> {
        let root: &[u8; KEY_LEN] = root_key
            .try_into()
            .map_err(|_| BarrierError::InvalidKey(format!("key must be {KEY_LEN} bytes")))?;
        let entry = self
            .backend
            .get(KEYRING_PATH)
            .await?
            .ok_or(BarrierError::NotInitialized)?;
        let plain = Zeroizing::new(
            Keyring::from_key(ROOT_TERM, root)
                .decrypt(KEYRING_PATH, &entry.value)
                .map_err(|_| BarrierError::InvalidKey("unseal failed, invalid key".into()))?,
        );
        let keyring = Keyring::from_bytes(&plain)?;
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keyring));
        Ok(())
    }

    /// Drops the keyring from memory (zeroized when the last reference goes).
    /// The read cache is emptied too.
    pub fn seal(&self) {
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.cache.disable();
    }

    pub async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, BarrierError> {
        let ring = self.require_keyring()?;
        let ticket = match self.cache.lookup(path) {
            Lookup::Hit(v) => return v.map(|ct| ring.decrypt(path, &ct)).transpose(),
            Lookup::Miss(t) => Some(t),
            Lookup::Off => None,
        };
        let entry = self.backend.get(path).await?;
        match (ticket, entry) {
            (None, None) => Ok(None),
            (None, Some(e)) => ring.decrypt_owned(path, e.value).map(Some),
            (Some(t), None) => {
                self.cache.fill(path, t, None);
                Ok(None)
            }
            (Some(t), Some(e)) => {
                let plain = ring.decrypt(path, &e.value)?;
                self.cache.fill(path, t, Some(Arc::from(e.value)));
                Ok(Some(plain))
            }
        }
    }

    pub async fn put(&self, path: &str, value: &[u8], fence: Option<&Fence>) -> Result<(), BarrierError> {
        let ring = self.require_keyring()?;
        let ct = ring.encrypt(path, value);
        let cached: Option<Arc<[u8]>> = self.cache.wants_values(path).then(|| Arc::from(&ct[..]));
        self.cache.write_begins(path);
        let r = self.backend.put(path, ct, fence).await;
        // Without a copy (the cache was off when the write began) the path stays uncached.
        self.cache
            .write_ends(path, r.is_ok().then_some(cached).flatten().map(Some));
        Ok(r?)
    }

    /// Writes `entries` in order, in one store request where the store takes batches (see
    /// [`Backend::put_batch`]: a refused fence writes none, a failure may leave a prefix).
    pub async fn put_batch(&self, entries: &[(&str, &[u8])], fence: Option<&Fence>) -> Result<(), BarrierError> {
        let ring = self.require_keyring()?;
        let mut puts = Vec::with_capacity(entries.len());
        let mut cached = Vec::with_capacity(entries.len());
        for (path, value) in entries {
            let ct = ring.encrypt(path, value);
            cached.push(self.cache.wants_values(path).then(|| Arc::<[u8]>::from(&ct[..])));
            puts.push((path.to_string(), ct));
        }
        for (path, _) in entries {
            self.cache.write_begins(path);
        }
        let r = self.backend.put_batch(puts, fence).await;
        for ((path, _), c) in entries.iter().zip(cached) {
            self.cache.write_ends(path, r.is_ok().then_some(c).flatten().map(Some));
        }
        Ok(r?)
    }

    pub async fn delete(&self, path: &str, fence: Option<&Fence>) -> Result<(), BarrierError> {
        self.require_keyring()?;
        self.cache.write_begins(path);
        let r = self.backend.delete(path, fence).await;
        self.cache.write_ends(path, r.is_ok().then_some(None));
        Ok(r?)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BarrierError> {
        self.require_keyring()?;
        Ok(self.backend.list(prefix).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::inmem::InmemBackend;

    async fn init_unsealed(b: &Barrier, shares: u64, threshold: u64) -> Vec<Zeroizing<Vec<u8>>> {
        let (out, cfg) = b.initialize(shares, threshold, InitClaim::Exclusive).await.unwrap();
        b.commit_init(&cfg, InitClaim::Exclusive).await.unwrap();
        assert!(b.is_sealed(), "init leaves the barrier sealed");
        let root = shamir::combine(&out.key_shares[..threshold as usize], threshold as u8).unwrap();
        b.unseal(&root).await.unwrap();
        out.key_shares
    }

    /// Data written through the barrier is ciphertext in the backend and reads back after a
    /// seal/unseal cycle.
    #[tokio::test]
    async fn roundtrip_through_seal_cycle() {
        let backend = Arc::new(InmemBackend::new());
        let b = Barrier::new(backend.clone());
        let shares = init_unsealed(&b, 3, 2).await;
        b.put("secret/x", b"plaintext-value", None).await.unwrap();
        let raw = backend.get("secret/x").await.unwrap().unwrap().value;
        assert!(
            !raw.windows(9).any(|w| w == b"plaintext"),
            "backend must only see ciphertext"
        );
        b.seal();
        assert!(matches!(b.get("secret/x").await, Err(BarrierError::Sealed)));
        assert!(matches!(b.put("secret/y", b"v", None).await, Err(BarrierError::Sealed)));
        let root = shamir::combine(&shares[1..3], 2).unwrap();
        b.unseal(&root).await.unwrap();
        assert_eq!(b.get("secret/x").await.unwrap().unwrap(), b"plaintext-value");
    }

    /// A wrong unseal key leaves the barrier sealed; a second init is refused.
    #[tokio::test]
    async fn wrong_key_and_double_init() {
        let b = Barrier::new(Arc::new(InmemBackend::new()));
        init_unsealed(&b, 1, 1).await;
        b.seal();
        assert!(b.unseal(&[0u8; 32]).await.is_err());
        assert!(b.is_sealed());
        assert!(matches!(
            b.initialize(1, 1, InitClaim::Exclusive).await,
            Err(BarrierError::AlreadyInitialized)
        ));
    }

    /// A crash between init phases leaves the store uninitialized, and init can run again.
    #[tokio::test]
    async fn interrupted_init_is_not_initialized() {
        let backend = Arc::new(InmemBackend::new());
        let b = Barrier::new(backend.clone());
        let _ = b.initialize(1, 1, InitClaim::Exclusive).await.unwrap();
        let b2 = Barrier::new(backend);
        assert!(!b2.initialized().await.unwrap());
        let (_, cfg) = b2.initialize(1, 1, InitClaim::Exclusive).await.unwrap();
        b2.commit_init(&cfg, InitClaim::Exclusive).await.unwrap();
        assert!(b2.initialized().await.unwrap());
    }

    /// Under the init lock, an interrupted init's keyring is replaced by the next
    /// initializer, whose keys unseal; the interrupted initializer (older fence) can write
    /// nothing afterwards, not even its seal configuration.
    #[tokio::test]
    async fn locked_init_replaces_an_interrupted_one_and_fences_it() {
        let backend = Arc::new(InmemBackend::new());
        let fence = |token| Fence {
            lock: "core/init-lock".into(),
            token,
        };
        let (old, new) = (fence(1), fence(2));
        let a = Barrier::new(backend.clone());
        let (_, cfg_a) = a.initialize(1, 1, InitClaim::Locked(&old)).await.unwrap();
        let b = Barrier::new(backend.clone());
        let (out, cfg_b) = b.initialize(1, 1, InitClaim::Locked(&new)).await.unwrap();
        b.commit_init(&cfg_b, InitClaim::Locked(&new)).await.unwrap();
        assert!(matches!(
            a.commit_init(&cfg_a, InitClaim::Locked(&old)).await,
            Err(BarrierError::Storage(crate::StorageError::Fenced { .. }))
        ));
        let c = Barrier::new(backend);
        let root = shamir::combine(&out.key_shares, 1).unwrap();
        c.unseal(&root).await.expect("the winner's key unseals");
    }

    /// Without a lock on a shared store, a keyring already there (another init running, or
    /// an interrupted one) is never replaced: the init is refused and writes nothing.
    #[tokio::test]
    async fn unlocked_init_never_replaces_a_keyring() {
        let backend = Arc::new(InmemBackend::new());
        let a = Barrier::new(backend.clone());
        let _ = a.initialize(1, 1, InitClaim::Unlocked).await.unwrap();
        let before = backend.get(KEYRING_PATH).await.unwrap().unwrap().value;
        let b = Barrier::new(backend.clone());
        assert!(matches!(
            b.initialize(1, 1, InitClaim::Unlocked).await,
            Err(BarrierError::AlreadyInitialized)
        ));
        assert_eq!(backend.get(KEYRING_PATH).await.unwrap().unwrap().value, before);
        assert!(b.is_sealed());
    }

    /// An entry copied to another path inside the backend does not decrypt there.
    #[tokio::test]
    async fn moved_entry_refused() {
        let backend = Arc::new(InmemBackend::new());
        let b = Barrier::new(backend.clone());
        init_unsealed(&b, 1, 1).await;
        b.put("core/leader/a", b"advert", None).await.unwrap();
        let raw = backend.get("core/leader/a").await.unwrap().unwrap().value;
        backend.put("core/leader/b", raw, None).await.unwrap();
        assert!(matches!(
            b.get("core/leader/b").await,
            Err(BarrierError::Integrity { .. })
        ));
    }
}

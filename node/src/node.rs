//! The node's shared state: configuration, stores, barrier, unseal progress, cluster
//! identity and tokens. One [`Node`] per process, behind an `Arc`, shared by every request.

use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use vha_core::barrier::{shamir, Barrier, InitClaim};
use vha_core::config::Config;
use vha_core::storage::Stores;

use crate::audit::AuditBroker;
use crate::error::ApiError;
use crate::ha::state::HaHandle;
use crate::metrics::NodeMetrics;
use crate::mounts::MountTable;
use crate::policy::store::PolicyStore;
use crate::token::TokenStore;
use crate::view::View;

/// Where the cluster's name and id live (through the barrier).
const CLUSTER_INFO_PATH: &str = "core/cluster/local/info";
/// The lock every `sys/init` of an HA cluster holds while it writes (a key of its own, so
/// taking it never looks like a leader to standbys or proxies).
pub(crate) const INIT_LOCK_KEY: &str = "core/init-lock";
/// How long an init waits for another node's init to finish: an init writes a handful of
/// entries (milliseconds), so this only runs out when the store is unreachable or another
/// initializer hangs; its lease then frees the lock within the lock TTL.
const INIT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The cluster identity, created at init.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub id: String,
}

/// Unseal key parts collected so far (Vault's unseal progress).
#[derive(Default)]
struct UnsealProgress {
    parts: Vec<Zeroizing<Vec<u8>>>,
    nonce: String,
}

/// What `sys/seal-status` reports about progress.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub progress: usize,
    pub nonce: String,
}

/// A running node.
pub struct Node {
    config: Config,
    stores: Stores,
    barrier: Barrier,
    unseal: Mutex<UnsealProgress>,
    cluster: RwLock<Option<ClusterInfo>>,
    tokens: TokenStore,
    policies: PolicyStore,
    mounts: MountTable,
    audit: AuditBroker,
    /// Serializes KV writes (check-and-set is a read-modify-write).
    kv_locks: crate::mounts::kv::KeyLocks,
    in_flight: crate::inflight::InFlight,
    ha: HaHandle,
    metrics: NodeMetrics,
    /// One `sys/init` at a time in this process.
    init: tokio::sync::Mutex<()>,
    /// Fires when the process is shutting down.
    pub shutdown: CancellationToken,
}

impl Node {
    pub fn new(config: Config, stores: Stores) -> Arc<Node> {
        let ha_enabled = stores.ha.is_some();
        let barrier = Barrier::with_cache(stores.data.clone(), config.cache_size);
        Arc::new(Node {
            config,
            stores,
            barrier,
            unseal: Mutex::new(UnsealProgress::default()),
            cluster: RwLock::new(None),
            tokens: TokenStore::new(),
            policies: PolicyStore::new(),
            mounts: MountTable::new(),
            audit: AuditBroker::new(),
            kv_locks: Default::default(),
            in_flight: crate::inflight::InFlight::new(!ha_enabled),
            ha: HaHandle::new(ha_enabled),
            metrics: NodeMetrics::new(),
            init: tokio::sync::Mutex::new(()),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn stores(&self) -> &Stores {
        &self.stores
    }
    pub fn barrier(&self) -> &Barrier {
        &self.barrier
    }
    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }
    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }
    pub fn mounts(&self) -> &MountTable {
        &self.mounts
    }
    pub fn audit(&self) -> &AuditBroker {
        &self.audit
    }
    /// Logical requests running now (drained at the end of a term).
    pub fn in_flight(&self) -> &crate::inflight::InFlight {
        &self.in_flight
    }
    /// Per-key write locks of the KV mounts.
    pub fn kv_locks(&self) -> &crate::mounts::kv::KeyLocks {
        &self.kv_locks
    }
    /// HA state: role, fence, known leader.
    pub fn ha(&self) -> &HaHandle {
        &self.ha
    }
    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }
    /// The barrier with this node's fence: the one path for secret-handling storage I/O.
    /// On a node that is no longer active (HA on) the view refuses writes with
    /// [`ApiError::NotActive`] instead of writing without a fence.
    pub fn view(&self) -> View<'_> {
        match self.ha.write_fence() {
            Ok(fence) => View::new(&self.barrier, fence),
            Err(_) => View::read_only(&self.barrier),
        }
    }
    /// Drops cached policies, mounts, audit devices and the token salt (on seal, and for HA
    /// when another node may have changed them).
    pub fn clear_caches(&self) {
        self.tokens.clear_cache();
        self.policies.clear_cache();
        self.mounts.clear_cache();
        self.audit.clear_cache();
    }
    pub fn storage_type(&self) -> &'static str {
        self.stores.data.kind()
    }
    pub fn cluster_info(&self) -> Option<ClusterInfo> {
        self.cluster.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Current unseal progress.
    pub fn progress(&self) -> Progress {
        let u = self.unseal.lock().unwrap_or_else(|e| e.into_inner());
        Progress {
            progress: u.parts.len(),
            nonce: u.nonce.clone(),
        }
    }

    /// `sys/init`: creates the barrier, the root token and the cluster identity, then leaves
    /// the node sealed. Returns the key shares and the root token.
    ///
    /// Atomic across the cluster: with HA the init holds the store's init lock
    /// ([`INIT_LOCK_KEY`]) and fences every write with it, and the keyring and seal
    /// configuration are created only if absent. Of concurrent inits on any nodes exactly one
    /// returns keys; the others wait for it and answer "Vault is already initialized",
    /// having written nothing.
    pub async fn initialize(
        &self,
        shares: u64,
        threshold: u64,
    ) -> Result<(Vec<Zeroizing<Vec<u8>>>, Zeroizing<String>), ApiError> {
        let _one_at_a_time = self.init.lock().await;
        if self.barrier.initialized().await? {
            return Err(ApiError::BadRequest("Vault is already initialized".into()));
        }
        let Some(ha) = self.stores.ha.clone() else {
            // No HA: a local store is this process's alone; a shared one has no lock to take.
            let claim = match self.stores.data.kind() {
                "file" | "inmem" => InitClaim::Exclusive,
                _ => InitClaim::Unlocked,
            };
            return self.initialize_claimed(shares, threshold, claim).await;
        };
        let cancel = CancellationToken::new();
        let value = format!("init-{}", uuid::Uuid::new_v4());
        let guard = match tokio::time::timeout(INIT_LOCK_WAIT, ha.acquire(INIT_LOCK_KEY, &value, cancel.clone())).await
        {
            Ok(Ok(Some(g))) => g,
            Ok(Ok(None)) => return Err(ApiError::Unavailable("initialization cancelled".into())),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                cancel.cancel();
                return Err(ApiError::Unavailable(format!(
                    "another node's initialization did not finish within {INIT_LOCK_WAIT:?}; try again"
                )));
            }
        };
        let fence = guard.fence().clone();
        let result = self
            .initialize_claimed(shares, threshold, InitClaim::Locked(&fence))
            .await;
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "releasing the init lock failed (it expires with its lease)");
        }
        result
    }

    async fn initialize_claimed(
        &self,
        shares: u64,
        threshold: u64,
        claim: InitClaim<'_>,
    ) -> Result<(Vec<Zeroizing<Vec<u8>>>, Zeroizing<String>), ApiError> {
        let (out, seal_config) = self.barrier.initialize(shares, threshold, claim).await?;
        let result = async {
            let name = self
                .config
                .cluster_name
                .clone()
                .unwrap_or_else(|| format!("vha-cluster-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
            let info = ClusterInfo {
                name,
                id: uuid::Uuid::new_v4().to_string(),
            };
            let bytes = serde_json::to_vec(&info).map_err(|e| ApiError::Internal(e.to_string()))?;
            self.barrier.put(CLUSTER_INFO_PATH, &bytes, claim.fence()).await?;
            // Init writes under its claim: fenced by the init lock with HA.
            let view = View::new(&self.barrier, claim.fence().cloned());
            let root = self.tokens.create_root(&view).await?;
            self.policies.create_default(&view).await?;
            self.barrier.commit_init(&seal_config, claim).await?;
            Ok::<_, ApiError>(root)
        }
        .await;
        self.clear_caches();
        if result.is_err() {
            // Never leave key material in memory after a failed init; the store is still
            // "not initialized" (seal-config is written last), so init can be retried.
            self.barrier.seal();
        }
        Ok((out.key_shares, result?))
    }

    /// `sys/unseal` with one key part. Duplicates are ignored (Vault); at the threshold the
    /// key is combined and tried; any failure resets progress.
    pub async fn submit_unseal_key(&self, part: Zeroizing<Vec<u8>>) -> Result<(), ApiError> {
        let config = self
            .barrier
            .seal_config()
            .await?
            .ok_or_else(|| ApiError::BadRequest("Vault is not initialized".into()))?;
        if !self.barrier.is_sealed() {
            return Ok(());
        }
        let parts = {
            let mut u = self.unseal.lock().unwrap_or_else(|e| e.into_inner());
            if u.parts.iter().any(|p| bool::from(p.as_slice().ct_eq(part.as_slice()))) {
                return Ok(());
            }
            if u.parts.is_empty() {
                u.nonce = uuid::Uuid::new_v4().to_string();
            }
            u.parts.push(part);
            if u.parts.len() < config.secret_threshold as usize {
                return Ok(());
            }
            let parts = std::mem::take(&mut u.parts);
            u.nonce.clear();
            parts
        };
        let root = shamir::combine(&parts, config.secret_threshold)
            .map_err(|e| ApiError::BadRequest(format!("unable to recover the root key: {e}")))?;
        self.barrier.unseal(&root).await.map_err(|_| {
            ApiError::BadRequest("unable to retrieve stored keys: invalid key: failed to decrypt keys from storage: cipher: message authentication failed".into())
        })?;
        let info = async {
            match self.barrier.get(CLUSTER_INFO_PATH).await? {
                Some(bytes) => serde_json::from_slice::<ClusterInfo>(&bytes)
                    .map(Some)
                    .map_err(|e| ApiError::Internal(e.to_string())),
                None => Ok(None),
            }
        }
        .await;
        match info {
            Ok(Some(info)) => *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = Some(info),
            Ok(None) => tracing::warn!("cluster info missing from storage"),
            Err(e) => {
                // Never stay half unsealed (barrier open, HA still sealed): seal again.
                self.barrier.seal();
                return Err(e);
            }
        }
        self.metrics.core_unsealed.set(1);
        self.ha.set_sealed(false);
        tracing::info!("vault is unsealed");
        Ok(())
    }

    /// Clears unseal progress (`reset: true`).
    pub fn reset_unseal(&self) {
        let mut u = self.unseal.lock().unwrap_or_else(|e| e.into_inner());
        u.parts.clear();
        u.nonce.clear();
    }

    /// Seals an active node cleanly: its term is torn down first (cluster listener closed,
    /// advertisement deleted, lock released) while the barrier is still open, then
    /// [`Node::seal`]. Bounded: after `timeout` it seals regardless.
    pub async fn seal_after_step_down(&self, timeout: std::time::Duration) {
        self.ha.set_sealed(true);
        if !self.ha.wait_sealed(timeout).await {
            tracing::warn!("active term did not end within {timeout:?}; sealing anyway");
        }
        self.seal();
    }

    /// Seals: drops the keyring, unseal progress, cluster identity and cached tokens.
    pub fn seal(&self) {
        // The keyring goes first, so nothing that reacts to the HA "sealed" notice (the
        // proxy's state stream) can still read it.
        self.barrier.seal();
        self.ha.set_sealed(true);
        self.metrics.core_unsealed.set(0);
        self.clear_caches();
        self.reset_unseal();
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = None;
        tracing::info!("vault is sealed");
    }
}

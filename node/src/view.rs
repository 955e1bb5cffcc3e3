//! [`View`]: the barrier as the secret-handling code sees it, optionally narrowed to a key
//! prefix (a mount's `logical/<uuid>/`, like Vault's `BarrierView`), carrying the fencing
//! token every write of an active node must present. Every token, policy, mount-table and KV
//! write goes through here, so the fence is threaded through exactly one place.

use vha_core::barrier::Barrier;
use vha_core::storage::Fence;

use crate::error::ApiError;

/// A prefix-scoped, fenced handle on the barrier. Cheap to create per request.
#[derive(Clone)]
pub struct View<'a> {
    barrier: &'a Barrier,
    fence: Option<Fence>,
    prefix: String,
    /// Writes fail with [`ApiError::NotActive`] (a node that stepped down).
    read_only: bool,
}

impl<'a> View<'a> {
    pub fn new(barrier: &'a Barrier, fence: Option<Fence>) -> Self {
        View {
            barrier,
            fence,
            prefix: String::new(),
            read_only: false,
        }
    }

    /// A view whose writes fail with [`ApiError::NotActive`]: for a node that is not (or no
    /// longer) active, so nothing it still runs can write without a fence.
    pub fn read_only(barrier: &'a Barrier) -> Self {
        View {
            read_only: true,
            ..View::new(barrier, None)
        }
    }

    fn writable(&self) -> Result<(), ApiError> {
        if self.read_only {
            Err(ApiError::NotActive)
        } else {
            Ok(())
        }
    }

    /// A view of the keys under `prefix` (which should end in `/`).
    pub fn sub(&self, prefix: &str) -> View<'a> {
        View {
            barrier: self.barrier,
            fence: self.fence.clone(),
            prefix: format!("{}{prefix}", self.prefix),
            read_only: self.read_only,
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    pub async fn get(&self, k: &str) -> Result<Option<Vec<u8>>, ApiError> {
        Ok(self.barrier.get(&self.key(k)).await?)
    }

    /// Reads and deserializes a JSON entry; a corrupt entry is a 500, never a panic.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, k: &str) -> Result<Option<T>, ApiError> {
        match self.get(k).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ApiError::Internal(format!("corrupt entry at {:?}: {e}", self.key(k)))),
        }
    }

    pub async fn put(&self, k: &str, v: &[u8]) -> Result<(), ApiError> {
        self.writable()?;
        Ok(self.barrier.put(&self.key(k), v, self.fence.as_ref()).await?)
    }

    /// Serializes and writes `v`. Given by value, `v` is dropped once serialized, before
    /// encryption (a large secret is not held once more than it must be); a reference works
    /// too.
    pub async fn put_json<T: serde::Serialize>(&self, k: &str, v: T) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(&v).map_err(|e| ApiError::Internal(e.to_string()))?;
        drop(v);
        self.put(k, &bytes).await
    }

    /// Writes several entries in order, in one store round trip where the store takes
    /// batches (a prefix may be written if it fails part-way).
    pub async fn put_batch(&self, entries: &[(&str, &[u8])]) -> Result<(), ApiError> {
        self.writable()?;
        let keys: Vec<String> = entries.iter().map(|(k, _)| self.key(k)).collect();
        let full: Vec<(&str, &[u8])> = keys.iter().zip(entries).map(|(k, (_, v))| (k.as_str(), *v)).collect();
        Ok(self.barrier.put_batch(&full, self.fence.as_ref()).await?)
    }

    pub async fn delete(&self, k: &str) -> Result<(), ApiError> {
        self.writable()?;
        Ok(self.barrier.delete(&self.key(k), self.fence.as_ref()).await?)
    }

    /// Immediate children of `prefix` (folders end in `/`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
        Ok(self.barrier.list(&self.key(prefix)).await?)
    }

    /// Deletes every key under `prefix`, depth first. Used when a mount is disabled (the
    /// mount is removed from the table first, so a crash mid-way leaves only unreachable
    /// garbage).
    pub async fn delete_tree(&self, prefix: &str) -> Result<(), ApiError> {
        let mut stack = vec![prefix.to_string()];
        while let Some(p) = stack.pop() {
            for child in self.list(&p).await? {
                let full = format!("{p}{child}");
                if child.ends_with('/') {
                    stack.push(full);
                } else {
                    self.delete(&full).await?;
                }
            }
        }
        Ok(())
    }
}

//! Durable file backend (data only, no HA), like Vault's `storage "file"`.
//!
//! Key `a/b/c` lives in `<path>/a/b/_c` (the `_` keeps a key and a folder of the same name
//! apart, as Vault's file backend does). Writes go to a temp file that is fsynced, renamed
//! over the target, and the directory fsynced, so a crash leaves the old or the new value,
//! never a torn one. The highest fencing token seen per lock is kept in `<path>/.fences`
//! (same atomic write) so fencing survives restarts.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{validate_key, validate_value_len, Backend, Entry, Fence, StorageError, MAX_LOCAL_VALUE_LEN};

/// First byte of every value file: lets a future format change be detected instead of
/// misread.
const FORMAT_V1: u8 = 1;
const FENCES_FILE: &str = ".fences";

/// The file backend.
pub struct FileBackend {
    root: PathBuf,
    /// Serializes writers so the fence check and the write are one atomic step.
    fences: Arc<Mutex<HashMap<String, u64>>>,
}

impl FileBackend {
    /// Opens (creating if needed, mode 0700) the directory `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        create_private_dir(&root)?;
        let fences_path = root.join(FENCES_FILE);
        let fences = match fs::read(&fences_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StorageError::Corrupt(format!("{}: {e}", fences_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(StorageError::io(fences_path.display(), e)),
        };
        Ok(FileBackend {
            root,
            fences: Arc::new(Mutex::new(fences)),
        })
    }

    fn file_for(&self, key: &str) -> PathBuf {
        let (dir, name) = match key.rfind('/') {
            Some(i) => (&key[..i], &key[i + 1..]),
            None => ("", key),
        };
        let mut p = self.root.clone();
        if !dir.is_empty() {
            p.push(dir);
        }
        p.push(format!("_{name}"));
        p
    }

    /// Applies the fencing rule and persists a raised high-water mark before the write.
    /// One entry write (`put` or `create`, which differ only in `write`): key and size
    /// checked, the fence checked and recorded under the fence lock, which is held until the
    /// file is in place, so a stale writer can never land after a newer one.
    async fn write_entry<T: Send + 'static>(
        &self,
        key: &str,
        value: Vec<u8>,
        fence: Option<&Fence>,
        write: fn(&Path, &[&[u8]]) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        validate_key(key)?;
        validate_value_len(&value, MAX_LOCAL_VALUE_LEN)?;
        let mut fences = self.fences.lock().await;
        self.check_fence(&mut fences, fence)?;
        let path = self.file_for(key);
        let head = header(fence.map(|f| f.token));
        tokio::task::spawn_blocking(move || write(&path, &[&head, &value]))
            .await
            .map_err(|e| StorageError::Unavailable(format!("file worker failed: {e}")))?
    }

    fn check_fence(&self, fences: &mut HashMap<String, u64>, fence: Option<&Fence>) -> Result<(), StorageError> {
        let Some(f) = fence else { return Ok(()) };
        let highest = fences.get(&f.lock).copied().unwrap_or(0);
        if f.token < highest {
            return Err(StorageError::Fenced {
                lock: f.lock.clone(),
                token: f.token,
                highest,
            });
        }
        if f.token > highest {
            fences.insert(f.lock.clone(), f.token);
            let bytes = serde_json::to_vec(&*fences).map_err(|e| StorageError::Corrupt(e.to_string()))?;
            atomic_write(&self.root.join(FENCES_FILE), &[&bytes])?;
        }
        Ok(())
    }
}

fn create_private_dir(p: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| StorageError::io(p.display(), e))
}

/// Writes `parts` to a new temp file in `dir` and fsyncs it; returns its path.
fn synced_temp(dir: &Path, parts: &[&[u8]]) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()
    })();
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes `bytes` to `target` atomically and durably: temp file, fsync, rename, fsync dir.
fn atomic_write(target: &Path, parts: &[&[u8]]) -> Result<(), StorageError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let res = synced_temp(dir, parts).and_then(|tmp| {
        fs::rename(&tmp, target).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        fs::File::open(dir)?.sync_all()
    });
    res.map_err(|e| StorageError::io(target.display(), e))
}

/// Creates `target` with `parts` only if it does not exist, atomically and durably: a synced
/// temp file is hard-linked to `target` (`link` fails when the target exists, also against
/// another process), then removed; the directory is fsynced. `Ok(false)` when `target`
/// existed.
fn atomic_create(target: &Path, parts: &[&[u8]]) -> Result<bool, StorageError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let res = synced_temp(dir, parts).and_then(|tmp| {
        let linked = fs::hard_link(&tmp, target);
        fs::remove_file(&tmp)?;
        let created = match linked {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        fs::File::open(dir)?.sync_all()?;
        Ok(created)
    });
    res.map_err(|e| StorageError::io(target.display(), e))
}

/// The header written before a value: format, and the fencing token if any. The value
/// follows it in the same file (written from its own buffer, not copied behind the header).
fn header(token: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.push(FORMAT_V1);
    match token {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_be_bytes());
        }
        None => out.push(0),
    }
    out
}

/// Splits a file's bytes into value and fencing token, reusing the buffer for the value.
fn decode(path: &Path, mut bytes: Vec<u8>) -> Result<(Vec<u8>, Option<u64>), StorageError> {
    let corrupt = || StorageError::Corrupt(format!("{}: bad value header", path.display()));
    let (len, token) = match bytes.get(..2) {
        Some([FORMAT_V1, 0]) => (2, None),
        Some([FORMAT_V1, 1]) if bytes.len() >= 10 => {
            let t = u64::from_be_bytes(bytes[2..10].try_into().map_err(|_| corrupt())?);
            (10, Some(t))
        }
        _ => return Err(corrupt()),
    };
    bytes.drain(..len);
    Ok((bytes, token))
}

#[async_trait]
impl Backend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StorageError> {
        validate_key(key)?;
        let path = self.file_for(key);
        let key = key.to_string();
        tokio::task::spawn_blocking(move || match fs::read(&path) {
            Ok(bytes) => {
                let (value, fence_token) = decode(&path, bytes)?;
                Ok(Some(Entry {
                    key,
                    value,
                    fence_token,
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // A folder component that is a file means the key cannot exist.
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Ok(None),
            Err(e) => Err(StorageError::io(path.display(), e)),
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("file worker failed: {e}")))?
    }

    async fn put(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<(), StorageError> {
        self.write_entry(key, value, fence, atomic_write).await
    }

    async fn create(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<bool, StorageError> {
        self.write_entry(key, value, fence, atomic_create).await
    }

    async fn delete(&self, key: &str, fence: Option<&Fence>) -> Result<(), StorageError> {
        validate_key(key)?;
        let mut fences = self.fences.lock().await;
        self.check_fence(&mut fences, fence)?;
        let path = self.file_for(key);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(StorageError::io(path.display(), e)),
            }
            // Remove now-empty folders up to the root, as Vault does, so listings stay clean.
            let mut dir = path.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                if d == root || fs::remove_dir(&d).is_err() {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
            if let Some(parent) = path.parent() {
                if let Ok(f) = fs::File::open(parent) {
                    let _ = f.sync_all();
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("file worker failed: {e}")))?
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let (dir, start) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        if !dir.is_empty() {
            validate_key(dir)?;
        }
        let path = if dir.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir)
        };
        let start = start.to_string();
        tokio::task::spawn_blocking(move || {
            let rd = match fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(StorageError::io(path.display(), e)),
            };
            let mut out = Vec::new();
            for ent in rd {
                let ent = ent.map_err(|e| StorageError::io(path.display(), e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                let is_dir = ent.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let child = if is_dir {
                    format!("{name}/")
                } else if let Some(n) = name.strip_prefix('_') {
                    n.to_string()
                } else {
                    continue; // temp files, .fences
                };
                if child.starts_with(&start) {
                    out.push(child[start.len()..].to_string());
                }
            }
            out.retain(|c| !c.is_empty());
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("file worker failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    /// The file backend passes the shared KV conformance suite.
    #[tokio::test]
    async fn conformance_kv() {
        let dir = tempfile::tempdir().unwrap();
        conformance::exercise_backend(&FileBackend::open(dir.path()).unwrap()).await;
    }

    /// Data and fencing high-water marks survive reopening the directory.
    #[tokio::test]
    async fn durable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence {
            lock: "core/lock".into(),
            token: 9,
        };
        {
            let b = FileBackend::open(dir.path()).unwrap();
            b.put("a/b", b"v".to_vec(), Some(&f)).await.unwrap();
        }
        let b = FileBackend::open(dir.path()).unwrap();
        let e = b.get("a/b").await.unwrap().unwrap();
        assert_eq!(e.value, b"v");
        assert_eq!(e.fence_token, Some(9));
        let stale = Fence {
            lock: "core/lock".into(),
            token: 8,
        };
        assert!(matches!(
            b.put("a/b", b"w".to_vec(), Some(&stale)).await,
            Err(StorageError::Fenced { .. })
        ));
    }

    /// The file store takes values over the network stores' `MAX_VALUE_LEN` (an operator may
    /// raise `max_request_size`), up to its own `MAX_LOCAL_VALUE_LEN`.
    #[tokio::test]
    async fn values_over_the_network_limit() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        let big = vec![7u8; crate::storage::MAX_VALUE_LEN + 1];
        b.put("big", big.clone(), None).await.unwrap();
        assert_eq!(b.get("big").await.unwrap().unwrap().value, big);
    }

    /// A key and a folder with the same name coexist (Vault's `_` file prefix).
    #[tokio::test]
    async fn key_and_folder_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        b.put("x", b"1".to_vec(), None).await.unwrap();
        b.put("x/y", b"2".to_vec(), None).await.unwrap();
        assert_eq!(b.get("x").await.unwrap().unwrap().value, b"1");
        assert_eq!(b.list("").await.unwrap(), vec!["x", "x/"]);
    }
}

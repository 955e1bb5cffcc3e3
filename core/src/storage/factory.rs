//! Opens the backends a configuration names (`storage` and optional `ha_storage`) and
//! decides, as Vault does, whether HA is available: the data store's own HA when it has it
//! and `ha_enabled` is not off, or the separate `ha_storage`, which must be HA-capable.
//!
//! With an `ha_storage`, several nodes share one lock, so their data must live in a store
//! they all reach and that checks fencing tokens durably (lockd, etcd): `file` keeps its
//! fence high-water mark in one process's memory and `inmem` is one process's memory, so a
//! deposed active elsewhere could still write. Such a pairing is refused at start.

use std::sync::Arc;

use crate::config::{Config, ConfigError, Stanza};

use super::etcd::EtcdBackend;
use super::file::FileBackend;
use super::inmem::InmemBackend;
use super::lockd::client::{PreparedCredentials, CREDENTIAL_KEYS};
use super::lockd::LockdBackend;
use super::{Backend, HaBackend, Stores};

/// One opened backend: its data side, and its HA side when it can do HA and HA is enabled.
struct Opened {
    data: Arc<dyn Backend>,
    ha: Option<Arc<dyn HaBackend>>,
    /// The backend can do HA (whether or not `ha_enabled` switched it off).
    ha_capable: bool,
    /// The lockd client, whose credentials a reload can replace.
    lockd: Option<Arc<LockdBackend>>,
}

fn open_one(st: &Stanza) -> Result<Opened, ConfigError> {
    match st.kind.as_str() {
        "file" => {
            st.check_known(&["path"])?;
            let path = st.require("path")?;
            let b = FileBackend::open(path).map_err(|e| st.error("path", e.to_string()))?;
            Ok(Opened {
                data: Arc::new(b),
                ha: None,
                ha_capable: false,
                lockd: None,
            })
        }
        "inmem" => {
            st.check_known(&["ha_enabled"])?;
            let b = InmemBackend::new();
            let ha_enabled = st.get_bool("ha_enabled", true)?;
            let ha: Option<Arc<dyn HaBackend>> = if ha_enabled { Some(Arc::new(b.clone())) } else { None };
            Ok(Opened {
                data: Arc::new(b),
                ha,
                ha_capable: true,
                lockd: None,
            })
        }
        "lockd" => {
            let b = Arc::new(LockdBackend::from_stanza(st)?);
            let ha: Option<Arc<dyn HaBackend>> = if st.get_bool("ha_enabled", true)? {
                Some(b.clone() as Arc<dyn HaBackend>)
            } else {
                None
            };
            Ok(Opened {
                data: b.clone(),
                ha,
                ha_capable: true,
                lockd: Some(b),
            })
        }
        "etcd" => {
            // Vault's semantics: HA only with `ha_enabled = "true"` (default off).
            let b = Arc::new(EtcdBackend::from_stanza(st)?);
            let ha: Option<Arc<dyn HaBackend>> = if b.ha_enabled() {
                Some(b.clone() as Arc<dyn HaBackend>)
            } else {
                None
            };
            Ok(Opened {
                data: b,
                ha,
                ha_capable: true,
                lockd: None,
            })
        }
        other => Err(ConfigError::Invalid {
            file: st.file.clone(),
            line: st.line,
            key: st.block.to_string(),
            msg: format!("unknown storage type {other:?} (supported: file, inmem, lockd, etcd)"),
        }),
    }
}

/// What was opened, plus the banner's storage lines.
pub struct OpenedStores {
    pub stores: Stores,
    /// `Storage:` line value, e.g. `file`, `lockd (HA available)`, `etcd (HA disabled)`.
    pub storage_line: String,
    /// `HA Storage:` line value in split mode.
    pub ha_storage_line: Option<String>,
    /// The lockd clients, for [`Credentials::reload`].
    pub credentials: Credentials,
}

/// The lockd clients a configuration opened, with the block each came from: a reload hands
/// them the credentials the file names now (a rotated `token_file`, new TLS files).
#[derive(Clone, Default)]
pub struct Credentials {
    clients: Vec<(&'static str, Arc<LockdBackend>)>,
}

impl Credentials {
    fn from_opened(opened: &[(&'static str, &Opened)]) -> Credentials {
        Credentials {
            clients: opened
                .iter()
                .filter_map(|(block, o)| o.lockd.clone().map(|c| (*block, c)))
                .collect(),
        }
    }

    /// Re-reads the credentials of every lockd client from `cfg`'s stanza of the same
    /// block, all or nothing: every one is read and connected first, and only when all
    /// succeeded are they put in use (requests already sent finish as they were). A block
    /// that is no longer lockd, or names another address, is left alone ([`restart_needed`]
    /// reports it).
    pub fn reload(&self, cfg: &Config) -> Result<(), ConfigError> {
        let mut prepared: Vec<(&Arc<LockdBackend>, PreparedCredentials)> = Vec::new();
        for (block, client) in &self.clients {
            let stanza = match *block {
                "ha_storage" => cfg.ha_storage.as_ref(),
                _ => Some(&cfg.storage),
            };
            let Some(s) = stanza.filter(|s| s.kind == "lockd") else {
                continue;
            };
            if s.get("address").map(|a| a.trim_end_matches('/')) != Some(client.address()) {
                continue;
            }
            prepared.push((client, client.prepare_credentials(s)?));
        }
        let n = prepared.len();
        for (client, p) in prepared {
            client.install_credentials(p);
        }
        if n > 0 {
            tracing::info!(clients = n, "lockd client credentials reloaded");
        }
        Ok(())
    }
}

/// The storage blocks (`storage`, `ha_storage`) that differ between `old` and `new` in a way
/// only a restart applies: any change but to the credentials of a lockd stanza, which
/// [`Credentials::reload`] applies. A stanza that only moved in the file is the same stanza.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let changed = |a: Option<&Stanza>, b: Option<&Stanza>| match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            let ignore = if a.kind == "lockd" && b.kind == "lockd" {
                CREDENTIAL_KEYS
            } else {
                &[]
            };
            !a.same_settings(b, ignore)
        }
        _ => true,
    };
    let mut out = Vec::new();
    if changed(Some(&old.storage), Some(&new.storage)) {
        out.push("storage");
    }
    if changed(old.ha_storage.as_ref(), new.ha_storage.as_ref()) {
        out.push("ha_storage");
    }
    out
}

/// Opens the configured stores.
pub fn open_stores(cfg: &Config) -> Result<OpenedStores, ConfigError> {
    let data = open_one(&cfg.storage)?;
    match &cfg.ha_storage {
        None => {
            let credentials = Credentials::from_opened(&[("storage", &data)]);
            let storage_line = match (&data.ha, data.ha_capable) {
                (Some(_), _) => format!("{} (HA available)", cfg.storage.kind),
                (None, true) => format!("{} (HA disabled)", cfg.storage.kind),
                (None, false) => cfg.storage.kind.clone(),
            };
            Ok(OpenedStores {
                stores: Stores {
                    data: data.data,
                    ha: data.ha,
                    split: false,
                },
                storage_line,
                ha_storage_line: None,
                credentials,
            })
        }
        Some(hs) => {
            let ha = open_one(hs)?;
            let credentials = Credentials::from_opened(&[("storage", &data), ("ha_storage", &ha)]);
            let Some(ha_backend) = ha.ha else {
                let why = if ha.ha_capable {
                    "ha_storage must have HA enabled (ha_enabled = \"true\")".to_string()
                } else {
                    format!(
                        "the {:?} backend cannot be used as ha_storage: it does not support HA",
                        hs.kind
                    )
                };
                return Err(ConfigError::Invalid {
                    file: hs.file.clone(),
                    line: hs.line,
                    key: "ha_storage".into(),
                    msg: why,
                });
            };
            if matches!(cfg.storage.kind.as_str(), "file" | "inmem") {
                return Err(ConfigError::Invalid {
                    file: cfg.storage.file.clone(),
                    line: cfg.storage.line,
                    key: "storage".into(),
                    msg: format!(
                        "storage {:?} cannot be used with ha_storage: nodes that share an HA lock must keep their \
                         data in a shared store that fences writes (storage \"lockd\" or \"etcd\"); the {} \
                         backend is local to one process",
                        cfg.storage.kind, cfg.storage.kind
                    ),
                });
            }
            Ok(OpenedStores {
                stores: Stores {
                    data: data.data,
                    ha: Some(ha_backend),
                    split: true,
                },
                storage_line: cfg.storage.kind.clone(),
                ha_storage_line: Some(hs.kind.clone()),
                credentials,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{parse_str, MapEnv};

    fn open(src: &str) -> Result<OpenedStores, ConfigError> {
        let cfg = parse_str(src, Path::new("node.hcl"), &MapEnv::default()).expect("parses");
        open_stores(&cfg)
    }

    /// `file` or `inmem` data with an `ha_storage` is refused with an error naming the file,
    /// the storage stanza's line and the shared stores to use instead; a shared data store
    /// with an `ha_storage` is accepted.
    #[test]
    fn local_data_store_with_ha_storage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let listener = "listener \"tcp\" {\n  tls_disable = true\n}\n";
        for data in [
            format!("storage \"file\" {{\n  path = \"{}\"\n}}\n", dir.path().display()),
            "storage \"inmem\" {}\n".to_string(),
        ] {
            let src = format!("\n{data}ha_storage \"inmem\" {{}}\n{listener}");
            let e = open(&src).err().expect("refused").to_string();
            assert!(e.starts_with("node.hcl:2: storage: storage "), "{e}");
            assert!(
                e.contains("cannot be used with ha_storage") && e.contains("\"lockd\" or \"etcd\""),
                "{e}"
            );
        }
        let src = format!("storage \"lockd\" {{\n  address = \"http://127.0.0.1:1\"\n  ha_enabled = \"false\"\n}}\nha_storage \"inmem\" {{}}\n{listener}");
        assert!(open(&src).unwrap().stores.split);
    }
}

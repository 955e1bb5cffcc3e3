//! vha-lockd: the embedded HA store. One small daemon holding leased locks with fencing
//! tokens, watches, and (optionally) all of Vault's data in a durable KV map.
//!
//! - [`lease`]: the pure lease state machine (events + injected clock -> effects).
//! - [`log`]: checksummed log records and snapshots; [`store`]: group commit, compaction,
//!   recovery; [`server`]: HTTP/2 + JSON protocol (`PROTOCOL.md`); [`metrics`]: `vha_lockd_*`.
//! - [`config`] and [`cli`]: `vha lockd ...`; [`bench`]: lockd vs etcd guarded writes.
//! - The client lives in `vha_core::storage::lockd`, so nodes and proxies need not depend on
//!   this crate.
//!
//! lockd is a single point of failure by design; etcd is the distributed alternative.

pub mod bench;
pub mod cli;
pub mod config;
pub mod error;
pub mod lease;
pub mod log;
pub mod metrics;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::LockdConfig;
pub use error::{LockdError, StoreError};

/// A running lockd inside this process (the CLI runs one; tests may too).
pub struct Daemon {
    pub addr: SocketAddr,
    pub store: store::Store,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Opens the store, binds the listener and starts serving.
    pub async fn start(cfg: &LockdConfig) -> Result<Daemon, String> {
        let metrics = Arc::new(metrics::Metrics::new());
        let store = store::Store::open(
            store::StoreOptions {
                data_dir: cfg.data_dir.clone(),
                compact_bytes: cfg.compact_bytes,
            },
            metrics,
        )
        .map_err(|e| e.to_string())?;
        let tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", cfg.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let limits = server::LeaseLimits {
            default_ttl: cfg.lease_ttl,
            min_ttl: cfg.min_lease_ttl,
            max_ttl: cfg.max_lease_ttl,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve(listener, store.clone(), limits, tls, shutdown.clone()));
        Ok(Daemon {
            addr,
            store,
            shutdown,
            task,
        })
    }

    /// Stops serving and flushes the log.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

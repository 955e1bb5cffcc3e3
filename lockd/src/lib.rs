//! vha-lockd: the embedded HA store. One small daemon holding leased locks with fencing
//! tokens, watches, and (optionally) all of Vault's data in a durable KV map.
//!
//! - [`lease`]: the pure lease state machine (events + injected clock -> effects).
//! - [`log`]: checksummed log records and snapshots; [`store`]: group commit, compaction,
//!   recovery; [`server`]: HTTP/2 + JSON protocol (`PROTOCOL.md`); [`metrics`]: `vha_lockd_*`.
//! - [`config`] and [`cli`]: `vha lockd ...` (its benchmarks, `vha lockd bench`, are
//!   operations tooling in `vha-ops`).
//! - The client lives in `vha_core::storage::lockd`, so nodes and proxies need not depend on
//!   this crate.
//!
//! lockd is a single point of failure by design; etcd is the distributed alternative.

pub(crate) mod auth;
pub mod cli;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod kvmap;
pub(crate) mod lease;
pub mod log;
pub(crate) mod metrics;
pub(crate) mod server;
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
    /// The served certificate (with TLS), replaced by [`Daemon::reload`].
    served: Option<Arc<vha_core::served_cert::ServedCert>>,
    /// Shared with every connection, so a reloaded token applies to the next request.
    tokens: auth::TokenCheck,
    /// The configuration in force, to tell what a reload changes.
    running: std::sync::Mutex<LockdConfig>,
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
        let config_file = std::path::Path::new("<config>");
        let (tls, served) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(c), Some(k)) => {
                let (acceptor, served) = tls_acceptor(c, k, cfg.tls_client_ca_file.as_deref())
                    .map_err(|(key, m)| cfg.error(config_file, key, m).to_string())?;
                store
                    .metrics()
                    .tls_expiry
                    .with_label_values(&["lockd"])
                    .set(served.not_after());
                (Some(acceptor), Some(served))
            }
            _ => (None, None),
        };
        let token = match &cfg.token_file {
            Some(p) => Some(
                vha_core::storage::lockd::auth::read_token_list(p)
                    .map_err(|m| cfg.error(config_file, "token_file", m).to_string())?,
            ),
            None => None,
        };
        let tokens = auth::TokenCheck::new(token);
        if !cfg.authenticates() {
            if cfg.listen.ip().is_loopback() {
                tracing::warn!(
                    listen = %cfg.listen,
                    "lockd runs without authentication: any process on this host can read and change its data; \
                     set token_file and/or tls_client_ca_file"
                );
            } else {
                tracing::warn!(
                    listen = %cfg.listen,
                    "INSECURE: lockd listens on a non-loopback address without authentication \
                     (insecure_no_auth): anyone who can reach it can read every entry, delete the keyring \
                     or release the HA lock"
                );
            }
        } else if cfg.tls_cert_file.is_none() && !cfg.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %cfg.listen,
                "lockd's bearer token travels without TLS on a non-loopback address: set tls_cert_file and \
                 tls_key_file so it cannot be read off the network"
            );
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", cfg.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let limits = server::Limits {
            default_ttl: cfg.lease_ttl,
            min_ttl: cfg.min_lease_ttl,
            max_ttl: cfg.max_lease_ttl,
            max_value: cfg.max_value_size,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve(
            listener,
            store.clone(),
            limits,
            server::Security {
                tls,
                tokens: tokens.clone(),
            },
            shutdown.clone(),
        ));
        Ok(Daemon {
            addr,
            store,
            shutdown,
            task,
            served,
            tokens,
            running: std::sync::Mutex::new(cfg.clone()),
        })
    }

    /// Applies a re-read configuration (SIGHUP): the served certificate and key and the
    /// bearer token from `token_file`. New connections and requests use them at once; open
    /// connections keep the handshake they made. On error nothing changed. Returns the
    /// settings that differ but only take effect after a restart.
    pub fn reload(&self, new: &LockdConfig, file: &std::path::Path) -> Result<Vec<&'static str>, String> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let token = match (&new.token_file, self.tokens.enabled()) {
            (Some(p), true) => Some(
                vha_core::storage::lockd::auth::read_token_list(p)
                    .map_err(|m| new.error(file, "token_file", m).to_string())?,
            ),
            _ => None,
        };
        if let (Some(served), Some(c), Some(k)) = (&self.served, &new.tls_cert_file, &new.tls_key_file) {
            let not_after = served
                .reload(c, k)
                .map_err(|e| new.error(file, e.key, format!("{}: {}", e.file, e.message)).to_string())?;
            self.store
                .metrics()
                .tls_expiry
                .with_label_values(&["lockd"])
                .set(not_after);
        }
        if let Some(t) = token {
            self.tokens
                .replace(t)
                .map_err(|m| new.error(file, "token_file", m).to_string())?;
        }
        let restart = running.restart_needed(new);
        *running = new.clone();
        Ok(restart)
    }

    /// Stops serving and flushes the log.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

/// The TLS acceptor: the server certificate, and with `client_ca` a verifier that requires
/// every client to present a certificate chaining to it. Errors name the setting.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<(tokio_rustls::TlsAcceptor, Arc<vha_core::served_cert::ServedCert>), (&'static str, String)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let served = Arc::new(
        vha_core::served_cert::ServedCert::load(cert, key)
            .map_err(|e| (e.key, format!("{}: {}", e.file, e.message)))?,
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls_cert_file", e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let bad = |e: String| ("tls_client_ca_file", format!("{}: {e}", ca.display()));
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
                roots
                    .add(c.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate in the file".into()));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(served.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), served))
}

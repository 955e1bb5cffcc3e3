//! [`LockdBackend`]: one multiplexed HTTP/2 connection (h2c, or h2 over TLS) to lockd,
//! re-established with backoff when it breaks, plus the holder side of leases.
//!
//! # Lease safety on the holder side
//! A held lock is renewed every `renew_interval`. The holder's own deadline is
//! `last successful renew *sent* + ttl - margin`: lockd extends the lease from the moment it
//! *receives* the renew (never earlier than we sent it), so lockd cannot grant the lock to
//! anyone before `sent + ttl`, and we give up `margin` before that. `lost()` fires at that
//! deadline (or at once when lockd answers a renew with "expired/unknown lease"). A dropped
//! connection is not treated as loss by itself: we keep renewing until the deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth::LockdCredentials;
use super::protocol::{
    codes, paths, AcquireRequest, AcquireResponse, BatchPut, BatchRequest, CancelRequest, CancelResponse,
    DeleteRequest, DeleteResponse, ErrorBody, GetResponse, HolderResponse, KeyRequest, LeaseRequest, ListRequest,
    ListResponse, PutRequest, PutResponse, RenewResponse, WatchRequest, WireEvent, MAX_ACQUIRE_WAIT_MS,
    WATCH_DEAD_AFTER_MS,
};
use crate::config::{ConfigError, Stanza};
use crate::storage::{
    lease, validate_key, validate_value_len, Backend, Entry, Fence, HaBackend, Holder, LockGuard, LockRelease,
    LockTiming, StorageError, WatchEvent, WatchStream, MAX_LOCAL_VALUE_LEN, MAX_VALUE_LEN,
};

/// Default lease TTL: 10 s. Renewals every TTL/10 (1 s) mean a holder loses the lock only
/// after ~8 s without a single renewal getting through — far beyond the scheduling stalls we
/// measured with both cores saturated by a benchmark — so no false failovers. A crashed
/// node's lock is normally freed at once by its proxy (release-by-token, proof of death);
/// the TTL bounds failover only when the whole host pair vanishes. Vault uses 15 s.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
/// Default per-request timeout: generous, because a put waits for an fsync that a saturated
/// disk can stretch to seconds; lease safety never depends on it (renewals are bounded by
/// the holder deadline instead).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest `lock_ttl` a stanza may set: below this, scheduling jitter alone could lose a
/// healthy lock.
pub const MIN_STANZA_LOCK_TTL: Duration = Duration::from_millis(500);
/// How long one blocking acquire request waits server-side before asking again.
const ACQUIRE_WAIT: Duration = Duration::from_secs(10);
/// Reconnect backoff: start fast (a lockd restart takes milliseconds), cap at 1 s so a
/// watcher is back soon after lockd is.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Largest lease TTL the client believes from a server answer (a day): only a guard against
/// arithmetic overflow on a garbled answer, far above any sane `max_lease_ttl`.
const MAX_LEASE_TTL_MS: u64 = 86_400_000;
/// Watch event queue towards the consumer; overflow turns into `Resync`.
const WATCH_QUEUE: usize = 1024;

impl Default for LockTiming {
    fn default() -> Self {
        Self::from_ttl(DEFAULT_LOCK_TTL)
    }
}

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What the credentials decide: the connections (their TLS material) and the token. A
/// credentials reload ([`LockdBackend::prepare_credentials`]) replaces it whole; requests
/// already sent finish on the connections they took, new ones use the new material.
struct Conn {
    /// Data, watches and snapshots.
    http: Http,
    /// Lock operations (acquire, renew, release, holder, cancel) on a connection of their own:
    /// an HTTP/2 connection carrying a large value (or many) must not delay a renewal past the
    /// holder's deadline.
    lease_http: Http,
    /// `Authorization: Bearer ...` (sensitive) when the credentials carry a token.
    auth: Option<http::HeaderValue>,
}

struct Inner {
    /// Shared by every clone and every `with_*` variant, so one reload reaches them all.
    conn: Arc<std::sync::RwLock<Arc<Conn>>>,
    base: String,
    timeout: Duration,
    timing: LockTiming,
    ha_enabled: bool,
    /// Largest value this client sends (`max_value_size`; lockd must allow as much).
    max_value: usize,
}

/// New credentials for a [`LockdBackend`], checked and connected, not yet in use
/// ([`LockdBackend::install_credentials`]).
pub struct PreparedCredentials(Arc<Conn>);

/// A client of lockd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct LockdBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LockdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockdBackend")
            .field("address", &self.inner.base)
            .finish()
    }
}

/// Accepts any server certificate (`dangerous_tls_skip_verify`): for tests only.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Which setting a TLS set-up error is about, so config errors can name the key.
enum TlsSetupError {
    Ca(String),
    ClientCert(String),
}

fn tls_config(creds: &LockdCredentials) -> Result<rustls::ClientConfig, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Ca(e.to_string()))?;
    let builder = if creds.dangerous_tls_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(p) = &creds.tls_ca_file {
            let certs =
                CertificateDer::pem_file_iter(p).map_err(|e| TlsSetupError::Ca(format!("{}: {e}", p.display())))?;
            for c in certs {
                roots
                    .add(c.map_err(|e| TlsSetupError::Ca(format!("{}: {e}", p.display())))?)
                    .map_err(|e| TlsSetupError::Ca(format!("{}: {e}", p.display())))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    match (&creds.tls_cert_file, &creds.tls_key_file) {
        (Some(c), Some(k)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsSetupError::ClientCert(format!("{}: {e}", c.display())))?;
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| TlsSetupError::ClientCert(format!("{}: {e}", k.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsSetupError::ClientCert(format!("client certificate and key: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(TlsSetupError::ClientCert(
            "tls_cert_file and tls_key_file must be set together".into(),
        )),
    }
}

/// Why a client could not be built, by the setting it concerns.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("{0}")]
    Address(String),
    #[error("{0}")]
    Token(String),
    #[error("{0}")]
    Ca(String),
    #[error("{0}")]
    ClientCert(String),
    #[error("{0}")]
    ServerName(String),
}

/// The stanza's credentials, with the checks that depend on the address's scheme.
fn checked_credentials(s: &Stanza, address: &str) -> Result<LockdCredentials, ConfigError> {
    let creds = credentials_from_stanza(s)?;
    let https = address.starts_with("https://");
    if https && creds.tls_ca_file.is_none() && !creds.dangerous_tls_skip_verify {
        return Err(s.error(
            "tls_ca_file",
            "an https address needs tls_ca_file (or dangerous_tls_skip_verify)",
        ));
    }
    if !https {
        for key in ["tls_cert_file", "tls_server_name"] {
            if s.get(key).is_some() {
                return Err(s.error(key, "needs an https:// address"));
            }
        }
    }
    Ok(creds)
}

/// A [`BuildError`] as a config error on the key that caused it.
fn build_error(s: &Stanza, e: BuildError) -> ConfigError {
    let key = match &e {
        BuildError::Address(_) => "address",
        BuildError::Token(_) => {
            if s.get("token").is_some() {
                "token"
            } else {
                "token_file"
            }
        }
        BuildError::Ca(_) => "tls_ca_file",
        BuildError::ClientCert(_) => "tls_cert_file",
        BuildError::ServerName(_) => "tls_server_name",
    };
    s.error(key, e.to_string())
}

/// The stanza keys [`LockdBackend::prepare_credentials`] applies while running: a change to
/// any other key takes a restart.
pub const CREDENTIAL_KEYS: &[&str] = &[
    "token",
    "token_file",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
];

/// The environment variable a lockd token is read from when the stanza names none.
pub const TOKEN_ENV: &str = "VHA_LOCKD_TOKEN";

/// The credentials a `storage`/`ha_storage "lockd"` stanza configures (paths relative to the
/// config file's directory). `token` and `token_file` exclude each other; without either,
/// [`TOKEN_ENV`] is used when set.
fn credentials_from_stanza(s: &Stanza) -> Result<LockdCredentials, ConfigError> {
    let path = |key: &str| {
        s.get(key).map(|p| {
            let p = Path::new(p);
            if p.is_relative() {
                s.file.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p.to_path_buf()
            }
        })
    };
    let mut creds = match (s.get("token"), path("token_file")) {
        (Some(_), Some(_)) => return Err(s.error("token_file", "set either token or token_file, not both")),
        (Some(t), None) => LockdCredentials::token(t).map_err(|e| s.error("token", e))?,
        (None, Some(p)) => LockdCredentials::token_file(&p).map_err(|e| s.error("token_file", e))?,
        (None, None) => match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.is_empty() => {
                LockdCredentials::token(t).map_err(|e| s.error("token", format!("{TOKEN_ENV}: {e}")))?
            }
            _ => LockdCredentials::default(),
        },
    };
    creds.tls_ca_file = path("tls_ca_file");
    creds.tls_cert_file = path("tls_cert_file");
    creds.tls_key_file = path("tls_key_file");
    if creds.tls_cert_file.is_some() != creds.tls_key_file.is_some() {
        let key = if creds.tls_cert_file.is_some() {
            "tls_key_file"
        } else {
            "tls_cert_file"
        };
        return Err(s.error(key, "tls_cert_file and tls_key_file must be set together"));
    }
    creds.tls_server_name = s.get("tls_server_name").map(str::to_string);
    creds.dangerous_tls_skip_verify = s.get_bool("dangerous_tls_skip_verify", false)?;
    Ok(creds)
}

enum CallError {
    /// lockd answered with an error body.
    Status(StatusCode, ErrorBody),
    /// No (usable) answer: connection refused/reset, timeout, garbage.
    Transport(String),
}

fn to_storage(e: CallError) -> StorageError {
    match e {
        CallError::Transport(m) => StorageError::Unavailable(m),
        CallError::Status(status, b) => {
            let msg = b.errors.join("; ");
            match b.code.as_str() {
                codes::FENCED => StorageError::Fenced {
                    lock: b.lock.unwrap_or_default(),
                    token: b.token.unwrap_or(0),
                    highest: b.highest.unwrap_or(0),
                },
                codes::INVALID | codes::MALFORMED | codes::TOO_LARGE | codes::CAS_MISMATCH => {
                    StorageError::Invalid(msg)
                }
                codes::LEASE_EXPIRED | codes::UNKNOWN_LEASE => StorageError::LockLost(b.lock.unwrap_or_default()),
                codes::UNAUTHORIZED => StorageError::Unauthorized(format!("lockd answered {status}: {msg}")),
                _ => StorageError::Unavailable(format!("lockd answered {status}: {msg}")),
            }
        }
    }
}

impl LockdBackend {
    fn build(
        address: &str,
        timeout: Duration,
        timing: LockTiming,
        ha_enabled: bool,
        creds: &LockdCredentials,
        max_value: usize,
    ) -> Result<LockdBackend, BuildError> {
        let url =
            url::Url::parse(address).map_err(|e| BuildError::Address(format!("{address:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(BuildError::Address(format!(
                "{address:?} must be http://HOST:PORT or https://HOST:PORT"
            )));
        }
        Ok(LockdBackend {
            inner: Arc::new(Inner {
                conn: Arc::new(std::sync::RwLock::new(Arc::new(Self::connect_parts(timeout, creds)?))),
                base: address.trim_end_matches('/').to_string(),
                timeout,
                timing,
                ha_enabled,
                max_value,
            }),
        })
    }

    /// The clients and the header `creds` make.
    fn connect_parts(timeout: Duration, creds: &LockdCredentials) -> Result<Conn, BuildError> {
        let auth = creds.authorization().map_err(BuildError::Token)?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let tls = tls_config(creds).map_err(|e| match e {
            TlsSetupError::Ca(m) => BuildError::Ca(m),
            TlsSetupError::ClientCert(m) => BuildError::ClientCert(m),
        })?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let builder = match &creds.tls_server_name {
            Some(name) => {
                let name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| BuildError::ServerName(format!("{name:?}: {e}")))?;
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let conn = builder.enable_http2().wrap_connector(http);
        // Two clients, two pools: each keeps its own connection.
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(conn.clone());
        let lease_client = Client::builder(TokioExecutor::new()).http2_only(true).build(conn);
        Ok(Conn {
            http: client,
            lease_http: lease_client,
            auth,
        })
    }

    fn conn(&self) -> Arc<Conn> {
        self.inner.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A client with default settings and no credentials for `address`
    /// (`http://127.0.0.1:PORT`), for tools and tests against a lockd without authentication.
    pub fn connect(address: &str) -> Result<LockdBackend, StorageError> {
        Self::connect_with(address, &LockdCredentials::default())
    }

    /// A client with default settings that authenticates with `creds`.
    pub fn connect_with(address: &str, creds: &LockdCredentials) -> Result<LockdBackend, StorageError> {
        Self::build(
            address,
            DEFAULT_REQUEST_TIMEOUT,
            LockTiming::default(),
            true,
            creds,
            MAX_VALUE_LEN,
        )
        .map_err(|e| StorageError::Invalid(e.to_string()))
    }

    /// The same client with different lease timing (tests use short TTLs).
    pub fn with_timing(&self, timing: LockTiming) -> LockdBackend {
        self.variant(timing, self.inner.timeout)
    }

    /// The same client with a different per-request timeout (tests use short ones).
    pub fn with_request_timeout(&self, timeout: Duration) -> LockdBackend {
        self.variant(self.inner.timing, timeout)
    }

    /// The same client (same connections and credentials) with other timing settings.
    fn variant(&self, timing: LockTiming, timeout: Duration) -> LockdBackend {
        let i = &self.inner;
        LockdBackend {
            inner: Arc::new(Inner {
                conn: i.conn.clone(),
                base: i.base.clone(),
                timeout,
                timing,
                ha_enabled: i.ha_enabled,
                max_value: i.max_value,
            }),
        }
    }

    /// From a `storage "lockd" {...}` / `ha_storage "lockd" {...}` stanza. Options:
    /// `address` (required), `ha_enabled` (default true), `lock_ttl` (default 10 s, at least
    /// 500 ms), `request_timeout` (default 10 s), `max_value_size` (default 32 MiB + 4 KiB, as
    /// lockd's; raise both together for larger secrets, up to 1 GiB + 4 KiB); credentials: `token` or `token_file` (else
    /// the environment's `VHA_LOCKD_TOKEN`), `tls_ca_file`, `tls_cert_file` + `tls_key_file`
    /// (mutual TLS), `tls_server_name`, `dangerous_tls_skip_verify`.
    pub fn from_stanza(s: &Stanza) -> Result<LockdBackend, ConfigError> {
        s.check_known(&[
            "address",
            "ha_enabled",
            "lock_ttl",
            "request_timeout",
            "max_value_size",
            "token",
            "token_file",
            "tls_ca_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_server_name",
            "dangerous_tls_skip_verify",
        ])?;
        let address = s.require("address")?;
        let ha_enabled = s.get_bool("ha_enabled", true)?;
        let ttl = s.get_duration("lock_ttl", DEFAULT_LOCK_TTL)?;
        if ttl < MIN_STANZA_LOCK_TTL {
            return Err(s.error(
                "lock_ttl",
                format!("{ttl:?} is below the {MIN_STANZA_LOCK_TTL:?} minimum"),
            ));
        }
        let timeout = s.get_duration("request_timeout", DEFAULT_REQUEST_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(s.error("request_timeout", "must be positive"));
        }
        let max_value = match s.get("max_value_size") {
            None => MAX_VALUE_LEN,
            Some(v) => v
                .parse()
                .ok()
                .filter(|n| (1..=MAX_LOCAL_VALUE_LEN).contains(n))
                .ok_or_else(|| {
                    s.error(
                        "max_value_size",
                        format!("{v:?} is not a byte count from 1 to {MAX_LOCAL_VALUE_LEN}"),
                    )
                })?,
        };
        let creds = checked_credentials(s, address)?;
        Self::build(
            address,
            timeout,
            LockTiming::from_ttl(ttl),
            ha_enabled,
            &creds,
            max_value,
        )
        .map_err(|e| build_error(s, e))
    }

    /// Reads the credentials of `s` (the stanza this client was opened from, as the file
    /// says now: a rotated `token_file`, new TLS files) and connects with them, without
    /// using them yet. Errors name the file, line and key; nothing changes on error.
    pub fn prepare_credentials(&self, s: &Stanza) -> Result<PreparedCredentials, ConfigError> {
        let creds = checked_credentials(s, &self.inner.base)?;
        let conn = Self::connect_parts(self.inner.timeout, &creds).map_err(|e| build_error(s, e))?;
        Ok(PreparedCredentials(Arc::new(conn)))
    }

    /// Every request from now on uses `prepared`; requests already sent finish as they were.
    pub fn install_credentials(&self, prepared: PreparedCredentials) {
        *self.inner.conn.write().unwrap_or_else(|p| p.into_inner()) = prepared.0;
    }

    pub fn ha_enabled(&self) -> bool {
        self.inner.ha_enabled
    }

    pub fn timing(&self) -> LockTiming {
        self.inner.timing
    }

    pub fn address(&self) -> &str {
        &self.inner.base
    }

    fn request(&self, conn: &Conn, path: &str, body: Vec<u8>) -> Result<Request<Full<Bytes>>, CallError> {
        let mut req = Request::post(format!("{}{}", self.inner.base, path)).header("content-type", "application/json");
        if let Some(a) = &conn.auth {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        req.body(Full::new(Bytes::from(body)))
            .map_err(|e| CallError::Transport(e.to_string()))
    }

    async fn send(&self, path: &str, body: &[u8], timeout: Duration) -> Result<Response<Incoming>, CallError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = BACKOFF_MIN;
        loop {
            let conn = self.conn();
            let req = self.request(&conn, path, body.to_vec())?;
            let http = if path.starts_with("/v1/lock/") {
                &conn.lease_http
            } else {
                &conn.http
            };
            match tokio::time::timeout_at(deadline, http.request(req)).await {
                Err(_) => {
                    return Err(CallError::Transport(format!(
                        "lockd {path}: timed out after {timeout:?}"
                    )))
                }
                Ok(Ok(r)) => return Ok(r),
                // Only a failed connect is certainly not applied: retry those with backoff
                // (lockd restarting); anything else may have reached lockd.
                Ok(Err(e)) if e.is_connect() && Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Ok(Err(e)) => return Err(CallError::Transport(format!("lockd {path}: {e}"))),
            }
        }
    }

    async fn call_within<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        q: &Q,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let body = serde_json::to_vec(q).map_err(|e| CallError::Transport(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let resp = self.send(path, &body, timeout).await?;
        let status = resp.status();
        let bytes = tokio::time::timeout_at(deadline, resp.into_body().collect())
            .await
            .map_err(|_| CallError::Transport(format!("lockd {path}: timed out reading the answer")))?
            .map_err(|e| CallError::Transport(format!("lockd {path}: {e}")))?
            .to_bytes();
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| CallError::Transport(format!("lockd {path}: bad answer: {e}")))
        } else {
            let b = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                errors: vec![String::from_utf8_lossy(&bytes).into_owned()],
                code: String::new(),
                token: None,
                highest: None,
                lock: None,
            });
            Err(CallError::Status(status, b))
        }
    }

    async fn call<Q: Serialize, R: DeserializeOwned>(&self, path: &str, q: &Q) -> Result<R, StorageError> {
        self.call_within(path, q, self.inner.timeout).await.map_err(to_storage)
    }

    /// Compare-and-put: writes only when the key's revision is `prev_revision` (0 = absent).
    /// Returns the new revision.
    pub async fn compare_and_put(
        &self,
        key: &str,
        value: Vec<u8>,
        prev_revision: u64,
        fence: Option<&Fence>,
    ) -> Result<u64, StorageError> {
        let q = self.put_request(key, value, fence, Some(prev_revision))?;
        self.call::<_, PutResponse>(paths::KV_PUT, &q).await.map(|r| r.revision)
    }

    /// A put returning the revision it got.
    pub async fn put_rev(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<u64, StorageError> {
        let q = self.put_request(key, value, fence, None)?;
        self.call::<_, PutResponse>(paths::KV_PUT, &q).await.map(|r| r.revision)
    }

    /// A checked `kv/put` body.
    fn put_request(
        &self,
        key: &str,
        value: Vec<u8>,
        fence: Option<&Fence>,
        prev_revision: Option<u64>,
    ) -> Result<PutRequest, StorageError> {
        validate_key(key)?;
        validate_value_len(&value, self.inner.max_value)?;
        Ok(PutRequest {
            key: key.to_string(),
            value,
            fence: fence.cloned(),
            prev_revision,
        })
    }

    /// Streams lockd's snapshot into `out` as it arrives (never whole in memory); returns the
    /// bytes written. Each chunk must arrive within six request timeouts (lockd serializes a
    /// frozen view while serving writes, so a chunk is never held up by the data's size).
    /// The caller checks what it received: an early end shows as a snapshot without its end
    /// record.
    pub async fn snapshot_into<W: tokio::io::AsyncWrite + Unpin>(&self, out: &mut W) -> Result<u64, StorageError> {
        use tokio::io::AsyncWriteExt;
        let timeout = self.inner.timeout * 6;
        let unavailable = |e: String| StorageError::Unavailable(format!("lockd snapshot: {e}"));
        let resp = self.send(paths::SNAPSHOT, b"{}", timeout).await.map_err(to_storage)?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = tokio::time::timeout(timeout, body.collect())
                .await
                .map_err(|_| unavailable("timed out".into()))?
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            return Err(unavailable(format!("{status}: {}", String::from_utf8_lossy(&bytes))));
        }
        let mut written = 0u64;
        loop {
            let frame = tokio::time::timeout(timeout, body.frame())
                .await
                .map_err(|_| unavailable("timed out".into()))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| unavailable(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await.map_err(|e| unavailable(e.to_string()))?;
                written += data.len() as u64;
            }
        }
        out.flush().await.map_err(|e| unavailable(e.to_string()))?;
        Ok(written)
    }

    /// Releases the lease `(key, token)` whoever holds it (release-by-token; see lockd's
    /// server docs for when that is safe). Already-ended leases count as released.
    pub async fn release_token(&self, key: &str, token: u64) -> Result<(), StorageError> {
        match self
            .call::<_, serde_json::Value>(
                paths::LOCK_RELEASE,
                &LeaseRequest {
                    key: key.to_string(),
                    token,
                },
            )
            .await
        {
            Ok(_) | Err(StorageError::LockLost(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Acquires like [`HaBackend::acquire`] and also returns the holder-side deadline as it
    /// moves (for tools and tests that report when the holder gave up).
    pub async fn acquire_lease(
        &self,
        key: &str,
        value: &str,
        cancel: CancellationToken,
    ) -> Result<Option<(LockGuard, watch::Receiver<Instant>)>, StorageError> {
        validate_key(key)?;
        let timing = self.inner.timing;
        let mut backoff = BACKOFF_MIN;
        let attempt: u64 = rand::random();
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let q = AcquireRequest {
                key: key.to_string(),
                value: value.to_string(),
                ttl_ms: Some(timing.ttl.as_millis() as u64),
                wait_ms: ACQUIRE_WAIT.as_millis() as u64,
                attempt: Some(attempt),
            };
            let sent = Instant::now();
            let r = tokio::select! {
                r = self.call_within::<_, AcquireResponse>(paths::LOCK_ACQUIRE, &q, ACQUIRE_WAIT + self.inner.timeout) => r,
                _ = cancel.cancelled() => {
                    // The dropped request may still be waiting in lockd, or have been granted
                    // just now: cancel the whole attempt so no grant of it survives.
                    let me = self.clone();
                    let cq = CancelRequest { key: key.to_string(), attempt };
                    tokio::spawn(async move { me.cancel_attempt(cq).await });
                    return Ok(None);
                }
            };
            match r {
                Ok(a) if a.granted => {
                    // The lease's real TTL (an idempotent re-acquire keeps the original one);
                    // clamped so a confused server cannot make the deadline math overflow.
                    let ttl = Duration::from_millis(a.ttl_ms.clamp(1, MAX_LEASE_TTL_MS));
                    let timing = if ttl == timing.ttl {
                        timing
                    } else {
                        LockTiming::from_ttl(ttl)
                    };
                    // lockd received the request no earlier than `sent` and granted
                    // `waited_ms` (rounded down) after receiving it: a safe lower bound of
                    // the moment its lease clock started.
                    let base = sent + Duration::from_millis(a.waited_ms.min(MAX_ACQUIRE_WAIT_MS));
                    return Ok(Some(self.guard(key, value, a.token, base, timing)));
                }
                Ok(_) => backoff = BACKOFF_MIN,
                Err(CallError::Status(_, b))
                    if matches!(b.code.as_str(), codes::INVALID | codes::MALFORMED | codes::TOO_LARGE) =>
                {
                    return Err(to_storage(CallError::Status(StatusCode::BAD_REQUEST, b)));
                }
                Err(e) => {
                    tracing::debug!(error = %to_storage(e), "lockd acquire failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return Ok(None),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Tells lockd an acquire attempt was given up (retrying transient errors for up to
    /// the request timeout; after that the grant, if any, simply expires with its TTL).
    async fn cancel_attempt(self, q: CancelRequest) {
        let deadline = Instant::now() + self.inner.timeout;
        let mut backoff = BACKOFF_MIN;
        loop {
            match self
                .call_within::<_, CancelResponse>(paths::LOCK_CANCEL, &q, self.inner.timeout)
                .await
            {
                Ok(_) | Err(CallError::Status(..)) => return,
                Err(CallError::Transport(e)) => {
                    if Instant::now() + backoff >= deadline {
                        tracing::warn!(lock = %q.key, error = %e, "could not cancel an acquire; a grant to it expires by TTL");
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn guard(
        &self,
        key: &str,
        value: &str,
        token: u64,
        sent: Instant,
        timing: LockTiming,
    ) -> (LockGuard, watch::Receiver<Instant>) {
        let lost = CancellationToken::new();
        let first_deadline = sent + timing.ttl - timing.margin;
        let (dl_tx, dl_rx) = watch::channel(first_deadline);
        let me = self.clone();
        let k = key.to_string();
        let lost2 = lost.clone();
        tokio::spawn(async move {
            let renew = LockdRenew {
                client: me,
                key: k.clone(),
                token,
                ttl: timing.ttl,
            };
            lease::keep_lease(&k, renew, sent, timing, lost2, dl_tx).await
        });
        let release = Arc::new(LockdRelease {
            client: self.clone(),
            key: key.to_string(),
            token,
        });
        let guard = LockGuard::new(
            Fence {
                lock: key.to_string(),
                token,
            },
            value.to_string(),
            lost,
            release,
        );
        (guard, dl_rx)
    }

    async fn open_watch(&self, req: WatchRequest) -> Result<WatchStream, StorageError> {
        let body = serde_json::to_vec(&req).map_err(|e| StorageError::Invalid(e.to_string()))?;
        let first = self.watch_connect(&body).await.map_err(to_storage)?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let me = self.clone();
        tokio::spawn(async move { me.watch_loop(body, first, tx).await });
        Ok(rx)
    }

    async fn watch_connect(&self, body: &[u8]) -> Result<Incoming, CallError> {
        let resp = self.send(paths::WATCH, body, self.inner.timeout).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let b = serde_json::from_slice::<ErrorBody>(&bytes).map_err(|e| CallError::Transport(e.to_string()))?;
        Err(CallError::Status(status, b))
    }

    /// Forwards a watch stream's events, re-establishing it (with backoff) when it breaks or
    /// goes silent; after a re-establish the consumer gets `Resync`.
    async fn watch_loop(self, body: Vec<u8>, first: Incoming, tx: mpsc::Sender<WatchEvent>) {
        let mut stream = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            if let Some(mut s) = stream.take() {
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let frame = tokio::select! {
                        _ = tx.closed() => return,
                        f = tokio::time::timeout(Duration::from_millis(WATCH_DEAD_AFTER_MS), s.frame()) => f,
                    };
                    let data = match frame {
                        Ok(Some(Ok(f))) => match f.into_data() {
                            Ok(d) => d,
                            Err(_) => continue,
                        },
                        _ => break, // error, end or silence: reconnect
                    };
                    backoff = BACKOFF_MIN;
                    buf.extend_from_slice(&data);
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        let ev = match serde_json::from_slice::<WireEvent>(&line) {
                            Ok(WireEvent::Put { key }) => WatchEvent::Put(key),
                            Ok(WireEvent::Delete { key }) => WatchEvent::Delete(key),
                            Ok(WireEvent::Resync) | Err(_) => WatchEvent::Resync,
                            Ok(WireEvent::Ping) => continue,
                        };
                        match tx.try_send(ev) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                if tx.send(WatchEvent::Resync).await.is_err() {
                                    return;
                                }
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if let Ok(s) = self.watch_connect(&body).await {
                if tx.send(WatchEvent::Resync).await.is_err() {
                    return;
                }
                stream = Some(s);
            }
        }
    }
}

/// lockd's renewal call for [`lease::keep_lease`]: `lock/renew` with the lease's token.
struct LockdRenew {
    client: LockdBackend,
    key: String,
    token: u64,
    ttl: Duration,
}

impl lease::Renew for LockdRenew {
    async fn renew(&mut self, budget: Duration) -> lease::Renewal {
        let q = LeaseRequest {
            key: self.key.clone(),
            token: self.token,
        };
        match self
            .client
            .call_within::<_, RenewResponse>(paths::LOCK_RENEW, &q, budget)
            .await
        {
            // lockd renews for the full TTL it granted.
            Ok(_) => lease::Renewal::Granted(self.ttl),
            Err(CallError::Status(_, b)) if matches!(b.code.as_str(), codes::LEASE_EXPIRED | codes::UNKNOWN_LEASE) => {
                lease::Renewal::Ended
            }
            Err(e) => lease::Renewal::Failed(to_storage(e).to_string()),
        }
    }
}

struct LockdRelease {
    client: LockdBackend,
    key: String,
    token: u64,
}

#[async_trait]
impl LockRelease for LockdRelease {
    async fn release(&self) -> Result<(), StorageError> {
        self.client.release_token(&self.key, self.token).await
    }
}

#[async_trait]
impl Backend for LockdBackend {
    fn kind(&self) -> &'static str {
        "lockd"
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StorageError> {
        validate_key(key)?;
        let r: GetResponse = self.call(paths::KV_GET, &KeyRequest { key: key.to_string() }).await?;
        Ok(r.entry.map(|e| Entry {
            key: e.key,
            value: e.value,
            fence_token: e.fence_token,
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<(), StorageError> {
        self.put_rev(key, value, fence).await.map(|_| ())
    }

    async fn create(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<bool, StorageError> {
        let q = self.put_request(key, value, fence, Some(0))?;
        match self
            .call_within::<_, PutResponse>(paths::KV_PUT, &q, self.inner.timeout)
            .await
        {
            Ok(_) => Ok(true),
            Err(CallError::Status(_, b)) if b.code == codes::CAS_MISMATCH => Ok(false),
            Err(e) => Err(to_storage(e)),
        }
    }

    async fn put_batch(&self, puts: Vec<(String, Vec<u8>)>, fence: Option<&Fence>) -> Result<(), StorageError> {
        crate::storage::check_batch_len(puts.len())?;
        let total: usize = puts.iter().map(|(_, v)| v.len()).sum();
        if total > self.inner.max_value {
            // More than one request may carry: in order, one by one (still a valid batch).
            return crate::storage::put_each(self, puts, fence).await;
        }
        let mut entries = Vec::with_capacity(puts.len());
        for (key, value) in puts {
            validate_key(&key)?;
            entries.push(BatchPut { key, value });
        }
        let q = BatchRequest {
            puts: entries,
            fence: fence.cloned(),
        };
        self.call::<_, PutResponse>(paths::KV_BATCH, &q).await.map(|_| ())
    }

    async fn delete(&self, key: &str, fence: Option<&Fence>) -> Result<(), StorageError> {
        validate_key(key)?;
        let q = DeleteRequest {
            key: key.to_string(),
            fence: fence.cloned(),
        };
        self.call::<_, DeleteResponse>(paths::KV_DELETE, &q).await.map(|_| ())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let r: ListResponse = self
            .call(
                paths::KV_LIST,
                &ListRequest {
                    prefix: prefix.to_string(),
                },
            )
            .await?;
        Ok(r.keys)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StorageError> {
        self.open_watch(WatchRequest {
            prefix: Some(prefix.to_string()),
            lock: None,
        })
        .await
    }
}

#[async_trait]
impl HaBackend for LockdBackend {
    fn kind(&self) -> &'static str {
        "lockd"
    }

    async fn acquire(
        &self,
        key: &str,
        value: &str,
        cancel: CancellationToken,
    ) -> Result<Option<LockGuard>, StorageError> {
        Ok(self.acquire_lease(key, value, cancel).await?.map(|(g, _)| g))
    }

    async fn holder(&self, key: &str) -> Result<Option<Holder>, StorageError> {
        validate_key(key)?;
        let r: HolderResponse = self
            .call(paths::LOCK_HOLDER, &KeyRequest { key: key.to_string() })
            .await?;
        Ok(r.holder.map(|h| Holder {
            value: h.value,
            token: h.token,
        }))
    }

    async fn watch_lock(&self, key: &str) -> Result<WatchStream, StorageError> {
        validate_key(key)?;
        self.open_watch(WatchRequest {
            prefix: None,
            lock: Some(key.to_string()),
        })
        .await
    }

    /// Release-by-token on proof that the holder is gone (the holder's own proxy saw its
    /// process exit); a no-op when `token` is no longer the current grant.
    async fn force_release(&self, key: &str, token: u64) -> Result<(), StorageError> {
        validate_key(key)?;
        self.release_token(key, token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn stanza(opts: &[(&str, &str)]) -> Stanza {
        Stanza {
            block: "storage",
            kind: "lockd".into(),
            options: opts
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        crate::config::StanzaValue {
                            value: v.to_string(),
                            line: Some(3),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            file: "vault.hcl".into(),
            line: Some(1),
        }
    }

    /// lockd keeps the protocol limit: a value over `MAX_VALUE_LEN` is refused with a clear
    /// error before anything is sent (the address here does not answer).
    #[tokio::test]
    async fn value_over_protocol_limit_refused() {
        let b = LockdBackend::from_stanza(&stanza(&[("address", "http://127.0.0.1:1")])).unwrap();
        let e = b
            .put("big", vec![0u8; crate::storage::MAX_VALUE_LEN + 1], None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StorageError::Invalid(m) if m.contains("exceeds the")),
            "{e}"
        );
    }

    /// Credential options: a token or a token file (not both), a client certificate only
    /// with its key and an https address; each mistake is an error naming file, line and key
    /// that never echoes the token.
    #[tokio::test]
    async fn from_stanza_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("t");
        std::fs::write(&tf, "0123456789abcdef0123\n").unwrap();
        let tf = tf.display().to_string();
        LockdBackend::from_stanza(&stanza(&[("address", "http://127.0.0.1:1"), ("token_file", &tf)])).unwrap();
        LockdBackend::from_stanza(&stanza(&[
            ("address", "http://127.0.0.1:1"),
            ("token", "0123456789abcdef0123"),
        ]))
        .unwrap();
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("token", "0123456789abcdef0123"), ("token_file", &tf)],
                "vault.hcl:3: storage.lockd.token_file: set either token or token_file",
            ),
            (
                &[("token", "short-secret")],
                "vault.hcl:3: storage.lockd.token: the token is 12 characters long",
            ),
            (
                &[("token_file", "/nonexistent/token")],
                "vault.hcl:3: storage.lockd.token_file: /nonexistent/token:",
            ),
            (
                &[("tls_cert_file", "c.pem")],
                "storage.lockd.tls_key_file: tls_cert_file and tls_key_file must be set together",
            ),
            (
                &[("tls_cert_file", "c.pem"), ("tls_key_file", "k.pem")],
                "storage.lockd.tls_cert_file: needs an https:// address",
            ),
            (
                &[("tls_server_name", "lockd")],
                "storage.lockd.tls_server_name: needs an https:// address",
            ),
        ];
        for (opts, want) in cases {
            let mut all = vec![("address", "http://127.0.0.1:1")];
            all.extend_from_slice(opts);
            let e = LockdBackend::from_stanza(&stanza(&all)).unwrap_err().to_string();
            assert!(e.contains(want), "{opts:?}: {e}");
            assert!(!e.contains("short-secret"), "{e}");
        }
        let e = LockdBackend::from_stanza(&stanza(&[
            ("address", "https://127.0.0.1:1"),
            ("tls_ca_file", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("storage.lockd.tls_ca_file: /nonexistent/ca.pem"), "{e}");
    }

    /// Stanza options: defaults, required address, unknown keys and bad values are
    /// positioned errors.
    #[tokio::test]
    async fn from_stanza_options() {
        let b = LockdBackend::from_stanza(&stanza(&[("address", "http://127.0.0.1:8300")])).unwrap();
        assert!(b.ha_enabled());
        assert_eq!(b.timing(), LockTiming::default());
        let b = LockdBackend::from_stanza(&stanza(&[
            ("address", "http://127.0.0.1:1"),
            ("lock_ttl", "20s"),
            ("ha_enabled", "false"),
        ]))
        .unwrap();
        assert_eq!(b.timing().ttl, Duration::from_secs(20));
        assert!(!b.ha_enabled());
        let e = LockdBackend::from_stanza(&stanza(&[])).unwrap_err().to_string();
        assert!(e.contains("storage.lockd.address: required"), "{e}");
        let e = LockdBackend::from_stanza(&stanza(&[("address", "http://x:1"), ("nope", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vault.hcl:3: storage.lockd.nope"), "{e}");
        let e = LockdBackend::from_stanza(&stanza(&[("address", "http://x:1"), ("lock_ttl", "10ms")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lock_ttl"), "{e}");
        let e = LockdBackend::from_stanza(&stanza(&[("address", "ftp://x:1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("address"), "{e}");
        let e = LockdBackend::from_stanza(&stanza(&[("address", "https://x:1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_ca_file"), "{e}");
        LockdBackend::from_stanza(&stanza(&[
            ("address", "https://x:1"),
            ("dangerous_tls_skip_verify", "true"),
        ]))
        .unwrap();
    }

    /// Timing defaults keep renew interval and margin well inside the TTL.
    #[test]
    fn timing_defaults() {
        let t = LockTiming::default();
        assert_eq!(t.ttl, Duration::from_secs(10));
        assert!(t.renew_interval * 5 < t.ttl - t.margin);
    }
}

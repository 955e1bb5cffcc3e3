//! [`EtcdBackend`]: storage and the HA lock on an etcd v3 cluster (etcd 3.4+), through the
//! `etcd-client` crate (gRPC, balanced over every `address`).
//!
//! # Layout in etcd
//! With `path = "vault/"` (the default), the entry `core/keyring` lives at `vault/core/keyring`;
//! the HA lock `core/lock` at `vault.ha/lock/core/lock` and the highest fencing token seen for a
//! foreign lock `L` (see below) at `vault.ha/fence/L`. Keeping lock and fence keys outside the
//! data prefix keeps them out of `list` and out of data watches.
//!
//! # The lock ([`lock`])
//! One key per lock, created in a transaction `if create_revision(key) == 0 then put(key,
//! value, lease)`, with a lease kept alive by the holder. The fencing token is the key's
//! create revision: etcd's revision counter is cluster-wide and never goes back, so every
//! grant gets a strictly larger token, also across etcd restarts.
//!
//! # Fenced writes
//! Every write that carries a [`Fence`] is one etcd transaction whose compare decides it:
//! - the lock lives in this same etcd (the backend is its own HA backend, and this client
//!   holds or held the lock): `create_revision(lock key) == token`, so a deposed holder can
//!   never write, even before anyone else has taken the lock;
//! - the lock lives elsewhere (split mode: `ha_storage` is lockd or another etcd): etcd cannot
//!   check a foreign token, so the highest token seen per lock is kept in an etcd key and the
//!   transaction is `if value(fence key) > token then fail else put(fence key, token) + write`
//!   (tokens are stored as 20-digit zero-padded decimals, so byte order is numeric order).
//!
//! # Limits
//! etcd refuses requests over its `--max-request-bytes` (1.5 MiB by default): larger values
//! are rejected as `Invalid`. Raise that flag on the etcd members to store bigger entries.

pub mod lock;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::{mpsc, OnceCell};

use crate::config::{ConfigError, Stanza};
use crate::storage::{
    list_children, validate_key, validate_value, Backend, Entry, Fence, StorageError, WatchEvent, WatchStream,
    MAX_VALUE_LEN,
};

pub use crate::storage::LockTiming;
/// Re-exported for callers of [`EtcdBackend::acquire_lease`].
pub use tokio_util::sync::CancellationToken;

/// Default lease TTL of the HA lock (`lock_timeout`): 10 s.
///
/// Why not shorter: when the etcd raft leader dies, etcd needs ~1.3 s to elect a new one
/// (1 s election timeout plus randomisation) and the client a moment more to move its
/// keep-alives to a live member; measured with etcd 3.4 here, leases under 5 s lost the lock
/// in that window (the etcd HA tests, `tests/t51_etcd_ha.rs`, kill the etcd leader). A new etcd leader extends every lease by its TTL, so
/// the store side survives; the limit is the *holder-side* deadline (`sent + TTL - TTL/5`),
/// which must outlast etcd's election with room to spare. 10 s leaves 8 s for one keep-alive
/// to get through (they are sent every 1 s). A crashed node's lock is normally freed at once
/// by its proxy (`force_release`); the TTL bounds failover only when the whole pair vanishes.
/// Vault's etcd backend uses 15 s.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest `lock_timeout` a stanza may set: below 5 s an etcd leader election alone can
/// outlast the holder-side deadline (see [`DEFAULT_LOCK_TIMEOUT`]).
pub const MIN_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default per-request timeout (Vault's etcd default is 5 s). A write waits for a raft
/// commit (an fsync on a quorum), which a busy disk stretches; lease safety never depends on
/// it (keep-alives are bounded by the holder deadline instead).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `path` prefix of the data keys.
pub const DEFAULT_PATH: &str = "vault/";
/// Reconnect backoff for watches and lock waits: start fast (an etcd election is ~1.3 s,
/// a member restart well under a second), cap at 1 s.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Watch event queue towards the consumer; overflow turns into `Resync`.
const WATCH_QUEUE: usize = 1024;
/// gRPC HTTP/2 keep-alive: detects a hung member (SIGSTOP, partition) on idle watch
/// streams. etcd refuses pings more often than every 5 s (`--grpc-keepalive-min-time`).
const GRPC_KEEPALIVE: Duration = Duration::from_secs(10);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest gRPC message accepted: the largest value plus room for the envelope.
const MAX_MESSAGE: usize = MAX_VALUE_LEN + 64 * 1024;

/// TLS client settings (`tls_ca_file`, `tls_cert_file`, `tls_key_file`, `tls_server_name`).
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca_pem: Option<Vec<u8>>,
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
    pub server_name: Option<String>,
}

/// Everything [`EtcdBackend`] is built from.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Data key prefix, ending in `/`.
    pub path: String,
    pub ha_enabled: bool,
    pub timing: LockTiming,
    pub request_timeout: Duration,
    pub tls: Option<EtcdTls>,
    pub user: Option<(String, String)>,
}

impl EtcdConfig {
    /// Defaults for `endpoints` (HA enabled, as tests want it).
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            path: DEFAULT_PATH.into(),
            ha_enabled: true,
            timing: LockTiming::from_ttl(DEFAULT_LOCK_TIMEOUT),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            user: None,
        }
    }
}

pub(crate) struct Inner {
    cfg: EtcdConfig,
    client: OnceCell<Client>,
    /// Data prefix (`vault/`).
    data_prefix: String,
    /// Prefix of lock keys (`vault.ha/lock/`).
    lock_prefix: String,
    /// Prefix of highest-seen fence keys (`vault.ha/fence/`).
    fence_prefix: String,
    /// Locks this client acquired in this same etcd: writes fenced by them compare the lock
    /// key's create revision directly.
    own_locks: Mutex<HashSet<String>>,
}

/// Most value bytes one `put_batch` sends as one transaction: under etcd's default request
/// limit (`--max-request-bytes`, 1.5 MiB), so a batch never fails where its puts one by one
/// would pass. Larger batches are written one by one, in order.
const BATCH_MAX_BYTES: usize = 1024 * 1024;

/// A client of an etcd cluster. Cheap to clone; clones share the gRPC channel.
#[derive(Clone)]
pub struct EtcdBackend {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.inner.cfg.endpoints)
            .field("path", &self.inner.data_prefix)
            .finish()
    }
}

/// Maps an etcd client error to a storage error: oversized requests are `Invalid`,
/// everything else (no leader, member down, timeout) is `Unavailable`.
pub(crate) fn map_err(what: &str, e: etcd_client::Error) -> StorageError {
    if let etcd_client::Error::GRpcStatus(s) = &e {
        if s.message().contains("too large") {
            return StorageError::Invalid(format!("etcd {what}: {}", s.message()));
        }
    }
    StorageError::Unavailable(format!("etcd {what}: {e}"))
}

fn encode_token(t: u64) -> String {
    format!("{t:020}")
}

fn to_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

impl EtcdBackend {
    /// A backend from a full configuration. Does not connect: the gRPC channel is built on
    /// first use and reconnects by itself.
    pub fn new(cfg: EtcdConfig) -> Result<EtcdBackend, StorageError> {
        if cfg.endpoints.is_empty() {
            return Err(StorageError::Invalid("etcd: no address".into()));
        }
        for e in &cfg.endpoints {
            let u = url::Url::parse(e).map_err(|x| StorageError::Invalid(format!("etcd address {e:?}: {x}")))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(StorageError::Invalid(format!(
                    "etcd address {e:?} must be http://HOST:PORT or https://HOST:PORT"
                )));
            }
        }
        let mut path = cfg.path.clone();
        if !path.ends_with('/') {
            path.push('/');
        }
        let base = path.trim_end_matches('/');
        let meta = format!("{base}.ha/");
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                data_prefix: path.clone(),
                lock_prefix: format!("{meta}lock/"),
                fence_prefix: format!("{meta}fence/"),
                cfg: EtcdConfig { path, ..cfg },
                client: OnceCell::new(),
                own_locks: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// A client with defaults (HA on, 10 s lock lease) for comma-separated `address`.
    pub fn connect(address: &str) -> Result<EtcdBackend, StorageError> {
        Self::new(EtcdConfig::new(split_addresses(address)))
    }

    /// The same cluster with other lease timing or path (tests use short TTLs and fresh paths).
    pub fn with_config(&self, f: impl FnOnce(&mut EtcdConfig)) -> Result<EtcdBackend, StorageError> {
        let mut cfg = self.inner.cfg.clone();
        f(&mut cfg);
        Self::new(cfg)
    }

    /// From a `storage "etcd" {...}` / `ha_storage "etcd" {...}` stanza, with Vault's option
    /// names: `address` (comma-separated client URLs, default `http://127.0.0.1:2379`),
    /// `path` (default `vault/`), `ha_enabled` (default false, as in Vault), `lock_timeout`
    /// (lease TTL, default 10 s, at least 5 s), `request_timeout` (default 5 s), `username`,
    /// `password`, `tls_ca_file`, `tls_cert_file`, `tls_key_file`, `tls_server_name`, and
    /// `etcd_api` (only `"v3"`).
    pub fn from_stanza(s: &Stanza) -> Result<EtcdBackend, ConfigError> {
        s.check_known(&[
            "address",
            "path",
            "ha_enabled",
            "lock_timeout",
            "request_timeout",
            "username",
            "password",
            "tls_ca_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_server_name",
            "etcd_api",
        ])?;
        let endpoints = split_addresses(s.get("address").unwrap_or("http://127.0.0.1:2379"));
        if endpoints.is_empty() {
            return Err(s.error("address", "no etcd address given"));
        }
        if let Some(api) = s.get("etcd_api") {
            if api != "v3" {
                return Err(s.error("etcd_api", format!("{api:?} is not supported (only \"v3\")")));
            }
        }
        let path = s.get("path").unwrap_or(DEFAULT_PATH).to_string();
        if path.is_empty() || path.chars().any(|c| c.is_control()) {
            return Err(s.error("path", "must be a non-empty key prefix"));
        }
        let ha_enabled = s.get_bool("ha_enabled", false)?;
        let ttl = s.get_duration("lock_timeout", DEFAULT_LOCK_TIMEOUT)?;
        if ttl < MIN_LOCK_TIMEOUT {
            return Err(s.error(
                "lock_timeout",
                format!(
                    "{ttl:?} is below the {MIN_LOCK_TIMEOUT:?} minimum (an etcd leader election could lose the lock)"
                ),
            ));
        }
        let request_timeout = s.get_duration("request_timeout", DEFAULT_REQUEST_TIMEOUT)?;
        if request_timeout.is_zero() {
            return Err(s.error("request_timeout", "must be positive"));
        }
        let user = match (s.get("username"), s.get("password")) {
            (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
            (None, None) => None,
            (Some(_), None) => return Err(s.error("password", "username needs a password")),
            (None, Some(_)) => return Err(s.error("username", "password needs a username")),
        };
        let read = |key: &str| -> Result<Option<Vec<u8>>, ConfigError> {
            match s.get(key) {
                None => Ok(None),
                Some(p) => {
                    let p = resolve(&s.file, p);
                    std::fs::read(&p)
                        .map(Some)
                        .map_err(|e| s.error(key, format!("{}: {e}", p.display())))
                }
            }
        };
        let tls = EtcdTls {
            ca_pem: read("tls_ca_file")?,
            cert_pem: read("tls_cert_file")?,
            key_pem: read("tls_key_file")?,
            server_name: s.get("tls_server_name").map(str::to_string),
        };
        if tls.cert_pem.is_some() != tls.key_pem.is_some() {
            return Err(s.error("tls_cert_file", "tls_cert_file and tls_key_file go together"));
        }
        let any_https = endpoints.iter().any(|e| e.starts_with("https://"));
        let any_tls_opt = tls.ca_pem.is_some() || tls.cert_pem.is_some() || tls.server_name.is_some();
        if any_tls_opt && !any_https {
            return Err(s.error("address", "TLS options need https:// addresses"));
        }
        let cfg = EtcdConfig {
            endpoints,
            path,
            ha_enabled,
            timing: LockTiming::from_ttl(ttl),
            request_timeout,
            tls: any_https.then_some(tls),
            user,
        };
        Self::new(cfg).map_err(|e| s.error("address", e.to_string()))
    }

    pub fn ha_enabled(&self) -> bool {
        self.inner.cfg.ha_enabled
    }

    pub fn timing(&self) -> LockTiming {
        self.inner.cfg.timing
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.cfg.endpoints
    }

    /// The data key prefix (`vault/`).
    pub fn path(&self) -> &str {
        &self.inner.data_prefix
    }

    /// The etcd key that holds lock `key` (for tests and operators).
    pub fn lock_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.lock_prefix)
    }

    /// The etcd key that holds data entry `key`.
    pub fn data_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.data_prefix)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.inner.cfg.request_timeout
    }

    /// The shared client, built on first use (building does not wait for a member).
    pub(crate) async fn client(&self) -> Result<Client, StorageError> {
        let cfg = &self.inner.cfg;
        let c = self
            .inner
            .client
            .get_or_try_init(|| async {
                let mut opts = ConnectOptions::new()
                    .with_connect_timeout(cfg.request_timeout)
                    .with_keep_alive(GRPC_KEEPALIVE, GRPC_KEEPALIVE_TIMEOUT)
                    .with_require_leader(true);
                if let Some((u, p)) = &cfg.user {
                    opts = opts.with_user(u.clone(), p.clone());
                }
                if let Some(t) = &cfg.tls {
                    let mut tls = etcd_client::TlsOptions::new();
                    if let Some(ca) = &t.ca_pem {
                        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
                    }
                    if let (Some(c), Some(k)) = (&t.cert_pem, &t.key_pem) {
                        tls = tls.identity(etcd_client::Identity::from_pem(c, k));
                    }
                    if let Some(n) = &t.server_name {
                        tls = tls.domain_name(n.clone());
                    }
                    opts = opts.with_tls(tls);
                }
                tokio::time::timeout(cfg.request_timeout, Client::connect(&cfg.endpoints, Some(opts)))
                    .await
                    .map_err(|_| StorageError::Unavailable("etcd connect: timed out".into()))?
                    .map_err(|e| map_err("connect", e))
            })
            .await?;
        Ok(c.clone())
    }

    /// The KV client, with message limits large enough for [`MAX_VALUE_LEN`] values.
    async fn kv(&self) -> Result<etcd_client::KvClient, StorageError> {
        Ok(self
            .client()
            .await?
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// Runs one etcd call under the request timeout.
    pub(crate) async fn call<T, F>(&self, what: &str, f: F) -> Result<T, StorageError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.request_timeout(), f).await {
            Ok(r) => r.map_err(|e| map_err(what, e)),
            Err(_) => Err(StorageError::Unavailable(format!(
                "etcd {what}: timed out after {:?}",
                self.request_timeout()
            ))),
        }
    }

    pub(crate) fn note_own_lock(&self, key: &str) {
        self.inner
            .own_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string());
    }

    fn is_own_lock(&self, key: &str) -> bool {
        self.inner
            .own_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// One write (`op` on the data key) under `fence`, as a single transaction.
    async fn fenced_write(&self, op: TxnOp, fence: &Fence) -> Result<(), StorageError> {
        self.fenced_txn(vec![op], fence).await.map(|_| ())
    }

    /// Like [`EtcdBackend::fenced_write`] for several ops in one transaction, returning
    /// etcd's answer when the fence passed (its responses include the ops').
    async fn fenced_txn(&self, ops: Vec<TxnOp>, fence: &Fence) -> Result<etcd_client::TxnResponse, StorageError> {
        let mut client = self.kv().await?;
        if self.is_own_lock(&fence.lock) {
            let lk = self.lock_key(&fence.lock);
            let token = i64::try_from(fence.token).unwrap_or(i64::MAX);
            let txn = Txn::new()
                .when([Compare::create_revision(lk.clone(), CompareOp::Equal, token)])
                .and_then(ops)
                .or_else([TxnOp::get(lk, None)]);
            let r = self.call("fenced write", client.txn(txn)).await?;
            if r.succeeded() {
                return Ok(r);
            }
            let highest = first_get(&r).map(|kv| to_u64(kv.create_revision())).unwrap_or(0);
            return Err(StorageError::Fenced {
                lock: fence.lock.clone(),
                token: fence.token,
                highest,
            });
        }
        let fk = format!("{}{}", self.inner.fence_prefix, fence.lock);
        let enc = encode_token(fence.token);
        // A missing fence key fails a value compare, so the first writer lands in `or_else`.
        let txn = Txn::new()
            .when([Compare::value(fk.clone(), CompareOp::Greater, enc.clone())])
            .and_then([TxnOp::get(fk.clone(), None)])
            .or_else(
                std::iter::once(TxnOp::put(fk, enc, None))
                    .chain(ops)
                    .collect::<Vec<_>>(),
            );
        let r = self.call("fenced write", client.txn(txn)).await?;
        if !r.succeeded() {
            return Ok(r);
        }
        let highest = first_get(&r)
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
            .unwrap_or(0);
        Err(StorageError::Fenced {
            lock: fence.lock.clone(),
            token: fence.token,
            highest,
        })
    }

    /// Opens a watch on `key` (a prefix when `prefix`), forwarding events with `strip`
    /// removed from their keys. Returns once etcd confirmed the watch, so every change after
    /// this call returns is delivered.
    pub(crate) async fn open_watch(
        &self,
        key: String,
        prefix: bool,
        strip: String,
    ) -> Result<WatchStream, StorageError> {
        let first = self.start_watch(&key, prefix, None).await?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let me = self.clone();
        tokio::spawn(async move { me.watch_loop(key, prefix, strip, first, tx).await });
        Ok(rx)
    }

    /// Starts one etcd watch and waits for its `created` answer; returns the stream and the
    /// revision it starts after.
    async fn start_watch(
        &self,
        key: &str,
        prefix: bool,
        start: Option<i64>,
    ) -> Result<(etcd_client::WatchStream, i64), StorageError> {
        let mut client = self.client().await?;
        let mut opts = WatchOptions::new();
        if prefix {
            opts = opts.with_prefix();
        }
        if let Some(r) = start {
            opts = opts.with_start_revision(r);
        }
        let mut stream = self.call("watch", client.watch(key, Some(opts))).await?;
        let created = self
            .call("watch", stream.message())
            .await?
            .ok_or_else(|| StorageError::Unavailable("etcd watch: stream closed".into()))?;
        if created.canceled() {
            return Err(StorageError::Unavailable(format!(
                "etcd watch canceled: {}",
                created.cancel_reason()
            )));
        }
        let rev = created.header().map(|h| h.revision()).unwrap_or(0);
        Ok((stream, rev))
    }

    /// Forwards events; re-establishes the watch from the last revision seen when it breaks
    /// (member down, no leader), sending `Resync` to the consumer each time.
    async fn watch_loop(
        self,
        key: String,
        prefix: bool,
        strip: String,
        first: (etcd_client::WatchStream, i64),
        tx: mpsc::Sender<WatchEvent>,
    ) {
        let (stream, mut rev) = first;
        let mut stream = Some(stream);
        let mut backoff = BACKOFF_MIN;
        loop {
            if let Some(mut s) = stream.take() {
                loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => return,
                        m = s.message() => m,
                    };
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) | Err(_) => break,
                    };
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            // Fell behind compaction: resume from now; the consumer re-reads.
                            rev = 0;
                        }
                        break;
                    }
                    backoff = BACKOFF_MIN;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        rev = rev.max(kv.mod_revision());
                        let Some(k) = std::str::from_utf8(kv.key())
                            .ok()
                            .and_then(|k| k.strip_prefix(strip.as_str()))
                        else {
                            continue;
                        };
                        let out = match ev.event_type() {
                            EventType::Put => WatchEvent::Put(k.to_string()),
                            EventType::Delete => WatchEvent::Delete(k.to_string()),
                        };
                        match tx.try_send(out) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                if tx.send(WatchEvent::Resync).await.is_err() {
                                    return;
                                }
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    if let Some(h) = resp.header() {
                        if resp.events().is_empty() {
                            rev = rev.max(h.revision());
                        }
                    }
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let start = (rev > 0).then_some(rev + 1);
            match self.start_watch(&key, prefix, start).await {
                Ok((s, r)) => {
                    if start.is_none() {
                        rev = r;
                    }
                    if tx.send(WatchEvent::Resync).await.is_err() {
                        return;
                    }
                    stream = Some(s);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "etcd watch re-establish failed; retrying");
                    if e.to_string().contains("compacted") {
                        rev = 0;
                    }
                }
            }
        }
    }
}

/// The first key-value of the first `get` in a transaction's responses.
pub(crate) fn first_get(r: &etcd_client::TxnResponse) -> Option<etcd_client::KeyValue> {
    r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

/// `a,b, c` -> `["a", "b", "c"]`, trailing slashes dropped.
pub fn split_addresses(s: &str) -> Vec<String> {
    s.split(',')
        .map(|a| a.trim().trim_end_matches('/').to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

fn resolve(config_file: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_relative() {
        config_file.parent().unwrap_or(Path::new(".")).join(p)
    } else {
        p.to_path_buf()
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StorageError> {
        validate_key(key)?;
        let mut c = self.kv().await?;
        let r = self.call("get", c.get(self.data_key(key), None)).await?;
        Ok(r.kvs().first().map(|kv| Entry {
            key: key.to_string(),
            value: kv.value().to_vec(),
            fence_token: None,
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<(), StorageError> {
        validate_key(key)?;
        validate_value(&value)?;
        let dk = self.data_key(key);
        match fence {
            Some(f) => self.fenced_write(TxnOp::put(dk, value, None), f).await,
            None => {
                let mut c = self.kv().await?;
                self.call("put", c.put(dk, value, None)).await.map(|_| ())
            }
        }
    }

    async fn put_batch(&self, puts: Vec<(String, Vec<u8>)>, fence: Option<&Fence>) -> Result<(), StorageError> {
        crate::storage::check_batch_len(puts.len())?;
        if puts.iter().map(|(_, v)| v.len()).sum::<usize>() > BATCH_MAX_BYTES {
            // Would risk etcd's request limit where the puts one by one pass it.
            return crate::storage::put_each(self, puts, fence).await;
        }
        let mut ops = Vec::with_capacity(puts.len());
        for (key, value) in puts {
            validate_key(&key)?;
            validate_value(&value)?;
            ops.push(TxnOp::put(self.data_key(&key), value, None));
        }
        match fence {
            Some(f) => self.fenced_txn(ops, f).await.map(|_| ()),
            None => {
                let mut c = self.kv().await?;
                self.call("put batch", c.txn(Txn::new().and_then(ops)))
                    .await
                    .map(|_| ())
            }
        }
    }

    async fn create(&self, key: &str, value: Vec<u8>, fence: Option<&Fence>) -> Result<bool, StorageError> {
        validate_key(key)?;
        validate_value(&value)?;
        let dk = self.data_key(key);
        // Created only while the key has no create revision (does not exist).
        let create = Txn::new()
            .when([Compare::create_revision(dk.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(dk, value, None)]);
        let r = match fence {
            // The fence's transaction runs the create as a nested transaction.
            Some(f) => {
                let outer = self.fenced_txn(vec![TxnOp::txn(create)], f).await?;
                match outer.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Txn(t) => Some(t),
                    _ => None,
                }) {
                    Some(inner) => inner,
                    None => return Err(StorageError::Unavailable("etcd create: no nested answer".into())),
                }
            }
            None => {
                let mut c = self.kv().await?;
                self.call("create", c.txn(create)).await?
            }
        };
        Ok(r.succeeded())
    }

    async fn delete(&self, key: &str, fence: Option<&Fence>) -> Result<(), StorageError> {
        validate_key(key)?;
        let dk = self.data_key(key);
        match fence {
            Some(f) => self.fenced_write(TxnOp::delete(dk, None::<DeleteOptions>), f).await,
            None => {
                let mut c = self.kv().await?;
                self.call("delete", c.delete(dk, None)).await.map(|_| ())
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let full = self.data_key(prefix);
        let mut c = self.kv().await?;
        let r = self
            .call(
                "list",
                c.get(full.clone(), Some(GetOptions::new().with_prefix().with_keys_only())),
            )
            .await?;
        let keys: Vec<&str> = r
            .kvs()
            .iter()
            .filter_map(|kv| std::str::from_utf8(kv.key()).ok())
            .collect();
        Ok(list_children(&full, keys.into_iter()))
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StorageError> {
        self.open_watch(self.data_key(prefix), true, self.inner.data_prefix.clone())
            .await
    }
}

#[cfg(test)]
mod tests;

//! Vault's HCL server configuration: parsed once, defaulted and validated, with errors that
//! name the file, the key and (where the parser knows it) the line.
//!
//! Rules: env wins (`VAULT_API_ADDR` > `VAULT_REDIRECT_ADDR` >
//! `VAULT_ADVERTISE_ADDR` > `api_addr`; `VAULT_CLUSTER_ADDR` > `cluster_addr`); `api_addr` is a
//! full URL with scheme; a listener's `cluster_address` defaults to its address with port+1;
//! the advertised `cluster_addr` defaults to the api_addr host with port+1 and is forced to
//! https; `api_addr == cluster_addr` is an error. Environment access goes through [`Env`] so
//! tests never touch the process environment.

mod parse;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use url::Url;

pub use parse::{load, parse_str};

/// Vault's default `max_request_size`: 32 MiB.
pub const DEFAULT_MAX_REQUEST_SIZE: u64 = 32 * 1024 * 1024;
/// Vault's default `max_request_duration`: 90 s.
pub const DEFAULT_MAX_REQUEST_DURATION: Duration = Duration::from_secs(90);

/// Vault re-contends 10 s after a step-down; long enough that another node takes the lock,
/// so a step-down really moves leadership instead of the same node winning again.
pub const DEFAULT_STEP_DOWN_WAIT: Duration = Duration::from_secs(10);

/// A configuration error. `Display` reads `FILE:LINE: KEY: message` (line omitted when
/// unknown), so operators can jump straight to the culprit.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{}: cannot read configuration: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: syntax error: {msg}", file.display(), fmt_line(*line))]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    #[error("{}{}: {key}: unknown configuration key", file.display(), fmt_line(*line))]
    UnknownKey {
        file: PathBuf,
        line: Option<usize>,
        key: String,
    },
    #[error("{}{}: {key}: {msg}", file.display(), fmt_line(*line))]
    Invalid {
        file: PathBuf,
        line: Option<usize>,
        key: String,
        msg: String,
    },
    #[error("{}: {key}: required but not set", file.display())]
    Missing { file: PathBuf, key: String },
}

fn fmt_line(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

/// Where environment variables come from. Production uses [`ProcessEnv`]; tests use
/// [`MapEnv`].
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// A fixed environment, for tests.
#[derive(Default, Clone)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    pub fn with(mut self, k: &str, v: &str) -> Self {
        self.0.insert(k.to_string(), v.to_string());
        self
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// One option of a `storage`/`ha_storage` stanza. Vault treats these as strings; numbers
/// and booleans in the HCL are converted to their string form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StanzaValue {
    pub value: String,
    pub line: Option<usize>,
}

/// Stanza options whose values are secrets: printed as `<redacted>` by `Debug`.
pub const SECRET_OPTIONS: &[&str] = &["token", "password"];

/// A `storage "<type>" { ... }` or `ha_storage "<type>" { ... }` stanza. Option checking is
/// the backend's job (it knows its keys); [`Stanza::error`] builds positioned errors for it.
/// `Debug` redacts the values of [`SECRET_OPTIONS`].
#[derive(Clone, PartialEq, Eq)]
pub struct Stanza {
    /// `storage` or `ha_storage`.
    pub block: &'static str,
    /// The backend type label (`file`, `inmem`, `lockd`, `etcd`).
    pub kind: String,
    pub options: BTreeMap<String, StanzaValue>,
    pub file: PathBuf,
    pub line: Option<usize>,
}

impl std::fmt::Debug for Stanza {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                let shown = if SECRET_OPTIONS.contains(&k.as_str()) {
                    "<redacted>"
                } else {
                    v.value.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("Stanza")
            .field("block", &self.block)
            .field("kind", &self.kind)
            .field("options", &options)
            .field("file", &self.file)
            .field("line", &self.line)
            .finish()
    }
}

impl Stanza {
    /// Same backend and same option values, wherever in the file they are written (a
    /// reload asks this to tell a changed stanza from one that only moved), not looking at
    /// the options named in `ignore` (those a reload applies).
    pub fn same_settings(&self, other: &Stanza, ignore: &[&str]) -> bool {
        let kept = |s: &Stanza| -> Vec<(String, String)> {
            s.options
                .iter()
                .filter(|(k, _)| !ignore.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect()
        };
        self.kind == other.kind && kept(self) == kept(other)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(|v| v.value.as_str())
    }

    /// A positioned error about `key` of this stanza (`storage.file.path`).
    pub fn error(&self, key: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.options.get(key).and_then(|v| v.line).or(self.line),
            key: format!("{}.{}.{}", self.block, self.kind, key),
            msg: msg.into(),
        }
    }

    /// Errors on the first option not in `known`.
    pub fn check_known(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.options.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, v)) => Err(ConfigError::UnknownKey {
                file: self.file.clone(),
                line: v.line.or(self.line),
                key: format!("{}.{}.{}", self.block, self.kind, k),
            }),
            None => Ok(()),
        }
    }

    /// A required string option.
    pub fn require(&self, key: &str) -> Result<&str, ConfigError> {
        self.get(key).ok_or_else(|| ConfigError::Missing {
            file: self.file.clone(),
            key: format!("{}.{}.{}", self.block, self.kind, key),
        })
    }

    /// A boolean option (`true`/`false`/`1`/`0`, any case), `default` when absent.
    pub fn get_bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_bool(v).ok_or_else(|| self.error(key, format!("{v:?} is not a boolean"))),
        }
    }

    /// A duration option (`"15s"`, `"1m30s"`, or a bare number of seconds).
    pub fn get_duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => crate::duration::parse(v).map_err(|_| self.error(key, format!("{v:?} is not a duration"))),
        }
    }
}

/// Parses Vault-style booleans: `true`/`false`/`1`/`0`/`t`/`f`, any case.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "t" => Some(true),
        "false" | "0" | "f" => Some(false),
        _ => None,
    }
}

/// One `listener "tcp" { ... }` block, defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    /// Where this node's cluster listener binds while active (default: address port+1).
    pub cluster_address: SocketAddr,
    pub tls_disable: bool,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Largest request body accepted, bytes; `None` = unlimited (Vault: a negative value).
    pub max_request_size: Option<u64>,
    /// Longest a request may take; `None` = unlimited (Vault: a negative value).
    pub max_request_duration: Option<Duration>,
    /// Peers whose `X-Forwarded-For` is believed (CIDRs).
    pub x_forwarded_for_authorized_addrs: Vec<IpNet>,
    /// `telemetry { unauthenticated_metrics_access = true }` inside the listener.
    pub unauthenticated_metrics_access: bool,
    pub line: Option<usize>,
}

/// An IP network in CIDR form (`10.0.0.0/8`, `127.0.0.1/32`, `::1/128`); a bare address is /32
/// or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// Log verbosity (`log_level`): Vault's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        match s.to_ascii_lowercase().as_str() {
            "trace" => Some(LogLevel::Trace),
            "debug" => Some(LogLevel::Debug),
            "info" | "" => Some(LogLevel::Info),
            "warn" | "warning" => Some(LogLevel::Warn),
            "err" | "error" => Some(LogLevel::Error),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// The whole server configuration, defaults applied and validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (for error messages and banners).
    pub path: PathBuf,
    pub storage: Stanza,
    pub ha_storage: Option<Stanza>,
    /// At least one; the first is the primary (its address is the default `api_addr`).
    pub listeners: Vec<Listener>,
    /// Where clients are redirected to reach this node (env applied).
    pub api_addr: Url,
    /// What this node advertises for server-to-server traffic when active; always https.
    pub cluster_addr: Url,
    pub cluster_name: Option<String>,
    pub disable_clustering: bool,
    pub log_level: LogLevel,
    /// How long a node that stepped down waits before contending for the lock again
    /// (`step_down_wait`; default [`DEFAULT_STEP_DOWN_WAIT`]).
    pub step_down_wait: Duration,
    /// Entries of the active node's read cache (`cache_size`, default
    /// [`crate::barrier::cache::DEFAULT_CACHE_SIZE`]); 0 with `disable_cache = true`.
    pub cache_size: usize,
    /// `proxy { ... }`: present when this node runs behind its own `vha proxy`.
    pub proxy: Option<ProxyConfig>,
}

/// Default path of the proxy <-> node unix socket (relative to the config file's directory).
pub const DEFAULT_NODE_SOCKET: &str = "vha-node.sock";
/// How long the proxy holds a request while no active node is known before answering 503.
/// Covers a lockd-backed failover (lease TTL 10 s with early release on proof of death well
/// under that) without letting clients hang for long.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// The `proxy { ... }` block: how a pair's proxy and node meet. With it, the proxy owns the
/// `listener "tcp"` address and the node serves only on `node_socket` (and `node_address`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Unix socket where the node serves its proxy: API requests, and the keyring/state
    /// stream. Default [`DEFAULT_NODE_SOCKET`] next to the config file. Mode 0600, or 0666
    /// with another `allowed_uid` (see `vha_core::local::socket_mode`).
    pub node_socket: std::path::PathBuf,
    /// A user besides the node's own that may connect to `node_socket` (the proxy's, when
    /// the pair runs as two users). Checked by the kernel's peer credentials on every
    /// connection; everyone else is refused before a byte is read.
    pub allowed_uid: Option<u32>,
    /// The user the proxy expects the node to run as; default: the proxy's own. The proxy
    /// talks to nothing else listening at `node_socket`.
    pub node_uid: Option<u32>,
    /// Optional loopback TCP listener of the node (benchmarks' "node" scenario).
    pub node_address: Option<SocketAddr>,
    /// Where the proxy serves its Prometheus metrics.
    pub metrics_address: Option<SocketAddr>,
    /// Bound on holding a request while no active node is known.
    pub hold_timeout: Duration,
    /// Proxy worker threads (default: the number of cores).
    pub threads: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            node_socket: std::path::PathBuf::from(DEFAULT_NODE_SOCKET),
            allowed_uid: None,
            node_uid: None,
            node_address: None,
            metrics_address: None,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            threads: None,
        }
    }
}

impl Config {
    /// The primary listener.
    pub fn listener(&self) -> &Listener {
        &self.listeners[0]
    }

    /// The directory the config file lives in, for resolving relative paths.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

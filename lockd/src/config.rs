//! lockd's configuration: a small flat HCL file (`vha lockd --config FILE`) and/or flags,
//! flags winning. Errors reuse core's [`ConfigError`], so they read `FILE:LINE: KEY: message`.
//!
//! ```hcl
//! listen        = "127.0.0.1:8300"   # default; loopback only unless you say otherwise
//! data_dir      = "/var/lib/vha/lockd"
//! lease_ttl     = "10s"              # TTL for acquires that do not ask for one
//! min_lease_ttl = "100ms"
//! max_lease_ttl = "5m"
//! compact_bytes = 67108864           # log size that triggers a snapshot
//! max_value_size = 33558528          # largest value a put may carry (default 32 MiB + 4 KiB)
//! tls_cert_file = "lockd.pem"        # both set: TLS (h2/http1.1 via ALPN)
//! tls_key_file  = "lockd-key.pem"
//! tls_client_ca_file = "ca.pem"      # with TLS: clients must present a certificate it signed
//! token_file    = "lockd.token"      # clients must send Authorization: Bearer <token>; one
//!                                    # token per line, any is accepted (rotation)
//! insecure_no_auth = false           # true: allow a non-loopback listener without either
//! ```
//!
//! A listener on a non-loopback address needs authentication (a token, or TLS with a client
//! CA, or both) unless `insecure_no_auth` says otherwise: lockd holds every secret's
//! ciphertext, the keyring and the HA lock.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcl_edit::expr::Expression;
use hcl_edit::structure::Body;
use hcl_edit::Span;
use vha_core::config::ConfigError;
use vha_core::storage::{MAX_LOCAL_VALUE_LEN, MAX_VALUE_LEN};

use crate::store::DEFAULT_COMPACT_BYTES;

/// Default listen address: loopback, port 8300 (Vault's API is 8200, its cluster port 8201;
/// 8300 keeps lockd out of their way and off the network unless asked).
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8300";
/// Default lease TTL, matching the client's default (see `vha_core::storage::lockd`): long
/// enough that two cores saturated by a benchmark never delay renewals past it, while the
/// common crash case fails over early through release-by-token.
pub(crate) const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest TTL accepted: below this scheduling jitter alone could expire a live holder.
pub(crate) const DEFAULT_MIN_LEASE_TTL: Duration = Duration::from_millis(100);
/// Longest TTL accepted: a crashed holder blocks failover for at most this long.
pub(crate) const DEFAULT_MAX_LEASE_TTL: Duration = Duration::from_secs(300);

const KNOWN: &[&str] = &[
    "listen",
    "data_dir",
    "lease_ttl",
    "min_lease_ttl",
    "max_lease_ttl",
    "compact_bytes",
    "max_value_size",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "token_file",
    "insecure_no_auth",
];

/// The daemon's settings, defaults applied and validated.
#[derive(Clone, Debug)]
pub struct LockdConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub lease_ttl: Duration,
    pub min_lease_ttl: Duration,
    pub max_lease_ttl: Duration,
    pub compact_bytes: u64,
    /// Largest value a put may carry: the network limit clients keep by default, up to the
    /// 1 GiB a node allows for large secrets (clients set the same `max_value_size`).
    pub max_value_size: usize,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// CA bundle client certificates must chain to (mutual TLS; needs TLS).
    pub tls_client_ca_file: Option<PathBuf>,
    /// File holding the bearer token clients must present.
    pub token_file: Option<PathBuf>,
    /// Allow a non-loopback listener without authentication (warned about at every start).
    pub insecure_no_auth: bool,
    /// Where each setting came from (`FILE:LINE`, or `<flags>`), for positioned errors.
    origins: std::collections::BTreeMap<String, (PathBuf, Option<usize>)>,
}

impl Default for LockdConfig {
    fn default() -> Self {
        LockdConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8300))),
            data_dir: PathBuf::from("lockd-data"),
            lease_ttl: DEFAULT_LEASE_TTL,
            min_lease_ttl: DEFAULT_MIN_LEASE_TTL,
            max_lease_ttl: DEFAULT_MAX_LEASE_TTL,
            compact_bytes: DEFAULT_COMPACT_BYTES,
            max_value_size: MAX_VALUE_LEN,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            token_file: None,
            insecure_no_auth: false,
            origins: Default::default(),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A key/value pair as it appeared in the file, for positioned errors.
struct Setting<'a> {
    file: &'a Path,
    key: String,
    value: String,
    line: Option<usize>,
}

impl Setting<'_> {
    fn err(&self, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line,
            key: self.key.clone(),
            msg: msg.into(),
        }
    }
    /// A path setting; relative paths in a file are relative to the file's directory.
    fn path(&self) -> PathBuf {
        let p = PathBuf::from(&self.value);
        match self.file.parent() {
            Some(dir) if p.is_relative() && self.file != Path::new("<flags>") => dir.join(p),
            _ => p,
        }
    }
    fn duration(&self) -> Result<Duration, ConfigError> {
        vha_core::duration::parse(&self.value).map_err(|_| self.err(format!("{:?} is not a duration", self.value)))
    }
}

impl LockdConfig {
    /// Parses the HCL text of `file` onto the defaults.
    pub fn from_hcl(text: &str, file: &Path) -> Result<LockdConfig, ConfigError> {
        let body: Body = text.parse().map_err(|e: hcl_edit::parser::Error| ConfigError::Syntax {
            file: file.to_path_buf(),
            line: Some(e.location().line()),
            msg: e.message().to_string(),
        })?;
        let mut c = LockdConfig::default();
        for s in body.iter() {
            let Some(attr) = s.as_attribute() else {
                let line = s.as_block().and_then(|b| b.span()).map(|r| line_of(text, r.start));
                let key = s.as_block().map(|b| b.ident.as_str().to_string()).unwrap_or_default();
                return Err(ConfigError::UnknownKey {
                    file: file.to_path_buf(),
                    line,
                    key,
                });
            };
            let line = attr.span().map(|r| line_of(text, r.start));
            let key = attr.key.as_str().to_string();
            if !KNOWN.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    file: file.to_path_buf(),
                    line,
                    key,
                });
            }
            let value = match &attr.value {
                Expression::String(s) => s.value().clone(),
                Expression::Number(n) => n.value().to_string(),
                Expression::Bool(b) => b.value().to_string(),
                _ => {
                    return Err(ConfigError::Invalid {
                        file: file.to_path_buf(),
                        line,
                        key,
                        msg: "must be a string, number or boolean".into(),
                    })
                }
            };
            c.set(&Setting { file, key, value, line })?;
        }
        c.validate(file)?;
        Ok(c)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<LockdConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::from_hcl(&text, path)
    }

    fn set(&mut self, s: &Setting<'_>) -> Result<(), ConfigError> {
        match s.key.as_str() {
            "listen" => {
                self.listen = s
                    .value
                    .parse()
                    .map_err(|_| s.err(format!("{:?} is not an IP:PORT address", s.value)))?
            }
            "data_dir" => self.data_dir = PathBuf::from(&s.value),
            "lease_ttl" => self.lease_ttl = s.duration()?,
            "min_lease_ttl" => self.min_lease_ttl = s.duration()?,
            "max_lease_ttl" => self.max_lease_ttl = s.duration()?,
            "compact_bytes" => {
                self.compact_bytes = s
                    .value
                    .parse()
                    .map_err(|_| s.err(format!("{:?} is not a byte count", s.value)))?
            }
            "max_value_size" => {
                self.max_value_size = s
                    .value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LOCAL_VALUE_LEN).contains(n))
                    .ok_or_else(|| {
                        s.err(format!(
                            "{:?} is not a byte count from 1 to {MAX_LOCAL_VALUE_LEN}",
                            s.value
                        ))
                    })?
            }
            "tls_cert_file" => self.tls_cert_file = Some(s.path()),
            "tls_key_file" => self.tls_key_file = Some(s.path()),
            "tls_client_ca_file" => self.tls_client_ca_file = Some(s.path()),
            "token_file" => self.token_file = Some(s.path()),
            "insecure_no_auth" => {
                self.insecure_no_auth = vha_core::config::parse_bool(&s.value)
                    .ok_or_else(|| s.err(format!("{:?} is not a boolean", s.value)))?
            }
            _ => return Err(s.err("unknown key")),
        }
        self.origins.insert(s.key.clone(), (s.file.to_path_buf(), s.line));
        Ok(())
    }

    /// Applies a `--flag value` override (same names as the file keys, `-` or `_`).
    pub fn set_flag(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let key = key.replace('-', "_");
        if !KNOWN.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey {
                file: PathBuf::from("<flags>"),
                line: None,
                key,
            });
        }
        self.set(&Setting {
            file: Path::new("<flags>"),
            key,
            value: value.to_string(),
            line: None,
        })
    }

    /// The settings that differ in `new` and that a reload does not apply (the certificate,
    /// key and token are reloaded; everything else is read at start).
    pub fn restart_needed(&self, new: &LockdConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut diff = |changed: bool, key: &'static str| {
            if changed {
                out.push(key);
            }
        };
        diff(self.listen != new.listen, "listen");
        diff(self.data_dir != new.data_dir, "data_dir");
        diff(self.lease_ttl != new.lease_ttl, "lease_ttl");
        diff(self.min_lease_ttl != new.min_lease_ttl, "min_lease_ttl");
        diff(self.max_lease_ttl != new.max_lease_ttl, "max_lease_ttl");
        diff(self.compact_bytes != new.compact_bytes, "compact_bytes");
        diff(self.max_value_size != new.max_value_size, "max_value_size");
        diff(
            self.tls_cert_file.is_some() != new.tls_cert_file.is_some(),
            "tls_cert_file",
        );
        diff(self.tls_client_ca_file != new.tls_client_ca_file, "tls_client_ca_file");
        diff(self.token_file.is_some() != new.token_file.is_some(), "token_file");
        diff(self.insecure_no_auth != new.insecure_no_auth, "insecure_no_auth");
        out
    }

    /// A positioned error about `key`: the file and line it was set at (or `file`).
    pub fn error(&self, file: &Path, key: &str, msg: impl Into<String>) -> ConfigError {
        let (file, line) = self
            .origins
            .get(key)
            .cloned()
            .unwrap_or_else(|| (file.to_path_buf(), None));
        ConfigError::Invalid {
            file,
            line,
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    /// True when clients must authenticate (a token, or TLS with a client CA).
    pub fn authenticates(&self) -> bool {
        self.token_file.is_some() || (self.tls_client_ca_file.is_some() && self.tls_cert_file.is_some())
    }

    /// Cross-field checks.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, msg: String| self.error(file, key, msg);
        if self.min_lease_ttl.is_zero() || self.min_lease_ttl > self.max_lease_ttl {
            return Err(bad(
                "min_lease_ttl",
                format!("{:?} must be positive and <= max_lease_ttl", self.min_lease_ttl),
            ));
        }
        if self.lease_ttl < self.min_lease_ttl || self.lease_ttl > self.max_lease_ttl {
            return Err(bad(
                "lease_ttl",
                format!(
                    "{:?} outside {:?}..={:?}",
                    self.lease_ttl, self.min_lease_ttl, self.max_lease_ttl
                ),
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(bad(
                "tls_cert_file",
                "tls_cert_file and tls_key_file must be set together".into(),
            ));
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(bad(
                "tls_client_ca_file",
                "client certificates need TLS: set tls_cert_file and tls_key_file too".into(),
            ));
        }
        if !self.listen.ip().is_loopback() && !self.authenticates() && !self.insecure_no_auth {
            return Err(bad(
                "listen",
                format!(
                    "refusing to listen on {} without authentication: anyone who can reach it could read every \
                     entry, delete the keyring or release the HA lock. Set token_file (--token-file) and/or \
                     tls_client_ca_file with tls_cert_file and tls_key_file (--tls-client-ca-file), or \
                     insecure_no_auth = true (--insecure-no-auth) to run without authentication anyway",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid file overrides defaults; unknown keys and bad values name file, line and key.
    #[test]
    fn parse_and_positioned_errors() {
        let c = LockdConfig::from_hcl("listen = \"127.0.0.1:9000\"\nlease_ttl = \"3s\"\n", Path::new("l.hcl")).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        let e = LockdConfig::from_hcl("listen = \"127.0.0.1:9000\"\nbogus = 1\n", Path::new("l.hcl")).unwrap_err();
        assert_eq!(e.to_string(), "l.hcl:2: bogus: unknown configuration key");
        let e = LockdConfig::from_hcl("\n\nlease_ttl = \"soon\"\n", Path::new("l.hcl")).unwrap_err();
        assert!(e.to_string().starts_with("l.hcl:3: lease_ttl:"), "{e}");
        let e = LockdConfig::from_hcl("listen = \n", Path::new("l.hcl")).unwrap_err();
        assert!(e.to_string().starts_with("l.hcl:"), "{e}");
    }

    /// A non-loopback listener without authentication is refused with an error that names
    /// the file, line and key and says how to fix it; a token, TLS with a client CA, or the
    /// explicit escape hatch make it valid. Loopback needs none of them.
    #[test]
    fn non_loopback_needs_authentication() {
        let f = Path::new("/etc/vha/lockd.hcl");
        let e = LockdConfig::from_hcl("data_dir = \"d\"\nlisten = \"0.0.0.0:8300\"\n", f).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/vha/lockd.hcl:2: listen: refusing to listen on 0.0.0.0:8300"),
            "{msg}"
        );
        for how in ["--token-file", "--tls-client-ca-file", "--insecure-no-auth"] {
            assert!(msg.contains(how), "{msg}");
        }
        let ok = [
            "listen = \"0.0.0.0:8300\"\ntoken_file = \"t\"\n",
            "listen = \"0.0.0.0:8300\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_client_ca_file = \"ca\"\n",
            "listen = \"0.0.0.0:8300\"\ninsecure_no_auth = true\n",
            "listen = \"127.0.0.2:8300\"\n",
        ];
        for text in ok {
            LockdConfig::from_hcl(text, f).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let c = LockdConfig::from_hcl("listen = \"0.0.0.0:8300\"\ntoken_file = \"t\"\n", f).unwrap();
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new("/etc/vha/t")),
            "relative to the file"
        );
        // TLS without a client CA authenticates no one.
        let e = LockdConfig::from_hcl(
            "listen = \"0.0.0.0:8300\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\n",
            f,
        )
        .unwrap_err();
        assert!(e.to_string().contains("listen: refusing"), "{e}");
        let e = LockdConfig::from_hcl("tls_client_ca_file = \"ca\"\n", f).unwrap_err();
        assert!(
            e.to_string().starts_with("/etc/vha/lockd.hcl:1: tls_client_ca_file:"),
            "{e}"
        );
        let mut c = LockdConfig::default();
        c.set_flag("listen", "0.0.0.0:1").unwrap();
        let e = c.validate(Path::new("<flags>")).unwrap_err();
        assert!(e.to_string().starts_with("<flags>: listen: refusing"), "{e}");
    }
}

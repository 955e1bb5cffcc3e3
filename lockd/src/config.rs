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
//! tls_cert_file = "lockd.pem"        # both set: TLS (h2/http1.1 via ALPN)
//! tls_key_file  = "lockd-key.pem"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcl_edit::expr::Expression;
use hcl_edit::structure::Body;
use hcl_edit::Span;
use vha_core::config::{parse_duration, ConfigError};

use crate::store::DEFAULT_COMPACT_BYTES;

/// Default listen address: loopback, port 8300 (Vault's API is 8200, its cluster port 8201;
/// 8300 keeps lockd out of their way and off the network unless asked).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8300";
/// Default lease TTL, matching the client's default (see `vha_core::storage::lockd`): long
/// enough that two cores saturated by a benchmark never delay renewals past it, while the
/// common crash case fails over early through release-by-token.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest TTL accepted: below this scheduling jitter alone could expire a live holder.
pub const DEFAULT_MIN_LEASE_TTL: Duration = Duration::from_millis(100);
/// Longest TTL accepted: a crashed holder blocks failover for at most this long.
pub const DEFAULT_MAX_LEASE_TTL: Duration = Duration::from_secs(300);

const KNOWN: &[&str] = &[
    "listen",
    "data_dir",
    "lease_ttl",
    "min_lease_ttl",
    "max_lease_ttl",
    "compact_bytes",
    "tls_cert_file",
    "tls_key_file",
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
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
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
            tls_cert_file: None,
            tls_key_file: None,
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
    fn duration(&self) -> Result<Duration, ConfigError> {
        parse_duration(&self.value).ok_or_else(|| self.err(format!("{:?} is not a duration", self.value)))
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
            "tls_cert_file" => self.tls_cert_file = Some(PathBuf::from(&s.value)),
            "tls_key_file" => self.tls_key_file = Some(PathBuf::from(&s.value)),
            _ => return Err(s.err("unknown key")),
        }
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

    /// Cross-field checks.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, msg: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            line: None,
            key: key.to_string(),
            msg,
        };
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
}

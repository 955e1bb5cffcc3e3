//! HCL -> [`Config`]: one pass over the `hcl-edit` syntax tree (which keeps byte spans, turned
//! into 1-based line numbers here), then environment overrides, defaults and validation.
//!
//! Every error names the dotted key (`listener.tcp.address`) and, when it comes from the file,
//! its line. Values are taken literally: expressions other than strings, numbers, booleans
//! (and lists of strings where a list is allowed) are rejected rather than evaluated.
//! Storage options are not validated here; the backend does that with
//! [`Stanza::check_known`](super::Stanza::check_known).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcl_edit::expr::{Expression, UnaryOperator};
use hcl_edit::structure::{Attribute, Block, Body, Structure};
use hcl_edit::Span;
use url::Url;

use super::{
    parse_bool, Config, ConfigError, Env, IpNet, Listener, LogLevel, ProxyConfig, Stanza, StanzaValue,
    DEFAULT_MAX_REQUEST_DURATION, DEFAULT_MAX_REQUEST_SIZE,
};

/// Vault's default listener address.
const DEFAULT_ADDRESS: &str = "127.0.0.1:8200";

/// Environment variables overriding `api_addr`, strongest first (Vault's order).
const API_ADDR_ENV: [&str; 3] = ["VAULT_API_ADDR", "VAULT_REDIRECT_ADDR", "VAULT_ADVERTISE_ADDR"];
/// Environment variable overriding `cluster_addr`.
const CLUSTER_ADDR_ENV: &str = "VAULT_CLUSTER_ADDR";

/// Reads and parses the configuration file at `path`.
pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse_str(&src, path, env)
}

/// Parses configuration text; `file` names it in errors and anchors relative TLS paths.
pub fn parse_str(src: &str, file: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let ctx = Ctx::new(src, file);
    let body = hcl_edit::parser::parse_body(src).map_err(|e| ctx.syntax(&e))?;
    let raw = ctx.top_level(&body)?;
    ctx.finish(raw, env)
}

/// Where a value came from, for positioning errors about it.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// An environment variable (errors name it, without a line).
    Env(&'static str),
    /// The configuration key at this line.
    File(&'static str, Option<usize>),
    /// Derived from other settings.
    Derived(&'static str),
}

impl Source {
    fn key(self) -> &'static str {
        match self {
            Source::Env(k) | Source::File(k, _) | Source::Derived(k) => k,
        }
    }

    fn line(self) -> Option<usize> {
        match self {
            Source::File(_, line) => line,
            Source::Env(_) | Source::Derived(_) => None,
        }
    }
}

/// A string value together with the line it was written on.
#[derive(Debug)]
struct Located {
    value: String,
    line: Option<usize>,
}

/// Top-level settings as written, before env overrides and defaults.
#[derive(Debug, Default)]
struct Raw {
    storage: Option<Stanza>,
    ha_storage: Option<Stanza>,
    listeners: Vec<Listener>,
    api_addr: Option<Located>,
    cluster_addr: Option<Located>,
    cluster_name: Option<String>,
    disable_clustering: bool,
    log_level: Option<LogLevel>,
    step_down_wait: Option<Duration>,
    cache_size: Option<usize>,
    disable_cache: bool,
    proxy: Option<ProxyConfig>,
}

/// A literal scalar value.
enum Scalar {
    Str(String),
    /// A number in its HCL text form (`15`, `-1`, `1.5`).
    Num(String),
    Bool(bool),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Str(s) | Scalar::Num(s) => s,
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// The literal scalar an expression denotes, if it is one (`-N` included).
fn scalar(expr: &Expression) -> Option<Scalar> {
    match expr {
        Expression::String(s) => Some(Scalar::Str(s.value().clone())),
        Expression::Number(n) => Some(Scalar::Num(n.value().to_string())),
        Expression::Bool(b) => Some(Scalar::Bool(*b.value())),
        Expression::UnaryOp(op) if *op.operator.value() == UnaryOperator::Neg => match &op.expr {
            Expression::Number(n) => {
                let s = n.value().to_string();
                Some(Scalar::Num(match s.strip_prefix('-') {
                    Some(pos) => pos.to_string(),
                    None => format!("-{s}"),
                }))
            }
            _ => None,
        },
        _ => None,
    }
}

/// A short description of an expression's kind, for type errors.
fn kind_of(expr: &Expression) -> &'static str {
    match expr {
        Expression::Null(_) => "null",
        Expression::Bool(_) => "a boolean",
        Expression::Number(_) => "a number",
        Expression::String(_) => "a string",
        Expression::Array(_) => "a list",
        Expression::Object(_) => "an object",
        Expression::StringTemplate(_) | Expression::HeredocTemplate(_) => "a template",
        _ => "an expression",
    }
}

/// Parsing context: the source (for line numbers) and the file name (for errors).
struct Ctx<'a> {
    src: &'a str,
    file: &'a Path,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl<'a> Ctx<'a> {
    fn new(src: &'a str, file: &'a Path) -> Self {
        let line_starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Ctx { src, file, line_starts }
    }

    /// The 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset).max(1)
    }

    fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        span.map(|r| self.line_of(r.start))
    }

    fn invalid(&self, line: Option<usize>, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            key: key.into(),
            msg: msg.into(),
        }
    }

    fn unknown(&self, line: Option<usize>, key: impl Into<String>) -> ConfigError {
        ConfigError::UnknownKey {
            file: self.file.to_path_buf(),
            line,
            key: key.into(),
        }
    }

    fn missing(&self, key: impl Into<String>) -> ConfigError {
        ConfigError::Missing {
            file: self.file.to_path_buf(),
            key: key.into(),
        }
    }

    fn at(&self, src: Source, msg: impl Into<String>) -> ConfigError {
        self.invalid(src.line(), src.key(), msg)
    }

    /// Maps an `hcl-edit` parse error. A redefined attribute is reported as an `Invalid`
    /// duplicate naming the attribute (its bare name: the parser does not say which block it
    /// is in); everything else is a positioned syntax error.
    fn syntax(&self, e: &hcl_edit::parser::Error) -> ConfigError {
        let loc = e.location();
        if e.message().contains("redefined attribute") {
            let rest = self.src.get(loc.offset()..).unwrap_or_default();
            let key: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            if !key.is_empty() {
                return self.invalid(Some(loc.line()), key, "defined more than once");
            }
        }
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line: Some(loc.line()),
            msg: format!("column {}: {}", loc.column(), e.message()),
        }
    }

    // ---- typed attribute values ------------------------------------------------------------

    fn string(&self, key: &str, attr: &Attribute) -> Result<String, ConfigError> {
        match &attr.value {
            Expression::String(s) => Ok(s.value().clone()),
            other => Err(self.invalid(
                self.line(attr.span()),
                key,
                format!("expected a string, found {}", kind_of(other)),
            )),
        }
    }

    /// A boolean: an HCL bool, or a string/number `parse_bool` accepts (`"true"`, `1`).
    fn boolean(&self, key: &str, attr: &Attribute) -> Result<bool, ConfigError> {
        let line = self.line(attr.span());
        match scalar(&attr.value) {
            Some(Scalar::Bool(b)) => Ok(b),
            Some(Scalar::Str(s) | Scalar::Num(s)) => {
                parse_bool(&s).ok_or_else(|| self.invalid(line, key, format!("{s:?} is not a boolean")))
            }
            None => Err(self.invalid(line, key, format!("expected a boolean, found {}", kind_of(&attr.value)))),
        }
    }

    /// An integer, written as a number or a numeric string.
    fn integer(&self, key: &str, attr: &Attribute) -> Result<i64, ConfigError> {
        let line = self.line(attr.span());
        match scalar(&attr.value) {
            Some(Scalar::Num(s) | Scalar::Str(s)) => s
                .trim()
                .parse::<i64>()
                .map_err(|_| self.invalid(line, key, format!("{s:?} is not an integer"))),
            _ => Err(self.invalid(
                line,
                key,
                format!("expected an integer, found {}", kind_of(&attr.value)),
            )),
        }
    }

    /// A numeric user id: 0 up to 4294967294 (`u32::MAX` is the kernel's "no user").
    fn uid(&self, key: &str, attr: &Attribute) -> Result<u32, ConfigError> {
        let n = self.integer(key, attr)?;
        match u32::try_from(n) {
            Ok(uid) if uid != u32::MAX => Ok(uid),
            _ => Err(self.invalid(
                self.line(attr.span()),
                key,
                format!("{n} is not a user id (a number from 0 to {})", u32::MAX - 1),
            )),
        }
    }

    /// A duration (`"90s"`, `"1m30s"`, bare seconds); `Ok(None)` for a negative value
    /// (Vault's "unlimited").
    fn duration(&self, key: &str, attr: &Attribute) -> Result<Option<Duration>, ConfigError> {
        let line = self.line(attr.span());
        let s = match scalar(&attr.value) {
            Some(Scalar::Num(s) | Scalar::Str(s)) => s,
            _ => {
                return Err(self.invalid(
                    line,
                    key,
                    format!("expected a duration, found {}", kind_of(&attr.value)),
                ))
            }
        };
        let t = s.trim();
        let (negative, magnitude) = match t.strip_prefix('-') {
            Some(m) => (true, m),
            None => (false, t),
        };
        let d = crate::duration::parse(magnitude)
            .map_err(|_| self.invalid(line, key, format!("{s:?} is not a duration")))?;
        Ok(if negative && !d.is_zero() { None } else { Some(d) })
    }

    /// A list of strings: an HCL list of strings, or one comma-separated string.
    fn string_list(&self, key: &str, attr: &Attribute) -> Result<Vec<String>, ConfigError> {
        let line = self.line(attr.span());
        let items: Vec<String> = match &attr.value {
            Expression::String(s) => s.value().split(',').map(str::to_string).collect(),
            Expression::Array(a) => a
                .iter()
                .map(|e| match e {
                    Expression::String(s) => Ok(s.value().clone()),
                    other => Err(self.invalid(
                        line,
                        key,
                        format!("list items must be strings, found {}", kind_of(other)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(self.invalid(
                    line,
                    key,
                    format!("expected a string or a list of strings, found {}", kind_of(other)),
                ))
            }
        };
        Ok(items
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// A socket address (`127.0.0.1:8200`, `[::1]:8200`).
    fn socket_addr(&self, key: &str, attr: &Attribute) -> Result<SocketAddr, ConfigError> {
        let s = self.string(key, attr)?;
        s.trim().parse().map_err(|_| {
            self.invalid(
                self.line(attr.span()),
                key,
                format!("{s:?} is not an IP:port socket address (like 127.0.0.1:8200 or [::1]:8200)"),
            )
        })
    }

    /// The error for a block found where an attribute is expected, or vice versa.
    fn wrong_shape(&self, s: &Structure, key: &str) -> ConfigError {
        match s {
            Structure::Block(_) => self.invalid(
                self.line(s.span()),
                key,
                "expected an attribute (`key = value`), found a block",
            ),
            Structure::Attribute(_) => self.invalid(
                self.line(s.span()),
                key,
                "expected a block (`key { ... }`), found an attribute",
            ),
        }
    }

    // ---- structure ---------------------------------------------------------------------------

    fn top_level(&self, body: &Body) -> Result<Raw, ConfigError> {
        let mut raw = Raw::default();
        let mut seen: Vec<&str> = Vec::new();
        for s in body.iter() {
            let line = self.line(s.span());
            match s {
                Structure::Attribute(attr) => {
                    let key = attr.key.as_str();
                    if seen.contains(&key) {
                        return Err(self.invalid(line, key, "defined more than once"));
                    }
                    match key {
                        "api_addr" => {
                            raw.api_addr = Some(Located {
                                value: self.string(key, attr)?,
                                line,
                            })
                        }
                        "cluster_addr" => {
                            raw.cluster_addr = Some(Located {
                                value: self.string(key, attr)?,
                                line,
                            })
                        }
                        "cluster_name" => raw.cluster_name = Some(self.string(key, attr)?),
                        "disable_clustering" => raw.disable_clustering = self.boolean(key, attr)?,
                        "disable_cache" => raw.disable_cache = self.boolean(key, attr)?,
                        "cache_size" => {
                            let n = self.integer(key, attr)?;
                            // Vault: 0 means the default size; below 0 is an error.
                            let n = usize::try_from(n).map_err(|_| {
                                self.invalid(line, key, format!("{n} is not a number of entries (0 or more)"))
                            })?;
                            raw.cache_size = Some(n);
                        }
                        "step_down_wait" => {
                            let d = self.duration(key, attr)?;
                            raw.step_down_wait = Some(d.unwrap_or(Duration::ZERO));
                        }
                        "log_level" => {
                            let v = self.string(key, attr)?;
                            let level = LogLevel::parse(v.trim()).ok_or_else(|| {
                                self.invalid(
                                    line,
                                    key,
                                    format!("{v:?} is not a log level (trace, debug, info, warn, error)"),
                                )
                            })?;
                            raw.log_level = Some(level);
                        }
                        // Accepted for Vault compatibility, and ignored.
                        "ui" | "disable_mlock" => {
                            self.boolean(key, attr)?;
                        }
                        "pid_file" => {
                            self.string(key, attr)?;
                        }
                        "storage" | "ha_storage" | "listener" | "telemetry" => return Err(self.wrong_shape(s, key)),
                        _ => return Err(self.unknown(line, key)),
                    }
                    seen.push(key);
                }
                Structure::Block(block) => match block.ident.as_str() {
                    "storage" => {
                        if raw.storage.is_some() {
                            return Err(self.invalid(line, "storage", "only one storage stanza is allowed"));
                        }
                        raw.storage = Some(self.stanza("storage", block)?);
                    }
                    "ha_storage" => {
                        if raw.ha_storage.is_some() {
                            return Err(self.invalid(line, "ha_storage", "only one ha_storage stanza is allowed"));
                        }
                        raw.ha_storage = Some(self.stanza("ha_storage", block)?);
                    }
                    "listener" => raw.listeners.push(self.listener(block)?),
                    "telemetry" => self.telemetry(block)?,
                    "proxy" => {
                        if raw.proxy.is_some() {
                            return Err(self.invalid(line, "proxy", "only one proxy block is allowed"));
                        }
                        raw.proxy = Some(self.proxy(block)?);
                    }
                    key @ ("api_addr" | "cluster_addr" | "cluster_name" | "disable_clustering" | "log_level" | "ui"
                    | "disable_mlock" | "pid_file" | "step_down_wait" | "cache_size" | "disable_cache") => {
                        return Err(self.wrong_shape(s, key))
                    }
                    other => return Err(self.unknown(line, other)),
                },
            }
        }
        Ok(raw)
    }

    /// The single label of a block, or an error naming `key`.
    fn one_label(&self, key: &str, block: &Block) -> Result<String, ConfigError> {
        match block.labels.as_slice() {
            [label] => Ok(label.as_str().to_string()),
            _ => Err(self.invalid(
                self.line(block.span()),
                key,
                format!(
                    "expected exactly one type label (`{key} \"<type>\" {{ ... }}`), found {}",
                    block.labels.len()
                ),
            )),
        }
    }

    /// A `storage`/`ha_storage` stanza: every attribute as a string option.
    fn stanza(&self, name: &'static str, block: &Block) -> Result<Stanza, ConfigError> {
        let kind = self.one_label(name, block)?;
        if kind.is_empty() {
            return Err(self.invalid(
                self.line(block.span()),
                name,
                "the storage type label must not be empty",
            ));
        }
        let mut options = BTreeMap::new();
        for s in block.body.iter() {
            let line = self.line(s.span());
            match s {
                Structure::Attribute(attr) => {
                    let key = attr.key.as_str();
                    let path = format!("{name}.{kind}.{key}");
                    let value = scalar(&attr.value).map(Scalar::into_string).ok_or_else(|| {
                        self.invalid(
                            line,
                            &path,
                            format!("expected a string, number or boolean, found {}", kind_of(&attr.value)),
                        )
                    })?;
                    options.insert(key.to_string(), StanzaValue { value, line });
                }
                Structure::Block(b) => {
                    return Err(self.invalid(
                        line,
                        format!("{name}.{kind}.{}", b.ident.as_str()),
                        "nested blocks are not allowed in a storage stanza",
                    ))
                }
            }
        }
        Ok(Stanza {
            block: name,
            kind,
            options,
            file: self.file.to_path_buf(),
            line: self.line(block.span()),
        })
    }

    /// A top-level `telemetry { ... }` block. vha always serves Prometheus metrics; Vault's
    /// Prometheus-related keys are accepted (and type-checked) for compatibility, and ignored.
    /// Sink keys (`statsd_address`, ...) are rejected so nobody expects metrics to go there.
    /// The `proxy { ... }` block: how this pair's proxy and node meet.
    fn proxy(&self, block: &Block) -> Result<ProxyConfig, ConfigError> {
        if !block.labels.is_empty() {
            return Err(self.invalid(self.line(block.span()), "proxy", "the proxy block takes no label"));
        }
        let mut p = ProxyConfig::default();
        for s in block.body.iter() {
            let Structure::Attribute(attr) = s else {
                let name = s.as_block().map(|b| b.ident.as_str()).unwrap_or_default();
                return Err(self.unknown(self.line(s.span()), format!("proxy.{name}")));
            };
            let key = format!("proxy.{}", attr.key.as_str());
            let line = self.line(attr.span());
            match attr.key.as_str() {
                "node_socket" => {
                    let v = self.string(&key, attr)?;
                    let path = PathBuf::from(v.trim());
                    p.node_socket = if path.is_relative() {
                        self.file.parent().unwrap_or(Path::new(".")).join(path)
                    } else {
                        path
                    };
                }
                "node_address" => {
                    let a = self.socket_addr(&key, attr)?;
                    if !a.ip().is_loopback() {
                        return Err(self.invalid(
                            line,
                            &key,
                            "node_address must be a loopback address (127.0.0.0/8 or ::1)",
                        ));
                    }
                    p.node_address = Some(a);
                }
                "metrics_address" => p.metrics_address = Some(self.socket_addr(&key, attr)?),
                "allowed_uid" => p.allowed_uid = Some(self.uid(&key, attr)?),
                "node_uid" => p.node_uid = Some(self.uid(&key, attr)?),
                "hold_timeout" => {
                    p.hold_timeout = self.duration(&key, attr)?.unwrap_or(Duration::ZERO);
                }
                "threads" => {
                    let n = self.integer(&key, attr)?;
                    if !(1..=256).contains(&n) {
                        return Err(self.invalid(line, &key, "threads must be between 1 and 256"));
                    }
                    p.threads = Some(n as usize);
                }
                _ => return Err(self.unknown(line, key)),
            }
        }
        if p.node_socket.is_relative() {
            p.node_socket = self.file.parent().unwrap_or(Path::new(".")).join(&p.node_socket);
        }
        Ok(p)
    }

    fn telemetry(&self, block: &Block) -> Result<(), ConfigError> {
        if !block.labels.is_empty() {
            return Err(self.invalid(
                self.line(block.span()),
                "telemetry",
                "the telemetry block takes no label",
            ));
        }
        for s in block.body.iter() {
            let Structure::Attribute(attr) = s else {
                let name = s.as_block().map(|b| b.ident.as_str()).unwrap_or_default();
                return Err(self.unknown(self.line(s.span()), format!("telemetry.{name}")));
            };
            let key = format!("telemetry.{}", attr.key.as_str());
            match attr.key.as_str() {
                "prometheus_retention_time" | "usage_gauge_period" => {
                    self.duration(&key, attr)?;
                }
                "disable_hostname" | "enable_hostname_label" => {
                    self.boolean(&key, attr)?;
                }
                "maximum_gauge_cardinality" => {
                    self.integer(&key, attr)?;
                }
                _ => return Err(self.unknown(self.line(attr.span()), key)),
            }
        }
        Ok(())
    }

    /// A `listener "tcp" { ... }` block, defaults applied.
    fn listener(&self, block: &Block) -> Result<Listener, ConfigError> {
        let block_line = self.line(block.span());
        let kind = self.one_label("listener", block)?;
        if kind != "tcp" {
            return Err(self.invalid(
                block_line,
                "listener",
                format!("listener type {kind:?} is not supported (only \"tcp\")"),
            ));
        }
        let key = |k: &str| format!("listener.tcp.{k}");

        let mut address: Option<(SocketAddr, Option<usize>)> = None;
        let mut cluster_address = None;
        let mut tls_disable = false;
        let mut cert: Option<(String, Option<usize>)> = None;
        let mut tls_key: Option<(String, Option<usize>)> = None;
        let mut max_request_size = Some(DEFAULT_MAX_REQUEST_SIZE);
        let mut max_request_duration = Some(DEFAULT_MAX_REQUEST_DURATION);
        let mut xff = Vec::new();
        let mut unauthenticated_metrics_access = false;
        let mut seen_telemetry = false;

        for s in block.body.iter() {
            let line = self.line(s.span());
            let attr = match s {
                Structure::Attribute(attr) => attr,
                Structure::Block(b) if b.ident.as_str() == "telemetry" => {
                    if seen_telemetry {
                        return Err(self.invalid(
                            line,
                            key("telemetry"),
                            "only one telemetry block is allowed per listener",
                        ));
                    }
                    seen_telemetry = true;
                    unauthenticated_metrics_access = self.listener_telemetry(b)?;
                    continue;
                }
                Structure::Block(b) => {
                    let name = b.ident.as_str();
                    return Err(if LISTENER_KEYS.contains(&name) {
                        self.wrong_shape(s, &key(name))
                    } else {
                        self.unknown(line, key(name))
                    });
                }
            };
            let name = attr.key.as_str();
            let k = key(name);
            match name {
                "address" => address = Some((self.socket_addr(&k, attr)?, line)),
                "cluster_address" => cluster_address = Some(self.socket_addr(&k, attr)?),
                "tls_disable" => tls_disable = self.boolean(&k, attr)?,
                "tls_cert_file" => cert = Some((self.string(&k, attr)?, line)),
                "tls_key_file" => tls_key = Some((self.string(&k, attr)?, line)),
                "max_request_size" => {
                    let n = self.integer(&k, attr)?;
                    max_request_size = match n {
                        0 => Some(DEFAULT_MAX_REQUEST_SIZE),
                        n if n < 0 => None,
                        n => Some(n.unsigned_abs()),
                    };
                }
                "max_request_duration" => {
                    max_request_duration = match self.duration(&k, attr)? {
                        Some(d) if d.is_zero() => Some(DEFAULT_MAX_REQUEST_DURATION),
                        other => other,
                    };
                }
                "x_forwarded_for_authorized_addrs" => {
                    xff = self
                        .string_list(&k, attr)?
                        .into_iter()
                        .map(|s| {
                            IpNet::parse(&s)
                                .ok_or_else(|| self.invalid(line, &k, format!("{s:?} is not an IP address or CIDR")))
                        })
                        .collect::<Result<_, _>>()?;
                }
                "telemetry" => return Err(self.wrong_shape(s, &k)),
                _ => return Err(self.unknown(line, k)),
            }
        }

        let (address, address_line) = match address {
            Some(a) => a,
            None => (
                DEFAULT_ADDRESS
                    .parse()
                    .expect("the default address is a socket address"),
                block_line,
            ),
        };
        let cluster_address = match cluster_address {
            Some(c) => c,
            None => {
                let port = address.port().checked_add(1).ok_or_else(|| {
                    self.invalid(
                        address_line,
                        key("address"),
                        "port 65535 leaves no room for the default cluster_address (port+1); set cluster_address",
                    )
                })?;
                SocketAddr::new(address.ip(), port)
            }
        };

        let dir = self.file.parent().filter(|d| !d.as_os_str().is_empty());
        let resolve = |k: &str, v: Option<(String, Option<usize>)>| -> Result<Option<PathBuf>, ConfigError> {
            match v {
                None => Ok(None),
                Some((p, line)) if p.trim().is_empty() => Err(self.invalid(line, key(k), "must not be empty")),
                Some((p, _)) => {
                    let p = PathBuf::from(p);
                    Ok(Some(match dir {
                        Some(d) if p.is_relative() => d.join(p),
                        _ => p,
                    }))
                }
            }
        };
        let tls_cert_file = resolve("tls_cert_file", cert)?;
        let tls_key_file = resolve("tls_key_file", tls_key)?;
        if !tls_disable {
            if tls_cert_file.is_none() {
                return Err(self.missing(key("tls_cert_file")));
            }
            if tls_key_file.is_none() {
                return Err(self.missing(key("tls_key_file")));
            }
        }

        Ok(Listener {
            address,
            cluster_address,
            tls_disable,
            tls_cert_file,
            tls_key_file,
            max_request_size,
            max_request_duration,
            x_forwarded_for_authorized_addrs: xff,
            unauthenticated_metrics_access,
            line: block_line,
        })
    }

    /// A listener's `telemetry { unauthenticated_metrics_access = ... }` block.
    fn listener_telemetry(&self, block: &Block) -> Result<bool, ConfigError> {
        let base = "listener.tcp.telemetry";
        if !block.labels.is_empty() {
            return Err(self.invalid(self.line(block.span()), base, "the telemetry block takes no label"));
        }
        let mut access = false;
        for s in block.body.iter() {
            let line = self.line(s.span());
            match s {
                Structure::Attribute(attr) if attr.key.as_str() == "unauthenticated_metrics_access" => {
                    access = self.boolean(&format!("{base}.unauthenticated_metrics_access"), attr)?;
                }
                Structure::Block(b) if b.ident.as_str() == "unauthenticated_metrics_access" => {
                    return Err(self.wrong_shape(s, &format!("{base}.unauthenticated_metrics_access")))
                }
                Structure::Attribute(attr) => return Err(self.unknown(line, format!("{base}.{}", attr.key.as_str()))),
                Structure::Block(b) => return Err(self.unknown(line, format!("{base}.{}", b.ident.as_str()))),
            }
        }
        Ok(access)
    }

    // ---- env, defaults, validation -----------------------------------------------------------

    fn finish(&self, raw: Raw, env: &dyn Env) -> Result<Config, ConfigError> {
        let storage = raw.storage.ok_or_else(|| self.missing("storage"))?;
        if raw.listeners.is_empty() {
            return Err(self.missing("listener"));
        }
        let first = &raw.listeners[0];

        let var = |name: &'static str| {
            env.var(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (v, Source::Env(name)))
        };

        let api = API_ADDR_ENV
            .iter()
            .find_map(|name| var(name))
            .or_else(|| raw.api_addr.map(|l| (l.value, Source::File("api_addr", l.line))));
        let (api_addr, api_src) = match api {
            Some((v, src)) => (self.api_url(&v, src)?, src),
            None => {
                let scheme = if first.tls_disable { "http" } else { "https" };
                let src = Source::Derived("api_addr");
                (self.api_url(&format!("{scheme}://{}", first.address), src)?, src)
            }
        };

        let cluster = var(CLUSTER_ADDR_ENV).or_else(|| {
            raw.cluster_addr
                .map(|l| (l.value, Source::File("cluster_addr", l.line)))
        });
        let (cluster_addr, cluster_src) = match cluster {
            Some((v, src)) => (self.cluster_url(&v, src)?, src),
            None => {
                // api_url guarantees a host.
                let host = api_addr.host().map(|h| h.to_string()).unwrap_or_default();
                let port = api_addr.port_or_known_default().unwrap_or(443);
                let port = port.checked_add(1).ok_or_else(|| {
                    self.at(
                        api_src,
                        "port 65535 leaves no room for the default cluster_addr (port+1); set cluster_addr",
                    )
                })?;
                let src = Source::Derived("cluster_addr");
                (self.cluster_url(&format!("https://{host}:{port}"), src)?, src)
            }
        };

        if api_addr.host_str() == cluster_addr.host_str()
            && api_addr.port_or_known_default() == cluster_addr.port_or_known_default()
        {
            let line = match cluster_src {
                Source::File(_, line) => line,
                _ => None,
            };
            return Err(self.invalid(
                line,
                "cluster_addr",
                format!(
                    "cluster_addr {cluster_addr} uses the same host and port as api_addr {api_addr}; \
                     the cluster port must differ (usually api port + 1)"
                ),
            ));
        }

        Ok(Config {
            path: self.file.to_path_buf(),
            storage,
            ha_storage: raw.ha_storage,
            listeners: raw.listeners,
            api_addr,
            cluster_addr,
            cluster_name: raw.cluster_name,
            disable_clustering: raw.disable_clustering,
            log_level: raw.log_level.unwrap_or(LogLevel::Info),
            step_down_wait: raw.step_down_wait.unwrap_or(super::DEFAULT_STEP_DOWN_WAIT),
            cache_size: match (raw.disable_cache, raw.cache_size) {
                (true, _) => 0,
                (false, None | Some(0)) => crate::barrier::cache::DEFAULT_CACHE_SIZE,
                (false, Some(n)) => n,
            },
            proxy: raw.proxy,
        })
    }

    /// `api_addr`: a full http(s) URL with a host.
    fn api_url(&self, v: &str, src: Source) -> Result<Url, ConfigError> {
        let v = v.trim();
        let need_scheme = || {
            self.at(
                src,
                format!("{v:?} is not a full URL: a scheme is required (like https://vault.example.com:8200)"),
            )
        };
        let url = Url::parse(v).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => need_scheme(),
            e => self.at(src, format!("{v:?} is not a valid URL: {e}")),
        })?;
        if !matches!(url.scheme(), "http" | "https") || !v.contains("://") {
            return Err(need_scheme());
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.at(src, format!("{v:?} has no host")));
        }
        Ok(url)
    }

    /// `cluster_addr`: a URL with a host and an explicit port, rewritten as `https://host:port`
    /// (cluster traffic is always TLS; Vault forces the scheme the same way).
    fn cluster_url(&self, v: &str, src: Source) -> Result<Url, ConfigError> {
        let v = v.trim();
        let need_scheme = || {
            self.at(
                src,
                format!("{v:?} is not a full URL: a scheme is required (like https://10.0.0.1:8201)"),
            )
        };
        let url = Url::parse(v).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => need_scheme(),
            e => self.at(src, format!("{v:?} is not a valid URL: {e}")),
        })?;
        if !v.contains("://") {
            return Err(need_scheme());
        }
        let host = match url.host() {
            Some(h) if !h.to_string().is_empty() => h.to_string(),
            _ => return Err(self.at(src, format!("{v:?} has no host"))),
        };
        let port = match url.port() {
            Some(p) => p,
            None if has_explicit_port(v) => url.port_or_known_default().unwrap_or(0),
            None => return Err(self.at(src, format!("{v:?} has no port (like https://10.0.0.1:8201)"))),
        };
        if port == 0 {
            return Err(self.at(src, format!("{v:?}: port 0 cannot be advertised")));
        }
        Url::parse(&format!("https://{host}:{port}"))
            .map_err(|e| self.at(src, format!("{v:?} is not a valid URL: {e}")))
    }
}

/// Keys a listener accepts as attributes (for "block where an attribute belongs" errors).
const LISTENER_KEYS: &[&str] = &[
    "address",
    "cluster_address",
    "tls_disable",
    "tls_cert_file",
    "tls_key_file",
    "max_request_size",
    "max_request_duration",
    "x_forwarded_for_authorized_addrs",
];

/// Whether a URL string spells out a port (`https://h:443` does; `url` hides default ports).
fn has_explicit_port(raw: &str) -> bool {
    let rest = raw.split_once("://").map_or(raw, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let after_host = match host_port.rfind(']') {
        Some(i) => &host_port[i + 1..],
        None => host_port,
    };
    after_host.rsplit_once(':').is_some_and(|(_, p)| !p.is_empty())
}

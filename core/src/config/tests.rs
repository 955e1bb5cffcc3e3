//! Unit tests for the HCL configuration parser: one test per rule listed in `mod.rs` and per
//! error kind, plus proptests that the parser never panics.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

/// The smallest valid configuration: plain-HTTP listener on the default address.
const MINIMAL: &str = r#"storage "inmem" {}
listener "tcp" {
  tls_disable = true
}
"#;

fn parse_env(src: &str, env: &MapEnv) -> Result<Config, ConfigError> {
    parse_str(src, Path::new("file.hcl"), env)
}

fn parse(src: &str) -> Result<Config, ConfigError> {
    parse_env(src, &MapEnv::default())
}

fn ok(src: &str) -> Config {
    parse(src).unwrap_or_else(|e| panic!("expected {src:?} to parse, got: {e}"))
}

fn err(src: &str) -> ConfigError {
    match parse(src) {
        Ok(c) => panic!("expected {src:?} to fail, got {c:?}"),
        Err(e) => e,
    }
}

/// `(key, line)` of an `Invalid` error, panicking on any other kind.
fn invalid(e: &ConfigError) -> (&str, Option<usize>) {
    match e {
        ConfigError::Invalid { key, line, .. } => (key.as_str(), *line),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// `(key, line)` of an `UnknownKey` error, panicking on any other kind.
fn unknown(e: &ConfigError) -> (&str, Option<usize>) {
    match e {
        ConfigError::UnknownKey { key, line, .. } => (key.as_str(), *line),
        other => panic!("expected UnknownKey, got {other:?}"),
    }
}

fn missing(e: &ConfigError) -> &str {
    match e {
        ConfigError::Missing { key, .. } => key,
        other => panic!("expected Missing, got {other:?}"),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A config with one plain-HTTP listener whose body is `listener_body`.
fn with_listener(listener_body: &str) -> String {
    format!("storage \"inmem\" {{}}\nlistener \"tcp\" {{\n  tls_disable = true\n{listener_body}\n}}\n")
}

// ---- complete configuration ------------------------------------------------------------------

/// A realistic Vault server config (every accepted key, both storage stanzas, two listeners,
/// comments, Vault-compat keys) parses into exactly the values written.
#[test]
fn complete_vault_config_parses() {
    let src = r#"# vha node 1
ui            = true
disable_mlock = true
pid_file      = "/run/vault.pid"
cluster_name  = "prod"
log_level     = "debug"
api_addr      = "https://vault-1.example.com:8200"
cluster_addr  = "https://10.0.0.11:8201"
disable_clustering = false

storage "file" {
  path = "/var/lib/vha"
}

ha_storage "lockd" {
  address    = "10.0.0.5:7000"
  lease_ttl  = "15s"
  retries    = 3
  ha_enabled = true
}

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_cert_file   = "/etc/vha/tls/cert.pem"
  tls_key_file    = "tls/key.pem"
  max_request_size     = 1048576
  max_request_duration = "30s"
  x_forwarded_for_authorized_addrs = ["10.0.0.0/8", "::1"]
  telemetry {
    unauthenticated_metrics_access = true
  }
}

listener "tcp" {
  address     = "[::1]:9200"
  tls_disable = "true"
}

telemetry {
  prometheus_retention_time = "30s"
  disable_hostname          = true
}
"#;
    let c = parse_str(src, Path::new("/etc/vha/node.hcl"), &MapEnv::default()).unwrap();
    assert_eq!(c.path, PathBuf::from("/etc/vha/node.hcl"));
    assert_eq!(c.api_addr.as_str(), "https://vault-1.example.com:8200/");
    assert_eq!(c.cluster_addr.as_str(), "https://10.0.0.11:8201/");
    assert_eq!(c.cluster_name.as_deref(), Some("prod"));
    assert!(!c.disable_clustering);
    assert_eq!(c.log_level, LogLevel::Debug);

    assert_eq!(c.storage.block, "storage");
    assert_eq!(c.storage.kind, "file");
    assert_eq!(c.storage.get("path"), Some("/var/lib/vha"));
    assert_eq!(c.storage.line, Some(11));
    assert_eq!(c.storage.file, PathBuf::from("/etc/vha/node.hcl"));

    let ha = c.ha_storage.as_ref().unwrap();
    assert_eq!((ha.block, ha.kind.as_str(), ha.line), ("ha_storage", "lockd", Some(15)));
    assert_eq!(ha.get("address"), Some("10.0.0.5:7000"));
    assert_eq!(ha.get("retries"), Some("3"));
    assert_eq!(ha.get("ha_enabled"), Some("true"));
    assert_eq!(ha.options["lease_ttl"].line, Some(17));
    assert_eq!(
        ha.get_duration("lease_ttl", Duration::ZERO).unwrap(),
        Duration::from_secs(15)
    );

    assert_eq!(c.listeners.len(), 2);
    let l = c.listener();
    assert_eq!(l.address, sa("0.0.0.0:8200"));
    assert_eq!(l.cluster_address, sa("0.0.0.0:8201"));
    assert!(!l.tls_disable);
    assert_eq!(l.tls_cert_file.as_deref(), Some(Path::new("/etc/vha/tls/cert.pem")));
    assert_eq!(l.tls_key_file.as_deref(), Some(Path::new("/etc/vha/tls/key.pem")));
    assert_eq!(l.max_request_size, Some(1_048_576));
    assert_eq!(l.max_request_duration, Some(Duration::from_secs(30)));
    assert_eq!(
        l.x_forwarded_for_authorized_addrs,
        vec![IpNet::parse("10.0.0.0/8").unwrap(), IpNet::parse("::1").unwrap()]
    );
    assert!(l.unauthenticated_metrics_access);
    assert_eq!(l.line, Some(22));

    let l2 = &c.listeners[1];
    assert_eq!(l2.address, sa("[::1]:9200"));
    assert_eq!(l2.cluster_address, sa("[::1]:9201"));
    assert!(l2.tls_disable);
    assert!(!l2.unauthenticated_metrics_access);
}

/// `load` reads a file from disk and parses it, naming the file in the result; an unreadable
/// file is a `Read` error naming the path.
#[test]
fn load_reads_file_and_reports_unreadable_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vha.hcl");
    std::fs::write(&path, MINIMAL).unwrap();
    let c = load(&path, &MapEnv::default()).unwrap();
    assert_eq!(c.path, path);
    assert_eq!(c.dir(), dir.path());

    let gone = dir.path().join("missing.hcl");
    let e = load(&gone, &MapEnv::default()).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.hcl"), "{e}");
}

/// The Vault-compatibility keys `ui`, `disable_mlock` and `pid_file` are accepted (bools as
/// HCL bools or strings) and change nothing.
#[test]
fn vault_compat_keys_are_accepted_and_ignored() {
    let c = ok(&format!(
        "{MINIMAL}ui = \"true\"\ndisable_mlock = false\npid_file = \"./pid\"\n"
    ));
    let base = ok(MINIMAL);
    assert_eq!(c.api_addr, base.api_addr);
    assert_eq!(c.listeners, base.listeners);
}

// ---- listener defaults -----------------------------------------------------------------------

/// A listener without `address` listens on Vault's default 127.0.0.1:8200.
#[test]
fn listener_address_defaults_to_127_0_0_1_8200() {
    assert_eq!(ok(MINIMAL).listener().address, sa("127.0.0.1:8200"));
}

/// A listener's `cluster_address` defaults to its address with port+1 (IPv4 and IPv6).
#[test]
fn listener_cluster_address_defaults_to_port_plus_one() {
    assert_eq!(ok(MINIMAL).listener().cluster_address, sa("127.0.0.1:8201"));
    let c = ok(&with_listener("  address = \"[::1]:9000\""));
    assert_eq!(c.listener().cluster_address, sa("[::1]:9001"));
}

/// An address on port 65535 leaves no port+1 for the default `cluster_address`: Invalid on the
/// address's line, unless `cluster_address` is set explicitly.
#[test]
fn listener_cluster_address_port_overflow_is_invalid() {
    let e = err(&with_listener("  address = \"127.0.0.1:65535\""));
    assert_eq!(invalid(&e), ("listener.tcp.address", Some(4)));
    // The advertised cluster_addr is set too: deriving it from api_addr (port 65535) would overflow.
    let c = ok(&format!(
        "cluster_addr = \"https://127.0.0.1:8201\"\n{}",
        with_listener("  address = \"127.0.0.1:65535\"\n  cluster_address = \"127.0.0.1:65534\"")
    ));
    assert_eq!(c.listener().cluster_address, sa("127.0.0.1:65534"));
}

/// Listener addresses must be IP:port socket addresses; a hostname or missing port is Invalid.
#[test]
fn listener_address_must_be_socket_addr() {
    for bad in ["localhost:8200", "127.0.0.1", "::1:8200", "127.0.0.1:99999"] {
        let e = err(&with_listener(&format!("  address = \"{bad}\"")));
        assert_eq!(invalid(&e), ("listener.tcp.address", Some(4)), "{bad}");
    }
    let e = err(&with_listener("  cluster_address = \"nope\""));
    assert_eq!(invalid(&e), ("listener.tcp.cluster_address", Some(4)));
}

/// `max_request_size` defaults to 32 MiB, 0 means the default, negative means unlimited.
#[test]
fn max_request_size_default_zero_and_negative() {
    assert_eq!(ok(MINIMAL).listener().max_request_size, Some(DEFAULT_MAX_REQUEST_SIZE));
    let size = |v: &str| {
        ok(&with_listener(&format!("  max_request_size = {v}")))
            .listener()
            .max_request_size
    };
    assert_eq!(size("0"), Some(DEFAULT_MAX_REQUEST_SIZE));
    assert_eq!(size("-1"), None);
    assert_eq!(size("1024"), Some(1024));
    assert_eq!(size("\"2048\""), Some(2048));
    let e = err(&with_listener("  max_request_size = \"big\""));
    assert_eq!(invalid(&e), ("listener.tcp.max_request_size", Some(4)));
    let e = err(&with_listener("  max_request_size = 1.5"));
    assert_eq!(invalid(&e), ("listener.tcp.max_request_size", Some(4)));
}

/// `max_request_duration` defaults to 90 s, takes duration strings or integer seconds, and a
/// negative value (number or string) means unlimited.
#[test]
fn max_request_duration_default_forms_and_negative() {
    assert_eq!(
        ok(MINIMAL).listener().max_request_duration,
        Some(DEFAULT_MAX_REQUEST_DURATION)
    );
    let dur = |v: &str| {
        ok(&with_listener(&format!("  max_request_duration = {v}")))
            .listener()
            .max_request_duration
    };
    assert_eq!(dur("\"2m\""), Some(Duration::from_secs(120)));
    assert_eq!(dur("\"1m30s\""), Some(Duration::from_secs(90)));
    assert_eq!(dur("45"), Some(Duration::from_secs(45)));
    assert_eq!(dur("\"45\""), Some(Duration::from_secs(45)));
    assert_eq!(dur("0"), Some(DEFAULT_MAX_REQUEST_DURATION));
    assert_eq!(dur("-1"), None);
    assert_eq!(dur("\"-1\""), None);
    assert_eq!(dur("\"-5s\""), None);
}

/// A malformed duration is Invalid, naming the key and its line.
#[test]
fn bad_duration_is_invalid() {
    let e = err(&with_listener("  max_request_duration = \"ninety seconds\""));
    assert_eq!(invalid(&e), ("listener.tcp.max_request_duration", Some(4)));
    assert!(e.to_string().contains("ninety seconds"), "{e}");
    let e = err(&with_listener("  max_request_duration = true"));
    assert_eq!(invalid(&e), ("listener.tcp.max_request_duration", Some(4)));
}

/// TLS is on by default: without `tls_disable`, both cert and key files are required (Missing
/// naming the key); relative paths resolve against the config file's directory.
#[test]
fn tls_enabled_requires_cert_and_key_files() {
    let e = err("storage \"inmem\" {}\nlistener \"tcp\" {}\n");
    assert_eq!(missing(&e), "listener.tcp.tls_cert_file");
    let e = err("storage \"inmem\" {}\nlistener \"tcp\" {\n  tls_cert_file = \"c.pem\"\n}\n");
    assert_eq!(missing(&e), "listener.tcp.tls_key_file");
    let e = err("storage \"inmem\" {}\nlistener \"tcp\" {\n  tls_cert_file = \"\"\n  tls_key_file = \"k\"\n}\n");
    assert_eq!(invalid(&e), ("listener.tcp.tls_cert_file", Some(3)));

    let src =
        "storage \"inmem\" {}\nlistener \"tcp\" {\n  tls_cert_file = \"c.pem\"\n  tls_key_file = \"/abs/k.pem\"\n}\n";
    let c = parse_str(src, Path::new("/etc/vha/vha.hcl"), &MapEnv::default()).unwrap();
    assert_eq!(c.listener().tls_cert_file.as_deref(), Some(Path::new("/etc/vha/c.pem")));
    assert_eq!(c.listener().tls_key_file.as_deref(), Some(Path::new("/abs/k.pem")));
    assert_eq!(c.api_addr.scheme(), "https");
}

/// Booleans accept HCL bools, Vault's strings ("true", "1", "f") and 0/1 numbers
/// (`tls_disable = 1` is common in Vault examples).
#[test]
fn bools_accept_hcl_bools_strings_and_numbers() {
    for v in ["true", "\"true\"", "\"1\"", "1", "\"T\""] {
        let src = format!("storage \"inmem\" {{}}\nlistener \"tcp\" {{\n  tls_disable = {v}\n}}\n");
        assert!(ok(&src).listener().tls_disable, "{v}");
    }
    let c = ok(&format!("disable_clustering = \"false\"\n{MINIMAL}"));
    assert!(!c.disable_clustering);
    let c = ok(&format!("disable_clustering = true\n{MINIMAL}"));
    assert!(c.disable_clustering);
}

/// A value that is not a boolean where one is needed is Invalid with key and line.
#[test]
fn bad_bool_is_invalid() {
    let e = err("storage \"inmem\" {}\nlistener \"tcp\" {\n  tls_disable = \"yes please\"\n}\n");
    assert_eq!(invalid(&e), ("listener.tcp.tls_disable", Some(3)));
    assert!(
        e.to_string().starts_with("file.hcl:3: listener.tcp.tls_disable:"),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}disable_clustering = [true]\n"));
    assert_eq!(invalid(&e), ("disable_clustering", Some(5)));
}

/// `x_forwarded_for_authorized_addrs` takes a comma-separated string or a list of strings,
/// each an IP or CIDR.
#[test]
fn xff_authorized_addrs_string_or_list() {
    let c = ok(&with_listener(
        "  x_forwarded_for_authorized_addrs = \"10.0.0.0/8, 192.168.1.1\"",
    ));
    assert_eq!(
        c.listener().x_forwarded_for_authorized_addrs,
        vec![
            IpNet::parse("10.0.0.0/8").unwrap(),
            IpNet::parse("192.168.1.1/32").unwrap()
        ]
    );
    let c = ok(&with_listener("  x_forwarded_for_authorized_addrs = [\"fd00::/8\"]"));
    assert_eq!(
        c.listener().x_forwarded_for_authorized_addrs,
        vec![IpNet::parse("fd00::/8").unwrap()]
    );
    assert!(ok(MINIMAL).listener().x_forwarded_for_authorized_addrs.is_empty());
}

/// A malformed CIDR (bad address, prefix too long, non-string list item) is Invalid.
#[test]
fn bad_cidr_is_invalid() {
    for v in [
        "\"10.0.0.0/33\"",
        "\"not-an-ip\"",
        "[\"10.0.0.0/8\", \"::1/129\"]",
        "[1]",
        "5",
    ] {
        let e = err(&with_listener(&format!("  x_forwarded_for_authorized_addrs = {v}")));
        assert_eq!(
            invalid(&e),
            ("listener.tcp.x_forwarded_for_authorized_addrs", Some(4)),
            "{v}"
        );
    }
}

/// `IpNet::contains` matches v4 and v6 networks by prefix, treats a bare address as a host
/// route, and matches IPv4-mapped IPv6 peers against v4 networks.
#[test]
fn ipnet_contains_v4_v6_and_mapped() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let v4 = IpNet::parse("10.0.0.0/8").unwrap();
    assert!(v4.contains(ip("10.255.1.2")));
    assert!(!v4.contains(ip("11.0.0.1")));
    assert!(
        v4.contains(ip("::ffff:10.1.2.3")),
        "IPv4-mapped peer matches the v4 network"
    );
    assert!(!v4.contains(ip("::1")));

    let v6 = IpNet::parse("fd00::/8").unwrap();
    assert!(v6.contains(ip("fd12:3456::1")));
    assert!(!v6.contains(ip("fe80::1")));
    assert!(!v6.contains(ip("10.0.0.1")));

    let host = IpNet::parse("127.0.0.1").unwrap();
    assert_eq!(host.prefix, 32);
    assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
    let all = IpNet::parse("0.0.0.0/0").unwrap();
    assert!(all.contains(ip("8.8.8.8")));
    let all6 = IpNet::parse("::/0").unwrap();
    assert!(all6.contains(ip("2001:db8::1")));
    assert!(IpNet::parse("::1/129").is_none());
}

/// The listener's `telemetry` block accepts only `unauthenticated_metrics_access`.
#[test]
fn listener_telemetry_block() {
    let c = ok(&with_listener(
        "  telemetry {\n    unauthenticated_metrics_access = \"true\"\n  }",
    ));
    assert!(c.listener().unauthenticated_metrics_access);
    let e = err(&with_listener(
        "  telemetry {\n    unauthenticated_metrics_access = \"maybe\"\n  }",
    ));
    assert_eq!(
        invalid(&e),
        ("listener.tcp.telemetry.unauthenticated_metrics_access", Some(5))
    );
    let e = err(&with_listener("  telemetry = true"));
    assert_eq!(invalid(&e), ("listener.tcp.telemetry", Some(4)));
}

/// A listener type other than "tcp" (or no type label) is Invalid naming `listener`.
#[test]
fn non_tcp_listener_is_invalid() {
    let e = err("storage \"inmem\" {}\nlistener \"unix\" {\n  address = \"/run/vault.sock\"\n}\n");
    assert_eq!(invalid(&e), ("listener", Some(2)));
    assert!(e.to_string().contains("unix"), "{e}");
    let e = err("storage \"inmem\" {}\nlistener {\n  tls_disable = true\n}\n");
    assert_eq!(invalid(&e), ("listener", Some(2)));
}

// ---- api_addr / cluster_addr defaults ------------------------------------------------------

/// Without api_addr anywhere, it is derived from the first listener's address: http:// when
/// TLS is disabled, https:// otherwise, 0.0.0.0 kept as is.
#[test]
fn api_addr_derived_from_first_listener() {
    assert_eq!(ok(MINIMAL).api_addr.as_str(), "http://127.0.0.1:8200/");
    let c = ok(&with_listener("  address = \"0.0.0.0:8300\""));
    assert_eq!(c.api_addr.as_str(), "http://0.0.0.0:8300/");
    let tls = "storage \"inmem\" {}\nlistener \"tcp\" {\n  address = \"[::1]:8443\"\n  tls_cert_file = \"c\"\n  tls_key_file = \"k\"\n}\nlistener \"tcp\" {\n  address = \"127.0.0.1:9999\"\n  tls_disable = 1\n}\n";
    assert_eq!(ok(tls).api_addr.as_str(), "https://[::1]:8443/");
}

/// Without cluster_addr anywhere, it is https://<api_addr host>:<api port + 1>, using the
/// scheme's default port when api_addr has none.
#[test]
fn cluster_addr_derived_https_host_port_plus_one() {
    let c = ok(MINIMAL);
    assert_eq!(c.cluster_addr.as_str(), "https://127.0.0.1:8201/");
    let c = ok(&format!("api_addr = \"https://vault.example.com\"\n{MINIMAL}"));
    assert_eq!(c.cluster_addr.as_str(), "https://vault.example.com:444/");
    let c = ok(&format!("api_addr = \"http://vault.example.com\"\n{MINIMAL}"));
    assert_eq!(c.cluster_addr.as_str(), "https://vault.example.com:81/");
    let c = ok(&format!("api_addr = \"http://[fd00::5]:8200\"\n{MINIMAL}"));
    assert_eq!(c.cluster_addr.as_str(), "https://[fd00::5]:8201/");
}

/// An api_addr on port 65535 cannot derive cluster_addr (port+1): Invalid on `api_addr`.
#[test]
fn cluster_addr_derivation_overflow_is_invalid() {
    let e = err(&format!("{MINIMAL}api_addr = \"http://h:65535\"\n"));
    assert_eq!(invalid(&e), ("api_addr", Some(5)));
}

/// A cluster_addr written with http:// is advertised as https:// (cluster traffic is TLS).
#[test]
fn http_cluster_addr_forced_to_https() {
    let c = ok(&format!("cluster_addr = \"http://10.0.0.1:8201\"\n{MINIMAL}"));
    assert_eq!(c.cluster_addr.as_str(), "https://10.0.0.1:8201/");
    let c = ok(&format!("cluster_addr = \"https://10.0.0.1:443\"\n{MINIMAL}"));
    assert_eq!(c.cluster_addr.port_or_known_default(), Some(443));
}

/// A cluster_addr without a port, or without a scheme, is Invalid on `cluster_addr`.
#[test]
fn cluster_addr_without_port_or_scheme_is_invalid() {
    let e = err(&format!("cluster_addr = \"https://10.0.0.1\"\n{MINIMAL}"));
    assert_eq!(invalid(&e), ("cluster_addr", Some(1)));
    assert!(e.to_string().contains("port"), "{e}");
    let e = err(&format!("cluster_addr = \"10.0.0.1:8201\"\n{MINIMAL}"));
    assert_eq!(invalid(&e), ("cluster_addr", Some(1)));
}

/// api_addr must be a full URL: without a scheme it is Invalid with a message that says a
/// scheme is required; other schemes and host-less URLs are rejected too.
#[test]
fn api_addr_without_scheme_is_invalid() {
    for bad in [
        "127.0.0.1:8200",
        "vault.example.com:8200",
        "vault.example.com",
        "ftp://h:8200",
        "http:h",
        "http://",
    ] {
        let e = err(&format!("api_addr = \"{bad}\"\n{MINIMAL}"));
        assert_eq!(invalid(&e), ("api_addr", Some(1)), "{bad}");
    }
    let e = err(&format!("api_addr = \"127.0.0.1:8200\"\n{MINIMAL}"));
    assert!(e.to_string().contains("scheme is required"), "{e}");
    assert!(e.to_string().starts_with("file.hcl:1: api_addr:"), "{e}");
}

/// api_addr and cluster_addr on the same host and port is Invalid on `cluster_addr` (even
/// when the schemes differ).
#[test]
fn api_addr_equal_to_cluster_addr_is_invalid() {
    let src = format!("api_addr = \"https://10.0.0.1:8200\"\ncluster_addr = \"https://10.0.0.1:8200\"\n{MINIMAL}");
    let e = err(&src);
    assert_eq!(invalid(&e), ("cluster_addr", Some(2)));
    let src = format!("api_addr = \"http://10.0.0.1:8201\"\ncluster_addr = \"http://10.0.0.1:8201\"\n{MINIMAL}");
    assert_eq!(invalid(&err(&src)), ("cluster_addr", Some(2)));
    let env = MapEnv::default().with("VAULT_CLUSTER_ADDR", "https://10.0.0.1:8200");
    let e = parse_env(&format!("api_addr = \"https://10.0.0.1:8200\"\n{MINIMAL}"), &env).unwrap_err();
    assert_eq!(invalid(&e), ("cluster_addr", None));
}

// ---- environment precedence ------------------------------------------------------------------

const WITH_ADDRS: &str = r#"api_addr = "https://config:8200"
cluster_addr = "https://config:8201"
storage "inmem" {}
listener "tcp" {
  tls_disable = true
}
"#;

fn full_env() -> MapEnv {
    MapEnv::default()
        .with("VAULT_API_ADDR", "https://api:8200")
        .with("VAULT_REDIRECT_ADDR", "https://redirect:8200")
        .with("VAULT_ADVERTISE_ADDR", "https://advertise:8200")
}

/// VAULT_API_ADDR beats VAULT_REDIRECT_ADDR, VAULT_ADVERTISE_ADDR and the config's api_addr.
#[test]
fn env_vault_api_addr_wins() {
    let c = parse_env(WITH_ADDRS, &full_env()).unwrap();
    assert_eq!(c.api_addr.as_str(), "https://api:8200/");
}

/// VAULT_REDIRECT_ADDR beats VAULT_ADVERTISE_ADDR and the config's api_addr.
#[test]
fn env_vault_redirect_addr_beats_advertise_and_config() {
    let mut env = full_env();
    env.0.remove("VAULT_API_ADDR");
    let c = parse_env(WITH_ADDRS, &env).unwrap();
    assert_eq!(c.api_addr.as_str(), "https://redirect:8200/");
}

/// VAULT_ADVERTISE_ADDR beats the config's api_addr.
#[test]
fn env_vault_advertise_addr_beats_config() {
    let env = MapEnv::default().with("VAULT_ADVERTISE_ADDR", "https://advertise:8200");
    let c = parse_env(WITH_ADDRS, &env).unwrap();
    assert_eq!(c.api_addr.as_str(), "https://advertise:8200/");
}

/// Without env overrides (an empty variable counts as unset) the config's api_addr is used.
#[test]
fn config_api_addr_used_without_env() {
    let env = MapEnv::default().with("VAULT_API_ADDR", "");
    let c = parse_env(WITH_ADDRS, &env).unwrap();
    assert_eq!(c.api_addr.as_str(), "https://config:8200/");
    assert_eq!(c.cluster_addr.as_str(), "https://config:8201/");
}

/// VAULT_CLUSTER_ADDR beats the config's cluster_addr (and is forced to https).
#[test]
fn env_vault_cluster_addr_wins() {
    let env = MapEnv::default().with("VAULT_CLUSTER_ADDR", "http://envcluster:9201");
    let c = parse_env(WITH_ADDRS, &env).unwrap();
    assert_eq!(c.cluster_addr.as_str(), "https://envcluster:9201/");
    assert_eq!(c.api_addr.as_str(), "https://config:8200/");
}

/// A bad env-supplied address is Invalid naming the variable, with no line.
#[test]
fn bad_env_value_names_the_variable() {
    let env = MapEnv::default().with("VAULT_REDIRECT_ADDR", "redirect:8200");
    let e = parse_env(WITH_ADDRS, &env).unwrap_err();
    assert_eq!(invalid(&e), ("VAULT_REDIRECT_ADDR", None));
    assert!(e.to_string().starts_with("file.hcl: VAULT_REDIRECT_ADDR:"), "{e}");
    let env = MapEnv::default().with("VAULT_CLUSTER_ADDR", "https://nocluster-port");
    assert_eq!(
        invalid(&parse_env(WITH_ADDRS, &env).unwrap_err()),
        ("VAULT_CLUSTER_ADDR", None)
    );
}

// ---- top-level keys and stanzas --------------------------------------------------------------

/// `log_level` accepts Vault's names (default info); anything else is Invalid.
#[test]
fn log_level_values() {
    assert_eq!(ok(MINIMAL).log_level, LogLevel::Info);
    for (v, want) in [
        ("trace", LogLevel::Trace),
        ("WARN", LogLevel::Warn),
        ("err", LogLevel::Error),
        ("error", LogLevel::Error),
    ] {
        assert_eq!(ok(&format!("log_level = \"{v}\"\n{MINIMAL}")).log_level, want);
    }
    let e = err(&format!("{MINIMAL}log_level = \"loud\"\n"));
    assert_eq!(invalid(&e), ("log_level", Some(5)));
}

/// An unknown top-level key (attribute or block) is UnknownKey with its line, and the Display
/// text reads `file.hcl:LINE: KEY: ...`.
#[test]
fn unknown_top_level_key_reports_line() {
    let e = err(&format!("{MINIMAL}\napi_adr = \"http://x:1\"\n"));
    assert_eq!(unknown(&e), ("api_adr", Some(6)));
    assert!(e.to_string().starts_with("file.hcl:6: api_adr:"), "{e}");
    let e = err(&format!("seal \"shamir\" {{}}\n{MINIMAL}"));
    assert_eq!(unknown(&e), ("seal", Some(1)));
    assert!(e.to_string().contains("file.hcl:1:"), "{e}");
}

/// An unknown listener key is UnknownKey with the dotted path and its line.
#[test]
fn unknown_listener_key_reports_line() {
    let e = err(&with_listener("\n  adress = \"127.0.0.1:8200\""));
    assert_eq!(unknown(&e), ("listener.tcp.adress", Some(5)));
    let text = e.to_string();
    assert!(
        text.contains("file.hcl:5:") && text.contains("listener.tcp.adress"),
        "{text}"
    );
    let e = err(&with_listener("  tls {\n  }"));
    assert_eq!(unknown(&e), ("listener.tcp.tls", Some(4)));
}

/// An unknown key inside a listener's telemetry block is UnknownKey with path and line.
#[test]
fn unknown_listener_telemetry_key_reports_line() {
    let e = err(&with_listener(
        "  telemetry {\n    unauthenticated_metrics_access = true\n    metrics_path = \"/m\"\n  }",
    ));
    assert_eq!(unknown(&e), ("listener.tcp.telemetry.metrics_path", Some(6)));
    let text = e.to_string();
    assert!(
        text.contains("file.hcl:6:") && text.contains("listener.tcp.telemetry.metrics_path"),
        "{text}"
    );
}

/// `proxy { allowed_uid, node_uid }`: numeric user ids, absent by default; a negative,
/// too large or non-numeric value is Invalid naming `proxy.<key>` and its line.
#[test]
fn proxy_block_user_ids() {
    let c = ok(&format!("{MINIMAL}proxy {{\n}}\n"));
    let p = c.proxy.unwrap();
    assert_eq!((p.allowed_uid, p.node_uid), (None, None));
    let c = ok(&format!(
        "{MINIMAL}proxy {{\n  allowed_uid = 65534\n  node_uid = \"0\"\n}}\n"
    ));
    let p = c.proxy.unwrap();
    assert_eq!((p.allowed_uid, p.node_uid), (Some(65534), Some(0)));
    for (line, key) in [
        ("allowed_uid = -1", "proxy.allowed_uid"),
        ("allowed_uid = 4294967295", "proxy.allowed_uid"),
        ("node_uid = 99999999999", "proxy.node_uid"),
        ("node_uid = \"vha\"", "proxy.node_uid"),
        ("allowed_uid = true", "proxy.allowed_uid"),
    ] {
        let e = err(&format!("{MINIMAL}proxy {{\n  {line}\n}}\n"));
        assert_eq!(invalid(&e), (key, Some(6)), "{line}");
        assert!(e.to_string().starts_with(&format!("file.hcl:6: {key}: ")), "{e}");
    }
}

/// The top-level telemetry block accepts Vault's Prometheus keys and rejects sinks vha does
/// not implement (UnknownKey with line).
#[test]
fn top_level_telemetry_block() {
    ok(&format!(
        "{MINIMAL}telemetry {{\n  prometheus_retention_time = \"24h\"\n  disable_hostname = \"true\"\n}}\n"
    ));
    let e = err(&format!("{MINIMAL}telemetry {{\n  statsd_address = \"x:8125\"\n}}\n"));
    assert_eq!(unknown(&e), ("telemetry.statsd_address", Some(6)));
    let e = err(&format!(
        "{MINIMAL}telemetry {{\n  prometheus_retention_time = \"soon\"\n}}\n"
    ));
    assert_eq!(invalid(&e), ("telemetry.prometheus_retention_time", Some(6)));
}

/// A syntax error is a Syntax error carrying the line hcl-edit points at.
#[test]
fn syntax_error_has_line() {
    let e = err("storage \"inmem\" {}\nlistener \"tcp\" {\n  tls_disable = true\n  address = \n}\n");
    match &e {
        ConfigError::Syntax { line, .. } => assert_eq!(*line, Some(4)),
        other => panic!("expected Syntax, got {other:?}"),
    }
    assert!(e.to_string().starts_with("file.hcl:4: syntax error"), "{e}");
    let e = err("storage \"inmem\" {\n");
    assert!(matches!(e, ConfigError::Syntax { line: Some(_), .. }), "{e:?}");
}

/// A top-level attribute defined twice is Invalid naming it, on the second definition's line.
#[test]
fn duplicate_top_level_attribute_is_invalid() {
    let e = err(&format!(
        "api_addr = \"http://a:1\"\n{MINIMAL}api_addr = \"http://b:1\"\n"
    ));
    assert_eq!(invalid(&e), ("api_addr", Some(6)));
}

/// A configuration without a storage stanza is Missing `storage`.
#[test]
fn storage_missing() {
    let e = err("listener \"tcp\" {\n  tls_disable = true\n}\n");
    assert_eq!(missing(&e), "storage");
    assert_eq!(e.to_string(), "file.hcl: storage: required but not set");
}

/// Two storage stanzas (or two ha_storage stanzas) are Invalid on the second one's line.
#[test]
fn second_storage_stanza_is_invalid() {
    let e = err(&format!("{MINIMAL}storage \"file\" {{\n  path = \"/x\"\n}}\n"));
    assert_eq!(invalid(&e), ("storage", Some(5)));
    let e = err(&format!(
        "{MINIMAL}ha_storage \"lockd\" {{}}\nha_storage \"etcd\" {{}}\n"
    ));
    assert_eq!(invalid(&e), ("ha_storage", Some(6)));
}

/// A configuration without any listener is Missing `listener`.
#[test]
fn listener_missing() {
    let e = err("storage \"inmem\" {}\napi_addr = \"http://127.0.0.1:8200\"\n");
    assert_eq!(missing(&e), "listener");
}

/// Storage options become strings (`"x"` -> x, `15` -> "15", `true` -> "true", `-1` -> "-1"),
/// each with its line; backend-specific keys are not checked here, but `check_known` on the
/// stanza reports them with the right path and line later.
#[test]
fn storage_options_are_stringified_with_lines() {
    let src = "storage \"etcd\" {\n  address = \"http://e:2379\"\n  ttl = 15\n  tls = true\n  retries = -1\n  ratio = 1.5\n  bogus = \"x\"\n}\nlistener \"tcp\" {\n  tls_disable = true\n}\n";
    let c = ok(src);
    let s = &c.storage;
    assert_eq!(s.get("address"), Some("http://e:2379"));
    assert_eq!(s.get("ttl"), Some("15"));
    assert_eq!(s.get("tls"), Some("true"));
    assert_eq!(s.get("retries"), Some("-1"));
    assert_eq!(s.get("ratio"), Some("1.5"));
    assert_eq!(s.options["tls"].line, Some(4));
    let e = s
        .check_known(&["address", "ttl", "tls", "retries", "ratio"])
        .unwrap_err();
    assert_eq!(unknown(&e), ("storage.etcd.bogus", Some(7)));
    assert!(c.ha_storage.is_none());
}

/// Nested blocks, non-scalar values, and missing type labels in a storage stanza are Invalid.
#[test]
fn storage_stanza_shape_errors() {
    let e = err("storage \"file\" {\n  tls {\n  }\n}\nlistener \"tcp\" {\n  tls_disable = true\n}\n");
    assert_eq!(invalid(&e), ("storage.file.tls", Some(2)));
    let e = err("storage \"file\" {\n  paths = [\"a\"]\n}\nlistener \"tcp\" {\n  tls_disable = true\n}\n");
    assert_eq!(invalid(&e), ("storage.file.paths", Some(2)));
    let e = err("storage {\n}\nlistener \"tcp\" {\n  tls_disable = true\n}\n");
    assert_eq!(invalid(&e), ("storage", Some(1)));
    let e = err("storage = \"file\"\nlistener \"tcp\" {\n  tls_disable = true\n}\n");
    assert_eq!(invalid(&e), ("storage", Some(1)));
}

/// Wrong value shapes are Invalid with key and line: a block where an attribute belongs, a
/// number where a string belongs, an interpolation instead of a literal.
#[test]
fn wrong_value_types_are_invalid() {
    let e = err(&format!("{MINIMAL}api_addr {{\n}}\n"));
    assert_eq!(invalid(&e), ("api_addr", Some(5)));
    let e = err(&format!("cluster_name = 42\n{MINIMAL}"));
    assert_eq!(invalid(&e), ("cluster_name", Some(1)));
    let e = err(&format!("cluster_name = \"${{var.x}}\"\n{MINIMAL}"));
    assert_eq!(invalid(&e), ("cluster_name", Some(1)));
    let e = err(&with_listener("  address {\n  }"));
    assert_eq!(invalid(&e), ("listener.tcp.address", Some(4)));
    let e = err(&with_listener("  address = 8200"));
    assert_eq!(invalid(&e), ("listener.tcp.address", Some(4)));
}

/// `Display` of every error kind follows `FILE:LINE: KEY: message`.
#[test]
fn display_format() {
    let e = ConfigError::Invalid {
        file: "f.hcl".into(),
        line: Some(3),
        key: "k".into(),
        msg: "bad".into(),
    };
    assert_eq!(e.to_string(), "f.hcl:3: k: bad");
    let e = ConfigError::UnknownKey {
        file: "f.hcl".into(),
        line: None,
        key: "k".into(),
    };
    assert_eq!(e.to_string(), "f.hcl: k: unknown configuration key");
}

// ---- robustness ------------------------------------------------------------------------------

/// A complete valid config used as the seed for mutation tests.
const SEED: &str = r#"api_addr = "https://10.0.0.1:8200"
cluster_addr = "https://10.0.0.1:8201"
log_level = "info"
storage "file" {
  path = "/var/lib/vha"
}
ha_storage "lockd" {
  address = "10.0.0.5:7000"
}
listener "tcp" {
  address = "0.0.0.0:8200"
  tls_disable = true
  max_request_size = -1
  max_request_duration = "90s"
  x_forwarded_for_authorized_addrs = "10.0.0.0/8"
  telemetry {
    unauthenticated_metrics_access = true
  }
}
"#;

/// The mutation seed is itself valid (so mutations explore the neighbourhood of a real config).
#[test]
fn mutation_seed_is_valid() {
    ok(SEED);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `parse_str` never panics on arbitrary input, and any error it returns names the file.
    #[test]
    fn never_panics_on_arbitrary_input(src in any::<String>()) {
        if let Err(e) = parse(&src) {
            prop_assert!(e.to_string().starts_with("file.hcl"));
        }
    }

    /// `parse_str` never panics on HCL-ish input built from the config's own vocabulary.
    #[test]
    fn never_panics_on_hcl_like_input(src in "([a-z_]{1,12}|\"[a-z0-9:./\\[\\]-]{0,12}\"|[{}=\\[\\],\n -]|-?[0-9]{1,6}|true|false|listener|storage|tcp){0,40}") {
        let _ = parse(&src);
    }

    /// `parse_str` never panics on a valid config with a byte range deleted, replaced or
    /// duplicated; errors keep a line within the input.
    #[test]
    fn never_panics_on_mutated_config(
        at in 0..SEED.len(),
        len in 0usize..16,
        insert in "[ -~\n]{0,8}",
        dup in any::<bool>(),
    ) {
        let start = (0..=at).rev().find(|i| SEED.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + len).min(SEED.len());
        let end = (end..=SEED.len()).find(|i| SEED.is_char_boundary(*i)).unwrap_or(SEED.len());
        let middle = if dup { format!("{}{}", &SEED[start..end], &SEED[start..end]) } else { insert };
        let src = format!("{}{}{}", &SEED[..start], middle, &SEED[end..]);
        let lines = src.lines().count().max(1) + 1;
        match parse(&src) {
            Ok(_) => {}
            Err(ConfigError::Syntax { line: Some(l), .. })
            | Err(ConfigError::Invalid { line: Some(l), .. })
            | Err(ConfigError::UnknownKey { line: Some(l), .. }) => prop_assert!(l >= 1 && l <= lines, "line {} of {}", l, lines),
            Err(_) => {}
        }
    }
}

/// `cache_size` defaults to Vault's 131072 (0 means the default too), takes a number or a
/// numeric string, and a negative size is an error naming the key and its line;
/// `disable_cache = true` turns the cache off whatever the size.
#[test]
fn cache_size_default_forms_and_disable() {
    assert_eq!(ok(MINIMAL).cache_size, crate::barrier::cache::DEFAULT_CACHE_SIZE);
    assert_eq!(ok(&format!("cache_size = 0\n{MINIMAL}")).cache_size, 131_072);
    assert_eq!(ok(&format!("cache_size = 1000\n{MINIMAL}")).cache_size, 1000);
    assert_eq!(ok(&format!("cache_size = \"64\"\n{MINIMAL}")).cache_size, 64);
    assert_eq!(
        ok(&format!("cache_size = 64\ndisable_cache = true\n{MINIMAL}")).cache_size,
        0
    );
    assert_eq!(ok(&format!("disable_cache = false\n{MINIMAL}")).cache_size, 131_072);
    let e = err(&format!("\ncache_size = -1\n{MINIMAL}"));
    assert_eq!(invalid(&e), ("cache_size", Some(2)));
    assert!(e.to_string().contains("file.hcl"), "{e}");
    assert_eq!(
        invalid(&err(&format!("disable_cache = \"maybe\"\n{MINIMAL}"))).0,
        "disable_cache"
    );
}

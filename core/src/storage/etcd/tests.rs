//! Stanza parsing and timing (no etcd needed; the conformance suites against real etcd
//! processes live in `tests/t50_etcd.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

fn stanza(opts: &[(&str, &str)]) -> Stanza {
    Stanza {
        block: "storage",
        kind: "etcd".into(),
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

/// Vault's defaults: HA off unless `ha_enabled = "true"`, path `vault/`, 10 s lock lease,
/// comma-separated addresses.
#[test]
fn stanza_defaults_and_addresses() {
    let b = EtcdBackend::from_stanza(&stanza(&[])).unwrap();
    assert!(!b.ha_enabled(), "Vault's etcd backend has HA off by default");
    assert_eq!(b.endpoints(), ["http://127.0.0.1:2379"]);
    assert_eq!(b.path(), "vault/");
    assert_eq!(b.timing().ttl, DEFAULT_LOCK_TIMEOUT);
    assert_eq!(b.lock_key("core/lock"), "vault.ha/lock/core/lock");
    let b = EtcdBackend::from_stanza(&stanza(&[
        ("address", "http://127.0.0.1:1, http://127.0.0.1:2/,http://127.0.0.1:3"),
        ("path", "/x/vault"),
        ("ha_enabled", "true"),
        ("lock_timeout", "20s"),
        ("request_timeout", "2s"),
        ("etcd_api", "v3"),
    ]))
    .unwrap();
    assert!(b.ha_enabled());
    assert_eq!(b.endpoints().len(), 3);
    assert_eq!(b.endpoints()[1], "http://127.0.0.1:2");
    assert_eq!(b.path(), "/x/vault/");
    assert_eq!(b.data_key("a/b"), "/x/vault/a/b");
    assert_eq!(b.lock_key("core/lock"), "/x/vault.ha/lock/core/lock");
    assert_eq!(b.timing().ttl, Duration::from_secs(20));
    assert_eq!(b.request_timeout(), Duration::from_secs(2));
}

/// Bad options are positioned errors naming the key.
#[test]
fn stanza_errors() {
    let err = |opts: &[(&str, &str)]| EtcdBackend::from_stanza(&stanza(opts)).unwrap_err().to_string();
    let e = err(&[("nope", "1")]);
    assert!(e.contains("vault.hcl:3: storage.etcd.nope"), "{e}");
    let e = err(&[("lock_timeout", "2s")]);
    assert!(e.contains("lock_timeout") && e.contains("minimum"), "{e}");
    let e = err(&[("address", "ftp://x:1")]);
    assert!(e.contains("address"), "{e}");
    let e = err(&[("etcd_api", "v2")]);
    assert!(e.contains("etcd_api"), "{e}");
    let e = err(&[("username", "u")]);
    assert!(e.contains("password"), "{e}");
    let e = err(&[("tls_ca_file", "/nonexistent/ca.pem"), ("address", "https://x:1")]);
    assert!(e.contains("tls_ca_file") && e.contains("/nonexistent/ca.pem"), "{e}");
    let e = err(&[("request_timeout", "0s")]);
    assert!(e.contains("request_timeout"), "{e}");
}

/// TLS files are read at load, relative to the config file; TLS needs https addresses.
#[test]
fn stanza_tls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
    let mut s = stanza(&[("address", "https://127.0.0.1:2379"), ("tls_ca_file", "ca.pem")]);
    s.file = dir.path().join("vault.hcl");
    let b = EtcdBackend::from_stanza(&s).unwrap();
    assert_eq!(b.inner.cfg.tls.as_ref().unwrap().ca_pem.as_deref(), Some(&b"x"[..]));
    let mut s = stanza(&[("address", "http://127.0.0.1:2379"), ("tls_ca_file", "ca.pem")]);
    s.file = dir.path().join("vault.hcl");
    let e = EtcdBackend::from_stanza(&s).unwrap_err().to_string();
    assert!(e.contains("https"), "{e}");
}

/// Keep-alives are frequent and the margin leaves most of the TTL usable; etcd's TTL unit is
/// whole seconds, rounded up.
#[test]
fn timing() {
    let t = LockTiming::from_ttl(DEFAULT_LOCK_TIMEOUT);
    assert!(t.renew_interval * 5 < t.ttl - t.margin);
    assert_eq!(LockTiming::from_ttl(Duration::from_millis(5500)).ttl_secs(), 6);
    assert_eq!(LockTiming::from_ttl(Duration::from_secs(5)).ttl_secs(), 5);
    assert_eq!(encode_token(42), "00000000000000000042");
    assert!(encode_token(9) < encode_token(10), "byte order is numeric order");
}

//! lockd over TLS: an in-process daemon with a certificate from files, reached by the core
//! client through `storage "lockd" { address = "https://..." tls_ca_file = ... }`.

use std::collections::BTreeMap;
use std::time::Duration;

use vha_core::config::{Stanza, StanzaValue};
use vha_core::storage::lockd::LockdBackend;
use vha_core::storage::{Backend, HaBackend};
use vha_lockd::{Daemon, LockdConfig};

fn stanza(opts: &[(&str, String)]) -> Stanza {
    Stanza {
        block: "storage",
        kind: "lockd".into(),
        options: opts
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    StanzaValue {
                        value: v.clone(),
                        line: None,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        file: "test.hcl".into(),
        line: None,
    }
}

/// With `tls_cert_file`/`tls_key_file` lockd serves h2 over TLS; a client trusting the
/// certificate (`tls_ca_file`) does KV and lock operations; a client trusting nothing is
/// refused; `dangerous_tls_skip_verify` connects anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let cfg = LockdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        tls_cert_file: Some(cert.clone()),
        tls_key_file: Some(key),
        ..LockdConfig::default()
    };
    let d = Daemon::start(&cfg).await.unwrap();
    let addr = format!("https://localhost:{}", d.addr.port());

    let b = LockdBackend::from_stanza(&stanza(&[
        ("address", addr.clone()),
        ("tls_ca_file", cert.display().to_string()),
    ]))
    .unwrap();
    b.put("tls/k", b"v".to_vec(), None).await.unwrap();
    assert_eq!(b.get("tls/k").await.unwrap().unwrap().value, b"v");
    let g = b.acquire("tls/lock", "x", Default::default()).await.unwrap().unwrap();
    assert_eq!(b.holder("tls/lock").await.unwrap().unwrap().token, g.fence().token);
    g.release().await.unwrap();

    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();
    let untrusting = LockdBackend::from_stanza(&stanza(&[
        ("address", addr.clone()),
        ("tls_ca_file", wrong.display().to_string()),
        ("request_timeout", "2s".into()),
    ]))
    .unwrap();
    assert!(
        untrusting.get("tls/k").await.is_err(),
        "a certificate we do not trust is refused"
    );

    let skip = LockdBackend::from_stanza(&stanza(&[
        ("address", addr),
        ("dangerous_tls_skip_verify", "true".into()),
    ]))
    .unwrap();
    assert!(skip.get("tls/k").await.unwrap().is_some());
    tokio::time::timeout(Duration::from_secs(10), d.stop()).await.unwrap();
}

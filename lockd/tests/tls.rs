//! lockd over TLS: an in-process daemon with a certificate from files, reached by the core
//! client through `storage "lockd" { address = "https://..." tls_ca_file = ... }`; and with
//! mutual TLS plus a token, configured through every credential key of the stanza.

use std::collections::BTreeMap;
use std::time::Duration;

use vha_core::config::{Stanza, StanzaValue};
use vha_core::storage::lockd::LockdBackend;
use vha_core::storage::{Backend, HaBackend};
use vha_lockd::{Daemon, LockdConfig};

/// A daemon configuration on a free loopback port with the given settings.
fn config(settings: &[(&str, String)]) -> LockdConfig {
    let mut cfg = LockdConfig::default();
    cfg.set_flag("listen", &format!("127.0.0.1:{}", vha_testkit::free_port()))
        .unwrap();
    for (k, v) in settings {
        cfg.set_flag(k, v).unwrap();
    }
    cfg.validate(std::path::Path::new("<test>")).unwrap();
    cfg
}

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
    let cfg = config(&[
        ("data_dir", dir.path().join("data").display().to_string()),
        ("tls_cert_file", cert.display().to_string()),
        ("tls_key_file", key.display().to_string()),
    ]);
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

/// A lockd that requires a client certificate from its CA and a bearer token is reached
/// through a stanza with `token_file`, `tls_ca_file`, `tls_cert_file`, `tls_key_file` and
/// `tls_server_name` (the address is an IP the certificate does not name); dropping the
/// certificate or the token gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_and_token_through_the_stanza() {
    let dir = tempfile::tempdir().unwrap();
    let ca = vha_testkit::pki::TestCa::new(dir.path(), "lockd");
    let server = ca.server("server", &["lockd.internal"]);
    let client = ca.client("client", "node-1");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let cfg = config(&[
        ("data_dir", dir.path().join("data").display().to_string()),
        ("tls_cert_file", server.cert.display().to_string()),
        ("tls_key_file", server.key.display().to_string()),
        ("tls_client_ca_file", ca.ca_file.display().to_string()),
        ("token_file", token.display().to_string()),
    ]);
    let d = Daemon::start(&cfg).await.unwrap();
    let addr = format!("https://127.0.0.1:{}", d.addr.port());
    let full = [
        ("address", addr.clone()),
        ("token_file", token.display().to_string()),
        ("tls_ca_file", ca.ca_file.display().to_string()),
        ("tls_cert_file", client.cert.display().to_string()),
        ("tls_key_file", client.key.display().to_string()),
        ("tls_server_name", "lockd.internal".to_string()),
        ("request_timeout", "3s".to_string()),
    ];
    let b = LockdBackend::from_stanza(&stanza(&full)).unwrap();
    b.put("m/k", b"v".to_vec(), None).await.unwrap();
    assert_eq!(b.get("m/k").await.unwrap().unwrap().value, b"v");
    for drop in ["token_file", "tls_cert_file", "tls_server_name"] {
        let opts: Vec<(&str, String)> = full
            .iter()
            .filter(|(k, _)| *k != drop && !(drop == "tls_cert_file" && *k == "tls_key_file"))
            .cloned()
            .collect();
        let c = LockdBackend::from_stanza(&stanza(&opts)).unwrap();
        assert!(c.get("m/k").await.is_err(), "without {drop} lockd answers nothing");
    }
    tokio::time::timeout(Duration::from_secs(10), d.stop()).await.unwrap();
}

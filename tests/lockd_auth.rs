//! lockd authentication through its real process: a bearer token, mutual TLS, both, and the
//! refusal to listen on a non-loopback address without either. Every refused request reads
//! nothing, changes nothing, and is counted in `vha_lockd_auth_failures_total{reason}`; the
//! right credentials work.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vha_core::storage::lockd::{LockdBackend, LockdCredentials};
use vha_core::storage::{Backend, HaBackend, StorageError};
use vha_testkit::pki::TestCa;
use vha_testkit::{free_port, vha_binary, wait_until, wait_until_async, ChildProc, TestLockd};

/// `reason` counter of `vha_lockd_auth_failures_total` in a metrics text.
fn failures(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("vha_lockd_auth_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

/// lockd's metrics, read with its token.
async fn metrics(http: &reqwest::Client, l: &TestLockd) -> String {
    let r = http
        .get(format!("{}/metrics", l.address()))
        .bearer_auth(l.token().expect("token"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// A POST with the given `Authorization` header (or none): `(status, body)`.
async fn post(http: &reqwest::Client, l: &TestLockd, path: &str, auth: Option<&str>, body: Value) -> (u16, Value) {
    let mut rb = http.post(format!("{}{path}", l.address())).body(body.to_string());
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    let r = rb.send().await.expect("request");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// With a token configured: requests without it, with a wrong one, or with the right one in
/// another scheme are refused with 401 and a Vault-style error; they read nothing (no entry,
/// no holder, no watch, no snapshot, no metrics) and change nothing (no write, no delete, no
/// release of the HA lock by its token); each is counted by reason; the presented secrets
/// never reach lockd's log; `/v1/health` stays open; the right token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refuses_everything_without_it() {
    let l = TestLockd::start();
    let token = l.token().expect("token").to_string();
    let good = l.client();
    good.put("sec/k", b"secret-value".to_vec(), None).await.unwrap();
    let g = good
        .acquire("core/lock", "holder", Default::default())
        .await
        .unwrap()
        .unwrap();
    let holder_token = g.fence().token;
    let http = reqwest::Client::new();
    let before = metrics(&http, &l).await;

    let wrong = "Bearer wrong-token-0123456789abcdef";
    let cases: [(Option<String>, &str); 4] = [
        (None, "missing_token"),
        (Some(wrong.to_string()), "bad_token"),
        (Some(format!("Basic {token}")), "bad_scheme"),
        (Some(token.clone()), "bad_scheme"),
    ];
    let requests = [
        ("/v1/kv/get", json!({"key": "sec/k"})),
        ("/v1/kv/list", json!({"prefix": ""})),
        ("/v1/kv/put", json!({"key": "sec/k", "value": "AA=="})),
        ("/v1/kv/delete", json!({"key": "sec/k"})),
        ("/v1/lock/holder", json!({"key": "core/lock"})),
        ("/v1/lock/release", json!({"key": "core/lock", "token": holder_token})),
        ("/v1/lock/acquire", json!({"key": "other", "value": "x"})),
        ("/v1/watch", json!({"prefix": ""})),
        ("/v1/snapshot", json!({})),
    ];
    for (auth, _) in &cases {
        for (path, body) in &requests {
            let (s, v) = post(&http, &l, path, auth.as_deref(), body.clone()).await;
            assert_eq!(s, 401, "{path} with {auth:?}: {v}");
            assert_eq!(v["code"], "unauthorized", "{v}");
            assert!(v["errors"][0].as_str().is_some(), "Vault-shaped errors: {v}");
            let text = v.to_string();
            assert!(!text.contains("secret-value") && !text.contains("holder"), "{text}");
        }
        let mut rb = http.get(format!("{}/metrics", l.address()));
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        assert_eq!(rb.send().await.unwrap().status(), 401, "/metrics with {auth:?}");
    }
    let per_case = requests.len() as u64 + 1;
    let after = metrics(&http, &l).await;
    for (reason, n) in [("missing_token", 1), ("bad_token", 1), ("bad_scheme", 2)] {
        assert_eq!(
            failures(&after, reason) - failures(&before, reason),
            n * per_case,
            "{reason} counted once per refused request"
        );
    }
    // Nothing changed: the value, the lock and its holder are as they were.
    assert_eq!(good.get("sec/k").await.unwrap().unwrap().value, b"secret-value");
    let h = good.holder("core/lock").await.unwrap().expect("still held");
    assert_eq!((h.value.as_str(), h.token), ("holder", holder_token));
    assert_eq!(good.holder("other").await.unwrap(), None);
    assert!(!g.is_lost());
    // Health stays open for load balancers.
    let r = http.get(format!("{}/v1/health", l.address())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // What was presented is never logged.
    let log = l.output();
    assert!(
        log.contains("bad_token") && log.contains("request refused"),
        "refusals are logged:\n{log}"
    );
    assert!(
        !log.contains("wrong-token-0123456789abcdef") && !log.contains(&token),
        "{log}"
    );
    // A client configured with a wrong token gets a clear error.
    let bad = LockdBackend::connect_with(
        &l.address(),
        &LockdCredentials::token("wrong-token-0123456789abcdef").unwrap(),
    )
    .unwrap();
    match bad.get("sec/k").await {
        Err(StorageError::Unauthorized(m)) => assert!(m.contains("401") && m.contains("invalid token"), "{m}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    g.release().await.unwrap();
}

/// With mutual TLS required: a client without a certificate, with a certificate from another
/// CA, or speaking plain HTTP to the TLS port is refused at the handshake and counted by
/// reason; nothing is read or changed; a client with a certificate from lockd's client CA
/// (and the token) works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_trusted_certificate() {
    let l = TestLockd::builder().mtls().start();
    let good = l.client();
    good.put("m/k", b"v".to_vec(), None)
        .await
        .expect("the right certificate and token work");
    let other = TestCa::new(&l.scratch().join("other-pki"), "other");
    let foreign = other.client("client", "vha-node");
    let base = l.credentials();
    let no_cert = LockdCredentials {
        tls_cert_file: None,
        tls_key_file: None,
        ..base.clone()
    };
    let wrong_ca = LockdCredentials {
        tls_cert_file: Some(foreign.cert.clone()),
        tls_key_file: Some(foreign.key.clone()),
        ..base.clone()
    };
    let http = tls_client(&l);
    let before = metrics(&http, &l).await;
    for (creds, what) in [
        (&no_cert, "no client certificate"),
        (&wrong_ca, "a certificate from another CA"),
    ] {
        let c = LockdBackend::connect_with(&l.address(), creds)
            .unwrap()
            .with_request_timeout(Duration::from_secs(5));
        assert!(
            matches!(c.get("m/k").await, Err(StorageError::Unavailable(_))),
            "{what} must not get an answer"
        );
        assert!(c.put("m/k", b"x".to_vec(), None).await.is_err(), "{what}");
    }
    // Plain HTTP to the TLS port.
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/kv/get", l.port))
        .bearer_auth(l.token().unwrap())
        .body(json!({"key": "m/k"}).to_string())
        .send()
        .await;
    assert!(
        plain.map(|r| r.status().as_u16()).unwrap_or(0) != 200,
        "plain HTTP is not served"
    );
    // Handshake refusals are counted when the handshake ends: poll the counters.
    wait_until_async(
        || async {
            let after = metrics(&http, &l).await;
            let d = |r: &str| failures(&after, r) - failures(&before, r);
            (d("no_client_cert") >= 1 && d("bad_client_cert") >= 1 && d("tls_handshake") >= 1).then_some(())
        },
        "every refused handshake is counted by reason",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(good.get("m/k").await.unwrap().unwrap().value, b"v", "nothing changed");
    // mTLS alone (no token) also authenticates.
    let only_tls = TestLockd::builder().mtls().no_auth().start();
    only_tls
        .client()
        .put("t/k", b"1".to_vec(), None)
        .await
        .expect("certificate alone suffices");
}

/// `vha lockd --listen 0.0.0.0:P` without authentication exits non-zero with a message that
/// says how to fix it; with `--insecure-no-auth` it starts and warns, and with a token it
/// starts without that warning.
#[test]
fn non_loopback_listener_needs_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = Command::new(vha_binary())
        .args(["lockd", "--listen", &format!("0.0.0.0:{port}"), "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "listen: refusing to listen on 0.0.0.0:{port} without authentication"
        )),
        "{text}"
    );
    assert!(
        text.contains("--token-file") && text.contains("--insecure-no-auth"),
        "{text}"
    );

    for (extra, warns) in [(vec!["--insecure-no-auth".to_string()], true), (vec![], false)] {
        let port = free_port();
        let mut cmd = Command::new(vha_binary());
        cmd.args(["lockd", "--listen", &format!("0.0.0.0:{port}"), "--data-dir"])
            .arg(dir.path().join(format!("d{port}")))
            .args(&extra);
        if !warns {
            let tf = dir.path().join("token");
            std::fs::write(&tf, "0123456789abcdef0123456789abcdef\n").unwrap();
            cmd.arg("--token-file").arg(&tf);
        }
        let mut p = ChildProc::spawn("lockd", cmd, &dir.path().join(format!("lockd-{port}.log")));
        wait_until(
            || {
                assert!(p.is_running(), "lockd exited:\n{}", p.output());
                p.output().contains("lockd listening on").then_some(())
            },
            "lockd starts",
            Duration::from_secs(30),
        );
        assert_eq!(p.output().contains("INSECURE"), warns, "{}", p.output());
        p.kill();
    }
}

/// An mTLS client of `l` (trusting its CA, presenting its client certificate) that reports
/// the certificate each response's connection was served; a new client is a new connection.
fn tls_client(l: &TestLockd) -> reqwest::Client {
    let tls = l.tls().expect("tls");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&tls.ca.ca_file).unwrap()).unwrap())
        .identity(
            reqwest::Identity::from_pem(
                &[
                    std::fs::read(&tls.client.cert).unwrap(),
                    std::fs::read(&tls.client.key).unwrap(),
                ]
                .concat(),
            )
            .unwrap(),
        )
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `GET /metrics` with `token`: status, the served certificate (DER) and the body.
async fn metrics_as(http: &reqwest::Client, l: &TestLockd, token: &str) -> (u16, Vec<u8>, String) {
    let r = http
        .get(format!("{}/metrics", l.address()))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET /metrics");
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("served certificate")
        .to_vec();
    (r.status().as_u16(), der, r.text().await.unwrap_or_default())
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

fn reloads(metrics: &str, outcome: &str) -> u64 {
    let prefix = format!("vha_config_reloads_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

/// Property: lockd rotates its credentials on SIGHUP without a restart: after a new token
/// and a new server certificate are written over the files, the next requests need the new
/// token (the old one gets 401) and new connections are served the new certificate, while a
/// connection opened before keeps working; the success is counted. A key that does not
/// belong to its certificate then changes nothing (same certificate, same token) and is
/// counted as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_token_and_the_certificate() {
    let l = TestLockd::builder().mtls().start();
    let tls = l.tls().expect("tls");
    let old_token = l.token().expect("token").to_string();
    let old_der = pem_der(&tls.server.cert);
    let kept = tls_client(&l);
    let (st, der, _) = metrics_as(&kept, &l, &old_token).await;
    assert_eq!((st, der == old_der), (200, true));

    let new_token = "rotated-token-0123456789abcdef0123456789abcdef".to_string();
    std::fs::write(l.token_file().expect("token file"), format!("{new_token}\n")).unwrap();
    let fresh = tls.ca.server("server-2", &["127.0.0.1", "localhost"]);
    std::fs::copy(&fresh.cert, &tls.server.cert).unwrap();
    std::fs::copy(&fresh.key, &tls.server.key).unwrap();
    let new_der = pem_der(&tls.server.cert);
    assert_ne!(new_der, old_der);
    l.signal(nix::sys::signal::Signal::SIGHUP);
    let m = wait_until_async(
        || async {
            let (st, der, body) = metrics_as(&tls_client(&l), &l, &new_token).await;
            (st == 200 && der == new_der).then_some(body)
        },
        "the new token and certificate are in force",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!((reloads(&m, "success"), reloads(&m, "failure")), (1, 0));
    assert!(m.contains("vha_tls_certificate_expiry_seconds{listener=\"lockd\"}"));
    assert_eq!(metrics_as(&tls_client(&l), &l, &old_token).await.0, 401, "old token");
    let (st, der, _) = metrics_as(&kept, &l, &new_token).await;
    assert_eq!(
        (st, der == old_der),
        (200, true),
        "the kept-alive connection, new token"
    );

    // A key of another certificate: refused, nothing changes.
    let other = tls.ca.server("server-3", &["127.0.0.1"]);
    std::fs::copy(&other.key, &tls.server.key).unwrap();
    l.signal(nix::sys::signal::Signal::SIGHUP);
    let m = wait_until_async(
        || async {
            let (_, _, body) = metrics_as(&tls_client(&l), &l, &new_token).await;
            (reloads(&body, "failure") == 1).then_some(body)
        },
        "the mismatched key is counted as a failed reload",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(reloads(&m, "success"), 1);
    let (st, der, _) = metrics_as(&tls_client(&l), &l, &new_token).await;
    assert_eq!((st, der == new_der), (200, true), "the last good pair stays served");
    assert!(
        l.output().contains("does not belong to the certificate"),
        "{}",
        l.output()
    );
}

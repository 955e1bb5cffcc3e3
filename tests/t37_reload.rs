//! SIGHUP reloads of a running `vha proxy` (real node and proxy processes; the listener's
//! certificate files are replaced on disk as an operator rotating certificates would).

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use vha_testkit::{wait_until_async, TestNode, TestProxy};

/// Bound on a reload showing up (the proxy reloads within milliseconds; debug build on
/// two busy cores).
const RELOAD_BOUND: Duration = Duration::from_secs(20);
/// notAfter of the replacement certificate: 2030-01-01T00:00:00Z.
const NEW_NOT_AFTER: i64 = 1_893_456_000;

/// A client that accepts any certificate and reports the one it was served.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Status and the DER of the certificate the connection was served.
async fn served(c: &reqwest::Client, base: &str) -> (u16, Vec<u8>) {
    let r = c
        .get(format!("{base}/v1/sys/seal-status"))
        .send()
        .await
        .expect("request");
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("a TLS connection with a certificate")
        .to_vec();
    (r.status().as_u16(), der)
}

fn leaf_der(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .expect("pem")
        .next()
        .expect("one certificate")
        .expect("certificate")
        .to_vec()
}

/// A new self-signed certificate for 127.0.0.1 valid until [`NEW_NOT_AFTER`]; (cert, key) PEM.
fn new_pair() -> (String, String) {
    let mut params = rcgen_params();
    params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn rcgen_params() -> rcgen::CertificateParams {
    rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params")
}

async fn reloads(p: &TestProxy, outcome: &str) -> f64 {
    p.metric(&format!("vha_config_reloads_total{{outcome=\"{outcome}\"}}"))
        .await
}

/// Property: after the listener's certificate and key are replaced on disk and the proxy
/// gets SIGHUP, every new TLS connection is served the new certificate, a connection kept
/// alive from before keeps working (still on the certificate it was opened with), the
/// success is counted and the expiry gauge shows the new notAfter. Then a key that does not
/// belong to the certificate, and a config file that does not parse, change nothing: new
/// connections still get the last good certificate, each failure is counted, and the proxy
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_the_listener_certificate_and_keeps_connections() {
    let node = TestNode::builder().behind_proxy().listener_tls().start().await;
    let listen = format!("127.0.0.1:{}", node.port).parse().expect("listen address");
    let proxy = TestProxy::start(&node.config_path, listen);
    let base = format!("https://127.0.0.1:{}", node.port);
    let (cert_file, key_file) = (node.dir().join("listener.crt"), node.dir().join("listener.key"));
    let old_der = leaf_der(&cert_file);

    let kept = client();
    assert_eq!(
        served(&kept, &base).await,
        (200, old_der.clone()),
        "served the first certificate"
    );
    let old_expiry = proxy
        .metric("vha_tls_certificate_expiry_seconds{listener=\"client\"}")
        .await;
    assert!(
        old_expiry > NEW_NOT_AFTER as f64,
        "rcgen's default notAfter is far ahead: {old_expiry}"
    );

    // Rotate: write the new pair over the old files, then SIGHUP.
    let (cert_pem, key_pem) = new_pair();
    std::fs::write(&cert_file, &cert_pem).expect("write cert");
    std::fs::write(&key_file, &key_pem).expect("write key");
    let new_der = leaf_der(&cert_file);
    assert_ne!(new_der, old_der);
    proxy.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (served(&client(), &base).await == (200, new_der.clone())).then_some(()) },
        "a new connection is served the new certificate",
        RELOAD_BOUND,
    )
    .await;
    assert_eq!(reloads(&proxy, "success").await, 1.0);
    assert_eq!(reloads(&proxy, "failure").await, 0.0);
    assert_eq!(
        proxy
            .metric("vha_tls_certificate_expiry_seconds{listener=\"client\"}")
            .await,
        NEW_NOT_AFTER as f64
    );
    // The connection opened before the reload is still the same one, and still works.
    assert_eq!(
        served(&kept, &base).await,
        (200, old_der.clone()),
        "kept-alive connection"
    );

    // A key of another certificate: the reload fails, the last good pair stays.
    let (_, other_key) = new_pair();
    std::fs::write(&key_file, other_key).expect("write wrong key");
    proxy.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (reloads(&proxy, "failure").await == 1.0).then_some(()) },
        "the mismatched key is counted as a failed reload",
        RELOAD_BOUND,
    )
    .await;
    assert_eq!(served(&client(), &base).await, (200, new_der.clone()));
    assert!(
        proxy.output().contains("does not belong to the certificate"),
        "the log says why: {}",
        proxy.output()
    );

    // A config file that does not parse: nothing changes either.
    std::fs::write(&key_file, &key_pem).expect("restore key");
    let config = std::fs::read_to_string(&node.config_path).expect("config");
    std::fs::write(&node.config_path, format!("{config}\nlistener \"tcp\" {{ address = \n")).expect("break config");
    proxy.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (reloads(&proxy, "failure").await == 2.0).then_some(()) },
        "the broken file is counted as a failed reload",
        RELOAD_BOUND,
    )
    .await;
    assert_eq!(served(&client(), &base).await, (200, new_der.clone()));
    assert_eq!(served(&kept, &base).await, (200, old_der), "kept-alive connection");
    assert_eq!(reloads(&proxy, "success").await, 1.0);
}

/// `vha_config_reloads_total{outcome}` of a node, read with `token`.
async fn node_reloads(node: &TestNode, token: &str, outcome: &str) -> f64 {
    let (st, text) = node
        .get_node_local("sys/metrics?format=prometheus", Some(token))
        .await
        .expect("metrics");
    assert_eq!(st, 200, "{text}");
    vha_testkit::prometheus::series_value(&text, "vha_config_reloads_total", &[("outcome", outcome)])
}

/// The `remote_address` of the audit entries for `sys/mounts` requests, in order.
fn audited_addresses(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "response" && e["request"]["path"] == "sys/mounts")
        .map(|e| e["request"]["remote_address"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Property: `x_forwarded_for_authorized_addrs` is applied by SIGHUP, without a restart:
/// before, the node is told the real peer whatever `X-Forwarded-For` claims; after adding
/// the peer's network and a SIGHUP, it is told the forwarded hop; after removing it again,
/// the peer once more. Each reload is counted as a success, and the log does not call the
/// setting one that needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_x_forwarded_for_authorized_addrs() {
    let node = TestNode::builder().behind_proxy().start().await;
    let listen = format!("127.0.0.1:{}", node.port).parse().expect("listen address");
    let proxy = TestProxy::start(&node.config_path, listen);
    let token = node.init_unsealed().await.root_token;
    let log = node.dir().join("audit.log");
    let (st, v) = node
        .request(
            "PUT",
            "sys/audit/file",
            Some(&token),
            Some(serde_json::json!({"type": "file", "options": {"file_path": log.to_str().unwrap()}})),
        )
        .await;
    assert!(st.is_success(), "{st} {v}");
    let ask = |hop: &'static str| {
        let (node, token) = (&node, token.clone());
        async move {
            let (st, _, v) = node
                .request_full("GET", "sys/mounts", Some(&token), None, &[("X-Forwarded-For", hop)])
                .await;
            assert_eq!(st, 200, "{v}");
        }
    };
    let original = std::fs::read_to_string(&node.config_path).expect("config");
    assert!(original.contains("listener \"tcp\" {"), "{original}");
    let trusting = original.replacen(
        "listener \"tcp\" {",
        "listener \"tcp\" {\n  x_forwarded_for_authorized_addrs = \"127.0.0.0/8\"",
        1,
    );

    ask("7.7.7.1").await;
    std::fs::write(&node.config_path, &trusting).unwrap();
    proxy.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (reloads(&proxy, "success").await == 1.0).then_some(()) },
        "the reload that trusts loopback is counted",
        RELOAD_BOUND,
    )
    .await;
    ask("7.7.7.2").await;
    std::fs::write(&node.config_path, &original).unwrap();
    proxy.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (reloads(&proxy, "success").await == 2.0).then_some(()) },
        "the reload that trusts no one is counted",
        RELOAD_BOUND,
    )
    .await;
    ask("7.7.7.3").await;

    let seen = wait_until_async(
        || async {
            let a = audited_addresses(&log);
            (a.len() >= 3).then_some(a)
        },
        "three audited responses",
        RELOAD_BOUND,
    )
    .await;
    assert_eq!(seen, ["127.0.0.1", "7.7.7.2", "127.0.0.1"], "{}", proxy.output());
    assert!(
        !proxy
            .output()
            .lines()
            .any(|l| l.contains("only after a restart") && l.contains("x_forwarded_for")),
        "named as needing a restart: {}",
        proxy.output()
    );
}

/// Property: `vha server` takes SIGHUP as a reload, not as the end (the default action
/// would kill it): `log_level` from the file is applied at once (at `warn`, the reload's own
/// info line "log level set" is no longer written; back at `debug` it is), a file that does
/// not parse changes nothing and is counted as a failure, and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_sets_the_node_log_level_and_keeps_it_serving() {
    let node = TestNode::builder().start().await;
    let token = node.init_unsealed().await.root_token;
    let original = std::fs::read_to_string(&node.config_path).expect("config");
    assert!(original.contains("log_level = \"debug\""), "{original}");
    let set_lines = || node.output().matches("log level set").count();

    std::fs::write(
        &node.config_path,
        original.replace("log_level = \"debug\"", "log_level = \"warn\""),
    )
    .unwrap();
    node.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (node_reloads(&node, &token, "success").await == 1.0).then_some(()) },
        "the first reload is counted",
        RELOAD_BOUND,
    )
    .await;
    assert_eq!(
        set_lines(),
        0,
        "at warn the info line is not written: {}",
        node.output()
    );

    std::fs::write(&node.config_path, &original).unwrap();
    node.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (node_reloads(&node, &token, "success").await == 2.0).then_some(()) },
        "the second reload is counted",
        RELOAD_BOUND,
    )
    .await;
    wait_until_async(
        || async { (set_lines() == 1).then_some(()) },
        "back at debug, the info line is written",
        RELOAD_BOUND,
    )
    .await;

    std::fs::write(&node.config_path, format!("{original}\nstorage \"file\" {{ path = \n")).unwrap();
    node.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (node_reloads(&node, &token, "failure").await == 1.0).then_some(()) },
        "the broken file is counted as a failed reload",
        RELOAD_BOUND,
    )
    .await;
    assert!(node.is_running());
    let (st, v) = node.request("GET", "sys/health", None, None).await;
    assert_eq!(st, 200, "{v}");
}

/// lockd's `/metrics` asked with `token`: the status and the text.
async fn lockd_metrics(l: &vha_testkit::TestLockd, token: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("{}/metrics", l.address()))
        .bearer_auth(token)
        .send()
        .await
        .expect("lockd metrics");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// `vha_config_reloads_total{outcome="success"}` of lockd, read with `token`.
async fn lockd_reloads(l: &vha_testkit::TestLockd, token: &str) -> f64 {
    let (_, text) = lockd_metrics(l, token).await;
    vha_testkit::prometheus::series_value(&text, "vha_config_reloads_total", &[("outcome", "success")])
}

/// Waits until every node and proxy of `c` counted `want` successful reloads.
async fn wait_pairs(c: &vha_testkit::TestCluster, want: f64, root: &str) {
    wait_until_async(
        || async {
            for (n, p) in c.nodes.iter().zip(&c.proxies) {
                if node_reloads(n, root, "success").await < want || reloads(p, "success").await < want {
                    return None;
                }
            }
            Some(())
        },
        "every node and proxy reloaded",
        RELOAD_BOUND,
    )
    .await
}

/// Property: the lockd token is rotated under load without a restart and without a client
/// error: lockd lists old and new (SIGHUP), every node and proxy is given the new one in its
/// `token_file` (SIGHUP: the lockd client credentials are reloaded, not named as needing a
/// restart), lockd drops the old one (SIGHUP). Writes and reads through both pairs go on
/// throughout, lockd refuses no request of theirs, a step-down afterwards is followed by
/// both proxies (the advertisement is read with the new token), and the old token now gets
/// 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_lockd_token_of_nodes_and_proxies_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut c = vha_testkit::TestCluster::builder().nodes(2).proxies().start().await;
    let a = c.wait_one_active(RELOAD_BOUND).await;
    c.mount_secret(a).await;
    let root = c.root_token().to_string();
    let lockd = c.lockd.take().expect("lockd");
    let old = lockd.token().expect("lockd token").to_string();
    let new = "rotated-lockd-token-0123456789abcdef".to_string();
    // The pairs get a token file of their own (lockd's will list two tokens).
    let client_file = lockd.scratch().join("client-token");
    std::fs::write(&client_file, format!("{old}\n")).unwrap();
    let lockd_file = lockd.token_file().expect("token file").to_path_buf();
    let hup_pairs = |c: &vha_testkit::TestCluster| {
        for (n, p) in c.nodes.iter().zip(&c.proxies) {
            n.signal(Signal::SIGHUP);
            p.signal(Signal::SIGHUP);
        }
    };
    for n in &c.nodes {
        let text = std::fs::read_to_string(&n.config_path).unwrap();
        let moved = text.replace(&lockd_file.display().to_string(), &client_file.display().to_string());
        assert_ne!(text, moved, "the config names lockd's token file");
        std::fs::write(&n.config_path, moved).unwrap();
    }
    hup_pairs(&c);
    wait_pairs(&c, 1.0, &root).await;

    // Load through both pairs, until told to stop (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let bounds = vha_testkit::load::LoadBounds {
        max_writes: 20_000,
        max_time: Duration::from_secs(120),
    };
    let loops: Vec<_> = c
        .proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokio::spawn(vha_testkit::load::kv_writes(
                p.addr.clone(),
                root.clone(),
                format!("rot-{i}"),
                stop.clone(),
                done.clone(),
                bounds,
            ))
        })
        .collect();
    let progress = |want: u64| {
        let done = done.clone();
        async move {
            let from = done.load(Ordering::Relaxed);
            wait_until_async(
                || async { (done.load(Ordering::Relaxed) >= from + want).then_some(()) },
                "load flows",
                RELOAD_BOUND,
            )
            .await
        }
    };
    progress(10).await;

    // 1. lockd accepts old and new.
    std::fs::write(&lockd_file, format!("{old}\n{new}\n")).unwrap();
    lockd.signal(Signal::SIGHUP);
    wait_until_async(
        // Asked with the token lockd accepts before and after (a refused probe would count).
        || async { (lockd_reloads(&lockd, &old).await >= 1.0).then_some(()) },
        "lockd lists both tokens",
        RELOAD_BOUND,
    )
    .await;
    progress(10).await;
    // 2. Every node and proxy moves to the new one.
    std::fs::write(&client_file, format!("{new}\n")).unwrap();
    hup_pairs(&c);
    wait_pairs(&c, 2.0, &root).await;
    progress(10).await;
    // 3. lockd drops the old one.
    std::fs::write(&lockd_file, format!("{new}\n")).unwrap();
    lockd.signal(Signal::SIGHUP);
    wait_until_async(
        || async { (lockd_reloads(&lockd, &new).await >= 2.0).then_some(()) },
        "lockd accepts only the new token",
        RELOAD_BOUND,
    )
    .await;
    progress(10).await;
    // A new term: both proxies read the new advertisement with the new token.
    let (st, v) = c.nodes[a].request("PUT", "sys/step-down", Some(&root), None).await;
    assert_eq!(st.as_u16(), 204, "{v}");
    let b = c.wait_new_active(a, RELOAD_BOUND).await;
    c.wait_proxies_follow(b, RELOAD_BOUND).await;
    progress(10).await;
    let errors = vha_testkit::load::finish(&stop, loops).await.errors;
    assert!(errors.is_empty(), "client errors during the rotation: {errors:?}");
    let (_, text) = lockd_metrics(&lockd, &new).await;
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("vha_lockd_auth_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 0.0, "lockd refused a request during the rotation:\n{text}");
    let (st, _) = lockd_metrics(&lockd, &old).await;
    assert_eq!(st, 401, "the old token is refused after the rotation");
    for n in &c.nodes {
        assert!(
            !n.output().contains("setting=\"storage\""),
            "a credential change was named as needing a restart:\n{}",
            n.output()
        );
    }
    c.lockd = Some(lockd);
}

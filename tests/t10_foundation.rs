//! Foundation through the real `vha server` binary on file storage: init, unseal
//! with progress and reset, seal, restart, health/leader codes, every error status, banner,
//! config errors and graceful shutdown.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use vha_testkit::TestNode;

/// Init returns Vault's shape; unseal counts progress with a nonce, ignores a repeated key,
/// resets on request, and unseals at the threshold with hex or base64 keys.
#[tokio::test]
async fn init_and_unseal_with_progress_and_reset() {
    let node = TestNode::builder().start().await;
    let (st, v) = node.request("GET", "sys/init", None, None).await;
    assert_eq!((st, v), (StatusCode::OK, json!({"initialized": false})));
    let (st, v) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["initialized"], false);
    assert_eq!(v["sealed"], true);
    assert_eq!(v["storage_type"], "file");
    // Unseal before init: 400 "Vault is not initialized".
    let (st, v) = node
        .request("PUT", "sys/unseal", None, Some(json!({"key": "abcd"})))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["errors"][0], "Vault is not initialized");

    let keys = node.init(3, 2).await;
    assert_eq!(keys.keys.len(), 3);
    assert_eq!(keys.keys_base64.len(), 3);
    assert!(
        keys.keys.iter().all(|k| k.len() == 66),
        "33-byte hex shares: {:?}",
        keys.keys
    );
    assert!(!keys.root_token.is_empty());
    let (st, v) = node
        .request(
            "PUT",
            "sys/init",
            None,
            Some(json!({"secret_shares": 1, "secret_threshold": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "second init refused: {v}");
    assert_eq!(v["errors"][0], "Vault is already initialized");

    let (_, s) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!(
        (
            s["t"].clone(),
            s["n"].clone(),
            s["progress"].clone(),
            s["sealed"].clone()
        ),
        (json!(2), json!(3), json!(0), json!(true))
    );

    let unseal = |k: &str| node.request("PUT", "sys/unseal", None, Some(json!({"key": k})));
    let (st, s) = unseal(&keys.keys[0]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s["progress"], 1);
    let nonce = s["nonce"].as_str().unwrap().to_string();
    assert!(!nonce.is_empty(), "progress has a nonce");
    // The same key again does not count twice.
    let (_, s) = unseal(&keys.keys[0]).await;
    assert_eq!(s["progress"], 1);
    assert_eq!(s["nonce"], nonce.as_str());
    // Reset clears progress.
    let (_, s) = node
        .request("PUT", "sys/unseal", None, Some(json!({"reset": true})))
        .await;
    assert_eq!((s["progress"].clone(), s["nonce"].clone()), (json!(0), json!("")));
    // Not a key at all.
    let (st, v) = unseal("zz-not-a-key").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["errors"][0], "'key' must be a valid hex or base64 string");
    let (st, _) = node.request("PUT", "sys/unseal", None, Some(json!({}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "no key and no reset");
    // A wrong key at the threshold fails and resets progress; the node stays sealed.
    unseal(&keys.keys[0]).await;
    let (st, v) = unseal(&"00".repeat(33)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "wrong key: {v}");
    let (_, s) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!((s["sealed"].clone(), s["progress"].clone()), (json!(true), json!(0)));
    // Hex key then base64 key unseal.
    unseal(&keys.keys[1]).await;
    let (st, s) = unseal(&keys.keys_base64[2]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s["sealed"], false, "{s}");
    assert!(s["cluster_name"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(s["cluster_id"].as_str().is_some_and(|n| !n.is_empty()));
}

/// Seal needs a valid token; sealed nodes answer 503 "Vault is sealed"; a restart comes
/// back sealed with data (cluster identity, root token) intact; nothing is stored in
/// plaintext on disk.
#[tokio::test]
async fn seal_restart_and_data_intact() {
    let mut node = TestNode::builder().start().await;
    let keys = node.init(1, 1).await;
    node.unseal(&keys.keys).await;
    let (_, before) = node.request("GET", "sys/seal-status", None, None).await;

    let (st, v) = node.request("PUT", "sys/seal", None, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "seal without token: {v}");
    let (st, _) = node
        .request("PUT", "sys/seal", Some("hvs.not-a-real-token"), None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "seal with a bad token");
    let (st, v) = node.request("PUT", "sys/seal", Some(&keys.root_token), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "seal with root: {v}");
    let (st, v) = node.request("GET", "sys/leader", None, None).await;
    assert_eq!(
        (st, v),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"errors": ["Vault is sealed"]}))
    );
    let (st, v) = node.request("GET", "some/secret", Some(&keys.root_token), None).await;
    assert_eq!(
        (st, v),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"errors": ["Vault is sealed"]}))
    );

    node.restart().await;
    let (_, s) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!(
        (s["initialized"].clone(), s["sealed"].clone()),
        (json!(true), json!(true)),
        "restart comes back sealed"
    );
    node.unseal(&keys.keys).await;
    let (_, after) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!(
        after["cluster_id"], before["cluster_id"],
        "cluster identity survives restart"
    );
    // The root token still works after restart: it was stored (hashed) durably.
    let (st, _) = node.request("PUT", "sys/seal", Some(&keys.root_token), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // No plaintext secrets on disk: neither the root token nor any unseal key appear.
    let mut hits = Vec::new();
    let mut stack = vec![node.dir().join("data")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let text = String::from_utf8_lossy(&bytes);
                if text.contains(&keys.root_token) || text.contains(&keys.keys[0]) {
                    hits.push(p);
                }
            }
        }
    }
    assert!(hits.is_empty(), "plaintext secrets on disk: {hits:?}");
}

/// `sys/health` codes and parameters: 501 uninitialized > 503 sealed > 200 active;
/// overrides; bad codes and booleans are 400; HEAD answers the same code without a body.
#[tokio::test]
async fn health_codes_and_parameters() {
    let node = TestNode::builder().start().await;
    let (st, v) = node.request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(
        (v["initialized"].clone(), v["sealed"].clone()),
        (json!(false), json!(true))
    );
    let (st, _) = node.request("GET", "sys/health?uninitcode=200", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let keys = node.init(1, 1).await;
    let (st, _) = node.request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "sealed");
    let (st, _) = node.request("GET", "sys/health?sealedcode=299", None, None).await;
    assert_eq!(st.as_u16(), 299);
    node.unseal(&keys.keys).await;
    let (st, v) = node.request("GET", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::OK);
    for field in [
        "initialized",
        "sealed",
        "standby",
        "performance_standby",
        "replication_performance_mode",
        "replication_dr_mode",
        "server_time_utc",
        "version",
        "cluster_name",
        "cluster_id",
    ] {
        assert!(v.get(field).is_some(), "health body lacks {field}: {v}");
    }
    assert_eq!(v["standby"], false);
    let (st, _) = node
        .request("GET", "sys/health?activecode=299&standbyok=True", None, None)
        .await;
    assert_eq!(st.as_u16(), 299);
    for bad in ["activecode=abc", "activecode=99", "standbyok=maybe", "sealedcode=700"] {
        let (st, v) = node.request("GET", &format!("sys/health?{bad}"), None, None).await;
        assert_eq!((st, v), (StatusCode::BAD_REQUEST, json!({"errors": []})), "{bad}");
    }
    let (st, hdrs, v) = node
        .request_full("HEAD", "sys/health?activecode=203", None, None, &[])
        .await;
    assert_eq!(st.as_u16(), 203);
    assert_eq!(v, Value::Null, "HEAD has no body");
    assert!(hdrs.get("content-length").is_none_or(|l| l == "0"));
    let (st, v) = node.request("GET", "sys/leader", None, None).await;
    assert_eq!(st, StatusCode::OK);
    for field in [
        "ha_enabled",
        "is_self",
        "active_time",
        "leader_address",
        "leader_cluster_address",
        "performance_standby",
        "performance_standby_last_remote_wal",
    ] {
        assert!(v.get(field).is_some(), "leader body lacks {field}: {v}");
    }
}

/// Every error status with Vault's `{"errors":[...]}` body: 400 malformed JSON, 403 no
/// token, 404 unknown path, 405 wrong method, 413 over max_request_size (announced and
/// streamed), 503 sealed.
#[tokio::test]
async fn error_statuses() {
    let node = TestNode::builder()
        .listener_extra("max_request_size = 1024")
        .start()
        .await;
    let (st, v) = node.request_raw("PUT", "sys/init", b"{bad".to_vec()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("failed to parse JSON input"),
        "{v}"
    );
    let (st, v) = node.request("POST", "sys/health", None, None).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert!(v["errors"].is_array());
    let (st, v) = node.request("DELETE", "sys/seal-status", None, None).await;
    assert_eq!((st, v["errors"].is_array()), (StatusCode::METHOD_NOT_ALLOWED, true));
    // Sealed beats unknown path.
    let (st, v) = node.request("GET", "no/such/path", None, None).await;
    assert_eq!(
        (st, v),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"errors": ["Vault is sealed"]}))
    );
    // 413: announced by Content-Length, and streamed without one.
    let (st, v) = node.request_raw("PUT", "sys/init", vec![b' '; 4096]).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["errors"][0], "http: request body too large");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..8).map(|_| Ok(vec![b' '; 512])).collect();
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/sys/init", node.addr))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "streamed body over the limit"
    );
    // After init+unseal: unknown path without token is 403, with the root token 404.
    let keys = node.init_unsealed().await;
    let (st, _) = node.request("GET", "no/such/path", None, None).await;
    assert!(
        st == StatusCode::FORBIDDEN || st == StatusCode::NOT_FOUND,
        "unknown path without token: {st}"
    );
    let (st, v) = node.request("GET", "no/such/path", Some(&keys.root_token), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert!(v["errors"].is_array());
    // Outside /v1/: 404.
    let resp = reqwest::get(format!("{}/elsewhere", node.addr)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// The banner names the storage (no HA on file), the api and cluster addresses; SIGTERM
/// exits 0 after a graceful shutdown.
#[tokio::test]
async fn banner_and_graceful_shutdown() {
    let mut node = TestNode::builder().start().await;
    let out = node.output();
    assert!(out.contains("Storage: file\n"), "banner storage line:\n{out}");
    assert!(
        out.contains(&format!("Api Address: http://127.0.0.1:{}", node.port)),
        "{out}"
    );
    assert!(
        out.contains(&format!("Cluster Address: https://127.0.0.1:{}", node.cluster_port)),
        "{out}"
    );
    assert!(!out.contains("HA Storage"), "no split mode");
    let status = node.stop(Duration::from_secs(15)).expect("exits on SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
}

/// A bad configuration fails at startup with the file, line and key in the message.
#[tokio::test]
async fn config_error_names_file_line_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.hcl");
    std::fs::write(
        &path,
        "storage \"file\" {\n  path = \"/tmp/x\"\n}\nlistener \"tcp\" {\n  adress = \"127.0.0.1:1\"\n}\n",
    )
    .unwrap();
    let out = std::process::Command::new(vha_testkit::vha_binary())
        .args(["server", "-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5", path.display())), "file:line in {err}");
    assert!(err.contains("listener.tcp.adress"), "key in {err}");
    // HA storage that cannot do HA is a startup error naming the stanza.
    std::fs::write(&path, format!("storage \"inmem\" {{}}\nha_storage \"file\" {{\n  path = \"{}\"\n}}\nlistener \"tcp\" {{\n  tls_disable = true\n}}\n", dir.path().join("d").display())).unwrap();
    let out = std::process::Command::new(vha_testkit::vha_binary())
        .args(["server", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ha_storage") && err.contains("does not support HA"),
        "{err}"
    );
    // Local data (file) under a shared HA lock is refused: a deposed active elsewhere could
    // still write there, since the file store's fence mark lives in one process.
    std::fs::write(&path, format!("\nstorage \"file\" {{\n  path = \"{}\"\n}}\nha_storage \"inmem\" {{}}\nlistener \"tcp\" {{\n  tls_disable = true\n}}\n", dir.path().join("d").display())).unwrap();
    let out = std::process::Command::new(vha_testkit::vha_binary())
        .args(["server", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: storage:", path.display())) && err.contains("cannot be used with ha_storage"),
        "{err}"
    );
}

//! Audit through the real `vha server`: a `file` device logs a request and a
//! response line per request with the client's address and HMAC'd secrets and tokens;
//! `sys/audit-hash` reproduces the hashes; enabling needs sudo; a device that cannot write
//! stops requests before they change anything.

use reqwest::StatusCode;
use serde_json::{json, Value};
use vha_testkit::TestNode;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect()
}

/// A fresh initialized, unsealed node with a `file` audit device at `audit.log` in its
/// directory: the node, its root token and the log's path.
async fn node_with_file_audit() -> (TestNode, String, std::path::PathBuf) {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let log = node.dir().join("audit.log");
    let (st, v) = node
        .request(
            "PUT",
            "sys/audit/file",
            Some(root.as_str()),
            Some(json!({"type": "file", "options": {"file_path": log.to_str().unwrap()}})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    (node, root, log)
}

/// After enabling a file device, a KV write and read produce request and response lines
/// with the client's address, the operation and path; the secret value and the token
/// appear only as `hmac-sha256:` hashes, which `sys/audit-hash` reproduces.
#[tokio::test]
async fn audit_log_records_address_and_hides_secrets() {
    let (node, root, log) = node_with_file_audit().await;
    let r = Some(root.as_str());
    let (st, v) = node.request("GET", "sys/audit", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["file/"]["type"], "file");
    assert_eq!(v["data"]["file/"]["options"]["file_path"], log.to_str().unwrap());
    let (st, _) = node
        .request(
            "PUT",
            "sys/audit/file",
            r,
            Some(json!({"type": "file", "options": {"file_path": "/tmp/x"}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "path in use");

    node.request(
        "POST",
        "sys/mounts/secret",
        r,
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await;
    let secret = "hunter2-very-secret";
    let (st, _) = node
        .request(
            "POST",
            "secret/data/app",
            r,
            Some(json!({"data": {"password": secret}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = node.request("GET", "secret/data/app", r, None).await;
    assert_eq!(st, StatusCode::OK);
    let (_, t) = node
        .request("POST", "auth/token/create", r, Some(json!({"policies": ["default"]})))
        .await;
    let child = t["auth"]["client_token"].as_str().unwrap().to_string();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(secret), "plaintext secret in audit log");
    assert!(
        !text.contains(root.trim_start_matches("hvs.")),
        "plaintext root token in audit log"
    );
    assert!(
        !text.contains(child.trim_start_matches("hvs.")),
        "plaintext created token in audit log"
    );

    let all = lines(&log);
    let write_req = all
        .iter()
        .find(|l| {
            l["type"] == "request" && l["request"]["path"] == "secret/data/app" && l["request"]["operation"] == "create"
        })
        .expect("request line for the write");
    assert_eq!(write_req["request"]["remote_address"], "127.0.0.1");
    assert!(write_req["request"]["remote_port"].as_u64().is_some());
    assert!(write_req["time"].as_str().is_some());
    let hashed = write_req["request"]["data"]["data"]["password"].as_str().unwrap();
    assert!(hashed.starts_with("hmac-sha256:"));
    assert!(write_req["auth"]["client_token"]
        .as_str()
        .unwrap()
        .starts_with("hmac-sha256:"));
    assert!(write_req["auth"]["accessor"]
        .as_str()
        .unwrap()
        .starts_with("hmac-sha256:"));
    assert_eq!(write_req["auth"]["policies"], json!(["root"]));

    let read_resp = all
        .iter()
        .find(|l| {
            l["type"] == "response" && l["request"]["path"] == "secret/data/app" && l["request"]["operation"] == "read"
        })
        .expect("response line for the read");
    assert_eq!(
        read_resp["response"]["data"]["data"]["password"], hashed,
        "same salt, same hash"
    );
    assert_eq!(
        read_resp["request"]["id"],
        all.iter()
            .find(|l| l["type"] == "request" && l["request"]["id"] == read_resp["request"]["id"])
            .unwrap()["request"]["id"]
    );
    let create_resp = all
        .iter()
        .find(|l| l["type"] == "response" && l["request"]["path"] == "auth/token/create")
        .unwrap();
    assert!(create_resp["response"]["auth"]["client_token"]
        .as_str()
        .unwrap()
        .starts_with("hmac-sha256:"));

    let (st, v) = node
        .request("POST", "sys/audit-hash/file", r, Some(json!({"input": secret})))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["hash"], hashed);
    let (st, v) = node
        .request("POST", "sys/audit-hash/nope", r, Some(json!({"input": "x"})))
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["unknown audit backend \"nope/\""]})
        )
    );

    // Denied requests are audited too, and enabling devices needs sudo.
    let (st, _) = node
        .request(
            "PUT",
            "sys/audit/other",
            Some(&child),
            Some(json!({"type": "file", "options": {"file_path": "/tmp/y"}})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let denied = lines(&log)
        .into_iter()
        .filter(|l| l["request"]["path"] == "sys/audit/other")
        .count();
    assert_eq!(denied, 2, "request and response lines for the denied request");

    let (st, _) = node.request("DELETE", "sys/audit/file", r, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let before = lines(&log).len();
    node.request("GET", "secret/data/app", r, None).await;
    assert_eq!(lines(&log).len(), before, "a disabled device logs nothing");
}

/// When the only device cannot write, requests fail with 500 before changing state (the
/// secret keeps its previous version); once the file is writable again, requests succeed.
#[tokio::test]
async fn unwritable_audit_device_blocks_requests() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    let log = node.dir().join("audit.log");
    node.request(
        "POST",
        "sys/mounts/secret",
        r,
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await;
    node.request("POST", "secret/data/k", r, Some(json!({"data": {"v": "old"}})))
        .await;
    let (st, _) = node
        .request(
            "PUT",
            "sys/audit/file",
            r,
            Some(json!({"type": "file", "options": {"file_path": log.to_str().unwrap()}})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = node
        .request(
            "PUT",
            "sys/audit/bad",
            r,
            Some(json!({"type": "file", "options": {"file_path": "/nonexistent-dir/x.log"}})),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "a device that cannot open its file is refused: {v}"
    );

    // Make the log path unwritable: replace the file by a directory.
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let (st, v) = node
        .request("POST", "secret/data/k", r, Some(json!({"data": {"v": "new"}})))
        .await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let (st, _) = node.request("GET", "secret/data/k", r, None).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "no unaudited reads either");

    std::fs::remove_dir(&log).unwrap();
    let (st, v) = node.request("GET", "secret/data/k", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["data"], json!({"v": "old"}));
    assert_eq!(
        v["data"]["metadata"]["version"], 1,
        "the refused write left no version behind"
    );
}

/// Every authenticated `sys/` call outside the logical pipeline (`sys/ha-status`,
/// `sys/metrics`, `sys/config/state/sanitized`, `sys/step-down`, `sys/seal`) is audited as a
/// request and, once answered, as a response with the same request id; a denied call too.
#[tokio::test]
async fn authenticated_sys_calls_audit_request_and_response() {
    let (node, root, log) = node_with_file_audit().await;
    let r = Some(root.as_str());
    let (_, t) = node
        .request("POST", "auth/token/create", r, Some(json!({"policies": ["default"]})))
        .await;
    let weak = t["auth"]["client_token"].as_str().unwrap().to_string();

    let calls = [
        ("GET", "sys/ha-status", r, StatusCode::OK),
        ("GET", "sys/metrics?format=prometheus", r, StatusCode::OK),
        ("GET", "sys/config/state/sanitized", r, StatusCode::OK),
        ("PUT", "sys/step-down", r, StatusCode::NO_CONTENT),
        ("PUT", "sys/seal", Some(weak.as_str()), StatusCode::FORBIDDEN),
        ("PUT", "sys/seal", r, StatusCode::NO_CONTENT),
    ];
    for (method, path, token, want) in calls {
        let (st, v) = node.request(method, path, token, None).await;
        assert_eq!(st, want, "{method} {path}: {v}");
    }
    let (_, v) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!(v["sealed"], true, "the seal went through");

    let lines = lines(&log);
    for path in [
        "sys/ha-status",
        "sys/metrics",
        "sys/config/state/sanitized",
        "sys/step-down",
        "sys/seal",
    ] {
        let of = |kind: &str| -> Vec<&Value> {
            lines
                .iter()
                .filter(|l| l["type"] == kind && l["request"]["path"] == path)
                .collect()
        };
        let (requests, responses) = (of("request"), of("response"));
        let calls = if path == "sys/seal" { 2 } else { 1 };
        assert_eq!(requests.len(), calls, "{path}: request lines {requests:?}");
        assert_eq!(responses.len(), calls, "{path}: response lines {responses:?}");
        for (q, a) in requests.iter().zip(&responses) {
            assert_eq!(q["request"]["id"], a["request"]["id"], "{path}: one id per call");
        }
    }
    let seal_errors: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "response" && l["request"]["path"] == "sys/seal")
        .map(|l| &l["error"])
        .collect();
    assert!(
        seal_errors[0].as_str().is_some_and(|e| e.contains("permission denied")) && seal_errors[1].is_null(),
        "the denied seal's response names the refusal, the allowed one none: {seal_errors:?}"
    );
}

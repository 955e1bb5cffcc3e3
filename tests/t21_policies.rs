//! ACL policies through the real `vha server`: CRUD on `sys/policies/acl` and the
//! old `sys/policy`, enforcement on every request with Vault's 403 body, globs, deny,
//! sudo-protected `sys/seal`, and `sys/capabilities-self`.

use reqwest::StatusCode;
use serde_json::{json, Value};
use vha_testkit::TestNode;

/// Vault's body for a request its policies do not allow.
fn denied() -> Value {
    json!({"errors": ["1 error occurred:\n\t* permission denied\n\n"]})
}

async fn token_with(node: &TestNode, root: &str, policies: &[&str]) -> String {
    let (st, v) = node
        .request(
            "POST",
            "auth/token/create",
            Some(root),
            Some(json!({"policies": policies})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["auth"]["client_token"].as_str().unwrap().to_string()
}

async fn put_policy(node: &TestNode, root: &str, name: &str, text: &str) {
    let (st, v) = node
        .request(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(root),
            Some(json!({"policy": text})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
}

/// The issue's case: `secret/data/app/*` with read+list allows reading (200) and refuses
/// writing (403 with Vault's exact body); paths outside the glob are refused too.
#[tokio::test]
async fn read_only_policy_allows_read_denies_write() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let (st, _) = node
        .request(
            "POST",
            "sys/mounts/secret",
            Some(&root),
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node
        .request(
            "POST",
            "secret/data/app/db",
            Some(&root),
            Some(json!({"data": {"pw": "s3cret"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    put_policy(
        &node,
        &root,
        "app-read",
        r#"path "secret/data/app/*" { capabilities = ["read", "list"] }"#,
    )
    .await;
    let t = token_with(&node, &root, &["app-read"]).await;

    let (st, v) = node.request("GET", "secret/data/app/db", Some(&t), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["data"]["pw"], "s3cret");
    let (st, v) = node
        .request(
            "POST",
            "secret/data/app/db",
            Some(&t),
            Some(json!({"data": {"pw": "x"}})),
        )
        .await;
    assert_eq!((st, v), (StatusCode::FORBIDDEN, denied()));
    let (st, v) = node.request("GET", "secret/data/other", Some(&t), None).await;
    assert_eq!((st, v), (StatusCode::FORBIDDEN, denied()));
    let (st, v) = node.request("GET", "sys/mounts", Some(&t), None).await;
    assert_eq!((st, v), (StatusCode::FORBIDDEN, denied()));
    // The denied write changed nothing.
    let (_, v) = node.request("GET", "secret/data/app/db", Some(&root), None).await;
    assert_eq!(v["data"]["data"]["pw"], "s3cret");
    assert_eq!(v["data"]["metadata"]["version"], 1);
}

/// Create-only rules allow a new key but not overwriting it (Vault's existence check), `+`
/// matches one segment, `deny` beats a broader grant.
#[tokio::test]
async fn create_vs_update_plus_glob_and_deny() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    node.mount_kv(&root, "kv", "1").await;
    put_policy(
        &node,
        &root,
        "p",
        r#"
path "kv/new/*" { capabilities = ["create"] }
path "kv/+/shared" { capabilities = ["read"] }
path "kv/team/*" { capabilities = ["read", "update", "create"] }
path "kv/team/locked" { capabilities = ["deny"] }
"#,
    )
    .await;
    let t = token_with(&node, &root, &["p"]).await;
    let (st, _) = node
        .request("POST", "kv/new/a", Some(&t), Some(json!({"k": "v"})))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "create allowed");
    let (st, v) = node
        .request("POST", "kv/new/a", Some(&t), Some(json!({"k": "v2"})))
        .await;
    assert_eq!((st, v), (StatusCode::FORBIDDEN, denied()), "update needs update");
    node.request("POST", "kv/x/shared", Some(&root), Some(json!({"k": "v"})))
        .await;
    let (st, _) = node.request("GET", "kv/x/shared", Some(&t), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = node.request("GET", "kv/x/y/shared", Some(&t), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "+ is one segment");
    let (st, _) = node
        .request("POST", "kv/team/locked", Some(&t), Some(json!({"k": "v"})))
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = node
        .request("POST", "kv/team/open", Some(&t), Some(json!({"k": "v"})))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
}

/// Policy CRUD in both APIs: names lowercased, listing with `root` last, `root` read-only,
/// `default` undeletable, parse errors 400 with Vault's prefix, missing policy 404.
#[tokio::test]
async fn policy_crud_both_apis() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    let (st, v) = node.request("LIST", "sys/policies/acl", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["keys"], json!(["default", "root"]));
    put_policy(&node, &root, "Mixed", r#"path "x" { capabilities = ["read"] }"#).await;
    let (st, v) = node.request("GET", "sys/policies/acl/mixed", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["name"], "mixed");
    assert_eq!(v["data"]["policy"], r#"path "x" { capabilities = ["read"] }"#);
    let (_, v) = node.request("GET", "sys/policies/acl?list=true", r, None).await;
    assert_eq!(v["data"]["keys"], json!(["default", "mixed", "root"]));

    let (st, v) = node.request("GET", "sys/policy", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["policies"],
        json!(["default", "mixed", "root"]),
        "old API copies data to the top level"
    );
    let (st, v) = node
        .request(
            "PUT",
            "sys/policy/legacy",
            r,
            Some(json!({"rules": "path \"y\" { capabilities = [\"list\"] }"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["warnings"],
        json!(["'rules' is deprecated, please use 'policy' instead"])
    );
    let (st, v) = node.request("GET", "sys/policy/legacy", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["rules"].as_str().unwrap().contains("\"y\""));

    let (st, v) = node
        .request(
            "PUT",
            "sys/policies/acl/bad",
            r,
            Some(json!({"policy": "path \"x\" { capabilities = [\"foo\"] }"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(
        v["errors"][0],
        "failed to parse policy: path \"x\": path \"x\": invalid capability \"foo\""
    );
    let (st, v) = node.request("PUT", "sys/policies/acl/bad", r, Some(json!({}))).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["'policy' parameter not supplied or empty"]})
        )
    );
    let (st, v) = node
        .request(
            "PUT",
            "sys/policies/acl/root",
            r,
            Some(json!({"policy": "path \"x\" { capabilities = [\"read\"] }"})),
        )
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["cannot update \"root\" policy"]})
        )
    );
    let (st, v) = node.request("DELETE", "sys/policies/acl/default", r, None).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["cannot delete default policy"]})
        )
    );
    let (st, v) = node.request("GET", "sys/policies/acl/nope", r, None).await;
    assert_eq!((st, v), (StatusCode::NOT_FOUND, json!({"errors": []})));
    let (st, _) = node.request("DELETE", "sys/policies/acl/mixed", r, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "sys/policies/acl/mixed", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Editing a policy takes effect on the next request of an existing token; a policy
/// change survives a restart.
#[tokio::test]
async fn policy_changes_apply_immediately_and_persist() {
    let mut node = TestNode::builder().start().await;
    let keys = node.init_unsealed().await;
    let root = keys.root_token.clone();
    put_policy(&node, &root, "p", r#"path "sys/mounts" { capabilities = ["read"] }"#).await;
    let t = token_with(&node, &root, &["p"]).await;
    let (st, _) = node.request("GET", "sys/mounts", Some(&t), None).await;
    assert_eq!(st, StatusCode::OK);
    put_policy(
        &node,
        &root,
        "p",
        r#"path "sys/policies/*" { capabilities = ["list"] }"#,
    )
    .await;
    let (st, _) = node.request("GET", "sys/mounts", Some(&t), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    node.restart().await;
    node.unseal(&keys.keys).await;
    let (st, _) = node.request("LIST", "sys/policies/acl", Some(&t), None).await;
    assert_eq!(st, StatusCode::OK);
}

/// `sys/seal` needs sudo: update alone is refused, update+sudo seals.
#[tokio::test]
async fn seal_requires_sudo() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    put_policy(&node, &root, "upd", r#"path "sys/seal" { capabilities = ["update"] }"#).await;
    put_policy(
        &node,
        &root,
        "sudo",
        r#"path "sys/seal" { capabilities = ["update", "sudo"] }"#,
    )
    .await;
    let upd = token_with(&node, &root, &["upd"]).await;
    let sudo = token_with(&node, &root, &["sudo"]).await;
    let (st, v) = node.request("PUT", "sys/seal", Some(&upd), None).await;
    assert_eq!((st, v), (StatusCode::FORBIDDEN, denied()));
    let (st, _) = node.request("PUT", "sys/seal", Some(&sudo), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, s) = node.request("GET", "sys/seal-status", None, None).await;
    assert_eq!(s["sealed"], true);
}

/// `sys/capabilities-self` reports per path (`paths` list, or `path` plus `capabilities`);
/// root gets `["root"]`, no match gets `["deny"]`.
#[tokio::test]
async fn capabilities_self() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    put_policy(
        &node,
        &root,
        "r",
        r#"path "secret/data/app/*" { capabilities = ["read", "list"] }"#,
    )
    .await;
    let t = token_with(&node, &root, &["r"]).await;
    let (st, v) = node
        .request(
            "POST",
            "sys/capabilities-self",
            Some(&t),
            Some(json!({"paths": ["secret/data/app/x", "secret/data/other"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["secret/data/app/x"], json!(["list", "read"]));
    assert_eq!(v["data"]["secret/data/other"], json!(["deny"]));
    assert_eq!(v["secret/data/app/x"], json!(["list", "read"]));
    let (_, v) = node
        .request(
            "POST",
            "sys/capabilities-self",
            Some(&t),
            Some(json!({"path": "secret/data/app/x"})),
        )
        .await;
    assert_eq!(v["data"]["capabilities"], json!(["list", "read"]));
    let (_, v) = node
        .request(
            "POST",
            "sys/capabilities-self",
            Some(&root),
            Some(json!({"path": "anything"})),
        )
        .await;
    assert_eq!(v["data"]["capabilities"], json!(["root"]));
}

/// `allowed_parameters` / `denied_parameters` restrict what a write may contain (403 with
/// Vault's body otherwise), and the policy still grants plain reads.
#[tokio::test]
async fn parameter_constraints_enforced() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    node.mount_kv(&root, "kv", "1").await;
    put_policy(
        &node,
        &root,
        "p",
        r#"
path "kv/cfg" {
  capabilities = ["create", "update", "read"]
  allowed_parameters = {
    "env" = ["dev", "stage-*"]
    "note" = []
  }
  denied_parameters = {
    "note" = ["forbidden"]
  }
}
"#,
    )
    .await;
    let t = token_with(&node, &root, &["p"]).await;
    let (st, v) = node
        .request("POST", "kv/cfg", Some(&t), Some(json!({"env": "stage-1", "note": "x"})))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    for bad in [
        json!({"env": "prod"}),
        json!({"env": "dev", "other": "1"}),
        json!({"env": "dev", "note": "forbidden"}),
    ] {
        let (st, v) = node.request("POST", "kv/cfg", Some(&t), Some(bad)).await;
        assert_eq!((st, v), (StatusCode::FORBIDDEN, denied()));
    }
    let (st, v) = node.request("GET", "kv/cfg", Some(&t), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"], json!({"env": "stage-1", "note": "x"}));
}

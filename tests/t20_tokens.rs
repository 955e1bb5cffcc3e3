//! Tokens through the real `vha server`: create with every option, both header
//! forms, lookups (self, token, accessor), renew, revoke (self, tree, orphan, accessor),
//! expiry, use counts, and tokens surviving a restart while never being stored in plain.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use vha_testkit::{wait_until_async, TestNode};

async fn create(node: &TestNode, token: &str, body: Value) -> Value {
    let (st, v) = node.request("POST", "auth/token/create", Some(token), Some(body)).await;
    assert_eq!(st, StatusCode::OK, "create: {v}");
    v
}

fn client_token(v: &Value) -> String {
    v["auth"]["client_token"].as_str().expect("client_token").to_string()
}

/// `auth/token/create` answers Vault's envelope and `auth` block (policies sorted with
/// `default`, TTL, renewable, num_uses, metadata); the new token works with `X-Vault-Token`
/// and with `Authorization: Bearer`; lookups by token and accessor agree; an unknown token is
/// a plain 403 "permission denied".
#[tokio::test]
async fn create_lookup_and_header_forms() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let v = create(
        &node,
        &root,
        json!({"policies": ["p1"], "ttl": "1h", "display_name": "My App", "num_uses": 5, "meta": {"team": "a"}}),
    )
    .await;
    for k in [
        "request_id",
        "lease_id",
        "renewable",
        "lease_duration",
        "data",
        "wrap_info",
        "warnings",
        "auth",
    ] {
        assert!(v.get(k).is_some(), "envelope field {k} missing: {v}");
    }
    assert_eq!(v["warnings"], json!(["Policy \"p1\" does not exist"]));
    let auth = &v["auth"];
    assert_eq!(auth["policies"], json!(["default", "p1"]));
    assert_eq!(auth["token_policies"], json!(["default", "p1"]));
    assert_eq!(auth["lease_duration"], 3600);
    assert_eq!(auth["renewable"], true);
    assert_eq!(auth["num_uses"], 5);
    assert_eq!(auth["orphan"], false);
    assert_eq!(auth["metadata"], json!({"team": "a"}));
    let tok = client_token(&v);
    let accessor = auth["accessor"].as_str().unwrap().to_string();

    let (st, me) = node.request("GET", "auth/token/lookup-self", Some(&tok), None).await;
    assert_eq!(st, StatusCode::OK, "{me}");
    assert_eq!(me["data"]["id"], tok.as_str());
    assert_eq!(me["data"]["display_name"], "token-my-app");
    assert_eq!(me["data"]["num_uses"], 4, "one use consumed");
    assert_eq!(me["data"]["policies"], json!(["default", "p1"]));
    assert!(me["data"]["ttl"].as_u64().unwrap() > 3500);

    let bearer = format!("Bearer {tok}");
    let (st, _, me) = node
        .request_full(
            "GET",
            "auth/token/lookup-self",
            None,
            None,
            &[("Authorization", &bearer)],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "bearer form: {me}");
    assert_eq!(me["data"]["accessor"], accessor.as_str());

    let (st, other) = node
        .request("POST", "auth/token/lookup", Some(&root), Some(json!({"token": tok})))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(other["data"]["accessor"], accessor.as_str());
    let (st, by_acc) = node
        .request(
            "POST",
            "auth/token/lookup-accessor",
            Some(&root),
            Some(json!({"accessor": accessor})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(by_acc["data"]["id"], "", "accessor lookups never reveal the token");
    assert_eq!(by_acc["data"]["display_name"], "token-my-app");

    let (st, v) = node
        .request("GET", "auth/token/lookup-self", Some("hvs.nonexistent"), None)
        .await;
    assert_eq!(
        (st, v),
        (StatusCode::FORBIDDEN, json!({"errors": ["permission denied"]}))
    );
    let (st, v) = node.request("GET", "auth/token/lookup-self", None, None).await;
    assert_eq!(
        (st, v),
        (StatusCode::FORBIDDEN, json!({"errors": ["permission denied"]}))
    );
    let (st, v) = node
        .request("POST", "auth/token/lookup", Some(&root), Some(json!({"token": "nope"})))
        .await;
    assert_eq!((st, v), (StatusCode::FORBIDDEN, json!({"errors": ["bad token"]})));
    let (st, v) = node
        .request("POST", "auth/token/create", Some(&root), Some(json!({"ttl": "abc"})))
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["time: invalid duration \"abc\""]})
        )
    );
    let (st, v) = node
        .request("POST", "auth/token/create", Some(&root), Some(json!({"num_uses": -1})))
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["number of uses cannot be negative"]})
        )
    );
}

/// Revoking a parent revokes its children (and theirs); `revoke-orphan` keeps children,
/// which become orphans; `revoke-self` and `revoke-accessor` end a token at once.
#[tokio::test]
async fn parent_revocation_and_orphans() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let parent = client_token(&create(&node, &root, json!({"policies": ["default"]})).await);
    // A default-policy token may not create children (no ACL on auth/token/create).
    let (st, _) = node
        .request("POST", "auth/token/create", Some(&parent), Some(json!({})))
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let parent = client_token(&create(&node, &root, json!({"policies": ["root"]})).await);
    let child = client_token(&create(&node, &parent, json!({"policies": ["root"]})).await);
    let grandchild = client_token(&create(&node, &child, json!({"policies": ["default"]})).await);
    let (st, _) = node
        .request("POST", "auth/token/revoke", Some(&root), Some(json!({"token": parent})))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    for t in [&parent, &child, &grandchild] {
        let (st, _) = node.request("GET", "auth/token/lookup-self", Some(t), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "revoked with its parent");
    }

    let p2 = client_token(&create(&node, &root, json!({"policies": ["root"]})).await);
    let c2 = client_token(&create(&node, &p2, json!({"policies": ["default"]})).await);
    let (st, _) = node
        .request(
            "POST",
            "auth/token/revoke-orphan",
            Some(&root),
            Some(json!({"token": p2})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&p2), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = node.request("GET", "auth/token/lookup-self", Some(&c2), None).await;
    assert_eq!(st, StatusCode::OK, "child survives revoke-orphan: {v}");
    assert_eq!(v["data"]["orphan"], true);

    let (st, _) = node.request("POST", "auth/token/revoke-self", Some(&c2), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&c2), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    let v = create(&node, &root, json!({})).await;
    let (t, acc) = (client_token(&v), v["auth"]["accessor"].as_str().unwrap().to_string());
    let (st, _) = node
        .request(
            "POST",
            "auth/token/revoke-accessor",
            Some(&root),
            Some(json!({"accessor": acc})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&t), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Orphan creation: create-orphan, or no_parent as root.
    let v = create(&node, &root, json!({"no_parent": true, "policies": ["default"]})).await;
    assert_eq!(v["auth"]["orphan"], true);
}

/// A token stops working when its TTL runs out, and so do its children; `renew-self`
/// extends within `explicit_max_ttl`; a token without TTL is not renewable.
#[tokio::test]
async fn expiry_and_renewal() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let short = client_token(&create(&node, &root, json!({"policies": ["root"], "ttl": "2s"})).await);
    let child = client_token(&create(&node, &short, json!({"policies": ["default"], "ttl": "1h"})).await);
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&child), None).await;
    assert_eq!(st, StatusCode::OK);
    wait_until_async(
        || async {
            let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&short), None).await;
            (st == StatusCode::FORBIDDEN).then_some(())
        },
        "the 2s token expires",
        Duration::from_secs(10),
    )
    .await;
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&child), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "child of an expired parent is revoked");

    let t = client_token(&create(&node, &root, json!({"ttl": "10m", "explicit_max_ttl": "1h"})).await);
    let (st, v) = node
        .request(
            "POST",
            "auth/token/renew-self",
            Some(&t),
            Some(json!({"increment": "30m"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["auth"]["lease_duration"], 1800);
    assert_eq!(v["auth"]["client_token"], t.as_str());
    let (st, v) = node
        .request(
            "POST",
            "auth/token/renew",
            Some(&root),
            Some(json!({"token": t, "increment": "5h"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        v["auth"]["lease_duration"].as_u64().unwrap() <= 3600,
        "capped by explicit_max_ttl: {v}"
    );
    let (st, v) = node
        .request("POST", "auth/token/renew-self", Some(&root), Some(json!({})))
        .await;
    assert_eq!(
        (st, v),
        (StatusCode::BAD_REQUEST, json!({"errors": ["lease is not renewable"]}))
    );
}

/// `num_uses` is enforced: a 2-use token answers twice, then 403; a request its policy
/// refuses does not count as a use (Vault).
#[tokio::test]
async fn num_uses_enforced() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let t = client_token(&create(&node, &root, json!({"num_uses": 2, "policies": ["default"]})).await);
    let (st, _) = node.request("GET", "sys/mounts", Some(&t), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    for _ in 0..2 {
        let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&t), None).await;
        assert_eq!(st, StatusCode::OK);
    }
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&t), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

/// Tokens survive a restart (they live through the barrier), the storage directory never
/// contains a token in plain, and `auth/token/accessors` (sudo) lists accessors.
#[tokio::test]
async fn tokens_persist_and_are_not_stored_plain() {
    let mut node = TestNode::builder().start().await;
    let keys = node.init_unsealed().await;
    let t = client_token(&create(&node, &keys.root_token, json!({"policies": ["default"]})).await);
    let (st, v) = node
        .request("LIST", "auth/token/accessors", Some(&keys.root_token), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["keys"].as_array().unwrap().len(), 2);
    let (st, _) = node.request("LIST", "auth/token/accessors", Some(&t), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    node.restart().await;
    node.unseal(&keys.keys).await;
    let (st, _) = node.request("GET", "auth/token/lookup-self", Some(&t), None).await;
    assert_eq!(st, StatusCode::OK);
    for secret in [&t, &keys.root_token] {
        let needle = secret.trim_start_matches("hvs.");
        assert!(
            !grep_dir(&node.dir().join("data"), needle.as_bytes()),
            "token found in storage"
        );
    }
}

fn grep_dir(dir: &std::path::Path, needle: &[u8]) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if grep_dir(&p, needle) {
                return true;
            }
        } else if let Ok(b) = std::fs::read(&p) {
            if b.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        if p.to_string_lossy()
            .contains(std::str::from_utf8(needle).unwrap_or("\u{0}"))
        {
            return true;
        }
    }
    false
}

/// `auth/token/tidy` answers 202 and removes expired tokens from storage, and `sys/auth`
/// lists the token auth method (Vault's shape, data copied to the top level).
#[tokio::test]
async fn tidy_and_sys_auth() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    create(&node, &root, json!({"ttl": "1s"})).await;
    let (_, v) = node.request("LIST", "auth/token/accessors", r, None).await;
    assert_eq!(v["data"]["keys"].as_array().unwrap().len(), 2);
    let ids = node.dir().join("data/sys/token/id");
    wait_until_async(
        || async {
            let (st, v) = node.request("POST", "auth/token/tidy", r, None).await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            (std::fs::read_dir(&ids).map(|d| d.count()).unwrap_or(0) == 1).then_some(())
        },
        "tidy removes the expired token",
        Duration::from_secs(10),
    )
    .await;
    let (_, v) = node.request("LIST", "auth/token/accessors", r, None).await;
    assert_eq!(v["data"]["keys"].as_array().unwrap().len(), 1);
    let (st, v) = node.request("GET", "sys/auth", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["token/"]["type"], "token");
    assert_eq!(v["token/"]["type"], "token");
}

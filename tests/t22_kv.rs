//! Mounts and KV through the real `vha server`: `sys/mounts` enable, list, tune
//! and disable; KV v2 data, versions, check-and-set, patch, delete/undelete/destroy,
//! metadata and config; KV v1 read/write/list/delete; persistence across restarts.

use reqwest::StatusCode;
use serde_json::{json, Value};
use vha_testkit::TestNode;

async fn write(node: &TestNode, root: &str, path: &str, body: Value) -> (StatusCode, Value) {
    node.request("POST", path, Some(root), Some(body)).await
}

/// Enable, list (Vault's fields), duplicate and unknown type refused, tune read/write,
/// disable deletes the data (re-enabling the same path starts empty).
#[tokio::test]
async fn mounts_lifecycle() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    node.mount_kv(&root, "kv2", "2").await;
    let (st, v) = node
        .request("POST", "sys/mounts/kv2", r, Some(json!({"type": "kv"})))
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["path is already in use at kv2/"]})
        )
    );
    let (st, v) = node
        .request("POST", "sys/mounts/x", r, Some(json!({"type": "nope"})))
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["plugin not found in the catalog: nope"]})
        )
    );
    let (st, v) = node.request("POST", "sys/mounts/y", r, Some(json!({}))).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["backend type must be specified as a string"]})
        )
    );
    let (st, v) = node.request("GET", "sys/mounts", r, None).await;
    assert_eq!(st, StatusCode::OK);
    let m = &v["data"]["kv2/"];
    assert_eq!(m["type"], "kv");
    assert_eq!(m["options"], json!({"version": "2"}));
    assert!(m["accessor"].as_str().unwrap().starts_with("kv_"));
    assert_eq!(v["kv2/"], *m, "sys/mounts copies data to the top level");

    let (st, v) = node.request("GET", "sys/mounts/kv2/tune", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["default_lease_ttl"], 2764800);
    let (st, _) = node
        .request(
            "POST",
            "sys/mounts/kv2/tune",
            r,
            Some(json!({"default_lease_ttl": "1h", "max_lease_ttl": "2h", "description": "new"})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, v) = node.request("GET", "sys/mounts/kv2/tune", r, None).await;
    assert_eq!(
        (
            v["data"]["default_lease_ttl"].clone(),
            v["data"]["max_lease_ttl"].clone()
        ),
        (json!(3600), json!(7200))
    );
    assert_eq!(v["data"]["description"], "new");
    let (st, _) = node
        .request(
            "POST",
            "sys/mounts/kv2/tune",
            r,
            Some(json!({"default_lease_ttl": "3h"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "default above max refused");

    write(&node, &root, "kv2/data/a", json!({"data": {"k": "v"}})).await;
    let (st, _) = node.request("DELETE", "sys/mounts/kv2", r, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = node.request("GET", "kv2/data/a", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        v["errors"][0],
        "no handler for route \"kv2/data/a\". route entry not found."
    );
    node.mount_kv(&root, "kv2", "2").await;
    let (st, _) = node.request("GET", "kv2/data/a", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "a re-enabled mount starts empty");
}

/// KV v2 end to end: versions count up, `?version=` reads old ones, CAS mismatch is 400
/// and leaves the previous version current, soft delete gives 404 with metadata, undelete
/// restores, destroy is permanent, patch merges, metadata and LIST (verb and `?list=true`).
#[tokio::test]
async fn kv2_versions_cas_delete_destroy_patch_metadata() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    node.mount_kv(&root, "secret", "2").await;
    for i in 1..=3 {
        let (st, v) = write(
            &node,
            &root,
            "secret/data/app/db",
            json!({"data": {"n": i.to_string()}}),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["data"]["version"], i);
        assert_eq!(v["data"]["destroyed"], false);
        assert_eq!(v["data"]["deletion_time"], "");
    }
    let (st, v) = node.request("GET", "secret/data/app/db", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["data"], json!({"n": "3"}));
    assert_eq!(v["data"]["metadata"]["version"], 3);
    let (_, v) = node.request("GET", "secret/data/app/db?version=1", r, None).await;
    assert_eq!(v["data"]["data"], json!({"n": "1"}));
    let (st, _) = node.request("GET", "secret/data/app/db?version=9", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = node.request("GET", "secret/data/app/db?version=abc", r, None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // CAS: mismatch -> 400, nothing written.
    let (st, v) = write(
        &node,
        &root,
        "secret/data/app/db",
        json!({"options": {"cas": 1}, "data": {"n": "x"}}),
    )
    .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["check-and-set parameter did not match the current version"]})
        )
    );
    let (st, v) = write(
        &node,
        &root,
        "secret/data/app/db",
        json!({"options": {"cas": 3}, "data": {"n": "4"}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = write(
        &node,
        &root,
        "secret/data/new",
        json!({"options": {"cas": 0}, "data": {"a": "b"}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "cas 0 creates: {v}");
    let (st, v) = write(
        &node,
        &root,
        "secret/data/new",
        json!({"options": {"cas": 0}, "data": {"a": "c"}}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    // Invalid bodies change nothing.
    let (st, v) = write(&node, &root, "secret/data/app/db", json!({})).await;
    assert_eq!(
        (st, v),
        (StatusCode::BAD_REQUEST, json!({"errors": ["no data provided"]}))
    );
    let (st, _) = write(&node, &root, "secret/data/app/db", json!({"data": "notamap"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (_, v) = node.request("GET", "secret/data/app/db", r, None).await;
    assert_eq!(
        (v["data"]["data"].clone(), v["data"]["metadata"]["version"].clone()),
        (json!({"n": "4"}), json!(4))
    );

    // Soft delete of the current version, undelete, destroy.
    let (st, _) = node.request("DELETE", "secret/data/app/db", r, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = node.request("GET", "secret/data/app/db", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["data"]["data"], Value::Null);
    assert_ne!(v["data"]["metadata"]["deletion_time"], "");
    let (st, _) = write(&node, &root, "secret/undelete/app/db", json!({"versions": [4]})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "secret/data/app/db", r, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = write(&node, &root, "secret/delete/app/db", json!({"versions": [1]})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "secret/data/app/db?version=1", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = write(&node, &root, "secret/destroy/app/db", json!({"versions": [2]})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = node.request("GET", "secret/data/app/db?version=2", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["data"]["metadata"]["destroyed"], true);
    let (st, _) = write(&node, &root, "secret/undelete/app/db", json!({"versions": [2]})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "secret/data/app/db?version=2", r, None).await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "undelete cannot bring back a destroyed version"
    );
    let (st, v) = write(&node, &root, "secret/destroy/app/db", json!({})).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["no version number provided"]})
        )
    );

    // Patch: merge-patch content type required.
    let (st, v) = node
        .request("PATCH", "secret/data/app/db", r, Some(json!({"data": {"z": "9"}})))
        .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    let (st, _, v) = node
        .request_full(
            "PATCH",
            "secret/data/app/db",
            r,
            None,
            &[("Content-Type", "application/merge-patch+json")],
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "no body: {v}");
    let patch = reqwest::Client::new()
        .patch(format!("{}/v1/secret/data/app/db", node.addr))
        .header("X-Vault-Token", &root)
        .header("Content-Type", "application/merge-patch+json")
        .body(json!({"data": {"z": "9", "n": null}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), StatusCode::OK);
    let (_, v) = node.request("GET", "secret/data/app/db", r, None).await;
    assert_eq!(v["data"]["data"], json!({"z": "9"}));
    assert_eq!(v["data"]["metadata"]["version"], 5);

    // Metadata.
    let (st, v) = node.request("GET", "secret/metadata/app/db", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["current_version"], 5);
    assert_eq!(v["data"]["versions"]["2"]["destroyed"], true);
    assert_eq!(v["data"]["max_versions"], 0);
    let (st, _) = write(
        &node,
        &root,
        "secret/metadata/app/db",
        json!({"max_versions": 2, "cas_required": true, "custom_metadata": {"owner": "ops"}}),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = write(&node, &root, "secret/data/app/db", json!({"data": {"n": "6"}})).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["check-and-set parameter required for this call"]})
        )
    );
    let (st, v) = write(
        &node,
        &root,
        "secret/data/app/db",
        json!({"options": {"cas": 5}, "data": {"n": "6"}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["custom_metadata"], json!({"owner": "ops"}));
    let (_, v) = node.request("GET", "secret/metadata/app/db", r, None).await;
    let versions: Vec<&String> = v["data"]["versions"].as_object().unwrap().keys().collect();
    assert_eq!(versions, vec!["5", "6"], "trimmed to max_versions");
    let (st, _) = node.request("GET", "secret/data/app/db?version=3", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    let (st, v) = node.request("LIST", "secret/metadata/", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["keys"], json!(["app/", "new"]));
    let (_, v) = node.request("GET", "secret/metadata/app?list=true", r, None).await;
    assert_eq!(v["data"]["keys"], json!(["db"]));
    let (st, v) = node.request("LIST", "secret/data/", r, None).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]})
        )
    );
    let (st, _) = node.request("LIST", "secret/metadata/nothing/", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = node.request("DELETE", "secret/metadata/app/db", r, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = node.request("GET", "secret/metadata/app/db", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = node.request("GET", "secret/data/app/db", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// `<mount>/config`: defaults, then `cas_required` and `max_versions` apply to every key.
#[tokio::test]
async fn kv2_config() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    node.mount_kv(&root, "secret", "2").await;
    let (st, v) = node.request("GET", "secret/config", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["data"],
        json!({"cas_required": false, "delete_version_after": "0s", "max_versions": 0, "metadata_cas_required": false})
    );
    let (st, _) = write(
        &node,
        &root,
        "secret/config",
        json!({"max_versions": 3, "cas_required": true, "delete_version_after": "1h"}),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, v) = node.request("GET", "secret/config", r, None).await;
    assert_eq!(v["data"]["delete_version_after"], "1h0m0s");
    let (st, _) = write(&node, &root, "secret/data/k", json!({"data": {"a": "b"}})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "mount-wide cas_required");
    let (st, v) = write(
        &node,
        &root,
        "secret/data/k",
        json!({"options": {"cas": 0}, "data": {"a": "b"}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_ne!(
        v["data"]["deletion_time"], "",
        "delete_version_after schedules deletion"
    );
}

/// A destroyed version stays destroyed, and a soft-deleted one stays deleted, across a
/// restart; the rest of the key's history survives intact.
#[tokio::test]
async fn destroyed_version_stays_destroyed_across_restart() {
    let mut node = TestNode::builder().start().await;
    let keys = node.init_unsealed().await;
    let root = keys.root_token.clone();
    node.mount_kv(&root, "secret", "2").await;
    for i in 1..=3 {
        write(&node, &root, "secret/data/x", json!({"data": {"v": i}})).await;
    }
    let (st, _) = write(&node, &root, "secret/destroy/x", json!({"versions": [2]})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = write(&node, &root, "secret/delete/x", json!({"versions": [1]})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    node.restart().await;
    node.unseal(&keys.keys).await;
    let r = Some(root.as_str());
    let (st, v) = node.request("GET", "secret/data/x?version=2", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["data"]["metadata"]["destroyed"], true);
    let (st, _) = node.request("GET", "secret/data/x?version=1", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = node.request("GET", "secret/data/x", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["data"], json!({"v": 3}));
    // Nothing of the destroyed version remains in storage (only ciphertext of others).
    let (_, v) = node.request("GET", "sys/mounts/secret", r, None).await;
    let uuid = v["data"]["uuid"].as_str().unwrap().to_string();
    let versions_dir = node.dir().join("data/logical").join(&uuid).join("versions");
    let count: usize = std::fs::read_dir(&versions_dir)
        .unwrap()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum();
    assert_eq!(count, 2, "versions 1 and 3 stored, 2 gone");
}

/// KV v1: write (204), read with the mount's default lease, list folders and keys, delete;
/// empty bodies and trailing-slash paths refused.
#[tokio::test]
async fn kv1_read_write_list_delete() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    let r = Some(root.as_str());
    node.mount_kv(&root, "kv1", "1").await;
    let (st, _) = write(&node, &root, "kv1/foo/bar", json!({"a": "b", "ttl": "1m"})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = write(&node, &root, "kv1/top", json!({"x": 1})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = node.request("GET", "kv1/foo/bar", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"], json!({"a": "b", "ttl": "1m"}));
    assert_eq!(v["lease_duration"], 60);
    let (_, v) = node.request("GET", "kv1/top", r, None).await;
    assert_eq!(v["lease_duration"], 2764800);
    let (st, v) = node.request("LIST", "kv1/", r, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"]["keys"], json!(["foo/", "top"]));
    let (_, v) = node.request("GET", "kv1/foo?list=true", r, None).await;
    assert_eq!(v["data"]["keys"], json!(["bar"]));
    let (st, v) = write(&node, &root, "kv1/a", json!({})).await;
    assert_eq!(
        (st, v),
        (StatusCode::BAD_REQUEST, json!({"errors": ["missing data fields"]}))
    );
    let (st, v) = write(&node, &root, "kv1/dir/", json!({"x": "y"})).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"errors": ["cannot write to a path ending in '/'"]})
        )
    );
    let (st, _) = node.request("DELETE", "kv1/foo/bar", r, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = node.request("GET", "kv1/foo/bar", r, None).await;
    assert_eq!((st, v), (StatusCode::NOT_FOUND, json!({"errors": []})));
    let (st, _) = node.request("LIST", "kv1/foo/", r, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// The Vault CLI's mount lookup: `sys/internal/ui/mounts/<path>` reports the KV version to a
/// token with access under the mount, and 403 otherwise.
#[tokio::test]
async fn ui_mounts_lookup() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    node.mount_kv(&root, "secret", "2").await;
    let (st, v) = node
        .request("GET", "sys/internal/ui/mounts/secret/a/b", Some(&root), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["path"], "secret/");
    assert_eq!(v["data"]["options"]["version"], "2");
    let (_, t) = node
        .request(
            "POST",
            "auth/token/create",
            Some(&root),
            Some(json!({"policies": ["default"]})),
        )
        .await;
    let t = t["auth"]["client_token"].as_str().unwrap();
    let (st, _) = node
        .request("GET", "sys/internal/ui/mounts/secret", Some(t), None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

/// Concurrent KV v2 writes (per-key locking): 32 writers on one key get 32 distinct
/// versions 1..=32; of 16 concurrent `cas` writes expecting the same version exactly one
/// wins; 32 writers on 32 different keys each create version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv2_concurrent_writes_per_key() {
    let node = TestNode::builder().start().await;
    let root = node.init_unsealed().await.root_token;
    node.mount_kv(&root, "secret", "2").await;
    let node = std::sync::Arc::new(node);
    let run = |paths: Vec<(String, Value)>| {
        let node = node.clone();
        let root = root.clone();
        async move {
            let tasks: Vec<_> = paths
                .into_iter()
                .map(|(p, body)| {
                    let node = node.clone();
                    let root = root.clone();
                    tokio::spawn(async move { node.request("POST", &p, Some(&root), Some(body)).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let same: Vec<_> = (0..32)
        .map(|i| ("secret/data/one".to_string(), json!({"data": {"i": i}})))
        .collect();
    let mut versions: Vec<u64> = run(same)
        .await
        .into_iter()
        .map(|(st, v)| {
            assert_eq!(st, StatusCode::OK, "{v}");
            v["data"]["version"].as_u64().unwrap()
        })
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=32).collect::<Vec<u64>>());
    let cas: Vec<_> = (0..16)
        .map(|i| {
            (
                "secret/data/one".to_string(),
                json!({"options": {"cas": 32}, "data": {"cas": i}}),
            )
        })
        .collect();
    let results = run(cas).await;
    let won = results.iter().filter(|(st, _)| *st == StatusCode::OK).count();
    assert_eq!(won, 1, "exactly one cas write wins: {results:?}");
    assert!(results
        .iter()
        .all(|(st, _)| *st == StatusCode::OK || *st == StatusCode::BAD_REQUEST));
    let many: Vec<_> = (0..32)
        .map(|i| (format!("secret/data/k{i}"), json!({"data": {"i": i}})))
        .collect();
    for (st, v) in run(many).await {
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["data"]["version"], 1);
    }
}

//! Token store: hashing at rest, tree revocation, orphaning, expiry and use counts.

use std::sync::Arc;

use vha_core::barrier::{shamir, Barrier};
use vha_core::storage::inmem::InmemBackend;
use vha_core::storage::Backend;

use super::*;

async fn unsealed() -> (Arc<InmemBackend>, Barrier) {
    let backend = Arc::new(InmemBackend::new());
    let b = Barrier::new(backend.clone());
    let (out, cfg) = b
        .initialize(1, 1, vha_core::barrier::InitClaim::Exclusive)
        .await
        .unwrap();
    b.commit_init(&cfg, vha_core::barrier::InitClaim::Exclusive)
        .await
        .unwrap();
    let root = shamir::combine(&out.key_shares, 1).unwrap();
    b.unseal(&root).await.unwrap();
    (backend, b)
}

fn params(policies: &[&str]) -> CreateParams {
    CreateParams {
        policies: Some(policies.iter().map(|s| s.to_string()).collect()),
        renewable: true,
        ..Default::default()
    }
}

/// The token never appears in storage (not even encrypted: keys are HMACs), and a lookup
/// with a wrong token finds nothing.
#[tokio::test]
async fn tokens_are_stored_hashed() {
    let (backend, b) = unsealed().await;
    let store = TokenStore::new();
    let view = View::new(&b, None);
    let root = store.create_root(&view).await.unwrap();
    let keys = backend.list("sys/token/id/").await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].contains(root.as_str()));
    assert!(store.lookup(&view, &root).await.unwrap().unwrap().is_root());
    assert!(store.lookup(&view, "hvs.wrong").await.unwrap().is_none());
}

/// Revoking a parent revokes its whole subtree; revoke-orphan keeps the children.
#[tokio::test]
async fn revocation_trees() {
    let (_bk, b) = unsealed().await;
    let store = TokenStore::new();
    let view = View::new(&b, None);
    let root_t = store.create_root(&view).await.unwrap();
    let root = store.lookup(&view, &root_t).await.unwrap().unwrap();
    let (p_t, p, _) = store.create(&view, &root, params(&["a"])).await.unwrap();
    let (c_t, c, _) = store.create(&view, &p, params(&["a"])).await.unwrap();
    let (g_t, _, _) = store.create(&view, &c, params(&[])).await.unwrap();
    store.revoke_tree(&view, &c.hash).await.unwrap();
    assert!(store.lookup(&view, &c_t).await.unwrap().is_none());
    assert!(store.lookup(&view, &g_t).await.unwrap().is_none());
    assert!(store.lookup(&view, &p_t).await.unwrap().is_some());

    let (c2_t, _, _) = store.create(&view, &p, params(&["a"])).await.unwrap();
    store.revoke_orphan(&view, &p.hash).await.unwrap();
    assert!(store.lookup(&view, &p_t).await.unwrap().is_none());
    let orphan = store
        .lookup(&view, &c2_t)
        .await
        .unwrap()
        .expect("child survives revoke-orphan");
    assert!(orphan.is_orphan());
}

/// A non-root parent cannot hand out policies it does not have.
#[tokio::test]
async fn child_policies_subset() {
    let (_bk, b) = unsealed().await;
    let store = TokenStore::new();
    let view = View::new(&b, None);
    let root_t = store.create_root(&view).await.unwrap();
    let root = store.lookup(&view, &root_t).await.unwrap().unwrap();
    let (_, p, _) = store.create(&view, &root, params(&["a"])).await.unwrap();
    assert_eq!(p.policies, vec!["a", "default"]);
    assert!(store.create(&view, &p, params(&["b"])).await.is_err());
    assert!(store.create(&view, &p, params(&["root"])).await.is_err());
    assert!(store
        .create(
            &view,
            &root,
            CreateParams {
                num_uses: -1,
                ..params(&[])
            }
        )
        .await
        .is_err());
}

/// An expired token and the children of an expired parent are invalid.
#[tokio::test]
async fn expiry_invalidates_subtree() {
    let (_bk, b) = unsealed().await;
    let store = TokenStore::new();
    let view = View::new(&b, None);
    let root_t = store.create_root(&view).await.unwrap();
    let root = store.lookup(&view, &root_t).await.unwrap().unwrap();
    let (p_t, mut p, _) = store.create(&view, &root, params(&["a"])).await.unwrap();
    let (c_t, _, _) = store
        .create(
            &view,
            &p,
            CreateParams {
                ttl: 3600,
                ..params(&["a"])
            },
        )
        .await
        .unwrap();
    p.expire_time = Some(now_secs() - 1);
    store.store(&view, &p).await.unwrap();
    assert!(
        store.lookup(&view, &c_t).await.unwrap().is_none(),
        "child of an expired parent"
    );
    assert!(store.lookup(&view, &p_t).await.unwrap().is_none());
}

/// A token with `num_uses = 2` authenticates exactly twice, the second time marked as its
/// last use.
#[tokio::test]
async fn use_counts() {
    let (_bk, b) = unsealed().await;
    let store = TokenStore::new();
    let view = View::new(&b, None);
    let root_t = store.create_root(&view).await.unwrap();
    let root = store.lookup(&view, &root_t).await.unwrap().unwrap();
    let (t, _, _) = store
        .create(
            &view,
            &root,
            CreateParams {
                num_uses: 2,
                ..params(&["a"])
            },
        )
        .await
        .unwrap();
    assert_eq!(store.authenticate(&view, Some(&t)).await.unwrap().num_uses, 1);
    assert_eq!(store.authenticate(&view, Some(&t)).await.unwrap().num_uses, -1);
    assert!(store.authenticate(&view, Some(&t)).await.is_err());
}

/// `Debug` of a stored token shows neither its hash nor its parent's hash (storage lookup
/// keys); accessor and policies stay readable.
#[tokio::test]
async fn debug_redacts_hashes() {
    let (_backend, b) = unsealed().await;
    let store = TokenStore::new();
    let view = View::new(&b, None);
    let root = store.create_root(&view).await.unwrap();
    let root_entry = store.lookup(&view, &root).await.unwrap().unwrap();
    let (child, entry, _) = store.create(&view, &root_entry, params(&["a"])).await.unwrap();
    let dbg = format!("{entry:?} {entry:#?} {root_entry:?}");
    for secret in [
        entry.hash.as_str(),
        root_entry.hash.as_str(),
        child.as_str(),
        root.as_str(),
    ] {
        assert!(!dbg.contains(secret), "{dbg}");
    }
    assert!(dbg.contains(&entry.accessor) && dbg.contains("<redacted>"), "{dbg}");
}

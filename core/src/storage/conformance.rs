//! The conformance suite every storage backend runs (Vault's `ExerciseBackend` /
//! `ExerciseHABackend`). Each function panics with a message naming the broken property.
//!
//! Backends call these from their own tests: `exercise_backend(&b).await` and
//! `exercise_ha_backend(&b1, &b2).await` with two handles on the same store (two clients).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, Fence, HaBackend, StorageError, WatchEvent};

/// How long a watch event may take to arrive before the suite calls it lost. Generous: the
/// 100 ms target is a benchmark matter, this only proves events arrive at all.
const WATCH_DEADLINE: Duration = Duration::from_secs(5);

/// KV semantics: get/put/delete/list, nested list, overwrite, fencing, limits, watch.
pub async fn exercise_backend(b: &dyn Backend) {
    // Keys are namespaced so a persistent backend can run the suite twice.
    let ns = format!("conformance-{}/", uuid::Uuid::new_v4());
    let k = |s: &str| format!("{ns}{s}");

    assert!(
        b.get(&k("foo")).await.expect("get missing").is_none(),
        "missing key must read as None"
    );
    assert!(
        b.list(&ns).await.expect("list empty").is_empty(),
        "empty prefix must list nothing"
    );
    b.delete(&k("foo"), None)
        .await
        .expect("deleting a missing key is not an error");

    b.put(&k("foo"), b"bar".to_vec(), None).await.expect("put");
    let e = b.get(&k("foo")).await.expect("get").expect("written key must exist");
    assert_eq!(e.value, b"bar", "value must round-trip");
    assert_eq!(e.key, k("foo"), "entry must carry its key");

    b.put(&k("foo"), b"baz".to_vec(), None).await.expect("overwrite");
    assert_eq!(
        b.get(&k("foo")).await.unwrap().unwrap().value,
        b"baz",
        "overwrite must replace"
    );

    // Binary-safe values, including empty ones.
    let bin: Vec<u8> = (0..=255u8).collect();
    b.put(&k("bin"), bin.clone(), None).await.expect("put binary");
    assert_eq!(
        b.get(&k("bin")).await.unwrap().unwrap().value,
        bin,
        "binary value must round-trip"
    );
    b.put(&k("empty"), Vec::new(), None).await.expect("put empty");
    assert_eq!(b.get(&k("empty")).await.unwrap().unwrap().value, Vec::<u8>::new());

    // Nested listing: immediate children, folders with a trailing slash, sorted.
    b.put(&k("foo/bar"), b"1".to_vec(), None).await.unwrap();
    b.put(&k("foo/baz/qux"), b"2".to_vec(), None).await.unwrap();
    b.put(&k("zip"), b"3".to_vec(), None).await.unwrap();
    let top = b.list(&ns).await.expect("list");
    assert_eq!(top, vec!["bin", "empty", "foo", "foo/", "zip"], "top-level listing");
    let sub = b.list(&k("foo/")).await.expect("list sub");
    assert_eq!(sub, vec!["bar", "baz/"], "nested listing");

    b.delete(&k("foo"), None).await.expect("delete");
    assert!(b.get(&k("foo")).await.unwrap().is_none(), "deleted key must be gone");
    assert_eq!(
        b.list(&ns).await.unwrap(),
        vec!["bin", "empty", "foo/", "zip"],
        "folder survives file delete"
    );

    // Fencing: a lower token than the highest seen for the same lock is rejected and not applied.
    let lock = format!("{ns}lock");
    let f5 = Fence {
        lock: lock.clone(),
        token: 5,
    };
    let f4 = Fence {
        lock: lock.clone(),
        token: 4,
    };
    let f6 = Fence {
        lock: lock.clone(),
        token: 6,
    };
    b.put(&k("fenced"), b"v5".to_vec(), Some(&f5))
        .await
        .expect("fenced put with fresh token");
    match b.put(&k("fenced"), b"v4".to_vec(), Some(&f4)).await {
        Err(StorageError::Fenced { token: 4, .. }) => {}
        other => panic!("stale token write must be Fenced, got {other:?}"),
    }
    assert_eq!(
        b.get(&k("fenced")).await.unwrap().unwrap().value,
        b"v5",
        "a fenced write must not apply"
    );
    match b.delete(&k("fenced"), Some(&f4)).await {
        Err(StorageError::Fenced { .. }) => {}
        other => panic!("stale token delete must be Fenced, got {other:?}"),
    }
    assert!(
        b.get(&k("fenced")).await.unwrap().is_some(),
        "a fenced delete must not apply"
    );
    b.put(&k("fenced"), b"v6".to_vec(), Some(&f6))
        .await
        .expect("higher token accepted");
    b.put(&k("fenced"), b"v6b".to_vec(), Some(&f6))
        .await
        .expect("equal token accepted");
    let e = b.get(&k("fenced")).await.unwrap().unwrap();
    if let Some(t) = e.fence_token {
        assert_eq!(t, 6, "recorded token must be the writer's");
    }
    // A batch writes every entry in order under one fence check; a stale fence writes none;
    // an empty or oversized batch is refused before anything is written.
    b.put_batch(
        vec![(k("batch/a"), b"1".to_vec()), (k("batch/b"), b"2".to_vec())],
        Some(&f6),
    )
    .await
    .expect("fenced batch with the current token");
    assert_eq!(b.get(&k("batch/a")).await.unwrap().unwrap().value, b"1");
    assert_eq!(b.get(&k("batch/b")).await.unwrap().unwrap().value, b"2");
    match b
        .put_batch(
            vec![(k("batch/a"), b"stale".to_vec()), (k("batch/c"), b"stale".to_vec())],
            Some(&f4),
        )
        .await
    {
        Err(StorageError::Fenced { token: 4, .. }) => {}
        other => panic!("a stale batch must be Fenced, got {other:?}"),
    }
    assert_eq!(
        b.get(&k("batch/a")).await.unwrap().unwrap().value,
        b"1",
        "a fenced batch writes nothing"
    );
    assert!(
        b.get(&k("batch/c")).await.unwrap().is_none(),
        "a fenced batch writes nothing"
    );
    b.put_batch(vec![(k("batch/c"), b"3".to_vec())], None)
        .await
        .expect("unfenced batch");
    assert_eq!(b.get(&k("batch/c")).await.unwrap().unwrap().value, b"3");
    assert!(
        b.put_batch(Vec::new(), None).await.is_err(),
        "an empty batch is refused"
    );
    let too_many: Vec<(String, Vec<u8>)> = (0..=super::MAX_BATCH)
        .map(|i| (k(&format!("batch/many/{i}")), b"x".to_vec()))
        .collect();
    assert!(
        b.put_batch(too_many, None).await.is_err(),
        "an oversized batch is refused"
    );
    assert!(b.get(&k("batch/many/0")).await.unwrap().is_none(), "and writes nothing");

    // Another lock's tokens are independent.
    let other = Fence {
        lock: format!("{ns}other-lock"),
        token: 1,
    };
    b.put(&k("other"), b"x".to_vec(), Some(&other))
        .await
        .expect("tokens are per lock");

    // Create-if-absent: the first create writes, a second one writes nothing.
    assert!(b.create(&k("once"), b"first".to_vec(), None).await.expect("create"));
    assert!(!b
        .create(&k("once"), b"second".to_vec(), None)
        .await
        .expect("create again"));
    assert_eq!(b.get(&k("once")).await.unwrap().unwrap().value, b"first");
    assert!(!b
        .create(&k("fenced"), b"x".to_vec(), Some(&f6))
        .await
        .expect("fenced create of an existing key"));
    assert_eq!(b.get(&k("fenced")).await.unwrap().unwrap().value, b"v6b");
    match b.create(&k("fenced-new"), b"x".to_vec(), Some(&f4)).await {
        Err(StorageError::Fenced { .. }) => {}
        other => panic!("stale token create must be Fenced, got {other:?}"),
    }
    assert!(
        b.get(&k("fenced-new")).await.unwrap().is_none(),
        "a fenced create must not apply"
    );
    assert!(b
        .create(&k("fenced-new"), b"x".to_vec(), Some(&f6))
        .await
        .expect("fenced create"));
    // Of concurrent creates of one key, exactly one wins, and its value is what is stored.
    let race = k("race");
    let racers = (0..8u8).map(|i| b.create(&race, vec![i], None));
    let results = futures::future::join_all(racers).await;
    let winners: Vec<u8> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().expect("create").then_some(i as u8))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one concurrent create wins: {results:?}");
    assert_eq!(b.get(&k("race")).await.unwrap().unwrap().value, winners);

    // Limits: bad keys are rejected, not stored.
    for bad in ["", "/abs", "a/../b", "a/./b"] {
        assert!(
            matches!(b.put(bad, b"x".to_vec(), None).await, Err(StorageError::Invalid(_))),
            "key {bad:?} must be rejected as Invalid"
        );
    }
    let long = "k".repeat(super::MAX_KEY_LEN + 1);
    assert!(
        matches!(b.put(&long, b"x".to_vec(), None).await, Err(StorageError::Invalid(_))),
        "over-long key"
    );

    // Watches, where supported.
    match b.watch(&k("w/")).await {
        Ok(mut rx) => {
            b.put(&k("w/a"), b"1".to_vec(), None).await.unwrap();
            b.put(&k("unwatched"), b"1".to_vec(), None).await.unwrap();
            b.delete(&k("w/a"), None).await.unwrap();
            let mut seen = Vec::new();
            while seen.len() < 2 {
                match tokio::time::timeout(WATCH_DEADLINE, rx.recv()).await {
                    Ok(Some(WatchEvent::Resync)) => {}
                    Ok(Some(ev)) => seen.push(ev),
                    Ok(None) => panic!("watch closed early"),
                    Err(_) => panic!("watch event not delivered within {WATCH_DEADLINE:?}; got {seen:?}"),
                }
            }
            assert_eq!(
                seen,
                vec![WatchEvent::Put(k("w/a")), WatchEvent::Delete(k("w/a"))],
                "watch events in order"
            );
        }
        Err(StorageError::Unsupported { .. }) => {}
        Err(e) => panic!("watch failed: {e}"),
    }

    // Clean up so persistent stores do not grow run over run.
    for key in ["bin", "empty", "foo/bar", "foo/baz/qux", "zip", "other", "unwatched"] {
        b.delete(&k(key), None).await.unwrap();
    }
    b.delete(&k("fenced"), Some(&f6)).await.unwrap();
}

/// HA semantics with two clients `b1` and `b2` of the same store: mutual exclusion, holder
/// reads, increasing tokens, release hand-over, cancellation, fencing of the deposed holder.
pub async fn exercise_ha_backend(b1: &dyn HaBackend, b2: &dyn HaBackend) {
    let key = format!("conformance-lock-{}", uuid::Uuid::new_v4());

    assert!(
        b1.holder(&key).await.expect("holder").is_none(),
        "fresh lock has no holder"
    );

    let mut watch = b2.watch_lock(&key).await.expect("watch_lock");

    let g1 = b1
        .acquire(&key, "node-1", CancellationToken::new())
        .await
        .expect("acquire")
        .expect("uncontended acquire must succeed");
    assert!(!g1.is_lost(), "fresh guard must not be lost");
    let h = b2
        .holder(&key)
        .await
        .expect("holder")
        .expect("held lock must have a holder");
    assert_eq!(h.value, "node-1", "holder value visible to other clients");
    assert_eq!(h.token, g1.fence().token, "holder token equals the grant's");
    expect_event(&mut watch, |e| matches!(e, WatchEvent::Put(_)), "grant must be watched").await;

    // A second contender blocks until cancelled.
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.cancel();
    });
    let r = b2
        .acquire(&key, "node-2", cancel)
        .await
        .expect("cancelled acquire is not an error");
    assert!(r.is_none(), "acquire must not succeed while another holds the lock");
    canceller.await.unwrap();

    // A waiting contender gets the lock once the holder releases, with a higher token.
    let t1 = g1.fence().token;
    let key2 = key.clone();
    let waiter = async move { b2.acquire(&key2, "node-2", CancellationToken::new()).await };
    let lost1 = g1.lost();
    let (g2, ()) = tokio::join!(waiter, async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        g1.release().await.expect("release");
    });
    assert!(lost1.is_cancelled(), "released guard must report lost");
    let g2 = g2.expect("acquire after release").expect("must get lock after release");
    assert!(
        g2.fence().token > t1,
        "tokens must strictly increase: {} then {}",
        t1,
        g2.fence().token
    );
    assert_eq!(b1.holder(&key).await.unwrap().unwrap().value, "node-2");
    expect_event(
        &mut watch,
        |e| matches!(e, WatchEvent::Delete(_)),
        "release must be watched",
    )
    .await;

    let t2 = g2.fence().token;
    g2.release().await.expect("release 2");
    assert!(b1.holder(&key).await.unwrap().is_none(), "released lock has no holder");

    // Re-acquire: tokens keep increasing.
    let g3 = b1
        .acquire(&key, "node-3", CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert!(
        g3.fence().token > t2,
        "token after re-acquire must exceed earlier grants"
    );
    g3.release().await.unwrap();
}

async fn expect_event(rx: &mut super::WatchStream, pred: impl Fn(&WatchEvent) -> bool, why: &str) {
    let deadline = tokio::time::Instant::now() + WATCH_DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{why}: watch closed"),
            Err(_) => panic!("{why}: no event within {WATCH_DEADLINE:?}"),
        }
    }
}

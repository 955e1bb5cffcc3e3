//! The store's in-memory KV map, in one of two shapes: a plain `BTreeMap` (compaction copies
//! it under the state lock) or a persistent B-tree (`imbl::OrdMap`) whose clone is O(1) and
//! shares structure, so compaction serializes an immutable view in the background while
//! writers keep mutating the live map (copy-on-write of the nodes they touch).
//!
//! Keys in the persistent map are `Arc<str>` and values hold `Bytes`, so copying a node on
//! write bumps reference counts instead of copying key and value bytes.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

/// One stored entry.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub value: Bytes,
    pub fence_token: Option<u64>,
    pub revision: u64,
}

/// The KV map.
#[derive(Clone, Debug)]
pub(crate) enum KvMap {
    Tree(BTreeMap<String, Stored>),
    Persistent(imbl::OrdMap<Arc<str>, Stored>),
}

impl KvMap {
    pub(crate) fn new(persistent: bool) -> KvMap {
        if persistent {
            KvMap::Persistent(imbl::OrdMap::new())
        } else {
            KvMap::Tree(BTreeMap::new())
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            KvMap::Tree(m) => m.len(),
            KvMap::Persistent(m) => m.len(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Stored> {
        match self {
            KvMap::Tree(m) => m.get(key),
            KvMap::Persistent(m) => m.get(key),
        }
    }

    pub(crate) fn insert(&mut self, key: String, s: Stored) {
        match self {
            KvMap::Tree(m) => {
                m.insert(key, s);
            }
            KvMap::Persistent(m) => {
                m.insert(Arc::from(key), s);
            }
        }
    }

    /// Removes `key`; whether it was there.
    pub(crate) fn remove(&mut self, key: &str) -> bool {
        match self {
            KvMap::Tree(m) => m.remove(key).is_some(),
            KvMap::Persistent(m) => m.remove(key).is_some(),
        }
    }

    /// Keys from `start` on, in order.
    pub(crate) fn keys_from<'a>(&'a self, start: &'a str) -> Box<dyn Iterator<Item = &'a str> + 'a> {
        let range = (Bound::Included(start), Bound::Unbounded);
        match self {
            KvMap::Tree(m) => Box::new(m.range::<str, _>(range).map(|(k, _)| k.as_str())),
            KvMap::Persistent(m) => Box::new(m.range::<_, str>(range).map(|(k, _)| &**k)),
        }
    }

    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (&str, &Stored)> + '_> {
        match self {
            KvMap::Tree(m) => Box::new(m.iter().map(|(k, v)| (k.as_str(), v))),
            KvMap::Persistent(m) => Box::new(m.iter().map(|(k, v)| (&**k, v))),
        }
    }

    /// An immutable view sharing structure with `self` (O(1)), for the persistent map only.
    pub(crate) fn view(&self) -> Option<KvMap> {
        match self {
            KvMap::Tree(_) => None,
            KvMap::Persistent(m) => Some(KvMap::Persistent(m.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rev: u64) -> Stored {
        Stored {
            value: Bytes::from(rev.to_string()),
            fence_token: None,
            revision: rev,
        }
    }

    /// Both shapes answer get/insert/remove/range the same way, and a view of the persistent
    /// map keeps the state it was taken at while the live map changes.
    #[test]
    fn shapes_agree_and_views_are_frozen() {
        for persistent in [false, true] {
            let mut m = KvMap::new(persistent);
            for (i, k) in ["a/1", "a/2", "b/1", "a/3"].iter().enumerate() {
                m.insert(k.to_string(), s(i as u64 + 1));
            }
            let view = m.view();
            assert!(m.remove("a/2"));
            assert!(!m.remove("a/2"));
            m.insert("a/0".into(), s(9));
            let keys: Vec<&str> = m.keys_from("a/").take_while(|k| k.starts_with("a/")).collect();
            assert_eq!(keys, ["a/0", "a/1", "a/3"]);
            assert_eq!(m.get("b/1").map(|e| e.revision), Some(3));
            assert_eq!(m.len(), 4);
            assert_eq!(view.is_some(), persistent);
            if let Some(v) = view {
                let frozen: Vec<(&str, u64)> = v.iter().map(|(k, e)| (k, e.revision)).collect();
                assert_eq!(frozen, [("a/1", 1), ("a/2", 2), ("a/3", 4), ("b/1", 3)]);
            }
        }
    }
}

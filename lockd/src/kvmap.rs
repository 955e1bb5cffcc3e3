//! The store's in-memory KV map: a persistent B-tree (`imbl::OrdMap`) whose clone is O(1)
//! and shares structure, so compaction serializes an immutable view in the background while
//! writers keep mutating the live map (copy-on-write of the nodes they touch).
//!
//! Keys are `Arc<str>` and values hold `Bytes`, so copying a node on write bumps reference
//! counts instead of copying key and value bytes.

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
#[derive(Clone, Debug, Default)]
pub(crate) struct KvMap(imbl::OrdMap<Arc<str>, Stored>);

impl KvMap {
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Stored> {
        self.0.get(key)
    }

    pub(crate) fn insert(&mut self, key: String, s: Stored) {
        self.0.insert(Arc::from(key), s);
    }

    /// Removes `key`; whether it was there.
    pub(crate) fn remove(&mut self, key: &str) -> bool {
        self.0.remove(key).is_some()
    }

    /// Keys from `start` on, in order.
    pub(crate) fn keys_from<'a>(&'a self, start: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .range::<_, str>((Bound::Included(start), Bound::Unbounded))
            .map(|(k, _)| &**k)
    }

    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Stored)> + '_ {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    /// An immutable view sharing structure with `self`, in O(1).
    pub(crate) fn view(&self) -> KvMap {
        self.clone()
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

    /// The map answers get/insert/remove/range as a sorted map does, and a view keeps the
    /// state it was taken at while the live map changes.
    #[test]
    fn the_map_is_sorted_and_views_are_frozen() {
        let mut m = KvMap::default();
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
        let frozen: Vec<(&str, u64)> = view.iter().map(|(k, e)| (k, e.revision)).collect();
        assert_eq!(frozen, [("a/1", 1), ("a/2", 2), ("a/3", 4), ("b/1", 3)]);
    }
}

//! The store's in-memory KV map: a persistent B-tree (`imbl::OrdMap`) whose clone is O(1)
//! and shares structure, so compaction serializes an immutable view in the background while
//! writers keep mutating the live map (copy-on-write of the nodes they touch).
//!
//! Keys are `Arc<str>` and values `Arc<[u8]>`, so copying a node on write bumps reference
//! counts instead of copying key and value bytes.
//!
//! An entry is small on purpose: the map's leaves hold entries inline and are about two
//! thirds full under random keys, so every byte of an entry costs about 1.5 bytes per
//! stored key. An entry is key (16 bytes) + value (16) + revision and fence token packed in
//! 16; an `Arc<[u8]>` value costs one allocation with a 16-byte header, where a cloned
//! `Bytes` costs 32 inline bytes and a second allocation.

use std::ops::Bound;
use std::sync::Arc;

/// Bit of `Stored::rev` that says whether the entry carries a fence token. Revisions are
/// LSNs, which stay far below 2^63.
const HAS_FENCE: u64 = 1 << 63;

/// One stored entry.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub value: Arc<[u8]>,
    /// The revision, with [`HAS_FENCE`] set when `fence` holds a token.
    rev: u64,
    fence: u64,
}

impl Stored {
    pub(crate) fn new(value: Arc<[u8]>, fence_token: Option<u64>, revision: u64) -> Stored {
        debug_assert!(revision & HAS_FENCE == 0, "revision {revision} out of range");
        Stored {
            value,
            rev: (revision & !HAS_FENCE) | if fence_token.is_some() { HAS_FENCE } else { 0 },
            fence: fence_token.unwrap_or(0),
        }
    }

    pub(crate) fn revision(&self) -> u64 {
        self.rev & !HAS_FENCE
    }

    pub(crate) fn fence_token(&self) -> Option<u64> {
        (self.rev & HAS_FENCE != 0).then_some(self.fence)
    }
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
        Stored::new(Arc::from(rev.to_string().as_bytes()), None, rev)
    }

    /// Revision and fence token survive the packing: with and without a token, token 0
    /// and the largest token included; an entry stays 48 bytes.
    #[test]
    fn entries_pack_revision_and_fence() {
        for (fence, rev) in [
            (None, 0),
            (Some(0), 1),
            (Some(7), 99),
            (Some(u64::MAX), (1 << 62) + 5),
            (None, u64::MAX >> 1),
        ] {
            let e = Stored::new(Arc::from(&b"v"[..]), fence, rev);
            assert_eq!((e.fence_token(), e.revision()), (fence, rev));
        }
        assert_eq!(std::mem::size_of::<(Arc<str>, Stored)>(), 48);
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
        assert_eq!(m.get("b/1").map(Stored::revision), Some(3));
        assert_eq!(m.len(), 4);
        let frozen: Vec<(&str, u64)> = view.iter().map(|(k, e)| (k, e.revision())).collect();
        assert_eq!(frozen, [("a/1", 1), ("a/2", 2), ("a/3", 4), ("b/1", 3)]);
    }
}

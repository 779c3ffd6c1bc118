//! The dedup window's keys of one day held in memory ([`MemKeys`]): the bytes of all keys in one
//! buffer, found through a table of their hashes. No allocation per key, one free for all of them.
//!
//! Invariant: exact. A key is found only if those very bytes were inserted; the hash only narrows the
//! search (two keys with one hash are both kept and told apart by their bytes).

use hashbrown::HashTable;

use crate::runs::KeyHash;

/// A set of byte-string keys, in one buffer.
#[derive(Default)]
pub(crate) struct MemKeys {
    /// The keys, back to back, in insertion order.
    bytes: Vec<u8>,
    /// Each key's hash, start and length in `bytes`.
    index: HashTable<Entry>,
}

#[derive(Clone, Copy)]
struct Entry {
    hash: u64,
    start: usize,
    len: usize,
}

impl MemKeys {
    /// Whether `key` (whose hash is `h`) was inserted.
    pub(crate) fn contains(&self, key: &[u8], h: KeyHash) -> bool {
        let hash = h.word();
        self.index
            .find(hash, |e| e.hash == hash && self.key(e) == key)
            .is_some()
    }

    /// Inserts `key` (whose hash is `h`); false if it was there already.
    pub(crate) fn insert(&mut self, key: &[u8], h: KeyHash) -> bool {
        let hash = h.word();
        let MemKeys { bytes, index } = self;
        let found = index.entry(hash, |e| e.hash == hash && e.of(bytes) == key, |e| e.hash);
        match found {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(Entry {
                    hash,
                    start: bytes.len(),
                    len: key.len(),
                });
                bytes.extend_from_slice(key);
                true
            }
        }
    }

    /// How many keys it holds.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// The keys in byte order (as a run file holds them).
    pub(crate) fn sorted(&self) -> Vec<&[u8]> {
        let mut keys: Vec<&[u8]> = self.index.iter().map(|e| self.key(e)).collect();
        keys.sort_unstable();
        keys
    }

    fn key(&self, e: &Entry) -> &[u8] {
        e.of(&self.bytes)
    }
}

impl Entry {
    /// The key's bytes in `bytes`.
    fn of(self, bytes: &[u8]) -> &[u8] {
        &bytes[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// It answers as a `HashSet` of the same keys does: short keys over a small alphabet make
        /// repeats, prefixes of one another and the empty key common.
        #[test]
        fn answers_as_a_hash_set(
            inserts in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..4), 0..200),
            probes in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..4), 0..50),
        ) {
            let (mut mem, mut set) = (MemKeys::default(), std::collections::HashSet::new());
            for k in &inserts {
                prop_assert_eq!(mem.insert(k, KeyHash::of(k)), set.insert(k.clone()));
            }
            prop_assert_eq!(mem.len(), set.len());
            for k in inserts.iter().chain(&probes) {
                prop_assert_eq!(mem.contains(k, KeyHash::of(k)), set.contains(k));
            }
            let mut want: Vec<&[u8]> = set.iter().map(|k| k.as_slice()).collect();
            want.sort_unstable();
            prop_assert_eq!(mem.sorted(), want);
        }
    }

    /// Keys that share a hash are still told apart by their bytes.
    #[test]
    fn keys_with_one_hash_are_told_apart() {
        let mut mem = MemKeys::default();
        let h = KeyHash::of(b"a");
        assert!(mem.insert(b"a", h));
        assert!(mem.insert(b"b", h));
        assert!(!mem.insert(b"b", h));
        assert!(mem.contains(b"a", h) && mem.contains(b"b", h));
        assert!(!mem.contains(b"c", h));
        assert_eq!(mem.len(), 2);
    }
}

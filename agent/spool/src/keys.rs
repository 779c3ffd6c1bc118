//! Key layout of the spool's main tree. WARNING: these prefixes and encodings are the on-disk format;
//! changing any of them makes existing spools unreadable. Add new prefixes, never reuse one.

use crate::memkeys::MemKeys;
use crate::runs::KeyHash;

/// Chunk of envelope lines: `C` + seq (u64 BE).
pub const CHUNK: u8 = b'C';
/// Batch descriptor: `B` + seq (u64 BE).
pub const BATCH: u8 = b'B';
/// Blob done-mark: `D` + source + 0x00 + content id.
pub const DONE: u8 = b'D';
/// Collector cursor: `K` + source.
pub const CURSOR: u8 = b'K';
/// Metadata: `M` + name.
pub const META: u8 = b'M';
/// Quarantined item: `Q` + seq (u64 BE).
pub const QUARANTINE: u8 = b'Q';
/// Dedup log entry (format 3, `dedup.rs`): `L` + day (u32 BE) + seq (u64 BE) -> the record-Id keys a
/// blob added, each LEB128 length + bytes.
pub const DEDUP_LOG: u8 = b'L';

/// Meta names.
pub mod meta {
    /// Next chunk sequence number (u64 BE).
    pub const NEXT_CHUNK: &[u8] = b"next_chunk";
    /// Next batch sequence number (u64 BE). Never decreases: keys are never reused.
    pub const NEXT_BATCH: &[u8] = b"next_batch";
    /// Next quarantine sequence number (u64 BE).
    pub const NEXT_QUARANTINE: &[u8] = b"next_quarantine";
    /// Where the next batch starts: chunk seq (u64 BE) + record index (u32 BE).
    pub const BATCH_POS: &[u8] = b"batch_pos";
    /// Spool figures (JSON `Figures`).
    pub const FIGURES: &[u8] = b"figures";
    /// The WAL marker: where the newest group whose batch is in sled starts (`wal.rs`).
    pub const WAL: &[u8] = b"wal";
}

/// `prefix` + u64 BE.
pub fn seq_key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The u64 of a `seq_key`, if well-formed.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// `M` + name.
pub fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(META);
    k.extend_from_slice(name);
    k
}

/// `D` + source + 0x00 + content id.
pub fn done_key(source: &str, content_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + source.len() + content_id.len());
    k.push(DONE);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(content_id.as_bytes());
    k
}

/// `K` + source.
pub fn cursor_key(source: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + source.len());
    k.push(CURSOR);
    k.extend_from_slice(source.as_bytes());
    k
}

/// Key of a record Id in a day's seen-tree of format 1 (trees `seen-<day>`, written by versions before
/// format 2): tenant id + 0x00 + record Id, as text (~73 bytes for GUIDs). Still read until those days
/// expire; never written any more.
pub fn seen_key(tenant_id: &str, record_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + tenant_id.len() + record_id.len());
    k.extend_from_slice(tenant_id.as_bytes());
    k.push(0);
    k.extend_from_slice(record_id.as_bytes());
    k
}

/// Tag of a format-2 seen key whose tenant and record Id are both canonical lowercase GUIDs.
pub const SEEN_GUIDS: u8 = 1;
/// Tag of a format-2 seen key holding the exact text (any other tenant or Id).
pub const SEEN_TEXT: u8 = 0;

/// Key of a record Id in a day's seen-tree of format 2 (trees `seen2-<day>`). WARNING: on-disk format.
/// ```text
/// SEEN_GUIDS tenant:16 record_id:16     when both are canonical lowercase GUIDs (33 bytes)
/// SEEN_TEXT  tenant 0x00 record_id      otherwise, the exact text
/// ```
/// Exact, not a hash: only a string that prints back to exactly itself from its 16 bytes takes the
/// binary form, so the encoding is injective and two different (tenant, Id) pairs never share a key.
/// A dedup false positive would silently drop a record, so it must stay that way.
///
/// Compatibility: a version that knows only format 1 ignores `seen2-*` trees, so a downgrade can deliver
/// a duplicate within the window but never loses a record.
pub fn seen_key_v2(tenant_id: &str, record_id: &str) -> Vec<u8> {
    SeenKeys::new(tenant_id).key(record_id)
}

/// [`seen_key_v2`] for many record Ids of one tenant: the tenant's part is worked out once.
pub struct SeenKeys<'t> {
    tenant_id: &'t str,
    tenant_guid: Option<[u8; 16]>,
}

impl<'t> SeenKeys<'t> {
    /// The keys of `tenant_id`'s records.
    pub fn new(tenant_id: &'t str) -> SeenKeys<'t> {
        SeenKeys {
            tenant_id,
            tenant_guid: guid_bytes(tenant_id),
        }
    }

    /// [`seen_key_v2`] of (the tenant, `record_id`).
    pub fn key(&self, record_id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(33);
        self.write_key(&mut k, record_id);
        k
    }

    /// Appends [`seen_key_v2`] of (the tenant, `record_id`) to `out`.
    pub fn write_key(&self, out: &mut Vec<u8>, record_id: &str) {
        match (self.tenant_guid, guid_bytes(record_id)) {
            (Some(t), Some(r)) => {
                out.push(SEEN_GUIDS);
                out.extend_from_slice(&t);
                out.extend_from_slice(&r);
            }
            _ => {
                out.push(SEEN_TEXT);
                out.extend_from_slice(self.tenant_id.as_bytes());
                out.push(0);
                out.extend_from_slice(record_id.as_bytes());
            }
        }
    }
}

/// The record Ids of one blob's records and their seen keys ([`seen_key_v2`]) and key hashes, in record
/// order. Each kind is held in one buffer: no allocation per record.
pub(crate) struct BlobKeys {
    ids: String,
    /// End of each Id in `ids`.
    id_ends: Vec<usize>,
    keys: Vec<u8>,
    /// End of each key in `keys`.
    key_ends: Vec<usize>,
    hashes: Vec<KeyHash>,
}

impl BlobKeys {
    /// The keys of `tenant_id`'s records with Ids `ids`.
    pub(crate) fn new<'a>(
        tenant_id: &str,
        ids: impl ExactSizeIterator<Item = &'a str>,
    ) -> BlobKeys {
        let seen = SeenKeys::new(tenant_id);
        let n = ids.len();
        let mut b = BlobKeys {
            ids: String::with_capacity(n * 36),
            id_ends: Vec::with_capacity(n),
            keys: Vec::with_capacity(n * 33),
            key_ends: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
        };
        for id in ids {
            b.ids.push_str(id);
            b.id_ends.push(b.ids.len());
            let start = b.keys.len();
            seen.write_key(&mut b.keys, id);
            b.key_ends.push(b.keys.len());
            b.hashes.push(KeyHash::of(&b.keys[start..]));
        }
        b
    }

    /// How many records.
    pub(crate) fn len(&self) -> usize {
        self.key_ends.len()
    }

    /// The key of record `i` and its hash.
    pub(crate) fn key(&self, i: usize) -> (&[u8], KeyHash) {
        (&self.keys[span(&self.key_ends, i)], self.hashes[i])
    }

    /// The record Id of record `i`.
    pub(crate) fn id(&self, i: usize) -> &str {
        &self.ids[span(&self.id_ends, i)]
    }

    /// Which records are the first with their key (a later repeat within the blob is its duplicate).
    pub(crate) fn first_of_each(&self) -> Vec<bool> {
        let mut seen = MemKeys::default();
        (0..self.len())
            .map(|i| {
                let (key, h) = self.key(i);
                seen.insert(key, h)
            })
            .collect()
    }
}

/// Where part `i` lies in a buffer whose parts end at `ends`.
fn span(ends: &[usize], i: usize) -> std::ops::Range<usize> {
    let start = if i == 0 { 0 } else { ends[i - 1] };
    start..ends[i]
}

/// Hex digit values; 0xff for anything else (uppercase included: it is another string).
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// The 16 bytes of a canonical lowercase GUID (`8-4-4-4-12` hex digits, lowercase), else `None`.
fn guid_bytes(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    let mut out = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    // Every group has an even length and starts after a dash: digit pairs never straddle one.
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            i += 1;
            continue;
        }
        let (h, l) = (HEX[b[i] as usize], HEX[b[i + 1] as usize]);
        if (h | l) > 15 {
            return None;
        }
        out[n] = h << 4 | l;
        n += 1;
        i += 2;
    }
    Some(out)
}

/// Name of the format-1 seen-tree of day `day` (days since the Unix epoch, UTC).
pub fn seen_tree_name(day: u32) -> String {
    format!("seen-{day:08}")
}

/// Name of the format-2 seen-tree of day `day`.
pub fn seen2_tree_name(day: u32) -> String {
    format!("seen2-{day:08}")
}

/// The day of a format-1 seen-tree name.
pub fn seen_tree_day(name: &[u8]) -> Option<u32> {
    std::str::from_utf8(name)
        .ok()?
        .strip_prefix("seen-")?
        .parse()
        .ok()
}

/// The day of a format-2 seen-tree name.
pub fn seen2_tree_day(name: &[u8]) -> Option<u32> {
    std::str::from_utf8(name)
        .ok()?
        .strip_prefix("seen2-")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_keys_are_compact_for_guids_and_injective() {
        let t = "2b7e1516-28ae-4d2a-a6d2-15883a9b1d01";
        let id = "80c7a0f5-77b1-4f0e-9a43-0c2b2f1e6d3a";
        let k = seen_key_v2(t, id);
        assert_eq!(k.len(), 33);
        assert_eq!(k[0], SEEN_GUIDS);
        // The on-disk encoding: the GUIDs' 16 bytes in text order.
        assert_eq!(
            &k[1..17],
            &0x2b7e1516_28ae_4d2a_a6d2_15883a9b1d01u128.to_be_bytes()
        );
        assert_eq!(
            &k[17..],
            &0x80c7a0f5_77b1_4f0e_9a43_0c2b2f1e6d3au128.to_be_bytes()
        );
        // An uppercase variant is another string: it must not share the key.
        assert_ne!(seen_key_v2(t, &id.to_uppercase()), k);
        assert_eq!(seen_key_v2(t, &id.to_uppercase())[0], SEEN_TEXT);
        // Near-GUIDs fall back to the exact text.
        for bad in [
            "80c7a0f5-77b1-4f0e-9a43-0c2b2f1e6d3",
            "80c7a0f5x77b1-4f0e-9a43-0c2b2f1e6d3a",
            "g0c7a0f5-77b1-4f0e-9a43-0c2b2f1e6d3a",
            "",
        ] {
            assert_eq!(seen_key_v2(t, bad)[0], SEEN_TEXT, "{bad}");
        }
        assert_ne!(seen_key_v2(t, "ab"), seen_key_v2(&format!("{t}\0a"), "b"));
        assert_eq!(
            seen2_tree_day(seen2_tree_name(20_417).as_bytes()),
            Some(20_417)
        );
        assert_eq!(seen_tree_day(seen2_tree_name(20_417).as_bytes()), None);
        assert_eq!(seen2_tree_day(seen_tree_name(20_417).as_bytes()), None);
    }

    fn guid(x: u128, upper: bool) -> String {
        let h = format!("{x:032x}");
        let g = format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        );
        if upper {
            g.to_uppercase()
        } else {
            g
        }
    }

    proptest::proptest! {
        /// A blob's keys are the keys of its Ids one by one, and exactly the first record with each
        /// key counts as first: Ids from a small alphabet repeat, and GUIDs and text mix.
        #[test]
        fn blob_keys_are_each_ids_key_and_find_every_repeat(
            picks in proptest::collection::vec(0usize..6, 0..40),
        ) {
            let t = "2b7e1516-28ae-4d2a-a6d2-15883a9b1d01";
            let pool = [guid(1, false), guid(1, true), guid(2, false), String::new(), "a".into(), "a\0".into()];
            let ids: Vec<&str> = picks.iter().map(|p| pool[*p].as_str()).collect();
            let b = BlobKeys::new(t, ids.iter().copied());
            proptest::prop_assert_eq!(b.len(), ids.len());
            let mut seen = std::collections::HashSet::new();
            let first = b.first_of_each();
            for (i, id) in ids.iter().enumerate() {
                let (key, h) = b.key(i);
                proptest::prop_assert_eq!(key, &seen_key_v2(t, id)[..]);
                proptest::prop_assert_eq!(h.word(), KeyHash::of(key).word());
                proptest::prop_assert_eq!(b.id(i), *id);
                proptest::prop_assert_eq!(first[i], seen.insert(*id));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn distinct_pairs_get_distinct_keys(
            a in proptest::prelude::any::<u128>(),
            b in proptest::prelude::any::<u128>(),
            ua in proptest::prelude::any::<bool>(),
            ub in proptest::prelude::any::<bool>(),
            text in "[0-9a-fA-F-]{34,37}",
        ) {
            let t = "2b7e1516-28ae-4d2a-a6d2-15883a9b1d01";
            let ids = [guid(a, ua), guid(b, ub), guid(a, !ua), text];
            let many = SeenKeys::new(t);
            for x in &ids {
                proptest::prop_assert_eq!(many.key(x), seen_key_v2(t, x));
            }
            let k = seen_key_v2(t, &guid(a, false));
            proptest::prop_assert_eq!(&k[17..], &a.to_be_bytes()[..], "a lowercase GUID packs to its bytes");
            for x in &ids {
                for y in &ids {
                    if x != y {
                        proptest::prop_assert_ne!(seen_key_v2(t, x), seen_key_v2(t, y));
                    }
                }
            }
        }
    }
}

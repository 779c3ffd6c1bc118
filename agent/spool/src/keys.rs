//! Key layout of the spool's main tree. WARNING: these prefixes and encodings are the on-disk format;
//! changing any of them makes existing spools unreadable. Add new prefixes, never reuse one.

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

/// Key of a record Id in a day's seen-tree: tenant id + 0x00 + record Id.
pub fn seen_key(tenant_id: &str, record_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + tenant_id.len() + record_id.len());
    k.extend_from_slice(tenant_id.as_bytes());
    k.push(0);
    k.extend_from_slice(record_id.as_bytes());
    k
}

/// Name of the seen-tree of day `day` (days since the Unix epoch, UTC).
pub fn seen_tree_name(day: u32) -> String {
    format!("seen-{day:08}")
}

/// The day of a seen-tree name.
pub fn seen_tree_day(name: &[u8]) -> Option<u32> {
    std::str::from_utf8(name)
        .ok()?
        .strip_prefix("seen-")?
        .parse()
        .ok()
}

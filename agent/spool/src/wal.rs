//! The segments as the commits' write-ahead log: one durable write per commit.
//!
//! A group of commits (`commit.rs`) is appended to its segment as ONE record: a header, the chunks'
//! frames, then the group's sled batch written out as operations ([`Ops`]). The segment's `fdatasync`
//! makes the group durable; the batch is then applied to sled, which is synced only every
//! [`SLED_SYNC_EVERY`] groups (and at every other durability point of the spool). After a crash,
//! [`replay`] applies again, in order, every intact record sled had not yet made durable.
//!
//! Invariants:
//! - Each group's batch carries the WAL marker (`'M' wal` → seq, segment, offset of its record), in
//!   the same atomic batch: sled's durable marker names the newest group whose batch is durable, and
//!   sled recovers a prefix of its batches, so replay starts right after that record.
//! - Records carry consecutive sequence numbers; replay applies exactly the next one each time and
//!   stops at the first record that is torn, fails a CRC or is not the next, so it applies a prefix of
//!   the groups written, never a group after a hole.
//! - A record also carries the state it was written against ([`base_of`]: sled's figures and next chunk
//!   number); replay applies it only onto that same state, so a record is never applied after sled moved
//!   on without it (an older version of the agent, which does not replay, opened the spool after a crash
//!   and committed, acknowledged or cut batches: its collectors fetched the lost blobs again).
//! - A group whose append failed was never applied; its record may still be whole on disk (a failed
//!   `fdatasync` says nothing about what reached the disk), so the marker is moved past it, durably,
//!   before the next group ([`wal_start`]); if that fails too, the spool refuses every further commit
//!   until it is opened again (and replay then applies the group: its records are spooled, none lost).
//! - Every open makes the marker point at the start of the next new segment, so a torn tail of a
//!   crashed run is never read again, and a segment with records not yet durable in sled is never
//!   deleted (the segment GC syncs sled first).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{io_err, keys, segments, SpoolError};

/// sled is made durable at least once every this many groups (every other durability point of the spool
/// makes it durable too). Few unsynced sled writes at a time are what keep what sled synced safe across a
/// power loss (`tests/sled_crash_prefix.rs`: up to 8 flushes unsynced never broke a synced batch).
pub(crate) const SLED_SYNC_EVERY: u32 = 4;

/// A record's header: magic, seq, frames' length, the record's length, CRC of the frames, CRC of the
/// operations, the base it was written against ([`base_of`]), CRC of the header's first 36 bytes.
pub(crate) const HEADER_LEN: u64 = 40;
const MAGIC: &[u8; 4] = b"SWAL";

/// The WAL marker's key in the main tree.
pub(crate) fn marker_key() -> Vec<u8> {
    keys::meta_key(keys::meta::WAL)
}

/// Where a record starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalPos {
    /// The record's sequence number.
    pub seq: u64,
    /// Its segment.
    pub segment: u64,
    /// Its header's first byte (`u64::MAX`: after everything in the segment).
    pub offset: u64,
}

impl WalPos {
    /// The marker's value.
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&self.seq.to_be_bytes());
        v[8..16].copy_from_slice(&self.segment.to_be_bytes());
        v[16..].copy_from_slice(&self.offset.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<WalPos, SpoolError> {
        let v: [u8; 24] = v.try_into().map_err(|_| {
            SpoolError::Corrupt(format!("the WAL marker: {} bytes, not 24", v.len()))
        })?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&v[i..i + 8]);
            u64::from_be_bytes(w)
        };
        Ok(WalPos {
            seq: word(0),
            segment: word(8),
            offset: word(16),
        })
    }
}

/// The state of sled a group is written against: a CRC of its figures and next chunk number, which
/// every commit, acknowledgement, cut and quarantine changes.
pub(crate) fn base_of(main: &sled::Tree) -> Result<u32, SpoolError> {
    let mut h = crc32fast::Hasher::new();
    for name in [keys::meta::FIGURES, keys::meta::NEXT_CHUNK] {
        let v = main.get(keys::meta_key(name))?;
        let v = v.as_deref().unwrap_or_default();
        h.update(&(v.len() as u32).to_be_bytes());
        h.update(v);
    }
    Ok(h.finalize())
}

/// What a record's header says besides the magic and its own CRC.
pub(crate) struct Header {
    pub seq: u64,
    pub frames_len: u64,
    pub ops_len: u32,
    pub frames_crc: u32,
    pub ops_crc: u32,
    pub base: u32,
}

/// A record's header, as written.
pub(crate) fn header(h: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.frames_len.to_be_bytes());
    out.extend_from_slice(&h.ops_len.to_be_bytes());
    out.extend_from_slice(&h.frames_crc.to_be_bytes());
    out.extend_from_slice(&h.ops_crc.to_be_bytes());
    out.extend_from_slice(&h.base.to_be_bytes());
    let h = &mut out;
    let own = crc32fast::hash(h);
    h.extend_from_slice(&own.to_be_bytes());
    out
}

fn parse_header(h: &[u8; HEADER_LEN as usize]) -> Option<Header> {
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    if &h[..4] != MAGIC || crc32fast::hash(&h[..36]) != u32_at(36) {
        return None;
    }
    Some(Header {
        seq: u64_at(4),
        frames_len: u64_at(12),
        ops_len: u32_at(20),
        frames_crc: u32_at(24),
        ops_crc: u32_at(28),
        base: u32_at(32),
    })
}

/// A sled batch that is also written out, so that the WAL can apply it again.
#[derive(Default)]
pub(crate) struct Ops {
    batch: sled::Batch,
    bytes: Vec<u8>,
}

const INSERT: u8 = 1;
const REMOVE: u8 = 2;

impl Ops {
    /// Inserts `v` at `k`.
    pub(crate) fn insert(&mut self, k: &[u8], v: &[u8]) {
        self.bytes.push(INSERT);
        put(&mut self.bytes, k);
        put(&mut self.bytes, v);
        self.batch.insert(k, v);
    }

    /// Removes `k` (the commit path only inserts; replay reads removals too).
    #[cfg(test)]
    pub(crate) fn remove(&mut self, k: &[u8]) {
        self.bytes.push(REMOVE);
        put(&mut self.bytes, k);
        self.batch.remove(k);
    }

    /// The batch to apply, and the bytes that stand for it in the record.
    pub(crate) fn into_parts(self) -> (sled::Batch, Vec<u8>) {
        (self.batch, self.bytes)
    }
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The batch a record's operations stand for.
fn decode_ops(mut b: &[u8]) -> Option<sled::Batch> {
    fn take<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let v = b.get(4..4 + len)?;
        *b = &b[4 + len..];
        Some(v)
    }
    let mut batch = sled::Batch::default();
    while let Some((&tag, rest)) = b.split_first() {
        b = rest;
        let k = take(&mut b)?;
        match tag {
            INSERT => batch.insert(k, take(&mut b)?),
            REMOVE => batch.remove(k),
            _ => return None,
        }
    }
    Some(batch)
}

/// What [`replay`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Replayed {
    /// Groups applied again.
    pub groups: u64,
    /// The sequence number of the newest group applied (by replay or before the crash).
    pub last_seq: u64,
}

/// Applies, in order, every intact record after the one sled's durable marker names (module header).
/// Without a marker (a new spool, or one written before the WAL, whose commits synced sled each time)
/// there is nothing to replay. The caller makes sled durable afterwards.
pub(crate) fn replay(main: &sled::Tree, segments_dir: &Path) -> Result<Replayed, SpoolError> {
    let Some(v) = main.get(marker_key())? else {
        return Ok(Replayed::default());
    };
    let start = WalPos::decode(&v)?;
    let mut done = Replayed {
        groups: 0,
        last_seq: start.seq,
    };
    let mut numbers: Vec<u64> = match std::fs::read_dir(segments_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| segments::parse_name(&e.file_name().to_string_lossy()))
            .filter(|n| *n >= start.segment)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(segments_dir)(e)),
    };
    numbers.sort_unstable();
    for n in numbers {
        let path = segments::segment_path(segments_dir, n);
        let file = File::open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        let mut offset = if n == start.segment { start.offset } else { 0 };
        while offset < len {
            let stop = |why: &str| {
                log::warn!(target: "spool", "{}: replay stops at byte {offset}: {why}", path.display());
            };
            let mut h = [0u8; HEADER_LEN as usize];
            if offset + HEADER_LEN > len || file.read_exact_at(&mut h, offset).is_err() {
                stop("a torn header");
                return Ok(done);
            }
            let Some(h) = parse_header(&h) else {
                stop("not a whole record header");
                return Ok(done);
            };
            // Lengths that overrun the file (a header that passed its CRC by chance) stop replay.
            let end = HEADER_LEN
                .checked_add(h.frames_len)
                .and_then(|t| t.checked_add(u64::from(h.ops_len)))
                .and_then(|t| t.checked_add(offset))
                .filter(|end| *end <= len);
            if h.seq <= done.last_seq && n == start.segment && offset == start.offset {
                // The record the marker names: already durable in sled.
                match end {
                    Some(end) => offset = end,
                    None => break,
                }
                continue;
            }
            if h.seq != done.last_seq + 1 {
                stop(&format!(
                    "record {} where {} was due",
                    h.seq,
                    done.last_seq + 1
                ));
                return Ok(done);
            }
            let Some(end) = end else {
                stop("a torn record");
                return Ok(done);
            };
            let mut frames = vec![0u8; h.frames_len as usize];
            file.read_exact_at(&mut frames, offset + HEADER_LEN)
                .map_err(io_err(&path))?;
            let mut ops = vec![0u8; h.ops_len as usize];
            file.read_exact_at(&mut ops, offset + HEADER_LEN + h.frames_len)
                .map_err(io_err(&path))?;
            if crc32fast::hash(&frames) != h.frames_crc || crc32fast::hash(&ops) != h.ops_crc {
                stop("a record failing its CRC");
                return Ok(done);
            }
            if base_of(main)? != h.base {
                stop("the spool moved on without this record (another version opened it since?)");
                return Ok(done);
            }
            let Some(batch) = decode_ops(&ops) else {
                stop("operations that do not decode");
                return Ok(done);
            };
            main.apply_batch(batch)?;
            log::info!(target: "spool", "{}: group {} replayed", path.display(), h.seq);
            done.groups += 1;
            done.last_seq = h.seq;
            offset = end;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_decode_to_the_batch_they_were_written_from() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let t = db.open_tree("t").expect("tree");
        t.insert(b"gone", b"x").expect("seed");
        let mut ops = Ops::default();
        ops.insert(b"a", b"1");
        ops.insert(b"", &[0u8; 5000]);
        ops.remove(b"gone");
        let (_, bytes) = ops.into_parts();
        t.apply_batch(decode_ops(&bytes).expect("decodes"))
            .expect("apply");
        assert_eq!(t.get(b"a").expect("get").as_deref(), Some(&b"1"[..]));
        assert_eq!(t.get(b"").expect("get").map(|v| v.len()), Some(5000));
        assert!(t.get(b"gone").expect("get").is_none());
        for cut in 1..bytes.len() {
            let short = &bytes[..cut];
            // A cut inside an operation never decodes to a batch that claims to be whole.
            if decode_ops(short).is_some() {
                assert!(
                    cut == 1 + 4 + 1 + 4 + 1 || cut == 1 + 4 + 1 + 4 + 1 + 1 + 4 + 4 + 5000,
                    "cut at {cut} decoded"
                );
            }
        }
        assert!(decode_ops(&[9, 0, 0, 0, 0]).is_none(), "an unknown tag");
    }

    /// A header whose CRC holds but whose lengths overrun the file (or u64) stops replay: no panic, no
    /// allocation of its claimed size.
    #[test]
    fn lengths_past_the_file_stop_replay() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let main = db.open_tree("main").expect("tree");
        let marker = WalPos {
            seq: 0,
            segment: 0,
            offset: 0,
        };
        main.insert(marker_key(), &marker.encode()[..])
            .expect("marker");
        let dir = tempfile::tempdir().expect("dir");
        for frames_len in [u64::MAX - 8, 1 << 40] {
            let h = header(&Header {
                seq: 1,
                frames_len,
                ops_len: 0,
                frames_crc: 0,
                ops_crc: crc32fast::hash(b""),
                base: base_of(&main).expect("base"),
            });
            std::fs::write(segments::segment_path(dir.path(), 0), &h).expect("segment");
            let done = replay(&main, dir.path()).expect("replay");
            assert_eq!(done, Replayed::default(), "{frames_len}");
        }
    }

    #[test]
    fn a_header_with_a_flipped_bit_is_refused() {
        let h = header(&Header {
            seq: 7,
            frames_len: 100,
            ops_len: 3,
            frames_crc: 1,
            ops_crc: 2,
            base: 3,
        });
        let mut arr = [0u8; HEADER_LEN as usize];
        arr.copy_from_slice(&h);
        let parsed = parse_header(&arr).expect("whole");
        assert_eq!((parsed.seq, parsed.frames_len, parsed.ops_len), (7, 100, 3));
        for bit in 0..HEADER_LEN as usize * 8 {
            let mut bad = arr;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_header(&bad).is_none(), "bit {bit}");
        }
    }
}

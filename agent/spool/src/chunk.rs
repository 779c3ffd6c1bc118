//! Chunk encoding: a run of envelope lines, zstd-compressed, behind a fixed header.
//!
//! Layout (WARNING: on-disk format): `b'c'`, version, record count (u32 BE), uncompressed length
//! (u32 BE), append time in Unix milliseconds (u64 BE), then
//! - version 1 (spools written before segments): the zstd frame of the lines, inline in the sled value;
//! - version 2: where the frame lives in a segment file (`segments.rs`): segment (u64 BE), offset
//!   (u64 BE), length (u32 BE), CRC-32 of the frame (u32 BE).
//!
//! Both are read; new chunks are written as version 2.

use crate::segments::Loc;
use crate::SpoolError;

const MAGIC: u8 = b'c';
const VERSION_INLINE: u8 = 1;
const VERSION_IN_SEGMENT: u8 = 2;
const HEADER: usize = 18;
const REF_LEN: usize = HEADER + 24;
/// Largest uncompressed chunk: one frame, read and decompressed whole when a batch covers it in part.
pub const MAX_RAW: usize = 256 * 1024;
/// Most records per chunk.
pub const MAX_RECORDS: usize = 512;

/// A decoded chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Records in the chunk.
    pub records: u32,
    /// Uncompressed bytes.
    pub raw_len: u32,
    /// When it was appended (Unix ms).
    pub appended_ms: u64,
}

/// The zstd level of chunks (and of the parts of chunks a batch sends compressed again). Level 1
/// compresses audit NDJSON about twice as fast as level 3 and no worse (docs/BENCHMARKS.md: ratio 8.28
/// against 7.50 on the simulator's records; the issue's own baselines measured 6.5 against 6.3).
pub const LEVEL: i32 = 1;

/// One zstd frame of `lines`, at [`LEVEL`].
pub fn compress(lines: &[u8]) -> Result<Vec<u8>, SpoolError> {
    zstd::bulk::compress(lines, LEVEL).map_err(SpoolError::Codec)
}

/// Encodes a version-1 chunk: `lines` (each ending in `\n`, `records` of them) with the frame inline.
/// Only tests write these now (the format of spools from before segments, which are still read).
#[cfg(test)]
pub fn encode_inline(lines: &[u8], records: u32, appended_ms: u64) -> Result<Vec<u8>, SpoolError> {
    let body = compress(lines)?;
    let mut v = put_header(VERSION_INLINE, records, lines.len() as u32, appended_ms);
    v.extend_from_slice(&body);
    Ok(v)
}

/// Encodes a version-2 chunk: the header and where its frame lives.
pub fn encode_ref(h: &ChunkHeader, loc: Loc) -> Vec<u8> {
    let mut v = put_header(VERSION_IN_SEGMENT, h.records, h.raw_len, h.appended_ms);
    v.extend_from_slice(&loc.segment.to_be_bytes());
    v.extend_from_slice(&loc.offset.to_be_bytes());
    v.extend_from_slice(&loc.len.to_be_bytes());
    v.extend_from_slice(&loc.crc.to_be_bytes());
    v
}

fn put_header(version: u8, records: u32, raw_len: u32, appended_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(REF_LEN);
    v.push(MAGIC);
    v.push(version);
    v.extend_from_slice(&records.to_be_bytes());
    v.extend_from_slice(&raw_len.to_be_bytes());
    v.extend_from_slice(&appended_ms.to_be_bytes());
    v
}

/// Reads the header of an encoded chunk (either version).
pub fn header(value: &[u8]) -> Result<ChunkHeader, SpoolError> {
    if value.len() < HEADER
        || value[0] != MAGIC
        || !(value[1] == VERSION_INLINE || value[1] == VERSION_IN_SEGMENT && value.len() == REF_LEN)
    {
        return Err(SpoolError::Corrupt("chunk header".into()));
    }
    Ok(ChunkHeader {
        records: u32_at(value, 2),
        raw_len: u32_at(value, 6),
        appended_ms: u64_at(value, 10),
    })
}

fn u32_at(v: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]])
}

fn u64_at(v: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[i..i + 8]);
    u64::from_be_bytes(b)
}

/// Where a chunk's zstd frame is.
pub enum Body<'a> {
    /// Inline in the sled value (version 1).
    Inline(&'a [u8]),
    /// In a segment file (version 2).
    InSegment(Loc),
}

/// The header of an encoded chunk and where its frame is.
pub fn body(value: &[u8]) -> Result<(ChunkHeader, Body<'_>), SpoolError> {
    let h = header(value)?;
    let body = if value[1] == VERSION_INLINE {
        Body::Inline(&value[HEADER..])
    } else {
        Body::InSegment(Loc {
            segment: u64_at(value, HEADER),
            offset: u64_at(value, HEADER + 8),
            len: u32_at(value, HEADER + 16),
            crc: u32_at(value, HEADER + 20),
        })
    };
    Ok((h, body))
}

/// The segment holding an encoded chunk's frame; `None` for a version-1 chunk (frame inline).
pub fn segment_of(value: &[u8]) -> Result<Option<u64>, SpoolError> {
    Ok(match body(value)?.1 {
        Body::InSegment(loc) => Some(loc.segment),
        Body::Inline(_) => None,
    })
}

/// The bytes the chunk's frame occupies (inline or in its segment).
pub fn stored_len(value: &[u8]) -> Result<u64, SpoolError> {
    Ok(match body(value)?.1 {
        Body::Inline(frame) => frame.len() as u64,
        Body::InSegment(loc) => u64::from(loc.len),
    })
}

/// Decompresses a chunk's frame into its lines, checking the length its header gives.
pub fn decompress(h: &ChunkHeader, frame: &[u8]) -> Result<Vec<u8>, SpoolError> {
    let lines = zstd::bulk::decompress(frame, h.raw_len as usize).map_err(SpoolError::Codec)?;
    if lines.len() != h.raw_len as usize {
        return Err(SpoolError::Corrupt("chunk length".into()));
    }
    Ok(lines)
}

/// Splits decoded lines into records (each slice includes its `\n`).
pub fn records(lines: &[u8]) -> impl Iterator<Item = &[u8]> {
    lines.split_inclusive(|&b| b == b'\n')
}

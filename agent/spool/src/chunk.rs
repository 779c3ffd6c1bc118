//! Chunk encoding: a run of envelope lines, zstd-compressed, behind a fixed header.
//!
//! Layout (WARNING: on-disk format): `b'c'`, version `1`, record count (u32 BE), uncompressed length
//! (u32 BE), append time in Unix milliseconds (u64 BE), then the zstd frame of the lines.

use crate::SpoolError;

const MAGIC: u8 = b'c';
const VERSION: u8 = 1;
const HEADER: usize = 18;
/// Largest uncompressed chunk. Keeps each sled value well below its segment size.
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

/// Encodes `lines` (each ending in `\n`, `records` of them).
pub fn encode(lines: &[u8], records: u32, appended_ms: u64) -> Result<Vec<u8>, SpoolError> {
    let body = compress(lines)?;
    let mut v = Vec::with_capacity(HEADER + body.len());
    v.push(MAGIC);
    v.push(VERSION);
    v.extend_from_slice(&records.to_be_bytes());
    v.extend_from_slice(&(lines.len() as u32).to_be_bytes());
    v.extend_from_slice(&appended_ms.to_be_bytes());
    v.extend_from_slice(&body);
    Ok(v)
}

/// Reads the header of an encoded chunk.
pub fn header(value: &[u8]) -> Result<ChunkHeader, SpoolError> {
    if value.len() < HEADER || value[0] != MAGIC || value[1] != VERSION {
        return Err(SpoolError::Corrupt("chunk header".into()));
    }
    let u32_at =
        |i: usize| u32::from_be_bytes([value[i], value[i + 1], value[i + 2], value[i + 3]]);
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&value[10..18]);
    Ok(ChunkHeader {
        records: u32_at(2),
        raw_len: u32_at(6),
        appended_ms: u64::from_be_bytes(ms),
    })
}

/// The zstd frame of an encoded chunk (whose header [`header`] accepted).
pub fn frame(value: &[u8]) -> &[u8] {
    value.get(HEADER..).unwrap_or_default()
}

/// Decodes an encoded chunk into its lines.
pub fn decode(value: &[u8]) -> Result<(ChunkHeader, Vec<u8>), SpoolError> {
    let h = header(value)?;
    let lines =
        zstd::bulk::decompress(frame(value), h.raw_len as usize).map_err(SpoolError::Codec)?;
    if lines.len() != h.raw_len as usize {
        return Err(SpoolError::Corrupt("chunk length".into()));
    }
    Ok((h, lines))
}

/// Splits decoded lines into records (each slice includes its `\n`).
pub fn records(lines: &[u8]) -> impl Iterator<Item = &[u8]> {
    lines.split_inclusive(|&b| b == b'\n')
}

//! Runs: immutable, sorted files of dedup keys, the on-disk store of the record-Id dedup window
//! (format 3, `<spool>/dedup/<day>-<seq>.run`). A run holds the keys of one UTC day; a day expires by
//! deleting its files.
//!
//! Layout (WARNING: on-disk format), all integers little-endian:
//! ```text
//! data    the keys in ascending byte order, each as LEB128 length + bytes, no duplicates
//! index   the first key of every BLOCK keys: LEB128 length + bytes + u64 offset into data
//! bloom   u64 words: a blocked Bloom filter (512-bit blocks, HASHES probes in one block)
//! trailer u64 keys, u64 data length, u64 index length, u64 bloom words, 8 bytes MAGIC
//! ```
//! Invariants: a run is written to `<name>.tmp`, synced, and renamed into place, so a run that exists is
//! complete; it is never modified afterwards. A lookup is exact: the Bloom filter only skips runs that
//! cannot hold the key, and a "yes" comes from the key's bytes found in the data (a false positive here
//! would silently drop a record). Memory per run: its index (one key per BLOCK) and its filter
//! (BITS_PER_KEY bits per key); the keys themselves stay on disk.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{io_err, SpoolError};

const MAGIC: &[u8; 8] = b"M365DD3\n";
const TRAILER: u64 = 40;
/// Keys per index entry: a lookup that passes the filter reads one block (~4 KiB for GUID keys).
const BLOCK: usize = 128;
const BITS_PER_KEY: u64 = 10;
const HASHES: u64 = 7;
/// Words of one filter block (512 bits: one cache line).
const BLOOM_BLOCK_WORDS: usize = 8;

/// The file name of run `seq` of `day`.
fn file_name(day: u32, seq: u64) -> String {
    format!("{day}-{seq}.run")
}

/// `(day, seq)` of a run's file name.
pub(crate) fn parse_name(name: &str) -> Option<(u32, u64)> {
    let (day, seq) = name.strip_suffix(".run")?.split_once('-')?;
    Some((day.parse().ok()?, seq.parse().ok()?))
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a LEB128 integer at `*pos` of `buf`, advancing `pos`; `None` when truncated or too long.
fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
    }
    None
}

/// Reads one length-prefixed key at `*pos`, advancing `pos`.
fn get_key<'b>(buf: &'b [u8], pos: &mut usize) -> Option<&'b [u8]> {
    let len = usize::try_from(get_varint(buf, pos)?).ok()?;
    let key = buf.get(*pos..pos.checked_add(len)?)?;
    *pos += len;
    Some(key)
}

/// Appends `key` length-prefixed to `out`.
pub(crate) fn put_key(out: &mut Vec<u8>, key: &[u8]) {
    put_varint(out, key.len() as u64);
    out.extend_from_slice(key);
}

/// The length-prefixed keys of `buf` (a run's data block or a dedup log value); `None` if malformed.
pub(crate) fn keys_of(buf: &[u8]) -> Option<Vec<&[u8]>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        out.push(get_key(buf, &mut pos)?);
    }
    Some(out)
}

/// The filter hash of a key: computed once per lookup, used for every run. FNV-1a, then a mixer:
/// stable across Rust versions (the filter is stored).
#[derive(Clone, Copy)]
pub(crate) struct KeyHash(u64, u64);

impl KeyHash {
    /// The hash of `key`.
    pub(crate) fn of(key: &[u8]) -> KeyHash {
        let (a, b) = hash(key);
        KeyHash(a, b)
    }

    /// One word of it, for a hash table in memory.
    pub(crate) fn word(self) -> u64 {
        self.0
    }
}

fn hash(key: &[u8]) -> (u64, u64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31), h | 1)
}

/// A blocked Bloom filter: every probe of a key falls in one 512-bit block.
struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn with_keys(n: usize) -> Bloom {
        let bits = (n as u64 * BITS_PER_KEY).max(512);
        let blocks = bits.div_ceil(512) as usize;
        Bloom {
            words: vec![0; blocks * BLOOM_BLOCK_WORDS],
        }
    }

    /// The (word, bit mask) of each of a key's probes: all in one 512-bit block.
    fn probes(&self, h: KeyHash) -> impl Iterator<Item = (usize, u64)> {
        let KeyHash(h1, h2) = h;
        let blocks = (self.words.len() / BLOOM_BLOCK_WORDS).max(1) as u64;
        let base = (h1 % blocks) as usize * BLOOM_BLOCK_WORDS;
        (0..HASHES).map(move |i| {
            let bit = (h2.wrapping_add(i.wrapping_mul(h1 >> 32 | 1))) % 512;
            (base + (bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn insert(&mut self, key: &[u8]) {
        let mut probes = [(0usize, 0u64); HASHES as usize];
        for (slot, p) in probes.iter_mut().zip(self.probes(KeyHash::of(key))) {
            *slot = p;
        }
        for (w, m) in probes {
            self.words[w] |= m;
        }
    }

    fn may_contain(&self, h: KeyHash) -> bool {
        self.probes(h)
            .all(|(w, m)| self.words.get(w).is_some_and(|x| x & m != 0))
    }
}

/// One run, open for lookups.
pub(crate) struct Run {
    /// The UTC day (days since the epoch) whose keys it holds.
    pub day: u32,
    /// Its sequence number (newer runs have larger ones).
    pub seq: u64,
    /// Keys it holds.
    pub keys: u64,
    path: PathBuf,
    file: File,
    data_len: u64,
    /// First key of every BLOCK keys, with its offset in the data.
    index: Vec<(Box<[u8]>, u64)>,
    bloom: Bloom,
}

impl Run {
    /// Writes the sorted, distinct `keys` of `day` as run `seq` in `dir` (durably: see the module
    /// header) and opens it.
    pub(crate) fn write(dir: &Path, day: u32, seq: u64, keys: &[&[u8]]) -> Result<Run, SpoolError> {
        let mut it = keys.iter();
        Run::write_from(dir, day, seq, keys.len(), |buf| {
            Ok(it.next().map(|k| buf.extend_from_slice(k)).is_some())
        })
    }

    /// [`Run::write`] of the keys `next` puts into its (cleared) buffer one at a time, returning false
    /// after the last; `n_hint` (about how many) sizes the filter. Keys out of order are an error.
    fn write_from(
        dir: &Path,
        day: u32,
        seq: u64,
        n_hint: usize,
        mut next: impl FnMut(&mut Vec<u8>) -> Result<bool, SpoolError>,
    ) -> Result<Run, SpoolError> {
        let path = dir.join(file_name(day, seq));
        let tmp = path.with_extension("run.tmp");
        let mut bloom = Bloom::with_keys(n_hint);
        let mut index = Vec::with_capacity(n_hint / BLOCK + 1);
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = BufWriter::with_capacity(1 << 16, file);
        let mut entry = Vec::with_capacity(64);
        let (mut off, mut count) = (0u64, 0u64);
        let (mut key, mut prev) = (Vec::new(), Vec::new());
        loop {
            key.clear();
            if !next(&mut key)? {
                break;
            }
            if count > 0 && prev >= key {
                let _ = std::fs::remove_file(&tmp);
                return Err(SpoolError::Corrupt(format!(
                    "{}: dedup keys not in ascending order",
                    tmp.display()
                )));
            }
            if count.is_multiple_of(BLOCK as u64) {
                index.push((Box::<[u8]>::from(key.as_slice()), off));
            }
            bloom.insert(&key);
            entry.clear();
            put_key(&mut entry, &key);
            w.write_all(&entry).map_err(io_err(&tmp))?;
            off += entry.len() as u64;
            count += 1;
            std::mem::swap(&mut key, &mut prev);
        }
        let mut tail = Vec::new();
        for (k, o) in &index {
            put_key(&mut tail, k);
            tail.extend_from_slice(&o.to_le_bytes());
        }
        let index_len = tail.len() as u64;
        for word in &bloom.words {
            tail.extend_from_slice(&word.to_le_bytes());
        }
        for v in [count, off, index_len, bloom.words.len() as u64] {
            tail.extend_from_slice(&v.to_le_bytes());
        }
        tail.extend_from_slice(MAGIC);
        w.write_all(&tail).map_err(io_err(&tmp))?;
        let file = w.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        crate::gen::sync_dir(dir)?;
        // Reading it back checks what was written, as every later open will.
        Run::open(dir, day, seq)
    }

    /// Opens run `seq` of `day` in `dir`: reads its trailer, index and filter. A file that is not a
    /// complete run is an error naming it.
    pub(crate) fn open(dir: &Path, day: u32, seq: u64) -> Result<Run, SpoolError> {
        let path = dir.join(file_name(day, seq));
        let bad = |what: &str| SpoolError::Corrupt(format!("dedup run {}: {what}", path.display()));
        let file = File::open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len < TRAILER {
            return Err(bad("shorter than its trailer"));
        }
        let mut t = [0u8; TRAILER as usize];
        file.read_exact_at(&mut t, len - TRAILER)
            .map_err(io_err(&path))?;
        if &t[32..40] != MAGIC {
            return Err(bad("no run trailer (wrong magic)"));
        }
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&t[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (count, data_len, index_len, words) = (field(0), field(1), field(2), field(3));
        let expected = words.checked_mul(8).and_then(|b| {
            b.checked_add(data_len)?
                .checked_add(index_len)?
                .checked_add(TRAILER)
        });
        if expected != Some(len) || words == 0 || words % BLOOM_BLOCK_WORDS as u64 != 0 {
            return Err(bad("its trailer does not match its length"));
        }
        let mut tail = vec![0u8; (index_len + words * 8) as usize];
        file.read_exact_at(&mut tail, data_len)
            .map_err(io_err(&path))?;
        let (idx, bl) = tail.split_at(index_len as usize);
        let mut index = Vec::new();
        let mut pos = 0;
        while pos < idx.len() {
            let k = get_key(idx, &mut pos).ok_or_else(|| bad("malformed index"))?;
            let o = idx
                .get(pos..pos + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| bad("malformed index"))?;
            pos += 8;
            if o >= data_len
                || index
                    .last()
                    .is_some_and(|(p, q): &(Box<[u8]>, u64)| **p >= *k || *q >= o)
            {
                return Err(bad("index out of order"));
            }
            index.push((Box::<[u8]>::from(k), o));
        }
        if index.len() as u64 != count.div_ceil(BLOCK as u64)
            || index.first().is_some_and(|(_, o)| *o != 0)
        {
            return Err(bad("index does not cover the data"));
        }
        let bloom = Bloom {
            words: bl
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        };
        Ok(Run {
            day,
            seq,
            keys: count,
            path,
            file,
            data_len,
            index,
            bloom,
        })
    }

    /// Whether the run holds `key`, whose hash is `h` (exact: see the module header).
    pub(crate) fn contains(&self, key: &[u8], h: KeyHash) -> Result<bool, SpoolError> {
        if !self.bloom.may_contain(h) {
            return Ok(false);
        }
        let i = self.index.partition_point(|(k, _)| **k <= *key);
        if i == 0 {
            return Ok(false);
        }
        let start = self.index[i - 1].1;
        let end = self.index.get(i).map_or(self.data_len, |e| e.1);
        let mut buf = vec![0u8; (end - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(io_err(&self.path))?;
        let mut pos = 0;
        while pos < buf.len() {
            let k = get_key(&buf, &mut pos).ok_or_else(|| {
                SpoolError::Corrupt(format!(
                    "dedup run {}: malformed block",
                    self.path.display()
                ))
            })?;
            match k.cmp(key) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Ok(true),
                std::cmp::Ordering::Greater => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Its keys in order, read sequentially (for merging).
    pub(crate) fn iter(&self) -> Result<RunKeys, SpoolError> {
        let f = File::open(&self.path).map_err(io_err(&self.path))?;
        Ok(RunKeys {
            path: self.path.clone(),
            r: BufReader::with_capacity(1 << 16, f.take(self.data_len)),
            left: self.keys,
        })
    }

    /// Deletes its file. Lookups through this `Run` still work (they read its open file).
    pub(crate) fn remove(&self) -> Result<(), SpoolError> {
        std::fs::remove_file(&self.path).map_err(io_err(&self.path))
    }

    /// Bytes it keeps in memory (index and filter).
    pub(crate) fn memory(&self) -> usize {
        self.bloom.words.len() * 8 + self.index.iter().map(|(k, _)| k.len() + 24).sum::<usize>()
    }
}

/// The keys of a run, in order.
pub(crate) struct RunKeys {
    path: PathBuf,
    r: BufReader<std::io::Take<File>>,
    left: u64,
}

impl RunKeys {
    /// The next key, `None` after the last.
    pub(crate) fn next_key(&mut self) -> Result<Option<Vec<u8>>, SpoolError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut len = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8; 1];
            self.r.read_exact(&mut b).map_err(io_err(&self.path))?;
            len |= u64::from(b[0] & 0x7f) << shift;
            if b[0] < 0x80 {
                break;
            }
        }
        let mut k = vec![0u8; len as usize];
        self.r.read_exact(&mut k).map_err(io_err(&self.path))?;
        Ok(Some(k))
    }
}

/// Merges `runs` (of one day) into run `seq` in `dir`, streaming, and opens it; the caller deletes
/// them afterwards (a crash in between leaves keys in two runs, which is harmless).
pub(crate) fn merge(dir: &Path, day: u32, seq: u64, runs: &[&Run]) -> Result<Run, SpoolError> {
    let n_hint = runs.iter().map(|r| r.keys as usize).sum();
    let mut iters = runs
        .iter()
        .map(|r| r.iter())
        .collect::<Result<Vec<_>, _>>()?;
    let mut heads = iters
        .iter_mut()
        .map(RunKeys::next_key)
        .collect::<Result<Vec<_>, _>>()?;
    Run::write_from(dir, day, seq, n_hint, |buf| {
        let Some(min) = heads.iter().flatten().min().cloned() else {
            return Ok(false);
        };
        for (h, it) in heads.iter_mut().zip(iters.iter_mut()) {
            if h.as_ref() == Some(&min) {
                *h = it.next_key()?;
            }
        }
        buf.extend_from_slice(&min);
        Ok(true)
    })
}

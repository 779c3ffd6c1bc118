//! The durable spool: a FIFO of audit records between the collectors and the relay, on sled.
//!
//! # Durability contract
//! - [`Spool::commit_blob`] appends a blob's new records (chunks of envelope lines, zstd frames) to a
//!   segment file as ONE write-ahead record, together with the sled batch that references them: a
//!   reference to each chunk, the blob's done-mark, the record Ids it adds to the dedup window, the
//!   collector's cursor and the WAL marker (`wal.rs`); it `fdatasync`s the segment, then applies the batch
//!   to sled. It returns only after the `fdatasync`. A caller may treat the blob as done, and its cursor
//!   as advanced, only after `commit_blob` returned `Ok`. sled itself is made durable (`Db::flush()` and a
//!   real `fdatasync` of its data file: `flush()` alone only issues `sync_file_range`, see
//!   `shared/design/crate-notes.md`) at least every `wal::SLED_SYNC_EVERY` (4) commits and at every other
//!   durability point; a crash in between is repaired at the next open, which applies the records sled
//!   lost again, in order (a prefix of them: it stops at the first torn or damaged one). Concurrent
//!   commits share one record (one append, one `fdatasync`, one batch, `commit.rs`); each still returns
//!   only once its own group is durable.
//! - [`Spool::cut_batch`] persists a batch descriptor (its sequence number, which is its Idempotency-Key,
//!   and the exact record range it covers) and the next batch number, made durable the same way, before it
//!   returns: a batch is sent only after that. The records of a batch are never changed or deleted while
//!   the batch exists, so every retry of a key carries the same records in the same order, also after a
//!   crash or a power cut. Batch numbers never decrease and are never reused.
//! - A segment file is deleted only after the removal of every chunk in it is durable (see
//!   `remove_unreferenced_segments`).
//! - Every sled write other than a commit's (which its WAL record covers) is made durable before the
//!   spool's lock is let go, acknowledgements included (`Gen::make_durable`, which also syncs sled's blob
//!   files), except the dedup window's deletion of log entries, which rides with the next sync: sled may
//!   overwrite a log segment whose pages it has only flushed elsewhere, so unsynced writes piling up
//!   could break what a sync made durable (hence a sync every few commits too). And
//!   no sled value exceeds a few KiB (dedup log entries and quarantine items are cut into parts), so
//!   sled never writes a blob file, which it would neither sync nor miss at recovery
//!   (`tests/sled_crash_prefix.rs`).
//! - Records are deleted only by [`Spool::ack_batch`] (the backend stored them) or moved to quarantine by
//!   [`Spool::quarantine_batch`]; nothing is ever dropped to make room. When the spool's disk use
//!   ([`Spool::used_bytes`]) reaches `max_bytes` while records are pending, [`Spool::is_full`] is true
//!   and the collectors pause.
//! - Recovery may resend batches (same key, same records) and may re-fetch a blob that was not committed;
//!   it may never lose a committed record, move a cursor backwards or reuse a batch number.
//!
//! # On-disk layout
//! One sled database per generation, the one in use named by `<dir>/CURRENT` (`gen-<n>`; absent: generation
//! 0, sled's files directly in `<dir>`, data file `<dir>/db`; generation n ≥ 1 lives in `<dir>/gen-<n>/`),
//! plus `<dir>/LOCK` (an exclusive `flock` held while the spool is open: a second agent on the same state
//! directory refuses to start). [`Spool::reclaim`] moves to a fresh generation after a drain, switching
//! atomically; recovery removes every other generation (`gen.rs`).
//! ```text
//! main tree:
//!   'C' seq:u64be              -> chunk: b'c' 2 records:u32be raw_len:u32be appended_ms:u64be, then
//!                                 segment:u64be offset:u64be len:u32be crc32:u32be of its zstd(lines)
//!                                 frame (version 1, older spools: b'c' 1 ... and the frame inline)
//!   'B' seq:u64be              -> BatchDesc (JSON): the half-open record range [start, end) it covers
//!   'D' source 0x00 content_id -> done-mark: expires_unix:i64be kind:u8 (0 spooled, 1 expired, 2 quarantined)
//!   'K' source                 -> Cursor (JSON)
//!   'Q' seq:u64be part:u32be   -> QuarantineItem (JSON), cut into parts of 4 KiB (older spools: 'Q' seq
//!                                 -> the whole JSON); no sled value exceeds a few KiB (dedup.rs)
//!   'M' name                   -> next_chunk, next_batch, next_quarantine (u64be), batch_pos (u64be u32be),
//!                                 figures (JSON), wal (seq segment offset, u64be each: the WAL record of
//!                                 the newest commit in sled; wal.rs)
//!   'L' day:u32be seq:u64be    -> dedup log: keys::seen_key_v2 keys a commit added (LEB128 length + bytes
//!                                 each; at most 4 KiB of them per entry, a commit writes as many entries
//!                                 as it needs), until they are in a run file (dedup.rs)
//! <dir>/segments/<n>.seg: WAL records, append-only: header (b"SWAL" seq:u64be frames_len:u64be
//!   ops_len:u32be frames_crc32 ops_crc32 base_crc32 header_crc32), the chunks' zstd frames, the commit's sled batch as
//!   operations (tag 1 insert / 2 remove, u32be-length-prefixed key and value); segments of older spools
//!   hold bare frames. Deleted whole once every chunk in them is gone (segments.rs, wal.rs)
//! <dir>/dedup/<day>-<seq>.run: sorted dedup keys of one UTC day, outside sled (runs.rs); whole days are
//!   deleted after dedup_days
//! tree "seen2-<day>" (format 2, older versions): keys::seen_key_v2(tenant_id, record_id) -> () ; read
//!   until it expires
//! tree "seen-<day>" (format 1, older versions): tenant_id 0x00 record_id -> () ; read until it expires
//! ```
//! `source` is `<tenant_id>/<content_type>`. A position is (chunk seq, record index in that chunk).

mod chunk;
mod commit;
pub use chunk::LEVEL as ZSTD_LEVEL;

/// The smallest chunk (uncompressed bytes) whose stored zstd frame a batch sends as it is: a frame of a
/// few records compresses worse than the same records inside a larger frame.
pub const PASS_THROUGH_MIN_RAW: usize = 64 * 1024;
mod dedup;
pub mod fault;
mod gen;
mod keys;
mod memkeys;
mod runs;
mod segments;
mod wal;

pub use dedup::{DedupWindow, WindowFigures};
pub use keys::{seen2_tree_name, seen_key, seen_key_v2, seen_tree_name};

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the spool's lock.
    #[error("another m365-sensor is already using the state directory {0} (its spool is locked); stop it first")]
    Locked(PathBuf),
    /// A file-system operation failed.
    #[error("spool I/O on {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// sled failed.
    #[error("spool database: {0}")]
    Db(#[from] sled::Error),
    /// Compression or decompression failed.
    #[error("spool chunk codec: {0}")]
    Codec(std::io::Error),
    /// Stored data is not what the spool wrote.
    #[error("spool data is corrupt: {0}")]
    Corrupt(String),
}

/// Spool settings.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    /// Cap on stored bytes; reaching it pauses collection.
    pub max_bytes: u64,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Days a record Id is remembered.
    pub dedup_days: u32,
}

/// A record handed to the spool: its `Id` and its exact bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// The record's `Id`.
    pub id: &'a str,
    /// The record's JSON, as served.
    pub bytes: &'a [u8],
}

/// A collector's durable position for one tenant × content type. Invariant: `listed_until` never
/// decreases once stored, except through [`Spool::rewind_cursor`] (an explicit, logged resync).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Everything listed with `contentCreated` before this (Unix seconds) has been handled.
    pub listed_until: i64,
    /// When the whole retention window was last re-listed (Unix seconds).
    pub deep_swept_at: i64,
    /// When the subscription was last started by us (Unix seconds); starts are 15 min apart.
    pub subscription_started_at: i64,
    /// Whether any content was ever listed.
    pub first_content_seen: bool,
}

/// Everything one blob contributes, committed atomically.
#[derive(Clone, Copy, Debug)]
pub struct BlobCommit<'a> {
    /// Tenant id (GUID).
    pub tenant_id: &'a str,
    /// Content type.
    pub content_type: &'a str,
    /// The blob's contentId.
    pub content_id: &'a str,
    /// Its `contentExpiration` (Unix seconds): the done-mark is kept until then.
    pub expires_unix: i64,
    /// `collected_at` of the envelopes.
    pub collected_at: &'a str,
    /// The blob's records.
    pub records: &'a [RawRecord<'a>],
    /// The collector's cursor after this blob, if it moves.
    pub cursor: Option<&'a Cursor>,
}

/// What a commit did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Records added.
    pub spooled: u64,
    /// Records dropped as already seen.
    pub duplicates: u64,
}

/// Why a blob is done without its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoneKind {
    /// Its records were spooled.
    Spooled = 0,
    /// It expired before it could be fetched.
    Expired = 1,
    /// It was held in quarantine.
    Quarantined = 2,
}

/// A position in the FIFO: chunk seq and record index within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pos {
    /// Chunk sequence number.
    pub chunk: u64,
    /// Record index within the chunk.
    pub record: u32,
}

/// A batch: its sequence number and the half-open record range it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchDesc {
    /// Sequence number: the Idempotency-Key's number.
    pub seq: u64,
    /// First record.
    pub start: Pos,
    /// One past the last record.
    pub end: Pos,
    /// Records in the batch.
    pub records: u64,
    /// Uncompressed NDJSON bytes.
    pub raw_bytes: u64,
}

/// Limits for cutting a batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Most records.
    pub max_records: u64,
    /// Most uncompressed bytes (a single larger record still forms a batch of one).
    pub max_raw_bytes: u64,
    /// A partial batch is cut only once its oldest record waited this long.
    pub linger: Duration,
}

/// An item held in quarantine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineItem {
    /// Why.
    pub reason: String,
    /// Where it came from (source and content id, or batch seq).
    pub origin: String,
    /// When (Unix seconds).
    pub at: i64,
    /// Records it holds, when known.
    pub records: u64,
    /// The bytes (a blob prefix, or a batch's NDJSON), lossily as text.
    pub payload: String,
}

/// Figures of the spool. Invariant: kept in the same atomic batches as the data they count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    /// Records spooled and not yet acknowledged.
    pub pending_records: u64,
    /// Their uncompressed bytes.
    pub pending_raw_bytes: u64,
    /// Bytes of stored chunks (compressed).
    pub stored_bytes: u64,
    /// Records not yet in a batch.
    pub unbatched_records: u64,
    /// Their uncompressed bytes.
    pub unbatched_raw_bytes: u64,
    /// Items in quarantine.
    pub quarantined_items: u64,
    /// Their bytes.
    pub quarantined_bytes: u64,
}

/// What [`Spool::reclaim`] did. Invariant: `bytes_after` is the new generation's real disk use, taken
/// after the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reclaimed {
    /// The generation now in use.
    pub generation: u64,
    /// Keys copied (metadata, cursors, done-marks, quarantine, dedup Ids).
    pub keys: u64,
    /// Disk bytes of the old generation.
    pub bytes_before: u64,
    /// Disk bytes of the new one.
    pub bytes_after: u64,
}

/// The dedup window's run files, under the spool directory (outside the sled generations).
const DEDUP_DIR: &str = "dedup";
/// The chunks' frames (`segments.rs`), outside every sled generation.
const SEGMENTS_DIR: &str = "segments";

/// After a drain the spool reclaims space on its own when its files are at least this large and twice
/// what the last reclaim (or open) left: often enough to give a backlog's space back, rarely enough that
/// a spool emptied after every batch does not copy its metadata each time.
pub const RECLAIM_MIN_BYTES: u64 = 32 << 20;

/// Where a test stops a reclaim, as a crash would (production never stops one).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReclaimStop {
    /// The new generation is complete and durable; `CURRENT` still names the old one.
    AfterCopy,
    /// `CURRENT` names the new one; the old one is still on disk and in use in memory.
    AfterSwitch,
}

/// The spool. See the module header for its contract.
pub struct Spool {
    dir: PathBuf,
    /// The generation in use; replaced only under `inner`'s lock (see `gen.rs`).
    gen: Mutex<Arc<gen::Gen>>,
    _lock: File,
    opts: SpoolOptions,
    max_bytes: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
    /// Commits built and waiting for a group's write (`commit.rs`); taken under `inner`'s lock.
    queue: Mutex<Vec<commit::Queued>>,
    /// Where the chunks' frames live (read without the lock; appended under it through `Inner`).
    segments_dir: PathBuf,
    /// Threads a commit building alone builds its chunks on (the cores, at most 4; `commit.rs`).
    build_threads: usize,
    /// Commits building their chunks right now (`commit.rs`).
    building: std::sync::atomic::AtomicUsize,
    /// Groups applied to sled since its last durability point (any of them: `make_durable` resets it).
    sled_unsynced: std::sync::atomic::AtomicU32,
    /// The first host fault a caller noted since open ([`Spool::note_fault`]).
    fault: Mutex<Option<fault::Fault>>,
    /// Tests: the next this many durability points fail, as fdatasync errors would.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicU32,
    /// Tests: the groups the WAL replayed at open.
    #[cfg(test)]
    replayed_at_open: u64,
}

struct Inner {
    next_chunk: u64,
    next_batch: u64,
    next_quarantine: u64,
    batch_pos: Pos,
    figures: Figures,
    seen: DedupWindow,
    segments: segments::Segments,
    oldest_unbatched: Option<Instant>,
    /// Disk bytes right after the last reclaim (0 after open): the automatic reclaim's hysteresis.
    reclaim_floor: u64,
    /// Blobs committed since open: a commit whose Ids were checked against the window before another
    /// commit logged its own checks them again.
    commits: u64,
    /// The sequence number of the newest WAL record written or given up (`wal.rs`).
    wal_seq: u64,
    /// Why commits are refused until the next open: a failed append whose record could not be marked
    /// as never to be replayed.
    wal_broken: Option<String>,
}

/// A mutex's guard, also after another thread panicked holding it: the spool's one way to take its locks.
pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bytes a directory tree really occupies on disk (allocated blocks, not file lengths), so sparse and
/// preallocated files count as the file system counts them. Unreadable entries count as 0.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn now_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

fn day_of(unix: i64) -> u32 {
    (unix.max(0) / 86_400) as u32
}

fn u64_value(v: Option<sled::IVec>) -> Result<Option<u64>, SpoolError> {
    match v {
        None => Ok(None),
        Some(v) => {
            let b: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| SpoolError::Corrupt("u64 meta".into()))?;
            Ok(Some(u64::from_be_bytes(b)))
        }
    }
}

fn pos_bytes(p: Pos) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&p.chunk.to_be_bytes());
    b[8..].copy_from_slice(&p.record.to_be_bytes());
    b
}

/// The most bytes of one part of a quarantine item (why sled values stay small:
/// [`dedup::LOG_ENTRY_MAX_BYTES`]).
const QUARANTINE_PART_BYTES: usize = 4096;

/// Puts quarantine item `seq` into `batch`, its JSON cut into parts of [`QUARANTINE_PART_BYTES`]
/// (`'Q' seq part`). Returns the JSON's length.
fn insert_quarantine(batch: &mut sled::Batch, seq: u64, item: &QuarantineItem) -> u64 {
    let v = json(item);
    for (part, bytes) in v.chunks(QUARANTINE_PART_BYTES).enumerate() {
        let mut k = keys::seq_key(keys::QUARANTINE, seq).to_vec();
        k.extend_from_slice(&(part as u32).to_be_bytes());
        batch.insert(k, bytes);
    }
    v.len() as u64
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, taking its lock.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        fs2::FileExt::try_lock_exclusive(&lock)
            .map_err(|_| SpoolError::Locked(dir.to_path_buf()))?;
        let n = gen::current(dir)?;
        gen::remove_others(dir, n)?;
        let g = gen::open(dir, n, opts.cache_bytes)?;
        let segments_dir = dir.join(SEGMENTS_DIR);
        // Before anything reads sled: the groups whose batches sled lost in a crash are applied again.
        let replayed = wal::replay(&g.main, &segments_dir)?;
        if replayed.groups > 0 {
            g.make_durable()?;
            log::info!(target: "spool", "{} committed groups replayed from the segments", replayed.groups);
        }
        let main = g.main.clone();
        let meta = |name: &[u8]| main.get(keys::meta_key(name));
        let next_chunk = u64_value(meta(keys::meta::NEXT_CHUNK)?)?.unwrap_or(0);
        let next_batch = u64_value(meta(keys::meta::NEXT_BATCH)?)?.unwrap_or(1);
        let next_quarantine = u64_value(meta(keys::meta::NEXT_QUARANTINE)?)?.unwrap_or(0);
        let batch_pos = match meta(keys::meta::BATCH_POS)? {
            None => Pos::default(),
            Some(v) if v.len() == 12 => Pos {
                chunk: u64::from_be_bytes(
                    v[..8]
                        .try_into()
                        .map_err(|_| SpoolError::Corrupt("batch_pos".into()))?,
                ),
                record: u32::from_be_bytes(
                    v[8..]
                        .try_into()
                        .map_err(|_| SpoolError::Corrupt("batch_pos".into()))?,
                ),
            },
            Some(_) => return Err(SpoolError::Corrupt("batch_pos".into())),
        };
        let figures = match meta(keys::meta::FIGURES)? {
            None => Figures::default(),
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| SpoolError::Corrupt(format!("figures: {e}")))?,
        };
        let seen = DedupWindow::open(&g.db, &g.main, &dir.join(DEDUP_DIR))?;
        let oldest_unbatched = (figures.unbatched_records > 0).then(Instant::now);
        let newest_referenced = match g.main.scan_prefix([keys::CHUNK]).next_back() {
            Some(kv) => chunk::segment_of(&kv?.1)?,
            None => None,
        };
        let segments = segments::Segments::open(&segments_dir, newest_referenced)?;
        let spool = Spool {
            segments_dir,
            dir: dir.to_path_buf(),
            gen: Mutex::new(Arc::new(g)),
            _lock: lock,
            max_bytes: std::sync::atomic::AtomicU64::new(opts.max_bytes),
            opts,
            fault: Mutex::new(None),
            #[cfg(test)]
            fail_syncs: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            replayed_at_open: replayed.groups,
            queue: Mutex::new(Vec::new()),
            build_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            building: std::sync::atomic::AtomicUsize::new(0),
            sled_unsynced: std::sync::atomic::AtomicU32::new(0),
            inner: Mutex::new(Inner {
                next_chunk,
                next_batch,
                next_quarantine,
                batch_pos,
                figures,
                seen,
                segments,
                oldest_unbatched,
                reclaim_floor: 0,
                commits: 0,
                wal_seq: replayed.last_seq,
                wal_broken: None,
            }),
        };
        spool.resume_wal_at_next_segment(&spool.lock())?;
        spool.expire_seen()?;
        spool.remove_unreferenced_segments(&mut spool.lock())?;
        Ok(spool)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        locked(&self.inner)
    }

    /// The generation in use.
    fn g(&self) -> Arc<gen::Gen> {
        locked(&self.gen).clone()
    }

    /// The durability point: [`gen::Gen::make_durable`] of the generation in use.
    fn make_durable(&self, what: &str) -> Result<(), SpoolError> {
        if self.injected_sync_failure() {
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("injected fdatasync failure"),
            });
        }
        self.g().make_durable()?;
        self.sled_unsynced
            .store(0, std::sync::atomic::Ordering::SeqCst);
        log::trace!(target: "durability", "durable: {what}");
        Ok(())
    }

    /// Points the WAL marker at the start of the next new segment (after the newest record written or
    /// given up), durably: what lies before it is never replayed (`wal.rs`).
    fn resume_wal_at_next_segment(&self, inner: &Inner) -> Result<(), SpoolError> {
        let at = wal::WalPos {
            seq: inner.wal_seq,
            segment: inner.segments.next_number(),
            offset: 0,
        };
        self.g().main.insert(wal::marker_key(), &at.encode()[..])?;
        self.make_durable("the WAL resumes at the next segment")
    }

    /// After a failed append: the group was not applied, and its record, which may be whole on disk,
    /// must never be replayed. If that cannot be made durable, commits are refused until the next open
    /// (whose replay may then apply the group: spooled, not lost; its collector fetches it again).
    fn skip_failed_group(&self, inner: &mut Inner) {
        if let Err(e) = self.resume_wal_at_next_segment(inner) {
            log::error!(target: "spool", "a failed commit could not be fenced off: {e}");
            self.note_fault(fault::classify(&e, &self.dir));
            inner.wal_broken = Some(e.to_string());
        }
    }

    /// Tests: whether this durability point is to fail, as an fdatasync error would.
    fn injected_sync_failure(&self) -> bool {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::SeqCst;
            self.fail_syncs
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
        #[cfg(not(test))]
        false
    }

    fn cursor_by_source(&self, source: &str) -> Result<Option<Cursor>, SpoolError> {
        match self.g().main.get(keys::cursor_key(source))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| SpoolError::Corrupt(format!("cursor of {source}: {e}"))),
        }
    }

    /// The stored cursor of a tenant × content type.
    pub fn cursor(
        &self,
        tenant_id: &str,
        content_type: &str,
    ) -> Result<Option<Cursor>, SpoolError> {
        self.cursor_by_source(&format!("{tenant_id}/{content_type}"))
    }

    /// Stores a cursor durably (never moving `listed_until` back).
    pub fn set_cursor(
        &self,
        tenant_id: &str,
        content_type: &str,
        cursor: &Cursor,
    ) -> Result<(), SpoolError> {
        let _inner = self.lock();
        let source = format!("{tenant_id}/{content_type}");
        let merged = commit::merged_cursor(&source, self.cursor_by_source(&source)?, cursor);
        self.g()
            .main
            .insert(keys::cursor_key(&source), json(&merged))?;
        self.make_durable(&format!("cursor {source}"))
    }

    /// Moves `listed_until` back to `to` (Unix seconds) so that the window from there is listed again:
    /// the resync command. Done blobs stay done and seen records stay seen, so nothing is delivered twice.
    /// Call only while no collector of that source runs (it would write its own cursor back).
    pub fn rewind_cursor(
        &self,
        tenant_id: &str,
        content_type: &str,
        to: i64,
    ) -> Result<(), SpoolError> {
        let _inner = self.lock();
        let source = format!("{tenant_id}/{content_type}");
        let mut cursor = self.cursor_by_source(&source)?.unwrap_or_default();
        if cursor.listed_until <= to {
            return Ok(());
        }
        log::info!(target: "spool", "cursor of {source} rewound from {} to {to} (resync)", cursor.listed_until);
        cursor.listed_until = to;
        self.g()
            .main
            .insert(keys::cursor_key(&source), json(&cursor))?;
        self.make_durable(&format!("cursor {source} rewound"))
    }

    /// Whether a blob is already done (spooled, expired or quarantined).
    pub fn is_done(
        &self,
        tenant_id: &str,
        content_type: &str,
        content_id: &str,
    ) -> Result<bool, SpoolError> {
        Ok(self.g().main.contains_key(keys::done_key(
            &format!("{tenant_id}/{content_type}"),
            content_id,
        ))?)
    }

    /// Marks a blob done without records (expired or quarantined), with an optional quarantine item,
    /// atomically and durably.
    pub fn mark_done(
        &self,
        tenant_id: &str,
        content_type: &str,
        content_id: &str,
        expires_unix: i64,
        kind: DoneKind,
        quarantine: Option<QuarantineItem>,
    ) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let source = format!("{tenant_id}/{content_type}");
        let mut batch = sled::Batch::default();
        batch.insert(
            keys::done_key(&source, content_id),
            done_value(expires_unix, kind).to_vec(),
        );
        let mut figures = inner.figures.clone();
        let mut next_q = inner.next_quarantine;
        if let Some(item) = &quarantine {
            figures.quarantined_items += 1;
            figures.quarantined_bytes += insert_quarantine(&mut batch, next_q, item);
            next_q += 1;
            batch.insert(
                keys::meta_key(keys::meta::NEXT_QUARANTINE),
                next_q.to_be_bytes().to_vec(),
            );
            batch.insert(keys::meta_key(keys::meta::FIGURES), json(&figures));
        }
        self.g().main.apply_batch(batch)?;
        inner.figures = figures;
        inner.next_quarantine = next_q;
        self.make_durable(&format!("done {source} {content_id}"))?;
        Ok(())
    }

    /// Removes done-marks whose content expired more than a day ago (they can no longer be listed).
    pub fn prune_done_marks(&self) -> Result<u64, SpoolError> {
        let _inner = self.lock();
        let limit = now_unix() - 86_400;
        let mut removed = 0;
        let mut batch = sled::Batch::default();
        for kv in self.g().main.scan_prefix([keys::DONE]) {
            let (k, v) = kv?;
            let expires = v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0);
            if expires < limit {
                batch.remove(k);
                removed += 1;
            }
        }
        if removed > 0 {
            self.g().main.apply_batch(batch)?;
            self.make_durable("expired done-marks pruned")?;
        }
        Ok(removed)
    }

    /// Drops whole days of seen Ids older than the dedup window: one tree per day, so expiry costs one
    /// `drop_tree`, not one delete per Id.
    pub fn expire_seen(&self) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let oldest_kept = day_of(now_unix()).saturating_sub(self.opts.dedup_days);
        if inner.seen.expire_before(oldest_kept, &self.g().main)? > 0 {
            self.make_durable("expired days of the dedup window dropped")?;
        }
        Ok(())
    }

    /// The spool's figures.
    pub fn figures(&self) -> Figures {
        self.lock().figures.clone()
    }

    /// Bytes the spool really occupies on disk: allocated blocks of the sled generation in use (whose
    /// files never shrink, see [`Spool::reclaim`]), of the segment files and of the dedup window's run
    /// files.
    pub fn disk_bytes(&self) -> u64 {
        self.used_bytes() + disk_usage(&self.dir.join(DEDUP_DIR))
    }

    /// Allocated bytes of the sled generation at `path` (generation 0 is the spool directory itself:
    /// the dedup run files under it do not count).
    fn sled_disk_bytes(&self, path: &Path) -> u64 {
        if path != self.dir {
            return disk_usage(path);
        }
        std::fs::read_dir(path)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name() != DEDUP_DIR && e.file_name() != SEGMENTS_DIR)
                    .map(|e| disk_usage(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The configured cap.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the cap (configuration reload). Lowering it below the disk use pauses collection;
    /// nothing stored is dropped.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.max_bytes
            .store(max_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// What `max_bytes` caps: the bytes the records really occupy on disk, in their segment files
    /// (deleted whole once acknowledged) and in the sled database (metadata, quarantine; its files only
    /// shrink when a drain is reclaimed). The dedup window's run files are bounded by the window itself
    /// and do not count.
    pub fn used_bytes(&self) -> u64 {
        self.sled_disk_bytes(&self.g().path) + disk_usage(&self.segments_dir)
    }

    /// Whether collection must pause: records are pending and the spool's disk use reached the cap. With
    /// nothing pending it is never full (the drain's reclaim gives the space back; a cap below what the
    /// metadata alone takes must not stop collection for good).
    pub fn is_full(&self) -> bool {
        self.figures().pending_records > 0 && self.used_bytes() >= self.max_bytes()
    }

    /// Disk use against the cap, in [0, 1+].
    pub fn fill_ratio(&self) -> f64 {
        self.used_bytes() as f64 / self.max_bytes().max(1) as f64
    }

    /// Batches cut and not yet acknowledged, in sequence order (resent first after a restart).
    pub fn pending_batches(&self) -> Result<Vec<BatchDesc>, SpoolError> {
        let mut out = Vec::new();
        for kv in self.g().main.scan_prefix([keys::BATCH]) {
            let (_, v) = kv?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| SpoolError::Corrupt(format!("batch: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Reads the NDJSON of the records in `[start, end)`. Returns the lines and the record count.
    fn read_range(&self, start: Pos, end: Pos) -> Result<(Vec<u8>, u64), SpoolError> {
        let mut out = Vec::new();
        let mut taken = 0u64;
        for part in self.parts(start, end) {
            let (value, first, stop) = part?;
            let (h, lines) = self.decode(&value)?;
            for rec in chunk::records(&lines)
                .take(stop.min(h.records) as usize)
                .skip(first as usize)
            {
                out.extend_from_slice(rec);
                taken += 1;
            }
        }
        Ok((out, taken))
    }

    /// The stored chunks that hold records of `[start, end)`, each with the range of its records
    /// `[first, stop)` that belongs to it (`stop` may exceed the chunk's count at the range's end).
    fn parts(
        &self,
        start: Pos,
        end: Pos,
    ) -> impl Iterator<Item = Result<(sled::IVec, u32, u32), SpoolError>> {
        let from = keys::seq_key(keys::CHUNK, start.chunk);
        let to = keys::seq_key(keys::CHUNK, end.chunk);
        self.g().main.range(from..=to).map(move |kv| {
            let (k, v) = kv?;
            let seq = keys::seq_of(&k).ok_or_else(|| SpoolError::Corrupt("chunk key".into()))?;
            let first = if seq == start.chunk { start.record } else { 0 };
            let stop = if seq == end.chunk {
                end.record
            } else {
                u32::MAX
            };
            Ok((v, first, stop))
        })
    }

    /// Where the next batch from `start` ends within `limits` (records, uncompressed bytes), read from
    /// the chunks' headers: whole chunks while they fit, so that [`Spool::read_batch_zstd`] sends their
    /// stored frames as they are; record by record (decoding the chunk) only in a chunk the previous
    /// batch ended inside, or when not even one whole chunk fits. Returns (first record taken, end,
    /// records, uncompressed bytes); no records when none are unbatched.
    fn plan_batch(
        &self,
        start: Pos,
        limits: (u64, u64),
    ) -> Result<(Pos, Pos, u64, u64), SpoolError> {
        let (max_records, max_raw) = limits;
        let (mut taken, mut raw) = (0u64, 0u64);
        let (mut first_taken, mut last) = (start, start);
        let from = keys::seq_key(keys::CHUNK, start.chunk);
        let to = keys::seq_key(keys::CHUNK, u64::MAX);
        'chunks: for kv in self.g().main.range(from..=to) {
            let (k, v) = kv?;
            let seq = keys::seq_of(&k).ok_or_else(|| SpoolError::Corrupt("chunk key".into()))?;
            let h = chunk::header(&v)?;
            let first = if seq == start.chunk { start.record } else { 0 };
            if first >= h.records {
                last = Pos {
                    chunk: seq,
                    record: h.records,
                };
                continue;
            }
            if taken == 0 {
                first_taken = Pos {
                    chunk: seq,
                    record: first,
                };
            }
            let fits_whole = taken + u64::from(h.records) <= max_records
                && raw + u64::from(h.raw_len) <= max_raw;
            if first == 0 && fits_whole {
                taken += u64::from(h.records);
                raw += u64::from(h.raw_len);
                last = Pos {
                    chunk: seq,
                    record: h.records,
                };
                continue;
            }
            if first == 0 && taken > 0 {
                // The chunk does not fit whole: the batch ends at its start.
                last = Pos {
                    chunk: seq,
                    record: 0,
                };
                break;
            }
            let (_, lines) = self.decode(&v)?;
            for (i, rec) in chunk::records(&lines).enumerate().skip(first as usize) {
                let i = i as u32;
                if taken > 0 && (taken + 1 > max_records || raw + rec.len() as u64 > max_raw) {
                    last = Pos {
                        chunk: seq,
                        record: i,
                    };
                    break 'chunks;
                }
                taken += 1;
                raw += rec.len() as u64;
                last = Pos {
                    chunk: seq,
                    record: i + 1,
                };
            }
        }
        Ok((first_taken, last, taken, raw))
    }

    /// A chunk's header and zstd frame: inline (version 1) or read from its segment, CRC-checked.
    fn frame<'v>(
        &self,
        value: &'v [u8],
    ) -> Result<(chunk::ChunkHeader, Cow<'v, [u8]>), SpoolError> {
        let (h, body) = chunk::body(value)?;
        let frame = match body {
            chunk::Body::Inline(f) => Cow::Borrowed(f),
            chunk::Body::InSegment(loc) => Cow::Owned(segments::read(&self.segments_dir, loc)?),
        };
        Ok((h, frame))
    }

    /// A chunk's header and lines.
    fn decode(&self, value: &[u8]) -> Result<(chunk::ChunkHeader, Vec<u8>), SpoolError> {
        let (h, frame) = self.frame(value)?;
        Ok((h, chunk::decompress(&h, &frame)?))
    }

    /// Deletes the segment files no stored chunk references: those before the oldest chunk's (all but
    /// the one being appended to when no chunk is stored). The chunks' removal is made durable first, so
    /// that a crash cannot bring back a reference to a deleted file. While a chunk of version 1 (inline,
    /// from before segments) is the oldest, every segment is kept.
    fn remove_unreferenced_segments(&self, inner: &mut Inner) -> Result<(), SpoolError> {
        let first_live = match self.g().main.scan_prefix([keys::CHUNK]).next() {
            None => None,
            Some(kv) => match chunk::segment_of(&kv?.1)? {
                Some(n) => Some(n),
                None => return Ok(()),
            },
        };
        if inner.segments.removable(first_live) == 0 {
            return Ok(());
        }
        self.make_durable("chunks freed before their segments are deleted")?;
        let n = inner.segments.remove_before(first_live)?;
        log::debug!(target: "spool", "deleted {n} segment file(s) no chunk references");
        Ok(())
    }

    /// The NDJSON body of a batch: the same records in the same order on every call.
    pub fn read_batch(&self, desc: &BatchDesc) -> Result<Vec<u8>, SpoolError> {
        let (lines, n) = self.read_range(desc.start, desc.end)?;
        check_count(desc, n)?;
        Ok(lines)
    }

    /// The batch's NDJSON body as a zstd stream (one frame after another, which decodes to the
    /// concatenation of their contents, RFC 8878). A chunk the batch covers whole and of at least
    /// [`PASS_THROUGH_MIN_RAW`] bytes goes out as the frame stored in the spool, untouched; the records
    /// of smaller chunks (a live blob of a few records) and of chunks the batch covers in part are
    /// gathered and compressed together (zstd level [`ZSTD_LEVEL`]), so that small blobs still compress
    /// as a batch. The same records in the same order on every call.
    pub fn read_batch_zstd(&self, desc: &BatchDesc) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::new();
        let mut gathered = Vec::new();
        let mut n = 0u64;
        for part in self.parts(desc.start, desc.end) {
            let (value, first, stop) = part?;
            let h = chunk::header(&value)?;
            let stop = stop.min(h.records);
            if first >= stop {
                continue;
            }
            if first == 0 && stop == h.records && h.raw_len as usize >= PASS_THROUGH_MIN_RAW {
                if !gathered.is_empty() {
                    out.extend_from_slice(&chunk::compress(&gathered)?);
                    gathered.clear();
                }
                out.extend_from_slice(&self.frame(&value)?.1);
            } else {
                let (_, lines) = self.decode(&value)?;
                for rec in chunk::records(&lines)
                    .take(stop as usize)
                    .skip(first as usize)
                {
                    gathered.extend_from_slice(rec);
                }
            }
            n += u64::from(stop - first);
        }
        if !gathered.is_empty() {
            out.extend_from_slice(&chunk::compress(&gathered)?);
        }
        check_count(desc, n)?;
        Ok(out)
    }

    /// Cuts the next batch from unbatched records, if there are enough of them or the oldest waited
    /// `limits.linger` (or `force`). The descriptor and the next batch number are durable on return.
    pub fn cut_batch(
        &self,
        limits: &BatchLimits,
        force: bool,
    ) -> Result<Option<BatchDesc>, SpoolError> {
        let mut inner = self.lock();
        let f = &inner.figures;
        if f.unbatched_records == 0 {
            return Ok(None);
        }
        let full = f.unbatched_records >= limits.max_records
            || f.unbatched_raw_bytes >= limits.max_raw_bytes;
        let waited = inner
            .oldest_unbatched
            .map(|t| t.elapsed() >= limits.linger)
            .unwrap_or(true);
        if !(force || full || waited) {
            return Ok(None);
        }
        let (start, end, n, raw_bytes) =
            self.plan_batch(inner.batch_pos, (limits.max_records, limits.max_raw_bytes))?;
        if n == 0 {
            return Err(SpoolError::Corrupt(format!(
                "{} records counted as unbatched but none readable from chunk {}",
                inner.figures.unbatched_records, start.chunk
            )));
        }
        let desc = BatchDesc {
            seq: inner.next_batch,
            start,
            end,
            records: n,
            raw_bytes,
        };
        let mut figures = inner.figures.clone();
        figures.unbatched_records = figures.unbatched_records.saturating_sub(n);
        figures.unbatched_raw_bytes = figures.unbatched_raw_bytes.saturating_sub(desc.raw_bytes);
        let mut batch = sled::Batch::default();
        batch.insert(keys::seq_key(keys::BATCH, desc.seq).to_vec(), json(&desc));
        batch.insert(
            keys::meta_key(keys::meta::NEXT_BATCH),
            (desc.seq + 1).to_be_bytes().to_vec(),
        );
        batch.insert(
            keys::meta_key(keys::meta::BATCH_POS),
            pos_bytes(end).to_vec(),
        );
        batch.insert(keys::meta_key(keys::meta::FIGURES), json(&figures));
        self.g().main.apply_batch(batch)?;
        // Applied: the memory follows before the fdatasync can fail (see commit_blob).
        inner.next_batch = desc.seq + 1;
        inner.batch_pos = end;
        inner.oldest_unbatched = (figures.unbatched_records > 0).then(Instant::now);
        inner.figures = figures;
        self.make_durable(&format!("batch {}", desc.seq))?;
        Ok(Some(desc))
    }

    /// Deletes an acknowledged batch and every chunk no other batch still needs. Idempotent.
    pub fn ack_batch(&self, seq: u64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let Some(desc) = self.batch(seq)? else {
            return Ok(());
        };
        let mut figures = inner.figures.clone();
        figures.pending_records = figures.pending_records.saturating_sub(desc.records);
        figures.pending_raw_bytes = figures.pending_raw_bytes.saturating_sub(desc.raw_bytes);
        let mut batch = sled::Batch::default();
        batch.remove(keys::seq_key(keys::BATCH, seq).to_vec());
        self.free_chunks(&inner, seq, &mut batch, &mut figures)?;
        batch.insert(keys::meta_key(keys::meta::FIGURES), json(&figures));
        self.g().main.apply_batch(batch)?;
        inner.figures = figures;
        // A lost deletion would only cause a resend, answered 409; it is made durable anyway: sled
        // reuses a log segment once the pages in it are rewritten elsewhere and merely flushed, so a
        // power loss after many unsynced flushes can break what the last sync made durable
        // (tests/sled_crash_prefix.rs). One fdatasync per acknowledged batch of up to 5,000 records.
        self.make_durable(&format!("ack batch {seq}"))?;
        if let Err(e) = self.remove_unreferenced_segments(&mut inner) {
            log::warn!(target: "spool", "deleting the segment files of acknowledged records failed: {e}");
        }
        if inner.figures.pending_records == 0 {
            let disk = self.sled_disk_bytes(&self.g().path);
            let large = disk >= RECLAIM_MIN_BYTES && disk >= inner.reclaim_floor.saturating_mul(2);
            // Near the cap (80 %: where the status warns), a drain is what gives collection its room back.
            let capped = disk >= self.max_bytes() / 10 * 8 && disk > inner.reclaim_floor;
            if large || capped {
                // The ack itself is done: a failed reclaim leaves the old generation in use.
                if let Err(e) = self.reclaim_locked(&mut inner, None) {
                    log::warn!(target: "spool", "reclaiming disk space after the drain failed: {e}");
                }
            }
        }
        Ok(())
    }

    fn batch(&self, seq: u64) -> Result<Option<BatchDesc>, SpoolError> {
        match self.g().main.get(keys::seq_key(keys::BATCH, seq))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| SpoolError::Corrupt(format!("batch {seq}: {e}"))),
        }
    }

    /// Adds to `batch` the removal of chunks wholly before every remaining batch and the batch cursor.
    fn free_chunks(
        &self,
        inner: &Inner,
        leaving: u64,
        batch: &mut sled::Batch,
        figures: &mut Figures,
    ) -> Result<(), SpoolError> {
        let pos = inner.batch_pos;
        let consumed = match self.g().main.get(keys::seq_key(keys::CHUNK, pos.chunk))? {
            Some(v) => chunk::header(&v)?.records <= pos.record,
            None => false,
        };
        let mut bound = if consumed { pos.chunk + 1 } else { pos.chunk };
        for d in self.pending_batches()? {
            if d.seq != leaving {
                bound = bound.min(d.start.chunk);
            }
        }
        for kv in self
            .g()
            .main
            .range(keys::seq_key(keys::CHUNK, 0)..keys::seq_key(keys::CHUNK, bound))
        {
            let (k, v) = kv?;
            figures.stored_bytes = figures.stored_bytes.saturating_sub(chunk::stored_len(&v)?);
            batch.remove(k);
        }
        Ok(())
    }

    /// Replaces a batch the backend found too large by two halves with new numbers. Returns `None` for a
    /// batch of one record (the caller quarantines it).
    pub fn split_batch(&self, seq: u64) -> Result<Option<(BatchDesc, BatchDesc)>, SpoolError> {
        let mut inner = self.lock();
        let Some(desc) = self.batch(seq)? else {
            return Ok(None);
        };
        if desc.records < 2 {
            return Ok(None);
        }
        // At most half the records (whole chunks where they fit), at least one.
        let (_, mid, n1, raw1) = self.plan_batch(desc.start, (desc.records / 2, u64::MAX))?;
        if n1 == 0 || n1 >= desc.records {
            return Err(SpoolError::Corrupt(format!(
                "batch {seq} covers {} records but its first half has {n1}",
                desc.records
            )));
        }
        let a = BatchDesc {
            seq: inner.next_batch,
            start: desc.start,
            end: mid,
            records: n1,
            raw_bytes: raw1,
        };
        let b = BatchDesc {
            seq: inner.next_batch + 1,
            start: mid,
            end: desc.end,
            records: desc.records - n1,
            raw_bytes: desc.raw_bytes.saturating_sub(a.raw_bytes),
        };
        let mut batch = sled::Batch::default();
        batch.remove(keys::seq_key(keys::BATCH, seq).to_vec());
        batch.insert(keys::seq_key(keys::BATCH, a.seq).to_vec(), json(&a));
        batch.insert(keys::seq_key(keys::BATCH, b.seq).to_vec(), json(&b));
        batch.insert(
            keys::meta_key(keys::meta::NEXT_BATCH),
            (b.seq + 1).to_be_bytes().to_vec(),
        );
        self.g().main.apply_batch(batch)?;
        inner.next_batch = b.seq + 1;
        self.make_durable(&format!("split batch {seq} into {} and {}", a.seq, b.seq))?;
        Ok(Some((a, b)))
    }

    /// Moves a batch's records into quarantine (kept on disk, counted) and frees what it held.
    pub fn quarantine_batch(&self, seq: u64, reason: &str) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let Some(desc) = self.batch(seq)? else {
            return Ok(());
        };
        let lines = self.read_batch(&desc)?;
        let item = QuarantineItem {
            reason: reason.to_string(),
            origin: format!("batch {seq}"),
            at: now_unix(),
            records: desc.records,
            payload: String::from_utf8_lossy(&lines).into_owned(),
        };
        let mut figures = inner.figures.clone();
        figures.pending_records = figures.pending_records.saturating_sub(desc.records);
        figures.pending_raw_bytes = figures.pending_raw_bytes.saturating_sub(desc.raw_bytes);
        figures.quarantined_items += 1;
        let mut batch = sled::Batch::default();
        batch.remove(keys::seq_key(keys::BATCH, seq).to_vec());
        figures.quarantined_bytes += insert_quarantine(&mut batch, inner.next_quarantine, &item);
        batch.insert(
            keys::meta_key(keys::meta::NEXT_QUARANTINE),
            (inner.next_quarantine + 1).to_be_bytes().to_vec(),
        );
        self.free_chunks(&inner, seq, &mut batch, &mut figures)?;
        batch.insert(keys::meta_key(keys::meta::FIGURES), json(&figures));
        self.g().main.apply_batch(batch)?;
        inner.next_quarantine += 1;
        inner.figures = figures;
        self.make_durable(&format!("quarantine batch {seq}"))?;
        if let Err(e) = self.remove_unreferenced_segments(&mut inner) {
            log::warn!(target: "spool", "deleting the segment files of quarantined records failed: {e}");
        }
        Ok(())
    }

    /// The quarantined items.
    pub fn quarantine(&self) -> Result<Vec<QuarantineItem>, SpoolError> {
        let parse = |seq: u64, bytes: &[u8]| {
            serde_json::from_slice(bytes)
                .map_err(|e| SpoolError::Corrupt(format!("quarantine item {seq}: {e}")))
        };
        let mut out = Vec::new();
        // The item whose parts are being gathered (keys sort by item, then part).
        let mut parts: Option<(u64, Vec<u8>)> = None;
        for kv in self.g().main.scan_prefix([keys::QUARANTINE]) {
            let (k, v) = kv?;
            let seq = keys::seq_of(&k)
                .ok_or_else(|| SpoolError::Corrupt(format!("quarantine key {k:?} is malformed")))?;
            if parts.as_ref().is_some_and(|(s, _)| *s != seq) {
                if let Some((s, bytes)) = parts.take() {
                    out.push(parse(s, &bytes)?);
                }
            }
            match k.len() {
                // Whole, as spools before parts wrote it.
                9 => out.push(parse(seq, &v)?),
                13 => parts
                    .get_or_insert_with(|| (seq, Vec::new()))
                    .1
                    .extend_from_slice(&v),
                _ => {
                    return Err(SpoolError::Corrupt(format!(
                        "quarantine key {k:?} is malformed"
                    )))
                }
            }
        }
        if let Some((s, bytes)) = parts {
            out.push(parse(s, &bytes)?);
        }
        Ok(out)
    }

    /// Gives disk space back after a drain (sled never shrinks its files): when no record is pending,
    /// copies what is left (metadata, cursors, done-marks, quarantine, the dedup window) into a fresh
    /// generation and switches to it atomically (`gen.rs`), then deletes the old one. Returns `None`, and
    /// changes nothing, while records are pending. Holds the spool's lock throughout, so no commit, cut or
    /// ack falls between the copy and the switch; every durability invariant of the module header holds
    /// across a crash at any point (the old or the new generation is in use, each complete).
    /// [`Spool::ack_batch`] calls it when a drain leaves large files (see [`RECLAIM_MIN_BYTES`]).
    pub fn reclaim(&self) -> Result<Option<Reclaimed>, SpoolError> {
        let mut inner = self.lock();
        self.reclaim_locked(&mut inner, None)
    }

    #[cfg(test)]
    fn reclaim_stopping_at(&self, stop: ReclaimStop) -> Result<Option<Reclaimed>, SpoolError> {
        let mut inner = self.lock();
        self.reclaim_locked(&mut inner, Some(stop))
    }

    fn reclaim_locked(
        &self,
        inner: &mut Inner,
        stop: Option<ReclaimStop>,
    ) -> Result<Option<Reclaimed>, SpoolError> {
        let old = self.g();
        if inner.figures.pending_records > 0
            || old.main.scan_prefix([keys::CHUNK]).next().is_some()
            || old.main.scan_prefix([keys::BATCH]).next().is_some()
        {
            return Ok(None);
        }
        let bytes_before = self.sled_disk_bytes(&old.path);
        let n = old.n + 1;
        let path = gen::gen_path(&self.dir, n);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        let new = gen::open(&self.dir, n, self.opts.cache_bytes)?;
        let keys = gen::copy_all(&old, &new)?;
        if stop == Some(ReclaimStop::AfterCopy) {
            return Ok(None);
        }
        gen::set_current(&self.dir, n)?;
        if stop == Some(ReclaimStop::AfterSwitch) {
            return Ok(None);
        }
        inner.seen.switch_db(&new.db)?;
        let new = Arc::new(new);
        match self.gen.lock() {
            Ok(mut g) => *g = new.clone(),
            Err(p) => *p.into_inner() = new.clone(),
        }
        drop(old);
        gen::remove_others(&self.dir, n)?;
        let bytes_after = self.sled_disk_bytes(&new.path);
        inner.reclaim_floor = bytes_after;
        log::info!(target: "spool", "reclaimed disk space after a drain: generation {n}, {keys} keys copied, {bytes_before} -> {bytes_after} bytes");
        Ok(Some(Reclaimed {
            generation: n,
            keys,
            bytes_before,
            bytes_after,
        }))
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Notes a host fault met by a caller (or by the spool itself). Invariant: the first note since
    /// open is kept; the spool is reopened, never un-faulted in place.
    pub fn note_fault(&self, f: fault::Fault) {
        locked(&self.fault).get_or_insert(f);
    }

    /// The host fault noted since open, if any.
    pub fn fault(&self) -> Option<fault::Fault> {
        locked(&self.fault).clone()
    }

    /// Why commits are refused until the spool is opened again, if they are.
    pub fn broken(&self) -> Option<String> {
        self.lock().wal_broken.clone()
    }

    /// Flushes and fsyncs everything (shutdown).
    pub fn close(&self) -> Result<(), SpoolError> {
        let _inner = self.lock();
        self.make_durable("close")
    }
}

/// A new chunk of `records` envelope lines: its number, header and zstd frame.
/// Refuses a batch whose range no longer holds the records it was cut with.
fn check_count(desc: &BatchDesc, readable: u64) -> Result<(), SpoolError> {
    if readable == desc.records {
        Ok(())
    } else {
        Err(SpoolError::Corrupt(format!(
            "batch {} covers {} records but {} are readable",
            desc.seq, desc.records, readable
        )))
    }
}

fn done_value(expires_unix: i64, kind: DoneKind) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[..8].copy_from_slice(&expires_unix.to_be_bytes());
    v[8] = kind as u8;
    v
}

#[cfg(test)]
mod tests;

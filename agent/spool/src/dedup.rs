//! The record-Id dedup window: which (tenant, record Id) pairs were spooled in the last `dedup_days`
//! UTC days, by the day they were first spooled.
//!
//! Format 3 (this version writes it): a blob's new keys go into the blob's own atomic sled batch as ONE
//! log entry (`L` + day + log seq → the keys, length-prefixed), not one sled key per Id; they are also
//! held in memory. When the memory holds [`MEM_MAX_KEYS`], they are frozen and written out as sorted
//! run files (`runs.rs`, one per day) on a thread of their own while commits go on; once the runs are
//! durable the window adopts them and deletes the log entries of the frozen keys. Runs of a day are
//! merged pairwise
//! (the newest two when the newer is at least half the older), so a day keeps O(log n) runs. A lookup
//! checks memory, then the runs newest first (a Bloom filter skips most), then the sled trees of
//! formats 2 (`seen2-<day>`) and 1 (`seen-<day>`) that older versions left, until they expire. Expiry
//! deletes a day's files and drops its trees: no per-Id work.
//!
//! Invariants: a key is exact ([`crate::keys::seen_key_v2`]) and a lookup never answers "seen" for a key
//! that was not inserted (a false positive would silently drop a record). A key inserted by a committed
//! blob is found by every later lookup in the window, across crashes: its log entry is durable with the
//! blob, and is deleted only after a run holding the key is durable; frozen keys are looked up until
//! then. A day is dropped only when it is wholly older than the window. Memory is bounded by twice
//! [`MEM_MAX_KEYS`] keys (a commit that fills memory while a write is running waits for it) plus each
//! run's index and filter (~1.6 bytes per key); the keys themselves stay on disk. No file of the
//! window is written once the window is dropped (the drop waits for a running write).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::memkeys::MemKeys;
use crate::runs::{self, KeyHash, Run};
use crate::{io_err, keys, SpoolError};

/// Keys held in memory before they are written out as runs (~5 MiB for GUID keys).
pub const MEM_MAX_KEYS: usize = 65_536;

/// The most bytes of keys one dedup log entry holds (119 GUID keys of 33 bytes; a blob's keys take as
/// many entries as they need: 84 for 10,000). Every value the spool gives sled stays far below sled's blob threshold (a page over a
/// quarter of its 512 KiB segment goes to a file of its own, which sled never syncs and whose loss its
/// recovery skips: `tests/sled_crash_prefix.rs`); a leaf of 17 entries this size is ~70 KiB.
pub const LOG_ENTRY_MAX_BYTES: usize = 4096;

/// The dedup window of a spool. Not synchronised: the spool holds it under its lock.
pub struct DedupWindow {
    files: RunFiles,
    /// Keys logged and not yet in a run or being written, by day.
    mem: BTreeMap<u32, MemKeys>,
    mem_keys: usize,
    /// Keys in memory that trigger writing runs ([`MEM_MAX_KEYS`]; tests lower it).
    mem_max_keys: usize,
    next_log: u64,
    /// The write of frozen keys running on its own thread, if any.
    writing: Option<Writing>,
    /// Format-2 and format-1 day trees left by older versions: read until they expire.
    legacy: Legacy,
}

/// The run files of a window and the number the next one gets. A write works on its own copy (the runs
/// are shared, read through their open files) and hands it back; the window adopts it whole.
#[derive(Clone)]
struct RunFiles {
    dir: PathBuf,
    /// Runs, oldest (day, seq) first.
    runs: Vec<Arc<Run>>,
    next_run: u64,
}

/// Keys frozen out of memory and being written as runs on their own thread.
struct Writing {
    /// The frozen keys by day: still looked up until the runs holding them are adopted.
    frozen: Arc<BTreeMap<u32, MemKeys>>,
    frozen_keys: usize,
    /// Log entries numbered below this hold only keys that are frozen or already in runs.
    log_below: u64,
    thread: JoinHandle<Written>,
}

/// What a write hands back: the run files as it left them, and whether every frozen key is in them.
type Written = (RunFiles, Result<(), SpoolError>);

struct Legacy {
    db: sled::Db,
    v2: BTreeMap<u32, sled::Tree>,
    v1: BTreeMap<u32, sled::Tree>,
}

impl Legacy {
    fn open(db: &sled::Db) -> Result<Legacy, SpoolError> {
        let (mut v2, mut v1) = (BTreeMap::new(), BTreeMap::new());
        for name in db.tree_names() {
            if let Some(day) = keys::seen2_tree_day(&name) {
                v2.insert(day, db.open_tree(&name)?);
            } else if let Some(day) = keys::seen_tree_day(&name) {
                v1.insert(day, db.open_tree(&name)?);
            }
        }
        Ok(Legacy {
            db: db.clone(),
            v2,
            v1,
        })
    }
}

/// Drops the day trees of `days` older than `oldest_kept` (tree names by `name`); returns their days.
fn drop_days_before(
    db: &sled::Db,
    days: &mut BTreeMap<u32, sled::Tree>,
    oldest_kept: u32,
    name: fn(u32) -> String,
) -> Result<Vec<u32>, SpoolError> {
    let old: Vec<u32> = days.range(..oldest_kept).map(|(d, _)| *d).collect();
    for d in &old {
        days.remove(d);
        db.drop_tree(name(*d))?;
    }
    Ok(old)
}

/// The log key of entry `seq` of `day`: `L` + day (u32 BE) + seq (u64 BE).
fn log_key(day: u32, seq: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = keys::DEDUP_LOG;
    k[1..5].copy_from_slice(&day.to_be_bytes());
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The (day, seq) of a log key; `None` for a malformed one.
fn parse_log_key(k: &[u8]) -> Option<(u32, u64)> {
    if k.len() != 13 {
        return None;
    }
    let day = u32::from_be_bytes(k[1..5].try_into().ok()?);
    let seq = u64::from_be_bytes(k[5..].try_into().ok()?);
    Some((day, seq))
}

impl DedupWindow {
    /// Opens the window of a spool: the runs in `dir` (created when missing; unfinished `.tmp` files of
    /// an interrupted write are deleted), the log entries of `main` (back into memory), and the older
    /// formats' trees of `db`.
    pub fn open(db: &sled::Db, main: &sled::Tree, dir: &Path) -> Result<DedupWindow, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            } else if let Some(id) = runs::parse_name(&name) {
                found.push(id);
            }
        }
        found.sort_unstable();
        let runs = found
            .iter()
            .map(|(day, seq)| Run::open(dir, *day, *seq).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let next_run = found.iter().map(|(_, s)| s + 1).max().unwrap_or(1);
        let mut w = DedupWindow {
            files: RunFiles {
                dir: dir.to_path_buf(),
                runs,
                next_run,
            },
            mem: BTreeMap::new(),
            mem_keys: 0,
            mem_max_keys: MEM_MAX_KEYS,
            next_log: 1,
            writing: None,
            legacy: Legacy::open(db)?,
        };
        for kv in main.scan_prefix([keys::DEDUP_LOG]) {
            let (k, v) = kv?;
            let bad = || SpoolError::Corrupt(format!("dedup log entry {k:?} is malformed"));
            let (day, seq) = parse_log_key(&k).ok_or_else(bad)?;
            w.next_log = w.next_log.max(seq + 1);
            let keys = runs::keys_of(&v).ok_or_else(bad)?;
            w.remember(day, keys.into_iter().map(|k| (k, KeyHash::of(k))));
        }
        Ok(w)
    }

    fn remember<'k>(&mut self, day: u32, keys: impl Iterator<Item = (&'k [u8], KeyHash)>) {
        let set = self.mem.entry(day).or_default();
        for (k, h) in keys {
            if set.insert(k, h) {
                self.mem_keys += 1;
            }
        }
    }

    /// Whether the tenant's record Id was inserted on any day still in the window. `key` is
    /// [`keys::seen_key_v2`] of the pair. A miss costs a filter probe per run and a lookup per legacy
    /// day tree; a hit one block read.
    pub fn contains(
        &self,
        key: &[u8],
        tenant_id: &str,
        record_id: &str,
    ) -> Result<bool, SpoolError> {
        self.contains_hashed(key, KeyHash::of(key), tenant_id, record_id)
    }

    /// [`DedupWindow::contains`] of a key whose hash is `h`.
    pub(crate) fn contains_hashed(
        &self,
        key: &[u8],
        h: KeyHash,
        tenant_id: &str,
        record_id: &str,
    ) -> Result<bool, SpoolError> {
        let frozen = self.writing.iter().flat_map(|w| w.frozen.values());
        if self.mem.values().chain(frozen).any(|s| s.contains(key, h)) {
            return Ok(true);
        }
        for run in self.files.runs.iter().rev() {
            if run.contains(key, h)? {
                return Ok(true);
            }
        }
        for tree in self.legacy.v2.values().rev() {
            if tree.contains_key(key)? {
                return Ok(true);
            }
        }
        if !self.legacy.v1.is_empty() {
            let old = keys::seen_key(tenant_id, record_id);
            for tree in self.legacy.v1.values().rev() {
                if tree.contains_key(&old)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The log entries (key, value) that record `keys` as inserted on `day`, each holding at most
    /// [`LOG_ENTRY_MAX_BYTES`] of keys (a longer key alone): the caller writes them all in the batch
    /// that spools their records, then calls [`DedupWindow::logged`]. Their numbers are taken here:
    /// entries never written leave a gap in the numbering, which nothing minds.
    pub fn log_entries<K: AsRef<[u8]>>(
        &mut self,
        day: u32,
        keys: &[K],
    ) -> Vec<([u8; 13], Vec<u8>)> {
        let mut entries = Vec::new();
        let mut v = Vec::with_capacity(LOG_ENTRY_MAX_BYTES);
        for k in keys {
            let k = k.as_ref();
            // A key is written as its LEB128 length (at most 10 bytes) and its bytes.
            if !v.is_empty() && v.len() + 10 + k.len() > LOG_ENTRY_MAX_BYTES {
                let full = std::mem::replace(&mut v, Vec::with_capacity(LOG_ENTRY_MAX_BYTES));
                entries.push((log_key(day, self.next_log), full));
                self.next_log += 1;
            }
            runs::put_key(&mut v, k);
        }
        if !v.is_empty() {
            entries.push((log_key(day, self.next_log), v));
            self.next_log += 1;
        }
        entries
    }

    /// After the batch holding [`DedupWindow::log_entries`] committed: the keys count as seen.
    pub fn logged<K: AsRef<[u8]>>(&mut self, day: u32, keys: &[K]) {
        self.logged_hashed(
            day,
            keys.iter().map(|k| (k.as_ref(), KeyHash::of(k.as_ref()))),
        );
    }

    /// [`DedupWindow::logged`] of keys with their hashes.
    pub(crate) fn logged_hashed<'k>(
        &mut self,
        day: u32,
        keys: impl Iterator<Item = (&'k [u8], KeyHash)>,
    ) {
        self.remember(day, keys);
    }

    /// Adopts a finished write of runs, and when memory holds [`MEM_MAX_KEYS`] keys, freezes them and
    /// starts writing them out as runs on a thread of their own (waiting first for a write still
    /// running). Only once the log entries of every key in memory are durable: a run file is never
    /// ahead of the blobs whose keys it holds. An error leaves the keys in memory and in the log.
    pub fn write_runs_if_full(&mut self, main: &sled::Tree) -> Result<(), SpoolError> {
        self.adopt_written(main, false)?;
        if self.mem_keys >= self.mem_max_keys {
            self.adopt_written(main, true)?;
            self.start_writing(main);
        }
        Ok(())
    }

    /// Writes every key in memory out as runs (durably), then deletes the log entries they came from,
    /// then merges runs (see the module header); returns once done. On an error, what was not written
    /// stays in memory and logged.
    pub fn write_runs(&mut self, main: &sled::Tree) -> Result<(), SpoolError> {
        self.adopt_written(main, true)?;
        self.start_writing(main);
        self.adopt_written(main, true)
    }

    /// Waits for a write of runs that is running, and adopts it (tests and benchmarks: a figure that
    /// does not depend on timing).
    pub fn wait_for_runs(&mut self, main: &sled::Tree) -> Result<(), SpoolError> {
        self.adopt_written(main, true)
    }

    /// Freezes the keys in memory and writes them as runs on a new thread; on this one if no thread
    /// can be started (the write is then adopted at once; its error is logged, the keys stay).
    fn start_writing(&mut self, main: &sled::Tree) {
        let frozen = Arc::new(std::mem::take(&mut self.mem));
        let frozen_keys = std::mem::take(&mut self.mem_keys);
        let log_below = self.next_log;
        let (mut files, keys) = (self.files.clone(), frozen.clone());
        let spawned = std::thread::Builder::new()
            .name("dedup-runs".into())
            .spawn(move || {
                let result = files.write(&keys);
                (files, result)
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                log::debug!(target: "spool", "no thread for the dedup run write ({e}); writing here");
                let mut files = self.files.clone();
                let result = files.write(&frozen);
                let written = (files, result);
                if let Err(e) = self.adopt(written, &frozen, log_below, main) {
                    log::warn!(target: "spool", "writing the dedup window's run files failed: {e}");
                }
                return;
            }
        };
        self.writing = Some(Writing {
            frozen,
            frozen_keys,
            log_below,
            thread,
        });
    }

    /// Adopts the running write once it has finished (at once when `wait`, after waiting for it).
    fn adopt_written(&mut self, main: &sled::Tree, wait: bool) -> Result<(), SpoolError> {
        let Some(w) = self.writing.take_if(|w| wait || w.thread.is_finished()) else {
            return Ok(());
        };
        let written = w.thread.join().unwrap_or_else(|_| {
            let panicked = SpoolError::Corrupt("the dedup run writer panicked".into());
            (self.files.clone(), Err(panicked))
        });
        self.adopt(written, &w.frozen, w.log_below, main)
    }

    /// Takes the run files a write left. If it wrote every frozen key, deletes the log entries below
    /// `log_below`; if not, the frozen keys go back into memory (written again next time; their log
    /// entries stay).
    fn adopt(
        &mut self,
        (files, result): Written,
        frozen: &BTreeMap<u32, MemKeys>,
        log_below: u64,
        main: &sled::Tree,
    ) -> Result<(), SpoolError> {
        self.files = files;
        if let Err(e) = result {
            for (day, set) in frozen {
                let keys = set.sorted();
                self.remember(*day, keys.into_iter().map(|k| (k, KeyHash::of(k))));
            }
            return Err(e);
        }
        let mut batch = sled::Batch::default();
        for k in main.scan_prefix([keys::DEDUP_LOG]).keys() {
            let k = k?;
            if parse_log_key(&k).is_some_and(|(_, seq)| seq < log_below) {
                batch.remove(k);
            }
        }
        main.apply_batch(batch)?;
        Ok(())
    }

    /// Inserts `keys` as inserted on `day` outside any blob (bulk loading: benches and tools), durable
    /// once `main`'s database is flushed.
    pub fn insert(
        &mut self,
        day: u32,
        keys: &[Vec<u8>],
        main: &sled::Tree,
    ) -> Result<(), SpoolError> {
        let mut batch = sled::Batch::default();
        for (k, v) in self.log_entries(day, keys) {
            batch.insert(&k[..], v);
        }
        main.apply_batch(batch)?;
        self.logged(day, keys);
        self.write_runs_if_full(main)
    }

    /// Drops every day before `oldest_kept`: its runs are deleted, its keys in memory and its log
    /// entries forgotten, and older formats' trees dropped. Returns how many days it dropped.
    pub fn expire_before(
        &mut self,
        oldest_kept: u32,
        main: &sled::Tree,
    ) -> Result<usize, SpoolError> {
        self.adopt_written(main, true)?;
        let mut days: HashSet<u32> = HashSet::new();
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.files.runs)
            .into_iter()
            .partition(|r| r.day < oldest_kept);
        self.files.runs = keep;
        for r in old {
            days.insert(r.day);
            r.remove()?;
        }
        let mem_old: Vec<u32> = self.mem.range(..oldest_kept).map(|(d, _)| *d).collect();
        if !mem_old.is_empty() {
            for d in &mem_old {
                if let Some(set) = self.mem.remove(d) {
                    self.mem_keys -= set.len();
                }
                days.insert(*d);
            }
            let mut batch = sled::Batch::default();
            for k in main.range(log_key(0, 0)..log_key(oldest_kept, 0)).keys() {
                batch.remove(k?);
            }
            main.apply_batch(batch)?;
        }
        let l = &mut self.legacy;
        for d in drop_days_before(&l.db, &mut l.v2, oldest_kept, keys::seen2_tree_name)? {
            days.insert(d);
        }
        for d in drop_days_before(&l.db, &mut l.v1, oldest_kept, keys::seen_tree_name)? {
            days.insert(d);
        }
        Ok(days.len())
    }

    /// After the spool switched to a new sled generation (reclaim): the older formats' trees are read from
    /// `db` now. Runs and memory stay (the log entries were copied with the rest).
    pub fn switch_db(&mut self, db: &sled::Db) -> Result<(), SpoolError> {
        self.legacy = Legacy::open(db)?;
        Ok(())
    }

    /// Lowers the number of keys in memory that triggers writing runs (tests).
    #[cfg(test)]
    pub(crate) fn set_mem_max_keys(&mut self, n: usize) {
        self.mem_max_keys = n;
    }

    /// The days held (any format), oldest first, each once.
    pub fn days(&self) -> Vec<u32> {
        let frozen = self.writing.iter().flat_map(|w| w.frozen.keys().copied());
        let mut d: Vec<u32> = self
            .files
            .runs
            .iter()
            .map(|r| r.day)
            .chain(self.mem.keys().copied())
            .chain(frozen)
            .chain(self.legacy.v2.keys().copied())
            .chain(self.legacy.v1.keys().copied())
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// What the window holds, for benchmarks and tests.
    pub fn figures(&self) -> WindowFigures {
        let runs = &self.files.runs;
        WindowFigures {
            keys_in_memory: self.mem_keys,
            keys_being_written: self.writing.as_ref().map_or(0, |w| w.frozen_keys),
            runs: runs.len(),
            keys_in_runs: runs.iter().map(|r| r.keys).sum(),
            run_memory_bytes: runs.iter().map(|r| r.memory()).sum(),
        }
    }
}

impl Drop for DedupWindow {
    /// Waits for a running write, so that no file of the window changes once it is dropped (a reopen
    /// in the same process must not race it). Its keys' log entries stay: the next open reads them.
    fn drop(&mut self) {
        if let Some(w) = self.writing.take() {
            if w.thread.join().is_err() {
                log::warn!(target: "spool", "the dedup run writer panicked");
            }
        }
    }
}

impl RunFiles {
    /// Writes the `frozen` keys out as runs, one per day (durably), then merges runs (see the module
    /// header). On an error the runs list what is on disk so far.
    fn write(&mut self, frozen: &BTreeMap<u32, MemKeys>) -> Result<(), SpoolError> {
        for (day, set) in frozen {
            let run = Run::write(&self.dir, *day, self.next_run, &set.sorted())?;
            self.next_run += 1;
            self.runs.push(Arc::new(run));
            self.merge_day(*day)?;
        }
        // A day that is over (a newer one has runs) is merged into a single run, once.
        let newest = self.runs.iter().map(|r| r.day).max().unwrap_or(0);
        let mut closed: Vec<u32> = self
            .runs
            .iter()
            .map(|r| r.day)
            .filter(|d| *d < newest)
            .collect();
        closed.sort_unstable();
        closed.dedup();
        for day in closed {
            self.merge_all(day)?;
        }
        Ok(())
    }

    /// Merges every run of `day` into one (when it has more than one).
    fn merge_all(&mut self, day: u32) -> Result<(), SpoolError> {
        let of_day: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| r.day == day)
            .map(|r| &**r)
            .collect();
        if of_day.len() < 2 {
            return Ok(());
        }
        let merged = runs::merge(&self.dir, day, self.next_run, &of_day)?;
        self.next_run += 1;
        self.replace_runs(day, merged)
    }

    /// Puts `merged` (of `day`) in place of the day's other runs, then deletes their files.
    fn replace_runs(&mut self, day: u32, merged: Run) -> Result<(), SpoolError> {
        let (old, mut keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.runs)
            .into_iter()
            .partition(|r| r.day == day && r.seq < merged.seq);
        let at = keep.partition_point(|r| (r.day, r.seq) < (day, merged.seq));
        keep.insert(at, Arc::new(merged));
        self.runs = keep;
        for r in old {
            r.remove()?;
        }
        Ok(())
    }

    /// Merges the two newest runs of `day` while the newer holds at least half as many keys as the older.
    /// The merged run is durable before the two are deleted.
    fn merge_day(&mut self, day: u32) -> Result<(), SpoolError> {
        loop {
            let of_day: Vec<usize> = (0..self.runs.len())
                .filter(|i| self.runs[*i].day == day)
                .collect();
            let [.., a, b] = of_day[..] else {
                return Ok(());
            };
            if self.runs[b].keys * 2 < self.runs[a].keys {
                return Ok(());
            }
            let merged = runs::merge(
                &self.dir,
                day,
                self.next_run,
                &[&self.runs[a], &self.runs[b]],
            )?;
            self.next_run += 1;
            let newer = self.runs.remove(b);
            let older = self.runs.remove(a);
            let at = self
                .runs
                .partition_point(|r| (r.day, r.seq) < (day, merged.seq));
            self.runs.insert(at, Arc::new(merged));
            newer.remove()?;
            older.remove()?;
        }
    }
}

/// What a [`DedupWindow`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowFigures {
    /// Keys logged and held in memory, not yet in a run file nor being written to one.
    pub keys_in_memory: usize,
    /// Keys frozen in memory while a thread writes them to run files.
    pub keys_being_written: usize,
    /// Run files.
    pub runs: usize,
    /// Keys in run files (a key can be in two runs after a crash between a merge and its deletions).
    pub keys_in_runs: u64,
    /// Memory the runs' indexes and filters take.
    pub run_memory_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u32) -> Vec<u8> {
        keys::seen_key_v2("t", &format!("id-{i}"))
    }

    /// Opens the window's database, through the spool's own opener (which waits out the lock of a
    /// handle dropped a moment ago).
    fn open(dir: &Path) -> (sled::Db, sled::Tree, DedupWindow) {
        let db = crate::gen::open(dir, 0, 8 << 20).expect("sled").db;
        let main = db.open_tree("main").expect("main");
        let w = DedupWindow::open(&db, &main, &dir.join("dedup")).expect("open");
        (db, main, w)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Against a set: every key inserted is found, before and after a reopen (a crash: whatever was
        /// in memory comes back from the log), through runs and their merges; nothing else is.
        #[test]
        fn finds_exactly_what_was_inserted(
            blobs in prop::collection::vec((0u32..3, prop::collection::vec(0u32..400, 1..40)), 1..40),
            mem_max in 1usize..60,
            reopen_at in 0usize..40,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let (mut db, mut main, mut w) = open(dir.path());
            w.mem_max_keys = mem_max;
            let mut model: HashSet<Vec<u8>> = HashSet::new();
            for (n, (day, ids)) in blobs.iter().enumerate() {
                if n == reopen_at {
                    db.flush().expect("flush");
                    drop((w, main, db));
                    (db, main, w) = open(dir.path());
                    w.mem_max_keys = mem_max;
                }
                let new: HashSet<Vec<u8>> =
                    ids.iter().map(|i| key(*i)).filter(|k| !model.contains(k)).collect();
                let new: Vec<Vec<u8>> = new.into_iter().collect();
                for k in &new {
                    let found = w.contains(k, "t", "").expect("contains");
                    prop_assert!(!found, "a key never inserted was found");
                }
                w.insert(20_000 + day, &new, &main).expect("insert");
                model.extend(new);
            }
            for i in 0..400 {
                let k = key(i);
                prop_assert_eq!(w.contains(&k, "t", "").expect("contains"), model.contains(&k), "key {}", i);
            }
            let f = w.figures();
            prop_assert!(f.runs <= 3 * 8, "runs are merged: {} runs", f.runs);
            prop_assert!(f.keys_in_runs as usize <= model.len() * 2);
        }
    }

    /// After a complete run write: no log entry is left, every key of `keys` is found, `absent` is not.
    fn assert_log_deleted_and_found(
        w: &DedupWindow,
        main: &sled::Tree,
        keys: &[Vec<u8>],
        absent: &[u8],
    ) {
        assert_eq!(
            main.scan_prefix([keys::DEDUP_LOG]).count(),
            0,
            "log deleted"
        );
        for k in keys {
            assert!(w.contains(k, "t", "").expect("contains"));
        }
        assert!(!w.contains(absent, "t", "").expect("contains"));
    }

    #[test]
    fn a_crash_between_the_run_and_the_log_deletion_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
        {
            let (db, main, mut w) = open(dir.path());
            w.mem_max_keys = usize::MAX;
            w.insert(20_000, &keys, &main).expect("insert");
            // The runs are written; the crash comes before the log entries are deleted.
            let day_keys: Vec<&[u8]> = {
                let mut k: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                k.sort_unstable();
                k
            };
            Run::write(&w.files.dir, 20_000, w.files.next_run, &day_keys).expect("run");
            db.flush().expect("flush");
        }
        let (_, main, mut w) = open(dir.path());
        assert_eq!(
            w.figures().keys_in_memory,
            100,
            "the log came back into memory"
        );
        assert_eq!(w.figures().runs, 1, "and the run is there");
        w.write_runs(&main).expect("write runs");
        assert_log_deleted_and_found(&w, &main, &keys, &key(100));
    }

    /// A run write that fails (here: the run directory is gone, a file in its place) hands its keys back
    /// to memory with their log entries kept; they are still found, and the next write succeeds.
    #[test]
    fn a_failed_run_write_keeps_its_keys_in_memory_and_in_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_db, main, mut w) = open(dir.path());
        w.mem_max_keys = 10;
        let runs_dir = dir.path().join("dedup");
        std::fs::remove_dir(&runs_dir).expect("rmdir");
        std::fs::write(&runs_dir, b"not a directory").expect("file");
        let keys: Vec<Vec<u8>> = (0..25).map(key).collect();
        w.insert(20_000, &keys, &main)
            .expect("insert starts the write");
        let err = w.wait_for_runs(&main).expect_err("the write failed");
        assert!(err.to_string().contains("dedup"), "{err}");
        let f = w.figures();
        assert_eq!((f.keys_in_memory, f.keys_being_written, f.runs), (25, 0, 0));
        assert_eq!(main.scan_prefix([keys::DEDUP_LOG]).count(), 1, "log kept");
        for k in &keys {
            assert!(w.contains(k, "t", "").expect("contains"));
        }
        std::fs::remove_file(&runs_dir).expect("rm");
        std::fs::create_dir(&runs_dir).expect("mkdir");
        w.write_runs(&main).expect("written now");
        let f = w.figures();
        assert_eq!((f.keys_in_memory, f.runs, f.keys_in_runs), (0, 1, 25));
        assert_log_deleted_and_found(&w, &main, &keys, &key(25));
    }

    #[test]
    fn expiry_deletes_whole_days_and_a_damaged_run_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_db, main, mut w) = open(dir.path());
        w.mem_max_keys = 10;
        for day in 20_000..20_003u32 {
            let keys: Vec<Vec<u8>> = (day * 100..day * 100 + 25).map(key).collect();
            w.insert(day, &keys, &main).expect("insert");
        }
        w.insert(20_003, &[key(1)], &main).expect("insert");
        assert_eq!(w.days(), vec![20_000, 20_001, 20_002, 20_003]);
        assert_eq!(w.expire_before(20_002, &main).expect("expire"), 2);
        assert_eq!(w.days(), vec![20_002, 20_003]);
        assert!(!w.contains(&key(2_000_000), "t", "").expect("contains"));
        assert!(w.contains(&key(2_000_200), "t", "").expect("contains"));
        let files: Vec<String> = std::fs::read_dir(dir.path().join("dedup"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(files.iter().all(|f| f.starts_with("20002-")), "{files:?}");
        // A run cut short (a damaged disk) is refused by name, not read as fewer keys.
        let victim = dir.path().join("dedup").join(&files[0]);
        let len = std::fs::metadata(&victim).expect("meta").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .and_then(|f| f.set_len(len - 3))
            .expect("truncate");
        drop(w);
        let db = sled::Config::new()
            .path(dir.path().join("db2"))
            .open()
            .expect("sled");
        let main2 = db.open_tree("main").expect("main");
        let err = DedupWindow::open(&db, &main2, &dir.path().join("dedup"))
            .err()
            .expect("refused");
        assert!(err.to_string().contains(&files[0]), "{err}");
    }
}

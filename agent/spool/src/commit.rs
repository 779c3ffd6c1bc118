//! Group commit: how [`Spool::commit_blob`] turns concurrent collectors' blobs into as few syncs as the
//! durability contract allows.
//!
//! - A commit checks its records against the dedup window under the spool's lock if the lock is free
//!   (else the group's writer checks them), then builds and compresses its chunks outside the lock
//!   ([`BuiltChunks`]), so that concurrent collectors use every core; a commit building alone
//!   compresses a blob of several chunks on up to 4 threads, so that a lone collector does too.
//! - It then queues itself and takes the lock. Whoever holds the lock takes every queued commit as one
//!   group: its chunk references, done-marks, cursors and dedup log entries become ONE atomic sled
//!   batch, written with the group's frames as one WAL record (`wal.rs`) in one append and one
//!   `fdatasync`, then applied to sled. A queued commit finds its outcome when it gets the lock, so a
//!   commit still returns only once its own records are durable.
//! - Chunk numbers are given in queue order under the lock, so chunk and segment numbers still grow
//!   together (the segment GC's rule).
//! - A commit whose Ids another commit logged since its check is checked again: the Ids that commit
//!   spooled are dropped as duplicates here, and its chunks are built again without them. Two commits
//!   of one group sharing an Id are not written together: the later one waits for the next round and
//!   is checked against the window then (so an Id of a group that failed is never dropped).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sensor_core::envelope::Envelope;

use crate::keys::BlobKeys;
use crate::runs::KeyHash;
use crate::wal::{self, Ops, WalPos};
use crate::{
    chunk, day_of, done_value, json, keys, locked, now_ms, now_unix, segments, BlobCommit,
    CommitOutcome, Cursor, DoneKind, Inner, Spool, SpoolError,
};

/// A blob's new records as chunks (envelope lines, zstd frames), not yet numbered nor stored.
pub(crate) struct BuiltChunks {
    /// Header and frame of each chunk, in record order.
    chunks: Vec<(chunk::ChunkHeader, Vec<u8>)>,
}

impl BuiltChunks {
    /// Bytes of NDJSON in all the chunks.
    fn raw_total(&self) -> u64 {
        self.chunks.iter().map(|(h, _)| u64::from(h.raw_len)).sum()
    }

    /// Envelopes and compresses the records `fresh` marks, in order, cut at the chunk limits. The
    /// chunks are built on up to `threads` threads; where they are cut does not depend on it.
    fn build(
        c: &BlobCommit<'_>,
        fresh: &[bool],
        threads: usize,
    ) -> Result<BuiltChunks, SpoolError> {
        let envelope = Envelope::new(c.tenant_id, c.content_type, c.content_id, c.collected_at);
        let records: Vec<&[u8]> = c
            .records
            .iter()
            .zip(fresh)
            .filter(|(_, f)| **f)
            .map(|(r, _)| r.bytes)
            .collect();
        let cuts = chunk_cuts(&envelope, &records);
        let appended_ms = now_ms();
        let seal = |range: &Range<usize>| -> Result<(chunk::ChunkHeader, Vec<u8>), SpoolError> {
            let part = &records[range.clone()];
            let mut lines = Vec::with_capacity(part.iter().map(|r| envelope.len_of(r)).sum());
            for r in part {
                envelope.write(&mut lines, r);
            }
            let h = chunk::ChunkHeader {
                records: part.len() as u32,
                raw_len: lines.len() as u32,
                appended_ms,
            };
            Ok((h, chunk::compress(&lines)?))
        };
        let per_thread = cuts.len().div_ceil(threads.max(1)).max(1);
        let chunks: Vec<_> = std::thread::scope(|s| {
            let mut groups = cuts.chunks(per_thread);
            let first = groups.next().unwrap_or_default();
            let seal = &seal;
            // A group whose thread cannot be started (a task limit, memory) is built here instead.
            let others: Vec<_> = groups
                .map(|g| {
                    spawn_build(s, move || g.iter().map(seal).collect::<Vec<_>>()).map_err(|_| g)
                })
                .collect();
            let mut chunks: Vec<_> = first.iter().map(seal).collect();
            for other in others {
                match other.map(|thread| thread.join()) {
                    Ok(Ok(built)) => chunks.extend(built),
                    Ok(Err(panic)) => std::panic::resume_unwind(panic),
                    Err(g) => chunks.extend(g.iter().map(seal)),
                }
            }
            chunks
        });
        let chunks = chunks.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(BuiltChunks { chunks })
    }
}

/// Starts a thread of [`BuiltChunks::build`].
fn spawn_build<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, T>> {
    #[cfg(test)]
    if tests::FAIL_SPAWN.with(|fail| fail.get()) {
        return Err(std::io::Error::other("injected: no thread"));
    }
    std::thread::Builder::new()
        .name("spool-build".into())
        .spawn_scoped(s, f)
}

/// Where a blob's records are cut into chunks: after the record that brings a chunk to
/// [`chunk::MAX_RAW`] bytes of envelope lines or to [`chunk::MAX_RECORDS`] records.
fn chunk_cuts(envelope: &Envelope, records: &[&[u8]]) -> Vec<Range<usize>> {
    let mut cuts = Vec::new();
    let (mut start, mut raw) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        raw += envelope.len_of(r);
        if raw >= chunk::MAX_RAW || i + 1 - start >= chunk::MAX_RECORDS {
            cuts.push(start..i + 1);
            (start, raw) = (i + 1, 0);
        }
    }
    if start < records.len() {
        cuts.push(start..records.len());
    }
    cuts
}

/// A commit counted in `Spool::building` while it builds its chunks. Only a commit that started building
/// alone uses more than one thread: concurrent commits keep the cores busy already.
struct Building<'a> {
    count: &'a AtomicUsize,
    /// No other commit was building when this one started.
    alone: bool,
}

impl<'a> Building<'a> {
    fn enter(count: &'a AtomicUsize) -> Building<'a> {
        let before = count.fetch_add(1, Ordering::SeqCst);
        Building {
            count,
            alone: before == 0,
        }
    }
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A commit waiting in the queue: what the group's writer needs of it, owned.
pub(crate) struct Queued {
    tenant_id: String,
    /// `<tenant>/<content type>`.
    source: String,
    content_id: String,
    expires_unix: i64,
    cursor: Option<Cursor>,
    /// Record Ids and dedup keys of all the blob's records.
    keys: BlobKeys,
    /// The records that were new at the last check (the built chunks hold exactly these).
    fresh: Vec<bool>,
    /// `Inner::commits` at that check.
    checked_at: u64,
    built: BuiltChunks,
    /// Where the writer leaves what became of the commit.
    outcome: Arc<Mutex<Option<Outcome>>>,
}

impl Queued {
    /// The keys (and hashes) of the records this commit spools.
    fn fresh_keys(&self) -> impl Iterator<Item = (&[u8], KeyHash)> {
        (0..self.keys.len())
            .filter(|i| self.fresh[*i])
            .map(|i| self.keys.key(i))
    }
}

/// `Queued::checked_at` of a commit not yet checked against the window (never equal to `Inner::commits`).
const UNCHECKED: u64 = u64::MAX;

/// What became of a queued commit.
enum Outcome {
    /// Written (or failed) with its group.
    Done(Result<CommitOutcome, SpoolError>),
    /// Some of its Ids were spooled by another commit since its check: build again with these.
    /// The keys come back with it.
    Rebuild {
        fresh: Vec<bool>,
        checked_at: u64,
        keys: BlobKeys,
    },
}

/// Tests: how many commits wait in the queue.
#[cfg(test)]
pub(crate) fn queued(spool: &Spool) -> usize {
    locked(&spool.queue).len()
}

impl Inner {
    /// Which of the blob's records are new: among those `candidates` marks, the ones whose Id is not in
    /// the dedup window.
    fn not_in_window(
        &self,
        tenant_id: &str,
        keys: &BlobKeys,
        candidates: &[bool],
    ) -> Result<Vec<bool>, SpoolError> {
        let mut fresh = Vec::with_capacity(keys.len());
        for (i, candidate) in candidates.iter().enumerate() {
            let (key, h) = keys.key(i);
            fresh.push(*candidate && !self.seen.contains_hashed(key, h, tenant_id, keys.id(i))?);
        }
        Ok(fresh)
    }
}

impl Spool {
    /// Commits one blob atomically (see the module header and `commit.rs`). Records whose Id is in the
    /// dedup window, or repeated within the blob, are dropped and counted. Returns only once the blob's
    /// records, done-mark and cursor are durable.
    pub fn commit_blob(&self, c: &BlobCommit<'_>) -> Result<CommitOutcome, SpoolError> {
        let mut keys = BlobKeys::new(c.tenant_id, c.records.iter().map(|r| r.id));
        // A repeat within the blob is a duplicate of its first occurrence.
        let first = keys.first_of_each();
        // Checked against the window now if the lock is free; if a group is being written, by the next
        // group's writer instead (a blob of duplicates is then built in vain, never spooled).
        let (mut fresh, mut checked_at) = match self.inner.try_lock() {
            Ok(inner) => (
                inner.not_in_window(c.tenant_id, &keys, &first)?,
                inner.commits,
            ),
            Err(_) => (first, UNCHECKED),
        };
        loop {
            let built = {
                let building = Building::enter(&self.building);
                let threads = if building.alone {
                    self.build_threads
                } else {
                    1
                };
                BuiltChunks::build(c, &fresh, threads)?
            };
            let outcome = Arc::new(Mutex::new(None));
            locked(&self.queue).push(Queued {
                tenant_id: c.tenant_id.to_string(),
                source: format!("{}/{}", c.tenant_id, c.content_type),
                content_id: c.content_id.to_string(),
                expires_unix: c.expires_unix,
                cursor: c.cursor.cloned(),
                keys,
                fresh,
                checked_at,
                built,
                outcome: outcome.clone(),
            });
            let mut inner = self.lock();
            if locked(&outcome).is_none() {
                self.write_queued(&mut inner);
            }
            drop(inner);
            let taken = locked(&outcome).take();
            match taken {
                Some(Outcome::Done(result)) => return result,
                Some(Outcome::Rebuild {
                    fresh: again,
                    checked_at: at,
                    keys: back,
                }) => {
                    (fresh, checked_at, keys) = (again, at, back);
                }
                None => {
                    return Err(SpoolError::Corrupt(format!(
                        "the commit of blob {} was left unwritten",
                        c.content_id
                    )))
                }
            }
        }
    }

    /// Under the lock: writes every queued commit, in rounds of commits that share no Id.
    fn write_queued(&self, inner: &mut Inner) {
        let mut pending = std::mem::take(&mut *locked(&self.queue));
        while !pending.is_empty() {
            let mut round: Vec<Queued> = Vec::new();
            let mut later = Vec::new();
            // Hashes of the round's new Ids (a collision only moves a commit to the next round).
            let mut round_keys: HashSet<u64> = HashSet::new();
            for mut q in pending {
                if inner.commits != q.checked_at {
                    let again = inner.not_in_window(&q.tenant_id, &q.keys, &q.fresh);
                    match again {
                        Err(e) => {
                            *locked(&q.outcome) = Some(Outcome::Done(Err(e)));
                            continue;
                        }
                        Ok(again) if again != q.fresh => {
                            *locked(&q.outcome) = Some(Outcome::Rebuild {
                                fresh: again,
                                checked_at: inner.commits,
                                keys: q.keys,
                            });
                            continue;
                        }
                        Ok(_) => q.checked_at = inner.commits,
                    }
                }
                let hashes: Vec<u64> = q.fresh_keys().map(|(_, h)| h.word()).collect();
                if hashes.iter().any(|h| round_keys.contains(h)) {
                    later.push(q);
                    continue;
                }
                round_keys.extend(hashes);
                round.push(q);
            }
            let result = self.write_group(inner, &round);
            for (q, r) in round.iter().zip(result) {
                *locked(&q.outcome) = Some(Outcome::Done(r));
            }
            pending = later;
        }
    }

    /// Writes one group of commits that share no new Id: one segment append, one atomic batch, one
    /// durability point. Returns each commit's outcome, in order.
    fn write_group(
        &self,
        inner: &mut Inner,
        group: &[Queued],
    ) -> Vec<Result<CommitOutcome, SpoolError>> {
        match self.write_group_once(inner, group) {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(e) => {
                let copies: Vec<_> = (1..group.len()).map(|_| Err(copy_error(&e))).collect();
                std::iter::once(Err(e)).chain(copies).collect()
            }
        }
    }

    fn write_group_once(
        &self,
        inner: &mut Inner,
        group: &[Queued],
    ) -> Result<Vec<CommitOutcome>, SpoolError> {
        if group.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(why) = &inner.wal_broken {
            return Err(SpoolError::Corrupt(format!(
                "commits are refused until the spool is opened again: {why}"
            )));
        }
        let today = day_of(now_unix());
        let mut figures = inner.figures.clone();
        let mut next_chunk = inner.next_chunk;
        let mut numbered: Vec<u64> = Vec::new();
        let mut frames: Vec<&[u8]> = Vec::new();
        let mut headers: Vec<&chunk::ChunkHeader> = Vec::new();
        let mut new_ids: Vec<(&[u8], KeyHash)> = Vec::new();
        let mut cursors: HashMap<&str, Cursor> = HashMap::new();
        let mut outcomes = Vec::with_capacity(group.len());
        for q in group {
            let spooled = q.fresh.iter().filter(|f| **f).count() as u64;
            for (h, frame) in &q.built.chunks {
                numbered.push(next_chunk);
                next_chunk += 1;
                headers.push(h);
                frames.push(frame);
                figures.stored_bytes += frame.len() as u64;
            }
            figures.pending_records += spooled;
            figures.unbatched_records += spooled;
            let raw_total = q.built.raw_total();
            figures.pending_raw_bytes += raw_total;
            figures.unbatched_raw_bytes += raw_total;
            new_ids.extend(q.fresh_keys());
            if let Some(new) = &q.cursor {
                let old = match cursors.remove(q.source.as_str()) {
                    Some(c) => Some(c),
                    None => self.cursor_by_source(&q.source)?,
                };
                cursors.insert(&q.source, merged_cursor(&q.source, old, new));
            }
            outcomes.push(CommitOutcome {
                spooled,
                duplicates: q.keys.len() as u64 - spooled,
            });
        }
        let figures_json = json(&figures);
        let new_keys: Vec<&[u8]> = new_ids.iter().map(|(k, _)| *k).collect();
        let log_entries = inner.seen.log_entries(today, &new_keys);
        let seq = inner.wal_seq + 1;
        // ONE sled batch for the group (as atomic as a transaction, also across a crash: sled seals it),
        // written first into the group's WAL record with the frames (`wal.rs`).
        let mut batch = None;
        let ops = |at: WalPos, locs: &[segments::Loc]| {
            let mut ops = Ops::default();
            for ((seq, h), loc) in numbered.iter().zip(&headers).zip(locs) {
                ops.insert(
                    &keys::seq_key(keys::CHUNK, *seq),
                    &chunk::encode_ref(h, *loc),
                );
            }
            for (source, c) in &cursors {
                ops.insert(&keys::cursor_key(source), &json(c));
            }
            for q in group {
                ops.insert(
                    &keys::done_key(&q.source, &q.content_id),
                    &done_value(q.expires_unix, DoneKind::Spooled),
                );
            }
            ops.insert(
                &keys::meta_key(keys::meta::NEXT_CHUNK),
                &next_chunk.to_be_bytes(),
            );
            ops.insert(&keys::meta_key(keys::meta::FIGURES), &figures_json);
            for (k, v) in &log_entries {
                ops.insert(k, v);
            }
            ops.insert(&wal::marker_key(), &at.encode());
            let (b, bytes) = ops.into_parts();
            batch = Some(b);
            bytes
        };
        let g = self.g();
        let base = wal::base_of(&g.main)?;
        let fail_sync = self.injected_sync_failure();
        let appended = inner
            .segments
            .append_group((seq, base), &frames, ops, fail_sync);
        inner.wal_seq = seq;
        if let Err(e) = appended {
            // The record may be whole on disk although its sync failed: never replay it.
            self.skip_failed_group(inner);
            return Err(e);
        }
        // The group is durable: each blob is named as durable (durability.rs reads these).
        for q in group {
            log::trace!(target: "durability", "durable: blob {} {}", q.source, q.content_id);
        }
        let batch = batch.ok_or_else(|| SpoolError::Corrupt("a group without its batch".into()))?;
        g.main.apply_batch(batch)?;
        // The batch is applied: the memory follows it before anything can fail, or the next
        // commit would reuse its chunk numbers.
        inner.next_chunk = next_chunk;
        inner.figures = figures;
        inner.commits += 1;
        if !new_ids.is_empty() {
            if inner.oldest_unbatched.is_none() {
                inner.oldest_unbatched = Some(std::time::Instant::now());
            }
            inner.seen.logged_hashed(today, new_ids.iter().copied());
        }
        let unsynced = self.sled_unsynced.fetch_add(1, Ordering::SeqCst) + 1;
        if unsynced >= wal::SLED_SYNC_EVERY {
            self.make_durable(&format!("sled, up to group {seq}"))?;
        }
        if let Err(e) = inner.seen.write_runs_if_full(&g.main) {
            // The keys stay in memory and in the log: nothing is lost, the next commit tries again.
            log::warn!(target: "spool", "writing the dedup window's run files failed: {e}");
        }
        Ok(outcomes)
    }
}

/// The cursor to store for `source`: `new`, never moved back behind `old`.
pub(crate) fn merged_cursor(source: &str, old: Option<Cursor>, new: &Cursor) -> Cursor {
    let mut merged = new.clone();
    if let Some(old) = old {
        if old.listed_until > new.listed_until {
            log::warn!(
                "cursor of {source} would move back from {} to {}; kept",
                old.listed_until,
                new.listed_until
            );
            merged.listed_until = old.listed_until;
        }
        merged.first_content_seen |= old.first_content_seen;
    }
    merged
}

/// The same error again, for each commit of a group that failed together.
fn copy_error(e: &SpoolError) -> SpoolError {
    let io = |s: &std::io::Error| std::io::Error::new(s.kind(), s.to_string());
    match e {
        SpoolError::Locked(p) => SpoolError::Locked(p.clone()),
        SpoolError::Io { path, source } => SpoolError::Io {
            path: path.clone(),
            source: io(source),
        },
        SpoolError::Db(e) => SpoolError::Db(e.clone()),
        SpoolError::Codec(e) => SpoolError::Codec(io(e)),
        SpoolError::Corrupt(s) => SpoolError::Corrupt(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RawRecord;

    thread_local! {
        /// Tests: threads of `BuiltChunks::build` cannot be started (as under a task limit).
        pub(super) static FAIL_SPAWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Chunks built on several threads are the chunks one thread builds: cut at the same records, in
    /// record order, within the limits, and their lines are the records' envelopes in order; also when
    /// the threads cannot be started.
    #[test]
    fn chunks_built_on_threads_are_the_chunks_of_one_thread() {
        let bodies: Vec<(String, Vec<u8>)> = (0..1_500u32)
            .map(|i| {
                let pad = "x".repeat(200 + (i as usize * 37) % 3_000);
                let json = format!("{{\"Id\":\"id-{i}\",\n\"pad\":\"{pad}\"}}");
                (format!("id-{i}"), json.into_bytes())
            })
            .collect();
        let records: Vec<RawRecord<'_>> = bodies
            .iter()
            .map(|(id, bytes)| RawRecord { id, bytes })
            .collect();
        let c = BlobCommit {
            tenant_id: "t",
            content_type: "Audit.General",
            content_id: "blob",
            expires_unix: 0,
            collected_at: "2026-11-25T10:00:00Z",
            records: &records,
            cursor: None,
        };
        // Every third record is a duplicate, so the cuts count only the fresh ones.
        let fresh: Vec<bool> = (0..records.len()).map(|i| i % 3 != 0).collect();
        let lines_of = |b: &BuiltChunks| -> Vec<(u32, Vec<u8>)> {
            b.chunks
                .iter()
                .map(|(h, frame)| {
                    let lines = chunk::decompress(h, frame).expect("frame");
                    (h.records, lines)
                })
                .collect()
        };
        let one = BuiltChunks::build(&c, &fresh, 1).expect("one thread");
        let want = lines_of(&one);
        assert!(want.len() >= 6, "{} chunks", want.len());
        for (records, lines) in &want {
            assert!(*records as usize <= chunk::MAX_RECORDS);
            assert!(lines.len() < chunk::MAX_RAW + 4_000);
            assert_eq!(chunk::records(lines).count(), *records as usize);
        }
        let envelope = Envelope::new(c.tenant_id, c.content_type, c.content_id, c.collected_at);
        let mut all = Vec::new();
        for (r, _) in records.iter().zip(&fresh).filter(|(_, f)| **f) {
            envelope.write(&mut all, r.bytes);
        }
        let joined: Vec<&[u8]> = want.iter().map(|(_, lines)| lines.as_slice()).collect();
        assert_eq!(joined.concat(), all);
        assert_eq!(one.raw_total(), all.len() as u64);
        for threads in [2, 3, 4, 64] {
            let many = BuiltChunks::build(&c, &fresh, threads).expect("threads");
            assert_eq!(lines_of(&many), want, "{threads} threads");
            assert_eq!(many.raw_total(), one.raw_total());
        }
        // Threads that cannot be started: the same chunks, built on this one.
        FAIL_SPAWN.with(|fail| fail.set(true));
        let here = BuiltChunks::build(&c, &fresh, 4);
        FAIL_SPAWN.with(|fail| fail.set(false));
        assert_eq!(lines_of(&here.expect("no threads")), want);
    }
}

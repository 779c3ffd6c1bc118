//! Segments: append-only files that hold the chunks' zstd frames outside sled
//! (`<spool>/segments/<n>.seg`), so that sled holds only small values (chunk references, batches,
//! metadata) and its memory, which follows the bytes it has written (spacejam/sled#1093), stays small
//! under a multi-gigabyte backlog. They are also the commits' write-ahead log: a group of commits is one
//! record (header, frames, the group's sled batch as operations: `wal.rs`).
//!
//! Invariants:
//! - A group's record is written, and its segment file `fdatasync`ed (with the directory, for a new
//!   file), before its sled batch is applied: a reference never points at bytes that are not durable,
//!   and a batch sled lost is applied again from the record at the next open.
//! - A segment is only appended to, by the one process that holds the spool's lock, and only in the run
//!   that created it: every open starts a new segment, so a torn tail of a crashed run is never
//!   extended, and bytes no reference points at (a commit that failed or crashed) are simply never read.
//!   It is deleted only when no chunk is stored at all, and the next append then starts a new one.
//! - Chunk numbers and segment numbers grow together, so every segment before the one holding the oldest
//!   stored chunk holds nothing still referenced: [`Segments::remove_before`] deletes those whole files.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::wal::{self, WalPos};
use crate::{io_err, SpoolError};

/// A segment is closed, and the next frame starts a new file, once it holds this many bytes (tests use
/// small segments, so that their spools span several).
pub(crate) const SEGMENT_BYTES: u64 = if cfg!(test) { 16 << 10 } else { 32 << 20 };

/// With no chunk stored, the segment being appended to is kept below this size (a spool that empties
/// after every small live batch does not create and delete a file each time).
pub(crate) const ACTIVE_KEPT_MAX: u64 = 1 << 20;

/// Where a frame lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// The segment's number.
    pub segment: u64,
    /// The frame's first byte in the segment.
    pub offset: u64,
    /// The frame's length.
    pub len: u32,
    /// CRC-32 of the frame, checked on every read.
    pub crc: u32,
}

/// The segment files of one spool. Appends need `&mut` (the spool's lock); reads only the directory.
pub(crate) struct Segments {
    dir: PathBuf,
    /// The segments on disk, in order (the active one included).
    on_disk: BTreeSet<u64>,
    /// The segment this run appends to, and its length; none before the first append.
    active: Option<(u64, File, u64)>,
    /// The number the next new segment gets.
    next: u64,
}

/// The number of a segment's file name (`<n>.seg`).
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

/// The file of segment `n`.
pub(crate) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n}.seg"))
}

impl Segments {
    /// Opens the segment directory (created when missing). Nothing is appended to an existing segment,
    /// and new segments are numbered after every file on disk and after `referenced` (the newest segment
    /// a stored chunk names), so a number is never reused while a reference to it may exist.
    pub(crate) fn open(dir: &Path, referenced: Option<u64>) -> Result<Segments, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut on_disk = BTreeSet::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match parse_name(&name) {
                Some(n) => {
                    on_disk.insert(n);
                }
                None => {
                    log::warn!(target: "spool", "{}: not a segment file; left alone", entry.path().display())
                }
            }
        }
        let next = on_disk.last().copied().max(referenced).map_or(0, |n| n + 1);
        Ok(Segments {
            dir: dir.to_path_buf(),
            on_disk,
            active: None,
            next,
        })
    }

    /// Appends one group as a WAL record (`wal.rs`) with sequence number `seq`, written against sled's
    /// state `base`: its header, `frames` in order, then the operations `ops` builds from the record's
    /// position and the frames' locations; then makes it durable (file, and the directory for a new
    /// file). A group never spans two segments: one that is full is closed first. After a failed write or sync the segment is abandoned (its length in memory may no longer
    /// match the file's): the next append starts a new one. `fail_sync` (tests) fails the `fdatasync`
    /// after everything was written, as a disk error would.
    pub(crate) fn append_group(
        &mut self,
        (seq, base): (u64, u32),
        frames: &[&[u8]],
        ops: impl FnOnce(WalPos, &[Loc]) -> Vec<u8>,
        fail_sync: bool,
    ) -> Result<Vec<Loc>, SpoolError> {
        let result = self.append_to_active((seq, base), frames, ops, fail_sync);
        if result.is_err() {
            self.active = None;
        }
        result
    }

    fn append_to_active(
        &mut self,
        (seq, base): (u64, u32),
        frames: &[&[u8]],
        ops: impl FnOnce(WalPos, &[Loc]) -> Vec<u8>,
        fail_sync: bool,
    ) -> Result<Vec<Loc>, SpoolError> {
        if matches!(&self.active, Some((_, _, len)) if *len >= SEGMENT_BYTES) {
            self.active = None;
        }
        let mut new_file = false;
        if self.active.is_none() {
            let n = self.next;
            let path = segment_path(&self.dir, n);
            let file = File::options()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            self.next += 1;
            self.on_disk.insert(n);
            self.active = Some((n, file, 0));
            new_file = true;
        }
        let Some((n, file, len)) = self.active.as_mut() else {
            return Err(SpoolError::Corrupt("no segment to append to".into()));
        };
        let path = segment_path(&self.dir, *n);
        let at = WalPos {
            seq,
            segment: *n,
            offset: *len,
        };
        let mut locs = Vec::with_capacity(frames.len());
        let mut offset = *len + wal::HEADER_LEN;
        let mut frames_crc = crc32fast::Hasher::new();
        for frame in frames {
            let frame_len = u32::try_from(frame.len())
                .map_err(|_| SpoolError::Corrupt(format!("a frame of {} bytes", frame.len())))?;
            let mut h = crc32fast::Hasher::new();
            h.update(frame);
            let crc = h.clone().finalize();
            frames_crc.combine(&h);
            locs.push(Loc {
                segment: *n,
                offset,
                len: frame_len,
                crc,
            });
            offset += u64::from(frame_len);
        }
        let frames_len = offset - *len - wal::HEADER_LEN;
        let ops = ops(at, &locs);
        let header = wal::header(&wal::Header {
            seq,
            frames_len,
            ops_len: u32::try_from(ops.len())
                .map_err(|_| SpoolError::Corrupt(format!("a batch of {} bytes", ops.len())))?,
            frames_crc: frames_crc.finalize(),
            ops_crc: crc32fast::hash(&ops),
            base,
        });
        file.write_all(&header).map_err(io_err(&path))?;
        for frame in frames {
            file.write_all(frame).map_err(io_err(&path))?;
        }
        file.write_all(&ops).map_err(io_err(&path))?;
        *len = offset + ops.len() as u64;
        if fail_sync {
            return Err(io_err(&path)(std::io::Error::other(
                "injected fdatasync failure",
            )));
        }
        file.sync_data().map_err(io_err(&path))?;
        if new_file {
            crate::gen::sync_dir(&self.dir)?;
        }
        Ok(locs)
    }

    /// The number the next new segment gets (where the WAL resumes after an open or a failed append).
    pub(crate) fn next_number(&self) -> u64 {
        self.next
    }

    /// How many segments [`Segments::remove_before`] would delete.
    pub(crate) fn removable(&self, first_live: Option<u64>) -> usize {
        self.stale(first_live).count()
    }

    fn stale(&self, first_live: Option<u64>) -> impl Iterator<Item = u64> + '_ {
        // With a chunk stored, the active segment is at or after its segment anyway; kept explicitly.
        // With none, it goes once it is worth a new file (not after every small live batch).
        let active = match &self.active {
            Some((_, _, len)) if first_live.is_none() && *len >= ACTIVE_KEPT_MAX => None,
            Some((n, _, _)) => Some(*n),
            None => None,
        };
        let bound = first_live.unwrap_or(u64::MAX);
        self.on_disk
            .iter()
            .copied()
            .filter(move |&n| n < bound && Some(n) != active)
    }

    /// Deletes every segment before `first_live`, the segment of the oldest stored chunk, except the one
    /// being appended to; with `None` (no chunk is stored) every segment, the one being appended to
    /// included once it holds [`ACTIVE_KEPT_MAX`] bytes (the next append starts a new one). Returns how
    /// many files were deleted.
    pub(crate) fn remove_before(&mut self, first_live: Option<u64>) -> Result<usize, SpoolError> {
        let stale: Vec<u64> = self.stale(first_live).collect();
        if matches!(&self.active, Some((n, _, _)) if stale.contains(n)) {
            self.active = None;
        }
        for n in &stale {
            let path = segment_path(&self.dir, *n);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            self.on_disk.remove(n);
        }
        Ok(stale.len())
    }
}

/// Reads the frame at `loc` from the segments in `dir`, checking its length and CRC.
pub(crate) fn read(dir: &Path, loc: Loc) -> Result<Vec<u8>, SpoolError> {
    let path = segment_path(dir, loc.segment);
    let file = File::open(&path).map_err(io_err(&path))?;
    let mut buf = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset)
        .map_err(io_err(&path))?;
    if crc32fast::hash(&buf) != loc.crc {
        return Err(SpoolError::Corrupt(format!(
            "{}: the frame at byte {} ({} bytes) fails its CRC",
            path.display(),
            loc.offset,
            loc.len
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Segments {
        /// One group of `frames` with no operations.
        fn append(&mut self, frames: &[&[u8]]) -> Result<Vec<Loc>, SpoolError> {
            self.append_group((1, 0), frames, |_, _| Vec::new(), false)
        }
    }

    #[test]
    fn frames_read_back_and_a_flipped_byte_is_refused() {
        let d = tempfile::tempdir().expect("dir");
        let mut s = Segments::open(d.path(), None).expect("open");
        let locs = s.append(&[b"first", b"second"]).expect("append");
        assert_eq!(read(d.path(), locs[0]).expect("read"), b"first");
        assert_eq!(read(d.path(), locs[1]).expect("read"), b"second");
        let path = segment_path(d.path(), locs[1].segment);
        let mut bytes = std::fs::read(&path).expect("file");
        bytes[locs[1].offset as usize] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let err = read(d.path(), locs[1]).expect_err("corrupt");
        assert!(err.to_string().contains("CRC"), "{err}");
    }

    #[test]
    fn a_reopen_starts_a_new_segment_and_old_ones_go_whole() {
        let d = tempfile::tempdir().expect("dir");
        let first = Segments::open(d.path(), None)
            .and_then(|mut s| s.append(&[b"a"]))
            .expect("append");
        let mut s = Segments::open(d.path(), None).expect("reopen");
        let second = s.append(&[b"b"]).expect("append");
        assert!(second[0].segment > first[0].segment);
        // Nothing before the segment of the oldest live chunk is referenced.
        assert_eq!(s.remove_before(Some(second[0].segment)).expect("gc"), 1);
        assert!(read(d.path(), first[0]).is_err());
        // The active segment stays while a chunk may be in it, and goes when none is stored.
        assert_eq!(s.remove_before(Some(second[0].segment)).expect("gc"), 0);
        assert_eq!(read(d.path(), second[0]).expect("read"), b"b");
        let fill = vec![1u8; ACTIVE_KEPT_MAX as usize];
        assert_eq!(s.remove_before(None).expect("gc"), 0, "small: kept");
        s.append(&[&fill]).expect("fill");
        assert_eq!(s.remove_before(None).expect("gc"), 1);
        let third = s.append(&[b"c"]).expect("append after");
        assert!(third[0].segment > second[0].segment);
        assert_eq!(read(d.path(), third[0]).expect("read"), b"c");
    }

    #[test]
    fn numbers_are_not_reused_while_a_reference_may_name_them() {
        let d = tempfile::tempdir().expect("dir");
        let mut s = Segments::open(d.path(), Some(41)).expect("open");
        assert_eq!(s.append(&[b"x"]).expect("append")[0].segment, 42);
    }

    #[test]
    fn a_full_segment_is_closed_and_the_next_group_starts_a_new_one() {
        let d = tempfile::tempdir().expect("dir");
        let mut s = Segments::open(d.path(), None).expect("open");
        let big = vec![7u8; SEGMENT_BYTES as usize];
        // A group is never cut: both frames in one segment, past its nominal size.
        let locs = s.append(&[&big, b"tail"]).expect("append");
        assert_eq!(locs[0].segment, locs[1].segment);
        let next = s.append(&[b"next"]).expect("append");
        assert_eq!(locs[0].segment + 1, next[0].segment);
        assert_eq!(next[0].offset, wal::HEADER_LEN);
        assert_eq!(read(d.path(), next[0]).expect("read"), b"next");
        assert_eq!(read(d.path(), locs[1]).expect("read"), b"tail");
    }
}

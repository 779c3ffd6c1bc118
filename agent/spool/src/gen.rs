//! Generations of the spool's sled database, so that disk space is given back after a drain: sled
//! never shrinks its file, so [`crate::Spool`] copies the little that is left after a drain (metadata,
//! cursors, done-marks, quarantine, the dedup window) into a fresh database and switches to it.
//!
//! Layout: generation 0 is sled's files directly in `<dir>` (every spool written before generations
//! existed); generation n ≥ 1 is `<dir>/gen-<n>/`. `<dir>/CURRENT` names the generation in use
//! (`gen-<n>\n`); without it, generation 0 is in use.
//!
//! Crash safety: the switch is the atomic rename of `CURRENT.tmp` over `CURRENT` (file and directory
//! fsynced first), made only after the new generation is complete and fdatasynced. A crash before the
//! rename leaves the old generation in use (the half-built new one is removed at the next open); a crash
//! after it leaves the new one in use (the old one is removed at the next open). Nothing in the old
//! generation is changed while the new one is built, and the copy holds the spool's lock, so no commit
//! can fall between the two.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{io_err, SpoolError};

/// The pointer file's name.
pub(crate) const CURRENT: &str = "CURRENT";
const CURRENT_TMP: &str = "CURRENT.tmp";

/// One open generation.
pub(crate) struct Gen {
    /// Its number.
    pub n: u64,
    /// Its sled directory.
    pub path: PathBuf,
    /// The database.
    pub db: sled::Db,
    /// Its main tree.
    pub main: sled::Tree,
    /// sled's data file, opened for `fdatasync`.
    sync_file: File,
    /// The files in sled's `blobs/` known to be durable (see [`Gen::make_durable`]).
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

impl Gen {
    /// The durability point of this generation: sled's flush (which only issues `sync_file_range`,
    /// see `shared/design/crate-notes.md`), then an `fsync` of every file in sled's `blobs/` not synced
    /// before and of that directory, then a real `fdatasync` of sled's data file. sled writes a page over
    /// a quarter of its segment to a blob file it never syncs, and its recovery skips a log entry whose
    /// blob file is missing; the spool's values are kept far too small for that
    /// ([`crate::dedup::LOG_ENTRY_MAX_BYTES`]), so the blob files synced here are those of spools
    /// written before that (their large values, copied by a reclaim, too).
    pub(crate) fn make_durable(&self) -> Result<(), SpoolError> {
        self.db.flush()?;
        self.sync_blob_files()?;
        let data = self.path.join("db");
        self.sync_file.sync_data().map_err(io_err(&data))
    }

    fn sync_blob_files(&self) -> Result<(), SpoolError> {
        let dir = self.path.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut synced = crate::locked(&self.synced_blobs);
        let mut new = false;
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            if synced.contains(&name) {
                continue;
            }
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(io_err(&path))?,
                // sled removed it meanwhile (a value it no longer needs).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
            synced.insert(name);
            new = true;
        }
        if new {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

/// The sled directory of generation `n`.
pub(crate) fn gen_path(dir: &Path, n: u64) -> PathBuf {
    if n == 0 {
        dir.to_path_buf()
    } else {
        dir.join(format!("gen-{n}"))
    }
}

/// The generation `CURRENT` names (0 without it).
pub(crate) fn current(dir: &Path) -> Result<u64, SpoolError> {
    let p = dir.join(CURRENT);
    match std::fs::read_to_string(&p) {
        Ok(s) => s
            .trim()
            .strip_prefix("gen-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| SpoolError::Corrupt(format!("{}: {s:?} is not gen-<n>", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(&p)(e)),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// How long [`open`] waits for a handle of this process, dropped a moment ago, to let go of sled's lock.
const OWN_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens generation `n` (created when missing) with sled's cache bounded to `cache_bytes`. The caller
/// holds the spool's `LOCK`, so sled's own lock can only be held by this process's previous handle
/// (sled's background threads let go of it a moment after the last handle is dropped): that conflict is
/// waited out for up to [`OWN_LOCK_WAIT`], any other error is returned at once.
pub(crate) fn open(dir: &Path, n: u64, cache_bytes: u64) -> Result<Gen, SpoolError> {
    let path = gen_path(dir, n);
    std::fs::create_dir_all(&path).map_err(io_err(&path))?;
    let deadline = Instant::now() + OWN_LOCK_WAIT;
    let db = loop {
        match sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other?,
        }
    };
    let data_path = path.join("db");
    let sync_file = File::open(&data_path).map_err(io_err(&data_path))?;
    sync_dir(&path)?;
    let main = db.open_tree("main")?;
    Ok(Gen {
        n,
        path,
        db,
        main,
        sync_file,
        synced_blobs: Default::default(),
    })
}

/// Makes generation `n` the one in use: the atomic switch (see the module header).
pub(crate) fn set_current(dir: &Path, n: u64) -> Result<(), SpoolError> {
    let tmp = dir.join(CURRENT_TMP);
    {
        use std::io::Write;
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(format!("gen-{n}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
    }
    let cur = dir.join(CURRENT);
    std::fs::rename(&tmp, &cur).map_err(io_err(&cur))?;
    sync_dir(dir)
}

/// sled's own files in a generation-0 directory (never the lock, `CURRENT` or other generations).
fn is_sled_file(name: &str) -> bool {
    matches!(name, "db" | "conf" | "blobs") || name.starts_with("snap.")
}

/// Removes every generation but `keep` (left-overs of a switch or of an interrupted copy).
pub(crate) fn remove_others(dir: &Path, keep: u64) -> Result<(), SpoolError> {
    let rd = std::fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let stale = match name
            .strip_prefix("gen-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(n) => n != keep,
            None => keep != 0 && is_sled_file(&name),
        };
        if stale {
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(io_err(&path))?;
        }
    }
    let tmp = dir.join(CURRENT_TMP);
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(io_err(&tmp))?;
    }
    sync_dir(dir)
}

/// Copies every tree of `from` into `to` (batches of 10,000 keys), then makes `to` durable.
pub(crate) fn copy_all(from: &Gen, to: &Gen) -> Result<u64, SpoolError> {
    let mut keys = 0u64;
    for name in from.db.tree_names() {
        if name.as_ref() == b"__sled__default" {
            continue;
        }
        let src = from.db.open_tree(&name)?;
        let dst = to.db.open_tree(&name)?;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in src.iter() {
            let (k, v) = kv?;
            batch.insert(k, v);
            n += 1;
            if n == 10_000 {
                dst.apply_batch(std::mem::take(&mut batch))?;
                keys += n;
                n = 0;
            }
        }
        dst.apply_batch(batch)?;
        keys += n;
    }
    to.make_durable()?;
    sync_dir(&to.path)?;
    Ok(keys)
}

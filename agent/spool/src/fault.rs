//! Host faults under the spool: the one classification of a [`SpoolError`] into what an operator must
//! fix (a full or read-only filesystem, a failing disk, damaged spool files), with the facts that name
//! it (the filesystem and its free bytes, the file, what was found).
//!
//! Invariant: every spool error that reaches the status goes through [`classify`]; nothing else decides
//! whether a spool error is the disk's, the filesystem's or the spool's own. A [`Fault`] is about the
//! host or the spool's files, never about Microsoft or the backend.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use sensor_core::status::State;

use crate::SpoolError;

/// What kind of host fault stopped the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The filesystem has no space left (ENOSPC, EDQUOT): not the spool's own cap (`spool_full`).
    DiskFull,
    /// The filesystem is read-only (EROFS), e.g. remounted so by the kernel after an error.
    ReadOnly,
    /// The disk failed a read or a write (EIO and other I/O errors).
    DiskError,
    /// The spool's files are not what it wrote (a torn or flipped database, a bad segment).
    Damaged,
    /// Another agent holds the spool's lock.
    Locked,
}

impl FaultKind {
    /// The status state of this kind (the `spool` component's).
    pub fn state(self) -> State {
        match self {
            FaultKind::DiskFull => State::DiskFull,
            FaultKind::ReadOnly => State::DiskReadOnly,
            FaultKind::DiskError => State::DiskError,
            FaultKind::Damaged => State::SpoolDamaged,
            FaultKind::Locked => State::SpoolLocked,
        }
    }
}

/// One classified spool failure. Invariant: `detail` names the filesystem or the file at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The kind.
    pub kind: FaultKind,
    /// For the status: the filesystem (mount point, type, free bytes) or the file, and what was found.
    pub detail: String,
    /// The error as the system or the spool said it.
    pub error: String,
}

/// The I/O error inside `e`, if any (sled's own I/O errors included).
fn io_of(e: &SpoolError) -> Option<&std::io::Error> {
    match e {
        SpoolError::Io { source, .. } => Some(source),
        SpoolError::Codec(source) => Some(source),
        SpoolError::Db(sled::Error::Io(source)) => Some(source),
        _ => None,
    }
}

/// The kind of an I/O error: by errno first, then by `ErrorKind` (errors rebuilt without their errno),
/// then by the error it wraps.
pub fn io_kind(e: &std::io::Error) -> FaultKind {
    match e.raw_os_error() {
        Some(n) if n == nix::libc::ENOSPC => return FaultKind::DiskFull,
        Some(n) if n == nix::libc::EDQUOT => return FaultKind::DiskFull,
        Some(n) if n == nix::libc::EROFS => return FaultKind::ReadOnly,
        Some(_) => return FaultKind::DiskError,
        None => {}
    }
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => FaultKind::DiskFull,
        ErrorKind::ReadOnlyFilesystem => FaultKind::ReadOnly,
        ErrorKind::InvalidData | ErrorKind::UnexpectedEof => FaultKind::Damaged,
        _ => match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
        {
            Some(inner) => io_kind(inner),
            None => {
                // sled rebuilds some I/O errors as text: the system's words still say which.
                let text = e.to_string();
                if text.contains("No space left on device") {
                    FaultKind::DiskFull
                } else if text.contains("Read-only file system") {
                    FaultKind::ReadOnly
                } else {
                    FaultKind::DiskError
                }
            }
        },
    }
}

/// Classifies `e`, an error of the spool in `dir`: the one place that decides which host fault a spool
/// error is, and what the status says about it.
pub fn classify(e: &SpoolError, dir: &Path) -> Fault {
    let error = e.to_string();
    let path: PathBuf = match e {
        SpoolError::Io { path, .. } => path.clone(),
        _ => dir.to_path_buf(),
    };
    let kind = match e {
        SpoolError::Locked(_) => FaultKind::Locked,
        SpoolError::Corrupt(_) => FaultKind::Damaged,
        SpoolError::Db(sled::Error::Io(io)) => io_kind(io),
        SpoolError::Db(_) => FaultKind::Damaged,
        _ => io_of(e).map(io_kind).unwrap_or(FaultKind::DiskError),
    };
    let detail = match kind {
        FaultKind::DiskFull => match filesystem_of(&path) {
            Some(fs) => format!(
                "the filesystem {} ({}) holding {} has {} bytes free",
                fs.mount_point.display(),
                fs.fs_type,
                path.display(),
                fs.free_bytes
            ),
            None => format!("the filesystem holding {} is full", path.display()),
        },
        FaultKind::ReadOnly => match filesystem_of(&path) {
            Some(fs) => format!(
                "the filesystem {} ({}) holding {} is read-only",
                fs.mount_point.display(),
                fs.fs_type,
                path.display()
            ),
            None => format!("the filesystem holding {} is read-only", path.display()),
        },
        FaultKind::DiskError => format!("I/O error on {}", path.display()),
        FaultKind::Damaged => format!("damaged spool data in {}: {error}", dir.display()),
        FaultKind::Locked => format!("{} is locked by another process", dir.display()),
    };
    Fault {
        kind,
        detail,
        error,
    }
}

/// A mounted filesystem as the status names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filesystem {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Its type (`ext4`, `tmpfs`, ...).
    pub fs_type: String,
    /// Bytes an unprivileged writer can still use (statvfs `f_bavail × f_frsize`).
    pub free_bytes: u64,
}

/// The filesystem holding `path` (its nearest existing ancestor): the longest mount point of
/// `/proc/self/mounts` above it, and its free bytes from `statvfs`. `None` when neither can be read.
pub fn filesystem_of(path: &Path) -> Option<Filesystem> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let canonical = p.canonicalize().ok()?;
    let vfs = nix::sys::statvfs::statvfs(&canonical).ok()?;
    let free_bytes = (vfs.blocks_available() as u64).saturating_mul(vfs.fragment_size() as u64);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let (mount_point, fs_type) = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let _dev = f.next()?;
            let mp = unescape_mount(f.next()?);
            let ty = f.next()?.to_string();
            canonical.starts_with(&mp).then_some((mp, ty))
        })
        .max_by_key(|(mp, _)| mp.as_os_str().len())
        .unwrap_or_else(|| (PathBuf::from("/"), "unknown".into()));
    Some(Filesystem {
        mount_point,
        fs_type,
        free_bytes,
    })
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount(s: &str) -> PathBuf {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
        .into()
}

/// Bytes [`probe`] writes: one page of sled's and a segment's smallest growth.
pub const PROBE_BYTES: usize = 64 * 1024;

/// Whether the filesystem under `dir` takes a write now: writes, `fdatasync`s and removes
/// `<dir>/.probe` ([`PROBE_BYTES`]). The error is the system's, classified by [`classify`] through
/// [`SpoolError::Io`].
pub fn probe(dir: &Path) -> Result<(), SpoolError> {
    let path = dir.join(".probe");
    let io = |source| SpoolError::Io {
        path: path.clone(),
        source,
    };
    let result = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(&[0u8; PROBE_BYTES])?;
            f.sync_data()
        })
        .map_err(io);
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_decides_the_kind_and_the_detail_names_the_path() {
        let dir = Path::new("/nonexistent-spool-dir/spool");
        let io = |n: i32| SpoolError::Io {
            path: dir.join("segments/7.seg"),
            source: std::io::Error::from_raw_os_error(n),
        };
        assert_eq!(
            classify(&io(nix::libc::ENOSPC), dir).kind,
            FaultKind::DiskFull
        );
        assert_eq!(
            classify(&io(nix::libc::EROFS), dir).kind,
            FaultKind::ReadOnly
        );
        let eio = classify(&io(nix::libc::EIO), dir);
        assert_eq!(eio.kind, FaultKind::DiskError);
        assert!(eio.detail.contains("segments/7.seg"), "{}", eio.detail);
        let sled_full = SpoolError::Db(sled::Error::Io(std::io::Error::from_raw_os_error(
            nix::libc::ENOSPC,
        )));
        assert_eq!(classify(&sled_full, dir).kind, FaultKind::DiskFull);
        let rebuilt = SpoolError::Db(sled::Error::Io(std::io::Error::other(
            std::io::Error::from_raw_os_error(nix::libc::EROFS),
        )));
        assert_eq!(classify(&rebuilt, dir).kind, FaultKind::ReadOnly);
        let damaged = classify(&SpoolError::Corrupt("batch_pos".into()), dir);
        assert_eq!(damaged.kind, FaultKind::Damaged);
        assert!(damaged.detail.contains("batch_pos") && damaged.detail.contains("/spool"));
        assert_eq!(FaultKind::DiskFull.state(), State::DiskFull);
    }

    #[test]
    fn the_filesystem_of_a_path_has_a_mount_point_and_free_bytes() {
        let d = tempfile::tempdir().expect("tempdir");
        let fs = filesystem_of(&d.path().join("not/yet/there")).expect("the tempdir's filesystem");
        let canonical = d.path().canonicalize().expect("canonical tempdir");
        assert!(canonical.starts_with(&fs.mount_point));
        assert!(fs.free_bytes > 0);
        probe(d.path()).expect("a writable tempdir takes the probe");
        assert!(!d.path().join(".probe").exists());
    }
}

//! In-process hardening, applied before anything else runs: inherited descriptors closed, umask 077, core
//! dumps off (`RLIMIT_CORE` 0 and `PR_SET_DUMPABLE` 0, so no secret can land in a crash dump),
//! `PR_SET_NO_NEW_PRIVS`, and no root: started as root, the agent creates its state directory, hands it to
//! the `m365-sensor` user and drops to that user and group; without such a user it refuses to run as root
//! unless `--allow-root` is given.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{Gid, Uid, User};

/// The service user.
pub const SERVICE_USER: &str = "m365-sensor";

/// Closes every descriptor above stderr that the process inherited.
pub fn close_inherited_fds() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // The directory handle used for listing is already closed; EBADF on it is harmless.
        let _ = nix::unistd::close(fd);
    }
}

/// Applies the process-wide limits and drops root (see the module header).
pub fn harden(state_dir: &Path, allow_root: bool) -> Result<()> {
    umask(Mode::from_bits_truncate(0o077));
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("setting RLIMIT_CORE to 0")?;
    nix::sys::prctl::set_dumpable(false).context("PR_SET_DUMPABLE")?;
    if Uid::effective().is_root() {
        match User::from_name(SERVICE_USER).context("looking up the service user")? {
            Some(user) => drop_to(&user, state_dir)?,
            None if allow_root => log::warn!(target: "agent", "running as root (--allow-root); create the `{SERVICE_USER}` user to run unprivileged"),
            None => bail!(
                "refusing to run as root: create the system user `{SERVICE_USER}` (the package and the image do) so the agent can drop to it, or pass --allow-root"
            ),
        }
    }
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
    Ok(())
}

fn drop_to(user: &User, state_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    chown_tree(state_dir, user.uid, user.gid)?;
    nix::unistd::setgroups(&[user.gid]).context("setgroups")?;
    nix::unistd::setgid(user.gid).context("setgid")?;
    nix::unistd::setuid(user.uid).context("setuid")?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("dropping root failed: the process could regain uid 0");
    }
    log::info!(target: "agent", "dropped root: running as {} ({}:{})", user.name, user.uid, user.gid);
    Ok(())
}

fn chown_tree(path: &Path, uid: Uid, gid: Gid) -> Result<()> {
    nix::unistd::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() && !path.is_symlink() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

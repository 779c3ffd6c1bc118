//! The status files and `m365-sensor status`. The agent writes its status document first to a runtime
//! directory that can be written when the state filesystem cannot (`$RUNTIME_DIRECTORY`, which
//! systemd's `RuntimeDirectory=m365-sensor` sets, else `/run/m365-sensor` when it exists: a tmpfs), then
//! persists it to `<state_dir>/status.json` when that filesystem takes the write. `status` reads the
//! newer of the two, says which it read and how old it is. Exit code: 0 ok, 1 degraded, 2 failed (and 2
//! when no status exists yet).
//!
//! Invariant: a full or read-only state filesystem never freezes what `status` shows while the runtime
//! directory is writable; a runtime copy written for another state directory is never shown.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use sensor_core::status::{Severity, StatusDocument};

/// The runtime directory of the status document: `$RUNTIME_DIRECTORY` (its first entry), else
/// `/run/m365-sensor` if it exists. `None`: the persisted copy alone.
pub fn runtime_dir() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("RUNTIME_DIRECTORY") {
        let first = v
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return Some(PathBuf::from(first));
        }
    }
    let run = PathBuf::from("/run/m365-sensor");
    run.is_dir().then_some(run)
}

/// Where the status document of one state directory lives.
pub struct StatusFiles {
    /// `<runtime_dir>/status.json`, written first.
    pub runtime: Option<PathBuf>,
    /// `<state_dir>/status.json`, the persisted copy.
    pub persisted: PathBuf,
}

impl StatusFiles {
    /// The files of `state_dir` in this environment.
    pub fn new(state_dir: &Path) -> Self {
        StatusFiles {
            runtime: runtime_dir().map(|d| d.join("status.json")),
            persisted: crate::agent::status_path(state_dir),
        }
    }
}

/// How often an unchanged status document is rewritten (its `updated_at` shows the agent is alive):
/// the runtime copy (a tmpfs) often, the persisted one rarely (fsyncs every second would wear flash).
const RUNTIME_REFRESH: Duration = Duration::from_secs(5);
const PERSIST_REFRESH: Duration = Duration::from_secs(30);

/// Writes the status files when the document changed or its refresh is due; logs a failing file once
/// per change of its error.
#[derive(Default)]
pub struct StatusWriter {
    runtime: Option<(StatusDocument, Instant)>,
    persisted: Option<(StatusDocument, Instant)>,
    runtime_error: Option<String>,
    persist_error: Option<String>,
}

fn same(a: &StatusDocument, b: &StatusDocument) -> bool {
    a.components == b.components
        && a.spool == b.spool
        && a.counters == b.counters
        && a.config == b.config
}

fn write_doc(path: &Path, doc: &StatusDocument, last_error: &mut Option<String>) -> bool {
    let result = serde_json::to_vec_pretty(doc)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::agent::write_atomic(path, &json)
        });
    match result {
        Ok(()) => {
            if last_error.take().is_some() {
                log::info!(target: "agent", "{} is written again", path.display());
            }
            true
        }
        Err(e) => {
            let text = e.to_string();
            if last_error.as_deref() != Some(text.as_str()) {
                log::warn!(target: "agent", "cannot write {}: {text}", path.display());
                *last_error = Some(text);
            }
            false
        }
    }
}

impl StatusWriter {
    /// Writes `doc` where it is due: the runtime copy first, then the persisted one.
    pub fn write(&mut self, files: &StatusFiles, doc: StatusDocument) {
        if let Some(path) = &files.runtime {
            let due = self
                .runtime
                .as_ref()
                .is_none_or(|(w, at)| !same(w, &doc) || at.elapsed() >= RUNTIME_REFRESH);
            if due && write_doc(path, &doc, &mut self.runtime_error) {
                self.runtime = Some((doc.clone(), Instant::now()));
            }
        }
        let due = self
            .persisted
            .as_ref()
            .is_none_or(|(w, at)| !same(w, &doc) || at.elapsed() >= PERSIST_REFRESH);
        if due && write_doc(&files.persisted, &doc, &mut self.persist_error) {
            self.persisted = Some((doc, Instant::now()));
        }
    }

    /// Writes `doc` to both files now (shutdown).
    pub fn write_final(&mut self, files: &StatusFiles, doc: StatusDocument) {
        if let Some(path) = &files.runtime {
            write_doc(path, &doc, &mut self.runtime_error);
        }
        write_doc(&files.persisted, &doc, &mut self.persist_error);
    }
}

/// The status document `status` shows for `state_dir`: the newer (by `updated_at`) of the runtime and
/// the persisted copy, with the path it was read from. A runtime copy of another state directory is
/// skipped.
pub fn read_newest(state_dir: &Path) -> Result<(StatusDocument, PathBuf), String> {
    read_newest_of(&StatusFiles::new(state_dir), state_dir)
}

/// [`read_newest`] over `files`.
fn read_newest_of(
    files: &StatusFiles,
    state_dir: &Path,
) -> Result<(StatusDocument, PathBuf), String> {
    let mut errors = Vec::new();
    let mut found: Vec<(StatusDocument, PathBuf)> = Vec::new();
    // The runtime copy last: of two copies equally new, it is the one shown.
    for path in std::iter::once(&files.persisted).chain(files.runtime.iter()) {
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<StatusDocument>(&bytes) {
                Ok(doc) => found.push((doc, path.clone())),
                Err(e) => errors.push(format!("{} is not a status document: {e}", path.display())),
            },
            Err(e) => errors.push(format!("no status at {}: {e}", path.display())),
        }
    }
    let wanted = state_dir.display().to_string();
    found.retain(|(doc, path)| {
        *path == files.persisted || doc.state_dir.as_deref().is_none_or(|d| d == wanted)
    });
    found
        .into_iter()
        .max_by_key(|(doc, _)| updated_unix(doc))
        .ok_or_else(|| errors.join("; "))
}

fn updated_unix(doc: &StatusDocument) -> i64 {
    sensor_core::timefmt::parse_api_time(&doc.updated_at)
        .map(|t| t.unix_timestamp())
        .unwrap_or(i64::MIN)
}

fn agent_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Prints the status; returns the exit code.
pub fn print_status(state_dir: &Path, json: bool) -> Result<i32> {
    let (doc, path) = match read_newest(state_dir) {
        Ok(found) => found,
        Err(why) => {
            eprintln!("{why}\nIs the agent running (systemctl status m365-sensor)? Is --config pointing at its configuration?");
            return Ok(2);
        }
    };
    let age = time::OffsetDateTime::now_utc().unix_timestamp() - updated_unix(&doc);
    if json {
        eprintln!("read {} ({age} s old)", path.display());
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(doc.overall.exit_code());
    }
    let running = if agent_alive(doc.pid) {
        "running".to_string()
    } else {
        format!("not running (last run, pid {})", doc.pid)
    };
    println!(
        "m365-sensor {} ({}) sensor {}: {} — agent {running}, updated {}",
        doc.version,
        doc.arch,
        doc.sensor_id,
        word(doc.overall),
        doc.updated_at
    );
    println!("status read from {} ({age} s old)", path.display());
    println!(
        "spool: {} records ({} compressed), {} on disk of {} ({} batches in flight, {} quarantined)",
        doc.spool.records,
        sensor_relay::human_bytes(doc.spool.bytes),
        sensor_relay::human_bytes(doc.spool.disk_bytes),
        sensor_relay::human_bytes(doc.spool.max_bytes),
        doc.spool.batches,
        doc.spool.quarantined
    );
    let c = &doc.counters;
    println!(
        "counters: {} fetched, {} spooled, {} duplicates dropped, {} delivered, {} blobs expired, {} quarantined",
        c.records_fetched, c.records_spooled, c.duplicates_dropped, c.records_delivered, c.blobs_expired, c.blobs_quarantined + c.batches_quarantined
    );
    for (name, s) in &doc.components {
        println!("  {name:<45} {:<26} since {}", s.state.name(), s.since);
        if let Some(d) = &s.detail {
            println!("      {d}");
        }
        if let Some(e) = &s.error {
            println!("      error: {e}");
        }
        if !s.fix.is_empty() && s.state.severity() != Severity::Ok {
            println!("      fix: {}", s.fix);
        }
    }
    Ok(doc.overall.exit_code())
}

fn word(s: Severity) -> &'static str {
    match s {
        Severity::Ok => "OK",
        Severity::Degraded => "DEGRADED",
        Severity::Failed => "FAILED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(updated_at: &str, state_dir: &str, pid: u32) -> StatusDocument {
        StatusDocument {
            overall: Severity::Ok,
            sensor_id: "s".into(),
            version: "v".into(),
            arch: "a".into(),
            updated_at: updated_at.into(),
            components: Default::default(),
            spool: Default::default(),
            counters: Default::default(),
            pid,
            uptime_secs: 0,
            config: Default::default(),
            tenants: Default::default(),
            state_dir: Some(state_dir.into()),
        }
    }

    #[test]
    fn the_newer_copy_is_shown_and_another_agents_runtime_copy_never() {
        let root = std::env::temp_dir().join(format!("status-files-{}", uuid::Uuid::new_v4()));
        let state = root.join("state");
        let files = StatusFiles {
            runtime: Some(root.join("run/status.json")),
            persisted: state.join("status.json"),
        };
        let here = state.display().to_string();
        let mut w = StatusWriter::default();
        w.write_final(&files, doc("2026-01-01T00:00:00Z", &here, 1));
        // The state filesystem "fills": only the runtime copy moves on.
        let newer = doc("2026-01-01T00:05:00Z", &here, 2);
        write_doc(
            files.runtime.as_deref().expect("runtime"),
            &newer,
            &mut None,
        );
        let (shown, from) = read_newest_of(&files, &state).expect("a status");
        assert_eq!((shown.pid, from), (2, root.join("run/status.json")));
        // A runtime copy written for another state directory is skipped, however new.
        let other = doc("2026-01-01T00:09:00Z", "/elsewhere", 3);
        write_doc(
            files.runtime.as_deref().expect("runtime"),
            &other,
            &mut None,
        );
        let (shown, from) = read_newest_of(&files, &state).expect("a status");
        assert_eq!((shown.pid, from), (1, files.persisted.clone()));
        let _ = std::fs::remove_dir_all(&root);
    }
}

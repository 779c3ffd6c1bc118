//! The command journal (`<state_dir>/commands.json`): each command id the backend sent, whether it ran,
//! its result and whether the result reached the backend.
//!
//! Invariant: a command is recorded as started, durably, before it runs; a command id found in the
//! journal never runs again, also across restarts. A command that was started but never finished (the
//! process died) is finished at the next start as failed, "interrupted", and not run again: commands run
//! at most once. Results are kept until the backend has them. Every id in the journal passes
//! [`valid_command_id`] (checked when recorded and when loaded), so no id it hands out can name a file
//! or a URL segment the backend did not mean.
//!
//! Rate limit: the commands that change the host ([`RATE_LIMITED_KINDS`]) run at most
//! [`RATE_LIMIT_PER_HOUR`] times each per hour, counted from the journal's timestamps, so the count
//! survives the restarts a reboot causes; the newest of them are never forgotten.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{shown, valid_command_id, CommandResult};
use crate::store;

/// File of the journal in the state directory.
pub const FILE: &str = "commands.json";

/// How many reported entries are kept (the oldest are forgotten first).
const KEEP_REPORTED: usize = 2000;

/// Kinds that change the host (a reboot, a new root slot, a spool set aside): rate limited.
pub const RATE_LIMITED_KINDS: &[&str] = &["reboot", "install_update", "reset_spool"];
/// How many commands of each rate-limited kind may run in any [`RATE_WINDOW_SECS`]: 3 (a failed update
/// and its retry, and a reboot, fit; a compromised backend cannot make the appliance boot-loop).
pub const RATE_LIMIT_PER_HOUR: usize = 3;
/// The rate limit's window.
pub const RATE_WINDOW_SECS: i64 = 3600;

/// Where a command is.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Entry {
    /// The command's kind.
    pub kind: String,
    /// When it was first seen (Unix seconds).
    pub at: i64,
    /// Its result, once finished.
    pub result: Option<CommandResult>,
    /// Whether the backend acknowledged the result.
    pub reported: bool,
    /// Whether it was refused before it ran (by the rate limit, or for its arguments): it did not run
    /// and does not count toward the rate limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rate_limited: bool,
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command id is not one the protocol allows.
    #[error("command id {id} refused: an id is 1 to 128 of A-Z a-z 0-9 . _ : -")]
    InvalidId {
        /// The id, escaped and shortened.
        id: String,
    },
    /// The file is not a journal.
    #[error("{path}: not a command journal: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The journal, loaded.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl Journal {
    /// Loads `<state_dir>/commands.json` (empty when missing) and finishes interrupted commands.
    pub fn load(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(FILE);
        let entries: BTreeMap<String, Entry> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| JournalError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        if let Some(bad) = entries.keys().find(|id| !valid_command_id(id)) {
            return Err(JournalError::Corrupt {
                path,
                message: format!("command id {} is not a valid id", shown(bad)),
            });
        }
        let mut j = Journal { path, entries };
        let mut interrupted = false;
        for e in j.entries.values_mut().filter(|e| e.result.is_none()) {
            e.result = Some(CommandResult {
                ok: false,
                message: format!(
                    "{}: interrupted by a restart of the agent before it finished; not run again (commands run at most once)",
                    e.kind
                ),
            });
            interrupted = true;
        }
        if interrupted {
            j.save()?;
        }
        Ok(j)
    }

    fn save(&self) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(&self.entries).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        store::write_private(&self.path, &bytes).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Whether `id` was ever seen.
    pub fn seen(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// Records `id` as started, durably. Call before running it; never run a command whose `begin`
    /// failed.
    pub fn begin(&mut self, id: &str, kind: &str, now: i64) -> Result<(), JournalError> {
        self.record(id, kind, now, None)
    }

    /// Why a command of `kind` may not run at `now` (Unix seconds): the rate limit of its kind is reached.
    /// None when it may run. Commands whose time lies in the future (the clock went back) count.
    pub fn rate_limit(&self, kind: &str, now: i64) -> Option<String> {
        if !RATE_LIMITED_KINDS.contains(&kind) {
            return None;
        }
        let mut times: Vec<i64> = self
            .entries
            .values()
            .filter(|e| e.kind == kind && !e.rate_limited && e.at > now - RATE_WINDOW_SECS)
            .map(|e| e.at)
            .collect();
        if times.len() < RATE_LIMIT_PER_HOUR {
            return None;
        }
        times.sort_unstable();
        let next = times[times.len() - RATE_LIMIT_PER_HOUR] + RATE_WINDOW_SECS;
        let next = time::OffsetDateTime::from_unix_timestamp(next)
            .map(sensor_core::timefmt::rfc3339)
            .unwrap_or_else(|_| next.to_string());
        Some(format!(
            "rate limit: {} {kind} commands in the last hour (at most {RATE_LIMIT_PER_HOUR} per hour); not run, next allowed at {next}",
            times.len()
        ))
    }

    /// Records `id` as refused before it ran (by the rate limit, or for its arguments) with `result`,
    /// durably; it never runs and does not count toward the rate limit.
    pub fn refuse_before_running(
        &mut self,
        id: &str,
        kind: &str,
        now: i64,
        result: CommandResult,
    ) -> Result<(), JournalError> {
        self.record(id, kind, now, Some(result))
    }

    /// Records `id` durably: started (no result yet), or refused before it ran (with its result, not
    /// counted by the rate limit). Every id recorded passes [`valid_command_id`].
    fn record(
        &mut self,
        id: &str,
        kind: &str,
        now: i64,
        refusal: Option<CommandResult>,
    ) -> Result<(), JournalError> {
        if !valid_command_id(id) {
            return Err(JournalError::InvalidId { id: shown(id) });
        }
        let rate_limited = refusal.is_some();
        self.entries.insert(
            id.to_string(),
            Entry {
                kind: kind.to_string(),
                at: now,
                result: refusal,
                reported: false,
                rate_limited,
            },
        );
        self.save()
    }

    /// Records the result of `id`.
    pub fn finish(&mut self, id: &str, result: CommandResult) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.result = Some(result);
        }
        self.save()
    }

    /// Results the backend does not have yet, oldest first.
    pub fn unreported(&self) -> Vec<(String, CommandResult)> {
        let mut v: Vec<(&String, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.reported && e.result.is_some())
            .collect();
        v.sort_by_key(|(_, e)| e.at);
        v.into_iter()
            .filter_map(|(id, e)| e.result.clone().map(|r| (id.clone(), r)))
            .collect()
    }

    /// Records that the backend has the result of `id`; forgets the oldest reported entries beyond a
    /// few thousand.
    pub fn mark_reported(&mut self, id: &str) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.reported = true;
        }
        let reported = self.entries.values().filter(|e| e.reported).count();
        if reported > KEEP_REPORTED {
            // The newest runs of each rate-limited kind are what the limit counts: never forgotten, so a
            // flood of other commands cannot wash them out.
            let mut keep: Vec<&String> = Vec::new();
            for kind in RATE_LIMITED_KINDS {
                let mut runs: Vec<(&String, i64)> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| e.kind == *kind && !e.rate_limited)
                    .map(|(k, e)| (k, e.at))
                    .collect();
                runs.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
                keep.extend(runs.into_iter().take(RATE_LIMIT_PER_HOUR).map(|(k, _)| k));
            }
            let mut old: Vec<(String, i64)> = self
                .entries
                .iter()
                .filter(|(k, e)| e.reported && !keep.contains(k))
                .map(|(k, e)| (k.clone(), e.at))
                .collect();
            old.sort_by_key(|(_, at)| *at);
            for (k, _) in old.into_iter().take(reported - KEEP_REPORTED) {
                self.entries.remove(&k);
            }
        }
        self.save()
    }

    /// Every entry (for diagnostics).
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_run_at_most_once_across_restarts() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::load(d.path()).expect("load");
        assert!(!j.seen("a"));
        j.begin("a", "resync", 1).expect("begin");
        j.finish(
            "a",
            CommandResult {
                ok: true,
                message: "done".into(),
            },
        )
        .expect("finish");
        j.begin("b", "reboot", 2).expect("begin");
        // The process dies here: "b" started, never finished.
        drop(j);
        let mut j = Journal::load(d.path()).expect("reload");
        assert!(j.seen("a") && j.seen("b"));
        let pending = j.unreported();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].0, "a");
        assert!(pending[0].1.ok);
        assert!(!pending[1].1.ok && pending[1].1.message.contains("interrupted"));
        j.mark_reported("a").expect("reported");
        let j = Journal::load(d.path()).expect("reload");
        assert_eq!(j.unreported().len(), 1);
    }

    #[test]
    fn hostile_ids_are_never_recorded_nor_loaded() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::load(d.path()).expect("load");
        for id in ["x\nreboot=yes", "../x", "", "nul\0"] {
            let e = j.begin(id, "reboot", 1).expect_err("refused");
            assert!(matches!(e, JournalError::InvalidId { .. }), "{e}");
        }
        assert!(j.entries().is_empty());
        std::fs::write(
            d.path().join(FILE),
            br#"{"../up":{"kind":"reboot","at":1,"result":null,"reported":false}}"#,
        )
        .expect("write");
        let e = Journal::load(d.path()).expect_err("refused");
        assert!(e.to_string().contains(r#""../up""#), "{e}");
    }

    /// Issue 18 item 7: a backend could make the appliance reboot (or install) without end.
    #[test]
    fn destructive_commands_are_rate_limited_across_restarts() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::load(d.path()).expect("load");
        let t0 = 1_800_000_000;
        for i in 0..3 {
            assert_eq!(j.rate_limit("reboot", t0 + i), None);
            j.begin(&format!("r{i}"), "reboot", t0 + i).expect("begin");
            // The reboot happens: the agent restarts before it finishes the entry.
            j = Journal::load(d.path()).expect("reload");
        }
        let reason = j.rate_limit("reboot", t0 + 10).expect("limited");
        assert!(
            reason.contains("3 reboot commands in the last hour"),
            "{reason}"
        );
        assert!(
            reason.contains("next allowed at 2027-01-15T09:00:00Z"),
            "{reason}"
        );
        let refused = CommandResult {
            ok: false,
            message: reason,
        };
        j.refuse_before_running("r3", "reboot", t0 + 10, refused)
            .expect("refuse");
        let mut j = Journal::load(d.path()).expect("reload");
        assert!(
            j.rate_limit("reboot", t0 + 20).is_some(),
            "refusals do not reset it"
        );
        assert_eq!(j.rate_limit("install_update", t0 + 20), None, "per kind");
        assert_eq!(j.rate_limit("resync", t0 + 20), None);
        assert_eq!(j.rate_limit("reboot", t0 + 3600), None, "an hour later");
        // A flood of other commands does not make the journal forget the recent reboots.
        for i in 0..(KEEP_REPORTED + 10) {
            let entry = Entry {
                kind: "set_log_level".into(),
                at: t0 + 100 + i as i64,
                result: None,
                reported: true,
                rate_limited: false,
            };
            j.entries.insert(format!("f{i}"), entry);
        }
        for id in ["r0", "r1", "r2", "r3"] {
            j.mark_reported(id).expect("reported");
        }
        assert!(
            j.rate_limit("reboot", t0 + 3000).is_some(),
            "{:?}",
            j.entries.get("r0")
        );
    }

    #[test]
    fn a_corrupt_journal_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(FILE), b"{nope").expect("write");
        let e = Journal::load(d.path()).expect_err("corrupt");
        assert!(e.to_string().contains("commands.json"), "{e}");
    }
}

//! Logging: the systemd journal when stderr is connected to it (`JOURNAL_STREAM`), readable stderr lines
//! otherwise, and in both cases the last [`RECENT_LINES`] lines in memory for diagnostics bundles. The
//! level can change at run time (`set_log_level` command). Invariant: messages pass through the stages'
//! redaction before they get here; lines kept for diagnostics are redacted once more.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

/// How many recent log lines are kept in memory for diagnostics.
pub const RECENT_LINES: usize = 500;

static RECENT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// The most recent log lines, oldest first, redacted.
pub fn recent_lines() -> Vec<String> {
    RECENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect()
}

fn ours(target: &str) -> bool {
    target.starts_with("m365") || target.starts_with("sensor") || !target.contains("::")
}

fn line_of(r: &Record<'_>) -> String {
    let now = sensor_core::timefmt::rfc3339(time::OffsetDateTime::now_utc());
    let mut fields = Fields(String::new());
    let _ = r.key_values().visit(&mut fields);
    format!(
        "{now} {:<5} {}: {}{}",
        r.level(),
        r.target(),
        r.args(),
        fields.0
    )
}

/// Writes to `inner` (journal or stderr) and keeps the line for diagnostics.
struct Tee {
    inner: Option<Box<dyn Log>>,
}

impl Log for Tee {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) || !ours(r.target()) {
            return;
        }
        let line = line_of(r);
        match &self.inner {
            Some(journal) => journal.log(r),
            None => {
                let _ = std::io::stderr()
                    .lock()
                    .write_all(format!("{line}\n").as_bytes());
            }
        }
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_LINES {
            recent.pop_front();
        }
        recent.push_back(sensor_core::status::redact(&line));
    }

    fn flush(&self) {}
}

/// Renders a record's structured fields (`tenant`, `content_type`, `content_id`, `error`, ...) as
/// ` key=value` on stderr; the journal gets them as fields (`TENANT=`, ...).
struct Fields(String);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let v = value.to_string();
        if v.contains(' ') {
            self.0.push_str(&format!(" {key}={v:?}"));
        } else {
            self.0.push_str(&format!(" {key}={v}"));
        }
        Ok(())
    }
}

/// Parses a level name (`error`, `warn`, `info`, `debug`, `trace`).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.parse().ok()
}

/// Installs the logger once. `level` comes from `--log-level`, else `M365_SENSOR_LOG`, else `info`.
pub fn init(level: Option<&str>) {
    let level = level
        .map(str::to_string)
        .or_else(|| std::env::var("M365_SENSOR_LOG").ok())
        .and_then(|s| parse_level(&s))
        .unwrap_or(LevelFilter::Info);
    let journal: Option<Box<dyn Log>> = if systemd_journal_logger::connected_to_journal() {
        systemd_journal_logger::JournalLog::new()
            .ok()
            .map(|j| Box::new(j.with_syslog_identifier("m365-sensor".into())) as Box<dyn Log>)
    } else {
        None
    };
    if log::set_boxed_logger(Box::new(Tee { inner: journal })).is_ok() {
        log::set_max_level(level);
    }
}

//! Logging: the systemd journal when stderr is connected to it (`JOURNAL_STREAM`), readable stderr lines
//! otherwise. Invariant: messages pass through the stages' redaction before they get here; this module
//! adds no data of its own.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLog {
    level: LevelFilter,
}

impl Log for StderrLog {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let target = r.target();
        if !(target.starts_with("m365") || target.starts_with("sensor") || !target.contains("::")) {
            return;
        }
        let now = sensor_core::timefmt::rfc3339(time::OffsetDateTime::now_utc());
        let mut fields = Fields(String::new());
        let _ = r.key_values().visit(&mut fields);
        let line = format!(
            "{now} {:<5} {target}: {}{}\n",
            r.level(),
            r.args(),
            fields.0
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            if j.with_syslog_identifier("m365-sensor".into())
                .install()
                .is_ok()
            {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_boxed_logger(Box::new(StderrLog { level })).is_ok() {
        log::set_max_level(level);
    }
}

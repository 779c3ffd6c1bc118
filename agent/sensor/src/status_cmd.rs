//! `m365-sensor status`: prints the status document the agent keeps in its state directory. Exit code:
//! 0 ok, 1 degraded, 2 failed (and 2 when no status exists yet).

use std::path::Path;

use anyhow::{Context, Result};
use sensor_core::status::{Severity, StatusDocument};

fn agent_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Prints the status; returns the exit code.
pub fn print_status(state_dir: &Path, json: bool) -> Result<i32> {
    let path = crate::agent::status_path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("no status at {}: {e}\nIs the agent running (systemctl status m365-sensor)? Is --config pointing at its configuration?", path.display());
            return Ok(2);
        }
    };
    let doc: StatusDocument = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a status document", path.display()))?;
    if json {
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

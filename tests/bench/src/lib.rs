//! Benchmarks of m365-sensor that print figures and assert nothing: the physical-limit baselines of the
//! machine they run on ([`baselines`]), measured in the same run and on the same disk as the benches that
//! are compared with them, so each figure can be printed as a ratio to its limit.
//!
//! Invariants: every bench works in a temporary directory under `BENCH_DIR` (default: the workspace's
//! `target/bench-tmp`, i.e. the disk the build uses) and removes it; records are the simulator's realistic
//! audit records ([`m365_sim::sample`]), never highly compressible synthetic ones.

pub mod baselines;

use std::path::{Path, PathBuf};

pub use m365_sim::sample::{as_blob, sample_records, SampleRecord};

/// The directory benches work in: `BENCH_DIR`, else `<workspace>/target/bench-tmp` (created).
pub fn bench_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-tmp"),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub use sensor_spool::disk_usage;
use sensor_spool::{BlobCommit, CommitOutcome, RawRecord, Spool, SpoolError};

/// The tenant every bench's records belong to (a lowercase GUID, as Microsoft serves them).
pub const TENANT: &str = "2b7e1516-28ae-4d2a-a6d2-15883a9b1d01";

/// The records as newline-delimited JSON: each record's bytes as served, then `\n`.
pub fn ndjson(recs: &[SampleRecord]) -> Vec<u8> {
    let mut v = Vec::with_capacity(recs.iter().map(|r| r.json.len() + 1).sum());
    for r in recs {
        v.extend_from_slice(r.json.as_bytes());
        v.push(b'\n');
    }
    v
}

/// Commits `recs` to `spool` as one blob `content_id` of [`TENANT`] (no cursor), under their own Ids
/// or, when given, under `ids` (one per record: new Ids make the same records count as new).
pub fn commit_sample(
    spool: &Spool,
    content_id: &str,
    recs: &[SampleRecord],
    ids: Option<&[String]>,
) -> Result<CommitOutcome, SpoolError> {
    let raw: Vec<RawRecord<'_>> = recs
        .iter()
        .enumerate()
        .map(|(i, r)| RawRecord {
            id: ids.and_then(|ids| ids.get(i)).unwrap_or(&r.id),
            bytes: r.json.as_bytes(),
        })
        .collect();
    spool.commit_blob(&BlobCommit {
        tenant_id: TENANT,
        content_type: "Audit.Exchange",
        content_id,
        expires_unix: i64::MAX / 2,
        collected_at: "2026-11-25T10:00:00Z",
        records: &raw,
        cursor: None,
    })
}

/// A rate in records per second.
pub fn per_sec(n: usize, secs: f64) -> f64 {
    n as f64 / secs.max(1e-9)
}

/// Prints one figure beside its baseline: `name  value unit  = ratio x baseline  (goal)`.
pub fn print_vs(name: &str, value: f64, unit: &str, baseline: f64, goal: &str) {
    println!(
        "  {name:<44} {value:>11.0} {unit:<10} = {:>5.2} x baseline {baseline:.0}  {goal}",
        value / baseline.max(1e-9)
    );
}

/// The number in environment variable `name` (a benchmark's size knob), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

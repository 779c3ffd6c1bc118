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

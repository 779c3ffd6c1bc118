//! `make bench` (backlog part): a backend outage and the drain after it, all real processes over TLS on
//! loopback. The simulator serves `DRAIN_TENANTS` tenants (default 5) × 5 content types with a 24-hour history
//! of about `BACKLOG_MB` MiB of audit JSON (default 256; the figure is 4096). The receiver is down
//! from the start, so the sensor collects everything into its durable spool; then the receiver comes
//! back and the spool drains. Prints, for each phase, records/s and MB/s, peak RSS and CPU per 100k
//! records; the spool's bytes on disk per byte of live data when full and after the drain (once reclaim
//! had its turn); the kernel's high-water mark of the resident set (`VmHWM`) and the thread count; wire
//! bytes per record; and the delivery verdict against the simulator's ground truth.
//! Asserts nothing. `SENSOR_BIN=dist/bin/m365-sensor-x86_64` measures the static appliance binary.

use std::time::{Duration, Instant};

use sensor_blackbox::*;

/// Watches the sensor `pid` through a phase `what` (sampled every 250 ms until `done` answers true; an
/// error after `limit`), printing `progress` every 15 s; returns (elapsed, peak RSS, CPU seconds used).
fn watch(
    pid: u32,
    limit: Duration,
    what: &str,
    progress: &dyn Fn() -> String,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<(Duration, u64, f64)> {
    let started = Instant::now();
    let cpu0 = proc_sample(pid).map_or(0.0, |s| s.1);
    let (mut peak, mut last_print) = (0u64, Instant::now());
    loop {
        if let Some((rss, _)) = proc_sample(pid) {
            peak = peak.max(rss);
        }
        if done()? {
            break;
        }
        if started.elapsed() > limit {
            anyhow::bail!("{what}: not done within {} s", limit.as_secs());
        }
        if last_print.elapsed() > Duration::from_secs(15) {
            last_print = Instant::now();
            println!(
                "  {:>5.0} s {what}: {}, RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                progress(),
                mib(proc_sample(pid).map_or(0, |s| s.0))
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let cpu = proc_sample(pid).map_or(0.0, |s| s.1) - cpu0;
    Ok((started.elapsed(), peak, cpu))
}

/// Prints a phase's peak RSS and CPU, also per 100k of its `records`.
fn print_cost(peak_rss: u64, cpu_secs: f64, records: u64) {
    println!(
        "    peak RSS {:.1} MiB, CPU {cpu_secs:.1} s ({:.2} s per 100k records)",
        mib(peak_rss),
        cpu_secs * 100_000.0 / records.max(1) as f64
    );
}

fn main() -> anyhow::Result<()> {
    let tenants = env_or::<u64>("DRAIN_TENANTS", 5).max(1) as u32;
    let backlog_mb = env_or::<u64>("BACKLOG_MB", 256).max(1);
    // The simulator's records average ~1,363 bytes (m365_sim::sample); 24 h × 4 blobs an hour a stream.
    let streams = u64::from(tenants) * ALL_CONTENT_TYPES.len() as u64;
    let records_per_blob = (backlog_mb * 1024 * 1024 / 1363)
        .div_ceil(streams * 24 * 4)
        .max(1);
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let d = dir.path();
    let history = GeneratedHistory {
        hours: 24,
        blobs_per_hour: 4,
        records_per_blob,
        page_size: 100,
    };
    let (sim, rx, config) = generated_tenants_rig(
        d,
        tenants,
        &history,
        30,
        // The drain starts within 5 s of the backend's return (the default cap of 300 s, with full
        // jitter, would add a random wait of up to 5 minutes before the first delivery).
        "retry_max_secs = 5",
        &format!("max_bytes = {}", 64u64 << 30),
    )?;
    rx.control("/_rx/down", serde_json::json!({"indefinitely": true}))?;
    let expected: u64 = sim.truth()?["tenants"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|t| t["expected"].as_object().map_or(0, |e| e.len() as u64))
                .sum()
        })
        .unwrap_or(0);
    println!(
        "drain bench: {tenants} tenants x 5 content types, {expected} records (~{backlog_mb} MiB), backend down"
    );
    let sensor = start_sensor_with_env(d, &config, 0, &[("MALLOC_ARENA_MAX", "2")])?;
    let pid = sensor.child.id();
    let spool = |key: &str| -> u64 {
        sensor_status(d).map_or(0, |s| s["spool"][key].as_u64().unwrap_or(0))
    };

    // Phase 1: collection into the spool while the backend is down.
    let spooled = || format!("{} records spooled", spool("records"));
    let (t_in, peak_in, cpu_in) = watch(
        pid,
        Duration::from_secs(3600),
        "collecting",
        &spooled,
        || Ok(spool("records") >= expected),
    )?;
    let raw_live = spool("raw_bytes");
    let spool_dir = d.join("state").join("spool");
    let disk_full = sensor_spool::disk_usage(&spool_dir);
    println!(
        "  collected into the spool:     {expected} records, {:.1} MiB of JSON in {:.1} s: {:.0} records/s, {:.1} MB/s",
        mib(raw_live),
        t_in.as_secs_f64(),
        expected as f64 / t_in.as_secs_f64(),
        raw_live as f64 / 1e6 / t_in.as_secs_f64()
    );
    print_cost(peak_in, cpu_in, expected);
    println!(
        "    spool on disk: {:.1} MiB = {:.2}x the live JSON ({:.1} MiB stored compressed)",
        mib(disk_full),
        disk_full as f64 / raw_live.max(1) as f64,
        mib(spool("bytes"))
    );

    // Phase 2: the backend comes back; the backlog drains.
    let rx_pid = rx.proc.child.id();
    let rx_cpu0 = proc_sample(rx_pid).map_or(0.0, |s| s.1);
    rx.control("/_rx/up", serde_json::json!({}))?;
    let mut first: Option<Instant> = None;
    let up = Instant::now();
    let pending = || format!("{} records still spooled", spool("records"));
    let (t_out, peak_out, cpu_out) =
        watch(pid, Duration::from_secs(3600), "draining", &pending, || {
            let stored = rx.summary()?["unique_records"].as_u64().unwrap_or(0);
            if stored > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            Ok(stored >= expected)
        })?;
    let drain = first.map_or(t_out, |f| f.elapsed().max(Duration::from_millis(1)));
    println!(
        "  drained:                      {expected} records in {:.1} s from the first delivery ({:.1} s after the backend came back): {:.0} records/s, {:.1} MB/s",
        drain.as_secs_f64(),
        up.elapsed().as_secs_f64(),
        expected as f64 / drain.as_secs_f64(),
        raw_live as f64 / 1e6 / drain.as_secs_f64()
    );
    print_cost(peak_out, cpu_out, expected);
    let rx_cpu = proc_sample(rx_pid).map_or(0.0, |s| s.1) - rx_cpu0;
    println!(
        "    the reference receiver on the same cores: CPU {rx_cpu:.1} s ({:.2} s per 100k records)",
        rx_cpu * 100_000.0 / expected.max(1) as f64
    );
    // Reclaim runs with the last acknowledgement; the status file shows nothing pending a few seconds
    // later. Then the smallest disk use over 20 s.
    wait_for(
        Duration::from_secs(60),
        "the status to show an empty spool",
        || (spool("records") == 0).then_some(()),
    )?;
    let mut disk_after = sensor_spool::disk_usage(&spool_dir);
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_secs(1));
        disk_after = disk_after.min(sensor_spool::disk_usage(&spool_dir));
    }
    println!(
        "    spool on disk after the drain: {:.1} MiB = {:.2}x the live JSON before it",
        mib(disk_after),
        disk_after as f64 / raw_live.max(1) as f64
    );
    let summary = rx.summary()?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(600))?;
    println!(
        "  steady RSS after the drain:   {:.1} MiB",
        mib(proc_sample(pid).map_or(0, |s| s.0))
    );
    // The kernel's high-water mark of the resident set over the whole run (no sampling gap) and the
    // threads now: the figures the unit's MemoryHigh=/TasksMax= are checked against.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?", str::trim)
            .to_string()
    };
    println!(
        "  VmHWM (kernel's peak RSS):    {}, threads {}",
        field("VmHWM:"),
        field("Threads:")
    );
    print_wire_and_verdict(&summary, &v);
    drop(sensor);
    Ok(())
}

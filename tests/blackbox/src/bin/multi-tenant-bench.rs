//! `make bench` (multi-tenant part): one sensor serving many simulated tenants (default 200 × 5 content
//! types), all real processes over TLS on loopback. Tenant 1 is made to misbehave (every other API
//! request throttled, every answer 1.5 s slow) to show that one tenant's failures do not slow the others.
//! Each tenant has a 12-hour backlog. Prints the sensor's peak and steady RSS, CPU seconds per 100k
//! records, the time until the healthy tenants' backlog is delivered, the faulty tenant's lag then, idle
//! CPU after catch-up, the kernel's high-water mark of its resident memory (`VmHWM`) and its peak thread
//! count (`Threads:`, sampled; the figures the unit's `MemoryHigh=`/`TasksMax=` are set from), and the
//! delivery verdict. `SENSOR_BIN=dist/bin/m365-sensor-x86_64` measures the
//! static (musl) appliance binary instead of the release build.
//! Asserts nothing. `TENANTS=N` changes the count.

use std::time::{Duration, Instant};

use sensor_blackbox::*;

/// A `kB` or plain count field of `/proc/<pid>/status` (`VmHWM`, `Threads`), as a number (kB for sizes).
fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn main() -> anyhow::Result<()> {
    let tenants: u32 = env_or("TENANTS", 200);
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let d = dir.path();
    let history = GeneratedHistory {
        hours: 12,
        blobs_per_hour: 1,
        records_per_blob: 10,
        page_size: 50,
    };
    let (sim, rx, config) = generated_tenants_rig(d, tenants, &history, 10, "", "")?;
    let tid = generated_tenant_id;
    // Tenant 1 misbehaves: AF429 on every other request (Retry-After 2 s), every answer 1.5 s late.
    sim.set_faults(
        &tid(1),
        serde_json::json!({"throttle_every": 2, "throttle_retry_after_secs": 2, "slow_ms": 1500}),
    )?;
    println!(
        "multi-tenant bench: {tenants} tenants x 5 content types, tenant t1 throttled and slow"
    );
    let started = Instant::now();
    // As the systemd unit runs it: glibc's per-thread malloc arenas capped (no effect on the musl build).
    let sensor = start_sensor_with_env(d, &config, 0, &[("MALLOC_ARENA_MAX", "2")])?;
    let pid = sensor.child.id();
    let mut peak_rss = 0u64;
    let mut peak_threads = 0u64;
    let mut healthy_done: Option<Duration> = None;
    let mut last_print = Instant::now();
    let mut last_truth = Instant::now();
    // The backlog (12 h of history per tenant) is fixed: count what the healthy tenants must deliver.
    let sim_truth = sim.truth()?;
    let t1 = tid(1);
    let expected_healthy: usize = sim_truth["tenants"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| **k != t1)
                .map(|(_, t)| t["expected"].as_object().map_or(0, |e| e.len()))
                .sum()
        })
        .unwrap_or(0);
    println!("  backlog of the healthy tenants: {expected_healthy} records");
    let deadline = Instant::now() + Duration::from_secs(900);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if let Some((rss, _)) = proc_sample(pid) {
            peak_rss = peak_rss.max(rss);
        }
        peak_threads = peak_threads.max(status_field(pid, "Threads").unwrap_or(0));
        let stored = rx.summary()?["unique_records"].as_u64().unwrap_or(0) as usize;
        if last_print.elapsed() > Duration::from_secs(15) {
            last_print = Instant::now();
            println!(
                "  {:>4.0} s: {stored} records delivered, RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                mib(proc_sample(pid).map_or(0, |s| s.0))
            );
        }
        if stored >= expected_healthy && last_truth.elapsed() > Duration::from_secs(5) {
            last_truth = Instant::now();
            let truth = rx.truth()?;
            let healthy = truth["records"]
                .as_object()
                .map_or(0, |r| r.keys().filter(|k| !k.starts_with(&t1)).count());
            if healthy >= expected_healthy {
                healthy_done = Some(started.elapsed());
                break;
            }
        }
    }
    let t1_lag = sensor_status(d).map(|s| s["tenants"]["t1"]["lag_secs"].clone());
    // Steady state and idle: 30 s of polling with no new content.
    let (_, cpu_before) = proc_sample(pid).unwrap_or((0, 0.0));
    let idle_from = Instant::now();
    let mut steady: Vec<u64> = Vec::new();
    while idle_from.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        if let Some((rss, _)) = proc_sample(pid) {
            peak_rss = peak_rss.max(rss);
            steady.push(rss);
        }
        peak_threads = peak_threads.max(status_field(pid, "Threads").unwrap_or(0));
    }
    let (_, cpu_after) = proc_sample(pid).unwrap_or((0, 0.0));
    let idle_cpu = (cpu_after - cpu_before) / idle_from.elapsed().as_secs_f64();
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(600))?;
    let (_, cpu_total) = proc_sample(pid).unwrap_or((0, 0.0));
    let hwm_kb = status_field(pid, "VmHWM").unwrap_or(0);
    peak_threads = peak_threads.max(status_field(pid, "Threads").unwrap_or(0));
    let delivered = v.delivered.max(1);
    steady.sort_unstable();
    let steady_rss = steady.get(steady.len() / 2).copied().unwrap_or(0);
    let summary = rx.summary()?;
    println!("  records delivered:            {delivered}");
    println!(
        "  healthy tenants caught up in: {}",
        healthy_done.map_or("not within 900 s".to_string(), |t| format!(
            "{:.0} s",
            t.as_secs_f64()
        ))
    );
    println!(
        "  faulty tenant t1 lag then:    {} s",
        t1_lag.unwrap_or_default()
    );
    println!(
        "  everything delivered after:   {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!("  peak RSS:                     {:.1} MiB", mib(peak_rss));
    println!("  steady RSS (idle, median):    {:.1} MiB", mib(steady_rss));
    println!(
        "  VmHWM (kernel's peak RSS):    {:.1} MiB",
        mib(hwm_kb * 1024)
    );
    println!("  peak threads (sampled):       {peak_threads}");
    println!(
        "  CPU:                          {:.1} s in all, {:.2} s per 100k records",
        cpu_total,
        cpu_total * 100_000.0 / delivered as f64
    );
    println!(
        "  idle CPU ({tenants} tenants polling every 30 s): {:.1} % of a core",
        idle_cpu * 100.0
    );
    print_wire_and_verdict(&summary, &v);
    drop(sensor);
    Ok(())
}

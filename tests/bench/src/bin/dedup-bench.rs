//! `make bench`: the record-Id dedup window with `DEDUP_IDS` Ids (default 10 million, a large tenant's 9
//! days): insert rate, disk use, memory, lookup cost (hit and miss) and the cost of expiring a whole
//! day. Format 3 (run files, what the spool writes); `DEDUP_LEGACY=1` also measures format 2 (one sled
//! key per Id, what older versions wrote; it does not fit in bounded memory beyond ~1 million Ids).
//! Prints; asserts nothing.

use std::time::Instant;

use sensor_bench::{bench_dir, disk_usage, env_or, per_sec, TENANT};
use sensor_spool::{seen2_tree_name, seen_key_v2, DedupWindow};

const DAYS: u32 = 9;
const FIRST_DAY: u32 = 20_400;

/// A GUID-shaped record Id, distinct for each `n` (a bijective mix, so Ids look random).
fn id(n: u64) -> String {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D;
    x ^= x >> 29;
    let y = n.rotate_left(17) ^ 0xDEAD_BEEF_CAFE_F00D;
    let h = format!("{x:016x}{y:016x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Loads `total` Ids over `DAYS` days in `format` (3: run files through [`DedupWindow`], 10,000 Ids a
/// log entry as a blob commit writes them; 2: one sled key per Id in `seen2-<day>` trees, written the way
/// older versions wrote them), then prints insert rate, disk use, memory, lookup costs and the cost of
/// expiring a day.
fn run(root: &std::path::Path, total: u64, format: u8) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(root)?;
    let path = dir.path().join("spool");
    let db = sled::Config::new()
        .path(path.join("db"))
        .cache_capacity(8 << 20)
        .flush_every_ms(None)
        .open()?;
    let main = db.open_tree("main")?;
    let mut w = DedupWindow::open(&db, &main, &path.join("dedup"))?;
    let per_day = total / u64::from(DAYS);
    let rss_before = rss_kib();
    println!(
        "dedup format {format} ({}): {total} Ids over {DAYS} days, key {} bytes, sled cache 8 MiB",
        if format == 2 {
            "a sled key per Id, before this change"
        } else {
            "sorted run files with Bloom filters"
        },
        seen_key_v2(TENANT, &id(0)).len()
    );
    let t = Instant::now();
    // The longest one insert of 10,000 Ids took: a commit that has to wait for run files stalls every
    // collector behind the spool's lock.
    let mut slowest = 0f64;
    for d in 0..DAYS {
        let start = u64::from(d) * per_day;
        let legacy_tree = match format {
            2 => Some(db.open_tree(seen2_tree_name(FIRST_DAY + d))?),
            _ => None,
        };
        for block in (start..start + per_day)
            .collect::<Vec<u64>>()
            .chunks(10_000)
        {
            let keys: Vec<Vec<u8>> = block.iter().map(|n| seen_key_v2(TENANT, &id(*n))).collect();
            if let Some(tree) = &legacy_tree {
                let mut b = sled::Batch::default();
                for k in &keys {
                    b.insert(k.as_slice(), &[]);
                }
                tree.apply_batch(b)?;
            } else {
                let one = Instant::now();
                w.insert(FIRST_DAY + d, &keys, &main)?;
                slowest = slowest.max(one.elapsed().as_secs_f64());
            }
        }
        db.flush()?;
    }
    // The last run write may still be running on its own thread: it counts in the insert time.
    w.wait_for_runs(&main)?;
    if format == 2 {
        w = DedupWindow::open(&db, &main, &path.join("dedup"))?;
    }
    let inserted = per_day * u64::from(DAYS);
    let secs = t.elapsed().as_secs_f64();
    let disk = disk_usage(&path);
    println!(
        "  {:<40} {:>11.0} Ids/s ({inserted} Ids in {secs:.1} s, batches of 10,000, flush per day)",
        "insert",
        per_sec(inserted as usize, secs)
    );
    if format == 3 {
        println!(
            "  {:<40} {:>11.1} ms (the run files are written and merged on their own thread)",
            "slowest insert of 10,000 Ids",
            slowest * 1e3
        );
    }
    let runs_disk = disk_usage(&path.join("dedup"));
    println!(
        "  {:<40} {:>11} bytes = {:.0} bytes per Id ({:.0} per Id in run files, the rest sled{})",
        "disk use",
        disk,
        disk as f64 / inserted.max(1) as f64,
        runs_disk as f64 / inserted.max(1) as f64,
        if format == 3 {
            ": the log entries' space, deleted but kept until the spool reclaims after a drain"
        } else {
            ""
        }
    );
    let probes = 20_000u64;
    let t = Instant::now();
    let mut hits = 0u64;
    for i in 0..probes {
        let n = (i.wrapping_mul(7_919)) % inserted;
        let rid = id(n);
        hits += u64::from(w.contains(&seen_key_v2(TENANT, &rid), TENANT, &rid)?);
    }
    let hit_ns = t.elapsed().as_secs_f64() * 1e9 / probes as f64;
    let t = Instant::now();
    let mut false_hits = 0u64;
    for i in 0..probes {
        let rid = id(inserted + 1 + i);
        false_hits += u64::from(w.contains(&seen_key_v2(TENANT, &rid), TENANT, &rid)?);
    }
    let miss_ns = t.elapsed().as_secs_f64() * 1e9 / probes as f64;
    println!(
        "  {:<40} {:>11.0} ns/Id  ({hits} of {probes} found, spread over all {DAYS} days)",
        "lookup, hit", hit_ns
    );
    println!(
        "  {:<40} {:>11.0} ns/Id  ({false_hits} of {probes} falsely found)",
        "lookup, miss", miss_ns
    );
    let t = Instant::now();
    let dropped = w.expire_before(FIRST_DAY + 1, &main)?;
    db.flush()?;
    let exp = t.elapsed().as_secs_f64();
    println!(
        "  {:<40} {:>11.3} s for {dropped} day ({per_day} Ids); disk then {} bytes{}",
        "expire the oldest day",
        exp,
        disk_usage(&path),
        if format == 2 {
            " (sled does not shrink its file)"
        } else {
            ""
        }
    );
    let f = w.figures();
    println!(
        "  {:<40} {:>11} KiB (before loading {rss_before} KiB); window: {} Ids in memory, {} runs whose indexes and filters take {} KiB",
        "RSS of this process",
        rss_kib(),
        f.keys_in_memory,
        f.runs,
        f.run_memory_bytes / 1024
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let total: u64 = env_or("DEDUP_IDS", 10_000_000);
    let root = bench_dir()?;
    println!("dedup-bench in {}", root.display());
    run(&root, total, 3)?;
    if std::env::var_os("DEDUP_LEGACY").is_some() {
        run(&root, total, 2)?;
    }
    Ok(())
}

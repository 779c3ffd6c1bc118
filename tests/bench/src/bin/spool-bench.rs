//! `make bench`: the physical-limit baselines, then the spool's write path, read path, dedup and disk use
//! on the same disk and cores, each figure printed as a ratio to its baseline with its goal. Prints;
//! asserts nothing. `RECORDS=n` changes the record count (default 100,000).

use std::time::Instant;

use sensor_bench::baselines::{self, Baselines};
use sensor_bench::{
    bench_dir, commit_sample, disk_usage, env_or, per_sec, print_vs, sample_records, SampleRecord,
};
use sensor_spool::{BatchLimits, Spool, SpoolOptions};

/// Writers committing at once in the concurrent write-path figures (a tenant's five content types have
/// up to five collectors committing; four are enough to keep two cores busy).
const WRITERS: usize = 4;

fn options() -> SpoolOptions {
    SpoolOptions {
        max_bytes: 1 << 40,
        cache_bytes: 8 << 20,
        dedup_days: 9,
    }
}

/// Commits `recs` in blobs of `per_blob`; returns records/s.
fn commit_all(
    spool: &Spool,
    recs: &[SampleRecord],
    per_blob: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    for (n, blob) in recs.chunks(per_blob).enumerate() {
        commit_sample(spool, &format!("{tag}-{n}"), blob, None)?;
    }
    Ok(per_sec(recs.len(), t.elapsed().as_secs_f64()))
}

/// Commits `recs` in blobs of `per_blob` from `writers` threads at once (each its own share of the
/// records, as concurrent collectors of different content types); returns records/s.
fn commit_concurrently(
    spool: &Spool,
    recs: &[SampleRecord],
    per_blob: usize,
    writers: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let share = recs.len().div_ceil(writers);
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = recs
            .chunks(share)
            .enumerate()
            .map(|(w, part)| {
                s.spawn(move || commit_all(spool, part, per_blob, &format!("{tag}{w}")))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))?
                .map(drop)
        })
    })?;
    Ok(per_sec(recs.len(), t.elapsed().as_secs_f64()))
}

/// Cuts, reads as the relay sends it (zstd: the stored frames) and acknowledges every batch; returns
/// (records/s, records, wire bytes, raw bytes).
fn drain(spool: &Spool) -> anyhow::Result<(f64, usize, usize, usize)> {
    let limits = BatchLimits {
        max_records: 5_000,
        max_raw_bytes: 8 << 20,
        linger: std::time::Duration::ZERO,
    };
    let t = Instant::now();
    let (mut n, mut wire, mut raw) = (0usize, 0usize, 0usize);
    while let Some(desc) = spool.cut_batch(&limits, true)? {
        wire += spool.read_batch_zstd(&desc)?.len();
        raw += desc.raw_bytes as usize;
        n += desc.records as usize;
        spool.ack_batch(desc.seq)?;
    }
    Ok((per_sec(n, t.elapsed().as_secs_f64()), n, wire, raw))
}

/// The lone writer measured `rounds` times into a fresh spool, each round next to its baseline (append +
/// `fdatasync` per `per_blob` of the same records; the baseline first in even rounds, second in odd
/// ones), so that the disk's drift between the two figures of a round is small and neither always follows
/// the other; returns (baseline, spool) records/s per round.
fn paired_lone_writer(
    dir: &std::path::Path,
    recs: &[SampleRecord],
    per_blob: usize,
    rounds: usize,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(rounds);
    let baseline = || baselines::append_sync(&dir.join("paired.log"), recs, per_blob);
    for round in 0..rounds {
        let first = if round % 2 == 0 {
            Some(baseline()?)
        } else {
            None
        };
        let path = dir.join(format!("paired-{per_blob}-{round}"));
        let spool = Spool::open(&path, options())?;
        let rate = commit_all(&spool, recs, per_blob, "p")?;
        drop(spool);
        std::fs::remove_dir_all(&path)?;
        let base = match first {
            Some(b) => b,
            None => baseline()?,
        };
        out.push((base, rate));
    }
    Ok(out)
}

/// Prints each round's ratio of a paired measurement, then the median and the lowest.
fn print_paired(what: &str, rounds: &[(f64, f64)]) {
    let mut ratios: Vec<f64> = rounds.iter().map(|(b, r)| r / b.max(1e-9)).collect();
    let each: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    let median = match ratios.len() {
        0 => 0.0,
        n if n % 2 == 0 => (ratios[mid - 1] + ratios[mid]) / 2.0,
        _ => ratios[mid],
    };
    let lowest = ratios.first().copied().unwrap_or(0.0);
    println!(
        "  {what:<44} median {median:>5.2} x, lowest {lowest:.2} x  (rounds: {})  goal >= 0.50",
        each.join(" / ")
    );
}

/// Prints the zstd bytes on the wire per record of a drain and the ratio to the NDJSON.
fn print_wire(what: &str, wire: usize, records: usize, raw: usize) {
    println!(
        "  {what:<44} {:>11.0} bytes/record  (zstd ratio {:.2}; {records} records)",
        wire as f64 / records.max(1) as f64,
        raw as f64 / wire.max(1) as f64
    );
}

fn main() -> anyhow::Result<()> {
    let count: usize = env_or("RECORDS", 100_000);
    let root = bench_dir()?;
    let dir = tempfile::tempdir_in(&root)?;
    println!(
        "spool-bench in {} ({count} simulator records)",
        dir.path().display()
    );
    let recs = sample_records(count, 1);
    let raw_bytes: usize = recs.iter().map(|r| r.json.len()).sum();

    let b: Baselines = baselines::measure(dir.path(), &recs)?;
    b.print();

    println!("spool (commit = one WAL record in its segment + fdatasync per blob, sled synced every 4 commits; zstd-1 chunks of <= 512 records)");
    let path = dir.path().join("spool");
    let spool = Spool::open(&path, options())?;
    let w1000 = commit_all(&spool, &recs, 1_000, "a")?;
    print_vs(
        "commit_blob, 1,000 records per blob",
        w1000,
        "records/s",
        b.append_sync_1000,
        "goal >= 0.50",
    );
    let live = spool.figures().stored_bytes;
    let disk_loaded = disk_usage(&path);
    let again = commit_all(&spool, &recs, 1_000, "dup")?;
    print_vs(
        "commit_blob, all duplicates (dedup lookups)",
        again,
        "records/s",
        b.append_sync_1000,
        "(no goal)",
    );
    println!(
        "  {:<44} {:>11.3} stored (zstd) bytes per raw byte",
        "live data",
        live as f64 / raw_bytes as f64
    );
    println!(
        "  {:<44} {:>11.2} x live data ({} bytes on disk; {} bytes logical per sled)",
        "disk use, loaded",
        disk_loaded as f64 / live.max(1) as f64,
        disk_loaded,
        spool.disk_bytes()
    );
    let (r, n, wire, body) = drain(&spool)?;
    print_vs(
        "cut_batch + read_batch_zstd + ack_batch (5,000/batch)",
        r,
        "records/s",
        b.sled_per_record_out,
        "(sled key-per-record out)",
    );
    print_wire("on the wire, blobs of 1,000 records", wire, n, body);
    let after = spool.figures();
    let disk_drained = disk_usage(&path);
    println!(
        "  {:<44} {:>11.2} x the live data before it ({} bytes on disk, {} stored bytes left)   goal: < 2 x live data",
        "disk use after the drain",
        disk_drained as f64 / live.max(1) as f64,
        disk_drained,
        after.stored_bytes
    );
    drop(spool);
    let t = Instant::now();
    let spool = Spool::open(&path, options())?;
    println!(
        "  {:<44} {:>11.2} s, then {} bytes on disk",
        "reopen after the drain",
        t.elapsed().as_secs_f64(),
        disk_usage(&path)
    );
    drop(spool);
    std::fs::remove_dir_all(&path)?;

    // The collectors of a sensor's content types commit at once: each commit's envelopes and zstd run
    // outside the spool's lock, its segment append, transaction and syncs inside it (group commit).
    let path = dir.path().join("spool-writers");
    let spool = Spool::open(&path, options())?;
    let (for_1000, for_100) = recs.split_at(recs.len() * 4 / 5);
    let c1000 = commit_concurrently(&spool, for_1000, 1_000, WRITERS, "c")?;
    print_vs(
        "commit_blob, 1,000 per blob, 4 writers at once",
        c1000,
        "records/s",
        b.append_sync_1000,
        "goal >= 0.50",
    );
    let c100 = commit_concurrently(&spool, for_100, 100, WRITERS, "d")?;
    print_vs(
        "commit_blob, 100 per blob, 4 writers at once",
        c100,
        "records/s",
        b.append_sync_100,
        "goal >= 0.50",
    );
    drop(spool);
    std::fs::remove_dir_all(&path)?;

    let path = dir.path().join("spool-small");
    let spool = Spool::open(&path, options())?;
    // Distinct records for each blob size (the same Ids again would be dropped as duplicates).
    let small = &recs[..recs.len().min(25_000)];
    let (for_100, for_10) = small.split_at(small.len() * 4 / 5);
    let w100 = commit_all(&spool, for_100, 100, "s")?;
    print_vs(
        "commit_blob, 100 records per blob",
        w100,
        "records/s",
        b.append_sync_100,
        "goal >= 0.50",
    );
    let w10 = commit_all(&spool, for_10, 10, "t")?;
    print_vs(
        "commit_blob, 10 records per blob",
        w10,
        "records/s",
        b.append_sync_100,
        "(vs per-100 baseline)",
    );
    let (_, n, wire, body) = drain(&spool)?;
    print_wire("on the wire, blobs of 100 and 10 records", wire, n, body);
    drop(spool);

    let rounds: usize = env_or("ROUNDS", 5);
    println!(
        "lone writer, each round next to its baseline (ROUNDS={rounds}; a fresh spool each round)"
    );
    let p1000 = paired_lone_writer(dir.path(), &recs, 1_000, rounds)?;
    print_paired("commit_blob, 1,000 records per blob", &p1000);
    let p100 = paired_lone_writer(dir.path(), &recs[..recs.len().min(20_000)], 100, rounds)?;
    print_paired("commit_blob, 100 records per blob", &p100);

    Ok(())
}

//! Per-stage microbenchmarks (criterion), so a regression shows in the stage that caused it: blob
//! parsing with Id extraction (collector), dedup lookup (spool), spool append / read / delete, and batch
//! compression (relay). `make bench` runs them with short measurement times. Prints; asserts nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sensor_bench::{as_blob, bench_dir, commit_sample, ndjson, sample_records, TENANT};
use sensor_core::config::Compression;
use sensor_spool::{seen_key_v2, BatchLimits, DedupWindow, Spool, SpoolOptions};

fn parse(c: &mut Criterion) {
    let recs = sample_records(1_000, 2);
    let blob = as_blob(&recs);
    let mut g = c.benchmark_group("collector");
    g.throughput(Throughput::Bytes(blob.len() as u64));
    g.bench_function("parse_blob 1000 records (Id extraction)", |b| {
        b.iter(|| m365_collector::blob::parse_blob(&blob).map(|v| v.len()))
    });
    g.bench_function("serde_json Value, same blob (reference)", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(&blob).is_ok())
    });
    g.finish();
}

fn dedup(c: &mut Criterion) {
    let Ok(root) = bench_dir() else { return };
    let Ok(dir) = tempfile::tempdir_in(root) else {
        return;
    };
    let Ok(db) = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(8 << 20)
        .flush_every_ms(None)
        .open()
    else {
        return;
    };
    let Ok(main) = db.open_tree("main") else {
        return;
    };
    let Ok(mut w) = DedupWindow::open(&db, &main, &dir.path().join("dedup")) else {
        return;
    };
    let recs = sample_records(90_000, 3);
    for (d, day) in recs.chunks(10_000).enumerate() {
        let keys: Vec<Vec<u8>> = day.iter().map(|r| seen_key_v2(TENANT, &r.id)).collect();
        if w.insert(20_000 + d as u32, &keys, &main).is_err() {
            return;
        }
    }
    let misses = sample_records(1_000, 4);
    let mut g = c.benchmark_group("dedup (9 days x 10,000 Ids)");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("lookup hit", |b| {
        b.iter(|| {
            i = (i + 7_919) % recs.len();
            w.contains(&seen_key_v2(TENANT, &recs[i].id), TENANT, &recs[i].id)
                .ok()
        })
    });
    g.bench_function("lookup miss", |b| {
        b.iter(|| {
            i = (i + 1) % misses.len();
            w.contains(&seen_key_v2(TENANT, &misses[i].id), TENANT, &misses[i].id)
                .ok()
        })
    });
    g.finish();
}

fn spool(c: &mut Criterion) {
    let Ok(root) = bench_dir() else { return };
    let Ok(dir) = tempfile::tempdir_in(root) else {
        return;
    };
    let Ok(spool) = Spool::open(
        &dir.path().join("spool"),
        SpoolOptions {
            max_bytes: 1 << 40,
            cache_bytes: 8 << 20,
            dedup_days: 9,
        },
    ) else {
        return;
    };
    let recs = sample_records(100, 5);
    let n = AtomicU64::new(0);
    let commit = |per: usize| {
        let k = n.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<String> = recs[..per]
            .iter()
            .map(|r| format!("{}-{k}", r.id))
            .collect();
        commit_sample(&spool, &format!("blob-{k}"), &recs[..per], Some(&ids)).map(|o| o.spooled)
    };
    let limits = BatchLimits {
        max_records: 100,
        max_raw_bytes: 8 << 20,
        linger: std::time::Duration::ZERO,
    };
    let mut g = c.benchmark_group("spool");
    g.throughput(Throughput::Elements(100));
    g.bench_function("append: commit_blob of 100 records (durable)", |b| {
        b.iter(|| commit(100))
    });
    // Drain what the append bench left, then keep one batch to read.
    while let Ok(Some(d)) = spool.cut_batch(&limits, true) {
        if spool.ack_batch(d.seq).is_err() {
            return;
        }
    }
    if commit(100).is_err() {
        return;
    }
    let Ok(Some(desc)) = spool.cut_batch(&limits, true) else {
        return;
    };
    g.bench_function("read: read_batch of 100 records", |b| {
        b.iter(|| spool.read_batch(&desc).map(|v| v.len()))
    });
    g.bench_function(
        "read: read_batch_zstd of 100 records (the stored frame)",
        |b| b.iter(|| spool.read_batch_zstd(&desc).map(|v| v.len())),
    );
    g.bench_function("delete: ack_batch of 100 records", |b| {
        b.iter_batched(
            || {
                let _ = commit(100);
                spool.cut_batch(&limits, true).ok().flatten()
            },
            |cut| cut.map(|d| spool.ack_batch(d.seq)),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let recs = sample_records(700, 6);
    let body = ndjson(&recs);
    let mut g = c.benchmark_group("relay compression (one batch of ~1 MiB)");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("zstd (the relay's level)", |b| {
        b.iter(|| sensor_relay::compress(Compression::Zstd, &body).map(|v| v.len()))
    });
    g.bench_function("zstd-3 (the relay's level before)", |b| {
        b.iter(|| zstd::bulk::compress(&body, 3).map(|v| v.len()))
    });
    g.bench_function("gzip-6", |b| {
        b.iter(|| sensor_relay::compress(Compression::Gzip, &body).map(|v| v.len()))
    });
    g.finish();
}

criterion_group!(benches, parse, dedup, spool, compression);
criterion_main!(benches);

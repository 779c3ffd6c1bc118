//! The physical limits the issue names, measured on this machine's disk and cores with realistic
//! records: what a plain file, sled used naively, the codecs and a JSON parser achieve. Every figure of
//! the other benches is printed as a ratio to one of these, measured in the same run.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use crate::{disk_usage, ndjson, per_sec, SampleRecord};

/// Records per durability point of the "per 1,000" baselines (one blob of a busy tenant).
pub const PER_BATCH: usize = 1_000;
/// Uncompressed bytes per codec batch (the relay's default batch size is of this order).
pub const CODEC_BATCH: usize = 1 << 20;
/// Raw bytes of a chunk in the "one sled key per zstd chunk" baseline (< 128 KiB, as measured before).
pub const SLED_CHUNK_RAW: usize = 120 * 1024;

/// One codec's figures on 1 MiB batches of NDJSON, one core.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec {
    /// Uncompressed MB (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Uncompressed / compressed bytes.
    pub ratio: f64,
}

/// The baselines. Rates are records per second unless the name says otherwise.
#[derive(Clone, Debug, Default)]
pub struct Baselines {
    /// Records measured with.
    pub records: usize,
    /// Their mean size in bytes.
    pub mean_record_bytes: f64,
    /// Append to a plain file, `fdatasync` per 1,000 records.
    pub append_sync_1000: f64,
    /// Append to a plain file, `fdatasync` per 100 records.
    pub append_sync_100: f64,
    /// sled 0.34, one key per record, a batch of 1,000 then `flush()` (not an fsync), in.
    pub sled_per_record_in: f64,
    /// The same, read in order and deleted per 1,000 with `flush()`.
    pub sled_per_record_out: f64,
    /// sled's files after loading them (allocated bytes) per raw record byte.
    pub sled_per_record_disk_loaded: f64,
    /// sled's files after the drain, per raw record byte of the load (they do not shrink).
    pub sled_per_record_disk_drained: f64,
    /// sled 0.34, one key per zstd-1 chunk of < 128 KiB raw, `flush()` per 1,000 records, in.
    pub sled_chunk_in: f64,
    /// zstd level 1.
    pub zstd1: Codec,
    /// zstd level 3.
    pub zstd3: Codec,
    /// gzip level 6 (flate2 with zlib-rs, the relay's gzip).
    pub gzip6: Codec,
    /// serde_json parsing whole records into `Value`, MB/s.
    pub json_value_mb_per_s: f64,
}

/// Appends `recs` as NDJSON to a new file at `path` with an `fdatasync` per `per` records, then deletes
/// it; returns records/s.
pub fn append_sync(path: &Path, recs: &[SampleRecord], per: usize) -> anyhow::Result<f64> {
    let mut f = std::fs::File::create(path)?;
    let t = Instant::now();
    let mut buf = Vec::with_capacity(per * 1600);
    for group in recs.chunks(per) {
        buf.clear();
        for r in group {
            buf.extend_from_slice(r.json.as_bytes());
            buf.push(b'\n');
        }
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    let rate = per_sec(recs.len(), t.elapsed().as_secs_f64());
    drop(f);
    std::fs::remove_file(path)?;
    Ok(rate)
}

fn sled_db(path: &Path) -> anyhow::Result<sled::Db> {
    Ok(sled::Config::new()
        .path(path)
        .cache_capacity(8 << 20)
        .flush_every_ms(None)
        .open()?)
}

/// (in, out, disk loaded, disk drained) of one sled key per record.
fn sled_per_record(path: &Path, recs: &[SampleRecord]) -> anyhow::Result<(f64, f64, u64, u64)> {
    let db = sled_db(path)?;
    let t = Instant::now();
    for (g, group) in recs.chunks(PER_BATCH).enumerate() {
        let mut b = sled::Batch::default();
        for (i, r) in group.iter().enumerate() {
            b.insert(
                &((g * PER_BATCH + i) as u64).to_be_bytes(),
                r.json.as_bytes(),
            );
        }
        db.apply_batch(b)?;
        db.flush()?;
    }
    let rate_in = per_sec(recs.len(), t.elapsed().as_secs_f64());
    let loaded = disk_usage(path);
    let t = Instant::now();
    let mut n = 0usize;
    loop {
        let mut b = sled::Batch::default();
        let mut got = 0;
        for kv in db.iter().take(PER_BATCH) {
            let (k, v) = kv?;
            n += usize::from(!v.is_empty());
            b.remove(k);
            got += 1;
        }
        if got == 0 {
            break;
        }
        db.apply_batch(b)?;
        db.flush()?;
    }
    let rate_out = per_sec(n, t.elapsed().as_secs_f64());
    let drained = disk_usage(path);
    drop(db);
    std::fs::remove_dir_all(path)?;
    Ok((rate_in, rate_out, loaded, drained))
}

fn sled_chunks(path: &Path, recs: &[SampleRecord]) -> anyhow::Result<f64> {
    let db = sled_db(path)?;
    let t = Instant::now();
    let mut seq = 0u64;
    for group in recs.chunks(PER_BATCH) {
        let mut b = sled::Batch::default();
        let mut lines = Vec::with_capacity(SLED_CHUNK_RAW + 4096);
        let mut put = |lines: &mut Vec<u8>, b: &mut sled::Batch| -> anyhow::Result<()> {
            b.insert(&seq.to_be_bytes(), zstd::bulk::compress(lines, 1)?);
            seq += 1;
            lines.clear();
            Ok(())
        };
        for r in group {
            if lines.len() + r.json.len() + 1 > SLED_CHUNK_RAW && !lines.is_empty() {
                put(&mut lines, &mut b)?;
            }
            lines.extend_from_slice(r.json.as_bytes());
            lines.push(b'\n');
        }
        if !lines.is_empty() {
            put(&mut lines, &mut b)?;
        }
        db.apply_batch(b)?;
        db.flush()?;
    }
    let rate = per_sec(recs.len(), t.elapsed().as_secs_f64());
    drop(db);
    std::fs::remove_dir_all(path)?;
    Ok(rate)
}

fn codec(
    batches: &[Vec<u8>],
    f: impl Fn(&[u8]) -> std::io::Result<Vec<u8>>,
) -> anyhow::Result<Codec> {
    let (mut raw, mut out) = (0usize, 0usize);
    let t = Instant::now();
    for b in batches {
        raw += b.len();
        out += f(b)?.len();
    }
    Ok(Codec {
        mb_per_s: raw as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e6,
        ratio: raw as f64 / out.max(1) as f64,
    })
}

/// Compresses with gzip level 6, as the relay does.
pub fn gzip6(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::new(6),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// Measures every baseline in a fresh directory under `dir` with `recs` (at least a few thousand of
/// them for stable figures); the codec and parser figures use at most 32 MiB of them.
pub fn measure(dir: &Path, recs: &[SampleRecord]) -> anyhow::Result<Baselines> {
    let work = tempfile::tempdir_in(dir)?;
    let raw: usize = recs.iter().map(|r| r.json.len()).sum();
    let mut b = Baselines {
        records: recs.len(),
        mean_record_bytes: raw as f64 / recs.len().max(1) as f64,
        ..Baselines::default()
    };
    b.append_sync_1000 = append_sync(&work.path().join("append.log"), recs, 1_000)?;
    b.append_sync_100 = append_sync(&work.path().join("append.log"), recs, 100)?;
    let (i, o, loaded, drained) = sled_per_record(&work.path().join("sled-rec"), recs)?;
    b.sled_per_record_in = i;
    b.sled_per_record_out = o;
    b.sled_per_record_disk_loaded = loaded as f64 / raw.max(1) as f64;
    b.sled_per_record_disk_drained = drained as f64 / raw.max(1) as f64;
    b.sled_chunk_in = sled_chunks(&work.path().join("sled-chunk"), recs)?;

    let body = ndjson(recs);
    let body = &body[..body.len().min(32 << 20)];
    let batches: Vec<Vec<u8>> = body.chunks(CODEC_BATCH).map(<[u8]>::to_vec).collect();
    b.zstd1 = codec(&batches, |x| zstd::bulk::compress(x, 1))?;
    b.zstd3 = codec(&batches, |x| zstd::bulk::compress(x, 3))?;
    b.gzip6 = codec(&batches, gzip6)?;
    let t = Instant::now();
    let mut parsed = 0usize;
    for line in body.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
            parsed += line.len() * usize::from(v.is_object());
        }
    }
    b.json_value_mb_per_s = parsed as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e6;
    Ok(b)
}

impl Baselines {
    /// Prints every baseline, one a line.
    pub fn print(&self) {
        let c = |name: &str, c: Codec| {
            println!(
                "  {name:<44} {:>11.0} MB/s       ratio {:.2}",
                c.mb_per_s, c.ratio
            )
        };
        println!(
            "baselines ({} records, {:.0} bytes each on average; same disk and cores as the benches below)",
            self.records, self.mean_record_bytes
        );
        let r = |name: &str, v: f64| println!("  {name:<44} {v:>11.0} records/s");
        r(
            "append + fdatasync per 1,000 records",
            self.append_sync_1000,
        );
        r("append + fdatasync per 100 records", self.append_sync_100);
        r(
            "sled, key per record, flush per 1,000: in",
            self.sled_per_record_in,
        );
        r(
            "sled, key per record, flush per 1,000: out",
            self.sled_per_record_out,
        );
        println!(
            "  {:<44} {:>11.2} loaded, {:.2} after the drain",
            "sled, key per record: disk bytes per raw byte",
            self.sled_per_record_disk_loaded,
            self.sled_per_record_disk_drained
        );
        r(
            "sled, key per zstd chunk, flush per 1,000",
            self.sled_chunk_in,
        );
        c("zstd-1, 1 MiB batches, one core", self.zstd1);
        c("zstd-3", self.zstd3);
        c("gzip-6", self.gzip6);
        println!(
            "  {:<44} {:>11.0} MB/s",
            "serde_json into Value", self.json_value_mb_per_s
        );
        println!(
            "  (sled's flush() is not an fsync: its baselines are not durable, the file's are)"
        );
    }
}

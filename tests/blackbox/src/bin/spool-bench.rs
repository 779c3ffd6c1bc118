//! `make bench`: the spool's write and read paths and batch compression, each printed beside a
//! baseline measured in the same run on the same disk (append + fdatasync to a plain file per 1,000
//! records). Prints figures; asserts nothing.

use std::io::Write;
use std::time::Instant;

use sensor_core::config::Compression;
use sensor_spool::{BatchLimits, BlobCommit, RawRecord, Spool, SpoolOptions};

const RECORDS: usize = 100_000;
const PER_BLOB: usize = 1_000;

fn record(i: usize) -> (String, Vec<u8>) {
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        i * 2654435761 % 0xffff_ffff,
        i % 0xffff,
        i % 0xfff,
        (i / 7) % 0xfff,
        i
    );
    let body = format!(
        r#"{{"CreationTime":"2026-11-25T10:{:02}:{:02}","Id":"{id}","Operation":"MailItemsAccessed","OrganizationId":"2b7e1516-28ae-4d2a-a6d2-15883a9b1d01","RecordType":50,"ResultStatus":"Succeeded","UserKey":"10032001{i:08}","UserType":0,"Version":1,"Workload":"Exchange","ClientIP":"203.0.113.{}","UserId":"user{}@contoso.onmicrosoft.com","AppId":"00000002-0000-0ff1-ce00-000000000000","ClientAppId":"","ExternalAccess":false,"InternalLogonType":0,"LogonType":0,"LogonUserSid":"S-1-5-21-1234567890-1234567890-1234567890-{i}","MailboxGuid":"0d2a4a4e-5d8b-4f0b-9d59-{i:012}","MailboxOwnerSid":"S-1-5-21-1234567890-1234567890-1234567890-{i}","MailboxOwnerUPN":"user{}@contoso.onmicrosoft.com","OperationProperties":[{{"Name":"MailAccessType","Value":"Bind"}},{{"Name":"IsThrottled","Value":"False"}}],"OrganizationName":"contoso.onmicrosoft.com","OriginatingServer":"AM0PR01MB{} (15.20.7000.000)","Folders":[{{"FolderItems":[{{"InternetMessageId":"<AM0PR01MB{i}@AM0PR01MB.eurprd01.prod.outlook.com>","SizeInBytes":{}}}],"Id":"LgAAAAB{i:016}AQ","Path":"\\Inbox"}}],"OperationCount":1,"SessionId":"{i:08x}-aaaa-bbbb-cccc-{i:012x}","ClientInfoString":"Client=OutlookService;Outlook-Android/2.0;"}}"#,
        i % 60,
        (i / 60) % 60,
        i % 250,
        i % 5000,
        i % 5000,
        i % 9000,
        1000 + i % 90000
    );
    (id, body.into_bytes())
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let recs: Vec<(String, Vec<u8>)> = (0..RECORDS).map(record).collect();
    let raw_bytes: usize = recs.iter().map(|(_, b)| b.len()).sum();
    println!(
        "{RECORDS} records of {:.0} bytes on average, in blobs of {PER_BLOB}",
        raw_bytes as f64 / RECORDS as f64
    );

    // Baseline: append + fdatasync per 1,000 records to a plain file.
    let t = Instant::now();
    let mut f = std::fs::File::create(dir.path().join("baseline.log"))?;
    for chunk in recs.chunks(PER_BLOB) {
        for (_, b) in chunk {
            f.write_all(b)?;
            f.write_all(b"\n")?;
        }
        f.sync_data()?;
    }
    let baseline = RECORDS as f64 / t.elapsed().as_secs_f64();
    println!(
        "baseline  append+fdatasync per 1000:  {:>9.0} records/s",
        baseline
    );

    let spool = Spool::open(
        &dir.path().join("spool"),
        SpoolOptions {
            max_bytes: 1 << 40,
            cache_bytes: 16 << 20,
            dedup_days: 9,
        },
    )?;
    let t = Instant::now();
    for (n, chunk) in recs.chunks(PER_BLOB).enumerate() {
        let raw: Vec<RawRecord<'_>> = chunk
            .iter()
            .map(|(id, b)| RawRecord { id, bytes: b })
            .collect();
        spool.commit_blob(&BlobCommit {
            tenant_id: "2b7e1516-28ae-4d2a-a6d2-15883a9b1d01",
            content_type: "Audit.Exchange",
            content_id: &format!("blob-{n}"),
            expires_unix: i64::MAX / 2,
            collected_at: "2026-11-25T10:00:00Z",
            records: &raw,
            cursor: None,
        })?;
    }
    let write = RECORDS as f64 / t.elapsed().as_secs_f64();
    println!("spool     commit_blob (1000/blob):      {:>9.0} records/s  = {:.2} x baseline (goal >= 0.5)", write, write / baseline);
    let f = spool.figures();
    println!(
        "spool     stored bytes per raw byte:    {:>9.3}  (sled on disk: {} bytes)",
        f.stored_bytes as f64 / raw_bytes as f64,
        spool.disk_bytes()
    );

    let limits = BatchLimits {
        max_records: 10_000,
        max_raw_bytes: 8 << 20,
        linger: std::time::Duration::ZERO,
    };
    let t = Instant::now();
    let (mut wire, mut body_bytes, mut batches) = (0usize, 0usize, 0usize);
    let mut compress_secs = 0.0;
    while let Some((desc, body)) = spool.cut_batch(&limits, true)? {
        let c = Instant::now();
        let z = sensor_relay::compress(Compression::Zstd, &body)?;
        compress_secs += c.elapsed().as_secs_f64();
        wire += z.len();
        body_bytes += body.len();
        batches += 1;
        spool.ack_batch(desc.seq)?;
    }
    let read = RECORDS as f64 / t.elapsed().as_secs_f64();
    println!(
        "spool     cut+compress+ack (10k/batch): {:>9.0} records/s over {batches} batches",
        read
    );
    println!(
        "relay     zstd-3: {:.0} MB/s, ratio {:.1}, {:.0} bytes on the wire per record",
        body_bytes as f64 / compress_secs / 1e6,
        body_bytes as f64 / wire as f64,
        wire as f64 / RECORDS as f64
    );
    let g = Instant::now();
    let gz = sensor_relay::compress(
        Compression::Gzip,
        &recs
            .iter()
            .take(5000)
            .flat_map(|(_, b)| b.iter().copied().chain([b'\n']))
            .collect::<Vec<u8>>(),
    )?;
    let gz_in: usize = recs.iter().take(5000).map(|(_, b)| b.len() + 1).sum();
    println!(
        "relay     gzip-6: {:.0} MB/s, ratio {:.1}",
        gz_in as f64 / g.elapsed().as_secs_f64() / 1e6,
        gz_in as f64 / gz.len() as f64
    );
    let f = spool.figures();
    println!(
        "spool     after drain: {} records pending, {} stored bytes, sled on disk {} bytes",
        f.pending_records,
        f.stored_bytes,
        spool.disk_bytes()
    );
    Ok(())
}

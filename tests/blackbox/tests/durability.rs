//! The durability point, checked at the syscall level (a power cut cannot be staged here, so the order
//! is proven instead): a blob's writes to its segment (its group's WAL record: frames and sled batch)
//! are followed by a real `fdatasync` of that file before the agent treats the blob as committed (and
//! moves on with its cursor); sled's writes to its data file are followed by a real `fdatasync` of that
//! file before the agent sends a batch under its Idempotency-Key. The agent logs its durability markers at trace level; strace records them as writes
//! to stderr in the same timeline as the `pwrite64` and `fdatasync` calls.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use sensor_blackbox::*;

const TID: &str = "6f7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "6f7e1516-28ae-4d2a-a6d2-15883a9b1da1";

#[test]
fn fdatasync_separates_writing_records_from_treating_them_as_committed() -> anyhow::Result<()> {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is required for this test (apt-get install strace; .ci/run installs it)");
    }
    let dir = tempfile::tempdir()?;
    let sim = Sim::start(
        dir.path(),
        &format!(
            "[[tenant]]\ntenant_id = \"{TID}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"s\"]\ncontent_types = [\"Audit.Exchange\", \"Audit.General\"]\nhistory_hours = 4\nhistory_blobs_per_hour = 3\nrecords_per_blob = 15\nlive_blob_interval_ms = 0\n"
        ),
    )?;
    let rx = Receiver::start(dir.path())?;
    let tenant = TenantSpec::with_secret(
        "traced",
        TID,
        CID,
        "s",
        &["Audit.Exchange", "Audit.General"],
    );
    let cfg = write_config(
        dir.path(),
        &sim,
        &rx,
        &[tenant],
        "batch_max_records = 40",
        "",
    )?;
    let trace = dir.path().join("strace.txt");
    let log = dir.path().join("sensor.log");
    let mut sensor = Proc {
        child: Command::new("strace")
            .args([
                "-f",
                "-y",
                "-qq",
                "-s",
                "512",
                "-e",
                "trace=pwrite64,pwritev,pwritev2,write,writev,fdatasync,fsync",
                "-o",
            ])
            .arg(&trace)
            .arg(bin("m365-sensor")?)
            .args(["run", "--allow-root", "--config"])
            .arg(&cfg)
            .env("M365_SENSOR_LOG", "trace")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
        log,
    };
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(120))?;
    assert!(v.is_exact(), "{}", describe(&v));
    // SIGTERM goes to the agent itself (strace's child); strace exits when it does.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", sensor.child.id()))?;
    let agent: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no traced agent"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let c = &mut sensor.child;
    let status = wait_for(Duration::from_secs(30), "the traced agent to exit", || {
        c.try_wait().ok().flatten()
    })?;
    assert!(status.success(), "{status}");

    let text = std::fs::read_to_string(&trace)?;
    let mut last_write = None;
    let mut last_sync = None;
    let (mut last_seg_write, mut last_seg_sync) = (None, None);
    let mut durable: HashSet<String> = HashSet::new();
    let (mut markers, mut sends, mut commits) = (0, 0, 0);
    for (i, line) in text.lines().enumerate() {
        // The spool's sled file: generation 0 is `spool/db`, a reclaimed one `spool/gen-<n>/db`.
        let on_db =
            line.contains("/spool/db>") || (line.contains("/spool/gen-") && line.contains("/db>"));
        if on_db && (line.contains("pwrite64(") || line.contains("pwritev")) {
            last_write = Some(i);
        }
        let on_segment = line.contains("/spool/segments/") && line.contains(".seg>");
        if on_segment && line.contains("write(") {
            last_seg_write = Some(i);
        }
        // strace -f splits a call another thread interrupted; the resumed half names no file, so a
        // resumed fdatasync counts for both files (the spool's lock orders a commit's steps anyway).
        let resumed = line.contains("<... fdatasync resumed>");
        let synced = line.trim_end().ends_with("= 0");
        let completes =
            |on_file: bool| line.contains("fdatasync(") && on_file && !line.contains("<unfinished");
        if synced && (completes(on_db) || resumed) {
            last_sync = Some(i);
        }
        if synced && (completes(on_segment) || resumed) {
            last_seg_sync = Some(i);
        }
        if !line.contains("write(2<") {
            continue;
        }
        if let Some(what) = marker(line, "durability: durable: ") {
            markers += 1;
            if what.starts_with("blob ") {
                assert!(
                    last_seg_sync.is_some() && last_seg_sync >= last_seg_write,
                    "line {i}: `{what}` declared durable, but the last write to a segment (line {last_seg_write:?}) is not followed by an fdatasync (line {last_seg_sync:?})"
                );
            } else {
                assert!(
                    last_sync.is_some() && last_sync >= last_write,
                    "line {i}: `{what}` declared durable, but the last write to the spool (line {last_write:?}) is not followed by an fdatasync (line {last_sync:?})"
                );
            }
            durable.insert(what);
        } else if let Some(what) = marker(line, "durability: sending batch ") {
            sends += 1;
            let seq = what
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            assert!(
                durable.contains(&format!("batch {seq}"))
                    || durable
                        .iter()
                        .any(|d| d.starts_with("split batch") && d.contains(&format!(" {seq}"))),
                "line {i}: batch {seq} sent before its descriptor was durable"
            );
        } else if let Some(what) = marker(line, "durability: committed blob ") {
            commits += 1;
            let content_id = what.split_whitespace().next().unwrap_or_default();
            assert!(
                durable
                    .iter()
                    .any(|d| d.starts_with("blob ") && d.ends_with(content_id)),
                "line {i}: blob {content_id} treated as committed before it was durable"
            );
        }
    }
    assert!(
        commits >= 20 && sends >= 5 && markers >= commits + sends,
        "markers {markers}, commits {commits}, sends {sends}: the trace saw the work"
    );
    Ok(())
}

/// The text after `prefix` in an strace `write(2, "...")` line, up to the end of the logged message.
fn marker(line: &str, prefix: &str) -> Option<String> {
    let start = line.find(prefix)? + prefix.len();
    let rest = &line[start..];
    let end = rest
        .find("\\n")
        .or_else(|| rest.find('"'))
        .unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

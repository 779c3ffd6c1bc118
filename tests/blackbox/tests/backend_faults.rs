//! Reliability R7 and the protocol's 400/422 rule: a batch the backend finds too large (413) is split into
//! halves with new keys until it fits; a batch the backend finds malformed (422) is moved to quarantine,
//! kept on disk, counted and reported, never silently dropped; everything else is delivered exactly once.

use std::time::Duration;

use sensor_blackbox::*;
use serde_json::json;

const TID: &str = "8b7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "8b7e1516-28ae-4d2a-a6d2-15883a9b1da1";

#[test]
fn too_large_batches_are_split_and_malformed_ones_quarantined() -> anyhow::Result<()> {
    let rig = Rig::one_tenant(
        "splitter",
        TID,
        CID,
        &["Audit.Exchange"],
        "history_hours = 6\nhistory_blobs_per_hour = 4\nrecords_per_blob = 30\nlive_blob_interval_ms = 0",
        "batch_max_records = 300\nbatch_linger_ms = 1000\nretry_max_secs = 2",
    )?;
    let (dir, sim, rx) = (rig.dir.path(), &rig.sim, &rig.rx);
    // The first batch is refused as malformed; later batches over 40 records are too large.
    rx.control(
        "/_rx/faults",
        json!({ "next_statuses": [{"status": 422}], "max_records_per_batch": 40 }),
    )?;
    let _sensor = rig.start_sensor(0)?;

    let status = wait_for(
        Duration::from_secs(90),
        "the spool to drain with one quarantined batch",
        || {
            sensor_status(dir).filter(|s| {
                s["spool"]["records"] == 0
                    && s["spool"]["quarantined"] == 1
                    && s["counters"]["records_spooled"].as_u64() > Some(0)
            })
        },
    )?;
    assert_eq!(
        status["components"]["quarantine"]["state"], "quarantined",
        "{status:#}"
    );
    let v = verdict(&sim.truth()?, &rx.truth()?);
    assert!(
        v.duplicated.is_empty() && v.altered.is_empty() && v.invented.is_empty(),
        "{}",
        describe(&v)
    );
    let spooled = status["counters"]["records_spooled"].as_u64().unwrap_or(0) as usize;
    assert_eq!(
        v.delivered + v.missing.len(),
        spooled,
        "every spooled record is delivered or quarantined"
    );
    assert!(
        !v.missing.is_empty() && v.missing.len() <= 300,
        "exactly the first batch is held back: {}",
        describe(&v)
    );
    let s = rx.summary()?;
    assert!(
        s["statuses"]["413"].as_u64().unwrap_or(0) > 0,
        "batches were split after 413: {s}"
    );
    assert_eq!(s["key_conflicts"], 0);
    // The quarantined records are on disk, in the spool, with the reason.
    let log = std::fs::read_to_string(dir.join("sensor-0.log"))?;
    assert!(log.contains("quarantined: HTTP 422"), "{log}");
    Ok(())
}

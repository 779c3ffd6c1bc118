//! Reliability R4: the backend is down while the agent collects. The spool grows, collection pauses when
//! its disk use reaches `spool.max_bytes` (nothing dropped, the status says so), and everything drains
//! once the backend is back.

use std::time::Duration;

use sensor_blackbox::*;
use serde_json::json;

const TID: &str = "5e7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "5e7e1516-28ae-4d2a-a6d2-15883a9b1da1";
const MAX_BYTES: u64 = 4 * 1024 * 1024;

#[test]
fn collection_pauses_at_the_cap_and_everything_drains_after_the_outage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Sim::start(
        dir.path(),
        &sim_tenant(
            TID,
            CID,
            "outage-secret",
            &ALL_CONTENT_TYPES,
            r#"
history_hours = 24
history_blobs_per_hour = 4
records_per_blob = 80
live_blob_interval_ms = 0
"#,
        ),
    )?;
    let rx = Receiver::start(dir.path())?;
    rx.control("/_rx/down", json!({ "indefinitely": true }))?;
    let tenant = TenantSpec::with_secret("outage", TID, CID, "outage-secret", &ALL_CONTENT_TYPES);
    let cfg = write_config(
        dir.path(),
        &sim,
        &rx,
        &[tenant],
        "retry_max_secs = 2",
        &format!("[spool]\nmax_bytes = {MAX_BYTES}"),
    )?;
    let _sensor = start_sensor(dir.path(), &cfg, 0)?;

    let full = wait_for(
        Duration::from_secs(120),
        "the spool to fill and collection to pause",
        || sensor_status(dir.path()).filter(|s| s["components"]["spool"]["state"] == "spool_full"),
    )?;
    // sled grows its file by segments: one commit can overshoot the cap by about one.
    let disk = full["spool"]["disk_bytes"].as_u64().unwrap_or(0);
    assert!(
        (MAX_BYTES..MAX_BYTES + 2 * 1024 * 1024).contains(&disk),
        "{disk} bytes on disk against a cap of {MAX_BYTES}"
    );
    assert_eq!(
        full["components"]["backend"]["state"], "backend_unreachable",
        "{full:#}"
    );
    let detail = full["components"]["backend"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("buffered"),
        "the status says how much is buffered: {detail}"
    );
    assert_eq!(full["counters"]["records_delivered"], 0);

    // Paused: no further blob is fetched while the spool is full.
    let fetched = sim.stats()?["blob_fetches_total"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(5));
    let fetched_later = sim.stats()?["blob_fetches_total"].as_u64().unwrap_or(0);
    assert!(
        fetched_later <= fetched + 5,
        "collection kept fetching while full: {fetched} -> {fetched_later}"
    );
    let truth = sim.truth()?;
    let expected: usize = truth["tenants"][TID]["expected"]
        .as_object()
        .map(|m| m.len())
        .unwrap_or(0);
    let spooled = sensor_status(dir.path())
        .and_then(|s| s["spool"]["records"].as_u64())
        .unwrap_or(0) as usize;
    assert!(
        spooled < expected,
        "the cap held back part of the {expected} records (spooled {spooled})"
    );

    rx.control("/_rx/up", json!({}))?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(180))?;
    assert!(v.is_exact(), "{}", describe(&v));
    let drained = wait_for(Duration::from_secs(30), "the spool to drain", || {
        sensor_status(dir.path())
            .filter(|s| s["spool"]["records"] == 0 && s["components"]["spool"]["state"] == "ok")
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; the last status: {:#}",
            sensor_status(dir.path()).unwrap_or_default()
        )
    })?;
    assert_eq!(drained["components"]["backend"]["state"], "ok");
    Ok(())
}

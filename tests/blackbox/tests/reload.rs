//! SIGHUP reloads the configuration live: a tenant added starts collecting, nothing is lost or duplicated
//! across the restart of the collectors, and a bad new configuration is refused while the running one
//! keeps working.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sensor_blackbox::*;

const CID: &str = "be7e1516-28ae-4d2a-a6d2-15883a9b1da1";
const A: &str = "be7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const B: &str = "be7e1516-28ae-4d2a-a6d2-15883a9b1d02";

#[test]
fn sighup_applies_a_good_config_and_refuses_a_bad_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tenant = |tid: &str| {
        format!("[[tenant]]\ntenant_id = \"{tid}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"s\"]\ncontent_types = [\"Audit.Exchange\", \"Audit.General\"]\nhistory_hours = 4\nhistory_blobs_per_hour = 3\nrecords_per_blob = 10\nlive_blob_interval_ms = 200\nlive_blobs_max = 40\n\n")
    };
    let sim = Sim::start(dir.path(), &(tenant(A) + &tenant(B)))?;
    let rx = Receiver::start(dir.path())?;
    let a = TenantSpec::with_secret("alpha", A, CID, "s", &["Audit.Exchange", "Audit.General"]);
    let b = TenantSpec::with_secret("beta", B, CID, "s", &["Audit.Exchange", "Audit.General"]);
    let cfg = write_config(dir.path(), &sim, &rx, std::slice::from_ref(&a), "", "")?;
    let sensor = start_sensor(dir.path(), &cfg, 0)?;
    let pid = Pid::from_raw(sensor.child.id() as i32);
    wait_for(Duration::from_secs(60), "tenant alpha's records", || {
        let t = rx.truth().ok()?;
        t["records"]
            .as_object()?
            .keys()
            .any(|k| k.starts_with(A))
            .then_some(())
    })?;

    // A bad configuration is refused; the agent keeps running on the old one.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)?.replace(A, "not-a-guid"),
    )?;
    kill(pid, Signal::SIGHUP)?;
    wait_for(Duration::from_secs(10), "the refusal in the log", || {
        sensor
            .log_text()
            .contains("configuration refused")
            .then_some(())
    })?;
    assert!(
        sensor.log_text().contains("not-a-guid"),
        "the error names the bad value"
    );

    // A good one adds tenant beta live.
    write_config(dir.path(), &sim, &rx, &[a, b], "", "")?;
    kill(pid, Signal::SIGHUP)?;
    wait_for(Duration::from_secs(10), "the reload", || {
        sensor.log_text().contains("reloaded").then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(10));
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(v.is_exact(), "{}", describe(&v));
    assert!(
        rx.truth()?["records"]
            .as_object()
            .is_some_and(|m| m.keys().any(|k| k.starts_with(B))),
        "beta collected"
    );
    let status = sensor_status(dir.path()).unwrap_or_default();
    assert_eq!(
        status["components"]["tenant/beta/Audit.Exchange"]["state"], "ok",
        "{status:#}"
    );
    Ok(())
}

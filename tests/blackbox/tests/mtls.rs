//! Device authentication by mutual TLS: with `client_cert_file` and `client_key_file` (and no bearer
//! token) the backend accepts the sensor; a sensor trusting another CA refuses the backend (never a
//! fallback to an unverified connection) and says so in its status.

use std::time::Duration;

use sensor_blackbox::*;

const TID: &str = "9c7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "9c7e1516-28ae-4d2a-a6d2-15883a9b1da1";

fn scenario() -> String {
    format!("[[tenant]]\ntenant_id = \"{TID}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"s\"]\ncontent_types = [\"Audit.SharePoint\"]\nhistory_hours = 3\nrecords_per_blob = 12\nlive_blob_interval_ms = 0\n")
}

#[test]
fn mutual_tls_device_identity_is_accepted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Sim::start(dir.path(), &scenario())?;
    let rx = Receiver::start(dir.path())?;
    let tenant = TenantSpec::with_secret("mtls", TID, CID, "s", &["Audit.SharePoint"]);
    let cfg = write_config(dir.path(), &sim, &rx, &[tenant], "", "")?;
    let text = std::fs::read_to_string(&cfg)?.replace(
        &format!("token_file = \"{}\"", rx.token_file.display()),
        &format!(
            "client_cert_file = \"{0}/rx/device.pem\"\nclient_key_file = \"{0}/rx/device.key\"",
            dir.path().display()
        ),
    );
    std::fs::write(&cfg, text)?;
    let _sensor = start_sensor(dir.path(), &cfg, 0)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(60))?;
    assert!(v.expected > 0 && v.is_exact(), "{}", describe(&v));
    Ok(())
}

#[test]
fn a_backend_with_an_untrusted_certificate_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Sim::start(dir.path(), &scenario())?;
    let rx = Receiver::start(dir.path())?;
    let tenant = TenantSpec::with_secret("wrongca", TID, CID, "s", &["Audit.SharePoint"]);
    let cfg = write_config(dir.path(), &sim, &rx, &[tenant], "", "")?;
    // Trust the simulator's CA for the backend: the receiver's certificate does not chain to it.
    let text = std::fs::read_to_string(&cfg)?.replace(
        &format!("ca_file = \"{}\"", rx.ca_file.display()),
        &format!("ca_file = \"{}\"", sim.ca_file.display()),
    );
    std::fs::write(&cfg, text)?;
    let _sensor = start_sensor(dir.path(), &cfg, 0)?;
    let s = wait_for(
        Duration::from_secs(60),
        "backend_unreachable with a certificate error",
        || {
            sensor_status(dir.path()).filter(|s| {
                s["components"]["backend"]["state"] == "backend_unreachable"
                    && s["spool"]["records"].as_u64() > Some(0)
            })
        },
    )?;
    let err = s["components"]["backend"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("unknownissuer") || err.contains("tls"),
        "{err}"
    );
    assert_eq!(rx.summary()?["ingest_requests"], 0, "nothing was sent");
    Ok(())
}

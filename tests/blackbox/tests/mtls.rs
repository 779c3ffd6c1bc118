//! Device authentication by mutual TLS: with `client_cert_file` and `client_key_file` (and no bearer
//! token) the backend accepts the sensor; a sensor trusting another CA refuses the backend (never a
//! fallback to an unverified connection) and says so in its status.

use std::time::Duration;

use sensor_blackbox::*;

const TID: &str = "9c7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "9c7e1516-28ae-4d2a-a6d2-15883a9b1da1";

fn rig(name: &str) -> anyhow::Result<Rig> {
    Rig::one_tenant(
        name,
        TID,
        CID,
        &["Audit.SharePoint"],
        "history_hours = 3\nrecords_per_blob = 12\nlive_blob_interval_ms = 0",
        "",
    )
}

/// Replaces `from` by `to` in the rig's sensor configuration.
fn edit_config(rig: &Rig, from: &str, to: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&rig.config)?;
    anyhow::ensure!(text.contains(from), "`{from}` not in the configuration");
    std::fs::write(&rig.config, text.replace(from, to))?;
    Ok(())
}

#[test]
fn mutual_tls_device_identity_is_accepted() -> anyhow::Result<()> {
    let rig = rig("mtls")?;
    edit_config(
        &rig,
        &format!("token_file = \"{}\"", rig.rx.token_file.display()),
        &format!(
            "client_cert_file = \"{0}/rx/device.pem\"\nclient_key_file = \"{0}/rx/device.key\"",
            rig.dir.path().display()
        ),
    )?;
    let _sensor = rig.start_sensor(0)?;
    let v = wait_for_delivery(&rig.sim, &rig.rx, Duration::from_secs(60))?;
    assert!(v.expected > 0 && v.is_exact(), "{}", describe(&v));
    Ok(())
}

#[test]
fn a_backend_with_an_untrusted_certificate_is_refused() -> anyhow::Result<()> {
    let rig = rig("wrongca")?;
    // Trust the simulator's CA for the backend: the receiver's certificate does not chain to it.
    edit_config(
        &rig,
        &format!("ca_file = \"{}\"", rig.rx.ca_file.display()),
        &format!("ca_file = \"{}\"", rig.sim.ca_file.display()),
    )?;
    let _sensor = rig.start_sensor(0)?;
    let s = wait_for(
        Duration::from_secs(60),
        "backend_unreachable with a certificate error",
        || {
            rig.status().filter(|s| {
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
    assert_eq!(rig.rx.summary()?["ingest_requests"], 0, "nothing was sent");
    Ok(())
}

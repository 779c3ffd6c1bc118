//! A compromised backend against the sensor's trust in it (issue 18, item 5). The receiver plays the
//! backend with `--hostile-renewal-ca`: it answers the device's certificate renewal with a certificate
//! from a CA of its own and that CA as `ca_pem`, then presents a server certificate of that CA, i.e. an
//! impostor vouched for by the CA that now issues the device's certificates. The sensor must keep
//! trusting its backend only through the anchor pinned at enrolment: the impostor is refused by TLS
//! (nothing reaches it, the backend link's status names the certificate failure), the genuine server
//! still works, and nothing spooled is lost.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustls::pki_types::{pem::PemObject, CertificateDer};
use sensor_blackbox::*;
use serde_json::json;

const CID: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1da1";
const A: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1d01";
const SECRET_A: &str = "alpha-secret-value-4f1d";

/// A simulator tenant with a 4-hour history and live blobs every 250 ms for `live_blobs`.
fn scenario(live_blobs: u32) -> String {
    format!("[[tenant]]\ntenant_id = \"{A}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"{SECRET_A}\"]\ncontent_types = [\"Audit.Exchange\", \"Audit.General\"]\nhistory_hours = 4\nhistory_blobs_per_hour = 3\nrecords_per_blob = 10\nlive_blob_interval_ms = 250\nlive_blobs_max = {live_blobs}\n\n")
}

/// A configuration without any backend credential or CA file: the enrolled identity provides mutual
/// TLS and the server anchors.
fn enrolled_config(dir: &Path, sim: &Sim, rx: &Receiver) -> anyhow::Result<std::path::PathBuf> {
    let a = TenantSpec::with_secret(
        "alpha",
        A,
        CID,
        SECRET_A,
        &["Audit.Exchange", "Audit.General"],
    );
    let cfg = write_config(dir, sim, rx, &[a], "", "[management]\nheartbeat_secs = 1\n")?;
    let text: String = std::fs::read_to_string(&cfg)?
        .lines()
        .filter(|l| {
            !(l.starts_with("token_file") || (l.starts_with("ca_file") && l.contains("/rx/")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cfg, text)?;
    Ok(cfg)
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?)
}

fn unique(rx: &Receiver) -> u64 {
    rx.summary()
        .ok()
        .and_then(|s| s["unique_records"].as_u64())
        .unwrap_or(0)
}

/// What reached the receiver's main port at all: ingest and heartbeat requests.
fn requests(rx: &Receiver) -> anyhow::Result<(u64, u64)> {
    let s = rx.summary()?;
    Ok((
        s["ingest_requests"].as_u64().unwrap_or(0),
        s["heartbeat_requests"].as_u64().unwrap_or(0),
    ))
}

#[test]
fn a_renewal_cannot_swap_the_backend_anchor_and_an_impostor_of_the_new_ca_is_refused(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Live content for 100 s: collection and spooling go on while the impostor is refused.
    let sim = Sim::start(d, &scenario(400))?;
    let rx = Receiver::start_with(
        d,
        &[
            "--enroll-token",
            "good-token",
            "--device-cert-validity-secs",
            "45",
            "--hostile-renewal-ca",
        ],
    )?;
    let cfg = enrolled_config(d, &sim, &rx)?;
    let state = d.join("state");
    let out = Command::new(bin("m365-sensor")?)
        .args(["enroll", "--backend", &rx.url, "--token", "good-token"])
        .arg("--config")
        .arg(&cfg)
        .arg("--ca-file")
        .arg(&rx.ca_file)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let genuine_ca = certs(&rx.ca_file)?;
    let hostile_ca = certs(&d.join("rx/hostile-ca.pem"))?;
    let server_trust = state.join("identity/server-trust.pem");
    assert_eq!(
        certs(&server_trust)?,
        genuine_ca,
        "enrolment pins the anchor that verified the backend"
    );
    let pinned = std::fs::read(&server_trust)?;

    let enrolled_at = Instant::now();
    let sensor = start_sensor(d, &cfg, 0)?;
    wait_for(Duration::from_secs(60), "records over mutual TLS", || {
        (unique(&rx) > 0).then_some(())
    })?;
    // The backend answers the renewal with a certificate of its hostile CA and that CA as ca_pem.
    let renewed = wait_for(Duration::from_secs(60), "a renewal", || {
        rx.get_json("/_rx/enrollments").ok()?["renewed"]
            .as_array()?
            .first()
            .cloned()
    })?;
    wait_for(
        Duration::from_secs(20),
        "the renewed identity installed",
        || (certs(&state.join("identity/ca.pem")).ok()? == hostile_ca).then_some(()),
    )?;
    // The genuine server still works, with the renewed (hostile-issued) client certificate.
    let before = unique(&rx);
    wait_for(
        Duration::from_secs(20),
        "delivery after the renewal",
        || (unique(&rx) > before).then_some(()),
    )?;
    wait_for(
        Duration::from_secs(20),
        "heartbeats with the renewed certificate",
        || {
            let last = rx
                .get_json("/_rx/heartbeats")
                .ok()?
                .as_array()?
                .last()
                .cloned()?;
            (last["client_serial"] == renewed["serial"]).then_some(())
        },
    )?;

    // The impostor: the same port, a server certificate of the CA the renewal brought. Dropping the
    // open connections makes every next request handshake with it.
    rx.control("/_rx/server-cert", json!({"issuer": "hostile"}))?;
    rx.control("/_rx/down", json!({"for_ms": 0}))?;
    std::thread::sleep(Duration::from_millis(500));
    let (ingest_0, heartbeats_0) = requests(&rx)?;
    let stored_0 = unique(&rx);
    let status = wait_for(
        Duration::from_secs(15),
        "the backend link refused on the certificate",
        || {
            let st = sensor_status(d)?;
            let b = &st["components"]["backend"];
            let error = b["error"].as_str()?.to_string();
            (b["state"] == "backend_unreachable" && error.contains("UnknownIssuer"))
                .then_some(b.clone())
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate"),
        "the status names the TLS failure: {status:#}"
    );
    // Collection goes on meanwhile, into the spool.
    std::thread::sleep(Duration::from_secs(5));
    let (ingest_1, heartbeats_1) = requests(&rx)?;
    assert_eq!(
        (ingest_1, heartbeats_1, unique(&rx)),
        (ingest_0, heartbeats_0, stored_0),
        "nothing reached the impostor"
    );
    let pending = sensor_status(d)
        .and_then(|s| s["spool"]["records"].as_u64())
        .unwrap_or(0);
    assert!(pending > 0, "records wait in the spool");
    assert_eq!(
        std::fs::read(&server_trust)?,
        pinned,
        "the renewal left the server anchors alone"
    );
    assert_eq!(
        std::fs::read(state.join("identity/trust.pem"))?,
        pinned,
        "trust.pem is rebuilt, not appended"
    );
    assert!(
        enrolled_at.elapsed() < Duration::from_secs(70),
        "the renewed certificate (45 s) must outlive the impostor phase; took {:?}",
        enrolled_at.elapsed()
    );

    // The genuine server again: delivery resumes and nothing was lost.
    rx.control("/_rx/server-cert", json!({"issuer": "genuine"}))?;
    wait_for(Duration::from_secs(30), "delivery resumes", || {
        (unique(&rx) > stored_0).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(v.is_exact(), "{}", describe(&v));
    drop(sensor);
    Ok(())
}

/// An identity enrolled by an earlier version without a CA file (no `server-trust.pem`, `trust.pem` =
/// the device CA alone) whose backend's server certificate comes from a public CA: the upgrade must
/// not cut it off. The receiver's server CA is its device CA, so a backend behind a separate public CA
/// is played by the receiver's second CA (`--hostile-renewal-ca`, only its switchable server
/// certificate is used here; no renewal happens), which the sensor trusts as its only system root
/// (`SSL_CERT_FILE`, honoured by rustls-native-certs). The sensor keeps delivering with the earlier
/// version's trust (system roots plus trust.pem), pins the root that verified the first heartbeat into
/// server-trust.pem, and from then on trusts that root alone: the device CA's server certificate is
/// refused, and nothing is lost.
#[test]
fn an_earlier_identity_without_a_ca_file_keeps_its_backend_and_pins_the_verifying_root(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let sim = Sim::start(d, &scenario(240))?;
    let rx = Receiver::start_with(d, &["--enroll-token", "good-token", "--hostile-renewal-ca"])?;
    let cfg = enrolled_config(d, &sim, &rx)?;
    let state = d.join("state");
    let out = Command::new(bin("m365-sensor")?)
        .args(["enroll", "--backend", &rx.url, "--token", "good-token"])
        .arg("--config")
        .arg(&cfg)
        .arg("--ca-file")
        .arg(&rx.ca_file)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device_ca = certs(&rx.ca_file)?;
    let public_root_file = d.join("rx/hostile-ca.pem");
    let public_root = certs(&public_root_file)?;
    assert_ne!(device_ca, public_root);
    // The identity as the earlier version wrote it: no server-trust.pem, trust.pem = ca.pem.
    let identity = state.join("identity");
    assert_eq!(certs(&identity.join("ca.pem"))?, device_ca);
    let server_trust = identity.join("server-trust.pem");
    std::fs::remove_file(&server_trust)?;
    std::fs::copy(identity.join("ca.pem"), identity.join("trust.pem"))?;
    // The backend is behind the "public" CA from now on.
    rx.control("/_rx/server-cert", json!({"issuer": "hostile"}))?;
    rx.control("/_rx/down", json!({"for_ms": 0}))?;

    let root_env = public_root_file.display().to_string();
    let sensor = start_sensor_with_env(d, &cfg, 0, &[("SSL_CERT_FILE", root_env.as_str())])?;
    wait_for(
        Duration::from_secs(60),
        "delivery after the upgrade",
        || (unique(&rx) > 0).then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    wait_for(
        Duration::from_secs(30),
        "server-trust.pem pinned by the first connection",
        || (certs(&server_trust).ok()? == public_root).then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    let log = sensor.log_text();
    assert!(
        log.contains("which anchor verified the backend is unknown"),
        "the earlier trust in force is logged:\n{log}"
    );
    assert!(
        log.contains("the first connection to the backend was verified by")
            && log.contains("backend-receiver hostile renewal CA"),
        "the pin is logged with the anchor's subject:\n{log}"
    );
    // Delivery goes on after the pin (the relay restarted on the pinned set).
    let after_pin = unique(&rx);
    wait_for(Duration::from_secs(30), "delivery after the pin", || {
        (unique(&rx) > after_pin).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;

    // The pinned set is the verifying root alone: a server certificate of the device CA, which the
    // earlier version trusted, is refused now.
    rx.control("/_rx/server-cert", json!({"issuer": "genuine"}))?;
    rx.control("/_rx/down", json!({"for_ms": 0}))?;
    wait_for(
        Duration::from_secs(20),
        "the device CA's server certificate refused",
        || {
            let st = sensor_status(d)?;
            let b = &st["components"]["backend"];
            (b["state"] == "backend_unreachable" && b["error"].as_str()?.contains("UnknownIssuer"))
                .then_some(())
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    assert_eq!(certs(&server_trust)?, public_root, "pinned once");

    rx.control("/_rx/server-cert", json!({"issuer": "hostile"}))?;
    rx.control("/_rx/down", json!({"for_ms": 0}))?;
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(v.is_exact(), "{}", describe(&v));
    drop(sensor);
    Ok(())
}

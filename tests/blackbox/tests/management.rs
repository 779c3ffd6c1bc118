//! Remote management against the reference backend: enrolment (good, wrong token, reused token, wrong CA,
//! garbage answer) followed by mutual-TLS delivery and a certificate renewal; live remote configuration
//! under load (a tenant added with an inline secret, a bad version refused); every command, each run at
//! most once although the backend repeats it on every heartbeat; and SIGKILLs in the middle of a command
//! and of configuration changes. Delivery is checked against the simulator's ground truth.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sensor_blackbox::*;
use serde_json::{json, Value};

const CID: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1da1";
const A: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1d01";
const B: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1d02";
const SECRET_A: &str = "alpha-secret-value-4f1d";
const SECRET_B: &str = "beta-secret-value-9c2e";
const SECRET_B2: &str = "beta-rotated-secret-77aa";

fn tenant_scenario(tid: &str, secrets: &[&str]) -> String {
    scenario_with_live(tid, secrets, 60)
}

/// A simulator tenant with a 4-hour history and `live_blobs` new blobs, one every 250 ms.
fn scenario_with_live(tid: &str, secrets: &[&str], live_blobs: u32) -> String {
    let s: Vec<String> = secrets.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[[tenant]]\ntenant_id = \"{tid}\"\nclient_id = \"{CID}\"\nclient_secrets = [{}]\ncontent_types = [\"Audit.Exchange\", \"Audit.General\"]\nhistory_hours = 4\nhistory_blobs_per_hour = 3\nrecords_per_blob = 10\nlive_blob_interval_ms = 250\nlive_blobs_max = {live_blobs}\n\n", s.join(", "))
}

fn enroll(
    dir: &Path,
    config: &Path,
    backend: &str,
    token: &str,
    extra: &[&str],
) -> anyhow::Result<(i32, String)> {
    let out = Command::new(bin("m365-sensor")?)
        .args(["enroll", "--backend", backend, "--token", token, "--config"])
        .arg(config)
        .args(extra)
        .current_dir(dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

/// A configuration without any backend credential: the enrolled identity provides mutual TLS.
fn enrolled_config(dir: &Path, sim: &Sim, rx: &Receiver) -> anyhow::Result<std::path::PathBuf> {
    let a = TenantSpec::with_secret(
        "alpha",
        A,
        CID,
        SECRET_A,
        &["Audit.Exchange", "Audit.General"],
    );
    let cfg = write_config(dir, sim, rx, &[a], "", "[management]\nheartbeat_secs = 1\n")?;
    let text = std::fs::read_to_string(&cfg)?;
    let text: String = text
        .lines()
        .filter(|l| {
            let backend_credential = l.starts_with("token_file");
            let backend_ca = l.starts_with("ca_file") && l.contains("/rx/");
            !(backend_credential || backend_ca)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cfg, text)?;
    Ok(cfg)
}

#[test]
fn enrolment_gives_a_device_identity_used_for_mutual_tls_and_renewed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Live content for 100 s: delivery must go on past the first certificate's expiry.
    let sim = Sim::start(d, &scenario_with_live(A, &[SECRET_A], 400))?;
    let rx = Receiver::start_with(
        d,
        &[
            "--enroll-token",
            "good-token",
            "--device-cert-validity-secs",
            "45",
        ],
    )?;
    let cfg = enrolled_config(d, &sim, &rx)?;
    let state = d.join("state");
    let ca = rx.ca_file.to_string_lossy().to_string();

    // Before enrolment the configuration names no credential: check-config says how to get one.
    let out = Command::new(bin("m365-sensor")?)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("m365-sensor enroll"));

    // A backend whose certificate chains to another CA: refused by TLS, nothing installed.
    let (code, text) = enroll(
        d,
        &cfg,
        &rx.url,
        "good-token",
        &["--ca-file", &sim.ca_file.to_string_lossy()],
    )?;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.to_lowercase().contains("certificate"),
        "names the TLS problem: {text}"
    );
    assert!(
        !state.join("identity").exists(),
        "nothing installed after a TLS failure"
    );

    // A wrong token.
    let (code, text) = enroll(d, &cfg, &rx.url, "wrong-token", &["--ca-file", &ca])?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("unknown enrollment token"), "{text}");
    assert!(!state.join("identity").exists());

    // A backend answering garbage.
    rx.control("/_rx/faults", json!({"enroll_garbage": true}))?;
    let (code, text) = enroll(d, &cfg, &rx.url, "good-token", &["--ca-file", &ca])?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not what the protocol defines"), "{text}");
    assert!(!state.join("identity").exists());
    rx.control("/_rx/faults", json!({}))?;

    // The good token.
    let (code, text) = enroll(d, &cfg, &rx.url, "good-token", &["--ca-file", &ca])?;
    assert_eq!(code, 0, "{text}");
    let key = state.join("identity/device.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let sensor_id = std::fs::read_to_string(state.join("identity/sensor_id"))?;
    let enrollments = rx.get_json("/_rx/enrollments")?;
    assert_eq!(enrollments["issued"][0]["sensor_id"], sensor_id.as_str());

    // The token is single-use.
    let (code, text) = enroll(
        d,
        &cfg,
        &rx.url,
        "good-token",
        &["--ca-file", &ca, "--force"],
    )?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("already used"), "{text}");
    assert_eq!(
        std::fs::read_to_string(state.join("identity/sensor_id"))?,
        sensor_id,
        "a refused re-enrolment leaves the identity alone"
    );

    // The agent delivers over mutual TLS with the enrolled identity and heartbeats as that sensor.
    let enrolled_at = Instant::now();
    let sensor = start_sensor(d, &cfg, 0)?;
    wait_for(Duration::from_secs(60), "records over mutual TLS", || {
        (rx.summary().ok()?["unique_records"].as_u64()? > 0).then_some(())
    })?;
    let hb = wait_for(Duration::from_secs(20), "a heartbeat", || {
        rx.get_json("/_rx/heartbeats")
            .ok()?
            .as_array()?
            .last()
            .cloned()
    })?;
    assert_eq!(hb["client_cn"], sensor_id.as_str(), "{hb:#}");
    assert_eq!(hb["document"]["sensor_id"], sensor_id.as_str());

    // The certificate lives 45 s: it is renewed before it expires, and delivery goes on past the old
    // certificate's expiry.
    let renewed = wait_for(Duration::from_secs(60), "a renewal", || {
        rx.get_json("/_rx/enrollments").ok()?["renewed"]
            .as_array()?
            .first()
            .cloned()
    })?;
    let wait = Duration::from_secs(50).saturating_sub(enrolled_at.elapsed());
    std::thread::sleep(wait);
    let before = rx.summary()?["unique_records"].as_u64().unwrap_or(0);
    wait_for(
        Duration::from_secs(30),
        "delivery with the renewed certificate",
        || (rx.summary().ok()?["unique_records"].as_u64()? > before).then_some(()),
    )?;
    let last = rx
        .get_json("/_rx/heartbeats")?
        .as_array()
        .and_then(|a| a.last().cloned())
        .unwrap_or_default();
    assert_eq!(
        last["client_serial"], renewed["serial"],
        "heartbeats use the renewed certificate"
    );
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(v.is_exact(), "{}", describe(&v));
    drop(sensor);
    Ok(())
}

/// The simulator with `scenario`, the receiver, and a sensor configuration with tenant alpha and 1-s
/// heartbeats.
fn alpha_rig(d: &Path, scenario: &str) -> anyhow::Result<(Sim, Receiver, std::path::PathBuf)> {
    let sim = Sim::start(d, scenario)?;
    let rx = Receiver::start(d)?;
    let a = TenantSpec::with_secret(
        "alpha",
        A,
        CID,
        SECRET_A,
        &["Audit.Exchange", "Audit.General"],
    );
    let cfg = write_config(d, &sim, &rx, &[a], "", &management_toml(&sim))?;
    Ok((sim, rx, cfg))
}

/// `[management]` with 1-s heartbeats, the tenants the backend sets pointed (locally) at the simulator.
fn management_toml(sim: &Sim) -> String {
    format!(
        "[management]\nheartbeat_secs = 1\n[management.managed_tenant_endpoints]\nlogin_url = \"{}\"\napi_url = \"{}\"\nca_file = \"{}\"\n",
        sim.url,
        sim.url,
        sim.ca_file.display()
    )
}

fn managed_tenant(name: &str, tid: &str, secret: &str) -> Value {
    json!({
        "name": name, "tenant_id": tid, "client_id": CID, "client_secret": secret,
        "cloud": "commercial", "content_types": ["Audit.Exchange", "Audit.General"],
        "backfill_hours": 24, "poll_interval_secs": 1, "request_timeout_secs": 5,
    })
}

#[test]
fn remote_configuration_and_commands_apply_live_and_run_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (sim, rx, cfg) = alpha_rig(
        d,
        &(tenant_scenario(A, &[SECRET_A]) + &tenant_scenario(B, &[SECRET_B, SECRET_B2])),
    )?;
    let sensor = start_sensor(d, &cfg, 0)?;
    wait_for(Duration::from_secs(60), "alpha's records", || {
        (rx.summary().ok()?["unique_records"].as_u64()? > 0).then_some(())
    })?;

    // v1: beta added with an inline secret, gzip for the batches.
    let local_alpha = managed_tenant("alpha", A, SECRET_A);
    rx.post_json(
        "/_rx/config",
        json!({"config": {"tenant": [local_alpha, managed_tenant("beta", B, SECRET_B)], "backend": {"compression": "gzip"}}}),
    )?;
    wait_for(Duration::from_secs(30), "config v1 applied", || {
        (sensor_status(d)?["config"]["version"].as_u64()? == 1).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    wait_for(Duration::from_secs(60), "beta's records", || {
        let t = rx.truth().ok()?;
        t["records"]
            .as_object()?
            .keys()
            .any(|k| k.starts_with(B))
            .then_some(())
    })?;
    let managed = std::fs::read_to_string(d.join("state/managed.json"))?;
    assert!(
        !managed.contains(SECRET_B),
        "the persisted managed config holds no secret"
    );

    // v2 is invalid: refused with its problems, v1 keeps running.
    rx.post_json(
        "/_rx/config",
        json!({"config": {"tenant": [{"name": "gamma", "tenant_id": "not-a-guid", "client_id": CID, "client_secret": "x"}], "state_dir": "/tmp/elsewhere"}}),
    )?;
    let st = wait_for(Duration::from_secs(30), "config v2 refused", || {
        let s = sensor_status(d)?;
        (s["config"]["refused_version"].as_u64()? == 2).then_some(s)
    })?;
    let errors = st["config"]["errors"].to_string();
    assert!(errors.contains("state_dir"), "{errors}");
    assert_eq!(st["config"]["version"], 1);
    // The heartbeat after the refusal reports it too (it follows a state change within seconds).
    wait_for(
        Duration::from_secs(20),
        "a heartbeat reporting the refusal",
        || {
            let hb = rx.get_json("/_rx/heartbeats").ok()?;
            let last = hb.as_array()?.last()?.clone();
            (last["document"]["config"]["refused_version"] == 2).then_some(())
        },
    )?;

    // Commands.
    let level = rx.queue_command("set_log_level", json!({"level": "debug"}))?;
    let r = rx.wait_result(&level, Duration::from_secs(20))?;
    assert_eq!(r["ok"], true, "{r}");

    let wrong = rx.queue_command(
        "rotate_credentials",
        json!({"tenant": "beta", "client_secret": "not-the-secret", "verify_secs": 2}),
    )?;
    let r = rx.wait_result(&wrong, Duration::from_secs(40))?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("old one stays"),
        "{r}"
    );

    let rotate = rx.queue_command("rotate_credentials", json!({"tenant": "beta", "client_secret": SECRET_B2, "client_secret_expires": "2030-01-01"}))?;
    let r = rx.wait_result(&rotate, Duration::from_secs(40))?;
    assert_eq!(r["ok"], true, "{r}");

    let from =
        sensor_core::timefmt::rfc3339(time::OffsetDateTime::now_utc() - time::Duration::hours(3));
    let resync = rx.queue_command(
        "resync",
        json!({"tenant": "alpha", "content_type": "Audit.Exchange", "start": from}),
    )?;
    let r = rx.wait_result(&resync, Duration::from_secs(30))?;
    assert_eq!(r["ok"], true, "{r}");
    let too_old = rx.queue_command(
        "resync",
        json!({"tenant": "alpha", "start": "2020-01-01T00:00:00Z"}),
    )?;
    let r = rx.wait_result(&too_old, Duration::from_secs(30))?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["message"].as_str().unwrap_or("").contains("7-day"), "{r}");

    let diag = rx.queue_command("collect_diagnostics", json!({}))?;
    let r = rx.wait_result(&diag, Duration::from_secs(30))?;
    assert_eq!(r["ok"], true, "{r}");
    let bundles = rx.get_json("/_rx/diagnostics")?;
    let bundle = bundles
        .as_array()
        .and_then(|b| b.first())
        .cloned()
        .unwrap_or_default();
    let text = bundle["document"].to_string();
    assert!(
        bundle["document"]["logs"]
            .as_array()
            .is_some_and(|l| !l.is_empty()),
        "recent logs included"
    );
    assert!(bundle["document"]["status"]["sensor_id"].is_string());
    for secret in [SECRET_A, SECRET_B, SECRET_B2, "not-the-secret"] {
        assert!(
            !text.contains(secret),
            "the bundle holds the secret {secret}"
        );
    }
    let token = std::fs::read_to_string(&rx.token_file)?;
    assert!(
        !text.contains(token.trim()),
        "the bundle holds the backend token"
    );

    let reboot = rx.queue_command("reboot", json!({}))?;
    let r = rx.wait_result(&reboot, Duration::from_secs(20))?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        std::fs::read_to_string(d.join("state/reboot-requested"))?,
        reboot
    );
    let update = rx.queue_command(
        "install_update",
        json!({"url": "https://updates.invalid/b.raucb", "sha256": "00"}),
    )?;
    assert_eq!(
        rx.wait_result(&update, Duration::from_secs(20))?["ok"],
        false
    );
    let unknown = rx.queue_command("format_disk", json!({}))?;
    let r = rx.wait_result(&unknown, Duration::from_secs(20))?;
    assert_eq!(r["ok"], false);
    assert!(
        r["message"].as_str().unwrap_or("").contains("format_disk"),
        "{r}"
    );

    // Every command was delivered on several heartbeats but ran (and reported) once.
    std::thread::sleep(Duration::from_secs(3));
    for id in [
        &level, &wrong, &rotate, &resync, &too_old, &diag, &reboot, &update, &unknown,
    ] {
        let c = rx.command(id)?;
        assert_eq!(c["results"].as_array().map(Vec::len), Some(1), "{c:#}");
    }
    // Beta still collects with its rotated secret, and nothing was lost or duplicated by the resync,
    // the rotation or the configuration changes.
    wait_for(
        Duration::from_secs(30),
        "beta ok with its rotated secret",
        || {
            let st = sensor_status(d)?;
            (st["components"]["tenant/beta/Audit.Exchange"]["state"] == "ok").then_some(())
        },
    )?;
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(120))?;
    assert!(v.is_exact(), "{}", describe(&v));
    assert!(
        sensor.log_text().contains("DEBUG"),
        "set_log_level took effect"
    );
    Ok(())
}

#[test]
fn kills_during_a_command_and_during_config_changes_lose_nothing_and_rerun_nothing(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (sim, rx, cfg) = alpha_rig(
        d,
        &(tenant_scenario(A, &[SECRET_A]) + &tenant_scenario(B, &[SECRET_B])),
    )?;
    let mut sensor = start_sensor(d, &cfg, 0)?;
    wait_for(Duration::from_secs(60), "records", || {
        (rx.summary().ok()?["unique_records"].as_u64()? > 0).then_some(())
    })?;

    // A command that takes a while (a credential Entra refuses, retried for 30 s), killed mid-way.
    let slow = rx.queue_command(
        "rotate_credentials",
        json!({"tenant": "alpha", "client_secret": "never-works", "verify_secs": 30}),
    )?;
    wait_for(Duration::from_secs(20), "the command to start", || {
        let j = std::fs::read_to_string(d.join("state/commands.json")).ok()?;
        j.contains(&slow).then_some(())
    })?;
    sensor.kill9();
    let mut n = 1;
    sensor = start_sensor(d, &cfg, n)?;
    let r = rx.wait_result(&slow, Duration::from_secs(30))?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("interrupted"),
        "{r}"
    );

    // Configuration versions applied while the agent is killed at random moments.
    let mut rng = 0x9e37_79b9_u64;
    let both = json!([
        managed_tenant("alpha", A, SECRET_A),
        managed_tenant("beta", B, SECRET_B),
    ]);
    let only_beta = json!([managed_tenant("beta", B, SECRET_B)]);
    let mut version = 0;
    for round in 0..6 {
        version = rx.post_json("/_rx/config", json!({"config": {"tenant": if round % 2 == 0 { both.clone() } else { only_beta.clone() }}}))?["version"].as_u64().unwrap_or(0);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(800 + rng % 2500));
        sensor.kill9();
        n += 1;
        sensor = start_sensor(d, &cfg, n)?;
    }
    // The last version (both tenants) is applied after the restarts.
    rx.post_json("/_rx/config", json!({"config": {"tenant": both}}))?;
    version += 1;
    wait_for(Duration::from_secs(40), "the last config version", || {
        (sensor_status(d)?["config"]["version"].as_u64()? == version).then_some(())
    })?;
    let c = rx.command(&slow)?;
    assert_eq!(
        c["results"].as_array().map(Vec::len),
        Some(1),
        "run and reported once: {c:#}"
    );
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(150))?;
    assert!(v.is_exact(), "{}", describe(&v));
    assert_eq!(rx.summary()?["key_conflicts"], 0);
    drop(sensor);
    Ok(())
}

/// Plays the host's updater (`m365-update request`, run by `m365-sensor-update.path` on the image): takes
/// the request file, checks the bundle it names is `expected`, answers `in_progress`, then `answer`.
fn fake_updater(
    state: std::path::PathBuf,
    result: std::path::PathBuf,
    expected: Vec<u8>,
    answer: fn(&str) -> Value,
) -> std::thread::JoinHandle<anyhow::Result<String>> {
    std::thread::spawn(move || {
        let req_path = state.join("update-requested");
        let req = wait_for(Duration::from_secs(60), "the update request", || {
            std::fs::read_to_string(&req_path).ok()
        })?;
        std::fs::remove_file(&req_path)?;
        let field = |k: &str| {
            req.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .unwrap_or_default()
        };
        let bundle = field("bundle");
        anyhow::ensure!(
            bundle.starts_with(&state.join("update/").display().to_string()),
            "bundle outside <state>/update/: {req}"
        );
        anyhow::ensure!(
            std::fs::read(&bundle)? == expected,
            "the bundle is not what the backend served"
        );
        anyhow::ensure!(field("reboot") == "no", "the agent reboots itself: {req}");
        anyhow::ensure!(
            !req.contains("allow_downgrade"),
            "the request carries no downgrade flag: {req}"
        );
        let id = field("id");
        std::fs::write(
            &result,
            json!({"ok": false, "code": "in_progress", "id": id}).to_string(),
        )?;
        std::thread::sleep(Duration::from_secs(2));
        std::fs::write(&result, answer(&id).to_string())?;
        Ok(req)
    })
}

#[test]
fn install_update_hands_a_verified_bundle_to_the_updater_then_reboots() -> anyhow::Result<()> {
    use sha2::Digest;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (_sim, rx, cfg) = alpha_rig(d, &tenant_scenario(A, &[SECRET_A]))?;
    let updater = d.join("m365-update");
    std::fs::write(&updater, "#!/bin/sh\nexit 2\n")?;
    // The answer comes from a root-owned directory under /run on the image; here a directory of the test.
    std::fs::create_dir(d.join("run"))?;
    let result = d.join("run/result.json");
    let sensor = start_sensor_with_env(
        d,
        &cfg,
        0,
        &[
            ("M365_SENSOR_UPDATER", updater.to_str().unwrap_or_default()),
            (
                "M365_SENSOR_UPDATE_RESULT",
                result.to_str().unwrap_or_default(),
            ),
        ],
    )?;
    let state = d.join("state");
    let bundle: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = hex::encode(sha2::Sha256::digest(&bundle));
    let url = rx.put_file("b1.raucb", bundle.clone())?;

    // A bundle whose SHA-256 is not the one named: deleted, never handed over.
    let wrong = rx.queue_command(
        "install_update",
        json!({"url": url, "sha256": "ab".repeat(32)}),
    )?;
    let r = rx.wait_result(&wrong, Duration::from_secs(60))?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains(&sha),
        "names the SHA-256 that arrived: {r}"
    );
    assert!(!state.join("update-requested").exists());
    assert_eq!(
        std::fs::read_dir(state.join("update"))?.count(),
        0,
        "nothing left behind"
    );

    // The backend cannot ask for a downgrade: refused before anything is downloaded or handed over.
    let downgrade = rx.queue_command(
        "install_update",
        json!({"url": url, "sha256": sha, "allow_downgrade": true}),
    )?;
    let r = rx.wait_result(&downgrade, Duration::from_secs(60))?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains(
            "args.allow_downgrade is refused: downgrades are allowed only by the local switch"
        ),
        "{r}"
    );
    assert!(!state.join("update-requested").exists());

    // The updater refuses (say, a downgrade): reported with its reason, no reboot.
    let refuser = fake_updater(state.clone(), result.clone(), bundle.clone(), |id| {
        json!({"ok": false, "code": "refused", "slot": "", "version": "0.0.9", "id": id,
               "message": "bundle version 0.0.9 is not newer than the running 0.1.0 (downgrade refused)"})
    });
    let refused = rx.queue_command("install_update", json!({"url": url, "sha256": sha}))?;
    let r = rx.wait_result(&refused, Duration::from_secs(90))?;
    refuser
        .join()
        .map_err(|_| anyhow::anyhow!("updater thread"))??;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("downgrade refused"),
        "{r}"
    );
    assert!(
        !state.join("reboot-requested").exists(),
        "no reboot after a refusal"
    );

    // Installed: the result is reported, then the reboot is requested; the bundle file is gone.
    let installer = fake_updater(state.clone(), result.clone(), bundle.clone(), |id| {
        json!({"ok": true, "code": "installed", "slot": "B", "version": "0.2.0", "id": id,
               "message": "installed into slot B"})
    });
    let good = rx.queue_command("install_update", json!({"url": url, "sha256": sha}))?;
    let r = rx.wait_result(&good, Duration::from_secs(90))?;
    installer
        .join()
        .map_err(|_| anyhow::anyhow!("updater thread"))??;
    assert_eq!(r["ok"], true, "{r}\n{}", sensor.log_text());
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("0.2.0 installed into slot B; rebooting"),
        "{r}"
    );
    let reboot = wait_for(Duration::from_secs(10), "the reboot request", || {
        std::fs::read_to_string(state.join("reboot-requested")).ok()
    })?;
    assert_eq!(reboot, good);
    assert_eq!(
        std::fs::read_dir(state.join("update"))?.count(),
        0,
        "the bundle is removed"
    );
    // Each download carried the sensor's identity (the bundle URL is the backend's own origin).
    let downloads = rx.get_json("/_rx/downloads")?;
    assert_eq!(downloads.as_array().map(Vec::len), Some(3), "{downloads}");
    std::thread::sleep(Duration::from_secs(3));
    for id in [&wrong, &downgrade, &refused, &good] {
        assert_eq!(rx.command(id)?["results"].as_array().map(Vec::len), Some(1));
    }
    Ok(())
}

#[test]
fn update_command_checks_the_bundle_then_runs_the_updater_and_keeps_its_exit_code(
) -> anyhow::Result<()> {
    use sha2::Digest;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let bundle = d.join("b.raucb");
    std::fs::write(&bundle, b"not really a bundle")?;
    let sha = hex::encode(sha2::Sha256::digest(b"not really a bundle"));
    let calls = d.join("calls");
    let updater = d.join("m365-update");
    std::fs::write(
        &updater,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nif [ \"$3\" = --allow-downgrade ]; then echo '{{\"ok\":true,\"action\":\"install\",\"code\":\"installed\",\"slot\":\"B\",\"version\":\"0.0.9\",\"id\":\"\",\"message\":\"m\"}}'; exit 0; fi\necho '{{\"ok\":false,\"action\":\"install\",\"code\":\"refused\",\"slot\":\"\",\"version\":\"0.0.9\",\"id\":\"\",\"message\":\"downgrade refused\"}}'; exit 1\n",
            calls.display()
        ),
    )?;
    set_mode(&updater, 0o755)?;
    let run = |env: bool, args: &[&str]| -> anyhow::Result<std::process::Output> {
        let mut c = Command::new(bin("m365-sensor")?);
        c.arg("update").args(args);
        if env {
            c.env("M365_SENSOR_UPDATER", &updater);
        }
        Ok(c.output()?)
    };
    let b = bundle.to_str().unwrap_or_default();

    let out = run(false, &["--bundle", b])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no updater"),
        "{out:?}"
    );

    let out = run(true, &["--bundle", b, "--sha256", &"0".repeat(64)])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&sha),
        "{out:?}"
    );
    assert!(
        !calls.exists(),
        "the updater never ran for a wrong checksum"
    );

    let out = run(true, &["--bundle", b, "--sha256", &sha])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("downgrade refused"),
        "{out:?}"
    );

    let out = run(true, &["--bundle", b, "--allow-downgrade"])?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("installed version 0.0.9 into slot B"));
    assert_eq!(
        std::fs::read_to_string(&calls)?,
        format!("install {b}\ninstall {b} --allow-downgrade\n")
    );

    let out = run(true, &["--bundle", "http://example.invalid/b.raucb"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only local files and https://"));
    Ok(())
}

#[test]
fn an_idle_sensor_shows_its_backend_link_from_the_heartbeats() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (sim, rx, cfg) = alpha_rig(d, &scenario_with_live(A, &[SECRET_A], 0))?;
    let sensor = start_sensor(d, &cfg, 0)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(v.is_exact(), "{}", describe(&v));
    let backend_state = || -> Option<String> {
        let st = sensor_status(d)?;
        (st["spool"]["pending_records"].as_u64().unwrap_or(0) == 0 || st["spool"].is_null()).then(
            || {
                st["components"]["backend"]["state"]
                    .as_str()
                    .map(str::to_string)
            },
        )?
    };
    wait_for(Duration::from_secs(30), "backend ok", || {
        (backend_state()? == "ok").then_some(())
    })?;
    // Nothing left to send: only the heartbeats can notice the backend is gone, and they must.
    rx.control("/_rx/down", json!({ "indefinitely": true }))?;
    wait_for(
        Duration::from_secs(30),
        "backend_unreachable while idle",
        || (backend_state()? == "backend_unreachable").then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    rx.control("/_rx/up", json!({}))?;
    wait_for(Duration::from_secs(30), "backend ok again", || {
        (backend_state()? == "ok").then_some(())
    })?;
    Ok(())
}

//! A compromised backend, played by the reference receiver (its `/_rx/config` and `/_rx/commands` send
//! whatever the test wants over the real protocol), against the real sensor: managed configurations that
//! point a tenant's endpoints at a trap listener and its secret file at the backend token or
//! `/proc/self/environ`, oversized numbers, a tenant list emptied, hostile command ids, and a reboot
//! storm. For each: refused naming the key or command, reported in the status and the heartbeat, the trap
//! saw no connection, collection went on with the last good configuration, and the receiver's ground
//! truth shows nothing lost.

use std::path::Path;
use std::time::Duration;

use sensor_blackbox::trap::Trap;
use sensor_blackbox::*;
use serde_json::{json, Value};

const CID: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1da1";
const A: &str = "c0ffee00-28ae-4d2a-a6d2-15883a9b1d01";
const SECRET_A: &str = "alpha-secret-value-4f1d";

/// The simulator (tenant A, 4 h of history, 80 live blobs one every 250 ms), the receiver, and a sensor
/// configuration with tenant alpha, 1-s heartbeats and managed tenants pointed (locally) at the
/// simulator.
fn rig(d: &Path) -> anyhow::Result<(Sim, Receiver, std::path::PathBuf)> {
    let scenario = format!("[[tenant]]\ntenant_id = \"{A}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"{SECRET_A}\"]\ncontent_types = [\"Audit.Exchange\", \"Audit.General\"]\nhistory_hours = 4\nhistory_blobs_per_hour = 3\nrecords_per_blob = 10\nlive_blob_interval_ms = 250\nlive_blobs_max = 80\n\n");
    let sim = Sim::start(d, &scenario)?;
    let rx = Receiver::start(d)?;
    let a = TenantSpec::with_secret(
        "alpha",
        A,
        CID,
        SECRET_A,
        &["Audit.Exchange", "Audit.General"],
    );
    let management = format!(
        "[management]\nheartbeat_secs = 1\n[management.managed_tenant_endpoints]\nlogin_url = \"{}\"\napi_url = \"{}\"\nca_file = \"{}\"\n",
        sim.url,
        sim.url,
        sim.ca_file.display()
    );
    let cfg = write_config(d, &sim, &rx, &[a], "", &management)?;
    Ok((sim, rx, cfg))
}

fn alpha(extra: Value) -> Value {
    let mut t = json!({
        "name": "alpha", "tenant_id": A, "client_id": CID, "client_secret": SECRET_A,
        "cloud": "commercial", "content_types": ["Audit.Exchange", "Audit.General"],
        "backfill_hours": 24, "poll_interval_secs": 1, "request_timeout_secs": 5,
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        t[k] = v.clone();
    }
    t
}

/// Posts `config` as the next version and waits until the sensor refuses it; returns its errors.
fn refused(d: &Path, rx: &Receiver, config: Value) -> anyhow::Result<(u64, String)> {
    let v = rx.post_json("/_rx/config", json!({ "config": config }))?["version"]
        .as_u64()
        .unwrap_or(0);
    let st = wait_for(Duration::from_secs(30), &format!("v{v} refused"), || {
        let s = sensor_status(d)?;
        (s["config"]["refused_version"].as_u64()? == v).then_some(s)
    })?;
    assert_eq!(st["config"]["version"], 1, "the last good version stays");
    wait_for(
        Duration::from_secs(20),
        &format!("a heartbeat reporting the refusal of v{v}"),
        || {
            let hb = rx.get_json("/_rx/heartbeats").ok()?;
            let last = hb.as_array()?.last()?.clone();
            (last["document"]["config"]["refused_version"] == v).then_some(())
        },
    )?;
    Ok((v, st["config"]["errors"].to_string()))
}

fn last_heartbeat(rx: &Receiver) -> Value {
    rx.get_json("/_rx/heartbeats")
        .ok()
        .and_then(|h| h.as_array().and_then(|a| a.last().cloned()))
        .unwrap_or_default()
}

#[test]
fn a_managed_config_that_would_send_secrets_away_is_refused_and_collection_goes_on(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (sim, rx, cfg) = rig(d)?;
    let trap = Trap::start()?;
    let sensor = start_sensor(d, &cfg, 0)?;
    rx.post_json(
        "/_rx/config",
        json!({"config": {"tenant": [alpha(json!({}))]}}),
    )?;
    wait_for(Duration::from_secs(40), "config v1 applied", || {
        (sensor_status(d)?["config"]["version"].as_u64()? == 1).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    wait_for(Duration::from_secs(60), "records", || {
        (rx.summary().ok()?["unique_records"].as_u64()? > 0).then_some(())
    })?;

    // The attack of issue 18: endpoints at the trap, the secret read from a file the agent can read.
    let token = rx.token_file.to_string_lossy().to_string();
    for (file, endpoint) in [
        (token.as_str(), "login_url"),
        ("/proc/self/environ", "api_url"),
        (
            &*d.join("state/identity/device.key").to_string_lossy(),
            "login_url",
        ),
    ] {
        let mut t = alpha(json!({ endpoint: trap.url(), "client_secret_file": file }));
        t.as_object_mut().map(|o| o.remove("client_secret"));
        let (v, errors) = refused(d, &rx, json!({ "tenant": [t] }))?;
        for key in [endpoint, "client_secret_file"] {
            assert!(
                errors.contains(&format!("remote config v{v}: tenant[0].{key}")),
                "{key}: {errors}"
            );
        }
        assert!(errors.contains("derive from its `cloud`"), "{errors}");
    }
    let (_, errors) = refused(
        d,
        &rx,
        json!({"tenant": [alpha(json!({"ca_file": token, "certificate_file": "/etc/shadow"}))]}),
    )?;
    assert!(errors.contains("tenant[0].ca_file"), "{errors}");
    assert!(errors.contains("tenant[0].certificate_file"), "{errors}");

    // Oversized numbers: refused naming the field, the value and the bound.
    let (_, errors) = refused(
        d,
        &rx,
        json!({"tenant": [alpha(json!({"poll_interval_secs": 31_536_000u64, "max_blob_bytes": 1u64 << 40}))],
               "backend": {"batch_max_bytes": 1u64 << 40, "max_in_flight": 100_000},
               "spool": {"max_bytes": 1u64 << 60},
               "management": {"heartbeat_secs": 31_536_000u64}}),
    )?;
    for (field, value) in [
        ("tenant[0].poll_interval_secs", "31536000"),
        ("tenant[0].max_blob_bytes", "1099511627776"),
        ("backend.batch_max_bytes", "1099511627776"),
        ("backend.max_in_flight", "100000"),
        ("spool.max_bytes", "1152921504606846976"),
        ("management.heartbeat_secs", "31536000"),
    ] {
        assert!(
            errors.contains(&format!("{field}: {value} is above the upper bound")),
            "{field}: {errors}"
        );
    }

    // No tenant at all: refused without the flag; with it, applied and visible, never silent.
    let (_, errors) = refused(d, &rx, json!({ "tenant": [] }))?;
    assert!(errors.contains("allow_no_tenants"), "{errors}");
    let v = rx.post_json(
        "/_rx/config",
        json!({"config": {"tenant": [], "allow_no_tenants": true}}),
    )?["version"]
        .as_u64()
        .unwrap_or(0);
    let st = wait_for(Duration::from_secs(30), "no_tenants in the status", || {
        let s = sensor_status(d)?;
        (s["components"]["collection"]["state"] == "no_tenants").then_some(s)
    })?;
    let detail = st["components"]["collection"]["detail"].to_string();
    assert!(
        detail.contains(&format!(
            "configuration v{v} has no tenant: collection stopped"
        )),
        "{detail}"
    );
    assert_eq!(st["overall"], "degraded");
    wait_for(Duration::from_secs(20), "no_tenants in a heartbeat", || {
        (last_heartbeat(&rx)["document"]["components"]["collection"]["state"] == "no_tenants")
            .then_some(())
    })?;
    rx.post_json(
        "/_rx/config",
        json!({"config": {"tenant": [alpha(json!({}))]}}),
    )?;
    wait_for(Duration::from_secs(30), "collection again", || {
        let s = sensor_status(d)?;
        (s["config"]["version"].as_u64()? == v + 1 && s["components"]["collection"].is_null())
            .then_some(())
    })?;

    // Defence in depth: a managed.json tampered with on disk to name the trap and the backend token is
    // refused at start-up, naming the file and the keys; the backend's last version is fetched again.
    let mut sensor = sensor;
    sensor.terminate(Duration::from_secs(20))?;
    let path = d.join("state/managed.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    m["config"]["tenant"][0]["login_url"] = json!(trap.url());
    m["config"]["tenant"][0]["client_secret_file"] = json!(token);
    std::fs::write(&path, serde_json::to_vec(&m)?)?;
    let sensor = start_sensor(d, &cfg, 1)?;
    wait_for(
        Duration::from_secs(20),
        "the tampered managed.json refused",
        || {
            let log = sensor.log_text();
            (log.contains("managed.json: refused, not applied")
                && log.contains("tenant[0].client_secret_file")
                && log.contains("tenant[0].login_url"))
            .then_some(())
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    wait_for(
        Duration::from_secs(30),
        "the backend's version again",
        || (sensor_status(d)?["config"]["version"].as_u64()? == v + 1).then_some(()),
    )?;

    // Nothing reached the trap, nothing was lost.
    sim.set_generation(false)?;
    let verdict = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(verdict.is_exact(), "{}", describe(&verdict));
    assert!(trap.caught().is_empty(), "{:?}", trap.caught());
    let managed = std::fs::read_to_string(d.join("state/managed.json"))?;
    assert!(!managed.contains(SECRET_A), "no secret persisted");
    drop(sensor);
    Ok(())
}

#[test]
fn hostile_commands_never_run_and_a_reboot_storm_runs_at_most_three() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (sim, rx, cfg) = rig(d)?;
    let mut sensor = start_sensor(d, &cfg, 0)?;
    wait_for(Duration::from_secs(60), "records", || {
        (rx.summary().ok()?["unique_records"].as_u64()? > 0).then_some(())
    })?;
    let state = d.join("state");

    // Hostile ids: a newline (injects a line into the root helper's request), a path, 10 KiB, a NUL.
    let big = "A".repeat(10 * 1024);
    let hostile = [
        ("x\nreboot=yes", "install_update"),
        ("../../etc/passwd", "reboot"),
        (big.as_str(), "reboot"),
        ("nul\0id", "reboot"),
    ];
    for (id, kind) in hostile {
        rx.post_json("/_rx/commands", json!({"id": id, "kind": kind, "args": {}}))?;
    }
    // A valid id with a hostile kind: refused, and the refusal reported as its result.
    rx.post_json(
        "/_rx/commands",
        json!({"id": "k1", "kind": "reboot\n", "args": {}}),
    )?;
    let r = rx.wait_result("k1", Duration::from_secs(30))?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["message"].as_str().unwrap_or("").contains("kind"), "{r}");
    let st = wait_for(Duration::from_secs(30), "4 refusals in the status", || {
        let s = sensor_status(d)?;
        let c = &s["components"]["commands"];
        (c["state"] == "command_refused"
            && c["detail"].as_str()?.starts_with("5 command(s) refused"))
        .then_some(s)
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", sensor.log_text()))?;
    assert_eq!(st["overall"], "degraded");
    wait_for(
        Duration::from_secs(20),
        "the refusal in a heartbeat",
        || {
            (last_heartbeat(&rx)["document"]["components"]["commands"]["state"]
                == "command_refused")
                .then_some(())
        },
    )?;
    let log = sensor.log_text();
    for shown in [
        r#"command "install_update" with id "x\nreboot=yes" was refused"#,
        r#"command "reboot" with id "../../etc/passwd" was refused"#,
        "(10240 bytes) was refused",
        r#"command "reboot" with id "nul\0id" was refused"#,
    ] {
        assert!(log.contains(shown), "{shown} not in the log:\n{log}");
        assert_eq!(log.matches(shown).count(), 1, "logged once: {shown}");
    }
    assert!(!state.join("reboot-requested").exists(), "nothing ran");
    assert!(!state.join("update-requested").exists(), "nothing ran");
    let commands = rx.get_json("/_rx/commands")?;
    for c in commands.as_array().into_iter().flatten() {
        if c["id"] != "k1" {
            assert!(c["deliveries"].as_u64().unwrap_or(0) > 1, "{c}");
            assert_eq!(c["results"].as_array().map(Vec::len), Some(0), "{c}");
        }
    }

    // A reboot storm: 10 reboots, 3 run, 7 refused by the rate limit; a restart does not reset it.
    let ids: Vec<String> = (0..10)
        .map(|_| rx.queue_command("reboot", json!({})))
        .collect::<anyhow::Result<_>>()?;
    let results: Vec<Value> = ids
        .iter()
        .map(|id| rx.wait_result(id, Duration::from_secs(60)))
        .collect::<anyhow::Result<_>>()?;
    let ran = results.iter().filter(|r| r["ok"] == true).count();
    assert_eq!(ran, 3, "{results:#?}");
    for r in results.iter().filter(|r| r["ok"] == false) {
        let m = r["message"].as_str().unwrap_or("");
        assert!(
            m.contains("rate limit: 3 reboot commands in the last hour")
                && m.contains("next allowed at"),
            "{r}"
        );
    }
    sensor.kill9();
    sensor = start_sensor(d, &cfg, 1)?;
    let after = rx.queue_command("reboot", json!({}))?;
    let r = rx.wait_result(&after, Duration::from_secs(60))?;
    assert_eq!(r["ok"], false, "still limited after a restart: {r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("rate limit"),
        "{r}"
    );

    sim.set_generation(false)?;
    let verdict = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(verdict.is_exact(), "{}", describe(&verdict));
    drop(sensor);
    Ok(())
}

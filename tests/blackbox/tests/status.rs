//! Wrong inputs and customer-side faults become precise states with the server's text and a fix, never a
//! silent stop: expired secret, wrong secret (reported only after the 2-minute grace a new secret needs),
//! audit logging off, consent missing, an app registered in another cloud. `m365-sensor status` prints them
//! and exits 2; `check-config` names the file, the key and the fix.

use std::process::Command;
use std::time::Duration;

use sensor_blackbox::*;

const CID: &str = "7a7e1516-28ae-4d2a-a6d2-15883a9b1da1";

fn tid(n: u32) -> String {
    format!("7a7e1516-28ae-4d2a-a6d2-15883a9b1d0{n}")
}

#[test]
fn customer_side_faults_show_as_precise_states() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tenant = |n: u32, extra: &str| {
        format!(
            "[[tenant]]\ntenant_id = \"{}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"good\"]\ncontent_types = [\"Audit.General\"]\nhistory_hours = 2\nlive_blob_interval_ms = 0\n{extra}\n\n",
            tid(n)
        )
    };
    let scenario = [
        tenant(1, "expired_secrets = [\"old\"]"),
        tenant(2, "audit_enabled = false"),
        tenant(3, "consent = false"),
        tenant(4, "cloud = \"gcc-high\""),
        tenant(5, ""),
        tenant(6, ""),
        tenant(7, ""),
    ]
    .concat();
    let sim = Sim::start(dir.path(), &scenario)?;
    let rx = Receiver::start(dir.path())?;
    let spec = |n: u32, name: &str, secret: &str| {
        TenantSpec::with_secret(name, &tid(n), CID, secret, &["Audit.General"])
    };
    let tenants = [
        spec(1, "expired", "old"),
        spec(2, "auditoff", "good"),
        spec(3, "noconsent", "good"),
        spec(4, "govcloud", "good"),
        spec(5, "wrongsecret", "b7e1c2d0-secret-id-not-value"),
        spec(6, "healthy", "good"),
        TenantSpec {
            extra: format!(
                "client_secret_expires = \"{}\"",
                (time::OffsetDateTime::now_utc() + time::Duration::days(10)).date()
            ),
            ..spec(7, "expiring", "good")
        },
    ];
    let cfg = write_config(dir.path(), &sim, &rx, &tenants, "", "")?;
    let _sensor = start_sensor(dir.path(), &cfg, 0)?;
    let want = [
        ("expired", "secret_expired", "AADSTS7000222"),
        ("auditoff", "audit_disabled", "does not exist"),
        ("noconsent", "consent_missing", "AF10001"),
        ("govcloud", "wrong_cloud", "AADSTS900382"),
        ("wrongsecret", "starting", "AADSTS7000215"),
        ("healthy", "ok", ""),
        ("expiring", "secret_expiring", ""),
    ];
    let status = wait_for(
        Duration::from_secs(60),
        "every tenant to reach its state",
        || {
            let s = sensor_status(dir.path())?;
            want.iter()
                .all(|(name, state, _)| {
                    s["components"][format!("tenant/{name}/Audit.General")]["state"] == *state
                })
                .then_some(s)
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}: {:#}", sensor_status(dir.path()).unwrap_or_default()))?;
    for (name, _, text) in want {
        let c = &status["components"][format!("tenant/{name}/Audit.General")];
        assert!(
            c["error"].as_str().unwrap_or("").contains(text),
            "{name}: {c:#}"
        );
        if !matches!(name, "healthy" | "wrongsecret") {
            assert!(
                !c["fix"].as_str().unwrap_or("").is_empty(),
                "{name} has a fix: {c:#}"
            );
        }
    }
    let expiring = &status["components"]["tenant/expiring/Audit.General"];
    assert!(
        expiring["detail"]
            .as_str()
            .unwrap_or("")
            .contains("expires in 10 day(s)"),
        "{expiring:#}"
    );
    assert_eq!(status["overall"], "failed");
    let text = std::fs::read_to_string(dir.path().join("sensor-0.log"))?;
    assert!(
        !text.contains("b7e1c2d0-secret-id-not-value") && !text.contains("client_secret="),
        "no secret in the log"
    );
    assert!(
        !serde_json::to_string(&status)?.contains("b7e1c2d0-secret-id-not-value"),
        "no secret in the status"
    );

    let out = Command::new(bin("m365-sensor")?)
        .args(["status", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(2), "failed -> exit 2");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("audit_disabled") && printed.contains("fix: Turn on audit logging"),
        "{printed}"
    );
    Ok(())
}

#[test]
fn check_config_names_file_key_and_fix() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("s.secret");
    std::fs::write(&secret, "x")?;
    set_mode(&secret, 0o644)?;
    let cfg = dir.path().join("sensor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[backend]\nurl = \"https://backend.invalid\"\n[[tenant]]\nname = \"a\"\ntenant_id = \"nope\"\nclient_id = \"{CID}\"\nclient_secret_file = \"{}\"\ncloud = \"commercial\"\ncontent_types = [\"Audit.Exchange\", \"Audit.Everything\"]\n",
            secret.display()
        ),
    )?;
    let out = Command::new(bin("m365-sensor")?)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        cfg.to_string_lossy().as_ref(),
        "tenant[0].tenant_id",
        "chmod 600",
        "Audit.Everything",
        "backend: no device credential",
    ] {
        assert!(err.contains(needle), "`{needle}` missing in:\n{err}");
    }
    std::fs::write(
        &cfg,
        "[backend]\nurl = \"https://x\"\ntoken_file = \"/t\"\nbogus_key = 1\n",
    )?;
    let out = Command::new(bin("m365-sensor")?)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));
    Ok(())
}

#[test]
fn doctor_names_the_failing_step_and_its_fix() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tenant = |n: u32, extra: &str| {
        format!(
            "[[tenant]]\ntenant_id = \"{}\"\nclient_id = \"{CID}\"\nclient_secrets = [\"good\"]\ncontent_types = [\"Audit.General\", \"DLP.All\"]\nhistory_hours = 2\nlive_blob_interval_ms = 0\n{extra}\n\n",
            tid(n)
        )
    };
    let scenario = [
        tenant(
            1,
            "subscriptions_enabled = [\"Audit.General\", \"DLP.All\"]",
        ),
        tenant(2, "audit_enabled = false"),
        tenant(3, "consent = false"),
        tenant(4, "cloud = \"gcc-high\""),
        tenant(5, "expired_secrets = [\"old\"]"),
        tenant(6, "subscriptions_enabled = [\"Audit.General\"]"),
    ]
    .concat();
    let sim = Sim::start(dir.path(), &scenario)?;
    let rx = Receiver::start(dir.path())?;
    let spec = |n: u32, name: &str, secret: &str| {
        TenantSpec::with_secret(name, &tid(n), CID, secret, &["Audit.General", "DLP.All"])
    };
    let run = |tenants: &[TenantSpec]| -> anyhow::Result<(i32, String)> {
        let cfg = write_config(dir.path(), &sim, &rx, tenants, "", "")?;
        let out = Command::new(bin("m365-sensor")?)
            .args(["doctor", "--config"])
            .arg(&cfg)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };

    let (code, out) = run(&[spec(1, "healthy", "good")])?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("[ OK ] tenant healthy: token (commercial cloud")
            && out.contains("[ OK ] backend"),
        "{out}"
    );

    let cases = [
        (
            spec(2, "auditoff", "good"),
            "[FAIL] tenant auditoff: permissions and audit logging: audit_disabled",
            "Turn on audit logging",
        ),
        (
            spec(3, "noconsent", "good"),
            "[FAIL] tenant noconsent: permissions and audit logging: consent_missing",
            "Grant admin consent",
        ),
        (
            spec(4, "govcloud", "good"),
            "[FAIL] tenant govcloud: token (commercial cloud",
            "gcc-high and dod use login.microsoftonline.us",
        ),
        (
            spec(5, "expired", "old"),
            "secret_expired",
            "Create a new client secret",
        ),
        (
            spec(1, "wrongsecret", "the-secret-id"),
            "credentials_invalid",
            "not its Secret ID",
        ),
        (
            spec(6, "nodlp", "good"),
            "[WARN] tenant nodlp: DLP.All: subscription not started yet",
            "starts it on its first poll",
        ),
    ];
    for (t, line, fix) in cases {
        let (code, out) = run(&[t])?;
        assert!(code >= 1, "{out}");
        assert!(
            out.contains(line) && out.contains(fix),
            "expected `{line}` and `{fix}` in:\n{out}"
        );
        assert!(
            !out.contains("the-secret-id"),
            "the secret never appears: {out}"
        );
    }

    std::fs::write(&rx.token_file, "not-the-token")?;
    let (code, out) = run(&[spec(1, "healthy", "good")])?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("[FAIL] backend") && out.contains("bearer token was refused (HTTP 401)"),
        "{out}"
    );
    Ok(())
}

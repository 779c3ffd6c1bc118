//! Security S4/S5 in process: the running agent has core dumps off, `NoNewPrivs` set, writes its files
//! with mode 0600, and refuses to run as root unless it can drop to its service user or is told
//! `--allow-root`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use sensor_blackbox::*;

const TID: &str = "ad7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "ad7e1516-28ae-4d2a-a6d2-15883a9b1da1";

#[test]
fn the_running_agent_is_locked_down() -> anyhow::Result<()> {
    let rig = Rig::one_tenant(
        "locked",
        TID,
        CID,
        &["Audit.General"],
        "history_hours = 1\nlive_blob_interval_ms = 0",
        "",
    )?;
    let sensor = rig.start_sensor(0)?;
    wait_for(Duration::from_secs(30), "the status file", || rig.status())?;
    let pid = sensor.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')),
        "{status}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default()
        .to_string();
    assert!(
        core.split_whitespace().filter(|w| *w == "0").count() == 2,
        "core dumps off: {core}"
    );
    for f in ["state/status.json", "state/sensor_id", "state/spool/db"] {
        let mode = std::fs::metadata(rig.dir.path().join(f))?
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
    }
    Ok(())
}

#[test]
fn root_without_the_service_user_is_refused() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root()
        || nix::unistd::User::from_name("m365-sensor")?.is_some()
    {
        eprintln!("skipped: needs root and no m365-sensor user");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("t");
    std::fs::write(&token, "x")?;
    set_mode(&token, 0o600)?;
    let cfg = dir.path().join("sensor.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}/state\"\n[backend]\nurl = \"https://127.0.0.1:9\"\ntoken_file = \"{}\"\n", dir.path().display(), token.display()))?;
    let out = Command::new(bin("m365-sensor")?)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to run as root") && err.contains("--allow-root"),
        "{err}"
    );
    Ok(())
}

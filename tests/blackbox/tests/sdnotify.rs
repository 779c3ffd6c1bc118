//! The service-manager protocol: under systemd (`Type=notify`, `WatchdogSec=`) the agent reports
//! `READY=1` once running, pings `WATCHDOG=1` at half the watchdog period, says `STOPPING=1` on SIGTERM.
//! The test plays systemd's side with its own `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use sensor_blackbox::*;

#[test]
fn ready_watchdog_and_stopping_reach_the_service_manager() -> anyhow::Result<()> {
    let rig = Rig::one_tenant(
        "notified",
        "c17e1516-28ae-4d2a-a6d2-15883a9b1d01",
        "c17e1516-28ae-4d2a-a6d2-15883a9b1da1",
        &["Audit.General"],
        "history_hours = 1\nlive_blob_interval_ms = 0",
        "",
    )?;
    let dir = rig.dir.path();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let path = sock_path.to_string_lossy().into_owned();
    let mut sensor = start_sensor_with_env(
        dir,
        &rig.config,
        0,
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "2000000")],
    )?;

    let mut messages: Vec<(Instant, String)> = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && messages
            .iter()
            .filter(|(_, m)| m.contains("WATCHDOG=1"))
            .count()
            < 3
    {
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
    let ready = messages
        .iter()
        .position(|(_, m)| m.contains("READY=1"))
        .ok_or_else(|| anyhow::anyhow!("no READY=1 in {messages:?}"))?;
    let pings: Vec<Instant> = messages
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 3, "watchdog pings: {messages:?}");
    for w in pings.windows(2) {
        assert!(
            w[1] - w[0] <= Duration::from_millis(1600),
            "pings at most every ~1 s for a 2 s watchdog: {:?}",
            w[1] - w[0]
        );
    }
    assert!(messages[ready].1.contains("STATUS="), "{messages:?}");

    sensor.terminate(Duration::from_secs(30))?;
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    Ok(())
}

//! Host faults the agent rides out (issue 19): the state filesystem full (ENOSPC) while collecting and
//! across a restart, the state filesystem turned read-only by the kernel after an error (ext4
//! `errors=remount-ro`), and SIGTERM while every peer hangs. Each run is judged by the operator's view
//! (`m365-sensor status`, read from the runtime copy when the state filesystem cannot be written; the
//! heartbeats the backend receives) and by the simulator's and receiver's ground truth: nothing lost,
//! altered or duplicated once the fault is gone.
//!
//! The mount tests need root (they mount a tmpfs or a loop device); without it they say so and pass.
//! Every mount is undone by its mount point when its guard drops, also when a test fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sensor_blackbox::*;
use serde_json::Value;

const TID: &str = "4f7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "4f7e1516-28ae-4d2a-a6d2-15883a9b1da1";
const TYPES: [&str; 2] = ["Audit.General", "Audit.Exchange"];

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips a mount test, loudly, when not root.
macro_rules! require_root {
    ($what:expr) => {
        if !is_root() {
            eprintln!("SKIPPED {}: mounting a filesystem needs root", $what);
            return Ok(());
        }
    };
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A mounted filesystem, unmounted (by its mount point) when dropped.
struct Mounted {
    point: PathBuf,
}

impl Mounted {
    fn tmpfs(point: &Path, size: &str) -> Result<Mounted> {
        std::fs::create_dir_all(point)?;
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(point))?;
        Ok(Mounted {
            point: point.to_path_buf(),
        })
    }

    fn ext4(image: &Path, point: &Path) -> Result<Mounted> {
        run(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(image)
            .arg(point))?;
        Ok(Mounted {
            point: point.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.point)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok || !is_mount_point(&self.point) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.point).output();
    }
}

fn is_mount_point(p: &Path) -> bool {
    let Ok(canon) = p.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canon.to_string_lossy().as_ref()))
}

/// The simulator (live content for a few minutes), the receiver, and a configuration whose state
/// directory is `state` and whose status runtime directory is `run`.
struct FaultRig {
    mounts: Vec<Mounted>,
    sim: Sim,
    rx: Receiver,
    config: PathBuf,
    state: PathBuf,
    run: PathBuf,
    dir: tempfile::TempDir,
}

impl FaultRig {
    /// `mount` makes the state directory's filesystem before the configuration names it.
    fn start(mount: impl FnOnce(&Path) -> Result<(Vec<Mounted>, PathBuf)>) -> Result<FaultRig> {
        let dir = tempfile::tempdir()?;
        let (mounts, state) = mount(dir.path())?;
        let sim = Sim::start(
            dir.path(),
            &sim_tenant(
                TID,
                CID,
                "s",
                &TYPES,
                "history_hours = 2\nhistory_blobs_per_hour = 4\nrecords_per_blob = 40\nlive_blob_interval_ms = 400\nlive_blobs_max = 2000\n",
            ),
        )?;
        let rx = Receiver::start(dir.path())?;
        let tenant = TenantSpec::with_secret("faults", TID, CID, "s", &TYPES);
        let config = write_config(
            dir.path(),
            &sim,
            &rx,
            &[tenant],
            "retry_max_secs = 2",
            "[management]\nheartbeat_secs = 1\n",
        )?;
        let text = std::fs::read_to_string(&config)?.replace(
            &format!("state_dir = \"{}\"", dir.path().join("state").display()),
            &format!("state_dir = \"{}\"", state.display()),
        );
        std::fs::write(&config, text)?;
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run)?;
        Ok(FaultRig {
            mounts,
            sim,
            rx,
            config,
            state,
            run,
            dir,
        })
    }

    fn sensor(&self, n: usize) -> Result<Proc> {
        start_sensor_with_env(
            self.dir.path(),
            &self.config,
            n,
            &[("RUNTIME_DIRECTORY", self.run.to_str().unwrap_or_default())],
        )
    }

    /// What `m365-sensor status --json` shows, and which file it read (its stderr line).
    fn status(&self) -> Option<(Value, String)> {
        let out = Command::new(bin("m365-sensor").ok()?)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .env("RUNTIME_DIRECTORY", &self.run)
            .output()
            .ok()?;
        let doc = serde_json::from_slice(&out.stdout).ok()?;
        Some((doc, String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    fn spool_state(&self) -> String {
        self.status()
            .and_then(|(s, _)| s["components"]["spool"]["state"].as_str().map(String::from))
            .unwrap_or_default()
    }

    fn delivered(&self) -> u64 {
        self.status()
            .and_then(|(s, _)| s["counters"]["records_delivered"].as_u64())
            .unwrap_or(0)
    }

    fn heartbeats(&self) -> Result<Vec<Value>> {
        Ok(self
            .rx
            .get_json("/_rx/heartbeats")?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits for `state` on the spool component; returns the status and how long it took.
    fn wait_spool_state(
        &self,
        state: &str,
        timeout: Duration,
    ) -> Result<(Value, String, Duration)> {
        let t0 = Instant::now();
        let (doc, from) = wait_for(timeout, &format!("spool state {state}"), || {
            self.status()
                .filter(|(s, _)| s["components"]["spool"]["state"] == state)
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; last status: {:#}",
                self.status().map(|s| s.0).unwrap_or_default()
            )
        })?;
        Ok((doc, from, t0.elapsed()))
    }

    /// Waits until collection and delivery run again after a fault: the spool component leaves the
    /// fault and more records are delivered than `before`.
    fn wait_resumed(&self, before: u64, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        wait_for(timeout, "collection and delivery to resume", || {
            let st = self.spool_state();
            (matches!(st.as_str(), "ok" | "spool_high") && self.delivered() > before).then_some(())
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; last status: {:#}",
                self.status().map(|s| s.0).unwrap_or_default()
            )
        })?;
        Ok(t0.elapsed())
    }

    /// Stops live generation and judges the whole run against the ground truth.
    fn judge(&self) -> Result<()> {
        self.sim.set_generation(false)?;
        let v = wait_for_delivery(&self.sim, &self.rx, Duration::from_secs(240))?;
        assert!(v.is_exact(), "{}", describe(&v));
        assert!(v.expected > 0);
        eprintln!("FAULTS ground truth: {}", describe(&v));
        Ok(())
    }
}

/// Fills the filesystem holding `dir` with `dir/filler` until it refuses a write (ENOSPC).
fn fill(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    // Large writes first, then smaller ones down to a byte: not one page stays free.
    for size in [64 * 1024, 4096, 1] {
        let block = vec![0xa5u8; size];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    let _ = f.sync_all();
    Ok(path)
}

fn tmpfs_state(size: &'static str) -> impl FnOnce(&Path) -> Result<(Vec<Mounted>, PathBuf)> {
    move |dir| {
        let state = dir.join("state");
        Ok((vec![Mounted::tmpfs(&state, size)?], state))
    }
}

fn still_running(p: &mut Proc) -> Result<()> {
    if let Some(status) = p.child.try_wait()? {
        bail!("the agent exited ({status}):\n{}", p.log_text());
    }
    Ok(())
}

/// Heartbeats keep arriving for `window`, and the newest carries `state` on the spool component.
fn heartbeats_continue(rig: &FaultRig, state: &str, window: Duration) -> Result<()> {
    let before = rig.heartbeats()?.len();
    std::thread::sleep(window);
    let all = rig.heartbeats()?;
    assert!(
        all.len() >= before + 2,
        "heartbeats stopped: {before} -> {}",
        all.len()
    );
    let last = &all[all.len() - 1]["document"]["components"]["spool"]["state"];
    assert_eq!(last, state, "the heartbeat carries the precise state");
    Ok(())
}

#[test]
fn a_full_state_filesystem_is_reported_and_delivery_resumes_once_space_returns() -> Result<()> {
    require_root!("a_full_state_filesystem_is_reported_and_delivery_resumes_once_space_returns");
    let rig = FaultRig::start(tmpfs_state("48m"))?;
    let mut sensor = rig.sensor(0)?;
    wait_for(Duration::from_secs(60), "first deliveries", || {
        (rig.delivered() > 0).then_some(())
    })?;
    let filler = fill(&rig.state)?;
    let (doc, from, detect) = rig.wait_spool_state("disk_full", Duration::from_secs(30))?;
    let spool = &doc["components"]["spool"];
    let detail = spool["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&rig.state.display().to_string()) && detail.contains("tmpfs"),
        "the status names the filesystem: {spool:#}"
    );
    assert!(detail.contains("bytes free"), "{spool:#}");
    assert!(!spool["fix"].as_str().unwrap_or_default().is_empty());
    assert!(
        from.contains(&rig.run.display().to_string()),
        "status read the runtime copy while the state filesystem is full: {from}"
    );
    for (name, c) in doc["components"].as_object().into_iter().flatten() {
        assert_ne!(
            c["state"], "api_unreachable",
            "{name}: Microsoft is not blamed for a full disk: {c:#}"
        );
    }
    heartbeats_continue(&rig, "disk_full", Duration::from_secs(4))?;
    still_running(&mut sensor)?;
    let before = rig.delivered();
    std::fs::remove_file(&filler)?;
    let recover = rig.wait_resumed(before, Duration::from_secs(90))?;
    eprintln!(
        "FAULTS disk_full while collecting: detected in {} ms, resumed {} ms after space returned",
        detect.as_millis(),
        recover.as_millis()
    );
    rig.judge()?;
    let code = sensor.terminate(Duration::from_secs(10))?;
    assert!(code.success(), "{code}");
    Ok(())
}

#[test]
fn a_restart_while_the_state_filesystem_is_full_stays_up_and_resumes() -> Result<()> {
    require_root!("a_restart_while_the_state_filesystem_is_full_stays_up_and_resumes");
    let rig = FaultRig::start(tmpfs_state("48m"))?;
    let mut first = rig.sensor(0)?;
    wait_for(Duration::from_secs(60), "first deliveries", || {
        (rig.delivered() > 0).then_some(())
    })?;
    let code = first.terminate(Duration::from_secs(10))?;
    assert!(code.success(), "{code}");
    let filler = fill(&rig.state)?;
    let mut sensor = rig.sensor(1)?;
    let (doc, _, detect) = rig.wait_spool_state("disk_full", Duration::from_secs(30))?;
    assert!(
        doc["pid"].as_u64() == Some(u64::from(sensor.child.id())),
        "the status is the restarted agent's: {doc:#}"
    );
    std::thread::sleep(Duration::from_secs(3));
    still_running(&mut sensor)?;
    heartbeats_continue(&rig, "disk_full", Duration::from_secs(4))?;
    let before = rig.delivered();
    std::fs::remove_file(&filler)?;
    let recover = rig.wait_resumed(before, Duration::from_secs(90))?;
    eprintln!(
        "FAULTS restart while full: disk_full reported {} ms after start, resumed {} ms after space returned",
        detect.as_millis(),
        recover.as_millis()
    );
    rig.judge()?;
    Ok(())
}

#[test]
fn a_state_filesystem_turned_read_only_is_reported_and_delivery_resumes_after_fsck() -> Result<()> {
    require_root!(
        "a_state_filesystem_turned_read_only_is_reported_and_delivery_resumes_after_fsck"
    );
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        eprintln!("SKIPPED: mkfs.ext4 (e2fsprogs) is not installed");
        return Ok(());
    }
    let mut image = PathBuf::new();
    let rig = FaultRig::start(|dir| {
        // The mount point lives on a read-only tmpfs: while the ext4 is unmounted for fsck, nothing
        // the agent tries can land under it.
        let hold = dir.join("hold");
        let holder = Mounted::tmpfs(&hold, "1m")?;
        let state = hold.join("state");
        std::fs::create_dir_all(&state)?;
        run(Command::new("mount").args(["-o", "remount,ro"]).arg(&hold))?;
        image = dir.join("state.ext4");
        run(Command::new("truncate").args(["-s", "128M"]).arg(&image))?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let disk = Mounted::ext4(&image, &state)?;
        // Dropped in order: the ext4 first, then its holder.
        Ok((vec![disk, holder], state))
    })?;
    let mut sensor = rig.sensor(0)?;
    wait_for(Duration::from_secs(60), "first deliveries", || {
        (rig.delivered() > 0).then_some(())
    })?;
    let loop_dev = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(rig.state.to_string_lossy().as_ref()))
        .and_then(|l| l.split(' ').next().map(String::from))
        .context("the ext4 mount")?;
    let name = Path::new(&loop_dev)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // What the kernel does on a metadata error with errors=remount-ro.
    std::fs::write(
        format!("/sys/fs/ext4/{name}/trigger_fs_error"),
        "host_faults test",
    )?;
    let (doc, from, detect) = rig.wait_spool_state("disk_read_only", Duration::from_secs(30))?;
    let spool = &doc["components"]["spool"];
    assert!(
        spool["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&rig.state.display().to_string()),
        "{spool:#}"
    );
    assert!(from.contains(&rig.run.display().to_string()), "{from}");
    heartbeats_continue(&rig, "disk_read_only", Duration::from_secs(4))?;
    still_running(&mut sensor)?;
    // The operator's repair: unmount (the agent closed the spool), fsck, mount read-write.
    let t_fix = Instant::now();
    wait_for(Duration::from_secs(20), "the ext4 to unmount", || {
        Command::new("umount")
            .arg(&rig.state)
            .output()
            .ok()
            .filter(|o| o.status.success())
    })?;
    let fsck = Command::new("e2fsck").arg("-fy").arg(&image).output()?;
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    run(Command::new("mount")
        .args(["-o", "loop,errors=remount-ro"])
        .arg(&image)
        .arg(&rig.state))?;
    let before = rig.delivered();
    let recover = rig.wait_resumed(before, Duration::from_secs(90))?;
    eprintln!(
        "FAULTS read-only state filesystem: detected in {} ms, resumed {} ms after the remount ({} ms repair)",
        detect.as_millis(),
        recover.as_millis(),
        t_fix.elapsed().as_millis() - recover.as_millis()
    );
    rig.judge()?;
    let code = sensor.terminate(Duration::from_secs(10))?;
    assert!(code.success(), "{code}");
    assert!(!rig.mounts.is_empty());
    Ok(())
}

#[test]
fn sigterm_with_every_peer_hanging_exits_0_within_5_seconds() -> Result<()> {
    let rig = Rig::one_tenant("hang", TID, CID, &TYPES, "", "")?;
    // A loopback port that completes TCP handshakes (the backlog) but never answers: every TLS
    // handshake, token request, listing, batch and heartbeat hangs until its own timeout.
    let hole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("https://{}", hole.local_addr()?);
    let text = std::fs::read_to_string(&rig.config)?
        .replace(&rig.sim.url, &url)
        .replace(&rig.rx.url, &url)
        .replace("request_timeout_secs = 5", "request_timeout_secs = 120");
    std::fs::write(&rig.config, text + "\n[management]\nheartbeat_secs = 1\n")?;
    let mut sensor = rig.start_sensor(0)?;
    wait_for(Duration::from_secs(30), "the agent to run", || {
        rig.status()
            .filter(|s| s["pid"].as_u64() == Some(u64::from(sensor.child.id())))
    })?;
    // Collectors, the relay and the control task are all waiting on the hole now.
    std::thread::sleep(Duration::from_secs(4));
    still_running(&mut sensor)?;
    let t0 = Instant::now();
    let code = sensor.terminate(Duration::from_secs(30))?;
    let took = t0.elapsed();
    eprintln!(
        "FAULTS SIGTERM with every peer hanging: exit {code} after {} ms",
        took.as_millis()
    );
    assert!(
        code.success(),
        "exit 0 after SIGTERM: {code}\n{}",
        sensor.log_text()
    );
    assert!(
        took <= Duration::from_secs(5),
        "stopped in {took:?} (bound 5 s)\n{}",
        sensor.log_text()
    );
    drop(hole);
    Ok(())
}

#[test]
fn a_damaged_spool_keeps_the_agent_reachable_and_reset_spool_sets_it_aside() -> Result<()> {
    let rig = Rig::one_tenant(
        "damaged",
        TID,
        CID,
        &TYPES,
        "history_hours = 2\nhistory_blobs_per_hour = 4\nrecords_per_blob = 20\nlive_blob_interval_ms = 0\n",
        "",
    )?;
    let text = std::fs::read_to_string(&rig.config)?;
    std::fs::write(&rig.config, text + "\n[management]\nheartbeat_secs = 1\n")?;
    let mut first = rig.start_sensor(0)?;
    let v = wait_for_delivery(&rig.sim, &rig.rx, Duration::from_secs(120))?;
    assert!(v.is_exact(), "{}", describe(&v));
    assert!(first.terminate(Duration::from_secs(10))?.success());
    // Damage at rest: the file naming the spool's generation no longer says one.
    let current = rig.dir.path().join("state/spool/CURRENT");
    std::fs::write(&current, "garbage")?;
    let mut sensor = rig.start_sensor(1)?;
    let pid = u64::from(sensor.child.id());
    let damaged = wait_for(Duration::from_secs(30), "spool_damaged", || {
        rig.status().filter(|s| {
            s["pid"].as_u64() == Some(pid) && s["components"]["spool"]["state"] == "spool_damaged"
        })
    })?;
    let spool = &damaged["components"]["spool"];
    assert!(
        spool["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("CURRENT"),
        "the status says what was found where: {spool:#}"
    );
    let before = rig
        .rx
        .get_json("/_rx/heartbeats")?
        .as_array()
        .map_or(0, Vec::len);
    std::thread::sleep(Duration::from_secs(3));
    still_running(&mut sensor)?;
    let after = rig
        .rx
        .get_json("/_rx/heartbeats")?
        .as_array()
        .map_or(0, Vec::len);
    assert!(
        after >= before + 2,
        "heartbeats continue: {before} -> {after}"
    );

    let id = rig.rx.queue_command("reset_spool", serde_json::json!({}))?;
    let r = rig.rx.wait_result(&id, Duration::from_secs(30))?;
    assert_eq!(r["ok"], true, "{r}");
    let msg = r["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("spool.damaged-") && msg.contains("segment file(s)") && msg.contains("bytes"),
        "{msg}"
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(rig.dir.path().join("state"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("spool.damaged-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read_to_string(aside[0].join("CURRENT"))?,
        "garbage",
        "the damaged spool is kept as it was"
    );
    wait_for(Duration::from_secs(30), "a fresh spool", || {
        rig.status()
            .filter(|s| s["components"]["spool"]["state"] == "ok")
    })?;
    // A fresh spool lists the backfill again: nothing is lost; what the backend already held may
    // arrive again (same record Ids), which the reset's result says.
    let v = wait_for_delivery(&rig.sim, &rig.rx, Duration::from_secs(120))?;
    assert!(
        v.missing.is_empty() && v.altered.is_empty() && v.invented.is_empty(),
        "{}",
        describe(&v)
    );
    eprintln!(
        "FAULTS spool damaged at rest, reset_spool: {}",
        describe(&v)
    );
    assert!(sensor.terminate(Duration::from_secs(10))?.success());
    Ok(())
}

//! A listing that never ends (issue 18, item 6): the simulator answers every listing page of one content
//! type with its items and a `NextPageUri` to the same page under a new URL, forever. The sensor must
//! handle each page before it asks for the next (its memory stays bounded while thousands of pages are
//! served), cut the window at its item cap with a status that names the stream and the `NextPageUri`
//! count, keep the other streams flowing, and lose nothing: every record the simulator served is
//! delivered exactly once.

use std::time::{Duration, Instant};

use sensor_blackbox::*;

const TID: &str = "4e0d1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
const CID: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";
const ENDLESS: &str = "Audit.Exchange";
const STREAMS: [&str; 3] = ["Audit.Exchange", "Audit.General", "Audit.SharePoint"];

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
fn status_kb(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[test]
fn a_listing_without_end_is_cut_with_bounded_memory_and_nothing_lost() -> anyhow::Result<()> {
    // 3 h of history, 15 blobs an hour per content type: ~45 items on every page of a window (one
    // page holds them all), so the 100,000-item cap cuts an endless listing after ~2,200 pages. A
    // collector that gathers the pages first holds 45 more items per page, up to 10,000 pages.
    let rig = Rig::one_tenant(
        "hostile",
        TID,
        CID,
        &STREAMS,
        "history_hours = 3\nhistory_blobs_per_hour = 15\nrecords_per_blob = 2\npage_size = 100\nlive_blob_interval_ms = 0\n[tenant.faults]\nendless_listing = [\"Audit.Exchange\"]\n",
        "",
    )?;
    let config = std::fs::read_to_string(&rig.config)?.replace(
        "backfill_hours = 24",
        "backfill_hours = 4\nmax_requests_per_minute = 30000",
    );
    std::fs::write(&rig.config, config)?;
    let mut sensor = rig.start_sensor(0)?;
    let pid = sensor.child.id();
    let component = format!("tenant/hostile/{ENDLESS}");
    // Bounded memory: the sensor's high-water mark stays below this while the pages are served. One
    // tenant's debug-build sensor peaks at ~30 MiB here; gathering 10,000 pages of 45 items would hold
    // ~200 MiB of items.
    const BOUND: u64 = 96 * 1024 * 1024;
    let started = Instant::now();
    let cut = loop {
        let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
        let pages = rig.sim.stats()?["tenants"][TID]["endless_pages"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            hwm < BOUND,
            "the sensor's peak RSS reached {:.1} MiB (bound {:.0} MiB) after {pages} endless pages\nsensor log tail:\n{}",
            mib(hwm),
            mib(BOUND),
            tail(&sensor.log_text())
        );
        let c = rig.status().map(|s| s["components"][&component].clone());
        if let Some(c) = c.filter(|c| c["state"] == "listing_cut") {
            break (c, pages, hwm);
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no cut reported within 300 s ({pages} endless pages served, peak RSS {:.1} MiB)\nsensor log tail:\n{}",
            mib(hwm),
            tail(&sensor.log_text())
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (c, pages, hwm) = cut;
    let error = c["error"].as_str().unwrap_or_default();
    println!(
        "cut after {pages} endless pages served, peak RSS {:.1} MiB: {error}",
        mib(hwm)
    );
    assert!(
        pages >= 2000,
        "thousands of pages were served before the cut: {pages}"
    );
    assert!(
        error.contains(&format!("the listing of {ENDLESS}")) && error.contains("did not end"),
        "the status names the stream: {error}"
    );
    assert!(
        error.contains("NextPageUri") && error.contains("at the cap of 100000 items per window"),
        "the status names the NextPageUri count and the cap: {error}"
    );
    let followed: u64 = error
        .split("cut after following ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        (2000..10_000).contains(&followed),
        "the count of NextPageUri followed is in the status: {error}"
    );

    // The other streams flow, and nothing is lost or doubled: every record the simulator can serve
    // (the endless stream's included, since each page holds them) reaches the backend once.
    let v = wait_for_delivery(&rig.sim, &rig.rx, Duration::from_secs(180))?;
    assert!(
        v.expected > 200,
        "the scenario is big enough: {}",
        describe(&v)
    );
    assert!(
        v.is_exact(),
        "{}\nsensor log tail:\n{}",
        describe(&v),
        tail(&sensor.log_text())
    );
    let status = rig.status().unwrap_or_default();
    for ct in STREAMS.iter().filter(|ct| **ct != ENDLESS) {
        let state = &status["components"][format!("tenant/hostile/{ct}")]["state"];
        assert_eq!(state, "ok", "{ct} keeps flowing: {status}");
    }
    let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
    assert!(
        hwm < BOUND,
        "peak RSS {:.1} MiB at the end (bound {:.0} MiB)",
        mib(hwm),
        mib(BOUND)
    );
    sensor.terminate(Duration::from_secs(20))?;
    Ok(())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

//! Reliability: every record Microsoft listed is delivered exactly once, byte-identical, across late
//! content, duplicates with re-ordered fields, replays days old, pagination with a looping NextPageUri,
//! throttling (AF429 as 403 and 429), AF50000, hung responses, expired and malformed blobs, and backend
//! 5xx/429/503. Also: certificate credentials (RS256 and PS256) and gzip.

use std::time::Duration;

use sensor_blackbox::*;
use serde_json::json;

const TID: &str = "2b7e1516-28ae-4d2a-a6d2-15883a9b1d01";
const CID: &str = "2b7e1516-28ae-4d2a-a6d2-15883a9b1da1";

#[test]
fn every_record_is_delivered_exactly_once_through_upstream_and_backend_faults() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let sim = Sim::start(
        dir.path(),
        &sim_tenant(
            TID,
            CID,
            "s3cret-value",
            &ALL_CONTENT_TYPES,
            r#"
token_lifetime_secs = 6
history_hours = 168
history_blobs_per_hour = 1
records_per_blob = 8
live_blob_interval_ms = 150
live_blobs_max = 25
page_size = 7
seed = 7
[tenant.faults]
late_fraction = 0.3
late_hours = 3
duplicate_fraction = 0.15
replay_fraction = 0.2
expired_blobs = 2
throttle_every = 37
throttle_retry_after_secs = 1
af50000_every = 41
hang_every = 401
malformed_blobs = 4
oversized_blobs = 1
oversized_bytes = 400000
nextpage_loop = true
"#,
        ),
    )?;
    let rx = Receiver::start(dir.path())?;
    rx.control(
        "/_rx/faults",
        json!({
            "next_statuses": [{"status": 503, "retry_after": "1"}, {"status": 429, "retry_after_http_date_secs": 2}, {"status": 500}],
            "status_every": {"every": 5, "status": 502}
        }),
    )?;
    let mut tenant =
        TenantSpec::with_secret("contoso", TID, CID, "s3cret-value", &ALL_CONTENT_TYPES);
    tenant.backfill_hours = 168;
    tenant.extra = "max_blob_bytes = 262144".into();
    let cfg = write_config(
        dir.path(),
        &sim,
        &rx,
        &[tenant],
        "batch_max_records = 300",
        "",
    )?;
    let mut sensor = start_sensor(dir.path(), &cfg, 0)?;

    // Live generation ends by itself (live_blobs_max); then everything listed must arrive.
    std::thread::sleep(Duration::from_secs(6));
    sim.set_generation(false)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(240))?;
    assert!(
        v.expected > 3000,
        "the scenario is big enough: {}",
        describe(&v)
    );
    assert!(
        v.is_exact(),
        "{}\nsensor log tail:\n{}",
        describe(&v),
        tail(&sensor.log_text())
    );

    let stats = sim.stats()?;
    assert_eq!(
        stats["missing_publisher_identifier"], 0,
        "PublisherIdentifier on every request"
    );
    assert_eq!(stats["window_errors"], 0, "no AF20030/AF20055");
    assert_eq!(
        stats["start_too_soon"], 0,
        "subscription starts 15 min apart"
    );
    assert!(
        stats["throttled"].as_u64().unwrap_or(0) > 0,
        "the run was throttled"
    );

    // Blobs are fetched once; retries only after a failure. Expired blobs are never fetched in a loop.
    let t = &sim.truth()?["tenants"][TID];
    let fetches = &stats["tenants"][TID]["blob_fetches"];
    for id in t["expired_content_ids"].as_array().into_iter().flatten() {
        let n = fetches[id.as_str().unwrap_or_default()]
            .as_u64()
            .unwrap_or(0);
        assert!(n <= 1, "expired blob {id} fetched {n} times");
    }
    let bad = t["malformed_content_ids"]
        .as_array()
        .into_iter()
        .chain(t["oversized_content_ids"].as_array())
        .flatten();
    for id in bad {
        let n = fetches[id.as_str().unwrap_or_default()]
            .as_u64()
            .unwrap_or(0);
        assert!(
            n <= BLOB_RETRY_BOUND,
            "malformed blob {id} fetched {n} times"
        );
    }
    let max = fetches
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).max().unwrap_or(0))
        .unwrap_or(0);
    assert!(max <= BLOB_RETRY_BOUND, "a blob was fetched {max} times");

    // The losses are reported, not silent.
    let status = wait_for(
        Duration::from_secs(10),
        "the status to count the expired and quarantined blobs",
        || {
            sensor_status(dir.path()).filter(|s| {
                s["counters"]["blobs_expired"].as_u64() >= Some(2)
                    && s["counters"]["blobs_quarantined"].as_u64() >= Some(4)
            })
        },
    )?;
    let lost = status["components"]
        .as_object()
        .map(|c| {
            c.values()
                .filter(|c| c["state"] == "content_expired")
                .count()
        })
        .unwrap_or(0);
    assert!(
        lost >= 1,
        "a content_expired state names the lost window: {status:#}"
    );
    let rx_summary = rx.summary()?;
    assert_eq!(rx_summary["key_conflicts"], 0);
    assert_eq!(rx_summary["header_violations"], 0);

    let code = sensor.terminate(Duration::from_secs(30))?;
    assert!(code.success(), "SIGTERM exits 0: {code}");
    Ok(())
}

/// A blob may be fetched again after a transient failure (AF429, AF50000, a hung response), a bounded
/// number of times.
const BLOB_RETRY_BOUND: u64 = 6;

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn make_cert(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("app.pem"), dir.join("app.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=m365-sensor-test",
            "-days",
            "2",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    set_mode(&key, 0o600)?;
    Ok((cert, key))
}

#[test]
fn certificate_credentials_work_with_rs256_and_ps256_and_gzip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = make_cert(dir.path())?;
    let tenants: Vec<(String, &str)> = vec![
        ("3c7e1516-28ae-4d2a-a6d2-15883a9b1d01".into(), "RS256"),
        ("3c7e1516-28ae-4d2a-a6d2-15883a9b1d02".into(), "PS256"),
    ];
    let mut scenario = String::new();
    for (tid, _) in &tenants {
        scenario.push_str(&format!(
            "[[tenant]]\ntenant_id = \"{tid}\"\nclient_id = \"{CID}\"\ncertificate_pem_file = \"{}\"\nhistory_hours = 6\nhistory_blobs_per_hour = 2\nrecords_per_blob = 10\nlive_blob_interval_ms = 0\ncontent_types = [\"Audit.Exchange\", \"Audit.General\"]\n\n",
            cert.display()
        ));
    }
    let sim = Sim::start(dir.path(), &scenario)?;
    let rx = Receiver::start(dir.path())?;
    let specs: Vec<TenantSpec> = tenants
        .iter()
        .enumerate()
        .map(|(i, (tid, alg))| TenantSpec {
            name: format!("cert{i}"),
            tenant_id: tid.clone(),
            client_id: CID.into(),
            secret: None,
            certificate: Some((cert.clone(), key.clone())),
            content_types: vec!["Audit.Exchange".into(), "Audit.General".into()],
            backfill_hours: 24,
            extra: format!("assertion_alg = \"{alg}\""),
        })
        .collect();
    let cfg = write_config(dir.path(), &sim, &rx, &specs, "compression = \"gzip\"", "")?;
    let _sensor = start_sensor(dir.path(), &cfg, 0)?;
    let v = wait_for_delivery(&sim, &rx, Duration::from_secs(90))?;
    assert!(v.expected >= 400, "{}", describe(&v));
    assert!(v.is_exact(), "{}", describe(&v));
    let s = rx.summary()?;
    assert!(
        s["encodings"]["gzip"].as_u64().unwrap_or(0) > 0,
        "gzip batches: {s}"
    );
    assert_eq!(s["encodings"]["zstd"].as_u64().unwrap_or(0), 0);
    let stats = sim.stats()?;
    assert!(
        stats["token_ok"].as_u64().unwrap_or(0) >= 2,
        "both tenants got tokens by assertion: {stats}"
    );
    // The test certificate is valid for 2 days: the sensor warns ahead of its expiry.
    let status = wait_for(
        Duration::from_secs(20),
        "secret_expiring for the certificates",
        || {
            sensor_status(dir.path()).filter(|s| {
                s["components"]["tenant/cert0/Audit.Exchange"]["state"] == "secret_expiring"
            })
        },
    )?;
    let detail = status["components"]["tenant/cert1/Audit.General"]["detail"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        detail.contains("certificate expires in 2 day(s)")
            || detail.contains("certificate expires in 1 day(s)"),
        "{detail}"
    );
    Ok(())
}

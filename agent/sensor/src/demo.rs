//! `m365-sensor demo`: the main job on the embedded default. A simulated Microsoft 365 tenant (with late
//! content and duplicates) and the reference backend run in-process on loopback, over real TLS with a
//! throw-away CA; the real agent collects, spools and relays between them while a progress line shows
//! records collected, spooled, delivered and the compression ratio. Nothing leaves 127.0.0.1.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sensor_core::config::Config;

const TENANT_ID: &str = "c0ffee00-0000-4000-8000-000000000001";
const CLIENT_ID: &str = "c0ffee00-0000-4000-8000-0000000000a1";

fn scenario() -> String {
    format!(
        r#"
[[tenant]]
tenant_id = "{TENANT_ID}"
client_id = "{CLIENT_ID}"
client_secrets = ["demo-secret-value"]
cloud = "commercial"
history_hours = 24
history_blobs_per_hour = 4
records_per_blob = 40
live_blob_interval_ms = 400
live_blobs_max = 100000
page_size = 25
[tenant.faults]
late_fraction = 0.1
late_hours = 3
duplicate_fraction = 0.05
"#
    )
}

fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Runs the demo until `records` were delivered or Ctrl-C.
pub async fn run(records: Option<u64>, keep: bool) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("m365-sensor-demo-")
        .tempdir()
        .context("creating the demo directory")?;
    let root = dir.path().to_path_buf();
    let scenario = m365_sim::Scenario::from_toml(&scenario())
        .map_err(|e| anyhow::anyhow!("demo scenario: {e}"))?;
    let sim = m365_sim::start(scenario, "127.0.0.1:0".parse()?)
        .await
        .map_err(|e| anyhow::anyhow!("starting the simulated tenant: {e}"))?;
    let token = format!("demo-token-{}", std::process::id());
    let rx = backend_receiver::start(backend_receiver::ReceiverConfig {
        bearer_token: Some(token.clone()),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("starting the local backend: {e}"))?;
    std::fs::write(root.join("tenant-ca.pem"), &sim.ca_pem)?;
    std::fs::write(root.join("backend-ca.pem"), &rx.ca_pem)?;
    write_secret(&root.join("contoso.secret"), "demo-secret-value")?;
    write_secret(&root.join("backend.token"), &token)?;
    let config_text = format!(
        r#"state_dir = "{root}/state"
[backend]
url = "{rx_url}"
token_file = "{root}/backend.token"
ca_file = "{root}/backend-ca.pem"
batch_linger_ms = 500
[[tenant]]
name = "contoso"
tenant_id = "{TENANT_ID}"
client_id = "{CLIENT_ID}"
client_secret_file = "{root}/contoso.secret"
cloud = "commercial"
backfill_hours = 24
poll_interval_secs = 2
login_url = "{sim_url}"
api_url = "{sim_url}"
ca_file = "{root}/tenant-ca.pem"
"#,
        root = root.display(),
        rx_url = rx.url,
        sim_url = sim.url,
    );
    let config_path = root.join("sensor.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::from_toml(&config_text, &config_path)?;
    println!(
        "m365-sensor demo: simulated tenant at {}, local backend at {}",
        sim.url, rx.url
    );
    println!(
        "working directory {} (configuration sensor.toml)",
        root.display()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
    let (_reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let agent = tokio::spawn(crate::agent::run_agent(
        config,
        None,
        reload_rx,
        stop_rx,
        move |h| {
            let _ = handles_tx.send(h);
        },
    ));
    let handles = match handles_rx.await {
        Ok(h) => h,
        Err(_) => {
            return match agent.await {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("the agent stopped before it started")),
            }
        }
    };
    let started = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let c = handles.counters.snapshot();
        let s = rx.summary();
        let ratio = if c.bytes_wire_delivered > 0 {
            c.bytes_raw_delivered as f64 / c.bytes_wire_delivered as f64
        } else {
            0.0
        };
        let spool = handles.spool.figures();
        print!(
            "\r[{:>4}s] collected {:>7} | spooled {:>7} | duplicates dropped {:>5} | delivered {:>7} (backend holds {} unique, {} duplicate) | compression {:.1}x | spool {} records   ",
            started.elapsed().as_secs(),
            c.records_fetched,
            c.records_spooled,
            c.duplicates_dropped,
            c.records_delivered,
            s.unique_records,
            s.duplicate_records,
            ratio,
            spool.pending_records
        );
        let _ = std::io::stdout().flush();
        if records.is_some_and(|n| s.unique_records >= n) {
            println!();
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut ctrl_c => { println!(); break; }
        }
    }
    let _ = stop_tx.send(true);
    agent.await.context("the agent task")??;
    let s = rx.summary();
    let truth = sim.truth();
    let served: usize = truth.tenants.values().map(|t| t.expected.len()).sum();
    println!(
        "done: the backend stored {} unique records ({} duplicates) of the {} the simulated tenant listed so far; {} batches, {} bytes on the wire for {} bytes of NDJSON",
        s.unique_records, s.duplicate_records, served, s.batches_stored, s.bytes_compressed, s.bytes_decompressed
    );
    let status = crate::status_cmd::print_status(&root.join("state"), false);
    if keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    status.map(|_| ())
}

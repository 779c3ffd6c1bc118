//! `m365-sensor run`: wires the spool, the collectors, the relay and the status writer, and shuts them
//! down in order. Invariant: on SIGTERM/SIGINT collectors stop between durable steps, in-flight batches get
//! a bounded drain, and the spool is flushed and fsynced before exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sensor_core::config::Config;
use sensor_core::counters::Counters;
use sensor_core::status::{SpoolFigures, State, StatusBoard, StatusDocument};
use sensor_spool::{Spool, SpoolOptions};
use tokio::sync::{watch, Notify};

/// How long in-flight batches may take at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Everything a running agent exposes to its embedder (the demo's progress line).
#[derive(Clone)]
pub struct AgentHandles {
    /// Counters.
    pub counters: Arc<Counters>,
    /// The spool.
    pub spool: Arc<Spool>,
}

/// The sensor id: stored in `<state_dir>/sensor_id`, created once.
pub fn sensor_id(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("sensor_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = uuid_like();
    write_atomic(&path, id.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn uuid_like() -> String {
    let b: [u8; 16] = rand_bytes();
    format!(
        "{}-{}-{}-{}-{}",
        hex(&b[0..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Path of the status document.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

fn status_document(
    sensor_id: &str,
    status: &StatusBoard,
    spool: &Spool,
    counters: &Counters,
) -> StatusDocument {
    let f = spool.figures();
    StatusDocument {
        overall: status.overall(),
        sensor_id: sensor_id.to_string(),
        version: sensor_core::VERSION.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        updated_at: sensor_core::timefmt::rfc3339(time::OffsetDateTime::now_utc()),
        components: status.components(),
        spool: SpoolFigures {
            records: f.pending_records,
            bytes: f.stored_bytes,
            raw_bytes: f.pending_raw_bytes,
            max_bytes: spool.max_bytes(),
            quarantined: f.quarantined_items,
            batches: spool.pending_batches().map(|b| b.len() as u64).unwrap_or(0),
        },
        counters: counters.snapshot(),
        pid: std::process::id(),
    }
}

fn update_spool_state(status: &StatusBoard, spool: &Spool) {
    let f = spool.figures();
    let ratio = spool.fill_ratio();
    let detail = Some(format!(
        "{} records, {} of {} used",
        f.pending_records,
        sensor_relay::human_bytes(f.stored_bytes + f.quarantined_bytes),
        sensor_relay::human_bytes(spool.max_bytes())
    ));
    let state = if spool.is_full() {
        State::SpoolFull
    } else if ratio >= 0.8 {
        State::SpoolHigh
    } else {
        State::Ok
    };
    if status.set("spool", state, None, detail) && state != State::Ok {
        log::warn!(target: "spool", "spool state {state:?}: {}", f.stored_bytes);
    }
    if f.quarantined_items > 0 {
        status.set(
            "quarantine",
            State::Quarantined,
            None,
            Some(format!(
                "{} item(s) held in quarantine",
                f.quarantined_items
            )),
        );
    }
}

/// Runs the agent of `config` until `shutdown` turns true. `on_start` receives the handles once running.
pub async fn run_agent(
    config: Config,
    mut shutdown: watch::Receiver<bool>,
    on_start: impl FnOnce(AgentHandles),
) -> Result<()> {
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.state_dir.display()
        )
    })?;
    let id = sensor_id(&config.state_dir)?;
    let spool = Arc::new(
        Spool::open(
            &config.state_dir.join("spool"),
            SpoolOptions {
                max_bytes: config.spool.max_bytes,
                cache_bytes: config.spool.cache_bytes,
                dedup_days: config.spool.dedup_days,
            },
        )
        .context("opening the spool")?,
    );
    let status = Arc::new(StatusBoard::default());
    let counters = Arc::new(Counters::default());
    let wake = Arc::new(Notify::new());
    let proxy = config.network.proxy.clone();
    log::info!(target: "agent", "m365-sensor {} starting: sensor id {id}, {} tenant(s), state {}", sensor_core::VERSION, config.tenants.len(), config.state_dir.display());

    let relay = Arc::new(
        sensor_relay::Relay::new(
            config.backend.clone(),
            id.clone(),
            proxy.as_deref(),
            spool.clone(),
            status.clone(),
            counters.clone(),
            wake.clone(),
        )
        .context("starting the relay")?,
    );
    let relay_task = tokio::spawn(relay.run(shutdown.clone(), DRAIN));

    let deps = m365_collector::Deps {
        spool: spool.clone(),
        status: status.clone(),
        counters: counters.clone(),
        relay_wake: wake.clone(),
        proxy,
    };
    let mut collectors = Vec::new();
    for t in config.tenants.clone() {
        let name = t.name.clone();
        collectors.extend(
            m365_collector::start_tenant(t, &deps, shutdown.clone())
                .with_context(|| format!("starting tenant {name}"))?,
        );
    }
    update_spool_state(&status, &spool);
    on_start(AgentHandles {
        counters: counters.clone(),
        spool: spool.clone(),
    });

    let path = status_path(&config.state_dir);
    let mut last_housekeeping = std::time::Instant::now();
    loop {
        update_spool_state(&status, &spool);
        let doc = status_document(&id, &status, &spool, &counters);
        if let Ok(json) = serde_json::to_vec_pretty(&doc) {
            if let Err(e) = write_atomic(&path, &json) {
                log::warn!(target: "agent", "cannot write {}: {e}", path.display());
            }
        }
        if last_housekeeping.elapsed() > Duration::from_secs(3600) {
            last_housekeeping = std::time::Instant::now();
            let s = spool.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = s.expire_seen();
                let _ = s.prune_done_marks();
            })
            .await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    log::info!(target: "agent", "shutting down: stopping collectors, draining in-flight batches");
    for c in collectors {
        let _ = c.await;
    }
    let _ = relay_task.await;
    spool.close().context("closing the spool")?;
    let doc = status_document(&id, &status, &spool, &counters);
    if let Ok(json) = serde_json::to_vec_pretty(&doc) {
        let _ = write_atomic(&path, &json);
    }
    log::info!(target: "agent", "stopped cleanly");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

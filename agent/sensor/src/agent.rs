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

/// How often an unchanged status document is rewritten (its `updated_at` shows the agent is alive).
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// How long in-flight batches may take at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Everything a running agent exposes to its embedder (the demo's progress line).
#[derive(Clone)]
#[cfg_attr(not(feature = "demo"), allow(dead_code))]
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
    let id = uuid::Uuid::new_v4().to_string();
    write_atomic(&path, id.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
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

/// The collectors and the relay of one configuration, each stoppable on its own.
struct Stages {
    config: Config,
    collectors_stop: watch::Sender<bool>,
    collectors: Vec<tokio::task::JoinHandle<()>>,
    relay_stop: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
}

struct Shared {
    id: String,
    spool: Arc<Spool>,
    status: Arc<StatusBoard>,
    counters: Arc<Counters>,
    wake: Arc<Notify>,
}

impl Shared {
    fn start_relay(
        &self,
        config: &Config,
    ) -> Result<(watch::Sender<bool>, tokio::task::JoinHandle<()>)> {
        let relay = Arc::new(
            sensor_relay::Relay::new(
                config.backend.clone(),
                self.id.clone(),
                config.network.proxy.as_deref(),
                self.spool.clone(),
                self.status.clone(),
                self.counters.clone(),
                self.wake.clone(),
            )
            .context("starting the relay")?,
        );
        let (tx, rx) = watch::channel(false);
        Ok((tx, tokio::spawn(relay.run(rx, DRAIN))))
    }

    fn start_collectors(
        &self,
        config: &Config,
    ) -> Result<(watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>)> {
        let deps = m365_collector::Deps {
            spool: self.spool.clone(),
            status: self.status.clone(),
            counters: self.counters.clone(),
            relay_wake: self.wake.clone(),
            proxy: config.network.proxy.clone(),
        };
        let (tx, rx) = watch::channel(false);
        let mut handles = Vec::new();
        for t in config.tenants.clone() {
            let name = t.name.clone();
            handles.extend(
                m365_collector::start_tenant(t, &deps, rx.clone())
                    .with_context(|| format!("starting tenant {name}"))?,
            );
        }
        Ok((tx, handles))
    }

    fn start(&self, config: Config) -> Result<Stages> {
        let (relay_stop, relay) = self.start_relay(&config)?;
        let (collectors_stop, collectors) = self.start_collectors(&config)?;
        Ok(Stages {
            config,
            collectors_stop,
            collectors,
            relay_stop,
            relay,
        })
    }
}

impl Stages {
    async fn stop_collectors(&mut self) {
        let _ = self.collectors_stop.send(true);
        for c in self.collectors.drain(..) {
            let _ = c.await;
        }
    }

    async fn stop(mut self) {
        self.stop_collectors().await;
        let _ = self.relay_stop.send(true);
        let _ = self.relay.await;
    }

    /// Applies `new`: collectors restart between durable steps (nothing in flight is lost: a blob not yet
    /// committed is fetched again and deduplicated); the relay restarts only when the backend settings
    /// changed (batches in flight stay spooled and keep their keys). A state directory change needs a restart.
    async fn reload(&mut self, shared: &Shared, new: Config) -> Result<()> {
        if new.state_dir != self.config.state_dir {
            anyhow::bail!(
                "state_dir changed from {} to {}: restart the agent to move its state",
                self.config.state_dir.display(),
                new.state_dir.display()
            );
        }
        shared.spool.set_max_bytes(new.spool.max_bytes);
        self.stop_collectors().await;
        let names: std::collections::HashSet<String> = new
            .tenants
            .iter()
            .map(|t| format!("tenant/{}/", t.name))
            .collect();
        for component in shared.status.components().keys() {
            if component.starts_with("tenant/")
                && !names.iter().any(|n| component.starts_with(n.as_str()))
            {
                shared.status.remove(component);
            }
        }
        if new.backend != self.config.backend || new.network != self.config.network {
            let _ = self.relay_stop.send(true);
            let old = std::mem::replace(&mut self.relay, tokio::spawn(async {}));
            let _ = old.await;
            let (stop, relay) = shared.start_relay(&new)?;
            self.relay_stop = stop;
            self.relay = relay;
        }
        let (stop, collectors) = shared.start_collectors(&new)?;
        self.collectors_stop = stop;
        self.collectors = collectors;
        self.config = new;
        Ok(())
    }
}

/// Runs the agent of `config` until `shutdown` turns true. Each message on `reload` re-reads
/// `config_path` and applies it live; a configuration that fails validation is refused and the running one
/// kept. `on_start` receives the handles once running.
pub async fn run_agent(
    config: Config,
    config_path: Option<PathBuf>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
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
    log::info!(target: "agent", "m365-sensor {} starting: sensor id {id}, {} tenant(s), state {}", sensor_core::VERSION, config.tenants.len(), config.state_dir.display());
    let shared = Shared {
        id: id.clone(),
        spool: spool.clone(),
        status: Arc::new(StatusBoard::default()),
        counters: Arc::new(Counters::default()),
        wake: Arc::new(Notify::new()),
    };
    let (status, counters) = (shared.status.clone(), shared.counters.clone());
    let path = status_path(&config.state_dir);
    let mut stages = shared.start(config)?;
    update_spool_state(&status, &spool);
    on_start(AgentHandles {
        counters: counters.clone(),
        spool: spool.clone(),
    });
    let mut notifier = crate::sdnotify::Notifier::from_env();
    notifier.ready(&format!(
        "collecting {} tenant(s)",
        stages.config.tenants.len()
    ));
    let mut last_overall = None;

    let mut last_housekeeping = std::time::Instant::now();
    let mut written: Option<(StatusDocument, std::time::Instant)> = None;
    loop {
        update_spool_state(&status, &spool);
        notifier.watchdog_tick();
        let doc = status_document(&id, &status, &spool, &counters);
        if last_overall != Some(doc.overall) {
            last_overall = Some(doc.overall);
            notifier.status(
                &format!(
                    "{:?}: {} records spooled, {} delivered",
                    doc.overall, doc.spool.records, doc.counters.records_delivered
                )
                .to_lowercase(),
            );
        }
        // Write when something changed, else every STATUS_REFRESH: fsyncs every second would wear flash.
        let unchanged = written.as_ref().is_some_and(|(w, at)| {
            w.components == doc.components
                && w.spool == doc.spool
                && w.counters == doc.counters
                && at.elapsed() < STATUS_REFRESH
        });
        if !unchanged {
            match serde_json::to_vec_pretty(&doc)
                .map_err(std::io::Error::other)
                .and_then(|json| write_atomic(&path, &json))
            {
                Ok(()) => written = Some((doc, std::time::Instant::now())),
                Err(e) => log::warn!(target: "agent", "cannot write {}: {e}", path.display()),
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
            Some(()) = reload.recv() => {
                if let Some(p) = &config_path {
                    notifier.reloading();
                    match Config::load(p) {
                        Ok(new) => match stages.reload(&shared, new).await {
                            Ok(()) => log::info!(target: "agent", "configuration {} reloaded", p.display()),
                            Err(e) => log::error!(target: "agent", "configuration {} not applied: {e:#}", p.display()),
                        },
                        Err(e) => log::error!(target: "agent", "configuration refused, the running one is kept: {e}"),
                    }
                    notifier.ready(&format!("collecting {} tenant(s)", stages.config.tenants.len()));
                }
            }
        }
        if *shutdown.borrow() {
            break;
        }
    }
    notifier.stopping();
    log::info!(target: "agent", "shutting down: stopping collectors, draining in-flight batches");
    stages.stop().await;
    spool.close().context("closing the spool")?;
    let doc = status_document(&id, &status, &spool, &counters);
    if let Ok(json) = serde_json::to_vec_pretty(&doc) {
        let _ = write_atomic(&path, &json);
    }
    log::info!(target: "agent", "stopped cleanly");
    Ok(())
}

/// Sends a reload request on every SIGHUP.
pub fn reload_on_sighup() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let _ = tx.try_send(());
            }
        });
    }
    rx
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

//! `m365-sensor run`: wires the spool, the collectors, the relay and the status writer, and shuts them
//! down in order. Invariants: on SIGTERM/SIGINT collectors stop between durable steps, in-flight batches
//! get a bounded drain, the spool is flushed and fsynced, and the agent exits 0 within a few seconds
//! whatever the network, the disk or the clock does (every wait in the stop path is bounded: a stage
//! still running after its grace is aborted, which loses nothing since each commit is atomic and each
//! batch is resent with its key). A host fault under the spool (a full, read-only or failing
//! filesystem, damaged spool files) never ends the agent: the control plane runs without the spool,
//! the `spool` component names the fault, and the spool is reopened with backoff until it works (`stages.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sensor_control::identity::Identity;
use sensor_control::managed::Managed;
use sensor_core::config::Config;
use sensor_core::counters::Counters;
use sensor_core::status::{ConfigStatus, SpoolFigures, StatusBoard, StatusDocument};
use sensor_spool::Spool;
use tokio::sync::{oneshot, watch, Notify};

use crate::stages::{apply, update_spool_state, Lifecycle, Shared};

/// How long the control task gets to finish at shutdown (a heartbeat in flight) before it is aborted.
const CONTROL_GRACE: Duration = Duration::from_secs(1);

/// Where the open spool is published for the control task: `None` while it cannot be opened. Invariant:
/// the lock is never held across `.await`, and a faulted spool is taken out before it is reopened.
pub type SpoolSlot = Arc<std::sync::RwLock<Option<Arc<Spool>>>>;

/// The spool in `slot`, if open.
pub fn spool_of(slot: &SpoolSlot) -> Option<Arc<Spool>> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

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

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory), mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    sensor_control::store::write_private(path, bytes)
}

/// Path of the status document.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// What the status document is made of besides the stages' live state.
pub struct DocContext<'a> {
    /// The sensor id.
    pub sensor_id: &'a str,
    /// When the agent started.
    pub started: std::time::Instant,
    /// The configuration in force.
    pub config: &'a Config,
    /// Where the managed configuration stands.
    pub config_status: &'a ConfigStatus,
}

/// The status document of now (what `status --json` prints and the heartbeat sends). Without an open
/// spool its figures are zero but `max_bytes`, and the `spool` component says why.
pub fn status_document(
    ctx: &DocContext<'_>,
    status: &StatusBoard,
    spool: Option<&Spool>,
    counters: &Counters,
) -> StatusDocument {
    let now = time::OffsetDateTime::now_utc();
    let spool_figures = match spool {
        Some(spool) => {
            let f = spool.figures();
            SpoolFigures {
                records: f.pending_records,
                bytes: f.stored_bytes,
                raw_bytes: f.pending_raw_bytes,
                max_bytes: spool.max_bytes(),
                disk_bytes: spool.used_bytes(),
                quarantined: f.quarantined_items,
                batches: spool.pending_batches().map(|b| b.len() as u64).unwrap_or(0),
            }
        }
        None => SpoolFigures {
            max_bytes: ctx.config.spool.max_bytes,
            ..SpoolFigures::default()
        },
    };
    StatusDocument {
        overall: status.overall(),
        sensor_id: ctx.sensor_id.to_string(),
        version: sensor_core::VERSION.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        updated_at: sensor_core::timefmt::rfc3339(now),
        components: status.components(),
        spool: spool_figures,
        counters: counters.snapshot(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        config: ctx.config_status.clone(),
        tenants: status.tenant_figures(
            ctx.config.tenants.iter().map(|t| t.name.as_str()),
            now.unix_timestamp(),
        ),
        state_dir: Some(ctx.config.state_dir.display().to_string()),
    }
}

/// What the control task asks of the agent loop, which owns the stages.
pub enum Request {
    /// Apply this managed state (a new configuration version or a rotated credential) and persist it
    /// once applied. Replies with the problems when refused.
    ApplyManaged {
        /// The new state.
        managed: Managed,
        /// The answer.
        reply: oneshot::Sender<Result<(), Vec<String>>>,
    },
    /// Re-list a tenant's content types from a time (Unix seconds).
    Resync {
        /// The tenant's name.
        tenant: String,
        /// The content types (empty: all of the tenant's).
        content_types: Vec<String>,
        /// From when.
        from: i64,
        /// The answer.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Restart the relay (the device certificate was renewed).
    RestartRelay {
        /// The answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Set the spool aside (renamed to `<state_dir>/spool.damaged-<unix time>/`, kept, never deleted)
    /// and start a fresh one. Replies with what the old one held.
    ResetSpool {
        /// The answer.
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What the agent loop publishes for the control task: the configuration in force, the managed state
/// behind it and where the managed configuration stands. Its lock is never held across `.await`.
#[derive(Clone)]
pub struct Published {
    /// The configuration in force.
    pub config: Config,
    /// The managed state it was made from.
    pub managed: Managed,
    /// Version applied, version refused and why.
    pub config_status: ConfigStatus,
}

/// The configuration `local` becomes with `managed`, with the enrolled identity filled in.
fn effective(local: &Config, managed: &Managed) -> Result<Config, Vec<String>> {
    let mut c = managed.apply_to(local).map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect::<Vec<_>>()
    })?;
    c.use_enrolled_identity();
    Ok(c)
}

/// Runs the agent of `local` (the validated local file) until `shutdown` turns true. Each message on
/// `reload` re-reads `config_path` and applies it live; a configuration that fails validation is refused
/// and the running one kept. The managed configuration persisted in the state directory is laid over the
/// local file. `on_start` receives the handles once the spool first opens. A spool that cannot be
/// opened or fails while running does not end the agent ([`Lifecycle`]).
pub async fn run_agent(
    mut local: Config,
    config_path: Option<PathBuf>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
    on_start: impl FnOnce(AgentHandles),
) -> Result<()> {
    let started = std::time::Instant::now();
    let state_dir = local.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let identity = Identity::load(&state_dir).context("reading the device identity")?;
    let id = match &identity {
        Some(i) => i.sensor_id.clone(),
        None => sensor_id(&state_dir)?,
    };
    let mut config_status = ConfigStatus::default();
    let mut managed = match Managed::load(&state_dir) {
        Ok(m) => m,
        Err(e) => {
            log::error!(target: "agent", "{e}; running on the local configuration alone until the backend sends one");
            config_status.errors = vec![e.to_string()];
            Managed::default()
        }
    };
    let config = match effective(&local, &managed) {
        Ok(c) => {
            config_status.version = managed.version;
            c
        }
        Err(problems) => {
            log::error!(target: "agent", "the stored managed configuration v{} no longer applies; running on the local file: {}", managed.version, problems.join("; "));
            config_status.refused_version = Some(managed.version);
            config_status.errors = problems;
            managed = Managed::default();
            let mut c = local.clone();
            c.use_enrolled_identity();
            c
        }
    };
    log::info!(target: "agent", "m365-sensor {} starting: sensor id {id}, {} tenant(s), state {}", sensor_core::VERSION, config.tenants.len(), state_dir.display());
    let slot: SpoolSlot = Arc::default();
    let mut life = Lifecycle {
        shared: Shared {
            id: id.clone(),
            clients: Arc::default(),
            status: Arc::new(StatusBoard::default()),
            counters: Arc::new(Counters::default()),
            wake: Arc::new(Notify::new()),
        },
        state_dir: state_dir.clone(),
        slot: slot.clone(),
        live: None,
        down: None,
    };
    let (status, counters) = (life.shared.status.clone(), life.shared.counters.clone());
    let files = crate::status_cmd::StatusFiles::new(&state_dir);
    let mut config = config;
    life.open(&config).await?;
    let mut on_start = Some(on_start);
    let published = Arc::new(std::sync::Mutex::new(Published {
        config: config.clone(),
        managed,
        config_status,
    }));
    let publish = |config: &Config, managed: Option<Managed>, status: Option<ConfigStatus>| {
        let mut p = published.lock().unwrap_or_else(|p| p.into_inner());
        p.config = config.clone();
        if let Some(m) = managed {
            p.managed = m;
        }
        if let Some(s) = status {
            p.config_status = s;
        }
    };
    let document = || {
        let p = published.lock().unwrap_or_else(|p| p.into_inner());
        status_document(
            &DocContext {
                sensor_id: &id,
                started,
                config: &p.config,
                config_status: &p.config_status,
            },
            &status,
            spool_of(&slot).as_deref(),
            &counters,
        )
    };
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<Request>(8);
    let mut control = tokio::spawn(crate::control::run(
        crate::control::ControlContext {
            state_dir: state_dir.clone(),
            sensor_id: id.clone(),
            started,
            status: status.clone(),
            spool: slot.clone(),
            counters: counters.clone(),
            published: published.clone(),
            requests: requests_tx,
        },
        shutdown.clone(),
    ));
    let mut notifier = crate::sdnotify::Notifier::from_env();
    // READY also when the spool is down: the control plane runs, and systemd must not restart a
    // device that waits for its disk.
    notifier.ready(&format!("collecting {} tenant(s)", config.tenants.len()));
    let mut last_overall = None;

    let mut last_housekeeping = std::time::Instant::now();
    let mut writer = crate::status_cmd::StatusWriter::default();
    loop {
        life.tick(&config).await?;
        if let Some(stages) = &life.live {
            update_spool_state(&status, &stages.spool);
            if let Some(f) = on_start.take() {
                f(AgentHandles {
                    counters: counters.clone(),
                    spool: stages.spool.clone(),
                });
            }
        }
        notifier.watchdog_tick();
        let doc = document();
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
        writer.write(&files, doc);
        if last_housekeeping.elapsed() > Duration::from_secs(3600) {
            last_housekeeping = std::time::Instant::now();
            if let Some(s) = spool_of(&slot) {
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = s.expire_seen();
                    let _ = s.prune_done_marks();
                })
                .await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
            Some(req) = requests.recv() => match req {
                Request::ApplyManaged { managed, reply } => {
                    let result = match effective(&local, &managed) {
                        Ok(new) => match apply(&mut life, &mut config, new).await {
                            Ok(()) => match managed.save(&state_dir) {
                                Ok(()) => {
                                    sensor_control::managed::prune_credentials(&state_dir, &config);
                                    let s = ConfigStatus { version: managed.version, refused_version: None, errors: Vec::new() };
                                    publish(&config, Some(managed), Some(s));
                                    Ok(())
                                }
                                Err(e) => Err(vec![format!("applied but not persisted: {e}")]),
                            },
                            Err(e) => Err(vec![format!("{e:#}")]),
                        },
                        Err(problems) => Err(problems),
                    };
                    publish(&config, None, None);
                    let _ = reply.send(result);
                }
                Request::Resync { tenant, content_types, from, reply } => {
                    let result = match (&mut life.live, &life.down) {
                        (Some(stages), _) => stages.resync(&life.shared, &tenant, &content_types, from).await,
                        (None, down) => Err(format!(
                            "resync: the spool is not open ({}); send it again once the spool component is ok",
                            down.as_ref().map(|d| d.fault.detail.as_str()).unwrap_or("not yet opened")
                        )),
                    };
                    let _ = reply.send(result);
                }
                Request::RestartRelay { reply } => {
                    let result = match &mut life.live {
                        Some(stages) => {
                            let c = stages.config.clone();
                            stages.restart_relay(&life.shared, &c).await.map_err(|e| format!("{e:#}"))
                        }
                        // The relay starts with the renewed certificate once the spool opens.
                        None => Ok(()),
                    };
                    let _ = reply.send(result);
                }
                Request::ResetSpool { reply } => {
                    let _ = reply.send(life.reset(&config).await);
                }
            },
            Some(()) = reload.recv() => {
                if let Some(p) = &config_path {
                    notifier.reloading();
                    match Config::load(p) {
                        Ok(new_local) => {
                            let m = published.lock().unwrap_or_else(|p| p.into_inner()).managed.clone();
                            match effective(&new_local, &m) {
                                Ok(new) => match apply(&mut life, &mut config, new).await {
                                    Ok(()) => {
                                        local = new_local;
                                        publish(&config, None, None);
                                        log::info!(target: "agent", "configuration {} reloaded", p.display());
                                    }
                                    Err(e) => log::error!(target: "agent", "configuration {} not applied: {e:#}", p.display()),
                                },
                                Err(problems) => log::error!(target: "agent", "configuration {} refused with the managed configuration laid over it, the running one is kept: {}", p.display(), problems.join("; ")),
                            }
                        }
                        Err(e) => log::error!(target: "agent", "configuration refused, the running one is kept: {e}"),
                    }
                    notifier.ready(&format!("collecting {} tenant(s)", config.tenants.len()));
                }
            }
        }
        if *shutdown.borrow() {
            break;
        }
    }
    notifier.stopping();
    let stopping = std::time::Instant::now();
    log::info!(target: "agent", "shutting down: stopping collectors, draining in-flight batches");
    // The control task and the stages stop side by side: the whole stop takes the longest grace.
    let control_stopped = async {
        if tokio::time::timeout(CONTROL_GRACE, &mut control)
            .await
            .is_err()
        {
            log::warn!(target: "agent", "the control task did not stop within {CONTROL_GRACE:?}; aborted");
            control.abort();
        }
    };
    tokio::join!(control_stopped, life.close());
    writer.write_final(&files, document());
    log::info!(target: "agent", "stopped cleanly in {} ms", stopping.elapsed().as_millis());
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

//! `m365-sensor run`: wires the spool, the collectors, the relay and the status writer, and shuts them
//! down in order. Invariant: on SIGTERM/SIGINT collectors stop between durable steps, in-flight batches get
//! a bounded drain, and the spool is flushed and fsynced before exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use sensor_control::identity::Identity;
use sensor_control::managed::Managed;
use sensor_core::config::{Config, TenantConfig};
use sensor_core::counters::Counters;
use sensor_core::status::{ConfigStatus, SpoolFigures, State, StatusBoard, StatusDocument};
use sensor_spool::{Spool, SpoolOptions};
use tokio::sync::{oneshot, watch, Notify};

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

/// The status document of now (what `status --json` prints and the heartbeat sends).
pub fn status_document(
    ctx: &DocContext<'_>,
    status: &StatusBoard,
    spool: &Spool,
    counters: &Counters,
) -> StatusDocument {
    let f = spool.figures();
    let now = time::OffsetDateTime::now_utc();
    StatusDocument {
        overall: status.overall(),
        sensor_id: ctx.sensor_id.to_string(),
        version: sensor_core::VERSION.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        updated_at: sensor_core::timefmt::rfc3339(now),
        components: status.components(),
        spool: SpoolFigures {
            records: f.pending_records,
            bytes: f.stored_bytes,
            raw_bytes: f.pending_raw_bytes,
            max_bytes: spool.max_bytes(),
            disk_bytes: spool.used_bytes(),
            quarantined: f.quarantined_items,
            batches: spool.pending_batches().map(|b| b.len() as u64).unwrap_or(0),
        },
        counters: counters.snapshot(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        config: ctx.config_status.clone(),
        tenants: status.tenant_figures(
            ctx.config.tenants.iter().map(|t| t.name.as_str()),
            now.unix_timestamp(),
        ),
    }
}

fn update_spool_state(status: &StatusBoard, spool: &Spool) {
    let f = spool.figures();
    let ratio = spool.fill_ratio();
    let detail = Some(format!(
        "{} records, {} of {} on disk",
        f.pending_records,
        sensor_relay::human_bytes(spool.used_bytes()),
        sensor_relay::human_bytes(spool.max_bytes())
    ));
    let state = if spool.is_full() {
        State::SpoolFull
    } else if ratio >= 0.8 && f.pending_records > 0 {
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

/// The collectors of one tenant.
struct TenantRun {
    config: TenantConfig,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TenantRun {
    /// Stops the tenant's collectors between durable steps and waits for them.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The collectors (per tenant) and the relay of the configuration in force, each stoppable on its own.
struct Stages {
    config: Config,
    tenants: BTreeMap<String, TenantRun>,
    relay_stop: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
}

struct Shared {
    id: String,
    clients: Arc<m365_collector::HttpClients>,
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

    fn start_tenant(&self, config: &Config, tenant: &TenantConfig) -> Result<TenantRun> {
        let deps = m365_collector::Deps {
            spool: self.spool.clone(),
            status: self.status.clone(),
            counters: self.counters.clone(),
            relay_wake: self.wake.clone(),
            proxy: config.network.proxy.clone(),
            clients: self.clients.clone(),
        };
        let (stop, rx) = watch::channel(false);
        let tasks = m365_collector::start_tenant(tenant.clone(), &deps, rx)
            .with_context(|| format!("starting tenant {}", tenant.name))?;
        Ok(TenantRun {
            config: tenant.clone(),
            stop,
            tasks,
        })
    }

    fn start(&self, config: Config) -> Result<Stages> {
        let (relay_stop, relay) = self.start_relay(&config)?;
        let mut tenants = BTreeMap::new();
        for t in &config.tenants {
            tenants.insert(t.name.clone(), self.start_tenant(&config, t)?);
        }
        Ok(Stages {
            config,
            tenants,
            relay_stop,
            relay,
        })
    }

    fn forget_components(&self, tenant: &str) {
        let prefix = format!("tenant/{tenant}/");
        for component in self.status.components().keys() {
            if component.starts_with(&prefix) {
                self.status.remove(component);
            }
        }
    }
}

impl Stages {
    async fn stop(mut self) {
        for (_, run) in std::mem::take(&mut self.tenants) {
            run.stop().await;
        }
        let _ = self.relay_stop.send(true);
        let _ = self.relay.await;
    }

    async fn restart_relay(&mut self, shared: &Shared, config: &Config) -> Result<()> {
        let _ = self.relay_stop.send(true);
        let old = std::mem::replace(&mut self.relay, tokio::spawn(async {}));
        let _ = old.await;
        let (stop, relay) = shared.start_relay(config)?;
        self.relay_stop = stop;
        self.relay = relay;
        Ok(())
    }

    /// Applies `new` live. A removed tenant stops between durable steps (what it has committed stays
    /// spooled and is delivered); a changed tenant restarts with its new settings (a blob not yet
    /// committed is fetched again and deduplicated, so nothing is lost or duplicated); an added one
    /// starts; unchanged tenants keep running. The relay restarts only when the backend settings changed
    /// (batches in flight stay spooled and keep their keys). A state directory change needs a restart.
    async fn apply(&mut self, shared: &Shared, new: Config) -> Result<()> {
        if new.state_dir != self.config.state_dir {
            anyhow::bail!(
                "state_dir changed from {} to {}: restart the agent to move its state",
                self.config.state_dir.display(),
                new.state_dir.display()
            );
        }
        shared.spool.set_max_bytes(new.spool.max_bytes);
        shared.clients.clear();
        let wanted: BTreeMap<&str, &TenantConfig> =
            new.tenants.iter().map(|t| (t.name.as_str(), t)).collect();
        let proxy_changed = new.network != self.config.network;
        let stale: Vec<String> = self
            .tenants
            .iter()
            .filter(|(name, run)| {
                proxy_changed || wanted.get(name.as_str()).is_none_or(|t| **t != run.config)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(run) = self.tenants.remove(&name) {
                run.stop().await;
            }
            shared.forget_components(&name);
            if !wanted.contains_key(name.as_str()) {
                log::info!(target: "agent", tenant = name.as_str(); "tenant removed; what it spooled is still delivered");
            }
        }
        if new.backend != self.config.backend || proxy_changed {
            self.restart_relay(shared, &new).await?;
        }
        for t in &new.tenants {
            if !self.tenants.contains_key(&t.name) {
                self.tenants
                    .insert(t.name.clone(), shared.start_tenant(&new, t)?);
            }
        }
        self.config = new;
        Ok(())
    }

    /// Moves the listing cursor of `tenant`'s `content_types` back to `from` (Unix seconds), with the
    /// tenant's collectors stopped, then restarts them: the window is listed again, done blobs are
    /// skipped and seen records dropped.
    async fn resync(
        &mut self,
        shared: &Shared,
        tenant: &str,
        content_types: &[String],
        from: i64,
    ) -> Result<String, String> {
        let run = self
            .tenants
            .remove(tenant)
            .ok_or_else(|| format!("no tenant named `{tenant}` is configured"))?;
        let config = run.config.clone();
        run.stop().await;
        let types: Vec<String> = if content_types.is_empty() {
            config.content_types.clone()
        } else {
            content_types.to_vec()
        };
        let mut result = Ok(String::new());
        for ct in &types {
            if !config.content_types.contains(ct) {
                result = Err(format!("tenant `{tenant}` does not collect `{ct}`"));
                break;
            }
            if let Err(e) = shared.spool.rewind_cursor(&config.tenant_id, ct, from) {
                result = Err(format!("moving the cursor of {tenant}/{ct}: {e}"));
                break;
            }
        }
        let restarted = shared
            .start_tenant(&self.config, &config)
            .map_err(|e| format!("{e:#}"));
        match restarted {
            Ok(run) => {
                self.tenants.insert(tenant.to_string(), run);
            }
            Err(e) => return Err(e),
        }
        result.map(|_| {
            format!(
                "re-listing {tenant} {} from {}",
                types.join(", "),
                time::OffsetDateTime::from_unix_timestamp(from)
                    .map(sensor_core::timefmt::rfc3339)
                    .unwrap_or_default()
            )
        })
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
/// local file. `on_start` receives the handles once running.
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
    let spool = Arc::new(
        Spool::open(
            &state_dir.join("spool"),
            SpoolOptions {
                max_bytes: config.spool.max_bytes,
                cache_bytes: config.spool.cache_bytes,
                dedup_days: config.spool.dedup_days,
            },
        )
        .context("opening the spool")?,
    );
    log::info!(target: "agent", "m365-sensor {} starting: sensor id {id}, {} tenant(s), state {}", sensor_core::VERSION, config.tenants.len(), state_dir.display());
    let shared = Shared {
        id: id.clone(),
        clients: Arc::default(),
        spool: spool.clone(),
        status: Arc::new(StatusBoard::default()),
        counters: Arc::new(Counters::default()),
        wake: Arc::new(Notify::new()),
    };
    let (status, counters) = (shared.status.clone(), shared.counters.clone());
    let path = status_path(&state_dir);
    let mut stages = shared.start(config.clone())?;
    update_spool_state(&status, &spool);
    on_start(AgentHandles {
        counters: counters.clone(),
        spool: spool.clone(),
    });
    let published = Arc::new(std::sync::Mutex::new(Published {
        config,
        managed,
        config_status,
    }));
    let publish = |stages: &Stages, managed: Option<Managed>, status: Option<ConfigStatus>| {
        let mut p = published.lock().unwrap_or_else(|p| p.into_inner());
        p.config = stages.config.clone();
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
            &spool,
            &counters,
        )
    };
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<Request>(8);
    let control = tokio::spawn(crate::control::run(
        crate::control::ControlContext {
            state_dir: state_dir.clone(),
            sensor_id: id.clone(),
            started,
            status: status.clone(),
            spool: spool.clone(),
            counters: counters.clone(),
            published: published.clone(),
            requests: requests_tx,
        },
        shutdown.clone(),
    ));
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
        // Write when something changed, else every STATUS_REFRESH: fsyncs every second would wear flash.
        let unchanged = written.as_ref().is_some_and(|(w, at)| {
            w.components == doc.components
                && w.spool == doc.spool
                && w.counters == doc.counters
                && w.config == doc.config
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
            Some(req) = requests.recv() => match req {
                Request::ApplyManaged { managed, reply } => {
                    let result = match effective(&local, &managed) {
                        Ok(new) => match stages.apply(&shared, new).await {
                            Ok(()) => match managed.save(&state_dir) {
                                Ok(()) => {
                                    sensor_control::managed::prune_credentials(&state_dir, &stages.config);
                                    let s = ConfigStatus { version: managed.version, refused_version: None, errors: Vec::new() };
                                    publish(&stages, Some(managed), Some(s));
                                    Ok(())
                                }
                                Err(e) => Err(vec![format!("applied but not persisted: {e}")]),
                            },
                            Err(e) => Err(vec![format!("{e:#}")]),
                        },
                        Err(problems) => Err(problems),
                    };
                    publish(&stages, None, None);
                    let _ = reply.send(result);
                }
                Request::Resync { tenant, content_types, from, reply } => {
                    let _ = reply.send(stages.resync(&shared, &tenant, &content_types, from).await);
                }
                Request::RestartRelay { reply } => {
                    let config = stages.config.clone();
                    let _ = reply.send(stages.restart_relay(&shared, &config).await.map_err(|e| format!("{e:#}")));
                }
            },
            Some(()) = reload.recv() => {
                if let Some(p) = &config_path {
                    notifier.reloading();
                    match Config::load(p) {
                        Ok(new_local) => {
                            let m = published.lock().unwrap_or_else(|p| p.into_inner()).managed.clone();
                            match effective(&new_local, &m) {
                                Ok(new) => match stages.apply(&shared, new).await {
                                    Ok(()) => {
                                        local = new_local;
                                        publish(&stages, None, None);
                                        log::info!(target: "agent", "configuration {} reloaded", p.display());
                                    }
                                    Err(e) => log::error!(target: "agent", "configuration {} not applied: {e:#}", p.display()),
                                },
                                Err(problems) => log::error!(target: "agent", "configuration {} refused with the managed configuration laid over it, the running one is kept: {}", p.display(), problems.join("; ")),
                            }
                        }
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
    let _ = control.await;
    stages.stop().await;
    spool.close().context("closing the spool")?;
    let doc = document();
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

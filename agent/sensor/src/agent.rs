//! `m365-sensor run`: wires the spool, the collectors, the relay and the status writer, and shuts them
//! down in order. Invariants: on SIGTERM/SIGINT collectors stop between durable steps, in-flight batches
//! get a bounded drain, the spool is flushed and fsynced, and the agent exits 0 within a few seconds
//! whatever the network, the disk or the clock does (every wait in the stop path is bounded: a stage
//! still running after its grace is aborted, which loses nothing since each commit is atomic and each
//! batch is resent with its key). A host fault under the spool (a full, read-only or failing
//! filesystem, damaged spool files) never ends the agent: the control plane runs without the spool,
//! the `spool` component names the fault, and the spool is reopened with backoff until it works.

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
use sensor_spool::fault::{Fault, FaultKind};
use sensor_spool::{Spool, SpoolOptions};
use tokio::sync::{oneshot, watch, Notify};

/// How long in-flight batches may take at shutdown (unsent ones stay spooled and are resent).
const DRAIN: Duration = Duration::from_secs(2);

/// How long the collectors and the relay get to stop by themselves before they are aborted (the
/// relay's [`DRAIN`] fits in it).
const STOP_GRACE: Duration = Duration::from_millis(2500);

/// How long the control task gets to finish at shutdown (a heartbeat in flight) before it is aborted.
const CONTROL_GRACE: Duration = Duration::from_secs(1);

/// How long the final flush and fsync of the spool may take at shutdown (a dying disk can hang it).
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// The first pause before the spool is opened again after a host fault; doubles up to [`REOPEN_MAX`].
const REOPEN_MIN: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to open the spool.
const REOPEN_MAX: Duration = Duration::from_secs(60);

/// While the filesystem is full or read-only: how often a small write is tried, so the spool reopens
/// as soon as the filesystem takes writes again instead of at the end of a long backoff.
const PROBE_EVERY: Duration = Duration::from_secs(2);

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

/// Waits for `task` until `deadline`, then aborts it. An aborted collector or relay loses nothing: a
/// commit is atomic (done or not), a batch not acknowledged stays spooled and is resent with its key.
async fn join_until(
    mut task: tokio::task::JoinHandle<()>,
    deadline: tokio::time::Instant,
    what: &str,
) {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        log::warn!(target: "agent", "{what} did not stop within its grace; aborted (nothing is lost: commits are atomic, unacknowledged batches are resent)");
        task.abort();
    }
}

/// The collectors of one tenant.
struct TenantRun {
    config: TenantConfig,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TenantRun {
    /// Stops the tenant's collectors between durable steps and waits for them, at most [`STOP_GRACE`].
    async fn stop(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for t in self.tasks {
            join_until(t, deadline, "a collector").await;
        }
    }
}

/// The collectors (per tenant) and the relay of the configuration in force, each stoppable on its own,
/// on the open spool.
struct Stages {
    config: Config,
    spool: Arc<Spool>,
    tenants: BTreeMap<String, TenantRun>,
    relay_stop: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
}

struct Shared {
    id: String,
    clients: Arc<m365_collector::HttpClients>,
    status: Arc<StatusBoard>,
    counters: Arc<Counters>,
    wake: Arc<Notify>,
}

impl Shared {
    fn start_relay(
        &self,
        spool: &Arc<Spool>,
        config: &Config,
    ) -> Result<(watch::Sender<bool>, tokio::task::JoinHandle<()>)> {
        let relay = Arc::new(
            sensor_relay::Relay::new(
                config.backend.clone(),
                self.id.clone(),
                config.network.proxy.as_deref(),
                spool.clone(),
                self.status.clone(),
                self.counters.clone(),
                self.wake.clone(),
            )
            .context("starting the relay")?,
        );
        let (tx, rx) = watch::channel(false);
        Ok((tx, tokio::spawn(relay.run(rx, DRAIN))))
    }

    fn start_tenant(
        &self,
        spool: &Arc<Spool>,
        config: &Config,
        tenant: &TenantConfig,
    ) -> Result<TenantRun> {
        let deps = m365_collector::Deps {
            spool: spool.clone(),
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

    fn start(&self, spool: Arc<Spool>, config: Config) -> Result<Stages> {
        let (relay_stop, relay) = self.start_relay(&spool, &config)?;
        let mut tenants = BTreeMap::new();
        for t in &config.tenants {
            tenants.insert(t.name.clone(), self.start_tenant(&spool, &config, t)?);
        }
        Ok(Stages {
            config,
            spool,
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
    /// Stops every collector and the relay at once; each gets [`STOP_GRACE`] (the relay's in-flight
    /// batches [`DRAIN`] of it), then is aborted. Returns the spool.
    async fn stop(mut self) -> Arc<Spool> {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for run in self.tenants.values() {
            let _ = run.stop.send(true);
        }
        let _ = self.relay_stop.send(true);
        for (_, run) in std::mem::take(&mut self.tenants) {
            for t in run.tasks {
                join_until(t, deadline, "a collector").await;
            }
        }
        join_until(self.relay, deadline, "the relay").await;
        self.spool
    }

    async fn restart_relay(&mut self, shared: &Shared, config: &Config) -> Result<()> {
        let _ = self.relay_stop.send(true);
        let old = std::mem::replace(&mut self.relay, tokio::spawn(async {}));
        join_until(old, tokio::time::Instant::now() + STOP_GRACE, "the relay").await;
        let (stop, relay) = shared.start_relay(&self.spool, config)?;
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
        self.spool.set_max_bytes(new.spool.max_bytes);
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
                    .insert(t.name.clone(), shared.start_tenant(&self.spool, &new, t)?);
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
            if let Err(e) = self.spool.rewind_cursor(&config.tenant_id, ct, from) {
                result = Err(format!("moving the cursor of {tenant}/{ct}: {e}"));
                break;
            }
        }
        let restarted = shared
            .start_tenant(&self.spool, &self.config, &config)
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

/// Why the spool is not open, and when it is tried again.
struct Down {
    fault: Fault,
    backoff: Duration,
    retry_at: std::time::Instant,
    last_probe: std::time::Instant,
}

/// The spool's life in the agent: open with its stages running, or down with the host fault that
/// closed it. Invariant: `slot` holds the spool exactly while `live` does.
struct Lifecycle {
    shared: Shared,
    state_dir: PathBuf,
    slot: SpoolSlot,
    live: Option<Stages>,
    down: Option<Down>,
}

impl Lifecycle {
    fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// Opens the spool of `config` and starts its stages. A host fault (the spool cannot be opened,
    /// or the filesystem does not take a write) leaves it down with backoff; a configuration that
    /// cannot start its stages is an error.
    async fn open(&mut self, config: &Config) -> Result<bool> {
        let dir = self.spool_dir();
        let opts = SpoolOptions {
            max_bytes: config.spool.max_bytes,
            cache_bytes: config.spool.cache_bytes,
            dedup_days: config.spool.dedup_days,
        };
        let d = dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let spool = Spool::open(&d, opts)?;
            sensor_spool::fault::probe(&d)?;
            Ok::<_, sensor_spool::SpoolError>(spool)
        })
        .await
        .map_err(|e| anyhow::anyhow!("opening the spool: {e}"))?;
        match opened {
            Ok(spool) => {
                let spool = Arc::new(spool);
                let stages = self.shared.start(spool.clone(), config.clone())?;
                *self.slot.write().unwrap_or_else(|p| p.into_inner()) = Some(spool.clone());
                if let Some(down) = self.down.take() {
                    log::info!(target: "spool", "the spool at {} is open again after {:?} ({}); collection and delivery resume", dir.display(), down.fault.kind, down.fault.detail);
                }
                self.shared.status.set("spool", State::Ok, None, None);
                update_spool_state(&self.shared.status, &spool);
                self.live = Some(stages);
                Ok(true)
            }
            Err(e) => {
                let fault = sensor_spool::fault::classify(&e, &dir);
                self.set_down(config, fault);
                Ok(false)
            }
        }
    }

    /// Records `fault` (the spool is closed): the `spool` component names it, every collector shows
    /// that it waits for the spool, and the next open is due after the backoff.
    fn set_down(&mut self, config: &Config, fault: Fault) {
        let backoff = match &self.down {
            Some(d) => (d.backoff * 2).min(REOPEN_MAX),
            None => REOPEN_MIN,
        };
        let state = fault.kind.state();
        if self.shared.status.set(
            "spool",
            state,
            Some(fault.error.clone()),
            Some(fault.detail.clone()),
        ) || self
            .down
            .as_ref()
            .is_none_or(|d| d.fault.kind != fault.kind)
        {
            log::error!(target: "spool", state = state.name().as_str(), error = fault.error.as_str(); "the spool cannot work: {}; collection and delivery pause, the control plane keeps running; retrying in {backoff:?}", fault.detail);
        }
        for t in &config.tenants {
            for ct in &t.content_types {
                self.shared.status.set(
                    &format!("tenant/{}/{ct}", t.name),
                    State::SpoolUnavailable,
                    None,
                    Some(format!(
                        "paused: the spool cannot write ({}): {}",
                        state.name(),
                        fault.detail
                    )),
                );
            }
        }
        let now = std::time::Instant::now();
        self.down = Some(Down {
            fault,
            backoff,
            retry_at: now + backoff,
            last_probe: now,
        });
    }

    /// Stops the stages and closes the spool (bounded), leaving the slot empty. Returns the spool's
    /// directory figures for a report.
    async fn close(&mut self) {
        let Some(stages) = self.live.take() else {
            return;
        };
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
        let spool = stages.stop().await;
        let closing = tokio::task::spawn_blocking(move || {
            let result = spool.close();
            drop(spool);
            result
        });
        match tokio::time::timeout(CLOSE_GRACE, closing).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                log::warn!(target: "spool", "closing the spool: {e} (what was committed is recovered at the next open)")
            }
            Ok(Err(e)) => log::warn!(target: "spool", "closing the spool: {e}"),
            Err(_) => {
                log::warn!(target: "spool", "closing the spool took over {CLOSE_GRACE:?}; left to finish (what was committed is recovered at the next open)")
            }
        }
    }

    /// One tick: an open spool with a noted host fault (or refusing commits) is closed and goes down;
    /// a down spool is opened again once its backoff passed, or sooner when the filesystem takes a
    /// write again.
    async fn tick(&mut self, config: &Config) -> Result<()> {
        if let Some(stages) = &self.live {
            let spool = stages.spool.clone();
            let fault = match spool.fault() {
                Some(f) => Some(f),
                None => tokio::task::block_in_place(|| spool.broken()).map(|why| {
                    sensor_spool::fault::classify(
                        &sensor_spool::SpoolError::Corrupt(why),
                        spool.dir(),
                    )
                }),
            };
            if let Some(fault) = fault {
                log::error!(target: "spool", "{}: {}; closing the spool to open it again", fault.detail, fault.error);
                self.close().await;
                self.set_down(config, fault);
            }
            return Ok(());
        }
        let Some(down) = &mut self.down else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        let mut due = now >= down.retry_at;
        if !due
            && matches!(down.fault.kind, FaultKind::DiskFull | FaultKind::ReadOnly)
            && now.duration_since(down.last_probe) >= PROBE_EVERY
        {
            down.last_probe = now;
            let dir = self.state_dir.clone();
            due = tokio::task::spawn_blocking(move || sensor_spool::fault::probe(&dir).is_ok())
                .await
                .unwrap_or(false);
        }
        if due {
            self.open(config).await?;
        }
        Ok(())
    }

    /// `reset_spool`: closes the spool, renames its directory to `spool.damaged-<unix time>` (kept for
    /// forensics, never deleted) and opens a fresh one. Says what the old one held.
    async fn reset(&mut self, config: &Config) -> Result<String, String> {
        let held = self
            .live
            .as_ref()
            .map(|s| {
                let f = s.spool.figures();
                format!(
                    "{} records pending, {} quarantined item(s) (read from the open spool)",
                    f.pending_records, f.quarantined_items
                )
            })
            .or_else(|| {
                self.down.as_ref().map(|d| {
                    format!(
                        "its records could not be read: {} ({})",
                        d.fault.detail, d.fault.error
                    )
                })
            })
            .unwrap_or_default();
        self.close().await;
        let dir = self.spool_dir();
        let aside = self.state_dir.join(format!(
            "spool.damaged-{}",
            time::OffsetDateTime::now_utc().unix_timestamp()
        ));
        let segments = std::fs::read_dir(dir.join("segments"))
            .map(|rd| rd.flatten().count())
            .unwrap_or(0);
        let bytes = sensor_spool::disk_usage(&dir);
        if dir.exists() {
            if let Err(e) = std::fs::rename(&dir, &aside) {
                let fault = sensor_spool::fault::classify(
                    &sensor_spool::SpoolError::Io {
                        path: dir.clone(),
                        source: e,
                    },
                    &dir,
                );
                let msg = format!(
                    "reset_spool: renaming {} to {}: {} ({})",
                    dir.display(),
                    aside.display(),
                    fault.error,
                    fault.detail
                );
                self.set_down(config, fault);
                return Err(msg);
            }
        }
        log::warn!(target: "spool", "reset_spool: {} set aside as {} ({bytes} bytes, {segments} segment file(s)); starting a fresh spool", dir.display(), aside.display());
        self.down = None;
        let opened = self
            .open(config)
            .await
            .map_err(|e| format!("reset_spool: {e:#}"))?;
        let report = format!(
            "the old spool was set aside as {} (kept, not deleted): {bytes} bytes on disk, {segments} segment file(s), {held}",
            aside.display()
        );
        if opened {
            Ok(format!("{report}; a fresh spool is open: content is listed again from backfill_hours back and records the backend already holds may arrive again (same record Ids)"))
        } else {
            let why = self
                .down
                .as_ref()
                .map(|d| format!("{} ({})", d.fault.detail, d.fault.error))
                .unwrap_or_default();
            Err(format!(
                "{report}; the fresh spool cannot be opened yet: {why}; retried with backoff"
            ))
        }
    }
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

/// Applies `new` live: to the running stages when the spool is open, else only as the configuration
/// the stages start with once it opens (a state directory change still needs a restart).
async fn apply(life: &mut Lifecycle, config: &mut Config, new: Config) -> Result<()> {
    if new.state_dir != config.state_dir {
        anyhow::bail!(
            "state_dir changed from {} to {}: restart the agent to move its state",
            config.state_dir.display(),
            new.state_dir.display()
        );
    }
    if let Some(stages) = &mut life.live {
        stages.apply(&life.shared, new.clone()).await?;
    } else {
        life.shared.clients.clear();
    }
    *config = new;
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

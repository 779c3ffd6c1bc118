//! The stages on the spool and the spool's life in the agent. [`Stages`]: the collectors (per tenant)
//! and the relay of the configuration in force, stoppable one by one and all at once, every stop
//! bounded (a stage still running after its grace is aborted: commits are atomic, unacknowledged
//! batches are resent with their key). [`Lifecycle`]: the spool open with its stages running, or down
//! with the host fault that closed it (`sensor_spool::fault`), reopened with backoff.
//!
//! Invariants: a host fault under the spool never ends the agent; a faulted spool is closed and opened
//! again (the recovery of a restart), never patched in place; the slot the control task reads holds the
//! spool exactly while its stages run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sensor_core::config::{Config, TenantConfig};
use sensor_core::counters::Counters;
use sensor_core::status::{State, StatusBoard};
use sensor_spool::fault::{Fault, FaultKind};
use sensor_spool::{Spool, SpoolOptions};
use tokio::sync::{watch, Notify};

use crate::agent::SpoolSlot;

/// How long in-flight batches may take at shutdown (unsent ones stay spooled and are resent).
const DRAIN: Duration = Duration::from_secs(2);

/// How long the collectors and the relay get to stop by themselves before they are aborted (the
/// relay's [`DRAIN`] fits in it).
const STOP_GRACE: Duration = Duration::from_millis(2500);

/// How long the final flush and fsync of the spool may take at shutdown (a dying disk can hang it).
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// The first pause before the spool is opened again after a host fault; doubles up to [`REOPEN_MAX`].
const REOPEN_MIN: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to open the spool.
const REOPEN_MAX: Duration = Duration::from_secs(60);

/// While the filesystem is full or read-only: how often a small write is tried, so the spool reopens
/// as soon as the filesystem takes writes again instead of at the end of a long backoff.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Sets the `spool` (and `quarantine`) component from the open spool's figures.
pub(crate) fn update_spool_state(status: &StatusBoard, spool: &Spool) {
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
pub(crate) struct Stages {
    /// The configuration the stages run.
    pub(crate) config: Config,
    /// The open spool they run on.
    pub(crate) spool: Arc<Spool>,
    tenants: BTreeMap<String, TenantRun>,
    relay_stop: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
}

/// What every stage shares, whichever spool they run on.
pub(crate) struct Shared {
    /// The sensor id.
    pub(crate) id: String,
    /// The tenants' HTTP clients (kept across restarts of a tenant).
    pub(crate) clients: Arc<m365_collector::HttpClients>,
    /// The status board.
    pub(crate) status: Arc<StatusBoard>,
    /// Counters.
    pub(crate) counters: Arc<Counters>,
    /// Wakes the relay after a commit.
    pub(crate) wake: Arc<Notify>,
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

    /// Restarts the relay with `config` (its in-flight batches stay spooled and keep their keys).
    pub(crate) async fn restart_relay(&mut self, shared: &Shared, config: &Config) -> Result<()> {
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
    pub(crate) async fn resync(
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

/// Why the spool is not open, and when it is tried again.
pub(crate) struct Down {
    /// The fault that closed the spool or kept it from opening.
    pub(crate) fault: Fault,
    backoff: Duration,
    retry_at: std::time::Instant,
    last_probe: std::time::Instant,
}

/// The spool's life in the agent: open with its stages running, or down with the host fault that
/// closed it. Invariant: `slot` holds the spool exactly while `live` does.
pub(crate) struct Lifecycle {
    /// What the stages share.
    pub(crate) shared: Shared,
    /// The state directory (the spool is `<state_dir>/spool`).
    pub(crate) state_dir: PathBuf,
    /// The spool as the control task sees it.
    pub(crate) slot: SpoolSlot,
    /// The stages, while the spool is open.
    pub(crate) live: Option<Stages>,
    /// Why the spool is not open, while it is not.
    pub(crate) down: Option<Down>,
}

impl Lifecycle {
    /// `<state_dir>/spool`.
    fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// Opens the spool of `config` and starts its stages. A host fault (the spool cannot be opened,
    /// or the filesystem does not take a write) leaves it down with backoff; a configuration that
    /// cannot start its stages is an error.
    pub(crate) async fn open(&mut self, config: &Config) -> Result<bool> {
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
    pub(crate) async fn close(&mut self) {
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
    pub(crate) async fn tick(&mut self, config: &Config) -> Result<()> {
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
    pub(crate) async fn reset(&mut self, config: &Config) -> Result<String, String> {
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

/// Applies `new` live: to the running stages when the spool is open, else only as the configuration
/// the stages start with once it opens (a state directory change still needs a restart).
pub(crate) async fn apply(life: &mut Lifecycle, config: &mut Config, new: Config) -> Result<()> {
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

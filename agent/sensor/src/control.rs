//! The control task: heartbeats the status document to the backend (every `management.heartbeat_secs`
//! and soon after any component changes state), fetches and applies newer managed configurations, runs
//! commands at most once each (journaled), reports their results, and renews the device certificate
//! before it expires. Invariant: nothing here changes the stages directly; configuration and resync go
//! through the agent loop ([`Request`]), which owns them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sensor_control::client::{ClientError, ManagementClient};
use sensor_control::identity::{self, Identity, NewIdentity, ServerAnchors};
use sensor_control::journal::Journal;
use sensor_control::managed::{self, CredentialOverride, Managed};
use sensor_control::protocol::{Command, CommandRefusal, CommandResult, HeartbeatAnswer};
use sensor_control::update;
use sensor_core::config::{BackendConfig, Config, TenantConfig};
use sensor_core::counters::Counters;
use sensor_core::status::StatusBoard;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::{status_document, DocContext, Published, Request};

/// A heartbeat for a status change waits at least this long after the previous one.
const CHANGE_SPACING: Duration = Duration::from_secs(2);
/// How often the device certificate's remaining validity is checked (at most; also every heartbeat
/// interval when that is shorter).
const RENEWAL_CHECK: Duration = Duration::from_secs(60);
/// How long a rotated credential is retried by default before it is declared refused (Entra can take
/// about a minute to accept a new secret).
const DEFAULT_VERIFY_SECS: u64 = 120;
/// The longest `rotate_credentials` may retry a new credential (`args.verify_secs`).
const MAX_VERIFY_SECS: u64 = 600;
/// File that asks the host to reboot (watched by `m365-sensor-reboot.path`).
pub const REBOOT_REQUEST: &str = "reboot-requested";
/// How long the host's updater may take to install a bundle (RAUC writes a whole root slot).
const UPDATE_WAIT: Duration = Duration::from_secs(30 * 60);

/// What the control task works with.
pub struct ControlContext {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The sensor id.
    pub sensor_id: String,
    /// When the agent started.
    pub started: Instant,
    /// The status board.
    pub status: Arc<StatusBoard>,
    /// The spool while it is open (the control plane never depends on it).
    pub spool: crate::agent::SpoolSlot,
    /// Counters.
    pub counters: Arc<Counters>,
    /// The configuration in force and the managed state (published by the agent loop).
    pub published: Arc<Mutex<Published>>,
    /// Requests to the agent loop.
    pub requests: mpsc::Sender<Request>,
}

impl ControlContext {
    fn snapshot(&self) -> Published {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn document(&self) -> sensor_core::status::StatusDocument {
        let p = self.snapshot();
        status_document(
            &DocContext {
                sensor_id: &self.sensor_id,
                started: self.started,
                config: &p.config,
                config_status: &p.config_status,
            },
            &self.status,
            crate::agent::spool_of(&self.spool).as_deref(),
            &self.counters,
        )
    }

    fn refuse_config(&self, version: u64, errors: Vec<String>) {
        log::error!(target: "control", "managed configuration v{version} refused, the running one is kept: {}", errors.join("; "));
        let mut p = self.published.lock().unwrap_or_else(|p| p.into_inner());
        p.config_status.refused_version = Some(version);
        p.config_status.errors = errors;
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// The management client of `backend`, or why it cannot be built.
pub(crate) fn client_for(
    backend: &BackendConfig,
    proxy: Option<&str>,
    id: &str,
) -> Result<ManagementClient, String> {
    let bearer = sensor_relay::backend_bearer(backend).map_err(|e| e.to_string())?;
    sensor_relay::backend_http_client_recording(backend, proxy)
        .map(|(http, recorder)| {
            ManagementClient::new(http, &backend.url, id)
                .with_bearer(bearer)
                .with_recorder(recorder)
        })
        .map_err(|e| e.to_string())
}

/// An identity of an earlier version whose backend anchor was unknown gets it pinned by the first
/// connection that verified the backend ([`ManagementClient::pin_first_connection`]); the relay then
/// restarts to trust the pinned set alone. Returns whether it pinned (the client must be rebuilt).
async fn pin_first_connection(ctx: &ControlContext, c: &ManagementClient) -> bool {
    match c.pin_first_connection(&ctx.state_dir) {
        Ok(false) => false,
        Ok(true) => {
            if let Some(Err(e)) = ctx.ask(|reply| Request::RestartRelay { reply }).await {
                log::error!(target: "control", "restarting the relay with the pinned backend anchor: {e}");
            }
            true
        }
        Err(e) => {
            log::error!(target: "control", "pinning the anchor that verified the backend: {e}; the earlier version's trust stays until it can be written");
            false
        }
    }
}

/// The heartbeat-relevant shape of the status: each component's state. A change sends a heartbeat soon.
fn signature(ctx: &ControlContext) -> String {
    let mut s = format!("{:?}", ctx.status.overall());
    for (name, c) in ctx.status.components() {
        s.push_str(&format!("|{name}={:?}", c.state));
    }
    let p = ctx.published.lock().unwrap_or_else(|p| p.into_inner());
    s.push_str(&format!(
        "|config={}/{:?}",
        p.config_status.version, p.config_status.refused_version
    ));
    s
}

/// Runs until `shutdown` turns true.
pub async fn run(ctx: ControlContext, mut shutdown: watch::Receiver<bool>) {
    let mut journal = match Journal::load(&ctx.state_dir) {
        Ok(j) => j,
        Err(e) => {
            // Keep the unreadable journal for inspection; commands the backend still repeats will run
            // again only if they were never recorded as started, which an unreadable file cannot tell:
            // that is reported, and the file is not deleted.
            let aside = ctx.state_dir.join(format!(
                "{}.unreadable-{}",
                sensor_control::journal::FILE,
                time::OffsetDateTime::now_utc().unix_timestamp()
            ));
            log::error!(target: "control", "{e}; moved to {} and starting a new journal", aside.display());
            let _ = std::fs::rename(ctx.state_dir.join(sensor_control::journal::FILE), &aside);
            match Journal::load(&ctx.state_dir) {
                Ok(j) => j,
                Err(e) => {
                    log::error!(target: "control", "{e}; remote management is off until the state directory is fixed");
                    return;
                }
            }
        }
    };
    let mut client: Option<(BackendConfig, Option<String>, ManagementClient)> = None;
    let mut last_sent: Option<Instant> = None;
    let mut last_signature = String::new();
    let mut last_error: Option<String> = None;
    let mut last_renewal_check: Option<Instant> = None;
    let mut refusals = Refusals::default();
    let mut repin = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let published = ctx.snapshot();
        note_no_tenants(&ctx, &published);
        let config = published.config;
        let interval = Duration::from_secs(config.management.heartbeat_secs);
        let sig = signature(&ctx);
        let due = match last_sent {
            None => true,
            Some(t) => {
                t.elapsed() >= interval || (sig != last_signature && t.elapsed() >= CHANGE_SPACING)
            }
        };
        if due {
            let stale = client
                .as_ref()
                .is_none_or(|(b, p, _)| *b != config.backend || *p != config.network.proxy);
            if stale {
                match client_for(
                    &config.backend,
                    config.network.proxy.as_deref(),
                    &ctx.sensor_id,
                ) {
                    Ok(c) => {
                        client = Some((config.backend.clone(), config.network.proxy.clone(), c));
                    }
                    Err(e) => {
                        if last_error.as_deref() != Some(e.as_str()) {
                            log::error!(target: "control", "cannot build the backend client: {e}");
                            last_error = Some(e);
                        }
                    }
                }
            }
            if let Some((_, _, c)) = &client {
                last_sent = Some(Instant::now());
                last_signature = sig;
                let outcome = c.heartbeat(&ctx.document()).await;
                repin = pin_first_connection(&ctx, c).await;
                note_backend_link(&ctx, &outcome);
                match outcome {
                    Ok(answer) => {
                        if last_error.take().is_some() {
                            log::info!(target: "control", "heartbeats reach the backend again");
                        }
                        handle_answer(&ctx, c, &mut journal, &mut refusals, answer).await;
                        report_results(c, &mut journal).await;
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if last_error.as_deref() != Some(text.as_str()) {
                            log::warn!(target: "control", error:% = text; "heartbeat failed; retrying every {}s", interval.as_secs());
                            last_error = Some(text);
                        }
                    }
                }
            }
        }
        if std::mem::take(&mut repin) {
            client = None;
        }
        if last_renewal_check.is_none_or(|t| t.elapsed() >= RENEWAL_CHECK.min(interval)) {
            last_renewal_check = Some(Instant::now());
            if let Some((_, _, c)) = &client {
                if renew_if_due(&ctx, c).await {
                    client = None;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Component of the status board that shows collection stopped on purpose by the backend.
const COLLECTION: &str = "collection";

/// A managed configuration that stopped all collection (allowed only with its `allow_no_tenants` flag)
/// is never silent: the `collection` component shows `no_tenants`, naming the version, in the status
/// document and so in every heartbeat; it goes away with the next configuration that has a tenant.
fn note_no_tenants(ctx: &ControlContext, p: &Published) {
    if p.config.tenants.is_empty() && managed::allows_no_tenants(&p.managed.config) {
        ctx.status.set(
            COLLECTION,
            sensor_core::status::State::NoTenants,
            None,
            Some(format!(
                "the backend's configuration v{} has no tenant: collection stopped",
                p.managed.version
            )),
        );
    } else if ctx.status.get(COLLECTION).is_some() {
        ctx.status.remove(COLLECTION);
    }
}

/// The heartbeat's outcome is the backend link's state while the relay has nothing to send (no pending
/// record: it has no newer observation of its own). Without this, an idle sensor whose backend is gone
/// would show `starting` or a stale `ok`. With records pending, the relay's own sends decide.
fn note_backend_link(ctx: &ControlContext, outcome: &Result<HeartbeatAnswer, ClientError>) {
    if crate::agent::spool_of(&ctx.spool).is_some_and(|s| s.figures().pending_records > 0) {
        return;
    }
    use sensor_core::status::State;
    match outcome {
        Ok(_) => {
            ctx.status.set("backend", State::Ok, None, None);
        }
        Err(e) if matches!(e.status(), Some(401 | 403)) => {
            ctx.status.set(
                "backend",
                State::BackendAuthFailed,
                Some(e.to_string()),
                Some("heartbeat refused; nothing buffered".into()),
            );
        }
        Err(e) => {
            ctx.status.set(
                "backend",
                State::BackendUnreachable,
                Some(e.to_string()),
                Some("backend unreachable, nothing buffered".into()),
            );
        }
    }
}

/// Component of the status board that shows commands refused before they ran.
const COMMANDS: &str = "commands";
/// How many distinct unreportable refusals are remembered (so each is logged once); past it the memory
/// starts again.
const REFUSALS_REMEMBERED: usize = 1024;

/// Commands refused before they ran (an invalid id, kind or args), so each is logged and counted once
/// although the backend repeats it on every heartbeat.
#[derive(Default)]
struct Refusals {
    seen: std::collections::HashSet<String>,
    count: u64,
}

/// Refuses a command that failed [`Command::check`]: never run; logged once; shown in the status (the
/// `commands` component, `command_refused`, until the agent restarts) and so in every heartbeat; and,
/// when its id is valid, journaled with a failed result that reaches the backend like any other.
fn refuse_command(
    ctx: &ControlContext,
    journal: &mut Journal,
    refusals: &mut Refusals,
    refusal: &CommandRefusal,
) {
    let text = refusal.to_string();
    if let Some(id) = refusal.reportable_id() {
        if journal.seen(id) {
            return;
        }
        let kind = match refusal {
            CommandRefusal::InvalidKind { kind, .. } | CommandRefusal::InvalidArgs { kind, .. } => {
                kind.as_str()
            }
            _ => "refused",
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let failed = CommandResult {
            ok: false,
            message: text.clone(),
        };
        if let Err(e) = journal
            .begin(id, kind, now)
            .and_then(|()| journal.finish(id, failed))
        {
            log::error!(target: "control", "cannot journal the refusal of command {id}: {e}");
        }
    } else {
        if refusals.seen.len() >= REFUSALS_REMEMBERED {
            refusals.seen.clear();
        }
        if !refusals.seen.insert(text.clone()) {
            return;
        }
    }
    refusals.count += 1;
    log::error!(target: "control", "{text}");
    ctx.status.set(
        COMMANDS,
        sensor_core::status::State::CommandRefused,
        Some(text),
        Some(format!(
            "{} command(s) refused since the agent started",
            refusals.count
        )),
    );
}

async fn handle_answer(
    ctx: &ControlContext,
    c: &ManagementClient,
    journal: &mut Journal,
    refusals: &mut Refusals,
    answer: HeartbeatAnswer,
) {
    let status = ctx.snapshot().config_status;
    if answer.config_version > status.version
        && Some(answer.config_version) != status.refused_version
    {
        fetch_and_apply(ctx, c).await;
    }
    for checked in answer.commands() {
        let cmd = match checked {
            Ok(cmd) => cmd,
            Err(refusal) => {
                refuse_command(ctx, journal, refusals, &refusal);
                continue;
            }
        };
        if journal.seen(&cmd.id) {
            continue;
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // Arguments first: a command refused for them changes nothing, so it does not count toward the
        // rate limit (a backend's typo must not use up the hour's updates).
        let refusal = check_args(&cmd).err().or_else(|| {
            let reason = journal.rate_limit(&cmd.kind, now)?;
            Some(format!("{}: {reason}", cmd.kind))
        });
        if let Some(message) = refusal {
            log::warn!(target: "control", "command {} ({}) refused: {message}", cmd.id, cmd.kind);
            let refused = CommandResult { ok: false, message };
            if let Err(e) = journal.refuse_before_running(&cmd.id, &cmd.kind, now, refused) {
                log::error!(target: "control", "cannot journal the refusal of command {}: {e}", cmd.id);
            }
            continue;
        }
        if let Err(e) = journal.begin(&cmd.id, &cmd.kind, now) {
            log::error!(target: "control", "cannot journal command {} ({e}); it is not run", cmd.id);
            continue;
        }
        log::info!(target: "control", "running command {} ({})", cmd.id, cmd.kind);
        let (result, then) = execute(ctx, c, journal, &cmd).await;
        if result.ok {
            log::info!(target: "control", "command {} ({}): {}", cmd.id, cmd.kind, result.message);
        } else {
            log::warn!(target: "control", "command {} ({}) failed: {}", cmd.id, cmd.kind, result.message);
        }
        if let Err(e) = journal.finish(&cmd.id, result) {
            log::error!(target: "control", "cannot journal the result of {}: {e}", cmd.id);
        }
        if then == Then::Reboot {
            // The result reaches the backend before the reboot when it can; otherwise the journal
            // reports it after the reboot.
            report_results(c, journal).await;
            if let Err(e) = request_reboot(ctx, &cmd) {
                log::error!(target: "control", "command {}: {e}", cmd.id);
            }
        }
    }
}

/// What follows a command once its result is journaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// Nothing.
    Done,
    /// Report the result, then reboot the host (an installed update boots the new slot).
    Reboot,
}

async fn report_results(c: &ManagementClient, journal: &mut Journal) {
    for (id, result) in journal.unreported() {
        match c.post_result(&id, &result).await {
            Ok(()) => {
                if let Err(e) = journal.mark_reported(&id) {
                    log::error!(target: "control", "cannot journal that the result of {id} was reported: {e}");
                }
            }
            Err(e) => {
                log::warn!(target: "control", "reporting the result of {id}: {e}; retried with the next heartbeat");
                return;
            }
        }
    }
}

async fn fetch_and_apply(ctx: &ControlContext, c: &ManagementClient) {
    let answer = match c.config().await {
        Ok(a) => a,
        Err(e) => {
            log::warn!(target: "control", "fetching the managed configuration: {e}; retried with the next heartbeat");
            return;
        }
    };
    let old = ctx.snapshot().managed;
    if answer.version <= old.version {
        return;
    }
    let config = match managed::materialize(&ctx.state_dir, answer.version, &answer.config) {
        Ok(c) => c,
        Err(problems) => {
            let errors = problems
                .iter()
                .map(|p| format!("{}: {}", p.field, p.reason))
                .collect();
            ctx.refuse_config(answer.version, errors);
            return;
        }
    };
    let new = Managed {
        version: answer.version,
        credentials: managed::surviving_overrides(&old.credentials, &config),
        config,
    };
    match ctx
        .ask(|reply| Request::ApplyManaged {
            managed: new,
            reply,
        })
        .await
    {
        Some(Ok(())) => {
            log::info!(target: "control", "managed configuration v{} applied", answer.version)
        }
        Some(Err(errors)) => ctx.refuse_config(answer.version, errors),
        None => {}
    }
}

fn arg_str<'a>(cmd: &'a Command, key: &str) -> Result<&'a str, String> {
    cmd.args
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: args.{key} (a string) is missing", cmd.kind))
}

fn result(r: Result<String, String>) -> CommandResult {
    match r {
        Ok(message) => CommandResult { ok: true, message },
        Err(message) => CommandResult { ok: false, message },
    }
}

/// The args each command kind this sensor runs may carry; any other arg is refused before the command
/// runs (and before the rate limit counts it), so no command takes a file name, a path or an endpoint from
/// the network. `install_update` checks its own (`update::UpdateRequest::from_args`, in [`check_args`]);
/// kinds not listed here check their own.
const COMMAND_ARGS: &[(&str, &[&str])] = &[
    ("set_log_level", &["level"]),
    ("resync", &["tenant", "start", "content_type"]),
    (
        "rotate_credentials",
        &[
            "tenant",
            "client_secret",
            "certificate_pem",
            "private_key_pem",
            "client_secret_expires",
            "verify_secs",
        ],
    ),
    ("collect_diagnostics", &[]),
    ("reboot", &[]),
    ("reset_spool", &[]),
];

/// Refuses a command whose args its kind does not take (naming them, escaped, and what it takes), or, for
/// `install_update`, whose args do not parse (`UpdateRequest::from_args`: URL, SHA-256, no downgrade).
fn check_args(cmd: &Command) -> Result<(), String> {
    if cmd.kind == "install_update" {
        return update::UpdateRequest::from_args(&cmd.args)
            .map(|_| ())
            .map_err(|e| e.to_string());
    }
    let Some((_, allowed)) = COMMAND_ARGS.iter().find(|(k, _)| *k == cmd.kind) else {
        return Ok(());
    };
    let unknown: Vec<String> = cmd
        .args
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| !allowed.contains(&k.as_str()))
        .map(|k| sensor_control::protocol::shown(k))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let takes = if allowed.is_empty() {
        "no args".to_string()
    } else {
        allowed.join(", ")
    };
    Err(format!(
        "{}: args {} refused, not run: this command takes {takes}",
        cmd.kind,
        unknown.join(", ")
    ))
}

async fn execute(
    ctx: &ControlContext,
    c: &ManagementClient,
    journal: &Journal,
    cmd: &Command,
) -> (CommandResult, Then) {
    if cmd.kind == "install_update" {
        return match install_update(ctx, c, cmd).await {
            Ok((message, then)) => (CommandResult { ok: true, message }, then),
            Err(message) => (CommandResult { ok: false, message }, Then::Done),
        };
    }
    let r = match cmd.kind.as_str() {
        "set_log_level" => set_log_level(cmd),
        "resync" => resync(ctx, cmd).await,
        "rotate_credentials" => rotate_credentials(ctx, cmd).await,
        "collect_diagnostics" => collect_diagnostics(ctx, c, journal, cmd).await,
        "reboot" => request_reboot(ctx, cmd),
        "reset_spool" => ctx
            .ask(|reply| Request::ResetSpool { reply })
            .await
            .unwrap_or_else(|| Err("the agent is shutting down".into())),
        other => Err(format!(
            "unknown command kind `{other}`; this sensor runs rotate_credentials, resync, set_log_level, collect_diagnostics, install_update, reboot and reset_spool"
        )),
    };
    (result(r), Then::Done)
}

/// `install_update`: downloads the bundle, checks its SHA-256, hands it to the host's updater and waits
/// for its answer. The bundle file is deleted afterwards, installed or not.
async fn install_update(
    ctx: &ControlContext,
    c: &ManagementClient,
    cmd: &Command,
) -> Result<(String, Then), String> {
    let fail = |e: update::UpdateError| format!("install_update: {e}");
    let updater = update::updater().ok_or_else(|| {
        fail(update::UpdateError::NoUpdater(PathBuf::from(
            update::UPDATER,
        )))
    })?;
    let req = update::UpdateRequest::from_args(&cmd.args).map_err(|e| e.to_string())?;
    let name = update::bundle_name(&cmd.id);
    let (bundle, _) = update::download(c, &req.url, &ctx.state_dir, &name, Some(&req.sha256))
        .await
        .map_err(fail)?;
    log::info!(target: "control", "command {}: bundle {} verified (SHA-256), handing it to {}", cmd.id, bundle.display(), updater.display());
    let outcome = async {
        update::request_install(&ctx.state_dir, &bundle, &cmd.id)?;
        update::wait_outcome(&update::result_path(), &ctx.state_dir, &cmd.id, UPDATE_WAIT).await
    }
    .await;
    if let Err(e) = std::fs::remove_file(&bundle) {
        log::warn!(target: "control", "removing {}: {e}", bundle.display());
    }
    let outcome = outcome.map_err(fail)?;
    if !outcome.ok {
        return Err(format!(
            "install_update {} ({}): {}",
            outcome.code, outcome.version, outcome.message
        ));
    }
    let then = if req.reboot { Then::Reboot } else { Then::Done };
    Ok((
        format!(
            "version {} installed into slot {}; {}, then its health check keeps it or rolls back",
            outcome.version,
            outcome.slot,
            if req.reboot {
                "rebooting into it"
            } else {
                "it boots at the next reboot"
            },
        ),
        then,
    ))
}

fn set_log_level(cmd: &Command) -> Result<String, String> {
    let level = arg_str(cmd, "level")?;
    let filter = crate::logging::parse_level(level).ok_or_else(|| {
        format!("set_log_level: `{level}` is not one of error, warn, info, debug, trace")
    })?;
    log::set_max_level(filter);
    Ok(format!(
        "log level set to {filter} (until the agent restarts)"
    ))
}

async fn resync(ctx: &ControlContext, cmd: &Command) -> Result<String, String> {
    let tenant = arg_str(cmd, "tenant")?.to_string();
    let start = arg_str(cmd, "start")?;
    let from = sensor_core::timefmt::parse_api_time(start)
        .ok_or_else(|| format!("resync: args.start `{start}` is not an RFC 3339 time"))?;
    let now = time::OffsetDateTime::now_utc();
    if from < now - time::Duration::days(7) + time::Duration::minutes(10) {
        return Err(format!(
            "resync: args.start {start} is beyond Microsoft's 7-day retention; the oldest start is {}",
            sensor_core::timefmt::rfc3339(now - time::Duration::days(7) + time::Duration::minutes(10))
        ));
    }
    if from > now {
        return Err(format!("resync: args.start {start} is in the future"));
    }
    let content_types: Vec<String> = match cmd.args.get("content_type").and_then(Value::as_str) {
        Some(ct) => vec![ct.to_string()],
        None => Vec::new(),
    };
    ctx.ask(|reply| Request::Resync {
        tenant,
        content_types,
        from: from.unix_timestamp(),
        reply,
    })
    .await
    .unwrap_or_else(|| Err("the agent is shutting down".into()))
}

async fn rotate_credentials(ctx: &ControlContext, cmd: &Command) -> Result<String, String> {
    let name = arg_str(cmd, "tenant")?.to_string();
    let published = ctx.snapshot();
    let tenant = published
        .config
        .tenants
        .iter()
        .find(|t| t.name == name)
        .cloned()
        .ok_or_else(|| format!("rotate_credentials: no tenant named `{name}` is configured"))?;
    let secret = cmd.args.get("client_secret").and_then(Value::as_str);
    let cert = cmd.args.get("certificate_pem").and_then(Value::as_str);
    let key = cmd.args.get("private_key_pem").and_then(Value::as_str);
    let expires = cmd
        .args
        .get("client_secret_expires")
        .and_then(Value::as_str);
    if let Some(d) = expires {
        if sensor_core::config::parse_date(d).is_none() {
            return Err(format!("rotate_credentials: args.client_secret_expires `{d}` is not a date of the form YYYY-MM-DD"));
        }
    }
    let verify_secs = match cmd.args.get("verify_secs") {
        None => DEFAULT_VERIFY_SECS,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_VERIFY_SECS).contains(&n) => n,
            _ => {
                return Err(format!(
                    "rotate_credentials: args.verify_secs {v} is out of range: must be between 1 and {MAX_VERIFY_SECS} (s); the old credential stays"
                ))
            }
        },
    };
    let store = |ext: &str, text: &str| -> Result<PathBuf, String> {
        let path = managed::credential_path(&ctx.state_dir, &name, ext, text.trim());
        managed::write_credential(&path, text.trim())
            .map_err(|e| format!("storing the new credential in {}: {e}", path.display()))?;
        Ok(path)
    };
    let o = match (secret, cert, key) {
        (Some(s), None, None) => CredentialOverride {
            client_secret_file: Some(store("secret", s)?),
            client_secret_expires: expires.map(str::to_string),
            ..Default::default()
        },
        (None, Some(c), Some(k)) => CredentialOverride {
            certificate_file: Some(store("pem", c)?),
            private_key_file: Some(store("key", k)?),
            ..Default::default()
        },
        _ => return Err("rotate_credentials: give args.client_secret, or args.certificate_pem and args.private_key_pem".into()),
    };
    let candidate = TenantConfig {
        client_secret_file: o.client_secret_file.clone(),
        certificate_file: o.certificate_file.clone(),
        private_key_file: o.private_key_file.clone(),
        client_secret_expires: o.client_secret_expires.clone(),
        ..tenant
    };
    verify_credential(
        &candidate,
        published.config.network.proxy.as_deref(),
        verify_secs,
    )
    .await?;
    let mut next = published.managed.clone();
    next.credentials.insert(name.clone(), o);
    match ctx.ask(|reply| Request::ApplyManaged { managed: next, reply }).await {
        Some(Ok(())) => Ok(format!("credentials of {name} rotated: a token was obtained with the new one, which is now in use")),
        Some(Err(e)) => Err(format!("the new credential works but could not be applied: {}; the old one stays", e.join("; "))),
        None => Err("the agent is shutting down; the old credential stays".into()),
    }
}

/// Asks Entra for a token with `candidate` until it works or `verify_secs` passed.
async fn verify_credential(
    candidate: &TenantConfig,
    proxy: Option<&str>,
    verify_secs: u64,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(verify_secs);
    loop {
        match m365_collector::check_credential(candidate, proxy).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "the new credential was refused ({e}); the old one stays in use"
                ))
            }
            Err(e) => {
                log::info!(target: "control", tenant = candidate.name.as_str(); "new credential not accepted yet ({e}); retrying");
                tokio::time::sleep(
                    Duration::from_secs(5).min(Duration::from_secs(verify_secs.max(1))),
                )
                .await;
            }
        }
    }
}

/// The configuration as a bundle may show it: file names, never file contents; a proxy's password
/// removed.
fn redacted_config(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or(Value::Null);
    if let Some(proxy) = v.pointer_mut("/network/proxy") {
        if let Some(p) = proxy.as_str() {
            if let Ok(mut u) = url::Url::parse(p) {
                if !u.username().is_empty() || u.password().is_some() {
                    let _ = u.set_username("redacted");
                    let _ = u.set_password(None);
                }
                *proxy = Value::String(u.to_string());
            }
        }
    }
    v
}

async fn collect_diagnostics(
    ctx: &ControlContext,
    c: &ManagementClient,
    journal: &Journal,
    cmd: &Command,
) -> Result<String, String> {
    let p = ctx.snapshot();
    let spool = crate::agent::spool_of(&ctx.spool);
    let quarantine = spool
        .as_ref()
        .ok_or(())
        .and_then(|s| s.quarantine().map_err(|_| ()))
        .map(|q| {
            q.iter()
                .map(|i| serde_json::to_value(i).unwrap_or(Value::Null))
                .collect::<Vec<_>>()
        });
    let bundle = serde_json::json!({
        "sensor_id": ctx.sensor_id,
        "version": sensor_core::VERSION,
        "arch": std::env::consts::ARCH,
        "created_at": sensor_core::timefmt::rfc3339(time::OffsetDateTime::now_utc()),
        "status": ctx.document(),
        "config": redacted_config(&p.config),
        "managed": {
            "version": p.managed.version,
            "rotated_credentials": p.managed.credentials.keys().collect::<Vec<_>>(),
        },
        "commands": journal.entries(),
        "quarantine": quarantine.unwrap_or_default(),
        "logs": crate::logging::recent_lines(),
    });
    let size = bundle.to_string().len();
    c.upload_diagnostics(&cmd.id, &bundle)
        .await
        .map_err(|e| format!("uploading the diagnostics bundle: {e}"))?;
    Ok(format!(
        "diagnostics bundle uploaded ({size} bytes of JSON)"
    ))
}

fn request_reboot(ctx: &ControlContext, cmd: &Command) -> Result<String, String> {
    let path = ctx.state_dir.join(REBOOT_REQUEST);
    sensor_control::store::write_private(&path, cmd.id.as_bytes())
        .map_err(|e| format!("reboot: writing {}: {e}", path.display()))?;
    Ok(format!(
        "reboot requested ({}); m365-sensor-reboot.path reboots the host",
        path.display()
    ))
}

/// Renews the device certificate when less than a third of its lifetime is left. Returns whether it
/// was renewed (the management client must then be rebuilt).
async fn renew_if_due(ctx: &ControlContext, c: &ManagementClient) -> bool {
    let Ok(Some(current)) = Identity::load(&ctx.state_dir) else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if !current.needs_renewal(now) {
        return false;
    }
    let outcome = async {
        let k = identity::new_key_and_csr(&current.sensor_id).map_err(|e| e.to_string())?;
        let answer = c.renew(&k.csr_pem).await.map_err(|e| e.to_string())?;
        let installed = identity::install(
            &ctx.state_dir,
            &NewIdentity {
                sensor_id: &current.sensor_id,
                cert_pem: &answer.certificate_pem,
                key_pem: &k.key_pem,
                ca_pem: &answer.ca_pem,
                // The renewal answer's ca_pem checks the new certificate only; server trust stays.
                server_anchors: ServerAnchors::KeepCurrent,
            },
        )
        .map_err(|e| e.to_string())?;
        Ok::<Identity, String>(installed)
    }
    .await;
    match outcome {
        Ok(new) => {
            log::info!(target: "control", "device certificate renewed; valid until {}", time::OffsetDateTime::from_unix_timestamp(new.not_after).map(sensor_core::timefmt::rfc3339).unwrap_or_default());
            if let Some(Err(e)) = ctx.ask(|reply| Request::RestartRelay { reply }).await {
                log::error!(target: "control", "restarting the relay with the renewed certificate: {e}");
            }
            true
        }
        Err(e) => {
            log::warn!(target: "control", "renewing the device certificate (expires {}): {e}; retried in a minute", time::OffsetDateTime::from_unix_timestamp(current.not_after).map(sensor_core::timefmt::rfc3339).unwrap_or_default());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(kind: &str, args: Value) -> Command {
        Command {
            id: "c1".into(),
            kind: kind.into(),
            args,
        }
    }

    /// Issue 18 item 1, the command side: no command takes a file or an endpoint from the network.
    #[test]
    fn commands_refuse_args_they_do_not_take() {
        let e = check_args(&cmd(
            "rotate_credentials",
            serde_json::json!({"tenant": "a", "client_secret_file": "/proc/self/environ", "login_url": "https://x"}),
        ))
        .expect_err("refused");
        assert!(
            e.contains(r#""client_secret_file""#) && e.contains(r#""login_url""#),
            "{e}"
        );
        assert!(e.starts_with("rotate_credentials: args"), "{e}");
        let e = check_args(&cmd("reboot", serde_json::json!({"path": "/x"}))).expect_err("refused");
        assert!(e.contains("takes no args"), "{e}");
        assert!(check_args(&cmd(
            "rotate_credentials",
            serde_json::json!({"tenant": "a", "client_secret": "s", "verify_secs": 5})
        ))
        .is_ok());
        assert!(check_args(&cmd(
            "resync",
            serde_json::json!({"tenant": "a", "start": "x", "content_type": "Audit.General"})
        ))
        .is_ok());
        let e = check_args(&cmd("reset_spool", serde_json::json!({"path": "/x"})))
            .expect_err("refused");
        assert!(e.contains("takes no args"), "{e}");
    }
}

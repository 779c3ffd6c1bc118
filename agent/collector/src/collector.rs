//! The collector of one tenant × content type: subscribe, list windows, fetch blobs once, commit them
//! to the spool. Invariants: a blob is done only once the spool returned from its atomic commit; the
//! cursor advances only over windows whose every item is done (committed, expired-and-reported or
//! quarantined); one failing blob is retried a bounded number of times and then quarantined, never
//! blocking the others; the subscription is started at most once per 15 minutes and never stopped.
//!
//! A window is listed one page at a time: each page's items are handled (done-marks checked, blobs
//! fetched and committed) before the next page is asked for, so a window never holds more than one page.
//! The cursor moves past a window only after its last page (one without `NextPageUri`) and only if every
//! item of every page is done; a crash between pages re-lists the window, and the done-marks skip what
//! was committed (nothing lost, nothing twice). A listing cut at its caps or at a repeated page
//! (`api::Listing`) leaves the window to be listed again, puts the stream in `api_unreachable` with the
//! cut's description, and narrows the collector's windows (÷ 4, down to `window::MIN_WINDOW`) until a
//! cycle lists every window whole; the windows after it are still listed in the same cycle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sensor_core::counters::Counters;
use sensor_core::status::State;
use sensor_spool::{BlobCommit, Cursor, DoneKind, QuarantineItem, RawRecord};
use time::OffsetDateTime;

use crate::api::{ApiError, ContentItem, Listing, Page, Progress};
use crate::auth::AuthError;
use crate::blob::parse_blob;
use crate::window::{clamp, oldest_start, plan_sized, Window, MAX_WINDOW, MIN_WINDOW};
use crate::TenantShared;

/// Attempts before a blob that keeps failing transiently is quarantined.
pub const BLOB_ATTEMPTS: u32 = 5;
/// Minimum time between two subscription starts of one content type (Microsoft's rule).
pub const START_SPACING_SECS: i64 = 15 * 60;
/// How long `credentials_invalid` waits before it is reported (a new secret takes about a minute).
pub const NEW_SECRET_GRACE: Duration = Duration::from_secs(120);
/// How long a lost window keeps the component in `content_expired`.
const LOSS_REPORT_SECS: u64 = 24 * 3600;
/// Most blobs whose transient failures are counted at once: past it a failing blob is retried next
/// cycle without a count (a listing of endless new items whose fetches fail cannot grow the map).
const MAX_TRACKED_FAILURES: usize = 10_000;

/// How long a collector waits after the spool failed before it tries again (the agent reopens the
/// spool meanwhile; the spool component says why).
const SPOOL_RETRY: Duration = Duration::from_secs(5);

/// What stopped a cycle early.
enum Stop {
    Shutdown,
    Error(ApiError),
    /// The spool failed: a host fault (`sensor_spool::fault`), never Microsoft's.
    Spool(sensor_spool::SpoolError),
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Error(e)
    }
}

impl From<sensor_spool::SpoolError> for Stop {
    fn from(e: sensor_spool::SpoolError) -> Self {
        Stop::Spool(e)
    }
}

/// One tenant × content type.
pub struct Collector {
    t: Arc<TenantShared>,
    content_type: String,
    component: String,
    subscribed: bool,
    failures: HashMap<String, u32>,
    auth_failing_since: Option<Instant>,
    last_loss: Option<(Instant, String)>,
    consecutive_errors: u32,
    /// The length of the windows listed: [`MAX_WINDOW`], divided by 4 after a cycle with a cut listing
    /// (not below [`MIN_WINDOW`]), doubled back after a cycle without.
    window_len: time::Duration,
    /// The first cut listing of the current cycle, described.
    cut: Option<String>,
}

impl Collector {
    /// A collector for `content_type` of the tenant.
    pub fn new(t: Arc<TenantShared>, content_type: &str) -> Self {
        let component = format!("tenant/{}/{}", t.config.name, content_type);
        t.status.set(&component, State::Starting, None, None);
        Self {
            t,
            content_type: content_type.to_string(),
            component,
            subscribed: false,
            failures: HashMap::new(),
            auth_failing_since: None,
            last_loss: None,
            consecutive_errors: 0,
            window_len: MAX_WINDOW,
            cut: None,
        }
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        let poll = Duration::from_secs(self.t.config.poll_interval_secs);
        loop {
            if self.t.is_shutdown() {
                return;
            }
            let delay = match self.cycle().await {
                Ok(()) => {
                    self.consecutive_errors = 0;
                    self.auth_failing_since = None;
                    match self.cut.take() {
                        Some(cut) => {
                            self.window_len = (self.window_len / 4_i32).max(MIN_WINDOW);
                            self.set(State::ListingCut, Some(cut), None);
                        }
                        None => {
                            self.window_len = (self.window_len * 2_i32).min(MAX_WINDOW);
                            self.report_ok();
                        }
                    }
                    poll
                }
                Err(Stop::Shutdown) => return,
                Err(Stop::Spool(e)) => {
                    self.report_spool_error(&e);
                    SPOOL_RETRY
                }
                Err(Stop::Error(e)) => {
                    self.consecutive_errors = self.consecutive_errors.saturating_add(1);
                    self.report_error(&e);
                    self.backoff(&e, poll)
                }
            };
            if self.t.sleep_or_shutdown(delay).await {
                return;
            }
        }
    }

    /// The pause after a failed cycle: Microsoft's throttling pause; for transient failures the poll
    /// interval doubling up to 60 s; for failures a person must fix (credentials, consent, audit) up to
    /// 5 min. Jittered so content types and tenants do not retry in step.
    fn backoff(&self, e: &ApiError, poll: Duration) -> Duration {
        if let ApiError::Throttled { pause, .. } = e {
            return *pause;
        }
        let cap = if e.is_transient() {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(300)
        };
        let exp = poll.saturating_mul(1u32 << self.consecutive_errors.min(8));
        let base = exp.min(cap).max(poll.min(cap));
        base / 2 + Duration::from_millis(rand::random::<u64>() % (base.as_millis() as u64 / 2 + 1))
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn load_cursor(&self) -> Result<Cursor, Stop> {
        let c = &self.t.config;
        Ok(self
            .t
            .spool
            .cursor(&c.tenant_id, &self.content_type)?
            .unwrap_or_else(|| {
                let start = Self::now() - time::Duration::hours(i64::from(c.backfill_hours));
                Cursor {
                    listed_until: start.unix_timestamp(),
                    ..Cursor::default()
                }
            }))
    }

    async fn ensure_subscription(&mut self, cursor: &mut Cursor) -> Result<(), Stop> {
        let subs = self.t.api.list_subscriptions().await?;
        let enabled = subs
            .iter()
            .any(|s| s.content_type == self.content_type && s.status.as_deref() == Some("enabled"));
        if !enabled {
            let now = Self::now().unix_timestamp();
            if now - cursor.subscription_started_at < START_SPACING_SECS {
                return Err(Stop::Error(ApiError::SubscriptionDisabled(format!(
                    "the subscription is not enabled; the next start is allowed at {}",
                    cursor.subscription_started_at + START_SPACING_SECS
                ))));
            }
            cursor.subscription_started_at = now;
            self.t.spool_blocking(|s| {
                s.set_cursor(&self.t.config.tenant_id, &self.content_type, cursor)
            })?;
            self.t.api.start_subscription(&self.content_type).await?;
            log::info!(target: "collector", tenant = self.t.config.name.as_str(), content_type = self.content_type.as_str(); "subscription started");
        }
        self.subscribed = true;
        Ok(())
    }

    async fn cycle(&mut self) -> Result<(), Stop> {
        let mut cursor = self.load_cursor()?;
        if !self.subscribed {
            self.ensure_subscription(&mut cursor).await?;
        }
        let t = self.t.clone();
        let cfg = &t.config;
        let now = Self::now();
        let deep =
            now.unix_timestamp() - cursor.deep_swept_at >= i64::from(cfg.deep_sweep_hours) * 3600;
        let lookback = now - time::Duration::hours(i64::from(cfg.lookback_hours));
        let listed_until =
            OffsetDateTime::from_unix_timestamp(cursor.listed_until).unwrap_or(lookback);
        let from = if deep {
            oldest_start(now)
        } else {
            listed_until.min(lookback)
        };
        let mut contiguous = true;
        self.cut = None;
        for w in plan_sized(from, now, self.window_len) {
            let Some(w) = clamp(w, Self::now()) else {
                continue;
            };
            let whole = self.collect_window(w, &mut cursor).await?;
            contiguous &= whole;
            if contiguous && w.end.unix_timestamp() > cursor.listed_until {
                cursor.listed_until = w.end.unix_timestamp();
                self.t.spool_blocking(|s| {
                    s.set_cursor(&cfg.tenant_id, &self.content_type, &cursor)
                })?;
            }
            // The API answers and the window is handled: leave `starting` without waiting for the
            // whole (possibly 7-day) first sweep.
            if self
                .t
                .status
                .get(&self.component)
                .is_some_and(|c| matches!(c.state, State::Starting | State::WaitingForFirstContent))
            {
                self.report_ok();
            }
        }
        if deep && contiguous {
            cursor.deep_swept_at = now.unix_timestamp();
            self.t
                .spool_blocking(|s| s.set_cursor(&cfg.tenant_id, &self.content_type, &cursor))?;
        }
        Ok(())
    }

    /// Lists `w` page by page, handling each page's items before the next page is fetched. `Ok(true)`
    /// when the listing ended and every item is done; `Ok(false)` when an item must be retried or the
    /// listing was cut (then `self.cut` and the status say so).
    async fn collect_window(&mut self, w: Window, cursor: &mut Cursor) -> Result<bool, Stop> {
        let mut listing = Listing::new(self.t.api.content_url(&self.content_type, w));
        let mut all_done = true;
        while let Some(url) = listing.next_url().map(str::to_string) {
            let page = self.list_page(&url, cursor).await?;
            let progress = listing.accept(&page);
            if !page.items.is_empty() {
                cursor.first_content_seen = true;
            }
            for item in &page.items {
                self.wait_while_spool_full().await?;
                if !self.process(item, cursor).await? {
                    all_done = false;
                }
            }
            match progress {
                Progress::More => {}
                Progress::Complete => return Ok(all_done),
                Progress::Cut(cut) => {
                    let text = cut.describe(&self.content_type, w);
                    let cfg = &self.t.config;
                    log::warn!(target: "collector", tenant = cfg.name.as_str(), content_type = self.content_type.as_str(), pages = cut.pages, items = cut.items, bytes = cut.bytes; "listing cut: {text}");
                    self.set(State::ApiUnreachable, Some(text.clone()), None);
                    self.cut.get_or_insert(text);
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }

    /// One page of a listing; a subscription found missing or disabled is started again (15 minutes
    /// apart) and the page asked for once more.
    async fn list_page(&mut self, url: &str, cursor: &mut Cursor) -> Result<Page, Stop> {
        match self.t.api.list_page(url).await {
            Err(ApiError::NoSubscription(_)) | Err(ApiError::SubscriptionDisabled(_)) => {
                self.subscribed = false;
                self.ensure_subscription(cursor).await?;
                Ok(self.t.api.list_page(url).await?)
            }
            other => Ok(other?),
        }
    }

    async fn wait_while_spool_full(&self) -> Result<(), Stop> {
        while self.t.spool.is_full() {
            if self.t.sleep_or_shutdown(Duration::from_millis(500)).await {
                return Err(Stop::Shutdown);
            }
        }
        if self.t.is_shutdown() {
            return Err(Stop::Shutdown);
        }
        Ok(())
    }

    /// Handles one listed item. `Ok(true)` when it is done, `Ok(false)` when it must be retried later.
    async fn process(&mut self, item: &ContentItem, cursor: &Cursor) -> Result<bool, Stop> {
        let t = self.t.clone();
        let cfg = &t.config;
        let (tid, ct) = (cfg.tenant_id.as_str(), self.content_type.as_str());
        if self.t.spool.is_done(tid, ct, &item.content_id)? {
            Counters::add(&self.t.counters.blobs_skipped_done, 1);
            return Ok(true);
        }
        let now = Self::now();
        let expires = item.expires_at(now);
        if expires <= now {
            self.lost(item, expires, "listed past its contentExpiration")?;
            return Ok(true);
        }
        let body = match self.t.api.fetch_blob(&item.content_uri).await {
            Ok(b) => b,
            Err(ApiError::ContentExpired(t)) => {
                self.lost(item, expires, &t)?;
                return Ok(true);
            }
            Err(
                e @ (ApiError::ContentGone { .. }
                | ApiError::TooLarge { .. }
                | ApiError::Client { .. }
                | ApiError::BadResponse { .. }),
            ) => {
                self.quarantine(item, expires, &e.to_string(), &[])?;
                return Ok(true);
            }
            Err(e) if e.is_transient() => {
                if self.failures.len() >= MAX_TRACKED_FAILURES
                    && !self.failures.contains_key(&item.content_id)
                {
                    log::warn!(target: "collector", tenant = cfg.name.as_str(), content_type = ct, content_id = item.content_id.as_str(), error:% = e; "blob fetch failed (not counted: {MAX_TRACKED_FAILURES} blobs are failing)");
                    return Ok(false);
                }
                let n = self.failures.entry(item.content_id.clone()).or_insert(0);
                *n += 1;
                log::warn!(target: "collector", tenant = cfg.name.as_str(), content_type = ct, content_id = item.content_id.as_str(), error:% = e; "blob fetch attempt {} failed", *n);
                if *n >= BLOB_ATTEMPTS {
                    let reason = format!("failed {BLOB_ATTEMPTS} times, last: {e}");
                    self.quarantine(item, expires, &reason, &[])?;
                    return Ok(true);
                }
                return Ok(false);
            }
            Err(e) => return Err(Stop::Error(e)),
        };
        self.failures.remove(&item.content_id);
        let records = match parse_blob(&body) {
            Ok(r) => r,
            Err(e) => {
                self.quarantine(item, expires, &e.to_string(), &body)?;
                return Ok(true);
            }
        };
        Counters::add(&self.t.counters.records_fetched, records.len() as u64);
        let raw: Vec<RawRecord<'_>> = records
            .iter()
            .map(|r| RawRecord {
                id: &r.id,
                bytes: r.raw.as_bytes(),
            })
            .collect();
        let collected_at = sensor_core::timefmt::rfc3339(now);
        let outcome = self.t.spool_blocking(|s| {
            s.commit_blob(&BlobCommit {
                tenant_id: tid,
                content_type: ct,
                content_id: &item.content_id,
                expires_unix: expires.unix_timestamp(),
                collected_at: &collected_at,
                records: &raw,
                cursor: Some(cursor),
            })
        })?;
        log::trace!(target: "durability", "committed blob {} ({} records)", item.content_id, outcome.spooled);
        Counters::add(&self.t.counters.records_spooled, outcome.spooled);
        Counters::add(&self.t.counters.duplicates_dropped, outcome.duplicates);
        Counters::add(&self.t.counters.blobs_committed, 1);
        if let Some(created) = item
            .content_created
            .as_deref()
            .and_then(sensor_core::timefmt::parse_api_time)
        {
            self.t
                .status
                .note_newest(&cfg.name, created.unix_timestamp());
        }
        self.t.relay_wake.notify_one();
        Ok(true)
    }

    fn lost(&mut self, item: &ContentItem, expires: OffsetDateTime, why: &str) -> Result<(), Stop> {
        let cfg = &self.t.config;
        let created = item
            .content_created
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let detail = format!(
            "content {} created {created} expired {} before it was fetched ({why})",
            item.content_id,
            sensor_core::timefmt::rfc3339(expires)
        );
        log::warn!(target: "collector", tenant = cfg.name.as_str(), content_type = self.content_type.as_str(), content_id = item.content_id.as_str(); "lost window: {detail}");
        self.t.spool_blocking(|s| {
            s.mark_done(
                &cfg.tenant_id,
                &self.content_type,
                &item.content_id,
                expires.unix_timestamp(),
                DoneKind::Expired,
                None,
            )
        })?;
        Counters::add(&self.t.counters.blobs_expired, 1);
        self.last_loss = Some((Instant::now(), detail));
        Ok(())
    }

    fn quarantine(
        &mut self,
        item: &ContentItem,
        expires: OffsetDateTime,
        reason: &str,
        body: &[u8],
    ) -> Result<(), Stop> {
        let cfg = &self.t.config;
        log::warn!(target: "collector", tenant = cfg.name.as_str(), content_type = self.content_type.as_str(), content_id = item.content_id.as_str(), error = reason; "blob quarantined");
        let keep = &body[..body.len().min(1024 * 1024)];
        let q = QuarantineItem {
            reason: reason.to_string(),
            origin: format!(
                "{}/{} {}",
                cfg.tenant_id, self.content_type, item.content_id
            ),
            at: Self::now().unix_timestamp(),
            records: 0,
            payload: String::from_utf8_lossy(keep).into_owned(),
        };
        self.t.spool_blocking(|s| {
            s.mark_done(
                &cfg.tenant_id,
                &self.content_type,
                &item.content_id,
                expires.unix_timestamp(),
                DoneKind::Quarantined,
                Some(q),
            )
        })?;
        self.failures.remove(&item.content_id);
        Counters::add(&self.t.counters.blobs_quarantined, 1);
        Ok(())
    }

    fn set(&self, state: State, error: Option<String>, detail: Option<String>) {
        let changed = self
            .t
            .status
            .set(&self.component, state, error.clone(), detail);
        if changed {
            let name = &self.t.config.name;
            match state.severity() {
                sensor_core::status::Severity::Ok => {
                    log::info!(target: "collector", tenant = name.as_str(), content_type = self.content_type.as_str(), state = state.name().as_str(); "{name} {}: {}", self.content_type, state.name())
                }
                _ => {
                    log::warn!(target: "collector", tenant = name.as_str(), content_type = self.content_type.as_str(), state = state.name().as_str(), error = error.as_deref().unwrap_or_default(); "{name} {}: {}: {}", self.content_type, state.name(), error.as_deref().unwrap_or_default())
                }
            }
        }
    }

    fn report_ok(&mut self) {
        if let Some((at, detail)) = &self.last_loss {
            if at.elapsed().as_secs() < LOSS_REPORT_SECS {
                self.set(State::ContentExpired, None, Some(detail.clone()));
                return;
            }
            self.last_loss = None;
        }
        let cursor_seen = self
            .t
            .spool
            .cursor(&self.t.config.tenant_id, &self.content_type)
            .ok()
            .flatten()
            .map(|c| c.first_content_seen)
            .unwrap_or(false);
        if !cursor_seen {
            self.set(State::WaitingForFirstContent, None, None);
        } else if let Some(days) = self.t.secret_days_left() {
            if days <= 30 {
                let what = if self.t.config.certificate_file.is_some() {
                    "certificate"
                } else {
                    "client secret"
                };
                self.set(
                    State::SecretExpiring,
                    None,
                    Some(format!("the {what} expires in {days} day(s)")),
                );
            } else {
                self.set(State::Ok, None, None);
            }
        } else {
            self.set(State::Ok, None, None);
        }
    }

    /// A spool error: classified once (`sensor_spool::fault::classify`), noted on the spool (whose
    /// component the agent sets from it) and shown here as a pause that points at the spool.
    fn report_spool_error(&mut self, e: &sensor_spool::SpoolError) {
        let fault = sensor_spool::fault::classify(e, self.t.spool.dir());
        let detail = format!(
            "paused: the spool cannot write ({}): {}",
            fault.kind.state().name(),
            fault.detail
        );
        let error = fault.error.clone();
        self.t.spool.note_fault(fault);
        self.set(State::SpoolUnavailable, Some(error), Some(detail));
    }

    fn report_error(&mut self, e: &ApiError) {
        let text = Some(e.to_string());
        let state = state_of(e);
        if state == State::CredentialsInvalid
            && matches!(e, ApiError::Auth(AuthError::InvalidCredentials { .. }))
        {
            let since = *self.auth_failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() < NEW_SECRET_GRACE {
                self.set(
                    State::Starting,
                    text,
                    Some("credentials refused; retrying for 2 minutes (a new secret can take a minute to work)".into()),
                );
                return;
            }
        }
        self.set(state, text, None);
    }
}

/// The status state an API error puts a tenant × content type in.
pub fn state_of(e: &ApiError) -> State {
    match e {
        ApiError::Auth(AuthError::InvalidCredentials { .. })
        | ApiError::Auth(AuthError::Credential(_))
        | ApiError::Auth(AuthError::Refused { .. }) => State::CredentialsInvalid,
        ApiError::Auth(AuthError::SecretExpired { .. }) => State::SecretExpired,
        ApiError::Auth(AuthError::WrongCloud { .. }) | ApiError::WrongAudience(_) => {
            State::WrongCloud
        }
        ApiError::Auth(AuthError::Unreachable(_))
        | ApiError::Transport(_)
        | ApiError::Server { .. } => State::ApiUnreachable,
        ApiError::AuditDisabled(_) => State::AuditDisabled,
        ApiError::SubscriptionDisabled(_) | ApiError::NoSubscription(_) => {
            State::SubscriptionDisabled
        }
        ApiError::ConsentMissing { .. } => State::ConsentMissing,
        ApiError::Throttled { .. } => State::Throttled,
        ApiError::WindowRejected { .. }
        | ApiError::Client { .. }
        | ApiError::BadResponse { .. }
        | ApiError::TooLarge { .. } => State::ApiUnreachable,
        ApiError::ContentExpired(_) | ApiError::ContentGone { .. } => State::ContentExpired,
    }
}

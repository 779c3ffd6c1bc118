//! The status model of `../shared/design/product.md`. Each component (tenant × content type, the backend
//! link, the spool) is in exactly one [`State`], with the time it entered it, the server's own error text
//! and a one-line fix for a person. The overall state is the worst of the parts.
//!
//! Invariant: `since` changes only when the state changes, so a failing poll loop does not make a state
//! look new; error texts are passed through [`redact`] so no secret reaches the document.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::counters::CountersSnapshot;

/// One component's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Working.
    Ok,
    /// Not yet through its first cycle.
    Starting,
    /// Subscribed, but Microsoft has not listed any content yet (can take 12 h).
    WaitingForFirstContent,
    /// Unified audit logging is off for the tenant.
    AuditDisabled,
    /// The subscription was disabled by an admin (AF20023).
    SubscriptionDisabled,
    /// The client secret or certificate is wrong (AADSTS7000215, 700027).
    CredentialsInvalid,
    /// The client secret expired (AADSTS7000222).
    SecretExpired,
    /// The client secret expires within 30 days.
    SecretExpiring,
    /// Admin consent or the ActivityFeed permission is missing (AF10001, 401/403).
    ConsentMissing,
    /// The app is registered in another cloud (AADSTS900382, invalid audience).
    WrongCloud,
    /// Microsoft throttles the tenant (AF429).
    Throttled,
    /// Microsoft's endpoints cannot be reached or fail.
    ApiUnreachable,
    /// A window of content expired before it could be fetched.
    ContentExpired,
    /// The backend cannot be reached.
    BackendUnreachable,
    /// The backend refuses the device's credentials.
    BackendAuthFailed,
    /// The spool is at least 80 % full.
    SpoolHigh,
    /// The spool is full: collection paused.
    SpoolFull,
    /// Items are held in quarantine.
    Quarantined,
    /// The filesystem under the state directory is full (ENOSPC): not the spool's own cap.
    DiskFull,
    /// The filesystem under the state directory is read-only (EROFS).
    DiskReadOnly,
    /// The disk failed a read or a write (EIO) on a named file.
    DiskError,
    /// The spool's files are damaged: what was found, where.
    SpoolDamaged,
    /// Another process holds the spool's lock.
    SpoolLocked,
    /// A collector waits for the spool, which cannot write (its state is on the `spool` component).
    SpoolUnavailable,
    /// The backend's managed configuration has no tenant (applied only with its `allow_no_tenants`
    /// flag): collection is stopped on purpose.
    NoTenants,
    /// The backend sent a command the sensor refused to run (an invalid id, kind or arguments).
    CommandRefused,
    /// A content listing did not end within the caps of one window (pages, items, bytes, or a
    /// `NextPageUri` seen before): what was listed was processed, the window is listed again in parts.
    ListingCut,
}

/// How bad a state is; the overall status is the worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Everything works.
    Ok,
    /// Data still flows or nothing is lost yet, but a person should look.
    Degraded,
    /// Data of this component does not flow.
    Failed,
}

impl Severity {
    /// The exit code of `m365-sensor status`: 0 ok, 1 degraded, 2 failed.
    pub fn exit_code(self) -> i32 {
        match self {
            Severity::Ok => 0,
            Severity::Degraded => 1,
            Severity::Failed => 2,
        }
    }
}

impl State {
    /// This state's severity.
    pub fn severity(self) -> Severity {
        use State::*;
        match self {
            Ok | Starting | WaitingForFirstContent => Severity::Ok,
            SecretExpiring | Throttled | ContentExpired | SpoolHigh | Quarantined
            | BackendUnreachable | SpoolUnavailable | NoTenants | CommandRefused | ListingCut => {
                Severity::Degraded
            }
            AuditDisabled | SubscriptionDisabled | CredentialsInvalid | SecretExpired
            | ConsentMissing | WrongCloud | ApiUnreachable | BackendAuthFailed | SpoolFull
            | DiskFull | DiskReadOnly | DiskError | SpoolDamaged | SpoolLocked => Severity::Failed,
        }
    }

    /// The state's name as in the status document, e.g. `audit_disabled`.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The one-line fix for a person.
    pub fn fix(self) -> &'static str {
        use State::*;
        match self {
            Ok | Starting => "",
            WaitingForFirstContent => "Nothing to do: Microsoft can take up to 12 hours to list the first content after a subscription starts.",
            AuditDisabled => "Turn on audit logging in Microsoft Purview (Audit > Start recording user and admin activity); it takes 60 minutes to 72 hours to take effect.",
            SubscriptionDisabled => "A tenant or service admin disabled the subscription; the sensor restarts it every 15 minutes. If it stays disabled, contact Microsoft support.",
            CredentialsInvalid => "Paste the client secret's Value (not its Secret ID) into the secret file, or upload the certificate to the app registration; a new secret can take a minute to work.",
            SecretExpired => "Create a new client secret in Entra ID (App registrations > Certificates & secrets) and rotate it into the sensor.",
            SecretExpiring => "Create a new client secret before the old one expires and rotate it into the sensor.",
            ConsentMissing => "Grant admin consent for ActivityFeed.Read (and ActivityFeed.ReadDlp for DLP.All) as Application permissions of the Office 365 Management APIs.",
            WrongCloud => "Set `cloud` to the cloud the app is registered in (gcc-high and dod use login.microsoftonline.us).",
            Throttled => "Nothing to do: the sensor waits as Microsoft asks. Check that no other collector uses the same PublisherIdentifier.",
            ApiUnreachable => "Check outbound HTTPS (port 443) to the Microsoft login and management hosts, the proxy setting and DNS.",
            ContentExpired => "Content older than Microsoft's 7-day retention was lost; keep the sensor connected, and fetch the window from Purview audit search if needed.",
            BackendUnreachable => "Check outbound HTTPS to the backend; records stay buffered in the spool meanwhile.",
            BackendAuthFailed => "The backend refused the device's credentials: re-enrol the device or replace the backend token.",
            SpoolHigh => "The spool is filling because the backend does not accept data; restore the backend link before the spool fills.",
            SpoolFull => "Collection is paused (nothing is dropped; Microsoft keeps content 7 days): restore the backend link or raise spool.max_bytes.",
            Quarantined => "Some items were held aside; collect diagnostics and send them to support.",
            DiskFull => "Free space on the filesystem named in the detail (or grow it); collection and delivery resume by themselves within a minute. Nothing is dropped: Microsoft keeps content 7 days.",
            DiskReadOnly => "The filesystem named in the detail is read-only (often remounted so by the kernel after a disk error): check the kernel log, run fsck, remount it read-write; the sensor resumes by itself.",
            DiskError => "The disk failed on the file named in the detail: check the kernel log and the disk's health (smartctl), replace the disk if it keeps failing; the sensor retries by itself.",
            SpoolDamaged => "The spool's files are damaged where the detail says: send the `reset_spool` command to set the spool aside (kept for forensics) and start a fresh one; content not yet delivered is listed again from Microsoft's 7-day retention.",
            SpoolLocked => "Another m365-sensor uses the same state directory: stop it; this one opens the spool by itself once it is free.",
            SpoolUnavailable => "Nothing to do here: the spool component says what stops it; collection resumes by itself once the spool can write.",
            NoTenants => "The backend's configuration names no tenant, so nothing is collected: add the tenants in the backend, or confirm the sensor is meant to be idle.",
            ListingCut => "Nothing is lost: the items listed were processed and the rest of the window is listed again in smaller windows. If it persists, Microsoft's listing (or a proxy in between) serves pages without end: check the proxy, then contact Microsoft support with the detail.",
            CommandRefused => "The backend sent a command this sensor will not run (see the error): check the backend for compromise or a bug; nothing was run.",
        }
    }
}

/// One component's status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ComponentStatus {
    /// The state.
    pub state: State,
    /// When the component entered `state`, RFC 3339 UTC.
    pub since: String,
    /// The last error text from the server or the system, redacted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// What a person should do; empty when nothing.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub fix: String,
    /// Free-form detail (e.g. the lost window, the buffered bytes).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
}

/// Spool figures in the status document.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SpoolFigures {
    /// Records waiting for delivery.
    pub records: u64,
    /// Bytes the spool holds (as stored, compressed).
    pub bytes: u64,
    /// Uncompressed NDJSON bytes waiting.
    pub raw_bytes: u64,
    /// `spool.max_bytes`.
    pub max_bytes: u64,
    /// What `max_bytes` caps: the spool database's real disk use.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Items in quarantine.
    pub quarantined: u64,
    /// Batches cut and not yet acknowledged.
    pub batches: u64,
}

/// The status document: what `m365-sensor status --json` prints and the heartbeat sends.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusDocument {
    /// Worst severity of all components.
    pub overall: Severity,
    /// The sensor's id.
    pub sensor_id: String,
    /// The agent's version.
    pub version: String,
    /// Target architecture.
    pub arch: String,
    /// When this document was made, RFC 3339 UTC.
    pub updated_at: String,
    /// Components by name: `tenant/<name>/<content type>`, `backend`, `spool`.
    pub components: BTreeMap<String, ComponentStatus>,
    /// Spool figures.
    pub spool: SpoolFigures,
    /// Counters since start.
    pub counters: CountersSnapshot,
    /// Process id of the agent that wrote it.
    pub pid: u32,
    /// Seconds since the agent started.
    #[serde(default)]
    pub uptime_secs: u64,
    /// The managed configuration: the version applied and the last one refused, with its problems.
    #[serde(default)]
    pub config: ConfigStatus,
    /// Per tenant (by name): how far behind the newest spooled content is.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantFigures>,
    /// The state directory of the agent that wrote it (`status` matches it against its configuration
    /// when it reads the copy in the runtime directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
}

/// Where the managed configuration stands.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigStatus {
    /// The managed configuration version in force (0: the local file alone).
    pub version: u64,
    /// The last version refused, if newer than `version`.
    pub refused_version: Option<u64>,
    /// Why it was refused: one line per problem, naming the key.
    pub errors: Vec<String>,
}

/// One tenant's freshness.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantFigures {
    /// `contentCreated` of the newest content spooled since start, RFC 3339 UTC.
    pub newest_content_at: Option<String>,
    /// Now minus that, in seconds.
    pub lag_secs: Option<i64>,
}

/// The live status of all components. Invariant: updates are cheap and idempotent.
#[derive(Debug, Default)]
pub struct StatusBoard {
    inner: Mutex<BTreeMap<String, ComponentStatus>>,
    newest: Mutex<BTreeMap<String, i64>>,
}

impl StatusBoard {
    /// Notes that content created at `unix` (seconds) was spooled for `tenant`; keeps the newest.
    pub fn note_newest(&self, tenant: &str, unix: i64) {
        let mut m = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(tenant.to_string()).or_insert(unix);
        *e = (*e).max(unix);
    }

    /// Per tenant, the figures of [`TenantFigures`] at `now` (Unix seconds), for every name in `tenants`.
    pub fn tenant_figures<'a>(
        &self,
        tenants: impl IntoIterator<Item = &'a str>,
        now: i64,
    ) -> BTreeMap<String, TenantFigures> {
        let m = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        tenants
            .into_iter()
            .map(|name| {
                let newest = m.get(name).copied();
                let figures = TenantFigures {
                    newest_content_at: newest.and_then(|n| {
                        time::OffsetDateTime::from_unix_timestamp(n)
                            .ok()
                            .map(crate::timefmt::rfc3339)
                    }),
                    lag_secs: newest.map(|n| (now - n).max(0)),
                };
                (name.to_string(), figures)
            })
            .collect()
    }

    /// Sets `component` to `state`. Keeps `since` when the state is unchanged. Returns whether the state
    /// changed (callers log once per change, not once per poll).
    pub fn set(
        &self,
        component: &str,
        state: State,
        error: Option<String>,
        detail: Option<String>,
    ) -> bool {
        let mut map = match self.inner.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let now = crate::timefmt::rfc3339(time::OffsetDateTime::now_utc());
        let error = error.map(|e| redact(&e));
        match map.get_mut(component) {
            Some(c) if c.state == state => {
                if error.is_some() {
                    c.error = error;
                }
                c.detail = detail;
                false
            }
            _ => {
                map.insert(
                    component.to_string(),
                    ComponentStatus {
                        state,
                        since: now,
                        error,
                        fix: state.fix().to_string(),
                        detail,
                    },
                );
                true
            }
        }
    }

    /// Removes a component (a tenant removed from the config).
    pub fn remove(&self, component: &str) {
        if let Ok(mut map) = self.inner.lock() {
            map.remove(component);
        }
    }

    /// The state of `component`, if known.
    pub fn get(&self, component: &str) -> Option<ComponentStatus> {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(component).cloned())
    }

    /// A copy of every component.
    pub fn components(&self) -> BTreeMap<String, ComponentStatus> {
        match self.inner.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The worst severity.
    pub fn overall(&self) -> Severity {
        self.components()
            .values()
            .map(|c| c.state.severity())
            .max()
            .unwrap_or(Severity::Ok)
    }
}

/// Removes anything that looks like a credential from a server or system message: bearer tokens,
/// `client_secret=`/`client_assertion=` values and JWTs. Invariant: applied to every error text that
/// reaches a log line or a status document.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let lower = word.to_ascii_lowercase();
        let is_jwt = word.matches('.').count() >= 2
            && word.len() > 40
            && word
                .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
                .starts_with("ey");
        if is_jwt {
            out.push_str("[redacted]");
        } else if let Some(pos) = ["client_secret=", "client_assertion=", "access_token="]
            .iter()
            .find_map(|k| lower.find(k).map(|p| p + k.len()))
        {
            out.push_str(&word[..pos]);
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_survives_repeated_updates_and_overall_is_the_worst() {
        let b = StatusBoard::default();
        assert!(b.set("tenant/a/Audit.General", State::Ok, None, None));
        let since = b.get("tenant/a/Audit.General").map(|c| c.since);
        assert!(!b.set("tenant/a/Audit.General", State::Ok, None, None));
        assert_eq!(b.get("tenant/a/Audit.General").map(|c| c.since), since);
        b.set(
            "backend",
            State::BackendUnreachable,
            Some("connection refused".into()),
            None,
        );
        assert_eq!(b.overall(), Severity::Degraded);
        b.set("tenant/a/Audit.General", State::SecretExpired, None, None);
        assert_eq!(b.overall(), Severity::Failed);
        assert_eq!(Severity::Failed.exit_code(), 2);
    }

    #[test]
    fn redact_hides_tokens_and_form_secrets() {
        let s = redact("sent client_secret=abc.def&x=1 with eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwcyJ9.c2lnbmF0dXJlc2lnbmF0dXJl ok");
        assert!(!s.contains("abc.def"));
        assert!(!s.contains("eyJhdWQi"));
        assert!(s.contains("client_secret=[redacted]"));
        assert!(s.ends_with(" ok"));
    }
}

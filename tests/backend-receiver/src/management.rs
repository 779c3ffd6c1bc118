//! The management side's state: enrolment tokens and issued certificates, the managed configuration,
//! the command queue with its deliveries and results, diagnostics bundles and recent heartbeats.
//!
//! Invariants:
//! - A token is used at most once: checking and consuming it happen under one lock
//!   ([`Mgmt::consume_token`]); a used token is never made usable again.
//! - Commands are never removed: a command without a result is delivered by every heartbeat answer
//!   (counted in `deliveries`), one with a result never again.
//! - Memory stays bounded where a sensor sets the pace: the last [`MAX_HEARTBEATS_KEPT`] heartbeats and
//!   [`MAX_DIAGNOSTICS_KEPT`] bundles are kept (their counters count all).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::model::{
    Command, CommandTruth, DiagnosticsBundle, EnrollmentRecord, Enrollments, HeartbeatRecord,
    ManagedConfig, RefusedAttempt, RenewalRecord, ResultRecord,
};

/// Heartbeat records kept (the oldest are dropped first).
pub const MAX_HEARTBEATS_KEPT: usize = 1000;
/// Diagnostics bundles kept (the oldest are dropped first).
pub const MAX_DIAGNOSTICS_KEPT: usize = 100;

/// Errors of the management control operations ([`crate::ReceiverHandle`] methods and their `/_rx/...`
/// endpoints).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagementError {
    /// An enrolment token is empty.
    #[error("an enrolment token is empty")]
    EmptyToken,
    /// A token being added was used already; tokens are single-use.
    #[error("enrolment token {token:?} was already used; tokens are single-use")]
    TokenAlreadyUsed {
        /// The token.
        token: String,
    },
    /// A command's id is empty.
    #[error("a command id is empty")]
    EmptyCommandId,
    /// A command's kind is empty.
    #[error("a command kind is empty")]
    EmptyCommandKind,
    /// A command with this id was queued before.
    #[error("command {id:?} was already queued")]
    CommandIdTaken {
        /// The id.
        id: String,
    },
}

/// Why a token does not enrol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenRefusal {
    Unknown,
    Used,
}

impl TokenRefusal {
    /// The answer's `error` (the two are distinct on purpose).
    pub fn message(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "unknown enrollment token",
            TokenRefusal::Used => "enrollment token already used",
        }
    }
}

/// Counters merged into [`crate::Summary`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MgmtCounters {
    pub heartbeat_requests: u64,
    pub config_fetches: u64,
    pub enrollments: u64,
    pub renewals: u64,
    pub refused_enrollments: u64,
    pub command_results: u64,
    pub diagnostics: u64,
}

#[derive(Debug)]
struct CommandState {
    command: Command,
    queued_at: String,
    deliveries: u64,
    results: Vec<ResultRecord>,
}

/// The mutable management state. Lives behind a `std::sync::Mutex`; never held across `.await`.
#[derive(Debug, Default)]
pub(crate) struct Mgmt {
    /// Token → the sensor id that used it.
    tokens: BTreeMap<String, Option<String>>,
    /// Sensor ids issued at enrolment.
    enrolled: HashSet<String>,
    issued: Vec<EnrollmentRecord>,
    renewed: Vec<RenewalRecord>,
    refused: Vec<RefusedAttempt>,
    last_serial: u64,
    config: ManagedConfig,
    commands: Vec<CommandState>,
    command_index: HashMap<String, usize>,
    diagnostics: VecDeque<DiagnosticsBundle>,
    heartbeats: VecDeque<HeartbeatRecord>,
    /// Files served at `GET /v1/files/<name>` (update bundles), and who fetched each.
    pub files: BTreeMap<String, bytes::Bytes>,
    /// One entry per download: (file name, sensor id of the request, if any).
    pub downloads: Vec<(String, Option<String>)>,
    pub counters: MgmtCounters,
}

impl Mgmt {
    /// A state accepting `tokens` (empty ones are ignored).
    pub fn new(tokens: &[String]) -> Self {
        let mut m = Self::default();
        for t in tokens.iter().filter(|t| !t.is_empty()) {
            m.tokens.insert(t.clone(), None);
        }
        m
    }

    /// Adds tokens; all or none (an empty or already used one refuses the whole call). Returns how many
    /// were new.
    pub fn add_tokens(&mut self, tokens: Vec<String>) -> Result<usize, ManagementError> {
        for t in &tokens {
            if t.is_empty() {
                return Err(ManagementError::EmptyToken);
            }
            if matches!(self.tokens.get(t), Some(Some(_))) {
                return Err(ManagementError::TokenAlreadyUsed { token: t.clone() });
            }
        }
        let mut added = 0;
        for t in tokens {
            if self.tokens.insert(t, None).is_none() {
                added += 1;
            }
        }
        Ok(added)
    }

    /// Whether `token` would enrol now.
    pub fn check_token(&self, token: &str) -> Result<(), TokenRefusal> {
        match self.tokens.get(token) {
            None => Err(TokenRefusal::Unknown),
            Some(Some(_)) => Err(TokenRefusal::Used),
            Some(None) => Ok(()),
        }
    }

    /// Uses the record's token (checked again: another request may have used it meanwhile) and records
    /// the enrolment.
    pub fn consume_token(&mut self, record: EnrollmentRecord) -> Result<(), TokenRefusal> {
        self.check_token(&record.token)?;
        self.tokens
            .insert(record.token.clone(), Some(record.sensor_id.clone()));
        self.enrolled.insert(record.sensor_id.clone());
        self.counters.enrollments += 1;
        self.issued.push(record);
        Ok(())
    }

    /// A fresh certificate serial number (1, 2, ...).
    pub fn next_serial(&mut self) -> u64 {
        self.last_serial += 1;
        self.last_serial
    }

    /// Records a refused enrolment or renewal.
    pub fn refuse(&mut self, attempt: RefusedAttempt) {
        self.counters.refused_enrollments += 1;
        self.refused.push(attempt);
    }

    /// Records a renewal.
    pub fn renewed(&mut self, record: RenewalRecord) {
        self.counters.renewals += 1;
        self.renewed.push(record);
    }

    /// Whether `sensor_id` was issued at enrolment.
    pub fn is_enrolled(&self, sensor_id: &str) -> bool {
        self.enrolled.contains(sensor_id)
    }

    /// The enrolment ground truth.
    pub fn enrollments(&self) -> Enrollments {
        Enrollments {
            issued: self.issued.clone(),
            renewed: self.renewed.clone(),
            refused: self.refused.clone(),
            unused_tokens: self
                .tokens
                .iter()
                .filter(|(_, used)| used.is_none())
                .map(|(t, _)| t.clone())
                .collect(),
        }
    }

    /// Sets the managed configuration at `version` (default: the current one plus one). Returns the
    /// version.
    pub fn set_config(&mut self, version: Option<u64>, config: serde_json::Value) -> u64 {
        let version = version.unwrap_or(self.config.version.saturating_add(1));
        self.config = ManagedConfig { version, config };
        version
    }

    /// The managed configuration.
    pub fn config(&self) -> &ManagedConfig {
        &self.config
    }

    /// Queues a command (a new UUID when `id` is `None`). Returns its id.
    pub fn queue(
        &mut self,
        id: Option<String>,
        kind: String,
        args: serde_json::Value,
        now: String,
    ) -> Result<String, ManagementError> {
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if id.is_empty() {
            return Err(ManagementError::EmptyCommandId);
        }
        if kind.is_empty() {
            return Err(ManagementError::EmptyCommandKind);
        }
        if self.command_index.contains_key(&id) {
            return Err(ManagementError::CommandIdTaken { id });
        }
        self.command_index.insert(id.clone(), self.commands.len());
        self.commands.push(CommandState {
            command: Command {
                id: id.clone(),
                kind,
                args,
            },
            queued_at: now,
            deliveries: 0,
            results: Vec::new(),
        });
        Ok(id)
    }

    /// The commands a heartbeat answer delivers now (those without a result), each counted delivered.
    pub fn deliver(&mut self) -> Vec<Command> {
        self.commands
            .iter_mut()
            .filter(|c| c.results.is_empty())
            .map(|c| {
                c.deliveries += 1;
                c.command.clone()
            })
            .collect()
    }

    /// Whether a command with this id was queued.
    pub fn has_command(&self, id: &str) -> bool {
        self.command_index.contains_key(id)
    }

    /// Records a result; `false` for an unknown command.
    pub fn post_result(&mut self, id: &str, result: ResultRecord) -> bool {
        let Some(&i) = self.command_index.get(id) else {
            return false;
        };
        self.counters.command_results += 1;
        self.commands[i].results.push(result);
        true
    }

    /// Every command, in queue order.
    pub fn commands(&self) -> Vec<CommandTruth> {
        self.commands
            .iter()
            .map(|c| CommandTruth {
                id: c.command.id.clone(),
                kind: c.command.kind.clone(),
                args: c.command.args.clone(),
                queued_at: c.queued_at.clone(),
                deliveries: c.deliveries,
                results: c.results.clone(),
            })
            .collect()
    }

    /// Stores a diagnostics bundle.
    pub fn add_diagnostics(&mut self, bundle: DiagnosticsBundle) {
        self.counters.diagnostics += 1;
        if self.diagnostics.len() == MAX_DIAGNOSTICS_KEPT {
            self.diagnostics.pop_front();
        }
        self.diagnostics.push_back(bundle);
    }

    /// The kept diagnostics bundles, oldest first.
    pub fn diagnostics(&self) -> Vec<DiagnosticsBundle> {
        self.diagnostics.iter().cloned().collect()
    }

    /// Stores a heartbeat record.
    pub fn add_heartbeat(&mut self, record: HeartbeatRecord) {
        if self.heartbeats.len() == MAX_HEARTBEATS_KEPT {
            self.heartbeats.pop_front();
        }
        self.heartbeats.push_back(record);
    }

    /// The last heartbeat document.
    pub fn last_heartbeat(&self) -> Option<serde_json::Value> {
        self.heartbeats.back().map(|h| h.document.clone())
    }

    /// The kept heartbeat records, oldest first.
    pub fn heartbeats(&self) -> Vec<HeartbeatRecord> {
        self.heartbeats.iter().cloned().collect()
    }
}

/// Now, RFC 3339 in UTC.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` as RFC 3339.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(token: &str, sensor: &str) -> EnrollmentRecord {
        EnrollmentRecord {
            sensor_id: sensor.into(),
            token: token.into(),
            hostname: "h".into(),
            arch: "x86_64".into(),
            version: "0.1.0".into(),
            serial: "01".into(),
            not_before: String::new(),
            not_after: String::new(),
            at: String::new(),
        }
    }

    #[test]
    fn tokens_are_single_use() {
        let mut m = Mgmt::new(&["t1".to_string(), String::new()]);
        assert_eq!(m.check_token(""), Err(TokenRefusal::Unknown));
        assert_eq!(m.check_token("t2"), Err(TokenRefusal::Unknown));
        assert_eq!(m.consume_token(record("t1", "s1")), Ok(()));
        assert_eq!(m.consume_token(record("t1", "s2")), Err(TokenRefusal::Used));
        assert!(m.is_enrolled("s1") && !m.is_enrolled("s2"));
        assert_eq!(
            m.add_tokens(vec!["t3".into(), "t1".into()]),
            Err(ManagementError::TokenAlreadyUsed { token: "t1".into() })
        );
        assert_eq!(
            m.check_token("t3"),
            Err(TokenRefusal::Unknown),
            "all or none"
        );
        assert_eq!(m.add_tokens(vec!["t3".into(), "t3".into()]), Ok(1));
        assert_eq!(m.enrollments().unused_tokens, vec!["t3".to_string()]);
        assert_eq!(m.enrollments().issued.len(), 1);
    }

    #[test]
    fn commands_redelivered_until_a_result() {
        let mut m = Mgmt::default();
        let a = m
            .queue(None, "resync".into(), serde_json::json!({}), String::new())
            .expect("queued");
        m.queue(
            Some("b".into()),
            "reboot".into(),
            serde_json::json!({}),
            String::new(),
        )
        .expect("queued");
        assert_eq!(
            m.queue(
                Some("b".into()),
                "reboot".into(),
                serde_json::json!({}),
                String::new()
            ),
            Err(ManagementError::CommandIdTaken { id: "b".into() })
        );
        assert_eq!(m.deliver().len(), 2);
        let r = ResultRecord {
            ok: true,
            message: String::new(),
            at: String::new(),
            sensor_id: None,
        };
        assert!(m.post_result(&a, r.clone()));
        assert!(!m.post_result("nope", r.clone()));
        let ids: Vec<String> = m.deliver().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, vec!["b".to_string()]);
        assert!(m.post_result(&a, r));
        let c = m.commands();
        assert_eq!((c[0].deliveries, c[0].results.len()), (1, 2));
        assert_eq!((c[1].deliveries, c[1].results.len()), (2, 0));
    }

    #[test]
    fn config_versions() {
        let mut m = Mgmt::default();
        assert_eq!(m.config(), &ManagedConfig::default());
        assert_eq!(m.set_config(None, serde_json::json!({"a": 1})), 1);
        assert_eq!(m.set_config(None, serde_json::json!({"a": 2})), 2);
        assert_eq!(m.set_config(Some(10), serde_json::json!({"a": 3})), 10);
        assert_eq!(m.set_config(None, serde_json::json!({"a": 4})), 11);
        assert_eq!(m.config().config, serde_json::json!({"a": 4}));
    }

    #[test]
    fn heartbeats_are_bounded() {
        let mut m = Mgmt::default();
        for i in 0..MAX_HEARTBEATS_KEPT + 5 {
            m.add_heartbeat(HeartbeatRecord {
                at: String::new(),
                sensor_id: None,
                client_cn: None,
                client_serial: None,
                document: serde_json::json!(i),
            });
        }
        let h = m.heartbeats();
        assert_eq!(h.len(), MAX_HEARTBEATS_KEPT);
        assert_eq!(h[0].document, serde_json::json!(5));
    }
}

//! Fault injection for the main port: queued statuses, every-Nth statuses, slow answers, a lower body
//! limit and a record limit on ingest; garbage enrolment and config answers, a heartbeat status. Set through `POST /_rx/faults` or [`crate::ReceiverHandle::set_faults`].

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// An injected answer: a status and optionally a `Retry-After` header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusFault {
    /// The HTTP status to answer.
    pub status: u16,
    /// A raw `Retry-After` value (e.g. `"2"`), sent as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// Sends `Retry-After` as an HTTP date this many seconds ahead (when `retry_after` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_http_date_secs: Option<u64>,
}

impl StatusFault {
    /// The `Retry-After` header value to send, if any.
    pub fn retry_after_value(&self) -> Option<String> {
        if let Some(raw) = &self.retry_after {
            return Some(raw.clone());
        }
        self.retry_after_http_date_secs
            .map(|s| httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(s)))
    }
}

/// Answers every `every`-th ingest request (counted from when the faults were set) with a status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusEvery {
    /// The period; 0 disables it.
    pub every: u64,
    /// The HTTP status to answer.
    pub status: u16,
    /// A raw `Retry-After` value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// `Retry-After` as an HTTP date this many seconds ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_http_date_secs: Option<u64>,
}

/// The faults of the main port. Setting faults replaces the previous ones entirely; `{}` clears them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Statuses for the next ingest requests, one each, in order.
    pub next_statuses: Vec<StatusFault>,
    /// A status for every N-th ingest request (after the queue is consumed for that request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_every: Option<StatusEvery>,
    /// Delay before answering each ingest or heartbeat request, in milliseconds.
    pub slow_ms: u64,
    /// Lower compressed-body limit than the configured one (413 above it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// 413 when a batch holds more records than this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_records_per_batch: Option<usize>,
    /// `POST /v1/enroll` answers 201 with a body that is not the protocol's JSON (JSON cut short);
    /// nothing is issued and the token stays unused.
    pub enroll_garbage: bool,
    /// `POST /v1/heartbeat` answers this status (`{"error":...}`), storing and delivering nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_status: Option<u16>,
    /// `GET /v1/config` answers 200 with invalid JSON (after authentication; counted as a fetch).
    pub config_garbage: bool,
}

/// The live fault state: the configured faults plus the queue and the request counter.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    faults: Faults,
    queue: VecDeque<StatusFault>,
    counter: u64,
}

impl FaultState {
    /// Replaces the faults; resets the queue and the every-Nth counter.
    pub fn set(&mut self, faults: Faults) {
        self.queue = faults.next_statuses.iter().cloned().collect();
        self.counter = 0;
        self.faults = faults;
    }

    /// The current faults, with `next_statuses` showing what is still queued.
    pub fn current(&self) -> Faults {
        let mut f = self.faults.clone();
        f.next_statuses = self.queue.iter().cloned().collect();
        f
    }

    /// Counts one ingest request and returns the injected answer for it, if any.
    pub fn next_ingest(&mut self) -> Option<StatusFault> {
        self.counter += 1;
        if let Some(f) = self.queue.pop_front() {
            return Some(f);
        }
        let every = self.faults.status_every.as_ref()?;
        if self.counter.checked_rem(every.every) == Some(0) {
            return Some(StatusFault {
                status: every.status,
                retry_after: every.retry_after.clone(),
                retry_after_http_date_secs: every.retry_after_http_date_secs,
            });
        }
        None
    }

    /// The delay before answering.
    pub fn slow(&self) -> Duration {
        Duration::from_millis(self.faults.slow_ms)
    }

    /// The fault's body limit, if any.
    pub fn max_body_bytes(&self) -> Option<usize> {
        self.faults.max_body_bytes
    }

    /// The fault's record limit, if any.
    pub fn max_records(&self) -> Option<usize> {
        self.faults.max_records_per_batch
    }

    /// Whether enrolment answers garbage.
    pub fn enroll_garbage(&self) -> bool {
        self.faults.enroll_garbage
    }

    /// The status heartbeats answer, if any.
    pub fn heartbeat_status(&self) -> Option<u16> {
        self.faults.heartbeat_status
    }

    /// Whether the config endpoint answers garbage.
    pub fn config_garbage(&self) -> bool {
        self.faults.config_garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_then_every() {
        let mut s = FaultState::default();
        s.set(Faults {
            next_statuses: vec![StatusFault {
                status: 503,
                retry_after: Some("2".into()),
                retry_after_http_date_secs: None,
            }],
            status_every: Some(StatusEvery {
                every: 3,
                status: 500,
                ..Default::default()
            }),
            ..Default::default()
        });
        let got: Vec<Option<u16>> = (0..6).map(|_| s.next_ingest().map(|f| f.status)).collect();
        assert_eq!(got, vec![Some(503), None, Some(500), None, None, Some(500)]);
    }

    #[test]
    fn http_date_parses() {
        let f = StatusFault {
            status: 429,
            retry_after: None,
            retry_after_http_date_secs: Some(3),
        };
        let v = f.retry_after_value().expect("a value");
        let when = httpdate::parse_http_date(&v).expect("an HTTP date");
        assert!(when > SystemTime::now());
    }

    #[test]
    fn faults_json_shape() {
        let f: Faults = serde_json::from_str(
            r#"{"next_statuses":[{"status":503,"retry_after":"2"},{"status":429,"retry_after_http_date_secs":3},{"status":500}],
                "status_every":{"every":5,"status":500},"slow_ms":0,"max_body_bytes":100,"max_records_per_batch":10,
                "enroll_garbage":true,"heartbeat_status":503,"config_garbage":true}"#,
        )
        .expect("parses");
        assert_eq!(f.next_statuses.len(), 3);
        assert_eq!(f.heartbeat_status, Some(503));
        assert!(f.enroll_garbage && f.config_garbage);
        assert!(serde_json::from_str::<Faults>(r#"{"bogus":1}"#).is_err());
    }
}

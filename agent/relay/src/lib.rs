//! The relay: cuts batches from the spool, compresses them and delivers them to the backend's
//! `/v1/ingest`, following `backend-protocol.md` for every answer.
//!
//! Invariants:
//! - A batch is sent only after the spool made its descriptor durable ([`Spool::cut_batch`]); its body is
//!   read and compressed once (with zstd: mostly the spool's stored frames, not compressed again) and
//!   the same bytes go out on every retry, under the same `Idempotency-Key` (`<sensor id>:<batch seq>`).
//!   After a restart, batches already cut are resent before new ones, with the same records.
//! - Records leave the spool only on 200/202/409 (acknowledged) or into quarantine (400/422, or a single
//!   record still too large after splitting on 413); nothing is dropped.
//! - At most `max_in_flight` batches are in flight; back-off is shared by all of them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sensor_core::config::{BackendConfig, Compression};
use sensor_core::counters::Counters;
use sensor_core::status::{State, StatusBoard};
use sensor_spool::{BatchDesc, BatchLimits, Spool};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// Errors setting up the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS or HTTP client could not be built.
    #[error("backend client: {0}")]
    Client(String),
    /// The bearer token file could not be read.
    #[error("backend.token_file {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What became of one delivery attempt sequence.
#[derive(Debug)]
enum Outcome {
    Acked,
    TooLarge(BatchDesc),
    Quarantined,
    Stopped,
    SpoolFailed(String),
}

/// What the backend's answer to one delivery asks of the relay (`backend-protocol.md`, "Responses").
/// The action follows from the status alone; the body is only quoted, cut to [`ANSWER_TEXT_CHARS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200/202 (stored) or 409 (`already_stored`: this key was stored before): delete the batch.
    Acked {
        /// The answer was 409.
        already_stored: bool,
    },
    /// 413: split the batch.
    TooLarge,
    /// 400/422: quarantine the batch, for `reason`.
    Malformed {
        /// `HTTP <status>: <body>`.
        reason: String,
    },
    /// 401/403: the device credential was refused; retry slowly.
    AuthFailed {
        /// `HTTP <status>: <body>`.
        text: String,
    },
    /// 429/503: overloaded; wait `retry_after` when the backend gave a readable one, else back off.
    Overloaded {
        /// `Retry-After`, clamped to [1 s, 15 min].
        retry_after: Option<Duration>,
    },
    /// Anything else: a transient failure.
    Failed {
        /// `HTTP <status>: <body>`.
        text: String,
    },
}

/// How much of the backend's answer body is read at most, in bytes.
const ANSWER_BODY_CAP: usize = 16 * 1024;

/// How much of an answer's body is kept in logs, the status and quarantine reasons, in characters.
pub const ANSWER_TEXT_CHARS: usize = 300;

/// Reads the backend's answer: its status, its `Retry-After` header (if any) and its body.
pub fn read_answer(status: u16, retry_after: Option<&str>, body: &str) -> Answer {
    let text = || {
        let quoted: String = body.chars().take(ANSWER_TEXT_CHARS).collect();
        format!("HTTP {status}: {quoted}")
    };
    match status {
        200 | 202 | 409 => Answer::Acked {
            already_stored: status == 409,
        },
        413 => Answer::TooLarge,
        400 | 422 => Answer::Malformed { reason: text() },
        401 | 403 => Answer::AuthFailed { text: text() },
        429 | 503 => Answer::Overloaded {
            retry_after: retry_after.and_then(sensor_core::timefmt::retry_after),
        },
        _ => Answer::Failed { text: text() },
    }
}

/// Shared back-off state. Invariant: `not_before` only moves forward until a success resets the streak.
#[derive(Debug)]
struct Backoff {
    not_before: Instant,
    failures: u32,
}

/// The relay. See the crate header.
pub struct Relay {
    http: reqwest::Client,
    ingest_url: String,
    sensor_id: String,
    bearer: Option<String>,
    cfg: BackendConfig,
    spool: Arc<Spool>,
    status: Arc<StatusBoard>,
    counters: Arc<Counters>,
    wake: Arc<Notify>,
    backoff: Mutex<Backoff>,
}

/// Builds the backend HTTPS client, with the mTLS identity when configured. The server is trusted
/// through the anchors enrolment pinned when the enrolled identity is in use
/// (`pinned_anchors_file`, plus the local `ca_file`, plus the system roots only with
/// `trust_public_roots`), else through the system roots plus `ca_file`. An unreadable anchors file is
/// an error naming it, never a fallback to the system roots. The one exception is an identity of an
/// earlier version whose anchor awaits the first connection
/// ([`sensor_core::tls::awaiting_first_pin`]): it is trusted as that version did, the system roots plus
/// `ca_file` or else its `trust.pem`.
pub fn backend_http_client(
    cfg: &BackendConfig,
    proxy: Option<&str>,
) -> Result<reqwest::Client, RelayError> {
    backend_http_client_recording(cfg, proxy).map(|(client, _)| client)
}

/// [`backend_http_client`], and when the identity's anchor awaits the first connection, the recorder
/// its TLS verifies through: after a connection, its
/// [`verifying_anchors`](sensor_core::tls::AnchorRecorder::verifying_anchors) are the anchors to pin.
/// `None` otherwise.
pub fn backend_http_client_recording(
    cfg: &BackendConfig,
    proxy: Option<&str>,
) -> Result<
    (
        reqwest::Client,
        Option<Arc<sensor_core::tls::AnchorRecorder>>,
    ),
    RelayError,
> {
    use sensor_core::tls::{self, ServerTrust};
    let identity = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let client_err = |e: tls::TlsError| RelayError::Client(e.to_string());
    let awaiting = match &cfg.pinned_anchors_file {
        Some(anchors) => tls::awaiting_first_pin(anchors).map_err(client_err)?,
        None => None,
    };
    let (tls, recorder) = match (&cfg.pinned_anchors_file, awaiting) {
        (Some(_), Some(legacy)) => {
            let recorder =
                tls::AnchorRecorder::new(Some(cfg.ca_file.as_deref().unwrap_or(&legacy)))
                    .map_err(client_err)?;
            let tls = recorder
                .client_config_presenting(identity)
                .map_err(client_err)?;
            (tls, Some(recorder))
        }
        (Some(anchors), None) => (
            tls::client_config_with(
                ServerTrust::Pinned {
                    anchors,
                    extra_ca: cfg.ca_file.as_deref(),
                    public_roots: cfg.trust_public_roots,
                },
                identity,
            )
            .map_err(client_err)?,
            None,
        ),
        (None, _) => (
            tls::client_config_with(
                ServerTrust::SystemRootsPlus {
                    extra_ca: cfg.ca_file.as_deref(),
                },
                identity,
            )
            .map_err(client_err)?,
            None,
        ),
    };
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
        .timeout(Duration::from_secs(cfg.request_timeout_secs))
        .user_agent(sensor_core::user_agent());
    if let Some(p) = proxy {
        b = b.proxy(
            reqwest::Proxy::all(p)
                .map_err(|e| RelayError::Client(format!("network.proxy `{p}`: {e}")))?,
        );
    }
    let client = b.build().map_err(|e| RelayError::Client(e.to_string()))?;
    Ok((client, recorder))
}

/// The bearer token of `backend.token_file`, when the backend is not spoken to with mutual TLS.
pub fn backend_bearer(cfg: &BackendConfig) -> Result<Option<String>, RelayError> {
    match (&cfg.client_cert_file, &cfg.token_file) {
        (None, Some(path)) => {
            let t = std::fs::read_to_string(path).map_err(|e| RelayError::Token {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            Ok(Some(t.trim().to_string()))
        }
        _ => Ok(None),
    }
}

/// The relay's zstd level: the spool's, whose stored frames most zstd batches are made of.
pub const ZSTD_LEVEL: i32 = sensor_spool::ZSTD_LEVEL;

/// Compresses `body` with `c` (zstd at [`ZSTD_LEVEL`], gzip at level 6).
pub fn compress(c: Compression, body: &[u8]) -> std::io::Result<Vec<u8>> {
    match c {
        Compression::Zstd => zstd::bulk::compress(body, ZSTD_LEVEL),
        Compression::Gzip => {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::new(6),
            );
            enc.write_all(body)?;
            enc.finish()
        }
    }
}

/// Human-readable bytes, e.g. `2.1 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Relay {
    /// A relay for `cfg`, identified as `sensor_id`.
    pub fn new(
        cfg: BackendConfig,
        sensor_id: String,
        proxy: Option<&str>,
        spool: Arc<Spool>,
        status: Arc<StatusBoard>,
        counters: Arc<Counters>,
        wake: Arc<Notify>,
    ) -> Result<Self, RelayError> {
        let http = backend_http_client(&cfg, proxy)?;
        let bearer = backend_bearer(&cfg)?;
        status.set("backend", State::Starting, None, None);
        Ok(Self {
            http,
            ingest_url: format!("{}/v1/ingest", cfg.url.trim_end_matches('/')),
            sensor_id,
            bearer,
            cfg,
            spool,
            status,
            counters,
            wake,
            backoff: Mutex::new(Backoff {
                not_before: Instant::now(),
                failures: 0,
            }),
        })
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: self.cfg.batch_max_records,
            max_raw_bytes: self.cfg.batch_max_bytes,
            linger: Duration::from_millis(self.cfg.batch_linger_ms),
        }
    }

    /// Runs until shutdown, then waits up to `drain` for batches in flight (unsent ones stay spooled).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>, drain: Duration) {
        let mut queue: VecDeque<BatchDesc> =
            match tokio::task::block_in_place(|| self.spool.pending_batches()) {
                Ok(b) => b.into(),
                Err(e) => {
                    log::error!(target: "relay", "cannot read pending batches: {e}");
                    VecDeque::new()
                }
            };
        if !queue.is_empty() {
            log::info!(target: "relay", "resending {} batch(es) cut before the restart, with their original keys", queue.len());
        }
        let mut inflight: JoinSet<Outcome> = JoinSet::new();
        let max = self.cfg.max_in_flight.max(1) as usize;
        loop {
            if *shutdown.borrow() {
                break;
            }
            while inflight.len() < max {
                let next = match queue.pop_front() {
                    Some(desc) => Some(desc),
                    None => match tokio::task::block_in_place(|| {
                        self.spool.cut_batch(&self.limits(), false)
                    }) {
                        Ok(next) => next,
                        Err(e) => {
                            log::error!(target: "relay", "cutting a batch failed: {e}");
                            None
                        }
                    },
                };
                let Some(desc) = next else { break };
                let me = self.clone();
                let rx = shutdown.clone();
                inflight.spawn(async move { me.deliver(desc, rx).await });
            }
            let tick = Duration::from_millis(self.cfg.batch_linger_ms.clamp(10, 250));
            tokio::select! {
                Some(res) = inflight.join_next(), if !inflight.is_empty() => self.settle(res, &mut queue),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => {}
            }
        }
        let deadline = tokio::time::Instant::now() + drain;
        while !inflight.is_empty() {
            match tokio::time::timeout_at(deadline, inflight.join_next()).await {
                Ok(Some(res)) => self.settle(res, &mut queue),
                Ok(None) => break,
                Err(_) => {
                    log::info!(target: "relay", "{} batch(es) still in flight at shutdown stay spooled and are resent with the same keys", inflight.len());
                    inflight.abort_all();
                    break;
                }
            }
        }
    }

    fn settle(
        &self,
        res: Result<Outcome, tokio::task::JoinError>,
        queue: &mut VecDeque<BatchDesc>,
    ) {
        match res {
            Ok(Outcome::TooLarge(desc)) => match tokio::task::block_in_place(|| {
                self.spool.split_batch(desc.seq)
            }) {
                Ok(Some((a, b))) => {
                    log::info!(target: "relay", "batch {} too large for the backend: split into {} and {}", desc.seq, a.seq, b.seq);
                    queue.push_front(b);
                    queue.push_front(a);
                }
                Ok(None) => {
                    let r = tokio::task::block_in_place(|| {
                        self.spool.quarantine_batch(
                            desc.seq,
                            "HTTP 413: a single record is too large for the backend",
                        )
                    });
                    match r {
                        Ok(()) => {
                            Counters::add(&self.counters.batches_quarantined, 1);
                            self.status.set(
                                "quarantine",
                                State::Quarantined,
                                Some("a record too large for the backend was quarantined".into()),
                                None,
                            );
                        }
                        Err(e) => {
                            log::error!(target: "relay", "quarantining batch {}: {e}", desc.seq)
                        }
                    }
                }
                Err(e) => log::error!(target: "relay", "splitting batch {}: {e}", desc.seq),
            },
            Ok(Outcome::SpoolFailed(e)) => {
                log::error!(target: "relay", "spool error: {e}")
            }
            Ok(Outcome::Acked | Outcome::Quarantined | Outcome::Stopped) => {}
            Err(e) if e.is_cancelled() => {}
            Err(e) => log::error!(target: "relay", "delivery task failed: {e}"),
        }
    }

    async fn wait_turn(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            let nb = match self.backoff.lock() {
                Ok(b) => b.not_before,
                Err(p) => p.into_inner().not_before,
            };
            let now = Instant::now();
            if nb <= now {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(nb - now) => {}
                _ = shutdown.changed() => return false,
            }
            if *shutdown.borrow() {
                return false;
            }
        }
    }

    fn back_off(&self, retry_after: Option<Duration>, minimum: Duration) -> Duration {
        let mut b = match self.backoff.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        b.failures = b.failures.saturating_add(1);
        let wait = match retry_after {
            Some(d) => d,
            None => {
                let cap_ms = 1000u64
                    .saturating_mul(1 << (b.failures - 1).min(10))
                    .min(self.cfg.retry_max_secs.saturating_mul(1000));
                Duration::from_millis(rand::random::<u64>() % (cap_ms + 1))
            }
        }
        .max(minimum);
        let until = Instant::now() + wait;
        if until > b.not_before {
            b.not_before = until;
        }
        wait
    }

    fn succeeded(&self) {
        if let Ok(mut b) = self.backoff.lock() {
            b.failures = 0;
        }
    }

    fn buffered(&self) -> String {
        let f = self.spool.figures();
        format!(
            "{} records, {} buffered",
            f.pending_records,
            human_bytes(f.stored_bytes)
        )
    }

    /// The batch's body as sent: with zstd, the spool's stored frames as they are
    /// ([`Spool::read_batch_zstd`]); with gzip, its NDJSON compressed.
    fn wire_body(&self, desc: &BatchDesc) -> Result<Vec<u8>, String> {
        match self.cfg.compression {
            Compression::Zstd => self.spool.read_batch_zstd(desc).map_err(|e| e.to_string()),
            Compression::Gzip => {
                let body = self.spool.read_batch(desc).map_err(|e| e.to_string())?;
                compress(Compression::Gzip, &body).map_err(|e| format!("compressing: {e}"))
            }
        }
    }

    async fn deliver(&self, desc: BatchDesc, mut shutdown: watch::Receiver<bool>) -> Outcome {
        let encoding = self.cfg.compression;
        let wire = match tokio::task::block_in_place(|| self.wire_body(&desc)) {
            Ok(w) => w,
            Err(e) => return Outcome::SpoolFailed(format!("batch {} unreadable: {e}", desc.seq)),
        };
        let key = format!("{}:{}", self.sensor_id, desc.seq);
        loop {
            if !self.wait_turn(&mut shutdown).await {
                return Outcome::Stopped;
            }
            log::trace!(target: "durability", "sending batch {} key {key}", desc.seq);
            let mut req = self
                .http
                .post(&self.ingest_url)
                .header("Content-Type", "application/x-ndjson")
                .header("Content-Encoding", encoding.as_str())
                .header("Idempotency-Key", &key)
                .header("X-Record-Count", desc.records.to_string())
                .header("X-Sensor-Id", &self.sensor_id)
                .body(wire.clone());
            if let Some(t) = &self.bearer {
                req = req.bearer_auth(t);
            }
            let resp = tokio::select! {
                r = req.send() => r,
                _ = shutdown.changed() => return Outcome::Stopped,
            };
            let (status, answer) = match resp {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let ra = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    // Only the first characters are ever shown: a huge answer is not held in memory.
                    let (body, _) = sensor_core::http::read_capped(r, ANSWER_BODY_CAP)
                        .await
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(&body);
                    (status, read_answer(status, ra.as_deref(), &text))
                }
                Err(e) => {
                    let wait = self.back_off(None, Duration::ZERO);
                    let msg = sensor_core::describe_error(&e);
                    self.status.set(
                        "backend",
                        State::BackendUnreachable,
                        Some(msg.clone()),
                        Some(format!("backend unreachable, {}", self.buffered())),
                    );
                    log::debug!(target: "relay", "batch {} send failed ({msg}); retrying in {wait:?}", desc.seq);
                    continue;
                }
            };
            match answer {
                Answer::Acked { already_stored } => {
                    if let Err(e) = tokio::task::block_in_place(|| self.spool.ack_batch(desc.seq)) {
                        return Outcome::SpoolFailed(e.to_string());
                    }
                    self.succeeded();
                    Counters::add(&self.counters.batches_acked, 1);
                    if already_stored {
                        Counters::add(&self.counters.batches_already_stored, 1);
                    }
                    Counters::add(&self.counters.records_delivered, desc.records);
                    Counters::add(&self.counters.bytes_raw_delivered, desc.raw_bytes);
                    Counters::add(&self.counters.bytes_wire_delivered, wire.len() as u64);
                    self.status.set("backend", State::Ok, None, None);
                    return Outcome::Acked;
                }
                Answer::TooLarge => return Outcome::TooLarge(desc),
                Answer::Malformed { reason } => {
                    log::error!(target: "relay", "backend rejected batch {} as malformed; quarantined: {reason}", desc.seq);
                    if let Err(e) = tokio::task::block_in_place(|| {
                        self.spool.quarantine_batch(desc.seq, &reason)
                    }) {
                        return Outcome::SpoolFailed(e.to_string());
                    }
                    Counters::add(&self.counters.batches_quarantined, 1);
                    self.status
                        .set("quarantine", State::Quarantined, Some(reason), None);
                    return Outcome::Quarantined;
                }
                Answer::AuthFailed { text } => {
                    self.back_off(None, Duration::from_secs(60));
                    self.status.set(
                        "backend",
                        State::BackendAuthFailed,
                        Some(text),
                        Some(self.buffered()),
                    );
                }
                Answer::Overloaded { retry_after } => {
                    let wait = self.back_off(retry_after, Duration::ZERO);
                    log::debug!(target: "relay", "backend overloaded (HTTP {status}); waiting {wait:?}");
                    self.status.set(
                        "backend",
                        State::BackendUnreachable,
                        Some(format!("HTTP {status} (overloaded)")),
                        Some(format!("backend overloaded, {}", self.buffered())),
                    );
                }
                Answer::Failed { text } => {
                    self.back_off(None, Duration::ZERO);
                    self.status.set(
                        "backend",
                        State::BackendUnreachable,
                        Some(text),
                        Some(format!("backend failing, {}", self.buffered())),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_reads_like_a_person_writes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(2_254_857_830), "2.1 GiB");
    }

    #[test]
    fn answers_follow_the_protocol_table() {
        assert_eq!(
            read_answer(202, None, r#"{"accepted":3,"duplicates":0}"#),
            Answer::Acked {
                already_stored: false
            }
        );
        assert_eq!(
            read_answer(409, None, ""),
            Answer::Acked {
                already_stored: true
            }
        );
        assert_eq!(read_answer(413, None, ""), Answer::TooLarge);
        assert_eq!(
            read_answer(422, None, "bad line 3"),
            Answer::Malformed {
                reason: "HTTP 422: bad line 3".into()
            }
        );
        assert_eq!(
            read_answer(503, Some("7"), ""),
            Answer::Overloaded {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            read_answer(429, Some("soon"), ""),
            Answer::Overloaded { retry_after: None }
        );
        let Answer::Failed { text } = read_answer(500, None, &"é".repeat(1000)) else {
            panic!("500 is a transient failure")
        };
        assert_eq!(text.chars().count(), "HTTP 500: ".len() + ANSWER_TEXT_CHARS);
    }

    #[test]
    fn both_encodings_round_trip() {
        let body = b"{\"a\":1}\n".repeat(100);
        let z = compress(Compression::Zstd, &body).expect("zstd");
        assert_eq!(
            zstd::bulk::decompress(&z, body.len()).expect("unzstd"),
            body
        );
        let g = compress(Compression::Gzip, &body).expect("gzip");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&g[..]), &mut out)
            .expect("gunzip");
        assert_eq!(out, body);
    }
}

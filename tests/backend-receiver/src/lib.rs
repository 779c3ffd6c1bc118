//! Reference receiver of the backend protocol (`shared/design/backend-protocol.md`), for tests and the
//! demo: a real HTTPS server on loopback with a throw-away CA, fault injection and ground truth. It plays
//! both sides of the backend: the data side (ingest) and the management side (enrolment, heartbeat
//! answers, remote configuration, commands, diagnostics, certificate renewal).
//!
//! What it promises:
//! - **Transport and auth.** HTTPS only (rustls). A TLS client may connect without a certificate; one
//!   that presents a certificate must present one signed by the receiver's CA ([`ReceiverHandle::ca_pem`];
//!   an expired or foreign one fails the handshake). Every `/v1/*` endpoint except `POST /v1/enroll`
//!   accepts such a client certificate (the one issued at start-up, [`ReceiverHandle::device_cert_pem`],
//!   or one issued at enrolment) or `Authorization: Bearer <token>` equal to
//!   [`ReceiverConfig::bearer_token`] (compared in constant time); otherwise 401 `{"error":...}`.
//!   `POST /v1/renew` accepts only a client certificate.
//! - **Ingest, faithfully.** `Content-Type: application/x-ndjson` (missing 400, other 415),
//!   `Content-Encoding: zstd|gzip` (missing 400, other 415), `Idempotency-Key: <sensor id>:<u64>` and
//!   `X-Record-Count` (missing, malformed or not matching the lines: 400). Compressed bodies above
//!   [`ReceiverConfig::max_body_bytes`] and decompressed bodies above
//!   [`ReceiverConfig::max_decompressed_bytes`] get 413; decompression is streamed and memory stays
//!   bounded whatever the compression ratio. A malformed envelope line gets 422 naming the line number.
//!   A key stored before gets 409 and, when its records differ, a recorded [`KeyConflict`]. Keys are
//!   stored only on success, which answers 200 `{"accepted":n,"duplicates":m}`.
//! - **Management** (JSON bodies; those the sensor sends may be zstd/gzip-encoded, capped like ingest;
//!   every refusal is `{"error":"..."}`):
//!   - `POST /v1/enroll`, no device authentication, body [`EnrollRequest`]
//!     `{"enrollment_token","csr_pem","hostname","arch","version"}` (all non-empty strings; unknown,
//!     missing, mistyped or empty fields: 400 naming each). Tokens are single-use
//!     ([`ReceiverConfig::enrollment_tokens`], [`ReceiverHandle::add_enroll_tokens`]): unknown 401
//!     `{"error":"unknown enrollment token"}`, used 401 `{"error":"enrollment token already used"}`.
//!     A CSR that does not parse or whose signature does not verify: 400 (the token stays unused).
//!     Success: 201 [`EnrollResponse`] `{"sensor_id","certificate_pem","ca_pem","config"}`, the
//!     certificate for the CSR's public key, common name = the new `sensor_id` (a UUID), client-auth
//!     EKU, valid [`ReceiverConfig::device_cert_validity`] from now, `config` the current managed
//!     configuration object.
//!   - `POST /v1/renew` (our extension of protocol v1), mutual TLS only (a bearer token alone: 401),
//!     body [`RenewRequest`] `{"csr_pem"}`: 200 [`RenewResponse`] `{"certificate_pem","ca_pem"}`, a new
//!     certificate for the CSR's key with the presenting certificate's common name and a fresh
//!     validity. The old certificate stays valid until it expires.
//!   - `POST /v1/heartbeat`: stores the status document (any JSON) and answers 200
//!     [`HeartbeatResponse`] `{"config_version":u64,"commands":[{"id","kind","args"}]}`: every queued
//!     command without a posted result, in queue order, redelivered by each heartbeat until a result
//!     arrives (deliveries counted per command).
//!   - `GET /v1/config`: 200 [`ManagedConfig`] `{"version":u64,"config":{...}}`, version 0 and `{}`
//!     until the control API sets one. Fetches are counted.
//!   - `POST /v1/commands/<id>/result`, body [`CommandResult`] `{"ok":bool,"message":string}`: 200 `{}`;
//!     unknown id 404; bad body 400. Every result is recorded, repeats included.
//!   - `POST /v1/diagnostics` with `X-Command-Id: <id>` (missing 400, unknown command 404), body a
//!     JSON document (not JSON: 400): 200 `{}`, stored as sent with the command id.
//! - **Ground truth.** Every stored record `(tenant_id, Id)` with its delivery count and the SHA-256 of
//!   each distinct byte variant of its `record` object (the exact bytes sent, never re-serialized).
//!   Enrolments, renewals and refusals ([`Enrollments`]), commands with their deliveries and results
//!   ([`CommandTruth`]), diagnostics bundles, the last heartbeats with the identity that sent them.
//!   `User-Agent`/`X-Sensor-Id` violations (missing, or an `X-Sensor-Id` other than the sensor id of
//!   the enrolled certificate presented) are counted, never rejected.
//! - **Faults.** A control API on a second HTTPS port (same CA, no auth) stays up while the main port
//!   goes down (connections refused, open connections dropped) and comes back on the same port; queued
//!   or periodic ingest statuses with `Retry-After`, slow answers, a lower body limit, a record limit;
//!   garbage enrolment and config answers, a heartbeat status ([`Faults`]).
//! - It binds only the addresses it is given and never contacts another host.
//!
//! Control endpoints (on [`ReceiverHandle::control_url`]; each has a [`ReceiverHandle`] method):
//! - `GET /_rx/summary` ([`Summary`]), `GET /_rx/truth` ([`Truth`]), `GET|POST /_rx/faults`
//!   ([`Faults`]), `POST /_rx/down` (`{"for_ms":N}` or `{"indefinitely":true}`), `POST /_rx/up`;
//! - `POST /_rx/enroll-tokens` [`AddTokens`] `{"tokens":[...]}` → `{"added":n}` (a used token: 409,
//!   an empty one: 400); `GET /_rx/enrollments` ([`Enrollments`]);
//! - `GET /_rx/config` ([`ManagedConfig`]); `POST /_rx/config` [`SetConfig`] `{"config":...}` (version
//!   bumped) or `{"version":n,"config":...}` → `{"version":n}`;
//! - `POST /_rx/commands` [`QueueCommand`] `{"kind","args"?,"id"?}` → `{"id"}` (an id queued before:
//!   409); `GET /_rx/commands` (`[`[`CommandTruth`]`]`);
//! - `GET /_rx/diagnostics` (`[`[`DiagnosticsBundle`]`]`); `GET /_rx/heartbeats`
//!   (`[`[`HeartbeatRecord`]`]`, the last 1000);
//! - `POST /_rx/server-cert` `{"issuer":"genuine"|"hostile"}`, only with
//!   [`ReceiverConfig::hostile_renewal_ca`] (the `hostile` module: renewals from a second CA, and an
//!   impostor server certificate of that CA).

mod config;
mod enroll;
mod faults;
mod hostile;
mod http;
mod ingest;
mod manage;
mod management;
mod model;
mod server;
mod truth;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::{
    ReceiverConfig, ReceiverError, DEFAULT_DEVICE_CERT_VALIDITY, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_DECOMPRESSED_BYTES,
};
pub use faults::{Faults, StatusEvery, StatusFault};
pub use management::{ManagementError, MAX_DIAGNOSTICS_KEPT, MAX_HEARTBEATS_KEPT};
pub use model::{
    AddTokens, Command, CommandResult, CommandTruth, DiagnosticsBundle, EnrollRequest,
    EnrollResponse, EnrollmentRecord, Enrollments, HeartbeatRecord, HeartbeatResponse,
    ManagedConfig, QueueCommand, RefusedAttempt, RenewRequest, RenewResponse, RenewalRecord,
    ResultRecord, SetConfig,
};
pub use truth::{BatchTruth, KeyConflict, RecordTruth, Summary, Truth};

use server::{MainPort, Shared};

/// A running receiver. Dropping it stops both ports.
pub struct ReceiverHandle {
    /// Base URL of the main port, `https://127.0.0.1:PORT` (no trailing slash).
    pub url: String,
    /// Base URL of the control port, `https://127.0.0.1:PORT` (no trailing slash).
    pub control_url: String,
    /// The CA (PEM) that signed the server certificate (for `127.0.0.1` and `localhost`), the device
    /// certificate and every certificate issued at enrolment or renewal.
    pub ca_pem: String,
    /// The hostile CA (PEM) that issues renewals, with [`ReceiverConfig::hostile_renewal_ca`].
    pub hostile_ca_pem: Option<String>,
    /// A client certificate (PEM) the main port accepts for mTLS.
    pub device_cert_pem: String,
    /// The device certificate's PKCS#8 private key (PEM).
    pub device_key_pem: String,
    shared: Arc<Shared>,
    main: Arc<MainPort>,
    control_task: JoinHandle<()>,
}

impl std::fmt::Debug for ReceiverHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverHandle")
            .field("url", &self.url)
            .field("control_url", &self.control_url)
            .finish_non_exhaustive()
    }
}

/// Generates the CA and certificates, binds both ports and starts serving. Must run inside a Tokio
/// runtime.
pub async fn start(cfg: ReceiverConfig) -> Result<ReceiverHandle, ReceiverError> {
    sensor_testkit::install_crypto_provider();
    let ca = sensor_testkit::TestCa::new("backend-receiver test CA")?;
    let mut names = vec!["127.0.0.1", "localhost"];
    names.extend(cfg.server_names.iter().map(String::as_str));
    let server_cert = ca.issue_server(&names)?;
    let device = ca.issue_client(&cfg.device_cn)?;
    // Client certificates are verified when presented but not required: enrolment and bearer-token
    // clients connect without one, and each handler decides.
    let hostile = if cfg.hostile_renewal_ca {
        Some(hostile::Hostile::new(
            &names,
            &server_cert,
            cfg.device_cert_validity,
        )?)
    } else {
        None
    };
    let main_tls = match &hostile {
        Some(h) => h.main_tls(ca.cert_der())?,
        None => sensor_testkit::server_config(&server_cert, Some(ca.cert_der()))?,
    };
    let control_tls = sensor_testkit::server_config(&server_cert, None)?;
    let ca_pem = ca.cert_pem();

    let control_addr = cfg.control_listen;
    let listen = cfg.listen;
    let issuer = enroll::Issuer::new(ca, cfg.device_cert_validity);
    let hostile_ca_pem = hostile.as_ref().map(|h| h.ca_pem());
    let shared = Arc::new(Shared::new(cfg, issuer, hostile.clone()));
    let router = Router::new()
        .route("/v1/ingest", post(ingest::ingest))
        .route("/v1/heartbeat", post(manage::heartbeat))
        .route("/v1/config", get(manage::config))
        .route("/v1/enroll", post(enroll::enroll))
        .route("/v1/renew", post(enroll::renew))
        .route("/v1/commands/{id}/result", post(manage::command_result))
        .route("/v1/diagnostics", post(manage::diagnostics))
        .route("/v1/files/{name}", get(manage::file))
        .with_state(Arc::clone(&shared));

    let control_listener =
        TcpListener::bind(control_addr)
            .await
            .map_err(|source| ReceiverError::Bind {
                addr: control_addr,
                source,
            })?;
    let control_addr = control_listener
        .local_addr()
        .map_err(|source| ReceiverError::Bind {
            addr: control_addr,
            source,
        })?;
    let main = MainPort::start(listen, main_tls, router, Arc::clone(&shared)).await?;
    let mut control = server::control_router(Arc::clone(&shared), Arc::clone(&main));
    if let Some(h) = hostile {
        control = control.merge(hostile::control_router(h));
    }
    let control_task = sensor_testkit::serve_tls(control_listener, control_tls, control);
    log::info!(
        "backend receiver: main https://{} control https://{}",
        main.addr,
        control_addr
    );
    Ok(ReceiverHandle {
        url: format!("https://{}", main.addr),
        control_url: format!("https://{control_addr}"),
        ca_pem,
        hostile_ca_pem,
        device_cert_pem: device.cert_pem,
        device_key_pem: device.key_pem,
        shared,
        main,
        control_task,
    })
}

impl ReceiverHandle {
    /// The counters (what `GET /_rx/summary` returns).
    pub fn summary(&self) -> Summary {
        self.shared.summary()
    }

    /// The full ground truth (what `GET /_rx/truth` returns). Built on demand; for large truths call it
    /// from a blocking context or accept the cost.
    pub fn truth(&self) -> Truth {
        self.shared.lock_state().truth()
    }

    /// Replaces the faults (resets the status queue and the every-Nth counter). `Faults::default()`
    /// clears them.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock_faults().set(faults);
    }

    /// The current faults, `next_statuses` showing what is still queued.
    pub fn faults(&self) -> Faults {
        self.shared.lock_faults().current()
    }

    /// Takes the main port down (connections refused, open ones dropped) and re-binds the same port
    /// after `d`; zero brings it back at once.
    pub async fn go_down(&self, d: Duration) -> Result<(), ReceiverError> {
        self.main.down(Some(d)).await
    }

    /// Takes the main port down until [`ReceiverHandle::go_up`].
    pub async fn go_down_indefinitely(&self) -> Result<(), ReceiverError> {
        self.main.down(None).await
    }

    /// Brings the main port back on the same port at once (no-op when it is up).
    pub async fn go_up(&self) -> Result<(), ReceiverError> {
        self.main.up().await
    }

    /// Whether the main port is serving.
    pub fn is_up(&self) -> bool {
        self.summary().up
    }

    /// Adds single-use enrolment tokens (what `POST /_rx/enroll-tokens` does); all or none. Returns how
    /// many were new. A token used before is refused (tokens are never made usable again).
    pub fn add_enroll_tokens<I, S>(&self, tokens: I) -> Result<usize, ManagementError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.shared
            .lock_mgmt()
            .add_tokens(tokens.into_iter().map(Into::into).collect())
    }

    /// Enrolments, renewals and refusals (what `GET /_rx/enrollments` returns).
    pub fn enrollments(&self) -> Enrollments {
        self.shared.lock_mgmt().enrollments()
    }

    /// Stores a new managed configuration at the current version plus one, and returns that version.
    pub fn set_managed_config(&self, config: serde_json::Value) -> u64 {
        self.shared.lock_mgmt().set_config(None, config)
    }

    /// Stores a managed configuration at an explicit `version` (any value, even a lower one).
    pub fn set_managed_config_version(&self, version: u64, config: serde_json::Value) {
        self.shared.lock_mgmt().set_config(Some(version), config);
    }

    /// The managed configuration (what `GET /v1/config` serves).
    pub fn managed_config(&self) -> ManagedConfig {
        self.shared.lock_mgmt().config().clone()
    }

    /// Queues a command with a new UUID as its id, and returns the id.
    ///
    /// # Panics
    /// If `kind` is empty.
    pub fn queue_command(&self, kind: &str, args: serde_json::Value) -> String {
        self.queue(None, kind, args)
            .unwrap_or_else(|e| panic!("queueing a {kind:?} command: {e}"))
    }

    /// Queues a command with the given id; an empty kind or id, or an id queued before, is refused.
    pub fn queue_command_with_id(
        &self,
        id: &str,
        kind: &str,
        args: serde_json::Value,
    ) -> Result<(), ManagementError> {
        self.queue(Some(id.to_string()), kind, args).map(drop)
    }

    fn queue(
        &self,
        id: Option<String>,
        kind: &str,
        args: serde_json::Value,
    ) -> Result<String, ManagementError> {
        self.shared
            .lock_mgmt()
            .queue(id, kind.to_string(), args, management::now_rfc3339())
    }

    /// Every queued command with its deliveries and results, in queue order (what `GET /_rx/commands`
    /// returns).
    pub fn commands(&self) -> Vec<CommandTruth> {
        self.shared.lock_mgmt().commands()
    }

    /// One command by id.
    pub fn command(&self, id: &str) -> Option<CommandTruth> {
        self.commands().into_iter().find(|c| c.id == id)
    }

    /// The diagnostics bundles received, oldest first (the last [`MAX_DIAGNOSTICS_KEPT`]).
    pub fn diagnostics(&self) -> Vec<DiagnosticsBundle> {
        self.shared.lock_mgmt().diagnostics()
    }

    /// The heartbeats stored, oldest first (the last [`MAX_HEARTBEATS_KEPT`]).
    pub fn heartbeats(&self) -> Vec<HeartbeatRecord> {
        self.shared.lock_mgmt().heartbeats()
    }

    /// The last heartbeat document stored.
    pub fn last_heartbeat(&self) -> Option<serde_json::Value> {
        self.shared.lock_mgmt().last_heartbeat()
    }
}

impl Drop for ReceiverHandle {
    fn drop(&mut self) {
        self.main.close();
        self.control_task.abort();
    }
}

//! Reference receiver of the backend protocol (`shared/design/backend-protocol.md`), for tests and the
//! demo: a real HTTPS server on loopback with a throw-away CA, fault injection and ground truth.
//!
//! What it promises:
//! - **Transport and auth.** HTTPS only (rustls). `POST /v1/ingest`, `POST /v1/heartbeat` and
//!   `GET /v1/config` accept a client certificate signed by the receiver's CA (the device certificate it
//!   issues at start-up, [`ReceiverHandle::device_cert_pem`]) or `Authorization: Bearer <token>` equal to
//!   [`ReceiverConfig::bearer_token`] (compared in constant time); otherwise 401.
//! - **Ingest, faithfully.** `Content-Type: application/x-ndjson` (missing 400, other 415),
//!   `Content-Encoding: zstd|gzip` (missing 400, other 415), `Idempotency-Key: <sensor id>:<u64>` and
//!   `X-Record-Count` (missing, malformed or not matching the lines: 400). Compressed bodies above
//!   [`ReceiverConfig::max_body_bytes`] and decompressed bodies above
//!   [`ReceiverConfig::max_decompressed_bytes`] get 413; decompression is streamed and memory stays
//!   bounded whatever the compression ratio. A malformed envelope line gets 422 naming the line number.
//!   A key stored before gets 409 and, when its records differ, a recorded [`KeyConflict`]. Keys are
//!   stored only on success, which answers 200 `{"accepted":n,"duplicates":m}`.
//! - **Ground truth.** Every stored record `(tenant_id, Id)` with its delivery count and the SHA-256 of
//!   each distinct byte variant of its `record` object (the exact bytes sent, never re-serialized).
//!   `User-Agent`/`X-Sensor-Id` violations are counted, never rejected.
//! - **Faults.** A control API on a second HTTPS port (same CA, no auth) stays up while the main port
//!   goes down (connections refused, open connections dropped) and comes back on the same port; queued
//!   or periodic statuses with `Retry-After`, slow answers, a lower body limit, a record limit.
//! - It binds only the addresses it is given and never contacts another host.
//!
//! Control endpoints (on [`ReceiverHandle::control_url`]): `GET /_rx/summary` ([`Summary`]),
//! `GET /_rx/truth` ([`Truth`]), `GET|POST /_rx/faults` ([`Faults`]), `POST /_rx/down`
//! (`{"for_ms":N}` or `{"indefinitely":true}`), `POST /_rx/up`.

mod config;
mod faults;
mod ingest;
mod server;
mod truth;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::{
    ReceiverConfig, ReceiverError, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DECOMPRESSED_BYTES,
};
pub use faults::{Faults, StatusEvery, StatusFault};
pub use truth::{BatchTruth, KeyConflict, RecordTruth, Summary, Truth};

use server::{MainPort, Shared};

/// A running receiver. Dropping it stops both ports.
pub struct ReceiverHandle {
    /// Base URL of the main port, `https://127.0.0.1:PORT` (no trailing slash).
    pub url: String,
    /// Base URL of the control port, `https://127.0.0.1:PORT` (no trailing slash).
    pub control_url: String,
    /// The CA (PEM) that signed the server certificate (for `127.0.0.1` and `localhost`) and the device
    /// certificate.
    pub ca_pem: String,
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
    let server_cert = ca.issue_server(&["127.0.0.1", "localhost"])?;
    let device = ca.issue_client(&cfg.device_cn)?;
    let main_tls = sensor_testkit::server_config(&server_cert, Some(ca.cert_der()))?;
    let control_tls = sensor_testkit::server_config(&server_cert, None)?;

    let control_addr = cfg.control_listen;
    let listen = cfg.listen;
    let shared = Arc::new(Shared::new(cfg));
    let router = Router::new()
        .route("/v1/ingest", post(ingest::ingest))
        .route("/v1/heartbeat", post(ingest::heartbeat))
        .route("/v1/config", get(ingest::config))
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
    let control_task = sensor_testkit::serve_tls(
        control_listener,
        control_tls,
        server::control_router(Arc::clone(&shared), Arc::clone(&main)),
    );
    log::info!(
        "backend receiver: main https://{} control https://{}",
        main.addr,
        control_addr
    );
    Ok(ReceiverHandle {
        url: format!("https://{}", main.addr),
        control_url: format!("https://{control_addr}"),
        ca_pem: ca.cert_pem(),
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
}

impl Drop for ReceiverHandle {
    fn drop(&mut self) {
        self.main.close();
        self.control_task.abort();
    }
}

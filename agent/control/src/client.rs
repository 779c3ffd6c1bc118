//! The backend's management endpoints, as the sensor calls them: `/v1/enroll` (no device credential
//! yet), `/v1/renew`, `/v1/heartbeat`, `/v1/config`, `/v1/commands/<id>/result` and `/v1/diagnostics`.
//!
//! Invariant: every answer is checked for its status and parsed into the protocol's shape before it is
//! used; a transport failure, an unexpected status and an unreadable body are distinct errors, each naming
//! the endpoint, and enrolment changes nothing on disk unless the whole exchange succeeded.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::{self, Identity, NewIdentity, ServerAnchors};
use crate::managed::{self, Managed};
use crate::protocol::{
    error_text, CommandResult, ConfigAnswer, EnrollAnswer, EnrollRequest, HeartbeatAnswer,
    RenewAnswer, RenewRequest,
};

/// Why a management request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: connection, TLS or timeout.
    #[error("{endpoint}: {detail}")]
    Transport {
        /// The endpoint, e.g. `POST /v1/heartbeat`.
        endpoint: String,
        /// What failed (the whole error chain).
        detail: String,
    },
    /// An answer with an unexpected status.
    #[error("{endpoint}: HTTP {status}: {text}")]
    Status {
        /// The endpoint.
        endpoint: String,
        /// The status.
        status: u16,
        /// The backend's error text.
        text: String,
    },
    /// An answer whose body is not the protocol's.
    #[error("{endpoint}: the answer is not what the protocol defines: {detail}")]
    Garbage {
        /// The endpoint.
        endpoint: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status, if the backend answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of the management endpoints for one sensor.
#[derive(Clone, Debug)]
pub struct ManagementClient {
    http: reqwest::Client,
    base: String,
    sensor_id: String,
    bearer: Option<zeroize::Zeroizing<String>>,
    recorder: Option<std::sync::Arc<sensor_core::tls::AnchorRecorder>>,
}

/// The largest management answer read (a managed configuration with hundreds of tenants fits).
const ANSWER_CAP: usize = 8 * 1024 * 1024;

/// Sets `value` as the JSON body.
fn json(req: reqwest::RequestBuilder, value: &impl Serialize) -> reqwest::RequestBuilder {
    match serde_json::to_vec(value) {
        Ok(body) => req.header("Content-Type", "application/json").body(body),
        // Our own types always serialize; should one not, the backend's 400 names it.
        Err(e) => req.body(format!("unserializable body: {e}")),
    }
}

async fn exchange<T: DeserializeOwned>(
    req: reqwest::RequestBuilder,
    endpoint: &str,
    expect: &[u16],
) -> Result<T, ClientError> {
    let resp = req.send().await.map_err(|e| ClientError::Transport {
        endpoint: endpoint.to_string(),
        detail: sensor_core::describe_error(&e),
    })?;
    let status = resp.status().as_u16();
    let (body, cut) = sensor_core::http::read_capped(resp, ANSWER_CAP)
        .await
        .map_err(|e| ClientError::Transport {
            endpoint: endpoint.to_string(),
            detail: sensor_core::describe_error(&e),
        })?;
    if cut && expect.contains(&status) {
        return Err(ClientError::Garbage {
            endpoint: endpoint.to_string(),
            detail: format!("the answer exceeds {ANSWER_CAP} bytes"),
        });
    }
    if !expect.contains(&status) {
        return Err(ClientError::Status {
            endpoint: endpoint.to_string(),
            status,
            text: error_text(&body),
        });
    }
    let body: &[u8] = if body.is_empty() { b"null" } else { &body };
    serde_json::from_slice(body).map_err(|e| ClientError::Garbage {
        endpoint: endpoint.to_string(),
        detail: e.to_string(),
    })
}

/// Whether `a` and `b` have the same scheme, host and port (unparsable URLs never match).
fn same_origin(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

impl ManagementClient {
    /// A client for `base_url` (no trailing slash needed) that identifies as `sensor_id`.
    pub fn new(http: reqwest::Client, base_url: &str, sensor_id: &str) -> Self {
        Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            sensor_id: sensor_id.to_string(),
            bearer: None,
            recorder: None,
        }
    }

    /// Marks `http` as verifying through `recorder` (an identity of an earlier version whose backend
    /// anchor awaits the first connection, see `sensor_relay::backend_http_client_recording`), so that
    /// [`ManagementClient::pin_first_connection`] can pin what verified the backend.
    pub fn with_recorder(
        mut self,
        recorder: Option<std::sync::Arc<sensor_core::tls::AnchorRecorder>>,
    ) -> Self {
        self.recorder = recorder;
        self
    }

    /// After a request, pins the anchors that verified this backend's server chain (for the host of
    /// the base URL only) as the identity's server anchors, when the identity awaits its first
    /// connection ([`identity::pin_first_connection`]). Returns whether it pinned them: the client (and
    /// the relay) must then be rebuilt to trust the pinned set alone. `Ok(false)` without a recorder or
    /// before a handshake verified the server.
    pub fn pin_first_connection(&self, state_dir: &Path) -> Result<bool, identity::IdentityError> {
        let Some(recorder) = &self.recorder else {
            return Ok(false);
        };
        let host = url::Url::parse(&self.base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        identity::pin_first_connection(state_dir, &recorder.verifying_anchors(&host))
    }

    /// Authenticates with `Authorization: Bearer` (hosts without enrolment) instead of mutual TLS alone.
    pub fn with_bearer(mut self, token: Option<String>) -> Self {
        self.bearer = token.map(zeroize::Zeroizing::new);
        self
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("X-Sensor-Id", &self.sensor_id);
        match &self.bearer {
            Some(t) => req.bearer_auth(t.as_str()),
            None => req,
        }
    }

    /// A GET of an absolute `url`. The sensor's id and bearer token go only to the backend's own origin
    /// (scheme, host and port of the base URL); any other host gets a plain request.
    pub fn get_absolute(&self, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        if !same_origin(url, &self.base) {
            return req;
        }
        let req = req.header("X-Sensor-Id", &self.sensor_id);
        match &self.bearer {
            Some(t) => req.bearer_auth(t.as_str()),
            None => req,
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, path)
    }

    /// Sends the status document; returns the config version and the commands.
    pub async fn heartbeat(&self, doc: &impl Serialize) -> Result<HeartbeatAnswer, ClientError> {
        exchange(
            json(self.post("/v1/heartbeat"), doc),
            "POST /v1/heartbeat",
            &[200],
        )
        .await
    }

    /// Fetches the managed configuration.
    pub async fn config(&self) -> Result<ConfigAnswer, ClientError> {
        exchange(
            self.request(reqwest::Method::GET, "/v1/config"),
            "GET /v1/config",
            &[200],
        )
        .await
    }

    /// Reports a command's result. A 404 (the backend forgot the command) counts as delivered.
    pub async fn post_result(&self, id: &str, result: &CommandResult) -> Result<(), ClientError> {
        let endpoint = format!("POST /v1/commands/{id}/result");
        match exchange::<serde_json::Value>(
            json(self.post(&format!("/v1/commands/{id}/result")), result),
            &endpoint,
            &[200, 201, 202, 204],
        )
        .await
        {
            Ok(_) | Err(ClientError::Garbage { .. }) => Ok(()),
            Err(e) if e.status() == Some(404) => {
                log::warn!(target: "control", "the backend does not know command {id}; its result is dropped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Uploads a diagnostics bundle (zstd-compressed JSON) for command `id`.
    pub async fn upload_diagnostics(
        &self,
        id: &str,
        bundle: &serde_json::Value,
    ) -> Result<(), ClientError> {
        let endpoint = "POST /v1/diagnostics";
        let json = serde_json::to_vec(bundle).map_err(|e| ClientError::Garbage {
            endpoint: endpoint.into(),
            detail: e.to_string(),
        })?;
        let body = zstd::bulk::compress(&json, 3).map_err(|e| ClientError::Transport {
            endpoint: endpoint.into(),
            detail: format!("compressing the bundle: {e}"),
        })?;
        let req = self
            .post("/v1/diagnostics")
            .header("X-Command-Id", id)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "zstd")
            .body(body);
        match exchange::<serde_json::Value>(req, endpoint, &[200, 201, 202, 204]).await {
            Ok(_) | Err(ClientError::Garbage { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks for a new certificate for the key of `csr_pem` (mutual TLS with the current one).
    pub async fn renew(&self, csr_pem: &str) -> Result<RenewAnswer, ClientError> {
        exchange(
            json(self.post("/v1/renew"), &RenewRequest { csr_pem }),
            "POST /v1/renew",
            &[200, 201],
        )
        .await
    }
}

/// Why enrolment failed. In every case nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The device already has an identity.
    #[error(
        "this device is already enrolled as {sensor_id} ({dir}); pass --force to enrol it again"
    )]
    AlreadyEnrolled {
        /// Its current id.
        sensor_id: String,
        /// The state directory.
        dir: String,
    },
    /// The backend refused the token.
    #[error("the backend refused the enrolment token: {0}")]
    Refused(String),
    /// The exchange failed (transport, status, garbage).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The identity could not be made or installed.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The initial configuration could not be stored.
    #[error("the backend's initial configuration: {0}")]
    Config(String),
    /// The HTTPS client could not be built (a bad CA file).
    #[error("{0}")]
    Setup(String),
}

/// What [`enroll_device`] needs.
pub struct EnrollOptions<'a> {
    /// The backend's base URL (`https://...`).
    pub backend_url: &'a str,
    /// The single-use enrolment token.
    pub token: &'a str,
    /// The state directory the identity goes to.
    pub state_dir: &'a Path,
    /// Extra trust anchors for the backend's server certificate (PEM file), besides the system roots.
    /// Whichever of them verifies the backend in this handshake is pinned for it from then on.
    pub ca_file: Option<&'a Path>,
    /// HTTPS proxy.
    pub proxy: Option<&'a str>,
    /// This device's host name (the CSR's common name until the backend names it).
    pub hostname: &'a str,
    /// Enrol again although an identity exists.
    pub force: bool,
}

/// Enrols the device: generates its key pair, sends a CSR with the token to `/v1/enroll`, verifies the
/// certificate that comes back (our key, chains to the returned CA) and installs the identity with the
/// anchors that verified the backend's server chain in this very handshake as its pinned server trust
/// (the `ca_file`, or the public root, that vouched for the backend's name; never the returned CA as
/// such), then stores the initial managed configuration, if the backend sent one.
pub async fn enroll_device(o: &EnrollOptions<'_>) -> Result<Identity, EnrollError> {
    if !o.backend_url.starts_with("https://") {
        return Err(EnrollError::Setup(format!(
            "--backend `{}` is not an https:// URL; the backend is only spoken to over TLS",
            o.backend_url
        )));
    }
    if !o.force {
        if let Some(i) = Identity::load(o.state_dir)? {
            return Err(EnrollError::AlreadyEnrolled {
                sensor_id: i.sensor_id,
                dir: o.state_dir.display().to_string(),
            });
        }
    }
    let recorder = sensor_core::tls::AnchorRecorder::new(o.ca_file)
        .map_err(|e| EnrollError::Setup(e.to_string()))?;
    let tls = recorder.client_config();
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .user_agent(sensor_core::user_agent());
    if let Some(p) = o.proxy {
        b = b.proxy(
            reqwest::Proxy::all(p).map_err(|e| EnrollError::Setup(format!("proxy `{p}`: {e}")))?,
        );
    }
    let http = b.build().map_err(|e| EnrollError::Setup(e.to_string()))?;
    let k = identity::new_key_and_csr(o.hostname)?;
    let body = EnrollRequest {
        enrollment_token: o.token,
        csr_pem: &k.csr_pem,
        hostname: o.hostname,
        arch: std::env::consts::ARCH,
        version: sensor_core::VERSION,
    };
    let url = format!("{}/v1/enroll", o.backend_url.trim_end_matches('/'));
    let answer: EnrollAnswer =
        match exchange(json(http.post(url), &body), "POST /v1/enroll", &[201, 200]).await {
            Ok(a) => a,
            Err(ClientError::Status {
                status: 401 | 403,
                text,
                ..
            }) => return Err(EnrollError::Refused(text)),
            Err(e) => return Err(e.into()),
        };
    let host = url::Url::parse(o.backend_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let anchors = recorder.verifying_anchors(&host);
    if anchors.is_empty() {
        return Err(EnrollError::Setup(format!(
            "the backend answered, but no trust anchor of the system roots{} verified the server certificate of `{host}`; nothing to pin",
            o.ca_file.map(|p| format!(" or {}", p.display())).unwrap_or_default()
        )));
    }
    let server_trust = sensor_core::tls::certs_to_pem(&anchors);
    log::info!(target: "control", "pinned {} anchor(s) for the backend's server certificate", anchors.len());
    // Check the initial configuration's shape before anything is installed.
    let initial = match &answer.config {
        Some(c) if c.as_object().is_some_and(|m| !m.is_empty()) => Some(c.clone()),
        _ => None,
    };
    identity::verify(&answer.certificate_pem, &k.key_pem, &answer.ca_pem)?;
    let installed = identity::install(
        o.state_dir,
        &NewIdentity {
            sensor_id: &answer.sensor_id,
            cert_pem: &answer.certificate_pem,
            key_pem: &k.key_pem,
            ca_pem: &answer.ca_pem,
            server_anchors: ServerAnchors::Enrolled(&server_trust),
        },
    )?;
    if let Some(config) = initial {
        let stored = managed::materialize(o.state_dir, 0, &config).map_err(|problems| {
            EnrollError::Config(
                problems
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        });
        match stored {
            Ok(config) => Managed {
                version: 0,
                config,
                credentials: Default::default(),
            }
            .save(o.state_dir)
            .map_err(|e| EnrollError::Config(e.to_string()))?,
            // The identity is good; a bad initial configuration is reported, the backend resends it.
            Err(e) => {
                log::warn!(target: "control", "{e}; the device is enrolled, the configuration will come with the next config version")
            }
        }
    }
    Ok(installed)
}

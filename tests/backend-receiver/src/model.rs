//! The management side's JSON documents: what the sensor sends and receives on the main port, and what
//! the control API and [`crate::ReceiverHandle`] return. Times are RFC 3339 strings in UTC; certificate
//! serial numbers are the lower-case hex of their big-endian bytes.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/enroll` (no device authentication). Every field is required and non-empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// A single-use enrolment token.
    pub enrollment_token: String,
    /// A PKCS#10 certificate signing request, PEM, signed with the device's new private key.
    pub csr_pem: String,
    /// The host's name.
    pub hostname: String,
    /// The host's architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// The sensor's version.
    pub version: String,
}

/// Answer `201` of `POST /v1/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The sensor id the backend assigned (a UUID); the certificate's common name.
    pub sensor_id: String,
    /// The device certificate (PEM) for the CSR's public key: client-auth, signed by `ca_pem`.
    pub certificate_pem: String,
    /// The receiver's CA (PEM): it signed the device certificate and the server certificate.
    pub ca_pem: String,
    /// The current managed configuration object (`{}` until one is set).
    pub config: serde_json::Value,
}

/// Body of `POST /v1/renew` (mutual TLS only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PKCS#10 certificate signing request, PEM (a new key or the same one).
    pub csr_pem: String,
}

/// Answer `200` of `POST /v1/renew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    /// The new certificate (PEM), same common name as the presenting certificate.
    pub certificate_pem: String,
    /// The receiver's CA (PEM).
    pub ca_pem: String,
}

/// A command as a heartbeat answer delivers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// The command's id (unique; the sensor remembers it to run the command at most once).
    pub id: String,
    /// Its kind (`rotate_credentials`, `resync`, `set_log_level`, `collect_diagnostics`,
    /// `install_update`, `reboot`; the receiver does not check it).
    pub kind: String,
    /// Its arguments, as queued.
    pub args: serde_json::Value,
}

/// Answer `200` of `POST /v1/heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatResponse {
    /// The version of the current managed configuration (0: none set).
    pub config_version: u64,
    /// Every queued command without a posted result, in queue order.
    pub commands: Vec<Command>,
}

/// Answer `200` of `GET /v1/config`, and of `GET /_rx/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedConfig {
    /// The version (0 until the control API sets a configuration).
    pub version: u64,
    /// The managed configuration, sent as set (`{}` until one is set).
    pub config: serde_json::Value,
}

impl Default for ManagedConfig {
    fn default() -> Self {
        Self {
            version: 0,
            config: serde_json::Value::Object(serde_json::Map::new()),
        }
    }
}

/// Body of `POST /v1/commands/<id>/result`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What happened (may be empty).
    pub message: String,
}

/// Body of `POST /_rx/enroll-tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddTokens {
    /// Tokens to accept (each once).
    pub tokens: Vec<String>,
}

/// Body of `POST /_rx/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    /// An explicit version (any value, even a lower one); absent: the current version plus one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The managed configuration, any JSON value, served as is (an invalid one tests the sensor's
    /// validation).
    pub config: serde_json::Value,
}

/// Body of `POST /_rx/commands`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueCommand {
    /// The command's id; absent: a new UUID. An id already queued is refused (409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The command's kind.
    pub kind: String,
    /// Its arguments; absent: `{}`.
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// A result posted to `POST /v1/commands/<id>/result`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// As posted.
    pub ok: bool,
    /// As posted.
    pub message: String,
    /// When it arrived.
    pub at: String,
    /// The request's `X-Sensor-Id`.
    pub sensor_id: Option<String>,
}

/// A queued command and what became of it, as `GET /_rx/commands` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandTruth {
    /// Its id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// When it was queued.
    pub queued_at: String,
    /// How many heartbeat answers carried it (it is redelivered until a result arrives).
    pub deliveries: u64,
    /// Every result posted for it, in arrival order (more than one: the sensor reported it twice).
    pub results: Vec<ResultRecord>,
}

/// A certificate issued at enrolment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    /// The sensor id assigned (the certificate's common name).
    pub sensor_id: String,
    /// The token used.
    pub token: String,
    /// As sent.
    pub hostname: String,
    /// As sent.
    pub arch: String,
    /// As sent.
    pub version: String,
    /// The certificate's serial number.
    pub serial: String,
    /// Start of its validity.
    pub not_before: String,
    /// End of its validity.
    pub not_after: String,
    /// When it was issued.
    pub at: String,
}

/// A certificate issued by `POST /v1/renew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalRecord {
    /// The common name of the presenting certificate and of the new one.
    pub sensor_id: String,
    /// Serial number of the presenting certificate.
    pub previous_serial: String,
    /// Serial number of the new certificate.
    pub serial: String,
    /// Start of its validity.
    pub not_before: String,
    /// End of its validity.
    pub not_after: String,
    /// When it was issued.
    pub at: String,
}

/// An enrolment or renewal the receiver refused (or answered with an injected fault).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedAttempt {
    /// `enroll` or `renew`.
    pub endpoint: String,
    /// The status answered.
    pub status: u16,
    /// Why, as in the answer's `error` (`unknown enrollment token`, `enrollment token already used`,
    /// ...).
    pub reason: String,
    /// The enrolment token, when the body carried one.
    pub token: Option<String>,
    /// When.
    pub at: String,
}

/// Enrolment ground truth, as `GET /_rx/enrollments` returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollments {
    /// Certificates issued at enrolment, in order.
    pub issued: Vec<EnrollmentRecord>,
    /// Certificates issued by renewal, in order.
    pub renewed: Vec<RenewalRecord>,
    /// Refused attempts, in order.
    pub refused: Vec<RefusedAttempt>,
    /// Tokens not used yet, sorted.
    pub unused_tokens: Vec<String>,
}

/// A stored heartbeat, as `GET /_rx/heartbeats` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    /// When it arrived.
    pub at: String,
    /// The request's `X-Sensor-Id`.
    pub sensor_id: Option<String>,
    /// The common name of the client certificate, when the sensor authenticated with one.
    pub client_cn: Option<String>,
    /// The serial number of that certificate (shows which certificate, e.g. after a renewal).
    pub client_serial: Option<String>,
    /// The status document, as sent.
    pub document: serde_json::Value,
}

/// A diagnostics bundle received on `POST /v1/diagnostics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticsBundle {
    /// Its `X-Command-Id`.
    pub command_id: String,
    /// When it arrived.
    pub at: String,
    /// The request's `X-Sensor-Id`.
    pub sensor_id: Option<String>,
    /// Its `Content-Encoding` (`zstd`, `gzip`, `identity`).
    pub encoding: String,
    /// Size of the body as received.
    pub body_bytes: u64,
    /// The JSON document, decompressed, as sent.
    pub document: serde_json::Value,
}

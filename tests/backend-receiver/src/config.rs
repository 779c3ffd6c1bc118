//! Configuration and errors of the receiver.

use std::net::SocketAddr;
use std::time::Duration;

/// Default cap on the compressed body of one request: 32 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default cap on the decompressed body of one request: 64 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 64 * 1024 * 1024;
/// Default validity of the device certificates issued at enrolment and renewal: 365 days.
pub const DEFAULT_DEVICE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How to run a receiver. Both listeners bind loopback addresses in tests; port 0 picks a free port.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Address of the main HTTPS port (`/v1/ingest`, `/v1/heartbeat`, `/v1/config`).
    pub listen: SocketAddr,
    /// Address of the control HTTPS port (`/_rx/...`); it stays up while the main port is down.
    pub control_listen: SocketAddr,
    /// Bearer token accepted instead of a client certificate; `None` means only mTLS authenticates.
    pub bearer_token: Option<String>,
    /// Cap on the compressed body of one request (413 above it). A fault may lower it at run time.
    pub max_body_bytes: usize,
    /// Cap on the decompressed body of one request (413 above it: compression bombs).
    pub max_decompressed_bytes: usize,
    /// Common name of the device certificate issued at start-up.
    pub device_cn: String,
    /// Single-use enrolment tokens accepted by `POST /v1/enroll` (more can be added at run time).
    pub enrollment_tokens: Vec<String>,
    /// Validity of the certificates issued by `POST /v1/enroll` and `POST /v1/renew` (whole seconds;
    /// short in tests that exercise renewal).
    pub device_cert_validity: Duration,
    /// Names (DNS or IP) the server certificate carries besides `127.0.0.1` and `localhost` (a VM that
    /// reaches the receiver through a forwarded address).
    pub server_names: Vec<String>,
    /// Acts as a compromised backend towards the sensor's trust in it: renewals are issued by a second,
    /// hostile CA and answer it as `ca_pem`, and the main port can present a server certificate of that
    /// CA (see the `hostile` module: `POST /_rx/server-cert`).
    pub hostile_renewal_ca: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bearer_token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            device_cn: "m365-sensor-device".to_string(),
            enrollment_tokens: Vec::new(),
            device_cert_validity: DEFAULT_DEVICE_CERT_VALIDITY,
            server_names: Vec::new(),
            hostile_renewal_ca: false,
        }
    }
}

/// Errors of starting or re-binding the receiver.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// Generating the CA or the certificates, or building a TLS configuration, failed.
    #[error("TLS set-up: {0}")]
    Tls(#[from] sensor_testkit::TestkitError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The receiver was shut down.
    #[error("the receiver was shut down")]
    Shutdown,
}

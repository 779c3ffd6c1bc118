//! The sensor's configuration file (`sensor.toml`), strictly parsed: unknown keys are errors, every
//! duration and size names its unit, and [`Config::load`] reports every validation error at once, each
//! naming the file, the key and the fix.
//!
//! Invariant: a `Config` returned by [`Config::load`] or [`Config::from_toml`] has passed [`Config::validate`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cloud::Cloud;
use crate::CONTENT_TYPES;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the sled database, the status file and the lock.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The analysis backend.
    pub backend: BackendConfig,
    /// The local spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The Microsoft 365 tenants to collect, at most [`MAX_TENANTS`].
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    /// Network settings shared by every request.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Remote management (heartbeat).
    #[serde(default)]
    pub management: ManagementConfig,
}

/// `[management]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManagementConfig {
    /// Time between heartbeats (the status document is also sent at every status change), 1 to 3600.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Local only (the backend can never set it): the endpoints every tenant of the managed
    /// configuration uses instead of its cloud's (a private endpoint, a test simulator). Without it a
    /// managed tenant's endpoints derive from its `cloud` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_tenant_endpoints: Option<TenantEndpoints>,
}

/// `[management.managed_tenant_endpoints]`: endpoint overrides the local file gives the tenants the
/// backend sets. Invariant: only ever read from the local file; a managed configuration that names any of
/// these keys is refused.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantEndpoints {
    /// Login host instead of the cloud's authority (`https://`).
    pub login_url: Option<String>,
    /// API host instead of the cloud's (`https://`).
    pub api_url: Option<String>,
    /// Extra trust anchors (PEM) for those endpoints.
    pub ca_file: Option<PathBuf>,
}

fn default_heartbeat_secs() -> u64 {
    60
}

impl Default for ManagementConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: default_heartbeat_secs(),
            managed_tenant_endpoints: None,
        }
    }
}

/// Most tenants one sensor collects (the 200-tenant benchmark is the largest measured deployment).
pub const MAX_TENANTS: usize = 1000;

/// Where enrolment installs the device identity inside the state directory (see `sensor_control::identity`).
pub const IDENTITY_LINK: &str = "identity";
/// The file of an identity generation holding the anchors pinned for the backend's server certificate.
pub const IDENTITY_SERVER_TRUST: &str = "server-trust.pem";

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/m365-sensor")
}

/// Compression of ingest batches.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (default).
    #[default]
    Zstd,
    /// gzip.
    Gzip,
}

impl Compression {
    /// The `Content-Encoding` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

/// `[backend]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL (`https://...`); requests go to `{url}/v1/...`.
    pub url: String,
    /// File holding the bearer token (used when no client certificate is configured).
    pub token_file: Option<PathBuf>,
    /// Device certificate (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// Device private key (PEM) for mutual TLS.
    pub client_key_file: Option<PathBuf>,
    /// Extra trust anchors (PEM) besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Local-only (a managed configuration cannot set it): after enrolment, also trust the system's
    /// public roots for the backend's server certificate, besides the anchors enrolment pinned
    /// (`identity/server-trust.pem`) and `ca_file`. Default `false`: an enrolled sensor trusts its
    /// backend only through the pinned anchors, so no public CA can vouch for an impostor. Set it for a
    /// backend behind a public CA whose chain may move to another public root, or whose update bundles
    /// are served from another host with a public certificate. No effect before enrolment or with a
    /// configured `token_file`/`client_cert_file` (the system roots are trusted then, as always).
    #[serde(default)]
    pub trust_public_roots: bool,
    /// Not a configuration key: set by [`Config::use_enrolled_identity`] to the anchors enrolment
    /// pinned. `Some` means the backend is trusted through them ([`crate::tls::ServerTrust::Pinned`]).
    #[serde(skip)]
    pub pinned_anchors_file: Option<PathBuf>,
    /// `zstd` or `gzip`.
    #[serde(default)]
    pub compression: Compression,
    /// Largest uncompressed batch, 1024 to 64 MiB (the bound keeps a batch's buffers small).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: u64,
    /// Most records per batch, 1 to 100 000.
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: u64,
    /// How long a partial batch waits for more records, at most 60 000 ms.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Batches in flight at once, 1 to 64.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Connect timeout of each request, 1 to 600 s.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// Total timeout of each request, 1 to 600 s.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Longest back-off between delivery attempts (the protocol's 5 min; lower only for tests), 1 to 900 s.
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
}

fn default_retry_max_secs() -> u64 {
    300
}

fn default_batch_max_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_batch_max_records() -> u64 {
    10_000
}
fn default_batch_linger_ms() -> u64 {
    1000
}
fn default_max_in_flight() -> u32 {
    2
}
fn default_connect_timeout_secs() -> u64 {
    10
}
fn default_request_timeout_secs() -> u64 {
    60
}

/// `[spool]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Disk cap; when reached, collection pauses (never drops). 1 MiB to 4 TiB.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    /// sled's page cache; bounds the spool's memory.
    #[serde(default = "default_spool_cache_bytes")]
    pub cache_bytes: u64,
    /// How long a record `Id` is remembered for dedup.
    #[serde(default = "default_dedup_days")]
    pub dedup_days: u32,
}

fn default_spool_max_bytes() -> u64 {
    4 * 1024 * 1024 * 1024
}
fn default_spool_cache_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_dedup_days() -> u32 {
    9
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_spool_max_bytes(),
            cache_bytes: default_spool_cache_bytes(),
            dedup_days: default_dedup_days(),
        }
    }
}

/// `[network]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// HTTPS proxy for every request (Microsoft and backend). `HTTPS_PROXY`/`NO_PROXY` apply otherwise.
    pub proxy: Option<String>,
}

/// The JWT signature of a certificate credential's client assertion.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum AssertionAlg {
    /// RS256 with the SHA-1 thumbprint in `x5t` (Entra's long-standing form).
    #[default]
    RS256,
    /// PS256 with the SHA-256 thumbprint in `x5t#S256` (Entra's current documentation).
    PS256,
}

/// One `[[tenant]]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Free label, unique: 1 to 64 letters, digits, '-', '_' or '.'.
    pub name: String,
    /// Directory (tenant) id, a GUID.
    pub tenant_id: String,
    /// Application (client) id, a GUID.
    pub client_id: String,
    /// File holding the client secret's value (mode 0600).
    pub client_secret_file: Option<PathBuf>,
    /// Certificate (PEM) uploaded to the app registration.
    pub certificate_file: Option<PathBuf>,
    /// The certificate's RSA private key (PEM, PKCS#8 or PKCS#1; mode 0600).
    pub private_key_file: Option<PathBuf>,
    /// Signature of the client assertion.
    #[serde(default)]
    pub assertion_alg: AssertionAlg,
    /// The cloud the tenant and app live in.
    #[serde(default = "default_cloud")]
    pub cloud: Cloud,
    /// Content types to collect.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// How far back the first start reaches, at most 168 (Microsoft's 7-day retention).
    #[serde(default = "default_backfill_hours")]
    pub backfill_hours: u32,
    /// Time between polls of each content type, 1 to 3600 s.
    #[serde(default = "default_poll_interval_secs")]
    pub poll_interval_secs: u64,
    /// How far back every poll re-lists, to find content listed late, 1 to 167 hours.
    #[serde(default = "default_lookback_hours")]
    pub lookback_hours: u32,
    /// How often the whole retention window is re-listed for replays, 1 to 168 hours.
    #[serde(default = "default_deep_sweep_hours")]
    pub deep_sweep_hours: u32,
    /// Requests per minute to this tenant, shared by its content types, 1 to 60 000 (Microsoft's
    /// largest documented per-tenant allowance).
    #[serde(default = "default_max_requests_per_minute")]
    pub max_requests_per_minute: u32,
    /// Largest content blob accepted; a larger one is quarantined. 1024 to 256 MiB.
    #[serde(default = "default_max_blob_bytes")]
    pub max_blob_bytes: u64,
    /// Total timeout of each Microsoft request, 1 to 600 s.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// `PublisherIdentifier` sent on every request; defaults to the tenant id.
    pub publisher_identifier: Option<String>,
    /// The client secret's expiry date (`YYYY-MM-DD`), for the `secret_expiring` warning.
    pub client_secret_expires: Option<String>,
    /// Override of the login host (tests, private endpoints); the scope still follows `cloud`.
    pub login_url: Option<String>,
    /// Override of the API host (tests, private endpoints).
    pub api_url: Option<String>,
    /// Extra trust anchors (PEM) for this tenant's endpoints.
    pub ca_file: Option<PathBuf>,
}

fn default_cloud() -> Cloud {
    Cloud::Commercial
}
fn default_content_types() -> Vec<String> {
    CONTENT_TYPES.iter().map(|s| s.to_string()).collect()
}
fn default_backfill_hours() -> u32 {
    168
}
fn default_poll_interval_secs() -> u64 {
    60
}
fn default_lookback_hours() -> u32 {
    24
}
fn default_deep_sweep_hours() -> u32 {
    6
}
fn default_max_requests_per_minute() -> u32 {
    2000
}
fn default_max_blob_bytes() -> u64 {
    64 * 1024 * 1024
}

impl TenantConfig {
    /// The login base URL: the override or the cloud's authority.
    pub fn login_base(&self) -> String {
        self.login_url
            .clone()
            .unwrap_or_else(|| self.cloud.authority().to_string())
            .trim_end_matches('/')
            .to_string()
    }

    /// The API base URL: the override or `https://<cloud's API host>`.
    pub fn api_base(&self) -> String {
        self.api_url
            .clone()
            .unwrap_or_else(|| self.cloud.api_url())
            .trim_end_matches('/')
            .to_string()
    }

    /// The `PublisherIdentifier`: the configured one or the tenant id.
    pub fn publisher(&self) -> &str {
        self.publisher_identifier
            .as_deref()
            .unwrap_or(&self.tenant_id)
    }
}

/// One problem in a configuration: where, what, and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigProblem {
    /// The dotted key, e.g. `tenant[0].tenant_id`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the configuration: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message, with line and key.
        message: String,
    },
    /// The file parsed but some values are invalid.
    #[error("{file}: {} problem(s):\n{}", problems.len(), ProblemList(problems))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

struct ProblemList<'a>(&'a [ConfigProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {}: {}", p.field, p.reason)?;
        }
        Ok(())
    }
}

impl Config {
    /// Fills the backend's mutual-TLS files from the enrolled identity (`<state_dir>/identity/`) when the
    /// file names no device credential: the certificate and key, and the server anchors enrolment pinned
    /// ([`BackendConfig::pinned_anchors_file`]). A no-op when a credential is configured or the device is
    /// not enrolled.
    pub fn use_enrolled_identity(&mut self) {
        let b = &mut self.backend;
        let link = self.state_dir.join(IDENTITY_LINK);
        if b.token_file.is_none()
            && b.client_cert_file.is_none()
            && b.client_key_file.is_none()
            && link.join("device.pem").exists()
        {
            b.client_cert_file = Some(link.join("device.pem"));
            b.client_key_file = Some(link.join("device.key"));
            b.pinned_anchors_file = Some(link.join(IDENTITY_SERVER_TRUST));
        }
    }

    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn from_toml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let syntax = |e: toml::de::Error| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        let config: Config = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                // serde stops at the first unknown key; report them all at once.
                let unknown = toml::from_str::<toml::Value>(text)
                    .map(|v| unknown_keys(&v))
                    .unwrap_or_default();
                if unknown.is_empty() {
                    return Err(syntax(e));
                }
                return Err(ConfigError::Invalid {
                    file: file.to_path_buf(),
                    problems: unknown,
                });
            }
        };
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                problems,
            })
        }
    }

    /// Every problem of this configuration, empty when it is valid. Checks values and the files named
    /// (existence, and that secret files are not readable by group or others).
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut p = Problems::default();
        let b = &self.backend;
        if !b.url.starts_with("https://") {
            p.add(
                "backend.url",
                format!(
                    "`{}` is not an https:// URL; the backend is only spoken to over TLS",
                    b.url
                ),
            );
        }
        match (&b.client_cert_file, &b.client_key_file, &b.token_file) {
            (Some(c), Some(k), _) => {
                p.readable("backend.client_cert_file", c);
                p.secret("backend.client_key_file", k);
            }
            (Some(_), None, _) | (None, Some(_), _) => p.add(
                "backend.client_cert_file",
                "client_cert_file and client_key_file go together: set both for mutual TLS".into(),
            ),
            (None, None, Some(t)) => p.secret("backend.token_file", t),
            (None, None, None) => {
                if !self
                    .state_dir
                    .join(IDENTITY_LINK)
                    .join("device.pem")
                    .exists()
                {
                    p.add(
                        "backend",
                        "no device credential: enrol the device (`m365-sensor enroll --backend URL --token TOKEN`), or set token_file, or client_cert_file and client_key_file".into(),
                    )
                }
            }
        }
        if let Some(ca) = &b.ca_file {
            p.readable("backend.ca_file", ca);
        }
        p.range(
            "backend.batch_max_bytes",
            b.batch_max_bytes,
            1024,
            64 * MIB,
            "bytes",
        );
        p.range(
            "backend.batch_max_records",
            b.batch_max_records,
            1,
            100_000,
            "records",
        );
        p.range(
            "backend.batch_linger_ms",
            b.batch_linger_ms,
            0,
            60_000,
            "ms",
        );
        p.range(
            "backend.max_in_flight",
            u64::from(b.max_in_flight),
            1,
            64,
            "batches",
        );
        p.range(
            "backend.connect_timeout_secs",
            b.connect_timeout_secs,
            1,
            600,
            "s",
        );
        p.range(
            "backend.request_timeout_secs",
            b.request_timeout_secs,
            1,
            600,
            "s",
        );
        p.range("backend.retry_max_secs", b.retry_max_secs, 1, 900, "s");
        p.range(
            "management.heartbeat_secs",
            self.management.heartbeat_secs,
            1,
            3600,
            "s",
        );
        if self.tenants.len() > MAX_TENANTS {
            p.add(
                "tenant",
                format!(
                    "{} tenants is above the bound of {MAX_TENANTS} one sensor collects",
                    self.tenants.len()
                ),
            );
        }
        if let Some(e) = &self.management.managed_tenant_endpoints {
            let k = |f: &str| format!("management.managed_tenant_endpoints.{f}");
            for (f, v) in [("login_url", &e.login_url), ("api_url", &e.api_url)] {
                if let Some(u) = v {
                    if !u.starts_with("https://") {
                        p.add(&k(f), format!("`{u}` is not an https:// URL"));
                    }
                }
            }
            if let Some(ca) = &e.ca_file {
                p.readable(&k("ca_file"), ca);
            }
        }
        p.range(
            "spool.max_bytes",
            self.spool.max_bytes,
            MIB,
            4 * 1024 * 1024 * MIB,
            "bytes",
        );
        if self.spool.dedup_days < 8 || self.spool.dedup_days > 30 {
            p.add(
                "spool.dedup_days",
                "must be between 8 and 30 (Microsoft replays records 5-8 days old)".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let k = |f: &str| format!("tenant[{i}].{f}");
            if t.name.is_empty()
                || t.name.len() > 64
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.add(
                    &k("name"),
                    format!(
                        "`{}` must be 1 to 64 letters, digits, '-', '_' or '.'",
                        t.name
                    ),
                );
            }
            if !names.insert(t.name.clone()) {
                p.add(
                    &k("name"),
                    format!(
                        "`{}` is used by another tenant; names must be unique",
                        t.name
                    ),
                );
            }
            if !is_guid(&t.tenant_id) {
                p.add(&k("tenant_id"), format!("`{}` is not a GUID: copy the Directory (tenant) ID from the app's Overview page", t.tenant_id));
            }
            if !is_guid(&t.client_id) {
                p.add(&k("client_id"), format!("`{}` is not a GUID: copy the Application (client) ID from the app's Overview page", t.client_id));
            }
            match (&t.client_secret_file, &t.certificate_file, &t.private_key_file) {
                (Some(s), None, None) => p.secret(&k("client_secret_file"), s),
                (None, Some(c), Some(key)) => {
                    p.readable(&k("certificate_file"), c);
                    p.secret(&k("private_key_file"), key);
                }
                (None, Some(_), None) | (None, None, Some(_)) => p.add(
                    &k("certificate_file"),
                    "certificate_file and private_key_file go together".into(),
                ),
                (None, None, None) => p.add(
                    &k("client_secret_file"),
                    "no credential: set client_secret_file, or certificate_file and private_key_file".into(),
                ),
                _ => p.add(
                    &k("client_secret_file"),
                    "conflicting credentials: use either client_secret_file or certificate_file + private_key_file, not both".into(),
                ),
            }
            if t.content_types.is_empty() {
                p.add(
                    &k("content_types"),
                    "must name at least one content type".into(),
                );
            }
            let mut seen = std::collections::HashSet::new();
            for ct in &t.content_types {
                if !CONTENT_TYPES.contains(&ct.as_str()) {
                    p.add(
                        &k("content_types"),
                        format!(
                            "unknown content type `{ct}`; expected one of {}",
                            CONTENT_TYPES.join(", ")
                        ),
                    );
                }
                if !seen.insert(ct) {
                    p.add(&k("content_types"), format!("`{ct}` is listed twice"));
                }
            }
            if t.backfill_hours > 168 {
                p.add(
                    &k("backfill_hours"),
                    format!(
                        "{} exceeds Microsoft's 7-day retention: at most 168",
                        t.backfill_hours
                    ),
                );
            }
            p.range(
                &k("lookback_hours"),
                t.lookback_hours.into(),
                1,
                167,
                "hours",
            );
            p.range(
                &k("deep_sweep_hours"),
                t.deep_sweep_hours.into(),
                1,
                168,
                "hours",
            );
            p.range(&k("poll_interval_secs"), t.poll_interval_secs, 1, 3600, "s");
            p.range(
                &k("max_requests_per_minute"),
                t.max_requests_per_minute.into(),
                1,
                60_000,
                "requests",
            );
            p.range(
                &k("max_blob_bytes"),
                t.max_blob_bytes,
                1024,
                256 * MIB,
                "bytes",
            );
            p.range(
                &k("request_timeout_secs"),
                t.request_timeout_secs,
                1,
                600,
                "s",
            );
            if let Some(pid) = &t.publisher_identifier {
                if !is_guid(pid) {
                    p.add(&k("publisher_identifier"), format!("`{pid}` is not a GUID"));
                }
            }
            if let Some(d) = &t.client_secret_expires {
                if parse_date(d).is_none() {
                    p.add(
                        &k("client_secret_expires"),
                        format!("`{d}` is not a date of the form YYYY-MM-DD"),
                    );
                }
            }
            for (f, v) in [("login_url", &t.login_url), ("api_url", &t.api_url)] {
                if let Some(u) = v {
                    if !u.starts_with("https://") {
                        p.add(&k(f), format!("`{u}` is not an https:// URL"));
                    }
                }
            }
            if let Some(ca) = &t.ca_file {
                p.readable(&k("ca_file"), ca);
            }
        }
        p.0
    }
}

/// The keys of each table. Invariant: equal to the fields of the structs above (a unit test holds this).
const TOP_KEYS: &[&str] = &[
    "state_dir",
    "backend",
    "spool",
    "tenant",
    "network",
    "management",
];
const MANAGEMENT_KEYS: &[&str] = &["heartbeat_secs", "managed_tenant_endpoints"];
const ENDPOINT_KEYS: &[&str] = &["login_url", "api_url", "ca_file"];
const BACKEND_KEYS: &[&str] = &[
    "url",
    "token_file",
    "client_cert_file",
    "client_key_file",
    "ca_file",
    "trust_public_roots",
    "compression",
    "batch_max_bytes",
    "batch_max_records",
    "batch_linger_ms",
    "max_in_flight",
    "connect_timeout_secs",
    "request_timeout_secs",
    "retry_max_secs",
];
const SPOOL_KEYS: &[&str] = &["max_bytes", "cache_bytes", "dedup_days"];
const NETWORK_KEYS: &[&str] = &["proxy"];
const TENANT_KEYS: &[&str] = &[
    "name",
    "tenant_id",
    "client_id",
    "client_secret_file",
    "certificate_file",
    "private_key_file",
    "assertion_alg",
    "cloud",
    "content_types",
    "backfill_hours",
    "poll_interval_secs",
    "lookback_hours",
    "deep_sweep_hours",
    "max_requests_per_minute",
    "max_blob_bytes",
    "request_timeout_secs",
    "publisher_identifier",
    "client_secret_expires",
    "login_url",
    "api_url",
    "ca_file",
];

/// Every key of `v` that no table of the configuration has, each with the keys it could have meant.
fn unknown_keys(v: &toml::Value) -> Vec<ConfigProblem> {
    let mut out = Vec::new();
    let mut check = |table: Option<&toml::value::Table>, prefix: &str, known: &[&str]| {
        for key in table.into_iter().flat_map(|t| t.keys()) {
            if !known.contains(&key.as_str()) {
                // A key that is not bare in TOML (empty, spaces, dots) is shown quoted, so it is never
                // an empty or ambiguous field name.
                let bare = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                let shown = if bare {
                    key.clone()
                } else {
                    format!("{key:?}")
                };
                out.push(ConfigProblem {
                    field: format!("{prefix}{shown}"),
                    reason: format!("unknown key; expected one of {}", known.join(", ")),
                });
            }
        }
    };
    check(v.as_table(), "", TOP_KEYS);
    check(
        v.get("backend").and_then(toml::Value::as_table),
        "backend.",
        BACKEND_KEYS,
    );
    check(
        v.get("spool").and_then(toml::Value::as_table),
        "spool.",
        SPOOL_KEYS,
    );
    check(
        v.get("network").and_then(toml::Value::as_table),
        "network.",
        NETWORK_KEYS,
    );
    check(
        v.get("management").and_then(toml::Value::as_table),
        "management.",
        MANAGEMENT_KEYS,
    );
    check(
        v.get("management")
            .and_then(|m| m.get("managed_tenant_endpoints"))
            .and_then(toml::Value::as_table),
        "management.managed_tenant_endpoints.",
        ENDPOINT_KEYS,
    );
    for (i, t) in v
        .get("tenant")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        check(t.as_table(), &format!("tenant[{i}]."), TENANT_KEYS);
    }
    out
}

/// Parses `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Option<time::Date> {
    time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()
}

/// Whether `s` is a GUID in its 8-4-4-4-12 hex form.
pub fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

const MIB: u64 = 1024 * 1024;

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, field: &str, reason: String) {
        self.0.push(ConfigProblem {
            field: field.to_string(),
            reason,
        });
    }

    /// `value` of `field` must lie in `min..=max` (`unit` names what it counts). Every number the backend
    /// may set has such a bound, so no remote value can ask for unbounded memory, time or disk.
    fn range(&mut self, field: &str, value: u64, min: u64, max: u64, unit: &str) {
        if value < min {
            self.add(
                field,
                format!("{value} is below the lower bound {min} ({unit}): must be between {min} and {max}"),
            );
        } else if value > max {
            self.add(
                field,
                format!("{value} is above the upper bound {max} ({unit}): must be between {min} and {max}"),
            );
        }
    }

    fn readable(&mut self, field: &str, path: &Path) {
        if let Err(e) = std::fs::File::open(path) {
            self.add(field, format!("cannot read {}: {e}", path.display()));
        }
    }

    /// A file holding a secret: readable, and not readable by group or others.
    fn secret(&mut self, field: &str, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Err(e) => self.add(field, format!("cannot read {}: {e}", path.display())),
            Ok(m) if m.permissions().mode() & 0o077 != 0 => self.add(
                field,
                format!(
                    "{} is readable by group or others (mode {:o}): run `chmod 600 {}`",
                    path.display(),
                    m.permissions().mode() & 0o777,
                    path.display()
                ),
            ),
            Ok(_) => {
                if let Err(e) = std::fs::File::open(path) {
                    self.add(field, format!("cannot read {}: {e}", path.display()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn reports_every_problem_at_once_with_its_field() {
        let dir = tempfile::tempdir().expect("dir");
        let secret = write(dir.path(), "s", "x", 0o644);
        let token = write(dir.path(), "t", "x", 0o600);
        let text = format!(
            r#"
[backend]
url = "http://plain"
token_file = "{}"
[[tenant]]
name = "a"
tenant_id = "not-a-guid"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret_file = "{}"
content_types = ["Audit.Exchange", "Audit.Nope"]
backfill_hours = 200
"#,
            token.display(),
            secret.display()
        );
        let err = Config::from_toml(&text, Path::new("sensor.toml")).expect_err("invalid");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "backend.url",
            "tenant[0].tenant_id",
            "tenant[0].client_secret_file",
            "tenant[0].content_types",
            "tenant[0].backfill_hours",
        ] {
            assert!(fields.contains(&f), "{f} missing in {fields:?}");
        }
        assert!(err.to_string().contains("chmod 600"));
        let unknown = Config::from_toml(
            "bogus = 1\n[backend]\nurl=\"https://x\"\n",
            Path::new("s.toml"),
        )
        .expect_err("unknown key");
        assert!(unknown.to_string().contains("bogus"), "{unknown}");
    }

    /// Issue 18 item 1: every number the backend may set has an upper bound, named with the value.
    #[test]
    fn every_remotely_settable_number_is_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let token = write(dir.path(), "t", "x", 0o600);
        let secret = write(dir.path(), "s", "x", 0o600);
        let text = format!(
            r#"
[backend]
url = "https://b"
token_file = "{}"
batch_max_bytes = 1099511627776
batch_max_records = 100000000
batch_linger_ms = 86400000
max_in_flight = 4000000000
connect_timeout_secs = 9223372036854775807
request_timeout_secs = 100000
retry_max_secs = 100000
[spool]
max_bytes = 9223372036854775807
[management]
heartbeat_secs = 31536000
[[tenant]]
name = "{}"
tenant_id = "00000000-0000-0000-0000-000000000000"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret_file = "{}"
backfill_hours = 4000000000
poll_interval_secs = 31536000
lookback_hours = 4000000000
deep_sweep_hours = 4000000000
max_requests_per_minute = 4000000000
max_blob_bytes = 1099511627776
request_timeout_secs = 86400
"#,
            token.display(),
            "n".repeat(65),
            secret.display()
        );
        let err = Config::from_toml(&text, Path::new("sensor.toml")).expect_err("bounded");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        for (field, value) in [
            ("backend.batch_max_bytes", "1099511627776"),
            ("backend.batch_max_records", "100000000"),
            ("backend.batch_linger_ms", "86400000"),
            ("backend.max_in_flight", "4000000000"),
            ("backend.connect_timeout_secs", "9223372036854775807"),
            ("backend.request_timeout_secs", "100000"),
            ("backend.retry_max_secs", "100000"),
            ("spool.max_bytes", "9223372036854775807"),
            ("management.heartbeat_secs", "31536000"),
            ("tenant[0].name", "nnnn"),
            ("tenant[0].backfill_hours", "4000000000"),
            ("tenant[0].poll_interval_secs", "31536000"),
            ("tenant[0].lookback_hours", "4000000000"),
            ("tenant[0].deep_sweep_hours", "4000000000"),
            ("tenant[0].max_requests_per_minute", "4000000000"),
            ("tenant[0].max_blob_bytes", "1099511627776"),
            ("tenant[0].request_timeout_secs", "86400"),
        ] {
            let p = problems.iter().find(|p| p.field == field);
            let reason = p.map(|p| p.reason.as_str()).unwrap_or_default();
            assert!(reason.contains(value), "{field}: {reason:?} in {err}");
            if field != "tenant[0].name" && field != "tenant[0].backfill_hours" {
                assert!(reason.contains("upper bound"), "{field}: {reason}");
            }
        }
        assert_eq!(problems.len(), 17, "{err}");
    }

    /// Found by `make fuzz` (input `''=3`): an empty key was reported with an empty field name.
    #[test]
    fn a_key_that_is_not_bare_is_named_quoted() {
        let err = Config::from_toml("''=3\n\"a b\"=1\n", Path::new("s.toml")).expect_err("unknown");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"\"\""), "{fields:?}");
        assert!(fields.contains(&"\"a b\""), "{fields:?}");
    }

    #[test]
    fn unknown_keys_are_all_reported_and_the_key_lists_match_the_structs() {
        let err = Config::from_toml(
            "bogus = 1\n[backend]\nurl = \"https://x\"\ntokn_file = \"/t\"\n[[tenant]]\nname = \"a\"\nclient_secret = \"x\"\n",
            Path::new("s.toml"),
        )
        .expect_err("unknown keys");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["bogus", "backend.tokn_file", "tenant[0].client_secret"]
        );
        // Every field of every struct, serialized with all options set, is a known key, and vice versa.
        let t = TenantConfig {
            name: "a".into(),
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret_file: Some("/s".into()),
            certificate_file: Some("/c".into()),
            private_key_file: Some("/k".into()),
            assertion_alg: AssertionAlg::RS256,
            cloud: Cloud::Commercial,
            content_types: default_content_types(),
            backfill_hours: 1,
            poll_interval_secs: 1,
            lookback_hours: 1,
            deep_sweep_hours: 1,
            max_requests_per_minute: 1,
            max_blob_bytes: 1,
            request_timeout_secs: 1,
            publisher_identifier: Some("p".into()),
            client_secret_expires: Some("2030-01-01".into()),
            login_url: Some("https://l".into()),
            api_url: Some("https://a".into()),
            ca_file: Some("/ca".into()),
        };
        let b = BackendConfig {
            url: "https://b".into(),
            token_file: Some("/t".into()),
            client_cert_file: Some("/c".into()),
            client_key_file: Some("/k".into()),
            ca_file: Some("/ca".into()),
            trust_public_roots: true,
            pinned_anchors_file: None,
            compression: Compression::Zstd,
            batch_max_bytes: 1,
            batch_max_records: 1,
            batch_linger_ms: 1,
            max_in_flight: 1,
            connect_timeout_secs: 1,
            request_timeout_secs: 1,
            retry_max_secs: 1,
        };
        let c = Config {
            state_dir: "/s".into(),
            backend: b,
            spool: SpoolConfig::default(),
            tenants: vec![t],
            network: NetworkConfig {
                proxy: Some("http://p".into()),
            },
            management: ManagementConfig {
                heartbeat_secs: 1,
                managed_tenant_endpoints: Some(TenantEndpoints {
                    login_url: Some("https://l".into()),
                    api_url: Some("https://a".into()),
                    ca_file: Some("/ca".into()),
                }),
            },
        };
        let v = toml::Value::try_from(&c).expect("serializes");
        let keys = |v: Option<&toml::Value>| -> Vec<String> {
            let mut k: Vec<String> = v
                .and_then(toml::Value::as_table)
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            k.sort();
            k
        };
        let sorted = |l: &[&str]| -> Vec<String> {
            let mut k: Vec<String> = l.iter().map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys(Some(&v)), sorted(TOP_KEYS));
        assert_eq!(keys(v.get("backend")), sorted(BACKEND_KEYS));
        assert_eq!(keys(v.get("spool")), sorted(SPOOL_KEYS));
        assert_eq!(keys(v.get("network")), sorted(NETWORK_KEYS));
        assert_eq!(keys(v.get("management")), sorted(MANAGEMENT_KEYS));
        assert_eq!(
            keys(
                v.get("management")
                    .and_then(|m| m.get("managed_tenant_endpoints"))
            ),
            sorted(ENDPOINT_KEYS)
        );
        assert_eq!(
            keys(v.get("tenant").and_then(|t| t.get(0))),
            sorted(TENANT_KEYS)
        );
        assert!(unknown_keys(&v).is_empty());
    }

    #[test]
    fn guid_check() {
        assert!(is_guid("41463f53-8812-40f4-890f-865bf6e35190"));
        assert!(!is_guid("41463f53881240f4890f865bf6e35190"));
        assert!(!is_guid("41463f53-8812-40f4-890f-865bf6e3519g"));
    }
}

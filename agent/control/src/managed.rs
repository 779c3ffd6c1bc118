//! The managed configuration: the part of the configuration the backend sets (`GET /v1/config`) and the
//! credentials rotated by command, laid over the local file.
//!
//! The backend may set `tenant` (the whole list), `spool.max_bytes`, `management.heartbeat_secs` and the
//! relay settings of `backend` (compression, batch sizes, linger, in-flight, timeouts, back-off). The
//! backend's address, the device credential, `state_dir`, the spool's cache and dedup window, and the
//! network stay local: a managed config that sets them is refused. A managed tenant is checked against an
//! allow-list ([`MANAGED_TENANT_KEYS`]): it never names a file or an endpoint (`login_url`, `api_url`,
//! `ca_file`, `*_file`, `*_url` are refused), so a compromised backend cannot make the collector send a
//! file's bytes, as a client secret, to a host of its choosing. Its endpoints derive from its `cloud`
//! (or, set locally only, `management.managed_tenant_endpoints`). Its credential arrives inline
//! (`client_secret`, or `certificate_pem` + `private_key_pem`): it is written to a 0600 file under
//! `<state_dir>/credentials/`, named by its content's hash, and the tenant then names that file.
//!
//! Invariants: the persisted state (`<state_dir>/managed.json`) never holds a secret, only file names,
//! each directly inside `<state_dir>/credentials/` (checked again when it is loaded); a managed
//! configuration is accepted only when the configuration it produces passes the same validation as
//! `check-config`; the last accepted one is what a restart applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sensor_core::config::{Config, ConfigProblem};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::store;

/// File of the persisted managed state in the state directory.
pub const FILE: &str = "managed.json";
/// Directory of materialized credentials in the state directory.
pub const CREDENTIALS_DIR: &str = "credentials";

/// Keys of `backend` the backend may set.
const MANAGED_BACKEND_KEYS: &[&str] = &[
    "compression",
    "batch_max_bytes",
    "batch_max_records",
    "batch_linger_ms",
    "max_in_flight",
    "connect_timeout_secs",
    "request_timeout_secs",
    "retry_max_secs",
];
const MANAGED_SPOOL_KEYS: &[&str] = &["max_bytes"];
const MANAGED_MANAGEMENT_KEYS: &[&str] = &["heartbeat_secs"];

/// The keys a tenant of a managed configuration may set: its identity and its collection settings.
/// Invariant: no key here names a file or an endpoint (a managed tenant's endpoints derive from its
/// `cloud`, its credential arrives inline): this is an allow-list, every other key is refused.
pub const MANAGED_TENANT_KEYS: &[&str] = &[
    "name",
    "tenant_id",
    "client_id",
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
];

/// Inline credential keys of a managed tenant, the file key each becomes once stored, and the stored
/// file's extension.
const INLINE_CREDENTIALS: &[(&str, &str, &str)] = &[
    ("client_secret", "client_secret_file", "secret"),
    ("certificate_pem", "certificate_file", "pem"),
    ("private_key_pem", "private_key_file", "key"),
];

/// The top-level key of a managed configuration that lets it have no tenant at all: without
/// `"allow_no_tenants": true`, a managed configuration whose tenant list ends up empty (`[]`, or absent
/// with no tenant in the local file) is refused, so a backend cannot stop all collection silently.
pub const ALLOW_NO_TENANTS: &str = "allow_no_tenants";

/// Where a managed configuration being checked comes from.
enum Origin<'a> {
    /// The backend's answer: credentials inline, no file names.
    Backend,
    /// The persisted state: credentials are file names inside this directory, never inline.
    Persisted { credentials: &'a Path },
}

/// Every problem of a managed configuration's shape, as (field, reason): the top-level tables and their
/// keys, and each tenant's keys against [`MANAGED_TENANT_KEYS`].
fn check_shape(config: &Value, origin: &Origin<'_>) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let Some(top) = config.as_object() else {
        return vec![("config".into(), "must be a JSON object".into())];
    };
    for (key, value) in top {
        let allowed: &[&str] = match key.as_str() {
            "backend" => MANAGED_BACKEND_KEYS,
            "spool" => MANAGED_SPOOL_KEYS,
            "management" => MANAGED_MANAGEMENT_KEYS,
            ALLOW_NO_TENANTS => {
                if !value.is_boolean() {
                    problems.push((key.clone(), "must be true or false".into()));
                }
                continue;
            }
            "tenant" => {
                match value.as_array() {
                    Some(tenants) => {
                        for (i, t) in tenants.iter().enumerate() {
                            check_tenant(i, t, origin, &mut problems);
                        }
                    }
                    None => problems.push(("tenant".into(), "must be a list of tenants".into())),
                }
                continue;
            }
            other => {
                problems.push((
                    other.to_string(),
                    "not managed remotely (state_dir, network and the backend's address and credential stay in the local file)".into(),
                ));
                continue;
            }
        };
        match value.as_object() {
            Some(table) => {
                for k in table.keys().filter(|k| !allowed.contains(&k.as_str())) {
                    problems.push((
                        format!("{key}.{k}"),
                        format!(
                            "not managed remotely; the backend may set {}",
                            allowed.join(", ")
                        ),
                    ));
                }
            }
            None => problems.push((key.clone(), "must be an object".into())),
        }
    }
    problems
}

/// The problems of managed tenant `i`'s keys.
fn check_tenant(i: usize, t: &Value, origin: &Origin<'_>, problems: &mut Vec<(String, String)>) {
    let Some(t) = t.as_object() else {
        problems.push((format!("tenant[{i}]"), "must be an object".into()));
        return;
    };
    for (key, value) in t {
        let field = format!("tenant[{i}].{key}");
        if MANAGED_TENANT_KEYS.contains(&key.as_str()) {
            continue;
        }
        let inline = INLINE_CREDENTIALS.iter().any(|(k, _, _)| k == key);
        let file = INLINE_CREDENTIALS.iter().any(|(_, k, _)| k == key);
        match origin {
            Origin::Backend if inline => {}
            Origin::Persisted { .. } if inline => problems.push((
                field,
                "a secret inline in the persisted state, which only ever holds file names".into(),
            )),
            Origin::Persisted { credentials } if file => {
                if let Some(reason) = outside_credentials(value.as_str(), credentials) {
                    problems.push((field, reason));
                }
            }
            _ if file || key.ends_with("_file") || key.ends_with("_url") || key == "ca_file" => {
                problems.push((
                    field,
                    format!(
                        "names a file or an endpoint, which the backend may not set: a managed tenant's endpoints derive from its `cloud` (only the local file's management.managed_tenant_endpoints redirects them) and its credential arrives inline (client_secret, or certificate_pem and private_key_pem), stored by the sensor under <state_dir>/{CREDENTIALS_DIR}/"
                    ),
                ));
            }
            _ => problems.push((
                field,
                format!(
                    "unknown key; a managed tenant may set {} and its credential inline (client_secret, or certificate_pem and private_key_pem)",
                    MANAGED_TENANT_KEYS.join(", ")
                ),
            )),
        }
    }
}

/// Why `path` is not a credential file directly inside `credentials`, or None when it is one.
fn outside_credentials(path: Option<&str>, credentials: &Path) -> Option<String> {
    let Some(path) = path else {
        return Some("must be a file name (a string)".into());
    };
    let p = Path::new(path);
    let inside = p.parent() == Some(credentials)
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'));
    (!inside).then(|| {
        format!(
            "`{path}` is outside {}: a managed credential is only ever a file the sensor stored there",
            credentials.display()
        )
    })
}

/// A tenant's credential set by `rotate_credentials`; it wins over the configuration's until a newer
/// managed configuration gives that tenant a credential of its own.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialOverride {
    /// The secret's file.
    pub client_secret_file: Option<PathBuf>,
    /// The certificate's file.
    pub certificate_file: Option<PathBuf>,
    /// The certificate's key file.
    pub private_key_file: Option<PathBuf>,
    /// The new secret's expiry date, if the backend gave one.
    pub client_secret_expires: Option<String>,
}

/// The persisted managed state.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Managed {
    /// Version of `config` (0: none received yet).
    pub version: u64,
    /// The managed configuration, credentials replaced by file names.
    pub config: Value,
    /// Rotated credentials by tenant name.
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialOverride>,
}

/// Why the managed state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The persisted file is not what this version writes.
    #[error("{path}: not a managed configuration state: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The persisted file parses but holds what a managed configuration may not: a file outside
    /// `<state_dir>/credentials/`, an endpoint, a key the backend may not set.
    #[error("{path}: refused, not applied: {}", problems.join("; "))]
    Refused {
        /// The file.
        path: PathBuf,
        /// Each problem, `key: why`.
        problems: Vec<String>,
    },
}

impl Managed {
    /// Reads `<state_dir>/managed.json`; the empty state when it does not exist. Checks it as a managed
    /// configuration from the backend is checked (defence in depth: the file may have been written by an
    /// older version or tampered with): every credential file it names must lie directly inside
    /// `<state_dir>/credentials/`, and no tenant may name an endpoint or another file.
    pub fn load(state_dir: &Path) -> Result<Managed, ManagedError> {
        let path = state_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let m: Managed =
                    serde_json::from_slice(&bytes).map_err(|e| ManagedError::Corrupt {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                let problems = m.check_persisted(state_dir);
                if problems.is_empty() {
                    Ok(m)
                } else {
                    Err(ManagedError::Refused { path, problems })
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Managed {
                version: 0,
                config: Value::Object(Map::new()),
                credentials: BTreeMap::new(),
            }),
            Err(source) => Err(ManagedError::Io { path, source }),
        }
    }

    /// Every problem of this state as persisted in `state_dir`, as `key: why` lines.
    fn check_persisted(&self, state_dir: &Path) -> Vec<String> {
        let credentials = state_dir.join(CREDENTIALS_DIR);
        let origin = Origin::Persisted {
            credentials: &credentials,
        };
        let mut problems: Vec<String> = check_shape(&self.config, &origin)
            .into_iter()
            .map(|(f, r)| format!("{f}: {r}"))
            .collect();
        for (name, o) in &self.credentials {
            for (key, file) in [
                ("client_secret_file", &o.client_secret_file),
                ("certificate_file", &o.certificate_file),
                ("private_key_file", &o.private_key_file),
            ] {
                let Some(file) = file else { continue };
                if let Some(reason) = outside_credentials(file.to_str(), &credentials) {
                    problems.push(format!("credentials.{name}.{key}: {reason}"));
                }
            }
        }
        problems
    }

    /// Writes it atomically (0600).
    pub fn save(&self, state_dir: &Path) -> Result<(), ManagedError> {
        let path = state_dir.join(FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ManagedError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        store::write_private(&path, &bytes).map_err(|source| ManagedError::Io { path, source })
    }

    /// The configuration `local` becomes under this managed state, validated. Problems name the managed
    /// configuration's version and the key.
    pub fn apply_to(&self, local: &Config) -> Result<Config, Vec<ConfigProblem>> {
        overlay(local, &self.config, &self.credentials, self.version)
    }
}

fn problem(version: u64, field: &str, reason: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        field: format!("remote config v{version}: {field}"),
        reason: reason.into(),
    }
}

/// Checks the shape of a managed configuration received from the backend (top-level tables and their
/// keys; each tenant against the allow-list [`MANAGED_TENANT_KEYS`] plus inline credentials, so no
/// tenant names a file or an endpoint) and writes its inline credentials to files under
/// `<state_dir>/credentials/`, returning the configuration with file names in their place. Nothing is
/// written when a problem is found.
pub fn materialize(
    state_dir: &Path,
    version: u64,
    config: &Value,
) -> Result<Value, Vec<ConfigProblem>> {
    let mut problems: Vec<ConfigProblem> = check_shape(config, &Origin::Backend)
        .into_iter()
        .map(|(f, r)| problem(version, &f, r))
        .collect();
    // Inline credentials: collect the files to write, write them only if everything else is fine.
    let mut out = config.clone();
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    if let Some(tenants) = out.get_mut("tenant").and_then(Value::as_array_mut) {
        for (i, t) in tenants.iter_mut().enumerate() {
            let Some(t) = t.as_object_mut() else {
                continue; // Named by check_shape.
            };
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("tenant")
                .to_string();
            for (inline, file_key, ext) in INLINE_CREDENTIALS {
                let Some(v) = t.remove(*inline) else { continue };
                let Some(text) = v.as_str() else {
                    problems.push(problem(
                        version,
                        &format!("tenant[{i}].{inline}"),
                        "must be a string",
                    ));
                    continue;
                };
                let path = credential_path(state_dir, &name, ext, text.trim());
                t.insert(
                    file_key.to_string(),
                    Value::String(path.to_string_lossy().into_owned()),
                );
                files.push((path, text.trim().to_string()));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    for (path, text) in files {
        if let Err(e) = write_credential(&path, &text) {
            return Err(vec![problem(
                version,
                "tenant",
                format!("cannot store a credential in {}: {e}", path.display()),
            )]);
        }
    }
    Ok(out)
}

/// The file a credential of `tenant` with content `text` is stored in: named by the content's hash, so
/// a new credential never overwrites one a running collector still reads.
pub fn credential_path(state_dir: &Path, tenant: &str, ext: &str, text: &str) -> PathBuf {
    let hash = hex::encode(Sha256::digest(text.as_bytes()));
    let safe: String = tenant
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir
        .join(CREDENTIALS_DIR)
        .join(format!("{safe}-{}.{ext}", &hash[..16]))
}

/// Writes a credential file (0600) in a 0700 directory; a file with the same name already holds the same
/// content and is kept.
pub fn write_credential(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        store::private_dir(dir)?;
    }
    if path.exists() {
        return Ok(());
    }
    store::write_private(path, text.as_bytes())
}

/// Removes credential files no tenant of `config` names any more.
pub fn prune_credentials(state_dir: &Path, config: &Config) {
    let dir = state_dir.join(CREDENTIALS_DIR);
    let used: Vec<&Path> = config
        .tenants
        .iter()
        .flat_map(|t| {
            [
                &t.client_secret_file,
                &t.certificate_file,
                &t.private_key_file,
            ]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
        })
        .collect();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if !used.contains(&p.as_path()) && !e.file_name().to_string_lossy().starts_with('.') {
            let _ = std::fs::remove_file(&p);
        }
    }
}

fn overlay(
    local: &Config,
    managed: &Value,
    credentials: &BTreeMap<String, CredentialOverride>,
    version: u64,
) -> Result<Config, Vec<ConfigProblem>> {
    let mut merged = serde_json::to_value(local)
        .map_err(|e| vec![problem(version, "config", format!("cannot merge: {e}"))])?;
    if let (Some(m), Some(base)) = (managed.as_object(), merged.as_object_mut()) {
        for (key, value) in m {
            match (key.as_str(), value.as_object(), base.get_mut(key)) {
                (ALLOW_NO_TENANTS, _, _) => {}
                ("tenant", _, _) => {
                    base.insert(key.clone(), value.clone());
                }
                (_, Some(table), Some(Value::Object(target))) => {
                    for (k, v) in table {
                        target.insert(k.clone(), v.clone());
                    }
                }
                _ => {
                    base.insert(key.clone(), value.clone());
                }
            }
        }
    }
    let from_backend = managed.get("tenant").is_some();
    let endpoints = local
        .management
        .managed_tenant_endpoints
        .as_ref()
        .and_then(|e| serde_json::to_value(e).ok());
    if let Some(tenants) = merged.get_mut("tenant").and_then(Value::as_array_mut) {
        for t in tenants.iter_mut().filter_map(Value::as_object_mut) {
            if from_backend {
                // The backend's tenants reach the endpoints the local file names for them, if any.
                for (k, v) in endpoints.iter().filter_map(Value::as_object).flatten() {
                    if !v.is_null() {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
            let Some(name) = t.get("name").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            if let Some(o) = credentials.get(&name) {
                for k in ["client_secret_file", "certificate_file", "private_key_file"] {
                    t.remove(k);
                }
                let o = serde_json::to_value(o).unwrap_or(Value::Null);
                for (k, v) in o.as_object().into_iter().flatten() {
                    if !v.is_null() {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }
    let config: Config = serde_json::from_value(merged)
        .map_err(|e| vec![problem(version, "config", e.to_string())])?;
    let mut problems = config.validate();
    let set_by_backend = managed.as_object().is_some_and(|m| !m.is_empty());
    if set_by_backend && config.tenants.is_empty() && !allows_no_tenants(managed) {
        problems.push(ConfigProblem {
            field: "tenant".into(),
            reason: format!(
                "no tenant at all: applying it would stop all collection; a managed configuration does that only with \"{ALLOW_NO_TENANTS}\": true"
            ),
        });
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems
            .into_iter()
            .map(|p| problem(version, &p.field, p.reason))
            .collect())
    }
}

/// Whether a managed configuration says it means to have no tenant (`"allow_no_tenants": true`).
pub fn allows_no_tenants(config: &Value) -> bool {
    config.get(ALLOW_NO_TENANTS).and_then(Value::as_bool) == Some(true)
}

/// The credential overrides that a newly accepted managed configuration leaves in place: a tenant that
/// the new configuration gives a credential of its own (inline or by file) drops its rotated one.
pub fn surviving_overrides(
    old: &BTreeMap<String, CredentialOverride>,
    new_config: &Value,
) -> BTreeMap<String, CredentialOverride> {
    let with_own: Vec<&str> = new_config
        .get("tenant")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| {
            ["client_secret_file", "certificate_file"]
                .iter()
                .any(|k| t.get(*k).is_some())
        })
        .filter_map(|t| t.get("name").and_then(Value::as_str))
        .collect();
    old.iter()
        .filter(|(name, _)| !with_own.contains(&name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TENANT: &str = "41463f53-8812-40f4-890f-865bf6e35190";

    fn local(dir: &Path) -> Config {
        let token = dir.join("token");
        store::write_private(&token, b"t").expect("token");
        let text = format!(
            "state_dir = \"{}\"\n[backend]\nurl = \"https://b.example\"\ntoken_file = \"{}\"\n",
            dir.display(),
            token.display()
        );
        Config::from_toml(&text, Path::new("sensor.toml")).expect("local config")
    }

    #[test]
    fn inline_secrets_become_files_and_never_reach_the_state() {
        let d = tempfile::tempdir().expect("tempdir");
        let local = local(d.path());
        let remote = serde_json::json!({
            "tenant": [{"name": "contoso", "tenant_id": TENANT, "client_id": TENANT,
                        "client_secret": "s3cr3t-value", "content_types": ["Audit.Exchange"]}],
            "backend": {"compression": "gzip"},
            "spool": {"max_bytes": 2097152},
            "management": {"heartbeat_secs": 5}
        });
        let m = materialize(d.path(), 7, &remote).expect("materialize");
        assert!(!m.to_string().contains("s3cr3t-value"));
        let managed = Managed {
            version: 7,
            config: m,
            credentials: BTreeMap::new(),
        };
        let c = managed.apply_to(&local).expect("valid");
        assert_eq!(c.tenants.len(), 1);
        assert_eq!(c.backend.compression.as_str(), "gzip");
        assert_eq!(c.spool.max_bytes, 2097152);
        assert_eq!(c.management.heartbeat_secs, 5);
        assert_eq!(
            c.backend.url, "https://b.example",
            "the address stays local"
        );
        let secret = c.tenants[0]
            .client_secret_file
            .clone()
            .expect("secret file");
        assert_eq!(
            std::fs::read_to_string(&secret).expect("read"),
            "s3cr3t-value"
        );
        let mode = std::fs::metadata(&secret)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        managed.save(d.path()).expect("save");
        let saved = std::fs::read_to_string(d.path().join(FILE)).expect("read");
        assert!(!saved.contains("s3cr3t-value"));
        assert_eq!(Managed::load(d.path()).expect("load"), managed);
    }

    #[test]
    fn refused_configs_name_every_problem_and_write_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let remote = serde_json::json!({
            "state_dir": "/elsewhere",
            "backend": {"url": "https://evil.example", "compression": "zstd"},
            "tenant": [{"name": "a", "tenant_id": "nope", "client_id": TENANT, "client_secret": "x"}]
        });
        let e = materialize(d.path(), 3, &remote).expect_err("refused");
        let text: Vec<String> = e
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect();
        assert!(
            text.iter()
                .any(|t| t.contains("remote config v3: state_dir")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("backend.url")), "{text:?}");
        assert!(!d.path().join(CREDENTIALS_DIR).exists(), "nothing written");

        // Shape fine, values wrong: the same validation as check-config.
        let remote = serde_json::json!({
            "tenant": [{"name": "a", "tenant_id": "nope", "client_id": TENANT, "client_secret": "x",
                        "content_types": ["Audit.Nope"]}]
        });
        let m = materialize(d.path(), 4, &remote).expect("shape ok");
        let managed = Managed {
            version: 4,
            config: m,
            credentials: BTreeMap::new(),
        };
        let e = managed.apply_to(&local(d.path())).expect_err("invalid");
        let text: Vec<String> = e
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect();
        assert!(
            text.iter().any(|t| t.contains("tenant[0].tenant_id")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("Audit.Nope")), "{text:?}");
    }

    /// Issue 18 item 1: a managed tenant naming the device key as its secret file and a listener as its
    /// login host made the collector POST the key to that listener.
    #[test]
    fn managed_tenants_name_no_file_and_no_endpoint() {
        let d = tempfile::tempdir().expect("tempdir");
        let hostile = serde_json::json!({
            "tenant": [{"name": "a", "tenant_id": TENANT, "client_id": TENANT,
                        "client_secret_file": d.path().join("identity/device.key"),
                        "login_url": "https://127.0.0.1:9/", "api_url": "https://127.0.0.1:9/",
                        "ca_file": "/etc/passwd", "proxy_url": "https://x", "token_file": "/t",
                        "certificate_file": "/proc/self/environ", "private_key_file": "/k",
                        "surprise": 1}]
        });
        let e = materialize(d.path(), 5, &hostile).expect_err("refused");
        let fields: Vec<&str> = e.iter().map(|p| p.field.as_str()).collect();
        for key in [
            "client_secret_file",
            "login_url",
            "api_url",
            "ca_file",
            "proxy_url",
            "token_file",
            "certificate_file",
            "private_key_file",
            "surprise",
        ] {
            let field = format!("remote config v5: tenant[0].{key}");
            assert!(fields.contains(&field.as_str()), "{field} in {fields:?}");
        }
        let login = e
            .iter()
            .find(|p| p.field.ends_with("login_url"))
            .map(|p| p.reason.clone())
            .unwrap_or_default();
        assert!(login.contains("derive from its `cloud`"), "{login}");
        assert!(!d.path().join(CREDENTIALS_DIR).exists(), "nothing written");

        // Every allowed key, and an inline credential, passes; the endpoints the local file names for
        // managed tenants are the ones they get.
        let ok = serde_json::json!({"tenant": [{"name": "a", "tenant_id": TENANT, "client_id": TENANT,
            "client_secret": "s", "assertion_alg": "PS256", "cloud": "gcc", "content_types": ["Audit.General"],
            "backfill_hours": 1, "poll_interval_secs": 5, "lookback_hours": 2, "deep_sweep_hours": 3,
            "max_requests_per_minute": 10, "max_blob_bytes": 4096, "request_timeout_secs": 5,
            "publisher_identifier": TENANT, "client_secret_expires": "2030-01-01"}]});
        let m = materialize(d.path(), 6, &ok).expect("allowed keys");
        let mut local = local(d.path());
        let managed = Managed {
            version: 6,
            config: m.clone(),
            credentials: BTreeMap::new(),
        };
        let c = managed.apply_to(&local).expect("valid");
        assert_eq!(c.tenants[0].login_url, None);
        assert_eq!(c.tenants[0].api_base(), "https://manage-gcc.office.com");
        local.management.managed_tenant_endpoints = Some(sensor_core::config::TenantEndpoints {
            login_url: Some("https://127.0.0.1:1".into()),
            api_url: Some("https://127.0.0.1:2".into()),
            ca_file: None,
        });
        let c = managed.apply_to(&local).expect("valid");
        assert_eq!(c.tenants[0].login_base(), "https://127.0.0.1:1");
        assert_eq!(c.tenants[0].api_base(), "https://127.0.0.1:2");
    }

    /// Defence in depth: a `managed.json` naming files outside `<state_dir>/credentials/` or endpoints is
    /// refused when it is loaded, naming the file and the key.
    #[test]
    fn a_persisted_state_naming_foreign_files_or_endpoints_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let good = credential_path(d.path(), "a", "secret", "s");
        write_credential(&good, "s").expect("write");
        let write = |config: Value, creds: BTreeMap<String, CredentialOverride>| {
            Managed {
                version: 2,
                config,
                credentials: creds,
            }
            .save(d.path())
            .expect("save")
        };
        let tenant = |extra: Value| {
            let mut t = serde_json::json!({"name": "a", "tenant_id": TENANT, "client_id": TENANT});
            for (k, v) in extra.as_object().into_iter().flatten() {
                t[k] = v.clone();
            }
            serde_json::json!({ "tenant": [t] })
        };
        write(
            tenant(serde_json::json!({ "client_secret_file": good })),
            BTreeMap::new(),
        );
        assert!(Managed::load(d.path()).is_ok(), "a stored credential loads");
        let escape = d.path().join(CREDENTIALS_DIR).join("../token");
        for (extra, key) in [
            (
                serde_json::json!({"client_secret_file": "/proc/self/environ"}),
                "tenant[0].client_secret_file",
            ),
            (
                serde_json::json!({ "client_secret_file": escape }),
                "tenant[0].client_secret_file",
            ),
            (
                serde_json::json!({"client_secret_file": good, "login_url": "https://127.0.0.1:9"}),
                "tenant[0].login_url",
            ),
            (
                serde_json::json!({"client_secret": "inline"}),
                "tenant[0].client_secret",
            ),
        ] {
            write(tenant(extra), BTreeMap::new());
            let e = Managed::load(d.path()).expect_err("refused").to_string();
            assert!(e.contains("managed.json") && e.contains(key), "{key}: {e}");
        }
        let mut creds = BTreeMap::new();
        creds.insert(
            "a".to_string(),
            CredentialOverride {
                client_secret_file: Some(d.path().join("identity/device.key")),
                ..Default::default()
            },
        );
        write(tenant(serde_json::json!({})), creds);
        let e = Managed::load(d.path()).expect_err("refused").to_string();
        assert!(e.contains("credentials.a.client_secret_file"), "{e}");
    }

    /// Issue 18 item 1: an empty or missing tenant list stopped all collection silently.
    #[test]
    fn no_tenant_at_all_needs_the_explicit_flag() {
        let d = tempfile::tempdir().expect("tempdir");
        let with_local_tenant = {
            let secret = d.path().join("s");
            store::write_private(&secret, b"s").expect("secret");
            let mut c = local(d.path());
            let t: sensor_core::config::TenantConfig = serde_json::from_value(serde_json::json!({
                "name": "local", "tenant_id": TENANT, "client_id": TENANT, "client_secret_file": secret
            }))
            .expect("tenant");
            c.tenants.push(t);
            c
        };
        let managed = |config: Value| Managed {
            version: 9,
            config,
            credentials: BTreeMap::new(),
        };
        let refused = |local: &Config, config: Value| {
            let e = managed(config).apply_to(local).expect_err("refused");
            let text: Vec<String> = e
                .iter()
                .map(|p| format!("{}: {}", p.field, p.reason))
                .collect();
            assert!(
                text.iter()
                    .any(|t| t.contains("remote config v9: tenant: no tenant at all")
                        && t.contains("allow_no_tenants")),
                "{text:?}"
            );
        };
        // `[]` empties the list; absent keeps the local file's tenants, if it has any.
        refused(&with_local_tenant, serde_json::json!({"tenant": []}));
        refused(
            &local(d.path()),
            serde_json::json!({"backend": {"compression": "gzip"}}),
        );
        refused(
            &local(d.path()),
            serde_json::json!({"tenant": [], "allow_no_tenants": false}),
        );
        let kept = managed(serde_json::json!({"backend": {"compression": "gzip"}}))
            .apply_to(&with_local_tenant)
            .expect("the local tenant stays");
        assert_eq!(kept.tenants.len(), 1);
        let flagged = serde_json::json!({"tenant": [], "allow_no_tenants": true});
        let m = materialize(d.path(), 9, &flagged).expect("shape");
        let c = managed(m).apply_to(&with_local_tenant).expect("explicit");
        assert!(c.tenants.is_empty());
        // No managed configuration at all (the local file alone) stays as it was.
        assert!(Managed::default().apply_to(&local(d.path())).is_ok());
        let e = materialize(d.path(), 9, &serde_json::json!({"allow_no_tenants": "yes"}))
            .expect_err("not a bool");
        assert!(e[0].field.ends_with("allow_no_tenants"), "{e:?}");
    }

    #[test]
    fn rotated_credentials_win_until_the_backend_sets_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let old = credential_path(d.path(), "a", "secret", "old");
        write_credential(&old, "old").expect("old");
        let new = credential_path(d.path(), "a", "secret", "new");
        write_credential(&new, "new").expect("new");
        let config = serde_json::json!({"tenant": [{"name": "a", "tenant_id": TENANT, "client_id": TENANT,
            "client_secret_file": old}]});
        let mut creds = BTreeMap::new();
        creds.insert(
            "a".to_string(),
            CredentialOverride {
                client_secret_file: Some(new.clone()),
                ..Default::default()
            },
        );
        let managed = Managed {
            version: 1,
            config: config.clone(),
            credentials: creds.clone(),
        };
        let c = managed.apply_to(&local(d.path())).expect("valid");
        assert_eq!(
            c.tenants[0].client_secret_file.as_deref(),
            Some(new.as_path())
        );
        assert!(surviving_overrides(&creds, &config).is_empty());
        assert_eq!(surviving_overrides(&creds, &serde_json::json!({})), creds);
        prune_credentials(d.path(), &c);
        assert!(new.exists() && !old.exists());
    }
}

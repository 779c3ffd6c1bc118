//! The managed configuration: the part of the configuration the backend sets (`GET /v1/config`) and the
//! credentials rotated by command, laid over the local file.
//!
//! The backend may set `tenant` (the whole list), `spool.max_bytes`, `management.heartbeat_secs` and the
//! relay settings of `backend` (compression, batch sizes, linger, in-flight, timeouts, back-off). The
//! backend's address, the device credential, `state_dir`, the spool's cache and dedup window, and the
//! network stay local: a managed config that sets them is refused. A tenant may carry its credential
//! inline (`client_secret`, or `certificate_pem` + `private_key_pem`): it is written to a 0600 file under
//! `<state_dir>/credentials/`, named by its content's hash, and the tenant then names that file.
//!
//! Invariants: the persisted state (`<state_dir>/managed.json`) never holds a secret, only file names; a
//! managed configuration is accepted only when the configuration it produces passes the same validation
//! as `check-config`; the last accepted one is what a restart applies.

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
}

impl Managed {
    /// Reads `<state_dir>/managed.json`; the empty state when it does not exist.
    pub fn load(state_dir: &Path) -> Result<Managed, ManagedError> {
        let path = state_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ManagedError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Managed {
                version: 0,
                config: Value::Object(Map::new()),
                credentials: BTreeMap::new(),
            }),
            Err(source) => Err(ManagedError::Io { path, source }),
        }
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

/// Checks the shape of a managed configuration received from the backend and writes its inline
/// credentials to files, returning the configuration with file names in their place. Nothing is
/// written when a problem is found.
pub fn materialize(
    state_dir: &Path,
    version: u64,
    config: &Value,
) -> Result<Value, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let Some(top) = config.as_object() else {
        return Err(vec![problem(version, "config", "must be a JSON object")]);
    };
    for (key, value) in top {
        let allowed: &[&str] = match key.as_str() {
            "backend" => MANAGED_BACKEND_KEYS,
            "spool" => MANAGED_SPOOL_KEYS,
            "management" => MANAGED_MANAGEMENT_KEYS,
            "tenant" => {
                if !value.is_array() {
                    problems.push(problem(version, "tenant", "must be a list of tenants"));
                }
                continue;
            }
            other => {
                problems.push(problem(
                    version,
                    other,
                    "not managed remotely (state_dir, network and the backend's address and credential stay in the local file)",
                ));
                continue;
            }
        };
        match value.as_object() {
            Some(table) => {
                for k in table.keys().filter(|k| !allowed.contains(&k.as_str())) {
                    problems.push(problem(
                        version,
                        &format!("{key}.{k}"),
                        format!(
                            "not managed remotely; the backend may set {}",
                            allowed.join(", ")
                        ),
                    ));
                }
            }
            None => problems.push(problem(version, key, "must be an object")),
        }
    }
    // Inline credentials: collect the files to write, write them only if everything else is fine.
    let mut out = config.clone();
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    if let Some(tenants) = out.get_mut("tenant").and_then(Value::as_array_mut) {
        for (i, t) in tenants.iter_mut().enumerate() {
            let Some(t) = t.as_object_mut() else {
                problems.push(problem(
                    version,
                    &format!("tenant[{i}]"),
                    "must be an object",
                ));
                continue;
            };
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("tenant")
                .to_string();
            for (inline, file_key, ext) in [
                ("client_secret", "client_secret_file", "secret"),
                ("certificate_pem", "certificate_file", "pem"),
                ("private_key_pem", "private_key_file", "key"),
            ] {
                let Some(v) = t.remove(inline) else { continue };
                let Some(text) = v.as_str() else {
                    problems.push(problem(
                        version,
                        &format!("tenant[{i}].{inline}"),
                        "must be a string",
                    ));
                    continue;
                };
                if t.contains_key(file_key) {
                    problems.push(problem(
                        version,
                        &format!("tenant[{i}].{inline}"),
                        format!("give either {inline} or {file_key}, not both"),
                    ));
                    continue;
                }
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
    if let Some(tenants) = merged.get_mut("tenant").and_then(Value::as_array_mut) {
        for t in tenants.iter_mut().filter_map(Value::as_object_mut) {
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
    let problems = config.validate();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems
            .into_iter()
            .map(|p| problem(version, &p.field, p.reason))
            .collect())
    }
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

//! Hand-off of a signed update bundle to the host's updater: on the appliance image,
//! `/usr/libexec/m365-sensor/m365-update`, run as root by `m365-sensor-update.path` (see `docs/IMAGE.md`).
//!
//! Invariant: the agent never installs anything itself. It places a bundle whose SHA-256 it verified under
//! `<state_dir>/update/`, writes the request file `<state_dir>/update-requested` (atomically, 0600), and
//! reads the updater's answer from `<state_dir>/update-result.json`. The updater checks the bundle's
//! signature, target and version before RAUC writes the inactive slot; a bundle that fails the SHA-256
//! check is deleted and never handed over.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::client::ManagementClient;
use crate::store;

/// Where the appliance image installs the updater.
pub const UPDATER: &str = "/usr/libexec/m365-sensor/m365-update";
/// Environment variable that points the check for an updater elsewhere (tests; the agent never runs it).
pub const UPDATER_ENV: &str = "M365_SENSOR_UPDATER";
/// Bundles are downloaded into this directory of the state directory.
pub const BUNDLE_DIR: &str = "update";
/// The request file the updater's path unit watches.
pub const REQUEST_FILE: &str = "update-requested";
/// The updater's answer.
pub const RESULT_FILE: &str = "update-result.json";
/// The largest bundle downloaded (a root image of 512 MiB with its boot and verity images fits).
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;

/// Why an update could not be handed over or did not install.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The host has no updater (not the appliance image).
    #[error("this host has no updater ({0} is missing: not the appliance image); update the package instead")]
    NoUpdater(PathBuf),
    /// The command's arguments are wrong.
    #[error("install_update: {0}")]
    BadArgs(String),
    /// The download failed.
    #[error("downloading {url}: {reason}")]
    Download {
        /// The bundle's URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The download's SHA-256 is not the one given; the file was deleted.
    #[error("the bundle from {url} has SHA-256 {actual}, not the expected {expected}; it was deleted and not installed")]
    Checksum {
        /// The bundle's URL.
        url: String,
        /// The SHA-256 the command named.
        expected: String,
        /// The SHA-256 of what arrived.
        actual: String,
    },
    /// A file of the hand-off could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The updater did not answer in time.
    #[error("the updater did not answer within {0} s (is m365-sensor-update.path active?); {1}")]
    NoAnswer(u64, String),
    /// The updater's answer is unreadable.
    #[error("the updater's answer {path} is unreadable: {reason}")]
    BadAnswer {
        /// The result file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The updater this host has, if any.
pub fn updater() -> Option<PathBuf> {
    let path = std::env::var_os(UPDATER_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(UPDATER));
    path.is_file().then_some(path)
}

/// An `install_update` command's arguments. Invariant: `sha256` is 64 lowercase hex digits and `url` is
/// an `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateRequest {
    /// Where the bundle is.
    pub url: String,
    /// Its SHA-256.
    pub sha256: String,
    /// Reboot into the new slot once it is installed (default yes).
    pub reboot: bool,
    /// Install a version that is not newer than the running one (default no).
    pub allow_downgrade: bool,
}

/// Checks a SHA-256 given as hex; returns it in lowercase.
pub fn parse_sha256(text: &str) -> Result<String, String> {
    let t = text.trim().to_ascii_lowercase();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(t)
    } else {
        Err(format!("`{text}` is not a SHA-256 (64 hex digits)"))
    }
}

impl UpdateRequest {
    /// Reads `url`, `sha256` and the optional `reboot` and `allow_downgrade` from a command's `args`.
    pub fn from_args(args: &serde_json::Value) -> Result<Self, UpdateError> {
        let args = args
            .as_object()
            .ok_or_else(|| UpdateError::BadArgs("args must be a JSON object".into()))?;
        let text = |key: &str| {
            args.get(key)
                .and_then(|v| v.as_str())
                .ok_or_else(|| UpdateError::BadArgs(format!("args.{key} (a string) is missing")))
        };
        let flag = |key: &str, default: bool| match args.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(other) => Err(UpdateError::BadArgs(format!(
                "args.{key} must be true or false, not {other}"
            ))),
        };
        let url = text("url")?;
        if !url.starts_with("https://") || url::Url::parse(url).is_err() {
            return Err(UpdateError::BadArgs(format!(
                "args.url `{url}` is not an https:// URL"
            )));
        }
        let sha256 = parse_sha256(text("sha256")?)
            .map_err(|e| UpdateError::BadArgs(format!("args.sha256: {e}")))?;
        Ok(Self {
            url: url.to_string(),
            sha256,
            reboot: flag("reboot", true)?,
            allow_downgrade: flag("allow_downgrade", false)?,
        })
    }
}

/// The file name a bundle for command `id` is stored under: only `[A-Za-z0-9._-]`, ending `.raucb`.
pub fn bundle_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{safe}.raucb")
}

/// Downloads `url` into `<state_dir>/update/<name>`, at most [`MAX_BUNDLE_BYTES`], and checks its SHA-256
/// against `expected` (when given). Returns the file and its SHA-256. On any failure nothing is left
/// behind under the final name.
pub async fn download(
    client: &ManagementClient,
    url: &str,
    state_dir: &Path,
    name: &str,
    expected: Option<&str>,
) -> Result<(PathBuf, String), UpdateError> {
    let dir = state_dir.join(BUNDLE_DIR);
    store::private_dir(&dir).map_err(io(&dir))?;
    let path = dir.join(name);
    let part = dir.join(format!("{name}.part"));
    let failed = |reason: String| UpdateError::Download {
        url: url.to_string(),
        reason,
    };
    let mut resp = client
        .get_absolute(url)
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .map_err(|e| failed(sensor_core::describe_error(&e)))?;
    if !resp.status().is_success() {
        return Err(failed(format!("HTTP {}", resp.status().as_u16())));
    }
    let _ = std::fs::remove_file(&part);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&part)
        .map_err(io(&part))?;
    let mut hash = Sha256::new();
    let mut len: u64 = 0;
    let outcome = async {
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| failed(sensor_core::describe_error(&e)))?
        {
            len += chunk.len() as u64;
            if len > MAX_BUNDLE_BYTES {
                return Err(failed(format!(
                    "larger than {MAX_BUNDLE_BYTES} bytes: refused"
                )));
            }
            hash.update(&chunk);
            file.write_all(&chunk).map_err(io(&part))?;
        }
        file.sync_all().map_err(io(&part))
    }
    .await;
    if let Err(e) = outcome {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    let actual = hex::encode(hash.finalize());
    if let Some(expected) = expected {
        if actual != expected {
            let _ = std::fs::remove_file(&part);
            return Err(UpdateError::Checksum {
                url: url.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    std::fs::rename(&part, &path).map_err(io(&path))?;
    store::sync_dir(&dir).map_err(io(&dir))?;
    Ok((path, actual))
}

/// The updater's answer (one JSON line, see `m365-update`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// Whether the bundle was installed.
    pub ok: bool,
    /// `installed`, `refused`, `failed`, `in_progress` or `interrupted`.
    pub code: String,
    /// The slot written.
    #[serde(default)]
    pub slot: String,
    /// The bundle's version.
    #[serde(default)]
    pub version: String,
    /// The request's id, echoed.
    #[serde(default)]
    pub id: String,
    /// What happened, for a person.
    #[serde(default)]
    pub message: String,
}

/// Asks the updater to install `bundle` (which must lie in `<state_dir>/update/`): removes an old answer,
/// then writes the request file atomically. The reboot is the agent's, after it reported the result.
pub fn request_install(
    state_dir: &Path,
    bundle: &Path,
    id: &str,
    allow_downgrade: bool,
) -> Result<(), UpdateError> {
    let answer = state_dir.join(RESULT_FILE);
    match std::fs::remove_file(&answer) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&answer)(e)),
    }
    let path = state_dir.join(REQUEST_FILE);
    let text = format!(
        "bundle={}\nid={id}\nreboot=no\nallow_downgrade={}\n",
        bundle.display(),
        if allow_downgrade { "yes" } else { "no" }
    );
    store::write_private(&path, text.as_bytes()).map_err(io(&path))
}

/// Reads the updater's answer for request `id`, if it has given a final one.
pub fn read_outcome(state_dir: &Path, id: &str) -> Result<Option<UpdateOutcome>, UpdateError> {
    let path = state_dir.join(RESULT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let outcome: UpdateOutcome =
        serde_json::from_str(text.trim()).map_err(|e| UpdateError::BadAnswer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if outcome.id != id || outcome.code == "in_progress" {
        return Ok(None);
    }
    Ok(Some(outcome))
}

/// How long an answer may stay unreadable before it counts as garbage (a writer that does not replace
/// the file atomically can be caught half way).
const UNREADABLE_GRACE: Duration = Duration::from_secs(10);

/// Waits up to `timeout` for the updater's final answer to request `id`.
pub async fn wait_outcome(
    state_dir: &Path,
    id: &str,
    timeout: Duration,
) -> Result<UpdateOutcome, UpdateError> {
    let start = Instant::now();
    let mut unreadable_since: Option<Instant> = None;
    loop {
        match read_outcome(state_dir, id) {
            Ok(Some(o)) => return Ok(o),
            Ok(None) => unreadable_since = None,
            Err(e @ UpdateError::BadAnswer { .. }) => {
                let since = *unreadable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNREADABLE_GRACE {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        if start.elapsed() >= timeout {
            let pending = state_dir.join(REQUEST_FILE).exists();
            return Err(UpdateError::NoAnswer(
                timeout.as_secs(),
                if pending {
                    "the request is still waiting: nothing picked it up".to_string()
                } else {
                    "the updater took the request but gave no final answer".to_string()
                },
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_checked_by_name() {
        let sha = "AB".repeat(32);
        let ok =
            UpdateRequest::from_args(&json!({"url": "https://b.example/x.raucb", "sha256": sha}))
                .expect("valid");
        assert_eq!(ok.sha256, "ab".repeat(32));
        assert!(ok.reboot && !ok.allow_downgrade);
        let e = |v| {
            UpdateRequest::from_args(&v)
                .expect_err("invalid")
                .to_string()
        };
        assert!(e(json!({"sha256": "ab".repeat(32)})).contains("args.url"));
        assert!(
            e(json!({"url": "http://b/x", "sha256": "ab".repeat(32)})).contains("not an https://")
        );
        assert!(e(json!({"url": "https://b/x", "sha256": "abc"})).contains("args.sha256"));
        assert!(
            e(json!({"url": "https://b/x", "sha256": "ab".repeat(32), "reboot": "yes"}))
                .contains("args.reboot")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_caught_half_written_is_read_again() {
        let d = tempfile::tempdir().expect("tempdir");
        let answer = d.path().join(RESULT_FILE);
        std::fs::write(&answer, "").expect("write");
        let path = answer.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            std::fs::write(
                &path,
                r#"{"ok":true,"code":"installed","slot":"B","id":"c1"}"#,
            )
            .expect("write");
        });
        let o = wait_outcome(d.path(), "c1", Duration::from_secs(60))
            .await
            .expect("the complete answer");
        assert_eq!(o.slot, "B");
        writer.await.expect("writer");
        std::fs::write(&answer, "{").expect("write");
        let e = wait_outcome(d.path(), "c1", Duration::from_secs(60))
            .await
            .expect_err("garbage that stays");
        assert!(e.to_string().contains("unreadable"), "{e}");
    }

    #[test]
    fn bundle_names_cannot_leave_the_directory() {
        assert_eq!(bundle_name("../../etc/passwd"), "______etc_passwd.raucb");
        assert_eq!(bundle_name("cmd-1"), "cmd-1.raucb");
    }

    #[test]
    fn the_request_replaces_an_old_answer_and_only_a_final_answer_for_this_id_counts() {
        let d = tempfile::tempdir().expect("tempdir");
        let answer = d.path().join(RESULT_FILE);
        std::fs::write(&answer, r#"{"ok":true,"code":"installed","id":"old"}"#).expect("write");
        let bundle = d.path().join(BUNDLE_DIR).join("c1.raucb");
        request_install(d.path(), &bundle, "c1", false).expect("request");
        assert!(!answer.exists(), "the old answer is removed");
        let req = std::fs::read_to_string(d.path().join(REQUEST_FILE)).expect("request file");
        assert!(req.contains(&format!("bundle={}\n", bundle.display())));
        assert!(req.contains("id=c1\nreboot=no\nallow_downgrade=no\n"));
        assert_eq!(read_outcome(d.path(), "c1").expect("read"), None);
        std::fs::write(&answer, r#"{"ok":false,"code":"in_progress","id":"c1"}"#).expect("write");
        assert_eq!(read_outcome(d.path(), "c1").expect("read"), None);
        std::fs::write(
            &answer,
            r#"{"ok":true,"code":"installed","slot":"B","version":"2","id":"c1","message":"m"}"#,
        )
        .expect("write");
        let o = read_outcome(d.path(), "c1").expect("read").expect("final");
        assert!(o.ok && o.slot == "B" && o.version == "2");
        std::fs::write(&answer, "garbage").expect("write");
        assert!(read_outcome(d.path(), "c1")
            .expect_err("garbage")
            .to_string()
            .contains(RESULT_FILE));
    }
}

//! Hand-off of a signed update bundle to the host's updater: on the appliance image,
//! `/usr/libexec/m365-sensor/m365-update`, run as root by `m365-sensor-update.path` (see `docs/IMAGE.md`).
//!
//! Invariant: the agent never installs anything itself. It places a bundle whose SHA-256 it verified under
//! `<state_dir>/update/`, writes the request file `<state_dir>/update-requested` (atomically, 0600), and
//! reads the updater's answer from [`RESULT_PATH`] (`/run/m365-update/result.json`, a directory only root
//! writes: nothing root writes ever lands in the agent's directory). The updater copies the bundle into a
//! root-owned directory and checks that copy's signature, target and version before RAUC writes it into the
//! inactive slot; a bundle that fails the SHA-256 check is deleted and never handed over.
//!
//! Every value the agent writes into the request (read by root) is checked against a strict byte set
//! first ([`request_install`]): a command id with a newline cannot add a key. The request carries no
//! downgrade flag: a downgrade is allowed only by a local switch on the device, never by the backend
//! ([`UpdateRequest::from_args`] refuses `allow_downgrade`).

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
/// The updater's answer: in a root-owned directory under `/run`, never in the agent's state directory.
pub const RESULT_PATH: &str = "/run/m365-update/result.json";
/// Environment variable that points the agent at another answer file (tests).
pub const RESULT_ENV: &str = "M365_SENSOR_UPDATE_RESULT";
/// The longest command id handed to the updater.
pub const MAX_ID_BYTES: usize = 128;
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
    /// A value that would cross into the root-read request file has bytes outside its safe set.
    #[error("{key} `{value}` is refused in the update request: {reason}")]
    Unsafe {
        /// The request key.
        key: &'static str,
        /// The value, escaped for display.
        value: String,
        /// The rule it broke.
        reason: &'static str,
    },
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

/// Where the updater's answer is read: [`RESULT_ENV`] when set, else [`RESULT_PATH`].
pub fn result_path() -> PathBuf {
    std::env::var_os(RESULT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RESULT_PATH))
}

/// The updater this host has, if any.
pub fn updater() -> Option<PathBuf> {
    let path = std::env::var_os(UPDATER_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(UPDATER));
    path.is_file().then_some(path)
}

/// An `install_update` command's arguments. Invariant: `sha256` is 64 lowercase hex digits and `url` is
/// an `https://` URL; there is no downgrade flag (the backend cannot ask for one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateRequest {
    /// Where the bundle is.
    pub url: String,
    /// Its SHA-256.
    pub sha256: String,
    /// Reboot into the new slot once it is installed (default yes).
    pub reboot: bool,
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
    /// Reads `url`, `sha256` and the optional `reboot` from a command's `args`. `allow_downgrade: true` is
    /// refused: a downgrade is the device's decision (a local switch), never the backend's.
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
        if flag("allow_downgrade", false)? {
            return Err(UpdateError::BadArgs(
                "args.allow_downgrade is refused: downgrades are allowed only by the local switch on the device \
                 (/usr/lib/m365-sensor/allow-downgrade in the image, or ALLOW_DOWNGRADE=yes in the provisioning \
                 seed), never by the backend; and never below the image's MIN_VERSION"
                    .into(),
            ));
        }
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

/// Whether `id` may cross into the root-read request file: 1 to [`MAX_ID_BYTES`] bytes of
/// `[A-Za-z0-9._:@-]` (the updater matches the same pattern).
pub fn safe_id(id: &str) -> Result<(), UpdateError> {
    let unsafe_id = |reason| UpdateError::Unsafe {
        key: "id",
        value: id.escape_debug().to_string(),
        reason,
    };
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(unsafe_id("a command id is 1 to 128 bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
    {
        return Err(unsafe_id(
            "only A-Z a-z 0-9 . _ : @ - may cross into a file root reads (no newline, no `=`)",
        ));
    }
    Ok(())
}

/// The request file's text for `bundle` (which must be `<state_dir>/update/<[A-Za-z0-9_-]{1,64}>.raucb`,
/// the path [`bundle_name`] and [`download`] make) and command `id`. Refuses anything else by key.
pub fn request_text(state_dir: &Path, bundle: &Path, id: &str) -> Result<String, UpdateError> {
    safe_id(id)?;
    let unsafe_bundle = |reason| UpdateError::Unsafe {
        key: "bundle",
        value: bundle.display().to_string().escape_debug().to_string(),
        reason,
    };
    let name = bundle
        .strip_prefix(state_dir.join(BUNDLE_DIR))
        .ok()
        .and_then(|rest| rest.to_str())
        .ok_or_else(|| unsafe_bundle("the bundle must lie directly in <state_dir>/update/"))?;
    let stem = name
        .strip_suffix(".raucb")
        .ok_or_else(|| unsafe_bundle("the bundle's name must end .raucb"))?;
    if stem.is_empty()
        || stem.len() > 64
        || !stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(unsafe_bundle(
            "the bundle's name is 1 to 64 bytes of A-Z a-z 0-9 _ - before .raucb",
        ));
    }
    let path = bundle
        .to_str()
        .filter(|p| {
            p.starts_with('/')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
                && !p.contains("..")
        })
        .ok_or_else(|| {
            unsafe_bundle("the bundle path is absolute, of A-Z a-z 0-9 / . _ - only, without `..`")
        })?;
    Ok(format!("bundle={path}\nid={id}\nreboot=no\n"))
}

/// Asks the updater to install `bundle` (which must lie in `<state_dir>/update/`): writes the request file
/// atomically (0600), after checking every value in it ([`request_text`]). The answer is root's to
/// replace (the updater writes `in_progress` for this id first); the reboot is the agent's, after it
/// reported the result.
pub fn request_install(state_dir: &Path, bundle: &Path, id: &str) -> Result<(), UpdateError> {
    let text = request_text(state_dir, bundle, id)?;
    let path = state_dir.join(REQUEST_FILE);
    store::write_private(&path, text.as_bytes()).map_err(io(&path))
}

/// Reads the updater's answer at `result` for request `id`, if it has given a final one.
pub fn read_outcome(result: &Path, id: &str) -> Result<Option<UpdateOutcome>, UpdateError> {
    let path = result;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let outcome: UpdateOutcome =
        serde_json::from_str(text.trim()).map_err(|e| UpdateError::BadAnswer {
            path: path.to_path_buf(),
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

/// Waits up to `timeout` for the updater's final answer to request `id` at `result` (the request file is
/// looked for in `state_dir` only to say why nothing came).
pub async fn wait_outcome(
    result: &Path,
    state_dir: &Path,
    id: &str,
    timeout: Duration,
) -> Result<UpdateOutcome, UpdateError> {
    let start = Instant::now();
    let mut unreadable_since: Option<Instant> = None;
    loop {
        match read_outcome(result, id) {
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
        assert!(ok.reboot);
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
        let answer = d.path().join("result.json");
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
        let o = wait_outcome(&answer, d.path(), "c1", Duration::from_secs(60))
            .await
            .expect("the complete answer");
        assert_eq!(o.slot, "B");
        writer.await.expect("writer");
        std::fs::write(&answer, "{").expect("write");
        let e = wait_outcome(&answer, d.path(), "c1", Duration::from_secs(60))
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
    fn the_request_carries_checked_values_and_only_a_final_answer_for_this_id_counts() {
        let d = tempfile::tempdir().expect("tempdir");
        let run = tempfile::tempdir().expect("tempdir");
        let answer = run.path().join("result.json");
        std::fs::write(&answer, r#"{"ok":true,"code":"installed","id":"old"}"#).expect("write");
        let bundle = d.path().join(BUNDLE_DIR).join("c1.raucb");
        request_install(d.path(), &bundle, "c1").expect("request");
        let req = std::fs::read_to_string(d.path().join(REQUEST_FILE)).expect("request file");
        assert_eq!(
            req,
            format!("bundle={}\nid=c1\nreboot=no\n", bundle.display()),
            "exactly the three keys the updater knows, and no downgrade flag"
        );
        assert_eq!(
            read_outcome(&answer, "c1").expect("read"),
            None,
            "an old answer for another id"
        );
        std::fs::write(&answer, r#"{"ok":false,"code":"in_progress","id":"c1"}"#).expect("write");
        assert_eq!(read_outcome(&answer, "c1").expect("read"), None);
        std::fs::write(
            &answer,
            r#"{"ok":true,"code":"installed","slot":"B","version":"2","id":"c1","message":"m"}"#,
        )
        .expect("write");
        let o = read_outcome(&answer, "c1").expect("read").expect("final");
        assert!(o.ok && o.slot == "B" && o.version == "2");
        std::fs::write(&answer, "garbage").expect("write");
        assert!(read_outcome(&answer, "c1")
            .expect_err("garbage")
            .to_string()
            .contains("result.json"));
    }

    #[test]
    fn the_answer_is_read_from_a_root_owned_directory_under_run() {
        assert_eq!(RESULT_PATH, "/run/m365-update/result.json");
        assert!(!Path::new(RESULT_PATH).starts_with("/var/lib/m365-sensor"));
    }

    #[test]
    fn hostile_ids_and_bundle_paths_never_reach_the_request_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let good = d.path().join(BUNDLE_DIR).join("c1.raucb");
        let refused = |bundle: &Path, id: &str| {
            let e = request_install(d.path(), bundle, id).expect_err("refused");
            assert!(
                !d.path().join(REQUEST_FILE).exists(),
                "nothing written for {id:?}"
            );
            e.to_string()
        };
        // A newline in the id would add `reboot=yes` (or any key) to a file root parses.
        let e = refused(&good, "c1\nreboot=yes");
        assert!(
            e.contains("id `c1\\nreboot=yes`") && e.contains("no newline"),
            "{e}"
        );
        for id in [
            "",
            "c1\rreboot=yes",
            "a=b",
            "c1\u{0}",
            "c1 x",
            "ü",
            "$(reboot)",
            "../x",
            &"a".repeat(129),
        ] {
            assert!(refused(&good, id).contains("id `"), "{id:?}");
        }
        assert!(request_text(d.path(), &good, &"a".repeat(128)).is_ok());
        assert!(request_text(d.path(), &good, "0f3c-9a:cmd@b_1.2").is_ok());
        // The bundle: in <state>/update/, a plain name, nothing else.
        for (bundle, why) in [
            (d.path().join("c1.raucb"), "directly in <state_dir>/update/"),
            (
                d.path().join(BUNDLE_DIR).join("sub/c1.raucb"),
                "1 to 64 bytes",
            ),
            (d.path().join(BUNDLE_DIR).join("c1.tar"), "end .raucb"),
            (
                d.path().join(BUNDLE_DIR).join("c\n1.raucb"),
                "1 to 64 bytes",
            ),
            (
                d.path().join(BUNDLE_DIR).join("../c1.raucb"),
                "1 to 64 bytes",
            ),
            (
                PathBuf::from("/etc/shadow"),
                "directly in <state_dir>/update/",
            ),
        ] {
            let e = refused(&bundle, "c1");
            assert!(e.contains("bundle `") && e.contains(why), "{bundle:?}: {e}");
        }
        let odd = Path::new("/var/lib/a b");
        let e = request_text(odd, &odd.join(BUNDLE_DIR).join("c1.raucb"), "c1")
            .expect_err("a state_dir with a blank");
        assert!(e.to_string().contains("absolute, of A-Z"), "{e}");
    }

    #[test]
    fn the_backend_cannot_ask_for_a_downgrade() {
        let sha = "ab".repeat(32);
        let e = UpdateRequest::from_args(
            &json!({"url": "https://b.example/x.raucb", "sha256": sha, "allow_downgrade": true}),
        )
        .expect_err("refused")
        .to_string();
        assert!(
            e.contains(
                "args.allow_downgrade is refused: downgrades are allowed only by the local switch"
            ),
            "{e}"
        );
        assert!(UpdateRequest::from_args(
            &json!({"url": "https://b.example/x.raucb", "sha256": sha, "allow_downgrade": false})
        )
        .is_ok());
    }
}

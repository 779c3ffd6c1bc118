//! The management messages of the backend protocol (`shared/design/backend-protocol.md`): heartbeat
//! answers, commands, the managed configuration, command results, enrolment and renewal. Invariant: the
//! shapes here are the protocol's, field for field; unknown fields of an answer are ignored (the backend
//! may add some), missing required ones are errors naming the field.
//!
//! A command's id is written into files (the journal, the reboot and update requests) and URLs
//! (`/v1/commands/<id>/result`): [`HeartbeatAnswer::commands`] hands out a command only when its id is 1
//! to [`MAX_COMMAND_ID_BYTES`] of `A-Z a-z 0-9 . _ : -`, its kind 1 to [`MAX_COMMAND_KIND_BYTES`] of
//! `a-z 0-9 _`, and its args a JSON object of at most [`MAX_COMMAND_ARGS_BYTES`]; anything else is a
//! [`CommandRefusal`] that shows the hostile value escaped and shortened, never raw.

use serde::{Deserialize, Serialize};

/// Longest command id, in bytes.
pub const MAX_COMMAND_ID_BYTES: usize = 128;
/// Longest command kind, in bytes.
pub const MAX_COMMAND_KIND_BYTES: usize = 64;
/// Largest command args, as JSON bytes.
pub const MAX_COMMAND_ARGS_BYTES: usize = 64 * 1024;
/// Most commands taken from one heartbeat answer; the rest wait for the next heartbeat (the backend
/// repeats a command until its result arrives).
pub const MAX_COMMANDS_PER_ANSWER: usize = 64;

/// The answer to `POST /v1/heartbeat`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct HeartbeatAnswer {
    /// The newest managed configuration version the backend holds for this sensor.
    pub config_version: u64,
    /// Commands to run, as sent (each at most once; the backend repeats them until a result arrives).
    /// Read them through [`HeartbeatAnswer::commands`], which checks them.
    #[serde(default)]
    pub commands: Vec<serde_json::Value>,
}

impl HeartbeatAnswer {
    /// The first [`MAX_COMMANDS_PER_ANSWER`] commands, each checked: a command whose id, kind or args is
    /// not what the protocol allows is a refusal and must not run.
    pub fn commands(&self) -> Vec<Result<Command, CommandRefusal>> {
        self.commands
            .iter()
            .take(MAX_COMMANDS_PER_ANSWER)
            .map(Command::check)
            .collect()
    }
}

/// Whether `id` may be a command id: 1 to [`MAX_COMMAND_ID_BYTES`] of `A-Z a-z 0-9 . _ : -`, and not `.`
/// or `..` (it becomes a path segment of a URL).
pub fn valid_command_id(id: &str) -> bool {
    (1..=MAX_COMMAND_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        && id != "."
        && id != ".."
}

/// Whether `kind` may be a command kind: 1 to [`MAX_COMMAND_KIND_BYTES`] of `a-z 0-9 _`.
pub fn valid_command_kind(kind: &str) -> bool {
    (1..=MAX_COMMAND_KIND_BYTES).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `s` as it may be shown in a log line or a status: escaped (`{:?}`), at most 64 characters of it, with
/// its length when shortened. Invariant: the result holds no control character and is short.
pub fn shown(s: &str) -> String {
    let head: String = s.chars().take(64).collect();
    if head.len() == s.len() {
        format!("{head:?}")
    } else {
        format!("{head:?}… ({} bytes)", s.len())
    }
}

/// Why a command of a heartbeat answer is not run. Invariant: every value in it is already escaped and
/// shortened by [`shown`], except an id that passed [`valid_command_id`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandRefusal {
    /// The command is not an object with a string `id` and `kind`.
    #[error(
        "a command that is not an object with a string id and kind was refused, not run: {shown}"
    )]
    Malformed {
        /// The command, escaped and shortened.
        shown: String,
    },
    /// The id is not one the protocol allows.
    #[error("command {kind} with id {id} was refused, not run: an id is 1 to 128 of A-Z a-z 0-9 . _ : - (it names files and URLs)")]
    InvalidId {
        /// The id, escaped and shortened.
        id: String,
        /// The kind, escaped and shortened.
        kind: String,
    },
    /// The kind is not one the protocol allows.
    #[error("command {id}: kind {kind} was refused, not run: a kind is 1 to 64 of a-z 0-9 _")]
    InvalidKind {
        /// The id (valid).
        id: String,
        /// The kind, escaped and shortened.
        kind: String,
    },
    /// The args are not a JSON object or too large.
    #[error("command {id} ({kind}): args refused, not run: {why}")]
    InvalidArgs {
        /// The id (valid).
        id: String,
        /// The kind (valid).
        kind: String,
        /// What is wrong with them.
        why: String,
    },
}

impl CommandRefusal {
    /// The command's id when it is valid (the refusal can then be reported as the command's result).
    pub fn reportable_id(&self) -> Option<&str> {
        match self {
            CommandRefusal::InvalidKind { id, .. } | CommandRefusal::InvalidArgs { id, .. } => {
                Some(id)
            }
            _ => None,
        }
    }
}

/// One command of a heartbeat answer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Command {
    /// Unique id; results go to `/v1/commands/<id>/result`.
    pub id: String,
    /// `rotate_credentials`, `resync`, `set_log_level`, `collect_diagnostics`, `install_update`, `reboot`.
    pub kind: String,
    /// Arguments of the kind.
    #[serde(default)]
    pub args: serde_json::Value,
}

impl Command {
    /// Checks one command of a heartbeat answer (see the module's header).
    pub fn check(v: &serde_json::Value) -> Result<Command, CommandRefusal> {
        let (Some(id), Some(kind)) = (
            v.get("id").and_then(serde_json::Value::as_str),
            v.get("kind").and_then(serde_json::Value::as_str),
        ) else {
            return Err(CommandRefusal::Malformed {
                shown: shown(&v.to_string()),
            });
        };
        if !valid_command_id(id) {
            return Err(CommandRefusal::InvalidId {
                id: shown(id),
                kind: shown(kind),
            });
        }
        if !valid_command_kind(kind) {
            return Err(CommandRefusal::InvalidKind {
                id: id.to_string(),
                kind: shown(kind),
            });
        }
        let args = match v.get("args") {
            None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
            Some(a @ serde_json::Value::Object(_)) => a.clone(),
            Some(_) => {
                return Err(CommandRefusal::InvalidArgs {
                    id: id.to_string(),
                    kind: kind.to_string(),
                    why: "args must be a JSON object".into(),
                })
            }
        };
        let bytes = args.to_string().len();
        if bytes > MAX_COMMAND_ARGS_BYTES {
            return Err(CommandRefusal::InvalidArgs {
                id: id.to_string(),
                kind: kind.to_string(),
                why: format!("{bytes} bytes of JSON, above the bound of {MAX_COMMAND_ARGS_BYTES}"),
            });
        }
        Ok(Command {
            id: id.to_string(),
            kind: kind.to_string(),
            args,
        })
    }
}

/// The answer to `GET /v1/config`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ConfigAnswer {
    /// Version of `config`.
    pub version: u64,
    /// The managed part of the configuration (same schema as the TOML file).
    pub config: serde_json::Value,
}

/// The body of `POST /v1/commands/<id>/result`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct CommandResult {
    /// Whether the command did what it was asked.
    pub ok: bool,
    /// What happened, for a person.
    pub message: String,
}

/// The body of `POST /v1/enroll`.
#[derive(Clone, Debug, Serialize)]
pub struct EnrollRequest<'a> {
    /// The single-use enrolment token.
    pub enrollment_token: &'a str,
    /// The device's certificate signing request (PEM); its key never leaves the device.
    pub csr_pem: &'a str,
    /// The device's host name.
    pub hostname: &'a str,
    /// `x86_64` or `aarch64`.
    pub arch: &'a str,
    /// The agent's version.
    pub version: &'a str,
}

/// The answer to a successful `POST /v1/enroll` (201).
#[derive(Clone, Debug, Deserialize)]
pub struct EnrollAnswer {
    /// The id the backend gave the device.
    pub sensor_id: String,
    /// The device certificate (PEM), issued for the CSR's key.
    pub certificate_pem: String,
    /// The CA that issued it (PEM).
    pub ca_pem: String,
    /// The initial managed configuration, if any.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// The body of `POST /v1/renew` (our extension: mutual TLS with the current certificate).
#[derive(Clone, Debug, Serialize)]
pub struct RenewRequest<'a> {
    /// A CSR for the new key.
    pub csr_pem: &'a str,
}

/// The answer to `POST /v1/renew`.
#[derive(Clone, Debug, Deserialize)]
pub struct RenewAnswer {
    /// The new certificate (PEM).
    pub certificate_pem: String,
    /// The issuing CA (PEM).
    pub ca_pem: String,
}

/// The backend's error body, `{"error": "..."}`, when it sends one.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorBody {
    /// What the backend says went wrong.
    pub error: String,
}

/// The `error` text of a backend answer body, or the body itself (shortened) when it is not one.
pub fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let short: String = text.chars().take(300).collect();
            if short.is_empty() {
                "(empty body)".to_string()
            } else {
                short
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_answer_reads_commands_and_tolerates_new_fields() {
        let a: HeartbeatAnswer = serde_json::from_str(
            r#"{"config_version":3,"commands":[{"id":"c1","kind":"reboot","args":{}}],"later":1}"#,
        )
        .expect("parse");
        assert_eq!(a.config_version, 3);
        assert_eq!(
            a.commands()[0].as_ref().map(|c| c.kind.as_str()),
            Ok("reboot")
        );
        let e = serde_json::from_str::<HeartbeatAnswer>(r#"{"commands":[]}"#)
            .expect_err("config_version is required");
        assert!(e.to_string().contains("config_version"), "{e}");
    }

    /// Issue 18 item 4: a command id is written into files and URLs; a newline in it injected a line
    /// into the root helper's request file.
    #[test]
    fn hostile_command_ids_kinds_and_args_are_refused_and_shown_escaped() {
        let big = "a".repeat(10 * 1024);
        let answer = serde_json::json!({"config_version": 1, "commands": [
            {"id": "ok-1.a:b_C", "kind": "reboot"},
            {"id": "x\nreboot=yes", "kind": "install_update", "args": {}},
            {"id": "../../etc/passwd", "kind": "reboot"},
            {"id": big, "kind": "reboot"},
            {"id": "nul\u{0}id", "kind": "reboot"},
            {"id": "", "kind": "reboot"},
            {"id": "..", "kind": "reboot"},
            {"id": 7, "kind": "reboot"},
            {"id": "k1", "kind": "Reboot\n"},
            {"id": "k2", "kind": "x".repeat(65)},
            {"id": "a1", "kind": "resync", "args": [1]},
            {"id": "a2", "kind": "resync", "args": {"x": "y".repeat(70_000)}},
            {"id": "a".repeat(128), "kind": "reboot", "args": null},
        ]});
        let a: HeartbeatAnswer = serde_json::from_value(answer).expect("parse");
        let c = a.commands();
        assert!(c[0].is_ok() && c[12].is_ok(), "{c:?}");
        for (i, r) in c.iter().enumerate().take(12).skip(1) {
            let e = r.as_ref().expect_err("refused");
            let text = e.to_string();
            assert!(
                !text.contains('\n') && !text.contains('\0') && text.len() < 400,
                "{i}: {text}"
            );
            assert!(text.contains("not run"), "{i}: {text}");
            let reportable = e.reportable_id().is_some();
            assert_eq!(reportable, i >= 8, "{i}: {text}");
        }
        assert!(c[1]
            .as_ref()
            .expect_err("id")
            .to_string()
            .contains(r#""x\nreboot=yes""#));
        assert!(c[1]
            .as_ref()
            .expect_err("id")
            .to_string()
            .contains("install_update"));
        assert!(c[3]
            .as_ref()
            .expect_err("id")
            .to_string()
            .contains("(10240 bytes)"));
        assert!(c[11]
            .as_ref()
            .expect_err("args")
            .to_string()
            .contains("65536"));
        let many: Vec<serde_json::Value> = (0..100)
            .map(|i| serde_json::json!({"id": format!("c{i}"), "kind": "resync"}))
            .collect();
        let a = HeartbeatAnswer {
            config_version: 0,
            commands: many,
        };
        assert_eq!(a.commands().len(), MAX_COMMANDS_PER_ANSWER);
    }

    #[test]
    fn error_text_prefers_the_error_field() {
        assert_eq!(error_text(br#"{"error":"token used"}"#), "token used");
        assert_eq!(error_text(b"<html>"), "<html>");
        assert_eq!(error_text(b""), "(empty body)");
    }
}

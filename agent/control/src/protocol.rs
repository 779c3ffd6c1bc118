//! The management messages of the backend protocol (`shared/design/backend-protocol.md`): heartbeat
//! answers, commands, the managed configuration, command results, enrolment and renewal. Invariant: the
//! shapes here are the protocol's, field for field; unknown fields of an answer are ignored (the backend
//! may add some), missing required ones are errors naming the field.

use serde::{Deserialize, Serialize};

/// The answer to `POST /v1/heartbeat`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct HeartbeatAnswer {
    /// The newest managed configuration version the backend holds for this sensor.
    pub config_version: u64,
    /// Commands to run (each at most once; the backend repeats them until a result arrives).
    #[serde(default)]
    pub commands: Vec<Command>,
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
        assert_eq!(a.commands[0].kind, "reboot");
        let e = serde_json::from_str::<HeartbeatAnswer>(r#"{"commands":[]}"#)
            .expect_err("config_version is required");
        assert!(e.to_string().contains("config_version"), "{e}");
    }

    #[test]
    fn error_text_prefers_the_error_field() {
        assert_eq!(error_text(br#"{"error":"token used"}"#), "token used");
        assert_eq!(error_text(b"<html>"), "<html>");
        assert_eq!(error_text(b""), "(empty body)");
    }
}

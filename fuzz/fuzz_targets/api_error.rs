//! An error answer of the Management Activity API (or of a proxy in front of it):
//! `m365_collector::api::classify`. Input: the HTTP status (2 bytes, big endian), then the body.
//!
//! Invariants: nothing panics; the error names the problem (its text is never blank); the server's text
//! reaches the error only redacted (no word of a text is changed by `sensor_core::status::redact`); the
//! throttling pause is consulted exactly when the answer is throttling; AF429 in the body is throttling
//! whatever the status (unless the body says audit logging is off, which is checked first).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use m365_collector::api::{classify, ApiError};
use sensor_core::status::redact;
use serde::Deserialize;

/// The API's error body, `{"error":{"code":"AF…","message":"…"}}`, as `api.rs` reads it.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    #[allow(dead_code)]
    message: String,
}

/// Whether `s` still holds something `redact` hides (a value after `client_secret=` and the like, a
/// JWT), word by word as `redact` reads it. A `:` the error's format glued to a word is not the server's,
/// and a word `redact` already produced (ending in `[redacted]`) is done: `redact` is not idempotent.
fn unredacted(s: &str) -> bool {
    s.split(' ')
        .map(|w| w.trim_end_matches(':'))
        .any(|w| redact(w) != w && !w.ends_with("[redacted]"))
}

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_be_bytes(*status);
    let mut paused = false;
    let err = classify(status, body, || {
        paused = true;
        Duration::from_secs(5)
    });
    assert_eq!(
        paused,
        matches!(err, ApiError::Throttled { .. }),
        "pause consulted for {err:?}"
    );
    let texts: Vec<&str> = match &err {
        ApiError::Throttled { text, .. }
        | ApiError::AuditDisabled(text)
        | ApiError::SubscriptionDisabled(text)
        | ApiError::NoSubscription(text)
        | ApiError::ContentExpired(text)
        | ApiError::WrongAudience(text) => vec![text],
        ApiError::WindowRejected { code, text }
        | ApiError::ContentGone { code, text }
        | ApiError::ConsentMissing { code, text, .. }
        | ApiError::Server { code, text, .. }
        | ApiError::Client { code, text, .. } => vec![code, text],
        ApiError::Auth(_)
        | ApiError::Transport(_)
        | ApiError::TooLarge { .. }
        | ApiError::BadResponse { .. } => panic!("an answer classified as {err:?}"),
    };
    let text = texts.last().copied().unwrap_or_default();
    assert!(
        !text.trim().is_empty(),
        "the error does not name the problem: {err:?}"
    );
    for t in texts {
        assert!(
            !unredacted(t),
            "unredacted server text reaches the error: {err:?}"
        );
    }
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        if b.error.code == "AF429" && !matches!(err, ApiError::AuditDisabled(_)) {
            assert!(
                matches!(err, ApiError::Throttled { .. }),
                "AF429 read as {err:?}"
            );
        }
    }
    let _ = (err.to_string(), err.is_transient());
});

//! An error answer of Entra's token endpoint (or of a proxy in front of it):
//! `m365_collector::auth::classify_entra_error`. Input: the HTTP status (2 bytes, big endian), then the
//! body.
//!
//! Invariants: nothing panics; the error names the problem (its text is never blank); no secret or token
//! reaches the error (`auth.rs`: no word of a text is changed by `sensor_core::status::redact`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use m365_collector::auth::{classify_entra_error, AuthError};
use sensor_core::status::redact;

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
    let err = classify_entra_error(status, body);
    let texts: Vec<&str> = match &err {
        AuthError::InvalidCredentials { code, text }
        | AuthError::SecretExpired { code, text }
        | AuthError::WrongCloud { code, text }
        | AuthError::Refused { code, text } => vec![code, text],
        AuthError::Unreachable(text) => vec![text],
        AuthError::Credential(_) => panic!("an answer is not a credential problem: {err:?}"),
    };
    let text = texts.last().copied().unwrap_or_default();
    assert!(
        !text.trim().is_empty(),
        "the error does not name the problem: {err:?}"
    );
    for t in texts {
        assert!(!unredacted(t), "a secret reaches the error: {err:?}");
    }
    let _ = (err.to_string(), err.is_transient());
});

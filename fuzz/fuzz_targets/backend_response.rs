//! The backend's answer to a batch, as the relay reads it: `sensor_relay::read_answer` (status,
//! `Retry-After` through `sensor_core::timefmt::retry_after`, body). Input: the HTTP status (2 bytes, big
//! endian), then the `Retry-After` value up to the first `\n` (no `\n`: no header), then the body
//! (decoded lossily, as reqwest's `text()` does).
//!
//! Invariants (`backend-protocol.md`, "Responses"): nothing panics; the action follows the status table;
//! a `Retry-After` is clamped to [1 s, 15 min] and a delay in seconds is always honoured; the quoted body
//! is a prefix of the body of at most `ANSWER_TEXT_CHARS` characters.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sensor_relay::{read_answer, Answer, ANSWER_TEXT_CHARS};

fuzz_target!(|data: &[u8]| {
    let Some((status, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_be_bytes(*status);
    let (retry_after, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (Some(String::from_utf8_lossy(&rest[..i])), &rest[i + 1..]),
        None => (None, rest),
    };
    let body = String::from_utf8_lossy(body);
    let answer = read_answer(status, retry_after.as_deref(), &body);
    let quoted = |text: &str| {
        let prefix = format!("HTTP {status}: ");
        let q = text
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{text:?} does not start with {prefix:?}"));
        assert!(q.chars().count() <= ANSWER_TEXT_CHARS);
        assert!(body.starts_with(q), "the quote is not the body's start");
    };
    match (status, &answer) {
        (200 | 202 | 409, Answer::Acked { already_stored }) => {
            assert_eq!(*already_stored, status == 409)
        }
        (413, Answer::TooLarge) => {}
        (400 | 422, Answer::Malformed { reason }) => quoted(reason),
        (401 | 403, Answer::AuthFailed { text }) => quoted(text),
        (429 | 503, Answer::Overloaded { retry_after: wait }) => {
            if let Some(d) = wait {
                assert!(
                    (Duration::from_secs(1)..=Duration::from_secs(900)).contains(d),
                    "Retry-After {retry_after:?} read as {d:?}"
                );
            }
            let v = retry_after.as_deref().unwrap_or_default().trim();
            if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                assert!(wait.is_some(), "the delay {v:?} was ignored");
            }
        }
        (200 | 202 | 409 | 413 | 400 | 422 | 401 | 403 | 429 | 503, _) => {
            panic!("HTTP {status} read as {answer:?}, against the protocol table")
        }
        (_, Answer::Failed { text }) => quoted(text),
        (_, _) => panic!("HTTP {status} read as {answer:?}, against the protocol table"),
    }
});

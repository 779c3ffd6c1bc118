//! Hostile input, checked on every `make test`: random and mutated bytes through every parser that reads
//! what Microsoft (or something pretending to be it) sends: blobs, error bodies of the API and of Entra,
//! and `Retry-After`. Each must answer with a typed result, never a panic. The same parsers, and more
//! invariants, are fuzzed coverage-guided by `fuzz/` (`scripts/fuzz.sh`, stable Rust with
//! `RUSTC_BOOTSTRAP=1`); this suite is the quick check that runs with every test.

use std::time::Duration;

use m365_collector::api::classify;
use m365_collector::auth::classify_entra_error;
use m365_collector::blob::parse_blob;
use proptest::prelude::*;

const SAMPLE_BLOB: &str = r#"[{"CreationTime":"2015-06-29T20:03:19","Id":"80c76bd2-9d81-4c57-a97a-accfc3443dca","Operation":"PasswordLogonInitialAuthUsingPassword","RecordType":9,"ExtendedProperties":[{"Name":"LoginError","Value":"-2147217390;PP_E_BAD_PASSWORD"}]},{"Id":"b","Workload":"Exchange"}]"#;
const SAMPLE_ERROR: &str =
    r#"{"error":{"code":"AF20023","message":"The subscription was disabled."}}"#;
const SAMPLE_ENTRA: &str = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#;

/// The sample with some bytes replaced, inserted or removed.
fn mutated(sample: &'static str) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 0..12).prop_map(move |edits| {
        let mut b = sample.as_bytes().to_vec();
        for (pos, byte, kind) in edits {
            let i = pos as usize % (b.len() + 1);
            match kind {
                0 if i < b.len() => b[i] = byte,
                1 => b.insert(i, byte),
                _ if i < b.len() => {
                    b.remove(i);
                }
                _ => {}
            }
        }
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn blobs_never_panic_and_valid_records_keep_their_bytes(body in prop_oneof![mutated(SAMPLE_BLOB), proptest::collection::vec(any::<u8>(), 0..256)]) {
        if let Ok(records) = parse_blob(&body) {
            let text = String::from_utf8_lossy(&body);
            for r in records {
                prop_assert!(!r.id.is_empty());
                prop_assert!(text.contains(r.raw), "a record's bytes are a slice of the blob");
            }
        }
    }

    #[test]
    fn api_error_bodies_never_panic(status in 100u16..600, body in prop_oneof![mutated(SAMPLE_ERROR), proptest::collection::vec(any::<u8>(), 0..256)]) {
        let e = classify(status, &body, || Duration::from_secs(1));
        prop_assert!(!e.to_string().is_empty());
    }

    #[test]
    fn entra_error_bodies_never_panic(status in 100u16..600, body in prop_oneof![mutated(SAMPLE_ENTRA), proptest::collection::vec(any::<u8>(), 0..256)]) {
        let e = classify_entra_error(status, &body);
        prop_assert!(!e.to_string().is_empty());
    }

    #[test]
    fn retry_after_never_panics(v in "\\PC{0,40}") {
        let mut h = reqwest::header::HeaderMap::new();
        if let Ok(value) = v.parse() {
            h.insert(reqwest::header::RETRY_AFTER, value);
        }
        let _ = m365_collector::api::retry_after(&h);
    }
}

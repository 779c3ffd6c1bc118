//! A content blob (a JSON array of audit records), as fetched from a `contentUri`:
//! `m365_collector::blob::parse_blob`, the parser whose output is spooled byte for byte.
//!
//! Invariants: nothing panics; every record is a sub-slice of the blob (records are never rewritten),
//! is a JSON object and carries the non-empty string `Id` (at most `MAX_ID_BYTES`) reported for it, as
//! the backend reads it; a blob holds no more records than its bytes allow; an error says which record
//! failed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m365_collector::blob::{parse_blob, BlobError, MAX_ID_BYTES};

/// A record's `Id`, as the backend reads it.
#[derive(serde::Deserialize)]
struct RecordId {
    #[serde(rename = "Id")]
    id: String,
}

/// The shortest record: `{"Id":"x"}`.
const MIN_RECORD_BYTES: usize = 10;

fuzz_target!(|body: &[u8]| {
    let blob = body.as_ptr_range();
    match parse_blob(body) {
        Ok(records) => {
            assert!(records.len() * MIN_RECORD_BYTES <= body.len());
            for r in &records {
                let raw = r.raw.as_bytes().as_ptr_range();
                assert!(
                    blob.start <= raw.start && raw.end <= blob.end,
                    "record {} is not a sub-slice of the blob",
                    r.id
                );
                assert!(!r.id.is_empty() && r.id.len() <= MAX_ID_BYTES);
                assert!(
                    r.raw.starts_with('{') && r.raw.ends_with('}'),
                    "{} is not an object",
                    r.id
                );
                // The backend reads the record's Id the way the reference receiver does
                // (tests/backend-receiver/src/ingest.rs), and must find the same one. (Strings are not
                // held to Unicode: a lone surrogate escape is valid JSON and stays as served.)
                let seen: RecordId =
                    serde_json::from_str(r.raw).expect("the backend reads the record's Id");
                assert_eq!(seen.id, r.id, "the Id reported is not the record's");
            }
        }
        Err(BlobError::MissingId { index }) => {
            // The failing record exists: the blob has at least index + 1 records.
            assert!(
                (index + 1) * 2 <= body.len(),
                "record {index} of {} bytes",
                body.len()
            );
        }
        Err(BlobError::IdTooLong { index, bytes }) => {
            assert!(bytes > MAX_ID_BYTES && bytes <= body.len(), "{bytes} bytes");
            assert!((index + 1) * 2 <= body.len(), "record {index}");
        }
        Err(BlobError::NotAnArray(why)) => assert!(!why.is_empty(), "a rejected blob must say why"),
    }
});

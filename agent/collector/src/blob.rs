//! Parsing a content blob: a JSON array of audit records. Invariant: records stay raw (their exact bytes
//! are kept); only `Id` (required, a string) and `CreationTime` are read from each.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The longest record `Id` taken (Microsoft's are GUIDs, 36 bytes): the Id becomes part of a key in the
/// spool's dedup window, whose values must stay a few KiB (sled writes larger ones to files it neither
/// syncs nor misses at recovery).
pub const MAX_ID_BYTES: usize = 1024;

/// A record of a blob: its `Id` and its exact bytes.
#[derive(Debug)]
pub struct BlobRecord<'a> {
    /// The record's `Id`.
    pub id: String,
    /// The record's JSON text, as served.
    pub raw: &'a str,
}

/// Why a blob is malformed (it goes to quarantine, not into a retry loop).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    /// Not a JSON array of objects (or not valid JSON / UTF-8).
    #[error("the blob is not a JSON array of records: {0}")]
    NotAnArray(String),
    /// A record lacks a string `Id`.
    #[error("record {index} of the blob has no string Id")]
    MissingId {
        /// Its index.
        index: usize,
    },
    /// A record's `Id` is longer than [`MAX_ID_BYTES`].
    #[error("record {index} of the blob has an Id of {bytes} bytes (at most {MAX_ID_BYTES})")]
    IdTooLong {
        /// Its index.
        index: usize,
        /// The Id's length.
        bytes: usize,
    },
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "Id", borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// Splits a blob into its records.
pub fn parse_blob(body: &[u8]) -> Result<Vec<BlobRecord<'_>>, BlobError> {
    let items: Vec<&RawValue> =
        serde_json::from_slice(body).map_err(|e| BlobError::NotAnArray(e.to_string()))?;
    let mut out = Vec::with_capacity(items.len());
    for (index, raw) in items.into_iter().enumerate() {
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(BlobError::NotAnArray(format!(
                "item {index} is not an object"
            )));
        }
        let peek: Peek<'_> =
            serde_json::from_str(text).map_err(|_| BlobError::MissingId { index })?;
        let id = peek.id.ok_or(BlobError::MissingId { index })?;
        if id.is_empty() {
            return Err(BlobError::MissingId { index });
        }
        if id.len() > MAX_ID_BYTES {
            return Err(BlobError::IdTooLong {
                index,
                bytes: id.len(),
            });
        }
        out.push(BlobRecord {
            id: id.into_owned(),
            raw: text,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_longer_than_the_cap_is_refused_naming_its_record() {
        let long = format!(
            r#"[{{"Id":"a"}},{{"Id":"{}"}}]"#,
            "x".repeat(MAX_ID_BYTES + 1)
        );
        let err = parse_blob(long.as_bytes()).expect_err("too long");
        assert_eq!(
            err,
            BlobError::IdTooLong {
                index: 1,
                bytes: MAX_ID_BYTES + 1
            }
        );
        assert!(err.to_string().contains("record 1"), "{err}");
        let longest = format!(r#"[{{"Id":"{}"}}]"#, "x".repeat(MAX_ID_BYTES));
        assert_eq!(parse_blob(longest.as_bytes()).map(|r| r.len()), Ok(1));
    }

    #[test]
    fn keeps_records_byte_for_byte_and_rejects_bad_blobs() {
        let body = br#"[ {"CreationTime":"2015-06-29T20:03:19","Id":"80c7", "X":[1,2]} ,{"Id":"b","Operation":"x"}]"#;
        let recs = parse_blob(body).expect("valid");
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].id, "80c7");
        assert_eq!(
            recs[0].raw,
            r#"{"CreationTime":"2015-06-29T20:03:19","Id":"80c7", "X":[1,2]}"#
        );
        assert!(matches!(
            parse_blob(b"[{\"Id\":\"a\"},"),
            Err(BlobError::NotAnArray(_))
        ));
        assert!(matches!(
            parse_blob(b"{\"Id\":\"a\"}"),
            Err(BlobError::NotAnArray(_))
        ));
        assert!(matches!(
            parse_blob(b"[{\"Id\":12}]"),
            Err(BlobError::MissingId { index: 0 })
        ));
        assert!(matches!(
            parse_blob(b"[{\"Id\":\"\xff\"}]"),
            Err(BlobError::NotAnArray(_))
        ));
        assert!(parse_blob(b"[]").expect("empty").is_empty());
    }
}

//! The backend's NDJSON envelope. Invariant: the record is embedded byte-for-byte as Microsoft served it,
//! except that raw line breaks (which valid JSON can only hold as insignificant whitespace between tokens)
//! become spaces so that one envelope is always exactly one line.

/// The envelope of one blob's records: the fields they share, serialized once.
/// Invariant: `write` appends exactly `len_of(record)` bytes, one line.
pub struct Envelope {
    /// `{"tenant_id":…,"content_type":…,"content_id":…,"collected_at":…,"record":`
    prefix: Vec<u8>,
}

/// What [`Envelope::write`] appends after the record.
const SUFFIX: &[u8] = b"}\n";

impl Envelope {
    /// The envelope of the records of blob `content_id`.
    pub fn new(
        tenant_id: &str,
        content_type: &str,
        content_id: &str,
        collected_at: &str,
    ) -> Envelope {
        let mut prefix = Vec::with_capacity(128);
        prefix.extend_from_slice(b"{\"tenant_id\":");
        push_json_string(&mut prefix, tenant_id);
        prefix.extend_from_slice(b",\"content_type\":");
        push_json_string(&mut prefix, content_type);
        prefix.extend_from_slice(b",\"content_id\":");
        push_json_string(&mut prefix, content_id);
        prefix.extend_from_slice(b",\"collected_at\":");
        push_json_string(&mut prefix, collected_at);
        prefix.extend_from_slice(b",\"record\":");
        Envelope { prefix }
    }

    /// The length of `record`'s envelope line, without writing it.
    pub fn len_of(&self, record: &[u8]) -> usize {
        self.prefix.len() + record.len() + SUFFIX.len()
    }

    /// Appends one envelope line (ending in `\n`) for `record` to `out`.
    pub fn write(&self, out: &mut Vec<u8>, record: &[u8]) {
        out.extend_from_slice(&self.prefix);
        let start = out.len();
        out.extend_from_slice(record);
        // A store of every byte (not only of the line breaks) lets the compiler do this 16 bytes at a time.
        for b in &mut out[start..] {
            *b = if *b == b'\n' || *b == b'\r' { b' ' } else { *b };
        }
        out.extend_from_slice(SUFFIX);
    }
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    match serde_json::to_vec(s) {
        Ok(v) => out.extend_from_slice(&v),
        Err(_) => out.extend_from_slice(b"\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_one_line_and_keeps_the_record_bytes() {
        let record = br#"{"Id":"a","CreationTime":"2026-01-01T00:00:00",
 "Text":"x\ny"}"#;
        let mut out = Vec::new();
        let envelope = Envelope::new("t", "Audit.General", "c$1\"", "2026-01-01T00:00:00Z");
        envelope.write(&mut out, record);
        assert_eq!(out.len(), envelope.len_of(record));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["content_id"], "c$1\"");
        assert_eq!(v["record"]["Text"], "x\ny");
        let line = String::from_utf8(out).expect("utf8");
        assert!(line.contains(
            r#""record":{"Id":"a","CreationTime":"2026-01-01T00:00:00",  "Text":"x\ny"}}"#
        ));
    }
}

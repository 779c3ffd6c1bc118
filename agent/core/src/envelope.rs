//! The backend's NDJSON envelope. Invariant: the record is embedded byte-for-byte as Microsoft served it,
//! except that raw line breaks (which valid JSON can only hold as insignificant whitespace between tokens)
//! become spaces so that one envelope is always exactly one line.

/// Appends one envelope line (ending in `\n`) for `record` to `out`.
pub fn write_envelope(
    out: &mut Vec<u8>,
    tenant_id: &str,
    content_type: &str,
    content_id: &str,
    collected_at: &str,
    record: &[u8],
) {
    out.extend_from_slice(b"{\"tenant_id\":");
    push_json_string(out, tenant_id);
    out.extend_from_slice(b",\"content_type\":");
    push_json_string(out, content_type);
    out.extend_from_slice(b",\"content_id\":");
    push_json_string(out, content_id);
    out.extend_from_slice(b",\"collected_at\":");
    push_json_string(out, collected_at);
    out.extend_from_slice(b",\"record\":");
    out.extend(
        record
            .iter()
            .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
    out.extend_from_slice(b"}\n");
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
        write_envelope(
            &mut out,
            "t",
            "Audit.General",
            "c$1\"",
            "2026-01-01T00:00:00Z",
            record,
        );
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

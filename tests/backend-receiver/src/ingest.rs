//! The main port's ingest handler, `POST /v1/ingest`, and its streamed batch parser.
//!
//! Order of checks on ingest: injected fault (after `slow_ms`), authentication (401), headers (400/415),
//! compressed size (413), streamed capped decompression (413/400), NDJSON lines (422), `X-Record-Count`
//! (400), record limit fault (413), Idempotency-Key already stored (409), store (200).

use std::io::{BufRead, BufReader};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::faults::StatusFault;
use crate::http::{
    authenticated, bomb, check_common_headers, content_encoding, decoder, decompress_error,
    header_str, read_body, Encoding, Reject,
};
use crate::server::Shared;
use crate::truth::{ParsedBatch, ParsedRecord, StoreOutcome};

/// `POST /v1/ingest`.
pub(crate) async fn ingest(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    check_common_headers(&shared, &parts, "ingest");
    let (fault, slow, body_limit, max_records) = {
        let mut f = shared.lock_faults();
        (
            f.next_ingest(),
            f.slow(),
            f.max_body_bytes(),
            f.max_records(),
        )
    };
    shared.lock_state().summary.ingest_requests += 1;
    if !slow.is_zero() {
        tokio::time::sleep(slow).await;
    }
    let resp = match fault {
        Some(f) => fault_response(&f),
        None => {
            let limit = body_limit.unwrap_or(shared.cfg.max_body_bytes);
            ingest_inner(&shared, &parts, body, limit, max_records)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
    };
    let status = resp.status().as_u16();
    shared.lock_state().count_status(status);
    log::debug!("ingest answered {status}");
    resp
}

pub(crate) fn fault_response(f: &StatusFault) -> Response {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = Reject::new(status, format!("injected fault {}", f.status)).into_response();
    if let Some(v) = f
        .retry_after_value()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn ingest_inner(
    shared: &Arc<Shared>,
    parts: &axum::http::request::Parts,
    body: Body,
    body_limit: usize,
    max_records: Option<usize>,
) -> Result<Response, Reject> {
    if !authenticated(shared, parts) {
        return Err(Reject::new(
            StatusCode::UNAUTHORIZED,
            "a client certificate or a valid bearer token is required",
        ));
    }
    let headers = &parts.headers;
    check_content_type(headers)?;
    let encoding = match content_encoding(headers)? {
        Encoding::Identity => {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                "Content-Encoding is required (zstd or gzip)",
            ))
        }
        e => e,
    };
    let key = header_str(headers, "idempotency-key")
        .ok_or_else(|| Reject::new(StatusCode::BAD_REQUEST, "Idempotency-Key is required"))?;
    let key_sensor = parse_idempotency_key(key).ok_or_else(|| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            format!("malformed Idempotency-Key {key:?}: expected <sensor id>:<u64>"),
        )
    })?;
    if let Some(sid) = header_str(headers, "x-sensor-id") {
        if !sid.is_empty() && sid != key_sensor {
            shared.lock_state().violation(format!(
                "ingest: X-Sensor-Id {sid:?} differs from the Idempotency-Key's sensor {key_sensor:?}"
            ));
        }
    }
    let declared: usize = header_str(headers, "x-record-count")
        .ok_or_else(|| Reject::new(StatusCode::BAD_REQUEST, "X-Record-Count is required"))?
        .trim()
        .parse()
        .map_err(|_| Reject::new(StatusCode::BAD_REQUEST, "malformed X-Record-Count"))?;

    let compressed = read_body(headers, body, body_limit).await?;
    let compressed_len = compressed.len() as u64;
    let cap = shared.cfg.max_decompressed_bytes;
    let batch = tokio::task::spawn_blocking(move || parse_batch(&compressed, encoding, cap))
        .await
        .map_err(|e| Reject::new(StatusCode::INTERNAL_SERVER_ERROR, format!("parser: {e}")))??;

    if batch.records.len() != declared {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            format!(
                "X-Record-Count is {declared} but the body holds {} records",
                batch.records.len()
            ),
        ));
    }
    if let Some(max) = max_records {
        if batch.records.len() > max {
            return Err(Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} records exceed the limit of {max} per batch",
                    batch.records.len()
                ),
            ));
        }
    }
    let outcome = shared
        .lock_state()
        .store(key, encoding.name(), compressed_len, &batch);
    match outcome {
        StoreOutcome::Stored {
            accepted,
            duplicates,
        } => {
            log::debug!("stored batch {key}: {accepted} records, {duplicates} duplicates");
            Ok((
                StatusCode::OK,
                Json(serde_json::json!({ "accepted": accepted, "duplicates": duplicates })),
            )
                .into_response())
        }
        StoreOutcome::Repeated { conflict } => {
            if conflict {
                log::warn!("Idempotency-Key {key} repeated with different records");
            }
            Ok((
                StatusCode::CONFLICT,
                Json(serde_json::json!({
                    "error": format!("Idempotency-Key {key} was already stored"),
                    "conflict": conflict,
                })),
            )
                .into_response())
        }
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Reject> {
    let ct = header_str(headers, "content-type")
        .ok_or_else(|| Reject::new(StatusCode::BAD_REQUEST, "Content-Type is required"))?;
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-ndjson") {
        Ok(())
    } else {
        Err(Reject::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {ct:?} is not application/x-ndjson"),
        ))
    }
}

/// `<sensor id>:<u64>`: returns the sensor id.
fn parse_idempotency_key(key: &str) -> Option<&str> {
    let (sensor, seq) = key.rsplit_once(':')?;
    if sensor.is_empty() || sensor.trim() != sensor {
        return None;
    }
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse::<u64>().ok()?;
    Some(sensor)
}

/// Appends one line (through its `\n`) to `line`. Returns the bytes read (0 at the end), or `None` when
/// the line would pass `remaining` bytes. `line`'s capacity never exceeds `cap`.
fn read_line_capped(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    remaining: usize,
    cap: usize,
) -> std::io::Result<Option<usize>> {
    let mut read = 0usize;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(Some(read));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if read + take > remaining {
            return Ok(None);
        }
        let needed = line.len() + take;
        if line.capacity() < needed {
            let want = (line.len() * 2).min(cap).max(needed);
            line.reserve_exact(want - line.len());
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        read += take;
        if done {
            return Ok(Some(read));
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    tenant_id: String,
    content_type: String,
    content_id: String,
    collected_at: String,
    record: Box<RawValue>,
}

#[derive(Deserialize)]
struct RecordId {
    #[serde(rename = "Id")]
    id: String,
}

fn malformed(line: usize, what: impl std::fmt::Display) -> Reject {
    Reject::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("line {line}: {what}"),
    )
}

/// Parses one NDJSON envelope line (without its newline).
fn parse_line(line: &[u8], line_no: usize) -> Result<ParsedRecord, Reject> {
    let env: Envelope = serde_json::from_slice(line).map_err(|e| malformed(line_no, e))?;
    if env.tenant_id.trim().is_empty() {
        return Err(malformed(line_no, "tenant_id is empty"));
    }
    if env.content_type.trim().is_empty() {
        return Err(malformed(line_no, "content_type is empty"));
    }
    if env.content_id.is_empty() {
        return Err(malformed(line_no, "content_id is empty"));
    }
    time::OffsetDateTime::parse(
        &env.collected_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|e| malformed(line_no, format!("collected_at is not RFC 3339: {e}")))?;
    let raw = env.record.get();
    if !raw.starts_with('{') {
        return Err(malformed(line_no, "record is not a JSON object"));
    }
    let id: RecordId = serde_json::from_str(raw)
        .map_err(|e| malformed(line_no, format!("record has no string Id: {e}")))?;
    Ok(ParsedRecord {
        tenant_id: env.tenant_id,
        id: id.id,
        content_type: env.content_type,
        sha256: Sha256::digest(raw.as_bytes()).into(),
    })
}

/// Decompresses (streamed, capped at `cap` bytes) and parses a batch body. Memory stays bounded by one
/// line plus the parsed identities, whatever the compression ratio.
fn parse_batch(body: &[u8], encoding: Encoding, cap: usize) -> Result<ParsedBatch, Reject> {
    let mut reader = BufReader::with_capacity(64 * 1024, decoder(body, encoding)?);
    let mut records = Vec::new();
    let mut total = 0usize;
    let mut line = Vec::new();
    let mut line_no = 0usize;
    let mut empty_line: Option<usize> = None;
    loop {
        line.clear();
        let n = read_line_capped(&mut reader, &mut line, cap - total, cap)
            .map_err(decompress_error)?
            .ok_or_else(|| bomb(cap))?;
        if n == 0 {
            break;
        }
        total += n;
        line_no += 1;
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.iter().all(u8::is_ascii_whitespace) {
            empty_line.get_or_insert(line_no);
            continue;
        }
        if let Some(empty) = empty_line {
            return Err(malformed(empty, "empty line"));
        }
        records.push(parse_line(content, line_no)?);
    }
    Ok(ParsedBatch {
        records,
        decompressed_bytes: total as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(parse_idempotency_key("s-1:42"), Some("s-1"));
        assert_eq!(parse_idempotency_key("a:b:7"), Some("a:b"));
        assert_eq!(parse_idempotency_key(":7"), None);
        assert_eq!(parse_idempotency_key("s:"), None);
        assert_eq!(parse_idempotency_key("s:-1"), None);
        assert_eq!(parse_idempotency_key("s:+1"), None);
        assert_eq!(parse_idempotency_key("s:99999999999999999999"), None);
        assert_eq!(parse_idempotency_key("nocolon"), None);
    }

    #[test]
    fn parses_lines_and_keeps_bytes() {
        let rec = r#"{"Id":"r1","B":1,  "A":[2]}"#;
        let body = format!(
            "{{\"tenant_id\":\"t\",\"content_type\":\"Audit.Exchange\",\"content_id\":\"c\",\"collected_at\":\"2026-11-25T10:00:00Z\",\"record\":{rec}}}\n\n"
        );
        let b = parse_batch(body.as_bytes(), Encoding::Identity, 1 << 20).expect("parses");
        assert_eq!(b.records.len(), 1);
        let want: [u8; 32] = Sha256::digest(rec.as_bytes()).into();
        assert_eq!(b.records[0].sha256, want);
        assert_eq!(b.records[0].id, "r1");
        let bad = format!("{}\n{{\"x\":1}}\n", body.trim_end());
        let e = parse_batch(bad.as_bytes(), Encoding::Identity, 1 << 20).expect_err("bad");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.starts_with("line 2:"), "{}", e.message);
        let gap = format!("{}\n\n{}", body.trim_end(), body);
        let e = parse_batch(gap.as_bytes(), Encoding::Identity, 1 << 20).expect_err("gap");
        assert!(e.message.starts_with("line 2:"), "{}", e.message);
    }

    #[test]
    fn cap_is_exact() {
        let body = vec![b'x'; 100];
        assert_eq!(
            parse_batch(&body, Encoding::Identity, 99)
                .expect_err("over")
                .status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        // 100 bytes within a cap of 100: reaches the parser (422), not 413.
        assert_eq!(
            parse_batch(&body, Encoding::Identity, 100)
                .expect_err("parse")
                .status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}

//! HTTP plumbing shared by the main port's handlers: refusals, authentication, the client's identity,
//! protocol-header checks, bounded body reading and capped decompression, strict JSON bodies.

use std::io::Read;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::server::Shared;

/// At most this many bytes of an over-limit body are read and discarded before answering 413, so that
/// an HTTP/1.1 client still reads the answer.
const MAX_DRAIN_BYTES: usize = 256 * 1024 * 1024;

/// A refusal: a status and a message, answered as `{"error":"..."}`.
#[derive(Debug)]
pub(crate) struct Reject {
    pub status: StatusCode,
    pub message: String,
}

impl Reject {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The supported body encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    Zstd,
    Gzip,
    Identity,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
            Encoding::Identity => "identity",
        }
    }
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Counts (never rejects) a missing or foreign `User-Agent`, a missing `X-Sensor-Id`, and an
/// `X-Sensor-Id` that differs from the common name of a certificate issued at enrolment (the sensor id).
pub(crate) fn check_common_headers(
    shared: &Shared,
    parts: &axum::http::request::Parts,
    what: &str,
) {
    let headers = &parts.headers;
    let ua = header_str(headers, "user-agent").unwrap_or("");
    let mut violations = Vec::new();
    if !ua.starts_with("m365-sensor/") {
        violations.push(format!(
            "{what}: User-Agent {ua:?} does not start with m365-sensor/"
        ));
    }
    let sensor_id = header_str(headers, "x-sensor-id").filter(|s| !s.trim().is_empty());
    match (sensor_id, client_identity(parts).and_then(|c| c.cn)) {
        (None, _) => violations.push(format!("{what}: X-Sensor-Id is missing")),
        (Some(sid), Some(cn)) if sid != cn && shared.lock_mgmt().is_enrolled(&cn) => {
            violations.push(format!(
                "{what}: X-Sensor-Id {sid:?} differs from the enrolled certificate's sensor id {cn:?}"
            ));
        }
        _ => {}
    }
    if !violations.is_empty() {
        let mut state = shared.lock_state();
        for v in violations {
            state.violation(v);
        }
    }
}

/// A verified client certificate (the listener only passes chains signed by the receiver's CA), or the
/// configured bearer token, compared in constant time.
pub(crate) fn authenticated(shared: &Shared, parts: &axum::http::request::Parts) -> bool {
    if parts
        .extensions
        .get::<sensor_testkit::PeerCertificates>()
        .is_some_and(|p| !p.0.is_empty())
    {
        return true;
    }
    let Some(expected) = shared.cfg.bearer_token.as_deref() else {
        return false;
    };
    let Some(value) = header_str(&parts.headers, "authorization") else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(token.trim(), expected)
}

/// Compares the SHA-256 of both strings without an early exit (no length or prefix timing leak).
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    let ha: [u8; 32] = Sha256::digest(a.as_bytes()).into();
    let hb: [u8; 32] = Sha256::digest(b.as_bytes()).into();
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Missing means identity; anything but zstd, gzip or identity is 415.
pub(crate) fn content_encoding(headers: &HeaderMap) -> Result<Encoding, Reject> {
    let Some(raw) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let v = raw.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match v.as_str() {
        "zstd" => Ok(Encoding::Zstd),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "identity" => Ok(Encoding::Identity),
        _ => Err(Reject::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {v:?} is not supported (zstd or gzip)"),
        )),
    }
}

/// Reads the body up to `limit` bytes; above it drains (bounded) and answers 413.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, Reject> {
    let too_large = |size: String| {
        Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body of {size} exceeds the limit of {limit} bytes"),
        )
    };
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        drain(&mut stream).await;
        return Err(too_large(format!("{n} bytes")));
    }
    let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| Reject::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            drain(&mut stream).await;
            return Err(too_large(format!("more than {limit} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn drain(stream: &mut axum::body::BodyDataStream) {
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > MAX_DRAIN_BYTES {
            break;
        }
    }
}

pub(crate) fn decompress_error(e: std::io::Error) -> Reject {
    Reject::new(
        StatusCode::BAD_REQUEST,
        format!("the body does not decompress: {e}"),
    )
}

pub(crate) fn bomb(cap: usize) -> Reject {
    Reject::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the decompressed body exceeds the limit of {cap} bytes"),
    )
}

pub(crate) fn decoder(
    body: &[u8],
    encoding: Encoding,
) -> Result<Box<dyn Read + Send + '_>, Reject> {
    Ok(match encoding {
        Encoding::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(body).map_err(decompress_error)?)
        }
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Encoding::Identity => Box::new(body),
    })
}

/// Decodes a small document whole, capped at `cap` bytes.
pub(crate) fn decode_all(body: &[u8], encoding: Encoding, cap: usize) -> Result<Vec<u8>, Reject> {
    let mut out = Vec::new();
    decoder(body, encoding)?
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(decompress_error)?;
    if out.len() > cap {
        return Err(bomb(cap));
    }
    Ok(out)
}

/// The identity of a request's verified client certificate (the listener passes only chains signed by
/// the receiver's CA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientIdentity {
    /// The subject's common name: the sensor id for certificates issued at enrolment.
    pub cn: Option<String>,
    /// The serial number, lower-case hex of its big-endian bytes.
    pub serial: String,
}

/// The identity of the client certificate the request's connection presented, if any.
pub(crate) fn client_identity(parts: &axum::http::request::Parts) -> Option<ClientIdentity> {
    let der = parts
        .extensions
        .get::<sensor_testkit::PeerCertificates>()?
        .0
        .first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Some(ClientIdentity {
        cn,
        serial: hex::encode(cert.raw_serial()),
    })
}

/// The JSON type a field of a strict body must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    /// A non-empty string.
    String,
    /// `true` or `false`.
    Bool,
    /// A string, possibly empty.
    AnyString,
}

/// Reads a small JSON object body (optionally zstd/gzip-encoded, capped like every body) and checks it
/// against `fields`, all of them required: unknown, missing, mistyped and empty fields are refused with
/// 400, all at once, each named.
pub(crate) async fn read_strict_json(
    shared: &Shared,
    parts: &axum::http::request::Parts,
    body: Body,
    fields: &[(&str, Field)],
) -> Result<serde_json::Map<String, serde_json::Value>, Reject> {
    let encoding = content_encoding(&parts.headers)?;
    let raw = read_body(&parts.headers, body, shared.cfg.max_body_bytes).await?;
    let plain = decode_all(&raw, encoding, shared.cfg.max_decompressed_bytes)?;
    let value: serde_json::Value = serde_json::from_slice(&plain).map_err(|e| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "the body is not a JSON object",
        ));
    };
    let problems = check_fields(&map, fields);
    if problems.is_empty() {
        Ok(map)
    } else {
        Err(Reject::new(StatusCode::BAD_REQUEST, problems.join("; ")))
    }
}

/// Every problem of `map` against `fields`, in a stable order (unknown fields first, then the fields
/// in the order of `fields`).
fn check_fields(
    map: &serde_json::Map<String, serde_json::Value>,
    fields: &[(&str, Field)],
) -> Vec<String> {
    let mut problems: Vec<String> = map
        .keys()
        .filter(|k| !fields.iter().any(|(name, _)| name == k))
        .map(|k| format!("unknown field `{k}`"))
        .collect();
    for &(name, kind) in fields {
        match (map.get(name), kind) {
            (None, _) => problems.push(format!("missing field `{name}`")),
            (Some(serde_json::Value::String(s)), Field::String) if s.trim().is_empty() => {
                problems.push(format!("field `{name}` is empty"))
            }
            (Some(serde_json::Value::String(_)), Field::String | Field::AnyString) => {}
            (Some(serde_json::Value::Bool(_)), Field::Bool) => {}
            (Some(_), Field::String | Field::AnyString) => {
                problems.push(format!("field `{name}` must be a string"))
            }
            (Some(_), Field::Bool) => problems.push(format!("field `{name}` must be a boolean")),
        }
    }
    problems
}

/// The string field `name` of a map checked by [`read_strict_json`].
pub(crate) fn string_field(map: &serde_json::Map<String, serde_json::Value>, name: &str) -> String {
    map.get(name)
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }

    #[test]
    fn strict_fields_name_every_problem() {
        let spec = [
            ("a", Field::String),
            ("b", Field::Bool),
            ("c", Field::AnyString),
        ];
        let ok = serde_json::json!({"a": "x", "b": false, "c": ""});
        assert!(check_fields(ok.as_object().expect("object"), &spec).is_empty());
        let bad = serde_json::json!({"a": " ", "b": "no", "zz": 1});
        assert_eq!(
            check_fields(bad.as_object().expect("object"), &spec),
            vec![
                "unknown field `zz`",
                "field `a` is empty",
                "field `b` must be a boolean",
                "missing field `c`",
            ]
        );
    }
}

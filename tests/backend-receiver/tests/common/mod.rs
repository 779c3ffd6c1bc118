//! Helpers shared by the integration tests: a receiver, HTTPS clients, envelopes and bodies.
#![allow(dead_code)]

use std::io::Write;
use std::sync::Arc;

use backend_receiver::{ReceiverConfig, ReceiverHandle};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const TOKEN: &str = "s3cret-token";
pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";

pub async fn receiver(token: Option<&str>) -> ReceiverHandle {
    receiver_with(ReceiverConfig {
        bearer_token: token.map(str::to_string),
        ..Default::default()
    })
    .await
}

pub async fn receiver_with(cfg: ReceiverConfig) -> ReceiverHandle {
    backend_receiver::start(cfg).await.expect("receiver starts")
}

pub fn client(rx: &ReceiverHandle) -> reqwest::Client {
    sensor_testkit::https_client(&rx.ca_pem).expect("client")
}

/// A client presenting the receiver's device certificate.
pub fn mtls_client(rx: &ReceiverHandle) -> reqwest::Client {
    sensor_testkit::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(rx.ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(rx.device_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("device pem");
    let key = PrivateKeyDer::from_pem_slice(rx.device_key_pem.as_bytes()).expect("device key");
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(Arc::new(roots))
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("mtls client")
}

/// The raw record object for `id` (exact bytes matter: the receiver hashes them).
pub fn record(id: &str, extra: &str) -> String {
    format!(
        r#"{{"CreationTime":"2026-11-25T09:59:00","Id":"{id}","Operation":"Send","Extra":"{extra}"}}"#
    )
}

pub fn envelope(tenant: &str, record: &str) -> String {
    format!(
        r#"{{"tenant_id":"{tenant}","content_type":"Audit.Exchange","content_id":"c-1","collected_at":"2026-11-25T10:00:00Z","record":{record}}}"#
    )
}

/// NDJSON of envelopes for `ids` in tenant [`TENANT`].
pub fn ndjson(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| envelope(TENANT, &record(id, "x")) + "\n")
        .collect()
}

pub fn zstd(plain: &[u8]) -> Vec<u8> {
    zstd::encode_all(plain, 3).expect("zstd")
}

pub fn gzip(plain: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(plain).expect("gzip");
    e.finish().expect("gzip")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// An ingest request as the sensor sends it (bearer `token` if given).
pub fn ingest(
    c: &reqwest::Client,
    rx: &ReceiverHandle,
    token: Option<&str>,
    key: &str,
    count: usize,
    encoding: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let mut rb = c
        .post(format!("{}/v1/ingest", rx.url))
        .header("Content-Type", "application/x-ndjson")
        .header("Content-Encoding", encoding)
        .header("Idempotency-Key", key)
        .header("X-Record-Count", count.to_string())
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", key.rsplit_once(':').map_or("s", |(s, _)| s))
        .body(body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    rb
}

/// Sends a zstd batch of `ids` with the bearer token; returns status and JSON body.
pub async fn send(
    c: &reqwest::Client,
    rx: &ReceiverHandle,
    key: &str,
    ids: &[&str],
) -> (u16, serde_json::Value) {
    let resp = ingest(
        c,
        rx,
        Some(TOKEN),
        key,
        ids.len(),
        "zstd",
        zstd(ndjson(ids).as_bytes()),
    )
    .send()
    .await
    .expect("request");
    let status = resp.status().as_u16();
    let body = resp.json_of().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// JSON bodies without reqwest's `json` feature (the workspace does not enable it).
pub trait JsonBody {
    /// Sets a JSON body and its Content-Type.
    fn json_body(self, v: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &serde_json::Value) -> Self {
        self.header("Content-Type", "application/json")
            .body(serde_json::to_vec(v).expect("serialize"))
    }
}

/// Reads a JSON answer.
#[allow(async_fn_in_trait)]
pub trait JsonAnswer {
    /// Deserializes the body.
    async fn json_of<T: serde::de::DeserializeOwned>(self) -> anyhow::Result<T>;
}

impl JsonAnswer for reqwest::Response {
    async fn json_of<T: serde::de::DeserializeOwned>(self) -> anyhow::Result<T> {
        Ok(serde_json::from_slice(&self.bytes().await?)?)
    }
}

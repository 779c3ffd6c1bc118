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
    mtls_client_with(&rx.ca_pem, &rx.device_cert_pem, &rx.device_key_pem)
}

/// A client trusting `ca_pem` and presenting `cert_pem` with the PKCS#8 `key_pem`.
pub fn mtls_client_with(ca_pem: &str, cert_pem: &str, key_pem: &str) -> reqwest::Client {
    sensor_testkit::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("device pem");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("device key");
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

/// A PKCS#10 request (PEM) for `key`, as a sensor makes it.
pub fn csr(key: &rcgen::KeyPair) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "requested-name-is-ignored");
    params
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("csr pem")
}

/// A new device key (ECDSA P-256).
pub fn device_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate().expect("key")
}

/// The enrolment body a sensor sends.
pub fn enroll_body(token: &str, csr_pem: &str) -> serde_json::Value {
    serde_json::json!({
        "enrollment_token": token,
        "csr_pem": csr_pem,
        "hostname": "host-1",
        "arch": "x86_64",
        "version": "0.1.0",
    })
}

/// Posts `body` (JSON) to `url` with the sensor's headers; returns status and JSON body (`Null` when
/// the body is not JSON).
pub async fn post_json(
    c: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = c
        .post(url)
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", "s1")
        .json_body(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json_of().await.unwrap_or(serde_json::Value::Null))
}

/// Gets `url` with the sensor's headers; returns status and JSON body (`Null` when not JSON).
pub async fn get_json(c: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let r = c
        .get(url)
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", "s1")
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json_of().await.unwrap_or(serde_json::Value::Null))
}

/// The parsed certificate of a PEM, owned: (common name, SubjectPublicKeyInfo DER, serial hex,
/// validity in seconds, client-auth EKU).
pub fn cert_facts(cert_pem: &str) -> (String, Vec<u8>, String, i64, bool) {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert pem");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .expect("cn")
        .to_string();
    let v = cert.validity();
    let secs = v.not_after.timestamp() - v.not_before.timestamp();
    let client_auth = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.client_auth);
    (
        cn,
        cert.public_key().raw.to_vec(),
        hex::encode(cert.raw_serial()),
        secs,
        client_auth,
    )
}

/// Kills (and reaps) a child process when the test ends, passed or failed.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! A compromised backend's attack on the sensor's trust in it (`--hostile-renewal-ca`,
//! [`crate::ReceiverConfig::hostile_renewal_ca`]). At start-up a second CA, the hostile CA, is made.
//! With it:
//! - `POST /v1/renew` issues the new device certificate with the hostile CA and answers it as `ca_pem`:
//!   a backend trying to swap the anchor its device trusts for it;
//! - the main port also accepts client certificates of the hostile CA, so the renewed device
//!   certificate still authenticates (the attack is on the sensor's trust, not on its access);
//! - `POST /_rx/server-cert` `{"issuer":"genuine"|"hostile"}` chooses the certificate the main port
//!   presents from the next handshake on: the genuine one (the receiver's CA) or one for the same names
//!   issued by the hostile CA, i.e. an impostor vouched for by the CA that now issues device
//!   certificates. Answers `{"issuer":...}`; anything else is a 400.
//!
//! The main port does not resume TLS sessions in this mode (see [`Hostile::main_tls`]).
//!
//! Without the flag none of this exists (the endpoint is a 404) and the receiver behaves as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::enroll::Issuer;
use sensor_testkit::{IssuedCert, TestCa, TestkitError};

/// The hostile CA, its renewal issuer and the switchable server certificate.
#[derive(Debug)]
pub(crate) struct Hostile {
    /// Issues renewed device certificates (and its CA is the renewal answer's `ca_pem`).
    pub issuer: Issuer,
    ca_der: CertificateDer<'static>,
    genuine: Arc<CertifiedKey>,
    impostor: Arc<CertifiedKey>,
    serve_impostor: AtomicBool,
}

fn certified(cert: &IssuedCert) -> Result<Arc<CertifiedKey>, TestkitError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.cert_der.clone())],
        signing,
    )))
}

impl Hostile {
    /// Makes the hostile CA, an impostor certificate for `names` and a renewal issuer (`validity`);
    /// `genuine` is the receiver's own server certificate.
    pub fn new(
        names: &[&str],
        genuine: &IssuedCert,
        validity: Duration,
    ) -> Result<Arc<Self>, TestkitError> {
        let ca = TestCa::new("backend-receiver hostile renewal CA")?;
        let impostor = ca.issue_server(names)?;
        let ca_der = ca.cert_der();
        Ok(Arc::new(Self {
            issuer: Issuer::new(ca, validity),
            ca_der,
            genuine: certified(genuine)?,
            impostor: certified(&impostor)?,
            serve_impostor: AtomicBool::new(false),
        }))
    }

    /// The hostile CA, PEM.
    pub fn ca_pem(&self) -> String {
        self.issuer.ca_pem.clone()
    }

    /// The main port's TLS configuration: client certificates of `genuine_ca` or of the hostile CA
    /// verified when presented (not required), the server certificate chosen per handshake.
    pub fn main_tls(
        self: &Arc<Self>,
        genuine_ca: CertificateDer<'static>,
    ) -> Result<Arc<rustls::ServerConfig>, TestkitError> {
        sensor_testkit::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(genuine_ca)?;
        roots.add(self.ca_der.clone())?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Switch(Arc::clone(self))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // No session resumption: a resumed handshake skips the certificate, and a real impostor holds
        // no session of the genuine server's to resume.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// The main port's certificate resolver.
#[derive(Debug)]
struct Switch(Arc<Hostile>);

impl ResolvesServerCert for Switch {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let h = &self.0;
        Some(if h.serve_impostor.load(Ordering::SeqCst) {
            Arc::clone(&h.impostor)
        } else {
            Arc::clone(&h.genuine)
        })
    }
}

/// Body of `POST /_rx/server-cert`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct ServerCert {
    issuer: Which,
}

#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Which {
    Genuine,
    Hostile,
}

/// `POST /_rx/server-cert`.
pub(crate) fn control_router(hostile: Arc<Hostile>) -> Router {
    Router::new()
        .route("/_rx/server-cert", post(server_cert))
        .with_state(hostile)
}

async fn server_cert(State(h): State<Arc<Hostile>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<ServerCert>(&body) {
        Ok(req) => {
            h.serve_impostor
                .store(matches!(req.issuer, Which::Hostile), Ordering::SeqCst);
            log::info!("main port presents the {:?} server certificate", req.issuer);
            Json(req).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": format!("bad server-cert request: {e}; give {{\"issuer\":\"genuine\"|\"hostile\"}}") })),
        )
            .into_response(),
    }
}

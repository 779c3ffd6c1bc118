//! Test support shared by the simulators, the demo and the black-box tests.
//!
//! Invariant: everything here is for loopback test rigs only. The CA is generated in memory at start-up,
//! never persisted beyond the test's own directory, and never trusted by anything but the test's sensor.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// Errors of the test rig's TLS plumbing.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// Certificate generation failed.
    #[error("generating a test certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("building a TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A client-certificate verifier could not be built.
    #[error("building the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A socket operation failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A certificate signing request is not PEM, not PKCS#10, asks for an unsupported extension, or its
    /// signature does not verify (the requester does not hold the key).
    #[error("the certificate signing request is unusable: {0}")]
    Csr(rcgen::Error),
}

/// Installs ring as rustls' process-wide crypto provider. Idempotent; call first thing in every `main`
/// and test.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A throw-away certificate authority. Invariant: its key lives only in memory.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate with its private key, both PEM, as a server or client presents them.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key, PEM.
    pub key_pem: String,
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The leaf's PKCS#8 private key, DER.
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// Generates a new CA named `name` (ECDSA P-256).
    pub fn new(name: &str) -> Result<Self, TestkitError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM: what a client adds to its trust anchors.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, TestkitError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Issues a client certificate whose common name is `cn` (a device identity).
    pub fn issue_client(&self, cn: &str) -> Result<IssuedCert, TestkitError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<IssuedCert, TestkitError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// A certificate a [`TestCa`] issued for the public key of a certificate signing request: the private
/// key never left the requester.
#[derive(Clone, Debug)]
pub struct CsrCert {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
}

impl TestCa {
    /// Issues a client certificate (common name `cn`, client-auth extended key usage, not a CA) for the
    /// public key of the PKCS#10 request `csr_pem`, valid from `not_before` to `not_after` (whole
    /// seconds), with serial number `serial`. The request's signature is verified; its subject and
    /// requested extensions are ignored.
    pub fn issue_client_for_csr(
        &self,
        csr_pem: &str,
        cn: &str,
        serial: u64,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<CsrCert, TestkitError> {
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(TestkitError::Csr)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        csr.params = params;
        let cert = csr.signed_by(&self.cert, &self.key)?;
        Ok(CsrCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        })
    }
}

/// Builds a rustls server configuration presenting `server`; with `client_ca`, client certificates
/// signed by it are verified (but not required: bearer-token clients still connect).
pub fn server_config(
    server: &IssuedCert,
    client_ca: Option<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, TestkitError> {
    install_crypto_provider();
    let chain = vec![CertificateDer::from(server.cert_der.clone())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone()));
    let builder = rustls::ServerConfig::builder();
    let mut config = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca)?;
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The verified client certificate chain of a request's TLS connection, inserted as a request extension
/// by [`serve_tls`]. Empty when the client presented none.
#[derive(Clone, Debug, Default)]
pub struct PeerCertificates(pub Vec<CertificateDer<'static>>);

/// Serves `router` over TLS on `listener` until the returned task is aborted; aborting it drops the
/// listener and every connection it accepted (their tasks live in the task's `JoinSet`). Each request
/// carries [`PeerCertificates`] and [`PeerAddr`] extensions; failed handshakes are logged and skipped.
pub fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: Router,
) -> JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            conns.spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        log::debug!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                };
                let peer_certs = PeerCertificates(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                        .unwrap_or_default(),
                );
                let service = hyper::service::service_fn(move |mut req| {
                    req.extensions_mut().insert(peer_certs.clone());
                    req.extensions_mut().insert(PeerAddr(peer));
                    router.clone().oneshot(req.map(axum::body::Body::new))
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await
                {
                    log::debug!("connection from {peer} ended: {e}");
                }
            });
        }
    })
}

/// The remote address of a request's connection, inserted as a request extension by [`serve_tls`].
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// An HTTPS client for test rigs that trusts only `ca_pem` (never the system roots).
pub fn https_client(ca_pem: &str) -> Result<reqwest::Client, TestkitError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        let cert: CertificateDer<'static> = cert;
        roots.add(cert)?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| TestkitError::Io(std::io::Error::other(e)))
}

//! TLS client configuration shared by every outbound connection. Invariant: certificates are always
//! verified; there is no switch to turn verification off.
//!
//! Two kinds of trust for a server certificate ([`ServerTrust`]):
//! - **System roots plus extra anchors** (the Microsoft endpoints, a backend before enrolment or spoken
//!   to with a bearer token): the operating system's roots and an optional PEM file.
//! - **Pinned anchors** (the backend after enrolment): only the anchors enrolment recorded
//!   ([`AnchorRecorder`]: those that verified the backend's server chain in the enrolment handshake),
//!   plus the operator's local `backend.ca_file` if set, plus the system roots only if the operator set
//!   `backend.trust_public_roots`. An anchors file that cannot be read or holds no usable certificate is
//!   an error naming the file, never a fallback to the system roots.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads every certificate of a PEM file. Invariant: `Ok` holds at least one certificate; an unreadable,
/// truncated or empty file is an error naming it.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            reason: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            reason: "no certificate found in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.into(),
        reason: format!("no usable private key: {e}"),
    })
}

/// PEM text of `certs` (`CERTIFICATE` blocks, 64 columns), the inverse of [`read_certs`].
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The operating system's roots (certificates that do not parse are skipped, as rustls does).
fn native_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// Which anchors verify a server's certificate. Invariant: every variant verifies the chain and the
/// name; they differ only in the set of anchors.
#[derive(Clone, Copy, Debug)]
pub enum ServerTrust<'a> {
    /// The system roots plus the certificates of `extra_ca` (PEM), when given.
    SystemRootsPlus {
        /// Extra anchors (`backend.ca_file`, a tenant's `ca_file`, `enroll --ca-file`).
        extra_ca: Option<&'a Path>,
    },
    /// The backend after enrolment: the pinned anchors, the operator's local `extra_ca`, and the system
    /// roots only when `public_roots`.
    Pinned {
        /// The anchors enrolment recorded (`identity/server-trust.pem`); must hold at least one
        /// certificate.
        anchors: &'a Path,
        /// The operator's local `backend.ca_file`, when set.
        extra_ca: Option<&'a Path>,
        /// `backend.trust_public_roots`: the system roots as well.
        public_roots: bool,
    },
}

/// Adds every certificate of `path` to `roots`, naming the file when one is refused.
fn add_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), TlsError> {
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.into(),
            reason: format!("not a usable trust anchor: {e}"),
        })?;
    }
    Ok(())
}

/// The root store of `trust`.
pub fn root_store(trust: ServerTrust<'_>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (system, extra) = match trust {
        ServerTrust::SystemRootsPlus { extra_ca } => (true, extra_ca),
        ServerTrust::Pinned {
            anchors,
            extra_ca,
            public_roots,
        } => {
            add_file(&mut roots, anchors)?;
            (public_roots, extra_ca)
        }
    };
    if system {
        for cert in native_roots() {
            let _ = roots.add(cert);
        }
    }
    if let Some(ca) = extra {
        add_file(&mut roots, ca)?;
    }
    Ok(roots)
}

fn finish(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration trusting the system roots plus `extra_ca` (PEM), presenting `identity`
/// (certificate chain file, key file) when given.
pub fn client_config(
    extra_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(ServerTrust::SystemRootsPlus { extra_ca }, identity)
}

/// A client configuration trusting exactly the anchors of `trust`, presenting `identity` (certificate
/// chain file, key file) when given.
pub fn client_config_with(
    trust: ServerTrust<'_>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = root_store(trust)?;
    finish(
        rustls::ClientConfig::builder().with_root_certificates(Arc::new(roots)),
        identity,
    )
}

/// The file beside `server-trust.pem` in which an earlier version kept the backend's anchors (the
/// device CA, then the enrolment CA file, with every renewal's CA prepended); read only to migrate.
pub const LEGACY_ANCHORS: &str = "trust.pem";
/// The file beside `server-trust.pem` holding the CA that issued the device certificate.
pub const DEVICE_CA: &str = "ca.pem";

/// What migrating an identity generation of an earlier version (no `server-trust.pem`) decides.
/// Invariant: never pins an anchor that neither the earlier version's `trust.pem` held nor a connection
/// to the backend showed verifying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyAnchors {
    /// `trust.pem` holds certificates besides the device CA (a CA file given at enrolment): pin those.
    Pin(Vec<CertificateDer<'static>>),
    /// `trust.pem` holds nothing but the device CA: whether the device CA or a system root verified the
    /// backend is unknown. Trust the backend as the earlier version did (system roots plus `trust.pem`)
    /// until the first connection, then pin the anchor that verified its server chain
    /// ([`AnchorRecorder`]).
    LearnOnFirstConnection,
}

/// The migration decision for an earlier version's `trust.pem` certificates `trust` and the device CA
/// `device_ca` ([`LegacyAnchors`]).
pub fn legacy_anchors(
    trust: &[CertificateDer<'static>],
    device_ca: &[CertificateDer<'static>],
) -> LegacyAnchors {
    let mut extra: Vec<CertificateDer<'static>> = Vec::new();
    for c in trust {
        if !device_ca.contains(c) && !extra.contains(c) {
            extra.push(c.clone());
        }
    }
    if extra.is_empty() {
        LegacyAnchors::LearnOnFirstConnection
    } else {
        LegacyAnchors::Pin(extra)
    }
}

/// When the backend's pinned anchors file `anchors` (`identity/server-trust.pem`) does not exist
/// because its generation was written by an earlier version whose migration waits for the first
/// connection ([`LegacyAnchors::LearnOnFirstConnection`]): the earlier version's `trust.pem` beside it,
/// which is trusted with the system roots until then. `None` when `anchors` exists or the generation is
/// not such a one ([`ServerTrust::Pinned`] then refuses a missing file naming it). An unreadable
/// `trust.pem` or `ca.pem` is an error naming it.
pub fn awaiting_first_pin(anchors: &Path) -> Result<Option<PathBuf>, TlsError> {
    if std::fs::symlink_metadata(anchors).is_ok() {
        return Ok(None);
    }
    let Some(dir) = anchors.parent() else {
        return Ok(None);
    };
    let legacy = dir.join(LEGACY_ANCHORS);
    if std::fs::symlink_metadata(&legacy).is_err() {
        return Ok(None);
    }
    let decision = legacy_anchors(&read_certs(&legacy)?, &read_certs(&dir.join(DEVICE_CA))?);
    Ok((decision == LegacyAnchors::LearnOnFirstConnection).then_some(legacy))
}

/// How many distinct verified chains a recorder keeps.
const MAX_SEEN: usize = 32;

/// A server chain the recorder saw verified.
#[derive(Debug)]
struct Seen {
    end_entity: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    server_name: ServerName<'static>,
    now: UnixTime,
}

/// A server-certificate verifier that verifies exactly as rustls' WebPKI verifier over the system roots
/// plus an extra CA file, and remembers each chain it accepted, so that enrolment can pin the anchors
/// that verified the backend ([`AnchorRecorder::verifying_anchors`]).
///
/// Why pin the anchor, not the server's own key: the backend renews its server certificate (and may
/// re-key it) on its own schedule; the anchor that issued it is what the operator chose at enrolment
/// (their `ca_file`, or the one public root that vouched for the backend's name), and stays. Why a whole
/// anchor certificate, not an SPKI hash: a PEM anchors file is what rustls, `openssl verify` and an
/// operator can read and check. Why by re-verifying against each candidate: rustls does not say which
/// anchor completed a path; an anchor is recorded only if the very chain the server presented, with its
/// name and at the handshake's time, verifies against that anchor alone.
#[derive(Debug)]
pub struct AnchorRecorder {
    inner: Arc<WebPkiServerVerifier>,
    candidates: Vec<CertificateDer<'static>>,
    seen: Mutex<Vec<Seen>>,
}

impl AnchorRecorder {
    /// A recorder trusting the system roots plus the certificates of `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Arc<Self>, TlsError> {
        let mut candidates = native_roots();
        if let Some(ca) = extra_ca {
            candidates.extend(read_certs(ca)?);
        }
        Self::with_candidates(candidates)
    }

    /// A recorder trusting exactly `candidates` (the system roots are not added).
    pub fn with_candidates(
        candidates: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Self>, TlsError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        let mut usable = Vec::new();
        for c in candidates {
            if roots.add(c.clone()).is_ok() {
                usable.push(c);
            }
        }
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(Arc::new(Self {
            inner,
            candidates: usable,
            seen: Mutex::new(Vec::new()),
        }))
    }

    /// A client configuration (no client certificate) that verifies with this recorder.
    pub fn client_config(self: &Arc<Self>) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(self) as Arc<dyn ServerCertVerifier>)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// A client configuration that verifies with this recorder and presents `identity` (certificate
    /// chain file, key file) when given: the first connection of a migrated identity.
    pub fn client_config_presenting(
        self: &Arc<Self>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        finish(
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::clone(self) as Arc<dyn ServerCertVerifier>),
            identity,
        )
    }

    /// The candidate anchors that, each alone, verify a chain this recorder accepted for `host` (a DNS
    /// name or an IP address, brackets allowed; chains of other hosts, e.g. an HTTPS proxy's or a
    /// redirect's, are ignored), deduplicated, in candidate order. Empty when no such handshake
    /// succeeded.
    pub fn verifying_anchors(&self, host: &str) -> Vec<CertificateDer<'static>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(name) = ServerName::try_from(host.to_string()) else {
            return Vec::new();
        };
        let all = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let seen: Vec<&Seen> = all.iter().filter(|s| s.server_name == name).collect();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut out: Vec<CertificateDer<'static>> = Vec::new();
        for anchor in &self.candidates {
            let mut one = rustls::RootCertStore::empty();
            if one.add(anchor.clone()).is_err() {
                continue;
            }
            let Ok(v) =
                WebPkiServerVerifier::builder_with_provider(Arc::new(one), Arc::clone(&provider))
                    .build()
            else {
                continue;
            };
            let verifies = seen.iter().any(|s| {
                v.verify_server_cert(&s.end_entity, &s.intermediates, &s.server_name, &[], s.now)
                    .is_ok()
            });
            if verifies && !out.contains(anchor) {
                out.push(anchor.clone());
            }
        }
        out
    }
}

impl ServerCertVerifier for AnchorRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // A long-lived client handshakes again and again with the same chain: keep each chain once,
        // and a bounded number of them.
        let known = seen.iter().any(|s| {
            s.end_entity == *end_entity
                && s.intermediates.as_slice() == intermediates
                && s.server_name == *server_name
        });
        if !known && seen.len() < MAX_SEEN {
            seen.push(Seen {
                end_entity: end_entity.clone().into_owned(),
                intermediates: intermediates
                    .iter()
                    .map(|c| c.clone().into_owned())
                    .collect(),
                server_name: server_name.to_owned(),
                now,
            });
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivatePkcs8KeyDer;

    struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    fn new_ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.self_signed(&key).expect("self-signed");
        Ca { cert, key }
    }

    /// A server certificate for `name` issued by `ca`, with its key.
    fn server_cert(ca: &Ca, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign");
        (
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// A whole TLS handshake in memory between `client` (connecting to `name`) and a server presenting
    /// `server`; the client's error first.
    fn handshake(
        client: rustls::ClientConfig,
        name: &str,
        server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    ) -> Result<(), rustls::Error> {
        let io = |e: std::io::Error| rustls::Error::General(e.to_string());
        let server_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![server.0], server.1)?;
        let name = ServerName::try_from(name.to_string()).expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server_config))?;
        for _ in 0..16 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).map_err(io)?;
            }
            let mut r = &buf[..];
            while !r.is_empty() {
                s.read_tls(&mut r).map_err(io)?;
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).map_err(io)?;
            }
            let mut r = &buf[..];
            while !r.is_empty() {
                c.read_tls(&mut r).map_err(io)?;
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General(
            "the handshake did not finish".into(),
        ))
    }

    fn unknown_issuer(r: Result<(), rustls::Error>) -> bool {
        matches!(
            r,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        )
    }

    /// Enrolment pins the anchor that verified the server's chain, for that server's name only; the
    /// device-issuing CA and any other candidate are not pinned.
    #[test]
    fn the_recorder_pins_only_the_anchor_that_verified_the_server() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server_ca = new_ca("server CA");
        let device_ca = new_ca("device CA");
        let other = new_ca("other CA");
        let recorder = AnchorRecorder::with_candidates(vec![
            device_ca.cert.der().clone(),
            other.cert.der().clone(),
            server_ca.cert.der().clone(),
        ])
        .expect("recorder");
        assert!(recorder.verifying_anchors("backend.test").is_empty());
        handshake(
            recorder.client_config(),
            "backend.test",
            server_cert(&server_ca, "backend.test"),
        )
        .expect("handshake");
        assert_eq!(
            recorder.verifying_anchors("backend.test"),
            vec![server_ca.cert.der().clone()]
        );
        assert!(recorder.verifying_anchors("proxy.test").is_empty());
        // It verifies as rustls does: a server with another name, or a CA it does not know, is refused
        // and recorded nowhere.
        let fresh =
            AnchorRecorder::with_candidates(vec![server_ca.cert.der().clone()]).expect("recorder");
        let stranger = new_ca("stranger");
        assert!(unknown_issuer(handshake(
            fresh.client_config(),
            "backend.test",
            server_cert(&stranger, "backend.test"),
        )));
        handshake(
            fresh.client_config(),
            "backend.test",
            server_cert(&server_ca, "elsewhere.test"),
        )
        .expect_err("wrong name");
        assert!(fresh.verifying_anchors("backend.test").is_empty());
    }

    /// After enrolment only the pinned anchors verify the backend: a server certificate from the
    /// device-issuing CA is refused, and the system roots are not in the store unless asked for.
    #[test]
    fn pinned_trust_holds_the_anchors_and_the_system_roots_only_when_asked() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        let server_ca = new_ca("server CA");
        let device_ca = new_ca("device CA");
        let anchors = d.path().join("server-trust.pem");
        std::fs::write(&anchors, certs_to_pem(&[server_ca.cert.der().clone()])).expect("write");
        let pinned = |public_roots| ServerTrust::Pinned {
            anchors: &anchors,
            extra_ca: None,
            public_roots,
        };
        let system = root_store(ServerTrust::SystemRootsPlus { extra_ca: None })
            .expect("system")
            .len();
        assert_eq!(root_store(pinned(false)).expect("pinned").len(), 1);
        assert_eq!(
            root_store(pinned(true)).expect("pinned+public").len(),
            1 + system
        );
        let client = || client_config_with(pinned(false), None).expect("config");
        handshake(
            client(),
            "backend.test",
            server_cert(&server_ca, "backend.test"),
        )
        .expect("the pinned anchor verifies");
        assert!(unknown_issuer(handshake(
            client(),
            "backend.test",
            server_cert(&device_ca, "backend.test"),
        )));

        // The local ca_file adds to the pinned set.
        let extra = d.path().join("ca.pem");
        std::fs::write(&extra, device_ca.cert.pem()).expect("write");
        let with_extra = ServerTrust::Pinned {
            anchors: &anchors,
            extra_ca: Some(&extra),
            public_roots: false,
        };
        assert_eq!(root_store(with_extra).expect("store").len(), 2);
    }

    /// A missing, empty or truncated anchors file is an error naming it, never the system roots.
    #[test]
    fn an_unusable_anchors_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("server CA");
        let anchors = d.path().join("server-trust.pem");
        let pem = ca.cert.pem();
        for (what, contents) in [
            ("missing", None),
            ("empty", Some(String::new())),
            ("truncated", Some(pem[..pem.len() / 2].to_string())),
        ] {
            let _ = std::fs::remove_file(&anchors);
            if let Some(c) = contents {
                std::fs::write(&anchors, c).expect("write");
            }
            for public_roots in [false, true] {
                let e = client_config_with(
                    ServerTrust::Pinned {
                        anchors: &anchors,
                        extra_ca: None,
                        public_roots,
                    },
                    None,
                )
                .expect_err(what);
                assert!(e.to_string().contains("server-trust.pem"), "{what}: {e}");
            }
        }
    }

    #[test]
    fn pem_round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = new_ca("a").cert.der().clone();
        let b = new_ca("b").cert.der().clone();
        let p = d.path().join("x.pem");
        std::fs::write(&p, certs_to_pem(&[a.clone(), b.clone()])).expect("write");
        assert_eq!(read_certs(&p).expect("read"), vec![a, b]);
    }

    /// The migration decision: certificates of trust.pem besides the device CA came from a CA file
    /// and are pinned (deduplicated, in order); trust.pem with nothing but the device CA is learnt
    /// from the first connection, never pinned to the device CA offline.
    #[test]
    fn the_legacy_decision_pins_a_ca_file_and_learns_otherwise() {
        let device = new_ca("device CA").cert.der().clone();
        let older_device = new_ca("older device CA").cert.der().clone();
        let file_ca = new_ca("CA file").cert.der().clone();
        let dev = std::slice::from_ref(&device);
        assert_eq!(
            legacy_anchors(&[device.clone(), device.clone()], dev),
            LegacyAnchors::LearnOnFirstConnection
        );
        assert_eq!(
            legacy_anchors(&[], dev),
            LegacyAnchors::LearnOnFirstConnection
        );
        assert_eq!(
            legacy_anchors(&[device.clone(), file_ca.clone(), file_ca.clone()], dev),
            LegacyAnchors::Pin(vec![file_ca.clone()])
        );
        assert_eq!(
            legacy_anchors(
                &[device.clone(), older_device.clone(), file_ca.clone()],
                dev
            ),
            LegacyAnchors::Pin(vec![older_device, file_ca])
        );
    }

    /// `awaiting_first_pin` says so only for a generation without server-trust.pem whose trust.pem
    /// holds nothing but ca.pem; then the first connection, verified with the earlier version's trust
    /// (candidates: a public root and trust.pem), records the public root that verified the backend.
    #[test]
    fn a_device_ca_only_generation_awaits_its_first_connection() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        let device_ca = new_ca("device CA");
        let public_root = new_ca("a public root");
        let file_ca = new_ca("CA file");
        let anchors = d.path().join("server-trust.pem");
        let legacy = d.path().join(LEGACY_ANCHORS);
        std::fs::write(d.path().join(DEVICE_CA), device_ca.cert.pem()).expect("write");
        // No trust.pem either: not a legacy generation; Pinned refuses the missing file.
        assert_eq!(awaiting_first_pin(&anchors).expect("none"), None);
        std::fs::write(&legacy, device_ca.cert.pem()).expect("write");
        assert_eq!(
            awaiting_first_pin(&anchors).expect("awaiting"),
            Some(legacy.clone())
        );
        // A truncated trust.pem is an error naming it.
        let pem = device_ca.cert.pem();
        std::fs::write(&legacy, &pem[..pem.len() / 2]).expect("write");
        let e = awaiting_first_pin(&anchors).expect_err("truncated");
        assert!(e.to_string().contains(LEGACY_ANCHORS), "{e}");
        // trust.pem with a CA file: the load-time migration pins it, nothing is awaited.
        std::fs::write(&legacy, format!("{pem}{}", file_ca.cert.pem())).expect("write");
        assert_eq!(awaiting_first_pin(&anchors).expect("not awaiting"), None);
        // Pinned already.
        std::fs::write(&legacy, &pem).expect("write");
        std::fs::write(&anchors, public_root.cert.pem()).expect("write");
        assert_eq!(awaiting_first_pin(&anchors).expect("pinned"), None);

        // The first connection: the earlier version's trust verifies the backend (behind the public
        // root), and only that root is recorded.
        let recorder = AnchorRecorder::with_candidates(vec![
            public_root.cert.der().clone(),
            device_ca.cert.der().clone(),
        ])
        .expect("recorder");
        handshake(
            recorder.client_config(),
            "backend.test",
            server_cert(&public_root, "backend.test"),
        )
        .expect("the earlier trust verifies the backend");
        // Handshaking again with the same chain does not grow the record.
        handshake(
            recorder.client_config(),
            "backend.test",
            server_cert(&public_root, "backend.test"),
        )
        .expect("again");
        assert!(recorder.seen.lock().expect("lock").len() <= 2);
        assert_eq!(
            recorder.verifying_anchors("backend.test"),
            vec![public_root.cert.der().clone()]
        );
    }
}

//! The device identity: the key pair generated on the device at enrolment, the certificate the backend
//! issued for it, the CA that issued it, and the anchors the backend's server is trusted through.
//! Layout in the state directory:
//!
//! ```text
//! identity -> identity.<n>/        symlink, swapped atomically (enrolment, renewal)
//! identity.<n>/device.key          PKCS#8 private key, 0600; never leaves the device
//! identity.<n>/device.pem          the certificate the backend issued for that key
//! identity.<n>/ca.pem              the CA that issued device.pem: used only to check the device
//!                                  certificate received at enrolment and renewal, never for the server
//! identity.<n>/server-trust.pem    the anchors pinned for the backend's server certificate: those that
//!                                  verified its chain in the enrolment handshake (see
//!                                  sensor_core::tls::AnchorRecorder), carried over unchanged by renewal
//! identity.<n>/trust.pem           a copy of server-trust.pem, for an agent of an earlier version after
//!                                  an A/B rollback (it read this file); never read here but to migrate
//! identity.<n>/sensor_id           the id the backend assigned
//! ```
//!
//! Invariants: `identity` always points at a complete generation whose certificate was verified to
//! carry the generation's own public key and to chain to its CA; a failed enrolment or renewal leaves
//! the previous state untouched (no half-enrolled device). The server anchors are written whole into
//! each generation, never appended to: enrolment sets them, a renewal copies the current generation's
//! ([`ServerAnchors::KeepCurrent`]), so nothing the backend answers at renewal (`ca_pem` included) can
//! add an anchor for its server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{pem::PemObject, CertificateDer, UnixTime};
use zeroize::Zeroizing;

use crate::store;

/// Name of the symlink in the state directory.
pub const LINK: &str = "identity";
/// The pinned anchors of a generation.
pub const SERVER_TRUST: &str = sensor_core::config::IDENTITY_SERVER_TRUST;
/// The file an earlier version kept the server anchors in (the device CA plus the enrolment CA file,
/// with every renewal's CA prepended).
pub const LEGACY_TRUST: &str = "trust.pem";

/// Why an identity could not be made, read or installed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Generating the key or the CSR failed.
    #[error("generating the device key: {0}")]
    Keygen(String),
    /// The certificate the backend returned is unusable.
    #[error("the backend's certificate is not usable: {0}")]
    BadCertificate(String),
    /// The anchors for the backend's server are unusable (named file or enrolment's record).
    #[error("{what}: {reason}")]
    ServerAnchors {
        /// The file, or what should have provided them.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the identity files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An installed identity. Paths go through the `identity` symlink, so a reader opening them after a
/// renewal gets the new generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The id the backend assigned at enrolment.
    pub sensor_id: String,
    /// `identity/device.pem`.
    pub cert_file: PathBuf,
    /// `identity/device.key`.
    pub key_file: PathBuf,
    /// `identity/server-trust.pem`: the anchors the backend's server certificate is verified against.
    pub server_trust_file: PathBuf,
    /// The certificate's validity start (Unix seconds).
    pub not_before: i64,
    /// The certificate's expiry (Unix seconds).
    pub not_after: i64,
}

impl Identity {
    /// The installed identity of `state_dir`, `None` when the device was never enrolled. A generation
    /// written by an earlier version (no `server-trust.pem`) is migrated first ([`migrate_server_trust`]).
    pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let link = state_dir.join(LINK);
        if std::fs::symlink_metadata(&link).is_err() {
            return Ok(None);
        }
        migrate_server_trust(&link)?;
        let cert_file = link.join("device.pem");
        let pem = std::fs::read(&cert_file).map_err(io(&cert_file))?;
        let (not_before, not_after) = validity(&pem)?;
        let id_file = link.join("sensor_id");
        let sensor_id = std::fs::read_to_string(&id_file)
            .map_err(io(&id_file))?
            .trim()
            .to_string();
        Ok(Some(Identity {
            sensor_id,
            cert_file,
            key_file: link.join("device.key"),
            server_trust_file: link.join(SERVER_TRUST),
            not_before,
            not_after,
        }))
    }

    /// Whether the certificate should be renewed at `now`: less than a third of its lifetime is left.
    pub fn needs_renewal(&self, now: i64) -> bool {
        let lifetime = (self.not_after - self.not_before).max(1);
        self.not_after - now < lifetime / 3
    }
}

/// A fresh key pair and a certificate signing request for it.
pub struct KeyAndCsr {
    /// The private key (PKCS#8 PEM); zeroized when dropped.
    pub key_pem: Zeroizing<String>,
    /// The CSR (PEM) to send to the backend.
    pub csr_pem: String,
}

/// Generates an ECDSA P-256 key pair on the device and a CSR with common name `cn`.
pub fn new_key_and_csr(cn: &str) -> Result<KeyAndCsr, IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Keygen(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| IdentityError::Keygen(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IdentityError::Keygen(e.to_string()))?;
    let csr_pem = csr
        .pem()
        .map_err(|e| IdentityError::Keygen(e.to_string()))?;
    Ok(KeyAndCsr {
        key_pem: Zeroizing::new(key.serialize_pem()),
        csr_pem,
    })
}

/// The validity (not before, not after) of the first certificate of `pem`, in Unix seconds.
pub fn validity(pem: &[u8]) -> Result<(i64, i64), IdentityError> {
    let der = CertificateDer::from_pem_slice(pem)
        .map_err(|e| IdentityError::BadCertificate(format!("no PEM certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| IdentityError::BadCertificate(format!("not an X.509 certificate: {e}")))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// How far this device's clock may run behind the backend's for a certificate issued a moment ago.
pub const CLOCK_BEHIND_TOLERANCE: Duration = Duration::from_secs(3600);

/// Checks that `cert_pem` carries the public key of `key_pem` and chains to `ca_pem` as a client
/// certificate valid now. A certificate that starts up to [`CLOCK_BEHIND_TOLERANCE`] in this device's
/// future is checked at its start instead: the backend issues it from its own clock, and a device's
/// clock may run behind (first boot without a real-time clock or before time sync; a VM's clock starts
/// up to a second late). Refusing it would burn the single-use enrolment token for nothing. Expiry and a
/// clock further behind are still refused.
pub fn verify(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<(), IdentityError> {
    let bad = |m: String| IdentityError::BadCertificate(m);
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| bad(format!("certificate_pem holds no certificate: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| bad(format!("certificate_pem is not X.509: {e}")))?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| bad(format!("device key: {e}")))?;
    if parsed.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
        return Err(bad(
            "the certificate is for another key than the one this device generated".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| bad(format!("ca_pem: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(format!("ca_pem is not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("ca_pem holds no certificate".into()));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| bad(format!("ca_pem: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let starts =
        Duration::from_secs(u64::try_from(parsed.validity().not_before.timestamp()).unwrap_or(0));
    let at = if starts > now && starts - now <= CLOCK_BEHIND_TOLERANCE {
        starts
    } else {
        now
    };
    verifier
        .verify_client_cert(&cert, &[], UnixTime::since_unix_epoch(at))
        .map_err(|e| {
            bad(format!(
                "the certificate does not verify against ca_pem: {e}"
            ))
        })?;
    Ok(())
}

/// What [`install`] writes.
pub struct NewIdentity<'a> {
    /// The backend's id for this device.
    pub sensor_id: &'a str,
    /// The certificate (PEM).
    pub cert_pem: &'a str,
    /// The device's private key (PEM).
    pub key_pem: &'a str,
    /// The issuing CA (PEM): checks `cert_pem`, nothing else.
    pub ca_pem: &'a str,
    /// The anchors for the backend's server certificate.
    pub server_anchors: ServerAnchors<'a>,
}

/// Where a new generation's server anchors come from.
#[derive(Clone, Copy, Debug)]
pub enum ServerAnchors<'a> {
    /// Enrolment: the anchors (PEM) that verified the backend's server chain in the enrolment handshake.
    Enrolled(&'a str),
    /// Renewal: the current generation's, unchanged (an error if there is none or it is unusable).
    KeepCurrent,
}

/// Parses `pem` as a set of trust anchors: at least one certificate, each usable as a root; returned
/// deduplicated in order. `what` names the source in errors.
fn parse_anchors(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bad = |reason: String| IdentityError::ServerAnchors {
        what: what.to_string(),
        reason,
    };
    let mut out: Vec<CertificateDer<'static>> = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| bad(format!("not a PEM certificate list: {e}")))?;
        rustls::RootCertStore::empty()
            .add(c.clone())
            .map_err(|e| bad(format!("not a usable trust anchor: {e}")))?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    if out.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(out)
}

/// Reads the anchors file `path` ([`parse_anchors`]); unreadable, truncated or empty is an error naming it.
fn read_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_anchors(&text, &path.display().to_string())
}

/// Whether a generation's server anchors are pinned, after [`migrate_server_trust`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTrustState {
    /// `server-trust.pem` exists: the backend is trusted through it.
    Pinned,
    /// A generation of an earlier version whose `trust.pem` held nothing but the device CA: the backend
    /// is trusted as that version did (system roots plus `trust.pem`) until the first connection pins
    /// the anchor that verified it ([`pin_first_connection`]).
    AwaitingFirstConnection,
}

/// Warns once per process that the backend's anchor awaits the first connection.
static WARNED_AWAITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Gives a generation written by an earlier version (`dir` has `trust.pem` but no `server-trust.pem`)
/// its `server-trust.pem`, once, and logs that it did. A no-op when the file exists.
///
/// What it means: the old `trust.pem` does not record which anchor verified the backend at enrolment
/// (the earlier version trusted the system roots plus `trust.pem`). When `trust.pem` holds certificates
/// besides the device CA (`ca.pem`, which the old layout trusted for the server by mistake), those came
/// from the CA file given at enrolment and are pinned. When it holds nothing but the device CA, the
/// backend was verified by the device CA or by a public root, which cannot be told apart offline:
/// nothing is written and the state is [`ServerTrustState::AwaitingFirstConnection`] (pinning the
/// device CA would cut off a backend behind a public CA at the upgrade). An unreadable or unparsable
/// `trust.pem` or `ca.pem` is an error naming the file; nothing is written.
pub fn migrate_server_trust(dir: &Path) -> Result<ServerTrustState, IdentityError> {
    let target = dir.join(SERVER_TRUST);
    if std::fs::symlink_metadata(&target).is_ok() {
        return Ok(ServerTrustState::Pinned);
    }
    let legacy = dir.join(LEGACY_TRUST);
    let all = read_anchors(&legacy)?;
    let ca = read_anchors(&dir.join("ca.pem"))?;
    let derived = match sensor_core::tls::legacy_anchors(&all, &ca) {
        sensor_core::tls::LegacyAnchors::Pin(derived) => derived,
        sensor_core::tls::LegacyAnchors::LearnOnFirstConnection => {
            if !WARNED_AWAITING.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::warn!(target: "control", "identity written by an earlier version: {} holds only the device CA, so which anchor verified the backend is unknown; the backend is trusted as before (the system roots plus {}) until the first connection, which pins the anchor that verifies it into {}", legacy.display(), legacy.display(), target.display());
            }
            return Ok(ServerTrustState::AwaitingFirstConnection);
        }
    };
    store::write_atomic_mode(
        &target,
        sensor_core::tls::certs_to_pem(&derived).as_bytes(),
        0o644,
    )
    .map_err(io(&target))?;
    log::warn!(target: "control", "identity written by an earlier version: pinned {} anchor(s) for the backend's server from {} (trust.pem without the device CA) into {}; the system's public roots are no longer trusted for the backend unless backend.trust_public_roots = true", derived.len(), legacy.display(), target.display());
    Ok(ServerTrustState::Pinned)
}

/// The subject of a certificate, for logs (`?` when it does not parse).
fn subject(c: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(c)
        .map(|(_, x)| x.subject().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Pins `anchors` (those that verified the backend's server chain in a connection made with the
/// earlier version's trust, see [`sensor_core::tls::AnchorRecorder`]) as the current generation's
/// `server-trust.pem`, when that generation is [`ServerTrustState::AwaitingFirstConnection`]: written
/// once, atomically, logged at warn with each anchor's subject. Returns whether it wrote the file;
/// `Ok(false)` when there is no identity, the generation is pinned already or `anchors` is empty.
pub fn pin_first_connection(
    state_dir: &Path,
    anchors: &[CertificateDer<'static>],
) -> Result<bool, IdentityError> {
    let link = state_dir.join(LINK);
    if anchors.is_empty() || std::fs::symlink_metadata(&link).is_err() {
        return Ok(false);
    }
    if migrate_server_trust(&link)? == ServerTrustState::Pinned {
        return Ok(false);
    }
    let pem = sensor_core::tls::certs_to_pem(anchors);
    parse_anchors(
        &pem,
        "the anchors that verified the backend's first connection",
    )?;
    let target = link.join(SERVER_TRUST);
    store::write_atomic_mode(&target, pem.as_bytes(), 0o644).map_err(io(&target))?;
    let subjects: Vec<String> = anchors.iter().map(subject).collect();
    log::warn!(target: "control", "identity written by an earlier version: the first connection to the backend was verified by {}; pinned into {} (the system's public roots are no longer trusted for the backend unless backend.trust_public_roots = true)", subjects.join("; "), target.display());
    Ok(true)
}

/// Verifies `new` ([`verify`]) and installs it as a new generation, then points `identity` at it.
/// The generation's `server-trust.pem` (and its `trust.pem` copy) is written whole from
/// `new.server_anchors`, never from `new.ca_pem`. Older generations but the previous one are removed.
pub fn install(state_dir: &Path, new: &NewIdentity<'_>) -> Result<Identity, IdentityError> {
    verify(new.cert_pem, new.key_pem, new.ca_pem)?;
    let anchors = match new.server_anchors {
        ServerAnchors::Enrolled(pem) => {
            parse_anchors(pem, "the anchors that verified the backend at enrolment")?
        }
        ServerAnchors::KeepCurrent => {
            let link = state_dir.join(LINK);
            if std::fs::symlink_metadata(&link).is_err() {
                return Err(IdentityError::ServerAnchors {
                    what: link.display().to_string(),
                    reason: "a renewal keeps the current server anchors, but there is no identity"
                        .into(),
                });
            }
            if migrate_server_trust(&link)? == ServerTrustState::AwaitingFirstConnection {
                return Err(IdentityError::ServerAnchors {
                    what: link.join(SERVER_TRUST).display().to_string(),
                    reason: "not pinned yet (an identity of an earlier version): a renewal waits until the first connection to the backend pins the anchor that verifies it".into(),
                });
            }
            read_anchors(&link.join(SERVER_TRUST))?
        }
    };
    let trust = sensor_core::tls::certs_to_pem(&anchors);
    store::private_dir(state_dir).map_err(io(state_dir))?;
    let generations = generations(state_dir)?;
    let n = generations.iter().max().map_or(1, |m| m + 1);
    let dir = state_dir.join(format!("{LINK}.{n}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    store::private_dir(&dir).map_err(io(&dir))?;
    for (name, bytes, mode) in [
        ("device.key", new.key_pem.as_bytes(), 0o600),
        ("device.pem", new.cert_pem.as_bytes(), 0o644),
        ("ca.pem", new.ca_pem.as_bytes(), 0o644),
        (SERVER_TRUST, trust.as_bytes(), 0o644),
        (LEGACY_TRUST, trust.as_bytes(), 0o644),
        ("sensor_id", new.sensor_id.as_bytes(), 0o644),
    ] {
        let p = dir.join(name);
        store::write_atomic_mode(&p, bytes, mode).map_err(io(&p))?;
    }
    let tmp_link = state_dir.join(format!(".{LINK}.tmp"));
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(format!("{LINK}.{n}"), &tmp_link).map_err(io(&tmp_link))?;
    let link = state_dir.join(LINK);
    std::fs::rename(&tmp_link, &link).map_err(io(&link))?;
    store::sync_dir(state_dir).map_err(io(state_dir))?;
    for old in generations.into_iter().filter(|g| *g + 1 < n) {
        let _ = std::fs::remove_dir_all(state_dir.join(format!("{LINK}.{old}")));
    }
    Identity::load(state_dir)?.ok_or_else(|| IdentityError::Io {
        path: link,
        source: std::io::Error::other("the identity vanished right after installing it"),
    })
}

fn generations(state_dir: &Path) -> Result<Vec<u64>, IdentityError> {
    let entries = match std::fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(state_dir)(e)),
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&format!("{LINK}.")))
                .and_then(|n| n.parse().ok())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn issue(ca: &Ca, csr_pem: &str) -> String {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("csr");
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        csr.signed_by(&ca.cert, &ca.key).expect("sign").pem()
    }

    #[test]
    fn install_verifies_and_swaps_generations() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(Identity::load(d.path()).expect("load"), None);
        let ca = new_ca("test CA");
        let k = new_key_and_csr("dev").expect("csr");
        let cert = issue(&ca, &k.csr_pem);
        let ca_pem = ca.cert.pem();
        let first = install(
            d.path(),
            &NewIdentity {
                sensor_id: "s-1",
                cert_pem: &cert,
                key_pem: &k.key_pem,
                ca_pem: &ca_pem,
                server_anchors: ServerAnchors::Enrolled(&ca_pem),
            },
        )
        .expect("install");
        assert_eq!(first.sensor_id, "s-1");
        assert!(!first.needs_renewal(first.not_before + 1));
        assert!(first.needs_renewal(first.not_after - 1));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&first.key_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A certificate for another key is refused and the installed identity stays.
        let other = new_key_and_csr("other").expect("csr");
        let wrong = issue(&ca, &other.csr_pem);
        let e = install(
            d.path(),
            &NewIdentity {
                sensor_id: "s-2",
                cert_pem: &wrong,
                key_pem: &k.key_pem,
                ca_pem: &ca_pem,
                server_anchors: ServerAnchors::Enrolled(&ca_pem),
            },
        )
        .expect_err("mismatched key");
        assert!(e.to_string().contains("another key"), "{e}");
        // A certificate from another CA is refused.
        let stranger = new_ca("stranger");
        let e = install(
            d.path(),
            &NewIdentity {
                sensor_id: "s-2",
                cert_pem: &issue(&stranger, &k.csr_pem),
                key_pem: &k.key_pem,
                ca_pem: &ca_pem,
                server_anchors: ServerAnchors::Enrolled(&ca_pem),
            },
        )
        .expect_err("wrong CA");
        assert!(e.to_string().contains("does not verify"), "{e}");
        assert_eq!(
            Identity::load(d.path()).expect("load").map(|i| i.sensor_id),
            Some("s-1".to_string())
        );

        // Renewal: a new generation, the previous one kept, older ones removed.
        for round in 0..3 {
            let k2 = new_key_and_csr("dev").expect("csr");
            install(
                d.path(),
                &NewIdentity {
                    sensor_id: "s-1",
                    cert_pem: &issue(&ca, &k2.csr_pem),
                    key_pem: &k2.key_pem,
                    ca_pem: &ca_pem,
                    server_anchors: ServerAnchors::KeepCurrent,
                },
            )
            .unwrap_or_else(|e| panic!("renewal {round}: {e}"));
        }
        let mut gens = generations(d.path()).expect("generations");
        gens.sort();
        assert_eq!(gens, vec![3, 4]);
    }

    fn issue_valid_from(ca: &Ca, csr_pem: &str, from_now_secs: i64, days: i64) -> String {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("csr");
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let start = time::OffsetDateTime::now_utc() + time::Duration::seconds(from_now_secs);
        csr.params.not_before = start;
        csr.params.not_after = start + time::Duration::days(days);
        csr.signed_by(&ca.cert, &ca.key).expect("sign").pem()
    }

    /// A certificate the backend issued from a clock a little ahead of this device's verifies; one
    /// that starts beyond the tolerance, or has expired, does not.
    #[test]
    fn a_device_clock_a_little_behind_the_backend_still_enrols() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = new_ca("test CA");
        let ca_pem = ca.cert.pem();
        let k = new_key_and_csr("dev").expect("csr");
        let soon = issue_valid_from(&ca, &k.csr_pem, 30, 365);
        verify(&soon, &k.key_pem, &ca_pem).expect("30 s ahead verifies");
        let late = issue_valid_from(&ca, &k.csr_pem, 2 * 3600, 365);
        let e = verify(&late, &k.key_pem, &ca_pem).expect_err("2 h ahead is refused");
        assert!(e.to_string().contains("does not verify"), "{e}");
        let expired = issue_valid_from(&ca, &k.csr_pem, -10 * 86_400, 1);
        verify(&expired, &k.key_pem, &ca_pem).expect_err("expired is refused");
    }

    #[test]
    fn garbage_certificates_are_named() {
        let k = new_key_and_csr("dev").expect("csr");
        let e = verify("not a pem", &k.key_pem, "also not").expect_err("garbage");
        assert!(e.to_string().contains("certificate_pem"), "{e}");
    }

    fn anchors_of(path: &Path) -> Vec<CertificateDer<'static>> {
        let text = std::fs::read_to_string(path).expect("read anchors");
        CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("pem")
    }

    fn der(ca: &Ca) -> CertificateDer<'static> {
        ca.cert.der().clone()
    }

    /// The server anchors are written whole at enrolment and carried over unchanged by every renewal,
    /// even when each renewal answer brings another issuing CA: the device CA never becomes an anchor
    /// for the backend's server, and the file does not grow.
    #[test]
    fn renewals_rebuild_the_server_anchors_and_never_add_the_issuing_ca() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        let server_ca = new_ca("backend server CA");
        let device_ca = new_ca("device CA");
        let k = new_key_and_csr("dev").expect("csr");
        let enrolled = install(
            d.path(),
            &NewIdentity {
                sensor_id: "s-1",
                cert_pem: &issue(&device_ca, &k.csr_pem),
                key_pem: &k.key_pem,
                ca_pem: &device_ca.cert.pem(),
                server_anchors: ServerAnchors::Enrolled(&server_ca.cert.pem()),
            },
        )
        .expect("enrol");
        let pinned = std::fs::read(&enrolled.server_trust_file).expect("read");
        assert_eq!(
            anchors_of(&enrolled.server_trust_file),
            vec![der(&server_ca)]
        );
        let link = d.path().join(LINK);
        assert_eq!(anchors_of(&link.join(LEGACY_TRUST)), vec![der(&server_ca)]);
        for round in 0..4 {
            // A hostile backend answers each renewal with a CA of its choosing.
            let rogue = new_ca(&format!("rogue CA {round}"));
            let k2 = new_key_and_csr("dev").expect("csr");
            let renewed = install(
                d.path(),
                &NewIdentity {
                    sensor_id: "s-1",
                    cert_pem: &issue(&rogue, &k2.csr_pem),
                    key_pem: &k2.key_pem,
                    ca_pem: &rogue.cert.pem(),
                    server_anchors: ServerAnchors::KeepCurrent,
                },
            )
            .unwrap_or_else(|e| panic!("renewal {round}: {e}"));
            assert_eq!(
                std::fs::read(&renewed.server_trust_file).expect("read"),
                pinned,
                "renewal {round}: the server anchors are the enrolment's, byte for byte"
            );
            assert_eq!(
                std::fs::read(link.join(LEGACY_TRUST)).expect("read"),
                pinned,
                "renewal {round}: trust.pem is rebuilt, not appended"
            );
            assert_eq!(anchors_of(&link.join("ca.pem")), vec![der(&rogue)]);
        }
    }

    /// A renewal without a current identity, or with an unusable anchors file, fails naming the file
    /// and installs nothing; an enrolment without any anchor is refused.
    #[test]
    fn unusable_server_anchors_are_refused_naming_the_file() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("CA");
        let ca_pem = ca.cert.pem();
        let k = new_key_and_csr("dev").expect("csr");
        let cert = issue(&ca, &k.csr_pem);
        let new = |anchors| NewIdentity {
            sensor_id: "s-1",
            cert_pem: &cert,
            key_pem: &k.key_pem,
            ca_pem: &ca_pem,
            server_anchors: anchors,
        };
        let e = install(d.path(), &new(ServerAnchors::KeepCurrent)).expect_err("no identity");
        assert!(e.to_string().contains("no identity"), "{e}");
        let e = install(d.path(), &new(ServerAnchors::Enrolled(""))).expect_err("no anchor");
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        assert_eq!(Identity::load(d.path()).expect("load"), None);
        let first = install(d.path(), &new(ServerAnchors::Enrolled(&ca_pem))).expect("enrol");
        // Truncated mid-certificate.
        let whole = std::fs::read_to_string(&first.server_trust_file).expect("read");
        std::fs::write(&first.server_trust_file, &whole[..whole.len() / 2]).expect("truncate");
        let e = install(d.path(), &new(ServerAnchors::KeepCurrent)).expect_err("truncated");
        assert!(e.to_string().contains(SERVER_TRUST), "{e}");
        assert_eq!(generations(d.path()).expect("generations"), vec![1]);
    }

    /// A generation of an earlier version (no server-trust.pem, a trust.pem that grew with renewals)
    /// gets server-trust.pem derived once: the CA-file anchors without the device CA; or the device CA
    /// when trust.pem held nothing else.
    #[test]
    fn an_earlier_generation_is_migrated_once() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        let server_ca = new_ca("backend server CA");
        let device_ca = new_ca("device CA");
        let k = new_key_and_csr("dev").expect("csr");
        let first = install(
            d.path(),
            &NewIdentity {
                sensor_id: "s-1",
                cert_pem: &issue(&device_ca, &k.csr_pem),
                key_pem: &k.key_pem,
                ca_pem: &device_ca.cert.pem(),
                server_anchors: ServerAnchors::Enrolled(&server_ca.cert.pem()),
            },
        )
        .expect("enrol");
        // What the earlier version wrote after two renewals: ca.pem prepended each time.
        let dev = device_ca.cert.pem();
        let old = format!("{dev}{dev}{dev}{}", server_ca.cert.pem());
        let link = d.path().join(LINK);
        std::fs::write(link.join(LEGACY_TRUST), &old).expect("write");
        std::fs::remove_file(&first.server_trust_file).expect("rm");
        let loaded = Identity::load(d.path()).expect("load").expect("some");
        assert_eq!(anchors_of(&loaded.server_trust_file), vec![der(&server_ca)]);
        // Once: a later load leaves it alone.
        let before = std::fs::read(&loaded.server_trust_file).expect("read");
        std::fs::write(link.join(LEGACY_TRUST), "garbage").expect("write");
        Identity::load(d.path()).expect("load again");
        assert_eq!(
            std::fs::read(&loaded.server_trust_file).expect("read"),
            before
        );

        // Enrolled without a CA file: trust.pem held only the device CA. Whether it or a public root
        // verified the backend is unknown: nothing is pinned yet (see the test below).
        std::fs::write(link.join(LEGACY_TRUST), format!("{dev}{dev}")).expect("write");
        std::fs::remove_file(&loaded.server_trust_file).expect("rm");
        Identity::load(d.path()).expect("load");
        assert!(!loaded.server_trust_file.exists());

        // An unreadable trust.pem is an error naming it, and nothing is written.
        std::fs::write(link.join(LEGACY_TRUST), &dev[..dev.len() / 2]).expect("write");
        let e = Identity::load(d.path()).expect_err("truncated trust.pem");
        assert!(e.to_string().contains(LEGACY_TRUST), "{e}");
        assert!(!loaded.server_trust_file.exists());
    }

    /// An identity of an earlier version whose trust.pem holds only the device CA (enrolled without a
    /// CA file; the backend may sit behind a public CA) is not pinned to the device CA at the upgrade:
    /// it awaits the first connection, a renewal waits too (refused naming server-trust.pem), and the
    /// anchor that verified the first connection is pinned once, whatever it is.
    #[test]
    fn a_device_ca_only_identity_is_pinned_by_its_first_connection() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let d = tempfile::tempdir().expect("tempdir");
        let device_ca = new_ca("device CA");
        let public_root = new_ca("a public root");
        let k = new_key_and_csr("dev").expect("csr");
        let cert = issue(&device_ca, &k.csr_pem);
        let dev = device_ca.cert.pem();
        let first = install(
            d.path(),
            &NewIdentity {
                sensor_id: "s-1",
                cert_pem: &cert,
                key_pem: &k.key_pem,
                ca_pem: &dev,
                server_anchors: ServerAnchors::Enrolled(&dev),
            },
        )
        .expect("enrol");
        // As the earlier version left it: no server-trust.pem, trust.pem = the device CA (twice after
        // a renewal).
        let link = d.path().join(LINK);
        std::fs::remove_file(&first.server_trust_file).expect("rm");
        std::fs::write(link.join(LEGACY_TRUST), format!("{dev}{dev}")).expect("write");
        assert_eq!(
            migrate_server_trust(&link).expect("migrate"),
            ServerTrustState::AwaitingFirstConnection
        );
        let loaded = Identity::load(d.path()).expect("load").expect("some");
        assert!(!loaded.server_trust_file.exists(), "nothing pinned offline");
        assert_eq!(
            sensor_core::tls::awaiting_first_pin(&loaded.server_trust_file).expect("awaiting"),
            Some(link.join(LEGACY_TRUST)),
            "the relay and the management client trust as the earlier version did"
        );
        let k2 = new_key_and_csr("dev").expect("csr");
        let renewed_cert = issue(&device_ca, &k2.csr_pem);
        let renewal = NewIdentity {
            sensor_id: "s-1",
            cert_pem: &renewed_cert,
            key_pem: &k2.key_pem,
            ca_pem: &dev,
            server_anchors: ServerAnchors::KeepCurrent,
        };
        let e = install(d.path(), &renewal).expect_err("renewal before the pin");
        assert!(e.to_string().contains(SERVER_TRUST), "{e}");
        assert!(e.to_string().contains("first connection"), "{e}");
        assert_eq!(generations(d.path()).expect("generations"), vec![1]);

        // No verified connection yet: nothing pinned.
        assert!(!pin_first_connection(d.path(), &[]).expect("pin nothing"));
        assert!(!loaded.server_trust_file.exists());
        // The first connection was verified by the public root: that is pinned, not the device CA.
        assert!(pin_first_connection(d.path(), &[der(&public_root)]).expect("pin"));
        assert_eq!(
            anchors_of(&loaded.server_trust_file),
            vec![der(&public_root)]
        );
        assert_eq!(
            sensor_core::tls::awaiting_first_pin(&loaded.server_trust_file).expect("pinned"),
            None
        );
        // Once: a later connection changes nothing.
        assert!(!pin_first_connection(d.path(), &[der(&device_ca)]).expect("again"));
        assert_eq!(
            anchors_of(&loaded.server_trust_file),
            vec![der(&public_root)]
        );
        // The renewal now keeps the pinned anchor.
        let renewed = install(d.path(), &renewal).expect("renewal after the pin");
        assert_eq!(
            anchors_of(&renewed.server_trust_file),
            vec![der(&public_root)]
        );

        // A backend whose server CA is the device CA pins the device CA the same way.
        std::fs::remove_file(&renewed.server_trust_file).expect("rm");
        std::fs::write(link.join(LEGACY_TRUST), &dev).expect("write");
        assert!(pin_first_connection(d.path(), &[der(&device_ca)]).expect("pin"));
        assert_eq!(
            anchors_of(&renewed.server_trust_file),
            vec![der(&device_ca)]
        );
    }
}

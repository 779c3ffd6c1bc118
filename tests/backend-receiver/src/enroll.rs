//! Device certificates: `POST /v1/enroll` (no device authentication; a single-use token) and
//! `POST /v1/renew` (mutual TLS only). Both issue a client certificate for the public key of the
//! request's CSR (the private key never reaches the receiver), signed by the receiver's CA, the CA the
//! main port verifies client certificates against.
//!
//! Order of checks on enrol: injected `enroll_garbage` (201, garbage body; nothing issued, the token
//! not used), body (400 naming every bad field), token (401 `unknown enrollment token` or
//! `enrollment token already used`), CSR (400; the token is not used), then the token is used and the
//! certificate issued (201). On renew: a verified client certificate (else 401, a bearer token is not
//! enough), body (400), CSR (400), issue (200), by the hostile CA instead when the receiver plays a
//! compromised backend (`crate::hostile`). Every refusal is recorded with its reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::http::{
    check_common_headers, client_identity, read_strict_json, string_field, Field, Reject,
};
use crate::management::{now_rfc3339, rfc3339};
use crate::model::{
    EnrollRequest, EnrollResponse, EnrollmentRecord, RefusedAttempt, RenewResponse, RenewalRecord,
};
use crate::server::Shared;

/// What an `enroll_garbage` fault answers with status 201: JSON cut short.
const GARBAGE_BODY: &str = r#"{"sensor_id":"garb"#;

/// The receiver's CA as a certificate issuer.
pub(crate) struct Issuer {
    ca: sensor_testkit::TestCa,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    validity: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// A certificate issued for a CSR.
pub(crate) struct Issued {
    pub cert_pem: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
}

impl Issuer {
    /// Issues device certificates valid for `validity` with `ca`.
    pub fn new(ca: sensor_testkit::TestCa, validity: Duration) -> Self {
        Self {
            ca_pem: ca.cert_pem(),
            ca,
            validity,
        }
    }

    /// Issues a client certificate with common name `cn` for the CSR's key, valid from now (whole
    /// seconds) for the configured validity. A CSR that does not parse or verify is a 400.
    fn issue(&self, csr_pem: &str, cn: &str, serial: u64) -> Result<Issued, Reject> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(UNIX_EPOCH, |d| {
                UNIX_EPOCH + Duration::from_secs(d.as_secs())
            });
        let cert = self
            .ca
            .issue_client_for_csr(csr_pem, cn, serial, now, now + self.validity)
            .map_err(|e| match e {
                sensor_testkit::TestkitError::Csr(_) => Reject::new(
                    StatusCode::BAD_REQUEST,
                    format!("csr_pem is not a usable certificate signing request: {e}"),
                ),
                e => Reject::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("issuing the certificate: {e}"),
                ),
            })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.cert_der).map_err(|e| {
            Reject::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("re-reading the issued certificate: {e}"),
            )
        })?;
        Ok(Issued {
            serial: hex::encode(parsed.raw_serial()),
            not_before: rfc3339(parsed.validity().not_before.to_datetime()),
            not_after: rfc3339(parsed.validity().not_after.to_datetime()),
            cert_pem: cert.cert_pem,
        })
    }
}

fn refusal(endpoint: &str, reject: &Reject, token: Option<String>) -> RefusedAttempt {
    RefusedAttempt {
        endpoint: endpoint.to_string(),
        status: reject.status.as_u16(),
        reason: reject.message.clone(),
        token,
        at: now_rfc3339(),
    }
}

/// `POST /v1/enroll`.
pub(crate) async fn enroll(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    check_common_headers(&shared, &parts, "enroll");
    if shared.lock_faults().enroll_garbage() {
        shared.lock_mgmt().refuse(RefusedAttempt {
            endpoint: "enroll".into(),
            status: 201,
            reason: "injected fault enroll_garbage".into(),
            token: None,
            at: now_rfc3339(),
        });
        log::info!("enroll answered with garbage (injected fault)");
        return (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            GARBAGE_BODY,
        )
            .into_response();
    }
    let map = match read_strict_json(
        &shared,
        &parts,
        body,
        &[
            ("enrollment_token", Field::String),
            ("csr_pem", Field::String),
            ("hostname", Field::String),
            ("arch", Field::String),
            ("version", Field::String),
        ],
    )
    .await
    {
        Ok(map) => map,
        Err(reject) => {
            shared.lock_mgmt().refuse(refusal("enroll", &reject, None));
            log::info!("enroll refused: {}", reject.message);
            return reject.into_response();
        }
    };
    let req = EnrollRequest {
        enrollment_token: string_field(&map, "enrollment_token"),
        csr_pem: string_field(&map, "csr_pem"),
        hostname: string_field(&map, "hostname"),
        arch: string_field(&map, "arch"),
        version: string_field(&map, "version"),
    };
    let token = req.enrollment_token.clone();
    match enroll_checked(&shared, req) {
        Ok(resp) => (StatusCode::CREATED, Json(resp)).into_response(),
        Err(reject) => {
            shared
                .lock_mgmt()
                .refuse(refusal("enroll", &reject, Some(token)));
            log::info!("enroll refused: {}", reject.message);
            reject.into_response()
        }
    }
}

fn enroll_checked(shared: &Shared, req: EnrollRequest) -> Result<EnrollResponse, Reject> {
    let serial = {
        let mut m = shared.lock_mgmt();
        m.check_token(&req.enrollment_token)
            .map_err(|r| Reject::new(StatusCode::UNAUTHORIZED, r.message()))?;
        m.next_serial()
    };
    let sensor_id = uuid::Uuid::new_v4().to_string();
    let issued = shared.issuer.issue(&req.csr_pem, &sensor_id, serial)?;
    let mut m = shared.lock_mgmt();
    m.consume_token(EnrollmentRecord {
        sensor_id: sensor_id.clone(),
        token: req.enrollment_token,
        hostname: req.hostname.clone(),
        arch: req.arch,
        version: req.version,
        serial: issued.serial.clone(),
        not_before: issued.not_before,
        not_after: issued.not_after.clone(),
        at: now_rfc3339(),
    })
    .map_err(|r| Reject::new(StatusCode::UNAUTHORIZED, r.message()))?;
    log::info!(
        "enrolled sensor {sensor_id} (hostname {:?}, serial {}, until {})",
        req.hostname,
        issued.serial,
        issued.not_after
    );
    Ok(EnrollResponse {
        sensor_id,
        certificate_pem: issued.cert_pem,
        ca_pem: shared.issuer.ca_pem.clone(),
        config: m.config().config.clone(),
    })
}

/// `POST /v1/renew`.
pub(crate) async fn renew(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    check_common_headers(&shared, &parts, "renew");
    let result = async {
        let identity = client_identity(&parts).ok_or_else(|| {
            Reject::new(
                StatusCode::UNAUTHORIZED,
                "renewal requires the client certificate being renewed (mutual TLS); a bearer token is not enough",
            )
        })?;
        let cn = identity.cn.ok_or_else(|| {
            Reject::new(
                StatusCode::UNAUTHORIZED,
                "the client certificate has no common name",
            )
        })?;
        let map = read_strict_json(&shared, &parts, body, &[("csr_pem", Field::String)]).await?;
        let serial = shared.lock_mgmt().next_serial();
        // A compromised backend issues the renewal from a CA of its choosing (see `hostile`).
        let issuer = shared.hostile.as_ref().map_or(&shared.issuer, |h| &h.issuer);
        let issued = issuer.issue(&string_field(&map, "csr_pem"), &cn, serial)?;
        shared.lock_mgmt().renewed(RenewalRecord {
            sensor_id: cn.clone(),
            previous_serial: identity.serial.clone(),
            serial: issued.serial.clone(),
            not_before: issued.not_before,
            not_after: issued.not_after.clone(),
            at: now_rfc3339(),
        });
        log::info!(
            "renewed the certificate of {cn} (serial {} -> {}, until {})",
            identity.serial,
            issued.serial,
            issued.not_after
        );
        Ok::<_, Reject>(RenewResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: issuer.ca_pem.clone(),
        })
    }
    .await;
    match result {
        Ok(resp) => Json(resp).into_response(),
        Err(reject) => {
            shared.lock_mgmt().refuse(refusal("renew", &reject, None));
            log::info!("renew refused: {}", reject.message);
            reject.into_response()
        }
    }
}

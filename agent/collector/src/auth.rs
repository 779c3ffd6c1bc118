//! Entra ID tokens for one tenant: client secret or certificate assertion, cached and refreshed ahead of
//! expiry. Invariant: the scope always follows the tenant's `cloud` (the `login_url` override changes
//! where the request goes, never what it asks for), and no secret or token reaches an error message.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256};
use rustls::pki_types::PrivateKeyDer;
use sensor_core::config::{AssertionAlg, TenantConfig};
use serde::Deserialize;
use sha1::Digest as _;

/// Why no token could be had.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// AADSTS7000215 / 7000216 / 700027: the secret or the certificate is wrong.
    #[error("Entra refused the credentials ({code}): {text}")]
    InvalidCredentials {
        /// The AADSTS code.
        code: String,
        /// Entra's description.
        text: String,
    },
    /// AADSTS7000222: the client secret expired.
    #[error("the client secret expired ({code}): {text}")]
    SecretExpired {
        /// The AADSTS code.
        code: String,
        /// Entra's description.
        text: String,
    },
    /// AADSTS900382 or an audience error: the app lives in another cloud.
    #[error("wrong cloud ({code}): {text}")]
    WrongCloud {
        /// The AADSTS code.
        code: String,
        /// Entra's description.
        text: String,
    },
    /// AADSTS700016 / 90002 and other configuration errors: unknown app or tenant.
    #[error("Entra refused the request ({code}): {text}")]
    Refused {
        /// The AADSTS code.
        code: String,
        /// Entra's description.
        text: String,
    },
    /// The token endpoint could not be reached or failed (retried).
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    /// The credential files could not be used.
    #[error("credential: {0}")]
    Credential(String),
}

impl AuthError {
    /// Whether retrying soon may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, AuthError::Unreachable(_))
    }
}

enum Credential {
    /// The secret's value; zeroed in memory when dropped.
    Secret(zeroize::Zeroizing<String>),
    Certificate {
        key: Box<RsaKeyPair>,
        x5t: String,
        x5t_s256: String,
        alg: AssertionAlg,
    },
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

/// Tokens for one tenant. Invariant: at most one token request is in flight per tenant; a cached token
/// is used only before its refresh time (ahead of expiry).
pub struct TokenProvider {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    scope: String,
    credential: Credential,
    credential_expires: Option<i64>,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct EntraError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u64>,
}

impl TokenProvider {
    /// Builds the provider of `tenant`, reading its credential files now.
    pub fn new(tenant: &TenantConfig, http: reqwest::Client) -> Result<Self, AuthError> {
        let mut credential_expires = tenant
            .client_secret_expires
            .as_deref()
            .and_then(sensor_core::config::parse_date)
            .map(|d| d.midnight().assume_utc().unix_timestamp());
        let credential = match (
            &tenant.client_secret_file,
            &tenant.certificate_file,
            &tenant.private_key_file,
        ) {
            (Some(secret), _, _) => Credential::Secret(read_secret(secret)?),
            (None, Some(cert), Some(key)) => {
                let (c, not_after) = load_certificate(cert, key, tenant.assertion_alg)?;
                credential_expires = not_after;
                c
            }
            _ => {
                return Err(AuthError::Credential(format!(
                    "tenant {} has no credential",
                    tenant.name
                )))
            }
        };
        Ok(Self {
            http,
            token_url: format!(
                "{}/{}/oauth2/v2.0/token",
                tenant.login_base(),
                tenant.tenant_id
            ),
            client_id: tenant.client_id.clone(),
            scope: tenant.cloud.scope(),
            credential,
            credential_expires,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// When the credential expires (Unix seconds): the certificate's notAfter, or the configured
    /// `client_secret_expires` of a secret.
    pub fn credential_expires(&self) -> Option<i64> {
        self.credential_expires
    }

    /// A valid access token, from the cache or freshly requested.
    pub async fn token(&self) -> Result<String, AuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let (token, lifetime) = self.request().await?;
        // Refresh ahead of expiry: 5 minutes early, or at 3/4 of a short lifetime.
        let ahead = Duration::from_secs(300).min(lifetime / 4);
        *cache = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime - ahead,
        });
        Ok(token)
    }

    /// Forgets the cached token (after a 401).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    async fn request(&self) -> Result<(String, Duration), AuthError> {
        // Zeroed when dropped; reqwest's copy of the encoded body is beyond our reach.
        let mut form: Vec<(&str, zeroize::Zeroizing<String>)> = vec![
            ("grant_type", String::from("client_credentials").into()),
            ("client_id", self.client_id.clone().into()),
            ("scope", self.scope.clone().into()),
        ];
        match &self.credential {
            Credential::Secret(s) => form.push(("client_secret", s.clone())),
            Credential::Certificate { .. } => {
                form.push((
                    "client_assertion_type",
                    String::from("urn:ietf:params:oauth:client-assertion-type:jwt-bearer").into(),
                ));
                form.push(("client_assertion", self.assertion()?.into()));
            }
        }
        let resp = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| AuthError::Unreachable(describe_reqwest(&e)))?;
        let status = resp.status();
        // A token answer is a few KiB; anything bigger is cut (and then fails to parse).
        let (body, _) = sensor_core::http::read_capped(resp, TOKEN_ANSWER_CAP)
            .await
            .map_err(|e| AuthError::Unreachable(describe_reqwest(&e)))?;
        if status.is_success() {
            let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                AuthError::Unreachable(format!("token response is not valid JSON: {e}"))
            })?;
            let secs = match &t.expires_in {
                Some(serde_json::Value::Number(n)) => n.as_u64(),
                Some(serde_json::Value::String(s)) => s.parse().ok(),
                _ => None,
            }
            .unwrap_or(3599)
            .max(1);
            return Ok((t.access_token, Duration::from_secs(secs)));
        }
        Err(classify_entra_error(status.as_u16(), &body))
    }

    fn assertion(&self) -> Result<String, AuthError> {
        let Credential::Certificate {
            key,
            x5t,
            x5t_s256,
            alg,
        } = &self.credential
        else {
            return Err(AuthError::Credential("no certificate".into()));
        };
        let header = match alg {
            AssertionAlg::RS256 => serde_json::json!({"alg":"RS256","typ":"JWT","x5t":x5t}),
            AssertionAlg::PS256 => {
                serde_json::json!({"alg":"PS256","typ":"JWT","x5t#S256":x5t_s256})
            }
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "aud": self.token_url,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now - 60,
            "iat": now,
            "exp": now + 600,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; key.public().modulus_len()];
        let padding: &'static dyn ring::signature::RsaEncoding = match alg {
            AssertionAlg::RS256 => &RSA_PKCS1_SHA256,
            AssertionAlg::PS256 => &RSA_PSS_SHA256,
        };
        key.sign(
            padding,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .map_err(|_| AuthError::Credential("signing the client assertion failed".into()))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// The largest token endpoint answer read, in bytes.
const TOKEN_ANSWER_CAP: usize = 256 * 1024;

/// Maps an Entra error response to an [`AuthError`] by its AADSTS code. The server's text is redacted: a
/// proxy that echoes the token request must not put the secret or the assertion into the status.
pub fn classify_entra_error(status: u16, body: &[u8]) -> AuthError {
    use sensor_core::status::redact;
    let parsed: Option<EntraError> = serde_json::from_slice(body).ok();
    let Some(e) = parsed else {
        let text = redact(&String::from_utf8_lossy(&body[..body.len().min(300)]));
        return AuthError::Unreachable(format!("token endpoint answered HTTP {status}: {text}"));
    };
    let first_line = e
        .error_description
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let code = e
        .error_codes
        .first()
        .map(|c| format!("AADSTS{c}"))
        .or_else(|| {
            first_line
                .split(':')
                .next()
                .filter(|s| s.starts_with("AADSTS"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| e.error.clone());
    let code = redact(&code);
    let text = redact(if first_line.is_empty() {
        e.error.trim()
    } else {
        &first_line
    });
    let text = if text.is_empty() {
        format!("HTTP {status}")
    } else {
        text
    };
    match code.as_str() {
        "AADSTS7000215" | "AADSTS7000216" | "AADSTS700027" | "AADSTS700023" | "AADSTS7000218" => {
            AuthError::InvalidCredentials { code, text }
        }
        "AADSTS7000222" => AuthError::SecretExpired { code, text },
        "AADSTS900382" | "AADSTS500011" => AuthError::WrongCloud { code, text },
        _ if status >= 500 || status == 429 => {
            AuthError::Unreachable(format!("HTTP {status} {code}: {text}"))
        }
        _ => AuthError::Refused { code, text },
    }
}

fn read_secret(path: &Path) -> Result<zeroize::Zeroizing<String>, AuthError> {
    let raw = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        AuthError::Credential(format!(
            "cannot read the client secret file {}: {e}",
            path.display()
        ))
    })?);
    let s = zeroize::Zeroizing::new(raw.trim().to_string());
    if s.is_empty() {
        return Err(AuthError::Credential(format!(
            "the client secret file {} is empty",
            path.display()
        )));
    }
    Ok(s)
}

fn load_certificate(
    cert: &Path,
    key: &Path,
    alg: AssertionAlg,
) -> Result<(Credential, Option<i64>), AuthError> {
    let certs =
        sensor_core::tls::read_certs(cert).map_err(|e| AuthError::Credential(e.to_string()))?;
    let der = certs[0].as_ref();
    let not_after = x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| {
            AuthError::Credential(format!(
                "{}: not a readable X.509 certificate: {e}",
                cert.display()
            ))
        })?;
    let key_der =
        sensor_core::tls::read_key(key).map_err(|e| AuthError::Credential(e.to_string()))?;
    let key = match &key_der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => {
            return Err(AuthError::Credential(format!(
                "{}: the certificate's key must be RSA (Entra requires RSA, at least 2048 bits)",
                key.display()
            )))
        }
    }
    .map_err(|e| AuthError::Credential(format!("{}: not a usable RSA key: {e}", key.display())))?;
    let credential = Credential::Certificate {
        key: Box::new(key),
        x5t: URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(der)),
        x5t_s256: URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der)),
        alg,
    };
    Ok((credential, Some(not_after)))
}

/// A one-line description of a transport error, naming timeouts and connection failures.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {}", sensor_core::describe_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entra_errors_map_to_their_states() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.\r\nTrace ID: x","error_codes":[7000215]}"#;
        assert!(
            matches!(classify_entra_error(401, body), AuthError::InvalidCredentials { ref code, .. } if code == "AADSTS7000215")
        );
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys for app 'x' are expired.","error_codes":[7000222]}"#;
        assert!(matches!(
            classify_entra_error(401, body),
            AuthError::SecretExpired { .. }
        ));
        let body = br#"{"error":"invalid_request","error_description":"AADSTS900382: Confidential Client is not supported in Cross Cloud request.","error_codes":[900382]}"#;
        assert!(matches!(
            classify_entra_error(400, body),
            AuthError::WrongCloud { .. }
        ));
        assert!(matches!(
            classify_entra_error(503, b"<html>busy</html>"),
            AuthError::Unreachable(_)
        ));
        let body = br#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application not found","error_codes":[700016]}"#;
        assert!(matches!(
            classify_entra_error(400, body),
            AuthError::Refused { .. }
        ));
    }

    #[test]
    fn an_entra_error_without_text_still_names_the_answer() {
        // Found by fuzzing (fuzz/fuzz_targets/entra_error.rs): `{}` became "Entra refused the request
        // (): ", with nothing to act on.
        let err = classify_entra_error(400, b"{}");
        assert_eq!(
            err,
            AuthError::Refused {
                code: String::new(),
                text: "HTTP 400".into()
            }
        );
    }

    #[test]
    fn entra_errors_never_carry_a_secret() {
        // Found by fuzzing (fuzz/fuzz_targets/entra_error.rs): a proxy page echoing the token request
        // put the client assertion into the error, hence into status.json and the logs.
        let page = b"<html><body>Bad gateway: grant_type=client_credentials&client_assertion=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl</body></html>";
        let err = classify_entra_error(502, page).to_string();
        assert!(!err.contains("eyJ"), "{err}");
        let body = br#"{"error":"invalid_request client_secret=s3cr3t","error_description":"","error_codes":[]}"#;
        let err = classify_entra_error(400, body).to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}

//! Entra ID (Azure AD) token endpoint emulation: client credentials with a secret or a JWT client
//! assertion, AADSTS errors in Entra's JSON shape, and HMAC-signed JWT-shaped access tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{hmac, signature};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::scenario::Cloud;
use crate::state::State;

/// The registered certificate of a tenant's app.
#[derive(Clone, Debug)]
pub(crate) struct CertInfo {
    /// SHA-1 of the certificate DER (`x5t`).
    pub sha1: Vec<u8>,
    /// SHA-256 of the certificate DER (`x5t#S256`).
    pub sha256: Vec<u8>,
    /// The RSAPublicKey DER from the SubjectPublicKeyInfo.
    pub rsa_public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses a PEM certificate.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| format!("certificate PEM: {e}"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("certificate DER: {e}"))?;
        Ok(Self {
            sha1: Sha1::digest(&pem.contents).to_vec(),
            sha256: Sha256::digest(&pem.contents).to_vec(),
            rsa_public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }
}

/// Claims of an issued access token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AccessClaims {
    pub aud: String,
    pub iss: String,
    pub tid: String,
    pub appid: String,
    pub roles: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// Makes a JWT-shaped token signed with `key` (HS256).
pub(crate) fn make_token(key: &hmac::Key, claims: &AccessClaims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256","kid":"m365-sim"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{header}.{body}");
    let tag = hmac::sign(key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Verifies a token's signature and returns its claims (expiry is the caller's business).
pub(crate) fn verify_token(key: &hmac::Key, token: &str) -> Option<AccessClaims> {
    let (input, sig) = token.rsplit_once('.')?;
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    hmac::verify(key, input.as_bytes(), &sig).ok()?;
    let (_, body) = input.split_once('.')?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
}

/// A refused token request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenError {
    /// HTTP status.
    pub status: u16,
    /// OAuth `error`.
    pub error: &'static str,
    /// AADSTS number.
    pub code: u32,
    /// Text after `AADSTSnnnn: `.
    pub message: String,
}

fn err(status: u16, error: &'static str, code: u32, message: impl Into<String>) -> TokenError {
    TokenError {
        status,
        error,
        code,
        message: message.into(),
    }
}

impl TokenError {
    /// Entra's JSON error body.
    pub fn body(&self, now: time::OffsetDateTime) -> serde_json::Value {
        let trace = uuid::Uuid::new_v4().to_string();
        let corr = uuid::Uuid::new_v4().to_string();
        let ts = format!("{}Z", crate::content::fmt_creation(now));
        json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {ts}",
                self.code, self.message
            ),
            "error_codes": [self.code],
            "timestamp": ts,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
        })
    }
}

/// A token request, already decoded from the form.
pub(crate) struct TokenRequest<'a> {
    pub tenant: &'a str,
    pub v2: bool,
    pub form: &'a [(String, String)],
    pub endpoint_url: String,
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Handles a token request against the state; records stats. Returns the success body.
pub(crate) fn token(
    state: &mut State,
    key: &hmac::Key,
    req: &TokenRequest<'_>,
) -> Result<serde_json::Value, TokenError> {
    let Some(tid) = state
        .tenants
        .keys()
        .find(|k| k.eq_ignore_ascii_case(req.tenant))
        .cloned()
    else {
        state.token_unknown_tenant += 1;
        return Err(err(400, "invalid_request", 90002, format!("Tenant '{}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.", req.tenant)));
    };
    let Some(t) = state.tenants.get_mut(&tid) else {
        return Err(err(500, "server_error", 0, "internal"));
    };
    let result = token_for_tenant(t, key, req);
    match &result {
        Ok(_) => t.stats.token_ok += 1,
        Err(e) => *t.stats.token_failed.entry(e.code.to_string()).or_default() += 1,
    }
    result
}

fn token_for_tenant(
    t: &mut crate::state::TenantState,
    key: &hmac::Key,
    req: &TokenRequest<'_>,
) -> Result<serde_json::Value, TokenError> {
    let form = req.form;
    let now = t.now();
    let grant = field(form, "grant_type").unwrap_or("");
    if grant != "client_credentials" {
        return Err(err(
            400,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant}'."),
        ));
    }
    let client_id = field(form, "client_id").unwrap_or("");
    if !client_id.eq_ignore_ascii_case(&t.spec.client_id) {
        return Err(err(400, "unauthorized_client", 700016, format!("Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.", t.spec.tenant_id)));
    }
    // The audience: v2 scope `https://host/.default`, v1 resource `https://host`.
    let wanted = if req.v2 {
        field(form, "scope").unwrap_or("")
    } else {
        field(form, "resource").unwrap_or("")
    };
    let host = if req.v2 {
        match wanted.strip_suffix("/.default") {
            Some(h) => h,
            None => return Err(err(400, "invalid_scope", 1002012, format!("The provided value for scope {wanted} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."))),
        }
    } else {
        wanted.trim_end_matches('/')
    };
    let host = host.strip_prefix("https://").unwrap_or(host);
    let cloud = t.spec.cloud;
    if host != cloud.api_host() {
        if Cloud::ALL.iter().any(|c| c.api_host() == host) {
            return Err(err(
                400,
                "invalid_request",
                900382,
                "Confidential Client is not supported in Cross Cloud request.",
            ));
        }
        return Err(err(400, "invalid_resource", 500011, format!("The resource principal named {wanted} was not found in the tenant named {}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.", t.spec.tenant_id)));
    }
    if let Some(secret) = field(form, "client_secret") {
        if t.spec.client_secrets.iter().any(|s| s == secret) {
            // ok
        } else if t.spec.expired_secrets.iter().any(|s| s == secret) {
            return Err(err(401, "invalid_client", 7000222, format!("The provided client secret keys for app '{}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.", t.spec.client_id)));
        } else {
            return Err(err(401, "invalid_client", 7000215, format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.", t.spec.client_id)));
        }
    } else if let Some(assertion) = field(form, "client_assertion") {
        let atype = field(form, "client_assertion_type").unwrap_or("");
        if atype != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
            return Err(err(
                400,
                "invalid_request",
                50027,
                format!("Invalid client_assertion_type '{atype}'."),
            ));
        }
        verify_assertion(t, assertion, req, now.unix_timestamp())?;
    } else {
        return Err(err(401, "invalid_client", 7000216, "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type."));
    }
    let iat = now.unix_timestamp();
    let lifetime = t.spec.token_lifetime_secs as i64;
    let mut roles = Vec::new();
    if t.spec.consent {
        roles.push("ActivityFeed.Read".to_string());
        if t.spec.dlp_permission {
            roles.push("ActivityFeed.ReadDlp".to_string());
        }
    }
    let aud = format!("https://{}", cloud.api_host());
    let claims = AccessClaims {
        aud: aud.clone(),
        iss: format!("https://sts.windows.net/{}/", t.spec.tenant_id),
        tid: t.spec.tenant_id.clone(),
        appid: t.spec.client_id.clone(),
        roles,
        iat,
        nbf: iat,
        exp: iat + lifetime,
    };
    let access = make_token(key, &claims);
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access,
    });
    if !req.v2 {
        body["resource"] = json!(aud);
        body["expires_on"] = json!((iat + lifetime).to_string());
        body["not_before"] = json!(iat.to_string());
        body["expires_in"] = json!(lifetime.to_string());
        body["ext_expires_in"] = json!(lifetime.to_string());
    }
    Ok(body)
}

fn verify_assertion(
    t: &mut crate::state::TenantState,
    assertion: &str,
    req: &TokenRequest<'_>,
    now: i64,
) -> Result<(), TokenError> {
    let bad = |m: &str| err(401, "invalid_client", 50012, m.to_string());
    let mut parts = assertion.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("Client assertion is not a valid JWT."));
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("Client assertion header is not valid JSON."))?;
    let claims: serde_json::Value = URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("Client assertion payload is not valid JSON."))?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad("Client assertion signature is not base64url."))?;
    let Some(cert) = t.cert.clone() else {
        return Err(err(401, "invalid_client", 700027, format!("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{}'.]", t.spec.client_id)));
    };
    let alg = header["alg"].as_str().unwrap_or("");
    let (thumb, expected, algorithm): (_, _, &dyn signature::VerificationAlgorithm) = match alg {
        "RS256" => (
            header["x5t"].as_str(),
            &cert.sha1,
            &signature::RSA_PKCS1_2048_8192_SHA256,
        ),
        "PS256" => (
            header["x5t#S256"].as_str(),
            &cert.sha256,
            &signature::RSA_PSS_2048_8192_SHA256,
        ),
        _ => {
            return Err(bad(&format!(
                "Client assertion algorithm '{alg}' is not supported."
            )))
        }
    };
    let thumb_ok = thumb
        .and_then(|x| URL_SAFE_NO_PAD.decode(x.trim_end_matches('=')).ok())
        .is_some_and(|x| &x == expected);
    if !thumb_ok {
        return Err(err(401, "invalid_client", 700027, format!("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{}'.]", thumb.unwrap_or(""), t.spec.client_id)));
    }
    let key = signature::UnparsedPublicKey::new(algorithm, &cert.rsa_public_key);
    let input = format!("{h}.{c}");
    if key.verify(input.as_bytes(), &sig).is_err() {
        return Err(err(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
        ));
    }
    let suffix = if req.v2 {
        format!("/{}/oauth2/v2.0/token", req.tenant)
    } else {
        format!("/{}/oauth2/token", req.tenant)
    };
    let aud = claims["aud"].as_str().unwrap_or("");
    if !aud
        .to_ascii_lowercase()
        .ends_with(&suffix.to_ascii_lowercase())
    {
        return Err(bad(&format!("Client assertion audience claim does not match Realm issuer. Review the documentation at https://aka.ms/certCreds . (aud '{aud}', expected '{}')", req.endpoint_url)));
    }
    let cid = &t.spec.client_id;
    let iss = claims["iss"].as_str().unwrap_or("");
    let sub = claims["sub"].as_str().unwrap_or("");
    if !iss.eq_ignore_ascii_case(cid) || !sub.eq_ignore_ascii_case(cid) {
        return Err(err(401, "invalid_client", 700021, "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://aka.ms/certCreds ."));
    }
    let exp = claims["exp"].as_i64().unwrap_or(0);
    let nbf = claims["nbf"].as_i64().unwrap_or(0);
    if exp <= now || nbf > now + 300 {
        return Err(err(401, "invalid_client", 700024, format!("Client assertion is not within its valid time range. Current time: {now}, assertion valid from {nbf}, expiry time of assertion {exp}. Review the documentation at https://aka.ms/certCreds .")));
    }
    if let Some(jti) = claims["jti"].as_str() {
        if !t.used_jti.insert(jti.to_string()) {
            return Err(err(401, "invalid_client", 700024, format!("Client assertion is not within its valid time range: the assertion with jti '{jti}' was already used (replay).")));
        }
    }
    Ok(())
}

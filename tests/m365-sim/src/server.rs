//! The HTTPS server: routing, the control API under `/_sim/`, and the live-generation ticker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State as AxState};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api::{self, ApiRequest, Outcome};
use crate::entra::{self, CertInfo, TokenRequest};
use crate::scenario::{Faults, Scenario};
use crate::state::{host_now, State, TenantState};
use crate::truth::{self, Stats, Truth};
use crate::SimError;

/// State shared by the handlers and the handle.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub key: ring::hmac::Key,
    pub base_url: String,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SimHandle {
    /// `https://127.0.0.1:PORT` (no trailing slash); the login host and the API host.
    pub url: String,
    /// The PEM of the CA that signed the server certificate (for `127.0.0.1` and `localhost`).
    pub ca_pem: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Runtime changes to a tenant (`POST /_sim/tenant`); absent fields stay as they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    /// The tenant to change.
    pub tenant_id: String,
    /// New `audit_enabled`.
    pub audit_enabled: Option<bool>,
    /// New `consent`.
    pub consent: Option<bool>,
    /// New `dlp_permission`.
    pub dlp_permission: Option<bool>,
    /// New accepted secrets (replaces the list).
    pub client_secrets: Option<Vec<String>>,
    /// New expired secrets (replaces the list).
    pub expired_secrets: Option<Vec<String>>,
    /// New token lifetime, seconds.
    pub token_lifetime_secs: Option<u64>,
    /// New page size.
    pub page_size: Option<usize>,
    /// New live interval, ms.
    pub live_blob_interval_ms: Option<u64>,
    /// New live maximum per content type.
    pub live_blobs_max: Option<u32>,
}

/// Body of `POST /_sim/faults`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsRequest {
    /// The tenant.
    pub tenant_id: String,
    /// Its new faults (replace the old ones).
    pub faults: Faults,
}

/// Body of `POST /_sim/generation`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    /// Live generation on or off.
    pub enabled: bool,
}

impl SimHandle {
    /// The ground truth now.
    pub fn truth(&self) -> Truth {
        truth::truth(&self.shared.lock())
    }

    /// All counters now.
    pub fn stats(&self) -> Stats {
        truth::stats(&self.shared.lock())
    }

    /// Turns live blob generation on or off.
    pub fn set_generation(&self, enabled: bool) {
        self.shared.lock().generation = enabled;
    }

    /// Replaces a tenant's faults (fault blobs are created now if more are asked for).
    pub fn set_faults(&self, tenant_id: &str, faults: Faults) -> Result<(), SimError> {
        let mut st = self.shared.lock();
        let t = find_tenant(&mut st, tenant_id)?;
        t.set_faults(faults);
        Ok(())
    }

    /// Changes a tenant's settings at runtime.
    pub fn patch_tenant(&self, patch: &TenantPatch) -> Result<(), SimError> {
        apply_patch(&mut self.shared.lock(), patch)
    }

    /// Stops the server (also done on drop).
    pub fn shutdown(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn find_tenant<'a>(st: &'a mut State, id: &str) -> Result<&'a mut TenantState, SimError> {
    st.tenants
        .iter_mut()
        .find(|(k, _)| k.eq_ignore_ascii_case(id))
        .map(|(_, t)| t)
        .ok_or_else(|| SimError::UnknownTenant(id.to_string()))
}

fn apply_patch(st: &mut State, p: &TenantPatch) -> Result<(), SimError> {
    let t = find_tenant(st, &p.tenant_id)?;
    let s = &mut t.spec;
    if let Some(v) = p.audit_enabled {
        s.audit_enabled = v;
    }
    if let Some(v) = p.consent {
        s.consent = v;
    }
    if let Some(v) = p.dlp_permission {
        s.dlp_permission = v;
    }
    if let Some(v) = &p.client_secrets {
        s.client_secrets = v.clone();
    }
    if let Some(v) = &p.expired_secrets {
        s.expired_secrets = v.clone();
    }
    if let Some(v) = p.token_lifetime_secs {
        s.token_lifetime_secs = v;
    }
    if let Some(v) = p.page_size {
        s.page_size = v.max(1);
    }
    if let Some(v) = p.live_blob_interval_ms {
        s.live_blob_interval_ms = v;
    }
    if let Some(v) = p.live_blobs_max {
        s.live_blobs_max = v;
    }
    Ok(())
}

/// Starts the simulator on `listen` and returns once it accepts connections.
pub async fn start(scenario: Scenario, listen: SocketAddr) -> Result<SimHandle, SimError> {
    sensor_testkit::install_crypto_provider();
    let specs = scenario.expanded_tenants()?;
    let mut tenants = BTreeMap::new();
    for spec in specs {
        let pem = match (&spec.certificate_pem_file, &spec.certificate_pem) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| SimError::Scenario(format!("certificate_pem_file {path}: {e}")))?,
            ),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        let cert = match pem {
            Some(p) => Some(CertInfo::from_pem(&p).map_err(SimError::Scenario)?),
            None => None,
        };
        tenants.insert(spec.tenant_id.clone(), TenantState::new(spec, cert));
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let host = if addr.ip().is_unspecified() || addr.ip().is_loopback() && addr.is_ipv4() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let url = format!("https://{host}:{}", addr.port());
    let ca = sensor_testkit::TestCa::new("m365-sim test CA")?;
    let server_cert = ca.issue_server(&["127.0.0.1", "localhost", "::1"])?;
    let config = sensor_testkit::server_config(&server_cert, None)?;
    let rng = ring::rand::SystemRandom::new();
    let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
        .map_err(|_| SimError::Scenario("generating the token key failed".into()))?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            generation: scenario.generation,
            tenants,
            token_unknown_tenant: 0,
        }),
        key,
        base_url: url.clone(),
    });
    let server = sensor_testkit::serve_tls(listener, config, router(shared.clone()));
    let ticker_shared = shared.clone();
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut st = ticker_shared.lock();
            if st.generation {
                for t in st.tenants.values_mut() {
                    t.live_tick();
                }
            }
        }
    });
    log::info!("m365-sim listening on {url}");
    Ok(SimHandle {
        url,
        ca_pem: ca.cert_pem(),
        addr,
        shared,
        tasks: vec![server, ticker],
    })
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .route("/{tenant}/oauth2/token", post(token_v1))
        .route("/api/v1.0/{tenant}/activity/feed/{*rest}", any(api_handler))
        .route("/_sim/truth", get(ctl_truth))
        .route("/_sim/stats", get(ctl_stats))
        .route("/_sim/generation", post(ctl_generation))
        .route("/_sim/faults", post(ctl_faults))
        .route("/_sim/tenant", post(ctl_tenant))
        .with_state(shared)
}

type Sh = AxState<Arc<Shared>>;

fn json_response(status: u16, headers: Vec<(&'static str, String)>, body: Vec<u8>) -> Response {
    let mut b = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("Content-Type", "application/json; charset=utf-8");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(axum::body::Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn token_common(shared: Arc<Shared>, tenant: String, v2: bool, body: Bytes) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let endpoint_url = if v2 {
        format!("{}/{tenant}/oauth2/v2.0/token", shared.base_url)
    } else {
        format!("{}/{tenant}/oauth2/token", shared.base_url)
    };
    let req = TokenRequest {
        tenant: &tenant,
        v2,
        form: &form,
        endpoint_url,
    };
    let result = {
        let mut st = shared.lock();
        entra::token(&mut st, &shared.key, &req)
    };
    match result {
        Ok(v) => json_response(200, Vec::new(), v.to_string().into_bytes()),
        Err(e) => {
            log::debug!("token request for {tenant} refused: AADSTS{}", e.code);
            json_response(
                e.status,
                Vec::new(),
                e.body(host_now()).to_string().into_bytes(),
            )
        }
    }
}

async fn token_v2(AxState(s): Sh, Path(tenant): Path<String>, body: Bytes) -> Response {
    token_common(s, tenant, true, body).await
}

async fn token_v1(AxState(s): Sh, Path(tenant): Path<String>, body: Bytes) -> Response {
    token_common(s, tenant, false, body).await
}

async fn api_handler(
    AxState(shared): Sh,
    Path((tenant, rest)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let req = ApiRequest {
        tenant,
        rest,
        method: method.as_str().to_string(),
        raw_query: raw_query.unwrap_or_default(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        base_url: shared.base_url.clone(),
        path: uri.path().to_string(),
    };
    let outcome = {
        let mut st = shared.lock();
        api::handle(&mut st, &shared.key, &req)
    };
    match outcome {
        Outcome::Hang => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Outcome::Respond {
            status,
            headers,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let bytes = tokio::task::spawn_blocking(move || body.into_bytes())
                .await
                .unwrap_or_default();
            json_response(status, headers, bytes)
        }
    }
}

async fn ctl_truth(AxState(s): Sh) -> Json<Truth> {
    let st = s.clone();
    let t = tokio::task::spawn_blocking(move || truth::truth(&st.lock()))
        .await
        .unwrap_or_default();
    Json(t)
}

async fn ctl_stats(AxState(s): Sh) -> Json<Stats> {
    Json(truth::stats(&s.lock()))
}

async fn ctl_generation(AxState(s): Sh, Json(req): Json<GenerationRequest>) -> StatusCode {
    s.lock().generation = req.enabled;
    StatusCode::NO_CONTENT
}

async fn ctl_faults(AxState(s): Sh, Json(req): Json<FaultsRequest>) -> Response {
    let mut st = s.lock();
    match find_tenant(&mut st, &req.tenant_id) {
        Ok(t) => {
            t.set_faults(req.faults);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

async fn ctl_tenant(AxState(s): Sh, Json(p): Json<TenantPatch>) -> Response {
    match apply_patch(&mut s.lock(), &p) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

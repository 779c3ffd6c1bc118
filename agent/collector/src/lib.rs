//! Microsoft 365 collection: Entra tokens ([`auth`]), the Management Activity API client ([`api`]), the
//! per-tenant rate limiter ([`ratelimit`]), listing windows ([`window`]), blob parsing ([`blob`]) and the
//! per tenant × content type loop ([`collector`]) that commits blobs to the spool.
//!
//! Invariant: the only writes this crate makes are through the spool's atomic, durable operations.

pub mod api;
pub mod auth;
pub mod blob;
pub mod collector;
pub mod ratelimit;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use sensor_core::config::TenantConfig;
use sensor_core::counters::Counters;
use sensor_core::status::{State, StatusBoard};
use sensor_spool::Spool;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Why a tenant could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The HTTP client could not be built.
    #[error("tenant {tenant}: {reason}")]
    Setup {
        /// The tenant's name.
        tenant: String,
        /// Why.
        reason: String,
    },
}

/// What the stages share with every collector.
#[derive(Clone)]
pub struct Deps {
    /// The spool.
    pub spool: Arc<Spool>,
    /// The status board.
    pub status: Arc<StatusBoard>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Woken after each commit.
    pub relay_wake: Arc<Notify>,
    /// `[network] proxy`.
    pub proxy: Option<String>,
    /// HTTPS clients shared by tenants with the same settings.
    pub clients: Arc<HttpClients>,
}

/// HTTPS clients shared by the tenants whose client settings (extra CA file, proxy, timeout) are the
/// same: one connection pool, so every tenant's requests to `login.microsoftonline.com` and
/// `manage.office.com` share a few HTTP/2 connections instead of two each. Invariant: a client is made
/// from the settings of its key only (never from a tenant's credential), so sharing leaks nothing
/// between tenants; rate limits and token caches stay per tenant.
#[derive(Debug, Default)]
pub struct HttpClients {
    map: std::sync::Mutex<std::collections::HashMap<ClientKey, reqwest::Client>>,
}

type ClientKey = (Option<std::path::PathBuf>, Option<String>, u64);

impl HttpClients {
    /// The client for `tenant`'s settings, made on first use.
    pub fn get(
        &self,
        tenant: &TenantConfig,
        proxy: Option<&str>,
    ) -> Result<reqwest::Client, CollectorError> {
        let key = (
            tenant.ca_file.clone(),
            proxy.map(str::to_string),
            tenant.request_timeout_secs,
        );
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let c = tenant_http_client(tenant, proxy)?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// Forgets every client (a reload may have changed a CA file's content); running tenants keep
    /// theirs until they restart.
    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// State shared by the collectors of one tenant: its config, API client (with its one rate limiter and
/// token cache) and the stages.
pub struct TenantShared {
    /// The tenant's configuration.
    pub config: TenantConfig,
    /// The API client.
    pub api: api::ApiClient,
    /// The spool.
    pub spool: Arc<Spool>,
    /// The status board.
    pub status: Arc<StatusBoard>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Woken after each commit.
    pub relay_wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

impl TenantShared {
    /// Whether shutdown was requested.
    pub fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps `d`; returns true if shutdown was requested meanwhile.
    pub async fn sleep_or_shutdown(&self, d: Duration) -> bool {
        let mut rx = self.shutdown.clone();
        if *rx.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => *rx.borrow(),
            _ = rx.changed() => true,
        }
    }

    /// Runs a blocking spool operation (it may fdatasync) without stalling the async workers.
    pub fn spool_blocking<T>(
        &self,
        f: impl FnOnce(&Spool) -> Result<T, sensor_spool::SpoolError>,
    ) -> Result<T, sensor_spool::SpoolError> {
        tokio::task::block_in_place(|| f(&self.spool))
    }

    /// Days until the credential expires: the certificate's notAfter, or `client_secret_expires`.
    pub fn secret_days_left(&self) -> Option<i64> {
        let at = self.api.tokens().credential_expires()?;
        Some((at - time::OffsetDateTime::now_utc().unix_timestamp()).div_euclid(86_400) + 1)
    }
}

/// Builds the HTTPS client of a tenant: system roots plus its `ca_file`, timeouts, proxy, User-Agent.
pub fn tenant_http_client(
    t: &TenantConfig,
    proxy: Option<&str>,
) -> Result<reqwest::Client, CollectorError> {
    let err = |reason: String| CollectorError::Setup {
        tenant: t.name.clone(),
        reason,
    };
    let tls = sensor_core::tls::client_config(t.ca_file.as_deref(), None)
        .map_err(|e| err(e.to_string()))?;
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(t.request_timeout_secs))
        .user_agent(sensor_core::user_agent());
    if let Some(p) = proxy {
        b = b.proxy(reqwest::Proxy::all(p).map_err(|e| err(format!("network.proxy `{p}`: {e}")))?);
    }
    b.build().map_err(|e| err(e.to_string()))
}

/// The API client of `tenant`: its HTTPS client, token provider and one rate limiter. The inner error is
/// a credential that cannot be loaded (reported as a status, not a setup failure).
pub fn tenant_api(
    tenant: &TenantConfig,
    http: reqwest::Client,
    counters: Arc<Counters>,
) -> Result<Result<api::ApiClient, auth::AuthError>, CollectorError> {
    let tokens = match auth::TokenProvider::new(tenant, http.clone()) {
        Ok(t) => Arc::new(t),
        Err(e) => return Ok(Err(e)),
    };
    let limiter = Arc::new(ratelimit::RateLimiter::new(tenant.max_requests_per_minute));
    Ok(Ok(api::ApiClient::new(
        http,
        &tenant.api_base(),
        &tenant.tenant_id,
        tenant.publisher(),
        tokens,
        limiter,
        counters,
        tenant.max_blob_bytes,
    )))
}

/// Starts one collector per content type of `tenant`. A tenant whose credentials cannot be loaded gets
/// its components set to `credentials_invalid` and no collectors.
pub fn start_tenant(
    tenant: TenantConfig,
    deps: &Deps,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, CollectorError> {
    let http = deps.clients.get(&tenant, deps.proxy.as_deref())?;
    let api = match tenant_api(&tenant, http, deps.counters.clone())? {
        Ok(api) => api,
        Err(e) => {
            for ct in &tenant.content_types {
                deps.status.set(
                    &format!("tenant/{}/{ct}", tenant.name),
                    State::CredentialsInvalid,
                    Some(e.to_string()),
                    None,
                );
            }
            log::error!(target: "collector", tenant = tenant.name.as_str(), error:% = e; "cannot load the tenant's credential");
            return Ok(Vec::new());
        }
    };
    let content_types = tenant.content_types.clone();
    let shared = Arc::new(TenantShared {
        config: tenant,
        api,
        spool: deps.spool.clone(),
        status: deps.status.clone(),
        counters: deps.counters.clone(),
        relay_wake: deps.relay_wake.clone(),
        shutdown,
    });
    Ok(content_types
        .iter()
        .map(|ct| tokio::spawn(collector::Collector::new(shared.clone(), ct).run()))
        .collect())
}

/// Asks Entra for a token with `tenant`'s credential, once: `Ok` when the credential works now. Used to
/// test a rotated credential before it replaces the one in use.
pub async fn check_credential(tenant: &TenantConfig, proxy: Option<&str>) -> Result<(), String> {
    let http = tenant_http_client(tenant, proxy).map_err(|e| e.to_string())?;
    let tokens = auth::TokenProvider::new(tenant, http).map_err(|e| e.to_string())?;
    tokens.token().await.map(|_| ()).map_err(|e| e.to_string())
}

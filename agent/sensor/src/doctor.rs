//! `m365-sensor doctor`: walks the setup chain once, as a person setting up would, and prints one line per
//! step with the fix for a failure: configuration → credential files → token in the right cloud (authority,
//! scope, the token's tenant and audience) → permissions and audit logging → subscriptions → first content
//! → backend TLS and credentials. Exit 0 when every step is OK, 1 with warnings, 2 with a failure.
//! Invariant: doctor reads only; it starts no subscription and sends no records.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use m365_collector::api::ApiError;
use m365_collector::collector::state_of;
use m365_collector::window::Window;
use sensor_core::config::{Config, TenantConfig};
use sensor_core::counters::Counters;
use sensor_core::status::State;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Report {
    worst: Verdict,
}

impl Report {
    fn line(&mut self, v: Verdict, what: &str, detail: &str, fix: &str) {
        let tag = match v {
            Verdict::Ok => "[ OK ]",
            Verdict::Warn => "[WARN]",
            Verdict::Fail => "[FAIL]",
        };
        println!("{tag} {what}: {detail}");
        if v != Verdict::Ok && !fix.is_empty() {
            println!("       fix: {fix}");
        }
        self.worst = self.worst.max(v);
    }

    fn api_error(&mut self, what: &str, e: &ApiError) {
        let state = state_of(e);
        let v = if state == State::Throttled {
            Verdict::Warn
        } else {
            Verdict::Fail
        };
        self.line(v, what, &format!("{} — {e}", state.name()), state.fix());
    }
}

/// Runs the checks; returns the exit code.
pub async fn run(config_path: &Path) -> i32 {
    let mut r = Report { worst: Verdict::Ok };
    println!("m365-sensor doctor: {}", config_path.display());
    let config = match Config::load(config_path) {
        Ok(mut c) => {
            c.use_enrolled_identity();
            r.line(
                Verdict::Ok,
                "configuration",
                &format!(
                    "valid, {} tenant(s), state directory {}",
                    c.tenants.len(),
                    c.state_dir.display()
                ),
                "",
            );
            c
        }
        Err(e) => {
            r.line(
                Verdict::Fail,
                "configuration",
                &e.to_string(),
                "correct the file (m365-sensor check-config lists every problem)",
            );
            return 2;
        }
    };
    for t in &config.tenants {
        check_tenant(&mut r, t, config.network.proxy.as_deref()).await;
    }
    check_backend(&mut r, &config).await;
    match r.worst {
        Verdict::Ok => 0,
        Verdict::Warn => 1,
        Verdict::Fail => 2,
    }
}

fn token_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn check_tenant(r: &mut Report, t: &TenantConfig, proxy: Option<&str>) {
    let name = format!("tenant {}", t.name);
    let cred = match (&t.client_secret_file, &t.certificate_file) {
        (Some(f), _) => format!("client secret in {}", f.display()),
        (None, Some(c)) => format!(
            "certificate {} ({:?} assertion)",
            c.display(),
            t.assertion_alg
        ),
        _ => "no credential".into(),
    };
    r.line(
        Verdict::Ok,
        &format!("{name}: credential"),
        &format!("{cred}, readable by the sensor only"),
        "",
    );
    let http = match m365_collector::tenant_http_client(t, proxy) {
        Ok(h) => h,
        Err(e) => {
            return r.line(
                Verdict::Fail,
                &format!("{name}: HTTPS client"),
                &e.to_string(),
                "check the tenant's ca_file and network.proxy",
            )
        }
    };
    let api = match m365_collector::tenant_api(t, http, Arc::new(Counters::default())) {
        Ok(Ok(api)) => api,
        Ok(Err(e)) => {
            return r.line(
                Verdict::Fail,
                &format!("{name}: credential"),
                &e.to_string(),
                State::CredentialsInvalid.fix(),
            )
        }
        Err(e) => {
            return r.line(
                Verdict::Fail,
                &format!("{name}: HTTPS client"),
                &e.to_string(),
                "check ca_file and network.proxy",
            )
        }
    };
    let step = format!(
        "{name}: token ({} cloud, {} for {})",
        t.cloud.as_str(),
        t.login_base(),
        t.cloud.scope()
    );
    let token = match api.tokens().token().await {
        Ok(tok) => tok,
        Err(e) => return r.api_error(&step, &ApiError::Auth(e)),
    };
    match token_claims(&token) {
        Some(c) => {
            let tid_ok = c["tid"]
                .as_str()
                .is_none_or(|tid| tid.eq_ignore_ascii_case(&t.tenant_id));
            let aud_ok = c["aud"]
                .as_str()
                .is_none_or(|aud| aud.contains(t.cloud.api_host()));
            if tid_ok && aud_ok {
                r.line(
                    Verdict::Ok,
                    &step,
                    &format!(
                        "issued for tenant {} and audience {}",
                        c["tid"].as_str().unwrap_or("?"),
                        c["aud"].as_str().unwrap_or("?")
                    ),
                    "",
                );
            } else {
                r.line(
                    Verdict::Fail,
                    &step,
                    &format!(
                        "the token names tenant {} and audience {}",
                        c["tid"], c["aud"]
                    ),
                    State::WrongCloud.fix(),
                );
            }
        }
        None => r.line(
            Verdict::Ok,
            &step,
            "issued (not a JWT the sensor can read)",
            "",
        ),
    }
    let subs = match api.list_subscriptions().await {
        Ok(s) => s,
        Err(e) => return r.api_error(&format!("{name}: permissions and audit logging"), &e),
    };
    r.line(
        Verdict::Ok,
        &format!("{name}: permissions and audit logging"),
        "ActivityFeed.Read granted, unified audit log answering",
        "",
    );
    let now = time::OffsetDateTime::now_utc();
    let window = Window {
        start: now - time::Duration::hours(24),
        end: now,
    };
    for ct in &t.content_types {
        let what = format!("{name}: {ct}");
        let enabled = subs
            .iter()
            .any(|s| &s.content_type == ct && s.status.as_deref() == Some("enabled"));
        if !enabled {
            r.line(Verdict::Warn, &what, "subscription not started yet", "nothing to do: the agent starts it on its first poll (Microsoft can then take up to 12 hours to list content)");
            continue;
        }
        match api.list_content(ct, window).await {
            Ok(items) if items.is_empty() => r.line(
                Verdict::Warn,
                &what,
                "subscribed; no content listed in the last 24 h",
                State::WaitingForFirstContent.fix(),
            ),
            Ok(items) => r.line(
                Verdict::Ok,
                &what,
                &format!(
                    "subscribed; {} content blob(s) listed in the last 24 h",
                    items.len()
                ),
                "",
            ),
            Err(e) => r.api_error(&what, &e),
        }
    }
}

async fn check_backend(r: &mut Report, config: &Config) {
    let b = &config.backend;
    let what = format!("backend {}", b.url);
    let http = match sensor_relay::backend_http_client(b, config.network.proxy.as_deref()) {
        Ok(h) => h,
        Err(e) => {
            return r.line(
                Verdict::Fail,
                &what,
                &e.to_string(),
                "check backend.ca_file, client_cert_file and client_key_file",
            )
        }
    };
    let mut req = http
        .get(format!("{}/v1/config", b.url.trim_end_matches('/')))
        .header(
            "X-Sensor-Id",
            crate::agent::sensor_id(&config.state_dir).unwrap_or_default(),
        );
    let auth = if b.client_cert_file.is_some() {
        "device certificate"
    } else {
        "bearer token"
    };
    if b.client_cert_file.is_none() {
        if let Some(f) = &b.token_file {
            match std::fs::read_to_string(f) {
                Ok(t) => req = req.bearer_auth(t.trim()),
                Err(e) => {
                    return r.line(
                        Verdict::Fail,
                        &what,
                        &format!("cannot read {}: {e}", f.display()),
                        "fix backend.token_file",
                    )
                }
            }
        }
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => r.line(
            Verdict::Ok,
            &what,
            &format!("TLS verified, {auth} accepted"),
            "",
        ),
        Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => r.line(
            Verdict::Fail,
            &what,
            &format!(
                "TLS verified, but the {auth} was refused (HTTP {})",
                resp.status().as_u16()
            ),
            State::BackendAuthFailed.fix(),
        ),
        Ok(resp) => r.line(
            Verdict::Warn,
            &what,
            &format!("TLS verified, HTTP {}", resp.status().as_u16()),
            "the backend answered unexpectedly; check backend.url",
        ),
        Err(e) => r.line(
            Verdict::Fail,
            &what,
            &sensor_core::describe_error(&e),
            State::BackendUnreachable.fix(),
        ),
    }
}

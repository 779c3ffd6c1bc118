//! Unit and end-to-end tests of the simulator.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use time::{Duration, OffsetDateTime};

use crate::api::{self, ApiRequest, Body, Outcome};
use crate::entra::{self, CertInfo, TokenRequest};
use crate::state::{State, TenantState};
use crate::*;

const TID: &str = "11111111-2222-4333-8444-555555555555";
const CID: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";

fn spec() -> TenantSpec {
    TenantSpec {
        tenant_id: TID.into(),
        client_id: CID.into(),
        client_secrets: vec!["good".into()],
        expired_secrets: vec!["old".into()],
        history_hours: 6,
        history_blobs_per_hour: 3,
        records_per_blob: 5,
        page_size: 4,
        ..TenantSpec::default()
    }
}

fn key() -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test-key")
}

fn state_with(spec: TenantSpec, cert: Option<CertInfo>) -> State {
    let mut tenants = BTreeMap::new();
    tenants.insert(spec.tenant_id.clone(), TenantState::new(spec, cert));
    State {
        generation: false,
        tenants,
        token_unknown_tenant: 0,
    }
}

fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn token_req(
    st: &mut State,
    tenant: &str,
    f: &[(String, String)],
) -> Result<serde_json::Value, TokenError> {
    let req = TokenRequest {
        tenant,
        v2: true,
        form: f,
        endpoint_url: format!("https://sim/{tenant}/oauth2/v2.0/token"),
    };
    entra::token(st, &key(), &req)
}

fn secret_form(secret: &str, scope: &str) -> Vec<(String, String)> {
    form(&[
        ("grant_type", "client_credentials"),
        ("client_id", CID),
        ("scope", scope),
        ("client_secret", secret),
    ])
}

const SCOPE: &str = "https://manage.office.com/.default";

#[test]
fn window_validation() {
    let now = OffsetDateTime::now_utc();
    let fmt = |t: OffsetDateTime| content::fmt_creation(t);
    let ok = validate_window(Some(&fmt(now - Duration::hours(2))), Some(&fmt(now)), now);
    assert!(ok.is_ok());
    let (s, e) = validate_window(None, None, now).expect("neither is fine");
    assert_eq!(e - s, Duration::hours(24));
    let code = |s: Option<&str>, e: Option<&str>| validate_window(s, e, now).err().map(|e| e.code);
    assert_eq!(code(Some(&fmt(now)), None), Some("AF20030"));
    assert_eq!(code(Some(&fmt(now)), Some(&fmt(now))), Some("AF20055"));
    assert_eq!(
        code(Some(&fmt(now)), Some(&fmt(now - Duration::hours(1)))),
        Some("AF20055")
    );
    assert_eq!(
        code(Some(&fmt(now - Duration::hours(25))), Some(&fmt(now))),
        Some("AF20030")
    );
    let old = now - Duration::days(7) - Duration::minutes(5);
    assert_eq!(
        code(Some(&fmt(old)), Some(&fmt(old + Duration::hours(1)))),
        Some("AF20030")
    );
    assert_eq!(code(Some("garbage"), Some(&fmt(now))), Some("AF20030"));
}

#[test]
fn time_formats() {
    for s in [
        "2026-11-25",
        "2026-11-25T10:00",
        "2026-11-25T10:00:00",
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00.1234567Z",
    ] {
        let t = parse_api_time(s).unwrap_or_else(|| panic!("{s} must parse"));
        assert_eq!((t.year(), t.day()), (2026, 25));
    }
    assert_eq!(
        parse_api_time("2026-11-25T10:30").map(|t| t.minute()),
        Some(30)
    );
    for s in [
        "2026-13-01",
        "2026-11-25T10",
        "x",
        "2026-11-25T10:00:00+02:00",
    ] {
        assert!(parse_api_time(s).is_none(), "{s} must not parse");
    }
}

#[test]
fn token_errors() {
    let mut st = state_with(spec(), None);
    let ok = token_req(&mut st, TID, &secret_form("good", SCOPE)).expect("good secret");
    assert_eq!(ok["token_type"], "Bearer");
    assert_eq!(ok["expires_in"], 3599);
    let code = |st: &mut State, tenant: &str, f: &[(String, String)]| {
        token_req(st, tenant, f).err().map(|e| (e.status, e.code))
    };
    assert_eq!(
        code(&mut st, TID, &secret_form("bad", SCOPE)),
        Some((401, 7000215))
    );
    assert_eq!(
        code(&mut st, TID, &secret_form("old", SCOPE)),
        Some((401, 7000222))
    );
    assert_eq!(
        code(
            &mut st,
            TID,
            &secret_form("good", "https://manage.office365.us/.default")
        ),
        Some((400, 900382))
    );
    assert_eq!(
        code(
            &mut st,
            "99999999-2222-4333-8444-555555555555",
            &secret_form("good", SCOPE)
        ),
        Some((400, 90002))
    );
    let mut f = secret_form("good", SCOPE);
    f[1].1 = "00000000-0000-0000-0000-000000000001".into();
    assert_eq!(code(&mut st, TID, &f), Some((400, 700016)));
    let err = token_req(&mut st, TID, &secret_form("bad", SCOPE)).expect_err("refused");
    let body = err.body(OffsetDateTime::now_utc());
    let desc = body["error_description"].as_str().unwrap_or("");
    assert!(desc.starts_with("AADSTS7000215: Invalid client secret provided."));
    assert!(desc.contains(CID));
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"][0], 7000215);
    let stats = truth::stats(&st);
    assert_eq!(stats.token_ok, 1);
    assert_eq!(stats.token_failed.get("7000215"), Some(&2));
    assert_eq!(stats.token_failed.get("90002"), Some(&1));
}

fn api(
    st: &mut State,
    token: &str,
    method: &str,
    rest: &str,
    query: &str,
) -> (u16, Vec<(&'static str, String)>, String) {
    let req = ApiRequest {
        tenant: TID.into(),
        rest: rest.into(),
        method: method.into(),
        raw_query: query.into(),
        authorization: Some(format!("Bearer {token}")),
        base_url: "https://127.0.0.1:1".into(),
        path: format!("/api/v1.0/{TID}/activity/feed/{rest}"),
    };
    match api::handle(st, &key(), &req) {
        Outcome::Hang => (0, Vec::new(), String::new()),
        Outcome::Respond {
            status,
            headers,
            body,
            ..
        } => {
            let b = match body {
                Body::Json(s) => s,
                other => String::from_utf8_lossy(&other.into_bytes()).into_owned(),
            };
            (status, headers, b)
        }
    }
}

fn access_token(st: &mut State) -> String {
    let ok = token_req(st, TID, &secret_form("good", SCOPE)).expect("token");
    ok["access_token"].as_str().unwrap_or_default().to_string()
}

#[test]
fn pagination_reaches_every_item_once() {
    let mut st = state_with(spec(), None);
    let tok = access_token(&mut st);
    let ct = "Audit.Exchange";
    let (s, _, b) = api(
        &mut st,
        &tok,
        "GET",
        "subscriptions/content",
        &format!("contentType={ct}&PublisherIdentifier={TID}"),
    );
    assert_eq!(s, 400);
    assert!(b.contains("AF20022"));
    let (s, _, _) = api(
        &mut st,
        &tok,
        "POST",
        "subscriptions/start",
        &format!("contentType={ct}"),
    );
    assert_eq!(s, 200);
    let (s, _, b) = api(
        &mut st,
        &tok,
        "POST",
        "subscriptions/start",
        &format!("contentType={ct}"),
    );
    assert_eq!((s, b.contains("AF20024")), (400, true));
    let mut seen = Vec::new();
    let mut query = format!("contentType={ct}&PublisherIdentifier={TID}");
    for _ in 0..100 {
        let (s, headers, b) = api(&mut st, &tok, "GET", "subscriptions/content", &query);
        assert_eq!(s, 200, "{b}");
        let items: Vec<serde_json::Value> = serde_json::from_str(&b).expect("array");
        assert!(items.len() <= 4);
        for i in items {
            seen.push(i["contentId"].as_str().unwrap_or_default().to_string());
            assert!(i["contentUri"]
                .as_str()
                .unwrap_or_default()
                .ends_with(i["contentId"].as_str().unwrap_or("?")));
            assert!(
                i["contentExpiration"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with(".000Z")
                    || i["contentExpiration"]
                        .as_str()
                        .unwrap_or_default()
                        .ends_with('Z')
            );
        }
        match headers.iter().find(|(k, _)| *k == "NextPageUri") {
            Some((_, next)) => {
                assert!(next.contains("nextPage="));
                query = next
                    .split_once('?')
                    .map(|(_, q)| q.to_string())
                    .unwrap_or_default();
            }
            None => break,
        }
    }
    let t = st.tenants.get(TID).expect("tenant");
    let now = t.now();
    let want: BTreeSet<String> = t
        .blobs
        .iter()
        .filter(|b| b.content_type == ct && b.created >= now - Duration::hours(24))
        .map(|b| b.content_id.clone())
        .collect();
    let got: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(got.len(), seen.len(), "an item was listed twice");
    assert_eq!(got, want);
    assert_eq!(want.len(), 18);
    assert!(seen.iter().all(|id| id.contains('$')));
    let stats = truth::stats(&st);
    assert_eq!(stats.missing_publisher_identifier, 2);
}

#[test]
fn an_endless_listing_serves_the_same_page_under_new_urls_forever() {
    let mut sp = spec();
    sp.subscriptions_enabled = vec!["Audit.Exchange".into()];
    sp.faults.endless_listing = vec!["Audit.Exchange".into()];
    let mut st = state_with(sp, None);
    let tok = access_token(&mut st);
    let mut query = format!("contentType=Audit.Exchange&PublisherIdentifier={TID}");
    let mut urls = BTreeSet::new();
    let mut first: Option<String> = None;
    for _ in 0..500 {
        let (s, headers, b) = api(&mut st, &tok, "GET", "subscriptions/content", &query);
        assert_eq!(s, 200, "{b}");
        let next = headers
            .iter()
            .find(|(k, _)| *k == "NextPageUri")
            .map(|(_, v)| v.clone())
            .expect("an endless listing always gives a NextPageUri");
        assert!(urls.insert(next.clone()), "a NextPageUri repeated: {next}");
        match &first {
            None => first = Some(b),
            Some(f) => assert_eq!(&b, f, "every page holds the first page's items"),
        }
        query = next
            .split_once('?')
            .map(|(_, q)| q.to_string())
            .unwrap_or_default();
    }
    assert!(first.is_some_and(|b| b.contains("contentId")));
    let stats = truth::stats(&st);
    assert_eq!(stats.tenants[TID].endless_pages, 500);
}

#[test]
fn api_faults_and_states() {
    let mut sp = spec();
    sp.faults.throttle_every = 2;
    sp.faults.throttle_retry_after_secs = 7;
    sp.faults.expired_blobs = 1;
    sp.faults.malformed_blobs = 4;
    sp.subscriptions_enabled = vec!["Audit.General".into()];
    let mut st = state_with(sp, None);
    let tok = access_token(&mut st);
    let q = "contentType=Audit.General&PublisherIdentifier=x";
    let (s1, _, _) = api(&mut st, &tok, "GET", "subscriptions/list", q);
    let (s2, h2, b2) = api(&mut st, &tok, "GET", "subscriptions/list", q);
    let (_, _, _) = api(&mut st, &tok, "GET", "subscriptions/list", q);
    let (s4, h4, _) = api(&mut st, &tok, "GET", "subscriptions/list", q);
    assert_eq!((s1, s2, s4), (200, 403, 429));
    assert!(b2.contains("AF429") && b2.contains("PublisherId=x"));
    assert!(h2.is_empty());
    assert!(h4.contains(&("Retry-After", "7".to_string())));
    st.tenants
        .get_mut(TID)
        .expect("t")
        .spec
        .faults
        .throttle_every = 0;
    let (s, _, b) = api(&mut st, &tok, "GET", "subscriptions/list", "");
    assert_eq!(s, 200, "{b}");
    let (s, _, b) = api(&mut st, &tok, "GET", "subscriptions/list", "");
    assert_eq!(s, 200, "{b}");
    // Truth: 1 expired + 4 malformed content ids, fetch of the expired one answers AF20051.
    let tr = truth::truth(&st);
    let tt = tr.tenants.get(TID).expect("tenant");
    assert_eq!(tt.expired_content_ids.len(), 1);
    assert_eq!(tt.malformed_content_ids.len(), 4);
    assert!(!tt.undeliverable_ids.is_empty());
    let faults = Faults {
        subscription_disabled: vec!["Audit.General".into()],
        ..Faults::default()
    };
    st.tenants.get_mut(TID).expect("t").set_faults(faults);
    let exp = format!("audit/{}", tt.expired_content_ids[0]);
    let (s, _, b) = api(&mut st, &tok, "GET", &exp, "");
    assert_eq!((s, b.contains("AF20051")), (400, true), "{b}");
    let (s, _, b) = api(&mut st, &tok, "GET", "subscriptions/content", q);
    assert_eq!((s, b.contains("AF20023")), (400, true), "{b}");
    let (s, _, b) = api(&mut st, &tok, "GET", "audit/nope", "");
    assert_eq!((s, b.contains("AF20050")), (404, true), "{b}");
    // Malformed flavours.
    for id in &tt.malformed_content_ids {
        let (s, _, b) = api(&mut st, &tok, "GET", &format!("audit/{id}"), "");
        assert_eq!(s, 200);
        let parsed: Result<Vec<serde_json::Value>, _> = serde_json::from_str(&b);
        let bad_id = parsed
            .as_ref()
            .map(|v| v.iter().any(|r| r["Id"].is_number()))
            .unwrap_or(true);
        assert!(bad_id, "blob {id} should be malformed");
    }
    // Audit off and consent missing.
    st.tenants.get_mut(TID).expect("t").spec.audit_enabled = false;
    let (s, _, b) = api(
        &mut st,
        &tok,
        "POST",
        "subscriptions/start",
        "contentType=Audit.Exchange",
    );
    assert_eq!(s, 400);
    assert!(b.contains(&format!(
        "DataServiceException: Tenant {TID} does not exist."
    )));
    st.tenants.get_mut(TID).expect("t").spec.audit_enabled = true;
    st.tenants.get_mut(TID).expect("t").spec.dlp_permission = false;
    let (s, _, b) = api(
        &mut st,
        &tok,
        "POST",
        "subscriptions/start",
        "contentType=DLP.All",
    );
    assert_eq!((s, b.contains("AF10001")), (403, true));
    let (s, _, _) = api(&mut st, "garbage", "GET", "subscriptions/list", "");
    assert_eq!(s, 401);
}

#[test]
fn duplicates_and_replays_differ_in_bytes() {
    let mut sp = spec();
    sp.history_hours = 170;
    sp.history_blobs_per_hour = 1;
    sp.content_types = vec!["Audit.SharePoint".into()];
    sp.faults.duplicate_fraction = 0.2;
    sp.faults.replay_fraction = 0.1;
    let st = state_with(sp, None);
    let tr = truth::truth(&st);
    let tt = tr.tenants.get(TID).expect("tenant");
    assert!(
        tt.expected.values().any(|v| v.len() > 1),
        "some record has two byte variants"
    );
    let t = st.tenants.get(TID).expect("tenant");
    let text = content::render("Audit.SharePoint", TID, &t.blobs[0].records[0]);
    assert!(
        (900..2500).contains(&text.len()),
        "record size {}",
        text.len()
    );
    assert!(!text.contains('\n'));
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["RecordType"], 6);
    assert!(v["CreationTime"].as_str().is_some_and(|s| s.len() == 19));
}

fn openssl_cert(dir: &std::path::Path) -> Option<(String, Vec<u8>)> {
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=app", "-days", "2",
        ])
        .arg("-keyout")
        .arg(dir.join("k.pem"))
        .arg("-out")
        .arg(dir.join("c.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    assert!(status.success());
    let cert = std::fs::read_to_string(dir.join("c.pem")).ok()?;
    let key = std::fs::read_to_string(dir.join("k.pem")).ok()?;
    let b64: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some((cert, der))
}

fn sign_assertion(key_der: &[u8], cert: &CertInfo, pss: bool, claims: serde_json::Value) -> String {
    let kp = ring::signature::RsaKeyPair::from_pkcs8(key_der).expect("pkcs8 key");
    let header = if pss {
        serde_json::json!({"alg":"PS256","typ":"JWT","x5t#S256": URL_SAFE_NO_PAD.encode(&cert.sha256)})
    } else {
        serde_json::json!({"alg":"RS256","typ":"JWT","x5t": URL_SAFE_NO_PAD.encode(&cert.sha1)})
    };
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0u8; kp.public().modulus_len()];
    let alg: &dyn ring::signature::RsaEncoding = if pss {
        &ring::signature::RSA_PSS_SHA256
    } else {
        &ring::signature::RSA_PKCS1_SHA256
    };
    kp.sign(
        alg,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[test]
fn client_assertions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((cert_pem, key_der)) = openssl_cert(dir.path()) else {
        eprintln!("openssl not available; skipping");
        return;
    };
    let cert = CertInfo::from_pem(&cert_pem).expect("cert");
    let mut sp = spec();
    sp.history_hours = 0;
    let mut st = state_with(sp, Some(cert.clone()));
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let claims = |jti: &str, aud: &str, nbf: i64, exp: i64| serde_json::json!({"aud": aud, "iss": CID, "sub": CID, "jti": jti, "nbf": nbf, "exp": exp, "iat": nbf});
    let aud = format!("https://login.microsoftonline.com/{TID}/oauth2/v2.0/token");
    let run = |st: &mut State, assertion: String| {
        let f = form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CID),
            ("scope", SCOPE),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ]);
        token_req(st, TID, &f).map(|_| ()).map_err(|e| e.code)
    };
    let a = sign_assertion(&key_der, &cert, false, claims("j1", &aud, now, now + 600));
    assert_eq!(run(&mut st, a.clone()), Ok(()));
    assert_eq!(run(&mut st, a), Err(700024), "reused jti");
    let a = sign_assertion(&key_der, &cert, true, claims("j2", &aud, now, now + 600));
    assert_eq!(run(&mut st, a), Ok(()), "PS256");
    let a = sign_assertion(
        &key_der,
        &cert,
        false,
        claims("j3", &aud, now - 900, now - 300),
    );
    assert_eq!(run(&mut st, a), Err(700024), "expired");
    let a = sign_assertion(
        &key_der,
        &cert,
        false,
        claims(
            "j4",
            "https://login.microsoftonline.com/other/oauth2/v2.0/token",
            now,
            now + 600,
        ),
    );
    assert_eq!(run(&mut st, a), Err(50012), "wrong aud");
    let a = sign_assertion(&key_der, &cert, false, claims("j5", &aud, now, now + 600));
    let (input, sig) = a.rsplit_once('.').expect("jwt");
    let mut sig = URL_SAFE_NO_PAD.decode(sig).expect("b64");
    sig[10] ^= 0x55;
    let tampered = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(run(&mut st, tampered), Err(700027), "bad signature");
    // A certificate the app does not know: thumbprint mismatch.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let (other_pem, other_key) = openssl_cert(other_dir.path()).expect("second cert");
    let other = CertInfo::from_pem(&other_pem).expect("cert");
    let a = sign_assertion(
        &other_key,
        &other,
        false,
        claims("j6", &aud, now, now + 600),
    );
    assert_eq!(run(&mut st, a), Err(700027), "unknown certificate");
}

#[tokio::test]
async fn end_to_end_https() {
    let mut sp = spec();
    sp.live_blob_interval_ms = 100;
    sp.live_blobs_max = 2;
    sp.content_types = vec!["Audit.AzureActiveDirectory".into(), "Audit.Exchange".into()];
    let scenario = Scenario {
        tenants: vec![sp],
        generate_tenants: Some(GenerateTenants {
            count: 3,
            secret: "scale".into(),
            template: TenantSpec {
                history_hours: 1,
                ..TenantSpec::default()
            },
        }),
        generation: true,
    };
    let handle = start(scenario, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("start");
    assert!(handle.url.starts_with("https://127.0.0.1:"));
    let client = sensor_testkit::https_client(&handle.ca_pem).expect("client");
    let url = &handle.url;
    let tok: serde_json::Value = client
        .post(format!("{url}/{TID}/oauth2/v2.0/token"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=client_credentials&client_id={CID}&scope=https%3A%2F%2Fmanage.office.com%2F.default&client_secret=good"))
        .send()
        .await
        .expect("token")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("json");
    let bearer = format!(
        "Bearer {}",
        tok["access_token"].as_str().unwrap_or_default()
    );
    let resp = client
        .post(format!("{url}/00000000-0000-4000-8000-000000000002/oauth2/token"))
        .body("grant_type=client_credentials&client_id=00000000-0000-4000-9000-000000000002&resource=https://manage.office.com&client_secret=scale")
        .send()
        .await
        .expect("v1 token");
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    handle.set_generation(false);
    let root = format!("{url}/api/v1.0/{TID}/activity/feed");
    let mut fetched: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ct in ["Audit.AzureActiveDirectory", "Audit.Exchange"] {
        let r = client
            .post(format!(
                "{root}/subscriptions/start?contentType={ct}&PublisherIdentifier={TID}"
            ))
            .header("Authorization", &bearer)
            .send()
            .await
            .expect("start");
        assert_eq!(r.status(), 200);
        let mut next = Some(format!(
            "{root}/subscriptions/content?contentType={ct}&PublisherIdentifier={TID}"
        ));
        while let Some(u) = next.take() {
            let r = client
                .get(&u)
                .header("Authorization", &bearer)
                .send()
                .await
                .expect("list");
            assert_eq!(r.status(), 200);
            next = r
                .headers()
                .get("NextPageUri")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let items: Vec<serde_json::Value> =
                serde_json::from_str(&r.text().await.expect("text")).expect("items");
            for i in items {
                let uri = i["contentUri"].as_str().unwrap_or_default();
                let body = client
                    .get(format!("{uri}?PublisherIdentifier={TID}"))
                    .header("Authorization", &bearer)
                    .send()
                    .await
                    .expect("fetch")
                    .text()
                    .await
                    .expect("body");
                let recs: Vec<Box<serde_json::value::RawValue>> =
                    serde_json::from_str(&body).expect("array");
                for r in recs {
                    let v: serde_json::Value = serde_json::from_str(r.get()).expect("record");
                    let id = v["Id"].as_str().unwrap_or_default().to_string();
                    fetched.entry(id).or_default().insert(hex::encode(
                        <sha2::Sha256 as sha2::Digest>::digest(r.get().as_bytes()),
                    ));
                }
            }
        }
    }
    let truth: Truth = client
        .get(format!("{url}/_sim/truth"))
        .send()
        .await
        .expect("truth")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("json");
    let tt = truth.tenants.get(TID).expect("tenant");
    assert_eq!(truth.tenants.len(), 4);
    assert!(!fetched.is_empty());
    for (id, hashes) in &fetched {
        let want = tt.expected.get(id).expect("fetched id is expected");
        assert!(hashes.iter().all(|h| want.contains(h)));
    }
    // Every expected record created within the last 24 h was reached.
    assert_eq!(fetched.len(), tt.expected.len());
    let stats: Stats = client
        .get(format!("{url}/_sim/stats"))
        .send()
        .await
        .expect("stats")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("json");
    let ts = stats.tenants.get(TID).expect("tenant");
    assert_eq!(ts.missing_publisher_identifier, 0);
    assert_eq!(ts.token_ok, 1);
    assert_eq!(stats.token_ok, 2);
    assert_eq!(ts.start_calls.len(), 2);
    assert!(ts.blob_fetches.values().all(|n| *n == 1));
    // Live generation made 2 blobs per type.
    let r = client
        .post(format!("{url}/_sim/faults"))
        .header("Content-Type", "application/json")
        .body(serde_json::json!({"tenant_id": TID, "faults": {"af50000_every": 1}}).to_string())
        .send()
        .await
        .expect("faults");
    assert_eq!(r.status(), 204);
    let r = client
        .get(format!("{root}/subscriptions/list"))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 500);
    let r = client
        .post(format!("{url}/_sim/tenant"))
        .header("Content-Type", "application/json")
        .body(serde_json::json!({"tenant_id": TID, "client_secrets": ["new"]}).to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 204);
    let r = client
        .post(format!("{url}/{TID}/oauth2/v2.0/token"))
        .body(format!("grant_type=client_credentials&client_id={CID}&scope=https%3A%2F%2Fmanage.office.com%2F.default&client_secret=good"))
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{root}/subscriptions/list"))
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 401);
}

#[test]
fn example_scenario_parses() {
    let s = Scenario::from_toml(include_str!("../scenarios/example.toml")).expect("example parses");
    let tenants = s.expanded_tenants().expect("valid");
    assert_eq!(tenants.len(), 4);
    assert_eq!(tenants[3].tenant_id, "00000000-0000-4000-8000-000000000003");
    assert!(Scenario::from_toml("[[tenant]]\ntenant_id = \"x\"\nbogus = 1\n").is_err());
}

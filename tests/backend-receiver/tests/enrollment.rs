//! Enrolment and renewal over real HTTPS: certificates for the CSR's key that then authenticate, single-use
//! tokens with distinct refusals, strict bodies, renewal through mutual TLS only, the binary's flags.

mod common;

use std::time::Duration;

use backend_receiver::{EnrollResponse, ReceiverConfig, RenewResponse};
use common::*;
use serde_json::json;

#[tokio::test]
async fn enrolment_issues_a_certificate_for_the_csr_key_that_authenticates() {
    let rx = receiver_with(ReceiverConfig {
        enrollment_tokens: vec!["tok-1".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(rx.set_managed_config(json!({"tenants": []})), 1);
    // No client certificate and no bearer token: the TLS handshake succeeds, enrol answers.
    let anon = client(&rx);
    let key = device_key();
    let (status, body) = post_json(
        &anon,
        &format!("{}/v1/enroll", rx.url),
        &enroll_body("tok-1", &csr(&key)),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let e: EnrollResponse = serde_json::from_value(body).expect("protocol shape");
    assert_eq!(e.ca_pem, rx.ca_pem);
    assert_eq!(e.config, json!({"tenants": []}));
    assert!(uuid_like(&e.sensor_id), "{}", e.sensor_id);
    let (cn, spki, serial, validity_secs, client_auth) = cert_facts(&e.certificate_pem);
    assert_eq!(cn, e.sensor_id);
    assert_eq!(
        spki,
        key.public_key_der(),
        "the certificate holds the CSR's key"
    );
    assert_eq!(validity_secs, 365 * 24 * 3600);
    assert!(client_auth);

    // The issued certificate, with the key that never left the test, authenticates the other routes.
    let device = mtls_client_with(&rx.ca_pem, &e.certificate_pem, &key.serialize_pem());
    let hb = device
        .post(format!("{}/v1/heartbeat", rx.url))
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", &e.sensor_id)
        .json_body(&json!({"state": "running"}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(hb.status(), 200);
    let r = device
        .get(format!("{}/v1/config", rx.url))
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", &e.sensor_id)
        .send()
        .await
        .expect("config");
    assert_eq!(r.status(), 200);
    let h = rx.heartbeats();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].client_cn.as_deref(), Some(e.sensor_id.as_str()));
    assert_eq!(h[0].client_serial.as_deref(), Some(serial.as_str()));
    assert_eq!(h[0].document, json!({"state": "running"}));
    assert_eq!(rx.summary().header_violations, 0);

    // Without a certificate the other routes still refuse.
    for path in [
        "/v1/heartbeat",
        "/v1/renew",
        "/v1/diagnostics",
        "/v1/commands/x/result",
    ] {
        let (status, body) = post_json(&anon, &format!("{}{path}", rx.url), &json!({})).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    assert_eq!(
        get_json(&anon, &format!("{}/v1/config", rx.url)).await.0,
        401
    );

    let en = rx.enrollments();
    assert_eq!(en.issued.len(), 1);
    let rec = &en.issued[0];
    assert_eq!(
        (
            rec.sensor_id.as_str(),
            rec.token.as_str(),
            rec.hostname.as_str(),
            rec.arch.as_str(),
            rec.version.as_str(),
            rec.serial.as_str()
        ),
        (
            e.sensor_id.as_str(),
            "tok-1",
            "host-1",
            "x86_64",
            "0.1.0",
            serial.as_str()
        )
    );
    assert!(rec.not_after > rec.not_before);
    assert!(en.unused_tokens.is_empty());
    assert_eq!(rx.summary().enrollments, 1);

    // A sensor id in X-Sensor-Id other than the enrolled certificate's is a counted violation.
    let hb = device
        .post(format!("{}/v1/heartbeat", rx.url))
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", "someone-else")
        .json_body(&json!({}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(hb.status(), 200);
    assert_eq!(rx.summary().header_violations, 1);
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|&c| c == '-').count() == 4
}

#[tokio::test]
async fn tokens_are_single_use_with_distinct_refusals() {
    let rx = receiver_with(ReceiverConfig {
        enrollment_tokens: vec!["tok-1".into()],
        ..Default::default()
    })
    .await;
    let c = client(&rx);
    let url = format!("{}/v1/enroll", rx.url);
    let key = device_key();
    assert_eq!(
        post_json(&c, &url, &enroll_body("tok-1", &csr(&key)))
            .await
            .0,
        201
    );
    let (status, body) = post_json(&c, &url, &enroll_body("tok-1", &csr(&key))).await;
    assert_eq!(status, 401);
    assert_eq!(body, json!({"error": "enrollment token already used"}));
    let (status, body) = post_json(&c, &url, &enroll_body("nope", &csr(&key))).await;
    assert_eq!(status, 401);
    assert_eq!(body, json!({"error": "unknown enrollment token"}));

    // Tokens added at run time, through the control API and the handle.
    let (status, body) = post_json(
        &c,
        &format!("{}/_rx/enroll-tokens", rx.control_url),
        &json!({"tokens": ["tok-2", "tok-3"]}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"added": 2})));
    assert_eq!(rx.add_enroll_tokens(["tok-4"]), Ok(1));
    for t in ["tok-2", "tok-3", "tok-4"] {
        assert_eq!(
            post_json(&c, &url, &enroll_body(t, &csr(&key))).await.0,
            201,
            "{t}"
        );
    }
    // A used token is never made usable again; an empty one is refused.
    let (status, body) = post_json(
        &c,
        &format!("{}/_rx/enroll-tokens", rx.control_url),
        &json!({"tokens": ["tok-5", "tok-1"]}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(matches!(
        rx.add_enroll_tokens(vec![String::new()]),
        Err(backend_receiver::ManagementError::EmptyToken)
    ));
    assert_eq!(
        post_json(&c, &url, &enroll_body("tok-5", &csr(&key)))
            .await
            .0,
        401,
        "all or none"
    );

    let (status, body) = get_json(&c, &format!("{}/_rx/enrollments", rx.control_url)).await;
    assert_eq!(status, 200);
    let en: backend_receiver::Enrollments = serde_json::from_value(body).expect("enrollments");
    assert_eq!(en.issued.len(), 4);
    let reasons: Vec<(&str, u16, &str, Option<&str>)> = en
        .refused
        .iter()
        .map(|r| {
            (
                r.endpoint.as_str(),
                r.status,
                r.reason.as_str(),
                r.token.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (
                "enroll",
                401,
                "enrollment token already used",
                Some("tok-1")
            ),
            ("enroll", 401, "unknown enrollment token", Some("nope")),
            ("enroll", 401, "unknown enrollment token", Some("tok-5")),
        ]
    );
    // Every enrolment got its own sensor id.
    let mut ids: Vec<&str> = en.issued.iter().map(|r| r.sensor_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

#[tokio::test]
async fn malformed_bodies_and_csrs_are_refused_with_400() {
    let rx = receiver_with(ReceiverConfig {
        enrollment_tokens: vec!["tok-1".into()],
        ..Default::default()
    })
    .await;
    let c = client(&rx);
    let url = format!("{}/v1/enroll", rx.url);
    let good = csr(&device_key());

    let mut extra = enroll_body("tok-1", &good);
    extra["bogus"] = json!(1);
    let mut missing = enroll_body("tok-1", &good);
    missing.as_object_mut().expect("object").remove("hostname");
    let mut mistyped = enroll_body("tok-1", &good);
    mistyped["arch"] = json!(64);
    let mut empty = enroll_body("tok-1", &good);
    empty["version"] = json!("");
    for (body, field) in [
        (extra, "bogus"),
        (missing, "hostname"),
        (mistyped, "arch"),
        (empty, "version"),
    ] {
        let (status, answer) = post_json(&c, &url, &body).await;
        assert_eq!(status, 400, "{field}: {answer}");
        let msg = answer["error"].as_str().expect("error message");
        assert!(msg.contains(&format!("`{field}`")), "{field}: {msg}");
    }
    let r = c.post(&url).body("not json").send().await.expect("request");
    assert_eq!(r.status(), 400);

    // Not a CSR; a certificate instead of a CSR; a CSR whose signature does not verify.
    let mut tampered = good.clone().into_bytes();
    let body_start = tampered.iter().position(|&b| b == b'\n').expect("pem") + 1;
    let i = body_start + 200;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("utf8");
    for bad in [
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        rx.device_cert_pem.as_str(),
        tampered.as_str(),
        "garbage",
    ] {
        let (status, answer) = post_json(&c, &url, &enroll_body("tok-1", bad)).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|m| m.contains("csr_pem")),
            "{answer}"
        );
    }
    // None of that used the token.
    assert_eq!(rx.enrollments().unused_tokens, vec!["tok-1".to_string()]);
    assert_eq!(
        post_json(&c, &url, &enroll_body("tok-1", &good)).await.0,
        201
    );
    assert_eq!(rx.enrollments().refused.len(), 9);
    assert_eq!(rx.summary().refused_enrollments, 9);
}

#[tokio::test]
async fn renewal_requires_mutual_tls_and_keeps_the_common_name() {
    let validity = Duration::from_secs(120);
    let rx = receiver_with(ReceiverConfig {
        bearer_token: Some(TOKEN.into()),
        enrollment_tokens: vec!["tok-1".into()],
        device_cert_validity: validity,
        ..Default::default()
    })
    .await;
    let anon = client(&rx);
    let key = device_key();
    let (status, body) = post_json(
        &anon,
        &format!("{}/v1/enroll", rx.url),
        &enroll_body("tok-1", &csr(&key)),
    )
    .await;
    assert_eq!(status, 201);
    let e: EnrollResponse = serde_json::from_value(body).expect("enrol answer");
    let (_, _, first_serial, secs, _) = cert_facts(&e.certificate_pem);
    assert_eq!(secs, 120);

    let renew_url = format!("{}/v1/renew", rx.url);
    let new_key = device_key();
    // A bearer token authenticates ingest but is not enough to renew.
    let r = anon
        .post(&renew_url)
        .bearer_auth(TOKEN)
        .json_body(&json!({"csr_pem": csr(&new_key)}))
        .send()
        .await
        .expect("renew");
    assert_eq!(r.status(), 401);
    let msg: serde_json::Value = r.json_of().await.expect("json");
    assert!(
        msg["error"]
            .as_str()
            .is_some_and(|m| m.contains("mutual TLS")),
        "{msg}"
    );

    let device = mtls_client_with(&rx.ca_pem, &e.certificate_pem, &key.serialize_pem());
    let (status, body) = post_json(&device, &renew_url, &json!({"csr_pem": "nope"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_json(&device, &renew_url, &json!({"csr": csr(&new_key)})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_json(&device, &renew_url, &json!({"csr_pem": csr(&new_key)})).await;
    assert_eq!(status, 200, "{body}");
    let renewed: RenewResponse = serde_json::from_value(body).expect("renew answer");
    assert_eq!(renewed.ca_pem, rx.ca_pem);
    let (cn, spki, serial, secs, client_auth) = cert_facts(&renewed.certificate_pem);
    assert_eq!(cn, e.sensor_id);
    assert_eq!(spki, new_key.public_key_der());
    assert_ne!(serial, first_serial);
    assert_eq!(secs, 120);
    assert!(client_auth);

    // The new certificate authenticates; so does the old one until it expires.
    let renewed_client = mtls_client_with(
        &rx.ca_pem,
        &renewed.certificate_pem,
        &new_key.serialize_pem(),
    );
    let (status, _) = post_json(
        &renewed_client,
        &format!("{}/v1/heartbeat", rx.url),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        rx.heartbeats()[0].client_serial.as_deref(),
        Some(serial.as_str())
    );
    let (status, _) = post_json(&device, &format!("{}/v1/heartbeat", rx.url), &json!({})).await;
    assert_eq!(status, 200);

    // The start-up device certificate renews too, under its own name.
    let (status, body) = post_json(
        &mtls_client(&rx),
        &renew_url,
        &json!({"csr_pem": csr(&device_key())}),
    )
    .await;
    assert_eq!(status, 200);
    let other: RenewResponse = serde_json::from_value(body).expect("renew answer");
    assert_eq!(cert_facts(&other.certificate_pem).0, "m365-sensor-device");

    let en = rx.enrollments();
    assert_eq!(en.renewed.len(), 2);
    assert_eq!(en.renewed[0].sensor_id, e.sensor_id);
    assert_eq!(en.renewed[0].previous_serial, first_serial);
    assert_eq!(en.renewed[0].serial, serial);
    let renew_refusals: Vec<u16> = en
        .refused
        .iter()
        .filter(|r| r.endpoint == "renew")
        .map(|r| r.status)
        .collect();
    assert_eq!(renew_refusals, vec![401, 400, 400]);
    assert_eq!(rx.summary().renewals, 2);
}

#[tokio::test]
async fn binary_takes_enrolment_tokens_and_a_validity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_backend-receiver"))
        .args([
            "--enroll-token",
            "tok-a",
            "--enroll-token",
            "tok-b",
            "--device-cert-validity-secs",
            "90",
            "--out-dir",
        ])
        .arg(&out)
        .spawn()
        .expect("spawn");
    let _child = KillOnDrop(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let url = loop {
        if let Ok(u) = std::fs::read_to_string(out.join("url")) {
            break u;
        }
        assert!(std::time::Instant::now() < deadline, "no url file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ca = std::fs::read_to_string(out.join("ca.pem")).expect("ca");
    let c = sensor_testkit::https_client(&ca).expect("client");
    for token in ["tok-a", "tok-b"] {
        let (status, body) = post_json(
            &c,
            &format!("{url}/v1/enroll"),
            &enroll_body(token, &csr(&device_key())),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let e: EnrollResponse = serde_json::from_value(body).expect("enrol answer");
        assert_eq!(cert_facts(&e.certificate_pem).3, 90);
    }
    let (status, _) = post_json(
        &c,
        &format!("{url}/v1/enroll"),
        &enroll_body("tok-a", &csr(&device_key())),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn an_expired_certificate_fails_the_handshake() {
    let rx = receiver_with(ReceiverConfig {
        enrollment_tokens: vec!["tok-1".into()],
        device_cert_validity: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let key = device_key();
    let (status, body) = post_json(
        &client(&rx),
        &format!("{}/v1/enroll", rx.url),
        &enroll_body("tok-1", &csr(&key)),
    )
    .await;
    assert_eq!(status, 201);
    let e: EnrollResponse = serde_json::from_value(body).expect("enrol answer");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // A fresh client: no pooled connection from before the expiry.
    let device = mtls_client_with(&rx.ca_pem, &e.certificate_pem, &key.serialize_pem());
    let r = device
        .post(format!("{}/v1/renew", rx.url))
        .json_body(&json!({"csr_pem": csr(&key)}))
        .send()
        .await;
    assert!(r.is_err(), "an expired certificate must not connect: {r:?}");
}

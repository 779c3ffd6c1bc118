//! Heartbeat answers, commands and their results, remote configuration, diagnostics and the management
//! faults, over real HTTPS.

mod common;

use backend_receiver::{CommandTruth, Faults, HeartbeatResponse, ManagedConfig};
use common::*;
use serde_json::json;

async fn heartbeat(
    c: &reqwest::Client,
    rx: &backend_receiver::ReceiverHandle,
) -> HeartbeatResponse {
    let (status, body) = post_json(c, &format!("{}/v1/heartbeat", rx.url), &json!({"ok": 1})).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("heartbeat answer")
}

fn ids(h: &HeartbeatResponse) -> Vec<&str> {
    h.commands.iter().map(|c| c.id.as_str()).collect()
}

#[tokio::test]
async fn heartbeat_delivers_commands_until_their_result_arrives() {
    let rx = receiver(None).await;
    let c = mtls_client(&rx);
    let h = heartbeat(&c, &rx).await;
    assert_eq!((h.config_version, h.commands.len()), (0, 0));

    let (status, body) = post_json(
        &c,
        &format!("{}/_rx/commands", rx.control_url),
        &json!({"id": "cmd-1", "kind": "set_log_level", "args": {"level": "debug"}}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"id": "cmd-1"})));
    let second = rx.queue_command("resync", json!({"tenant": "t"}));
    let (status, body) = post_json(
        &c,
        &format!("{}/_rx/commands", rx.control_url),
        &json!({"kind": "reboot"}),
    )
    .await;
    assert_eq!(status, 200);
    let third = body["id"].as_str().expect("an id").to_string();
    // An id queued before, an empty kind, an unknown field.
    for bad in [
        json!({"id": "cmd-1", "kind": "reboot"}),
        json!({"kind": ""}),
        json!({"kind": "reboot", "when": 1}),
    ] {
        let (status, _) = post_json(&c, &format!("{}/_rx/commands", rx.control_url), &bad).await;
        assert!(status == 409 || status == 400, "{bad}: {status}");
    }
    assert!(rx
        .queue_command_with_id("cmd-1", "reboot", json!({}))
        .is_err());

    // Redelivered until a result arrives.
    for _ in 0..2 {
        let h = heartbeat(&c, &rx).await;
        assert_eq!(ids(&h), vec!["cmd-1", second.as_str(), third.as_str()]);
        assert_eq!(h.commands[0].kind, "set_log_level");
        assert_eq!(h.commands[0].args, json!({"level": "debug"}));
        assert_eq!(h.commands[2].args, json!({}));
    }
    let result_url = |id: &str| format!("{}/v1/commands/{id}/result", rx.url);
    let (status, body) = post_json(
        &c,
        &result_url("cmd-1"),
        &json!({"ok": true, "message": "level set"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));
    let h = heartbeat(&c, &rx).await;
    assert_eq!(ids(&h), vec![second.as_str(), third.as_str()]);
    // A second report of the same command is recorded (the sensor ran it twice, or reported twice).
    assert_eq!(
        post_json(
            &c,
            &result_url("cmd-1"),
            &json!({"ok": false, "message": ""})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post_json(
            &c,
            &result_url(&second),
            &json!({"ok": false, "message": "too old"})
        )
        .await
        .0,
        200
    );

    // Unknown id, bad bodies, no authentication.
    let (status, body) =
        post_json(&c, &result_url("nope"), &json!({"ok": true, "message": ""})).await;
    assert_eq!(status, 404, "{body}");
    for bad in [
        json!({"ok": "yes", "message": ""}),
        json!({"ok": true}),
        json!({"ok": true, "message": "", "extra": 1}),
    ] {
        let (status, body) = post_json(&c, &result_url(&third), &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(
        post_json(
            &client(&rx),
            &result_url(&third),
            &json!({"ok": true, "message": ""})
        )
        .await
        .0,
        401
    );

    let h = heartbeat(&c, &rx).await;
    assert_eq!(ids(&h), vec![third.as_str()]);

    let (status, body) = get_json(&c, &format!("{}/_rx/commands", rx.control_url)).await;
    assert_eq!(status, 200);
    let listed: Vec<CommandTruth> = serde_json::from_value(body).expect("commands");
    assert_eq!(listed, rx.commands());
    let summary: Vec<(&str, u64, Vec<bool>)> = listed
        .iter()
        .map(|c| {
            (
                c.id.as_str(),
                c.deliveries,
                c.results.iter().map(|r| r.ok).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("cmd-1", 2, vec![true, false]),
            (second.as_str(), 3, vec![false]),
            (third.as_str(), 4, vec![]),
        ]
    );
    assert_eq!(listed[0].results[0].message, "level set");
    assert_eq!(listed[0].results[0].sensor_id.as_deref(), Some("s1"));
    assert_eq!(rx.command(&second).expect("known").kind, "resync");
    assert_eq!(rx.summary().command_results, 3);
}

#[tokio::test]
async fn config_versions_are_served_and_fetches_counted() {
    let rx = receiver(Some(TOKEN)).await;
    let c = mtls_client(&rx);
    let cfg_url = format!("{}/v1/config", rx.url);
    let (status, body) = get_json(&c, &cfg_url).await;
    assert_eq!((status, body), (200, json!({"version": 0, "config": {}})));

    let control = format!("{}/_rx/config", rx.control_url);
    let (status, body) = post_json(&c, &control, &json!({"config": {"tenants": ["a"]}})).await;
    assert_eq!((status, body), (200, json!({"version": 1})));
    assert_eq!(heartbeat(&c, &rx).await.config_version, 1);
    // A bearer token fetches it too.
    let r = client(&rx)
        .get(&cfg_url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("config");
    assert_eq!(r.status(), 200);
    let got: ManagedConfig = r.json_of().await.expect("json");
    assert_eq!(got.version, 1);
    assert_eq!(got.config, json!({"tenants": ["a"]}));

    let (status, body) = post_json(&c, &control, &json!({"version": 7, "config": {"b": 1}})).await;
    assert_eq!((status, body), (200, json!({"version": 7})));
    assert_eq!(rx.set_managed_config(json!({"b": 2})), 8);
    rx.set_managed_config_version(3, json!({"c": 3}));
    assert_eq!(
        rx.managed_config(),
        ManagedConfig {
            version: 3,
            config: json!({"c": 3})
        }
    );
    let (status, body) = get_json(&c, &control).await;
    assert_eq!(
        (status, body),
        (200, json!({"version": 3, "config": {"c": 3}}))
    );
    assert_eq!(
        get_json(&c, &cfg_url).await.1,
        json!({"version": 3, "config": {"c": 3}})
    );
    let (status, _) = post_json(&c, &control, &json!({"cfg": {}})).await;
    assert_eq!(status, 400);
    assert_eq!(get_json(&client(&rx), &cfg_url).await.0, 401);

    let s = rx.summary();
    assert_eq!(
        s.config_fetches, 3,
        "unauthenticated requests are not fetches"
    );
}

#[tokio::test]
async fn diagnostics_are_stored_with_their_command() {
    let rx = receiver(Some(TOKEN)).await;
    let c = mtls_client(&rx);
    let id = rx.queue_command("collect_diagnostics", json!({}));
    let url = format!("{}/v1/diagnostics", rx.url);
    let doc = json!({"status": {"state": "running"}, "logs": ["a", "b"]});
    let plain = serde_json::to_vec(&doc).expect("json");
    for (encoding, body) in [("zstd", zstd(&plain)), ("gzip", gzip(&plain))] {
        let r = c
            .post(&url)
            .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
            .header("X-Sensor-Id", "s1")
            .header("X-Command-Id", &id)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", encoding)
            .body(body)
            .send()
            .await
            .expect("diagnostics");
        assert_eq!(r.status(), 200, "{encoding}");
    }
    let post = |cmd: Option<&str>, body: &'static str| {
        let mut rb = c.post(&url).body(body);
        if let Some(cmd) = cmd {
            rb = rb.header("X-Command-Id", cmd);
        }
        rb.send()
    };
    assert_eq!(post(None, "{}").await.expect("req").status(), 400);
    assert_eq!(post(Some("nope"), "{}").await.expect("req").status(), 404);
    assert_eq!(
        post(Some(&id), "not json").await.expect("req").status(),
        400
    );
    let r = client(&rx)
        .post(&url)
        .header("X-Command-Id", &id)
        .body("{}")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);

    let (status, body) = get_json(&c, &format!("{}/_rx/diagnostics", rx.control_url)).await;
    assert_eq!(status, 200);
    let listed: Vec<backend_receiver::DiagnosticsBundle> =
        serde_json::from_value(body).expect("bundles");
    assert_eq!(listed, rx.diagnostics());
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].command_id, id);
    assert_eq!(listed[0].document, doc);
    assert_eq!(listed[0].encoding, "zstd");
    assert_eq!(listed[1].encoding, "gzip");
    assert_eq!(listed[1].sensor_id.as_deref(), Some("s1"));
    assert_eq!(rx.summary().diagnostics, 2);
}

#[tokio::test]
async fn heartbeats_are_kept_with_their_sender() {
    let rx = receiver(Some(TOKEN)).await;
    let r = client(&rx)
        .post(format!("{}/v1/heartbeat", rx.url))
        .bearer_auth(TOKEN)
        .header("X-Sensor-Id", "bearer-sensor")
        .header("Content-Encoding", "zstd")
        .body(zstd(br#"{"n":1}"#))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(r.status(), 200);
    heartbeat(&mtls_client(&rx), &rx).await;
    let (status, body) =
        get_json(&client(&rx), &format!("{}/_rx/heartbeats", rx.control_url)).await;
    assert_eq!(status, 200);
    let listed: Vec<backend_receiver::HeartbeatRecord> =
        serde_json::from_value(body).expect("heartbeats");
    assert_eq!(listed, rx.heartbeats());
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].document, json!({"n": 1}));
    assert_eq!(listed[0].sensor_id.as_deref(), Some("bearer-sensor"));
    assert_eq!(listed[0].client_cn, None);
    assert_eq!(listed[1].client_cn.as_deref(), Some("m365-sensor-device"));
    assert_eq!(rx.last_heartbeat(), Some(json!({"ok": 1})));
    assert_eq!(rx.truth().last_heartbeat, Some(json!({"ok": 1})));
    let s = rx.summary();
    assert_eq!((s.heartbeats, s.heartbeat_requests), (2, 2));
}

#[tokio::test]
async fn management_faults() {
    let rx = receiver_with(backend_receiver::ReceiverConfig {
        enrollment_tokens: vec!["tok-1".into()],
        ..Default::default()
    })
    .await;
    let c = mtls_client(&rx);
    let id = rx.queue_command("reboot", json!({}));

    // Through the control API, as the black-box tests do.
    let (status, body) = post_json(
        &c,
        &format!("{}/_rx/faults", rx.control_url),
        &json!({"enroll_garbage": true, "heartbeat_status": 503, "config_garbage": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["heartbeat_status"], json!(503));

    let r = client(&rx)
        .post(format!("{}/v1/enroll", rx.url))
        .json_body(&enroll_body("tok-1", &csr(&device_key())))
        .send()
        .await
        .expect("enroll");
    assert_eq!(r.status(), 201);
    let bytes = r.bytes().await.expect("body");
    assert!(serde_json::from_slice::<backend_receiver::EnrollResponse>(&bytes).is_err());
    assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_err());
    assert_eq!(rx.enrollments().unused_tokens, vec!["tok-1".to_string()]);

    let (status, body) = post_json(&c, &format!("{}/v1/heartbeat", rx.url), &json!({})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(rx.command(&id).expect("queued").deliveries, 0);
    assert!(rx.heartbeats().is_empty());

    let r = c
        .get(format!("{}/v1/config", rx.url))
        .send()
        .await
        .expect("config");
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.expect("body");
    assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_err());

    // Through the handle; cleared, everything answers normally.
    rx.set_faults(Faults {
        heartbeat_status: Some(500),
        ..Default::default()
    });
    assert_eq!(
        post_json(&c, &format!("{}/v1/heartbeat", rx.url), &json!({}))
            .await
            .0,
        500
    );
    rx.set_faults(Faults::default());
    assert_eq!(ids(&heartbeat(&c, &rx).await), vec![id.as_str()]);
    assert_eq!(
        get_json(&c, &format!("{}/v1/config", rx.url)).await,
        (200, json!({"version": 0, "config": {}}))
    );
    let (status, _) = post_json(
        &client(&rx),
        &format!("{}/v1/enroll", rx.url),
        &enroll_body("tok-1", &csr(&device_key())),
    )
    .await;
    assert_eq!(status, 201);
    let s = rx.summary();
    assert_eq!((s.heartbeat_requests, s.heartbeats), (3, 1));
    assert_eq!(s.config_fetches, 2);
    assert_eq!(
        rx.enrollments().refused[0].reason,
        "injected fault enroll_garbage"
    );
}

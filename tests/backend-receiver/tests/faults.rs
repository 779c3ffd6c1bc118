//! Fault injection through the control API: queued and periodic statuses, down/up, and the binary.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;

#[tokio::test]
async fn fault_queue_answers_statuses_with_retry_after() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    let r = c
        .post(format!("{}/_rx/faults", rx.control_url))
        .json_body(&json!({"next_statuses": [
            {"status": 503, "retry_after": "2"},
            {"status": 429, "retry_after_http_date_secs": 3},
            {"status": 500},
            {"status": 413},
            {"status": 401}
        ]}))
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 200);

    let r = ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:1",
        1,
        "zstd",
        zstd(ndjson(&["a"]).as_bytes()),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let r = ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:1",
        1,
        "zstd",
        zstd(ndjson(&["a"]).as_bytes()),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), 429);
    let date = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .expect("retry-after");
    let when = httpdate::parse_http_date(date).expect("HTTP date");
    assert!(when > SystemTime::now() + Duration::from_secs(1), "{date}");
    for want in [500, 413, 401] {
        assert_eq!(send(&c, &rx, "s1:1", &["a"]).await.0, want);
    }
    // Queue consumed: the key was never stored, so it is accepted now.
    assert_eq!(send(&c, &rx, "s1:1", &["a"]).await.0, 200);

    // Every 3rd request.
    let r = c
        .post(format!("{}/_rx/faults", rx.control_url))
        .json_body(&json!({"status_every": {"every": 3, "status": 500}}))
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    for i in 2..8 {
        got.push(send(&c, &rx, &format!("s1:{i}"), &["a"]).await.0);
    }
    assert_eq!(got, vec![200, 200, 500, 200, 200, 500]);
    // Typos are refused; {} clears.
    let r = c
        .post(format!("{}/_rx/faults", rx.control_url))
        .json_body(&json!({"next_status": []}))
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{}/_rx/faults", rx.control_url))
        .json_body(&json!({}))
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 200);
    assert_eq!(rx.faults(), backend_receiver::Faults::default());

    let s: backend_receiver::Summary = c
        .get(format!("{}/_rx/summary", rx.control_url))
        .send()
        .await
        .expect("summary")
        .json_of()
        .await
        .expect("json");
    assert_eq!(s.ingest_requests, 12);
    assert_eq!(s.statuses.get(&500), Some(&3));
    assert_eq!(s.statuses.get(&503), Some(&1));
    assert_eq!(s.statuses.get(&429), Some(&1));
    assert_eq!(s.batches_stored, 5);
}

#[tokio::test]
async fn slow_fault_delays_answers() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    rx.set_faults(backend_receiver::Faults {
        slow_ms: 300,
        ..Default::default()
    });
    let t0 = std::time::Instant::now();
    assert_eq!(send(&c, &rx, "s1:1", &["a"]).await.0, 200);
    assert!(t0.elapsed() >= Duration::from_millis(300));
}

async fn refused(rx: &backend_receiver::ReceiverHandle) -> bool {
    // A fresh client: no pooled connection.
    ingest(
        &client(rx),
        rx,
        Some(TOKEN),
        "s1:99",
        1,
        "zstd",
        zstd(ndjson(&["z"]).as_bytes()),
    )
    .send()
    .await
    .is_err_and(|e| e.is_connect())
}

#[tokio::test]
async fn down_refuses_connections_then_same_port_comes_back() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    assert_eq!(send(&c, &rx, "s1:1", &["a"]).await.0, 200);

    let r = c
        .post(format!("{}/_rx/down", rx.control_url))
        .json_body(&json!({"for_ms": 600}))
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json_of::<serde_json::Value>().await.expect("json"),
        json!({"up": false})
    );
    assert!(refused(&rx).await);
    // The pooled connection was dropped too: the old client fails as well.
    assert!(ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:2",
        1,
        "zstd",
        zstd(ndjson(&["b"]).as_bytes())
    )
    .send()
    .await
    .is_err());
    let summary: serde_json::Value = c
        .get(format!("{}/_rx/summary", rx.control_url))
        .send()
        .await
        .expect("summary")
        .json_of()
        .await
        .expect("json");
    assert_eq!(summary["up"], json!(false));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(rx.is_up());
    assert_eq!(send(&c, &rx, "s1:2", &["b"]).await.0, 200);

    // Indefinitely, then /_rx/up.
    let r = c
        .post(format!("{}/_rx/down", rx.control_url))
        .json_body(&json!({"indefinitely": true}))
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(refused(&rx).await);
    let r = c
        .post(format!("{}/_rx/up", rx.control_url))
        .send()
        .await
        .expect("control");
    assert_eq!(
        r.json_of::<serde_json::Value>().await.expect("json"),
        json!({"up": true})
    );
    assert_eq!(send(&c, &rx, "s1:3", &["c"]).await.0, 200);

    // Through the handle; {"for_ms":0} brings it back at once.
    rx.go_down_indefinitely().await.expect("down");
    assert!(refused(&rx).await);
    let r = c
        .post(format!("{}/_rx/down", rx.control_url))
        .json_body(&json!({"for_ms": 0}))
        .send()
        .await
        .expect("control");
    assert_eq!(
        r.json_of::<serde_json::Value>().await.expect("json"),
        json!({"up": true})
    );
    // A later transition cancels an earlier timed re-up.
    rx.go_down(Duration::from_millis(200)).await.expect("down");
    rx.go_down_indefinitely().await.expect("down");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!rx.is_up());
    rx.go_up().await.expect("up");
    assert_eq!(send(&c, &rx, "s1:4", &["d"]).await.0, 200);
    assert_eq!(rx.summary().batches_stored, 4);
}

#[tokio::test]
async fn binary_writes_its_files_and_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let out = dir.path().join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_backend-receiver"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--out-dir",
        ])
        .arg(&out)
        .arg("--token-file")
        .arg(&token_file)
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
    assert!(
        url.starts_with("https://127.0.0.1:") && !url.ends_with('/'),
        "{url}"
    );
    let ca = std::fs::read_to_string(out.join("ca.pem")).expect("ca");
    let control = std::fs::read_to_string(out.join("control_url")).expect("control");
    assert!(std::fs::read_to_string(out.join("device.pem"))
        .expect("pem")
        .contains("BEGIN CERTIFICATE"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("device.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let c = sensor_testkit::https_client(&ca).expect("client");
    let r = c
        .post(format!("{url}/v1/ingest"))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/x-ndjson")
        .header("Content-Encoding", "zstd")
        .header("Idempotency-Key", "s1:1")
        .header("X-Record-Count", "2")
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", "s1")
        .body(zstd(ndjson(&["a", "b"]).as_bytes()))
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 200);
    let truth: serde_json::Value = c
        .get(format!("{control}/_rx/truth"))
        .send()
        .await
        .expect("truth")
        .json_of()
        .await
        .expect("json");
    assert_eq!(
        truth["records"][format!("{TENANT}/a")]["deliveries"],
        json!(1)
    );
    assert_eq!(truth["batches"][0]["key"], json!("s1:1"));
}

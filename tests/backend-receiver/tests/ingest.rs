//! Ingest through real HTTPS: authentication, encodings, idempotency, duplicates, limits, malformed input.

mod common;

use std::io::Write;

use backend_receiver::ReceiverConfig;
use common::*;
use serde_json::json;

#[tokio::test]
async fn bearer_accepted_and_missing_or_wrong_auth_refused() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    let body = zstd(ndjson(&["a", "b"]).as_bytes());
    let r = ingest(&c, &rx, None, "s1:1", 2, "zstd", body.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers().get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let r = ingest(&c, &rx, Some("wrong"), "s1:1", 2, "zstd", body.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let r = ingest(&c, &rx, Some(TOKEN), "s1:1", 2, "zstd", body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json_of().await.expect("json");
    assert_eq!(v, json!({"accepted": 2, "duplicates": 0}));
    let s = rx.summary();
    assert_eq!(s.ingest_requests, 3);
    assert_eq!(s.statuses.get(&401), Some(&2));
    assert_eq!(s.statuses.get(&200), Some(&1));
    assert_eq!(s.batches_stored, 1);
    assert_eq!(s.records_accepted, 2);
    assert_eq!(s.header_violations, 0);
    assert!(s.up);
}

#[tokio::test]
async fn mtls_accepted_zstd_and_gzip_decoded_exact_bytes_hashed() {
    let rx = receiver(None).await;
    let c = mtls_client(&rx);
    let rec1 = record("r1", "zstd one");
    let plain1 = envelope(TENANT, &rec1) + "\n";
    let r = ingest(&c, &rx, None, "s1:1", 1, "zstd", zstd(plain1.as_bytes()))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    // Odd spacing and field order in the record are kept byte for byte.
    let rec2 = r#"{ "Operation" : "Send","Id":"r2",  "Nested":{"b":1,"a":2.50}}"#;
    let plain2 = envelope(TENANT, rec2); // no trailing newline
    let r = ingest(&c, &rx, None, "s1:2", 1, "gzip", gzip(plain2.as_bytes()))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);

    // Without a client certificate and with no token configured, a bearer token is refused.
    let plain = client(&rx);
    let r = ingest(
        &plain,
        &rx,
        Some(TOKEN),
        "s1:3",
        1,
        "zstd",
        zstd(plain1.as_bytes()),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), 401);

    let s = rx.summary();
    assert_eq!(s.encodings.get("zstd"), Some(&1));
    assert_eq!(s.encodings.get("gzip"), Some(&1));
    assert_eq!(s.unique_records, 2);
    assert_eq!(s.bytes_decompressed, (plain1.len() + plain2.len()) as u64);
    let t = rx.truth();
    let r1 = &t.records[&format!("{TENANT}/r1")];
    assert_eq!(r1.sha256, vec![sha256_hex(rec1.as_bytes())]);
    assert_eq!(r1.content_type, "Audit.Exchange");
    assert_eq!(
        t.records[&format!("{TENANT}/r2")].sha256,
        vec![sha256_hex(rec2.as_bytes())]
    );
    assert_eq!(t.batches.len(), 2);
    assert_eq!(t.batches[1].encoding, "gzip");
    assert_eq!(t.batches[1].first_record_id.as_deref(), Some("r2"));
}

#[tokio::test]
async fn repeated_key_is_409_and_conflict_recorded_when_records_differ() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    assert_eq!(send(&c, &rx, "s1:7", &["a", "b"]).await.0, 200);
    let (st, v) = send(&c, &rx, "s1:7", &["a", "b"]).await;
    assert_eq!(st, 409);
    assert_eq!(v["conflict"], json!(false));
    let (st, v) = send(&c, &rx, "s1:7", &["a", "c", "d"]).await;
    assert_eq!(st, 409);
    assert_eq!(v["conflict"], json!(true));
    // Same ids, other bytes: also a conflict.
    let other =
        envelope(TENANT, &record("a", "changed")) + "\n" + &envelope(TENANT, &record("b", "x"));
    let r = ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:7",
        2,
        "zstd",
        zstd(other.as_bytes()),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), 409);

    let s = rx.summary();
    assert_eq!(s.repeated_keys, 3);
    assert_eq!(s.key_conflicts, 2);
    assert_eq!(s.batches_stored, 1);
    assert_eq!(s.records_accepted, 2);
    let t = rx.truth();
    assert_eq!(t.keys_seen_repeated, vec!["s1:7"; 3]);
    assert_eq!(t.key_conflicts[0].key, "s1:7");
    assert_eq!(t.key_conflicts[0].stored_records, 2);
    assert_eq!(t.key_conflicts[0].new_records, 3);
    assert_eq!(t.records[&format!("{TENANT}/a")].deliveries, 1);
}

#[tokio::test]
async fn duplicates_counted_across_and_within_batches() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    let (st, v) = send(&c, &rx, "s1:1", &["a", "b"]).await;
    assert_eq!((st, v), (200, json!({"accepted": 2, "duplicates": 0})));
    let (st, v) = send(&c, &rx, "s1:2", &["b", "c", "c"]).await;
    assert_eq!((st, v), (200, json!({"accepted": 3, "duplicates": 2})));
    // Same Id in another tenant is another record.
    let body = envelope("other-tenant", &record("a", "x"));
    let r = ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:3",
        1,
        "zstd",
        zstd(body.as_bytes()),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(
        r.json_of::<serde_json::Value>().await.expect("json")["duplicates"],
        0
    );
    // A re-delivery with other bytes (fields re-ordered) adds a variant.
    let reordered =
        r#"{"Id":"a","Operation":"Send","CreationTime":"2026-11-25T09:59:00","Extra":"x"}"#;
    let body = envelope(TENANT, reordered);
    let r = ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:4",
        1,
        "gzip",
        gzip(body.as_bytes()),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(
        r.json_of::<serde_json::Value>().await.expect("json")["duplicates"],
        1
    );

    let s = rx.summary();
    assert_eq!(s.records_accepted, 7);
    assert_eq!(s.unique_records, 4);
    assert_eq!(s.duplicate_records, 3);
    let t = rx.truth();
    let a = &t.records[&format!("{TENANT}/a")];
    assert_eq!(a.deliveries, 2);
    assert_eq!(
        a.sha256,
        vec![
            sha256_hex(record("a", "x").as_bytes()),
            sha256_hex(reordered.as_bytes())
        ]
    );
    assert_eq!(t.records[&format!("{TENANT}/c")].deliveries, 2);
    assert_eq!(t.records[&format!("{TENANT}/c")].sha256.len(), 1);
}

#[tokio::test]
async fn compression_bomb_is_413_and_body_limit_is_413() {
    let rx = receiver_with(ReceiverConfig {
        bearer_token: Some(TOKEN.into()),
        max_decompressed_bytes: 8 * 1024 * 1024,
        ..Default::default()
    })
    .await;
    let c = client(&rx);
    // 200 MB of zeros, compressed in a stream (never held uncompressed).
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    let chunk = vec![0u8; 1024 * 1024];
    for _ in 0..200 {
        enc.write_all(&chunk).expect("compress");
    }
    let bomb = enc.finish().expect("finish");
    assert!(bomb.len() < 1024 * 1024, "{} bytes", bomb.len());
    let r = ingest(&c, &rx, Some(TOKEN), "s1:1", 1, "zstd", bomb)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);

    // Same for gzip: 100 MB of newlines (many empty lines) is still capped.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let nl = vec![b'\n'; 1024 * 1024];
    for _ in 0..100 {
        enc.write_all(&nl).expect("compress");
    }
    let r = ingest(
        &c,
        &rx,
        Some(TOKEN),
        "s1:2",
        0,
        "gzip",
        enc.finish().expect("gz"),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), 413);

    // A lower body limit through the faults: 413 on the compressed size.
    rx.set_faults(backend_receiver::Faults {
        max_body_bytes: Some(64),
        ..Default::default()
    });
    let (st, _) = send(&c, &rx, "s1:3", &["a", "b", "c"]).await;
    assert_eq!(st, 413);
    // A record limit.
    rx.set_faults(backend_receiver::Faults {
        max_records_per_batch: Some(2),
        ..Default::default()
    });
    assert_eq!(send(&c, &rx, "s1:3", &["a", "b", "c"]).await.0, 413);
    assert_eq!(send(&c, &rx, "s1:3", &["a", "b"]).await.0, 200);
    let s = rx.summary();
    assert_eq!(s.statuses.get(&413), Some(&4));
    assert_eq!(s.batches_stored, 1);
}

#[tokio::test]
async fn malformed_line_is_422_naming_the_line_and_the_key_is_not_stored() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    let cases = [
        (ndjson(&["a"]) + "{not json}\n", "line 2"),
        (
            ndjson(&["a", "b"]) + &envelope(TENANT, r#"{"NoId":1}"#),
            "line 3",
        ),
        (envelope(TENANT, "[1,2]"), "line 1"),
        (ndjson(&["a"]) + "\n" + &ndjson(&["b"]), "line 2"),
        (
            envelope(TENANT, &record("a", "x")).replace("2026-11-25T10:00:00Z", "yesterday"),
            "line 1",
        ),
    ];
    for (body, want) in cases {
        let n = body.lines().count();
        let r = ingest(
            &c,
            &rx,
            Some(TOKEN),
            "s1:1",
            n,
            "zstd",
            zstd(body.as_bytes()),
        )
        .send()
        .await
        .expect("request");
        assert_eq!(r.status(), 422, "{body}");
        let v: serde_json::Value = r.json_of().await.expect("json");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.starts_with(want), "{msg} for {body}");
    }
    // The key was not stored: a good batch under it is accepted.
    assert_eq!(send(&c, &rx, "s1:1", &["a"]).await.0, 200);
}

#[tokio::test]
async fn header_errors_are_400_or_415_and_violations_counted() {
    let rx = receiver(Some(TOKEN)).await;
    let c = client(&rx);
    let body = || zstd(ndjson(&["a"]).as_bytes());
    let url = format!("{}/v1/ingest", rx.url);
    let base = || {
        c.post(&url)
            .bearer_auth(TOKEN)
            .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
            .header("X-Sensor-Id", "s1")
    };
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        // Missing Idempotency-Key.
        (
            base()
                .header("Content-Type", "application/x-ndjson")
                .header("Content-Encoding", "zstd")
                .header("X-Record-Count", "1")
                .body(body()),
            400,
        ),
        // Malformed Idempotency-Key.
        (
            ingest(&c, &rx, Some(TOKEN), "s1:abc", 1, "zstd", body()),
            400,
        ),
        (
            ingest(&c, &rx, Some(TOKEN), "nocolon", 1, "zstd", body()),
            400,
        ),
        // X-Record-Count mismatch.
        (ingest(&c, &rx, Some(TOKEN), "s1:1", 2, "zstd", body()), 400),
        // Unsupported encoding.
        (ingest(&c, &rx, Some(TOKEN), "s1:1", 1, "br", body()), 415),
        // Not zstd at all.
        (
            ingest(&c, &rx, Some(TOKEN), "s1:1", 1, "zstd", b"garbage".to_vec()),
            400,
        ),
        // Wrong Content-Type.
        (
            base()
                .header("Content-Type", "application/json")
                .header("Content-Encoding", "zstd")
                .header("Idempotency-Key", "s1:1")
                .header("X-Record-Count", "1")
                .body(body()),
            415,
        ),
    ];
    for (i, (rb, want)) in cases.into_iter().enumerate() {
        let r = rb.send().await.expect("request");
        assert_eq!(r.status().as_u16(), want, "case {i}");
    }
    assert_eq!(rx.summary().header_violations, 0);
    // Foreign User-Agent and no X-Sensor-Id: counted, not rejected.
    let r = c
        .post(&url)
        .bearer_auth(TOKEN)
        .header("User-Agent", "curl/8")
        .header("Content-Type", "application/x-ndjson")
        .header("Content-Encoding", "zstd")
        .header("Idempotency-Key", "s1:1")
        .header("X-Record-Count", "1")
        .body(body())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(rx.summary().header_violations, 2);
    assert_eq!(rx.truth().header_violation_samples.len(), 2);
}

#[tokio::test]
async fn heartbeat_stored_and_answered() {
    let rx = receiver(Some(TOKEN)).await;
    let c = mtls_client(&rx);
    let doc = json!({"sensor_id": "s1", "state": "ok", "spool_bytes": 12});
    let r = c
        .post(format!("{}/v1/heartbeat", rx.url))
        .header("User-Agent", "m365-sensor/0.1.0 (linux; x86_64)")
        .header("X-Sensor-Id", "s1")
        .json_body(&doc)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json_of().await.expect("json");
    assert_eq!(v, json!({"config_version": 0, "commands": []}));
    let r = client(&rx)
        .post(format!("{}/v1/heartbeat", rx.url))
        .json_body(&doc)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    assert_eq!(rx.summary().heartbeats, 1);
    assert_eq!(rx.truth().last_heartbeat, Some(doc));
}

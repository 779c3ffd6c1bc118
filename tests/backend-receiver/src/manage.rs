//! The management handlers of the main port (`POST /v1/heartbeat`, `GET /v1/config`,
//! `POST /v1/commands/<id>/result`, `POST /v1/diagnostics`) and their control endpoints (`/_rx/config`,
//! `/_rx/commands`, `/_rx/enroll-tokens`, `/_rx/enrollments`, `/_rx/diagnostics`, `/_rx/heartbeats`),
//! and the file store for update bundles (`GET /v1/files/<name>`, filled by `PUT /_rx/files/<name>`, its
//! downloads listed by `GET /_rx/downloads`).
//!
//! Order of checks on heartbeat: `slow_ms`, injected `heartbeat_status` (nothing stored or delivered),
//! authentication (401), body (413/415/400), then the document is stored and the answer carries the
//! config version and every command without a result (each counted delivered). On the others:
//! authentication (401), then the command id (404), then the body (400).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::faults::StatusFault;
use crate::http::{
    authenticated, check_common_headers, client_identity, content_encoding, decode_all, header_str,
    read_body, read_strict_json, string_field, Field, Reject,
};
use crate::ingest::fault_response;
use crate::management::{now_rfc3339, ManagementError};
use crate::model::{
    AddTokens, DiagnosticsBundle, HeartbeatRecord, HeartbeatResponse, QueueCommand, ResultRecord,
    SetConfig,
};
use crate::server::Shared;

/// What a `config_garbage` fault answers with status 200: JSON cut short.
const GARBAGE_CONFIG: &str = r#"{"version":"#;

fn unauthenticated() -> Reject {
    Reject::new(
        StatusCode::UNAUTHORIZED,
        "a client certificate or a valid bearer token is required",
    )
}

fn sensor_id(parts: &axum::http::request::Parts) -> Option<String> {
    header_str(&parts.headers, "x-sensor-id").map(str::to_string)
}

/// `POST /v1/heartbeat`: stores the (optionally zstd/gzip-encoded) JSON status document and answers
/// the config version and the pending commands.
pub(crate) async fn heartbeat(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    check_common_headers(&shared, &parts, "heartbeat");
    let (slow, status) = {
        let f = shared.lock_faults();
        (f.slow(), f.heartbeat_status())
    };
    shared.lock_mgmt().counters.heartbeat_requests += 1;
    if !slow.is_zero() {
        tokio::time::sleep(slow).await;
    }
    if let Some(status) = status {
        log::debug!("heartbeat answered {status} (injected fault)");
        return fault_response(&StatusFault {
            status,
            ..Default::default()
        });
    }
    let result = async {
        if !authenticated(&shared, &parts) {
            return Err(unauthenticated());
        }
        let encoding = content_encoding(&parts.headers)?;
        let raw = read_body(&parts.headers, body, shared.cfg.max_body_bytes).await?;
        let plain = decode_all(&raw, encoding, shared.cfg.max_decompressed_bytes)?;
        let doc: serde_json::Value = serde_json::from_slice(&plain).map_err(|e| {
            Reject::new(
                StatusCode::BAD_REQUEST,
                format!("heartbeat is not JSON: {e}"),
            )
        })?;
        shared.lock_state().heartbeat(doc.clone());
        let identity = client_identity(&parts);
        let mut m = shared.lock_mgmt();
        m.add_heartbeat(HeartbeatRecord {
            at: now_rfc3339(),
            sensor_id: sensor_id(&parts),
            client_cn: identity.as_ref().and_then(|i| i.cn.clone()),
            client_serial: identity.map(|i| i.serial),
            document: doc,
        });
        Ok(HeartbeatResponse {
            config_version: m.config().version,
            commands: m.deliver(),
        })
    }
    .await;
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(reject) => reject.into_response(),
    }
}

/// `GET /v1/config`: the managed configuration and its version.
pub(crate) async fn config(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    check_common_headers(&shared, &parts, "config");
    if !authenticated(&shared, &parts) {
        return unauthenticated().into_response();
    }
    let garbage = shared.lock_faults().config_garbage();
    let mut m = shared.lock_mgmt();
    m.counters.config_fetches += 1;
    if garbage {
        log::debug!("config answered with garbage (injected fault)");
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            GARBAGE_CONFIG,
        )
            .into_response();
    }
    Json(m.config().clone()).into_response()
}

/// `POST /v1/commands/<id>/result`: records `{"ok":bool,"message":string}`; answers `{}`.
pub(crate) async fn command_result(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    check_common_headers(&shared, &parts, "command result");
    let result = async {
        if !authenticated(&shared, &parts) {
            return Err(unauthenticated());
        }
        if !shared.lock_mgmt().has_command(&id) {
            return Err(Reject::new(
                StatusCode::NOT_FOUND,
                format!("unknown command {id:?}"),
            ));
        }
        let map = read_strict_json(
            &shared,
            &parts,
            body,
            &[("ok", Field::Bool), ("message", Field::AnyString)],
        )
        .await?;
        let ok = map.get("ok").and_then(serde_json::Value::as_bool) == Some(true);
        let message = string_field(&map, "message");
        log::info!("command {id} result: ok={ok} {message:?}");
        shared.lock_mgmt().post_result(
            &id,
            ResultRecord {
                ok,
                message,
                at: now_rfc3339(),
                sensor_id: sensor_id(&parts),
            },
        );
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(reject) => reject.into_response(),
    }
}

/// `POST /v1/diagnostics` with `X-Command-Id`: stores the JSON document with the command id.
pub(crate) async fn diagnostics(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    check_common_headers(&shared, &parts, "diagnostics");
    let result = async {
        if !authenticated(&shared, &parts) {
            return Err(unauthenticated());
        }
        let command_id = header_str(&parts.headers, "x-command-id")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Reject::new(StatusCode::BAD_REQUEST, "X-Command-Id is required"))?
            .to_string();
        if !shared.lock_mgmt().has_command(&command_id) {
            return Err(Reject::new(
                StatusCode::NOT_FOUND,
                format!("unknown command {command_id:?}"),
            ));
        }
        let encoding = content_encoding(&parts.headers)?;
        let raw = read_body(&parts.headers, body, shared.cfg.max_body_bytes).await?;
        let body_bytes = raw.len() as u64;
        let cap = shared.cfg.max_decompressed_bytes;
        let document = tokio::task::spawn_blocking(move || {
            let plain = decode_all(&raw, encoding, cap)?;
            serde_json::from_slice::<serde_json::Value>(&plain).map_err(|e| {
                Reject::new(
                    StatusCode::BAD_REQUEST,
                    format!("the diagnostics bundle is not JSON: {e}"),
                )
            })
        })
        .await
        .map_err(|e| Reject::new(StatusCode::INTERNAL_SERVER_ERROR, format!("decoder: {e}")))??;
        log::info!("diagnostics for command {command_id}: {body_bytes} bytes");
        shared.lock_mgmt().add_diagnostics(DiagnosticsBundle {
            command_id,
            at: now_rfc3339(),
            sensor_id: sensor_id(&parts),
            encoding: encoding.name().to_string(),
            body_bytes,
            document,
        });
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(reject) => reject.into_response(),
    }
}

/// The management part of the control API.
pub(crate) fn control_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_rx/enroll-tokens", post(add_tokens))
        .route("/_rx/enrollments", get(enrollments))
        .route("/_rx/config", get(get_config).post(set_config))
        .route("/_rx/commands", get(commands).post(queue_command))
        .route("/_rx/diagnostics", get(diagnostic_bundles))
        .route("/_rx/heartbeats", get(heartbeats))
        .route(
            "/_rx/files/{name}",
            axum::routing::put(put_file).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/_rx/downloads", get(downloads))
        .with_state(shared)
}

fn bad_request(what: &str, e: serde_json::Error) -> Response {
    Reject::new(StatusCode::BAD_REQUEST, format!("bad {what}: {e}")).into_response()
}

fn management_error(e: ManagementError) -> Response {
    let status = match e {
        ManagementError::TokenAlreadyUsed { .. } | ManagementError::CommandIdTaken { .. } => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::BAD_REQUEST,
    };
    Reject::new(status, e.to_string()).into_response()
}

async fn add_tokens(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let req: AddTokens = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request("enrolment tokens", e),
    };
    match shared.lock_mgmt().add_tokens(req.tokens) {
        Ok(added) => Json(serde_json::json!({ "added": added })).into_response(),
        Err(e) => management_error(e),
    }
}

async fn enrollments(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock_mgmt().enrollments()).into_response()
}

async fn get_config(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock_mgmt().config().clone()).into_response()
}

async fn set_config(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let req: SetConfig = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request("config", e),
    };
    let version = shared.lock_mgmt().set_config(req.version, req.config);
    log::info!("managed config set, version {version}");
    Json(serde_json::json!({ "version": version })).into_response()
}

async fn commands(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock_mgmt().commands()).into_response()
}

async fn queue_command(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let req: QueueCommand = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request("command", e),
    };
    let queued = shared
        .lock_mgmt()
        .queue(req.id, req.kind, req.args, now_rfc3339());
    match queued {
        Ok(id) => {
            log::info!("command {id} queued");
            Json(serde_json::json!({ "id": id })).into_response()
        }
        Err(e) => management_error(e),
    }
}

async fn diagnostic_bundles(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock_mgmt().diagnostics()).into_response()
}

async fn heartbeats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock_mgmt().heartbeats()).into_response()
}

/// `GET /v1/files/<name>`: a file put by the test (an update bundle), to authenticated sensors only.
pub(crate) async fn file(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let (parts, _) = req.into_parts();
    if !authenticated(&shared, &parts) {
        return unauthenticated().into_response();
    }
    let mut m = shared.lock_mgmt();
    m.downloads.push((name.clone(), sensor_id(&parts)));
    match m.files.get(&name) {
        Some(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bytes.clone(),
        )
            .into_response(),
        None => Reject::new(StatusCode::NOT_FOUND, format!("no file {name}")).into_response(),
    }
}

async fn put_file(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: bytes::Bytes,
) -> Response {
    log::info!("file {name}: {} bytes", body.len());
    shared.lock_mgmt().files.insert(name, body);
    StatusCode::NO_CONTENT.into_response()
}

async fn downloads(State(shared): State<Arc<Shared>>) -> Response {
    let list: Vec<_> = shared
        .lock_mgmt()
        .downloads
        .iter()
        .map(|(name, sensor)| serde_json::json!({"name": name, "sensor_id": sensor}))
        .collect();
    Json(list).into_response()
}

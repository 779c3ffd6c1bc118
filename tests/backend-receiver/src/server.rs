//! Listeners: the TLS serving loop (which, unlike `sensor_testkit::serve_tls`, owns its connections so
//! that taking the port down drops them), the main port's down/up lifecycle and the control API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{ReceiverConfig, ReceiverError};
use crate::enroll::Issuer;
use crate::faults::{FaultState, Faults};
use crate::management::Mgmt;
use crate::truth::{State as TruthState, Summary};

/// State shared by the handlers. Its mutexes are never held across `.await`, nor two at a time.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: ReceiverConfig,
    /// The CA that issues device certificates at enrolment and renewal.
    pub issuer: Issuer,
    /// The hostile CA that issues renewals instead, when configured.
    pub hostile: Option<Arc<crate::hostile::Hostile>>,
    state: Mutex<TruthState>,
    faults: Mutex<FaultState>,
    mgmt: Mutex<Mgmt>,
    up: AtomicBool,
}

impl Shared {
    pub fn new(
        cfg: ReceiverConfig,
        issuer: Issuer,
        hostile: Option<Arc<crate::hostile::Hostile>>,
    ) -> Self {
        Self {
            hostile,
            mgmt: Mutex::new(Mgmt::new(&cfg.enrollment_tokens)),
            cfg,
            issuer,
            state: Mutex::new(TruthState::default()),
            faults: Mutex::new(FaultState::default()),
            up: AtomicBool::new(false),
        }
    }

    /// The management state.
    pub fn lock_mgmt(&self) -> MutexGuard<'_, Mgmt> {
        self.mgmt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ground truth (a poisoned lock is recovered: the state is plain counters).
    pub fn lock_state(&self) -> MutexGuard<'_, TruthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault state.
    pub fn lock_faults(&self) -> MutexGuard<'_, FaultState> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters, with `up` and the management counters filled in.
    pub fn summary(&self) -> Summary {
        let mut s = self.lock_state().summary.clone();
        s.up = self.up.load(Ordering::SeqCst);
        let m = self.lock_mgmt().counters;
        s.heartbeat_requests = m.heartbeat_requests;
        s.config_fetches = m.config_fetches;
        s.enrollments = m.enrollments;
        s.renewals = m.renewals;
        s.refused_enrollments = m.refused_enrollments;
        s.command_results = m.command_results;
        s.diagnostics = m.diagnostics;
        s
    }
}

/// The main port: bound address, TLS config and router, and the serving task while up.
pub(crate) struct MainPort {
    pub addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Serializes down/up transitions (held across `.await`; it guards no data).
    transition: tokio::sync::Mutex<()>,
    /// Bumped by every transition; a timed re-up fires only if nothing happened since its `down`.
    generation: AtomicU64,
    closed: AtomicBool,
}

impl MainPort {
    /// Binds `addr` and starts serving.
    pub async fn start(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        router: Router,
        shared: Arc<Shared>,
    ) -> Result<Arc<Self>, ReceiverError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ReceiverError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ReceiverError::Bind { addr, source })?;
        let task = sensor_testkit::serve_tls(listener, tls.clone(), router.clone());
        shared.up.store(true, Ordering::SeqCst);
        Ok(Arc::new(Self {
            addr,
            tls,
            router,
            shared,
            task: Mutex::new(Some(task)),
            transition: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }))
    }

    fn take_task(&self) -> Option<JoinHandle<()>> {
        self.task.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Closes the port and drops its connections. With `for_`, re-binds the same port after that time
    /// (zero: at once) unless another transition happened meanwhile.
    pub async fn down(self: &Arc<Self>, for_: Option<Duration>) -> Result<(), ReceiverError> {
        let generation = {
            let _t = self.transition.lock().await;
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(task) = self.take_task() {
                task.abort();
                let _ = task.await;
            }
            self.shared.up.store(false, Ordering::SeqCst);
            generation
        };
        log::info!("main port {} down for {for_:?}", self.addr);
        match for_ {
            Some(d) if d.is_zero() => self.up().await,
            Some(d) => {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    if me.generation.load(Ordering::SeqCst) == generation {
                        if let Err(e) = me.up().await {
                            log::error!("re-binding the main port failed: {e}");
                        }
                    }
                });
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Re-binds the same port (retrying briefly) if it is down.
    pub async fn up(&self) -> Result<(), ReceiverError> {
        let _t = self.transition.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Err(ReceiverError::Shutdown);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            return Ok(());
        }
        let mut attempt = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if attempt < 40 => {
                    attempt += 1;
                    log::debug!("re-binding {} failed ({e}); retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(source) => {
                    return Err(ReceiverError::Bind {
                        addr: self.addr,
                        source,
                    })
                }
            }
        };
        let task = sensor_testkit::serve_tls(listener, self.tls.clone(), self.router.clone());
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        self.shared.up.store(true, Ordering::SeqCst);
        log::info!("main port {} up", self.addr);
        Ok(())
    }

    /// Stops serving for good (used when the handle is dropped).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(task) = self.take_task() {
            task.abort();
        }
        self.shared.up.store(false, Ordering::SeqCst);
    }
}

/// State of the control API.
#[derive(Clone)]
struct Control {
    shared: Arc<Shared>,
    main: Arc<MainPort>,
}

/// Body of `POST /_rx/down`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DownRequest {
    for_ms: Option<u64>,
    indefinitely: bool,
}

/// The control API router (`/_rx/...`).
pub(crate) fn control_router(shared: Arc<Shared>, main: Arc<MainPort>) -> Router {
    Router::new()
        .route("/_rx/summary", get(summary))
        .route("/_rx/truth", get(truth))
        .route("/_rx/faults", get(get_faults).post(set_faults))
        .route("/_rx/down", post(down))
        .route("/_rx/up", post(up))
        .with_state(Control {
            shared: Arc::clone(&shared),
            main,
        })
        .merge(crate::manage::control_router(shared))
}

async fn summary(State(c): State<Control>) -> Json<Summary> {
    Json(c.shared.summary())
}

async fn truth(State(c): State<Control>) -> Response {
    let shared = Arc::clone(&c.shared);
    // Building and serializing a million records takes a while: off the async threads.
    match tokio::task::spawn_blocking(move || serde_json::to_vec(&shared.lock_state().truth()))
        .await
    {
        Ok(Ok(body)) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_faults(State(c): State<Control>) -> Json<Faults> {
    Json(c.shared.lock_faults().current())
}

async fn set_faults(State(c): State<Control>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            log::info!("faults set: {f:?}");
            c.shared.lock_faults().set(f);
            Json(c.shared.lock_faults().current()).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("bad faults: {e}")),
    }
}

async fn down(State(c): State<Control>, body: axum::body::Bytes) -> Response {
    let req: DownRequest = if body.is_empty() {
        DownRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad down request: {e}")),
        }
    };
    let for_ = match (req.indefinitely, req.for_ms) {
        (true, None) => None,
        (false, Some(ms)) => Some(Duration::from_millis(ms)),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of for_ms or indefinitely:true".to_string(),
            )
        }
    };
    match c.main.down(for_).await {
        Ok(()) => Json(c.shared.summary_up()).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn up(State(c): State<Control>) -> Response {
    match c.main.up().await {
        Ok(()) => Json(c.shared.summary_up()).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

impl Shared {
    /// `{"up":bool}`, the answer of the down/up endpoints.
    fn summary_up(&self) -> serde_json::Value {
        serde_json::json!({ "up": self.up.load(Ordering::SeqCst) })
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

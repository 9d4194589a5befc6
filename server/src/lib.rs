//! bitnet-server: an OpenAI-compatible HTTP server over the runtime's
//! [`Engine`]. The HTTP side (axum on tokio) turns requests into prompts
//! and sampling settings; one scheduler thread steps every running
//! sequence together (continuous batching) and sends each request its
//! tokens over a channel; dropping the receiver (a client that went away)
//! cancels the request.
//!
//! The API without a socket: [`app`] gives the router, and a request goes
//! through it as it would from a client (`run_blocking` is what `bitnet
//! serve` calls to listen on a port):
//!
//! ```
//! use axum::body::{to_bytes, Body};
//! use axum::http::Request;
//! use bitnet_runtime::{Engine, EngineOptions};
//! use bitnet_server::{app, ServerConfig};
//! use std::sync::Arc;
//! use tower::ServiceExt;
//!
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/stories260K.gguf");
//! let engine = Arc::new(Engine::open(path.as_ref(), &EngineOptions::default())?);
//! let (router, _state) = app(engine, ServerConfig::new("stories"));
//! let body = r#"{"model": "stories", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}"#;
//! let request = Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(body))?;
//! let reply: serde_json::Value = tokio::runtime::Runtime::new()?.block_on(async {
//!     let response = router.oneshot(request).await?;
//!     assert_eq!(response.status(), 200);
//!     Ok::<_, Box<dyn std::error::Error>>(serde_json::from_slice(&to_bytes(response.into_body(), 1 << 20).await?)?)
//! })?;
//! assert_eq!(reply["choices"][0]["text"], ", there was a little");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
mod handlers;
pub mod metrics;
pub mod openapi;
pub mod responses;
pub mod scheduler;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bitnet_runtime::Engine;
use metrics::Metrics;
use scheduler::{Scheduler, SchedulerConfig};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use api::ApiError;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The model's name in `/v1/models` and responses.
    pub alias: String,
    pub api_key: Option<String>,
    /// `Access-Control-Allow-Origin` for browsers on other origins.
    pub cors: Option<String>,
    pub scheduler: SchedulerConfig,
    /// Per request, from admission to the last token.
    pub timeout: Option<Duration>,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// How long running requests may take to finish after SIGTERM/SIGINT.
    pub grace: Duration,
}

impl ServerConfig {
    pub fn new(alias: &str) -> ServerConfig {
        ServerConfig {
            alias: alias.into(),
            api_key: None,
            cors: None,
            scheduler: SchedulerConfig { parallel: 4, max_queue: 256, step_tokens: 256 },
            timeout: None,
            body_limit: 4 << 20,
            grace: Duration::from_secs(30),
        }
    }
}

pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    pub config: ServerConfig,
    pub created: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.status == 503 {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r.extensions_mut().insert(ErrorNote(self.message));
        r
    }
}

/// An error response's message, for the request log line.
#[derive(Clone)]
struct ErrorNote(String);

/// The router over an engine; the scheduler thread starts here.
pub fn app(engine: Arc<Engine>, config: ServerConfig) -> (Router, Arc<AppStateHandle>) {
    let metrics = Arc::new(Metrics::new());
    metrics.queue_capacity.set(config.scheduler.max_queue as i64);
    let scheduler = Scheduler::start(engine.clone(), config.scheduler, metrics.clone());
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let limit = config.body_limit;
    let cors = config.cors.clone();
    let state = Arc::new(AppState { engine, scheduler, metrics, config, created });
    let mut router = Router::new()
        .route("/", get(handlers::page))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .route("/v1/models", get(handlers::models))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| ApiError::status(500, "internal error while serving this request").into_response()))
        .with_state(state.clone());
    if let Some(origin) = cors {
        let layer = tower_http::cors::CorsLayer::new()
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
        let layer = if origin == "*" {
            layer.allow_origin(tower_http::cors::Any)
        } else {
            layer.allow_origin(origin.parse::<HeaderValue>().unwrap_or(HeaderValue::from_static("null")))
        };
        router = router.layer(layer);
    }
    (router, Arc::new(AppStateHandle(state)))
}

/// Lets the caller stop the scheduler after the HTTP side has stopped.
pub struct AppStateHandle(Arc<AppState>);

impl AppStateHandle {
    /// Waits for the running requests to finish, then stops the scheduler.
    pub fn shutdown(&self) {
        self.0.scheduler.shutdown();
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
}

/// Every path the server has, for the request counters.
const ENDPOINTS: [&str; 9] = ["/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];

/// The API's endpoints need the key; the public ones and unknown paths
/// (a 404 either way, such as a browser's `/favicon.ico`) do not.
fn needs_key(path: &str) -> bool {
    ENDPOINTS.contains(&path) && !openapi::PUBLIC.contains(&path)
}

/// The API key check, the request log line and the request counters.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = match &state.config.api_key {
        Some(key) if needs_key(&path) && method != Method::OPTIONS && !key_matches(&req, key) => {
            ApiError::status(401, "missing or wrong API key: send it as `Authorization: Bearer KEY`").into_response()
        }
        _ => next.run(req).await,
    };
    let status = response.status().as_u16();
    let endpoint = if ENDPOINTS.contains(&path.as_str()) { path.as_str() } else { "other" };
    state.metrics.request(endpoint, status);
    let tokens = response.headers().get("x-bitnet-tokens").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    match response.extensions().get::<ErrorNote>() {
        Some(ErrorNote(e)) => eprintln!("{method} {path} {status} tokens={tokens} {ms:.1}ms error: {e}"),
        None => eprintln!("{method} {path} {status} tokens={tokens} {ms:.1}ms"),
    }
    response
}

fn key_matches(req: &Request<Body>, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    // Constant time in the bytes compared (the length alone may show).
    given.as_bytes().ct_eq(key.as_bytes()).into()
}

/// Serves `front` on `listener` until SIGTERM or SIGINT, then takes no
/// new connections, lets running requests finish within `grace`, stops
/// the scheduler and returns. `ready` resolves once the model is loaded
/// (until then `front` answers 503); a failed load stops the server with
/// that error.
pub async fn serve<R>(listener: tokio::net::TcpListener, front: Router, ready: R, grace: Duration) -> std::io::Result<()>
where
    R: std::future::Future<Output = Result<Arc<AppStateHandle>, String>>,
{
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, front).with_graceful_shutdown(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    let mut task = tokio::spawn(std::future::IntoFuture::into_future(server));
    let mut signalled = std::pin::pin!(signal());
    let joined = |r: Result<std::io::Result<()>, tokio::task::JoinError>| r.map_err(std::io::Error::other).and_then(|r| r);
    let handle = tokio::select! {
        r = ready => match r {
            Ok(handle) => handle,
            Err(message) => {
                let _ = stop.send(true);
                let _ = task.await;
                return Err(std::io::Error::other(message));
            }
        },
        _ = &mut signalled => {
            eprintln!("stopping before the model finished loading");
            let _ = stop.send(true);
            return joined(task.await);
        }
        r = &mut task => return joined(r),
    };
    let result = tokio::select! {
        r = &mut task => joined(r),
        _ = &mut signalled => {
            eprintln!("stopping: no new connections; running requests have {:.0} s to finish", grace.as_secs_f64());
            let _ = stop.send(true);
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                eprintln!("the grace period is over; dropping what still runs");
                task.abort();
            }
            Ok(())
        }
    };
    let _ = tokio::task::spawn_blocking(move || handle.shutdown()).await;
    result
}

/// The router in front of the model: 503 (and `/health` says `loading`)
/// until the model's router is in `slot`, then that router.
fn front(slot: Arc<OnceLock<Router>>) -> Router {
    async fn dispatch(State(slot): State<Arc<OnceLock<Router>>>, req: Request) -> Response {
        match slot.get() {
            Some(router) => match tower::ServiceExt::oneshot(router.clone(), req).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
            None if req.uri().path() == "/health" => {
                let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "loading" }))).into_response();
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            None => {
                ApiError { code: Some("model_loading"), ..ApiError::status(503, "the model is still loading; /health says when it is ready") }.into_response()
            }
        }
    }
    Router::new().fallback(dispatch).with_state(slot)
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Binds `host:port` at once (so `/health` can answer 503 while the model
/// loads), loads the model with `load` on a thread of its own, prints the
/// address once it is ready, and serves it until SIGTERM or SIGINT (on a
/// runtime of its own, for callers without one).
pub fn run_blocking<F>(load: F, config: ServerConfig, host: &str, port: u16) -> std::io::Result<()>
where
    F: FnOnce() -> Result<Arc<Engine>, String> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("bitnet-http").build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind((host, port)).await.map_err(|e| std::io::Error::new(e.kind(), format!("listening on {host}:{port}: {e}")))?;
        let addr = listener.local_addr()?;
        eprintln!("loading the model; http://{addr}/health answers 503 until it is ready");
        let grace = config.grace;
        let slot = Arc::new(OnceLock::new());
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A plain thread: a signal during the load may end the process
        // without waiting for it.
        std::thread::Builder::new().name("bitnet-load".into()).spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|_| Err("loading the model panicked".into())));
        })?;
        let ready = {
            let slot = slot.clone();
            async move {
                let engine = rx.await.map_err(|_| "the loading thread stopped".to_string())??;
                let (router, handle) = app(engine, config);
                let _ = slot.set(router);
                eprintln!("listening on http://{addr}");
                Ok(handle)
            }
        };
        serve(listener, front(slot), ready, grace).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn fetch(router: &Router, path: &str) -> (u16, serde_json::Value) {
        let req = Request::get(path).body(Body::empty()).unwrap();
        let r = router.clone().oneshot(req).await.unwrap();
        let status = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn health_is_503_until_the_model_is_loaded_then_the_model_answers() {
        let slot = Arc::new(OnceLock::new());
        let f = front(slot.clone());
        assert_eq!(fetch(&f, "/health").await, (503, serde_json::json!({ "status": "loading" })));
        let (status, body) = fetch(&f, "/v1/models").await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "model_loading");
        let _ = slot.set(Router::new().route("/health", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) })));
        assert_eq!(fetch(&f, "/health").await, (200, serde_json::json!({ "status": "ok" })));
    }
}

//! bitnet-server: an OpenAI-compatible HTTP server over the runtime's
//! [`Engine`]. The HTTP side (axum on tokio) turns requests into prompts
//! and sampling settings; one scheduler thread steps every running
//! sequence together (continuous batching) and sends each request its
//! tokens over a channel; dropping the receiver (a client that went away)
//! cancels the request.

pub mod api;
mod handlers;
pub mod metrics;
pub mod scheduler;
pub mod stops;

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
use std::sync::Arc;
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
        r
    }
}

/// The router over an engine; the scheduler thread starts here.
pub fn app(engine: Arc<Engine>, config: ServerConfig) -> (Router, Arc<AppStateHandle>) {
    let metrics = Arc::new(Metrics::new());
    let scheduler = Scheduler::start(engine.clone(), config.scheduler, metrics.clone());
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let limit = config.body_limit;
    let cors = config.cors.clone();
    let state = Arc::new(AppState { engine, scheduler, metrics, config, created });
    let mut router = Router::new()
        .route("/", get(handlers::page))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::models))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| ApiError::status(500, "internal error while serving this request").into_response()))
        .with_state(state.clone());
    if let Some(origin) = cors {
        let layer = tower_http::cors::CorsLayer::new()
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
        let layer = if origin == "*" { layer.allow_origin(tower_http::cors::Any) } else { layer.allow_origin(origin.parse::<HeaderValue>().unwrap_or(HeaderValue::from_static("null"))) };
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

/// The paths that need no key: the page, health and metrics.
fn public(path: &str) -> bool {
    matches!(path, "/" | "/health" | "/metrics")
}

/// The API key check, the request log line and the request counters.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = match &state.config.api_key {
        Some(key) if !public(&path) && method != Method::OPTIONS && !key_matches(&req, key) => {
            ApiError::status(401, "missing or wrong API key: send it as `Authorization: Bearer KEY`").into_response()
        }
        _ => next.run(req).await,
    };
    let status = response.status().as_u16();
    let known = ["/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];
    let endpoint = if known.contains(&path.as_str()) { path.as_str() } else { "other" };
    state.metrics.request(endpoint, status);
    let tokens = response.headers().get("x-bitnet-tokens").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    eprintln!("{method} {path} {status} tokens={tokens} {:.1}ms", t0.elapsed().as_secs_f64() * 1e3);
    response
}

fn key_matches(req: &Request<Body>, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    // Constant time in the bytes compared (the length alone may show).
    given.as_bytes().ct_eq(key.as_bytes()).into()
}

/// Serves `router` on `listener` until SIGTERM or SIGINT, then takes no
/// new connections, lets running requests finish within `grace`, stops
/// the scheduler and returns.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, handle: Arc<AppStateHandle>, grace: Duration) -> std::io::Result<()> {
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    let mut task = tokio::spawn(std::future::IntoFuture::into_future(server));
    let result = tokio::select! {
        r = &mut task => r.map_err(std::io::Error::other).and_then(|r| r),
        _ = signal() => {
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

/// Binds `host:port`, prints the address, and serves `engine` until
/// SIGTERM or SIGINT (on a runtime of its own, for callers without one).
pub fn run_blocking(engine: Arc<Engine>, config: ServerConfig, host: &str, port: u16) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("bitnet-http").build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port)).await.map_err(|e| std::io::Error::new(e.kind(), format!("listening on {host}:{port}: {e}")))?;
        let addr = listener.local_addr()?;
        let grace = config.grace;
        let (router, handle) = app(engine, config);
        eprintln!("listening on http://{addr}");
        serve(listener, router, handle, grace).await
    })
}

//! The ingest HTTP API: routes, shared state, health and metrics endpoints.

pub mod batch;
pub mod error;
pub mod server;
pub mod telemetry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use contract::problem::{Problem, ProblemKind};
use contract::reading::TimeBounds;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{Grant, Tokens};
use crate::limits::{BodyBudget, DeviceLimiter};
use crate::store::Store;
use error::{problem_response, ApiError};

/// What became of a reading, as `ingest_readings_total{outcome}` counts it: accepted,
/// replayed (the same key and reading again), conflict (the key reused for another
/// reading) or rejected (invalid, or its key in use by a request still in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadingOutcome {
    Accepted,
    Replayed,
    Conflict,
    Rejected,
}

impl ReadingOutcome {
    /// Every outcome, each served at 0 from the start (alerts and dashboard read them).
    pub const ALL: [Self; 4] = [
        Self::Accepted,
        Self::Replayed,
        Self::Conflict,
        Self::Rejected,
    ];

    /// Adds `readings` to this outcome's count.
    pub fn count(self, readings: u64) {
        let outcome = match self {
            Self::Accepted => "accepted",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Rejected => "rejected",
        };
        metrics::counter!("ingest_readings_total", "outcome" => outcome).increment(readings);
    }
}

/// What every request handler may use.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub pool: Pool,
    pub metrics: PrometheusHandle,
    pub time_bounds: TimeBounds,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub request_timeout: Duration,
    pub limiter: Arc<DeviceLimiter>,
    /// The bytes of request bodies held at once, across every request.
    pub body_budget: Arc<BodyBudget>,
    /// `None` when authentication is off.
    pub tokens: Option<Arc<Tokens>>,
    /// Set once the migrations have run: until then PostgreSQL has not answered since
    /// the start, readings get a 503 and `/readyz` names PostgreSQL.
    pub schema_ready: Arc<AtomicBool>,
}

impl AppState {
    /// The request's grant; `None` when authentication is off.
    pub async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<Option<Grant>, ApiError> {
        match &self.tokens {
            None => Ok(None),
            Some(tokens) => Ok(Some(tokens.verify(headers).await?)),
        }
    }
}

/// Where readings are posted: `/v1/telemetry` and every path under it. The group
/// commit's pacing counts the connections that posted here (`server::OpenConnections`).
pub const READINGS_PATH: &str = "/v1/telemetry";

/// The whole ingest API; tests drive it over a real listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(READINGS_PATH, post(telemetry::post_telemetry))
        .route(&format!("{READINGS_PATH}/batch"), post(batch::post_batch))
        .route_layer(middleware::from_fn_with_state(
            state.schema_ready.clone(),
            require_schema,
        ))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Refuses readings with a 503 until the migrations have run: nothing can be stored
/// before, and the devices retry.
async fn require_schema(
    State(schema_ready): State<Arc<AtomicBool>>,
    request: Request,
    next: Next,
) -> Response {
    if !schema_ready.load(Ordering::Acquire) {
        return ApiError::Unavailable(
            "the database has not answered since ingest started; retry shortly",
        )
        .into_response();
    }
    next.run(request).await
}

/// Counts every request by route and status and times it.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The OpenAPI document of the ingest and query APIs.
pub async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], contract::OPENAPI)
}

pub async fn healthz() -> &'static str {
    "ok"
}

/// The admin port of a process without a public API (the relay, the projector):
/// `/healthz`, `/readyz` answered by `readyz`, and `/metrics` rendered from `metrics`.
pub fn admin_router<H, T>(readyz: H, metrics: PrometheusHandle) -> Router
where
    H: Handler<T, ()>,
    T: 'static,
{
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics_answer(&metrics))),
        )
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// The `/readyz` answer for named dependency checks: 200 with every check, or a 503
/// problem naming the ones that do not answer (API.md §7).
pub fn readiness(checks: &[(&str, bool)]) -> Response {
    let down: Vec<&str> = checks
        .iter()
        .filter(|(_, up)| !up)
        .map(|(name, _)| *name)
        .collect();
    if down.is_empty() {
        let checks: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(name, _)| ((*name).to_owned(), "ok".into()))
            .collect();
        return Json(serde_json::json!({"status": "ready", "checks": checks})).into_response();
    }
    problem_response(&Problem::new(
        ProblemKind::Unavailable,
        format!("not answering: {}", down.join(", ")),
    ))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let postgres =
        state.schema_ready.load(Ordering::Acquire) && postgres_ready(&state.pool).await.is_ok();
    readiness(&[("postgres", postgres)])
}

/// [`postgres_ready`], once the schema holds every migration this build knows
/// (`schema_migrations`), within a second: a relay newer than the schema fails every
/// claim. Once seen so, `current` remembers it (migrations are never undone), and the
/// check is the `SELECT 1` again.
pub async fn postgres_and_schema_ready(pool: &Pool, current: &AtomicBool) -> Result<(), ()> {
    if current.load(Ordering::Acquire) {
        return postgres_ready(pool).await;
    }
    let newest = crate::db::newest_migration();
    let holds: bool = within_a_second(pool, "schema check", async |client| {
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)",
                &[&newest],
            )
            .await?
            .try_get(0)
    })
    .await?;
    if !holds {
        return Err(());
    }
    current.store(true, Ordering::Release);
    Ok(())
}

/// `SELECT 1` through the pool within a second.
pub async fn postgres_ready(pool: &Pool) -> Result<(), ()> {
    within_a_second(pool, "readiness check", async |client| {
        client.simple_query("SELECT 1").await.map(drop)
    })
    .await
}

/// `statements` on a pooled connection ([`crate::db::on_pooled`]) within a second:
/// given up on, a statement is cancelled and its connection leaves the pool, so the
/// next commit or claim does not queue behind it.
async fn within_a_second<T>(
    pool: &Pool,
    what: &'static str,
    statements: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
) -> Result<T, ()> {
    match tokio::time::timeout(
        Duration::from_secs(1),
        crate::db::on_pooled(pool, what, statements),
    )
    .await
    {
        Ok(Ok(answer)) => Ok(answer),
        _ => Err(()),
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    metrics::gauge!("ingest_body_bytes_held").set(state.body_budget.held() as f64);
    metrics_answer(&state.metrics)
}

/// Every process's `/metrics` answer: Prometheus's text exposition format, named as
/// such (the admin ports once answered a bare `text/plain`).
pub fn metrics_answer(metrics: &PrometheusHandle) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

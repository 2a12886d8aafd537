//! The query HTTP API: routes, state, health and metrics endpoints.

pub mod devices;
pub mod error;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::read_model::{AnswerCache, ReadModel};
use error::ApiError;
use ingest::auth::{Grant, Tokens};
use ingest::http::{postgres_ready, readiness};

#[derive(Clone)]
pub struct AppState {
    pub read_model: ReadModel,
    /// Rendered stats documents, served again while their device did not change.
    pub documents: Arc<AnswerCache<bytes::Bytes>>,
    pub metrics: PrometheusHandle,
    /// `None` when authentication is off.
    pub tokens: Option<Arc<Tokens>>,
    /// Longest time an API request may take, its token look-up included
    /// (`query.request_timeout_ms`).
    pub request_timeout: Duration,
    /// How far ahead of now a reading may be dated (`ingest.max_future_secs`), in ms: a
    /// series reads no bucket past now plus this, since none can hold a reading.
    pub max_future_ms: i64,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{device_id}/stats", get(devices::stats))
        .route("/v1/devices/{device_id}/series", get(devices::series))
        .route_layer(middleware::from_fn_with_state(state.clone(), api_request));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(ingest::http::openapi))
        .fallback(|| async { ApiError::NoSuchRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(ingest::http::track))
        .with_state(state)
}

/// Every API request, from its read token's check to its last Redis read, within
/// `query.request_timeout_ms`: past it the client gets a `503 unavailable` with
/// `Retry-After` instead of waiting as long as PostgreSQL does (a migration or a
/// `VACUUM FULL` holding `api_tokens`, a server that stopped answering). The work given
/// up is dropped; a token look-up dropped half-way cancels its query (`ingest::auth`).
///
/// The deadline shares this middleware with the token check rather than adding a layer
/// over every route: such a layer cost `/stats` 9% of its requests a second (80k against
/// 88k on 2 cores, 64 clients, 2026-12-05); folded in here it measured within the noise
/// (about 1%). The timer is only registered when a request has to wait, never for a
/// cached answer. `/healthz`, `/readyz` and `/metrics` stay outside it, each bounded on
/// its own (an answer at once, checks of at most a second, a render from memory): no
/// probe is refused by the deadline, and `/readyz` keeps naming the dependency that
/// does not answer.
async fn api_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let answer = async {
        if let Err(refused) = require_read_token(state.tokens.as_deref(), request.headers()).await {
            return refused.into_response();
        }
        next.run(request).await
    };
    tokio::time::timeout(state.request_timeout, answer)
        .await
        .unwrap_or_else(|_elapsed| ApiError::DeadlinePassed.into_response())
}

/// With authentication on, the API needs a read token (device and gateway tokens may
/// only post).
async fn require_read_token(tokens: Option<&Tokens>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(tokens) = tokens else {
        return Ok(());
    };
    match tokens.verify(headers).await {
        Ok(Grant::Read) => Ok(()),
        Ok(_) => Err(ApiError::Forbidden),
        Err(error) => Err(ApiError::from(error)),
    }
}

/// Redis, and PostgreSQL too while authentication is on (read tokens live there): 200
/// with each check, or a 503 naming those that do not answer (API.md §7).
async fn readyz(State(state): State<AppState>) -> Response {
    let redis = async {
        let ping = tokio::time::timeout(Duration::from_secs(1), state.read_model.ping()).await;
        matches!(ping, Ok(Ok(())))
    };
    match &state.tokens {
        None => readiness(&[("redis", redis.await)]),
        Some(tokens) => {
            let (redis, postgres) = tokio::join!(redis, postgres_ready(tokens.pool()));
            readiness(&[("redis", redis), ("postgres", postgres.is_ok())])
        }
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    ingest::http::metrics_answer(&state.metrics)
}

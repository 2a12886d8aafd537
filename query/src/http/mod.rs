//! The query HTTP API: routes, state, health and metrics endpoints.

pub mod devices;
pub mod error;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
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
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{device_id}/stats", get(devices::stats))
        .route("/v1/devices/{device_id}/series", get(devices::series))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_read_token,
        ));
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

/// With authentication on, the API needs a read token (device and gateway tokens may
/// only post).
async fn require_read_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(tokens) = &state.tokens {
        match tokens.verify(request.headers()).await {
            Ok(Grant::Read) => {}
            Ok(_) => return ApiError::Forbidden.into_response(),
            Err(error) => return ApiError::from(error).into_response(),
        }
    }
    next.run(request).await
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

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

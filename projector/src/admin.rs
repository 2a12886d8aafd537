//! The projector's admin port: health, readiness, Prometheus metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use contract::problem::{Problem, ProblemKind, CONTENT_TYPE};
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
pub struct Admin {
    pub nats: async_nats::Client,
    pub redis: redis::Client,
    pub metrics: PrometheusHandle,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(admin): State<Admin>| async move { admin.metrics.render() }),
        )
        .with_state(admin)
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let nats = admin.nats.connection_state() == async_nats::connection::State::Connected;
    let redis = redis_answers(&admin.redis).await;
    let checks = serde_json::json!({
        "nats": if nats { "ok" } else { "down" },
        "redis": if redis { "ok" } else { "down" },
    });
    if nats && redis {
        return Json(serde_json::json!({"status": "ready", "checks": checks})).into_response();
    }
    let down: Vec<&str> = [("nats", nats), ("redis", redis)]
        .into_iter()
        .filter(|(_, up)| !up)
        .map(|(name, _)| name)
        .collect();
    let problem = Problem::new(
        ProblemKind::Unavailable,
        format!("not answering: {}", down.join(", ")),
    );
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::to_vec(&problem).unwrap_or_default(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

async fn redis_answers(client: &redis::Client) -> bool {
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Some(_))
    )
}

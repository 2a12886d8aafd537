//! The projector's admin port: health, readiness, Prometheus metrics.

use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use ingest::http::readiness;
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
    readiness(&[("nats", nats), ("redis", redis)])
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

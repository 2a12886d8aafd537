//! The projector's admin port: health, readiness (NATS and Redis), Prometheus metrics.

use std::time::Duration;

use axum::Router;
use ingest::bootstrap::nats_connected;
use ingest::http::readiness;
use metrics_exporter_prometheus::PrometheusHandle;

/// `/healthz`, `/readyz` and `/metrics` ([`ingest::http::admin_router`]).
pub fn router(nats: async_nats::Client, redis: redis::Client, metrics: PrometheusHandle) -> Router {
    let readyz = move || {
        let (nats, redis) = (nats.clone(), redis.clone());
        async move {
            let redis = redis_answers(&redis).await;
            readiness(&[("nats", nats_connected(&nats)), ("redis", redis)])
        }
    };
    ingest::http::admin_router(readyz, metrics)
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

//! The projector's admin port: health, readiness (NATS with JetStream, and Redis),
//! Prometheus metrics.

use std::time::Duration;

use axum::Router;
use ingest::bootstrap::jetstream_answers;
use ingest::http::readiness;
use metrics_exporter_prometheus::PrometheusHandle;

/// `/healthz`, `/readyz` and `/metrics` ([`ingest::http::admin_router`]).
pub fn router(nats: async_nats::Client, redis: redis::Client, metrics: PrometheusHandle) -> Router {
    let jetstream = async_nats::jetstream::new(nats);
    let readyz = move || {
        let (jetstream, redis) = (jetstream.clone(), redis.clone());
        async move {
            let (nats, redis) = tokio::join!(jetstream_answers(&jetstream), redis_answers(&redis));
            readiness(&[("nats", nats), ("redis", redis)])
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

//! The projector's admin port: health, readiness (NATS with JetStream, and Redis),
//! Prometheus metrics.

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
            let (nats, redis) = tokio::join!(jetstream_answers(nats), redis_answers(&redis));
            readiness(&[("nats", nats), ("redis", redis)])
        }
    };
    ingest::http::admin_router(readyz, metrics)
}

/// Connected, and JetStream answers within a second: a NATS server started without
/// JetStream (`-js`) takes the connection but can deliver nothing.
async fn jetstream_answers(nats: async_nats::Client) -> bool {
    if !nats_connected(&nats) {
        return false;
    }
    // The account's JetStream information, read as plain JSON: async-nats's own
    // `query_account` expects fields nats-server 2.9 does not send (`reserved_memory`).
    // A server without JetStream has no responder; one that refuses answers an `error`.
    let jetstream = async_nats::jetstream::new(nats);
    let empty = serde_json::json!({});
    let info = jetstream.request::<_, _, serde_json::Value>("INFO", &empty);
    match tokio::time::timeout(Duration::from_secs(1), info).await {
        Ok(Ok(answer)) => answer.get("error").is_none(),
        _ => false,
    }
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

//! The query service: a thin, read-only HTTP API over the Redis read model.
//!
//! It never writes; the projector owns every key it reads (see
//! `contract::read_model` for the layout).
//!
//! # Layout
//! - [`http`]: routes, the device endpoints, problem+json errors, health and metrics.
//! - [`read_model`]: reading the live generation, a device, its buckets, the index.
//! - [`tracking`]: validity reads kept in the process until Redis pushes that they
//!   changed.

pub mod http;
pub mod read_model;
pub mod tracking;

use std::sync::Arc;

use anyhow::Context;
use contract::settings::{unusable_url, Settings};
use ingest::redis_connection::RedisConnection;
use redis::aio::ConnectionManagerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the query API on `listener` until `shutdown`.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate()?;
    let metrics = ingest::bootstrap::install_metrics();
    ingest::bootstrap::counters_from_zero(&[("auth_token_lookups_total", &[])]);
    let info = redis::IntoConnectionInfo::into_connection_info(settings.redis.url.as_str())
        .with_context(|| unusable_url("redis.url", &settings.redis.url))?;
    // RESP3, for the invalidation pushes that keep validity reads fresh (`tracking`).
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(resp3))?;
    let tracked = Arc::new(tracking::TrackedReads::new(&settings.redis.prefix));
    let pushes = tracked.clone();
    // Connects lazily and reconnects by itself, so the API starts (and answers 503)
    // while Redis is down. A reconnect's `Disconnection` push empties `tracked`.
    let config = ConnectionManagerConfig::new()
        .set_push_sender(move |push: redis::PushInfo| {
            pushes.handle_push(&push);
            Ok::<(), std::convert::Infallible>(())
        })
        .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
        .set_response_timeout(Some(std::time::Duration::from_secs(1)))
        // Fail fast while Redis is down: a request answers 503 within about a second
        // instead of waiting through the default reconnect backoff.
        .set_number_of_retries(1)
        .set_max_delay(std::time::Duration::from_millis(200));
    let redis = RedisConnection::new_lazy(client, config)
        .context("creating the redis connection manager")?;
    // Read tokens live in PostgreSQL, in the table the ingest migrations create.
    let tokens = if settings.auth.enabled {
        let pool = ingest::db::pool(&settings.database)?;
        let ttl = std::time::Duration::from_secs(settings.auth.cache_ttl_secs);
        Some(std::sync::Arc::new(ingest::auth::Tokens::new(
            ingest::db::LookUps::new(pool, 0),
            ttl,
        )))
    } else {
        None
    };
    let state = http::AppState {
        read_model: read_model::ReadModel::tracked(redis, settings.redis.prefix.clone(), tracked),
        documents: Default::default(),
        metrics,
        tokens,
        request_timeout: settings.query_request_timeout(),
        // At most 100 years (the settings' bound on every duration): no overflow.
        max_future_ms: settings.ingest.max_future_secs as i64 * 1_000,
    };
    tracing::info!(address = %listener.local_addr()?, "query listening");
    let limits = ingest::connection_limits(&settings);
    ingest::http::server::serve(listener, http::router(state), limits, shutdown).await;
    tracing::info!("query stopped");
    Ok(())
}

//! The projector: keeps the per-device read model in Redis from the JetStream stream.
//!
//! It reads the durable pull consumer in batches, applies each batch to Redis with one
//! Lua script call per device (in one pipeline), and acks only after Redis confirmed.
//! The script remembers applied event ids for a bounded horizon and skips them, so a
//! redelivery, a relay republish or a second projector never counts an event twice.
//! Messages that cannot be decoded, or carry an unknown version, go to the DLQ stream
//! and are terminated.
//!
//! # Layout
//! - [`consumer`]: the consume loop, acking and dead-lettering.
//! - [`apply`]: grouping a batch by device and calling `apply.lua`.
//! - [`dlq`]: building dead letters (headers made safe, a stripped copy when the DLQ
//!   stream refuses the full one), and listing and re-driving them (`projector dlq`).
//! - [`eviction`]: whether Redis may evict the read model's keys.
//! - [`rebuild`]: generations, `projector rebuild`, and healing a lost read model.
//! - [`restart`]: whether Redis restarted with a read model loaded from its files.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on the admin port.
//! - `lock`: expiring locks in Redis (the rebuild's, the consumer repair's).
//! - `pull`: the consumer's pull requests, sent by the projector itself so a stop hands
//!   back what it fetched.

pub mod admin;
pub mod apply;
pub mod consumer;
pub mod dlq;
pub mod eviction;
mod lock;
mod pull;
pub mod rebuild;
pub mod restart;

use std::time::Duration;

use anyhow::Context;
use contract::settings::{connecting_to, unusable_url, Settings};
use ingest::redis_connection::RedisConnection;
use redis::aio::ConnectionManagerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::consumer::Projector;

/// A rebuild of the configured read model, for `projector rebuild`.
pub async fn connect_rebuild(settings: &Settings) -> anyhow::Result<rebuild::Rebuild> {
    settings.validate()?;
    let nats = ingest::bootstrap::nats_options(&settings.nats.url)
        .name("projector-rebuild")
        .connection_timeout(Duration::from_secs(5))
        .connect(&settings.nats.url)
        .await
        .with_context(|| connecting_to("NATS", &settings.nats.url))?;
    let mut redis = redis_connection(settings)?;
    let () = redis::cmd("PING")
        .query_async(&mut redis)
        .await
        .with_context(|| connecting_to("Redis", &settings.redis.url))?;
    Ok(Projector::new(settings, nats, redis).rebuild())
}

/// The Redis client of the configured URL; it connects only when used.
fn redis_client(settings: &Settings) -> anyhow::Result<redis::Client> {
    redis::Client::open(settings.redis.url.as_str())
        .with_context(|| unusable_url("redis.url", &settings.redis.url))
}

/// The projector's Redis connection, for `projector run` and `projector rebuild` alike:
/// it connects lazily and reconnects by itself (a failed apply is retried with
/// backoff), and waits up to 5 s for a reply. Until 2026-12-07 `projector rebuild` had
/// redis-rs's default of 500 ms, and one slow reply (a fork for a save, a large
/// pipeline) failed a replay minutes long.
fn redis_connection(settings: &Settings) -> anyhow::Result<RedisConnection> {
    RedisConnection::new_lazy(
        redis_client(settings)?,
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500)),
    )
    .context("creating the redis connection manager")
}

/// Runs a projector and its admin server until `shutdown`.
pub async fn run(
    settings: Settings,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate()?;
    let metrics = ingest::bootstrap::install_metrics();
    ingest::bootstrap::counters_from_zero(&[
        ("projector_events_applied_total", &[]),
        ("projector_duplicates_skipped_total", &[]),
        ("projector_errors_total", &[]),
        ("projector_consumer_recreated_total", &[]),
        ("projector_redelivered_total", &[]),
        ("projector_events_given_up_total", &[]),
        ("projector_redis_reloads_total", &[]),
        ("projector_rebuilds_short_of_history_total", &[]),
    ]);
    for reason in dlq::Reason::labels() {
        consumer::count_dead_letters(reason, 0);
    }
    let nats = ingest::bootstrap::connect_nats(&settings.nats.url, "projector").await?;
    let redis_client = redis_client(&settings)?;
    tracing::info!(address = %admin_listener.local_addr()?, "projector admin listening");
    // Everything stops with the projector, also when it stops by itself: a durable
    // consumer it cannot give the configured ack wait.
    let shutdown = shutdown.child_token();
    let admin_server = tokio::spawn(ingest::http::server::serve(
        admin_listener,
        admin::router(nats.clone(), redis_client.clone(), metrics),
        ingest::connection_limits(&settings),
        shutdown.clone(),
    ));
    let redis = redis_connection(&settings)?;
    let mut projector = Projector::new(&settings, nats, redis);
    let mut supervisor = tokio::spawn(consumer::supervise(projector.rebuild(), shutdown.clone()));
    let consumed = projector.run(shutdown.clone()).await;
    shutdown.cancel();
    // The supervisor may be inside a Redis call that waits for a dead server.
    if tokio::time::timeout(Duration::from_secs(1), &mut supervisor)
        .await
        .is_err()
    {
        supervisor.abort();
    }
    let rebuild = projector.rebuild();
    if tokio::time::timeout(Duration::from_secs(1), consumer::take_anchor(&rebuild))
        .await
        .is_err()
    {
        tracing::debug!("the last look at the consumer timed out");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_server).await;
    tracing::info!("projector stopped");
    consumed
}

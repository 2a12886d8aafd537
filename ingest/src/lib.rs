//! The write side of the pipeline: HTTP ingest into PostgreSQL and the outbox relay.
//!
//! Two binaries share this library: `ingest` (the HTTP API, and `ingest migrate`) and
//! `relay` (publishes outbox rows to JetStream). Both are stateless; any number of
//! copies may run against the same database.
//!
//! # Layout
//! - [`db`]: connection pool and schema migrations (`migrations/*.sql`).
//! - [`store`]: the group-committed write of reading, idempotency key and outbox row.
//! - [`outbox_notify`]: the `NOTIFY outbox` that wakes the relays after a commit.
//! - [`pacing`]: spaces NOTIFYs and relay rounds out under load when so configured.
//! - [`http`]: routes, the telemetry and batch handlers, problem+json errors, health, metrics.
//! - [`limits`]: the per-device rate limit.
//! - [`auth`]: bearer tokens (device, gateway, read), issued and verified.
//! - [`relay`]: claims outbox rows, publishes them with pipelined acks, marks them;
//!   [`relay::serve`] is the `relay` binary with its admin port.
//! - [`bootstrap`]: logs, metrics recorder, signal handling and listeners of both binaries
//!   (the projector and query use it too), and the NATS connection.
//! - [`redis_connection`]: the projector's and query's Redis connection, which logs in
//!   again after a refused login.

pub mod auth;
pub mod bootstrap;
pub mod db;
pub mod http;
pub mod limits;
pub mod outbox_notify;
pub mod pacing;
pub mod redis_connection;
pub mod relay;
pub mod store;
pub mod sync;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use contract::reading::TimeBounds;
use contract::settings::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::{GroupCommit, Store};

/// Runs the ingest API on `listener` until `shutdown` is cancelled, then answers the
/// requests in flight (their commits included) and returns. It answers from the start;
/// readings wait for the migrations, which retry until PostgreSQL answers.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate_for_ingest()?;
    let metrics = bootstrap::install_metrics();
    for outcome in http::ReadingOutcome::ALL {
        outcome.count(0);
    }
    bootstrap::counters_from_zero(&[
        ("ingest_outbox_notify_total", &[]),
        ("ingest_body_budget_refusals_total", &[]),
        ("ingest_commits_given_up_total", &[]),
        ("auth_token_lookups_total", &[]),
    ]);
    // The API answers from the start: `/healthz` at once, `/readyz` (a 503 naming
    // PostgreSQL) and readings (a 503) until the migrations ran.
    let schema_ready = Arc::new(AtomicBool::new(false));
    let migrations = tokio::spawn({
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        let schema_ready = schema_ready.clone();
        async move {
            if migrate_with_retry(&settings, &shutdown).await {
                schema_ready.store(true, Ordering::Release);
                tracing::info!("migrations applied, accepting readings");
            }
        }
    });
    let pool = db::pool(&settings.database)?;
    let notifier = outbox_notify::Notifier::new(
        db::pg_config(&settings.database)?,
        Duration::from_millis(settings.database.connect_timeout_ms),
    )
    .paced(Duration::from_millis(settings.ingest.notify_interval_ms));
    // The connections readings come from: a paced group commit starts at once when
    // every one of them has its request in it.
    let open_connections = http::server::OpenConnections::new(http::READINGS_PATH);
    let (store, dispatcher) = Store::start(
        pool.clone(),
        GroupCommit {
            batch_max: settings.ingest.commit_batch_max,
            concurrency: settings.ingest.commit_concurrency,
            parallel_min: settings.ingest.commit_parallel_min,
            queue_capacity: settings.ingest.queue_capacity,
            interval: Duration::from_millis(settings.ingest.commit_interval_ms),
        },
        Some(notifier),
        Some(open_connections.clone()),
    );
    // Token look-ups share the pool with the group commit and leave it its connections.
    let tokens = settings.auth.enabled.then(|| {
        Arc::new(auth::Tokens::new(
            store.look_ups().clone(),
            Duration::from_secs(settings.auth.cache_ttl_secs),
        ))
    });
    let state = http::AppState {
        store,
        pool: pool.clone(),
        metrics,
        time_bounds: TimeBounds {
            max_future: time::Duration::seconds(settings.ingest.max_future_secs as i64),
            max_age: time::Duration::seconds(settings.ingest.max_age_secs as i64),
        },
        max_body_bytes: settings.ingest.max_body_bytes,
        max_batch_body_bytes: settings.ingest.max_batch_body_bytes,
        body_budget: Arc::new(limits::BodyBudget::new(settings.ingest.max_body_bytes_held)),
        request_timeout: settings.request_timeout(),
        tokens,
        schema_ready,
        limiter: Arc::new(limits::DeviceLimiter::new(
            settings.ingest.rate_limit_per_second,
            settings.ingest.rate_limit_burst,
        )),
    };
    let limiter = state.limiter.clone();
    let pruner = tokio::spawn(async move {
        let every = limiter.forget_every();
        loop {
            tokio::time::sleep(every).await;
            limiter.forget_idle();
        }
    });
    tracing::info!(address = %listener.local_addr()?, "ingest listening");
    http::server::serve_counted(
        listener,
        http::router(state),
        connection_limits(&settings),
        Some(open_connections),
        shutdown,
    )
    .await;
    // Every request has been answered and every Store handle dropped: the dispatcher
    // finishes its last commits and ends.
    pruner.abort();
    // Stopped while PostgreSQL had not answered yet, it ends as the shutdown came.
    let _ = migrations.await;
    let _ = tokio::time::timeout(settings.shutdown_grace(), dispatcher).await;
    tracing::info!("ingest stopped");
    Ok(())
}

/// The connection limits of the `[http]` settings.
pub fn connection_limits(settings: &Settings) -> http::server::ConnectionLimits {
    http::server::ConnectionLimits {
        header_read_timeout: Duration::from_millis(settings.http.header_read_timeout_ms),
        max_header_bytes: settings.http.max_header_bytes,
        max_connections: settings.http.max_connections,
    }
}

/// Applies migrations, retrying while PostgreSQL is not reachable yet; `false` when
/// `shutdown` came first.
async fn migrate_with_retry(settings: &Settings, shutdown: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(200);
    loop {
        let migrated = tokio::select! {
            _ = shutdown.cancelled() => return false,
            migrated = db::migrate(&settings.database) => migrated,
        };
        match migrated {
            Ok(()) => return true,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "migrations failed, retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

//! `relay`: publishes the outbox to JetStream; health and metrics on its admin port.

use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use contract::settings::Settings;
use ingest::bootstrap;
use ingest::http::{healthz, postgres_ready, readiness};
use ingest::relay::Relay;
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
struct Admin {
    pool: deadpool_postgres::Pool,
    nats: async_nats::Client,
    metrics: PrometheusHandle,
}

/// One thread: the process is a pipeline of awaits whose CPU fits in one core, and on a
/// small box a single-threaded runtime spares it the cross-thread wake-ups (measured in
/// PERFORMANCE.md). More throughput comes from more copies of the process.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("relay: {error}");
        std::process::exit(2);
    });
    bootstrap::init_tracing(&settings.log);
    let shutdown = bootstrap::shutdown_on_signal();
    let metrics = bootstrap::install_metrics();
    let relay = Relay::connect(&settings, "relay").await?;
    let admin = Admin {
        pool: relay.pool().clone(),
        nats: relay.nats(),
        metrics,
    };
    let listener = bootstrap::listen(settings.relay.admin_listen, &settings.http)?;
    tracing::info!(address = %listener.local_addr()?, "relay admin listening");
    let admin_router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(admin): State<Admin>| async move { admin.metrics.render() }),
        )
        .with_state(admin);
    let admin_server = tokio::spawn(ingest::http::server::serve(
        listener,
        admin_router,
        ingest::connection_limits(&settings),
        shutdown.clone(),
    ));
    relay.run(shutdown).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_server).await;
    tracing::info!("relay stopped");
    Ok(())
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let postgres = postgres_ready(&admin.pool).await.is_ok();
    let nats = admin.nats.connection_state() == async_nats::connection::State::Connected;
    readiness(&[("postgres", postgres), ("nats", nats)])
}

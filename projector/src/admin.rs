//! The projector's admin port: health, readiness, Prometheus metrics; and its bootstrap.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use contract::problem::{Problem, ProblemKind, CONTENT_TYPE};
use contract::settings::{LogFormat, LogSettings};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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

/// JSON logs in production, human-readable ones in development.
pub fn init_tracing(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the process-wide Prometheus recorder (or a private one if taken).
pub fn install_metrics() -> PrometheusHandle {
    const SECONDS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let builder = || {
        PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
                SECONDS,
            )
            .unwrap_or_else(|_| PrometheusBuilder::new())
    };
    builder()
        .install_recorder()
        .unwrap_or_else(|_| builder().build_recorder().handle())
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut terminate), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested, draining");
        cancel.cancel();
    });
    token
}

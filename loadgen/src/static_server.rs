//! The "static HTTP response" limits: a minimal axum server answering every
//! `POST /v1/telemetry` with a fixed `202` JSON body, and every
//! `GET /v1/devices/{id}/stats` with a fixed `200` document the size of a real one, on
//! its own runtime with a worker a core (as ingest and query have, with
//! `#[tokio::main]`), driven by the very same client code as ingest and query.

use std::net::SocketAddr;

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use tokio::sync::oneshot;

/// The answer, the size of a real `202`.
const BODY: &str = r#"{"event_id":"01936a4e-5f2b-7c3d-9e8f-0123456789ab","device_id":"bench-dev-42","status":"accepted"}"#;

/// A running static server; stops when dropped.
pub struct StaticServer {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StaticServer {
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |cores| cores.get()))
            .thread_name("static-server")
            .enable_all()
            .build()
            .context("building the server runtime")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = Router::new()
                    .route("/v1/telemetry", post(answer))
                    .route("/v1/devices/{device}/stats", get(stats));
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Ok(Self {
            address,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A `/stats` document of a device with three metrics (as `loadgen` posts them), each
/// with its five windows: the size of query's answer to the bench's reads.
fn stats_document() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let aggregate = r#"{"count":6,"avg":21.4,"min":21.0,"max":21.9}"#;
        let windows: Vec<String> = ["1m", "5m", "15m", "1h", "24h"]
            .iter()
            .map(|window| format!(r#""{window}":{aggregate}"#))
            .collect();
        let metrics: Vec<String> = ["temperature", "humidity", "pressure"]
            .iter()
            .map(|name| {
                format!(
                    r#""{name}":{{"last":21.5,"last_recorded_at":"2026-12-06T01:15:30.250Z","min":-3.5,"max":38.25,"avg":20.125,"count":1204,"windows":{{{}}}}}"#,
                    windows.join(",")
                )
            })
            .collect();
        format!(
            r#"{{"device_id":"bench-dev-42","last_seen":"2026-12-06T01:15:30.250Z","sample_count":1204,"metrics":{{{}}}}}"#,
            metrics.join(",")
        )
    })
}

/// Answers a `/stats` read with the fixed document.
async fn stats() -> (
    StatusCode,
    [(header::HeaderName, &'static str); 1],
    &'static str,
) {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        stats_document(),
    )
}

/// Reads the body (as ingest must) and answers the fixed `202`.
async fn answer(
    _body: Bytes,
) -> (
    StatusCode,
    [(header::HeaderName, &'static str); 1],
    &'static str,
) {
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        BODY,
    )
}

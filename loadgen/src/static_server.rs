//! The "static HTTP response" limit: a minimal axum server answering every
//! `POST /v1/telemetry` with a fixed `202` JSON body, on its own 2-thread runtime (as a
//! separate server process would have), driven by the very same client code.

use std::net::SocketAddr;

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::routing::post;
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
            .worker_threads(2)
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
                let app = Router::new().route("/v1/telemetry", post(answer));
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

//! The count of open connections that posted readings, which the paced group commit
//! reads (`ingest::http::server::OpenConnections`), over real TCP connections.

use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use ingest::http::server::{serve_counted, OpenConnections};
use testkit::Running;
use tokio::net::{TcpListener, TcpStream};

/// Sends one request and reads its answer, a 200.
async fn exchange(stream: &mut TcpStream, request: &str) {
    crate::raw_http::exchange(stream, request).await.assert_ok();
}

#[tokio::test]
async fn a_connection_counts_from_its_first_request_under_the_prefix_until_it_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let router = Router::new()
        .route("/v1/telemetry", post(|| async { "accepted" }))
        .route("/metrics", get(|| async { "" }));
    let open = OpenConnections::new("/v1/telemetry");
    let limits = ingest::connection_limits(&testkit::shipped_settings());
    let counted = open.clone();
    let server =
        Running::spawn(|shutdown| serve_counted(listener, router, limits, Some(counted), shutdown));

    let mut scraper = TcpStream::connect(address).await.expect("connect");
    exchange(&mut scraper, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(open.get(), 0, "a scraper is not counted");
    let mut device = TcpStream::connect(address).await.expect("connect");
    let post = "POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    exchange(&mut device, post).await;
    exchange(&mut device, post).await;
    assert_eq!(open.get(), 1, "counted once, however many requests");
    drop(device);
    testkit::eventually(
        Duration::from_secs(5),
        "the closed connection uncounted",
        || {
            let count = open.get();
            async move { (count == 0).then_some(()) }
        },
    )
    .await;
    drop(scraper);
    server.stop().await;
}

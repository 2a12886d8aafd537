//! `ingest::bootstrap::listen`, the listener every binary (and every test's server)
//! serves on: a burst of new connections waits in the backlog it asked for
//! (`http.max_connections`) instead of overflowing the standard library's 128, where
//! the kernel drops the handshake and each client retries only after a second.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::support::loopback_listener;

/// More connections at once than the standard library's backlog of 128 holds.
const BURST: usize = 300;

/// Opens `BURST` connections at once to a listener that accepts none of them, then
/// counts how many it can accept at once: those that completed their handshake into
/// the backlog. A connection whose handshake was dropped comes only after the kernel's
/// one-second retry, too late for the count.
async fn accepted_from_a_burst(listener: TcpListener) -> usize {
    let address = listener.local_addr().expect("address");
    let connects = (0..BURST)
        .map(|_| tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(address)));
    // The clients keep their connections open until the count is done.
    let _clients: Vec<_> = futures::future::join_all(connects).await;
    let mut accepted = Vec::new();
    while let Ok(Ok((stream, _))) =
        tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
    {
        accepted.push(stream);
    }
    accepted.len()
}

#[tokio::test]
async fn a_burst_of_new_connections_waits_in_the_backlog_the_listener_asked_for() {
    let http = testkit::shipped_settings().http;
    assert!(
        http.max_connections >= BURST,
        "the shipped cap holds the burst"
    );
    let listener = loopback_listener(&http);
    assert_eq!(
        accepted_from_a_burst(listener).await,
        BURST,
        "every connection of the burst waited in the backlog"
    );
    // What the servers had before: `TcpListener::bind` asks for 128, and the burst
    // overflows it on this kernel, so the count above is the backlog's doing.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let accepted = accepted_from_a_burst(listener).await;
    assert!(
        accepted < BURST,
        "a backlog of 128 held {accepted} of {BURST}"
    );
}

//! The request deadline, `query.request_timeout_ms`: a request that cannot be answered
//! in time (its read token's look-up waiting for a lock on `api_tokens`, held by a
//! migration or a `VACUUM FULL`) gets a `503 unavailable` with `Retry-After` instead of
//! hanging for as long as the lock is held, while health, readiness and metrics keep
//! answering.

use std::time::{Duration, Instant};

use ingest::auth::{issue, Kind};
use testkit::prometheus::scrape;
use testkit::{eventually, TestEnv};

use crate::support::{assert_problem, one_projected_reading, Query, DEADLINE};

const STATS: (&str, &str) = ("route", "/v1/devices/{device_id}/stats");

#[tokio::test]
async fn a_read_token_look_up_held_up_by_a_lock_ends_at_the_request_deadline_with_a_503() {
    let mut env = TestEnv::new();
    env.settings.auth.enabled = true;
    env.settings.query.request_timeout_ms = 1_000;
    // The database and the tokens table, as ingest creates them (not ingest itself: the
    // query service then owns this process's metrics recorder, and serves the counts).
    ingest::db::migrate(&env.settings.database)
        .await
        .expect("migrated");
    let query = Query::spawn(&env.settings).await;
    one_projected_reading(&env, "sensor-1").await;
    let pool = ingest::db::pool(&env.settings.database).expect("pool");
    // Never shown to the query service before the table is locked: not in its cache,
    // so the first request with it has to look it up.
    let (_, read_token) = issue(&pool, Kind::Read, None, "dashboard")
        .await
        .expect("issued");
    // Well past the deadline under test: without one, the request fails the test as a
    // client timeout instead of hanging it.
    let client_timeout = Duration::from_secs(10);
    let stats = || {
        query
            .http
            .get(format!("{}/v1/devices/sensor-1/stats", query.base_url))
            .bearer_auth(&read_token)
            .timeout(client_timeout)
    };
    let metrics_url = format!("{}/metrics", query.base_url);
    let before = scrape(&query.http, &metrics_url)
        .await
        .expect("metrics served");

    let watcher = env.postgres().await;
    let mut blocker = env.postgres().await;
    let lock = testkit::lock_table(&mut blocker, "api_tokens").await;

    let held_up = async {
        let started = Instant::now();
        let answer = stats().send().await;
        (answer, started.elapsed())
    };
    // Meanwhile the probes and the scrape are answered as usual (readiness checks
    // PostgreSQL with `SELECT 1`, which the lock does not hold up).
    let meanwhile = async {
        eventually(
            Duration::from_secs(5),
            "the token's look-up waiting for the lock",
            || async { (testkit::lock_waiters(&watcher, "api_tokens").await > 0).then_some(()) },
        )
        .await;
        for path in ["/healthz", "/readyz", "/metrics"] {
            let started = Instant::now();
            let response = query
                .http
                .get(format!("{}{path}", query.base_url))
                .timeout(client_timeout)
                .send()
                .await
                .unwrap_or_else(|error| panic!("{path} while a look-up waits: {error}"));
            let took = started.elapsed();
            assert_eq!(
                response.status().as_u16(),
                200,
                "{path} while a look-up waits"
            );
            // Held up, it would wait as long as the lock: the client's 10 s.
            assert!(
                took < Duration::from_secs(6),
                "{path} answered after {took:?}"
            );
        }
    };
    let ((answer, took), ()) = tokio::join!(held_up, meanwhile);
    let response = answer.unwrap_or_else(|error| {
        panic!("the stats GET while api_tokens is locked got no answer within {took:?}: {error}")
    });
    // At its 1 s deadline, not the client's 10 s (a loaded box adds to the 1 s).
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(6)).contains(&took),
        "the stats GET while api_tokens is locked answered after {took:?}, not at its 1 s deadline"
    );
    assert_eq!(
        testkit::header(&response, "retry-after"),
        Some("1"),
        "Retry-After of the 503"
    );
    assert_problem(response, 503, "unavailable").await;
    // Counted under its route, as every answer is.
    let after = scrape(&query.http, &metrics_url)
        .await
        .expect("metrics served");
    let labels = [STATS, ("status", "503")];
    assert!(
        after.value_or_zero("http_requests_total", &labels)
            > before.value_or_zero("http_requests_total", &labels),
        "the 503 is counted"
    );

    // Once the table is free, the same request is answered as usual.
    lock.rollback().await.expect("released");
    eventually(DEADLINE, "the stats GET after the lock", || async {
        let response = stats().send().await.ok()?;
        (response.status().as_u16() == 200).then_some(())
    })
    .await;
    query.stop().await;
}

//! The metrics of the `ingest` and `relay` binaries (README, "Operator's runbook"):
//! each is served on `/metrics` by the real process and moves when what it counts
//! happens.

use std::time::Duration;

use serde_json::json;
use testkit::process::ServiceProcess;
use testkit::prometheus::Scrape;
use testkit::TestEnv;

use crate::support::{gateway_token, reading, wait_for_session, Ingest};

const ROUTE: (&str, &str) = ("route", "/v1/telemetry");

fn requests(scrape: &Scrape, status: &str) -> f64 {
    scrape.value_or_zero("http_requests_total", &[ROUTE, ("status", status)])
}

fn readings(scrape: &Scrape, outcome: &str) -> f64 {
    scrape.value_or_zero("ingest_readings_total", &[("outcome", outcome)])
}

/// The counters that must have moved by exactly `deltas` between two scrapes.
fn assert_moved(before: &Scrape, after: &Scrape, what: &str, deltas: &[(&str, &str, f64)]) {
    for (kind, label, delta) in deltas {
        let (was, is) = match *kind {
            "status" => (requests(before, label), requests(after, label)),
            _ => (readings(before, label), readings(after, label)),
        };
        assert_eq!(is - was, *delta, "{what}: {kind} {label} moved by {delta}");
    }
}

/// The ingest binary with the test's environment and `extra` settings, once ready.
async fn ingest_process(env: &TestEnv, extra: &[(&str, &str)]) -> ServiceProcess {
    let ingest = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_ingest"),
        env,
        "PIPELINE__INGEST__LISTEN",
        extra,
    );
    ingest.ready().await;
    ingest
}

/// A `POST /v1/telemetry` of `body`, with `key` as its idempotency key if any.
fn telemetry_request(
    ingest: &ServiceProcess,
    key: Option<&str>,
    body: &serde_json::Value,
) -> reqwest::RequestBuilder {
    let request = ingest
        .http
        .post(format!("{}/v1/telemetry", ingest.base_url))
        .header("content-type", "application/json")
        .body(body.to_string());
    match key {
        Some(key) => request.header("idempotency-key", key),
        None => request,
    }
}

async fn post(
    ingest: &ServiceProcess,
    key: Option<&str>,
    body: &serde_json::Value,
) -> reqwest::Response {
    telemetry_request(ingest, key, body)
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn ingest_metrics_count_each_request_outcome_and_group_commit() {
    let env = TestEnv::new();
    let ingest = ingest_process(&env, &[]).await;
    let start = ingest.metrics().await;
    testkit::prometheus::assert_counters_served_from_start(&start, "ingest");

    // Accepted: one request, one reading, at least one group commit.
    let body = reading("sensor-1", 21.5);
    assert_eq!(
        post(&ingest, Some("k-1"), &body).await.status().as_u16(),
        202
    );
    let accepted = ingest.metrics().await;
    assert_moved(
        &start,
        &accepted,
        "a new reading",
        &[("status", "202", 1.0), ("outcome", "accepted", 1.0)],
    );
    for histogram in ["ingest_commit_batch_size", "ingest_commit_seconds"] {
        let count = format!("{histogram}_count");
        assert!(
            accepted.value_or_zero(&count, &[]) > start.value_or_zero(&count, &[]),
            "{count} rises with a commit"
        );
    }
    assert!(
        accepted.value_or_zero("ingest_commit_batch_size_sum", &[])
            >= start.value_or_zero("ingest_commit_batch_size_sum", &[]) + 1.0,
        "the commit carried the reading"
    );
    let latency = "http_request_duration_seconds_count";
    assert_eq!(
        accepted.value(latency, &[ROUTE]),
        Some(start.value_or_zero(latency, &[ROUTE]) + 1.0),
        "the request is timed under its route"
    );
    assert!(accepted.has("http_request_duration_seconds_bucket"));
    // The commit inserted an outbox row: ingest wakes the relays once it returned.
    let notifies = |scrape: &Scrape| scrape.value_or_zero("ingest_outbox_notify_total", &[]);
    ingest
        .metrics_until(
            Duration::from_secs(5),
            "a NOTIFY after the commit",
            |scrape| (notifies(scrape) >= notifies(&start) + 1.0).then_some(()),
        )
        .await;

    // Replayed: the same key and reading again.
    let replay = post(&ingest, Some("k-1"), &body).await;
    assert_eq!(replay.status().as_u16(), 202);
    assert!(replay.headers().contains_key("idempotent-replayed"));
    let replayed = ingest.metrics().await;
    assert_moved(
        &accepted,
        &replayed,
        "a replay",
        &[
            ("status", "202", 1.0),
            ("outcome", "replayed", 1.0),
            ("outcome", "accepted", 0.0),
        ],
    );

    // Rejected: a reading that breaks a rule, and one without a key.
    let invalid = json!({"device_id": "sensor-1", "metrics": {"Bad Name": 1.0}});
    assert_eq!(
        post(&ingest, Some("k-2"), &invalid).await.status().as_u16(),
        422
    );
    assert_eq!(post(&ingest, None, &body).await.status().as_u16(), 400);
    let rejected = ingest.metrics().await;
    assert_moved(
        &replayed,
        &rejected,
        "two refused readings",
        &[
            ("status", "422", 1.0),
            ("status", "400", 1.0),
            ("outcome", "rejected", 2.0),
            ("outcome", "accepted", 0.0),
        ],
    );

    // Conflict: the same key with another reading.
    let other = reading("sensor-1", 99.0);
    assert_eq!(
        post(&ingest, Some("k-1"), &other).await.status().as_u16(),
        422
    );
    let conflict = ingest.metrics().await;
    assert_moved(
        &rejected,
        &conflict,
        "a reused key",
        &[
            ("status", "422", 1.0),
            ("outcome", "conflict", 1.0),
            ("outcome", "rejected", 0.0),
        ],
    );

    assert_eq!(ingest.terminate().await.code(), Some(0));
}

/// A trigger that fails every mark of outbox rows published: the relay publishes and gets
/// its PubAcks, then its round fails and hands the rows back, as when PostgreSQL fails
/// between publish and commit. `DROP TRIGGER refuse_mark ON outbox` lets rounds through.
const REFUSE_MARK: &str = "CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN RAISE EXCEPTION 'marking refused by the test'; END $$;
     CREATE TRIGGER refuse_mark BEFORE UPDATE ON outbox
     FOR EACH STATEMENT EXECUTE FUNCTION refuse_mark();
";

/// The backlog gauges go on while a prune runs, however long it takes: here every
/// prune of the idempotency keys sleeps a minute in a trigger, while readings wait in
/// the outbox (their rounds cannot mark them). Until 2026-12-07 one loop reported the
/// backlog and then pruned, and the gauges (and the alert on a growing backlog) stood
/// still for as long as a prune took.
#[tokio::test]
async fn the_backlog_gauges_go_on_while_a_prune_runs() {
    const READINGS: usize = 3;
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let db = env.postgres().await;
    db.batch_execute(
        &[
            REFUSE_MARK,
            "CREATE FUNCTION slow_prune() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$;
             CREATE TRIGGER slow_prune BEFORE DELETE ON idempotency_keys
             FOR EACH STATEMENT EXECUTE FUNCTION slow_prune();",
        ]
        .concat(),
    )
    .await
    .expect("triggers");
    let relay = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_relay"),
        &env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[("PIPELINE__RELAY__PRUNE_INTERVAL_MS", "200")],
    );
    relay.ready().await;
    wait_for_session(
        &db,
        "a prune asleep in its delete",
        "query LIKE 'DELETE FROM idempotency_keys%' AND wait_event = 'PgSleep'",
    )
    .await;
    ingest.accept_readings(READINGS).await;
    relay
        .metrics_until(
            Duration::from_secs(10),
            "the backlog reported while the prune sleeps",
            |scrape| {
                (scrape.value("relay_outbox_backlog_rows", &[]) == Some(READINGS as f64))
                    .then_some(())
            },
        )
        .await;
    assert!(
        relay.terminate().await.success(),
        "a stop does not wait for the prune"
    );
}

#[tokio::test]
async fn relay_metrics_show_the_backlog_retries_and_publishes_as_they_happen() {
    const READINGS: usize = 5;
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let db = env.postgres().await;
    // The relay will publish but cannot mark: every round fails after its PubAcks and
    // hands its rows back, as when PostgreSQL fails between publish and commit.
    db.batch_execute(REFUSE_MARK)
        .await
        .expect("refusing trigger");
    // Written while no relay runs.
    ingest.accept_readings(READINGS).await;

    let (relay, relay_log) = ServiceProcess::spawn_logged(
        env!("CARGO_BIN_EXE_relay"),
        &env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[
            ("PIPELINE__RELAY__PUBLISHED_RETENTION_SECS", "1"),
            ("PIPELINE__RELAY__PRUNE_INTERVAL_MS", "200"),
        ],
    );
    relay.ready().await;
    // Before anything was republished: an alert fires on its first increase, and a
    // dashboard's `increase()` sees the first duplicate acks after a crash.
    let start = relay.metrics().await;
    testkit::prometheus::assert_counters_served_from_start(&start, "relay");
    for table in ["outbox", "idempotency_keys"] {
        for counter in ["relay_pruned_total", "relay_vacuums_total"] {
            assert!(
                start.value(counter, &[("table", table)]).is_some(),
                "{counter}{{table={table}}} served from the start"
            );
        }
    }
    let stuck = relay
        .metrics_until(
            Duration::from_secs(20),
            "the backlog reported while rounds fail",
            |scrape| {
                (scrape.value("relay_outbox_backlog_rows", &[]) == Some(READINGS as f64)
                    && scrape.value_or_zero("relay_retries_total", &[]) >= READINGS as f64
                    && scrape.value("relay_stream_last_sequence", &[]) == Some(READINGS as f64))
                .then(|| scrape.clone())
            },
        )
        .await;
    assert!(
        stuck.value("relay_outbox_oldest_age_seconds", &[]) > Some(0.0),
        "the oldest unpublished row has an age"
    );
    assert!(stuck.value_or_zero("relay_errors_total", &[]) >= 1.0);
    assert!(
        stuck.value_or_zero("relay_publish_seconds_count", &[]) >= 1.0,
        "failed rounds still time their publishes"
    );
    assert_eq!(
        stuck.value_or_zero("relay_published_total", &[]),
        0.0,
        "nothing counts as published before it is marked"
    );

    // Let the rounds through: the next one marks every row.
    db.batch_execute("DROP TRIGGER refuse_mark ON outbox")
        .await
        .expect("trigger dropped");
    let drained = relay
        .metrics_until(
            Duration::from_secs(30),
            "every row published and the backlog at 0",
            |scrape| {
                (scrape.value("relay_outbox_backlog_rows", &[]) == Some(0.0)
                    && scrape.value_or_zero("relay_published_total", &[]) == READINGS as f64
                    && scrape.value_or_zero("relay_pruned_total", &[("table", "outbox")])
                        == READINGS as f64)
                    .then(|| scrape.clone())
            },
        )
        .await;
    assert_eq!(
        drained.value("relay_outbox_oldest_age_seconds", &[]),
        Some(0.0)
    );
    // Every failed round handed its rows back, and the next one marked them with the
    // sequences their PubAcks gave, without publishing them again (before 2026-12-06 it
    // published them again, and JetStream recognised each copy within its window).
    let retries = drained.value_or_zero("relay_retries_total", &[]);
    assert!(retries >= READINGS as f64);
    assert_eq!(
        drained.value_or_zero("relay_marked_without_publishing_total", &[]),
        READINGS as f64,
        "each row was marked once, with its first publish's sequence"
    );
    assert_eq!(
        drained.value_or_zero("relay_duplicate_acks_total", &[]),
        0.0,
        "nothing was published twice; the relay's log:\n{}",
        relay_log.try_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(
        drained.value_or_zero("relay_round_seconds_count", &[]) >= 1.0,
        "a completed round is timed"
    );
    assert_eq!(
        drained.value_or_zero("relay_publish_seconds_count", &[]),
        stuck.value_or_zero("relay_publish_seconds_count", &[]),
        "the rounds that only marked remembered PubAcks sent no publish to time"
    );
    let last_sequence = env
        .jetstream()
        .await
        .get_stream(env.subjects.stream())
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    assert_eq!(last_sequence, READINGS as u64, "no copy was stored twice");
    assert_eq!(
        drained.value("relay_stream_last_sequence", &[]),
        Some(last_sequence as f64),
        "the gauge is the stream's own last sequence"
    );

    assert_eq!(relay.terminate().await.code(), Some(0));
    ingest.stop().await;
}

/// A relay started while NATS is down reports its outbox backlog from the start: the
/// backlog alert is for exactly such an outage. Until 2026-12-07 the gauges (and the
/// prunes) began only once the streams were ready, so a relay that never reached NATS
/// served no backlog at all.
#[tokio::test]
async fn a_relay_started_while_nats_is_down_reports_its_backlog() {
    const READINGS: usize = 3;
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept_readings(READINGS).await;
    let relay = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_relay"),
        &env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[("PIPELINE__NATS__URL", "nats://127.0.0.1:1")],
    );
    let stuck = relay
        .metrics_until(
            Duration::from_secs(20),
            "the backlog reported while NATS is down",
            |scrape| {
                (scrape.value("relay_outbox_backlog_rows", &[]) == Some(READINGS as f64))
                    .then(|| scrape.clone())
            },
        )
        .await;
    assert!(
        stuck.value("relay_outbox_oldest_age_seconds", &[]) > Some(0.0),
        "the oldest unpublished row has an age"
    );
    assert_eq!(stuck.value_or_zero("relay_published_total", &[]), 0.0);
    assert_eq!(relay.terminate().await.code(), Some(0));
    ingest.stop().await;
}

/// Posts one reading per key as `authorization`, each answered `status`, and returns
/// how many token look-ups ingest counted meanwhile.
async fn look_ups_for(
    ingest: &ServiceProcess,
    authorization: &str,
    keys: &[&str],
    status: u16,
) -> f64 {
    let look_ups = |scrape: &Scrape| scrape.value_or_zero("auth_token_lookups_total", &[]);
    let before = ingest.metrics().await;
    for key in keys {
        let response = telemetry_request(ingest, Some(key), &reading("sensor-1", 1.0))
            .header("authorization", authorization)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), status);
    }
    look_ups(&ingest.metrics().await) - look_ups(&before)
}

#[tokio::test]
async fn token_look_ups_are_counted_once_per_token_the_cache_does_not_hold() {
    let env = TestEnv::new();
    let ingest = ingest_process(
        &env,
        &[
            ("PIPELINE__AUTH__ENABLED", "true"),
            ("PIPELINE__AUTH__CACHE_TTL_SECS", "60"),
        ],
    )
    .await;
    let (_, _, token) = gateway_token(&env.settings).await;

    // A known token: asked once, then served from the cache.
    assert_eq!(
        look_ups_for(&ingest, &token, &["k-1", "k-2", "k-3"], 202).await,
        1.0,
        "one look-up, two hits"
    );

    // An unknown one: asked once as well, then remembered as unknown.
    let unknown = format!("Bearer tp_{}", "0".repeat(64));
    assert_eq!(
        look_ups_for(&ingest, &unknown, &["k-4", "k-5"], 401).await,
        1.0,
        "one look-up, one hit"
    );
    assert_eq!(ingest.terminate().await.code(), Some(0));
}

//! The group commit with several commits in flight: the same keys in concurrent
//! commits, every submission answered, every key stored once; its pacing; and, while
//! PostgreSQL stalls, its bound on the readings waiting and the submissions it drops
//! once their requests gave up.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use contract::reading::Reading;
use ingest::http::server::OpenConnections;
use ingest::outbox_notify::Notifier;
use ingest::store::{GroupCommit, NewReading, Outcome, Store};
use serde_json::{json, Value};
use testkit::{eventually, TestEnv};
use time::OffsetDateTime;

use crate::support::{
    assert_problem, assert_replayed, batch_body, count, hold_key_copied, migrate,
    reading as posted_reading, wait_for_session, Ingest,
};

fn reading(device: usize, temperature: f64) -> Reading {
    Reading {
        device_id: format!("sensor-{device}"),
        recorded_at: Some(OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1)),
        metrics: BTreeMap::from([("temperature".to_owned(), temperature)]),
    }
}

#[tokio::test]
async fn parallel_commits_store_each_key_once_and_answer_every_submission() {
    let env = TestEnv::new();
    migrate(&env).await;
    let pool = ingest::db::pool(&env.settings.database).expect("pool");
    // Small batches and a low threshold, so that many commits run side by side.
    let limits = GroupCommit {
        batch_max: 25,
        concurrency: 4,
        parallel_min: 1,
        queue_capacity: 10_000,
        interval: Duration::ZERO,
    };
    let notifier = Notifier::new(
        ingest::db::pg_config(&env.settings.database).expect("database url"),
        Duration::from_secs(2),
    );
    let (store, dispatcher) = Store::start(pool, limits, Some(notifier), None);

    // 200 keys over 20 devices; each key sent three times, twice with the same reading
    // and once with a different one, in an order that spreads the copies of a key over
    // different commits.
    const KEYS: usize = 200;
    let mut submissions: Vec<(usize, f64)> = Vec::new();
    for copy in 0..3 {
        for key in 0..KEYS {
            submissions.push((key, if copy == 2 { 99.0 } else { key as f64 }));
        }
    }
    let total = submissions.len();
    let shuffled: Vec<(usize, f64)> = (0..total)
        .map(|index| submissions[(index * 7919) % total])
        .collect();
    let tasks = shuffled.into_iter().map(|(key, temperature)| {
        let store = store.clone();
        tokio::spawn(async move {
            let new = NewReading::new(
                reading(key % 20, temperature),
                format!("key-{key}"),
                OffsetDateTime::now_utc(),
            );
            (key, temperature, store.submit(new).await)
        })
    });
    let answers = futures::future::join_all(tasks).await;
    drop(store);
    dispatcher
        .await
        .expect("dispatcher ends once every store is dropped");

    let mut accepted_value: HashMap<usize, f64> = HashMap::new();
    for answer in &answers {
        let (key, temperature, outcome) = answer.as_ref().expect("task finished");
        let outcome = outcome.as_ref().expect("the commit succeeded");
        if let Outcome::Accepted { .. } = outcome {
            let first = accepted_value.insert(*key, *temperature);
            assert!(first.is_none(), "key {key} was accepted twice");
        }
    }
    assert_eq!(accepted_value.len(), KEYS, "every key was accepted once");
    for answer in answers {
        let (key, temperature, outcome) = answer.expect("task finished");
        let stored = accepted_value[&key];
        match outcome.expect("the commit succeeded") {
            Outcome::Accepted { .. } => {}
            Outcome::Replayed { .. } => assert_eq!(temperature, stored, "key {key}"),
            Outcome::KeyReused => assert_ne!(temperature, stored, "key {key}"),
            Outcome::KeyInFlux => panic!("key {key}: no key expires in this test"),
        }
    }

    let db = env.postgres().await;
    for table in ["readings", "idempotency_keys", "outbox"] {
        let rows: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, KEYS as i64, "{table} holds one row per key");
    }
    let stored: Vec<(String, f64)> = db
        .query(
            "SELECT k.idempotency_key, (r.metrics->>'temperature')::float8
             FROM idempotency_keys k JOIN readings r USING (event_id)",
            &[],
        )
        .await
        .expect("stored readings")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for (key, temperature) in stored {
        let index: usize = key.trim_start_matches("key-").parse().expect("key-<n>");
        assert_eq!(
            temperature, accepted_value[&index],
            "{key}: the accepted reading is the stored one"
        );
    }
}

/// The statements are written for read committed: a commit that meets a key another
/// transaction stored after the commit's snapshot waits for that transaction and then
/// finds the key, to answer it as a replay. At repeatable read or serializable,
/// PostgreSQL refuses that insert with a serialization error instead, and the whole
/// commit was answered `503`; where the database's default is one of those, the pool's
/// sessions now set read committed back.
#[tokio::test]
async fn a_key_stored_meanwhile_by_another_transaction_is_a_replay_whatever_the_databases_default_isolation(
) {
    for isolation in ["repeatable read", "serializable"] {
        let env = TestEnv::new();
        migrate(&env).await;
        let db = env.postgres().await;
        let database = &env.database;
        db.batch_execute(&format!(
            "ALTER DATABASE \"{database}\" SET default_transaction_isolation = '{isolation}'"
        ))
        .await
        .expect("database default set");
        let ingest = Ingest::spawn(&env.settings).await;
        let body = posted_reading("gw-1", 5.0);
        ingest.accept("old", &body).await;
        // Another transaction stores key `new` for the same reading, and commits while
        // ingest's insert of that key waits for it.
        let holder = hold_key_copied(&env, "old", "new").await;
        let commit_while_ingest_waits = async {
            eventually(
                Duration::from_secs(10),
                "ingest's insert waiting",
                || async {
                    testkit::lock_waiter_pids(&db, "INSERT INTO idempotency_keys")
                        .await
                        .first()
                        .copied()
                },
            )
            .await;
            holder.batch_execute("COMMIT").await.expect("commit");
        };
        let (response, ()) = tokio::join!(ingest.post("new", &body), commit_while_ingest_waits);
        assert_eq!(response.status().as_u16(), 202, "at {isolation}");
        assert_replayed(&response);
        ingest.stop().await;
    }
}

/// `ingest.commit_interval_ms`: after a commit of several readings, a small batch waits
/// until the interval after that commit's start, unless every open connection already
/// has its submission in it (a closed loop, which waiting could not add to).
#[tokio::test]
async fn a_paced_batch_waits_for_its_slot_unless_every_client_is_in_it() {
    const INTERVAL: Duration = Duration::from_secs(2);
    let env = TestEnv::new();
    migrate(&env).await;
    let pool = ingest::db::pool(&env.settings.database).expect("pool");
    let limits = GroupCommit {
        batch_max: 500,
        concurrency: 2,
        parallel_min: 32,
        queue_capacity: 1_000,
        interval: INTERVAL,
    };
    let clients = OpenConnections::new(ingest::http::READINGS_PATH);
    let mut connections: Vec<_> = (0..10).map(|_| clients.hold()).collect();
    let (store, dispatcher) = Store::start(pool, limits, None, Some(clients.clone()));
    let submit = |key: &str, readings: usize| {
        let batch = (0..readings)
            .map(|device| {
                NewReading::new(
                    reading(device, 1.0),
                    key.to_owned(),
                    OffsetDateTime::now_utc(),
                )
            })
            .collect();
        store.submit_all(batch)
    };
    let accepted = |outcomes: Vec<Outcome>| {
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Outcome::Accepted { .. }))
    };

    // A busy commit (4 readings), then one reading while 9 other connections are open.
    let busy_started = tokio::time::Instant::now();
    assert!(accepted(submit("busy-1", 4).await.expect("busy commit")));
    assert!(accepted(submit("paced", 1).await.expect("paced commit")));
    let waited = busy_started.elapsed();
    assert!(
        waited >= INTERVAL,
        "the small batch started {waited:?} after the busy one"
    );

    // The same with the one reading's connection the only one open: it starts at once.
    connections.truncate(1);
    assert_eq!(clients.get(), 1);
    let busy_started = tokio::time::Instant::now();
    assert!(accepted(submit("busy-2", 4).await.expect("busy commit")));
    assert!(accepted(
        submit("closed-loop", 1).await.expect("closed-loop commit")
    ));
    let waited = busy_started.elapsed();
    assert!(waited < INTERVAL / 2, "a closed loop waited {waited:?}");

    drop(store);
    dispatcher.await.expect("dispatcher ends");
}

/// The same through ingest's own HTTP server: the connections counted are those that
/// posted readings (the single and the batch endpoint alike), so a client that sends
/// each reading after the last one's `202` is never held, and an idle connection that
/// posted before makes the paced reading wait for its slot.
#[tokio::test]
async fn over_http_a_paced_reading_waits_only_while_another_posting_connection_is_open() {
    const INTERVAL_MS: u64 = 2_000;
    let mut env = TestEnv::new();
    env.settings.ingest.commit_interval_ms = INTERVAL_MS;
    let ingest = Ingest::spawn(&env.settings).await;
    let busy_batch = |round: &str| {
        let items: Vec<Value> = (0..4)
            .map(|device| {
                json!({"idempotency_key": format!("busy-{round}"), "device_id": format!("sensor-{device}"),
                       "metrics": {"temperature": 1.0}})
            })
            .collect();
        json!({ "readings": items })
    };

    // One client, one connection: a batch of 4 (a busy commit), then one reading.
    let started = tokio::time::Instant::now();
    let batch = ingest.post_batch(&busy_batch("1")).await;
    assert_eq!(batch.status().as_u16(), 200, "{:?}", batch.text().await);
    ingest
        .accept("alone", &posted_reading("sensor-9", 1.0))
        .await;
    let waited = started.elapsed();
    // Held for its slot, it would wait the whole interval from the batch's commit.
    assert!(
        waited.as_millis() < u128::from(INTERVAL_MS),
        "the only client waited {waited:?}"
    );

    // Another client posts once and keeps its connection open, idle.
    let other = reqwest::Client::new();
    let posted = other
        .post(format!("{}/v1/telemetry", ingest.base_url))
        .header("idempotency-key", "other")
        .json(&posted_reading("sensor-8", 1.0))
        .send()
        .await
        .expect("other client's reading sent");
    assert_eq!(posted.status().as_u16(), 202);
    let started = tokio::time::Instant::now();
    let batch = ingest.post_batch(&busy_batch("2")).await;
    assert_eq!(batch.status().as_u16(), 200, "{:?}", batch.text().await);
    ingest
        .accept("paced", &posted_reading("sensor-9", 2.0))
        .await;
    let waited = started.elapsed();
    assert!(
        waited.as_millis() >= u128::from(INTERVAL_MS),
        "the paced reading waited only {waited:?}"
    );

    drop(other);
    ingest.stop().await;
}

/// A transaction of its own that holds `idempotency_keys`: every group commit waits for
/// it until [`release_commits`]. Its session stays open, idle in the transaction.
async fn stall_commits(env: &TestEnv) -> tokio_postgres::Client {
    let lock = env.postgres().await;
    lock.batch_execute("BEGIN; LOCK TABLE idempotency_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("idempotency_keys locked");
    lock
}

/// Ends the transaction of [`stall_commits`]: the waiting commits go on.
async fn release_commits(lock: &tokio_postgres::Client) {
    lock.batch_execute("ROLLBACK").await.expect("lock released");
}

/// Waits until a group commit of ingest waits for the lock of [`stall_commits`], seen
/// from `watcher`, a session of its own.
async fn wait_for_a_stalled_commit(watcher: &tokio_postgres::Client) {
    wait_for_session(
        watcher,
        "a commit waiting for the lock",
        "wait_event_type = 'Lock'",
    )
    .await;
}

/// `ingest.queue_capacity` bounds the readings waiting for a commit, not the requests:
/// while PostgreSQL stalls, a second full batch that would take them past the capacity
/// is refused at once with `503` instead of being queued (a thousand readings a
/// request, the old bound of 8192 requests let eight million wait). Once the first
/// batch is answered its room is free again.
#[tokio::test]
async fn a_batch_that_would_take_the_waiting_readings_past_the_capacity_is_refused_at_once() {
    let mut env = TestEnv::new();
    env.settings.ingest.queue_capacity = 1_500;
    env.settings.ingest.request_timeout_ms = 5_000;
    let ingest = Ingest::spawn(&env.settings).await;
    let watcher = env.postgres().await;
    let lock = stall_commits(&env).await;

    let first_batch = batch_body("first", 1_000, 50);
    let first = ingest.post_batch(&first_batch);
    let second = async {
        wait_for_a_stalled_commit(&watcher).await;
        let started = tokio::time::Instant::now();
        let second = ingest.post_batch(&batch_body("second", 1_000, 50)).await;
        let took = started.elapsed();
        let problem = assert_problem(second, 503, "unavailable").await;
        release_commits(&lock).await;
        (problem, took)
    };
    let (first, (problem, took)) = tokio::join!(first, second);
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("too many"),
        "the second batch was answered after {took:?}: {problem}"
    );
    // Queued, it would be refused at its 5 s deadline.
    assert!(
        took < Duration::from_secs(4),
        "the second batch was refused only after {took:?}"
    );
    assert_eq!(first.status().as_u16(), 200);
    let first: Value = first.json().await.expect("json");
    assert_eq!(first["accepted"], 1_000, "{}", first["results"][0]);

    // The first batch's readings no longer wait: a batch as large fits again.
    let third: Value = ingest
        .post_batch(&batch_body("third", 1_000, 50))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(third["accepted"], 1_000, "{}", third["results"][0]);
    let db = env.postgres().await;
    assert_eq!(
        count(&db, "readings").await,
        2_000,
        "the refused batch is not stored"
    );
    assert_eq!(count(&db, "outbox").await, 2_000);
    ingest.stop().await;
}

/// A request whose deadline passed before its commit began is dropped from the queue,
/// not committed later: its `503` means nothing was stored, so a retry under new keys
/// cannot count it twice. One whose deadline passed while its commit waited is stored
/// if that commit lands (then a retry with the same key replays it); here the commit
/// waits on a lock past `COMMIT_GIVE_UP_AFTER` and is given up, its statement
/// cancelled, so the retry stores the reading.
#[tokio::test]
async fn a_submission_abandoned_at_its_deadline_before_its_commit_is_never_stored() {
    let mut env = TestEnv::new();
    env.settings.ingest.request_timeout_ms = 1_000;
    // One commit at a time: while the first waits for the lock, the next submission
    // waits in the queue.
    env.settings.ingest.commit_concurrency = 1;
    let ingest = Ingest::spawn(&env.settings).await;
    let watcher = env.postgres().await;
    let lock = stall_commits(&env).await;

    let landing_reading = posted_reading("sensor-1", 1.0);
    let landing = ingest.post("landing", &landing_reading);
    let abandoned = async {
        wait_for_a_stalled_commit(&watcher).await;
        ingest.post_batch(&batch_body("abandoned", 2, 50)).await
    };
    let (landing, abandoned) = tokio::join!(landing, abandoned);
    assert_problem(landing, 503, "unavailable").await;
    assert_problem(abandoned, 503, "unavailable").await;

    // The commit in flight is given up once it has run 5 s, its statement cancelled; the
    // abandoned batch, queued behind it, gave up before it could begin.
    eventually(
        Duration::from_secs(15),
        "every commit given up with its requests, no statement left waiting for the lock",
        || async { (testkit::lock_waiters(&watcher, "idempotency_keys").await == 0).then_some(()) },
    )
    .await;
    release_commits(&lock).await;
    ingest
        .accept("after", &posted_reading("sensor-2", 2.0))
        .await;
    let db = env.postgres().await;
    let stored: Vec<String> = crate::support::column(
        &db,
        "SELECT idempotency_key FROM idempotency_keys ORDER BY idempotency_key",
    )
    .await;
    assert_eq!(
        stored,
        ["after"],
        "what was answered 503 while its commit waited, or before it began, is not stored"
    );
    assert_eq!(count(&db, "readings").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);

    // Retried with the same keys: the abandoned batch and the given-up reading are new.
    let retried: Value = ingest
        .post_batch(&batch_body("abandoned", 2, 50))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (&retried["accepted"], &retried["duplicates"]),
        (&json!(2), &json!(0)),
        "{retried}"
    );
    let stored_now = ingest.accept("landing", &landing_reading).await;
    assert_eq!(
        testkit::header(&stored_now, "idempotent-replayed"),
        None,
        "the reading whose commit was given up is stored by its retry"
    );
    ingest.stop().await;
}

/// A failover that silently dropped ingest's connections to PostgreSQL (here a proxy
/// that holds every byte of the links open at that moment, while new links flow): the
/// commit on a dropped connection is given up once its requests have (and it has run
/// `COMMIT_GIVE_UP_AFTER`), with the pool's idle connections, dropped too, and the next
/// reading is accepted at once on a fresh one. Before, the commit
/// waited as long as TCP did (for ever here, since the proxy acknowledges what it
/// holds), held the commit slot, and every reading was answered `503`.
#[tokio::test]
async fn commits_on_connections_a_failover_dropped_silently_give_way_to_fresh_ones() {
    let env = TestEnv::new();
    migrate(&env).await;
    let (proxy, settings) = through_a_fault_proxy(&env).await;
    let mut settings = settings;
    // Time for the warm requests to open their connections on a loaded box; the commit
    // on a stranded connection is given up 5 s after it began in any case.
    settings.ingest.request_timeout_ms = 3_000;
    // Commits side by side from one reading on: concurrent requests open several pooled
    // connections.
    settings.ingest.commit_concurrency = 4;
    settings.ingest.commit_parallel_min = 1;
    let ingest = Ingest::spawn(&settings).await;
    let warm = (0..40).map(|index| {
        let ingest = &ingest;
        async move {
            ingest
                .accept(
                    &format!("warm-{index}"),
                    &posted_reading("sensor-1", index as f64),
                )
                .await
        }
    });
    futures::future::join_all(warm).await;
    let db = env.postgres().await;
    let sessions: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'telemetry-pipeline'
               AND query NOT ILIKE '%notify%'",
            &[],
        )
        .await
        .expect("sessions")
        .get(0);
    assert!(
        sessions >= 2,
        "ingest holds pooled connections beside the one the next commit takes: {sessions}"
    );

    proxy.strand_open_links();
    let stranded = posted_reading("sensor-2", 1.0);
    assert_problem(ingest.post("stranded", &stranded).await, 503, "unavailable").await;
    let metrics_url = format!("{}/metrics", ingest.base_url);
    eventually(
        Duration::from_secs(20),
        "the commit on the stranded connection given up",
        || async {
            let scrape = testkit::prometheus::scrape(&ingest.http, &metrics_url).await?;
            (scrape.total("ingest_commits_given_up_total") >= 1.0).then_some(())
        },
    )
    .await;
    // The idle connections were stranded too: had they stayed in the pool, this
    // reading's commit would have taken one and waited with it.
    ingest
        .accept("fresh", &posted_reading("sensor-3", 1.0))
        .await;
    ingest.accept("stranded", &stranded).await;
    assert_eq!(
        count(&db, "readings").await,
        count(&db, "idempotency_keys").await,
        "one reading a key"
    );
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM idempotency_keys WHERE idempotency_key = 'stranded' OR idempotency_key LIKE 'warm-%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 41, "the warm readings and the stranded one's retry");
    ingest.stop().await;
}

/// `env`'s settings with the database reached through a [`testkit::FaultProxy`] of the
/// test's own, and that proxy.
async fn through_a_fault_proxy(
    env: &TestEnv,
) -> (testkit::FaultProxy, contract::settings::Settings) {
    let url = &env.settings.database.url;
    let config: tokio_postgres::Config = url.parse().expect("the test database url");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the test database is reached over TCP, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("the database host resolves")
        .next()
        .expect("an address");
    let proxy = testkit::FaultProxy::start_on_loopback(upstream)
        .await
        .expect("the fault proxy");
    let authority = format!("{host}:{port}");
    assert!(url.contains(&authority), "{url} names {authority}");
    let mut settings = env.settings.clone();
    settings.database.url = url.replacen(&authority, &proxy.listen.to_string(), 1);
    (proxy, settings)
}

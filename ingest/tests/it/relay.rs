//! The outbox relay: what it publishes, and that a crash between publish and mark
//! neither loses nor duplicates an event.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use contract::settings::Settings;
use serde_json::Value;
use testkit::process::ServiceProcess;
use testkit::prometheus::Scrape;
use testkit::{eventually, Running, TestEnv};

use crate::support::{
    batch_body, close_database, column, count, loopback_listener, migrate, reading,
    reopen_database, wait_for_counts, wait_for_session, Ingest,
};

/// Starts a relay in this process as the `relay` binary runs it, its admin port on a
/// loopback port; its log goes to the test's output ([`Running::spawn`]).
pub fn spawn_relay(settings: &Settings) -> Running<anyhow::Result<()>> {
    spawn_relay_with_admin(settings).0
}

/// [`spawn_relay`], with the URL of its admin port. Its `/metrics` shows what the relay
/// records only when it is the first service started in the test's process (the first
/// installs the process's recorder).
pub fn spawn_relay_with_admin(settings: &Settings) -> (Running<anyhow::Result<()>>, String) {
    let admin_listener = loopback_listener(&settings.http);
    let admin_url = format!(
        "http://{}",
        admin_listener.local_addr().expect("local address")
    );
    let settings = settings.clone();
    let relay = Running::spawn(|shutdown| ingest::relay::serve(settings, admin_listener, shutdown));
    (relay, admin_url)
}

/// Starts a projector in this process, its admin port on a loopback port.
pub fn spawn_projector(settings: &Settings) -> Running<anyhow::Result<()>> {
    let listener = loopback_listener(&settings.http);
    let settings = settings.clone();
    Running::spawn(|shutdown| projector::run(settings, listener, shutdown))
}

/// Starts the relay binary, pointed at this test's database and stream; killed when
/// dropped, so that a failing assertion leaves no relay behind. Its admin listener is
/// on port 0 (not asked for, and no port is then freed for it to take).
fn spawn_relay_process(env: &TestEnv) -> ServiceProcess {
    const ADMIN_LISTEN: &str = "PIPELINE__RELAY__ADMIN_LISTEN";
    ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_relay"),
        env,
        ADMIN_LISTEN,
        &[(ADMIN_LISTEN, "127.0.0.1:0")],
    )
}

pub async fn stream_messages(jetstream: &jetstream::Context, stream: &str) -> Option<u64> {
    let mut stream = jetstream.get_stream(stream).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

/// Makes every "mark published" statement on the outbox sleep `seconds` first, so a
/// relay can be caught between publishing and marking.
pub async fn stall_marking(db: &tokio_postgres::Client, seconds: u32) {
    db.batch_execute(&format!(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
         CREATE TRIGGER stall BEFORE UPDATE ON outbox FOR EACH STATEMENT EXECUTE FUNCTION stall();"
    ))
    .await
    .expect("stall trigger");
}

/// Spawns ingest, stores `readings` readings of `sensor-1` (temperatures 0, 1, …) with
/// no relay running, and makes every "mark published" statement stall for a minute;
/// returns ingest and the session that set the stall up.
async fn readings_with_marking_stalled(
    env: &TestEnv,
    readings: usize,
) -> (Ingest, tokio_postgres::Client) {
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept_readings(readings).await;
    let db = env.postgres().await;
    stall_marking(&db, 60).await;
    (ingest, db)
}

const UNPUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";

/// Waits until no outbox row is left unpublished.
async fn wait_until_all_marked(db: &tokio_postgres::Client) {
    wait_for_counts(
        db,
        Duration::from_secs(30),
        "every row marked published",
        UNPUBLISHED,
        &[0],
    )
    .await;
}

/// Waits until the outbox holds `rows` rows, every one marked published.
pub async fn wait_until_marked(db: &tokio_postgres::Client, rows: i64) {
    wait_for_outbox(db, Duration::from_secs(30), rows, 0).await;
}

/// Waits at most `deadline` until the outbox holds `published` rows marked published
/// and `unpublished` not.
async fn wait_for_outbox(
    db: &tokio_postgres::Client,
    deadline: Duration,
    published: i64,
    unpublished: i64,
) {
    wait_for_counts(
        db,
        deadline,
        &format!("{published} rows marked published and {unpublished} not"),
        "SELECT count(*) FILTER (WHERE published_at IS NOT NULL),
                count(*) FILTER (WHERE published_at IS NULL) FROM outbox",
        &[published, unpublished],
    )
    .await;
}

/// Waits until the stream holds `count` messages.
pub async fn wait_for_stream_messages(jetstream: &jetstream::Context, stream: &str, count: u64) {
    eventually(
        Duration::from_secs(30),
        "events published before the mark",
        || async { (stream_messages(jetstream, stream).await? == count).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn relay_publishes_each_row_with_the_documented_subject_headers_and_payload() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    for (index, device) in ["sensor-1", "sensor-2", "sensor-1"].iter().enumerate() {
        ingest
            .accept(&format!("k-{index}"), &reading(device, index as f64))
            .await;
    }
    let relay = spawn_relay(&env.settings);
    let jetstream = env.jetstream().await;
    eventually(
        Duration::from_secs(20),
        "3 events in the stream",
        || async { (stream_messages(&jetstream, env.subjects.stream()).await? == 3).then_some(()) },
    )
    .await;

    let stream = jetstream
        .get_stream(env.subjects.stream())
        .await
        .expect("stream");
    let db = env.postgres().await;
    for sequence in 1..=3u64 {
        let message = stream.get_raw_message(sequence).await.expect("message");
        let payload: Value = serde_json::from_slice(&message.payload).expect("json payload");
        let device = payload["device_id"].as_str().expect("device id");
        assert_eq!(message.subject.as_str(), env.subjects.recorded(device));
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
        };
        assert_eq!(
            header("Nats-Msg-Id").as_deref(),
            payload["event_id"].as_str()
        );
        assert_eq!(header("Content-Type").as_deref(), Some("application/json"));
        assert_eq!(header("Event-Type").as_deref(), Some("telemetry.recorded"));
        assert_eq!(header("Event-Version").as_deref(), Some("1"));
        assert_eq!(payload["event_type"], "telemetry.recorded");
        assert_eq!(payload["version"], 1);
        for field in ["recorded_at", "received_at"] {
            let text = payload[field].as_str().expect("timestamp");
            assert!(
                contract::timestamp::parse(text).is_some(),
                "{field} is RFC 3339"
            );
        }
        let event_id: uuid::Uuid = payload["event_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("uuid");
        let marked: Option<i64> = eventually(Duration::from_secs(10), "row marked", || async {
            let row = db
                .query_one(
                    "SELECT stream_seq FROM outbox WHERE event_id = $1",
                    &[&event_id],
                )
                .await
                .ok()?;
            row.get::<_, Option<i64>>(0).map(Some)
        })
        .await;
        assert_eq!(
            marked,
            Some(sequence as i64),
            "the row remembers its stream sequence"
        );
    }
    relay.stop().await;
    ingest.stop().await;
}

/// The admin port as the `relay` binary serves it (API.md §7): `/healthz` whatever its
/// dependencies do, `/readyz` a 503 naming the one that does not answer, and `/metrics`
/// with the series the relay records, other paths and methods refused as problems; and a
/// shutdown that does not wait for them.
#[tokio::test]
async fn readiness_names_the_dependency_that_does_not_answer_and_shutdown_does_not_wait_for_it() {
    let env = TestEnv::new();
    migrate(&env).await;
    let mut no_postgres = env.settings.clone();
    no_postgres.database.url = "postgres://postgres@127.0.0.1:1/telemetry".to_owned();
    let mut no_nats = env.settings.clone();
    no_nats.nats.url = "nats://127.0.0.1:1".to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    // The healthy relay first: the first in a process installs the metrics recorder, and
    // a later one's `/metrics` renders a recorder of its own that nothing records into.
    for (settings, down) in [
        (env.settings.clone(), None),
        (no_postgres, Some("postgres")),
        (no_nats, Some("nats")),
    ] {
        let (relay, admin_url) = spawn_relay_with_admin(&settings);
        let get = |path: &str| http.get(format!("{admin_url}{path}")).send();
        let healthz = get("/healthz").await.expect("healthz answers");
        assert_eq!(healthz.status(), 200, "healthz with {down:?} down");
        testkit::assert_admin_port_refuses_with_problems(&admin_url).await;

        let readiness = testkit::settled_readiness(&admin_url, down).await;
        if down.is_none() {
            assert_eq!(
                readiness,
                serde_json::json!({"status": "ready", "checks": {"postgres": "ok", "nats": "ok"}})
            );
            eventually(
                Duration::from_secs(10),
                "the backlog gauge in /metrics",
                || async {
                    let text = get("/metrics").await.ok()?.text().await.ok()?;
                    let scrape = Scrape::parse(&text);
                    (scrape.value("relay_outbox_backlog_rows", &[]) == Some(0.0)).then_some(())
                },
            )
            .await;
        }
        // Shutdown does not wait for a dependency that does not answer: while NATS is
        // down, creating the streams waits out two 5 s request timeouts.
        relay
            .stop_within(
                Duration::from_secs(3),
                &format!("the relay with {down:?} down"),
            )
            .await;
    }
}

/// The backlog gauge gives its statements up after 1 s, and a statement given up kept
/// running on its connection, which went back to the pool to be handed out next: a
/// round's claim, a prune or `/readyz`'s `SELECT 1` then waited behind it. A lock on the
/// outbox (a migration, an operator's `LOCK`, a long `VACUUM FULL`) holds the gauge up
/// for as long as it is held; a statement given up must end with its timeout.
#[tokio::test]
async fn a_backlog_gauge_statement_given_up_at_its_timeout_does_not_keep_running() {
    let env = TestEnv::new();
    migrate(&env).await;
    let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
    testkit::settled_readiness(&admin_url, None).await;
    let db = env.postgres().await;
    let mut blocker = env.postgres().await;
    let lock = testkit::lock_table(&mut blocker, "outbox").await;
    // A gauge statement (every 2 s) that waits on the lock, by its session and start.
    let gauge_statements = || async {
        db.query(
            "SELECT pid, query_start FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND state = 'active' AND query LIKE '%FROM outbox%'
               AND (query LIKE '%count(*)%' OR query LIKE '%created_at%')",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| (row.get::<_, i32>(0), row.get::<_, std::time::SystemTime>(1)))
        .collect::<Vec<_>>()
    };
    let first = eventually(
        Duration::from_secs(10),
        "a backlog gauge statement waiting on the lock",
        || async { gauge_statements().await.into_iter().next() },
    )
    .await;
    // Under the lock, which stays held, a statement not cancelled would wait for ever;
    // one given up at its 1 s timeout ends (the cancel request's own connection takes
    // its time on a loaded box: a time bound once saw 1.5 s in CI).
    eventually(
        Duration::from_secs(15),
        "the gauge statement ended under the lock, given up at its timeout",
        || async { (!gauge_statements().await.contains(&first)).then_some(()) },
    )
    .await;
    drop(lock);
    relay.stop().await;
}

/// The relay's `LISTEN outbox` session sends nothing once it listens, so a PostgreSQL
/// host that vanished without a reset (power lost, a link dropped) went unnoticed as
/// long as TCP keepalive waited: tokio-postgres's default is 2 hours of silence, and
/// meanwhile every reading waited for the poll instead of the NOTIFY. Its socket must
/// probe the server within seconds of silence. (Whether the kernel then drops a dead
/// connection is its own business; a test here cannot take a host away without a reset.)
#[tokio::test]
async fn the_relays_listen_session_probes_a_silent_server_within_seconds() {
    let env = TestEnv::new();
    migrate(&env).await;
    let relay = spawn_relay(&env.settings);
    let db = env.postgres().await;
    let listen = format!("LISTEN {}", ingest::outbox_notify::CHANNEL);
    // The relay's end of its LISTEN session, as PostgreSQL sees it.
    let relay_port: i32 = eventually(
        Duration::from_secs(10),
        "the relay's LISTEN session",
        || async {
            db.query_opt(
                "SELECT client_port FROM pg_stat_activity
                 WHERE datname = current_database() AND query = $1",
                &[&listen],
            )
            .await
            .expect("pg_stat_activity")
            .and_then(|row| row.get(0))
        },
    )
    .await;
    let port = u16::try_from(relay_port).expect("a TCP port");
    // The timer shows while nothing the session sent waits for its acknowledgement.
    let next_probe = eventually(
        Duration::from_secs(5),
        "a keepalive timer on the LISTEN session's socket",
        || async { keepalive_due_in(port) },
    )
    .await;
    assert!(
        next_probe <= Duration::from_secs(10),
        "the LISTEN session's first keepalive probe is due in {next_probe:?}"
    );
    relay.stop().await;
}

/// How long until the keepalive timer of the established loopback TCP socket whose
/// local port is `port` fires, from `/proc/net/tcp` (`tr` 2 is that timer, `tm->when`
/// its remaining time in clock ticks of 1/100 s); `None` when no such timer runs.
fn keepalive_due_in(port: u16) -> Option<Duration> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local_address, state, timer) = (fields.get(1)?, fields.get(3)?, fields.get(5)?);
        if *local_address != local || *state != "01" {
            return None;
        }
        let (active, ticks) = timer.split_once(':')?;
        if active != "02" {
            return None;
        }
        let ticks = u64::from_str_radix(ticks, 16).ok()?;
        Some(Duration::from_millis(ticks * 10))
    })
}

#[tokio::test]
async fn relay_killed_between_publish_and_mark_republishes_without_duplicates() {
    const READINGS: usize = 20;
    let env = TestEnv::new();
    // The relay's "mark published" statement stalls, so it dies after publishing.
    let (ingest, db) = readings_with_marking_stalled(&env, READINGS).await;

    let relay = spawn_relay_process(&env);
    let jetstream = env.jetstream().await;
    wait_for_stream_messages(&jetstream, env.subjects.stream(), READINGS as u64).await;
    let unpublished: i64 = db.query_one(UNPUBLISHED, &[]).await.expect("count").get(0);
    assert_eq!(
        unpublished, READINGS as i64,
        "the relay has not marked anything yet"
    );
    relay.kill();

    // The killed relay's stalled statement would hold its row locks for a minute.
    db.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%UPDATE outbox%';
         DROP TRIGGER stall ON outbox;",
    )
    .await
    .expect("stall removed");

    let restarted = spawn_relay_process(&env);
    wait_until_all_marked(&db).await;
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        Some(READINGS as u64),
        "JetStream dropped every republished copy"
    );
    let sequences: Vec<i64> =
        column(&db, "SELECT stream_seq FROM outbox ORDER BY stream_seq").await;
    assert_eq!(
        sequences,
        (1..=READINGS as i64).collect::<Vec<_>>(),
        "each row marked with its original sequence"
    );

    // And the read model counts each reading once.
    let projector = spawn_projector(&env.settings);
    let stats = eventually(
        Duration::from_secs(20),
        "all readings projected",
        || async {
            env.device_stats("sensor-1")
                .await
                .filter(|stats| stats.sample_count >= READINGS as u64)
        },
    )
    .await;
    assert_eq!(stats.sample_count, READINGS as u64);
    assert_eq!(
        stats.metrics["temperature"].sum,
        (0..READINGS).sum::<usize>() as f64
    );

    projector.stop().await;
    // SIGTERM: the relay finishes its round and exits 0 (API.md §7).
    let status = restarted.terminate().await;
    assert_eq!(status.code(), Some(0), "the relay exits 0 after SIGTERM");
    ingest.stop().await;
}

/// PostgreSQL goes away between a round's PubAcks and its commit, for longer than
/// JetStream's duplicate window: the round that claims the rows again marks them with
/// the sequences those acks gave and publishes nothing again. Until 2026-12-06 it
/// published them again, JetStream kept the copies (its window had passed), and a
/// projector whose dedup horizon had passed too (15 minutes of outage) would have
/// counted each reading twice.
#[tokio::test]
async fn rows_acknowledged_but_not_marked_are_marked_again_not_published_again() {
    acked_rows_whose_mark_failed(&TestEnv::new(), &[], async || {}, async || {}).await;
}

/// The acks of rows a round could not mark outlast a NATS reconnect: the round got its
/// acks, PostgreSQL went away under its mark, and NATS restarted (its store kept) before
/// PostgreSQL came back, past JetStream's duplicate window. The rows are marked with the
/// sequences their first publish got, once the stream is seen to hold them there, not
/// published again. Until 2026-12-07 the reconnect forgot the acks, and the stream held
/// every row twice.
#[tokio::test]
async fn acks_of_rows_not_marked_outlast_a_nats_restart() {
    let mut server = testkit::PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = server.url();
    acked_rows_whose_mark_failed(
        &env,
        &[],
        async || {
            // A clean stop: the server keeps what it stored.
            server.stop();
            server.restart();
            // The relay and the test connected again, while PostgreSQL is still away.
            server.wait_for_clients(2).await;
        },
        async || {},
    )
    .await;
}

/// The acks of rows a round could not mark wait for their check for as long as NATS
/// cannot answer it: once PostgreSQL is back the server stops answering (frozen, its
/// connections open) for 24 s, past three rounds' 2 s check deadlines (a session
/// timeout of 3 s) and the backoff between them (5 s at most), and then goes on, past
/// JetStream's duplicate window. The rows are marked with the sequences their first
/// publish got. Until 2026-12-07 a row whose check failed in three rounds was published
/// again, and the stream held it twice.
#[tokio::test]
async fn remembered_acks_nats_cannot_check_for_rounds_wait_for_their_check() {
    let server = testkit::PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = server.url();
    acked_rows_whose_mark_failed(
        &env,
        &[("PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS", "3000")],
        async || {},
        async || {
            server.freeze();
            // A duration that must pass: three rounds' checks running out meanwhile.
            tokio::time::sleep(Duration::from_secs(24)).await;
            server.thaw();
        },
    )
    .await;
}

/// Relays 20 rows with JetStream's duplicate window at 1 s, so that their round gets
/// its acks and PostgreSQL then goes away under its mark (its commit fails); runs
/// `meanwhile` while PostgreSQL is away, which stays away past the duplicate window, and
/// `afterwards` once it is back; then checks that every row was marked with the
/// sequence its first publish got and none was published again. The relay gets
/// `relay_env` besides.
async fn acked_rows_whose_mark_failed(
    env: &TestEnv,
    relay_env: &[(&str, &str)],
    meanwhile: impl AsyncFnOnce(),
    afterwards: impl AsyncFnOnce(),
) {
    const READINGS: usize = 20;
    let (ingest, db) = readings_with_marking_stalled(env, READINGS).await;
    // Killed when dropped, so that a failing assertion leaves no relay behind.
    let relay = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_relay"),
        env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[&[("PIPELINE__NATS__DUPLICATE_WINDOW_SECS", "1")], relay_env].concat(),
    );
    let jetstream = env.jetstream().await;
    wait_for_stream_messages(&jetstream, env.subjects.stream(), READINGS as u64).await;
    wait_for_session(
        &db,
        "the round's mark stalled",
        "query LIKE '%UPDATE outbox%' AND wait_event = 'PgSleep'",
    )
    .await;
    let publish_rounds = || async {
        testkit::prometheus::scrape(&relay.http, &format!("{}/metrics", relay.base_url))
            .await
            .expect("the relay's metrics")
            .value_or_zero("relay_publish_seconds_count", &[])
    };
    let rounds_that_published = publish_rounds().await;
    // The round has its acks and waits in its mark. The stall ends for later rounds
    // (replacing the function takes no lock on the table), and PostgreSQL goes away
    // under the stalled one: its commit fails.
    db.batch_execute(
        "CREATE OR REPLACE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RETURN NULL; END $$;",
    )
    .await
    .expect("stall ended for later rounds");
    close_database(env).await;
    meanwhile().await;
    // JetStream's duplicate window must pass before the rows can be claimed again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    reopen_database(env).await;
    afterwards().await;

    let db = env.postgres().await;
    wait_until_all_marked(&db).await;
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        Some(READINGS as u64),
        "no row was published again"
    );
    let sequences: Vec<i64> =
        column(&db, "SELECT stream_seq FROM outbox ORDER BY stream_seq").await;
    assert_eq!(
        sequences,
        (1..=READINGS as i64).collect::<Vec<_>>(),
        "each row marked with the sequence its first publish got"
    );
    assert_eq!(
        publish_rounds().await,
        rounds_that_published,
        "a round that only marked remembered acks is no publish in relay_publish_seconds"
    );
    let status = relay.terminate().await;
    assert_eq!(status.code(), Some(0), "the relay exits 0 after SIGTERM");
    ingest.stop().await;
}

/// Whether the relay listens for ingest's NOTIFYs shows: `relay_listening` is 1 while it
/// listens and 0 while its database refuses it (new rows then wait for the poll), and
/// the first failure is one WARN line, listening again one INFO line. Until 2026-12-07
/// a listen connection that failed was logged at debug, a failed `LISTEN` not at all.
#[tokio::test]
async fn the_relay_says_whether_it_listens_for_notifications() {
    let env = TestEnv::new();
    migrate(&env).await;
    let (relay, log) = ServiceProcess::spawn_logged(
        env!("CARGO_BIN_EXE_relay"),
        &env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[("PIPELINE__LOG__FORMAT", "json")],
    );
    relay.ready().await;
    let listening = |value: f64| {
        move |scrape: &Scrape| (scrape.value("relay_listening", &[]) == Some(value)).then_some(())
    };
    relay
        .metrics_until(Duration::from_secs(10), "listening", listening(1.0))
        .await;
    close_database(&env).await;
    relay
        .metrics_until(Duration::from_secs(20), "not listening", listening(0.0))
        .await;
    reopen_database(&env).await;
    relay
        .metrics_until(Duration::from_secs(20), "listening again", listening(1.0))
        .await;

    let lines = testkit::process::log_lines_until(
        &log,
        Duration::from_secs(10),
        "the relay logged listening again",
        |line| line.contains("listening for outbox notifications again"),
    );
    let levels = |message: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|line| line.contains(message))
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .map(|entry| entry["level"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        levels("outbox listen failed;"),
        ["WARN"],
        "the first failure"
    );
    assert_eq!(
        levels("listening for outbox notifications again"),
        ["INFO"],
        "the recovery"
    );
    assert!(relay.terminate().await.success());
}

#[tokio::test]
async fn expired_keys_and_published_rows_are_pruned_and_a_key_may_be_used_again() {
    let mut env = TestEnv::new();
    env.settings.ingest.idempotency_retention_secs = 1;
    env.settings.relay.published_retention_secs = 1;
    env.settings.relay.prune_interval_ms = 200;
    // Published rows are pruned only past their retention at the last stream check
    // that saw the stream hold them.
    env.settings.relay.stream_check_interval_ms = 200;
    // Long enough that the first reading is still there once its key went, however
    // slowly a loaded box starts the relay and prunes.
    env.settings.ingest.reading_retention_secs = 15;
    let ingest = Ingest::spawn(&env.settings).await;
    let first: Value = ingest
        .accept("k-1", &reading("sensor-1", 1.0))
        .await
        .json()
        .await
        .expect("json");
    let relay = spawn_relay(&env.settings);
    let db = env.postgres().await;
    wait_for_counts(
        &db,
        Duration::from_secs(20),
        "key and published row pruned",
        "SELECT (SELECT count(*) FROM idempotency_keys), (SELECT count(*) FROM outbox)",
        &[0, 0],
    )
    .await;
    // After its retention the key is free: another reading under it is a new reading.
    let again = ingest.accept("k-1", &reading("sensor-1", 2.0)).await;
    assert!(again.headers().get("idempotent-replayed").is_none());
    let again: Value = again.json().await.expect("json");
    assert_ne!(again["event_id"], first["event_id"]);
    let readings: i64 = db
        .query_one("SELECT count(*) FROM readings", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(readings, 2, "readings outlive their keys");
    // Readings go too once they are past their own (here 15 s) retention.
    wait_for_counts(
        &db,
        Duration::from_secs(45),
        "readings pruned",
        "SELECT count(*) FROM readings",
        &[0],
    )
    .await;
    relay.stop().await;
    ingest.stop().await;
}

#[tokio::test]
async fn the_relay_vacuums_the_tables_it_pruned_so_their_space_is_reused() {
    let mut env = TestEnv::new();
    env.settings.ingest.idempotency_retention_secs = 1;
    env.settings.relay.published_retention_secs = 1;
    env.settings.relay.prune_interval_ms = 200;
    // Published rows are pruned only past their retention at the last stream check
    // that saw the stream hold them.
    env.settings.relay.stream_check_interval_ms = 200;
    // A vacuum is due once a prune_batch of rows was deleted (and a fifth of the table).
    env.settings.relay.prune_batch = 2;
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept_readings(3).await;
    let relay = spawn_relay(&env.settings);
    let db = env.postgres().await;
    // The statistics count every vacuum, whoever ran it; autovacuum is off on the
    // project's CI server, and with it on it would not come within seconds.
    eventually(
        Duration::from_secs(20),
        "outbox and idempotency_keys vacuumed",
        || async {
            let rows = db
                .query(
                    "SELECT relname::text, vacuum_count FROM pg_stat_user_tables
                     WHERE relname IN ('outbox', 'idempotency_keys')",
                    &[],
                )
                .await
                .ok()?;
            (rows.len() == 2 && rows.iter().all(|row| row.get::<_, i64>(1) > 0)).then_some(())
        },
    )
    .await;
    relay.stop().await;
    ingest.stop().await;
}

/// Pruning has to learn from the time columns' indexes that nothing is past the
/// retention: the statements' first plans read each table whole instead, on every prune
/// (PostgreSQL expected a third of the rows to match; 1.2 s for a 6M-row outbox, every
/// 10 s). The tables here hold 100,000 recent rows each, never analyzed, as a young or
/// caught-up pipeline's are; the statistics count each sequential and index scan.
#[tokio::test]
async fn pruning_with_nothing_past_the_retention_reads_no_table_whole() {
    let mut env = TestEnv::new();
    env.settings.relay.prune_interval_ms = 200;
    env.settings.ingest.reading_retention_secs = 3600;
    migrate(&env).await;
    let db = env.postgres().await;
    db.batch_execute(
        "INSERT INTO outbox (event_id, device_id, payload, published_at)
             SELECT gen_random_uuid(), 'sensor-' || g % 1000, '\\x00', now()
             FROM generate_series(1, 100000) AS g;
         INSERT INTO idempotency_keys (device_id, idempotency_key, fingerprint, event_id, status_code, response_body)
             SELECT 'sensor-' || g % 1000, 'k-' || g, '\\x00', gen_random_uuid(), 202, ''
             FROM generate_series(1, 100000) AS g;
         INSERT INTO readings (event_id, device_id, recorded_at, received_at, metrics)
             SELECT gen_random_uuid(), 'sensor-' || g % 1000, now(), now(), '{}'
             FROM generate_series(1, 100000) AS g;",
    )
    .await
    .expect("recent rows inserted");
    let scans = "SELECT t.relname::text, t.seq_scan, i.idx_scan
                 FROM pg_stat_user_tables t JOIN pg_stat_user_indexes i USING (relid)
                 WHERE i.indexrelname IN
                     ('outbox_published_at', 'idempotency_keys_created_at', 'readings_received_at')
                 ORDER BY 1";
    let seq_scans = |rows: &[tokio_postgres::Row]| -> Vec<(String, i64)> {
        rows.iter().map(|row| (row.get(0), row.get(1))).collect()
    };
    let before = seq_scans(&db.query(scans, &[]).await.expect("scan statistics"));
    assert_eq!(
        before.len(),
        3,
        "the three pruned tables and their time indexes"
    );
    let relay = spawn_relay(&env.settings);
    // Prunes run every 2 s at most (with the backlog report); two through each index.
    let after = eventually(
        Duration::from_secs(30),
        "each pruned table's time index used by two prunes",
        || async {
            let rows = db.query(scans, &[]).await.ok()?;
            rows.iter()
                .all(|row| row.get::<_, i64>(2) >= 2)
                .then(|| seq_scans(&rows))
        },
    )
    .await;
    assert_eq!(after, before, "no sequential scan of a pruned table");
    let kept = count(&db, "outbox").await
        + count(&db, "idempotency_keys").await
        + count(&db, "readings").await;
    assert_eq!(kept, 300_000, "nothing within its retention was pruned");
    relay.stop().await;
}

/// Claims start at a floor below which every row is published (`relay::claim_floor`).
/// A row whose transaction is still open while rows with higher ids are published must
/// keep the floor below it and go out as soon as it commits — not only after the next
/// stream check, which resets the floor (a minute away here).
#[tokio::test]
async fn a_row_committed_after_later_rows_were_published_goes_out_at_once() {
    let mut env = TestEnv::new();
    env.settings.relay.stream_check_interval_ms = 60_000;
    env.settings.relay.poll_interval_ms = 100;
    let ingest = Ingest::spawn(&env.settings).await;
    let relay = spawn_relay(&env.settings);
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    let straggler = env.postgres().await;
    straggler
        .batch_execute(
            "BEGIN;
             INSERT INTO outbox (event_id, device_id, payload)
             VALUES (gen_random_uuid(), 'sensor-late', convert_to('{}', 'UTF8'));",
        )
        .await
        .expect("an outbox row inserted in an open transaction");
    // Rows with higher ids, published over many rounds while it stays open.
    for index in 0..10 {
        ingest
            .accept(&format!("k-{index}"), &reading("sensor-1", index as f64))
            .await;
        wait_for_stream_messages(&jetstream, &stream, index + 1).await;
    }
    published_once_committed(&env, &straggler, &jetstream, 11).await;
    relay.stop().await;
    ingest.stop().await;
}

/// Commits `session`'s open transaction and waits until the test's stream holds
/// `messages`: the row it committed must go out at once, not at the next stream check
/// (a minute away in these tests). Then waits until every row is marked published (a
/// round marks its rows after the PubAcks, so the stream knows first).
async fn published_once_committed(
    env: &TestEnv,
    session: &tokio_postgres::Client,
    jetstream: &jetstream::Context,
    messages: u64,
) {
    session.batch_execute("COMMIT").await.expect("commit");
    let committed = Instant::now();
    wait_for_stream_messages(jetstream, env.subjects.stream(), messages).await;
    assert!(
        committed.elapsed() < Duration::from_secs(10),
        "published {:?} after its commit: it waited for a stream check",
        committed.elapsed()
    );
    wait_until_all_marked(&env.postgres().await).await;
}

/// The claim floor waits for every transaction that held an id when its bound was
/// probed. A snapshot's `xmax` is one past the latest transaction *completed*, not the
/// next id to be handed out: a transaction that took its id after the latest completed
/// one and is still open lies below neither that `xmax` nor the `xmin` of the probes
/// after it. Here `younger` takes its id after `older`, draws a lower outbox id, and
/// stays open while `older`'s row is published; its row must go out as soon as it
/// commits, not at the next stream check (a minute away).
///
/// It failed (published only at the stream check) while a bound matured at its
/// snapshot's `xmax` — when no other transaction of the cluster completes meanwhile,
/// as on a box running this test alone: any that does lifts the `xmax` past `younger`.
#[tokio::test]
async fn a_row_of_a_younger_transaction_still_open_keeps_the_claim_floor_below_it() {
    const ROW: &str = "INSERT INTO outbox (event_id, device_id, payload)
        VALUES (gen_random_uuid(), $1, convert_to('{}', 'UTF8'))";
    let mut env = TestEnv::new();
    env.settings.relay.stream_check_interval_ms = 60_000;
    env.settings.relay.poll_interval_ms = 100;
    migrate(&env).await;
    let relay = spawn_relay(&env.settings);
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    let (older, younger) = (env.postgres().await, env.postgres().await);
    let transaction_id = "SELECT pg_current_xact_id()::text";
    older.batch_execute("BEGIN").await.expect("begin");
    older
        .execute(transaction_id, &[])
        .await
        .expect("older's id");
    younger.batch_execute("BEGIN").await.expect("begin");
    younger
        .execute(transaction_id, &[])
        .await
        .expect("younger's id");
    younger
        .execute(ROW, &[&"sensor-younger"])
        .await
        .expect("younger's row, the lower outbox id");
    older
        .execute(ROW, &[&"sensor-older"])
        .await
        .expect("older's row");
    older.batch_execute("COMMIT").await.expect("commit");
    wait_for_stream_messages(&jetstream, &stream, 1).await;
    // Rounds after the one that published older's row probe on while younger is open.
    tokio::time::sleep(Duration::from_secs(1)).await;
    published_once_committed(&env, &younger, &jetstream, 2).await;
    relay.stop().await;
}

/// Migration 0005: the outbox keeps only the indexes its statements read, and the stream
/// sequence stays unique among published rows (a lost sequence handed out again must
/// still fail the mark, under the name the relay recognises) while unpublished rows,
/// whose sequence is NULL, take no entry in that index.
#[tokio::test]
async fn the_outbox_indexes_only_what_is_read_and_keeps_stream_sequences_unique() {
    let env = TestEnv::new();
    migrate(&env).await;
    let db = env.postgres().await;
    let indexes: Vec<String> = column(
        &db,
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'outbox' ORDER BY 1",
    )
    .await;
    assert_eq!(
        indexes,
        [
            "outbox_pkey",
            "outbox_published_at",
            "outbox_stream_seq",
            "outbox_unpublished"
        ]
    );
    db.batch_execute(
        "INSERT INTO outbox (event_id, device_id, payload)
             SELECT gen_random_uuid(), 'sensor-1', '\\x00' FROM generate_series(1, 3);
         UPDATE outbox SET published_at = now(), stream_seq = 7
             WHERE id = (SELECT min(id) FROM outbox);",
    )
    .await
    .expect("two unpublished rows and one published at sequence 7");
    let collision = db
        .execute(
            "UPDATE outbox SET published_at = now(), stream_seq = 7
             WHERE id = (SELECT max(id) FROM outbox)",
            &[],
        )
        .await
        .expect_err("a second row at sequence 7");
    assert_eq!(
        collision.as_db_error().and_then(|error| error.constraint()),
        Some("outbox_stream_seq")
    );
    let predicate: Option<String> = db
        .query_one(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index
             WHERE indexrelid = 'outbox_stream_seq'::regclass",
            &[],
        )
        .await
        .expect("index predicate")
        .get(0);
    assert_eq!(predicate.as_deref(), Some("(stream_seq IS NOT NULL)"));
}

/// Pacing (`ingest.notify_interval_ms`, `relay.round_interval_ms`): while commits keep
/// bringing several rows, NOTIFYs and rounds are spaced out and each round takes what
/// gathered meanwhile; single rows with pauses between them go out at once.
#[tokio::test]
async fn busy_rounds_are_spaced_out_and_single_rows_go_out_at_once() {
    const INTERVAL_MS: u64 = 1_000;
    let mut env = TestEnv::new();
    env.settings.ingest.notify_interval_ms = INTERVAL_MS;
    env.settings.relay.round_interval_ms = INTERVAL_MS;
    // Only NOTIFYs wake the relay: no poll, no stream check between rounds.
    env.settings.relay.poll_interval_ms = 60_000;
    env.settings.relay.stream_check_interval_ms = 60_000;
    env.settings.ingest.rate_limit_per_second = 0;
    let ingest = Ingest::spawn(&env.settings).await;
    let relay = spawn_relay(&env.settings);
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    let db = env.postgres().await;

    // Busy: 30 commits of 5 rows, one every 60 ms. Unpaced, each would be a round.
    const COMMITS: usize = 30;
    let busy_since = std::time::Instant::now();
    for commit in 0..COMMITS {
        let readings: Vec<Value> = (0..5)
            .map(|item| {
                serde_json::json!({
                    "idempotency_key": format!("busy-{commit}-{item}"),
                    "device_id": format!("sensor-{item}"),
                    "metrics": {"temperature": commit as f64},
                })
            })
            .collect();
        let response = ingest
            .post_batch(&serde_json::json!({ "readings": readings }))
            .await;
        assert_eq!(response.status().as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let busy_for = busy_since.elapsed();
    let busy_rows = (COMMITS * 5) as u64;
    wait_for_stream_messages(&jetstream, &stream, busy_rows).await;
    wait_until_all_marked(&db).await;
    // A round marks its rows with its transaction's now(): one published_at per round.
    let rounds: i64 = db
        .query_one("SELECT count(DISTINCT published_at) FROM outbox", &[])
        .await
        .expect("rounds")
        .get(0);
    // Paced, a round starts at most once an interval while commits come, plus the
    // first commit's and the one after the last (and one to spare): a bound from the
    // span the commits took (~1.8 s idle, more on a loaded box), not a fixed count.
    let paced_rounds = (busy_for.as_millis() / u128::from(INTERVAL_MS)) as i64 + 3;
    assert!(
        paced_rounds < COMMITS as i64 / 2,
        "the commits took {busy_for:?}: too slow to tell paced rounds from one per commit"
    );
    assert!(
        rounds <= paced_rounds,
        "{COMMITS} commits over {busy_for:?} went out in {rounds} rounds; paced at {INTERVAL_MS} ms they take at most {paced_rounds}"
    );

    // Light: single rows, 300 ms apart, after a quiet spell longer than the interval.
    tokio::time::sleep(Duration::from_millis(INTERVAL_MS + 200)).await;
    for index in 0..6u64 {
        ingest
            .accept(
                &format!("single-{index}"),
                &reading("sensor-single", index as f64),
            )
            .await;
        wait_for_stream_messages(&jetstream, &stream, busy_rows + index + 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until_all_marked(&db).await;
    // Each row's wait as the database saw it, from its commit's start to its round's:
    // held back, it would wait for the interval since the round before (600-700 ms);
    // the test's own polling of the stream is left out.
    let mut waits: Vec<f64> = column(
        &db,
        "SELECT EXTRACT(EPOCH FROM published_at - created_at)::float8 FROM outbox
         WHERE device_id = 'sensor-single'",
    )
    .await;
    waits.sort_by(f64::total_cmp);
    let median = waits[waits.len() / 2];
    assert!(
        median < INTERVAL_MS as f64 / 2_000.0,
        "single rows waited {waits:?} s: a light round must not make the next one wait"
    );
    relay.stop().await;
    ingest.stop().await;
}

/// Posts `batches` batches of `per_batch` readings over 100 devices, keys
/// `<prefix>-<batch>-<item>` (with the rate limit off, as [`TestEnv`] has it).
pub async fn post_batches(ingest: &Ingest, prefix: &str, batches: usize, per_batch: usize) {
    for batch in 0..batches {
        let response = ingest
            .post_batch(&batch_body(&format!("{prefix}-{batch}"), per_batch, 100))
            .await;
        assert_eq!(response.status().as_u16(), 200);
        let answer: Value = response.json().await.expect("json");
        assert_eq!(answer["accepted"], per_batch, "batch {batch}: {answer}");
    }
}

/// A row JetStream refuses for good (here larger than the `max_msg_size` an operator
/// gave the stream, which the relay keeps) stays in the outbox and does not hold the
/// others back. Claimed first in every round (the claim goes by id), it failed each of
/// them, and every failed round backed off: until 2026-12-07 the relay crawled through
/// the rest a round per backoff (up to 5 s each), and here needed about a minute.
#[tokio::test]
async fn a_row_jetstream_refuses_for_good_does_not_hold_the_others_back() {
    const BATCHES: usize = 30;
    const PER_BATCH: usize = 100;
    const ROWS: i64 = (BATCHES * PER_BATCH) as i64;
    let mut env = TestEnv::new();
    env.settings.relay.batch_size = 100;
    migrate(&env).await;
    let jetstream = env.jetstream().await;
    jetstream
        .create_stream(jetstream::stream::Config {
            name: env.subjects.stream().to_owned(),
            subjects: vec![env.subjects.recorded_filter()],
            max_message_size: 1024,
            ..Default::default()
        })
        .await
        .expect("the stream made beforehand, small messages only");
    let ingest = Ingest::spawn(&env.settings).await;
    // 32 metrics of 64-character names: an event of about 3 KB, the oldest row.
    let metrics: serde_json::Map<String, Value> = (0..32)
        .map(|index| (format!("m{index:02}{}", "x".repeat(61)), Value::from(index)))
        .collect();
    ingest
        .accept(
            "large",
            &serde_json::json!({"device_id": "sensor-1", "metrics": metrics}),
        )
        .await;
    post_batches(&ingest, "k", BATCHES, PER_BATCH).await;

    let relay = spawn_relay(&env.settings);
    let db = env.postgres().await;
    // Every row but the refused one.
    wait_for_outbox(&db, Duration::from_secs(15), ROWS, 1).await;
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        Some(ROWS as u64)
    );
    relay.stop().await;
    ingest.stop().await;
}

/// async-nats gives a JetStream context 5,000 ack permits unless told otherwise, and a
/// publish waits for one, which the PubAck returns when it is awaited; a round publishes
/// all its rows before it awaits an ack. Rounds that publish more than 5,000 rows between
/// them (`batch_size` × `rounds_in_flight`) could each hold part of the permits and wait
/// for the rest for good: nothing was marked again, `/readyz` stayed 200 and a stop was
/// never heard. A round of more than 5,000 rows does so by itself, every time.
#[tokio::test]
async fn rounds_that_publish_more_than_5000_rows_before_their_acks_relay_every_row() {
    // Two rounds claiming side by side split the rows they find between them: more
    // than twice a round's rows, so that each claims a full one.
    const BATCHES: usize = 13;
    const PER_BATCH: usize = 1_000;
    const ROWS: i64 = (BATCHES * PER_BATCH) as i64;
    let mut env = TestEnv::new();
    env.settings.ingest.rate_limit_per_second = 0;
    env.settings.relay.batch_size = 6_000;
    let ingest = Ingest::spawn(&env.settings).await;
    // Before the relay starts: its first rounds are full.
    post_batches(&ingest, "k", BATCHES, PER_BATCH).await;
    let relay = spawn_relay(&env.settings);
    let db = env.postgres().await;
    wait_until_marked(&db, ROWS).await;
    let jetstream = env.jetstream().await;
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        Some(ROWS as u64),
        "one message per row"
    );
    relay
        .stop_within(Duration::from_secs(3), "the relay after its rounds")
        .await;
    ingest.stop().await;
}

/// A relay that cannot make its stream, or bring it up to date, can publish nothing, and
/// says so: `/readyz` names `nats` though the connection is up (API.md §7). Here the
/// stream was made beforehand in memory, a storage no update can change; once it is
/// gone the relay makes it (on file) and is ready.
#[tokio::test]
async fn a_relay_that_cannot_bring_its_stream_up_to_date_is_not_ready_until_it_can() {
    let config = a_stream_made_beforehand(jetstream::stream::Config {
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await;
    assert_eq!(config.storage, jetstream::stream::StorageType::File);
}

/// A stream made beforehand with work-queue retention drops each event the projector
/// acks, and the relay's stream check then finds its newest published row missing and
/// publishes it again, for good. No update makes a work-queue stream a limits one: the
/// relay is not ready until the stream is gone, and makes it again with limits
/// retention.
#[tokio::test]
async fn a_stream_made_beforehand_with_work_queue_retention_keeps_the_relay_not_ready() {
    let config = a_stream_made_beforehand(jetstream::stream::Config {
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await;
    assert_eq!(config.retention, jetstream::stream::RetentionPolicy::Limits);
}

/// Makes the test's stream with `shape` (on file unless it says otherwise) before a
/// relay starts, waits for the relay to say `nats` is not ready, deletes the stream and
/// waits for the relay to make it and be ready; the stream's settings then. On a
/// server of the test's own, so that the relay is seen connected before its readiness
/// is read.
async fn a_stream_made_beforehand(shape: jetstream::stream::Config) -> jetstream::stream::Config {
    let server = testkit::PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = server.url();
    migrate(&env).await;
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    jetstream
        .create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![env.subjects.recorded_filter()],
            ..shape
        })
        .await
        .expect("a stream made beforehand");
    let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
    // The test's own client and the relay's.
    server.wait_for_clients(2).await;
    testkit::settled_readiness(&admin_url, Some("nats")).await;

    jetstream.delete_stream(&stream).await.expect("deleted");
    // The relay retries with a backoff of at most 5 s.
    testkit::settled_readiness_within(&admin_url, None, Duration::from_secs(20)).await;
    let mut made = jetstream.get_stream(&stream).await.expect("stream made");
    let config = made.info().await.expect("stream info").config.clone();
    relay.stop().await;
    config
}

/// A NATS server without JetStream takes the relay's connection, but nothing can be
/// published through it: the relay is ready only while its server runs JetStream, at
/// the start and after the server was restarted without it.
#[tokio::test]
async fn a_relay_is_ready_only_while_its_nats_server_runs_jetstream() {
    let mut server = testkit::PrivateNats::start_without_jetstream();
    let mut env = TestEnv::new();
    env.settings.nats.url = server.url();
    migrate(&env).await;
    let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
    // Connected, and not ready all the same.
    server.wait_for_clients(1).await;
    testkit::settled_readiness(&admin_url, Some("nats")).await;

    server.restart_with_jetstream(true);
    // The relay retries making its streams with a backoff of at most 5 s.
    testkit::settled_readiness_within(&admin_url, None, Duration::from_secs(20)).await;

    server.restart_with_jetstream(false);
    server.wait_for_clients(1).await;
    testkit::settled_readiness(&admin_url, Some("nats")).await;
    relay
        .stop_within(
            Duration::from_secs(3),
            "the relay on NATS without JetStream",
        )
        .await;
}

/// A relay whose every publish JetStream refuses relays nothing, and says so: `/readyz`
/// names `nats` once none has got through for `PUBLISHES_REFUSED_UNREADY`, though
/// JetStream answers, and is 200 again once they do. Here the operator capped the stream
/// at one message under `discard new`; until 2026-12-07 the relay said ready
/// throughout while the outbox grew.
#[tokio::test]
async fn a_relay_whose_publishes_are_all_refused_is_not_ready_until_they_get_through() {
    let refused = Refused::start().await;
    let mut config = refused.config.clone();
    config.max_messages = -1;
    refused
        .jetstream
        .update_stream(&config)
        .await
        .expect("uncapped");
    // The next round, after a backoff of at most 5 s, gets them through.
    testkit::settled_readiness_within(&refused.admin_url, None, Duration::from_secs(20)).await;
    wait_until_marked(&refused.db, 3).await;
    assert_eq!(
        stream_messages(&refused.jetstream, refused.env.subjects.stream()).await,
        Some(3)
    );
    refused.stop().await;
}

/// A relay not ready for its refused publishes is ready again once nothing waits in the
/// outbox, whoever published the rows: another relay may have, after the operator
/// lifted the cap, while this one's claims found them taken, and no round of its own
/// came to clear the refusals (on a quiet night, none would). The rows go here as if
/// published elsewhere; the cap stays.
#[tokio::test]
async fn a_relay_not_ready_for_refused_publishes_is_ready_again_once_nothing_waits() {
    let refused = Refused::start().await;
    refused
        .db
        .batch_execute("DELETE FROM outbox WHERE published_at IS NULL")
        .await
        .expect("the waiting rows gone");
    // The backlog gauge, every 2 s, finds the outbox empty.
    testkit::settled_readiness_within(&refused.admin_url, None, Duration::from_secs(10)).await;
    refused.stop().await;
}

/// A relay (in the test's process) whose stream the operator capped at one message under
/// `discard new` once it was ready, with three readings posted: the first published, two
/// refused, and `/readyz` naming `nats`, but only after the refusals lasted
/// `PUBLISHES_REFUSED_UNREADY`.
struct Refused {
    env: TestEnv,
    ingest: Ingest,
    relay: Running<anyhow::Result<()>>,
    admin_url: String,
    jetstream: jetstream::Context,
    /// The stream's settings as capped.
    config: jetstream::stream::Config,
    db: tokio_postgres::Client,
}

impl Refused {
    async fn start() -> Self {
        let env = TestEnv::new();
        let ingest = Ingest::spawn(&env.settings).await;
        let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
        testkit::settled_readiness(&admin_url, None).await;
        let jetstream = env.jetstream().await;
        let mut stream = jetstream
            .get_stream(env.subjects.stream())
            .await
            .expect("the relay made its stream");
        let mut config = stream.info().await.expect("stream info").config.clone();
        config.max_messages = 1;
        config.discard = jetstream::stream::DiscardPolicy::New;
        jetstream.update_stream(&config).await.expect("capped");

        let refusals_from = Instant::now();
        ingest.accept_readings(3).await;
        testkit::settled_readiness_within(&admin_url, Some("nats"), Duration::from_secs(40)).await;
        assert!(
            refusals_from.elapsed() >= ingest::relay::PUBLISHES_REFUSED_UNREADY,
            "not ready only once the publishes failed for a while"
        );
        let db = env.postgres().await;
        let unpublished: i64 = db
            .query_one(UNPUBLISHED, &[])
            .await
            .expect("unpublished rows")
            .get(0);
        assert_eq!(unpublished, 2, "the two refused rows wait");
        Self {
            env,
            ingest,
            relay,
            admin_url,
            jetstream,
            config,
            db,
        }
    }

    async fn stop(self) {
        self.relay.stop().await;
        self.ingest.stop().await;
    }
}

/// A relay newer than the schema (a database not yet migrated, or behind) fails every
/// claim, and says so as ingest does: `/readyz` names `postgres` until the migrations
/// ran, then 200. Until 2026-12-07 its `SELECT 1` answered, and it said ready while it
/// published nothing.
#[tokio::test]
async fn a_relay_is_not_ready_until_the_schema_holds_its_migrations() {
    let env = TestEnv::new();
    create_empty_database(&env).await;
    let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
    testkit::settled_readiness(&admin_url, Some("postgres")).await;
    migrate(&env).await;
    testkit::settled_readiness(&admin_url, None).await;
    relay.stop().await;
}

/// A readiness check given up at its second is cancelled, as any statement given up on
/// the pool is (`db::on_pooled`): here the schema check waits on a lock an operator's
/// session holds, `/readyz` answers its 503 within the second, and no session of the
/// relay is left waiting behind the lock, where the next round's statements would have
/// queued on its connection. Once the lock goes, the relay is ready.
#[tokio::test]
async fn a_readiness_check_given_up_leaves_no_statement_waiting_on_the_pool() {
    let env = TestEnv::new();
    migrate(&env).await;
    let mut operator = env.postgres().await;
    let holding = operator.transaction().await.expect("a transaction");
    holding
        .batch_execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("the lock");
    let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
    testkit::settled_readiness(&admin_url, Some("postgres")).await;
    let watcher = env.postgres().await;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND query LIKE '%FROM schema_migrations%' AND wait_event_type = 'Lock'
                   AND pid <> pg_backend_pid()";
    eventually(
        Duration::from_secs(5),
        "the given-up checks cancelled",
        || async {
            let sessions: i64 = watcher.query_one(waiting, &[]).await.ok()?.get(0);
            (sessions == 0).then_some(())
        },
    )
    .await;
    holding.rollback().await.expect("the lock released");
    testkit::settled_readiness(&admin_url, None).await;
    relay.stop().await;
}

/// Creates the test's database, with nothing in it (no migration ran).
async fn create_empty_database(env: &TestEnv) {
    let database = &env.database;
    testkit::maintenance_postgres(&env.settings)
        .await
        .expect("the server")
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await
        .expect("an empty test database");
}

/// A database URL's own `options` hold for the relay's sessions as for ingest's: the
/// relay adds its settings to them. Here they put the pipeline's tables in a schema of
/// their own; the relay's pool dropped them, looked for `outbox` in `public`, and
/// published nothing while ingest answered 202.
#[tokio::test]
async fn the_relay_keeps_the_options_of_the_database_url() {
    let mut env = TestEnv::new();
    create_empty_database(&env).await;
    env.postgres()
        .await
        .batch_execute("CREATE SCHEMA telemetry")
        .await
        .expect("a schema");
    env.settings.database.url += "?options=-c%20search_path%3Dtelemetry";
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("k-1", &reading("sensor-1", 1.0)).await;
    let db = env.postgres().await;
    let outbox: String = db
        .query_one(
            "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'outbox'::regclass",
            &[],
        )
        .await
        .expect("outbox found")
        .get(0);
    let public: Option<String> = db
        .query_one("SELECT to_regclass('public.outbox')::text", &[])
        .await
        .expect("to_regclass")
        .get(0);
    assert_eq!(
        (outbox.as_str(), public),
        ("telemetry", None),
        "ingest made its tables in the URL's schema only"
    );
    let relay = spawn_relay(&env.settings);
    wait_for_stream_messages(&env.jetstream().await, env.subjects.stream(), 1).await;
    wait_until_marked(&db, 1).await;
    relay.stop().await;
    ingest.stop().await;
}

/// A stop does not wait for a prune: here its delete waits on a lock that is never
/// released while the relay runs (as it would work through hours of rows past their
/// retention, or vacuum a large table). The stop cancels the statement under way.
#[tokio::test]
async fn a_stop_does_not_wait_for_a_prune_under_way() {
    let mut env = TestEnv::new();
    env.settings.relay.prune_interval_ms = 200;
    migrate(&env).await;
    let mut blocker = env.postgres().await;
    let lock = testkit::lock_table(&mut blocker, "idempotency_keys").await;
    let relay = spawn_relay(&env.settings);
    let db = env.postgres().await;
    eventually(
        Duration::from_secs(20),
        "a prune waiting on the lock",
        || async {
            (!testkit::lock_waiter_pids(&db, "DELETE FROM idempotency_keys")
                .await
                .is_empty())
            .then_some(())
        },
    )
    .await;
    relay
        .stop_within(Duration::from_secs(3), "a stop while a prune waits")
        .await;
    eventually(
        Duration::from_secs(5),
        "the prune's delete cancelled",
        || async {
            testkit::lock_waiter_pids(&db, "DELETE FROM idempotency_keys")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    drop(lock);
}

/// The relay owns some of its stream's settings (subjects, storage, retention, acks,
/// age limit, duplicate window, description) and brings them up to date at every start;
/// the others are the operator's (`nats stream edit`). It used to send every other
/// setting as its default: a stream limited in bytes lost its limit (and one of three
/// replicas would have gone down to one). A stream made with `no_ack` stored every
/// publish unanswered, so the relay marked nothing and published each row again every
/// round; acks are turned on.
#[tokio::test]
async fn the_relay_keeps_the_stream_settings_it_does_not_own() {
    const MAX_BYTES: i64 = 64 << 20;
    let env = TestEnv::new();
    migrate(&env).await;
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    jetstream
        .create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![env.subjects.recorded_filter()],
            storage: jetstream::stream::StorageType::File,
            max_age: Duration::from_secs(60),
            max_bytes: MAX_BYTES,
            deny_delete: true,
            no_ack: true,
            ..Default::default()
        })
        .await
        .expect("a stream made beforehand");
    // A dead-letter stream made with the server's 2-minute duplicate window, as the
    // relay made it until 2026-12-07.
    let dlq = env.subjects.dlq_stream();
    jetstream
        .create_stream(jetstream::stream::Config {
            name: dlq.clone(),
            subjects: vec![env.subjects.dlq_filter()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("a dead-letter stream made beforehand");
    let (relay, admin_url) = spawn_relay_with_admin(&env.settings);
    testkit::settled_readiness(&admin_url, None).await;
    let dlq_window = jetstream
        .get_stream(&dlq)
        .await
        .expect("the dead-letter stream")
        .cached_info()
        .config
        .duplicate_window;
    let config = jetstream
        .get_stream(&stream)
        .await
        .expect("the stream")
        .cached_info()
        .config
        .clone();
    relay.stop().await;
    assert_eq!(
        (config.max_bytes, config.deny_delete),
        (MAX_BYTES, true),
        "the operator's settings are kept"
    );
    assert_eq!(
        (config.max_age, config.duplicate_window),
        (
            Duration::from_secs(env.settings.nats.max_age_secs),
            Duration::from_secs(env.settings.nats.duplicate_window_secs)
        ),
        "the relay's settings are brought up to date"
    );
    assert!(!config.no_ack, "publishes are acked");
    assert_eq!(
        dlq_window,
        Duration::from_secs(env.settings.nats.max_age_secs),
        "the dead-letter stream knows a letter's id as long as it keeps letters"
    );
}

//! The relay against a stream that lost messages: a NATS host crash before nats-server
//! 2.9's fsync (simulated on a private server by cutting its message block back), a
//! publish lost with the connection it was written to, a stream deleted and recreated,
//! and a relay paused in the middle of a round.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use contract::settings::{Settings, IDLE_IN_TRANSACTION_MIN_MS};
use futures::{FutureExt, StreamExt};
use testkit::process::{service_command, signal, terminate, KilledOnDrop, ServiceProcess};
use testkit::{eventually, PrivateNats, Running, TestEnv};
use uuid::Uuid;

use crate::relay::{
    post_batches, spawn_relay, spawn_relay_with_admin, stall_marking, stream_messages,
    wait_for_stream_messages, wait_until_marked,
};
use crate::support::{migrate, reading, wait_for_counts, wait_for_session, Ingest};

/// Longer than any test: only the trigger under test may start a stream check.
const NEVER_MS: u64 = 3_600_000;

/// Every message in the stream as (sequence, `Nats-Msg-Id`), read one by one.
async fn stream_contents(
    jetstream: &jetstream::Context,
    stream: &str,
) -> Option<Vec<(u64, String)>> {
    let mut stream = jetstream.get_stream(stream).await.ok()?;
    let state = stream.info().await.ok()?.state.clone();
    let mut contents = Vec::new();
    if state.messages == 0 {
        return Some(contents);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.ok()?;
        let message_id = message.headers.get("Nats-Msg-Id")?.as_str().to_owned();
        contents.push((sequence, message_id));
    }
    Some(contents)
}

/// Every outbox row as (event id, stream sequence if published).
async fn outbox_rows(db: &tokio_postgres::Client) -> Vec<(Uuid, Option<i64>)> {
    db.query("SELECT event_id, stream_seq FROM outbox ORDER BY id", &[])
        .await
        .expect("outbox rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until every outbox row is published and the stream holds each row's event
/// exactly once, at the sequence the row records.
async fn assert_stream_matches_outbox(
    db: &tokio_postgres::Client,
    jetstream: &jetstream::Context,
    stream: &str,
    expected_rows: usize,
) {
    assert_stream_matches_rows_with_a_sequence(db, jetstream, stream, expected_rows, 0).await;
}

/// Waits until the outbox holds `expected_rows`, all but `without_sequence` of them with
/// a stream sequence, and the stream holds the event of each row that has one exactly
/// once, at that sequence, and nothing else.
async fn assert_stream_matches_rows_with_a_sequence(
    db: &tokio_postgres::Client,
    jetstream: &jetstream::Context,
    stream: &str,
    expected_rows: usize,
    without_sequence: usize,
) {
    let (rows, contents) = eventually(
        Duration::from_secs(40),
        "every outbox row published and held by the stream at its sequence",
        || async {
            let rows = outbox_rows(db).await;
            let unsequenced = rows
                .iter()
                .filter(|(_, sequence)| sequence.is_none())
                .count();
            if rows.len() != expected_rows || unsequenced != without_sequence {
                return None;
            }
            let contents = stream_contents(jetstream, stream).await?;
            let by_sequence: HashMap<u64, &str> = contents
                .iter()
                .map(|(sequence, message_id)| (*sequence, message_id.as_str()))
                .collect();
            let all_held = rows.iter().all(|(event_id, sequence)| {
                sequence.is_none()
                    || sequence
                        .and_then(|sequence| u64::try_from(sequence).ok())
                        .and_then(|sequence| by_sequence.get(&sequence))
                        .is_some_and(|message_id| *message_id == event_id.to_string())
            });
            all_held.then_some((rows, contents))
        },
    )
    .await;
    let mut stream_ids: Vec<&str> = contents.iter().map(|(_, id)| id.as_str()).collect();
    stream_ids.sort_unstable();
    let mut outbox_ids: Vec<String> = rows
        .iter()
        .filter(|(_, sequence)| sequence.is_some())
        .map(|(id, _)| id.to_string())
        .collect();
    outbox_ids.sort_unstable();
    assert_eq!(
        stream_ids, outbox_ids,
        "the stream holds every outbox event exactly once and nothing else"
    );
}

/// A pipeline on a private NATS (one a test can crash and cut the stream of) with no
/// periodic stream check, so only the trigger under test starts one, and some readings
/// posted, not yet relayed.
struct OnPrivateNats {
    nats: PrivateNats,
    env: TestEnv,
    ingest: Ingest,
    db: tokio_postgres::Client,
}

/// [`OnPrivateNats`] with `readings` posted.
async fn on_private_nats(readings: usize) -> OnPrivateNats {
    let nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url();
    env.settings.relay.stream_check_interval_ms = NEVER_MS;
    let ingest = Ingest::spawn(&env.settings).await;
    post_readings(&ingest, "before", readings).await;
    let db = env.postgres().await;
    OnPrivateNats {
        nats,
        env,
        ingest,
        db,
    }
}

/// A pipeline whose private NATS lost the tail of the stream after a relay published
/// `before` readings, and `after` readings posted since, not yet relayed; no periodic
/// stream check, so only the trigger under test starts one.
struct Truncated {
    /// Kept for the test's length: dropping it stops the server.
    _nats: PrivateNats,
    env: TestEnv,
    ingest: Ingest,
    db: tokio_postgres::Client,
    /// The stream's last sequence after the restart.
    last_after: u64,
    readings: usize,
}

async fn published_then_truncated(before: usize, after: usize) -> Truncated {
    let OnPrivateNats {
        mut nats,
        env,
        ingest,
        db,
    } = on_private_nats(before).await;
    let relay = spawn_relay(&env.settings);
    wait_until_all_published(&db, before as i64).await;
    relay.stop().await;
    let last_after = nats
        .crash_losing_tail(env.subjects.stream(), before as u64)
        .await;
    post_readings(&ingest, "after", after).await;
    Truncated {
        _nats: nats,
        env,
        ingest,
        db,
        last_after,
        readings: before + after,
    }
}

impl Truncated {
    /// Runs a relay with `settings` until the stream matches the outbox, then stops it.
    async fn relay_until_the_stream_matches(&self, settings: &Settings) {
        let relay = spawn_relay(settings);
        let jetstream = self.env.jetstream().await;
        assert_stream_matches_outbox(
            &self.db,
            &jetstream,
            self.env.subjects.stream(),
            self.readings,
        )
        .await;
        relay.stop().await;
    }
}

/// Posts `count` readings under keys `<prefix>-<n>`.
async fn post_readings(ingest: &Ingest, prefix: &str, count: usize) {
    for index in 0..count {
        ingest
            .accept(
                &format!("{prefix}-{index}"),
                &reading(&format!("sensor-{}", index % 3), index as f64),
            )
            .await;
    }
}

async fn wait_until_all_published(db: &tokio_postgres::Client, rows: i64) {
    wait_for_counts(
        db,
        Duration::from_secs(30),
        "every row published",
        "SELECT count(*) FILTER (WHERE stream_seq IS NOT NULL), count(*) FROM outbox",
        &[rows, rows],
    )
    .await;
}

#[tokio::test]
async fn relay_republishes_what_a_truncated_stream_lost_when_new_events_reuse_the_lost_sequences() {
    const BEFORE_CRASH: usize = 40;
    const AFTER_CRASH: usize = 30;
    // New readings, published by a relay started after the restart, get the sequences
    // the lost events had.
    let truncated = published_then_truncated(BEFORE_CRASH, AFTER_CRASH).await;
    let last_after = truncated.last_after;
    assert!(
        last_after + (AFTER_CRASH as u64) > BEFORE_CRASH as u64,
        "the new events reach past the old last sequence"
    );
    truncated
        .relay_until_the_stream_matches(&truncated.env.settings)
        .await;
    let kept: Vec<i64> = outbox_rows(&truncated.db)
        .await
        .iter()
        .filter_map(|(_, sequence)| *sequence)
        .filter(|sequence| *sequence <= last_after as i64)
        .collect();
    assert_eq!(
        kept.len() as u64,
        last_after,
        "rows the stream kept keep their sequences"
    );
    truncated.ingest.stop().await;
}

#[tokio::test]
async fn relay_repairs_a_loss_when_newer_publishes_were_recorded_before_the_rounds_that_collide() {
    const BEFORE_CRASH: usize = 40;
    let truncated = published_then_truncated(BEFORE_CRASH, 50).await;
    // As a round that published the newest rows and failed to mark them would have left
    // it: their messages fill the lost sequences, the rows stay unpublished.
    let lost = BEFORE_CRASH - truncated.last_after as usize;
    let newest_rows = truncated
        .db
        .query(
            "SELECT event_id, device_id, payload FROM outbox WHERE stream_seq IS NULL
             ORDER BY id DESC LIMIT $1",
            &[&(lost as i64)],
        )
        .await
        .expect("the newest rows");
    let jetstream = truncated.env.jetstream().await;
    for row in &newest_rows {
        let event_id: Uuid = row.get(0);
        let mut message_headers = async_nats::HeaderMap::new();
        message_headers.insert("Nats-Msg-Id", event_id.to_string().as_str());
        jetstream
            .publish_with_headers(
                truncated.env.subjects.recorded(row.get(1)),
                message_headers,
                row.get::<_, Vec<u8>>(2).into(),
            )
            .await
            .expect("publish sent")
            .await
            .expect("publish acknowledged");
    }
    // Small rounds, one at a time: the first ones publish rows past every kept sequence
    // and record them (the newest kept row is then held), the later ones republish the
    // rows above and collide with the rows the stream lost.
    let mut settings = truncated.env.settings.clone();
    settings.relay.batch_size = 5;
    settings.relay.rounds_in_flight = 1;
    truncated.relay_until_the_stream_matches(&settings).await;
    truncated.ingest.stop().await;
}

#[tokio::test]
async fn relays_notice_after_reconnecting_that_the_stream_went_back_and_republish_what_it_lost_once(
) {
    const BEFORE_CRASH: usize = 40;
    // No periodic check: the reconnect must trigger it.
    let OnPrivateNats {
        mut nats,
        env,
        ingest,
        db,
    } = on_private_nats(BEFORE_CRASH).await;
    // Two relays: both check after reconnecting, one repairs.
    let relay = spawn_relay(&env.settings);
    let second_relay = spawn_relay(&env.settings);
    wait_until_all_published(&db, BEFORE_CRASH as i64).await;

    nats.crash_losing_tail(env.subjects.stream(), BEFORE_CRASH as u64)
        .await;
    let jetstream = env.jetstream().await;
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), BEFORE_CRASH).await;

    // And it goes on relaying.
    post_readings(&ingest, "later", 5).await;
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), BEFORE_CRASH + 5).await;
    relay.stop().await;
    second_relay.stop().await;
    ingest.stop().await;
}

/// A pipeline whose private NATS lost the tail of the stream after a relay published
/// `BEFORE_OUTAGE` readings, and stayed down for 4 s while that relay ran on, pruning
/// every 200 ms with a retention of 1 s; `projector_dedup_horizon_secs` is the horizon
/// the relay knows the projector by.
struct AfterAnOutage {
    _nats: PrivateNats,
    env: TestEnv,
    ingest: Ingest,
    db: tokio_postgres::Client,
    relay: Running<anyhow::Result<()>>,
    /// The stream's last sequence after the restart.
    last_after: u64,
}

const BEFORE_OUTAGE: usize = 40;

async fn lost_tail_and_down_for_4_s(projector_dedup_horizon_secs: u64) -> AfterAnOutage {
    let OnPrivateNats {
        mut nats,
        mut env,
        ingest,
        db,
    } = on_private_nats(BEFORE_OUTAGE).await;
    env.settings.relay.published_retention_secs = 1;
    env.settings.relay.prune_interval_ms = 200;
    env.settings.projector.dedup_horizon_secs = projector_dedup_horizon_secs;
    // The horizon must outlast the projector's ack wait, here as in any deployment.
    env.settings.projector.ack_wait_secs = 1;
    let relay = spawn_relay(&env.settings);
    wait_until_all_published(&db, BEFORE_OUTAGE as i64).await;

    // The NATS host crashes before its fsync and stays down while the relay runs on:
    // a duration that must pass, past the retention and the relay's next prune (its
    // maintenance runs every 2 s).
    let cut = nats.crash_cutting_tail(env.subjects.stream());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let last_after = nats
        .restart_after_crash(env.subjects.stream(), BEFORE_OUTAGE as u64, cut)
        .await;
    AfterAnOutage {
        _nats: nats,
        env,
        ingest,
        db,
        relay,
        last_after,
    }
}

#[tokio::test]
async fn what_the_stream_lost_is_republished_after_an_outage_longer_than_the_published_retention() {
    let AfterAnOutage {
        _nats,
        mut env,
        ingest,
        db,
        relay,
        ..
    } = lost_tail_and_down_for_4_s(900).await;
    // The reconnect triggers the check; the rows of the lost events must still be there.
    let jetstream = env.jetstream().await;
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), BEFORE_OUTAGE).await;
    relay.stop().await;

    // Once a check has seen the stream hold them past their retention, they go.
    env.settings.relay.stream_check_interval_ms = 200;
    let relay = spawn_relay(&env.settings);
    wait_for_counts(
        &db,
        Duration::from_secs(20),
        "published rows pruned after a stream check",
        "SELECT count(*) FROM outbox",
        &[0],
    )
    .await;
    relay.stop().await;
    ingest.stop().await;
}

/// Waits until `lost` rows have lost their stream sequence and stay published (not to be
/// published again), and no row is unpublished.
async fn wait_until_the_lost_rows_are_stripped(db: &tokio_postgres::Client, lost: i64) {
    wait_for_counts(
        db,
        Duration::from_secs(30),
        "the lost rows stripped of their sequences, still published",
        "SELECT count(*) FILTER (WHERE stream_seq IS NULL AND published_at IS NOT NULL),
                count(*) FILTER (WHERE published_at IS NULL)
         FROM outbox",
        &[lost, 0],
    )
    .await;
}

#[tokio::test]
async fn lost_events_published_before_the_projectors_dedup_horizon_are_not_republished() {
    // The lost events were published 4 s or more before the repair, past a horizon of
    // 2 s: the projector would no longer know it applied them.
    let AfterAnOutage {
        _nats,
        env,
        ingest,
        db,
        relay,
        last_after,
    } = lost_tail_and_down_for_4_s(2).await;
    let lost = (BEFORE_OUTAGE as u64 - last_after) as i64;
    wait_until_the_lost_rows_are_stripped(&db, lost).await;
    // New events take the lost sequences without colliding with them, and the stream
    // holds each published row at its sequence, the lost ones not again.
    post_readings(&ingest, "later", 5).await;
    wait_for_counts(
        &db,
        Duration::from_secs(30),
        "the new rows published",
        "SELECT count(*) FILTER (WHERE stream_seq IS NOT NULL),
                count(*) FILTER (WHERE published_at IS NULL)
         FROM outbox",
        &[last_after as i64 + 5, 0],
    )
    .await;
    let jetstream = env.jetstream().await;
    assert_stream_matches_rows_with_a_sequence(
        &db,
        &jetstream,
        env.subjects.stream(),
        BEFORE_OUTAGE + 5,
        lost as usize,
    )
    .await;
    relay.stop().await;
    ingest.stop().await;
}

/// Rows the stream check made unpublished again are republished only until their first
/// publish plus 0.9 of the projector's dedup horizon: a copy after that (NATS down again
/// before the next round, no relay running) would count twice in a projector that no
/// longer remembers applying them. The check cleared the first publish time, so
/// whenever the next round came, it published them.
#[tokio::test]
async fn lost_events_a_round_claims_only_past_the_projectors_horizon_are_not_republished() {
    // Long, so that the repair comes well within it on a loaded box; the test then
    // moves the rows' deadline back rather than wait it out.
    const HORIZON_SECS: u64 = 120;
    let OnPrivateNats {
        mut nats,
        mut env,
        ingest,
        db,
    } = on_private_nats(BEFORE_OUTAGE).await;
    env.settings.projector.dedup_horizon_secs = HORIZON_SECS;
    env.settings.projector.ack_wait_secs = 1;
    let relay = spawn_relay(&env.settings);
    wait_until_all_published(&db, BEFORE_OUTAGE as i64).await;
    relay.stop().await;
    let first_published: HashMap<Uuid, time::OffsetDateTime> = db
        .query("SELECT event_id, published_at FROM outbox", &[])
        .await
        .expect("outbox read")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let last_after = nats
        .crash_losing_tail(env.subjects.stream(), BEFORE_OUTAGE as u64)
        .await;
    let lost = (BEFORE_OUTAGE as u64 - last_after) as i64;
    assert!(lost > 0, "the crash lost the stream's tail");

    // A repair with no round after it, as by a relay that then lost NATS again.
    let repairing = ingest::relay::Relay::connect(&env.settings, "repairing")
        .await
        .expect("relay connects");
    eventually(Duration::from_secs(10), "the repair", || async {
        repairing.check_stream(&[]).await.ok()
    })
    .await;
    drop(repairing);
    let to_republish = db
        .query(
            "SELECT event_id, republish_before FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await
        .expect("outbox read");
    assert_eq!(
        to_republish.len() as i64,
        lost,
        "the lost rows made unpublished"
    );
    let window = time::Duration::seconds_f64(HORIZON_SECS as f64 * 0.9);
    for row in &to_republish {
        let event_id: Uuid = row.get(0);
        let deadline: Option<time::OffsetDateTime> = row.get(1);
        assert_eq!(
            deadline,
            Some(first_published[&event_id] + window),
            "{event_id}: republished only within the horizon of its first publish"
        );
    }
    // As if NATS stayed down again past that deadline.
    db.execute(
        "UPDATE outbox SET republish_before = now() - interval '1 second'
         WHERE published_at IS NULL",
        &[],
    )
    .await
    .expect("deadline moved back");

    let relay = spawn_relay(&env.settings);
    wait_until_the_lost_rows_are_stripped(&db, lost).await;
    let jetstream = env.jetstream().await;
    assert_stream_matches_rows_with_a_sequence(
        &db,
        &jetstream,
        env.subjects.stream(),
        BEFORE_OUTAGE,
        lost as usize,
    )
    .await;
    relay.stop().await;
    ingest.stop().await;
}

#[tokio::test]
async fn a_publish_lost_with_its_connection_is_published_again_soon_after_the_reconnect() {
    let OnPrivateNats {
        mut nats,
        env,
        ingest,
        db,
    } = on_private_nats(1).await;
    let never = NEVER_MS.to_string();
    let (relay, log) = ServiceProcess::spawn_logged(
        env!("CARGO_BIN_EXE_relay"),
        &env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[("PIPELINE__RELAY__STREAM_CHECK_INTERVAL_MS", never.as_str())],
    );
    wait_until_all_published(&db, 1).await;

    // A frozen server reads nothing: the next publish sits in the connection, unacked,
    // and dies with it when the server is killed.
    nats.freeze();
    post_readings(&ingest, "lost", 1).await;
    wait_until_a_relay_holds_the_unpublished_row(&db).await;
    // The claim is followed at once by the publish; time for its bytes to leave.
    tokio::time::sleep(Duration::from_millis(200)).await;
    nats.restart();
    // Without the give-up the round waits out the PubAck timeout (5 s from the
    // publish) before it publishes the row again, and says so. The relay's own account
    // of which ended the wait tells them apart; a time would not, as the server's start
    // and the client's reconnect delay (each slow on a loaded box) eat into those 5 s.
    let ended = testkit::process::log_line_until(
        &log,
        Duration::from_secs(15),
        "the relay's account of how its round's wait for acks ended (no line: the \
         acks timed out, 5 s after the publish, before NATS was back)",
        |line| {
            line.contains("while the round awaited its acks")
                || line.contains("acks still missing at the round's deadline")
        },
    );
    assert!(
        ended.contains("NATS reconnected while the round awaited its acks"),
        "the round gave its lost publish up on the reconnect, not at its deadline: {ended}"
    );
    wait_until_all_published(&db, 2).await;
    let jetstream = env.jetstream().await;
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), 2).await;
    assert!(relay.terminate().await.success());
    ingest.stop().await;
}

/// Waits until the one unpublished row is locked by a relay's claim.
async fn wait_until_a_relay_holds_the_unpublished_row(db: &tokio_postgres::Client) {
    wait_for_counts(
        db,
        Duration::from_secs(10),
        "a relay claimed the row",
        "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL),
                (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE published_at IS NULL
                                       FOR UPDATE SKIP LOCKED) AS free)",
        &[1, 0],
    )
    .await;
}

#[tokio::test]
async fn relay_republishes_everything_kept_when_the_stream_was_deleted_and_recreated() {
    const READINGS: usize = 12;
    let mut env = TestEnv::new();
    env.settings.relay.stream_check_interval_ms = 200;
    let ingest = Ingest::spawn(&env.settings).await;
    post_readings(&ingest, "k", READINGS).await;
    let db = env.postgres().await;
    let relay = spawn_relay(&env.settings);
    wait_until_all_published(&db, READINGS as i64).await;
    let jetstream = env.jetstream().await;
    jetstream
        .delete_stream(env.subjects.stream())
        .await
        .expect("stream deleted");
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), READINGS).await;
    relay.stop().await;
    ingest.stop().await;
}

/// A stream deleted and recreated (or a NATS host that lost its store) starts again at
/// sequence 1, while the kept rows of what it lost hold the sequences they had, and the
/// rows relayed since fill the sequences below them: a gap between held rows and lost
/// ones. The repair's search for the first lost row then went up the held rows one at a
/// time, a `STREAM.MSG.GET` each (5,000 here; a walk that ran inside the repair's
/// transaction under its lock, chasing the rows other lanes marked meanwhile), where a
/// bisection needs a few dozen.
#[tokio::test]
async fn a_recreated_stream_is_repaired_with_a_logarithmic_number_of_stream_reads() {
    const FILLER: usize = 20_000;
    const LOST: usize = 200;
    const RELAYED_SINCE: usize = 5_000;
    const MOST_READS: usize = 100;
    let nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url();
    env.settings.relay.stream_check_interval_ms = NEVER_MS;
    migrate(&env).await;
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    ingest::relay::ensure_streams(&jetstream, &env.settings.nats)
        .await
        .expect("streams created");
    // Messages of another subject first, so that the rows relayed next hold sequences
    // past those the recreated stream hands out to the backlog.
    publish_filler(&jetstream, &env.subjects.recorded("filler"), FILLER).await;
    let ingest = Ingest::spawn(&env.settings).await;
    let db = env.postgres().await;
    post_batches(&ingest, "lost", 1, LOST).await;
    let relay = spawn_relay(&env.settings);
    wait_until_all_published(&db, LOST as i64).await;
    relay.stop().await;

    jetstream
        .delete_stream(&stream)
        .await
        .expect("stream deleted");
    post_batches(&ingest, "since", RELAYED_SINCE / 1_000, 1_000).await;
    // A relay with no periodic check recreates the stream at its start and relays the
    // backlog at sequences 1 to 5,000, far below the kept rows of the lost events.
    let relay = spawn_relay(&env.settings);
    let rows = (LOST + RELAYED_SINCE) as i64;
    wait_until_all_published(&db, rows).await;
    relay.stop().await;

    let reads =
        RequestCounter::start(&nats.url(), &format!("$JS.API.STREAM.MSG.GET.{stream}")).await;
    let mut settings = env.settings.clone();
    settings.relay.stream_check_interval_ms = 200;
    let relay = spawn_relay(&settings);
    wait_for_stream_messages(&jetstream, &stream, rows as u64).await;
    wait_until_all_published(&db, rows).await;
    relay.stop().await;
    let read_count = reads.count().await;
    assert!(
        read_count <= MOST_READS,
        "the checks and the repair read {read_count} stream messages, more than {MOST_READS}"
    );
    assert_stream_matches_outbox(&db, &jetstream, &stream, rows as usize).await;
    ingest.stop().await;
}

/// Counts the requests sent to a NATS subject (a stream API request, say), as a plain
/// subscriber of that subject sees them.
struct RequestCounter {
    client: async_nats::Client,
    requests: async_nats::Subscriber,
}

impl RequestCounter {
    /// Subscribes to `subject`; counts what is sent to it from when this returns.
    async fn start(url: &str, subject: &str) -> Self {
        let client = async_nats::connect(url).await.expect("observer connects");
        let requests = client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribed to the requests");
        // The server handles a connection's messages in order: once it answers, it has
        // registered the subscription.
        round_trip(&client).await;
        Self { client, requests }
    }

    /// The requests sent to the subject so far, once every one the server took before
    /// this call has reached the subscriber.
    async fn count(mut self) -> usize {
        round_trip(&self.client).await;
        // Unconstrained: tokio's cooperative budget would report the channel empty
        // after 128 messages.
        tokio::task::unconstrained(async {
            let mut count = 0;
            while let Some(Some(_)) = self.requests.next().now_or_never() {
                count += 1;
            }
            count
        })
        .await
    }
}

/// A request the server answers, behind everything it sent this client before.
async fn round_trip(client: &async_nats::Client) {
    client
        .request("$JS.API.INFO", "".into())
        .await
        .expect("JetStream answers");
}

/// Publishes `count` messages to `subject`, each with its own message id, in windows
/// of 1,000 whose acks are awaited together (async-nats holds at most 5,000 in flight).
async fn publish_filler(jetstream: &jetstream::Context, subject: &str, count: usize) {
    let mut published = 0;
    while published < count {
        let window = (count - published).min(1_000);
        let mut acks = Vec::with_capacity(window);
        for _ in 0..window {
            let mut message_headers = async_nats::HeaderMap::new();
            message_headers.insert("Nats-Msg-Id", Uuid::now_v7().to_string().as_str());
            let ack = jetstream
                .publish_with_headers(subject.to_owned(), message_headers, "{}".into())
                .await
                .expect("filler sent");
            acks.push(ack);
        }
        for ack in acks {
            ack.await.expect("filler acknowledged");
        }
        published += window;
    }
}

#[tokio::test]
async fn a_paused_relay_loses_its_session_and_another_relay_publishes_its_rows() {
    const READINGS: usize = 15;
    let mut env = TestEnv::new();
    env.settings.relay.idle_in_transaction_timeout_ms = IDLE_IN_TRANSACTION_MIN_MS;
    let shortest_session = IDLE_IN_TRANSACTION_MIN_MS.to_string();
    let ingest = Ingest::spawn(&env.settings).await;
    post_readings(&ingest, "k", READINGS).await;
    // The "mark published" statement takes 2 s: time to pause the relay in between.
    let db = env.postgres().await;
    stall_marking(&db, 2).await;
    let mut paused_process = KilledOnDrop::new(
        service_command(
            env!("CARGO_BIN_EXE_relay"),
            &env,
            &[(
                "PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS",
                shortest_session.as_str(),
            )],
        )
        .spawn()
        .expect("relay binary starts"),
    );
    let paused_id = paused_process.id();
    let jetstream = env.jetstream().await;
    wait_for_stream_messages(&jetstream, env.subjects.stream(), READINGS as u64).await;
    // SIGSTOP while its mark is stalled: the mark completes, and the session then sits
    // idle in the transaction, holding the claimed rows' locks, until the timeout.
    signal(paused_id, "-STOP");
    // Dropping the trigger waits for the paused relay's transaction to end.
    db.batch_execute("SET lock_timeout = '20s'; DROP TRIGGER stall ON outbox")
        .await
        .expect("the paused relay's session ended within the timeout");

    let other = spawn_relay(&env.settings);
    wait_until_all_published(&db, READINGS as i64).await;
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), READINGS).await;
    other.stop().await;

    // Resumed, the paused relay finds its session gone, recovers and relays new rows.
    signal(paused_id, "-CONT");
    post_readings(&ingest, "later", 5).await;
    assert_stream_matches_outbox(&db, &jetstream, env.subjects.stream(), READINGS + 5).await;
    let mut paused = paused_process.take();
    assert!(
        paused.try_wait().expect("status").is_none(),
        "the resumed relay is still running"
    );
    let status = terminate(paused, "the relay").await;
    assert_eq!(status.code(), Some(0));
    ingest.stop().await;
}

/// A relay paused between its claim and its publishes (SIGSTOP, a hung host) publishes
/// none of those rows when it resumes: its session ended after the idle timeout and
/// another relay published and marked them, and its copies, sent past JetStream's
/// duplicate window, would be stored as second messages (past the projector's dedup
/// horizon, counted twice). Until 2026-12-07 it published them, and the stream held
/// every one of these readings twice.
///
/// The pause must come after the claim ran and before its rows reach the relay. The
/// relay has one pooled connection, on which its rounds (finding the rows locked by the
/// test, so claiming none) have prepared the claim; then the test locks the table, the
/// next claim waits on that lock in its execution, the relay is stopped, and the lock
/// goes: the claim takes the rows, and its answer waits in the stopped relay's socket.
#[tokio::test]
async fn a_relay_paused_after_its_claim_publishes_none_of_it_when_it_resumes() {
    const READINGS: usize = 10;
    let mut env = TestEnv::new();
    env.settings.relay.idle_in_transaction_timeout_ms = IDLE_IN_TRANSACTION_MIN_MS;
    let shortest_session = IDLE_IN_TRANSACTION_MIN_MS.to_string();
    env.settings.nats.duplicate_window_secs = 1;
    let ingest = Ingest::spawn(&env.settings).await;
    post_readings(&ingest, "k", READINGS).await;
    let mut blocker = env.postgres().await;
    let lock = blocker.transaction().await.expect("begin");
    lock.batch_execute("SELECT id FROM outbox FOR UPDATE")
        .await
        .expect("the rows locked");
    let paused = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_relay"),
        &env,
        "PIPELINE__RELAY__ADMIN_LISTEN",
        &[
            (
                "PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS",
                shortest_session.as_str(),
            ),
            ("PIPELINE__NATS__DUPLICATE_WINDOW_SECS", "1"),
            ("PIPELINE__RELAY__ROUNDS_IN_FLIGHT", "1"),
            ("PIPELINE__DATABASE__POOL_SIZE", "1"),
            // No prune: it would wait on the table lock and hold the one connection.
            ("PIPELINE__RELAY__PRUNE_INTERVAL_MS", "3600000"),
        ],
    );
    let db = env.postgres().await;
    // A round ran and claimed nothing (it rolls back; nothing else in this database
    // does): the claim is prepared on the relay's one connection.
    wait_for_session(
        &db,
        "a round of the relay run on its one connection",
        "query = 'ROLLBACK'",
    )
    .await;
    lock.batch_execute("LOCK TABLE outbox IN EXCLUSIVE MODE")
        .await
        .expect("claims held up");
    let claiming = eventually(
        Duration::from_secs(20),
        "the relay's claim held up by the lock",
        || async {
            let pids = testkit::lock_waiter_pids(&db, "ORDER BY id LIMIT").await;
            (pids.len() == 1).then(|| pids[0])
        },
    )
    .await;
    signal(paused.pid(), "-STOP");
    // The claim takes the rows, its answer waits in the stopped relay's socket, and its
    // session, idle in the transaction, ends after the timeout.
    lock.commit().await.expect("claims let through");
    wait_for_counts(
        &db,
        Duration::from_secs(20),
        "the paused relay's session ended",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {claiming}"),
        &[0],
    )
    .await;

    let other = spawn_relay(&env.settings);
    wait_until_marked(&db, READINGS as i64).await;
    other.stop().await;
    // A duration that must pass: past the duplicate window of the other relay's
    // publishes, so JetStream would store a copy.
    tokio::time::sleep(Duration::from_secs(2)).await;

    signal(paused.pid(), "-CONT");
    paused
        .metrics_until(
            Duration::from_secs(20),
            "the resumed relay's round handed its rows back",
            |scrape| {
                (scrape.value_or_zero("relay_retries_total", &[]) >= READINGS as f64).then_some(())
            },
        )
        .await;
    let jetstream = env.jetstream().await;
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        Some(READINGS as u64),
        "one message a reading"
    );
    assert_eq!(paused.terminate().await.code(), Some(0));
    ingest.stop().await;
}

/// Retries the relay at `admin_url` counts: outbox rows its rounds handed back.
async fn relay_retries(http: &reqwest::Client, admin_url: &str) -> Option<f64> {
    let scrape = testkit::prometheus::scrape(http, &format!("{admin_url}/metrics")).await?;
    Some(scrape.value_or_zero("relay_retries_total", &[]))
}

/// Waits until every unpublished outbox row is locked by a relay's round.
async fn wait_until_a_round_holds_every_unpublished_row(db: &tokio_postgres::Client, what: &str) {
    wait_for_counts(
        db,
        Duration::from_secs(10),
        what,
        "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE published_at IS NULL
         FOR UPDATE SKIP LOCKED) AS free",
        &[0],
    )
    .await;
}

/// NATS gone while a round awaits its acks: async-nats times each ack out 5 s after it
/// is awaited, one after another, so a round of 50 rows would hold them (and a shutdown)
/// for minutes. The round gives its missing acks up together after the ack deadline
/// (5 s), and a stop while NATS is gone hands the rows back at once rather than wait
/// for the deadline; another relay publishes every row once NATS is back. The rounds
/// start while NATS is frozen (connected, reading nothing): a relay starts none while
/// NATS is not connected.
#[tokio::test]
async fn a_round_whose_acks_never_come_gives_them_up_at_its_deadline_or_at_once_on_a_stop() {
    const BATCH: usize = 50;
    let mut nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url();
    // No periodic stream check: it would wait for the frozen server before the round.
    env.settings.relay.stream_check_interval_ms = NEVER_MS;
    migrate(&env).await;
    // The relay first, so that its `/metrics` is the process's recorder.
    let (relay, relay_admin) = spawn_relay_with_admin(&env.settings);
    let ingest = Ingest::spawn(&env.settings).await;
    let jetstream = env.jetstream().await;
    let stream = env.subjects.stream().to_owned();
    ingest.accept("before", &reading("sensor-1", 0.0)).await;
    wait_for_stream_messages(&jetstream, &stream, 1).await;
    let db = env.postgres().await;
    // One batch commits its rows together, so one round claims them all.
    nats.freeze();
    post_batches(&ingest, "deadline", 1, BATCH).await;
    wait_until_a_round_holds_every_unpublished_row(&db, "a round holding the first batch").await;
    nats.kill();
    // Handed back together at the round's deadline, not one ack timeout after another
    // (50 of 5 s each).
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(30),
        "the round handing its 50 rows back at its ack deadline",
        || async { (relay_retries(&http, &relay_admin).await? >= BATCH as f64).then_some(()) },
    )
    .await;

    // NATS back: the relay publishes them.
    nats.restart();
    wait_until_marked(&db, 1 + BATCH as i64).await;
    // A stop while NATS is gone under a round awaiting its acks hands the rows back
    // rather than wait for the round's deadline.
    nats.freeze();
    post_batches(&ingest, "stop", 1, BATCH).await;
    wait_until_a_round_holds_every_unpublished_row(&db, "a round holding the second batch").await;
    nats.kill();
    // The round's deadline is 5 s from its publishes, which went out moments ago: a
    // stop that waited for it would take some 4 s.
    relay
        .stop_within(
            Duration::from_secs(3),
            "the relay, whose round awaits acks that cannot come before it stops",
        )
        .await;

    nats.restart();
    let relay = spawn_relay(&env.settings);
    let rows = 1 + 2 * BATCH as i64;
    wait_for_stream_messages(&jetstream, &stream, rows as u64).await;
    wait_until_marked(&db, rows).await;
    relay.stop().await;
    ingest.stop().await;
}

/// NATS gone before any row of a backlog was claimed. A relay that started rounds
/// anyway queued their publishes in its async-nats client (sent after the reconnect,
/// however late, though the rounds had given the rows back at their ack deadline) until
/// its queue (2,048) was full, and then waited out the client's 5 s send timeout for
/// each further publish, where no stop is heard: a stop took up to 952 times 5 s. It
/// starts no round while NATS is not connected, so it stops at once, and once NATS is
/// back every row is published once.
#[tokio::test]
async fn a_relay_whose_nats_is_gone_starts_no_round_and_stops_at_once() {
    const BATCHES: usize = 2;
    const PER_BATCH: usize = 1_000;
    let mut nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url();
    env.settings.ingest.rate_limit_per_second = 0;
    migrate(&env).await;
    // The relay first, so that its `/metrics` is the process's recorder.
    let (relay, relay_admin) = spawn_relay_with_admin(&env.settings);
    let ingest = Ingest::spawn(&env.settings).await;
    testkit::settled_readiness(&relay_admin, None).await;
    nats.kill();
    testkit::settled_readiness(&relay_admin, Some("nats")).await;
    post_batches(&ingest, "gone", BATCHES, PER_BATCH).await;
    // A duration that must pass: by now a relay that starts rounds while NATS is gone
    // has given up two rounds' acks (at their 5 s deadline), filled its client's queue
    // with them and waits in a publish of the next.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let http = reqwest::Client::new();
    let retries = relay_retries(&http, &relay_admin).await;
    relay
        .stop_within(Duration::from_secs(3), "the relay while NATS is gone")
        .await;
    assert_eq!(
        retries,
        Some(0.0),
        "no round claimed rows (and handed them back) while NATS was gone"
    );

    nats.restart();
    let relay = spawn_relay(&env.settings);
    let rows = (BATCHES * PER_BATCH) as i64;
    wait_until_all_published(&env.postgres().await, rows).await;
    let jetstream = env.jetstream().await;
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        Some(rows as u64),
        "one message per row"
    );
    relay.stop().await;
    ingest.stop().await;
}

/// NATS hung with its connections open (SIGSTOP: a frozen host, or a partition that
/// drops packets): the relay's client notices by its pings (every 10 s, the connection
/// dropped after two missed pongs) and reports NATS down within half a minute, where
/// async-nats's default (60 s) left it ready, starting rounds into the dead connection,
/// for 2–3 minutes. Once the server answers again the relay is ready and relays.
#[tokio::test]
async fn a_hung_nats_is_noticed_within_half_a_minute_and_the_relay_goes_on_once_it_answers() {
    let nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url();
    migrate(&env).await;
    let (relay, relay_admin) = spawn_relay_with_admin(&env.settings);
    testkit::settled_readiness(&relay_admin, None).await;
    nats.freeze();
    testkit::settled_readiness_within(&relay_admin, Some("nats"), Duration::from_secs(45)).await;

    nats.thaw();
    testkit::settled_readiness(&relay_admin, None).await;
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("after", &reading("sensor-1", 1.0)).await;
    wait_for_stream_messages(&env.jetstream().await, env.subjects.stream(), 1).await;
    relay.stop().await;
    ingest.stop().await;
}

/// A NATS server whose `relay` user may not read stream messages (`STREAM.MSG.GET`, what
/// the stream check fetches) while `denied`.
fn nats_config(denied: bool) -> String {
    let relay_permissions = if denied {
        r#", permissions: { publish: { deny: ["$JS.API.STREAM.MSG.GET.>"] } }"#
    } else {
        ""
    };
    format!(
        "authorization {{ users = [ {{ user: relay, password: relay{relay_permissions} }} ] }}\n"
    )
}

/// A stream check that fails (here NATS refuses the relay the message it probes) must
/// hold publishing back until a check succeeds: after a reconnect to a server that may
/// have lost the stream's tail, new publishes would take the freed sequences, and a
/// later check that probed one would find it held and let the prune delete the rows of
/// what was lost. The relay published anyway, with a WARN, and said it was ready.
#[tokio::test]
async fn a_relay_whose_stream_check_fails_publishes_nothing_until_one_succeeds() {
    const BEFORE: usize = 5;
    const WHILE_FAILING: usize = 5;
    let mut nats = PrivateNats::start_with_config(&nats_config(true));
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url_as("relay:relay");
    // Only the reconnect starts a check.
    env.settings.relay.stream_check_interval_ms = NEVER_MS;
    migrate(&env).await;
    // The relay first, so that its `/metrics` is the process's recorder.
    let (relay, relay_admin) = spawn_relay_with_admin(&env.settings);
    let ingest = Ingest::spawn(&env.settings).await;
    let db = env.postgres().await;
    post_readings(&ingest, "before", BEFORE).await;
    wait_until_all_published(&db, BEFORE as i64).await;

    nats.stop();
    post_readings(&ingest, "while-failing", WHILE_FAILING).await;
    nats.restart();
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "a failed stream check", || async {
        let scrape = testkit::prometheus::scrape(&http, &format!("{relay_admin}/metrics")).await?;
        (scrape.value_or_zero("relay_errors_total", &[]) >= 1.0).then_some(())
    })
    .await;
    // A duration that must pass: a relay that goes on after a failed check publishes
    // within milliseconds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let published: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE stream_seq IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        published, BEFORE as i64,
        "nothing is published while the stream check fails"
    );
    // Not ready while the check fails, naming NATS (API.md §7).
    testkit::settled_readiness(&relay_admin, Some("nats")).await;

    nats.restart_with_config(&nats_config(false));
    wait_until_all_published(&db, (BEFORE + WHILE_FAILING) as i64).await;
    testkit::settled_readiness(&relay_admin, None).await;
    relay.stop().await;
    ingest.stop().await;
}

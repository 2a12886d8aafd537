//! The rebuild's replay when NATS restarts under it: the ordered consumer it reads
//! through lives in the server's memory and is lost; the replay makes a new one past
//! what it applied, instead of waiting out async-nats's 15 s idle heartbeat and failing.
//! And a replay that, so held up, outlasts the dedup horizon while a live projector
//! applies its backlog to the generation being built, also one whose consumer went back,
//! or with an event the stream holds on both sides of the live ack floor.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use contract::event::TelemetryRecorded;
use contract::read_model::{
    consumer_anchor_key, meta, meta_key, rebuild_lock_key, DevicesIndex, LISTING_GRANULE_MS,
};
use projector::apply::{AsOf, Delivered};
use projector::rebuild::{Generations, RebuildError};
use testkit::{assert_same_figures, eventually, PrivateNats, Sums, TestEnv};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{
    building_generation, connection, direct_read_model, drained, event, figures, now_ms,
    private_env, publish_many, reference, spread_events, stream_messages, streams, Projector,
    CATCH_UP,
};

/// Enough events that the replay is still reading when the server is frozen: the
/// ordered consumer holds at most a pull or two (500 each) ahead of the replay.
const EVENTS: usize = 20_000;
/// The replay gives up on a silent consumer after 5 s; async-nats alone would take 15 s
/// (its idle heartbeat) and then fail the rebuild, which the tests see as an error. The
/// rest of the replay and the switch take a few seconds more on a loaded box.
const FINISHED_AFTER_THE_RESTART: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_rebuild_cut_by_a_nats_restart_goes_on_past_what_it_applied() {
    let mut nats = PrivateNats::start();
    let (env, jetstream) = private_env(&nats).await;
    let events = spread_events(EVENTS);
    publish_many(&env, &jetstream, &events).await;

    let running = start_rebuild(&env).await;
    freeze_once_the_replay_applied_some(&env, &nats).await;
    nats.restart();

    let generation = finished_after_the_restart(running).await;
    assert_eq!(env.generation().await, Some(generation));
    assert_eq!(
        stream_messages(&jetstream, env.subjects.stream()).await,
        EVENTS as u64,
        "the restart kept every message"
    );
    assert_read_model_holds(&env, &events).await;
}

/// Events the live projector still had to apply when a rebuild began, with a replay that
/// takes longer than the dedup horizon (here a frozen NATS and the replay's wait for a
/// silent consumer, on a long stream the replay's own pace). The live projector applies
/// them to the generation being built at once; the replay must meet them while the
/// generation's dedup set still remembers that, or they count twice.
#[tokio::test]
async fn a_rebuild_longer_than_the_dedup_horizon_counts_what_the_live_projector_applied_once() {
    rebuild_longer_than_the_horizon(LiveConsumer::Kept).await;
}

/// The same, with a live consumer that goes back below the ack floor the rebuild read
/// as it began: NATS lost the consumer's latest acks in a crash (it writes them down
/// about every 100 ms), so the live projector gets the last [`WENT_BACK`] events again.
/// Its dedup set skips them in the live generation, but the replay reaches them in the
/// new one only after its wait for a silent consumer, past the horizon: the live
/// projector must leave them to the replay there, or they count twice. (CI saw this
/// with a real crash: 14 readings of 404 counted twice.)
#[tokio::test]
async fn a_live_consumer_that_goes_back_during_a_long_rebuild_counts_nothing_twice() {
    rebuild_longer_than_the_horizon(LiveConsumer::WentBack).await;
}

/// An event the stream holds twice, one copy just below the live projectors' ack floor
/// and one just above (the relay published it again past JetStream's duplicate window),
/// with a replay held up past the dedup horizon in between: the replay takes the copy
/// above first, and meets the one below at the end of the older part, when the new
/// generation's dedup set has forgotten the first. It must count once.
#[tokio::test]
async fn an_event_the_stream_holds_on_both_sides_of_the_ack_floor_counts_once_in_a_long_rebuild() {
    let mut events = spread_events(EVENTS);
    let (mut nats, env, jetstream) = projected_live_with_a_short_horizon(&events).await;
    // The last event below the floor, again, under another message id.
    let (original, msg_id) = events[EVENTS - 1].clone();
    let copy = (original, format!("{msg_id}-again"));
    publish_many(&env, &jetstream, std::slice::from_ref(&copy)).await;
    events.push(copy);

    let running = start_rebuild(&env).await;
    // The copy above the floor is the replay's first message, so applied by then.
    freeze_once_the_replay_applied_some(&env, &nats).await;
    // The replay waits 5 s for its lost consumer, past the horizon of 4 s.
    nats.restart();

    let generation = finished_after_the_restart(running).await;
    assert_eq!(env.generation().await, Some(generation));
    assert_read_model_holds(&env, &events).await;
}

/// A rebuild run while every projector is stopped replays their backlog (what follows
/// their consumer's ack floor) into the new generation and switches to it. Started past
/// the dedup horizon after that, the projectors get the backlog delivered: the new
/// generation holds it already (the switch wrote `built_through`), so it counts once.
/// It counted twice: the generation's dedup set had forgotten the replay's ids (a
/// review of 2026-12-07).
#[tokio::test]
async fn a_backlog_a_rebuild_replayed_while_the_projectors_were_stopped_counts_once_after_the_horizon(
) {
    const APPLIED: usize = 500;
    const BACKLOG: usize = 300;
    let events = spread_events(APPLIED + BACKLOG);
    let (_nats, env, jetstream) = projected_live_with_a_short_horizon(&events[..APPLIED]).await;
    publish_many(&env, &jetstream, &events[APPLIED..]).await;

    let generation = rebuilt(&env).await;
    assert_eq!(env.generation().await, Some(generation));
    // A duration that must pass: the new generation's dedup set forgets the replay's
    // ids after the horizon (4 s).
    tokio::time::sleep(Duration::from_secs(
        env.settings.projector.dedup_horizon_secs + 1,
    ))
    .await;
    let projector = Projector::spawn(&env.settings).await;
    drained(&env, &jetstream, (APPLIED + BACKLOG) as u64).await;
    assert_read_model_holds(&env, &events).await;
    projector.stop().await;
}

/// Projectors stopped when a rebuild began, started again while its replay still runs
/// and past the dedup horizon after it applied their backlog (what follows their
/// consumer's ack floor, which it takes first; its older part held up here by a NATS
/// server frozen for 6 s): they would apply that backlog to the new generation too,
/// where the replay's ids were forgotten. Once the replay began, the meta hash says
/// what it applies (`replay_last`), and they leave that to it: it counts once.
#[tokio::test]
async fn projectors_that_come_back_during_a_replay_past_the_horizon_leave_their_backlog_to_it() {
    const BACKLOG: usize = 200;
    /// Longer than the horizon (4 s) after the replay applied the backlog.
    const FROZEN: Duration = Duration::from_secs(6);
    let events = spread_events(EVENTS + BACKLOG);
    let (mut nats, env, jetstream) = projected_live_with_a_short_horizon(&events[..EVENTS]).await;
    publish_many(&env, &jetstream, &events[EVENTS..]).await;

    let running = start_rebuild(&env).await;
    // The backlog (past the floor) is the replay's first part, so applied by then.
    freeze_once_the_replay_applied_some(&env, &nats).await;
    // A duration that must pass: the new generation forgets the replay's ids.
    tokio::time::sleep(FROZEN).await;
    nats.restart();
    let projector = Projector::spawn(&env.settings).await;
    drained(&env, &jetstream, (EVENTS + BACKLOG) as u64).await;
    assert!(
        !running.is_finished(),
        "the rebuild finished before the projector applied its backlog: the test needs more events"
    );

    let generation = finished_after_the_restart(running).await;
    assert_eq!(env.generation().await, Some(generation));
    assert_read_model_holds(&env, &events).await;
    projector.stop().await;
}

/// A rebuild whose read model is lost under its replay (`FLUSHALL`, a Redis restart
/// without persistence) writes nothing more to its generation and fails. Its replay's
/// writes were not guarded: it went on writing for up to a lock refresh (5 s) after the
/// loss, and those keys of a generation that nothing names any more (device hashes and
/// index keys never expire, and the next rebuild finds no `building` to delete) stayed
/// in Redis for good.
#[tokio::test]
async fn a_replay_whose_read_model_was_lost_under_it_writes_nothing_more() {
    let nats = PrivateNats::start();
    let (env, jetstream) = private_env(&nats).await;
    publish_many(&env, &jetstream, &spread_events(EVENTS)).await;
    let running = start_rebuild(&env).await;
    // Held with the replay under way, so the loss comes before it ends.
    freeze_once_the_replay_applied_some(&env, &nats).await;
    let building = building_generation(&env)
        .await
        .expect("the build under way");

    // The prefix emptied as FLUSHALL would empty it, the meta hash first: no key a
    // replay call writes after it can escape the deletion of the rest.
    env.lose_read_model().await;
    nats.thaw();

    let ended = tokio::time::timeout(FINISHED_AFTER_THE_RESTART, running)
        .await
        .expect("the rebuild ended")
        .expect("the rebuild task did not panic");
    assert!(
        ended.is_err(),
        "a rebuild whose read model was lost cannot switch: {ended:?}"
    );
    assert_eq!(
        env.generation_keys(building).await,
        Vec::<String>::new(),
        "keys the replay wrote after its read model was lost"
    );
}

/// Freezes the server once some events are in the generation being built (the replay's
/// consumer is reading): it then delivers nothing more, and the replay can only finish
/// what it holds. Fails if the build ended before the freeze took hold.
async fn freeze_once_the_replay_applied_some(env: &TestEnv, nats: &PrivateNats) {
    eventually(Duration::from_secs(20), "the replay under way", || async {
        let building = building_generation(env).await?;
        (!env.generation_keys(building).await.is_empty()).then_some(())
    })
    .await;
    nats.freeze();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        building_generation(env).await.is_some(),
        "the replay finished before the server was frozen: the test needs more events"
    );
}

/// What becomes of the live projectors' durable consumer once the build began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiveConsumer {
    Kept,
    /// Made again [`WENT_BACK`] messages below the ack floor, as NATS restores it after
    /// a crash that lost its latest acks.
    WentBack,
}

/// Events acked by the live consumer that it delivers again in [`LiveConsumer::WentBack`].
const WENT_BACK: u64 = 2_000;

/// A private NATS and a test environment with an ack wait of 1 s and a dedup horizon of
/// 4 s, where a projector applied `events` to a live generation 1 and stopped.
async fn projected_live_with_a_short_horizon(
    events: &[(TelemetryRecorded, String)],
) -> (PrivateNats, TestEnv, jetstream::Context) {
    let nats = PrivateNats::start();
    let (mut env, jetstream) = private_env(&nats).await;
    env.settings.projector.ack_wait_secs = 1;
    env.settings.projector.dedup_horizon_secs = 4;
    // A live generation, which the rebuild replaces: the first projector applies to it
    // at once, rather than wait for a build of its own (which it would abandon when it
    // stops, leaving the meta hash naming it as being built).
    env.set_live_generation(1).await;
    publish_many(&env, &jetstream, events).await;
    let projector = Projector::spawn(&env.settings).await;
    drained(&env, &jetstream, events.len() as u64).await;
    projector.stop().await;
    (nats, env, jetstream)
}

async fn rebuild_longer_than_the_horizon(live_consumer: LiveConsumer) {
    const BACKLOG: usize = 200;
    let events = spread_events(EVENTS + BACKLOG);
    let (mut nats, env, jetstream) = projected_live_with_a_short_horizon(&events[..EVENTS]).await;
    // The live projector's backlog when the rebuild begins.
    publish_many(&env, &jetstream, &events[EVENTS..]).await;

    assert_eq!(building_generation(&env).await, None);
    let running = start_rebuild(&env).await;
    eventually(Duration::from_secs(20), "the build under way", || async {
        building_generation(&env).await.map(drop)
    })
    .await;
    if live_consumer == LiveConsumer::WentBack {
        consumer_goes_back_to(&env, &jetstream, EVENTS as u64 - WENT_BACK).await;
    }
    // Started now, the live projector applies its backlog to the new generation too.
    let projector = Projector::spawn(&env.settings).await;
    drained(&env, &jetstream, (EVENTS + BACKLOG) as u64).await;
    assert!(
        !running.is_finished(),
        "the rebuild finished before the live projector applied its backlog: the test needs more events"
    );
    // The replay's consumer is lost with the server, and the replay waits 5 s for it
    // before it makes a new one: it goes on past the horizon of 4 s.
    nats.freeze();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();

    let generation = finished_after_the_restart(running).await;
    assert_eq!(env.generation().await, Some(generation));
    assert_read_model_holds(&env, &events).await;
    projector.stop().await;
}

/// Makes the live projectors' durable consumer again, as the projector makes it, with
/// everything up to `acked` acked: as NATS restores it after a crash that lost the acks
/// past there.
async fn consumer_goes_back_to(env: &TestEnv, jetstream: &jetstream::Context, acked: u64) {
    let stream = jetstream
        .get_stream(env.subjects.stream())
        .await
        .expect("stream exists");
    let consumer = env.settings.nats.consumer.as_str();
    stream.delete_consumer(consumer).await.expect("deleted");
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(consumer.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(env.settings.projector.ack_wait_secs),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: acked + 1,
            },
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .expect("consumer made again");
}

/// A rebuild that failed left `building` naming its generation, which live projectors go
/// on writing to as long as it does. The next rebuild deletes that generation's keys;
/// a live projector's write that lands after their deletion must not bring any of them
/// back for good (device hashes and index keys never expire). Here a live projector
/// writes to the abandoned generation without a pause until its call finds the
/// generations changed, while the next rebuild runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_leaves_no_key_of_a_build_abandoned_before_it_behind() {
    const ABANDONED: u64 = 7;
    let env = TestEnv::new();
    streams(&env).await;
    env.set_live_generation(5).await;
    env.set_building(Some(ABANDONED)).await;
    let mut redis = connection(&env).await;
    let generations = Generations::read(&mut redis, &env.settings.redis.prefix)
        .await
        .expect("meta read");
    assert_eq!(generations.targets(), [5, ABANDONED]);

    // A live projector that read the generations while the failed build was running.
    let model = direct_read_model(&env);
    let writes = tokio::spawn(async move {
        let mut applied = 0u64;
        loop {
            let batch = [Delivered {
                event: event(
                    &format!("sensor-{}", applied % 10),
                    now_ms(),
                    &[("temperature", applied as f64)],
                ),
                stream_sequence: applied + 1,
                stored_at: time::OffsetDateTime::now_utc(),
            }];
            match model
                .apply_as_of(&mut redis, &generations, &batch, now_ms())
                .await
                .expect("apply")
            {
                AsOf::Applied(_) => applied += 1,
                // It would read the generations again: no longer the abandoned one.
                AsOf::Stale { .. } => return applied,
                refused @ AsOf::Refused { .. } => panic!("nothing refuses these: {refused:?}"),
            }
        }
    });
    eventually(
        Duration::from_secs(5),
        "the abandoned build written to",
        || async { (!env.generation_keys(ABANDONED).await.is_empty()).then_some(()) },
    )
    .await;

    let generation = rebuilt(&env).await;
    let applied = writes.await.expect("the writes did not panic");
    assert!(applied > 0);
    assert_eq!(env.generation().await, Some(generation));
    let left = env.generation_keys(ABANDONED).await;
    assert_eq!(
        left,
        Vec::<String>::new(),
        "keys of the abandoned build left behind ({applied} batches written to it)"
    );
}

/// A rebuild whose process dies while it deletes the keys of a build abandoned before
/// it (here its task is aborted as soon as `building` names its own generation, while
/// 100,000 keys of the abandoned build wait for deletion) leaves that generation named
/// retired, and a projector deletes the rest. Until 2026-12-07 it was named nowhere once
/// `building` moved on, and what the deletion had not reached stayed for good.
#[tokio::test]
async fn keys_of_an_abandoned_build_a_dying_rebuild_left_undeleted_are_deleted_later() {
    const ABANDONED: u64 = 7;
    const KEYS: u64 = 100_000;
    let env = TestEnv::new();
    streams(&env).await;
    env.set_live_generation(5).await;
    env.set_building(Some(ABANDONED)).await;
    let filler = format!("{}g{ABANDONED}:filler:", env.settings.redis.prefix);
    let () = redis::Script::new(
        "for i = 1, tonumber(ARGV[2]) do redis.call('SET', ARGV[1] .. i, 1) end",
    )
    .arg(&filler)
    .arg(KEYS)
    .invoke_async(&mut connection(&env).await)
    .await
    .expect("the abandoned build's keys written");

    let running = start_rebuild(&env).await;
    let began = tokio::time::Instant::now();
    while building_generation(&env).await == Some(ABANDONED) {
        assert!(
            began.elapsed() < CATCH_UP,
            "the rebuild began within {CATCH_UP:?}"
        );
        tokio::task::yield_now().await;
    }
    running.abort();
    let left = env.generation_keys(ABANDONED).await.len();
    assert!(
        left > 0,
        "the rebuild died before it deleted every key of the abandoned build"
    );
    // Its lock, left to expire, let go at once; a projector finds the build it began
    // abandoned in turn, builds again and deletes what is named retired.
    let () = redis::cmd("DEL")
        .arg(rebuild_lock_key(&env.settings.redis.prefix))
        .query_async(&mut connection(&env).await)
        .await
        .expect("lock deleted");
    let projector = Projector::spawn(&env.settings).await;
    eventually(
        CATCH_UP,
        &format!("the {left} keys of the abandoned build left by the dead rebuild deleted"),
        || async {
            env.generation_keys(ABANDONED)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    projector.stop().await;
}

/// The stream's newest message removed (an operator's `nats stream rmm`; JetStream keeps
/// the last sequence): the replay ends at the last message the stream holds. Until
/// 2026-12-07 it waited for the removed one, failed after ten stalls (a minute) and the
/// rebuild began again from the start.
#[tokio::test]
async fn a_replay_ends_when_the_streams_newest_message_was_removed() {
    const EVENTS: usize = 10;
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let events = spread_events(EVENTS);
    publish_many(&env, &jetstream, &events).await;
    let stream = jetstream
        .get_stream(env.subjects.stream())
        .await
        .expect("stream exists");
    assert!(stream
        .delete_message(EVENTS as u64)
        .await
        .expect("the newest message removed"));

    let generation = tokio::time::timeout(Duration::from_secs(20), rebuilt(&env))
        .await
        .expect("the rebuild ended within 20 s");
    assert_eq!(env.generation().await, Some(generation));
    assert_read_model_holds(&env, &events[..EVENTS - 1]).await;
}

/// A rebuild stopped half-way (an operator's Ctrl-C of `projector rebuild`) abandons
/// its build: no longer `building` but `retired`, and its keys deleted by a live
/// projector, which does not take the build up. Until 2026-12-07 it stayed `building`, and a live
/// projector began a rebuild of its own a second later.
#[tokio::test]
async fn a_stopped_rebuild_leaves_no_build_for_the_projectors_to_take_up() {
    const LIVE: u64 = 5;
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    env.set_live_generation(LIVE).await;
    publish_many(&env, &jetstream, &spread_events(EVENTS)).await;

    let stop = CancellationToken::new();
    let rebuild = projector::connect_rebuild(&env.settings)
        .await
        .expect("rebuild connects");
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { rebuild.run(&stop).await }
    });
    // Stopped once its replay wrote keys (before its end: 20,000 events take it a while).
    let began = tokio::time::Instant::now();
    let building = loop {
        if let Some(building) = building_generation(&env).await {
            if !env.generation_keys(building).await.is_empty() {
                break building;
            }
        }
        assert!(began.elapsed() < CATCH_UP, "the replay under way");
        tokio::task::yield_now().await;
    };
    stop.cancel();
    let stopped = running.await.expect("the rebuild task did not panic");
    assert!(stopped.is_err(), "a stopped rebuild fails: {stopped:?}");
    assert_eq!(building_generation(&env).await, None, "the build abandoned");
    assert_eq!(
        retired(&env).await,
        Some(building.to_string()),
        "the build named retired"
    );
    assert!(
        !env.generation_keys(building).await.is_empty(),
        "a stop leaves the deletion to a projector"
    );

    let projector = Projector::spawn(&env.settings).await;
    eventually(
        CATCH_UP,
        "the abandoned build's keys deleted by the live projector, and its name",
        || async {
            (env.generation_keys(building).await.is_empty() && retired(&env).await.is_none())
                .then_some(())
        },
    )
    .await;
    // A duration that must pass: the supervisor looks once a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(building_generation(&env).await, None, "no rebuild taken up");
    assert_eq!(env.generation().await, Some(LIVE));
    projector.stop().await;
}

/// A prefix may hold Redis's glob characters (`redis.prefix` refuses only braces): a
/// rebuild still deletes every key of the generation it replaced, matching the prefix
/// literally. Unescaped, `app[1]?:` matched none of them, and the whole replaced
/// generation stayed in Redis for good (device hashes and index keys never expire).
#[tokio::test]
async fn a_rebuild_deletes_the_generation_it_replaced_whatever_glob_characters_the_prefix_holds() {
    let mut env = TestEnv::new();
    env.settings.redis.prefix = format!("{}app[1]?:", env.settings.redis.prefix);
    let prefix = env.settings.redis.prefix.clone();
    streams(&env).await;
    live_generation_with_a_reading(&env, 5).await;
    // Listed with a pattern of the test's own, which escapes the prefix by hand.
    let replaced = format!(
        "{}g5:*",
        prefix
            .replace('[', "\\[")
            .replace(']', "\\]")
            .replace('?', "\\?")
    );
    let keys = |pattern: String| {
        let env = &env;
        async move {
            redis::cmd("KEYS")
                .arg(pattern)
                .query_async::<Vec<String>>(&mut env.redis().await)
                .await
                .expect("keys listed")
        }
    };
    assert!(
        !keys(replaced.clone()).await.is_empty(),
        "generation 5 written"
    );

    let generation = rebuilt(&env).await;
    assert_eq!(env.generation().await, Some(generation));
    assert_ne!(generation, 5);
    assert_eq!(
        keys(replaced).await,
        Vec::<String>::new(),
        "generation 5 left behind"
    );
}

/// A rebuild that begins while the live projectors' durable consumer is missing
/// (deleted, or lost with the server's state) takes the newest consumer anchor as the
/// floor: a projector makes the consumer again just past it, so what that consumer
/// delivers is the replay's first part, met within moments, not the end of a first part
/// that spans the whole stream (past the dedup horizon on a long one).
#[tokio::test]
async fn a_rebuild_begun_while_the_consumer_is_missing_takes_the_anchor_as_its_floor() {
    /// Where the last projector stood before its consumer was deleted.
    const ANCHORED: u64 = 15_000;
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    env.set_live_generation(1).await;
    publish_many(&env, &jetstream, &spread_events(EVENTS)).await;
    let stored_at = crate::support::stored_message(&jetstream, env.subjects.stream(), ANCHORED)
        .await
        .time;
    let mut redis = env.redis().await;
    let () = redis::cmd("SET")
        .arg(consumer_anchor_key(
            &env.settings.redis.prefix,
            &env.settings.nats.consumer,
        ))
        .arg(format!(
            "{ANCHORED} {} all",
            stored_at.unix_timestamp_nanos()
        ))
        .query_async(&mut redis)
        .await
        .expect("anchor set");

    let running = start_rebuild(&env).await;
    let meta_hash = meta_key(&env.settings.redis.prefix);
    let through: String = eventually(Duration::from_secs(20), "the build under way", || {
        let (mut redis, meta_hash) = (redis.clone(), meta_hash.clone());
        async move {
            redis::cmd("HGET")
                .arg(meta_hash)
                .arg(meta::REPLAY_THROUGH)
                .query_async::<Option<String>>(&mut redis)
                .await
                .expect("hget")
        }
    })
    .await;
    assert_eq!(
        through.split(' ').next(),
        Some(ANCHORED.to_string().as_str()),
        "the floor is the anchor's sequence: {through}"
    );
    running
        .await
        .expect("the rebuild task did not panic")
        .expect("the rebuild succeeded");
}

/// A rebuild whose task is aborted half-way (a projector's stop aborts its supervisor
/// past its deadline) stops refreshing its lock, which then expires: the refresher it
/// spawned goes with it instead of holding the lock for as long as the process lives.
#[tokio::test]
async fn a_rebuild_aborted_half_way_stops_refreshing_its_lock() {
    /// The rebuild refreshes its 15 s lock every 5 s.
    const PAST_A_REFRESH: Duration = Duration::from_secs(6);
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    publish_many(&env, &jetstream, &spread_events(EVENTS)).await;
    let running = start_rebuild(&env).await;
    eventually(Duration::from_secs(20), "the build under way", || async {
        building_generation(&env).await.map(drop)
    })
    .await;
    running.abort();
    assert!(
        running.await.is_err_and(|error| error.is_cancelled()),
        "the rebuild was still running when aborted: the test needs more events"
    );
    let lock = rebuild_lock_key(&env.settings.redis.prefix);
    let mut redis = env.redis().await;
    let left_ms = |redis: &mut redis::aio::MultiplexedConnection| {
        let lock = lock.clone();
        let mut redis = redis.clone();
        async move {
            let left: i64 = redis::cmd("PTTL")
                .arg(&lock)
                .query_async(&mut redis)
                .await
                .expect("pttl");
            left
        }
    };
    let before = left_ms(&mut redis).await;
    assert!(before > 0, "the aborted rebuild's lock is held ({before})");
    // A duration that must pass: one refresh period and a second.
    tokio::time::sleep(PAST_A_REFRESH).await;
    let after = left_ms(&mut redis).await;
    assert!(
        after < before - 5_000,
        "the lock was refreshed after the rebuild was aborted: {before} ms left, then {after} ms"
    );
}

/// A rebuild whose process dies after its switch, in the grace before it deletes the
/// generation it replaced, leaves that generation's keys: device hashes and index keys
/// never expire, so they stayed in Redis for good. The switch names it retired in the
/// meta hash, and a live projector deletes its keys once the dead rebuild's lock is gone
/// (not before: a rebuild holds it through its grace, while reads may still be under way).
#[tokio::test]
async fn the_generation_a_rebuild_that_died_after_its_switch_replaced_is_deleted_all_the_same() {
    const REPLACED: u64 = 5;
    let env = TestEnv::new();
    streams(&env).await;
    live_generation_with_a_reading(&env, REPLACED).await;
    assert!(!env.generation_keys(REPLACED).await.is_empty());

    let running = start_rebuild(&env).await;
    let generation = eventually(Duration::from_secs(20), "the switch", || async {
        env.generation()
            .await
            .filter(|generation| *generation != REPLACED)
    })
    .await;
    // The process dies in the 2 s grace after the switch.
    running.abort();
    assert!(
        running.await.is_err_and(|error| error.is_cancelled()),
        "the rebuild ended before it was aborted"
    );
    assert!(
        !env.generation_keys(REPLACED).await.is_empty(),
        "the rebuild deleted the replaced generation before it was aborted"
    );
    let projector = Projector::spawn(&env.settings).await;
    // While the dead rebuild's lock lasts, its keys stay. Only waiting can show an
    // absence: the projector's supervisor looks every second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        !env.generation_keys(REPLACED).await.is_empty(),
        "deleted while a rebuild held the lock"
    );
    // Its lock expires (15 s after its last refresh); the test does not wait that long.
    let () = redis::cmd("DEL")
        .arg(rebuild_lock_key(&env.settings.redis.prefix))
        .query_async(&mut env.redis().await)
        .await
        .expect("lock deleted");
    eventually(
        CATCH_UP,
        "the replaced generation's keys deleted",
        || async { env.generation_keys(REPLACED).await.is_empty().then_some(()) },
    )
    .await;
    let retired: Option<String> = redis::cmd("HGET")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::RETIRED)
        .query_async(&mut env.redis().await)
        .await
        .expect("meta read");
    assert_eq!(retired, None, "nothing is left to delete");
    assert_eq!(
        env.generation().await,
        Some(generation),
        "the new one stays live"
    );
    projector.stop().await;
}

/// A replay walks each device through its history, one move in the devices index a
/// batch at most; the entries those moves supersede go as they are superseded, for no
/// walk ever sees them (walks read the live generation, from after its switch). Until
/// 2026-12-07 they were kept for the listing TTL (10 min) as a live generation's are: a
/// replay of a long history held an entry for every move of every device in its last
/// ten minutes, thousands a device at the replay's rate.
#[tokio::test]
async fn a_replay_leaves_one_devices_index_entry_a_device() {
    const DEVICES: usize = 10;
    const STEPS: i64 = 20;
    let mut env = TestEnv::new();
    // Batches of one step: every batch moves every device to a later granule.
    env.settings.projector.batch_size = DEVICES;
    let jetstream = streams(&env).await;
    let base = now_ms() - (STEPS + 6) * LISTING_GRANULE_MS;
    let events: Vec<(TelemetryRecorded, String)> = (0..STEPS)
        .flat_map(|step| {
            (0..DEVICES).map(move |device| {
                event(
                    &format!("sensor-{device}"),
                    base + step * LISTING_GRANULE_MS,
                    &[("temperature", step as f64)],
                )
            })
        })
        .map(|event| {
            let id = event.event_id.to_string();
            (event, id)
        })
        .collect();
    publish_many(&env, &jetstream, &events).await;

    let generation = rebuilt(&env).await;
    let index = DevicesIndex::new(&env.settings.redis.prefix, generation);
    let mut redis = env.redis().await;
    let (entries, stamped, superseded): (usize, usize, usize) = redis::pipe()
        .zcard(&index.log)
        .hlen(&index.created)
        .zcard(&index.retired)
        .query_async(&mut redis)
        .await
        .expect("the index's sizes");
    assert_eq!(
        (entries, stamped, superseded),
        (DEVICES, DEVICES, 0),
        "one entry a device, none superseded"
    );
}

/// The meta hash's `retired` list, as written.
async fn retired(env: &TestEnv) -> Option<String> {
    redis::cmd("HGET")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::RETIRED)
        .query_async(&mut connection(env).await)
        .await
        .expect("meta read")
}

/// Makes `generation` the live one and applies one reading to it, as a live projector
/// would.
async fn live_generation_with_a_reading(env: &TestEnv, generation: u64) {
    env.set_live_generation(generation).await;
    let mut redis = connection(env).await;
    let generations = Generations::read(&mut redis, &env.settings.redis.prefix)
        .await
        .expect("meta read");
    let batch = [Delivered {
        event: event("sensor-1", now_ms(), &[("temperature", 20.0)]),
        stream_sequence: 1,
        stored_at: time::OffsetDateTime::now_utc(),
    }];
    let applied = direct_read_model(env)
        .apply_as_of(&mut redis, &generations, &batch, now_ms())
        .await
        .expect("apply");
    assert!(matches!(applied, AsOf::Applied(_)), "{applied:?}");
}

/// Runs a rebuild to its end as `projector rebuild` does: the generation it made live.
async fn rebuilt(env: &TestEnv) -> u64 {
    start_rebuild(env)
        .await
        .await
        .expect("the rebuild task did not panic")
        .expect("the rebuild succeeded")
}

/// Starts a rebuild as `projector rebuild` runs it.
async fn start_rebuild(env: &TestEnv) -> JoinHandle<Result<u64, RebuildError>> {
    let rebuild = projector::connect_rebuild(&env.settings)
        .await
        .expect("rebuild connects");
    tokio::spawn(async move { rebuild.run(&CancellationToken::new()).await })
}

/// The rebuild's new generation, once it finished after the server's restart.
async fn finished_after_the_restart(running: JoinHandle<Result<u64, RebuildError>>) -> u64 {
    tokio::time::timeout(FINISHED_AFTER_THE_RESTART, running)
        .await
        .expect("the rebuild finished soon after the restart")
        .expect("the rebuild task did not panic")
        .expect("the rebuild succeeded")
}

/// Every device's figures in the live generation are the reference model's of `events`.
async fn assert_read_model_holds(env: &TestEnv, events: &[(TelemetryRecorded, String)]) {
    let expected = reference(events.iter().map(|(event, _)| event));
    for (device, want) in &expected {
        let (actual, _) = figures(env, device).await;
        assert_same_figures(device, &actual, want, Sums::Exact);
    }
}

//! The durable consumer after its stream went back (an OS crash of the NATS host before
//! nats-server 2.9's fsync, simulated on a private server by cutting the message block
//! back): nats-server 2.9 keeps the consumer's position, which would skip the new
//! events that reuse the lost sequences; the projector recreates the consumer.

use std::time::Duration;

use async_nats::jetstream::consumer;
use contract::event::TelemetryRecorded;
use testkit::process::ServiceProcess;
use testkit::{eventually, PrivateNats, TestEnv};

use crate::support::{
    consumer_info, drained, event, now_ms, private_env, projector_process, publish_many, Projector,
    CATCH_UP,
};

const DEVICE: &str = "sensor-1";
/// Events projected before the crash, and published after it (they take lost sequences).
const BEFORE_CRASH: usize = 40;
const AFTER_CRASH: usize = 30;

fn events(count: usize) -> Vec<(TelemetryRecorded, String)> {
    let base = now_ms() - 60_000;
    (0..count)
        .map(|index| {
            let event = event(DEVICE, base + index as i64, &[("temperature", 1.0)]);
            let message_id = event.event_id.to_string();
            (event, message_id)
        })
        .collect()
}

async fn sample_count(env: &TestEnv) -> Option<u64> {
    env.device_stats(DEVICE)
        .await
        .map(|stats| stats.sample_count)
}

/// Waits until the consumer is no longer ahead of a stream that went back to
/// `last_after`, then publishes `AFTER_CRASH` new events and waits until the device
/// counts them and its `BEFORE_CRASH`; returns that count. Checks that the consumer
/// is a new one, not `before_crash` (whose position the restarted server could only
/// have lost with the stream's tail if the crash had not kept it).
async fn repaired_then_projecting(
    env: &TestEnv,
    last_after: u64,
    before_crash: &consumer::Info,
) -> u64 {
    let jetstream = env.jetstream().await;
    eventually(
        CATCH_UP,
        "the consumer no longer ahead of the stream",
        || async {
            let info = env.durable_consumer_info(&jetstream).await?;
            (info.delivered.stream_sequence <= last_after).then_some(())
        },
    )
    .await;
    publish_many(env, &jetstream, &events(AFTER_CRASH)).await;
    let expected = (BEFORE_CRASH + AFTER_CRASH) as u64;
    eventually(CATCH_UP, "every new event projected", || async {
        (sample_count(env).await? == expected).then_some(())
    })
    .await;
    assert_ne!(
        consumer_info(env, &jetstream).await.created,
        before_crash.created,
        "the durable consumer recreated"
    );
    expected
}

#[tokio::test]
async fn a_running_projector_recreates_its_consumer_when_the_stream_goes_back_below_it() {
    let mut nats = PrivateNats::start();
    let (env, jetstream) = private_env(&nats).await;
    let projector = Projector::spawn(&env.settings).await;
    publish_many(&env, &jetstream, &events(BEFORE_CRASH)).await;
    let before_crash = drained(&env, &jetstream, BEFORE_CRASH as u64).await;

    let last_after = nats
        .crash_losing_tail(env.subjects.stream(), BEFORE_CRASH as u64)
        .await;
    // The consumer must no longer be ahead of the stream before new events arrive.
    repaired_then_projecting(&env, last_after, &before_crash).await;
    projector.stop().await;
}

/// The repair makes the consumer with the projector's `projector.ack_wait_secs`, not
/// with the ack wait the consumer it replaces had (here changed by hand, as `nats
/// consumer edit` or a projector of another configuration would): the dedup horizon
/// was checked against the projector's own.
#[tokio::test]
async fn a_consumer_recreated_after_the_stream_went_back_waits_the_configured_ack_wait() {
    let mut nats = PrivateNats::start();
    let (mut env, jetstream) = private_env(&nats).await;
    env.settings.projector.ack_wait_secs = 5;
    env.settings.projector.dedup_horizon_secs = 10;
    let projector = Projector::spawn(&env.settings).await;
    publish_many(&env, &jetstream, &events(BEFORE_CRASH)).await;
    let before_crash = drained(&env, &jetstream, BEFORE_CRASH as u64).await;
    let stream = jetstream
        .get_stream(env.subjects.stream())
        .await
        .expect("stream exists");
    let mut edited = consumer_info(&env, &jetstream).await.config;
    assert_eq!(edited.ack_wait, Duration::from_secs(5));
    edited.ack_wait = Duration::from_secs(30);
    stream
        .create_consumer(edited)
        .await
        .expect("ack wait changed by hand");

    let last_after = nats
        .crash_losing_tail(env.subjects.stream(), BEFORE_CRASH as u64)
        .await;
    repaired_then_projecting(&env, last_after, &before_crash).await;
    assert_eq!(
        consumer_info(&env, &env.jetstream().await)
            .await
            .config
            .ack_wait,
        Duration::from_secs(5),
        "the repaired consumer's ack wait"
    );
    projector.stop().await;
}

#[tokio::test]
async fn a_projector_started_after_the_stream_went_back_still_gets_the_events_that_reuse_lost_sequences(
) {
    let mut nats = PrivateNats::start();
    let (env, jetstream) = private_env(&nats).await;
    let projector = Projector::spawn(&env.settings).await;
    publish_many(&env, &jetstream, &events(BEFORE_CRASH)).await;
    let before_crash = drained(&env, &jetstream, BEFORE_CRASH as u64).await;
    // The supervisor remembers the consumer's ack floor in Redis.
    let redis = env.redis().await;
    let anchor_key = contract::read_model::consumer_anchor_key(
        &env.settings.redis.prefix,
        &env.settings.nats.consumer,
    );
    eventually(CATCH_UP, "the consumer anchor remembered", || async {
        let mut redis = redis.clone();
        let anchor: Option<String> = redis::cmd("GET")
            .arg(&anchor_key)
            .query_async(&mut redis)
            .await
            .ok()?;
        anchor
            .filter(|anchor| anchor.starts_with(&format!("{BEFORE_CRASH} ")))
            .map(|_| ())
    })
    .await;
    projector.stop().await;

    let last_after = nats
        .crash_losing_tail(env.subjects.stream(), BEFORE_CRASH as u64)
        .await;
    // New events take the lost sequences and go past the consumer's old position.
    let jetstream = env.jetstream().await;
    publish_many(&env, &jetstream, &events(AFTER_CRASH)).await;
    assert!(last_after + AFTER_CRASH as u64 > BEFORE_CRASH as u64);
    let projector = Projector::spawn(&env.settings).await;
    let expected = (BEFORE_CRASH + AFTER_CRASH) as u64;
    eventually(CATCH_UP, "every new event projected", || async {
        (sample_count(&env).await? == expected).then_some(())
    })
    .await;
    assert_ne!(
        consumer_info(&env, &jetstream).await.created,
        before_crash.created,
        "the durable consumer recreated"
    );
    projector.stop().await;
}

/// The consumer's repairs counted by a projector process (none yet: the series is not
/// served).
async fn repairs(projector: &ServiceProcess) -> f64 {
    projector
        .metrics()
        .await
        .value("projector_consumer_recreated_total", &[])
        .unwrap_or(0.0)
}

#[tokio::test]
async fn several_projectors_repair_the_consumer_once_between_them() {
    let mut nats = PrivateNats::start();
    let (env, jetstream) = private_env(&nats).await;
    // Published before the projectors start, so that every look they take at the
    // consumer sees the stream holding these.
    publish_many(&env, &jetstream, &events(BEFORE_CRASH)).await;
    let projectors: Vec<ServiceProcess> = (0..2).map(|_| projector_process(&env, &[])).collect();
    let before_crash = drained(&env, &jetstream, BEFORE_CRASH as u64).await;
    // Each supervisor looks at the consumer every second and keeps its own anchor. A
    // look that reports nothing pending and nothing awaiting an ack saw the ack floor at
    // the last event, and took its anchor there, which the loss will replace.
    for projector in &projectors {
        projector
            .metrics_until(CATCH_UP, "a look at the drained consumer", |scrape| {
                let pending = scrape.value("projector_consumer_pending", &[])?;
                let ack_pending = scrape.value("projector_consumer_ack_pending", &[])?;
                (pending == 0.0 && ack_pending == 0.0).then_some(())
            })
            .await;
    }

    let last_after = nats
        .crash_losing_tail(env.subjects.stream(), BEFORE_CRASH as u64)
        .await;
    let expected = repaired_then_projecting(&env, last_after, &before_crash).await;
    // Three more looks by each: a projector still judging by its anchor of the deleted
    // consumer would have repaired the new one by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0.0;
    for projector in &projectors {
        total += repairs(projector).await;
    }
    assert_eq!(total, 1.0, "repairs of the consumer by the two projectors");
    assert_eq!(sample_count(&env).await, Some(expected));
    for projector in projectors {
        assert!(projector.terminate().await.success());
    }
}

//! The metrics of the `projector` binary (README, "Operator's runbook"): each is served
//! on its admin port's `/metrics` and moves when what it counts happens.

use std::time::Duration;

use contract::read_model::DeviceKeys;
use testkit::process::ServiceProcess;
use testkit::prometheus::Scrape;
use testkit::{eventually, TestEnv};

use crate::support::{
    building_generation, event, live_generation, now_ms, projector_process, publish, publish_many,
    publish_raw, publish_with_id, relay_headers, spread_events, streams, CATCH_UP,
};

const EVENTS: usize = 30;

/// Waits until `projector` applied `applied` events in all, none is left unacked, and
/// the gauge `also_zero` is 0 too; returns that scrape.
async fn caught_up(projector: &ServiceProcess, applied: usize, also_zero: &str) -> Scrape {
    projector
        .metrics_until(
            Duration::from_secs(20),
            &format!("every event applied once, nothing unacked and {also_zero} at 0"),
            |scrape| {
                (scrape.value_or_zero("projector_events_applied_total", &[]) == applied as f64
                    && scrape.value("projector_consumer_ack_pending", &[]) == Some(0.0)
                    && scrape.value(also_zero, &[]) == Some(0.0))
                .then(|| scrape.clone())
            },
        )
        .await
}

/// Redis refusing the projector's applies for one device: its record of applied events
/// is a string, so the apply script's first command fails.
struct Refused {
    applied_key: String,
}

impl Refused {
    async fn applies(env: &TestEnv, generation: u64, device: &str) -> Self {
        let applied_key = DeviceKeys::new(&env.settings.redis.prefix, generation, device).applied;
        env.overwrite_with_a_string(&applied_key).await;
        Self { applied_key }
    }

    /// Redis accepts the device's applies again.
    async fn end(self, env: &TestEnv) {
        let () = redis::cmd("DEL")
            .arg(&self.applied_key)
            .query_async(&mut env.redis().await)
            .await
            .expect("del");
    }
}

#[tokio::test]
async fn projector_metrics_show_its_lag_applies_duplicates_and_dead_letters() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    // Small batches, so that a stalled projector leaves events undelivered too.
    let projector = projector_process(&env, &[("PIPELINE__PROJECTOR__BATCH_SIZE", "5")]);
    projector.ready().await;
    let generation = live_generation(&env).await;
    projector
        .metrics_until(
            Duration::from_secs(15),
            "the consumer's backlog reported",
            |scrape| (scrape.value("projector_consumer_pending", &[]) == Some(0.0)).then_some(()),
        )
        .await;
    let start = projector.metrics().await;
    // Before any dead letter: an alert fires on the first of each reason.
    testkit::prometheus::assert_counters_served_from_start(&start, "projector");
    for reason in projector::dlq::Reason::labels() {
        assert_eq!(
            start.value("projector_dlq_total", &[("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }

    // Redis refuses the projector's writes for this device: the projector keeps
    // retrying the batch it holds and cannot take more, as when Redis is down.
    let device = "sensor-1";
    let refused = Refused::applies(&env, generation, device).await;
    let base = now_ms() - 60_000;
    let events: Vec<_> = (0..EVENTS)
        .map(|index| {
            event(
                device,
                base + index as i64,
                &[("temperature", index as f64)],
            )
        })
        .collect();
    for event in &events {
        publish(&env, &jetstream, event).await;
    }
    let lagging = projector
        .metrics_until(
            Duration::from_secs(15),
            "pending and ack-pending to rise while Redis refuses",
            |scrape| {
                (scrape.value_or_zero("projector_consumer_pending", &[]) > 0.0
                    && scrape.value_or_zero("projector_consumer_ack_pending", &[]) > 0.0)
                    .then(|| scrape.clone())
            },
        )
        .await;
    assert_eq!(
        lagging.value_or_zero("projector_events_applied_total", &[]),
        start.value_or_zero("projector_events_applied_total", &[]),
        "nothing applied while Redis refuses"
    );
    assert!(
        lagging.value_or_zero("projector_errors_total", &[])
            > start.value_or_zero("projector_errors_total", &[]),
        "each refused apply is an error"
    );

    // Redis accepts again: everything is applied and the backlog falls to 0.
    refused.end(&env).await;
    let caught_up = caught_up(&projector, EVENTS, "projector_consumer_pending").await;
    let end_to_end = "projector_end_to_end_seconds_count";
    assert_eq!(
        caught_up.value_or_zero(end_to_end, &[]) - start.value_or_zero(end_to_end, &[]),
        EVENTS as f64,
        "one end-to-end latency per applied event"
    );
    assert!(
        caught_up.value_or_zero("projector_end_to_end_seconds_sum", &[]) > 0.0,
        "received_at lies in the past"
    );
    assert!(caught_up.has("projector_end_to_end_seconds_bucket"));
    assert!(caught_up.value_or_zero("projector_apply_seconds_count", &[]) >= 1.0);
    assert!(caught_up.value_or_zero("projector_batch_size_count", &[]) >= 1.0);
    assert!(caught_up.has("projector_consumer_redelivered"));

    // A copy of an applied event under another message id (a republish after the
    // duplicate window): stored and delivered again, skipped by the script.
    let copy = publish_with_id(&env, &jetstream, &events[0], "another-message-id").await;
    assert!(!copy.duplicate);
    let skipped = projector
        .metrics_until(
            Duration::from_secs(15),
            "the copy skipped as a duplicate",
            |scrape| {
                (scrape.value_or_zero("projector_duplicates_skipped_total", &[])
                    == caught_up.value_or_zero("projector_duplicates_skipped_total", &[]) + 1.0)
                    .then(|| scrape.clone())
            },
        )
        .await;
    assert_eq!(
        skipped.value_or_zero("projector_events_applied_total", &[]),
        EVENTS as f64,
        "the copy is not applied"
    );

    // Garbage on the stream's own subject: dead-lettered.
    let reason = [("reason", "undecodable")];
    publish_raw(
        &jetstream,
        env.subjects.recorded(device),
        relay_headers("garbage"),
        b"not json at all".to_vec(),
    )
    .await;
    projector
        .metrics_until(
            Duration::from_secs(15),
            "the garbage counted as a dead letter",
            |scrape| {
                (scrape.value_or_zero("projector_dlq_total", &reason)
                    == skipped.value_or_zero("projector_dlq_total", &reason) + 1.0)
                    .then_some(())
            },
        )
        .await;

    assert_eq!(projector.terminate().await.code(), Some(0));
}

/// A meta hash Redis cannot read (here one of the wrong type; Redis away alike) leaves
/// every event unapplied, and each failed read counts as an error, as a failed apply
/// does. It used to pass for a read model still to be built: nothing counted, a debug
/// line, and the batch waited in silence.
#[tokio::test]
async fn a_meta_hash_that_cannot_be_read_counts_as_an_error_until_it_can() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = projector_process(&env, &[]);
    projector.ready().await;
    live_generation(&env).await;
    let meta = contract::read_model::meta_key(&env.settings.redis.prefix);
    let kept = format!("{meta}-kept");
    let mut redis = env.redis().await;
    let () = redis::pipe()
        .atomic()
        .cmd("RENAME")
        .arg(&meta)
        .arg(&kept)
        .ignore()
        .cmd("SET")
        .arg(&meta)
        .arg("not a hash")
        .ignore()
        .query_async(&mut redis)
        .await
        .expect("the meta hash set aside");
    let start = projector.metrics().await;
    publish(
        &env,
        &jetstream,
        &event("sensor-1", now_ms(), &[("temperature", 1.0)]),
    )
    .await;
    let failing = projector
        .metrics_until(
            Duration::from_secs(15),
            "errors counted while the meta hash cannot be read",
            |scrape| {
                (scrape.value_or_zero("projector_errors_total", &[])
                    > start.value_or_zero("projector_errors_total", &[]))
                .then(|| scrape.clone())
            },
        )
        .await;
    assert_eq!(
        failing.value_or_zero("projector_events_applied_total", &[]),
        0.0,
        "nothing applied meanwhile"
    );
    let () = redis::cmd("RENAME")
        .arg(&kept)
        .arg(&meta)
        .query_async(&mut redis)
        .await
        .expect("the meta hash back");
    caught_up(&projector, 1, "projector_consumer_pending").await;
    assert_eq!(projector.terminate().await.code(), Some(0));
}

/// A rebuild the supervisor starts (here: no read model yet, a stream of events
/// waiting) replays the stream, minutes of it maybe. The looks at the durable consumer
/// go on meanwhile: its gauges move with it, as its anchor and the repair of a stream
/// that went back do. They used to wait for the whole replay, the gauges frozen at
/// their value from before it.
#[tokio::test]
async fn the_consumer_gauges_move_while_the_supervisor_rebuilds() {
    // Enough that the replay outlasts a few looks at the consumer.
    const EVENTS: usize = 150_000;
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    publish_many(&env, &jetstream, &spread_events(EVENTS)).await;
    let projector = projector_process(&env, &[]);
    eventually(CATCH_UP, "the rebuild under way", || {
        building_generation(&env)
    })
    .await;
    // One more: the consumer's backlog moves during the rebuild whatever the live
    // projector does meanwhile.
    publish(
        &env,
        &jetstream,
        &event("sensor-late", now_ms(), &[("temperature", 1.0)]),
    )
    .await;
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    eventually(
        Duration::from_secs(8),
        "projector_consumer_pending to move during the rebuild",
        || async {
            let pending = projector
                .metrics()
                .await
                .value("projector_consumer_pending", &[]);
            assert!(
                building_generation(&env).await.is_some(),
                "the rebuild ended before projector_consumer_pending moved (seen: {:?})",
                seen.lock().expect("not poisoned")
            );
            let mut seen = seen.lock().expect("not poisoned");
            seen.extend(pending.map(|pending| pending as u64));
            (seen.len() >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(projector.terminate().await.code(), Some(0));
}

/// Redeliveries are counted as they arrive (`projector_redelivered_total`, what the
/// `ProjectorRedeliveries` alert reads), while `projector_consumer_redelivered` is
/// JetStream's gauge of redelivered messages not yet acked, which falls back to 0.
#[tokio::test]
async fn redeliveries_are_counted_as_they_arrive_and_the_unacked_gauge_falls_back() {
    const HELD: usize = 5;
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = projector_process(
        &env,
        // Room for batches beyond the held ones, which wait on Redis, so that the
        // projector takes the redelivered copies in.
        &[
            ("PIPELINE__PROJECTOR__ACK_WAIT_SECS", "1"),
            ("PIPELINE__PROJECTOR__BATCHES_IN_FLIGHT", "16"),
        ],
    );
    projector.ready().await;
    let generation = live_generation(&env).await;
    let start = projector.metrics().await;
    assert_eq!(start.value("projector_redelivered_total", &[]), Some(0.0));

    // Redis refuses this device's applies: the projector holds the batch past the 1 s
    // ack wait, and JetStream delivers its messages again. No other device's call
    // goes through, so they are not dead-lettered however often they come.
    let device = "sensor-1";
    let refused = Refused::applies(&env, generation, device).await;
    let base = now_ms() - 60_000;
    for index in 0..HELD {
        let reading = event(device, base + index as i64, &[("temperature", 1.0)]);
        publish(&env, &jetstream, &reading).await;
    }
    projector
        .metrics_until(
            Duration::from_secs(20),
            "the held messages delivered again, and counted",
            |scrape| {
                (scrape.value_or_zero("projector_redelivered_total", &[]) >= HELD as f64
                    && scrape.value_or_zero("projector_consumer_redelivered", &[]) > 0.0)
                    .then_some(())
            },
        )
        .await;

    refused.end(&env).await;
    let caught_up = caught_up(&projector, HELD, "projector_consumer_redelivered").await;
    assert!(caught_up.value_or_zero("projector_redelivered_total", &[]) >= HELD as f64);
    assert_eq!(projector.terminate().await.code(), Some(0));
}

//! Every event counts once: stream-level copies, redeliveries of applied events, and
//! any shuffling, duplication and batching of deliveries (API.md §4, "exactly once").

use std::collections::BTreeMap;
use std::time::Duration;

use contract::event::TelemetryRecorded;
use contract::read_model::{DeviceKeys, DeviceStats};
use projector::apply::{Applied, Delivered};
use proptest::prelude::*;
use testkit::prometheus::{scrape, Scrape};
use testkit::{eventually, RedisUser, TestEnv};

use crate::support::{
    apply_live, assert_same_figures, connection, consumer_info, drained, event, figures,
    live_generation, now_ms, projected, projector_process, publish, publish_many, publish_with_id,
    reference, set_live_generation, stream_messages, streams, Projector, Sums, CATCH_UP,
};

/// The generation the tests that apply directly write to (and make live).
const GENERATION: u64 = 1;

#[tokio::test]
async fn an_event_stored_twice_in_the_stream_is_counted_once_and_as_of_seq_advances() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&env.settings).await;
    let base = now_ms() - 60_000;
    let events = [
        event(
            "sensor-1",
            base,
            &[("temperature", 20.0), ("humidity", 50.0)],
        ),
        event("sensor-1", base + 1_000, &[("temperature", 21.0)]),
        event("sensor-1", base + 2_000, &[("temperature", 19.0)]),
        event("sensor-2", base, &[("temperature", 5.0)]),
    ];
    for event in &events {
        publish(&env, &jetstream, event).await;
    }
    let expected = reference(&events);
    projected(&env, &expected).await;
    drained(&env, &jetstream, 4).await;
    let before = figures(&env, "sensor-1").await;

    // The relay republishing inside the duplicate window: JetStream drops the copy.
    let same_id = publish_with_id(
        &env,
        &jetstream,
        &events[1],
        &events[1].event_id.to_string(),
    )
    .await;
    assert!(same_id.duplicate, "JetStream recognises the message id");
    assert_eq!(stream_messages(&jetstream, env.subjects.stream()).await, 4);

    // A copy JetStream cannot recognise (e.g. republished after the window): stored
    // again, delivered again, and skipped by the projector.
    let copy = publish_with_id(&env, &jetstream, &events[1], "another-message-id").await;
    assert!(!copy.duplicate);
    assert_eq!(copy.sequence, 5);
    let info = drained(&env, &jetstream, 5).await;
    assert_eq!(info.delivered.stream_sequence, 5);
    let stats = eventually(CATCH_UP, "as_of_seq to reach the copy", || async {
        env.device_stats("sensor-1")
            .await
            .filter(|stats| stats.as_of_seq == 5)
    })
    .await;
    assert_same_figures("sensor-1", &stats, &expected["sensor-1"], Sums::Exact);
    assert_eq!(
        figures(&env, "sensor-1").await,
        before,
        "the copy changed no figure"
    );
    let other = env
        .device_stats("sensor-2")
        .await
        .expect("sensor-2 projected");
    assert_same_figures("sensor-2", &other, &expected["sensor-2"], Sums::Exact);
    projector.stop().await;
}

#[tokio::test]
async fn applying_the_same_batch_twice_applies_nothing_the_second_time() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    set_live_generation(&env, GENERATION).await;
    let base = now_ms() - 60_000;
    let events = [
        event("sensor-1", base, &[("temperature", 20.5)]),
        event(
            "sensor-1",
            base + 10,
            &[("temperature", 22.25), ("humidity", 41.0)],
        ),
        event("sensor-2", base + 20, &[("humidity", 60.0)]),
        event("sensor-1", base - 10, &[("temperature", 18.0)]),
    ];
    let mut batch: Vec<Delivered> = events
        .iter()
        .zip(1..)
        .map(|(event, stream_sequence)| Delivered {
            event: event.clone(),
            stream_sequence,
            stored_at: event.received_at,
        })
        .collect();
    // The same event twice in one batch, as a redelivery racing its original.
    batch.push(batch[1].clone());

    let first = apply_live(&env, &mut redis, &batch, now_ms()).await;
    assert_eq!(
        first,
        Applied {
            applied: 4,
            duplicates: 1
        }
    );
    let after_first = (
        figures(&env, "sensor-1").await,
        figures(&env, "sensor-2").await,
    );
    let stats_after_first = (
        env.device_stats("sensor-1").await.expect("sensor-1"),
        env.device_stats("sensor-2").await.expect("sensor-2"),
    );

    let second = apply_live(&env, &mut redis, &batch, now_ms() + 1_000).await;
    assert_eq!(
        second,
        Applied {
            applied: 0,
            duplicates: 5
        }
    );
    assert_eq!(
        (
            figures(&env, "sensor-1").await,
            figures(&env, "sensor-2").await
        ),
        after_first,
        "the second apply changed no figure"
    );
    let expected = reference(&events);
    for (device, stats) in [
        ("sensor-1", stats_after_first.0),
        ("sensor-2", stats_after_first.1),
    ] {
        assert_same_figures(device, &stats, &expected[device], Sums::Exact);
        let again = env.device_stats(device).await.expect("still there");
        assert_eq!(again.as_of_seq, stats.as_of_seq, "{device}: as_of_seq");
        assert!(
            again.updated_at_ms > stats.updated_at_ms,
            "{device}: updated_at"
        );
    }
}

#[tokio::test]
async fn events_applied_before_a_crash_are_skipped_when_the_projector_receives_them_again() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let base = now_ms() - 60_000;
    let events = [
        event("sensor-1", base, &[("temperature", 20.0)]),
        event("sensor-1", base + 1, &[("temperature", 21.0)]),
        event("sensor-2", base + 2, &[("temperature", 22.0)]),
        event("sensor-1", base + 3, &[("temperature", 23.0)]),
    ];
    let mut delivered = Vec::new();
    for event in &events {
        let stream_sequence = publish(&env, &jetstream, event).await;
        delivered.push(Delivered {
            event: event.clone(),
            stream_sequence,
            stored_at: event.received_at,
        });
    }
    // A projector applied the first three to the live generation and died before
    // acking them: JetStream still holds them as undelivered for the durable consumer.
    set_live_generation(&env, GENERATION).await;
    let mut redis = connection(&env).await;
    apply_live(&env, &mut redis, &delivered[..3], now_ms()).await;

    let projector = Projector::spawn(&env.settings).await;
    let info = drained(&env, &jetstream, 4).await;
    assert_eq!(info.delivered.stream_sequence, 4);
    let expected = reference(&events);
    let actual = projected(&env, &expected).await;
    for (device, want) in &expected {
        assert_same_figures(device, &actual[device], want, Sums::Exact);
    }
    assert_eq!(
        env.generation().await,
        Some(GENERATION),
        "the live generation was kept, not rebuilt"
    );
    projector.stop().await;
}

/// A projector cut off from Redis but not from NATS (a partition, a paused host) holds
/// the batch it took, while JetStream, the ack wait over, delivers the events to another
/// projector, which applies them. Once Redis is back the first must not apply what it
/// held: the other's record of those events may have left with the dedup horizon by
/// then, and they would count twice. They did, before a projector gave up what Redis
/// had not taken within the ack wait.
#[tokio::test]
async fn a_batch_held_while_redis_was_out_of_reach_is_given_up_not_counted_twice() {
    let mut env = TestEnv::new();
    env.settings.projector.ack_wait_secs = 1;
    env.settings.projector.dedup_horizon_secs = 3;
    let jetstream = streams(&env).await;
    let user = RedisUser::create(&env, &[]).await;
    let mut cut_off_settings = env.settings.clone();
    cut_off_settings.redis.url = user.url();
    let cut_off = Projector::spawn(&cut_off_settings).await;
    let base = now_ms() - 60_000;
    let mut events = vec![event("sensor-1", base, &[("temperature", 0.0)])];
    let sequence = publish(&env, &jetstream, &events[0]).await;
    drained(&env, &jetstream, sequence).await;

    user.disable().await;
    let held: Vec<_> = (1..=20)
        .map(|index| {
            let event = event("sensor-1", base + index, &[("temperature", index as f64)]);
            let message_id = event.event_id.to_string();
            (event, message_id)
        })
        .collect();
    publish_many(&env, &jetstream, &held).await;
    events.extend(held.into_iter().map(|(event, _)| event));
    eventually(CATCH_UP, "the projector cut off to hold all 20", || async {
        let info = consumer_info(&env, &jetstream).await;
        (info.num_pending == 0 && info.num_ack_pending == 20).then_some(())
    })
    .await;
    let other = projector_process(
        &env,
        &[
            ("PIPELINE__PROJECTOR__ACK_WAIT_SECS", "1"),
            ("PIPELINE__PROJECTOR__DEDUP_HORIZON_SECS", "3"),
        ],
    );
    projected(&env, &reference(&events)).await;
    assert!(other.terminate().await.success());
    let applied = DeviceKeys::new(
        &env.settings.redis.prefix,
        live_generation(&env).await,
        "sensor-1",
    )
    .applied;
    eventually(
        CATCH_UP,
        "the record of the applied events to expire",
        || async {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&applied)
                .query_async(&mut env.redis().await)
                .await
                .ok()?;
            (!exists).then_some(())
        },
    )
    .await;

    user.enable().await;
    // Another device's event shows the projector reaches Redis again.
    events.push(event("sensor-2", base, &[("temperature", 1.0)]));
    let sequence = publish(&env, &jetstream, &events[21]).await;
    drained(&env, &jetstream, sequence).await;
    // A batch it still held would be tried again within the longest backoff, 5 s: a
    // duration that must pass.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let expected = reference(&events);
    let actual = projected(&env, &expected).await;
    for (device, want) in &expected {
        assert_same_figures(device, &actual[device], want, Sums::Exact);
    }
    let given_up = scrape(
        &reqwest::Client::new(),
        &format!("{}/metrics", cut_off.admin_url),
    )
    .await
    .and_then(|scrape| scrape.value("projector_events_given_up_total", &[]));
    assert!(
        given_up >= Some(20.0),
        "the projector cut off gave up what it held: {given_up:?}"
    );
    cut_off.stop().await;
}

/// A device whose call Redis refuses (its applied set overwritten with a string, as an
/// operator's mistake would) holds up its own batch, not the other devices' events:
/// they are pulled and applied while that batch is retried. Such a failure is not one
/// that every batch would meet, so the projector does not fall back to pulling one
/// batch at a time for it (a stall it would keep until the refused batch is given up
/// after the ack wait, unless another batch got through first).
#[tokio::test]
async fn a_device_redis_refuses_does_not_hold_up_the_other_devices() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = projector_process(&env, &[]);
    projector.ready().await;
    let applied = DeviceKeys::new(
        &env.settings.redis.prefix,
        live_generation(&env).await,
        "sensor-refused",
    )
    .applied;
    env.overwrite_with_a_string(&applied).await;
    let errors = |scrape: &Scrape| scrape.value_or_zero("projector_errors_total", &[]);
    let before = errors(&projector.metrics().await);
    let base = now_ms() - 60_000;
    publish(
        &env,
        &jetstream,
        &event("sensor-refused", base, &[("temperature", 1.0)]),
    )
    .await;
    projector
        .metrics_until(CATCH_UP, "the refused batch to fail", |scrape| {
            (errors(scrape) > before).then_some(())
        })
        .await;
    let held = consumer_info(&env, &jetstream).await;
    assert_eq!(
        (held.num_pending, held.num_ack_pending),
        (0, 1),
        "the refused event is held"
    );
    // Twice: a pull already waiting when the batch failed may bring the first.
    let mut others = Vec::new();
    for wave in 0..2 {
        for index in 0..10 {
            let event = event(
                &format!("sensor-{index}"),
                base + wave * 10 + index,
                &[("temperature", index as f64)],
            );
            publish(&env, &jetstream, &event).await;
            others.push(event);
        }
        projected(&env, &reference(&others)).await;
    }
    assert_eq!(
        projector
            .metrics()
            .await
            .value("projector_events_given_up_total", &[]),
        Some(0.0),
        "the other devices' events were applied before the refused batch was given up"
    );
    assert!(projector.terminate().await.success());
}

/// An event Redis refuses on every delivery (its device's applied set overwritten with
/// a string), in one batch with other devices' events: those are acked at once, not held
/// and redelivered with it, and it goes to the dead-letter stream with the reason
/// `refused` once delivered `DELIVERIES_BEFORE_REFUSED_IS_DEAD` times, so the
/// consumer's ack floor moves past it (API.md §6: not retried forever). Its
/// redeliveries meet other devices' events, which go through, as on a busy pipeline.
/// Mended and re-driven, it counts once.
#[tokio::test]
async fn an_event_redis_refuses_on_every_delivery_is_dead_lettered_and_its_batch_acked() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let (_, applied) = a_refused_device(&env).await;

    // Published while no projector runs, so that the next one pulls them in one batch.
    let base = now_ms() - 60_000;
    let refused = event("sensor-refused", base, &[("temperature", 1.0)]);
    let refused_sequence = publish(&env, &jetstream, &refused).await;
    let mut others = Vec::new();
    for index in 0..10 {
        let event = event(
            &format!("sensor-{index}"),
            base + index,
            &[("temperature", index as f64)],
        );
        publish(&env, &jetstream, &event).await;
        others.push(event);
    }
    let projector = projector_process(&env, &[ONE_SECOND_ACK_WAIT]);
    let expected = reference(&others);
    projected(&env, &expected).await;

    // Other devices' events keep coming until the refused one is dead-lettered.
    let dead_lettered = std::sync::atomic::AtomicBool::new(false);
    let trickle = trickle(&env, &jetstream, base + 1_000, 200, || {
        dead_lettered.load(std::sync::atomic::Ordering::Relaxed)
    });
    let letter = async {
        let letter = eventually(CATCH_UP, "the refused event dead-lettered", || async {
            let letters = projector::dlq::list(&jetstream, &env.subjects, 10)
                .await
                .ok()?;
            letters.into_iter().next()
        })
        .await;
        dead_lettered.store(true, std::sync::atomic::Ordering::Relaxed);
        letter
    };
    let ((trickled, last_sequence), letter) = tokio::join!(trickle, letter);
    assert_eq!(letter.original_sequence, Some(refused_sequence));
    assert_eq!(letter.subject, env.subjects.dlq(Some("sensor-refused")));
    assert!(
        letter.reason.starts_with("refused: WRONGTYPE"),
        "{}",
        letter.reason
    );
    others.extend(trickled);
    let expected = reference(&others);
    let info = drained(&env, &jetstream, last_sequence).await;
    assert_eq!(info.ack_floor.stream_sequence, last_sequence);
    for (device, stats) in projected(&env, &expected).await {
        assert_same_figures(&device, &stats, &expected[&device], Sums::Exact);
    }
    let scrape = projector.metrics().await;
    assert_eq!(
        scrape.value("projector_dlq_total", &[("reason", "refused")]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("projector_events_applied_total", &[]),
        Some(others.len() as f64),
        "the other devices' events were applied once"
    );
    assert_eq!(env.device_stats("sensor-refused").await, None);

    // Mended, then re-driven: counted once.
    mend(&env, &applied).await;
    projector::dlq::redrive(&jetstream, &env.subjects, letter.sequence)
        .await
        .expect("re-driven");
    counted_once(&env, &refused).await;
    assert!(projector.terminate().await.success());
}

/// Other devices' events (`sensor-0` to `sensor-9`), five a second from `base`, at most
/// `most` of them or until `stop` says so; returns them and the last one's sequence.
async fn trickle(
    env: &TestEnv,
    jetstream: &async_nats::jetstream::Context,
    base: i64,
    most: i64,
    stop: impl Fn() -> bool,
) -> (Vec<TelemetryRecorded>, u64) {
    let mut trickled = Vec::new();
    let mut last_sequence = 0;
    for index in 0..most {
        if stop() {
            break;
        }
        let event = event(
            &format!("sensor-{}", index % 10),
            base + index,
            &[("temperature", 50.0 + index as f64)],
        );
        last_sequence = publish(env, jetstream, &event).await;
        trickled.push(event);
        // The pace of a light pipeline, so that redeliveries come between them.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (trickled, last_sequence)
}

/// While a rebuild runs, an event refused in the live generation (its applied set
/// there overwritten with a string) is not dead-lettered however often it comes, other
/// devices' events going through meanwhile: the switch to the new generation, whose
/// keys are sound, mends it, and it counts there once. Dead-lettered, the new
/// generation would never have had it.
#[tokio::test]
async fn an_event_refused_during_a_rebuild_waits_for_the_switch_rather_than_the_dead_letters() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let (live, _) = a_refused_device(&env).await;
    // A rebuild under way: generation `live + 1` being built, its lock held (so that
    // no projector takes the build over), nothing replayed alone.
    let building = live + 1;
    let mut redis = env.redis().await;
    let () = redis::cmd("SET")
        .arg(contract::read_model::rebuild_lock_key(
            &env.settings.redis.prefix,
        ))
        .arg("a rebuild elsewhere")
        .arg("EX")
        .arg(120)
        .query_async(&mut redis)
        .await
        .expect("lock");
    let meta = contract::read_model::meta_key(&env.settings.redis.prefix);
    let () = redis::cmd("HSET")
        .arg(&meta)
        .arg(contract::read_model::meta::BUILDING)
        .arg(building)
        .query_async(&mut redis)
        .await
        .expect("building");

    let deliveries_before = consumer_info(&env, &jetstream)
        .await
        .delivered
        .consumer_sequence;
    let base = now_ms() - 60_000;
    let refused = event("sensor-refused", base, &[("temperature", 1.0)]);
    publish(&env, &jetstream, &refused).await;
    let mut others = Vec::new();
    for index in 0..10 {
        let event = event(
            &format!("sensor-{index}"),
            base + index,
            &[("temperature", 2.0)],
        );
        publish(&env, &jetstream, &event).await;
        others.push(event);
    }
    let projector = projector_process(&env, &[ONE_SECOND_ACK_WAIT]);
    projected(&env, &reference(&others)).await;
    // Five seconds of other devices' events: the refused one comes five times or more.
    let (trickled, _) = trickle(&env, &jetstream, base + 1_000, 25, || false).await;
    others.extend(trickled);
    projected(&env, &reference(&others)).await;
    // Every other event delivered (at least) once: the rest are the refused one's.
    let deliveries = consumer_info(&env, &jetstream)
        .await
        .delivered
        .consumer_sequence
        - deliveries_before
        - others.len() as u64;
    assert!(
        deliveries >= projector::consumer::DELIVERIES_BEFORE_REFUSED_IS_DEAD as u64,
        "the refused event delivered as often as dead-lettering takes: {deliveries} times"
    );
    assert!(
        no_dead_letters(&env, &jetstream).await,
        "nothing dead-lettered while the rebuild runs"
    );
    assert_eq!(consumer_info(&env, &jetstream).await.num_ack_pending, 1);

    // The switch: the new generation live, the lock let go.
    let () = redis::cmd("HSET")
        .arg(&meta)
        .arg(contract::read_model::meta::GENERATION)
        .arg(building)
        .query_async(&mut redis)
        .await
        .expect("switch");
    let () = redis::cmd("HDEL")
        .arg(&meta)
        .arg(contract::read_model::meta::BUILDING)
        .query_async(&mut redis)
        .await
        .expect("switch");
    let () = redis::cmd("DEL")
        .arg(contract::read_model::rebuild_lock_key(
            &env.settings.redis.prefix,
        ))
        .query_async(&mut redis)
        .await
        .expect("unlock");
    counted_once(&env, &refused).await;
    assert!(projector.terminate().await.success());
}

/// A refusal no other call of the batch gets past is not told from one every call
/// would meet (a script error on every device, an ACL that denies the script a
/// command): the events wait, unacked and redelivered, however often, and none goes to
/// the dead-letter stream. Mended, they count once.
#[tokio::test]
async fn an_event_refused_where_no_other_call_goes_through_waits_rather_than_being_dead_lettered() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let (_, applied) = a_refused_device(&env).await;
    let projector = projector_process(&env, &[ONE_SECOND_ACK_WAIT]);
    projector.ready().await;
    let deliveries_before = consumer_info(&env, &jetstream)
        .await
        .delivered
        .consumer_sequence;
    let refused = event("sensor-refused", now_ms() - 60_000, &[("temperature", 1.0)]);
    let sequence = publish(&env, &jetstream, &refused).await;
    eventually(CATCH_UP, "the event delivered a fourth time", || async {
        let info = consumer_info(&env, &jetstream).await;
        (info.delivered.consumer_sequence >= deliveries_before + 4).then_some(())
    })
    .await;
    assert!(
        no_dead_letters(&env, &jetstream).await,
        "nothing dead-lettered"
    );
    assert_eq!(consumer_info(&env, &jetstream).await.num_ack_pending, 1);

    mend(&env, &applied).await;
    counted_once(&env, &refused).await;
    drained(&env, &jetstream, sequence).await;
    assert!(projector.terminate().await.success());
}

/// An ack wait short enough for a test to see redeliveries.
const ONE_SECOND_ACK_WAIT: (&str, &str) = ("PIPELINE__PROJECTOR__ACK_WAIT_SECS", "1");

/// Makes `sensor-refused` a device Redis refuses to apply to in the live generation,
/// which a projector run and stopped first makes: its applied set there a string.
/// Returns the generation and that key.
async fn a_refused_device(env: &TestEnv) -> (u64, String) {
    let first = projector_process(env, &[ONE_SECOND_ACK_WAIT]);
    first.ready().await;
    let live = live_generation(env).await;
    assert!(first.terminate().await.success());
    let applied = DeviceKeys::new(&env.settings.redis.prefix, live, "sensor-refused").applied;
    env.overwrite_with_a_string(&applied).await;
    (live, applied)
}

/// Mends the device [`a_refused_device`] broke.
async fn mend(env: &TestEnv, applied: &str) {
    let () = redis::cmd("DEL")
        .arg(applied)
        .query_async(&mut env.redis().await)
        .await
        .expect("del");
}

/// Waits until `refused` shows in the live generation, and checks it counted once.
async fn counted_once(env: &TestEnv, refused: &TelemetryRecorded) {
    let expected = reference([refused]);
    let device = refused.device_id.as_str();
    let actual = projected(env, &expected).await;
    assert_same_figures(device, &actual[device], &expected[device], Sums::Exact);
}

/// Whether the dead-letter stream (which [`streams`] made) holds nothing.
async fn no_dead_letters(env: &TestEnv, jetstream: &async_nats::jetstream::Context) -> bool {
    projector::dlq::list(jetstream, &env.subjects, 10)
        .await
        .expect("the dead letters listed")
        .is_empty()
}

/// One event of a generated scenario: device, time slot and metric values.
#[derive(Debug, Clone)]
struct Spec {
    device: usize,
    slot: i64,
    metrics: BTreeMap<&'static str, i32>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..3usize,
        0..5i64,
        prop::collection::btree_map(
            prop::sample::select(vec!["temperature", "humidity", "pressure"]),
            -200..200i32,
            1..=3,
        ),
    )
        .prop_map(|(device, slot, metrics)| Spec {
            device,
            slot,
            metrics,
        })
}

/// Events, the order they are delivered in (indices into the events, with repeats for
/// redeliveries), and the sizes of the batches the deliveries are cut into.
fn scenario() -> impl Strategy<Value = (Vec<Spec>, Vec<usize>, Vec<usize>)> {
    prop::collection::vec(spec(), 1..25)
        .prop_flat_map(|specs| {
            let count = specs.len();
            (Just(specs), prop::collection::vec(0..count, 0..=count))
        })
        .prop_flat_map(|(specs, redeliveries)| {
            let order: Vec<usize> = (0..specs.len()).chain(redeliveries).collect();
            (
                Just(specs),
                Just(order).prop_shuffle(),
                prop::collection::vec(1..8usize, 1..6),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_shuffling_duplication_and_batching_of_deliveries_gives_the_figures_of_the_fold(
        (specs, order, batch_sizes) in scenario()
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let env = TestEnv::new();
            let mut redis = connection(&env).await;
            set_live_generation(&env, GENERATION).await;
            let base = now_ms() - 60_000;
            let events: Vec<TelemetryRecorded> = specs
                .iter()
                .map(|spec| {
                    let metrics: Vec<(&str, f64)> = spec
                        .metrics
                        .iter()
                        .map(|(name, quarters)| (*name, f64::from(*quarters) / 4.0))
                        .collect();
                    event(&format!("sensor-{}", spec.device), base + spec.slot, &metrics)
                })
                .collect();
            // A redelivery keeps the stream sequence of the original message.
            let deliveries: Vec<Delivered> = order
                .iter()
                .map(|index| Delivered {
                    event: events[*index].clone(),
                    stream_sequence: *index as u64 + 1,
                    stored_at: events[*index].received_at,
                })
                .collect();
            let mut rest = deliveries.as_slice();
            let mut sizes = batch_sizes.iter().cycle();
            let mut applied = 0;
            while !rest.is_empty() {
                let size = (*sizes.next().expect("cycle")).min(rest.len());
                let (batch, later) = rest.split_at(size);
                applied += apply_live(&env, &mut redis, batch, now_ms()).await.applied;
                rest = later;
            }
            assert_eq!(applied, events.len() as u64, "each event applied once");
            for (device, want) in reference(&events) {
                let actual: DeviceStats = env.device_stats(&device).await.expect("projected");
                assert_same_figures(&device, &actual, &want, Sums::Exact);
                let last_sequence = events
                    .iter()
                    .zip(1..)
                    .filter(|(event, _)| event.device_id == device)
                    .map(|(_, sequence)| sequence)
                    .max()
                    .expect("device has events");
                assert_eq!(actual.as_of_seq, last_sequence, "{device}: as_of_seq");
            }
        });
    }
}

//! What the projector writes: the figures of API.md §4, checked against a fold.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, consumer};
use contract::event::TelemetryRecorded;
use contract::read_model::DeviceStats;
use testkit::TestEnv;

use crate::support::{
    assert_same_figures, drained, event, now_ms, projected, publish, publish_many, reference,
    streams, Projector, SplitMix, Sums,
};

#[tokio::test]
async fn events_for_several_devices_and_metrics_are_projected_as_an_independent_fold_computes() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&env.settings).await;
    let base = now_ms() - 3_600_000;
    let events = [
        event(
            "sensor-a",
            base + 1_000,
            &[("temperature", 21.5), ("humidity", 40.25)],
        ),
        event("sensor-b", base + 500, &[("temperature", -3.25)]),
        event("sensor-a", base + 5_000, &[("temperature", 19.75)]),
        event(
            "sensor-a",
            base + 9_000,
            &[
                ("temperature", 22.0),
                ("humidity", 38.5),
                ("pressure", 1013.25),
            ],
        ),
        // Late: older than what is already there, so it must not become `last`.
        event(
            "sensor-a",
            base + 2_000,
            &[("temperature", 30.0), ("humidity", 99.0)],
        ),
        // Ties on recorded_at: the larger value is `last`, whatever the arrival order.
        event("sensor-a", base + 9_000, &[("temperature", 21.0)]),
        event("sensor-a", base + 9_000, &[("pressure", 1014.5)]),
        // The earliest reading of sensor-a arrives last of all its readings.
        event("sensor-a", base, &[("humidity", -1.5)]),
        event("sensor-b", base + 100, &[("temperature", -7.5)]),
        event(
            "sensor-c",
            base + 42,
            &[
                ("temperature", 0.0),
                ("voltage_mv", 3300.0),
                ("rssi", -71.0),
            ],
        ),
    ];
    let mut last_sequence_of: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &events {
        let sequence = publish(&env, &jetstream, event).await;
        last_sequence_of.insert(&event.device_id, sequence);
    }
    let expected = reference(&events);

    // The fold itself, spot-checked by hand.
    let sensor_a = &expected["sensor-a"];
    assert_eq!(sensor_a.sample_count, 7);
    assert_eq!(
        (sensor_a.first_seen_ms, sensor_a.last_seen_ms),
        (base, base + 9_000)
    );
    assert_eq!(sensor_a.metrics["temperature"].last, 22.0);
    assert_eq!(sensor_a.metrics["temperature"].max, 30.0);
    assert_eq!(sensor_a.metrics["humidity"].last, 38.5);
    assert_eq!(sensor_a.metrics["pressure"].last, 1014.5);
    assert_eq!(expected["sensor-b"].metrics["temperature"].last, -3.25);

    let actual = projected(&env, &expected).await;
    drained(&env, &jetstream, events.len() as u64).await;
    for (device, want) in &expected {
        assert_same_figures(device, &actual[device], want, Sums::Exact);
        assert_eq!(
            actual[device].as_of_seq,
            last_sequence_of[device.as_str()],
            "{device}: as_of_seq is the highest stream sequence applied"
        );
        assert!(actual[device].updated_at_ms >= events[0].received_at.unix_timestamp() * 1000);
    }
    projector.stop().await;
}

#[tokio::test]
async fn two_projectors_sharing_the_durable_consumer_give_the_figures_of_the_fold() {
    const DEVICES: u64 = 20;
    const EVENTS: usize = 500;
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    // Small batches, so that both projectors get a share of the work.
    settings.projector.batch_size = 16;
    let jetstream = streams(&env).await;
    let first = Projector::spawn(&settings).await;
    let second = Projector::spawn(&settings).await;

    let mut random = SplitMix(0x5eed_0001);
    let (events, messages) = shuffled_with_copies(&mut random, DEVICES, EVENTS, 60);
    let sequences = publish_many(&env, &jetstream, &messages).await;

    let expected = reference(&events);
    assert_eq!(
        expected
            .values()
            .map(|device| device.sample_count)
            .sum::<u64>(),
        EVENTS as u64
    );
    let (info, actual) = drained_to_the_fold(&env, &jetstream, &expected, messages.len()).await;
    for device in expected.keys() {
        let last_sequence = messages
            .iter()
            .zip(&sequences)
            .filter(|((event, _), _)| &event.device_id == device)
            .map(|(_, sequence)| *sequence)
            .max()
            .expect("the device has messages");
        assert_eq!(
            actual[device].as_of_seq, last_sequence,
            "{device}: as_of_seq"
        );
    }
    assert_eq!(info.delivered.stream_sequence, messages.len() as u64);
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_backlog_projected_in_batches_that_follow_each_other_gives_the_figures_of_the_fold() {
    // A backlog waits when the projector starts, so its batches of 100 come one after
    // the other, two in flight, all applied with the generations it read once.
    const DEVICES: u64 = 50;
    const EVENTS: usize = 3_000;
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    settings.projector.batch_size = 100;
    let jetstream = streams(&env).await;
    let mut random = SplitMix(0x5eed_0002);
    let (events, messages) = shuffled_with_copies(&mut random, DEVICES, EVENTS, 300);
    publish_many(&env, &jetstream, &messages).await;
    let projector = Projector::spawn(&settings).await;

    drained_to_the_fold(&env, &jetstream, &reference(&events), messages.len()).await;
    projector.stop().await;
}

/// Waits until the consumer acked all `messages` messages and every device of
/// `expected` (the reference fold) shows its figures; checks them, checks that the
/// read model holds no other device, and returns the consumer's info and the figures
/// as projected.
async fn drained_to_the_fold(
    env: &TestEnv,
    jetstream: &jetstream::Context,
    expected: &BTreeMap<String, DeviceStats>,
    messages: usize,
) -> (consumer::Info, BTreeMap<String, DeviceStats>) {
    let info = drained(env, jetstream, messages as u64).await;
    let actual = projected(env, expected).await;
    assert_eq!(
        crate::support::devices_in_the_read_model(env).await,
        expected.keys().cloned().collect(),
        "the read model holds the reference's devices and no other"
    );
    for (device, want) in expected {
        assert_same_figures(device, &actual[device], want, Sums::Exact);
    }
    (info, actual)
}

/// `count` random events over `devices` devices within the last hour (few distinct
/// instants per device, so ties and late readings are common), and the messages that
/// carry them: each event once under its own id and `copies` of them a second time
/// under another id (a republish JetStream cannot recognise), all shuffled.
fn shuffled_with_copies(
    random: &mut SplitMix,
    devices: u64,
    count: usize,
    copies: usize,
) -> (Vec<TelemetryRecorded>, Vec<(TelemetryRecorded, String)>) {
    let base = now_ms() - 3_600_000;
    let metric_names = ["temperature", "humidity", "pressure"];
    let events: Vec<_> = (0..count)
        .map(|_| {
            let device = format!("sensor-{:02}", random.below(devices));
            let recorded_at = base + 250 * random.below(40) as i64;
            let mut metrics = Vec::new();
            for name in metric_names {
                if random.below(3) > 0 {
                    metrics.push((name, random.quarter()));
                }
            }
            if metrics.is_empty() {
                metrics.push(("temperature", random.quarter()));
            }
            event(&device, recorded_at, &metrics)
        })
        .collect();
    let mut messages: Vec<_> = events
        .iter()
        .map(|event| (event.clone(), event.event_id.to_string()))
        .collect();
    for _ in 0..copies {
        let copied = &events[random.below(count as u64) as usize];
        messages.push((copied.clone(), format!("copy-{}", uuid::Uuid::now_v7())));
    }
    random.shuffle(&mut messages);
    (events, messages)
}

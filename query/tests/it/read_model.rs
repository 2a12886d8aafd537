//! The read model against the reference model: random readings — spread over 30 h,
//! many within a bucket of a window's edge, some up to 5 min ahead, several metrics —
//! shuffled and republished, go through JetStream and two real projectors into Redis;
//! once the consumer has handled every message, every figure of every device and window
//! must match the fold in `contract::reference`. Also: window edges, losing the read
//! model, rebuilds.

use std::collections::BTreeMap;

use async_nats::jetstream;
use async_nats::HeaderMap;
use contract::event::{headers, TelemetryRecorded};
use contract::read_model::{meta, meta_key, DeviceKeys, BUCKETS_HASH_TABLE_FIELD, WINDOWS};
use contract::reference::{ModelReading, ReferenceModel};
use contract::subjects::Subjects;
use contract::timestamp::{format_millis, from_unix_millis, unix_millis};
use ingest::redis_connection::RedisConnection;
use proptest::prelude::*;
use query::read_model::ReadModel;
use redis::aio::ConnectionManagerConfig;
use serde_json::Value;
use testkit::{assert_same_figures, eventually, Sums, TestEnv};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::support::{consumer_drained, ensure_streams, spawn_projector, ReadSide, DEADLINE};

const HOUR_MS: i64 = 3_600_000;

/// How long a change may take to reach the query's kept validity reads: far less than
/// the 10 s bucket that bounds them anyway.
const PUSHED: std::time::Duration = std::time::Duration::from_secs(3);

fn now_ms() -> i64 {
    unix_millis(OffsetDateTime::now_utc())
}

/// Publishes an event as the relay does, with `msg_id` as its `Nats-Msg-Id`; returns
/// the stream sequence JetStream stored it at.
pub async fn publish(
    subjects: &Subjects,
    jetstream: &jetstream::Context,
    event: &TelemetryRecorded,
    msg_id: &str,
) -> u64 {
    let mut message_headers = HeaderMap::new();
    message_headers.insert(headers::MSG_ID, msg_id);
    message_headers.insert(headers::CONTENT_TYPE, "application/json");
    message_headers.insert(headers::EVENT_TYPE, "telemetry.recorded");
    message_headers.insert(headers::EVENT_VERSION, "1");
    jetstream
        .publish_with_headers(
            subjects.recorded(&event.device_id),
            message_headers,
            event.to_json().into(),
        )
        .await
        .expect("publish sent")
        .await
        .expect("publish acknowledged")
        .sequence
}

/// Publishes a reading's event as the relay does, its event id as the message id.
async fn publish_reading(env: &TestEnv, jetstream: &jetstream::Context, reading: &ModelReading) {
    publish(
        &env.subjects,
        jetstream,
        &event_of(reading),
        &reading.event_id.to_string(),
    )
    .await;
}

/// Publishes every reading as the relay does and adds it to `model`.
async fn publish_all(
    env: &TestEnv,
    jetstream: &jetstream::Context,
    model: &mut ReferenceModel,
    readings: impl IntoIterator<Item = ModelReading>,
) {
    for reading in readings {
        publish_reading(env, jetstream, &reading).await;
        model.apply(reading);
    }
}

fn event_of(reading: &ModelReading) -> TelemetryRecorded {
    TelemetryRecorded::new(
        reading.event_id,
        reading.device_id.clone(),
        from_unix_millis(reading.recorded_at_ms).expect("in range"),
        OffsetDateTime::now_utc(),
        reading.metrics.clone(),
    )
}

async fn read_model(env: &TestEnv) -> ReadModel {
    let client = redis::Client::open(env.settings.redis.url.as_str()).expect("redis url");
    let connection =
        RedisConnection::new_lazy(client, ConnectionManagerConfig::new()).expect("redis url");
    ReadModel::new(connection, env.settings.redis.prefix.clone())
}

/// Waits until every device of the model has all its readings in the read model.
async fn wait_until_projected(env: &TestEnv, model: &ReferenceModel) {
    for device in model.devices() {
        let expected = model.device(&device).expect("device in model").sample_count;
        eventually(
            DEADLINE,
            &format!("{device} to reach {expected} readings"),
            || async {
                let stats = env.device_stats(&device).await?;
                (stats.sample_count >= expected).then_some(())
            },
        )
        .await;
    }
}

/// Compares every figure of every device and window, read at one instant, with the model.
async fn assert_matches_model(read_model: &ReadModel, model: &ReferenceModel) {
    assert_matches_model_at(read_model, model, now_ms()).await;
}

/// Compares every figure of every device, and every window as it stands at `now`, with
/// the model.
async fn assert_matches_model_at(read_model: &ReadModel, model: &ReferenceModel, now: i64) {
    for device in model.devices() {
        let expected = model.device(&device).expect("device in model");
        let view = read_model
            .device(&device, None, now)
            .await
            .expect("read model answers")
            .expect("device known");
        assert_same_figures(&device, &view.stats, &expected, Sums::WithinRounding);
        for name in expected.metrics.keys() {
            for window in WINDOWS {
                let want = model.window(&device, name, &window, now);
                let got = view.windows[name][window.name];
                let what = format!("{device}.{name} window {} at {now}", window.name);
                match (got, want) {
                    (None, None) => {}
                    (Some(got), Some(want)) => {
                        assert_eq!(got.count, want.count, "{what} count");
                        assert!(
                            Sums::WithinRounding.agree(got.sum, want.sum),
                            "{what} sum {} != {}",
                            got.sum,
                            want.sum
                        );
                        assert_eq!((got.min, got.max), (want.min, want.max), "{what} min/max");
                    }
                    (got, want) => panic!("{what}: read model {got:?}, model {want:?}"),
                }
            }
        }
    }
}

/// Each window of API.md §4 as (length, bucket width), written out here so that the
/// strategy aims at the documented edges, whatever `read_model` says.
const WINDOW_EDGES: [(i64, i64); 5] = [
    (60_000, 10_000),
    (300_000, 10_000),
    (900_000, 10_000),
    (HOUR_MS, 10_000),
    (24 * HOUR_MS, 300_000),
];

/// How far ahead of now ingest accepts `recorded_at` (API.md §1, the default).
const MAX_AHEAD_MS: i64 = 5 * 60_000;

/// When a reading was recorded, relative to the instant its case begins (`anchor`).
#[derive(Debug, Clone, Copy)]
enum Recorded {
    /// This long before the anchor.
    Ago(i64),
    /// Within one bucket of a window's length before the anchor: `length + offset` ago,
    /// `offset` in [−bucket, +bucket], where the window's far edge lies.
    NearEdge { length_ms: i64, offset_ms: i64 },
    /// This long after the anchor (at most 5 min): in no window until its bucket comes.
    Ahead(i64),
}

impl Recorded {
    fn at(self, anchor_ms: i64) -> i64 {
        match self {
            Recorded::Ago(age_ms) => anchor_ms - age_ms,
            Recorded::NearEdge {
                length_ms,
                offset_ms,
            } => anchor_ms - length_ms - offset_ms,
            Recorded::Ahead(ahead_ms) => anchor_ms + ahead_ms,
        }
    }
}

fn recorded() -> impl Strategy<Value = Recorded> {
    let near_edge =
        prop::sample::select(WINDOW_EDGES.to_vec()).prop_flat_map(|(length_ms, bucket_ms)| {
            prop_oneof![Just(-bucket_ms), Just(bucket_ms), -bucket_ms..=bucket_ms].prop_map(
                move |offset_ms| Recorded::NearEdge {
                    length_ms,
                    offset_ms,
                },
            )
        });
    prop_oneof![
        3 => (0..30 * HOUR_MS).prop_map(Recorded::Ago),
        3 => near_edge,
        1 => (1..=MAX_AHEAD_MS).prop_map(Recorded::Ahead),
    ]
}

/// A reading of the scenario; its event id and instant are given when its case runs.
#[derive(Debug, Clone)]
struct Planned {
    device: usize,
    recorded: Recorded,
    metrics: BTreeMap<&'static str, f64>,
}

impl Planned {
    fn reading(&self, anchor_ms: i64) -> ModelReading {
        ModelReading {
            event_id: Uuid::now_v7(),
            device_id: format!("dev-{}", self.device),
            recorded_at_ms: self.recorded.at(anchor_ms),
            metrics: self
                .metrics
                .iter()
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
        }
    }
}

prop_compose! {
    fn planned()(
        device in 0..4usize,
        recorded in recorded(),
        metrics in prop::collection::btree_map(
            prop::sample::select(vec!["temperature", "humidity", "co2"]),
            prop_oneof![(-1000i32..1000).prop_map(f64::from), -1.0e6..1.0e6f64],
            1..=3,
        ),
    ) -> Planned {
        Planned { device, recorded, metrics }
    }
}

/// One message of a scenario: the reading it carries (an index into the readings), and
/// whether it is a second copy under another `Nats-Msg-Id` (a relay republish past the
/// duplicate window, which JetStream keeps as a message of its own).
#[derive(Debug, Clone, Copy)]
struct Message {
    reading: usize,
    copy: bool,
}

/// Readings, and the messages that carry them — each reading once, some a second or
/// third time — in a random order.
fn scenario() -> impl Strategy<Value = (Vec<Planned>, Vec<Message>)> {
    (
        prop::collection::vec(planned(), 1..80),
        prop::collection::vec(any::<prop::sample::Index>(), 0..30),
    )
        .prop_flat_map(|(readings, republished)| {
            let originals = (0..readings.len()).map(|reading| Message {
                reading,
                copy: false,
            });
            let copies = republished.iter().map(|index| Message {
                reading: index.index(readings.len()),
                copy: true,
            });
            let messages: Vec<Message> = originals.chain(copies).collect();
            (Just(readings), Just(messages).prop_shuffle())
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, max_shrink_iters: 16, ..ProptestConfig::default() })]

    #[test]
    fn read_model_matches_the_reference_model_whatever_the_order_and_duplicates(
        (planned, messages) in scenario()
    ) {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let env = TestEnv::new();
            ensure_streams(&env).await;
            let jetstream = env.jetstream().await;
            let first = spawn_projector(&env.settings);
            let second = spawn_projector(&env.settings);

            // The readings near a window's edge are placed relative to this instant.
            let anchor = now_ms();
            let readings: Vec<ModelReading> =
                planned.iter().map(|planned| planned.reading(anchor)).collect();
            let mut model = ReferenceModel::new();
            for reading in &readings {
                model.apply(reading.clone());
            }
            // The highest stream sequence of each device's messages, copies included.
            let mut last_sequence_of: BTreeMap<String, u64> = BTreeMap::new();
            let mut last_sequence = 0;
            for message in &messages {
                let reading = &readings[message.reading];
                let msg_id = if message.copy {
                    Uuid::now_v7().to_string()
                } else {
                    reading.event_id.to_string()
                };
                let sequence = publish(&env.subjects, &jetstream, &event_of(reading), &msg_id).await;
                last_sequence_of.insert(reading.device_id.clone(), sequence);
                last_sequence = sequence;
            }
            assert_eq!(last_sequence, messages.len() as u64, "every message stored once");
            // Every message handled, copies too: a copy counted again would show now.
            consumer_drained(&env, &jetstream, last_sequence).await;
            let read_model = read_model(&env).await;
            // At the anchor the readings near the edges are where the strategy put them;
            // now, after the drain, each has moved on by as much.
            assert_matches_model_at(&read_model, &model, anchor).await;
            assert_matches_model(&read_model, &model).await;
            for (device, sequence) in &last_sequence_of {
                let stats = env.device_stats(device).await.expect("device projected");
                assert_eq!(
                    stats.as_of_seq, *sequence,
                    "{device}: as_of_seq is the highest sequence of its messages"
                );
            }
            first.stop().await;
            second.stop().await;
        });
    }
}

/// `as_of_seq` is the highest stream sequence the figures reflect (README): a second
/// copy of an event (a relay republish) is skipped, but handled, so the view is as of
/// it, whether the copy comes in a batch of its own or in the same batch as its first.
#[tokio::test]
async fn a_copy_in_the_same_batch_as_its_original_still_moves_as_of_seq() {
    let env = TestEnv::new();
    ensure_streams(&env).await;
    let jetstream = env.jetstream().await;
    let reading = aged("batched-copy", 1_000, 21.5);
    let event = event_of(&reading);
    // A live generation, so the projector applies to it at once (without one, the
    // projector waits for its own rebuild and the drain may end before the switch).
    env.set_live_generation(1).await;
    // Both in the stream before a projector runs: its first fetch takes them together.
    let first = publish(&env.subjects, &jetstream, &event, "first-copy").await;
    let second = publish(&env.subjects, &jetstream, &event, "second-copy").await;
    assert!(second > first);
    let projector = spawn_projector(&env.settings);
    consumer_drained(&env, &jetstream, second).await;
    let stats = env
        .device_stats("batched-copy")
        .await
        .expect("device projected");
    assert_eq!(stats.sample_count, 1, "the copy counted once");
    assert_eq!(
        stats.as_of_seq, second,
        "the view is as of the copy, the device's last message"
    );
    projector.stop().await;
}

/// Returns at once when now is at most `latest_ms` into its 10 s bucket, else just after
/// the next boundary (50 ms into the next bucket).
async fn early_in_a_bucket(latest_ms: i64) {
    let into_bucket = now_ms().rem_euclid(10_000);
    if into_bucket > latest_ms {
        tokio::time::sleep(std::time::Duration::from_millis(
            (10_050 - into_bucket) as u64,
        ))
        .await;
    }
}

/// One reading of `value` at `age_ms` before now for `device`.
fn aged(device: &str, age_ms: i64, value: f64) -> ModelReading {
    ModelReading {
        event_id: Uuid::now_v7(),
        device_id: device.to_owned(),
        recorded_at_ms: now_ms() - age_ms,
        metrics: BTreeMap::from([("temperature".to_owned(), value)]),
    }
}

#[tokio::test]
async fn readings_at_known_ages_fall_in_exactly_their_windows() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    // Ages 20 s, 3 min, 10 min, 40 min, 3 h, 30 h with values 1 to 6.
    let ages = [
        20_000,
        180_000,
        600_000,
        2_400_000,
        3 * HOUR_MS,
        30 * HOUR_MS,
    ];
    for (index, age) in ages.iter().enumerate() {
        let reading = aged("edges", *age, index as f64 + 1.0);
        publish_reading(env, jetstream, &reading).await;
    }
    let stats: Value = eventually(DEADLINE, "all six readings projected", || async {
        let (status, stats) = query.stats("edges", "").await;
        (status == 200 && stats["sample_count"] == 6).then_some(stats)
    })
    .await;
    let windows = &stats["metrics"]["temperature"]["windows"];
    // (window, count, max): each window holds the readings younger than it.
    for (window, count, max) in [
        ("1m", 1, 1.0),
        ("5m", 2, 2.0),
        ("15m", 3, 3.0),
        ("1h", 4, 4.0),
        ("24h", 5, 5.0),
    ] {
        assert_eq!(windows[window]["count"], count, "{window} count");
        assert_eq!(windows[window]["min"], 1.0, "{window} min");
        assert_eq!(windows[window]["max"], max, "{window} max");
    }
    let metric = &stats["metrics"]["temperature"];
    assert_eq!(
        metric["count"], 6,
        "the all-time figures keep the 30 h old reading"
    );
    assert_eq!(metric["max"], 6.0);
    assert_eq!(metric["last"], 1.0, "last goes by recorded_at");

    let series: Value = query
        .get("/v1/devices/edges/series?metric=temperature&resolution=10s")
        .await
        .json()
        .await
        .expect("json");
    let counts: Vec<&Value> = series["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|point| &point["count"])
        .collect();
    assert_eq!(counts.len(), 4, "the last hour in 10 s buckets: {series}");
    let coarse: Value = query
        .get("/v1/devices/edges/series?metric=temperature&resolution=5m")
        .await
        .json()
        .await
        .expect("json");
    let total: u64 = coarse["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|point| point["count"].as_u64())
        .sum();
    assert_eq!(total, 5, "the last 24 h in 5 min buckets: {coarse}");

    // A range older than anything kept: no buckets for a known device, 404 for an
    // unknown one; an unknown device is 404 over the default range too.
    let day_ms = 24 * HOUR_MS;
    let old_range = format!(
        "metric=temperature&from={}&to={}",
        format_millis(now_ms() - 3 * day_ms).expect("instant in range"),
        format_millis(now_ms() - 2 * day_ms).expect("instant in range"),
    );
    let response = query
        .get(&format!("/v1/devices/edges/series?{old_range}"))
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let empty: Value = response.json().await.expect("json");
    assert_eq!(empty["points"], Value::Array(Vec::new()), "{empty}");
    for path in [
        format!("/v1/devices/nobody/series?{old_range}"),
        "/v1/devices/nobody/series?metric=temperature".to_owned(),
    ] {
        let response = query.get(&path).await;
        assert_eq!(response.status().as_u16(), 404, "{path}");
    }
    side.stop().await;
}

#[tokio::test]
async fn a_lost_read_model_heals_itself_and_answers_503_never_wrong_numbers_meanwhile() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    let mut model = ReferenceModel::new();
    let heal = |index: i64| aged(&format!("heal-{}", index % 4), index * 1_000, index as f64);
    publish_all(env, jetstream, &mut model, (0..40).map(heal)).await;
    wait_until_projected(env, &model).await;
    // In the stream before the loss: a healed read model holds each of them.
    let before_the_loss = model.device("heal-1").expect("known").sample_count;

    // What FLUSHALL does to this pipeline's keys.
    env.lose_read_model().await;
    // Readings keep arriving during the outage.
    publish_all(env, jetstream, &mut model, (40..50).map(heal)).await;
    let expected = model.device("heal-1").expect("known").sample_count;
    eventually(DEADLINE, "the read model healed", || async {
        let response = query.get("/v1/devices/heal-1/stats").await;
        match response.status().as_u16() {
            503 => {
                assert!(response.headers().get("retry-after").is_some());
                None
            }
            200 => {
                let stats: Value = response.json().await.expect("json");
                let count = stats["sample_count"].as_u64().expect("count");
                assert!(
                    (before_the_loss..=expected).contains(&count),
                    "never a partial or a double count: {count} not in {before_the_loss}..={expected}"
                );
                (count == expected).then_some(())
            }
            status => panic!("only 503 or 200 while healing, got {status}"),
        }
    })
    .await;
    assert_matches_model(&read_model(env).await, &model).await;
    side.stop().await;
}

#[tokio::test]
async fn a_cached_stats_document_follows_every_change_of_the_device_even_a_duplicate() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    // The document read first and the later view within one 10 s bucket, so that only
    // the device's change can have made the cached document stale (a new bucket makes
    // every document stale, and the test would pass without the push): a try that
    // crossed a bucket boundary is made again, with another device.
    let mut device = None;
    for attempt in 0..3 {
        let name = format!("cached-{attempt}");
        let reading = aged(&name, 1_000, 21.5);
        let event = event_of(&reading);
        // Message ids of this try's own: JetStream drops a repeated one within its
        // duplicate window, and the retry's reading would never arrive.
        publish(&env.subjects, jetstream, &event, &format!("{name}-first")).await;
        early_in_a_bucket(4_000).await;
        let first = query.first_document(&name, "the reading visible").await;
        let bucket = now_ms().div_euclid(10_000);
        assert_eq!(
            query.stats(&name, "").await.1["as_of_seq"],
            first["as_of_seq"]
        );

        // A second copy of the same event in the stream (another message id): counted
        // once, but the view is now as of the later sequence, and the cache must show it.
        publish(&env.subjects, jetstream, &event, &format!("{name}-second")).await;
        let first_seq = first["as_of_seq"].as_u64().expect("as_of_seq");
        eventually(DEADLINE, "the copy applied", || async {
            let stats = env.device_stats(&name).await?;
            (stats.as_of_seq > first_seq).then_some(())
        })
        .await;
        // The query hears of the change from Redis' invalidation push, which may still
        // be on its way; a document kept from before must not outlive it (nor wait for
        // the next 10 s bucket, which would end it anyway).
        let later = eventually(PUSHED, "the later view served", || async {
            let (_, stats) = query.stats(&name, "").await;
            (stats["as_of_seq"].as_u64() > Some(first_seq)).then_some(stats)
        })
        .await;
        assert_eq!(later["sample_count"], 1, "the copy counted once");
        if now_ms().div_euclid(10_000) == bucket {
            device = Some(name);
            break;
        }
    }
    let device = device.expect("one of three tries within a 10 s bucket");

    // A new reading shows at once as well.
    let newer = aged(&device, 500, 30.0);
    publish_reading(env, jetstream, &newer).await;
    eventually(DEADLINE, "the new reading visible", || async {
        let (_, stats) = query.stats(&device, "").await;
        (stats["sample_count"] == 2 && stats["metrics"]["temperature"]["last"] == 30.0)
            .then_some(())
    })
    .await;
    side.stop().await;
}

/// A buckets hash that `apply.lua` turned into a hash table (its extra field is no
/// bucket) answers every figure and window as the reference model has them.
#[tokio::test]
async fn a_device_whose_buckets_hash_became_a_hash_table_reads_like_the_model() {
    let side = ReadSide::start().await;
    let (env, jetstream) = (&side.env, &side.jetstream);
    // 300 readings 10 s apart over the last 50 minutes: 300 10 s and 11 5 min bucket
    // fields, past the 128 at which apply.lua adds its hash-table field.
    let mut model = ReferenceModel::new();
    let readings = (0..300).map(|index| aged("wide", 5_000 + index * 10_000, index as f64));
    publish_all(env, jetstream, &mut model, readings).await;
    wait_until_projected(env, &model).await;
    let generation = env.generation().await.expect("a live generation");
    let buckets = DeviceKeys::new(&env.settings.redis.prefix, generation, "wide").buckets;
    let mut redis = env.redis().await;
    let marked: bool = redis::cmd("HEXISTS")
        .arg(&buckets)
        .arg(BUCKETS_HASH_TABLE_FIELD)
        .query_async(&mut redis)
        .await
        .expect("hexists");
    assert!(marked, "the buckets hash carries the hash-table field");
    assert_matches_model(&read_model(env).await, &model).await;
    side.stop().await;
}

/// A kept stats document is served across 10 s boundaries only while its windows stay
/// the same: it must show a reading leave the 1m window, and a reading dated ahead
/// enter it, in the very bucket that happens.
#[tokio::test]
async fn a_kept_stats_document_follows_its_windows_across_bucket_boundaries() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    // From just after a 10 s boundary, so that both edges are nearly 10 s ahead: the
    // readings are applied and each document read thrice before (from anywhere in a
    // bucket an edge could be 1 s ahead, which a loaded box's reads could outlast).
    early_in_a_bucket(100).await;
    // Leaves the 1m window at the next boundary (its bucket is 50 s old now).
    let leaving = aged("edge-leaving", 49_000, 1.0);
    let leaves_at_ms = (leaving.recorded_at_ms.div_euclid(10_000) + 6) * 10_000;
    // Dated 12 s ahead: enters the 1m window at the start of its bucket, the next one.
    let entering = aged("edge-entering", -12_000, 2.0);
    let enters_at_ms = entering.recorded_at_ms.div_euclid(10_000) * 10_000;
    for reading in [&leaving, &entering] {
        publish_reading(env, jetstream, reading).await;
    }
    let one_minute =
        |stats: &Value| stats["metrics"]["temperature"]["windows"]["1m"]["count"].clone();
    for (device, before) in [("edge-leaving", 1), ("edge-entering", 0)] {
        let stats = query.first_document(device, "the reading applied").await;
        // Asked twice more, so the document is kept.
        for _ in 0..2 {
            assert_eq!(
                one_minute(&query.stats(device, "").await.1),
                before,
                "{stats}"
            );
        }
    }
    for (device, at_ms, after) in [
        ("edge-leaving", leaves_at_ms, 0),
        ("edge-entering", enters_at_ms, 1),
    ] {
        let wait_ms = at_ms + 50 - now_ms();
        if wait_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms as u64)).await;
        }
        let (_, stats) = query.stats(device, "").await;
        assert_eq!(one_minute(&stats), after, "{device}: {stats}");
        assert_eq!(
            stats["metrics"]["temperature"]["windows"]["5m"]["count"], 1,
            "{device}: {stats}"
        );
    }
    side.stop().await;
}

/// Devices polled before their first reading exists and while it is applied, as a
/// dashboard (or the benchmark's end-to-end probe) does: the query keeps "no such
/// device" and each header it read until Redis pushes that the key changed. A reply
/// kept after the push that ended it would be served until the next 10 s bucket; every
/// device must show each of its readings well before that.
#[tokio::test]
async fn devices_polled_while_their_readings_arrive_show_every_reading_soon() {
    const DEVICES: usize = 150;
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    let devices: Vec<String> = (0..DEVICES).map(|n| format!("polled-{n}")).collect();
    eventually(DEADLINE, "the read model made", || async {
        (query.stats(&devices[0], "").await.0 == 404).then_some(())
    })
    .await;
    for device in &devices {
        assert_eq!(query.stats(device, "").await.0, 404);
    }
    for round in 1..=2u64 {
        // Set once every reading of the round is in Redis: each poller's clock starts
        // there, not at its first miss (publishing 150 readings may take longer).
        let applied_at = std::sync::Arc::new(std::sync::OnceLock::<std::time::Instant>::new());
        let pollers: Vec<_> = devices
            .iter()
            .map(|device| {
                let (url, http, device) =
                    (query.base_url.clone(), query.http.clone(), device.clone());
                let applied_at = applied_at.clone();
                tokio::spawn(async move {
                    loop {
                        // Late is a stale answer to a request sent PUSHED after the
                        // readings were in Redis: one sent before, answered late by a
                        // loaded box, says nothing of what the query kept.
                        let sent = std::time::Instant::now();
                        let response = http
                            .get(format!("{url}/v1/devices/{device}/stats"))
                            .send()
                            .await
                            .expect("request sent");
                        if response.status() == 200 {
                            let stats: Value = response.json().await.expect("json");
                            if stats["sample_count"] == round {
                                return None;
                            }
                        }
                        if applied_at
                            .get()
                            .is_some_and(|at| sent.saturating_duration_since(*at) > PUSHED)
                        {
                            return Some(device);
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        for device in &devices {
            publish_reading(env, jetstream, &aged(device, 1_000, round as f64)).await;
        }
        eventually(DEADLINE, "every reading applied", || async {
            let stats = env.device_stats(&devices[DEVICES - 1]).await?;
            (stats.sample_count == round).then_some(())
        })
        .await;
        applied_at
            .set(std::time::Instant::now())
            .expect("set once a round");
        let mut late = Vec::new();
        for poller in pollers {
            if let Some(device) = poller.await.expect("poller ran") {
                late.push(device);
            }
        }
        assert!(
            late.is_empty(),
            "round {round}: still not served {PUSHED:?} after being applied: {late:?}"
        );
    }
    side.stop().await;
}

/// The query's validity reads are kept in the process and kept fresh by Redis'
/// invalidation pushes. A push sent while the connection is down is lost, so after a
/// reconnect nothing kept before it may be served.
#[tokio::test]
async fn a_device_that_changed_while_the_query_was_cut_off_from_redis_is_read_fresh() {
    // A Redis database of this test's own: there the query's is the only RESP3
    // connection, the one to cut.
    const OWN_DB: u32 = 9;
    let side = ReadSide::start_with(|settings| {
        let url = settings.redis.url.trim_end_matches('/');
        let server = match url
            .strip_prefix("redis://")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((host, _db)) => format!("redis://{host}"),
            None => url.to_owned(),
        };
        settings.redis.url = format!("{server}/{OWN_DB}");
    })
    .await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    publish_reading(env, jetstream, &aged("cut-1", 1_000, 20.0)).await;
    eventually(DEADLINE, "the first reading visible", || async {
        let (status, stats) = query.stats("cut-1", "").await;
        (status == 200 && stats["sample_count"] == 1).then_some(())
    })
    .await;
    // Asked again, so that its validity is kept in the process (the first answers
    // also learnt the generation); cut the connection that keeps it fresh.
    for _ in 0..3 {
        assert_eq!(query.stats("cut-1", "").await.1["sample_count"], 1);
    }
    let mut redis = env.redis().await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis)
        .await
        .expect("client list");
    let cut: Vec<&str> = clients
        .lines()
        .filter(|line| {
            line.split(' ').any(|field| field == format!("db={OWN_DB}"))
                && line.split(' ').any(|field| field == "resp=3")
        })
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")))
        .collect();
    assert!(
        !cut.is_empty(),
        "the query's RESP3 connection not found in {clients}"
    );
    for id in cut {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut redis)
            .await
            .expect("client kill");
    }

    publish_reading(env, jetstream, &aged("cut-1", 500, 30.0)).await;
    eventually(DEADLINE, "the second reading applied", || async {
        let stats = env.device_stats("cut-1").await?;
        (stats.sample_count == 2).then_some(())
    })
    .await;
    // The first answer after the cut (503s while it reconnects aside) is the new state.
    let stats = query
        .first_document("cut-1", "an answer after the reconnect")
        .await;
    assert_eq!(
        stats["sample_count"], 2,
        "a validity kept from before the reconnect was served: {stats}"
    );
    side.stop().await;
}

#[tokio::test]
async fn a_read_model_of_an_older_layout_is_rebuilt_and_never_misread() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    let mut model = ReferenceModel::new();
    let readings = (0..20).map(|index| {
        aged(
            &format!("layout-{}", index % 2),
            index * 1_000,
            index as f64,
        )
    });
    publish_all(env, jetstream, &mut model, readings).await;
    wait_until_projected(env, &model).await;
    let old = env.generation().await.expect("a live generation");

    // As a read model written before layouts were numbered looks to this version.
    let mut redis = env.redis().await;
    let _: () = redis::cmd("HDEL")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::LAYOUT)
        .query_async(&mut redis)
        .await
        .expect("layout removed");
    let expected = model.device("layout-1").expect("known").sample_count;
    eventually(
        DEADLINE,
        "the read model rebuilt in this layout",
        || async {
            let response = query.get("/v1/devices/layout-1/stats").await;
            match response.status().as_u16() {
                503 => None,
                200 => {
                    let stats: Value = response.json().await.expect("json");
                    let count = stats["sample_count"].as_u64().expect("count");
                    assert!(count <= expected, "never more than the truth");
                    (count == expected).then_some(())
                }
                status => panic!("only 503 or 200 while rebuilding, got {status}"),
            }
        },
    )
    .await;
    let new = env.generation().await.expect("a live generation");
    assert!(new > old, "a new generation replaced {old}");
    assert_matches_model(&read_model(env).await, &model).await;
    eventually(DEADLINE, "the old generation's keys deleted", || async {
        env.generation_keys(old).await.is_empty().then_some(())
    })
    .await;
    side.stop().await;
}

/// A document query keeps for a device gives way to a rebuild's switch, within the
/// same 10 s bucket, though none of the device's keys in the old generation changed:
/// the new generation's figures are served (here one reading fewer, its message
/// removed from the stream before the rebuild), not the kept ones.
#[tokio::test]
async fn a_kept_stats_document_gives_way_to_the_figures_of_a_rebuilt_generation() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    let stream = jetstream
        .get_stream(&env.settings.nats.stream)
        .await
        .expect("the stream");
    // A try whose reads crossed a bucket boundary is made again with another device: a
    // new bucket makes every kept document stale, and the test would pass without the
    // switch being noticed.
    let mut switched_within_a_bucket = false;
    for attempt in 0..3 {
        let name = format!("rebuilt-{attempt}");
        let kept = aged(&name, 2_000, 1.0);
        let removed = aged(&name, 1_000, 2.0);
        publish_reading(env, jetstream, &kept).await;
        let removed_sequence = publish(
            &env.subjects,
            jetstream,
            &event_of(&removed),
            &removed.event_id.to_string(),
        )
        .await;
        eventually(DEADLINE, "both readings projected", || async {
            (env.device_stats(&name).await?.sample_count == 2).then_some(())
        })
        .await;
        early_in_a_bucket(2_000).await;
        let bucket = now_ms().div_euclid(10_000);
        let before = query.first_document(&name, "the device's document").await;
        assert_eq!(before["sample_count"], 2);
        assert_eq!(query.stats(&name, "").await.1, before, "the document kept");

        stream
            .delete_message(removed_sequence)
            .await
            .expect("a message removed from the stream");
        projector::connect_rebuild(&env.settings)
            .await
            .expect("rebuild connects")
            .run(&tokio_util::sync::CancellationToken::new())
            .await
            .expect("rebuild succeeds");
        let after = eventually(
            PUSHED,
            "the rebuilt generation's figures served",
            || async {
                let (_, stats) = query.stats(&name, "").await;
                (stats["sample_count"] == 1).then_some(stats)
            },
        )
        .await;
        assert_eq!(after["metrics"]["temperature"]["last"], 1.0);
        if now_ms().div_euclid(10_000) == bucket {
            switched_within_a_bucket = true;
            break;
        }
    }
    assert!(
        switched_within_a_bucket,
        "one of three tries switched within a 10 s bucket"
    );
    side.stop().await;
}

#[tokio::test]
async fn rebuild_switches_to_a_new_generation_while_events_keep_flowing() {
    let env = TestEnv::new();
    ensure_streams(&env).await;
    let jetstream = env.jetstream().await;
    let projector = spawn_projector(&env.settings);
    let mut model = ReferenceModel::new();
    let readings =
        (0..100).map(|index| aged(&format!("rb-{}", index % 5), index * 10_000, index as f64));
    publish_all(&env, &jetstream, &mut model, readings).await;
    wait_until_projected(&env, &model).await;
    let before = env.generation().await.expect("a live generation");

    let rebuild = projector::connect_rebuild(&env.settings)
        .await
        .expect("rebuild connects");
    let publisher = {
        let subjects = env.subjects.clone();
        let jetstream = jetstream.clone();
        let readings: Vec<ModelReading> = (100..160)
            .map(|index| aged(&format!("rb-{}", index % 5), index * 10_000, index as f64))
            .collect();
        for reading in &readings {
            model.apply(reading.clone());
        }
        tokio::spawn(async move {
            for reading in readings {
                publish(
                    &subjects,
                    &jetstream,
                    &event_of(&reading),
                    &reading.event_id.to_string(),
                )
                .await;
            }
        })
    };
    let after = rebuild
        .run(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("rebuild succeeds");
    publisher.await.expect("publisher done");
    assert!(after > before, "a new generation");
    assert_eq!(
        env.generation().await,
        Some(after),
        "the query side reads the new generation"
    );
    wait_until_projected(&env, &model).await;
    assert_matches_model(&read_model(&env).await, &model).await;

    let leftovers = env.generation_keys(before).await;
    let mut redis = env.redis().await;
    assert!(
        leftovers.is_empty(),
        "the old generation is deleted: {leftovers:?}"
    );
    let building: Option<String> = redis::cmd("HGET")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::BUILDING)
        .query_async(&mut redis)
        .await
        .expect("meta read");
    assert_eq!(building, None);
    projector.stop().await;
}

/// The page that ends the walk has a `null` cursor even when it is full, and only that
/// page: the list looks one device past a page before it offers to go on.
#[tokio::test]
async fn the_last_page_of_the_devices_list_has_no_cursor_even_when_it_is_full() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    let mut model = ReferenceModel::new();
    let readings = (0..4).map(|index| aged(&format!("full-{index}"), 30_000 + index * 20_000, 1.0));
    publish_all(env, jetstream, &mut model, readings).await;
    wait_until_projected(env, &model).await;

    for (limit, pages) in [(4, 1), (2, 2), (3, 2), (5, 1)] {
        let mut path = format!("/v1/devices?limit={limit}");
        let mut seen = 0;
        for page_number in 1.. {
            let page: Value = query.get(&path).await.json().await.expect("json");
            seen += page["devices"].as_array().expect("devices").len();
            match page["next_cursor"].as_str() {
                Some(cursor) => {
                    assert!(seen < 4, "limit {limit}: a cursor after all 4 devices");
                    path = format!("/v1/devices?limit={limit}&cursor={cursor}");
                }
                None => {
                    assert_eq!(
                        (seen, page_number),
                        (4, pages),
                        "limit {limit}: devices listed and pages walked"
                    );
                    break;
                }
            }
        }
    }
    side.stop().await;
}

#[tokio::test]
async fn a_walk_through_the_devices_list_sees_every_device_once_while_they_keep_reporting() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    // Device i last reported i × 20 s ago: 30 devices in a known order.
    let mut model = ReferenceModel::new();
    let readings =
        (0..30).map(|index| aged(&format!("walk-{index:02}"), 30_000 + index * 20_000, 1.0));
    publish_all(env, jetstream, &mut model, readings).await;
    wait_until_projected(env, &model).await;

    let mut seen: Vec<String> = Vec::new();
    let mut path = "/v1/devices?limit=4".to_owned();
    let mut page_number = 0;
    loop {
        let page: Value = query.get(&path).await.json().await.expect("json");
        let devices = page["devices"].as_array().expect("devices");
        seen.extend(
            devices
                .iter()
                .map(|device| device["device_id"].as_str().expect("id").to_owned()),
        );
        // Between pages, one device already listed and one not yet listed report anew,
        // which moves both to the front of the list.
        page_number += 1;
        let moved = [page_number * 4 - 2, page_number * 4 + 3]
            .into_iter()
            .filter(|index| *index < 30);
        let readings = moved.map(|index| aged(&format!("walk-{index:02}"), 0, 2.0));
        publish_all(env, jetstream, &mut model, readings).await;
        wait_until_projected(env, &model).await;
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/devices?limit=4&cursor={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..30).map(|index| format!("walk-{index:02}")).collect();
    assert_eq!(
        seen, expected,
        "every device once, in the order the walk began with"
    );

    // A new walk starts from the devices that reported last.
    let fresh: Value = query
        .get("/v1/devices?limit=3")
        .await
        .json()
        .await
        .expect("json");
    let first = fresh["devices"][0]["device_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let moved: Vec<String> = (1..=8)
        .flat_map(|page| [page * 4 - 2, page * 4 + 3])
        .filter(|index| *index < 30)
        .map(|index| format!("walk-{index:02}"))
        .collect();
    assert!(moved.contains(&first), "{first} reported last");
    let cursor = fresh["next_cursor"].as_str().expect("a next page");
    let generation = cursor.split('.').next().expect("the generation");
    let stale = query
        .get(&format!(
            "/v1/devices?limit=4&cursor={generation}.2.3.walk-00"
        ))
        .await;
    assert_eq!(
        stale.status().as_u16(),
        400,
        "a cursor older than the listing TTL is refused"
    );
    let problem: Value = stale.json().await.expect("a problem");
    assert_eq!(problem["errors"][0]["field"], "cursor", "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("has expired")),
        "{problem}"
    );
    let before_generations = query.get("/v1/devices?limit=4&cursor=1.2.walk-00").await;
    assert_eq!(
        before_generations.status().as_u16(),
        400,
        "a cursor of before generations were named is refused"
    );
    side.stop().await;
}

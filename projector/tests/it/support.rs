//! Streams, a projector running in this process, publishing as the relay does, and the
//! reference model the read model is checked against.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, publish::PublishAck};
use async_nats::HeaderMap;
use contract::event::{headers, TelemetryRecorded};
use contract::read_model::{meta, meta_key, DeviceKeys, DeviceStats};
use contract::reference::{ModelReading, ReferenceModel};
use contract::settings::Settings;
use contract::timestamp::{from_unix_millis, unix_millis};
use ingest::redis_connection::RedisConnection;
use projector::apply::{Applied, AsOf, Delivered, ReadModel};
use projector::rebuild::Generations;
use redis::aio::ConnectionManagerConfig;
use testkit::process::ServiceProcess;
pub use testkit::{assert_same_figures, SplitMix, Sums};
use testkit::{eventually, PrivateNats, Running, TestEnv};
use time::OffsetDateTime;
use uuid::Uuid;

/// How long a test waits for the projector to catch up.
pub const CATCH_UP: Duration = Duration::from_secs(15);

/// Creates this test's event stream and DLQ stream with the relay's own code, and
/// returns a JetStream context to publish with.
pub async fn streams(env: &TestEnv) -> jetstream::Context {
    let jetstream = env.jetstream().await;
    ingest::relay::ensure_streams(&jetstream, &env.settings.nats)
        .await
        .expect("streams created");
    jetstream
}

/// A test environment on a private nats-server (one the test may kill and restart),
/// with this test's streams on it.
pub async fn private_env(nats: &PrivateNats) -> (TestEnv, jetstream::Context) {
    let mut env = TestEnv::new();
    env.settings.nats.url = nats.url();
    let jetstream = streams(&env).await;
    (env, jetstream)
}

/// The `projector` binary on `env`'s resources, its admin port free, with `extra`
/// variables on top (killed when dropped).
pub fn projector_process(env: &TestEnv, extra: &[(&str, &str)]) -> ServiceProcess {
    ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_projector"),
        env,
        "PIPELINE__PROJECTOR__ADMIN_LISTEN",
        extra,
    )
}

/// A projector running in this process.
pub struct Projector {
    pub admin_url: String,
    running: Running<anyhow::Result<()>>,
}

impl Projector {
    /// Starts `projector::run` with its admin server on port 0.
    pub async fn spawn(settings: &Settings) -> Self {
        let admin = ingest::bootstrap::listen(
            "127.0.0.1:0".parse().expect("loopback, port 0"),
            &settings.http,
        )
        .expect("bind port 0");
        let admin_url = format!("http://{}", admin.local_addr().expect("local addr"));
        let settings = settings.clone();
        Self {
            admin_url,
            running: Running::spawn(|shutdown| projector::run(settings, admin, shutdown)),
        }
    }

    /// Cancels the projector and waits for it; it must stop promptly and cleanly.
    pub async fn stop(self) {
        self.running.stop().await;
    }

    /// As [`Self::stop`], within `limit` ([`Running::stop_within`]).
    pub async fn stop_within(self, limit: Duration, what: &str) {
        self.running.stop_within(limit, what).await;
    }
}

/// An event for `device` recorded at `recorded_at_ms`, received now.
pub fn event(device: &str, recorded_at_ms: i64, metrics: &[(&str, f64)]) -> TelemetryRecorded {
    TelemetryRecorded::new(
        Uuid::now_v7(),
        device.to_owned(),
        from_unix_millis(recorded_at_ms).expect("instant in range"),
        OffsetDateTime::now_utc(),
        metrics
            .iter()
            .map(|(name, value)| ((*name).to_owned(), *value))
            .collect(),
    )
}

/// The read model as the projector uses it (a day's dedup horizon), for tests that
/// apply batches directly.
pub fn direct_read_model(env: &TestEnv) -> ReadModel {
    ReadModel::new(env.settings.redis.prefix.clone(), 86_400_000)
}

/// Applies `batch` as a live projector does: to the generations the meta hash names
/// now, through [`ReadModel::apply_as_of`] (every call guarded, the batch split by what
/// a rebuild replays alone); fails the test unless every call went through.
pub async fn apply_live(
    env: &TestEnv,
    redis: &mut RedisConnection,
    batch: &[Delivered],
    now_ms: i64,
) -> Applied {
    let generations = Generations::read(redis, &env.settings.redis.prefix)
        .await
        .expect("meta read");
    match direct_read_model(env)
        .apply_as_of(redis, &generations, batch, now_ms)
        .await
        .expect("apply")
    {
        AsOf::Applied(applied) => applied,
        other => panic!("nothing changes the generations or refuses these events: {other:?}"),
    }
}

/// A Redis connection as the projector has one.
pub async fn connection(env: &TestEnv) -> RedisConnection {
    let client = redis::Client::open(env.settings.redis.url.as_str()).expect("redis url");
    RedisConnection::new_lazy(client, ConnectionManagerConfig::new()).expect("redis url")
}

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    unix_millis(OffsetDateTime::now_utc())
}

/// The headers the relay sets, with `msg_id` as `Nats-Msg-Id`.
pub fn relay_headers(msg_id: &str) -> HeaderMap {
    let mut message_headers = HeaderMap::new();
    message_headers.insert(headers::MSG_ID, msg_id);
    message_headers.insert(headers::CONTENT_TYPE, "application/json");
    message_headers.insert(headers::EVENT_TYPE, "telemetry.recorded");
    message_headers.insert(headers::EVENT_VERSION, "1");
    message_headers
}

/// Publishes `payload` on `subject` and waits for JetStream's ack.
pub async fn publish_raw(
    jetstream: &jetstream::Context,
    subject: String,
    message_headers: HeaderMap,
    payload: Vec<u8>,
) -> PublishAck {
    jetstream
        .publish_with_headers(subject, message_headers, payload.into())
        .await
        .expect("publish sent")
        .await
        .expect("publish acknowledged")
}

/// Publishes `event` as the relay would, but with `msg_id` as its `Nats-Msg-Id`.
pub async fn publish_with_id(
    env: &TestEnv,
    jetstream: &jetstream::Context,
    event: &TelemetryRecorded,
    msg_id: &str,
) -> PublishAck {
    publish_raw(
        jetstream,
        env.subjects.recorded(&event.device_id),
        relay_headers(msg_id),
        event.to_json(),
    )
    .await
}

/// Publishes `event` exactly as the relay does; returns its stream sequence.
pub async fn publish(
    env: &TestEnv,
    jetstream: &jetstream::Context,
    event: &TelemetryRecorded,
) -> u64 {
    let ack = publish_with_id(env, jetstream, event, &event.event_id.to_string()).await;
    assert!(!ack.duplicate, "a new event id is not a duplicate");
    ack.sequence
}

/// Publishes many `(event, msg_id)` pairs without waiting in between, as the relay
/// pipelines its publishes; returns the stream sequences in the same order. Acks are
/// awaited every [`ACKS_IN_FLIGHT`] publishes: async-nats holds at most 5,000 awaiting
/// theirs, and a further publish would wait for a slot forever.
pub async fn publish_many(
    env: &TestEnv,
    jetstream: &jetstream::Context,
    messages: &[(TelemetryRecorded, String)],
) -> Vec<u64> {
    let mut sequences = Vec::with_capacity(messages.len());
    for chunk in messages.chunks(ACKS_IN_FLIGHT) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (event, msg_id) in chunk {
            acks.push(
                jetstream
                    .publish_with_headers(
                        env.subjects.recorded(&event.device_id),
                        relay_headers(msg_id),
                        event.to_json().into(),
                    )
                    .await
                    .expect("publish sent"),
            );
        }
        for ack in acks {
            let ack = ack.await.expect("publish acknowledged");
            assert!(!ack.duplicate, "every message id is new");
            sequences.push(ack.sequence);
        }
    }
    sequences
}

/// Publishes [`publish_many`] sends before it awaits their acks.
const ACKS_IN_FLIGHT: usize = 4_000;

/// The durable consumer's state as JetStream reports it.
pub async fn consumer_info(env: &TestEnv, jetstream: &jetstream::Context) -> consumer::Info {
    env.durable_consumer_info(jetstream)
        .await
        .expect("the stream and its durable consumer exist")
}

/// [`TestEnv::consumer_drained`] within [`CATCH_UP`]; returns the consumer's state then.
pub async fn drained(
    env: &TestEnv,
    jetstream: &jetstream::Context,
    last_sequence: u64,
) -> consumer::Info {
    env.consumer_drained(jetstream, last_sequence, CATCH_UP)
        .await
}

/// Waits (at most `within`) until the test's durable consumer exists again, made by a
/// projector after it was deleted.
pub async fn consumer_made_again(
    env: &TestEnv,
    stream: &jetstream::stream::Stream,
    within: Duration,
) {
    let consumer = env.settings.nats.consumer.as_str();
    eventually(within, "the projector made its consumer again", || async {
        stream.consumer_info(consumer).await.ok().map(|_| ())
    })
    .await
}

/// The message `stream` holds at `sequence`.
pub async fn stored_message(
    jetstream: &jetstream::Context,
    stream: &str,
    sequence: u64,
) -> jetstream::message::StreamMessage {
    jetstream
        .get_stream(stream)
        .await
        .expect("stream exists")
        .get_raw_message(sequence)
        .await
        .expect("the stored message")
}

/// Messages held by a stream.
pub async fn stream_messages(jetstream: &jetstream::Context, stream: &str) -> u64 {
    jetstream
        .get_stream(stream)
        .await
        .expect("stream exists")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// Waits until every device in `expected` has at least its expected sample count, then
/// returns what the read model holds for each.
pub async fn projected(
    env: &TestEnv,
    expected: &BTreeMap<String, DeviceStats>,
) -> BTreeMap<String, DeviceStats> {
    eventually(CATCH_UP, "every event projected", || async {
        let mut actual = BTreeMap::new();
        for (device, expected) in expected {
            let stats = env.device_stats(device).await?;
            if stats.sample_count < expected.sample_count {
                return None;
            }
            actual.insert(device.clone(), stats);
        }
        Some(actual)
    })
    .await
}

/// Every device the live generation holds a device hash of.
pub async fn devices_in_the_read_model(env: &TestEnv) -> std::collections::BTreeSet<String> {
    let generation = live_generation(env).await;
    env.generation_keys(generation)
        .await
        .iter()
        .filter_map(|key| DeviceKeys::parse_stats(&env.settings.redis.prefix, key))
        .map(|(_, device)| device.to_owned())
        .collect()
}

/// The live generation of the read model, once there is one.
pub async fn live_generation(env: &TestEnv) -> u64 {
    eventually(CATCH_UP, "a live read model generation", || {
        env.generation()
    })
    .await
}

/// Makes `generation` the live one, as a finished build would have.
pub async fn set_live_generation(env: &TestEnv, generation: u64) {
    env.set_live_generation(generation).await;
}

/// A device's buckets hash as stored: field, packed aggregate.
pub type Buckets = BTreeMap<String, Vec<u8>>;

/// A device's figures in the live generation as stored: its all-time figures (without
/// `updated_at`, which changes on every apply, and `as_of_seq`, which moves with every
/// delivered message) and its raw buckets hash.
pub async fn figures(env: &TestEnv, device: &str) -> (DeviceStats, Buckets) {
    figures_in(env, live_generation(env).await, device).await
}

/// [`figures`] in a given generation.
pub async fn figures_in(env: &TestEnv, generation: u64, device: &str) -> (DeviceStats, Buckets) {
    let keys = DeviceKeys::new(&env.settings.redis.prefix, generation, device);
    let mut redis = env.redis().await;
    let (hash, buckets): (Vec<(String, Vec<u8>)>, Buckets) = redis::pipe()
        .hgetall(&keys.stats)
        .hgetall(&keys.buckets)
        .query_async(&mut redis)
        .await
        .expect("hgetall");
    let mut stats = DeviceStats::from_hash(hash).expect("device projected");
    stats.updated_at_ms = 0;
    stats.as_of_seq = 0;
    (stats, buckets)
}

/// The reference figures of every device: the events folded by the project's
/// reference model (`contract::reference`), each event id once, in any order.
pub fn reference<'a>(
    events: impl IntoIterator<Item = &'a TelemetryRecorded>,
) -> BTreeMap<String, DeviceStats> {
    let mut model = ReferenceModel::new();
    for event in events {
        model.apply(ModelReading {
            event_id: event.event_id,
            device_id: event.device_id.clone(),
            recorded_at_ms: unix_millis(event.recorded_at),
            metrics: event.metrics.clone(),
        });
    }
    model
        .devices()
        .into_iter()
        .filter_map(|device| Some((device.clone(), model.device(&device)?)))
        .collect()
}

/// `count` events an hour old, spread over 50 devices, each with its message id.
pub fn spread_events(count: usize) -> Vec<(TelemetryRecorded, String)> {
    const DEVICES: usize = 50;
    let base = now_ms() - 3_600_000;
    (0..count)
        .map(|index| {
            let device = format!("sensor-{}", index % DEVICES);
            let event = event(
                &device,
                base + index as i64,
                &[("temperature", index as f64)],
            );
            let message_id = event.event_id.to_string();
            (event, message_id)
        })
        .collect()
}

/// The generation the meta hash names as being built, if any.
pub async fn building_generation(env: &TestEnv) -> Option<u64> {
    redis::cmd("HGET")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::BUILDING)
        .query_async(&mut env.redis().await)
        .await
        .ok()?
}

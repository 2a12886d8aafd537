//! Redis running out of memory (README, *Securing a deployment*). A server that may
//! evict keys would drop figures and the applied event ids that stop double counts, so
//! a projector says so; a full server that refuses writes loses nothing and counts
//! nothing twice.

use std::time::Duration;

use contract::settings::Settings;
use testkit::process::ServiceProcess;
use testkit::{eventually, PrivateNats, PrivateRedis, TestEnv};

use async_nats::jetstream;
use contract::event::TelemetryRecorded;

use crate::support::{
    assert_same_figures, consumer_info, event, live_generation, now_ms, projected,
    projector_process, publish_many, reference, streams, Projector, Sums, CATCH_UP,
};

const MAY_EVICT: &str = "projector_redis_may_evict";

fn projector_on(env: &TestEnv, redis: &PrivateRedis) -> ServiceProcess {
    projector_process(env, &[("PIPELINE__REDIS__URL", &redis.url())])
}

async fn reports(projector: &ServiceProcess, value: f64, what: &str) {
    projector
        .metrics_until(Duration::from_secs(20), what, |scrape| {
            (scrape.value(MAY_EVICT, &[]) == Some(value)).then_some(())
        })
        .await;
}

#[tokio::test]
async fn a_projector_reports_a_redis_that_may_evict_keys_and_when_it_no_longer_may() {
    let env = TestEnv::new();
    streams(&env).await;
    let evicting =
        PrivateRedis::start(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let refusing =
        PrivateRedis::start(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"]);
    let on_evicting = projector_on(&env, &evicting);
    let on_refusing = projector_on(&env, &refusing);
    reports(
        &on_evicting,
        1.0,
        "allkeys-lru with a memory limit may evict",
    )
    .await;
    reports(&on_refusing, 0.0, "noeviction never evicts").await;

    assert_eq!(
        evicting.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "+OK"
    );
    reports(&on_evicting, 0.0, "the policy changed to noeviction").await;
    assert_eq!(
        refusing.command(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]),
        "+OK"
    );
    reports(&on_refusing, 1.0, "volatile-lru evicts the keys with a TTL").await;
    assert_eq!(
        refusing.command(&["CONFIG", "SET", "maxmemory", "0"]),
        "+OK"
    );
    reports(&on_refusing, 0.0, "no memory limit, nothing to evict").await;

    for projector in [on_evicting, on_refusing] {
        assert!(projector.terminate().await.success());
    }
}

/// A full `noeviction` server refuses the apply scripts (a script stops at its first
/// write, before it changed anything), so the projector acks nothing and retries past
/// the ack wait, several times over; once the server has room, every event counts
/// exactly once.
#[tokio::test]
async fn a_full_redis_refuses_the_applies_and_every_event_counts_once_when_it_has_room() {
    let (full, projector) = FullRedis::new(1).await;
    // Messages reach the projector, which keeps failing to apply them: past the ack
    // wait, three times over, it has acked none. (While Redis refuses for want of room
    // it pulls one batch at a time, and gives each up after the ack wait.)
    full.holding().await;
    tokio::time::sleep(3 * Duration::from_secs(full.env.settings.projector.ack_wait_secs)).await;
    let held = consumer_info(&full.env, &full.jetstream).await;
    assert_eq!(
        held.ack_floor.stream_sequence, 0,
        "nothing acked while full: {held:?}"
    );
    for device in (0..6).map(|index| format!("sensor-{index}")) {
        assert!(
            full.env.device_stats(&device).await.is_none(),
            "{device}: nothing applied while full"
        );
    }

    full.make_room();
    full.assert_counted_once(CATCH_UP).await;
    projector.stop().await;
}

/// API.md §7, SIGTERM hands back what is in flight: a projector stopped while Redis
/// refuses its applies naks the batches it holds rather than leave them to the ack
/// wait, so a projector started once Redis has room applies every event at once, each
/// once.
#[tokio::test]
async fn a_projector_stopped_while_redis_refuses_hands_back_the_batches_it_holds() {
    let (full, projector) = FullRedis::new(30).await;
    full.holding().await;
    projector.stop().await;

    full.make_room();
    let restarted = Projector::spawn(&full.env.settings).await;
    // Well within the 30 s ack wait: nothing waits for a redelivery.
    full.assert_counted_once(Duration::from_secs(15)).await;
    restarted.stop().await;
}

/// A projector stopped while NATS is away stops at once, though Redis takes the
/// batches it holds meanwhile: their acks cannot be sent and are not waited for (their
/// events come again and are skipped as applied). Once the acks outnumbered the NATS
/// client's queue of commands (2,048), the batches waited for NATS to come back, and the
/// stop with them.
#[tokio::test]
async fn a_projector_whose_batches_are_applied_while_nats_is_away_stops_at_once() {
    // More acks than the client's queue holds, for batches delivered while Redis
    // refuses.
    const ACKS: u64 = 2_500;
    let mut nats = PrivateNats::start();
    let url = nats.url();
    let (full, projector) = FullRedis::with(6_000, |settings| {
        settings.nats.url = url;
        settings.projector.batch_size = 3_000;
    })
    .await;
    eventually(CATCH_UP, "batches held", || async {
        let info = consumer_info(&full.env, &full.jetstream).await;
        (info.num_ack_pending as u64 >= ACKS).then_some(())
    })
    .await;
    nats.kill();
    full.make_room();
    let devices: Vec<_> = (0..6).map(|index| format!("sensor-{index}")).collect();
    eventually(CATCH_UP, "Redis taking the held batches", || async {
        let mut applied = 0;
        for device in &devices {
            applied += full
                .env
                .device_stats(device)
                .await
                .map_or(0, |stats| stats.sample_count);
        }
        (applied > 0).then_some(())
    })
    .await;
    projector
        .stop_within(Duration::from_secs(5), "a stop while NATS is away")
        .await;
}

/// A projector on a private `noeviction` Redis filled to its limit, and events
/// published for it.
struct FullRedis {
    redis: PrivateRedis,
    env: TestEnv,
    jetstream: jetstream::Context,
    events: Vec<TelemetryRecorded>,
    last: u64,
}

impl FullRedis {
    /// 300 events, for a projector with an ack wait of `ack_wait_secs`.
    async fn new(ack_wait_secs: u64) -> (Self, Projector) {
        Self::with(300, |settings| {
            settings.projector.ack_wait_secs = ack_wait_secs;
        })
        .await
    }

    /// `events` events, for a projector with the settings as `configure` leaves them.
    async fn with(events: i64, configure: impl FnOnce(&mut Settings)) -> (Self, Projector) {
        let redis =
            PrivateRedis::start(&["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]);
        let mut env = TestEnv::new();
        env.settings.redis.url = redis.url();
        configure(&mut env.settings);
        let jetstream = streams(&env).await;
        let projector = Projector::spawn(&env.settings).await;
        live_generation(&env).await;

        // A write that starts under the limit goes through, so one large value fills it.
        assert_eq!(
            redis.command(&["SETRANGE", "filler", "16777216", "x"]),
            ":16777217"
        );
        let refused = redis.command(&["SET", "probe", "1"]);
        assert!(refused.starts_with("-OOM"), "the server is full: {refused}");

        let events: Vec<_> = (0..events)
            .map(|index| {
                let device = format!("sensor-{}", index % 6);
                let at = now_ms() - 60_000 + index;
                event(&device, at, &[("temperature", index as f64 / 4.0)])
            })
            .collect();
        let messages: Vec<_> = events
            .iter()
            .map(|event| (event.clone(), event.event_id.to_string()))
            .collect();
        let last = *publish_many(&env, &jetstream, &messages)
            .await
            .last()
            .expect("published");
        let full = Self {
            redis,
            env,
            jetstream,
            events,
            last,
        };
        (full, projector)
    }

    /// Waits until the projector holds messages it cannot apply (not all of them,
    /// maybe: it pulls no more while every batch it holds waits).
    async fn holding(&self) {
        eventually(CATCH_UP, "messages delivered and not acked", || async {
            let info = consumer_info(&self.env, &self.jetstream).await;
            (info.num_ack_pending > 0).then_some(())
        })
        .await;
    }

    fn make_room(&self) {
        assert_eq!(self.redis.command(&["DEL", "filler"]), ":1");
    }

    /// Every event applied, each once, within `within`.
    async fn assert_counted_once(&self, within: Duration) {
        self.env
            .consumer_drained(&self.jetstream, self.last, within)
            .await;
        let expected = reference(&self.events);
        let actual = projected(&self.env, &expected).await;
        for (device, want) in &expected {
            assert_same_figures(device, &actual[device], want, Sums::Exact);
        }
    }
}

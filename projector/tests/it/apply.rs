//! The read model's write path on its own: batches folded in the projector and merged
//! by `apply.lua` — batches holding events a generation has and events it has not, two
//! generations at once, a batch applied with generations that changed since they were
//! read (also between its pipeline and a mixed call's split), pruning of buckets past
//! their retention, a device's batch too long for one script call, the buckets hash
//! turned into a hash table once large, and what a build's replay applies alone kept
//! out of the generation being built.

use contract::event::TelemetryRecorded;
use contract::read_model::{
    meta, meta_key, Aggregate, DeviceKeys, BUCKETS_HASH_TABLE_FIELD, COARSE, FINE,
};
use ingest::redis_connection::RedisConnection;
use projector::apply::{Applied, AsOf, Delivered, ReadModel};
use projector::rebuild::{Generations, ReplayThrough};
use redis::Value;
use testkit::TestEnv;

use crate::support::{
    assert_same_figures, connection, direct_read_model, event, figures_in, now_ms, reference, Sums,
};

/// A reading dated ahead (ingest allows up to 12 h) stays in its windows until it is 24 h
/// old: its buckets outlast it by their retention, also after a batch dated now opens a
/// bucket. They expired 24 h 20 min after the newest bucket was made, so one dated two
/// hours ahead left its 24 h window 1 h 40 min early.
#[tokio::test]
async fn buckets_of_a_reading_dated_ahead_are_kept_until_it_leaves_the_24_h_window() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let keys = DeviceKeys::new(&env.settings.redis.prefix, 1, "sensor-1");
    let now = now_ms();
    let two_hours = 2 * 3_600_000;
    // How long a bucket made now is kept, read by its own rule: its 5 min bucket leaves
    // the retention once its end is that long ago.
    let kept = COARSE.retention_ms + COARSE.width_ms;
    let ahead = [event("sensor-1", now + two_hours, &[("temperature", 1.0)])];
    model
        .apply(&mut redis, &[1], &delivered(&ahead), now)
        .await
        .expect("the reading dated ahead");
    let dated_now = [event("sensor-1", now, &[("temperature", 2.0)])];
    model
        .apply(&mut redis, &[1], &delivered(&dated_now), now)
        .await
        .expect("a reading dated now, in a new bucket");
    let expiry: i64 = redis::cmd("PTTL")
        .arg(&keys.buckets)
        .query_async(&mut redis)
        .await
        .expect("pttl");
    let elapsed = now_ms() - now;
    assert!(
        expiry >= kept + two_hours - elapsed - 1_000,
        "the buckets expire in {expiry} ms, before the reading dated ahead leaves its window ({} ms)",
        kept + two_hours - elapsed
    );
}

/// `events` as delivered at stream sequences 1, 2, ...
fn delivered(events: &[TelemetryRecorded]) -> Vec<Delivered> {
    events
        .iter()
        .zip(1..)
        .map(|(event, stream_sequence)| Delivered {
            event: event.clone(),
            stream_sequence,
            stored_at: event.received_at,
        })
        .collect()
}

/// `count` temperature readings of sensor-1 from `base`, `step_ms` apart, the i-th of
/// `value(i)`.
fn temperatures(
    count: i64,
    base: i64,
    step_ms: i64,
    value: impl Fn(i64) -> f64,
) -> Vec<TelemetryRecorded> {
    (0..count)
        .map(|index| {
            event(
                "sensor-1",
                base + index * step_ms,
                &[("temperature", value(index))],
            )
        })
        .collect()
}

#[tokio::test]
async fn a_batch_of_events_applied_before_and_new_ones_applies_only_the_new_ones() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let base = now_ms() - 120_000;
    let events = [
        event(
            "sensor-1",
            base,
            &[("temperature", 20.5), ("humidity", 40.0)],
        ),
        event("sensor-1", base + 15_000, &[("temperature", 22.25)]),
        event("sensor-1", base + 30_000, &[("temperature", 18.0)]),
        event("sensor-1", base + 5_000, &[("humidity", 42.5)]),
        event("sensor-2", base, &[("humidity", 60.0)]),
    ];
    let all = delivered(&events);

    // Generation 1 gets two of sensor-1's events first, then everything in one batch.
    let first = model
        .apply(&mut redis, &[1], &all[..2], now_ms())
        .await
        .expect("first batch");
    assert_eq!(
        first,
        Applied {
            applied: 2,
            duplicates: 0
        }
    );
    let second = model
        .apply(&mut redis, &[1], &all, now_ms())
        .await
        .expect("second batch");
    assert_eq!(
        second,
        Applied {
            applied: 3,
            duplicates: 2
        },
        "only the three new events count"
    );
    // Generation 2 gets everything at once.
    model
        .apply(&mut redis, &[2], &all, now_ms())
        .await
        .expect("one batch");

    let expected = reference(&events);
    for device in ["sensor-1", "sensor-2"] {
        let (incremental, incremental_buckets) = figures_in(&env, 1, device).await;
        let (at_once, at_once_buckets) = figures_in(&env, 2, device).await;
        assert_same_figures(device, &incremental, &expected[device], Sums::Exact);
        assert_eq!(incremental, at_once, "{device}: same figures either way");
        assert_eq!(
            incremental_buckets, at_once_buckets,
            "{device}: same buckets either way"
        );
    }
}

/// An event stays recorded as applied as long as it keeps being delivered at least once
/// a horizon. A pipeline in which one device's call fails (here a key of the wrong type;
/// in production Redis past its `maxmemory`, say) is retried whole for as long as the
/// failure lasts, and the other devices' events come back with every retry: each is
/// found applied and now stays recorded. They used to expire a horizon after they were
/// first recorded, and the next retry counted them again.
#[tokio::test]
async fn events_retried_beside_a_failing_device_past_the_horizon_count_once() {
    // 2 s, so that a loaded box's stall between two tries (200 ms apart) does not
    // outlast the horizon; the retries go on for three of them.
    const HORIZON_MS: i64 = 2_000;
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = ReadModel::new(env.settings.redis.prefix.clone(), HORIZON_MS);
    let broken = DeviceKeys::new(&env.settings.redis.prefix, 1, "sensor-2");
    env.overwrite_with_a_string(&broken.buckets).await;
    let now = now_ms();
    let batch = delivered(&[
        event("sensor-1", now, &[("temperature", 20.0)]),
        event("sensor-2", now, &[("temperature", 30.0)]),
    ]);
    // Retried every 200 ms for three horizons, as the projector retries a batch whose
    // pipeline failed (every few seconds, for a horizon of 15 minutes).
    let retried_until =
        std::time::Instant::now() + std::time::Duration::from_millis(3 * HORIZON_MS as u64);
    let mut tries = 0;
    while std::time::Instant::now() < retried_until {
        let result = model.apply(&mut redis, &[1], &batch, now_ms()).await;
        assert!(result.is_err(), "sensor-2's call fails: {result:?}");
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (stats, _) = figures_in(&env, 1, "sensor-1").await;
    assert_eq!(
        stats.sample_count, 1,
        "sensor-1's reading counted once over {tries} tries"
    );
    let expiry: i64 = redis::cmd("PTTL")
        .arg(DeviceKeys::new(&env.settings.redis.prefix, 1, "sensor-1").applied)
        .query_async(&mut redis)
        .await
        .expect("pttl");
    assert!(
        (0..=HORIZON_MS + HORIZON_MS / 10).contains(&expiry),
        "the applied set still expires: {expiry} ms"
    );
}

/// The applied sets are kept by Redis's clock, not by the clock of the projector that
/// writes: one whose clock runs ahead (another host's) no longer shortens the horizon for
/// the others. It used to set the device's next trim a minute ahead, so a projector with
/// the right clock never renewed the set's expiry, the set expired a horizon after the
/// fast one's write, and a redelivery of an event recorded moments before counted twice.
#[tokio::test]
async fn a_projector_whose_clock_runs_ahead_does_not_shorten_the_others_dedup_horizon() {
    const HORIZON_MS: i64 = 5_000;
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = ReadModel::new(env.settings.redis.prefix.clone(), HORIZON_MS);
    let now = now_ms();
    let events = delivered(&[
        event("sensor-1", now, &[("temperature", 1.0)]),
        event("sensor-1", now + 1, &[("temperature", 2.0)]),
    ]);
    // A projector whose clock runs a minute ahead applies the first event.
    model
        .apply(&mut redis, &[1], &events[..1], now_ms() + 60_000)
        .await
        .expect("apply");
    // One with the right clock applies the second, then gets it again (a redelivery),
    // each within the horizon of the one before, and past the horizon of the first. The
    // pauses leave 2 s of a horizon between two applies for a loaded box's stalls (a
    // stall only lengthens a pause, so the third apply stays past the first's horizon).
    let pause = std::time::Duration::from_millis(HORIZON_MS as u64 * 6 / 10);
    tokio::time::sleep(pause).await;
    model
        .apply(&mut redis, &[1], &events[1..], now_ms())
        .await
        .expect("apply");
    tokio::time::sleep(pause).await;
    let again = model
        .apply(&mut redis, &[1], &events[1..], now_ms())
        .await
        .expect("apply");
    let (stats, _) = figures_in(&env, 1, "sensor-1").await;
    assert_eq!(
        stats.sample_count, 2,
        "the redelivery counted once: {again:?}"
    );
}

/// Buckets are kept by the earlier of the projector's clock and Redis's: one whose
/// clock runs ahead (another host's) no longer leaves out, or prunes, buckets still in a
/// window. Ten minutes ahead, it used to leave the 10 s bucket of a reading 58 minutes
/// old out of the `1h` window (by its clock the 65 minutes' retention began 55 minutes
/// ago).
#[tokio::test]
async fn a_projector_whose_clock_runs_ahead_keeps_the_buckets_still_in_a_window() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let keys = DeviceKeys::new(&env.settings.redis.prefix, 1, "sensor-1");
    let recorded = now_ms() - 58 * 60_000;
    let kept = FINE.field(FINE.bucket(recorded), "temperature");
    let events = delivered(&[event("sensor-1", recorded, &[("temperature", 1.0)])]);
    model
        .apply(&mut redis, &[1], &events, now_ms() + 10 * 60_000)
        .await
        .expect("apply");
    let fields = field_names(&mut redis, &keys.buckets).await;
    assert!(fields.contains(&kept), "{kept} kept: {fields:?}");

    // Ninety minutes old, its 10 s bucket is past the retention by both clocks: the
    // script leaves it out though the fold sends it (it cannot tell which clock is
    // right), and keeps its 5 min bucket.
    let old = now_ms() - 90 * 60_000;
    let events = delivered(&[event("sensor-1", old, &[("temperature", 2.0)])]);
    model
        .apply(&mut redis, &[1], &events, now_ms())
        .await
        .expect("apply");
    let fields = field_names(&mut redis, &keys.buckets).await;
    let (fine_old, coarse_old) = (
        FINE.field(FINE.bucket(old), "temperature"),
        COARSE.field(COARSE.bucket(old), "temperature"),
    );
    assert!(
        !fields.contains(&fine_old),
        "{fine_old} left out: {fields:?}"
    );
    assert!(
        fields.contains(&coarse_old),
        "{coarse_old} kept: {fields:?}"
    );
}

#[tokio::test]
async fn two_generations_that_hold_different_events_each_get_exactly_what_they_lack() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let base = now_ms() - 60_000;
    let events = temperatures(6, base, 7_000, |index| index as f64 * 1.25);
    let all = delivered(&events);
    // The live generation has the even events, the one being built the first three.
    let even: Vec<Delivered> = all.iter().step_by(2).cloned().collect();
    model
        .apply(&mut redis, &[1], &even, now_ms())
        .await
        .expect("live generation");
    model
        .apply(&mut redis, &[2], &all[..3], now_ms())
        .await
        .expect("generation being built");

    let applied = model
        .apply(&mut redis, &[1, 2], &all, now_ms())
        .await
        .expect("both generations");
    assert_eq!(
        applied,
        Applied {
            applied: 3,
            duplicates: 3
        },
        "counted in the live generation"
    );
    let expected = reference(&events);
    let (live, live_buckets) = figures_in(&env, 1, "sensor-1").await;
    let (built, built_buckets) = figures_in(&env, 2, "sensor-1").await;
    assert_same_figures("sensor-1", &live, &expected["sensor-1"], Sums::Exact);
    assert_same_figures("sensor-1", &built, &expected["sensor-1"], Sums::Exact);
    assert_eq!(live_buckets, built_buckets);
}

#[tokio::test]
async fn buckets_past_their_retention_are_pruned_and_the_keys_expire() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let keys = DeviceKeys::new(&env.settings.redis.prefix, 1, "sensor-1");
    let now = now_ms();
    // Buckets a reading an hour and ten minutes ago left: its 10 s bucket is past the
    // 65 min retention, its 5 min bucket kept (24 h 15 min). Buckets are kept by the
    // earlier of the projector's clock and Redis's, so time cannot be moved on here.
    let stale = now - 70 * 60_000;
    let fine_stale = FINE.field(FINE.bucket(stale), "temperature");
    let coarse_stale = COARSE.field(COARSE.bucket(stale), "temperature");
    let _: () = redis::cmd("HSET")
        .arg(&keys.buckets)
        .arg(&fine_stale)
        .arg(Aggregate::of(1.0).to_bytes())
        .arg(&coarse_stale)
        .arg(Aggregate::of(1.0).to_bytes())
        .query_async(&mut redis)
        .await
        .expect("stale buckets");

    // A reading that opens new buckets prunes the hash.
    let old = now - 60 * 60_000; // an hour ago: its 10 s bucket is still kept
    let events = [event("sensor-1", old, &[("temperature", 1.0)])];
    model
        .apply(&mut redis, &[1], &delivered(&events), now)
        .await
        .expect("old reading");
    let fine_old = FINE.field(FINE.bucket(old), "temperature");
    let coarse_old = COARSE.field(COARSE.bucket(old), "temperature");
    let fields = field_names(&mut redis, &keys.buckets).await;
    assert!(
        fields.contains(&fine_old) && fields.contains(&coarse_old),
        "{fields:?}"
    );
    assert!(
        !fields.contains(&fine_stale),
        "old 10 s bucket pruned: {fields:?}"
    );
    assert!(
        fields.contains(&coarse_stale),
        "5 min bucket kept: {fields:?}"
    );

    // Both per-device keys that only matter for a while expire on their own.
    for key in [&keys.buckets, &keys.applied] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .expect("pttl");
        assert!(ttl > 0, "{key} has an expiry");
    }
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys.stats)
        .query_async(&mut redis)
        .await
        .expect("pttl");
    assert_eq!(ttl, -1, "the all-time figures stay");

    // A reading older than every kept bucket counts all-time and in no bucket.
    let ancient = [event(
        "sensor-1",
        now - 2 * 86_400_000,
        &[("temperature", 3.0)],
    )];
    model
        .apply(&mut redis, &[1], &delivered(&ancient), now)
        .await
        .expect("ancient reading");
    let (stats, buckets) = figures_in(&env, 1, "sensor-1").await;
    assert_eq!(stats.metrics["temperature"].count, 2);
    assert_eq!(
        buckets.len(),
        3,
        "no bucket for the ancient reading: {buckets:?}"
    );
}

/// A device with 32 metrics that reported every 10 s for 50 minutes and then fell silent
/// (or a projector outage as long): its next reading finds ~9,600 10 s bucket fields out
/// of the retention, more than Lua unpacks at once. The script must still apply it,
/// whole: a call that failed after it recorded the reading's id would leave it out of
/// every figure for good, its retry taking it for applied.
#[tokio::test]
async fn a_reading_after_a_long_silence_prunes_thousands_of_buckets_and_counts_once() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let names: Vec<String> = (0..32).map(|index| format!("m{index}")).collect();
    let reading = |recorded_at_ms: i64, value: f64| {
        let metrics: Vec<(&str, f64)> = names.iter().map(|name| (name.as_str(), value)).collect();
        event("sensor-1", recorded_at_ms, &metrics)
    };
    let start = now_ms() - 2 * 3_600_000;
    let before: Vec<_> = (0..300)
        .map(|index| reading(start + index * 10_000, index as f64))
        .collect();
    let applied = model
        .apply(&mut redis, &[1], &delivered(&before), start + 3_000_000)
        .await
        .expect("50 minutes of readings");
    assert_eq!(applied.applied, 300);
    let (_, buckets) = figures_in(&env, 1, "sensor-1").await;
    let fine = |buckets: &crate::support::Buckets| {
        buckets
            .keys()
            .filter(|field| FINE.parse_field(field).is_some())
            .count()
    };
    assert_eq!(fine(&buckets), 300 * 32, "every 10 s bucket still kept");

    // An hour and ten minutes later, past the 65 min retention of every one of them.
    let later = start + 7_200_000;
    let after = [reading(later, 1_000.0)];
    let first = model
        .apply(&mut redis, &[1], &delivered(&after), later)
        .await;
    // What the projector does after an error: the same delivery again.
    let again = model
        .apply(&mut redis, &[1], &delivered(&after), later)
        .await
        .expect("the reading again");
    let (stats, buckets) = figures_in(&env, 1, "sensor-1").await;
    assert_eq!(
        stats.sample_count, 301,
        "the reading after the silence counts once (its first call: {first:?})"
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_same_figures(
        "sensor-1",
        &stats,
        &reference(&all)["sensor-1"],
        Sums::Exact,
    );
    assert_eq!(
        first.as_ref().ok(),
        Some(&Applied {
            applied: 1,
            duplicates: 0
        }),
        "applied by its first call"
    );
    assert_eq!(
        again,
        Applied {
            applied: 0,
            duplicates: 1
        }
    );
    assert_eq!(
        fine(&buckets),
        32,
        "only the new reading's 10 s buckets are left"
    );
}

#[tokio::test]
async fn a_device_batch_too_long_for_one_call_is_applied_whole_over_several() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let base = now_ms() - 50 * 60_000;
    let names: Vec<String> = (0..32).map(|index| format!("m{index:02}")).collect();
    // 60 readings of 32 metrics, each in its own 10 s bucket: 5,760 bucket fields.
    let events: Vec<_> = (0..60)
        .map(|index| {
            let metrics: Vec<(&str, f64)> = names
                .iter()
                .map(|name| (name.as_str(), index as f64 + 0.5))
                .collect();
            event("sensor-1", base + index * 10_000, &metrics)
        })
        .collect();
    let applied = model
        .apply(&mut redis, &[1], &delivered(&events), now_ms())
        .await
        .expect("long batch");
    assert_eq!(
        applied,
        Applied {
            applied: 60,
            duplicates: 0
        }
    );
    let (stats, buckets) = figures_in(&env, 1, "sensor-1").await;
    assert_same_figures(
        "sensor-1",
        &stats,
        &reference(&events)["sensor-1"],
        Sums::Exact,
    );
    let fine = buckets
        .keys()
        .filter(|field| field.starts_with('f'))
        .count();
    assert_eq!(fine, 60 * 32, "one 10 s bucket per reading and metric");
}

#[tokio::test]
async fn a_buckets_hash_past_128_fields_becomes_a_hash_table_and_reads_the_same() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let now = now_ms();
    // From the start of a 5 min bucket 55-60 minutes ago, one reading every 10 s for
    // 55 minutes: a 10 s bucket each, a 5 min bucket every thirtieth.
    let base = (COARSE.bucket(now - 60 * 60_000) + 1) * COARSE.width_ms;
    let events = temperatures(330, base, 10_000, |index| index as f64);
    let all = delivered(&events);
    let keys = DeviceKeys::new(&env.settings.redis.prefix, 1, "sensor-1");
    for batch in all[..120].chunks(20) {
        model
            .apply(&mut redis, &[1], batch, now)
            .await
            .expect("batch");
    }
    let (_, buckets) = figures_in(&env, 1, "sensor-1").await;
    assert_eq!(buckets.len(), 120 + 4, "120 10 s and 4 5 min buckets");
    assert!(!buckets.contains_key(BUCKETS_HASH_TABLE_FIELD));
    assert_ne!(
        encoding(&mut redis, &keys.buckets).await,
        "hashtable",
        "small: Redis's compact form"
    );

    for batch in all[120..].chunks(20) {
        model
            .apply(&mut redis, &[1], batch, now)
            .await
            .expect("batch");
    }
    let (stats, buckets) = figures_in(&env, 1, "sensor-1").await;
    assert!(buckets.contains_key(BUCKETS_HASH_TABLE_FIELD));
    assert_eq!(encoding(&mut redis, &keys.buckets).await, "hashtable");
    let fine = buckets
        .keys()
        .filter(|field| FINE.parse_field(field).is_some())
        .count();
    let coarse = buckets
        .keys()
        .filter(|field| COARSE.parse_field(field).is_some())
        .count();
    assert_eq!((fine, coarse, buckets.len()), (330, 11, 330 + 11 + 1));
    assert_same_figures(
        "sensor-1",
        &stats,
        &reference(&events)["sensor-1"],
        Sums::Exact,
    );
}

/// The fields of the hash at `key` (HKEYS).
async fn field_names(redis: &mut RedisConnection, key: &str) -> Vec<String> {
    redis::cmd("HKEYS")
        .arg(key)
        .query_async(redis)
        .await
        .expect("hkeys")
}

/// How Redis stores `key` (`OBJECT ENCODING`).
async fn encoding(redis: &mut RedisConnection, key: &str) -> String {
    redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(key)
        .query_async(redis)
        .await
        .expect("object encoding")
}

/// Checks that sensor-1's figures in `generation` are the reference fold of `events`.
async fn assert_holds(env: &TestEnv, generation: u64, events: &[TelemetryRecorded]) {
    let (figures, _) = figures_in(env, generation, "sensor-1").await;
    assert_same_figures(
        "sensor-1",
        &figures,
        &reference(events)["sensor-1"],
        Sums::Exact,
    );
}

/// The generations as the meta hash names them now.
async fn generations(env: &TestEnv) -> Generations {
    let mut redis = connection(env).await;
    Generations::read(&mut redis, &env.settings.redis.prefix)
        .await
        .expect("meta read")
}

/// `batch` applied with `generations`, as a live projector applies it.
async fn apply_as_of(
    model: &ReadModel,
    redis: &mut RedisConnection,
    generations: &Generations,
    batch: &[Delivered],
) -> AsOf {
    model
        .apply_as_of(redis, generations, batch, now_ms())
        .await
        .expect("apply")
}

#[tokio::test]
async fn a_batch_applied_with_generations_read_before_a_rebuild_began_or_switched_writes_nothing() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let base = now_ms() - 60_000;
    let events = temperatures(4, base, 1_000, |index| index as f64 + 0.5);
    let all = delivered(&events);
    env.set_live_generation(1).await;
    let live_only = generations(&env).await;
    assert_eq!(live_only.targets(), [1]);
    let first = apply_as_of(&model, &mut redis, &live_only, &all[..1]).await;
    assert_eq!(
        first,
        AsOf::Applied(Applied {
            applied: 1,
            duplicates: 0
        })
    );

    // A rebuild begins: generation 2 is being built. A batch applied with the
    // generations read before writes nothing, to neither generation.
    env.set_building(Some(2)).await;
    let stale = apply_as_of(&model, &mut redis, &live_only, &all[..3]).await;
    assert_eq!(stale, AsOf::Stale { applied: 0 });
    assert_holds(&env, 1, &events[..1]).await;
    assert_eq!(env.generation_keys(2).await, Vec::<String>::new());

    // Read anew, the same batch goes to both.
    let both = generations(&env).await;
    assert_eq!(both.targets(), [1, 2]);
    let again = apply_as_of(&model, &mut redis, &both, &all[..3]).await;
    assert_eq!(
        again,
        AsOf::Applied(Applied {
            applied: 2,
            duplicates: 1
        }),
        "counted in the live generation"
    );
    for generation in [1, 2] {
        assert_holds(&env, generation, &events[..3]).await;
    }

    // The switch: generation 2 is live, none is being built. The old generation gets
    // nothing more, also not from a batch applied with the generations read before.
    env.set_live_generation(2).await;
    env.set_building(None).await;
    let stale = apply_as_of(&model, &mut redis, &both, &all[3..]).await;
    assert_eq!(stale, AsOf::Stale { applied: 0 });
    let switched = generations(&env).await;
    assert_eq!(switched.targets(), [2]);
    assert_eq!(
        apply_as_of(&model, &mut redis, &switched, &all[3..]).await,
        AsOf::Applied(Applied {
            applied: 1,
            duplicates: 0
        })
    );
    assert_holds(&env, 1, &events[..3]).await;
    assert_holds(&env, 2, &events).await;
}

/// While a generation is built, the messages its replay applies alone (at or below the
/// `replay_through` the rebuild wrote with `building`, and stored by then) go to the
/// live generation only, when a live projector gets them again; a message past that
/// sequence, or stored later at such a sequence (the stream went back and grew again),
/// goes to both.
#[tokio::test]
async fn during_a_build_what_its_replay_applies_alone_goes_to_the_live_generation_only() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let events = temperatures(5, now_ms() - 60_000, 1_000, |index| index as f64 + 0.5);
    let floor_stored = time::OffsetDateTime::now_utc() - time::Duration::seconds(10);
    let through = ReplayThrough {
        stream_sequence: 3,
        stored_at: floor_stored,
    };
    let second = time::Duration::SECOND;
    let at = |index: usize, stream_sequence: u64, stored_at| Delivered {
        event: events[index].clone(),
        stream_sequence,
        stored_at,
    };
    let batch = [
        at(0, 1, floor_stored - 20 * second),
        // At the floor itself.
        at(1, 3, floor_stored),
        // Past the floor.
        at(2, 4, floor_stored - second),
        // At a sequence below the floor, stored after it: the stream went back and grew.
        at(3, 2, floor_stored + second),
    ];
    env.set_live_generation(1).await;
    let () = redis::cmd("HSET")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::BUILDING)
        .arg(2)
        .arg(meta::REPLAY_THROUGH)
        .arg(format!("3 {}", floor_stored.unix_timestamp_nanos()))
        .query_async(&mut redis)
        .await
        .expect("building set");
    let building = generations(&env).await;
    assert_eq!(building.targets(), [1, 2]);
    assert_eq!(building.replay_through, Some(through));

    assert_eq!(
        apply_as_of(&model, &mut redis, &building, &batch).await,
        AsOf::Applied(Applied {
            applied: 4,
            duplicates: 0
        }),
        "counted in the live generation"
    );
    assert_holds(&env, 1, &events[..4]).await;
    assert_holds(&env, 2, &events[2..4]).await;

    // Once switched, nothing is left out: the replay is done.
    env.set_live_generation(2).await;
    let () = redis::cmd("HDEL")
        .arg(meta_key(&env.settings.redis.prefix))
        .arg(meta::BUILDING)
        .arg(meta::REPLAY_THROUGH)
        .query_async(&mut redis)
        .await
        .expect("switched");
    let switched = generations(&env).await;
    assert_eq!(switched.replay_through, None);
    apply_as_of(&model, &mut redis, &switched, &[at(4, 1, floor_stored)]).await;
    assert_holds(&env, 2, &[&events[2..4], &events[4..]].concat()).await;
}

/// A Redis connection on which a rebuild begins (the meta hash gets `building`) at a
/// given moment of a batch's apply.
struct RebuildBegins<'a> {
    env: &'a TestEnv,
    redis: RedisConnection,
    pipelines: usize,
    at: Moment,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// Just before the second pipeline: between a batch's pipeline and the one that
    /// applies a mixed call's events one call each.
    BeforeTheSecondPipeline,
    /// Between the first pipeline's device calls and its index call (its last): a
    /// pipeline is no transaction, and another client's command can run between two
    /// of its commands.
    BeforeTheIndexCall,
}

impl<'a> RebuildBegins<'a> {
    fn at(env: &'a TestEnv, redis: &RedisConnection, at: Moment) -> Self {
        Self {
            env,
            redis: redis.clone(),
            pipelines: 0,
            at,
        }
    }
}

impl redis::aio::ConnectionLike for RebuildBegins<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        self.redis.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        self.pipelines += 1;
        let now = match (self.at, self.pipelines) {
            (Moment::BeforeTheSecondPipeline, 2) | (Moment::BeforeTheIndexCall, 1) => Some(self.at),
            _ => None,
        };
        Box::pin(async move {
            match now {
                None => {
                    self.redis
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
                Some(Moment::BeforeTheSecondPipeline) => {
                    self.env.set_building(Some(2)).await;
                    self.redis
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
                Some(Moment::BeforeTheIndexCall) => {
                    let commands: Vec<&redis::Cmd> = pipeline.cmd_iter().collect();
                    let (index_call, device_calls) = commands.split_last().expect("calls");
                    let mut before = redis::pipe();
                    for command in device_calls {
                        before.add_command((*command).clone());
                    }
                    let mut replies = self
                        .redis
                        .req_packed_commands(&before, 0, device_calls.len())
                        .await?;
                    self.env.set_building(Some(2)).await;
                    replies.push(self.redis.req_packed_command(index_call).await?);
                    Ok(replies)
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.redis.get_db()
    }
}

#[tokio::test]
async fn a_mixed_call_split_up_after_a_rebuild_began_writes_nothing_and_is_stale() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let base = now_ms() - 60_000;
    let events = temperatures(3, base, 1_000, |index| index as f64 + 0.25);
    let all = delivered(&events);
    env.set_live_generation(1).await;
    let live_only = generations(&env).await;
    apply_as_of(&model, &mut redis, &live_only, &all[..1]).await;

    // The batch's one call holds an event generation 1 has and two it has not: it
    // writes nothing and the events go again one call each, in a second pipeline,
    // which comes after the rebuild began. The batch is stale, not applied: were it
    // counted as applied (with its events as duplicates), it would be acked unapplied.
    let mut racing = RebuildBegins::at(&env, &redis, Moment::BeforeTheSecondPipeline);
    let stale = model
        .apply_as_of(&mut racing, &live_only, &all, now_ms())
        .await
        .expect("apply");
    assert_eq!(racing.pipelines, 2, "the mixed call was split up");
    assert_eq!(stale, AsOf::Stale { applied: 0 });
    assert_holds(&env, 1, &events[..1]).await;
    assert_eq!(env.generation_keys(2).await, Vec::<String>::new());

    // Read anew, the batch goes to both generations.
    let both = generations(&env).await;
    assert_eq!(
        apply_as_of(&model, &mut redis, &both, &all).await,
        AsOf::Applied(Applied {
            applied: 2,
            duplicates: 1
        })
    );
    for generation in [1, 2] {
        assert_holds(&env, generation, &events).await;
    }
}

/// A batch whose index call finds the generations changed (a rebuild began after its
/// device calls ran) wrote nothing to the index: it is stale, and applied again with
/// the generations read anew, the device is listed. It was counted as applied and the
/// device remembered as listed, so no later batch wrote its entry: it was missing from
/// `/v1/devices` until its 10 s granule moved on, for good if it went quiet (a review
/// of 2026-12-07).
#[tokio::test]
async fn a_batch_whose_index_call_found_a_rebuild_begun_is_stale_and_the_device_listed_after_all() {
    let env = TestEnv::new();
    let mut redis = connection(&env).await;
    let model = direct_read_model(&env);
    let events = temperatures(1, now_ms() - 30_000, 1_000, |index| index as f64 + 0.5);
    let all = delivered(&events);
    env.set_live_generation(1).await;
    let live_only = generations(&env).await;
    // Another device first, so the scripts are loaded: the first pipeline is the one.
    let warm_up = [event("warm-up", now_ms() - 30_000, &[("temperature", 1.0)])];
    apply_as_of(&model, &mut redis, &live_only, &delivered(&warm_up)).await;
    let mut racing = RebuildBegins::at(&env, &redis, Moment::BeforeTheIndexCall);
    let first = model
        .apply_as_of(&mut racing, &live_only, &all, now_ms())
        .await
        .expect("apply");
    assert_eq!(first, AsOf::Stale { applied: 1 });

    // As the live projector goes on: the generations read anew, the batch again.
    let both = generations(&env).await;
    assert_eq!(both.targets(), [1, 2]);
    apply_as_of(&model, &mut redis, &both, &all).await;
    let device = events[0].device_id.as_str();
    for generation in [1, 2] {
        let entries: Vec<String> = redis::cmd("ZRANGE")
            .arg(
                contract::read_model::DevicesIndex::new(&env.settings.redis.prefix, generation).log,
            )
            .arg(0)
            .arg(-1)
            .query_async(&mut redis)
            .await
            .expect("index read");
        assert!(
            entries
                .iter()
                .any(|entry| contract::read_model::DevicesIndex::device_of(entry) == Some(device)),
            "{device} listed in generation {generation}: {entries:?}"
        );
    }
}

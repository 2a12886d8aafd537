//! A Redis that saves snapshots and is killed comes back with the read model of its
//! last save, which lacks every event applied (and acked) after it. The projector tells
//! the restart by Redis's `run_id` and rebuilds the read model from the stream.

use testkit::{eventually, PrivateRedis, TestEnv};

use crate::support::{
    assert_same_figures, drained, event, live_generation, now_ms, projected, publish_many,
    reference, streams, Projector, Sums, CATCH_UP,
};

#[tokio::test]
async fn a_read_model_redis_loads_from_an_old_snapshot_is_rebuilt_with_every_event() {
    let mut redis = PrivateRedis::start_saving(&[]);
    let mut env = TestEnv::new();
    env.settings.redis.url = redis.url();
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&env.settings).await;
    let first = live_generation(&env).await;

    let events: Vec<_> = (0..50)
        .map(|index| {
            let device = format!("sensor-{}", index % 3);
            event(
                &device,
                now_ms() - 60_000 + index,
                &[("temperature", index as f64)],
            )
        })
        .collect();
    let messages: Vec<_> = events
        .iter()
        .map(|event| (event.clone(), event.event_id.to_string()))
        .collect();
    let saved = &messages[..20];
    let last_saved = *publish_many(&env, &jetstream, saved)
        .await
        .last()
        .expect("published");
    drained(&env, &jetstream, last_saved).await;
    assert_eq!(redis.command(&["SAVE"]), "+OK");
    let last = *publish_many(&env, &jetstream, &messages[20..])
        .await
        .last()
        .expect("published");
    // Applied and acked: the consumer will not deliver these again.
    drained(&env, &jetstream, last).await;
    let expected = reference(&events);
    projected(&env, &expected).await;
    assert_eq!(
        env.generation().await,
        Some(first),
        "no rebuild while Redis ran on"
    );

    redis.crash_and_restart();
    let actual = projected(&env, &expected).await;
    for (device, want) in &expected {
        assert_same_figures(device, &actual[device], want, Sums::Exact);
    }
    assert_ne!(env.generation().await, Some(first), "a new generation");
    eventually(CATCH_UP, "the reloaded generation deleted", || async {
        env.generation_keys(first).await.is_empty().then_some(())
    })
    .await;
    projector.stop().await;
}

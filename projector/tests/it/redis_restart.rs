//! A Redis that saves snapshots and is killed comes back with the read model of its
//! last save, which lacks every event applied (and acked) after it. The projector tells
//! the restart by Redis's `run_id`: while the stream holds every event it rebuilds the
//! read model from it; once the stream has let its oldest go, a rebuild would cut the
//! all-time figures, so it only reports the restart.

use std::time::Duration;

use async_nats::jetstream;
use contract::event::TelemetryRecorded;
use testkit::process::ServiceProcess;
use testkit::{eventually, PrivateRedis, TestEnv};

use crate::support::{
    assert_same_figures, drained, event, live_generation, now_ms, projected, projector_process,
    publish_many, reference, streams, Projector, Sums, CATCH_UP,
};

const RELOADS: &str = "projector_redis_reloads_total";

/// A pipeline on a private Redis that saves snapshots.
struct OnSavingRedis {
    redis: PrivateRedis,
    env: TestEnv,
    jetstream: jetstream::Context,
    events: Vec<TelemetryRecorded>,
}

impl OnSavingRedis {
    /// The server, and a test environment pointed at it.
    fn server() -> (PrivateRedis, TestEnv) {
        let redis = PrivateRedis::start_saving(&[]);
        let mut env = TestEnv::new();
        env.settings.redis.url = redis.url();
        (redis, env)
    }

    async fn with(redis: PrivateRedis, env: TestEnv) -> Self {
        let jetstream = streams(&env).await;
        let events = (0..50)
            .map(|index| {
                let device = format!("sensor-{}", index % 3);
                event(
                    &device,
                    now_ms() - 60_000 + index,
                    &[("temperature", index as f64)],
                )
            })
            .collect();
        Self {
            redis,
            env,
            jetstream,
            events,
        }
    }

    /// Publishes the events, with a `SAVE` after the first 20 are applied; returns once
    /// all 50 are applied and acked (the consumer will not deliver them again).
    async fn saved_after_20_then_all_applied(&self) {
        let messages: Vec<_> = self
            .events
            .iter()
            .map(|event| (event.clone(), event.event_id.to_string()))
            .collect();
        for (part, save) in [(&messages[..20], true), (&messages[20..], false)] {
            let last = *publish_many(&self.env, &self.jetstream, part)
                .await
                .last()
                .expect("published");
            drained(&self.env, &self.jetstream, last).await;
            if save {
                assert_eq!(self.redis.command(&["SAVE"]), "+OK");
            }
        }
        projected(&self.env, &reference(&self.events)).await;
    }

    async fn assert_figures_of(&self, events: &[TelemetryRecorded]) {
        let expected = reference(events);
        let actual = projected(&self.env, &expected).await;
        for (device, want) in &expected {
            assert_same_figures(device, &actual[device], want, Sums::Exact);
        }
    }
}

#[tokio::test]
async fn a_read_model_redis_loads_from_an_old_snapshot_is_rebuilt_with_every_event() {
    let (redis, env) = OnSavingRedis::server();
    let projector = Projector::spawn(&env.settings).await;
    let mut pipeline = OnSavingRedis::with(redis, env).await;
    let first = live_generation(&pipeline.env).await;
    pipeline.saved_after_20_then_all_applied().await;
    assert_eq!(
        pipeline.env.generation().await,
        Some(first),
        "no rebuild while Redis ran on"
    );

    pipeline.redis.crash_and_restart();
    pipeline.assert_figures_of(&pipeline.events).await;
    let rebuilt = pipeline.env.generation().await;
    assert_ne!(rebuilt, Some(first), "a new generation");
    eventually(CATCH_UP, "the reloaded generation deleted", || async {
        pipeline
            .env
            .generation_keys(first)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    // Several looks of the supervisor (one a second): a duration that must pass. The
    // rebuilt read model is this server's, and is not rebuilt again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pipeline.env.generation().await, rebuilt, "rebuilt once");
    projector.stop().await;
}

async fn reloads(projector: &ServiceProcess) -> Option<f64> {
    projector.metrics().await.value(RELOADS, &[])
}

/// A rebuild would cut every device's all-time figures back to what the stream holds,
/// so the projector leaves the read model as the snapshot had it and reports the
/// restart once; `projector rebuild` is the operator's to run.
#[tokio::test]
async fn a_reloaded_read_model_is_reported_not_rebuilt_once_the_stream_let_its_oldest_events_go() {
    let (redis, env) = OnSavingRedis::server();
    let projector = projector_process(&env, &[("PIPELINE__REDIS__URL", &redis.url())]);
    let mut pipeline = OnSavingRedis::with(redis, env).await;
    let first = live_generation(&pipeline.env).await;
    pipeline.saved_after_20_then_all_applied().await;
    let stream = pipeline
        .jetstream
        .get_stream(pipeline.env.subjects.stream())
        .await
        .expect("stream exists");
    // As the stream's retention would.
    assert!(stream.delete_message(1).await.expect("message 1 deleted"));
    assert_eq!(reloads(&projector).await, Some(0.0));

    pipeline.redis.crash_and_restart();
    projector
        .metrics_until(CATCH_UP, "the restart reported", |scrape| {
            (scrape.value(RELOADS, &[]) == Some(1.0)).then_some(())
        })
        .await;
    // Several looks of the supervisor (one a second): a duration that must pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reloads(&projector).await, Some(1.0), "reported once");
    assert_eq!(pipeline.env.generation().await, Some(first), "not rebuilt");
    pipeline.assert_figures_of(&pipeline.events[..20]).await;
    assert!(projector.terminate().await.success());
}

//! Settings built or changed in code are held to the rules the config files are: each
//! service's entry point refuses, at once and naming the key, what `Settings::load`
//! would refuse. Tests build their settings in code, so without this a test could
//! exercise a configuration no deployment can run.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use testkit::TestEnv;
use tokio_util::sync::CancellationToken;

use crate::support::listener;

#[tokio::test]
async fn every_entry_point_refuses_settings_the_config_files_would_refuse() {
    let mut env = TestEnv::new();
    // Two settings at odds: an applied event whose ack was lost comes back after the
    // ack wait, past a horizon this short, and would count twice.
    env.settings.projector.dedup_horizon_secs = env.settings.projector.ack_wait_secs;
    let settings = &env.settings;
    let shutdown = CancellationToken::new();
    let refused = |service: &str, outcome: Result<anyhow::Result<()>, _>| {
        let error = match outcome {
            Ok(Err(error)) => error,
            Ok(Ok(())) => panic!("{service} ran with the settings and stopped without an error"),
            Err(_) => panic!("{service} ran with settings the config files would refuse"),
        };
        assert!(
            error.to_string().contains(
                "projector.dedup_horizon_secs (PIPELINE__PROJECTOR__DEDUP_HORIZON_SECS) must exceed projector.ack_wait_secs"
            ),
            "{service}: {error}"
        );
    };
    type EntryPoint<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;
    let entry_points: Vec<(&str, EntryPoint)> = vec![
        (
            "ingest",
            Box::pin(ingest::serve(
                settings.clone(),
                listener(settings).0,
                shutdown.clone(),
            )),
        ),
        (
            "relay",
            Box::pin(ingest::relay::serve(
                settings.clone(),
                listener(settings).0,
                shutdown.clone(),
            )),
        ),
        (
            "projector",
            Box::pin(projector::run(
                settings.clone(),
                listener(settings).0,
                shutdown.clone(),
            )),
        ),
        (
            "query",
            Box::pin(query::serve(
                settings.clone(),
                listener(settings).0,
                shutdown.clone(),
            )),
        ),
        (
            "projector rebuild",
            Box::pin(async { projector::connect_rebuild(settings).await.map(drop) }),
        ),
    ];
    for (service, entry_point) in entry_points {
        refused(
            service,
            tokio::time::timeout(Duration::from_secs(5), entry_point).await,
        );
    }
}

//! Settings built or changed in code are held to the rules the config files are: each
//! service's entry point refuses, at once and naming the key, what `Settings::load`
//! would refuse. Tests build their settings in code, so without this a test could
//! exercise a configuration no deployment can run.

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
    let at_once = Duration::from_secs(5);
    refused(
        "ingest",
        tokio::time::timeout(
            at_once,
            ingest::serve(settings.clone(), listener(settings).0, shutdown.clone()),
        )
        .await,
    );
    refused(
        "relay",
        tokio::time::timeout(
            at_once,
            ingest::relay::serve(settings.clone(), listener(settings).0, shutdown.clone()),
        )
        .await,
    );
    refused(
        "projector",
        tokio::time::timeout(
            at_once,
            projector::run(settings.clone(), listener(settings).0, shutdown.clone()),
        )
        .await,
    );
    refused(
        "query",
        tokio::time::timeout(
            at_once,
            query::serve(settings.clone(), listener(settings).0, shutdown.clone()),
        )
        .await,
    );
    refused(
        "projector rebuild",
        tokio::time::timeout(at_once, projector::connect_rebuild(settings))
            .await
            .map(|outcome| outcome.map(drop)),
    );
}

//! `relay`: publishes the outbox to JetStream; health and metrics on its admin port
//! ([`ingest::relay::serve`]).

use ingest::bootstrap;

/// nats-server 2.9 writes JetStream to disk this often, with no setting to change it
/// (README, "Securing a deployment"); published rows kept for less may be gone when an
/// OS crash of the NATS host loses what was acknowledged since.
const NATS_2_9_FSYNC_INTERVAL_SECS: u64 = 120;

/// One thread: the process is a pipeline of awaits whose CPU fits in one core, and on a
/// small box a single-threaded runtime spares it the cross-thread wake-ups (measured in
/// PERFORMANCE.md). More throughput comes from more copies of the process.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    bootstrap::exit_with("relay", run().await)
}

async fn run() -> anyhow::Result<()> {
    let settings = bootstrap::settings_or_exit("relay");
    bootstrap::init_tracing(&settings.log);
    let admin_listener = bootstrap::listen_or_exit(
        "relay",
        "relay.admin_listen",
        settings.relay.admin_listen,
        &settings.http,
    );
    if settings.relay.published_retention_secs < NATS_2_9_FSYNC_INTERVAL_SECS {
        tracing::warn!(
            published_retention_secs = settings.relay.published_retention_secs,
            "relay.published_retention_secs is shorter than nats-server 2.9's 2-minute fsync interval: on such a server an OS crash of the NATS host can lose events the relay no longer keeps to publish again"
        );
    }
    ingest::relay::serve(settings, admin_listener, bootstrap::shutdown_on_signal()).await
}

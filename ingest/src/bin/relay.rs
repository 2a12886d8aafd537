//! `relay`: publishes the outbox to JetStream; health and metrics on its admin port
//! ([`ingest::relay::serve`]).

use contract::settings::Settings;
use ingest::bootstrap;

/// One thread: the process is a pipeline of awaits whose CPU fits in one core, and on a
/// small box a single-threaded runtime spares it the cross-thread wake-ups (measured in
/// PERFORMANCE.md). More throughput comes from more copies of the process.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("relay: {error}");
        std::process::exit(2);
    });
    bootstrap::init_tracing(&settings.log);
    let admin_listener = bootstrap::listen(settings.relay.admin_listen, &settings.http)?;
    ingest::relay::serve(settings, admin_listener, bootstrap::shutdown_on_signal()).await
}

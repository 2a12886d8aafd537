//! `projector`: the JetStream consumer that keeps the Redis read model.
//! `projector rebuild` replays the stream into a new generation and switches to it.

use std::time::Duration;

use anyhow::Context;
use contract::settings::Settings;
use projector::admin;
use projector::rebuild::RebuildError;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("projector: {error}");
        std::process::exit(2);
    });
    admin::init_tracing(&settings.log);
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            let listener = tokio::net::TcpListener::bind(settings.projector.admin_listen).await?;
            projector::run(settings, listener, admin::shutdown_on_signal()).await
        }
        Some("rebuild") => {
            let rebuild = projector::connect_rebuild(&settings).await?;
            let nats = rebuild.jetstream.client();
            let deadline = Duration::from_secs(30);
            tokio::time::timeout(deadline, nats.flush())
                .await
                .context("NATS did not answer within 30 s")??;
            match rebuild.run(&admin::shutdown_on_signal()).await {
                Ok(generation) => {
                    println!(
                        "rebuilt the read model as generation {generation} and switched to it"
                    );
                    Ok(())
                }
                Err(RebuildError::AlreadyRunning) => {
                    eprintln!("projector: a rebuild is already running; try again when it is done");
                    std::process::exit(1);
                }
                Err(RebuildError::Failed(error)) => Err(error),
            }
        }
        Some(other) => {
            eprintln!(
                "projector: unknown command {other:?}; use `projector` or `projector rebuild`"
            );
            std::process::exit(2);
        }
    }
}

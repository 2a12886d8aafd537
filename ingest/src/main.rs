//! `ingest`: the HTTP ingest service. `ingest migrate` applies the migrations and exits.

use contract::settings::Settings;
use ingest::{bootstrap, db};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("ingest: {error}");
        std::process::exit(2);
    });
    bootstrap::init_tracing(&settings.log);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            let listener = tokio::net::TcpListener::bind(settings.ingest.listen).await?;
            ingest::serve(settings, listener, bootstrap::shutdown_on_signal()).await
        }
        Some("migrate") => db::migrate(&settings.database).await,
        Some(other) => {
            eprintln!("ingest: unknown command {other:?}; use `ingest`, `ingest serve` or `ingest migrate`");
            std::process::exit(2);
        }
    }
}

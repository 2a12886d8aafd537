//! `query`: the read API over the Redis read model.

use contract::settings::Settings;
use ingest::bootstrap;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("query: {error}");
        std::process::exit(2);
    });
    bootstrap::init_tracing(&settings.log);
    let listener = tokio::net::TcpListener::bind(settings.query.listen).await?;
    query::serve(settings, listener, bootstrap::shutdown_on_signal()).await
}

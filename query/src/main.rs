//! `query`: the read API over the Redis read model.

use contract::settings::Settings;
use ingest::bootstrap;

/// mimalloc instead of glibc's allocator: with it `/stats` answered 15% more requests
/// (glibc's malloc and free were a quarter of the process's CPU time under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

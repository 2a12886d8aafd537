//! `projector`: the JetStream consumer that keeps the Redis read model.

use contract::settings::Settings;
use projector::admin;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("projector: {error}");
        std::process::exit(2);
    });
    admin::init_tracing(&settings.log);
    let listener = tokio::net::TcpListener::bind(settings.projector.admin_listen).await?;
    projector::run(settings, listener, admin::shutdown_on_signal()).await
}

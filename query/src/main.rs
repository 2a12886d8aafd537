//! `query`: the read API over the Redis read model.

use ingest::bootstrap;

/// mimalloc instead of glibc's allocator: with it `/stats` answered 15% more requests
/// (glibc's malloc and free were a quarter of the process's CPU time under load; again
/// 76-77k against 64-66k req/s on 2026-12-01, with every answer re-rendered each 10 s).
/// Built with `no_thp` (Cargo.toml): otherwise mimalloc asks for transparent huge pages
/// for its arenas (Debian's default THP mode is `madvise`), each touched 2 MiB page counts
/// whole, and the peak RSS after the bench's `/stats` load was 49-55 MiB, once 86,
/// against 42 without (6-8 MiB of `AnonHugePages`). Where THP is `always` the kernel
/// backs aligned arenas with huge pages unasked: there `MIMALLOC_ALLOW_THP=0` turns them
/// off for the process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    bootstrap::exit_with("query", run().await)
}

async fn run() -> anyhow::Result<()> {
    let settings = bootstrap::settings_or_exit("query");
    bootstrap::init_tracing(&settings.log);
    let listener = bootstrap::listen_or_exit(
        "query",
        "query.listen",
        settings.query.listen,
        &settings.http,
    );
    query::serve(settings, listener, bootstrap::shutdown_on_signal()).await
}

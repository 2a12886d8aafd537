//! PostgreSQL: the connection pool and the schema migrations.
//!
//! Migrations are the versioned SQL files under `ingest/migrations/`, compiled into the
//! binary and applied in order, each in its own transaction, under an advisory lock so
//! that any number of processes may start at once. Applying them twice is a no-op.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use contract::settings::{unusable_url, DatabaseSettings};
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// The migrations in the order they apply; a version is never edited once released.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_api_tokens.sql")),
    (
        3,
        include_str!("../migrations/0003_outbox_stream_seq_unique.sql"),
    ),
    (
        4,
        include_str!("../migrations/0004_drop_outbox_notify_trigger.sql"),
    ),
    (
        5,
        include_str!("../migrations/0005_outbox_lean_indexes.sql"),
    ),
    (
        6,
        include_str!("../migrations/0006_drop_readings_device_index.sql"),
    ),
];

/// Any constant works as long as every process uses the same one.
const MIGRATION_LOCK: i64 = 0x7e1e_0001;

/// Parses the configured URL, with the configured connect timeout.
pub fn pg_config(settings: &DatabaseSettings) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::from_str(&settings.url)
        .with_context(|| unusable_url("database.url", &settings.url))?;
    config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
    if config.get_application_name().is_none() {
        config.application_name("telemetry-pipeline");
    }
    Ok(config)
}

/// A pool whose `get` fails after the connect timeout instead of waiting forever.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    pool_with_config(pg_config(settings)?, settings)
}

/// The same pool over connections made with `config` (e.g. with session settings added
/// to [`pg_config`]'s).
pub fn pool_with_config(
    config: tokio_postgres::Config,
    settings: &DatabaseSettings,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    // Last in, first out: the connection just returned is handed out again, so a
    // steady load (the group commit's one writer) keeps using one warm backend instead
    // of rotating through every connection a burst once opened. Measured: with the
    // default FIFO, the burst of token look-ups at each cache expiry left ingest's
    // commits spread over 16 busy backends and auth-on ran 10-16% slower; with LIFO,
    // 1-3 busy backends and auth on within the run-to-run noise of auth off.
    Pool::builder(manager)
        .post_create(durable_commits())
        .queue_mode(QueueMode::Lifo)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .context("building the PostgreSQL pool")
}

/// Reads `synchronous_commit` and `fsync` as a new session sees them, and turns
/// `synchronous_commit` on for the session if the server, database or role turned it off.
const DURABLE_COMMITS: &str = "SELECT current_setting('synchronous_commit'), \
    current_setting('fsync'), \
    CASE WHEN current_setting('synchronous_commit') = 'off' \
        THEN set_config('synchronous_commit', 'on', false) END";

/// Every session a pool opens commits durably. A `202` promises a reading that
/// survives a crash, and with `synchronous_commit = off` (set on the server, the
/// database or the role, often as tuning) a commit returns before its WAL is flushed,
/// so a crash loses the last readings acknowledged. The session turns it back on; every
/// other value (`local`, `remote_write`, `on`, `remote_apply`) flushes locally first
/// and is kept. `fsync = off`, which no session can change, is only reported. Each
/// finding is logged once per process.
fn durable_commits() -> Hook {
    static SYNCHRONOUS_COMMIT_OFF: AtomicBool = AtomicBool::new(false);
    static FSYNC_OFF: AtomicBool = AtomicBool::new(false);
    Hook::async_fn(|client, _| {
        Box::pin(async move {
            let row = client
                .query_one(DURABLE_COMMITS, &[])
                .await
                .map_err(HookError::Backend)?;
            let synchronous_commit: String = row.try_get(0).map_err(HookError::Backend)?;
            let fsync: String = row.try_get(1).map_err(HookError::Backend)?;
            if synchronous_commit == "off" && !SYNCHRONOUS_COMMIT_OFF.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    "PostgreSQL's synchronous_commit is off for this database or role: this \
                     process turns it on in each of its sessions, since an accepted reading must \
                     survive a crash"
                );
            }
            if fsync == "off" && !FSYNC_OFF.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "PostgreSQL runs with fsync = off: a crash of its host can lose or corrupt \
                     committed readings, whatever this process does; turn fsync on"
                );
            }
            Ok(())
        })
    })
}

/// Opens one connection outside the pool, driving it on its own task.
pub async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Creates the database if it does not exist, then applies the pending migrations.
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let config = pg_config(settings)?;
    create_database_if_missing(&config).await?;
    let mut client = connect(&config).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock")?;
    let applied = apply_pending(&mut client).await;
    // The lock is released with the session too; unlocking early lets others go on.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    applied
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .context("creating schema_migrations")?;
    for (version, sql) in MIGRATIONS {
        let done = client
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if done {
            continue;
        }
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(sql)
            .await
            .with_context(|| format!("applying migration {version}"))?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
        transaction.commit().await?;
        tracing::info!(version, "migration applied");
    }
    Ok(())
}

async fn create_database_if_missing(config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    let client = connect(&maintenance).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if exists {
        return Ok(());
    }
    let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&statement).await {
        Ok(()) => {
            tracing::info!(database = %name, "database created");
            Ok(())
        }
        // Another process created it between our check and our statement.
        Err(error)
            if error.code() == Some(&SqlState::DUPLICATE_DATABASE)
                || error.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(error) => Err(error).context("creating the database"),
    }
}

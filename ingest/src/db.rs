//! PostgreSQL: the connection pool and the schema migrations.
//!
//! Migrations are the versioned SQL files under `ingest/migrations/`, compiled into the
//! binary and applied in order, each in its own transaction, under an advisory lock so
//! that any number of processes may start at once. Applying them twice is a no-op.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use contract::settings::{unusable_url, DatabaseSettings};
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime,
};
use tokio::sync::Semaphore;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// The newest migration this build knows: a process newer than the schema reads what
/// the database lacks until it is applied.
pub fn newest_migration() -> i32 {
    MIGRATIONS.last().map_or(0, |&(version, _)| version)
}

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
    (
        7,
        include_str!("../migrations/0007_outbox_republish_before.sql"),
    ),
];

/// Any constant works as long as every process uses the same one.
const MIGRATION_LOCK: i64 = 0x7e1e_0001;

/// Seconds of silence on a session before TCP keepalive first probes the server.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Between the probes that go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which the kernel drops the connection.
const KEEPALIVE_RETRIES: u32 = 3;

/// Parses the configured URL, with the configured connect timeout and TCP keepalive
/// probes after 10 s of silence, every 5 s, the connection dropped after 3 unanswered
/// (where the URL sets no keepalive of its own), and the same bound on data sent and
/// never acknowledged (`tcp_user_timeout`, unless the URL sets one).
///
/// A session that only waits (the relay's `LISTEN outbox`, an idle pooled connection,
/// one whose statement waits for its answer) sends nothing, so a PostgreSQL host that
/// vanished without a reset (power lost, a link dropped) goes unnoticed until
/// keepalive gives up on it: about 25 s into the silence with these settings. With
/// tokio-postgres's default (the first probe after 2 hours) the relay's listener stayed
/// dead that long, every reading waiting for the poll instead of the NOTIFY, and the
/// pool handed out dead connections. A session that has sent a statement into such a
/// link is not probed at all (keepalive waits for the send to be acknowledged): without
/// a user timeout the kernel retransmits for about 15 minutes, and a group commit
/// waited that long.
pub fn pg_config(settings: &DatabaseSettings) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::from_str(&settings.url)
        .with_context(|| unusable_url("database.url", &settings.url))?;
    config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
    // tokio-postgres reports no "unset" for the idle time, only its default.
    if !settings.url.contains("keepalives_idle") {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVE_RETRIES);
    }
    // The URL's `tcp_user_timeout` is in seconds (tokio-postgres; libpq reads
    // milliseconds), and 0 leaves the kernel's default.
    if !settings.url.contains("tcp_user_timeout") {
        let interval = config
            .get_keepalives_interval()
            .unwrap_or(KEEPALIVE_INTERVAL);
        let retries = config.get_keepalives_retries().unwrap_or(KEEPALIVE_RETRIES);
        config.tcp_user_timeout(config.get_keepalives_idle() + interval * retries);
    }
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
        .post_create(session_settings())
        .queue_mode(QueueMode::Lifo)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .context("building the PostgreSQL pool")
}

/// Reads `synchronous_commit`, `fsync` and `default_transaction_isolation` as a new
/// session sees them, then sets the two the session can for the session itself:
/// `synchronous_commit` as it was, or on where the server, database or role turned it
/// off, and the default isolation read committed.
const SESSION_SETTINGS: &str = "SELECT current_setting('synchronous_commit'), \
    current_setting('fsync'), \
    set_config('synchronous_commit', CASE current_setting('synchronous_commit') \
        WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, false), \
    current_setting('default_transaction_isolation'), \
    set_config('default_transaction_isolation', 'read committed', false)";

/// Every session a pool opens commits durably and at read committed.
///
/// A `202` promises a reading that survives a crash, and with `synchronous_commit = off`
/// (set on the server, the database or the role, often as tuning) a commit returns
/// before its WAL is flushed, so a crash loses the last readings acknowledged. The
/// session turns it back on; every other value (`local`, `remote_write`, `on`,
/// `remote_apply`) flushes locally first and is kept. `fsync = off`, which no session
/// can change, is only reported.
///
/// The statements are written for read committed, PostgreSQL's default. A group commit
/// that finds a key another commit stored after its snapshot waits for that commit and
/// then skips the key, to look it up; at repeatable read or serializable the same insert
/// fails with a serialization error, and the whole commit would be answered `503`. So
/// where the server, database or role chose a stricter default, the session sets read
/// committed back.
///
/// Both are set for the session even where they already were as wanted: a value the
/// session set itself outranks the server's configuration file, so a later reload (an
/// operator's `ALTER SYSTEM SET synchronous_commit = off` and `pg_reload_conf()`) does
/// not reach the pool's long-lived sessions. Until 2026-12-07 only an unwanted value at
/// the session's start was set, and a reload turned the warm sessions' durability off.
/// Nor does a reload that makes it stricter: the processes are restarted for that (the
/// README says so). The pool recycles without `RESET ALL` (`RecyclingMethod::Fast`),
/// which would drop both settings, this hook not running again.
///
/// Each finding is logged once per process.
fn session_settings() -> Hook {
    static SYNCHRONOUS_COMMIT_OFF: AtomicBool = AtomicBool::new(false);
    static FSYNC_OFF: AtomicBool = AtomicBool::new(false);
    static STRICTER_ISOLATION: AtomicBool = AtomicBool::new(false);
    Hook::async_fn(|client, _| {
        Box::pin(async move {
            let row = client
                .query_one(SESSION_SETTINGS, &[])
                .await
                .map_err(HookError::Backend)?;
            let synchronous_commit: String = row.try_get(0).map_err(HookError::Backend)?;
            let fsync: String = row.try_get(1).map_err(HookError::Backend)?;
            let isolation: String = row.try_get(3).map_err(HookError::Backend)?;
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
            if isolation != "read committed" && !STRICTER_ISOLATION.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    isolation,
                    "PostgreSQL's default_transaction_isolation is not read committed for this \
                     database or role: this process sets read committed in each of its sessions, \
                     which its concurrent commits are written for"
                );
            }
            Ok(())
        })
    })
}

/// The look-ups made on a request's path (a token's grant, an aged retry's stored
/// answer), on a pool they share with the group commit: at most the pool's size less
/// `reserved` of them hold a connection at once, so however many look-ups wait (a flood
/// of unknown tokens while a lock on `api_tokens` holds them up, say) the commits of
/// requests whose tokens are cached still get their connections. Cheap to clone; clones
/// share the limit.
#[derive(Clone)]
pub struct LookUps {
    pool: Pool,
    permits: Arc<Semaphore>,
    /// How long a look-up waits for its turn: as long as the pool waits for a
    /// connection, then a `503` as that would be.
    wait: Option<Duration>,
}

impl LookUps {
    /// Look-ups on `pool` that leave `reserved` of its connections (at least one for the
    /// look-ups) to others.
    pub fn new(pool: Pool, reserved: usize) -> Self {
        let permits = pool.status().max_size.saturating_sub(reserved).max(1);
        let wait = pool.timeouts().wait;
        Self {
            pool,
            permits: Arc::new(Semaphore::new(permits)),
            wait,
        }
    }

    /// The pool the look-ups are made on.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `statements` on a pooled connection once a look-up's turn came (waiting for
    /// it as long as the pool waits for a connection), through [`on_pooled`].
    pub async fn run<T, E>(
        &self,
        what: &'static str,
        statements: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, E>,
    ) -> anyhow::Result<T>
    where
        anyhow::Error: From<E>,
    {
        let turn = self.permits.acquire();
        let _turn = match self.wait {
            Some(wait) => tokio::time::timeout(wait, turn)
                .await
                .map_err(|_| anyhow::anyhow!("no turn for a look-up within {wait:?}"))??,
            None => turn.await?,
        };
        on_pooled(&self.pool, what, statements).await
    }
}

/// Runs `statements` on a connection from `pool` through [`cancel_if_given_up`] (`what`
/// names them in its log): a wait for the connection that fails, or the statements'
/// own error, is the error.
pub async fn on_pooled<T, E>(
    pool: &Pool,
    what: &'static str,
    statements: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, E>,
) -> anyhow::Result<T>
where
    anyhow::Error: From<E>,
{
    let pooled = pool.get().await?;
    Ok(cancel_if_given_up(pooled, what, statements).await?)
}

/// Runs `statements` on the pooled connection `pooled`, which goes back to the pool once
/// they have answered, unless they failed: then it is closed, since the failure may be
/// the connection's own (its backend terminated, its link gone), which the pool, checking
/// only `is_closed` before it hands a connection out, may not know yet. A retry right
/// after a terminated backend got that connection and failed again, a second `503`.
///
/// A caller may give up half-way (a timeout, a request whose client hung up), dropping
/// this future while a statement is still queued on the connection, perhaps waiting on
/// a lock. The connection then must not go back to the pool: the pool hands out the
/// connection returned last first and checks only that it is open, so whatever its next
/// user sends (a commit of readings, a relay's claim, `/readyz`'s `SELECT 1`) would
/// wait behind the abandoned statement. Instead it leaves the pool, its statement is
/// cancelled and it is closed, and the pool opens a fresh one when it needs one.
/// `what` names the statements in the log.
pub async fn cancel_if_given_up<T, E>(
    pooled: deadpool_postgres::Object,
    what: &'static str,
    statements: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, E>,
) -> Result<T, E> {
    let mut unanswered = Unanswered { pooled: None, what };
    let client = unanswered.pooled.insert(pooled);
    let answer = statements(client).await;
    // Answered: the connection is idle again, and goes back to the pool if it worked.
    if let Some(pooled) = unanswered.pooled.take().filter(|_| answer.is_err()) {
        drop(deadpool_postgres::Object::take(pooled));
    }
    answer
}

/// The pooled connection of statements that have not answered yet
/// ([`cancel_if_given_up`]).
struct Unanswered {
    /// `None` once the statements have answered.
    pooled: Option<deadpool_postgres::Object>,
    what: &'static str,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(pooled) = self.pooled.take() else {
            return;
        };
        let what = self.what;
        let client = deadpool_postgres::Object::take(pooled);
        let cancel = client.cancel_token();
        tracing::debug!(what, "statement given up before it answered, cancelling it");
        // Without a runtime (it is shutting down) the connection just closes, and the
        // server ends the statement when it next writes to it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // The pools' connections are made without TLS (`pool_with_config`).
                if let Err(error) = cancel.cancel_query(NoTls).await {
                    tracing::debug!(what, %error, "cancelling a statement given up failed");
                }
                drop(client);
            });
        }
    }
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
    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    let client = connect(&maintenance).await?;
    // Without a database in the URL a session gets the one named after the user it
    // logged in as (the URL's, else the OS user's), as with libpq: the server names it.
    // Until 2026-12-06 this looked for `postgres`, found it, and the database the
    // sessions then asked for was never created: ingest answered 503 for good.
    let name = match config.get_dbname() {
        Some(name) => name.to_owned(),
        None => client.query_one("SELECT session_user", &[]).await?.get(0),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> DatabaseSettings {
        DatabaseSettings {
            url: url.to_owned(),
            pool_size: 4,
            connect_timeout_ms: 2_000,
        }
    }

    #[test]
    fn sessions_probe_a_silent_server_after_10_s_and_give_up_after_3_probes_5_s_apart() {
        let config = pg_config(&settings("postgres://postgres@127.0.0.1:5432/telemetry"))
            .expect("a usable url");
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(25)),
            "data sent into a silent link is given up as late as a silent idle session"
        );
    }

    #[test]
    fn keepalive_settings_in_the_url_win() {
        let config = pg_config(&settings(
            "postgres://postgres@127.0.0.1:5432/telemetry?keepalives_idle=60&keepalives_interval=20&keepalives_retries=9",
        ))
        .expect("a usable url");
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(20))
        );
        assert_eq!(config.get_keepalives_retries(), Some(9));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(240)),
            "the user timeout follows the URL's keepalive"
        );
        let own = pg_config(&settings(
            "postgres://postgres@127.0.0.1:5432/telemetry?tcp_user_timeout=7",
        ))
        .expect("a usable url");
        assert_eq!(own.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
        let kernels = pg_config(&settings(
            "postgres://postgres@127.0.0.1:5432/telemetry?tcp_user_timeout=0",
        ))
        .expect("a usable url");
        assert_eq!(kernels.get_tcp_user_timeout(), None);
        let off = pg_config(&settings(
            "postgres://postgres@127.0.0.1:5432/telemetry?keepalives=0",
        ))
        .expect("a usable url");
        assert!(!off.get_keepalives());
    }
}

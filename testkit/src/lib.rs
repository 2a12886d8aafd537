//! Test support: every test gets its own PostgreSQL database, JetStream stream and
//! Redis key prefix, so tests run in parallel against the real services and leave
//! nothing behind. Not a dependency of any service.
//!
//! # Layout
//! - [`TestEnv`]: the isolated names, the settings pointing at them, and the cleanup.
//! - [`eventually`]: polls an asynchronous outcome until a deadline, instead of sleeping.
//! - [`PrivateNats`]: a nats-server of the test's own, which it may kill and cut back.
//! - [`RedisUser`]: a Redis user of the test's own, which it may refuse or cut off.
//! - [`FaultProxy`]: a TCP proxy that partitions its links, or strands the open ones.
//! - [`prometheus`]: one series of a `/metrics` scrape, by name and labels.
//! - [`process`]: a service's real binary on a free port, scraped, stopped with SIGTERM.
//! - [`Running`]: a service run as a task in the test's own process, stopped within a deadline
//!   and expected to exit cleanly.
//! - [`SplitMix`]: a seeded generator, so a failing run can be repeated exactly.
//! - [`assert_same_figures`]: a device's figures in the read model against the reference model's.
//! - [`settled_readiness`]: a service's `/readyz` once it names what is down (API.md §7).

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use contract::read_model::{
    generation_pattern, glob_escaped, live_generation, meta, meta_key, DeviceKeys, DeviceStats,
    LAYOUT,
};
use contract::settings::Settings;
use contract::subjects::Subjects;
use rand::Rng;

mod fault_proxy;
mod figures;
pub mod fuzz;
mod private_nats;
mod private_redis;
mod redis_user;
mod split_mix;
pub use fault_proxy::FaultProxy;
pub use figures::{assert_same_figures, Sums};
pub use private_nats::{
    stream_messages_dir, truncate_stream_store, PrivateNats, NATS_SERVER_BINARY,
};
pub use private_redis::PrivateRedis;
pub use redis_user::RedisUser;
pub mod process;
pub mod prometheus;
mod running;
pub use running::{Exit, Running};
pub use split_mix::SplitMix;

/// The workspace's `config/` directory.
pub fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// The shipped settings (`config/`, environment `dev`), unchanged.
pub fn shipped_settings() -> Settings {
    Settings::load_from(&config_dir(), "dev").expect("the shipped config loads")
}

/// One test's private corner of PostgreSQL, NATS and Redis.
pub struct TestEnv {
    pub settings: Settings,
    pub database: String,
    pub subjects: Subjects,
}

impl TestEnv {
    /// Settings from the shipped config with this test's own database, stream, consumer,
    /// Redis prefix, and port 0 for every listener. Nothing is created yet: the services
    /// under test create what they need, and [`TestEnv`] removes it when dropped.
    pub fn new() -> Self {
        let suffix: String = (0..10)
            .map(|_| {
                char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::rng().random_range(0..36)])
            })
            .collect();
        let mut settings = shipped_settings();
        let database = format!("t_{suffix}");
        let server = server_url(&settings.database.url)
            .expect("database url has a path")
            .to_owned();
        settings.database.url = format!("{server}/{database}");
        settings.database.pool_size = 8;
        settings.nats.stream = format!("T_{}", suffix.to_ascii_uppercase());
        settings.redis.prefix = format!("t_{suffix}:");
        let any_port = "127.0.0.1:0".parse().expect("valid address");
        settings.ingest.listen = any_port;
        settings.query.listen = any_port;
        settings.relay.admin_listen = any_port;
        settings.projector.admin_listen = any_port;
        settings.relay.poll_interval_ms = 200;
        settings.log.shutdown_grace_secs = 5;
        // Tests of the rate limit set their own; the others send in bursts.
        settings.ingest.rate_limit_per_second = 0;
        let subjects = Subjects::for_stream(&settings.nats.stream);
        Self {
            settings,
            database,
            subjects,
        }
    }

    /// Environment variables that point a service binary at this test's resources.
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "APP_CONFIG_DIR".to_owned(),
                config_dir().display().to_string(),
            ),
            (
                "PIPELINE__DATABASE__URL".to_owned(),
                self.settings.database.url.clone(),
            ),
            (
                "PIPELINE__NATS__URL".to_owned(),
                self.settings.nats.url.clone(),
            ),
            (
                "PIPELINE__NATS__STREAM".to_owned(),
                self.settings.nats.stream.clone(),
            ),
            (
                "PIPELINE__REDIS__URL".to_owned(),
                self.settings.redis.url.clone(),
            ),
            (
                "PIPELINE__REDIS__PREFIX".to_owned(),
                self.settings.redis.prefix.clone(),
            ),
            (
                "PIPELINE__INGEST__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "PIPELINE__QUERY__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "PIPELINE__RELAY__ADMIN_LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "PIPELINE__RELAY__POLL_INTERVAL_MS".to_owned(),
                "200".to_owned(),
            ),
            (
                "PIPELINE__PROJECTOR__ADMIN_LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
        ]
    }

    /// A client of this test's database (which must exist by then).
    pub async fn postgres(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.settings.database.url, tokio_postgres::NoTls)
                .await
                .expect("test database reachable");
        tokio::spawn(connection);
        client
    }

    /// A JetStream context on the configured NATS.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.settings.nats.url)
            .await
            .expect("nats reachable");
        async_nats::jetstream::new(client)
    }

    /// The test's durable consumer as the server has it now; `None` while its stream or
    /// the consumer is missing (or NATS does not answer).
    pub async fn durable_consumer_info(
        &self,
        jetstream: &async_nats::jetstream::Context,
    ) -> Option<async_nats::jetstream::consumer::Info> {
        jetstream
            .get_stream(self.subjects.stream())
            .await
            .ok()?
            .consumer_info(&self.settings.nats.consumer)
            .await
            .ok()
    }

    /// Waits (at most `within`) until the test's durable consumer has handled (acked or
    /// terminated) every message up to `last_sequence` and has none pending or in
    /// flight: then every message has reached the read model, a redelivered or
    /// republished copy as much as the first. Returns the consumer's state then.
    pub async fn consumer_drained(
        &self,
        jetstream: &async_nats::jetstream::Context,
        last_sequence: u64,
        within: Duration,
    ) -> async_nats::jetstream::consumer::Info {
        eventually(
            within,
            &format!("the consumer to ack every message up to {last_sequence}"),
            || async {
                let info = self.durable_consumer_info(jetstream).await?;
                (info.ack_floor.stream_sequence >= last_sequence
                    && info.num_pending == 0
                    && info.num_ack_pending == 0)
                    .then_some(info)
            },
        )
        .await
    }

    /// The live generation of the read model, if there is one (of this layout).
    pub async fn generation(&self) -> Option<u64> {
        let mut redis = self.redis().await;
        let (generation, layout): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(meta_key(&self.settings.redis.prefix))
            .arg(meta::LIVE)
            .query_async(&mut redis)
            .await
            .ok()?;
        live_generation(generation, layout)
    }

    /// Marks `generation` as being built, as a rebuild does when it begins, or, with
    /// `None`, none, as its switch-over leaves it.
    pub async fn set_building(&self, generation: Option<u64>) {
        let mut redis = self.redis().await;
        // HSET meta building <generation>, or HDEL meta building (None adds no argument).
        let mut command = redis::cmd(if generation.is_some() { "HSET" } else { "HDEL" });
        command
            .arg(meta_key(&self.settings.redis.prefix))
            .arg(meta::BUILDING)
            .arg(generation);
        let () = command.query_async(&mut redis).await.expect("building set");
    }

    /// Makes `generation` the live one, of this layout, as a finished build would have.
    pub async fn set_live_generation(&self, generation: u64) {
        let mut redis = self.redis().await;
        let () = redis::cmd("HSET")
            .arg(meta_key(&self.settings.redis.prefix))
            .arg(meta::GENERATION)
            .arg(generation)
            .arg(meta::LAYOUT)
            .arg(LAYOUT)
            .query_async(&mut redis)
            .await
            .expect("hset");
    }

    /// The read model of one device in the live generation, if any.
    pub async fn device_stats(&self, device_id: &str) -> Option<DeviceStats> {
        let generation = self.generation().await?;
        let mut redis = self.redis().await;
        let hash: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(DeviceKeys::stats_of(
                &self.settings.redis.prefix,
                generation,
                device_id,
            ))
            .query_async(&mut redis)
            .await
            .ok()?;
        DeviceStats::from_hash(hash)
    }

    /// Loses this test's read model as `FLUSHALL` would (other tests share the server):
    /// the meta hash first, so that no reader sees a generation without its devices and
    /// no guarded write lands after the rest is gone, then every other key under the
    /// prefix.
    pub async fn lose_read_model(&self) {
        let prefix = &self.settings.redis.prefix;
        let mut redis = self.redis().await;
        let () = redis::cmd("DEL")
            .arg(contract::read_model::meta_key(prefix))
            .query_async(&mut redis)
            .await
            .expect("meta hash deleted");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", contract::read_model::glob_escaped(prefix)))
            .query_async(&mut redis)
            .await
            .expect("keys listed");
        if !keys.is_empty() {
            let () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .expect("keys deleted");
        }
    }

    /// The read model's keys of `generation` under this test's prefix (`KEYS`).
    pub async fn generation_keys(&self, generation: u64) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(generation_pattern(&self.settings.redis.prefix, generation))
            .query_async(&mut self.redis().await)
            .await
            .expect("keys listed")
    }

    /// Overwrites `key` with a string, as an operator's mistake would: Redis then refuses
    /// every command that expects the key's own type (`WRONGTYPE`).
    pub async fn overwrite_with_a_string(&self, key: &str) {
        let () = redis::cmd("SET")
            .arg(key)
            .arg("not of the read model's type")
            .query_async(&mut self.redis().await)
            .await
            .expect("SET");
    }

    /// A Redis connection.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.settings.redis.url.as_str())
            .expect("redis url valid")
            .get_multiplexed_async_connection()
            .await
            .expect("redis reachable")
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    /// Removes the database, streams and keys, also when the test failed.
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let database = self.database.clone();
        let subjects = self.subjects.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                let _ = runtime.block_on(remove_resources(&settings, &database, &subjects));
            }
        });
        let _ = cleanup.join();
    }
}

async fn remove_resources(
    settings: &Settings,
    database: &str,
    subjects: &Subjects,
) -> anyhow::Result<()> {
    if let Ok(client) = maintenance_postgres(settings).await {
        let _ = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
            ))
            .await;
    }
    if let Ok(client) = async_nats::connect(&settings.nats.url).await {
        let jetstream = async_nats::jetstream::new(client);
        let _ = jetstream.delete_stream(subjects.stream()).await;
        let _ = jetstream.delete_stream(subjects.dlq_stream()).await;
    }
    if settings.redis.prefix.is_empty() {
        return Ok(());
    }
    let mut redis = redis::Client::open(settings.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", glob_escaped(&settings.redis.prefix)))
        .query_async(&mut redis)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
    }
    Ok(())
}

/// The server part of a database URL: everything before the database's name.
fn server_url(database_url: &str) -> Option<&str> {
    database_url.rsplit_once('/').map(|(server, _)| server)
}

/// A session on the server's `postgres` database, for what is done to a test's database
/// from outside it: dropping it, closing it to new connections.
pub async fn maintenance_postgres(settings: &Settings) -> anyhow::Result<tokio_postgres::Client> {
    let server = server_url(&settings.database.url)
        .ok_or_else(|| anyhow::anyhow!("database url has no path"))?;
    let (client, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Polls `<admin_url>/readyz` until its answer settles (a service connects to its
/// dependencies in the background): with `down` named, a 503 problem `unavailable`
/// whose detail is `not answering: <down>` and nothing else; with `None`, a 200.
/// Returns the settled body.
pub async fn settled_readiness(admin_url: &str, down: Option<&str>) -> serde_json::Value {
    settled_readiness_within(admin_url, down, Duration::from_secs(10)).await
}

/// [`settled_readiness`], waiting up to `deadline` for the answer to settle (a service
/// that notices a dependency gone only by its pings takes longer).
pub async fn settled_readiness_within(
    admin_url: &str,
    down: Option<&str>,
    deadline: Duration,
) -> serde_json::Value {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let (status, content_type, body) = eventually(
        deadline,
        &format!("{admin_url}/readyz naming {down:?} as down"),
        || async {
            let response = http.get(format!("{admin_url}/readyz")).send().await.ok()?;
            let status = response.status().as_u16();
            let content_type = content_type(&response);
            let body: serde_json::Value = response.json().await.ok()?;
            let settled = match down {
                Some(name) => body["detail"] == format!("not answering: {name}"),
                None => status == 200,
            };
            settled.then_some((status, content_type, body))
        },
    )
    .await;
    if down.is_some() {
        assert_eq!(
            (status, content_type.as_str()),
            (503, "application/problem+json")
        );
        assert!(
            body["type"]
                .as_str()
                .is_some_and(|kind| kind.ends_with("/problems/unavailable")),
            "{body}"
        );
    }
    body
}

/// An answer's header `name` as text, `None` when it has none (or one that is not text).
pub fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// An answer's `Content-Type`, empty when it has none (or one that is not text).
pub fn content_type(response: &reqwest::Response) -> String {
    header(response, "content-type")
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a problem+json answer (API.md §3) with `status` and problem type `slug`,
/// carrying no internal detail (SQL, addresses, stack frames, crate names); returns it.
/// A `503`, `429` or `409` carries `Retry-After` in whole seconds (API.md §1, §5), a
/// `401` `WWW-Authenticate`.
pub async fn assert_problem(
    response: reqwest::Response,
    status: u16,
    slug: &str,
) -> serde_json::Value {
    let url = response.url().to_string();
    assert_eq!(response.status().as_u16(), status, "status of {url}");
    if matches!(status, 503 | 429 | 409) {
        let retry_after = header(&response, "retry-after");
        assert!(
            retry_after.is_some_and(|seconds| seconds.parse::<u32>().is_ok_and(|s| s >= 1)),
            "Retry-After of a {status} from {url}: {retry_after:?}"
        );
    }
    if status == 401 {
        assert!(
            header(&response, "www-authenticate").is_some_and(|value| value.starts_with("Bearer")),
            "WWW-Authenticate of a 401 from {url}"
        );
    }
    assert_eq!(
        content_type(&response),
        "application/problem+json",
        "content type of {url}"
    );
    let text = response.text().await.expect("body");
    for internal in [
        "SQL",
        "sql",
        "postgres",
        "redis://",
        ":6379",
        ":5432",
        "127.0.0.1",
        "os error",
        "refused",
        "panicked",
        "src/",
        "tokio",
        "axum",
        "deadpool",
        "serde",
    ] {
        assert!(
            !text.contains(internal),
            "error body of {url} leaks {internal:?}: {text}"
        );
    }
    let problem: serde_json::Value = serde_json::from_str(&text).expect("problem is json");
    assert_eq!(problem["status"], status, "problem status of {url}");
    assert!(
        problem["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&format!("/problems/{slug}")),
        "type {} of {url} is not {slug}",
        problem["type"]
    );
    assert!(
        problem["title"].is_string() && problem["detail"].is_string(),
        "title and detail of {url}"
    );
    problem
}

/// Takes `table` in `ACCESS EXCLUSIVE` mode in a transaction on `client`: every statement
/// that touches the table waits until the transaction ends (rolled back or dropped).
pub async fn lock_table<'a>(
    client: &'a mut tokio_postgres::Client,
    table: &str,
) -> tokio_postgres::Transaction<'a> {
    let lock = client.transaction().await.expect("begin");
    lock.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await
        .expect("locked");
    lock
}

/// Backends of `client`'s database waiting for a lock, in a statement that names `table`.
pub async fn lock_waiters(client: &tokio_postgres::Client, table: &str) -> i64 {
    lock_waiter_pids(client, table).await.len() as i64
}

/// The process ids of the backends of `client`'s database waiting for a lock, in a
/// statement whose text contains `text` (for `pg_terminate_backend`).
pub async fn lock_waiter_pids(client: &tokio_postgres::Client, text: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%' || $1 || '%'",
            &[&text],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Asserts that an admin port (API.md §7) answers an unknown path `404 not-found` and a
/// wrong method on `/healthz` `405 method-not-allowed`, both as problem documents (§3).
pub async fn assert_admin_port_refuses_with_problems(admin_url: &str) {
    let http = reqwest::Client::new();
    let unknown = http
        .get(format!("{admin_url}/no-such-path"))
        .send()
        .await
        .expect("an unknown path answers");
    assert_problem(unknown, 404, "not-found").await;
    let wrong_method = http
        .post(format!("{admin_url}/healthz"))
        .send()
        .await
        .expect("a wrong method answers");
    assert_problem(wrong_method, 405, "method-not-allowed").await;
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `deadline` with
/// `what` in the message.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

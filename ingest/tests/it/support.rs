//! Starting ingest in-process on port 0 and talking to it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use contract::settings::{HttpSettings, Settings};
use reqwest::{Client, RequestBuilder, Response};
use serde_json::Value;
use testkit::{maintenance_postgres, Running};

/// A listener on a free loopback port, made as the binaries make theirs
/// (`ingest::bootstrap::listen`), so its listen backlog is `http.max_connections`.
pub fn loopback_listener(http: &HttpSettings) -> tokio::net::TcpListener {
    ingest::bootstrap::listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), http)
        .expect("listen on a loopback port")
}

/// A running ingest service.
pub struct Ingest {
    pub base_url: String,
    pub http: Client,
    running: Running<anyhow::Result<()>>,
}

impl Ingest {
    /// Starts ingest with `settings` and waits until it is ready.
    pub async fn spawn(settings: &Settings) -> Self {
        let ingest = Self::start(settings);
        testkit::eventually(Duration::from_secs(20), "ingest ready", || async {
            let response = ingest
                .http
                .get(format!("{}/readyz", ingest.base_url))
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        ingest
    }

    /// Starts ingest with `settings`, without waiting for it to be ready.
    pub fn start(settings: &Settings) -> Self {
        let listener = loopback_listener(&settings.http);
        let base_url = format!("http://{}", listener.local_addr().expect("local addr"));
        let settings = settings.clone();
        let running = Running::spawn(|shutdown| ingest::serve(settings, listener, shutdown));
        let http = Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("http client");
        Self {
            base_url,
            http,
            running,
        }
    }

    /// `GET` of `path` (e.g. `/readyz`) on ingest's listener.
    pub async fn get(&self, path: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .expect("request sent")
    }

    /// `POST /v1/telemetry` with a JSON body and an idempotency key.
    pub async fn post(&self, key: &str, body: &Value) -> Response {
        self.post_text(key, body.to_string()).await
    }

    /// Stores `count` readings of `sensor-1` (temperatures 0, 1, …) under the keys
    /// `k-0`, `k-1`, …, each answered `202`.
    pub async fn accept_readings(&self, count: usize) {
        for index in 0..count {
            self.accept(&format!("k-{index}"), &reading("sensor-1", index as f64))
                .await;
        }
    }

    /// `POST /v1/telemetry` that must be answered `202`; the answer, for further checks.
    pub async fn accept(&self, key: &str, body: &Value) -> Response {
        let response = self.post(key, body).await;
        assert_eq!(
            response.status().as_u16(),
            202,
            "POST with key {key:?} not accepted: {body}"
        );
        response
    }

    /// `POST /v1/telemetry` with a body as written (which need not be valid JSON),
    /// declared `application/json`, and an idempotency key.
    pub async fn post_text(&self, key: &str, body: String) -> Response {
        self.json_request("/v1/telemetry", Some(key), body)
            .send()
            .await
            .expect("request sent")
    }

    /// `POST /v1/telemetry/batch` with a JSON body.
    pub async fn post_batch(&self, body: &Value) -> Response {
        self.post_batch_text(body.to_string()).await
    }

    /// `POST /v1/telemetry/batch` with a body as written (e.g. with a field twice, which
    /// `json!` cannot write), declared `application/json`.
    pub async fn post_batch_text(&self, body: String) -> Response {
        self.json_request("/v1/telemetry/batch", None, body)
            .send()
            .await
            .expect("request sent")
    }

    /// A POST to `path` with a body declared `application/json` and, if given, an
    /// idempotency key, for a caller that adds headers of its own (`authorization`).
    pub fn json_request(
        &self,
        path: &str,
        idempotency_key: Option<&str>,
        body: String,
    ) -> RequestBuilder {
        let request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .body(body);
        match idempotency_key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    }

    /// Stops the service gracefully and waits for it; it must exit cleanly.
    pub async fn stop(self) {
        self.running.stop().await;
    }

    /// As [`Self::stop`], within `limit` ([`Running::stop_within`]).
    pub async fn stop_within(self, limit: Duration, what: &str) {
        self.running.stop_within(limit, what).await;
    }
}

/// A batch body of `size` readings, keys `<prefix>-<index>`, over `devices` devices
/// (`sensor-<index % devices>`), each's temperature its index.
pub fn batch_body(prefix: &str, size: usize, devices: usize) -> Value {
    let readings: Vec<Value> = (0..size)
        .map(|index| {
            serde_json::json!({
                "idempotency_key": format!("{prefix}-{index}"),
                "device_id": format!("sensor-{}", index % devices),
                "metrics": {"temperature": index as f64},
            })
        })
        .collect();
    serde_json::json!({ "readings": readings })
}

/// Asserts that `response` is a stored answer given again (`Idempotent-Replayed: true`).
pub fn assert_replayed(response: &Response) {
    assert_eq!(
        testkit::header(response, "idempotent-replayed"),
        Some("true"),
        "a replay of {}",
        response.url()
    );
}

/// A reading body for `device` with one temperature value.
pub fn reading(device: &str, temperature: f64) -> Value {
    serde_json::json!({"device_id": device, "metrics": {"temperature": temperature}})
}

pub use testkit::assert_problem;

/// A session whose open transaction stores key `new` of the device of stored key `old`
/// with `old`'s reading and answer: an insert of `new` by ingest waits for it to end.
pub async fn hold_key_copied(
    env: &testkit::TestEnv,
    old: &str,
    new: &str,
) -> tokio_postgres::Client {
    let holder = env.postgres().await;
    holder
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO idempotency_keys
                 (device_id, idempotency_key, fingerprint, event_id, status_code, response_body)
             SELECT device_id, '{new}', fingerprint, gen_random_uuid(), status_code, response_body
             FROM idempotency_keys WHERE idempotency_key = '{old}'"
        ))
        .await
        .expect("the new key held by an open transaction");
    holder
}

/// Waits (10 s at most) until `watcher` sees another session of its database in
/// `pg_stat_activity` that matches `condition` (SQL over the view's columns); `what`
/// names it in the failure. `watcher` is a session of its own: one in a transaction
/// sees a snapshot of the view taken at its first look.
pub async fn wait_for_session(watcher: &tokio_postgres::Client, what: &str, condition: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND ({condition})"
    );
    testkit::eventually(Duration::from_secs(10), what, || async {
        let sessions: i64 = watcher.query_one(sql.as_str(), &[]).await.ok()?.get(0);
        (sessions > 0).then_some(())
    })
    .await;
}

/// Applies the migrations to the test's database (creating it).
pub async fn migrate(env: &testkit::TestEnv) {
    ingest::db::migrate(&env.settings.database)
        .await
        .expect("migrations apply");
}

/// An ingest that lets each device post 1 reading a second, in bursts of 3: what the
/// rate-limit tests push past.
pub async fn rate_limited_ingest() -> (testkit::TestEnv, Ingest) {
    let mut env = testkit::TestEnv::new();
    env.settings.ingest.rate_limit_per_second = 1;
    env.settings.ingest.rate_limit_burst = 3;
    let ingest = Ingest::spawn(&env.settings).await;
    (env, ingest)
}

/// A gateway token issued in the test database: a pool on that database, the token's id
/// and the `Authorization` value that carries it.
pub async fn gateway_token(settings: &Settings) -> (deadpool_postgres::Pool, uuid::Uuid, String) {
    let pool = ingest::db::pool(&settings.database).expect("pool");
    let (id, token) = ingest::auth::issue(&pool, ingest::auth::Kind::Gateway, None, "test")
        .await
        .expect("issued");
    (pool, id, format!("Bearer {token}"))
}

/// PostgreSQL unreachable for the service under test: the test database refuses new
/// connections and its open ones are ended. [`reopen_database`] undoes it.
pub async fn close_database(env: &testkit::TestEnv) {
    let database = &env.database;
    on_maintenance_session(
        env,
        &format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}';"
        ),
    )
    .await;
}

/// Lets the test database take connections again after [`close_database`].
pub async fn reopen_database(env: &testkit::TestEnv) {
    let database = &env.database;
    on_maintenance_session(
        env,
        &format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"),
    )
    .await;
}

/// Runs `sql` from outside the test database, on the server's `postgres` database.
async fn on_maintenance_session(env: &testkit::TestEnv, sql: &str) {
    maintenance_postgres(&env.settings)
        .await
        .expect("maintenance connection")
        .batch_execute(sql)
        .await
        .expect("maintenance statement runs");
}

/// The first column of every row `sql` returns.
pub async fn column<T, C>(client: &tokio_postgres::Client, sql: &str) -> C
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<T>,
{
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The versions recorded in `schema_migrations`, in order.
pub async fn applied_versions(client: &tokio_postgres::Client) -> Vec<i32> {
    column(
        client,
        "SELECT version FROM schema_migrations ORDER BY version",
    )
    .await
}

/// Every version a migrated database must have: one per `NNNN_name.sql` file under
/// `ingest/migrations/`, read from the directory rather than from the code that applies
/// them, so a migration left out of `db.rs` fails the upgrade tests.
pub fn migration_file_versions() -> Vec<i32> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut versions: Vec<i32> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").file_name())
        .filter_map(|name| {
            let (version, _) = name.to_str()?.strip_suffix(".sql")?.split_once('_')?;
            version.parse().ok()
        })
        .collect();
    versions.sort_unstable();
    assert!(
        !versions.is_empty(),
        "no migrations under {}",
        dir.display()
    );
    versions
}

/// Polls `sql`, one row of `bigint` counts, until it reads `expected` (`what` names the
/// state in the timeout's message).
pub async fn wait_for_counts(
    client: &tokio_postgres::Client,
    deadline: Duration,
    what: &str,
    sql: &str,
    expected: &[i64],
) {
    testkit::eventually(deadline, what, || async {
        let row = client.query_one(sql, &[]).await.ok()?;
        let counts: Vec<i64> = (0..expected.len())
            .map(|index| row.try_get(index))
            .collect::<Result<_, _>>()
            .ok()?;
        (counts == expected).then_some(())
    })
    .await;
}

/// Rows in a table of the test database.
pub async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count query")
        .get(0)
}

/// The first backend of `db`'s database waiting for a lock in a statement whose text
/// contains `text`.
pub async fn lock_waiter(db: &tokio_postgres::Client, text: &str) -> Option<i32> {
    testkit::lock_waiter_pids(db, text).await.first().copied()
}

/// Opens a transaction of its own that takes `ACCESS EXCLUSIVE` on `table`, queued
/// behind whatever holds the table now, and returns once the lock waits (seen from
/// `db`): whatever asks for the table after it waits in turn. The task ends with the
/// lock granted, giving back the client whose transaction holds it.
pub async fn queue_table_lock(
    env: &testkit::TestEnv,
    db: &tokio_postgres::Client,
    table: &'static str,
) -> tokio::task::JoinHandle<tokio_postgres::Client> {
    let locker = env.postgres().await;
    let locked = tokio::spawn(async move {
        locker
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .expect("the table locked");
        locker
    });
    testkit::eventually(Duration::from_secs(10), "the lock queued", || {
        lock_waiter(db, "LOCK TABLE")
    })
    .await;
    locked
}

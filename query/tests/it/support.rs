//! Starting the services in this process on port 0, and talking to them over HTTP.

use std::collections::BTreeMap;
use std::time::Duration;

use contract::event::TelemetryRecorded;
use contract::settings::Settings;
use contract::timestamp::{from_unix_millis, unix_millis};
use projector::apply::{Delivered, ReadModel};
use reqwest::{Client, Response};
use serde_json::Value;
use testkit::{eventually, Running, TestEnv};
use time::OffsetDateTime;
use uuid::Uuid;

/// How long a test waits for a service to come up or catch up.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// An HTTP client with a timeout, so a hung service fails the test instead of hanging it.
pub fn http_client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Binds port 0 as the binaries bind (`ingest::bootstrap::listen`) and returns the
/// listener and its base URL.
pub fn listener(settings: &Settings) -> (tokio::net::TcpListener, String) {
    let listener = ingest::bootstrap::listen(
        "127.0.0.1:0".parse().expect("loopback, port 0"),
        &settings.http,
    )
    .expect("bind port 0");
    let base_url = format!("http://{}", listener.local_addr().expect("local addr"));
    (listener, base_url)
}

/// Waits until `GET <base_url><path>` answers 200.
async fn wait_for(http: &Client, base_url: &str, path: &str) {
    eventually(
        DEADLINE,
        &format!("{base_url}{path} to answer 200"),
        || async {
            let response = http.get(format!("{base_url}{path}")).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await;
}

/// The query service, serving; `base_url` is where.
pub struct Query {
    pub base_url: String,
    pub http: Client,
    running: Running<anyhow::Result<()>>,
}

impl Query {
    /// Starts `query::serve` on port 0 and waits until `/healthz` answers (not
    /// `/readyz`: some tests start it with Redis unreachable on purpose).
    pub async fn spawn(settings: &Settings) -> Self {
        let (listener, base_url) = listener(settings);
        let settings = settings.clone();
        let running = Running::spawn(|shutdown| query::serve(settings, listener, shutdown));
        let http = http_client();
        wait_for(&http, &base_url, "/healthz").await;
        Self {
            base_url,
            http,
            running,
        }
    }

    pub async fn get(&self, path_and_query: &str) -> Response {
        self.http
            .get(format!("{}{path_and_query}", self.base_url))
            .send()
            .await
            .expect("request sent")
    }

    /// `GET /v1/devices/{device}/stats` with an optional query string, as JSON.
    pub async fn stats(&self, device: &str, query: &str) -> (u16, Value) {
        let response = self
            .get(&format!("/v1/devices/{device}/stats{query}"))
            .await;
        let status = response.status().as_u16();
        if status == 200 {
            assert_eq!(
                testkit::header(&response, "content-type"),
                Some("application/json"),
                "a stats document is JSON"
            );
        }
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The first `200` stats document of `device` (full selection), waiting for it as
    /// long as `DEADLINE`; `what` names the wait in a failure.
    pub async fn first_document(&self, device: &str, what: &str) -> Value {
        eventually(DEADLINE, what, || async {
            let (status, stats) = self.stats(device, "").await;
            (status == 200).then_some(stats)
        })
        .await
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// What most read-model tests run: their own streams, a projector and the query service.
pub struct ReadSide {
    pub jetstream: async_nats::jetstream::Context,
    pub projector: Running<anyhow::Result<()>>,
    pub query: Query,
    /// Last, so dropped last: the services stop before the test's keys are cleaned up.
    pub env: TestEnv,
}

impl ReadSide {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test's settings changed by `adjust` first.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut env = TestEnv::new();
        adjust(&mut env.settings);
        ensure_streams(&env).await;
        let jetstream = env.jetstream().await;
        let projector = spawn_projector(&env.settings);
        let query = Query::spawn(&env.settings).await;
        Self {
            env,
            jetstream,
            projector,
            query,
        }
    }

    pub async fn stop(self) {
        self.query.stop().await;
        self.projector.stop().await;
    }
}

/// The ingest service, serving; `base_url` is where.
pub struct Ingest {
    pub base_url: String,
    running: Running<anyhow::Result<()>>,
}

impl Ingest {
    pub async fn spawn(settings: &Settings) -> Self {
        let (listener, base_url) = listener(settings);
        let settings = settings.clone();
        let running = Running::spawn(|shutdown| ingest::serve(settings, listener, shutdown));
        wait_for(&http_client(), &base_url, "/readyz").await;
        Self { base_url, running }
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// Starts a relay in this process as the `relay` binary runs it, its admin port on port 0.
pub fn spawn_relay(settings: &Settings) -> Running<anyhow::Result<()>> {
    let (admin, _) = listener(settings);
    let settings = settings.clone();
    Running::spawn(|shutdown| ingest::relay::serve(settings, admin, shutdown))
}

/// Starts a projector in this process, its admin port on port 0.
pub fn spawn_projector(settings: &Settings) -> Running<anyhow::Result<()>> {
    let (admin, _) = listener(settings);
    let settings = settings.clone();
    Running::spawn(|shutdown| projector::run(settings, admin, shutdown))
}

/// Creates this test's streams with the relay's own code.
pub async fn ensure_streams(env: &TestEnv) {
    ingest::relay::ensure_streams(&env.jetstream().await, &env.settings.nats)
        .await
        .expect("streams created");
}

/// [`TestEnv::consumer_drained`] within [`DEADLINE`].
pub async fn consumer_drained(
    env: &TestEnv,
    jetstream: &async_nats::jetstream::Context,
    last_sequence: u64,
) {
    env.consumer_drained(jetstream, last_sequence, DEADLINE)
        .await;
}

/// Makes generation 1 live and applies one reading of `device` to it, as the projector
/// would have.
pub async fn one_projected_reading(env: &TestEnv, device: &str) {
    env.set_live_generation(1).await;
    apply_reading(env, device, 21.5, 1).await;
}

/// Applies a temperature reading of `device` recorded a second ago to generation 1, as
/// the projector would at `stream_sequence`.
pub async fn apply_reading(env: &TestEnv, device: &str, temperature: f64, stream_sequence: u64) {
    apply_reading_in(env, 1, device, temperature, stream_sequence).await;
}

/// [`apply_reading`] to `generation`.
pub async fn apply_reading_in(
    env: &TestEnv,
    generation: u64,
    device: &str,
    temperature: f64,
    stream_sequence: u64,
) {
    let now = OffsetDateTime::now_utc();
    let event = TelemetryRecorded::new(
        Uuid::now_v7(),
        device.to_owned(),
        from_unix_millis(unix_millis(now) - 1_000).expect("in range"),
        now,
        BTreeMap::from([("temperature".to_owned(), temperature)]),
    );
    let applied = ReadModel::new(env.settings.redis.prefix.clone(), 60_000)
        .apply(
            &mut env.redis().await,
            &[generation],
            &[Delivered {
                event,
                stream_sequence,
                stored_at: now,
            }],
            unix_millis(now),
        )
        .await
        .expect("applied");
    assert_eq!(applied.applied, 1);
}

pub use testkit::assert_problem;

pub use testkit::SplitMix;

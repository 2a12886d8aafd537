//! Process plumbing of every binary (`ingest`, `relay`, `projector`, `query`): logs,
//! the metrics recorder, signals, listeners, the NATS connection of the relay and the
//! projector, and the backoff of loops that wait for a dependency.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use contract::settings::{key_and_variable, unusable_url, HttpSettings, LogFormat, LogSettings};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// JSON logs in production, human-readable ones in development, filtered by
/// `log.level` (an `EnvFilter` directive such as `info` or `debug,tokio_postgres=info`).
///
/// async-nats writes each server address it tries at debug level, password and token
/// included (`ServerAddr(Url { .. password: Some(..) })`), and with
/// `auth.service_credentials_required` every URL carries one. So its debug and trace
/// events are dropped unless `log.level` names `async_nats` itself (an operator who
/// writes `debug,async_nats=debug` asks for them).
pub fn init_tracing(settings: &LogSettings) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    // [`settings_or_exit`] refused a level that is no filter; settings made in code fall
    // back to `info`.
    let filter = log_filter(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let nats_debug_asked = settings.level.contains("async_nats");
    let no_nats_secrets = tracing_subscriber::filter::filter_fn(move |metadata| {
        nats_debug_asked
            || *metadata.level() <= tracing::Level::INFO
            || !metadata.target().starts_with("async_nats")
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(no_nats_secrets);
    let layer = tracing_subscriber::fmt::layer().with_target(false);
    let _ = match settings.format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(layer).try_init(),
    };
}

/// Connected, and JetStream answers within a second: a NATS server started without
/// JetStream (`-js`), or restarted so, takes the connection but can store and deliver
/// nothing. The `nats` check of the relay's and the projector's `/readyz`, on the
/// JetStream context each made at its start.
pub async fn jetstream_answers(jetstream: &async_nats::jetstream::Context) -> bool {
    if !nats_connected(&jetstream.client()) {
        return false;
    }
    // The account's JetStream information, read as plain JSON: async-nats's own
    // `query_account` expects fields nats-server 2.9 does not send (`reserved_memory`).
    // A server without JetStream has no responder; one that refuses answers an `error`.
    let empty = serde_json::Map::new();
    let info = jetstream.request::<_, _, serde_json::Value>("INFO", &empty);
    match tokio::time::timeout(Duration::from_secs(1), info).await {
        Ok(Ok(answer)) => answer.get("error").is_none(),
        _ => false,
    }
}

/// `log.level` as the filter of the logs, or why it is none.
fn log_filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    EnvFilter::try_new(level)
}

/// The settings a binary starts with; a missing or invalid one stops it with status 2
/// and one line naming the key (API.md §8). `log.level` is checked here, where the
/// filter it must parse as is known: a level that was none (`debug,tokio=loud`) used to
/// start the process at `info`, unsaid.
pub fn settings_or_exit(program: &str) -> contract::settings::Settings {
    let refuse = |error: &dyn std::fmt::Display| -> ! {
        eprintln!("{program}: {error}");
        std::process::exit(2);
    };
    let settings = contract::settings::Settings::load().unwrap_or_else(|error| refuse(&error));
    if let Err(error) = log_filter(&settings.log.level) {
        refuse(&format_args!(
            "invalid configuration: {} is not a tracing filter (such as `info` or \
             `debug,tokio_postgres=info`): {error}",
            key_and_variable("log.level")
        ));
    }
    settings
}

/// How a binary ends once its work returned: exit 0, or one line on stderr,
/// `<program>: <error>: <its cause>: …`, and exit 1. Rust's own report of an error
/// returned from `main` spans several lines (`Caused by:` and the chain below it), where
/// API.md §8 asks a start refused over a setting for one line naming the key.
pub fn exit_with(program: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let line = format!("{error:#}").replace(['\n', '\r'], " ");
            eprintln!("{program}: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How often the client pings NATS. async-nats drops a connection whose server missed
/// two pongs, and reconnects: a server that hangs with its connections open (a frozen
/// host, a partition that drops packets) is noticed within two to three of these.
/// async-nats's default, 60 s, left such a relay reporting ready and starting rounds
/// into the dead connection for 2–3 minutes, whose publishes could arrive after the
/// duplicate window as second copies.
const NATS_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Connects to NATS in the background (the relay's and the projector's connection): the
/// client exists even while NATS is down, and reconnects by itself.
pub async fn connect_nats(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    nats_options(url)
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(NATS_PING_INTERVAL)
        .connect(url)
        .await
        .with_context(|| unusable_url("nats.url", url))
}

/// Connect options carrying the credentials `url` holds: `user:password@` as user and
/// password, a bare `token@` (or `:token@`) as a token, each percent-decoded (as the
/// retired `nats` crate read them; an empty password is dropped by the URL parser, so
/// `user:@` is a token too). async-nats 0.51 parses them out of the URL but never sends them
/// (nats-io/nats.rs#1623), so every process refused by a NATS that asks for a password
/// retried for ever. An unparsable URL gets no credentials; connecting names it.
pub fn nats_options(url: &str) -> async_nats::ConnectOptions {
    let options = async_nats::ConnectOptions::new();
    let Ok(server) = url.parse::<async_nats::ServerAddr>() else {
        return options;
    };
    let decoded = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    match (server.username(), server.password()) {
        (Some(user), Some(password)) => options.user_and_password(decoded(user), decoded(password)),
        (Some(token), None) | (None, Some(token)) => options.token(decoded(token)),
        _ => options,
    }
}

/// Whether the client is connected to NATS now (it reconnects by itself): a request
/// made while it is not waits out its timeout.
pub fn nats_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// How often the recorder's histograms are drained into their buckets between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder; a second call (several services in
/// one test process) gets a handle of its own that nothing records into.
///
/// A histogram keeps every value recorded until upkeep folds them into its buckets,
/// which a scrape does and nothing else: a process nobody scraped grew by the values of
/// every request (14 MiB in 10 s of `/stats` at 45,000 requests a second). So a task
/// runs the upkeep every 5 s (`METRICS_UPKEEP_INTERVAL`). Must be called inside the runtime.
pub fn install_metrics() -> PrometheusHandle {
    const SECONDS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let builder = || {
        PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
                SECONDS,
            )
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_size".to_owned()),
                    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new())
    };
    let handle = builder()
        .install_recorder()
        .unwrap_or_else(|_| builder().build_recorder().handle());
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    handle
}

/// Serves each counter, with each label set given, at 0 from the start.
///
/// Prometheus sees no increase in a series whose first sample is already 1, so an
/// alert on `increase(projector_dlq_total[15m]) > 0` missed the first dead letter after
/// a start, and the one republish a NATS crash causes, if the series appeared only
/// then (Prometheus's instrumentation guide: "avoid missing metrics").
pub fn counters_from_zero(counters: &[(&'static str, &[(&'static str, &'static str)])]) {
    for &(name, labels) in counters {
        metrics::counter!(name, labels).increment(0);
    }
}

/// The TCP listener a server of these `http` settings serves on: its listen backlog
/// holds `http.max_connections` connections (the kernel caps it at
/// `net.core.somaxconn`), so as many clients may wait to be accepted as may be served at
/// once. `TcpListener::bind` asks for 128, as the standard library does: a burst of new
/// connections beyond that, while the accept loop is behind or at the cap, has its SYNs
/// dropped and each client retries only after a second.
pub fn listen(
    address: SocketAddr,
    http: &HttpSettings,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server may bind while old connections
    // to the port sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(u32::try_from(http.max_connections).unwrap_or(u32::MAX))
}

/// [`listen`] for a binary's start: when the address of the setting `key` cannot be
/// listened on (another process holds it, it is no address of this host), `program`
/// stops with status 2 and one line naming the key, its variable and the address
/// (`ingest: ingest.listen (PIPELINE__INGEST__LISTEN) 127.0.0.1:8080: address already
/// in use (os error 98)`), as an invalid setting stops it.
pub fn listen_or_exit(
    program: &str,
    key: &str,
    address: SocketAddr,
    http: &HttpSettings,
) -> tokio::net::TcpListener {
    listen(address, http).unwrap_or_else(|error| {
        eprintln!("{program}: {}", cannot_listen(key, address, &error));
        std::process::exit(2);
    })
}

/// "`key` (`VARIABLE`) `address`: `error`", the error's first letter lowercase.
fn cannot_listen(key: &str, address: SocketAddr, error: &std::io::Error) -> String {
    let error = error.to_string();
    let mut chars = error.chars();
    let error = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => error,
    };
    format!("{} {address}: {error}", key_and_variable(key))
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested, draining");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The log of a task whose attempts fail in series (a session it keeps opening again):
/// the first failure of a series is a WARN, the later ones are at debug, and the success
/// that ends a series is an INFO, so a long outage is one line and its end another.
#[derive(Debug, Default)]
pub struct FailureLog {
    failing: bool,
}

impl FailureLog {
    /// One failure, with `error`: `first` is the message of a series' first, `again` of
    /// the later ones.
    pub fn failed(&mut self, error: &str, first: &'static str, again: &'static str) {
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(error, "{again}");
        } else {
            tracing::warn!(error, "{first}");
        }
    }

    /// One success; `recovered` is logged when it ends a series.
    pub fn succeeded(&mut self, recovered: &'static str) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("{recovered}");
        }
    }

    /// Whether the last attempt failed.
    pub fn failing(&self) -> bool {
        self.failing
    }
}

/// Exponential backoff from 100 ms to 5 s that a shutdown interrupts. A failure that
/// comes `QUIET_STARTS_OVER` or more after the previous retry is a new outage, and its
/// delays start over: a loop whose work runs for long spells (a consume session, a
/// listening connection) need not reset the backoff itself.
#[derive(Debug)]
pub struct Backoff {
    delay: Duration,
    /// When the last delay handed out ends: the retry it was for.
    retry_at: Option<Instant>,
}

/// How long after a retry a failure counts as a new outage.
const QUIET_STARTS_OVER: Duration = Duration::from_secs(10);

impl Default for Backoff {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            retry_at: None,
        }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub async fn sleep(&mut self, shutdown: &CancellationToken) {
        Self::sleep_through(self.next_delay(), shutdown).await;
    }

    /// Waits `delay` (one [`Self::next_delay`] taken to be logged first), or until
    /// `shutdown`.
    pub async fn sleep_through(delay: Duration, shutdown: &CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// The delay to wait now; the next one is twice as long (at most 5 s).
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_at(Instant::now())
    }

    fn next_delay_at(&mut self, now: Instant) -> Duration {
        if self
            .retry_at
            .is_some_and(|retry_at| now.saturating_duration_since(retry_at) >= QUIET_STARTS_OVER)
        {
            self.reset();
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        self.retry_at = Some(now + delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_failure_names_the_key_its_variable_and_the_address_in_one_lowercase_line() {
        let address: SocketAddr = "127.0.0.1:8080".parse().expect("an address");
        let error = std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "Address already in use (os error 98)",
        );
        assert_eq!(
            cannot_listen("ingest.listen", address, &error),
            "ingest.listen (PIPELINE__INGEST__LISTEN) 127.0.0.1:8080: address already in use (os error 98)"
        );
    }

    #[test]
    fn delays_double_up_to_five_seconds_and_start_over_after_a_quiet_spell() {
        let mut backoff = Backoff::default();
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..8 {
            let delay = backoff.next_delay_at(now);
            delays.push(delay.as_millis());
            now += delay;
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // Failing again 9.9 s after the last retry is the same outage.
        now += Duration::from_millis(9_900);
        assert_eq!(backoff.next_delay_at(now), Duration::from_secs(5));
        // 10 s of work after a retry: a new outage starts from 100 ms.
        now += Duration::from_secs(5) + QUIET_STARTS_OVER;
        assert_eq!(backoff.next_delay_at(now), Duration::from_millis(100));
        assert_eq!(backoff.next_delay_at(now), Duration::from_millis(200));
    }
}

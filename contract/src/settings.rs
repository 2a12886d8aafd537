//! Layered configuration shared by every process (API.md §8).
//!
//! Layers, later wins: `config/default.toml`, `config/<APP_ENV>.toml` (`APP_ENV`
//! defaults to `dev`; both files must exist), then environment variables
//! `PIPELINE__<SECTION>__<KEY>`. The `config` directory is `APP_CONFIG_DIR` when set,
//! else the first `config/` holding a `default.toml` in the working directory or one of
//! its parents.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub nats: NatsSettings,
    pub redis: RedisSettings,
    pub ingest: IngestSettings,
    pub relay: RelaySettings,
    pub projector: ProjectorSettings,
    pub query: QuerySettings,
    pub auth: AuthSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    /// Connections each process keeps open at most.
    #[serde(deserialize_with = "integer")]
    pub pool_size: usize,
    /// How long a request waits for a connection before answering 503.
    #[serde(deserialize_with = "integer")]
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub consumer: String,
    /// How long the stream keeps events.
    #[serde(deserialize_with = "integer")]
    pub max_age_secs: u64,
    /// JetStream's window for dropping a republished `Nats-Msg-Id`.
    #[serde(deserialize_with = "integer")]
    pub duplicate_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    #[serde(deserialize_with = "integer")]
    pub max_body_bytes: usize,
    /// Largest body of `POST /v1/telemetry/batch`.
    #[serde(deserialize_with = "integer")]
    pub max_batch_body_bytes: usize,
    /// Most bytes of request bodies held at once, across every request; a body that
    /// finds them held is answered 503.
    #[serde(deserialize_with = "integer")]
    pub max_body_bytes_held: usize,
    /// How far in the future `recorded_at` may be.
    #[serde(deserialize_with = "integer")]
    pub max_future_secs: u64,
    /// How far in the past `recorded_at` may be.
    #[serde(deserialize_with = "integer")]
    pub max_age_secs: u64,
    /// How long an idempotency key is remembered.
    #[serde(deserialize_with = "integer")]
    pub idempotency_retention_secs: u64,
    /// How long readings are kept in PostgreSQL, by receive time (0: for good).
    #[serde(deserialize_with = "integer")]
    pub reading_retention_secs: u64,
    /// Most readings committed in one group-commit transaction.
    #[serde(deserialize_with = "integer")]
    pub commit_batch_max: usize,
    /// Group-commit transactions in flight at once.
    #[serde(deserialize_with = "integer")]
    pub commit_concurrency: usize,
    /// Readings that must be waiting before a group commit starts beside one already in
    /// flight (fewer wait for it to return).
    #[serde(deserialize_with = "integer")]
    pub commit_parallel_min: usize,
    /// After a group commit of several readings, a batch under half of
    /// `commit_parallel_min` starts no sooner than this after it (commits then gather
    /// more readings each); 0: off.
    #[serde(deserialize_with = "integer")]
    pub commit_interval_ms: u64,
    /// After a NOTIFY that covered several outbox rows, the next goes out no sooner than
    /// this after it (the relay's rounds then gather more rows each); 0: off.
    #[serde(deserialize_with = "integer")]
    pub notify_interval_ms: u64,
    /// Requests waiting for a commit before new ones are turned away with 503.
    #[serde(deserialize_with = "integer")]
    pub queue_capacity: usize,
    /// Longest time a request may take end to end.
    #[serde(deserialize_with = "integer")]
    pub request_timeout_ms: u64,
    /// Readings per second each device may send (0: no limit).
    #[serde(deserialize_with = "integer")]
    pub rate_limit_per_second: u32,
    /// Readings a device may send at once before the rate applies.
    #[serde(deserialize_with = "integer")]
    pub rate_limit_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    pub admin_listen: SocketAddr,
    /// Outbox rows claimed, published and marked in one transaction.
    #[serde(deserialize_with = "integer")]
    pub batch_size: i64,
    /// Rounds one relay runs at once: a second claims new rows while the first marks
    /// its own.
    #[serde(deserialize_with = "integer")]
    pub rounds_in_flight: usize,
    /// After a round that found several rows, the next starts no sooner than this after
    /// it started (fewer, bigger rounds under load); 0 starts every round at once.
    #[serde(deserialize_with = "integer")]
    pub round_interval_ms: u64,
    /// How often the relay looks for work when no NOTIFY arrived.
    #[serde(deserialize_with = "integer")]
    pub poll_interval_ms: u64,
    /// How long published outbox rows are kept (for republishing after a NATS host crash).
    #[serde(deserialize_with = "integer")]
    pub published_retention_secs: u64,
    /// Rows deleted per pruning statement.
    #[serde(deserialize_with = "integer")]
    pub prune_batch: i64,
    /// How often published outbox rows and expired idempotency keys are pruned.
    #[serde(deserialize_with = "integer")]
    pub prune_interval_ms: u64,
    /// How often the relay checks that the stream still holds the newest message it
    /// published (and republishes what a NATS host crash lost); also after a reconnect.
    #[serde(deserialize_with = "integer")]
    pub stream_check_interval_ms: u64,
    /// PostgreSQL ends a relay session that stays idle inside a transaction this long
    /// (a paused or hung relay), so that its claimed rows go to another relay.
    #[serde(deserialize_with = "integer")]
    pub idle_in_transaction_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorSettings {
    pub admin_listen: SocketAddr,
    /// Messages applied in one Redis pipeline.
    #[serde(deserialize_with = "integer")]
    pub batch_size: usize,
    /// Batches being applied at once: while Redis works on one, the next is sent.
    #[serde(deserialize_with = "integer")]
    pub batches_in_flight: usize,
    /// How long JetStream waits for an ack before redelivering.
    #[serde(deserialize_with = "integer")]
    pub ack_wait_secs: u64,
    /// How long an applied event id is remembered to skip redeliveries.
    #[serde(deserialize_with = "integer")]
    pub dedup_horizon_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySettings {
    pub listen: SocketAddr,
    /// Longest time a request to the query API may take end to end, its token look-up
    /// included; past it the client gets a 503 to retry instead of waiting on a stalled
    /// database.
    #[serde(deserialize_with = "integer")]
    pub request_timeout_ms: u64,
}

/// Limits of every HTTP connection of ingest and query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// A request's head — and, on a kept-alive connection, the next request — must
    /// arrive within this; slow or idle clients are disconnected after it.
    #[serde(deserialize_with = "integer")]
    pub header_read_timeout_ms: u64,
    /// Largest request line plus headers (at least 8192).
    #[serde(deserialize_with = "integer")]
    pub max_header_bytes: usize,
    /// Connections a listener serves at once; one more waits in the process and as many
    /// again in the kernel's listen backlog (the listener asks for that size) until one
    /// closes, so memory stays bounded whatever clients do. The one waiting takes the
    /// place of the connection idle longest (its last answer sent 1 s ago, no byte since).
    #[serde(deserialize_with = "integer")]
    pub max_connections: usize,
}

/// Who may do what (API.md §5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Require bearer tokens on ingest and query (on in `prod`, off in `dev`).
    pub enabled: bool,
    /// Refuse to start unless the PostgreSQL, NATS and Redis URLs carry credentials
    /// (on in `prod`): a production pipeline never talks to an open server.
    pub service_credentials_required: bool,
    /// How long a verified (or unknown) token is remembered; revocation takes effect
    /// within this time.
    #[serde(deserialize_with = "integer")]
    pub cache_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `ingest=debug,info`.
    pub level: String,
    /// How long ingest, after SIGTERM, once its HTTP server has stopped, waits for its
    /// last group commits before it exits. The other processes do not read it.
    #[serde(deserialize_with = "integer")]
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// An integer setting's value, refusing what the config crate would turn into one: it
/// rounds a float (`rate_limit_per_second = -1.0` or `0.4` became 0, which turns the rate
/// limit off) and reads `true`, `"on"` and `"yes"` as 1, `false`, `"off"` and `"no"` as 0.
/// A file's integer, or a variable's text holding a whole number in the type's range, is
/// taken; anything else stops the start naming the key.
fn integer<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i128>,
{
    struct Integer<T>(std::marker::PhantomData<T>);

    impl<T: TryFrom<i128>> serde::de::Visitor<'_> for Integer<T> {
        type Value = T;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(
                formatter,
                "a whole number that fits {}",
                std::any::type_name::<T>()
            )
        }

        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<T, E> {
            self.visit_i128(value.into())
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<T, E> {
            self.visit_i128(value.into())
        }

        fn visit_i128<E: serde::de::Error>(self, value: i128) -> Result<T, E> {
            T::try_from(value).map_err(|_| {
                E::invalid_value(serde::de::Unexpected::Other(&value.to_string()), &self)
            })
        }

        fn visit_u128<E: serde::de::Error>(self, value: u128) -> Result<T, E> {
            let whole = i128::try_from(value).map_err(|_| {
                E::invalid_value(serde::de::Unexpected::Other(&value.to_string()), &self)
            })?;
            self.visit_i128(whole)
        }

        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<T, E> {
            let whole = value
                .parse::<i128>()
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(value), &self))?;
            self.visit_i128(whole)
        }
    }

    deserializer.deserialize_any(Integer(std::marker::PhantomData))
}

/// Longest duration any setting may hold: 100 years, in seconds.
///
/// Each duration ends up added to a clock (`recorded_at` is checked against
/// now + `ingest.max_future_secs`), in a PostgreSQL interval or in JetStream's
/// nanoseconds, where a value with a few zeros too many overflows: every reading with a
/// `recorded_at` then lost its answer to a panic. Refused at start instead, naming the key.
pub const DURATION_MAX_SECS: u64 = 100 * 365 * 24 * 60 * 60;

/// Most seconds `ingest.max_future_secs` may hold: 12 hours.
///
/// The projector counts no event dated more than twice that after the time its stream
/// stored it ([`crate::event::LEAD_MAX`]), so ingest must never accept one.
pub const FUTURE_MAX_SECS: u64 = 12 * 60 * 60;

/// Most of anything that runs at once (connections in a pool, group commits, relay
/// rounds, projector batches) and most messages in one projector batch.
pub const CONCURRENCY_MAX: u64 = 10_000;

/// Most readings, rows or connections any other count may be.
pub const SIZE_MAX: u64 = 1_000_000;

/// Most readings in one group commit. Its statement carries each reading whole, up to
/// about 6.5 KB of the largest valid one, and PostgreSQL refuses a protocol message or
/// an array over 1 GB: past about 160,000 such readings every commit of that size
/// failed whole, and the retries made it again.
pub const GROUP_MAX: u64 = 10_000;

/// Fewest milliseconds `relay.idle_in_transaction_timeout_ms` may hold. A relay round
/// publishes none of its claim once the claim is older than this (and PostgreSQL ends
/// the session then anyway), so the claim, its publishes and the mark must fit in it:
/// at 1 every round lapsed before its first publish and the relay marked nothing, for
/// good. The check of remembered stream sequences a round may make under its claim
/// takes up to a second less than this (at most 4 s; the relay's
/// `remembered_check_deadline`). Below
/// the relay's 5 s ack deadline a round waiting on slow acks is cut off and its rows
/// published again, which JetStream's duplicate window drops.
pub const IDLE_IN_TRANSACTION_MIN_MS: u64 = 3000;

/// Smallest limit `ingest.max_body_bytes` and `ingest.max_batch_body_bytes` may have.
///
/// The largest valid reading (a 64-character device id, 32 metrics of 64-character names,
/// the longest numbers and timestamp), written without white space, is about 3 KiB, and
/// a batch holding it as its one item a little more: so every device's reading fits.
/// A limit of 0 started ingest and answered every POST 413.
pub const BODY_MIN_BYTES: usize = 4096;

/// Most `ingest.max_body_bytes_held` may be: far past any use (ingest cuts it to the
/// most tokio's semaphore holds on a 32-bit target).
pub const BODY_HELD_MAX_BYTES: u64 = 1 << 40;

/// The environment variable that sets `key` (`ingest.max_future_secs` →
/// `PIPELINE__INGEST__MAX_FUTURE_SECS`), as API.md §8 spells them.
pub fn environment_variable(key: &str) -> String {
    format!("PIPELINE__{}", key.to_uppercase().replace('.', "__"))
}

/// "`key` (`VARIABLE`)": how every message about a setting names it.
pub fn key_and_variable(key: &str) -> String {
    format!("{key} ({})", environment_variable(key))
}

/// "connecting to `server` at `url`", with the URL's secrets hidden ([`redacted`]): the
/// context of every failed connection, so that none prints a password.
pub fn connecting_to(server: &str, url: &str) -> String {
    format!("connecting to {server} at {}", redacted(url))
}

/// The message for a server URL its client library cannot use: names the key and the
/// URL with its secrets hidden ([`redacted`]).
pub fn unusable_url(key: &str, url: &str) -> String {
    format!("{} {} is not usable", key_and_variable(key), redacted(url))
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct SettingsError(String);

impl Settings {
    /// Loads the layers for `APP_ENV` from the process environment.
    pub fn load() -> Result<Self, SettingsError> {
        let directory = match std::env::var_os("APP_CONFIG_DIR") {
            Some(directory) => PathBuf::from(directory),
            None => find_config_dir().ok_or_else(|| {
                SettingsError("no config/default.toml in the working directory or its parents (set APP_CONFIG_DIR)".to_owned())
            })?,
        };
        let environment = match std::env::var("APP_ENV") {
            Ok(environment) => environment,
            Err(std::env::VarError::NotPresent) => "dev".to_owned(),
            Err(std::env::VarError::NotUnicode(environment)) => {
                return Err(SettingsError(format!(
                    "APP_ENV {environment:?} is not UTF-8"
                )))
            }
        };
        Self::load_from(&directory, &environment)
    }

    /// Loads `default.toml` and `<environment>.toml` from `directory`, then the environment.
    pub fn load_from(directory: &Path, environment: &str) -> Result<Self, SettingsError> {
        let settings = Self::layers(directory, environment)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The layers merged, not yet validated. Both files must exist: an `APP_ENV` without
    /// its file (`production`, `PROD`, `"prod "`) used to apply `default.toml` alone, so a
    /// production deployment ran with tokens off and nothing said so.
    fn layers(directory: &Path, environment: &str) -> Result<Self, SettingsError> {
        let defaults = directory.join("default.toml");
        if !defaults.is_file() {
            return Err(SettingsError(format!(
                "{} does not exist (APP_CONFIG_DIR names the config directory)",
                defaults.display()
            )));
        }
        let environment_file = directory.join(format!("{environment}.toml"));
        if !environment_file.is_file() {
            return Err(SettingsError(format!(
                "APP_ENV {environment:?} has no config file: {} does not exist (APP_ENV may be {})",
                environment_file.display(),
                environments(directory).join(", ")
            )));
        }
        config::Config::builder()
            .add_source(config::File::from(defaults))
            .add_source(config::File::from(environment_file))
            .add_source(
                config::Environment::with_prefix("PIPELINE")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .and_then(|layers| layers.try_deserialize())
            .map_err(one_line)
    }

    /// Checks every rule [`Settings::load_from`] checks. The services' entry points call
    /// it too, so settings built or changed in code (a test's, an embedding program's)
    /// are held to the rules the config files are.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid =
            |key: &str, rule: &str| Err(SettingsError(format!("{} {rule}", key_and_variable(key))));
        let token = |text: &str| {
            !text.is_empty()
                && text
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
        };
        if !token(&self.nats.stream) {
            return invalid("nats.stream", "must be letters, digits, '_' or '-'");
        }
        if !token(&self.nats.consumer) {
            return invalid("nats.consumer", "must be letters, digits, '_' or '-'");
        }
        if self.redis.prefix.contains(['{', '}']) {
            return invalid(
                "redis.prefix",
                "may not contain '{' or '}' (they mark hash tags)",
            );
        }
        for (key, url, schemes) in [
            (
                "database.url",
                &self.database.url,
                &["postgres://", "postgresql://"][..],
            ),
            ("nats.url", &self.nats.url, &["nats://", "tls://"][..]),
            (
                "redis.url",
                &self.redis.url,
                &["redis://", "rediss://", "unix://"][..],
            ),
        ] {
            if !schemes.iter().any(|scheme| url.starts_with(scheme)) {
                return invalid(key, &format!("must start with {}", schemes.join(" or ")));
            }
            if let Some(asked) = tls_asked_for(url) {
                return invalid(
                    key,
                    &format!(
                        "asks for TLS ({asked}), which these binaries do not speak to PostgreSQL or Redis: use a plain connection on a private network (README, Securing a deployment)"
                    ),
                );
            }
            if self.auth.service_credentials_required && !carries_credentials(url) {
                return invalid(
                    key,
                    "carries no credentials (user:password@ or a NATS token@), which auth.service_credentials_required demands",
                );
            }
        }
        for (key, value, most) in self.counts() {
            if value == 0 {
                return invalid(key, "must be at least 1");
            }
            if value > most {
                return invalid(
                    key,
                    &format!(
                        "must be at most {most} (far past any use: larger values made the process panic, abort or run out of memory at start)"
                    ),
                );
            }
        }
        for (key, bytes) in [
            ("ingest.max_body_bytes", self.ingest.max_body_bytes),
            (
                "ingest.max_batch_body_bytes",
                self.ingest.max_batch_body_bytes,
            ),
        ] {
            if bytes < BODY_MIN_BYTES {
                return invalid(
                    key,
                    &format!(
                        "must be at least {BODY_MIN_BYTES} (every valid reading written without white space fits in that; a smaller limit answers some with 413)"
                    ),
                );
            }
        }
        let largest_body = self
            .ingest
            .max_body_bytes
            .max(self.ingest.max_batch_body_bytes);
        if self.ingest.max_body_bytes_held < largest_body {
            return invalid(
                "ingest.max_body_bytes_held",
                &format!(
                    "must be at least ingest.max_body_bytes and ingest.max_batch_body_bytes ({largest_body}): a body that large would never find room"
                ),
            );
        }
        if self.ingest.max_body_bytes_held as u64 > BODY_HELD_MAX_BYTES {
            return invalid(
                "ingest.max_body_bytes_held",
                &format!("must be at most {BODY_HELD_MAX_BYTES} (1 TiB)"),
            );
        }
        if self.http.max_header_bytes < 8192 {
            return invalid("http.max_header_bytes", "must be at least 8192");
        }
        if self.relay.idle_in_transaction_timeout_ms > i32::MAX as u64 {
            return invalid(
                "relay.idle_in_transaction_timeout_ms",
                &format!(
                    "must be at most {} (PostgreSQL's idle_in_transaction_session_timeout is a 32-bit count of milliseconds)",
                    i32::MAX
                ),
            );
        }
        for (key, value, zero_would) in self.durations() {
            if let (0, Some(zero_would)) = (value, zero_would) {
                return invalid(key, &format!("must be at least 1 (0 {zero_would})"));
            }
            let seconds = if key.ends_with("_ms") {
                value / 1000
            } else {
                value
            };
            if seconds > DURATION_MAX_SECS {
                return invalid(
                    key,
                    &format!("must be at most 100 years ({DURATION_MAX_SECS} s)"),
                );
            }
        }
        if self.relay.idle_in_transaction_timeout_ms < IDLE_IN_TRANSACTION_MIN_MS {
            return invalid(
                "relay.idle_in_transaction_timeout_ms",
                &format!(
                    "must be at least {IDLE_IN_TRANSACTION_MIN_MS}: a round's claim, its check of remembered stream sequences, its publishes and its mark must fit in it (with 1 every round lapsed before its first publish and the relay marked nothing)"
                ),
            );
        }
        if self.ingest.commit_parallel_min >= self.ingest.queue_capacity {
            return invalid(
                "ingest.commit_parallel_min",
                &format!(
                    "must be less than ingest.queue_capacity ({}): a commit in flight holds room in the queue, so that many readings never wait beside it and no commit of fewer than ingest.commit_batch_max would start beside one in flight",
                    self.ingest.queue_capacity
                ),
            );
        }
        if self.ingest.max_future_secs > FUTURE_MAX_SECS {
            return invalid(
                "ingest.max_future_secs",
                &format!(
                    "must be at most 12 hours ({FUTURE_MAX_SECS} s): the projector dead-letters a reading dated more than twice that after its stream stored it"
                ),
            );
        }
        if self.projector.dedup_horizon_secs <= self.projector.ack_wait_secs {
            return invalid(
                "projector.dedup_horizon_secs",
                &format!(
                    "must exceed projector.ack_wait_secs ({} s): an applied event whose ack was lost comes back after the ack wait, and past the horizon it would count twice",
                    self.projector.ack_wait_secs
                ),
            );
        }
        // A relay paused mid-round (ARCHITECTURE.md, "Relay sessions") has published rows
        // it cannot mark: PostgreSQL ends its session after the idle timeout, and another
        // relay claims and publishes them again by its next poll at the latest (no NOTIFY
        // announces released rows). Past the duplicate window JetStream keeps that second
        // copy, and only the projector's dedup horizon keeps it from counting twice.
        let republish_ms = self
            .relay
            .idle_in_transaction_timeout_ms
            .saturating_add(self.relay.poll_interval_ms);
        let millis = |secs: u64| secs.saturating_mul(1000);
        if republish_ms >= millis(self.nats.duplicate_window_secs)
            && millis(self.projector.dedup_horizon_secs) <= republish_ms
        {
            return invalid(
                "projector.dedup_horizon_secs",
                &format!(
                    "must exceed relay.idle_in_transaction_timeout_ms plus relay.poll_interval_ms ({republish_ms} ms) while they outlast nats.duplicate_window_secs ({} s): a relay paused mid-round has its rows published again by another relay that much later, JetStream keeps that second copy, and past the horizon the projector would count it twice",
                    self.nats.duplicate_window_secs
                ),
            );
        }
        if self.nats.max_age_secs != 0 && self.nats.duplicate_window_secs > self.nats.max_age_secs {
            return invalid(
                "nats.duplicate_window_secs",
                &format!(
                    "must be at most nats.max_age_secs ({} s): JetStream refuses a duplicate window longer than the stream keeps its messages",
                    self.nats.max_age_secs
                ),
            );
        }
        Ok(())
    }

    /// Every count with its ceiling; each must be 1 to that ceiling (a negative row count
    /// reads as 0). `usize::MAX` queue slots or connections panicked in
    /// tokio's semaphore at start, a pool of 10^12 connections aborted asking for 224 TB,
    /// and `u64::MAX` relay rounds ran the relay out of memory. Concurrency (connections,
    /// commits, rounds, batches in flight) and the projector's batch, whose room is set
    /// aside in full for every batch, stop at [`CONCURRENCY_MAX`], the group commit at
    /// [`GROUP_MAX`], the other sizes at [`SIZE_MAX`].
    fn counts(&self) -> [(&'static str, u64, u64); 12] {
        let count = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
        let rows = |value: i64| u64::try_from(value).unwrap_or(0);
        [
            (
                "database.pool_size",
                count(self.database.pool_size),
                CONCURRENCY_MAX,
            ),
            (
                "ingest.commit_concurrency",
                count(self.ingest.commit_concurrency),
                CONCURRENCY_MAX,
            ),
            (
                "relay.rounds_in_flight",
                count(self.relay.rounds_in_flight),
                CONCURRENCY_MAX,
            ),
            (
                "projector.batches_in_flight",
                count(self.projector.batches_in_flight),
                CONCURRENCY_MAX,
            ),
            (
                "projector.batch_size",
                count(self.projector.batch_size),
                CONCURRENCY_MAX,
            ),
            (
                "ingest.queue_capacity",
                count(self.ingest.queue_capacity),
                SIZE_MAX,
            ),
            (
                "ingest.commit_batch_max",
                count(self.ingest.commit_batch_max),
                GROUP_MAX,
            ),
            (
                "ingest.commit_parallel_min",
                count(self.ingest.commit_parallel_min),
                SIZE_MAX,
            ),
            ("relay.batch_size", rows(self.relay.batch_size), SIZE_MAX),
            ("relay.prune_batch", rows(self.relay.prune_batch), SIZE_MAX),
            (
                "http.max_connections",
                count(self.http.max_connections),
                SIZE_MAX,
            ),
            (
                "ingest.rate_limit_burst",
                u64::from(self.ingest.rate_limit_burst),
                SIZE_MAX,
            ),
        ]
    }

    /// Every duration setting (`*_secs` or `*_ms`, in its own unit), with what 0 would
    /// do where 0 is refused; `None` where 0 is allowed (an off switch, or a bound of
    /// nothing). Each refused zero started a service that then failed without a word.
    fn durations(&self) -> [(&'static str, u64, Option<&'static str>); 22] {
        [
            ("nats.max_age_secs", self.nats.max_age_secs, None),
            (
                "nats.duplicate_window_secs",
                self.nats.duplicate_window_secs,
                Some("would be JetStream's default of 2 minutes"),
            ),
            ("ingest.max_future_secs", self.ingest.max_future_secs, None),
            (
                "ingest.max_age_secs",
                self.ingest.max_age_secs,
                Some("would refuse every reading that carries a recorded_at"),
            ),
            (
                "ingest.idempotency_retention_secs",
                self.ingest.idempotency_retention_secs,
                Some("would forget every key at the next prune, so a retry would count twice; unlike ingest.reading_retention_secs, 0 does not mean for good"),
            ),
            (
                "ingest.reading_retention_secs",
                self.ingest.reading_retention_secs,
                None,
            ),
            (
                "relay.published_retention_secs",
                self.relay.published_retention_secs,
                Some("would prune published rows as soon as a stream check saw them held, leaving nothing to republish when a NATS host crash loses the stream's tail; unlike ingest.reading_retention_secs, 0 does not mean for good"),
            ),
            (
                "projector.ack_wait_secs",
                self.projector.ack_wait_secs,
                Some("would be JetStream's default of 30 s"),
            ),
            (
                "projector.dedup_horizon_secs",
                self.projector.dedup_horizon_secs,
                None,
            ),
            ("auth.cache_ttl_secs", self.auth.cache_ttl_secs, None),
            ("log.shutdown_grace_secs", self.log.shutdown_grace_secs, None),
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
                Some("would time out every wait for PostgreSQL at once: ingest's NOTIFY after each commit did"),
            ),
            ("ingest.commit_interval_ms", self.ingest.commit_interval_ms, None),
            ("ingest.notify_interval_ms", self.ingest.notify_interval_ms, None),
            (
                "ingest.request_timeout_ms",
                self.ingest.request_timeout_ms,
                Some("would answer every POST 503"),
            ),
            (
                "query.request_timeout_ms",
                self.query.request_timeout_ms,
                Some("would answer every query API request 503"),
            ),
            ("relay.round_interval_ms", self.relay.round_interval_ms, None),
            (
                "relay.poll_interval_ms",
                self.relay.poll_interval_ms,
                Some("would poll PostgreSQL without a pause: 13% of a core while idle"),
            ),
            ("relay.prune_interval_ms", self.relay.prune_interval_ms, None),
            (
                "relay.stream_check_interval_ms",
                self.relay.stream_check_interval_ms,
                Some("would fetch a message from the stream in every round"),
            ),
            (
                "relay.idle_in_transaction_timeout_ms",
                self.relay.idle_in_transaction_timeout_ms,
                Some("would turn the timeout off"),
            ),
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
                Some("would close, unanswered, a connection whose request head arrives in more than one packet"),
            ),
        ]
    }

    /// [`Self::validate`], and what ingest alone asks of the settings: a pool with a
    /// connection for the look-ups on a request's path (tokens, aged retries) beside its
    /// `ingest.commit_concurrency` group commits. With no more than the commits, the
    /// look-ups took one of theirs, and a flood of unknown tokens held commits up into
    /// 503s. The relay and the projector share the key and need no such room.
    pub fn validate_for_ingest(&self) -> Result<(), SettingsError> {
        self.validate()?;
        if self.database.pool_size <= self.ingest.commit_concurrency {
            return Err(SettingsError(format!(
                "{} must exceed ingest.commit_concurrency ({}) in ingest: the look-ups on a request's path need a connection beside the group commits",
                key_and_variable("database.pool_size"),
                self.ingest.commit_concurrency
            )));
        }
        Ok(())
    }

    /// The request deadline of the ingest service.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.ingest.request_timeout_ms)
    }

    /// The request deadline of the query service.
    pub fn query_request_timeout(&self) -> Duration {
        Duration::from_millis(self.query.request_timeout_ms)
    }

    /// How long ingest waits for its last group commits after SIGTERM
    /// (`log.shutdown_grace_secs`).
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.log.shutdown_grace_secs)
    }
}

/// The config crate's error as one line (API.md §8). A file that does not parse is
/// named with toml's position and reason but not the text of its line, which toml
/// quotes under a gutter on lines of their own: that line may hold a password in a
/// server URL, and the lines broke the one-line report.
fn one_line(error: config::ConfigError) -> SettingsError {
    let text = match error {
        config::ConfigError::FileParse { uri, cause } => {
            let cause = cause.to_string();
            // `  |`, `3 | <the line>`, `  |     ^`: toml's quote of the file.
            let quoted = |line: &str| {
                line.split_once('|').is_some_and(|(gutter, _)| {
                    gutter
                        .trim()
                        .chars()
                        .all(|character| character.is_ascii_digit())
                })
            };
            let told: Vec<&str> = cause
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !quoted(line))
                .collect();
            let file = uri.map_or_else(String::new, |uri| format!(" in {uri}"));
            format!("{}{file}", told.join(": "))
        }
        error => error.to_string(),
    };
    SettingsError(text.replace(['\n', '\r'], " "))
}

/// The environments `directory` has a file for (`dev`, `prod`, ...), sorted.
fn environments(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let environment = name.strip_suffix(".toml")?;
            (environment != "default").then(|| environment.to_owned())
        })
        .collect();
    names.sort();
    names
}

fn find_config_dir() -> Option<PathBuf> {
    let start = std::env::current_dir().ok()?;
    start
        .ancestors()
        .map(|directory| directory.join("config"))
        .find(|directory| directory.join("default.toml").is_file())
}

/// Whether a server URL names a password (`user:password@`, `:password@`), a NATS
/// token (`token@`), or a PostgreSQL `password=` parameter; a Unix socket needs none.
fn carries_credentials(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    scheme == "unix"
        || userinfo_secret(url).is_some_and(|(_, secret, _)| !secret.is_empty())
        || rest.split_once('?').is_some_and(|(_, query)| {
            query.split('&').any(|pair| {
                pair.strip_prefix("password=")
                    .is_some_and(|password| !password.is_empty())
            })
        })
}

/// What in a PostgreSQL or Redis URL demands TLS (`rediss://`, `sslmode=require`,
/// `verify-ca` or `verify-full`, `sslnegotiation=direct`), which the binaries are built without: tokio-postgres
/// connects with `NoTls` and redis-rs has no TLS feature, so such a URL would pass the
/// settings and then fail every connection (`sslmode=prefer`, libpq's default, falls
/// back to a plain one). NATS speaks TLS (`tls://`), so its URL asks for nothing here.
fn tls_asked_for(url: &str) -> Option<&str> {
    if url.starts_with("rediss://") {
        return Some("rediss://");
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return None;
    }
    let (_, query) = url.split_once('?')?;
    query.split('&').find(|pair| {
        matches!(
            *pair,
            "sslmode=require"
                | "sslmode=verify-ca"
                | "sslmode=verify-full"
                | "sslnegotiation=direct"
        )
    })
}

/// A server URL fit for a message or a log: each password, NATS token and `password=`
/// parameter replaced by `***` (`nats://relay:***@host:4222`), the rest kept so that the
/// message still names the server. With `auth.service_credentials_required` every
/// configured URL carries a secret, so no error or log line may print one as it stands,
/// also when it is malformed: a password holding `/`, `?` or `#` makes the URL
/// unparsable, and the message saying so shows it. No URL setting is a list (async-nats
/// parses one URL per string), so a `,` is no separator either.
pub fn redacted(url: &str) -> String {
    let hidden = match userinfo_secret(url) {
        Some((before, _, after)) => format!("{before}***{after}"),
        None => url.to_owned(),
    };
    without_password_values(&hidden)
}

/// The secret in a URL's userinfo, as (the text before it, it, the text after it): the
/// password of `user:password@` or `:password@`, or a NATS token (`token@`; elsewhere a
/// user name alone is no secret). `None` when the userinfo holds none.
///
/// The userinfo runs from `://` to the last `@`, since no host holds one: a password
/// with `@`, `/`, `?`, `#` or `,` in it (written unescaped) is then hidden whole. An `@`
/// in the path or the query hides more than the secret, never less.
fn userinfo_secret(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (userinfo, _) = rest.rsplit_once('@')?;
    let secret_start = match userinfo.find(':') {
        Some(colon) => colon + 1,
        // A NATS URL's bare user is a token (`ingest::bootstrap::nats_options`).
        None if matches!(scheme, Some("nats" | "tls" | "ws" | "wss")) => 0,
        None => return None,
    };
    let offset = url.len() - rest.len();
    let (start, end) = (offset + secret_start, offset + userinfo.len());
    Some((&url[..start], &url[start..end], &url[end..]))
}

/// `text` with the value of each `password=` (a URL parameter, or a key of a libpq
/// connection string) replaced by `***`.
fn without_password_values(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(KEY) {
        let value_start = at + KEY.len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value_len = rest[value_start..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .unwrap_or(rest.len() - value_start);
        rest = &rest[value_start + value_len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
    }

    #[test]
    fn shipped_defaults_load_and_match_the_api_table() {
        let settings = Settings::load_from(&config_dir(), "dev").expect("defaults load");
        assert_eq!(
            settings.database.url,
            "postgres://postgres@127.0.0.1:5432/telemetry"
        );
        assert_eq!(settings.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(settings.nats.stream, "TELEMETRY");
        assert_eq!(settings.nats.consumer, "projector");
        assert_eq!(settings.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(settings.redis.prefix, "");
        assert_eq!(settings.ingest.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.query.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(settings.relay.admin_listen.to_string(), "127.0.0.1:9091");
        assert_eq!(
            settings.projector.admin_listen.to_string(),
            "127.0.0.1:9092"
        );
    }

    /// The shipped defaults with `key` set to `value`, as a layer would set it.
    fn defaults_with(key: &str, value: u64) -> Settings {
        config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")))
            .set_override(key, value)
            .and_then(|builder| builder.build())
            .and_then(|layers| layers.try_deserialize())
            .expect("the defaults with one override deserialize")
    }

    #[test]
    fn a_duration_past_100_years_is_refused_naming_its_key_and_variable() {
        let defaults = Settings::load_from(&config_dir(), "dev").expect("defaults load");
        for (key, _, _) in defaults.durations() {
            let unit = if key.ends_with("_ms") { 1000 } else { 1 };
            if key != "relay.idle_in_transaction_timeout_ms" {
                // Allowed by the bound; a rule between two settings may still refuse it
                // (no dedup horizon can outlast an ack wait of 100 years).
                let longest = defaults_with(key, DURATION_MAX_SECS * unit).validate();
                assert!(
                    longest.map_or_else(|error| !error.to_string().contains("100 years"), |_| true),
                    "100 years of {key} is allowed"
                );
            }
            let error = defaults_with(key, (DURATION_MAX_SECS + 1) * unit)
                .validate()
                .expect_err("over 100 years");
            assert!(
                error.to_string().contains(&key_and_variable(key)),
                "{error}"
            );
        }
        assert_eq!(
            environment_variable("ingest.max_future_secs"),
            "PIPELINE__INGEST__MAX_FUTURE_SECS"
        );
        let error = defaults_with("relay.idle_in_transaction_timeout_ms", 1 << 31)
            .validate()
            .expect_err("past PostgreSQL's range");
        assert!(error.to_string().contains("at most 2147483647"), "{error}");
    }

    #[test]
    fn a_count_of_zero_is_refused_naming_its_key() {
        let defaults = Settings::load_from(&config_dir(), "dev").expect("defaults load");
        let mut settings = defaults.clone();
        settings.projector.batches_in_flight = 0;
        let error = settings.validate().expect_err("0 batches in flight");
        assert!(
            error.to_string().contains("projector.batches_in_flight"),
            "{error}"
        );
        let mut settings = defaults.clone();
        settings.relay.rounds_in_flight = 0;
        let error = settings.validate().expect_err("0 rounds in flight");
        assert!(
            error.to_string().contains("relay.rounds_in_flight"),
            "{error}"
        );
        // A burst of 0 is no off switch (the rate is): it would let nothing through.
        let mut settings = defaults;
        settings.ingest.rate_limit_burst = 0;
        let error = settings.validate().expect_err("a burst of 0");
        assert!(
            error.to_string().contains("ingest.rate_limit_burst"),
            "{error}"
        );
    }

    #[test]
    fn a_zero_that_is_no_off_switch_is_refused_saying_what_it_would_do() {
        for (key, would) in [
            ("database.connect_timeout_ms", "every wait for PostgreSQL"),
            ("nats.duplicate_window_secs", "JetStream's default"),
            ("ingest.idempotency_retention_secs", "count twice"),
            ("ingest.request_timeout_ms", "every POST 503"),
            ("query.request_timeout_ms", "every query API request 503"),
            ("relay.poll_interval_ms", "without a pause"),
            ("projector.ack_wait_secs", "JetStream's default of 30 s"),
            ("http.header_read_timeout_ms", "unanswered"),
            (
                "ingest.max_age_secs",
                "every reading that carries a recorded_at",
            ),
            ("relay.published_retention_secs", "nothing to republish"),
        ] {
            let error = defaults_with(key, 0).validate().expect_err(key);
            let message = error.to_string();
            assert!(
                message.contains(&key_and_variable(key)) && message.contains("at least 1"),
                "{message}"
            );
            assert!(message.contains(would), "{message}");
        }
        // Where 0 is an off switch, it stays one.
        for key in [
            "ingest.commit_interval_ms",
            "ingest.notify_interval_ms",
            "ingest.rate_limit_per_second",
            "ingest.reading_retention_secs",
            "relay.round_interval_ms",
            "nats.max_age_secs",
            "auth.cache_ttl_secs",
        ] {
            let settings = defaults_with(key, 0);
            assert!(settings.validate().is_ok(), "0 turns {key} off");
        }
    }

    #[test]
    fn the_query_request_deadline_is_10_s_by_default_and_refused_at_0() {
        for environment in ["dev", "prod"] {
            let settings = Settings::layers(&config_dir(), environment).expect("layers");
            assert_eq!(settings.query.request_timeout_ms, 10_000, "{environment}");
            assert_eq!(settings.query_request_timeout(), Duration::from_secs(10));
        }
        let error = defaults_with("query.request_timeout_ms", 0)
            .validate()
            .expect_err("a deadline of nothing");
        assert_eq!(
            error.to_string(),
            "invalid configuration: query.request_timeout_ms (PIPELINE__QUERY__REQUEST_TIMEOUT_MS) must be at least 1 (0 would answer every query API request 503)"
        );
        assert!(defaults_with("query.request_timeout_ms", 1)
            .validate()
            .is_ok());
    }

    #[test]
    fn a_count_past_its_ceiling_is_refused_naming_its_key() {
        let defaults = Settings::load_from(&config_dir(), "dev").expect("defaults load");
        for (key, _, most) in defaults.counts() {
            // Allowed by the ceiling; a rule between two settings may still refuse it
            // (no parallel-commit threshold of a million fits the default queue).
            let most_allowed = defaults_with(key, most).validate();
            assert!(
                most_allowed.map_or_else(|error| !error.to_string().contains("at most"), |_| true),
                "{most} {key}"
            );
            let error = defaults_with(key, most + 1)
                .validate()
                .expect_err("past the ceiling");
            assert!(
                error
                    .to_string()
                    .contains(&format!("{} must be at most {most}", key_and_variable(key))),
                "{error}"
            );
        }
        let error = defaults_with("ingest.queue_capacity", u64::MAX)
            .validate()
            .expect_err("tokio's semaphore panicked at this");
        assert!(
            error.to_string().contains("ingest.queue_capacity"),
            "{error}"
        );
    }

    #[test]
    fn a_reading_may_be_dated_at_most_12_hours_ahead() {
        assert!(defaults_with("ingest.max_future_secs", FUTURE_MAX_SECS)
            .validate()
            .is_ok());
        let error = defaults_with("ingest.max_future_secs", FUTURE_MAX_SECS + 1)
            .validate()
            .expect_err("past 12 hours");
        assert!(
            error.to_string().contains(
                "ingest.max_future_secs (PIPELINE__INGEST__MAX_FUTURE_SECS) must be at most 12 hours (43200 s)"
            ),
            "{error}"
        );
    }

    #[test]
    fn the_dedup_horizon_must_outlast_the_ack_wait() {
        let mut settings = defaults_with("projector.ack_wait_secs", 900);
        let error = settings.validate().expect_err("horizon = ack wait");
        assert!(
            error.to_string().contains(
                "projector.dedup_horizon_secs (PIPELINE__PROJECTOR__DEDUP_HORIZON_SECS) must exceed projector.ack_wait_secs (900 s)"
            ),
            "{error}"
        );
        settings.projector.ack_wait_secs = 899;
        assert!(settings.validate().is_ok(), "a second shorter is enough");
        settings.projector.dedup_horizon_secs = 10;
        assert!(settings.validate().is_err(), "a horizon under the wait");
    }

    #[test]
    fn a_relay_session_timeout_too_short_for_a_round_is_refused() {
        let mut settings = defaults_with("relay.idle_in_transaction_timeout_ms", 1);
        let error = settings.validate().expect_err("1 ms");
        assert!(
            error.to_string().contains(
                "relay.idle_in_transaction_timeout_ms (PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS) must be at least 3000"
            ),
            "{error}"
        );
        settings.relay.idle_in_transaction_timeout_ms = IDLE_IN_TRANSACTION_MIN_MS - 1;
        assert!(settings.validate().is_err(), "just under the floor");
        settings.relay.idle_in_transaction_timeout_ms = IDLE_IN_TRANSACTION_MIN_MS;
        assert!(settings.validate().is_ok(), "the floor");
    }

    #[test]
    fn a_parallel_commit_threshold_past_the_queue_is_refused() {
        let mut settings = defaults_with("ingest.queue_capacity", 32);
        let error = settings.validate().expect_err("32 of 32");
        assert!(
            error.to_string().contains(
                "ingest.commit_parallel_min (PIPELINE__INGEST__COMMIT_PARALLEL_MIN) must be less than ingest.queue_capacity (32)"
            ),
            "{error}"
        );
        settings.ingest.queue_capacity = 33;
        assert!(settings.validate().is_ok(), "room for one in flight");
    }

    #[test]
    fn ingest_needs_a_pool_with_room_beside_its_group_commits() {
        let mut settings = defaults_with("database.pool_size", 2);
        assert!(settings.validate().is_ok(), "the relay may run on two");
        let error = settings.validate_for_ingest().expect_err("2 for 2 commits");
        assert!(
            error.to_string().contains(
                "database.pool_size (PIPELINE__DATABASE__POOL_SIZE) must exceed ingest.commit_concurrency (2) in ingest"
            ),
            "{error}"
        );
        settings.database.pool_size = 3;
        assert!(settings.validate_for_ingest().is_ok(), "one for look-ups");
        settings.relay.idle_in_transaction_timeout_ms = 1;
        assert!(
            settings.validate_for_ingest().is_err(),
            "the rest still hold"
        );
    }

    #[test]
    fn the_duplicate_window_fits_in_what_the_stream_keeps() {
        let mut settings = defaults_with("nats.max_age_secs", 60);
        let error = settings
            .validate()
            .expect_err("a window of 120 s over 60 s");
        assert!(
            error
                .to_string()
                .contains("nats.duplicate_window_secs (PIPELINE__NATS__DUPLICATE_WINDOW_SECS) must be at most nats.max_age_secs (60 s)"),
            "{error}"
        );
        settings.nats.duplicate_window_secs = 60;
        assert!(settings.validate().is_ok(), "as long as the stream keeps");
        settings.nats.max_age_secs = 0;
        settings.nats.duplicate_window_secs = 3600;
        assert!(settings.validate().is_ok(), "a stream without an age limit");
    }

    #[test]
    fn the_dedup_horizon_must_outlast_a_paused_relays_republish_that_the_duplicate_window_lets_through(
    ) {
        // The relay's session ends 30 s into its pause, another relay republishes its
        // rows by its next poll (0.5 s), 5 s of duplicate window are long gone, and the
        // projector remembers what it applied for 10 s only.
        let mut settings = defaults_with("nats.duplicate_window_secs", 5);
        settings.projector.ack_wait_secs = 5;
        settings.projector.dedup_horizon_secs = 10;
        settings.relay.idle_in_transaction_timeout_ms = 30_000;
        let error = settings
            .validate()
            .expect_err("a horizon under the republish");
        let message = error.to_string();
        for key in [
            "projector.dedup_horizon_secs (PIPELINE__PROJECTOR__DEDUP_HORIZON_SECS)",
            "relay.idle_in_transaction_timeout_ms",
            "relay.poll_interval_ms",
            "nats.duplicate_window_secs",
        ] {
            assert!(message.contains(key), "names {key}: {message}");
        }
        settings.projector.dedup_horizon_secs = 30;
        assert!(
            settings.validate().is_err(),
            "30 s: the poll comes after it"
        );
        settings.projector.dedup_horizon_secs = 31;
        assert!(settings.validate().is_ok(), "31 s covers 30.5 s");
        // A duplicate window that outlasts the republish: JetStream drops the copy.
        settings.projector.dedup_horizon_secs = 10;
        settings.nats.duplicate_window_secs = 31;
        assert!(settings.validate().is_ok(), "the window covers it");
        // Every shipped environment passes: chaos.toml's window is shorter than its
        // session timeout on purpose, and its horizon covers both.
        for environment in ["dev", "chaos"] {
            Settings::load_from(&config_dir(), environment).expect(environment);
        }
    }

    #[test]
    fn an_app_env_without_its_config_file_is_refused_naming_app_env_and_the_path() {
        for environment in ["production", "PROD", "prod ", ""] {
            let error = Settings::load_from(&config_dir(), environment)
                .expect_err("only default.toml would apply");
            let message = error.to_string();
            assert!(
                message.contains(&format!("APP_ENV {environment:?}"))
                    && message.contains(&format!("config/{environment}.toml")),
                "{message}"
            );
            assert_eq!(message.lines().count(), 1, "{message}");
        }
        for environment in ["dev", "prod", "chaos"] {
            Settings::layers(&config_dir(), environment).expect(environment);
        }
    }

    #[test]
    fn a_file_that_does_not_parse_is_one_line_with_its_position_but_not_its_text() {
        let broken = "[database]\npool_size = 4\nurl = \"postgres://app:s3cret@db/telemetry\n";
        let error = one_line(defaults_with_toml(broken).expect_err("an open string"));
        let line = error.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(!line.contains("s3cret"), "{line}");
        assert!(line.contains("line 3"), "{line}");
        assert!(
            line.starts_with("invalid configuration: TOML parse error"),
            "{line}"
        );
    }

    /// The shipped defaults with `toml` as the environment's file over them.
    fn defaults_with_toml(toml: &str) -> Result<Settings, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")))
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|layers| layers.try_deserialize())
    }

    /// The shipped defaults with `key` set to `value`, as an environment variable does.
    fn defaults_overridden(
        key: &str,
        value: impl Into<config::Value>,
    ) -> Result<Settings, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")))
            .set_override(key, value)
            .and_then(|builder| builder.build())
            .and_then(|layers| layers.try_deserialize())
    }

    /// The strict reading is an attribute on each integer field: one a new field lacked
    /// would bring back the config crate's rounding (0.5 to 0) for that key alone.
    #[test]
    fn every_integer_setting_of_the_defaults_refuses_a_fraction_naming_its_key() {
        let defaults = config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")))
            .build()
            .expect("default.toml reads")
            .try_deserialize::<config::Map<String, config::Value>>()
            .expect("default.toml is a table");
        let mut checked = Vec::new();
        for (section, fields) in defaults {
            let Ok(fields) = fields.into_table() else {
                continue;
            };
            for (field, value) in fields {
                if !matches!(
                    value.kind,
                    config::ValueKind::I64(_)
                        | config::ValueKind::I128(_)
                        | config::ValueKind::U64(_)
                        | config::ValueKind::U128(_)
                ) {
                    continue;
                }
                let key = format!("{section}.{field}");
                let error = defaults_overridden(&key, 0.5).expect_err(&key);
                assert!(error.to_string().contains(&key), "{key}: {error}");
                checked.push(key);
            }
        }
        assert!(
            checked.len() >= 30,
            "the integer settings of default.toml: {checked:?}"
        );
    }

    #[test]
    fn an_integer_setting_given_a_float_a_boolean_or_a_word_is_refused_naming_the_key() {
        // The config crate rounded a float (-1.0 and 0.4 to 0, which turned the rate
        // limit off) and read true, "on" and "yes" as 1, false, "off" and "no" as 0.
        for (toml, key) in [
            (
                "[ingest]\nrate_limit_per_second = -1.0",
                "ingest.rate_limit_per_second",
            ),
            (
                "[ingest]\nrate_limit_per_second = 0.4",
                "ingest.rate_limit_per_second",
            ),
            (
                "[ingest]\nmax_body_bytes = 65536.0",
                "ingest.max_body_bytes",
            ),
            ("[relay]\nbatch_size = true", "relay.batch_size"),
            (
                "[projector]\nack_wait_secs = 1e3",
                "projector.ack_wait_secs",
            ),
            (
                "[ingest]\nrate_limit_per_second = \"off\"",
                "ingest.rate_limit_per_second",
            ),
            (
                "[ingest]\nrate_limit_burst = 4294967296",
                "ingest.rate_limit_burst",
            ),
            ("[database]\npool_size = -1", "database.pool_size"),
        ] {
            let error = defaults_with_toml(toml).expect_err(toml);
            assert!(error.to_string().contains(key), "{toml}: {error}");
        }
        // What an environment variable holds is text: a whole number, and nothing else.
        for (value, accepted) in [
            ("25", Some(25)),
            ("0", Some(0)),
            ("0.4", None),
            ("-1", None),
            ("off", None),
            ("yes", None),
        ] {
            let layers = defaults_overridden("ingest.rate_limit_per_second", value);
            match (layers, accepted) {
                (Ok(settings), Some(accepted)) => {
                    assert_eq!(settings.ingest.rate_limit_per_second, accepted, "{value}")
                }
                (Err(error), None) => assert!(
                    error.to_string().contains("ingest.rate_limit_per_second"),
                    "{value}: {error}"
                ),
                (layers, _) => panic!("{value}: {layers:?}"),
            }
        }
        let settings =
            defaults_with_toml("[ingest]\nrate_limit_per_second = 0\n[relay]\nbatch_size = -5")
                .expect("integers deserialize");
        assert_eq!(
            settings.ingest.rate_limit_per_second, 0,
            "0 is the off switch"
        );
        let error = settings.validate().expect_err("a negative row count");
        assert!(error.to_string().contains("relay.batch_size"), "{error}");
    }

    #[test]
    fn every_valid_reading_written_compactly_fits_the_smallest_body_limit() {
        let metrics: serde_json::Map<String, serde_json::Value> = (0..crate::reading::METRICS_MAX)
            .map(|index| {
                let name = format!("m{index:0>63}");
                (name, serde_json::json!(-2.2250738585072014e-308))
            })
            .collect();
        let device_id = "d".repeat(crate::reading::DEVICE_ID_MAX_LEN);
        let recorded_at = "2026-12-05T01:23:45.123456789-23:59";
        let reading = serde_json::json!({
            "device_id": device_id,
            "recorded_at": recorded_at,
            "metrics": metrics,
        });
        let mut item = reading.clone();
        item["idempotency_key"] = "k".repeat(crate::reading::IDEMPOTENCY_KEY_MAX_LEN).into();
        let batch = serde_json::json!({ "readings": [item] });
        // 2026-12-05T12:00Z; the reading was recorded 13 h 23 min later.
        let now = time::OffsetDateTime::from_unix_timestamp(1_796_472_000).expect("a time");
        let bounds = crate::reading::TimeBounds {
            max_future: time::Duration::days(2),
            max_age: time::Duration::days(2),
        };
        let body: crate::reading::ReadingBody =
            serde_json::from_value(reading.clone()).expect("a reading");
        body.validate(now, bounds)
            .expect("the largest reading is valid");
        let (single, batch) = (reading.to_string().len(), batch.to_string().len());
        assert!(
            single > 3000 && batch <= BODY_MIN_BYTES,
            "{single} / {batch}"
        );

        for key in ["ingest.max_body_bytes", "ingest.max_batch_body_bytes"] {
            let error = defaults_with(key, BODY_MIN_BYTES as u64 - 1)
                .validate()
                .expect_err("a limit some readings do not fit");
            assert!(
                error.to_string().contains(&key_and_variable(key)),
                "{error}"
            );
            assert!(defaults_with(key, BODY_MIN_BYTES as u64).validate().is_ok());
        }
    }

    #[test]
    fn the_body_budget_holds_the_largest_body_and_stays_below_its_ceiling() {
        let key = "ingest.max_body_bytes_held";
        let largest = defaults_with(key, 1 << 24).ingest.max_batch_body_bytes as u64;
        for refused in [largest - 1, BODY_HELD_MAX_BYTES + 1] {
            let error = defaults_with(key, refused)
                .validate()
                .expect_err("a budget no batch fits in, or past the ceiling");
            assert!(
                error.to_string().contains(&key_and_variable(key)),
                "{error}"
            );
        }
        assert!(defaults_with(key, largest).validate().is_ok());
        // The single body's limit counts too, when it is the larger.
        let mut settings = defaults_with(key, largest);
        settings.ingest.max_body_bytes = settings.ingest.max_batch_body_bytes + 1;
        let error = settings
            .validate()
            .expect_err("a budget a single body does not fit in");
        assert!(error.to_string().contains(key), "{error}");
    }

    #[test]
    fn prod_config_logs_json_and_demands_tokens_and_service_credentials() {
        let mut settings = Settings::layers(&config_dir(), "prod").expect("prod layers");
        assert_eq!(settings.log.format, LogFormat::Json);
        assert!(settings.auth.enabled, "production requires tokens");
        let refused = settings
            .validate()
            .expect_err("the default URLs carry no credentials");
        assert!(
            refused
                .to_string()
                .contains("database.url (PIPELINE__DATABASE__URL) carries no credentials"),
            "{refused}"
        );
        settings.database.url = "postgres://telemetry:secret@db.internal:5432/telemetry".to_owned();
        settings.nats.url = "nats://relay:secret@nats.internal:4222".to_owned();
        settings.redis.url = "redis://:secret@redis.internal:6379".to_owned();
        settings.validate().expect("credentialed URLs are accepted");
        settings.nats.url = "nats://nats.internal:4222".to_owned();
        let refused = settings.validate().expect_err("an open NATS is refused");
        assert!(refused.to_string().contains("nats.url"), "{refused}");
        let dev = Settings::load_from(&config_dir(), "dev").expect("dev loads");
        assert!(!dev.auth.enabled, "the local demo needs none");
    }

    #[test]
    fn a_url_that_asks_for_tls_to_postgresql_or_redis_is_refused_naming_its_key() {
        for (key, url, asked) in [
            ("redis.url", "rediss://cache.internal:6380", "rediss://"),
            (
                "database.url",
                "postgres://app:pw@db/telemetry?sslmode=require",
                "sslmode=require",
            ),
            (
                "database.url",
                "postgresql://db/telemetry?user=app&sslmode=verify-full",
                "sslmode=verify-full",
            ),
            (
                "database.url",
                "postgres://db/telemetry?sslmode=verify-ca&password=pw",
                "sslmode=verify-ca",
            ),
            (
                "database.url",
                "postgres://db/telemetry?sslnegotiation=direct",
                "sslnegotiation=direct",
            ),
        ] {
            let mut settings = Settings::load_from(&config_dir(), "dev").expect("dev loads");
            match key {
                "redis.url" => settings.redis.url = url.to_owned(),
                _ => settings.database.url = url.to_owned(),
            }
            let message = settings.validate().expect_err(url).to_string();
            assert!(
                message.contains(&key_and_variable(key)) && message.contains(asked),
                "{message}"
            );
            assert!(!message.contains("pw"), "no secret in {message}");
        }
        for url in [
            "postgres://db/telemetry?sslmode=prefer",
            "postgres://db/telemetry?sslmode=disable",
            "postgres://db/telemetry?application_name=sslmode=require",
        ] {
            let mut settings = Settings::load_from(&config_dir(), "dev").expect("dev loads");
            settings.database.url = url.to_owned();
            assert!(settings.validate().is_ok(), "{url}");
        }
        let mut settings = Settings::load_from(&config_dir(), "dev").expect("dev loads");
        settings.nats.url = "tls://nats.internal:4222".to_owned();
        assert!(settings.validate().is_ok(), "async-nats speaks TLS");
    }

    #[test]
    fn credentials_are_recognised_in_each_url_form() {
        for url in [
            "postgres://user:pw@host/db",
            "postgresql://host/db?user=u&password=pw",
            "nats://s3cr3t-token@host:4222",
            "nats://user:pw@host:4222",
            "redis://:pw@host:6379",
            "redis://user:pw@host:6379/0",
            "unix:///run/redis.sock",
            // A password with a character that ends an authority elsewhere: the userinfo
            // runs to the last `@` (no host holds one).
            "redis://:pa,ss@h:6379",
            "redis://:s3cr/et@127.0.0.1:6379",
            "redis://:s3c?ret@h:6379",
            "redis://:s3c#ret@h:6379",
            "postgres://app:s3cr/et@db/telemetry",
            "nats://s3cr/et-token@h:4222",
        ] {
            assert!(carries_credentials(url), "{url}");
        }
        for url in [
            "postgres://postgres@127.0.0.1:5432/telemetry",
            "postgres://user:@host/db",
            "postgres://app@db/telemetry?password=",
            "postgres://app@db/telemetry?sslmode=require&password=",
            "nats://127.0.0.1:4222",
            "redis://127.0.0.1:6379",
            "redis://user@host:6379",
            "not a url",
        ] {
            assert!(!carries_credentials(url), "{url}");
        }
    }

    #[test]
    fn redacted_urls_keep_the_server_and_hide_every_secret() {
        for (url, shown) in [
            (
                "nats://relay:s3cret@127.0.0.1:4222",
                "nats://relay:***@127.0.0.1:4222",
            ),
            ("nats://s3cret-token@host:4222", "nats://***@host:4222"),
            ("tls://s3cret-token@host:4222", "tls://***@host:4222"),
            ("ws://s3cret-token@host:8080", "ws://***@host:8080"),
            ("wss://s3cret-token@host:443", "wss://***@host:443"),
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("redis://user:p@ss@host:6379", "redis://user:***@host:6379"),
            (
                "postgres://app:s3cret@db/telemetry?sslmode=require&password=again",
                "postgres://app:***@db/telemetry?sslmode=require&password=***",
            ),
            (
                "postgresql://db/telemetry?password=s3cret&user=app",
                "postgresql://db/telemetry?password=***&user=app",
            ),
            (
                "host=db password=s3cret user=app",
                "host=db password=*** user=app",
            ),
            ("redis://:s3,cret@h:6379", "redis://:***@h:6379"),
            // A `/`, `?` or `#` in a password: the URL does not parse, and the message
            // that says so shows it redacted.
            (
                "redis://:s3cr/et@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            ("redis://:s3c?ret@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://:s3c#ret@h:6379", "redis://:***@h:6379"),
            (
                "nats://relay:s3,c/r?e#t@nats.internal:4222",
                "nats://relay:***@nats.internal:4222",
            ),
            ("nats://s3cr/et-token@h:4222", "nats://***@h:4222"),
            (
                "postgres://app:s3cr/et?@db/telemetry?sslmode=require",
                "postgres://app:***@db/telemetry?sslmode=require",
            ),
            // Malformed, as when a start fails on it: still hidden.
            (
                "nats://relay:s3cret@127.0.0.1:notaport",
                "nats://relay:***@127.0.0.1:notaport",
            ),
            // No URL setting is a list (async-nats parses one URL per string), so a comma
            // is part of what it stands in: here everything up to the last `@`.
            (
                "nats://a:s3cret@h1:4222,nats://b:s3cret@h2:4222",
                "nats://a:***@h2:4222",
            ),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
            assert!(!redacted(url).contains("s3"), "{url}");
        }
        assert_eq!(redacted("redis://:pa,ss@h:6379"), "redis://:***@h:6379");
        for url in [
            "nats://127.0.0.1:4222",
            "postgres://postgres@127.0.0.1:5432/telemetry",
            "redis://user@host:6379",
            "unix:///run/redis.sock",
            "not a url",
            "",
        ] {
            assert_eq!(redacted(url), url, "nothing to hide in {url}");
        }
    }
}

//! Backlogs: making one (`fill`, through ingest's own group-commit code), timing how
//! fast the relay or the projector drains it (`backlog`), and sampling both backlogs
//! while the pipeline runs (`watch`).
//!
//! The drain clock starts at the last reading that still showed the full backlog, so
//! the drainer's start-up (connecting, creating streams) is not counted, and stops at
//! the first reading of zero.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use contract::reading::Reading;
use contract::settings::{connecting_to, DatabaseSettings};
use futures::StreamExt;
use ingest::outbox_notify::Notifier;
use ingest::store::{GroupCommit, NewReading, Outcome, Store};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::bodies::{device_id, idempotency_key, run_id, Rng};
use crate::nats::consumer_backlog;
use crate::stats::{per_second, round1, Statuses};

/// Longest a backlog reader waits for PostgreSQL's answer, and a reading of `fill` for
/// its commit: a PostgreSQL that stalls or stops answering fails the drain or the fill
/// (the watch notes the sample unknown) instead of hanging the bench.
const PG_TIMEOUT: Duration = Duration::from_secs(30);

/// The one value of the one row `sql` returns, within [`PG_TIMEOUT`].
async fn one_value<T>(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let row = tokio::time::timeout(PG_TIMEOUT, client.query_one(sql, &[]))
        .await
        .with_context(|| format!("no answer from PostgreSQL within {PG_TIMEOUT:?} to {sql}"))??;
    Ok(row.try_get(0)?)
}

/// Connects one plain PostgreSQL client (no TLS: loopback only).
pub async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to PostgreSQL timed out")?
    .with_context(|| connecting_to("PostgreSQL", url))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Writes `count` readings (reading + idempotency key + outbox row, exactly as ingest
/// writes them) through ingest's group committer, bypassing HTTP.
pub async fn fill(
    database_url: &str,
    count: u64,
    device_prefix: &str,
    devices: u64,
    in_flight: usize,
) -> anyhow::Result<Value> {
    let limits = GroupCommit {
        batch_max: 500,
        concurrency: 4,
        parallel_min: 32,
        queue_capacity: 8192,
        interval: Duration::ZERO,
    };
    let database = DatabaseSettings {
        url: database_url.to_owned(),
        pool_size: 8,
        connect_timeout_ms: 5000,
    };
    let pool = ingest::db::pool(&database)?;
    // With ingest's NOTIFY after each commit, so the figure includes what ingest pays.
    let notifier = Notifier::new(
        ingest::db::pg_config(&database)?,
        Duration::from_millis(database.connect_timeout_ms),
    );
    let (store, dispatcher) = Store::start(pool, limits, Some(notifier), None);
    let run = run_id();
    let started = Instant::now();
    let mut statuses = Statuses::default();
    let mut accepted = 0u64;
    let in_flight = in_flight.clamp(1, limits.queue_capacity / 2);
    let mut outcomes = futures::stream::iter(0..count)
        .map(|seq| {
            let store = store.clone();
            let mut rng = Rng::new(seq + 1);
            let now = OffsetDateTime::now_utc();
            let mut metrics = BTreeMap::new();
            metrics.insert("temperature".to_owned(), rng.between(15.0, 30.0));
            metrics.insert("humidity".to_owned(), rng.between(20.0, 80.0));
            metrics.insert("battery".to_owned(), rng.between(3.3, 4.2));
            let reading = Reading {
                device_id: device_id(device_prefix, rng.below(devices)),
                recorded_at: Some(now),
                metrics,
            };
            let key = idempotency_key(&run, 0, seq);
            async move {
                tokio::time::timeout(PG_TIMEOUT, store.submit(NewReading::new(reading, key, now)))
                    .await
            }
        })
        .buffer_unordered(in_flight);
    while let Some(outcome) = outcomes.next().await {
        match outcome {
            Ok(Ok(Outcome::Accepted { .. })) => accepted += 1,
            Ok(Ok(other)) => statuses.add(&format!("{other:?}").to_lowercase()),
            Ok(Err(error)) => statuses.add(&error.to_string()),
            Err(_) => bail!("a reading waited over {PG_TIMEOUT:?} for its commit"),
        }
    }
    drop(outcomes);
    drop(store);
    let _ = tokio::time::timeout(Duration::from_secs(30), dispatcher).await;
    let elapsed = started.elapsed();
    Ok(json!({
        "readings": count,
        "accepted": accepted,
        "errors": statuses.errors_json(""),
        "commit_batch_max": limits.batch_max,
        "commit_concurrency": limits.concurrency,
        "commit_parallel_min": limits.parallel_min,
        "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "readings_per_s": per_second(accepted, elapsed),
    }))
}

/// Follows a draining backlog: started once it drops below what it was, done at zero.
#[derive(Debug, Clone)]
pub struct DrainClock {
    full: u64,
    /// Seconds (on the caller's clock) of the last reading that still showed `full`.
    baseline_at: f64,
    started: bool,
    done_at: Option<f64>,
}

impl DrainClock {
    pub fn new(first: u64, at: f64) -> Self {
        Self {
            full: first,
            baseline_at: at,
            started: false,
            done_at: None,
        }
    }

    /// Takes one reading; true once the backlog is empty.
    pub fn observe(&mut self, value: u64, at: f64) -> bool {
        if self.done_at.is_some() {
            return true;
        }
        if !self.started {
            if value >= self.full {
                // Not started yet (or still growing): the clock starts later.
                self.full = value;
                self.baseline_at = at;
                return false;
            }
            self.started = true;
        }
        if value == 0 {
            self.done_at = Some(at);
            return true;
        }
        false
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// Seconds from the last full reading to the first empty one.
    pub fn seconds(&self) -> Option<f64> {
        self.done_at.map(|done| (done - self.baseline_at).max(1e-6))
    }

    /// `events` (the exact backlog) per second of drain.
    pub fn rate(&self, events: u64) -> Option<f64> {
        self.seconds()
            .map(|seconds| round1(events as f64 / seconds))
    }
}

/// Which drainer to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Drainer {
    Relay,
    Projector,
}

/// Where the backlogs are read.
#[derive(Debug, Clone)]
pub struct Sources {
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub stream: String,
    pub consumer: String,
}

/// Times the drain of the relay's or the projector's backlog; the drainer is started
/// by the caller after `ready_file` appears.
pub async fn drain(
    what: Drainer,
    sources: &Sources,
    ready_file: Option<&Path>,
    start_timeout: Duration,
    timeout: Duration,
    interval: Duration,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let reader = Reader::connect(what, sources).await?;
    let exact = reader.exact().await?;
    if exact == 0 {
        bail!("the {what:?} backlog is empty: nothing to drain");
    }
    let first = reader.progress().await?;
    let mut clock = DrainClock::new(first, started.elapsed().as_secs_f64());
    // How busy the box is from here (the drainer starts once the ready file is there)
    // until the backlog is gone.
    let box_cpu = crate::box_cpu::Span::start();
    if let Some(path) = ready_file {
        std::fs::write(path, b"ready\n").with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("loadgen: {what:?} backlog of {exact} ready to drain");
    let mut last;
    loop {
        tokio::time::sleep(interval).await;
        let value = reader.progress().await?;
        last = value;
        let now = started.elapsed();
        if clock.observe(value, now.as_secs_f64()) {
            break;
        }
        if !clock.started() && now > start_timeout {
            bail!("the {what:?} backlog did not start draining within {start_timeout:?}");
        }
        if now > timeout {
            break;
        }
    }
    Ok(json!({
        "what": format!("{what:?}").to_lowercase(),
        "backlog": exact,
        "drained": clock.seconds().is_some(),
        "remaining": last,
        "seconds": clock.seconds().map(|s| (s * 1000.0).round() / 1000.0),
        "events_per_s": clock.rate(exact),
        "box_cpu": box_cpu.to_json(),
    }))
}

/// Reads one backlog cheaply (for polling) and exactly (once).
enum Reader {
    Relay {
        client: tokio_postgres::Client,
        max_id: i64,
    },
    Projector {
        jetstream: jetstream::Context,
        stream: String,
        consumer: String,
    },
}

impl Reader {
    async fn connect(what: Drainer, sources: &Sources) -> anyhow::Result<Self> {
        match what {
            Drainer::Relay => {
                let url = sources
                    .database_url
                    .as_deref()
                    .context("--database-url is needed to watch the relay")?;
                let client = pg_connect(url).await?;
                let max_id: Option<i64> = one_value(&client, "SELECT max(id) FROM outbox").await?;
                Ok(Self::Relay {
                    client,
                    max_id: max_id.unwrap_or(0),
                })
            }
            Drainer::Projector => {
                let url = sources
                    .nats_url
                    .as_deref()
                    .context("--nats is needed to watch the projector")?;
                Ok(Self::Projector {
                    jetstream: jetstream::new(crate::nats::connect(url).await?),
                    stream: sources.stream.clone(),
                    consumer: sources.consumer.clone(),
                })
            }
        }
    }

    async fn exact(&self) -> anyhow::Result<u64> {
        match self {
            Self::Relay { client, .. } => outbox_unpublished(client).await,
            Self::Projector { .. } => self.progress().await,
        }
    }

    /// For the relay, `max(id) − min(unpublished id) + 1`: an index probe instead of a
    /// count, so polling does not load the database being measured.
    async fn progress(&self) -> anyhow::Result<u64> {
        match self {
            Self::Relay { client, max_id } => {
                let lowest: Option<i64> = one_value(
                    client,
                    "SELECT min(id) FROM outbox WHERE published_at IS NULL",
                )
                .await?;
                Ok(lowest.map_or(0, |lowest| (max_id - lowest + 1).max(1) as u64))
            }
            Self::Projector {
                jetstream,
                stream,
                consumer,
            } => consumer_backlog(jetstream, stream, consumer)
                .await
                .with_context(|| format!("consumer {consumer} on stream {stream} not found")),
        }
    }
}

async fn outbox_unpublished(client: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let count: i64 = one_value(
        client,
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
    )
    .await?;
    Ok(count.max(0) as u64)
}

/// Max, mean and last of a series of samples.
pub fn series_summary(samples: &[Option<u64>]) -> Value {
    let known: Vec<u64> = samples.iter().flatten().copied().collect();
    let mean = if known.is_empty() {
        0.0
    } else {
        round1(known.iter().sum::<u64>() as f64 / known.len() as f64)
    };
    json!({
        "max": known.iter().max(),
        "mean": mean,
        "last": samples.last().copied().flatten(),
        "samples": samples,
    })
}

/// Samples the outbox backlog and the consumer's pending count every `interval` for
/// `duration`; with `until_empty`, stops early once both are zero (and, given a Redis
/// prefix, the read model has a generation). Returns the report and whether it emptied.
pub async fn watch(
    sources: &Sources,
    redis: Option<(&str, &str)>,
    duration: Duration,
    interval: Duration,
    until_empty: bool,
) -> anyhow::Result<(Value, bool)> {
    let database = match &sources.database_url {
        Some(url) => Some(pg_connect(url).await?),
        None => None,
    };
    let jetstream = match &sources.nats_url {
        Some(url) => Some(jetstream::new(crate::nats::connect(url).await?)),
        None => None,
    };
    let mut redis = match redis {
        Some((url, prefix)) => Some((crate::redis_limit::connect(url).await?, prefix)),
        None => None,
    };
    let box_cpu = crate::box_cpu::Span::start();
    let started = Instant::now();
    let mut outbox = Vec::new();
    let mut pending = Vec::new();
    let mut emptied = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < duration {
        tick.tick().await;
        let backlog = match &database {
            Some(client) => outbox_unpublished(client).await.ok(),
            None => None,
        };
        let waiting = match &jetstream {
            Some(jetstream) => {
                consumer_backlog(jetstream, &sources.stream, &sources.consumer).await
            }
            None => None,
        };
        outbox.push(backlog);
        pending.push(waiting);
        if until_empty {
            let generation = match &mut redis {
                Some((connection, prefix)) => redis::cmd("HMGET")
                    .arg(contract::read_model::meta_key(prefix))
                    .arg(contract::read_model::meta::LIVE)
                    .query_async::<(Option<u64>, Option<u64>)>(connection)
                    .await
                    .ok()
                    .and_then(|(generation, layout)| {
                        contract::read_model::live_generation(generation, layout)
                    })
                    .is_some(),
                None => true,
            };
            let outbox_empty = database.is_none() || backlog == Some(0);
            let pending_empty = jetstream.is_none() || waiting == Some(0);
            if outbox_empty && pending_empty && generation {
                emptied = true;
                break;
            }
        }
    }
    let report = json!({
        "seconds": round1(started.elapsed().as_secs_f64()),
        "interval_ms": interval.as_millis() as u64,
        "emptied": emptied,
        "outbox_unpublished": series_summary(&outbox),
        "consumer_pending": series_summary(&pending),
        "box_cpu": box_cpu.to_json(),
    });
    Ok((report, emptied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_starts_at_the_last_full_reading() {
        let mut clock = DrainClock::new(1000, 0.0);
        assert!(!clock.observe(1000, 0.5));
        assert!(!clock.observe(1000, 1.0));
        assert!(!clock.started());
        assert!(!clock.observe(600, 1.5));
        assert!(clock.started());
        assert!(clock.observe(0, 3.0));
        assert_eq!(clock.seconds(), Some(2.0));
        assert_eq!(clock.rate(1000), Some(500.0));
        // Once done it stays done.
        assert!(clock.observe(5, 4.0));
    }

    #[test]
    fn a_growing_backlog_moves_the_baseline() {
        let mut clock = DrainClock::new(10, 0.0);
        assert!(!clock.observe(20, 1.0));
        assert!(clock.observe(0, 2.0));
        assert_eq!(clock.seconds(), Some(1.0));
    }

    #[test]
    fn not_done_means_no_rate() {
        let mut clock = DrainClock::new(10, 0.0);
        clock.observe(5, 1.0);
        assert_eq!(clock.rate(10), None);
    }

    #[test]
    fn series_summaries_skip_unknown_samples() {
        let summary = series_summary(&[Some(3), None, Some(9), Some(0)]);
        assert_eq!(summary["max"], json!(9));
        assert_eq!(summary["mean"], json!(4.0));
        assert_eq!(summary["last"], json!(0));
        assert_eq!(series_summary(&[])["max"], Value::Null);
    }
}

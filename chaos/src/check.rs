//! The invariants of a chaos run, checked against the real servers:
//! - every reading a device got a `202` for is in PostgreSQL exactly once, with its values;
//! - `readings`, `idempotency_keys` and `outbox` agree, row for row;
//! - every outbox event is in the stream at least once;
//! - every device's stats from the query API equal a recomputation from PostgreSQL
//!   (count, sum, min, max, last, every window), done by the project's reference model;
//! - the outbox drains and consumer pending returns to 0 (see `drained`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use contract::read_model::Aggregate;
use contract::reference::{sums_agree, ModelReading, ReferenceModel, WINDOW_RULES};
use futures::StreamExt;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::fleet::{Acked, Fleet};

/// What a check found; `lost` and `double_counted` are readings.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub lost: u64,
    pub double_counted: u64,
    pub problems: Vec<String>,
}

impl Findings {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.double_counted == 0 && self.problems.is_empty()
    }

    fn problem(&mut self, text: String) {
        if self.problems.len() < 20 {
            self.problems.push(text);
        }
    }

    /// Adds what an earlier check of the same phase found: the readings are totals
    /// over the run, so the larger of the two counts.
    pub fn merge(&mut self, earlier: Findings) {
        self.lost = self.lost.max(earlier.lost);
        self.double_counted = self.double_counted.max(earlier.double_counted);
        for problem in earlier.problems {
            self.problem(problem);
        }
    }
}

/// What [`settle`] found.
pub struct Settled {
    /// What the checks found, and what kept them from being made.
    pub findings: Findings,
    /// From the fault's end to the start of the first check that passed.
    pub recovered_in: Option<Duration>,
    /// The stream's messages and events, when it could be read.
    pub note: Option<String>,
}

/// The end of a phase, or of a step of the mixed one, once its fault is over (at
/// `fault_over`): every device finishes the reading it holds, retrying until its `202`,
/// and stops; the run waits at most `limit` for the pipeline to recover, checking every
/// invariant until they all hold. Past the limit the invariants are checked once more
/// for what they find. A check that cannot be made (a server that does not answer, a
/// read that stalls) is a problem of the phase, and the run goes on to the next.
pub async fn settle(
    checker: &Checker,
    fleet: &Fleet,
    fault_over: Instant,
    limit: Duration,
) -> Settled {
    let mut findings = Findings::default();
    if !fleet.pause(limit).await {
        findings.problem(format!(
            "the devices still had readings without a 202 after {} s",
            limit.as_secs()
        ));
    }
    // The check that passed was the whole check, on a paused fleet: it is not made
    // again (until 2026-12-07 it was, reading the whole stream twice a phase).
    if let Some((recovered_in, note)) = recover(checker, fleet, fault_over, limit).await {
        return Settled {
            findings,
            recovered_in: Some(recovered_in),
            note: Some(note),
        };
    }
    let acked = fleet.observed().acked;
    // Bounded like the checks before it: a server that takes connections but never
    // answers must not keep the run from its table.
    let checked = tokio::time::timeout(LAST_CHECK_LIMIT, async {
        let write = checker.write_side().await?;
        checker.check_write_side(&acked, &write, &mut findings);
        let stream = checker.check_stream(&write, &mut findings).await?;
        checker.check_read_model(&write, &mut findings).await?;
        anyhow::Ok(stream_note(stream))
    })
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "they took more than {} s",
            LAST_CHECK_LIMIT.as_secs()
        ))
    });
    let note = match checked {
        Ok(note) => Some(note),
        Err(error) => {
            findings.problem(format!("the checks could not be made: {error:#}"));
            None
        }
    };
    findings.problem("did not recover within the limit".to_owned());
    Settled {
        findings,
        recovered_in: None,
        note,
    }
}

/// How long [`settle`]'s last check, past the limit, may take.
const LAST_CHECK_LIMIT: Duration = Duration::from_secs(60);

/// What the stream held, as a phase's note: its messages and the events they carry.
fn stream_note((messages, events): (u64, u64)) -> String {
    format!("stream {messages} messages for {events} events")
}

/// Waits until the outbox and the consumer drained, the read model equals PostgreSQL
/// and the stream holds every event; the time from the fault's end to the start of the
/// first check that passed (the devices are paused, so the state cannot change under
/// the check) and the stream's note, or `None` past the limit.
async fn recover(
    checker: &Checker,
    fleet: &Fleet,
    since: Instant,
    limit: Duration,
) -> Option<(Duration, String)> {
    let acked = fleet.observed().acked;
    loop {
        let checking_from = since.elapsed();
        // A check is given up at the limit: its reads have no deadline of their own, and
        // a server that takes connections but never answers would hold it for good.
        let remaining = limit.saturating_sub(checking_from);
        if let Ok(Some(note)) = tokio::time::timeout(remaining, recovered(checker, &acked)).await {
            return Some((checking_from, note));
        }
        if since.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One check of [`recover`]: the stream's note if everything has caught up and agrees.
async fn recovered(checker: &Checker, acked: &[Acked]) -> Option<String> {
    if !checker.drained().await.unwrap_or(false) {
        return None;
    }
    let mut findings = Findings::default();
    let write = checker.write_side().await.ok()?;
    checker.check_write_side(acked, &write, &mut findings);
    let read_model_clean = checker
        .check_read_model(&write, &mut findings)
        .await
        .is_ok()
        && findings.is_clean();
    if !read_model_clean {
        return None;
    }
    let stream = checker.check_stream(&write, &mut findings).await.ok()?;
    findings.is_clean().then(|| stream_note(stream))
}

/// The write side as PostgreSQL has it.
pub struct WriteSide {
    readings: HashMap<Uuid, ModelReading>,
    keys: HashMap<(String, String), Uuid>,
    outbox: HashSet<Uuid>,
}

pub struct Checker {
    pub database_url: String,
    pub jetstream: jetstream::Context,
    pub stream: String,
    pub consumer: String,
    pub query_url: String,
    pub http: reqwest::Client,
}

impl Checker {
    async fn postgres(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
                .await
                .context("connecting to PostgreSQL")?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The outbox is empty of unpublished rows and the durable consumer has nothing
    /// pending or unacknowledged.
    pub async fn drained(&self) -> anyhow::Result<bool> {
        let unpublished: i64 = self
            .postgres()
            .await?
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await?
            .get(0);
        if unpublished > 0 {
            return Ok(false);
        }
        let stream = self.jetstream.get_stream(&self.stream).await?;
        let info = stream.consumer_info(&self.consumer).await?;
        Ok(info.num_pending == 0 && info.num_ack_pending == 0)
    }

    pub async fn write_side(&self) -> anyhow::Result<WriteSide> {
        let postgres = self.postgres().await?;
        let mut readings = HashMap::new();
        for row in postgres
            .query(
                "SELECT event_id, device_id, (extract(epoch FROM recorded_at) * 1000)::bigint, metrics FROM readings",
                &[],
            )
            .await?
        {
            let metrics: Value = row.get(3);
            let metrics = metrics
                .as_object()
                .map(|metrics| {
                    metrics
                        .iter()
                        .filter_map(|(name, value)| Some((name.clone(), value.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            let reading = ModelReading {
                event_id: row.get(0),
                device_id: row.get(1),
                recorded_at_ms: row.get(2),
                metrics,
            };
            readings.insert(reading.event_id, reading);
        }
        let keys = postgres
            .query(
                "SELECT device_id, idempotency_key, event_id FROM idempotency_keys",
                &[],
            )
            .await?
            .into_iter()
            .map(|row| ((row.get(0), row.get(1)), row.get(2)))
            .collect();
        let outbox = postgres
            .query("SELECT event_id FROM outbox", &[])
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect();
        Ok(WriteSide {
            readings,
            keys,
            outbox,
        })
    }

    /// Each acknowledged reading once in PostgreSQL, and the three tables in agreement.
    pub fn check_write_side(&self, acked: &[Acked], write: &WriteSide, findings: &mut Findings) {
        let mut acknowledged = HashSet::new();
        for reading in acked {
            acknowledged.insert(reading.event_id);
            let pair = (reading.device_id.clone(), reading.idempotency_key.clone());
            match write.keys.get(&pair) {
                Some(event_id) if *event_id == reading.event_id => {}
                Some(other) => findings.problem(format!(
                    "{} {}: acknowledged as {} but the key holds {other}",
                    reading.device_id, reading.idempotency_key, reading.event_id
                )),
                None => findings.problem(format!(
                    "{} {}: acknowledged but its idempotency key is gone",
                    reading.device_id, reading.idempotency_key
                )),
            }
            match write.readings.get(&reading.event_id) {
                None => {
                    findings.lost += 1;
                    findings.problem(format!(
                        "acknowledged reading {} is not in PostgreSQL",
                        reading.event_id
                    ));
                }
                Some(stored)
                    if stored.metrics != reading.metrics
                        || stored.recorded_at_ms != reading.recorded_at_ms
                        || stored.device_id != reading.device_id =>
                {
                    findings.problem(format!(
                        "reading {} is stored with other values",
                        reading.event_id
                    ));
                }
                Some(_) => {}
            }
        }
        for event_id in write.readings.keys() {
            if !acknowledged.contains(event_id) {
                // Devices retry until they get their 202, so after a pause every stored
                // reading was acknowledged; one more is a reading stored twice.
                findings.double_counted += 1;
                findings.problem(format!(
                    "reading {event_id} is stored but was never acknowledged"
                ));
            }
        }
        let key_events: HashSet<Uuid> = write.keys.values().copied().collect();
        let reading_events: HashSet<Uuid> = write.readings.keys().copied().collect();
        for (name, events) in [("idempotency_keys", &key_events), ("outbox", &write.outbox)] {
            let missing = reading_events.difference(events).count();
            let extra = events.difference(&reading_events).count();
            if missing + extra > 0 {
                findings.problem(format!(
                    "{name} disagrees with readings: {missing} readings without a row, {extra} rows without a reading"
                ));
            }
        }
    }

    /// Every outbox event is in the stream at least once; returns the number of
    /// messages and of distinct events read.
    pub async fn check_stream(
        &self,
        write: &WriteSide,
        findings: &mut Findings,
    ) -> anyhow::Result<(u64, u64)> {
        let mut stream = self.jetstream.get_stream(&self.stream).await?;
        let (messages, seen) = read_stream(&mut stream, 1).await?;
        let missing: Vec<&Uuid> = write
            .outbox
            .iter()
            .filter(|id| !seen.contains(id))
            .collect();
        if !missing.is_empty() {
            findings.lost += missing.len() as u64;
            findings.problem(format!(
                "{} outbox events are not in the stream (first: {})",
                missing.len(),
                missing[0]
            ));
        }
        Ok((messages, seen.len() as u64))
    }

    /// Every device's stats from the query API against the reference model fed from
    /// PostgreSQL.
    pub async fn check_read_model(
        &self,
        write: &WriteSide,
        findings: &mut Findings,
    ) -> anyhow::Result<()> {
        let mut models: BTreeMap<&str, ReferenceModel> = BTreeMap::new();
        for reading in write.readings.values() {
            models
                .entry(reading.device_id.as_str())
                .or_default()
                .apply(reading.clone());
        }
        for (device_id, model) in &models {
            let asked_ms = now_ms();
            let response = self
                .http
                .get(format!("{}/v1/devices/{device_id}/stats", self.query_url))
                .send()
                .await?;
            let status = response.status().as_u16();
            let view: Value = response.json().await.unwrap_or(Value::Null);
            let answered_ms = now_ms();
            if status != 200 {
                findings.problem(format!("{device_id}: query answered {status}"));
                continue;
            }
            compare_device(device_id, &view, model, asked_ms, answered_ms, findings);
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    contract::timestamp::unix_millis(OffsetDateTime::now_utc())
}

fn millis(value: &Value) -> Option<i64> {
    contract::timestamp::parse(value.as_str()?).map(contract::timestamp::unix_millis)
}

/// Compares one `/stats` document with the reference. Windows are compared at the
/// moment the request was sent and the moment it was answered: the query evaluated
/// them somewhere in between, and a window only changes when a bucket boundary passes.
fn compare_device(
    device_id: &str,
    view: &Value,
    model: &ReferenceModel,
    asked_ms: i64,
    answered_ms: i64,
    findings: &mut Findings,
) {
    let Some(expected) = model.device(device_id) else {
        return;
    };
    let counted = view["sample_count"].as_u64().unwrap_or(0);
    if counted > expected.sample_count {
        findings.double_counted += counted - expected.sample_count;
    } else {
        findings.lost += expected.sample_count - counted;
    }
    if counted != expected.sample_count {
        findings.problem(format!(
            "{device_id}: sample_count {counted}, PostgreSQL has {}",
            expected.sample_count
        ));
        return;
    }
    let mut mismatch = |what: String| findings.problem(format!("{device_id}: {what}"));
    if millis(&view["first_seen"]) != Some(expected.first_seen_ms)
        || millis(&view["last_seen"]) != Some(expected.last_seen_ms)
    {
        mismatch("first_seen/last_seen differ".to_owned());
    }
    for (name, metric) in &expected.metrics {
        let shown = &view["metrics"][name];
        let all_time = Aggregate {
            count: metric.count,
            sum: metric.sum,
            min: metric.min,
            max: metric.max,
        };
        if !aggregate_matches(shown, Some(all_time)) {
            mismatch(format!(
                "{name}: all-time figures {shown} differ from count {} sum {} min {} max {}",
                metric.count, metric.sum, metric.min, metric.max
            ));
        }
        if shown["last"].as_f64() != Some(metric.last)
            || millis(&shown["last_at"]) != Some(metric.last_at_ms)
        {
            mismatch(format!(
                "{name}: last {} at {} differs from {} at {}",
                shown["last"], shown["last_at"], metric.last, metric.last_at_ms
            ));
        }
        // The windows the reference model defines, not the implementation's list: a
        // window the read model dropped shows as a mismatch.
        for window in &WINDOW_RULES {
            let view_window = &shown["windows"][window.name];
            let at_ask = model.window_named(device_id, name, window.name, asked_ms);
            let at_answer = model.window_named(device_id, name, window.name, answered_ms);
            if !aggregate_matches(view_window, at_ask) && !aggregate_matches(view_window, at_answer)
            {
                mismatch(format!(
                    "{name} window {}: {view_window} differs from {at_answer:?}",
                    window.name
                ));
            }
        }
    }
}

/// `{count, avg, min, max}` as the API shows it against an aggregate (`None`: empty).
fn aggregate_matches(view: &Value, expected: Option<Aggregate>) -> bool {
    match expected {
        None => view["count"].as_u64() == Some(0) && view["avg"].is_null(),
        Some(expected) => {
            let count = view["count"].as_u64().unwrap_or(0);
            let avg = view["avg"].as_f64().unwrap_or(f64::NAN);
            count == expected.count
                && sums_agree(avg * count as f64, expected.sum)
                && view["min"].as_f64() == Some(expected.min)
                && view["max"].as_f64() == Some(expected.max)
        }
    }
}

/// Reads `stream` from sequence `first` to its last message at the time of the call:
/// the number of messages read and their distinct event ids (`Nats-Msg-Id`). The
/// messages beyond the distinct ids are second copies of an event.
pub async fn read_stream(
    stream: &mut jetstream::stream::Stream,
    first: u64,
) -> anyhow::Result<(u64, HashSet<Uuid>)> {
    let last = stream.info().await?.state.last_sequence;
    let mut seen = HashSet::new();
    let mut messages = 0u64;
    if last < first.max(1) {
        return Ok((messages, seen));
    }
    let reader = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: if first <= 1 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: first,
                }
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let mut delivered = reader.messages().await?;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), delivered.next())
        .await
        .context("reading the stream stalled")?
    {
        let message = message.map_err(|error| anyhow::anyhow!("reading the stream: {error}"))?;
        messages += 1;
        if let Some(id) = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .and_then(|id| id.as_str().parse::<Uuid>().ok())
        {
            seen.insert(id);
        }
        let sequence = message
            .info()
            .map(|info| info.stream_sequence)
            .unwrap_or(last);
        if sequence >= last {
            break;
        }
    }
    Ok((messages, seen))
}

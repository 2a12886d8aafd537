//! The write path: readings, idempotency records and outbox rows, group-committed.
//!
//! Requests do not talk to PostgreSQL themselves. Each hands its reading to
//! [`Store::submit`] and waits; one dispatcher task gathers whatever readings are
//! waiting (up to `commit_batch_max`) into one statement, which inserts the idempotency
//! keys with `ON CONFLICT DO NOTHING` and, for the keys it did insert, the readings and
//! outbox rows, all in one implicit transaction. Up to `commit_concurrency` such
//! commits run at once; while they do, the next batch fills up. Keys that were already
//! there are looked up afterwards and answered as replays or conflicts.
//!
//! Each batch is sorted by (device, key) so concurrent batches take the key locks in
//! the same order and cannot deadlock; a duplicate that is still being committed by
//! another batch makes the insert wait for that commit, so the lookup sees it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use contract::event::TelemetryRecorded;
use contract::reading::Reading;
use deadpool_postgres::Pool;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

/// A reading ready to be written, with everything its row, key and event hold.
#[derive(Debug, Clone)]
pub struct NewReading {
    pub device_id: String,
    pub idempotency_key: String,
    pub fingerprint: [u8; 32],
    pub event_id: Uuid,
    pub recorded_at: OffsetDateTime,
    pub received_at: OffsetDateTime,
    pub metrics: BTreeMap<String, f64>,
    /// The `202` body, stored so a replay answers with exactly the same bytes.
    pub response_body: String,
    /// The event as the relay will publish it.
    pub payload: Vec<u8>,
}

impl NewReading {
    /// Gives a validated reading its event id and builds its answer and event.
    pub fn new(reading: Reading, idempotency_key: String, received_at: OffsetDateTime) -> Self {
        let fingerprint = reading.fingerprint();
        let event_id = Uuid::now_v7();
        let recorded_at = reading.recorded_at.unwrap_or(received_at);
        let event = TelemetryRecorded::new(
            event_id,
            reading.device_id.clone(),
            recorded_at,
            received_at,
            reading.metrics.clone(),
        );
        let response_body = serde_json::json!({
            "event_id": event_id,
            "device_id": reading.device_id,
            "status": "accepted",
        })
        .to_string();
        Self {
            device_id: reading.device_id,
            idempotency_key,
            fingerprint,
            event_id,
            recorded_at,
            received_at,
            metrics: reading.metrics,
            response_body,
            payload: event.to_json(),
        }
    }
}

/// What became of one submitted reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now; the body is the `202` answer.
    Accepted { body: String },
    /// The same key with the same request was stored before: its stored answer.
    Replayed {
        status: u16,
        body: String,
        event_id: Uuid,
    },
    /// The same key was stored before with a different request.
    KeyReused,
    /// The key vanished between insert and look-up (expired meanwhile); try again.
    KeyInFlux,
}

/// Why a reading could not be written; the request should be retried later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("too many requests waiting for a commit")]
    Overloaded,
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

/// One submission: a single reading, or a gateway batch that commits as one.
struct Pending {
    readings: Vec<NewReading>,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
}

/// The handle requests submit readings through; cheap to clone.
#[derive(Clone)]
pub struct Store {
    queue: mpsc::Sender<Pending>,
}

/// Limits of the group commit.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommit {
    pub batch_max: usize,
    pub concurrency: usize,
    pub queue_capacity: usize,
}

impl Store {
    /// Starts the dispatcher; it ends, after its last commit, once every `Store` clone
    /// has been dropped.
    pub fn start(pool: Pool, limits: GroupCommit) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(limits.queue_capacity);
        let dispatcher = tokio::spawn(dispatch(pool, receiver, limits));
        (Self { queue }, dispatcher)
    }

    /// Writes one reading (or finds its earlier answer); waits for the commit.
    pub async fn submit(&self, reading: NewReading) -> Result<Outcome, StoreError> {
        self.submit_all(vec![reading])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Unavailable("no outcome".to_owned()))
    }

    /// Writes several readings in one transaction: every new one is committed, or none.
    /// The outcomes are in the order of `readings`; of two readings with the same device
    /// and key, the first is the one stored.
    pub async fn submit_all(&self, readings: Vec<NewReading>) -> Result<Vec<Outcome>, StoreError> {
        if readings.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending { readings, reply })
            .map_err(|_| StoreError::Overloaded)?;
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("commit abandoned".to_owned())))
    }
}

/// Gathers submissions into commits of at most `batch_max` readings (a submission is
/// never split), with at most `concurrency` commits in flight.
async fn dispatch(pool: Pool, mut receiver: mpsc::Receiver<Pending>, limits: GroupCommit) {
    let in_flight = Arc::new(Semaphore::new(limits.concurrency));
    let mut carried: Option<Pending> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let first = match carried.take() {
            Some(pending) => pending,
            None => match receiver.recv().await {
                Some(pending) => pending,
                None => break,
            },
        };
        let mut size = first.readings.len();
        let mut batch = vec![first];
        while size < limits.batch_max {
            match receiver.try_recv() {
                Ok(pending) if size + pending.readings.len() > limits.batch_max => {
                    carried = Some(pending);
                    break;
                }
                Ok(pending) => {
                    size += pending.readings.len();
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit_batch(&pool, batch).await;
            drop(permit);
        });
    }
    // Wait for the commits still in flight, so their requests get their answers.
    let _ = in_flight.acquire_many(limits.concurrency as u32).await;
}

async fn commit_batch(pool: &Pool, batch: Vec<Pending>) {
    // Sorted by (device, key) so concurrent commits lock keys in the same order; the
    // sort is stable, so of two equal keys the one submitted first is stored.
    let readings: Vec<&NewReading> = batch.iter().flat_map(|pending| &pending.readings).collect();
    let mut order: Vec<usize> = (0..readings.len()).collect();
    order.sort_by(|&left, &right| {
        (&readings[left].device_id, &readings[left].idempotency_key)
            .cmp(&(&readings[right].device_id, &readings[right].idempotency_key))
    });
    let sorted: Vec<&NewReading> = order.iter().map(|&index| readings[index]).collect();
    let started = Instant::now();
    let result = write(pool, &sorted).await;
    metrics::histogram!("ingest_commit_batch_size").record(sorted.len() as f64);
    metrics::histogram!("ingest_commit_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(sorted_outcomes) => {
            let mut outcomes: Vec<Option<Outcome>> = vec![None; readings.len()];
            for (index, outcome) in order.into_iter().zip(sorted_outcomes) {
                outcomes[index] = Some(outcome);
            }
            let mut outcomes = outcomes.into_iter();
            for pending in batch {
                let mine: Option<Vec<Outcome>> =
                    outcomes.by_ref().take(pending.readings.len()).collect();
                let answer =
                    mine.ok_or_else(|| StoreError::Unavailable("incomplete commit".to_owned()));
                let _ = pending.reply.send(answer);
            }
        }
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                size = readings.len(),
                "group commit failed"
            );
            let error = StoreError::Unavailable(error.to_string());
            for pending in batch {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

const INSERT: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::timestamptz[],
                         $6::timestamptz[], $7::jsonb[], $8::text[], $9::bytea[])
        AS t(device_id, idempotency_key, fingerprint, event_id, recorded_at,
             received_at, metrics, response_body, payload)
), keys AS (
    INSERT INTO idempotency_keys (device_id, idempotency_key, fingerprint, event_id, status_code, response_body)
    SELECT device_id, idempotency_key, fingerprint, event_id, 202, response_body FROM input
    ON CONFLICT DO NOTHING
    RETURNING event_id
), stored_readings AS (
    INSERT INTO readings (event_id, device_id, recorded_at, received_at, metrics)
    SELECT input.event_id, device_id, recorded_at, received_at, metrics
    FROM input JOIN keys USING (event_id)
), stored_outbox AS (
    INSERT INTO outbox (event_id, device_id, payload)
    SELECT input.event_id, device_id, payload
    FROM input JOIN keys USING (event_id)
)
SELECT event_id FROM keys";

const LOOKUP: &str = "
SELECT k.device_id, k.idempotency_key, k.fingerprint, k.status_code, k.response_body, k.event_id
FROM idempotency_keys k
JOIN unnest($1::text[], $2::text[]) AS t(device_id, idempotency_key) USING (device_id, idempotency_key)";

/// An idempotency record as stored.
struct StoredKey {
    fingerprint: Vec<u8>,
    status: i16,
    body: String,
    event_id: Uuid,
}

/// One statement for the batch, and one look-up when some keys were already there.
async fn write(pool: &Pool, readings: &[&NewReading]) -> Result<Vec<Outcome>, anyhow::Error> {
    let client = pool.get().await?;
    let insert = client.prepare_cached(INSERT).await?;
    let device_ids: Vec<&str> = readings.iter().map(|r| r.device_id.as_str()).collect();
    let keys: Vec<&str> = readings
        .iter()
        .map(|r| r.idempotency_key.as_str())
        .collect();
    let fingerprints: Vec<&[u8]> = readings.iter().map(|r| &r.fingerprint[..]).collect();
    let event_ids: Vec<Uuid> = readings.iter().map(|r| r.event_id).collect();
    let recorded: Vec<OffsetDateTime> = readings.iter().map(|r| r.recorded_at).collect();
    let received: Vec<OffsetDateTime> = readings.iter().map(|r| r.received_at).collect();
    let metrics: Vec<serde_json::Value> = readings
        .iter()
        .map(|r| serde_json::to_value(&r.metrics).unwrap_or_default())
        .collect();
    let bodies: Vec<&str> = readings.iter().map(|r| r.response_body.as_str()).collect();
    let payloads: Vec<&[u8]> = readings.iter().map(|r| r.payload.as_slice()).collect();
    let inserted: std::collections::HashSet<Uuid> = client
        .query(
            &insert,
            &[
                &device_ids,
                &keys,
                &fingerprints,
                &event_ids,
                &recorded,
                &received,
                &metrics,
                &bodies,
                &payloads,
            ],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if inserted.len() == readings.len() {
        return Ok(readings
            .iter()
            .map(|r| Outcome::Accepted {
                body: r.response_body.clone(),
            })
            .collect());
    }
    let (lookup_devices, lookup_keys): (Vec<&str>, Vec<&str>) = readings
        .iter()
        .filter(|r| !inserted.contains(&r.event_id))
        .map(|r| (r.device_id.as_str(), r.idempotency_key.as_str()))
        .unzip();
    let lookup = client.prepare_cached(LOOKUP).await?;
    let mut stored: HashMap<(String, String), StoredKey> = HashMap::new();
    for row in client
        .query(&lookup, &[&lookup_devices, &lookup_keys])
        .await?
    {
        let key = StoredKey {
            fingerprint: row.get(2),
            status: row.get(3),
            body: row.get(4),
            event_id: row.get(5),
        };
        stored.insert((row.get(0), row.get(1)), key);
    }
    Ok(readings
        .iter()
        .map(|r| {
            if inserted.contains(&r.event_id) {
                return Outcome::Accepted {
                    body: r.response_body.clone(),
                };
            }
            match stored.get(&(r.device_id.clone(), r.idempotency_key.clone())) {
                Some(key) if key.fingerprint[..] == r.fingerprint[..] => Outcome::Replayed {
                    status: u16::try_from(key.status).unwrap_or(202),
                    body: key.body.clone(),
                    event_id: key.event_id,
                },
                Some(_) => Outcome::KeyReused,
                None => Outcome::KeyInFlux,
            }
        })
        .collect())
}

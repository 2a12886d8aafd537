//! The write path: readings, idempotency records and outbox rows, group-committed.
//!
//! Requests do not talk to PostgreSQL themselves. Each hands its reading to
//! [`Store::submit`] and waits; one dispatcher task gathers whatever readings are
//! waiting (up to `commit_batch_max`) into one statement, which inserts the idempotency
//! keys with `ON CONFLICT DO NOTHING` and, for the keys it did insert, the readings and
//! outbox rows, all in one implicit transaction. While a commit runs the next batch
//! fills up; once it holds `commit_parallel_min` readings it starts beside the running
//! one, up to `commit_concurrency` commits at once.
//! Keys that were already there are looked up afterwards and answered as replays or
//! conflicts. A retry refused only because its `recorded_at` aged past the limit since
//! its first request is looked up directly through the pool, outside the group commit
//! ([`Store::replays_of_aged`]).
//!
//! Each batch is sorted by (device, key) so concurrent batches take the key locks in
//! the same order and cannot deadlock; a duplicate that is still being committed by
//! another batch makes the insert wait for that commit, so the lookup sees it.
//!
//! A commit that inserted outbox rows signals the [`outbox_notify`](crate::outbox_notify)
//! task once it has returned; that task wakes the relays with a `NOTIFY` of its own,
//! outside the commit.
//!
//! The queue is bounded in readings, not submissions (`queue_capacity`, README's
//! limits): a submission holds room for each of its readings from [`Store::submit_all`]
//! until it is answered or dropped, and is refused with [`StoreError::Overloaded`] when
//! there is not enough, so a stall of PostgreSQL cannot pile up a thousand readings per
//! gateway request. A submission whose request gave up (its deadline passed, so it was
//! answered `503`) is dropped before its commit rather than committed behind its back;
//! one whose deadline passes while its commit runs is stored if that commit lands, and a
//! retry with the same keys then finds it. A commit that has run for
//! [`COMMIT_GIVE_UP_AFTER`] with no request left waiting for it is given up: its
//! connection has most likely gone silent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use contract::event::TelemetryRecorded;
use contract::reading::Reading;
use deadpool_postgres::Pool;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_postgres::types::Json;
use uuid::Uuid;

use crate::db::{cancel_if_given_up, LookUps};
use crate::http::server::OpenConnections;
use crate::outbox_notify::{Notifier, Signal};
use crate::pacing::Pacer;

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
        let response_body = Accepted {
            device_id: &reading.device_id,
            event_id,
            status: "accepted",
        }
        .to_json();
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

/// The `202` body. Its fields are in the order `serde_json::json!` wrote them in when
/// the stored answers of earlier releases were made (alphabetical), so a replay of an
/// old key and a new answer look alike.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    device_id: &'a str,
    event_id: Uuid,
    status: &'static str,
}

impl Accepted<'_> {
    fn to_json(&self) -> String {
        // Serialising a str, a UUID and a &'static str into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
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
    /// The readings waiting for a commit would exceed `queue_capacity`.
    #[error("too many readings waiting for a commit")]
    Overloaded,
    /// The commit failed or was abandoned.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

/// One submission: a single reading, or a gateway batch that commits as one.
struct Pending {
    readings: Vec<NewReading>,
    /// Closed once the request gave up waiting (its deadline passed): the submission is
    /// then dropped instead of committed.
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
    /// Its readings' room in the queue, given back when the submission is dropped:
    /// answered, or abandoned.
    _room: OwnedSemaphorePermit,
}

impl Pending {
    /// Whether the request that submitted it no longer waits for its answer.
    fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Room for `queue_capacity` readings waiting for a commit or in one: one permit a
/// reading. Taking it is a compare-and-swap, without waiting; a submission larger than
/// the whole capacity takes all of it, so it enters once nothing else waits instead of
/// never.
#[derive(Clone)]
struct Room {
    permits: Arc<Semaphore>,
    capacity: u32,
}

impl Room {
    fn new(queue_capacity: usize) -> Self {
        let most = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let capacity = u32::try_from(queue_capacity)
            .unwrap_or(u32::MAX)
            .clamp(1, most);
        Self {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// Room for `readings`, if there is that much (or, for more than the capacity, if
    /// the queue is empty).
    fn take(&self, readings: usize) -> Option<OwnedSemaphorePermit> {
        let wanted = u32::try_from(readings).map_or(self.capacity, |n| n.min(self.capacity));
        Arc::clone(&self.permits)
            .try_acquire_many_owned(wanted)
            .ok()
    }
}

/// The handle requests submit readings through; cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Unbounded in submissions: [`Room`] bounds the readings they hold.
    queue: mpsc::UnboundedSender<Pending>,
    room: Room,
    /// For the look-ups of [`Store::replays_of_aged`], which commit nothing; they leave
    /// the commits `concurrency` connections of the pool.
    look_ups: LookUps,
}

/// Limits of the group commit.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommit {
    pub batch_max: usize,
    pub concurrency: usize,
    /// Readings that must be waiting before a commit starts beside one in flight.
    pub parallel_min: usize,
    /// Readings waiting for a commit or in one before submissions are refused with
    /// [`StoreError::Overloaded`] (`ingest.queue_capacity`). A submission larger than
    /// this is taken only while no other reading waits.
    pub queue_capacity: usize,
    /// After a commit of [`BUSY_ROWS`](crate::pacing::BUSY_ROWS) or more readings, a
    /// batch under half of `parallel_min` starts no sooner than this after it
    /// (`ingest.commit_interval_ms`; zero: at once): a little of the `202`'s latency
    /// spent on fewer, larger commits.
    pub interval: Duration,
}

impl Store {
    /// Starts the dispatcher, and the `notifier` that wakes the relays after commits
    /// (without one the relays find new rows by polling). `clients`, the HTTP
    /// connections the submissions come from, lets a paced batch start as soon as every
    /// one of them is waiting in it. The returned task ends once every `Store` clone has
    /// been dropped, after the last commit and its NOTIFY.
    pub fn start(
        pool: Pool,
        limits: GroupCommit,
        notifier: Option<Notifier>,
        clients: Option<OpenConnections>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let room = Room::new(limits.queue_capacity);
        let (signal, notifier) = notifier.map(Notifier::start).unzip();
        let look_ups = LookUps::new(pool.clone(), limits.concurrency);
        let dispatcher = tokio::spawn(async move {
            dispatch(pool, receiver, limits, signal, clients).await;
            // The dispatcher dropped the last signal: the notifier sends what it owes
            // and ends.
            if let Some(notifier) = notifier {
                let _ = notifier.await;
            }
        });
        let store = Self {
            queue,
            room,
            look_ups,
        };
        (store, dispatcher)
    }

    /// The look-ups on the commits' pool, which leave the commits their connections:
    /// the token look-ups share them ([`crate::auth::Tokens::new`]).
    pub fn look_ups(&self) -> &LookUps {
        &self.look_ups
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
    /// and key, the first is the one stored. `Overloaded` at once when the queue has no
    /// room for them. Dropping the future before its commit began drops the readings
    /// unwritten; once it began, they may be stored.
    pub async fn submit_all(&self, readings: Vec<NewReading>) -> Result<Vec<Outcome>, StoreError> {
        if readings.is_empty() {
            return Ok(Vec::new());
        }
        let room = self
            .room
            .take(readings.len())
            .ok_or(StoreError::Overloaded)?;
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                readings,
                reply,
                _room: room,
            })
            .map_err(|_| StoreError::Unavailable("the store has stopped".to_owned()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("commit abandoned".to_owned())))
    }

    /// For readings refused only because their `recorded_at` is older than the limit
    /// (each with the idempotency key it came with), the stored answer of each whose
    /// device and key hold that very reading: a retry of a reading stored while it was
    /// young gets that answer, [`Outcome::Replayed`], as it would have before it aged.
    /// `None` for the others (no such key, or the key holds another reading): the age
    /// rule refuses them. One look-up for all of them, through the pool, after a commit
    /// in flight whose statement has inserted one of their keys has ended
    /// (`wait_for_commits_of`): the retry of a reading whose first request's commit
    /// is writing (it aged on the way) gets that request's replay, where the look-up
    /// alone found no key yet and answered `422` for a stored reading. A first request
    /// still queued for its commit is not waited for. Nothing is written.
    pub async fn replays_of_aged(
        &self,
        aged: &[(&Reading, &str)],
    ) -> Result<Vec<Option<Outcome>>, StoreError> {
        if aged.is_empty() {
            return Ok(Vec::new());
        }
        let (devices, keys): (Vec<&str>, Vec<&str>) = aged
            .iter()
            .map(|(reading, key)| (reading.device_id.as_str(), *key))
            .unzip();
        // Given up at the request's deadline (a lock on the keys holds it up), the
        // statement is cancelled, not left on a pooled connection.
        let looked_up = self
            .look_ups
            .run("look-up of aged retries", async |client| {
                wait_for_commits_of(client, &devices, &keys).await?;
                look_up(client, &devices, &keys).await
            })
            .await;
        let stored = looked_up.map_err(|error| {
            let size = aged.len();
            tracing::warn!(
                error = format!("{error:#}"),
                size,
                "look-up of aged retries failed"
            );
            StoreError::Unavailable(error.to_string())
        })?;
        Ok(aged
            .iter()
            .map(|(reading, key)| {
                let stored = stored.get(&(reading.device_id.clone(), (*key).to_owned()))?;
                (stored.fingerprint[..] == reading.fingerprint()[..]).then(|| stored.replay())
            })
            .collect())
    }
}

/// Gathers submissions into commits of at most `batch_max` readings (a submission is
/// never split). A commit starts at once when none is in flight; while one is, the next
/// batch fills up and starts when that commit returns or, once it holds `parallel_min`
/// readings, beside it, up to `concurrency` commits. So light load pays one round trip
/// per request and never spreads a trickle over several transactions, while heavy load
/// keeps one backend executing while another waits for its WAL flush (about half of a
/// commit's time on this box). With `interval` set, a batch under half of
/// `parallel_min` that follows a busy commit waits until that long after its start
/// ([`crate::pacing`]), unless every connection counted in `clients` (those that
/// posted readings) has a submission in it. When `concurrency` commits are in flight
/// and the batch is full the dispatcher stops taking submissions: the queue fills up to
/// `queue_capacity` readings and [`Store::submit`] answers `Overloaded`. Submissions
/// whose requests gave up are dropped as they are taken, and again just before their
/// commit's statement.
async fn dispatch(
    pool: Pool,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
    limits: GroupCommit,
    signal: Option<Signal>,
    clients: Option<OpenConnections>,
) {
    let mut commits = tokio::task::JoinSet::new();
    let mut batch = Batch::default();
    let mut pacer = Pacer::new(Duration::ZERO, limits.interval);
    let mut open = true;
    loop {
        if open {
            batch.take_waiting(&mut receiver, limits.batch_max);
        }
        // A small batch waits for its slot when paced, gathering meanwhile, unless
        // every client is already in it: clients that wait for their answers before
        // sending again (a closed loop) cannot add to it by waiting.
        let mut paced_until = None;
        if batch.may_start(commits.len(), &limits) {
            let now = Instant::now();
            let start = if batch.may_be_paced(&limits) && !batch.holds_every(clients.as_ref()) {
                pacer.earliest(now)
            } else {
                now
            };
            if start <= now {
                pacer.started(now);
                pacer.finished(batch.readings);
                let pool = pool.clone();
                let signal = signal.clone();
                let submissions = batch.start_next();
                commits
                    .spawn(async move { commit_batch(&pool, submissions, signal.as_ref()).await });
                continue;
            }
            paced_until = Some(start);
        }
        if !open && batch.is_empty() && commits.is_empty() {
            break;
        }
        let accepting = open && !batch.is_full(limits.batch_max);
        tokio::select! {
            received = receiver.recv(), if accepting => match received {
                Some(pending) => batch.add(pending, limits.batch_max),
                None => open = false,
            },
            Some(_) = commits.join_next(), if !commits.is_empty() => {}
            () = tokio::time::sleep_until(paced_until.unwrap_or_else(Instant::now)),
                if paced_until.is_some() => {}
        }
    }
}

/// The submissions gathered for the next commit, and one that did not fit in it.
#[derive(Default)]
struct Batch {
    submissions: Vec<Pending>,
    readings: usize,
    carried: Option<Pending>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.submissions.is_empty()
    }

    /// Full: at `batch_max` readings, or holding back a submission that would not fit.
    fn is_full(&self, batch_max: usize) -> bool {
        self.readings >= batch_max || self.carried.is_some()
    }

    /// Whether this batch should start now, with `in_flight` commits running.
    fn may_start(&self, in_flight: usize, limits: &GroupCommit) -> bool {
        if self.is_empty() {
            return false;
        }
        let room = in_flight < limits.concurrency.max(1);
        in_flight == 0 || (room && self.worth_a_commit(limits))
    }

    /// Large enough to start beside a commit in flight.
    fn worth_a_commit(&self, limits: &GroupCommit) -> bool {
        self.readings >= limits.parallel_min || self.is_full(limits.batch_max)
    }

    /// Small enough to wait for its slot when commits are paced: under half of
    /// `parallel_min`. Closed-loop clients that keep commits of 25-32 readings going
    /// cannot fill a bigger one by waiting (PERFORMANCE.md, *Pacing the group commit*).
    fn may_be_paced(&self, limits: &GroupCommit) -> bool {
        self.readings * 2 < limits.parallel_min && !self.is_full(limits.batch_max)
    }

    /// Whether every counted client has its submission here (HTTP/1.1: one request
    /// per connection at a time), so that waiting could not add to the batch.
    fn holds_every(&self, clients: Option<&OpenConnections>) -> bool {
        clients.is_some_and(|open| self.submissions.len() >= open.get())
    }

    /// Gathers `pending`, or holds it back for the next batch when it does not fit; one
    /// whose request gave up is dropped instead.
    fn add(&mut self, pending: Pending, batch_max: usize) {
        if pending.is_abandoned() {
            return;
        }
        if !self.submissions.is_empty() && self.readings + pending.readings.len() > batch_max {
            self.carried = Some(pending);
            return;
        }
        self.readings += pending.readings.len();
        self.submissions.push(pending);
    }

    /// Adds what is already waiting in the queue, without waiting, until full.
    fn take_waiting(&mut self, receiver: &mut mpsc::UnboundedReceiver<Pending>, batch_max: usize) {
        while !self.is_full(batch_max) {
            match receiver.try_recv() {
                Ok(pending) => self.add(pending, batch_max),
                Err(_) => break,
            }
        }
    }

    /// Hands out the gathered submissions; the held-back one opens the next batch.
    fn start_next(&mut self) -> Vec<Pending> {
        let submissions = std::mem::take(&mut self.submissions);
        self.readings = 0;
        if let Some(pending) = self.carried.take() {
            self.readings = pending.readings.len();
            self.submissions.push(pending);
        }
        submissions
    }
}

/// How often a commit in flight checks whether any of its requests still waits.
const GAVE_UP_CHECK: Duration = Duration::from_millis(100);

/// How long a commit runs before it may be given up, once no request waits for it. A
/// commit takes milliseconds; one still running after seconds waits on a connection
/// gone silent, or on a PostgreSQL so stalled that landing late saves little. Not
/// sooner: requests that waited in the queue until just before their deadline would
/// have their commits cancelled as they began, and a slow PostgreSQL redo them all.
pub const COMMIT_GIVE_UP_AFTER: Duration = Duration::from_secs(5);

/// Commits `batch` and answers each of its submissions. A submission whose request gave
/// up by the time the connection is at hand is dropped unwritten: that request was
/// answered `503`, which tells the client nothing was stored.
///
/// A commit that has not answered [`COMMIT_GIVE_UP_AFTER`] after it began, when every
/// request in it has given up (at their deadline, `ingest.request_timeout_ms`, or hung
/// up), is given up too: its connection leaves the pool with its statement cancelled,
/// and the pool's idle connections are closed with it. Such a commit waits on a connection that went silent (a failover that dropped
/// the old paths, a link that lost its packets, a proxy that holds them), where the
/// idle ones most likely are too; left to run, two of them held both commit slots and
/// every reading was refused until TCP gave up, 15 minutes or never. Whether it
/// committed is unknown, as for any request answered `503`: a retry with the same key
/// gets the stored answer, or stores the reading.
async fn commit_batch(pool: &Pool, mut batch: Vec<Pending>, signal: Option<&Signal>) {
    let client = match pool.get().await {
        Ok(client) => client,
        Err(error) => return fail(batch, &anyhow::Error::from(error)),
    };
    batch.retain(|pending| !pending.is_abandoned());
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    // Sorted by (device, key) so concurrent commits lock keys in the same order; the
    // sort is stable, so of two equal keys the one submitted first is stored.
    let readings: Vec<&NewReading> = batch.iter().flat_map(|pending| &pending.readings).collect();
    let mut order: Vec<usize> = (0..readings.len()).collect();
    order.sort_by(|&left, &right| {
        (&readings[left].device_id, &readings[left].idempotency_key)
            .cmp(&(&readings[right].device_id, &readings[right].idempotency_key))
    });
    let sorted: Vec<&NewReading> = order.iter().map(|&index| readings[index]).collect();
    let written = cancel_if_given_up(client, "group commit", async |client| {
        write(client, &sorted, signal).await
    });
    let unanswered_and_given_up = async {
        tokio::time::sleep_until(started + COMMIT_GIVE_UP_AFTER).await;
        while !batch.iter().all(Pending::is_abandoned) {
            tokio::time::sleep(GAVE_UP_CHECK).await;
        }
    };
    let result = tokio::select! {
        biased;
        result = written => result,
        () = unanswered_and_given_up => {
            metrics::histogram!("ingest_commit_seconds").record(started.elapsed().as_secs_f64());
            let idle_closed = pool.retain(|_, _| false).removed.len();
            metrics::counter!("ingest_commits_given_up_total").increment(1);
            tracing::warn!(
                size = sorted.len(),
                waited_ms = started.elapsed().as_millis(),
                idle_closed,
                "group commit unanswered and every request in it given up, its connection and the idle ones closed"
            );
            return;
        }
    };
    metrics::histogram!("ingest_commit_batch_size").record(sorted.len() as f64);
    metrics::histogram!("ingest_commit_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(Written {
            outcomes: sorted_outcomes,
            look_up_failed,
        }) => {
            if let Some(error) = &look_up_failed {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "looking up the stored answers of a group commit failed; what it stored is answered accepted"
                );
            }
            let mut outcomes: Vec<Option<Outcome>> = vec![None; readings.len()];
            for (index, outcome) in order.into_iter().zip(sorted_outcomes) {
                outcomes[index] = outcome;
            }
            let mut outcomes = outcomes.into_iter();
            for pending in batch {
                let mine: Vec<Option<Outcome>> =
                    outcomes.by_ref().take(pending.readings.len()).collect();
                let _ = pending.reply.send(answer(mine, look_up_failed.as_ref()));
            }
        }
        Err(error) => fail(batch, &error),
    }
}

/// One submission's answer from its readings' outcomes, `None` where the commit could
/// not tell (its stored answer was not read: `look_up_failed` says why). A submission
/// none of whose readings this commit stored gets a `503` that says nothing of it was
/// stored; otherwise its readings stored now are accepted, and the others get
/// [`Outcome::KeyInFlux`], to be retried with the same key for their stored answers.
fn answer(
    mine: Vec<Option<Outcome>>,
    look_up_failed: Option<&anyhow::Error>,
) -> Result<Vec<Outcome>, StoreError> {
    // `write` answers every reading it stored, so only a failed look-up leaves one out.
    if let Some(error) = look_up_failed.filter(|_| mine.iter().all(Option::is_none)) {
        return Err(StoreError::Unavailable(error.to_string()));
    }
    Ok(mine
        .into_iter()
        .map(|outcome| outcome.unwrap_or(Outcome::KeyInFlux))
        .collect())
}

/// Answers every submission of a commit that failed.
fn fail(batch: Vec<Pending>, error: &anyhow::Error) {
    let size: usize = batch.iter().map(|pending| pending.readings.len()).sum();
    tracing::warn!(error = format!("{error:#}"), size, "group commit failed");
    let error = StoreError::Unavailable(error.to_string());
    for pending in batch {
        let _ = pending.reply.send(Err(error.clone()));
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

/// Inserts the (device, key) pairs `$1[i]`, `$2[i]` where none is stored, in the
/// group commit's order (bytewise, as it sorts), so that each waits for a commit in
/// flight that inserts the same pair. Only ever run inside a transaction rolled back.
const PROBE: &str = "
INSERT INTO idempotency_keys (device_id, idempotency_key, fingerprint, event_id, status_code, response_body)
SELECT device_id, idempotency_key, '', '00000000-0000-0000-0000-000000000000', 0, ''
FROM unnest($1::text[], $2::text[]) AS t(device_id, idempotency_key)
ORDER BY device_id COLLATE \"C\", idempotency_key COLLATE \"C\"
ON CONFLICT DO NOTHING";

/// Returns once no commit that inserts one of the (device, key) pairs `devices[i]`,
/// `keys[i]` is in flight: PostgreSQL's unique check makes an insert of the same pair
/// wait for that commit to end, and a plain `SELECT` does not see it until then. The
/// insert is rolled back, so nothing is written. Dropped half-way, the connection is
/// closed rather than pooled with its transaction open ([`crate::db::cancel_if_given_up`]).
async fn wait_for_commits_of(
    client: &deadpool_postgres::Client,
    devices: &[&str],
    keys: &[&str],
) -> Result<(), anyhow::Error> {
    client.batch_execute("BEGIN").await?;
    let probed = match client.prepare_cached(PROBE).await {
        Ok(probe) => client.execute(&probe, &[&devices, &keys]).await.map(drop),
        Err(error) => Err(error),
    };
    let rolled_back = client.batch_execute("ROLLBACK").await;
    probed?;
    Ok(rolled_back?)
}

/// An idempotency record as stored.
struct StoredKey {
    fingerprint: Vec<u8>,
    status: i16,
    body: String,
    event_id: Uuid,
}

impl StoredKey {
    /// The stored answer, for a request with the same fingerprint.
    fn replay(&self) -> Outcome {
        Outcome::Replayed {
            status: u16::try_from(self.status).unwrap_or(202),
            body: self.body.clone(),
            event_id: self.event_id,
        }
    }
}

/// The idempotency records of the (device, key) pairs `devices[i]`, `keys[i]` that are
/// stored, by (device, key).
async fn look_up(
    client: &deadpool_postgres::Client,
    devices: &[&str],
    keys: &[&str],
) -> Result<HashMap<(String, String), StoredKey>, anyhow::Error> {
    let lookup = client.prepare_cached(LOOKUP).await?;
    let mut stored = HashMap::new();
    for row in client.query(&lookup, &[&devices, &keys]).await? {
        let key = StoredKey {
            fingerprint: row.get(2),
            status: row.get(3),
            body: row.get(4),
            event_id: row.get(5),
        };
        stored.insert((row.get(0), row.get(1)), key);
    }
    Ok(stored)
}

/// What a commit's statement stored, and its readings' outcomes.
struct Written {
    /// One a reading, `None` for a key stored before when its look-up failed.
    outcomes: Vec<Option<Outcome>>,
    /// Why the look-up of the stored answers failed, after the statement committed.
    look_up_failed: Option<anyhow::Error>,
}

/// One statement for the batch, and one look-up when some keys were already there.
/// `signal` is raised as soon as the statement committed outbox rows. An error means
/// nothing was stored, but for a connection lost as its commit went through, when it
/// cannot tell (it was stored whole or not at all; a retry under the same keys gets the
/// stored answer either way, as after a deadline that passed during a commit); a
/// look-up that fails after the statement committed still returns what it stored.
async fn write(
    client: &deadpool_postgres::Client,
    readings: &[&NewReading],
    signal: Option<&Signal>,
) -> Result<Written, anyhow::Error> {
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
    // Serialised straight into the statement's buffer (no JSON tree built first).
    let metrics: Vec<Json<&BTreeMap<String, f64>>> =
        readings.iter().map(|r| Json(&r.metrics)).collect();
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
    // The statement has committed (the rows are visible): wake the relays, also when
    // the look-up below fails.
    if let Some(signal) = signal.filter(|_| !inserted.is_empty()) {
        signal.raise(inserted.len());
    }
    let (lookup_devices, lookup_keys): (Vec<&str>, Vec<&str>) = readings
        .iter()
        .filter(|r| !inserted.contains(&r.event_id))
        .map(|r| (r.device_id.as_str(), r.idempotency_key.as_str()))
        .unzip();
    let (stored, look_up_failed) = if lookup_keys.is_empty() {
        (None, None)
    } else {
        match look_up(client, &lookup_devices, &lookup_keys).await {
            Ok(stored) => (Some(stored), None),
            Err(error) => (None, Some(error)),
        }
    };
    let outcomes = readings
        .iter()
        .map(|r| {
            if inserted.contains(&r.event_id) {
                return Some(Outcome::Accepted {
                    body: r.response_body.clone(),
                });
            }
            let stored = stored.as_ref()?;
            Some(
                match stored.get(&(r.device_id.clone(), r.idempotency_key.clone())) {
                    Some(key) if key.fingerprint[..] == r.fingerprint[..] => key.replay(),
                    Some(_) => Outcome::KeyReused,
                    None => Outcome::KeyInFlux,
                },
            )
        })
        .collect();
    Ok(Written {
        outcomes,
        look_up_failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submission_is_unavailable_only_when_the_commit_stored_none_of_it() {
        let failed = anyhow::anyhow!("look-up failed");
        let unanswered = Some(&failed);
        let accepted = Outcome::Accepted {
            body: "{}".to_owned(),
        };
        assert!(matches!(
            answer(vec![None, None], unanswered),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(
            answer(vec![Some(accepted.clone()), None], unanswered).ok(),
            Some(vec![accepted.clone(), Outcome::KeyInFlux]),
            "what was stored is accepted, the rest retried for its stored answer"
        );
        assert_eq!(
            answer(vec![Some(Outcome::KeyReused)], unanswered).ok(),
            Some(vec![Outcome::KeyReused])
        );
    }

    const LIMITS: GroupCommit = GroupCommit {
        batch_max: 10,
        concurrency: 2,
        parallel_min: 4,
        queue_capacity: 100,
        interval: Duration::ZERO,
    };

    type Answer = oneshot::Receiver<Result<Vec<Outcome>, StoreError>>;

    /// A submission of `readings`, with the receiver its request waits on (dropping
    /// that abandons the submission) and its room taken from a queue of its own.
    fn submission(readings: usize) -> (Pending, Answer) {
        let reading = NewReading::new(
            Reading {
                device_id: "sensor-1".to_owned(),
                recorded_at: None,
                metrics: BTreeMap::from([("temperature".to_owned(), 1.0)]),
            },
            "key".to_owned(),
            OffsetDateTime::UNIX_EPOCH,
        );
        let (reply, answer) = oneshot::channel();
        let room = Room::new(readings)
            .take(readings)
            .expect("an empty queue has room");
        let pending = Pending {
            readings: vec![reading; readings],
            reply,
            _room: room,
        };
        (pending, answer)
    }

    /// A batch of submissions of `sizes`, whose requests still wait.
    fn batch_of(sizes: &[usize]) -> (Batch, Vec<Answer>) {
        let mut batch = Batch::default();
        let mut answers = Vec::new();
        for &size in sizes {
            let (pending, answer) = submission(size);
            batch.add(pending, LIMITS.batch_max);
            answers.push(answer);
        }
        (batch, answers)
    }

    #[test]
    fn a_single_reading_starts_at_once_when_nothing_is_in_flight() {
        assert!(batch_of(&[1]).0.may_start(0, &LIMITS));
        assert!(!Batch::default().may_start(0, &LIMITS));
    }

    #[test]
    fn a_small_batch_waits_for_the_commit_in_flight() {
        assert!(!batch_of(&[1, 1, 1]).0.may_start(1, &LIMITS));
    }

    #[test]
    fn a_batch_of_parallel_min_starts_beside_others_up_to_the_concurrency() {
        assert!(batch_of(&[2, 2]).0.may_start(1, &LIMITS));
        assert!(!batch_of(&[2, 2]).0.may_start(2, &LIMITS));
    }

    #[test]
    fn only_a_batch_under_half_of_parallel_min_may_be_paced() {
        assert!(batch_of(&[1]).0.may_be_paced(&LIMITS));
        assert!(!batch_of(&[2]).0.may_be_paced(&LIMITS));
        assert!(!batch_of(&[25]).0.may_be_paced(&LIMITS));
    }

    #[test]
    fn a_submission_that_does_not_fit_is_carried_into_the_next_batch_whole() {
        let (mut batch, _answers) = batch_of(&[6, 5]);
        assert!(batch.is_full(LIMITS.batch_max));
        assert_eq!(batch.start_next().len(), 1);
        assert_eq!(batch.readings, 5);
        assert!(!batch.is_full(LIMITS.batch_max));
    }

    #[test]
    fn a_submission_larger_than_batch_max_still_commits_alone() {
        let (mut batch, _answers) = batch_of(&[25]);
        assert!(batch.is_full(LIMITS.batch_max));
        assert!(batch.may_start(0, &LIMITS));
        assert_eq!(batch.start_next().len(), 1);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_submission_whose_request_gave_up_is_dropped_not_gathered() {
        let room = Room::new(10);
        let (mut pending, answer) = submission(3);
        pending._room = room.take(3).expect("room for 3");
        drop(answer);
        let mut batch = Batch::default();
        batch.add(pending, LIMITS.batch_max);
        assert!(batch.is_empty());
        assert_eq!(batch.readings, 0);
        assert!(room.take(10).is_some(), "its room was given back");
    }

    #[test]
    fn the_room_counts_readings_not_submissions() {
        let room = Room::new(1_500);
        let first = room.take(1_000).expect("room for a full batch");
        assert!(room.take(1_000).is_none(), "a second one would make 2000");
        let small = room.take(500).expect("what is left");
        assert!(room.take(1).is_none());
        drop(first);
        assert!(
            room.take(1_000).is_some(),
            "the answered batch's room is free"
        );
        drop(small);
    }

    #[test]
    fn a_submission_larger_than_the_capacity_enters_only_an_empty_queue() {
        let room = Room::new(500);
        let one = room.take(1).expect("room for one");
        assert!(room.take(1_000).is_none(), "another reading waits");
        drop(one);
        let large = room.take(1_000).expect("alone it may enter");
        assert!(room.take(1).is_none(), "it holds the whole queue");
        drop(large);
        assert!(room.take(500).is_some());
    }

    #[test]
    fn a_capacity_of_zero_still_bounds_the_queue() {
        let room = Room::new(0);
        let one = room.take(1).expect("room for one");
        assert!(room.take(1).is_none());
        drop(one);
    }
}

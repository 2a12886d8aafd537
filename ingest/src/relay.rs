//! The outbox relay: PostgreSQL outbox rows become JetStream messages, at least once.
//!
//! One round: in a transaction, claim up to `batch_size` unpublished rows with
//! `FOR UPDATE SKIP LOCKED` (so any number of relays share the work), publish each with
//! `Nats-Msg-Id = event_id` without waiting, await all the PubAcks, and mark the acked
//! rows published with the stream sequence each ack returned, then commit. A crash
//! anywhere before the commit leaves the rows unpublished; the next round publishes
//! them again and JetStream drops the copies inside its duplicate window (a PubAck
//! with `duplicate: true` counts as success). Published rows are kept for
//! `published_retention_secs` (DESIGN.md §4), counted back from the newest stream check
//! that found the stream holding them, and then pruned in small batches; the relay
//! also deletes idempotency keys older than `ingest.idempotency_retention_secs`, and
//! vacuums a table it pruned once enough rows were deleted, so their space is reused
//! even where autovacuum is off or late.
//!
//! The relay wakes on `NOTIFY outbox` and polls every `poll_interval_ms` as a fallback.
//! Ingest sends that NOTIFY on a session of its own once a group commit that inserted
//! outbox rows has returned ([`crate::outbox_notify`]), not from inside the commit: a
//! transaction that queued a NOTIFY commits under a cluster-wide lock held until its
//! WAL flush, which serialised ingest's parallel commits (the trigger that did so was
//! dropped by migration 0004). A notification therefore always finds its rows
//! committed; one lost (an ingest crash right after a commit) costs a poll interval.
//! A claim starts at a floor below which every row is published (the module `claim_floor`), not
//! at the index's start, which holds the entries of every row marked since the last vacuum.
//! It runs `rounds_in_flight` rounds at once, so rows committed while one round marks
//! and commits are claimed by another right away. With `round_interval_ms` set (0 by
//! default) rounds under load are spaced that far apart so that each gathers more rows
//! ([`crate::pacing`]). It never exits because PostgreSQL or NATS is down: it backs off
//! and tries again. While NATS is not connected it starts no round, and a round stops
//! publishing once NATS is disconnected or a stop is asked for: the async-nats client
//! queues publishes while it reconnects and sends them after the reconnect, however late,
//! and a full queue holds each further publish for 5 s. Its JetStream context has an ack
//! permit for every row of every round in flight, twice over (`ack_permits`): a publish
//! waits for a permit, and with async-nats's default of 5,000 rounds of more rows between
//! them waited for each other for good.
//!
//! Between rounds it checks that the stream still holds what it published and
//! republishes what a NATS host crash lost (the module `stream_check`). Its PostgreSQL sessions
//! carry `idle_in_transaction_session_timeout`, so a relay paused mid-round (SIGSTOP, a
//! hung host) loses its session and its claimed rows go to another relay; the paused
//! relay's statements then fail and it carries on with a new connection. Nor does it
//! publish them when it resumes: a round publishes none of its rows once its claim is
//! older than that timeout.

mod claim_floor;
mod stream_check;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use contract::event::{headers, EVENT_TYPE, VERSION};
use contract::settings::{NatsSettings, Settings};
use contract::subjects::Subjects;
use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bootstrap::{self, Backoff, FailureLog};
use crate::pacing::Pacer;
use crate::sync::lock;
use crate::{db, http};
use claim_floor::{ClaimFloor, Probe, HORIZON, PROBE};

/// Runs a relay and its admin port on `admin_listener` until `shutdown`: `/healthz`,
/// `/readyz` (PostgreSQL and NATS) and `/metrics`. This is the `relay` binary's work;
/// tests run it in their own process.
pub async fn serve(
    settings: Settings,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate()?;
    let metrics = bootstrap::install_metrics();
    bootstrap::counters_from_zero(&[
        ("relay_published_total", &[]),
        ("relay_duplicate_acks_total", &[]),
        ("relay_marked_without_publishing_total", &[]),
        ("relay_retries_total", &[]),
        ("relay_republished_total", &[]),
        ("relay_lost_beyond_dedup_horizon_total", &[]),
        ("relay_errors_total", &[]),
    ]);
    let relay = Relay::connect(&settings, "relay").await?;
    for pruning in &relay.prunings {
        let table = [("table", pruning.table)];
        bootstrap::counters_from_zero(&[
            ("relay_pruned_total", &table),
            ("relay_vacuums_total", &table),
        ]);
    }
    let (pool, jetstream) = (relay.pool.clone(), relay.jetstream.clone());
    let streams_ready = relay.streams_ready.clone();
    let stream_unverified = relay.stream_unverified.clone();
    let publishing = relay.publishing.clone();
    let schema_current = Arc::new(AtomicBool::new(false));
    let readyz = move || {
        let (pool, jetstream) = (pool.clone(), jetstream.clone());
        let schema_current = schema_current.clone();
        // A relay whose stream check fails publishes nothing until one succeeds, and one
        // whose publishes JetStream refuses publishes nothing either.
        let streams_ready = streams_ready.load(Ordering::Acquire)
            && !lock(&stream_unverified).nats_failing
            && !lock(&publishing).refused_for(PUBLISHES_REFUSED_UNREADY);
        async move {
            let (postgres, jetstream_answers) = tokio::join!(
                http::postgres_and_schema_ready(&pool, &schema_current),
                bootstrap::jetstream_answers(&jetstream)
            );
            http::readiness(&[
                ("postgres", postgres.is_ok()),
                ("nats", streams_ready && jetstream_answers),
            ])
        }
    };
    tracing::info!(address = %admin_listener.local_addr()?, "relay admin listening");
    let admin_server = tokio::spawn(http::server::serve(
        admin_listener,
        http::admin_router(readyz, metrics),
        crate::connection_limits(&settings),
        shutdown.clone(),
    ));
    relay.run(shutdown).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_server).await;
    tracing::info!("relay stopped");
    Ok(())
}

/// Creates the event stream and its dead-letter stream, or brings their settings up to
/// date.
pub async fn ensure_streams(
    jetstream: &jetstream::Context,
    settings: &NatsSettings,
) -> anyhow::Result<()> {
    for config in stream_configs(settings) {
        ensure_stream(jetstream, config).await?;
    }
    Ok(())
}

/// Creates the dead-letter stream if it does not exist; one that does is left as it is
/// (its settings are the relay's to keep). The projector calls this when a dead letter
/// found no stream to take it (an operator removed it): else the poison message would
/// stay unacked for good, holding back the consumer's ack floor.
pub async fn create_dead_letter_stream(
    jetstream: &jetstream::Context,
    settings: &NatsSettings,
) -> anyhow::Result<()> {
    let [_, dead_letters] = stream_configs(settings);
    let name = dead_letters.name.clone();
    jetstream
        .get_or_create_stream(dead_letters)
        .await
        .with_context(|| format!("creating stream {name}"))?;
    Ok(())
}

/// How long the dead-letter stream knows its letters' ids when `nats.max_age_secs` is 0
/// (no age limit): a week.
const DEAD_LETTER_IDS_KEPT_WITHOUT_AGE_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The event stream's settings and the dead-letter stream's, as the relay owns them.
fn stream_configs(settings: &NatsSettings) -> [stream::Config; 2] {
    let subjects = Subjects::for_stream(&settings.stream);
    let max_age = Duration::from_secs(settings.max_age_secs);
    [
        stream::Config {
            name: subjects.stream().to_owned(),
            subjects: vec![subjects.recorded_filter()],
            storage: stream::StorageType::File,
            max_age,
            duplicate_window: Duration::from_secs(settings.duplicate_window_secs),
            description: Some("telemetry.recorded events, one per accepted reading".to_owned()),
            ..Default::default()
        },
        stream::Config {
            name: subjects.dlq_stream(),
            subjects: vec![subjects.dlq_filter()],
            storage: stream::StorageType::File,
            max_age,
            // A poison message comes back long after its letter was stored (a repair
            // delivers the last dedup horizon again; a projector killed between the
            // letter's ack and the termination starts again later): its letter's id
            // must be known for as long as the letter is kept, or a second letter of it
            // could be re-driven, and counted, twice. Dead letters are few.
            duplicate_window: if max_age.is_zero() {
                DEAD_LETTER_IDS_KEPT_WITHOUT_AGE_LIMIT
            } else {
                max_age
            },
            description: Some(
                "events the projector could not decode, with the reason in Dlq-Reason".to_owned(),
            ),
            ..Default::default()
        },
    ]
}

/// Creates the stream `config` names, or brings the settings the relay owns up to date.
/// Debian's nats-server 2.9 treats create and update loosely, so this looks first.
async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: stream::Config,
) -> anyhow::Result<()> {
    let name = config.name.clone();
    match jetstream.get_stream(&name).await {
        Ok(stream) => {
            let current = &stream.cached_info().config;
            let config = with_owned_settings(current, config);
            if config != *current {
                jetstream
                    .update_stream(config)
                    .await
                    .with_context(|| format!("updating stream {name}"))?;
            }
        }
        Err(_) => {
            jetstream
                .create_stream(config)
                .await
                .with_context(|| format!("creating stream {name}"))?;
        }
    }
    Ok(())
}

/// The stream `current` with the settings the relay owns taken from `wanted`: its
/// subjects, file storage, limits retention, acks on and not sealed (what every
/// guarantee rests on), age limit, duplicate window and description. No update can change the
/// storage, make a work-queue stream (or, before nats-server 2.10, an interest stream)
/// a limits one, nor unseal a stream: such a stream stays not ready.
/// Every other setting an operator gave it (replicas, limits in bytes or messages,
/// placement, `deny_delete`, ...) stays as it is.
fn with_owned_settings(current: &stream::Config, wanted: stream::Config) -> stream::Config {
    stream::Config {
        subjects: wanted.subjects,
        storage: wanted.storage,
        retention: wanted.retention,
        no_ack: wanted.no_ack,
        sealed: wanted.sealed,
        max_age: wanted.max_age,
        duplicate_window: wanted.duplicate_window,
        description: wanted.description,
        ..current.clone()
    }
}

/// Everything one relay needs; built once at start.
pub struct Relay {
    pool: Pool,
    jetstream: jetstream::Context,
    /// The stream settings it creates or updates at start.
    nats: NatsSettings,
    /// Where the `LISTEN outbox` connection goes.
    listen_config: tokio_postgres::Config,
    subjects: Subjects,
    /// How long the projector remembers the events it applied
    /// (`projector.dedup_horizon_secs`): the stream repair republishes lost events
    /// published within it (less a tenth), which the projector skips if it applied
    /// them, and not older ones, which it would count twice.
    projector_dedup_horizon: Duration,
    batch_size: i64,
    rounds_in_flight: usize,
    poll_interval: Duration,
    /// The tables pruned every `prune_interval`, in order.
    prunings: Vec<Pruning>,
    prune_batch: i64,
    prune_interval: Duration,
    stream_check_interval: Duration,
    /// When a lane last checked the stream; the periodic check is due for all lanes
    /// together, so one lane makes it.
    last_stream_check: Mutex<Instant>,
    /// Whether a stream check must succeed before any lane publishes more; shared.
    stream_unverified: Arc<Mutex<StreamUnverified>>,
    /// Dead row versions (pruned rows, and outbox rows marked published) of each table
    /// since the relay last vacuumed it.
    dead_since_vacuum: Mutex<BTreeMap<&'static str, u64>>,
    /// The PostgreSQL time of the newest stream check that found the stream holding
    /// what was published ([`stream_check`]); published rows are pruned only past their
    /// retention at that time, so a NATS host that lost its tail and stayed down longer
    /// than the retention still finds their rows kept to republish.
    stream_held_at: Mutex<Option<time::OffsetDateTime>>,
    /// Where claims start ([`claim_floor`]); shared by the lanes.
    claim_floor: Mutex<ClaimFloor>,
    /// How long a round's claim surely holds, counted from before it was sent: its
    /// session's idle-in-transaction timeout (`relay.idle_in_transaction_timeout_ms`).
    /// A round publishes none of its rows later than that: a relay paused after its
    /// claim (SIGSTOP, a hung host) has lost its session by then and another relay may
    /// have published the rows, and a copy sent past JetStream's duplicate window
    /// after that one would be stored (past the projector's horizon, counted twice).
    claim_holds_for: Duration,
    /// The PubAcks of rows whose round failed to mark them (PostgreSQL went away
    /// between the acks and the commit), so that the round that claims them again marks
    /// them instead of publishing them again; shared by the lanes.
    acked_unmarked: Mutex<AckedUnmarked>,
    /// When the next round may start ([`crate::pacing`]); shared by the lanes.
    pacer: Mutex<Pacer>,
    /// Whether the streams were created or brought up to date since the start. Until
    /// then nothing can be published (a NATS server without JetStream, a stream whose
    /// settings cannot be updated, such as its storage), so `/readyz` names `nats`
    /// though the connection is up; after it, so does JetStream not answering
    /// ([`bootstrap::jetstream_answers`]).
    streams_ready: Arc<AtomicBool>,
    /// Whether the rounds' publishes get through; `/readyz` names `nats` while none has
    /// for [`PUBLISHES_REFUSED_UNREADY`].
    publishing: Arc<Mutex<Publishing>>,
}

/// What one claim-publish-mark round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Round {
    /// Rows it claimed.
    claimed: usize,
    /// Of those, the rows it marked published (the rest stay in the outbox).
    marked: usize,
    /// The first publish JetStream did not acknowledge: its event id and why.
    refused: Option<String>,
}

impl Round {
    /// Why not every claimed row was marked: how many were not, and the first refusal.
    fn shortfall(&self) -> String {
        let not_marked = self.claimed - self.marked;
        match &self.refused {
            Some(refused) => format!(
                "{not_marked} of {} rows not marked; first refused: {refused}",
                self.claimed
            ),
            None => format!("{not_marked} of {} rows not marked", self.claimed),
        }
    }
}

/// Since when every round that published had none of its publishes acknowledged:
/// JetStream refuses them (a stream full under `discard new`, the account out of
/// storage, a sealed stream, a user without the right to publish) or does not answer
/// them.
#[derive(Debug, Default)]
struct Publishing {
    refused_since: Option<Instant>,
}

impl Publishing {
    /// One round's publishes ended, `acknowledged` of them acknowledged (at least one
    /// was published: a round that published nothing tells nothing).
    fn publishes_ended(&mut self, acknowledged: usize) {
        if acknowledged > 0 {
            self.refused_since = None;
        } else {
            self.refused_since.get_or_insert_with(Instant::now);
        }
    }

    /// The outbox holds nothing to publish: nothing is refused now, whoever published
    /// the rows (another relay may have, while this one's claims found them taken).
    fn nothing_waits(&mut self) {
        self.refused_since = None;
    }

    /// Whether no round got a publish through for `limit` or longer.
    fn refused_for(&self, limit: Duration) -> bool {
        self.refused_since
            .is_some_and(|since| since.elapsed() >= limit)
    }
}

/// How long the rounds' publishes may all fail before `/readyz` names `nats`: two rounds
/// that wait out their `ACK_DEADLINE`, and the backoff between, so that one failed round
/// (a NATS restart, a leader election) does not.
pub const PUBLISHES_REFUSED_UNREADY: Duration = Duration::from_secs(15);

impl Relay {
    /// Opens the pool and the NATS connection (in the background: NATS may be down).
    pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<Self> {
        let mut session_config = db::pg_config(&settings.database)?;
        // Bitmap scans off: the claim then walks `outbox_unpublished` in id order and
        // marks the entries of rows it finds published as dead, so later claims skip
        // them; a bitmap scan rechecks every published row still in the index on every
        // claim (measured: 12 ms per claim with 40,000 published rows since the last
        // vacuum, 0.9 ms with the index scan).
        // Appended to the URL's own `options` (a `search_path`, say), which ingest and the
        // listening session keep too: later settings win, so these two stay the relay's.
        let options = format!(
            "{} -c idle_in_transaction_session_timeout={} -c enable_bitmapscan=off",
            session_config.get_options().unwrap_or_default(),
            settings.relay.idle_in_transaction_timeout_ms
        );
        session_config.options(options.trim_start());
        let pool = db::pool_with_config(session_config, &settings.database)?;
        let client = bootstrap::connect_nats(&settings.nats.url, name).await?;
        Self::new(settings, pool, client)
    }

    fn new(settings: &Settings, pool: Pool, client: async_nats::Client) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            // A publish waits for a permit that its PubAck (awaited or given up) returns;
            // async-nats has 5,000 by default, and rounds whose publishes need more than
            // that between them waited for each other's permits for good.
            jetstream: jetstream::ContextBuilder::new()
                .max_ack_inflight(ack_permits(
                    settings.relay.batch_size,
                    settings.relay.rounds_in_flight,
                ))
                .ack_timeout(ACK_DEADLINE)
                .build(client),
            nats: settings.nats.clone(),
            listen_config: db::pg_config(&settings.database)?,
            subjects: Subjects::for_stream(&settings.nats.stream),
            projector_dedup_horizon: Duration::from_secs(settings.projector.dedup_horizon_secs),
            batch_size: settings.relay.batch_size,
            rounds_in_flight: settings.relay.rounds_in_flight.max(1),
            poll_interval: Duration::from_millis(settings.relay.poll_interval_ms),
            prunings: Pruning::configured(settings),
            prune_batch: settings.relay.prune_batch,
            prune_interval: Duration::from_millis(settings.relay.prune_interval_ms),
            stream_check_interval: Duration::from_millis(settings.relay.stream_check_interval_ms),
            dead_since_vacuum: Mutex::default(),
            stream_held_at: Mutex::default(),
            claim_floor: Mutex::default(),
            claim_holds_for: Duration::from_millis(settings.relay.idle_in_transaction_timeout_ms),
            acked_unmarked: Mutex::default(),
            pacer: Mutex::new(Pacer::new(
                Duration::ZERO,
                Duration::from_millis(settings.relay.round_interval_ms),
            )),
            last_stream_check: Mutex::new(Instant::now()),
            stream_unverified: Arc::default(),
            streams_ready: Arc::default(),
            publishing: Arc::default(),
        })
    }

    /// Relays until `shutdown`. A round in progress publishes no more of its rows, awaits
    /// the acks of those it published (at most until its `ACK_DEADLINE`, not at all while
    /// NATS is not connected: they cannot come before the process ends), marks the
    /// acknowledged rows and hands the rest back to the outbox.
    pub async fn run(&self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen_for_inserts(
            self.listen_config.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
        // The backlog's gauges and the prunes from the start: a relay started while NATS
        // is down reports the backlog growing, which its alert is for, and prunes what
        // needs no stream (the outbox's prune waits for a stream check). Until
        // 2026-12-07 they began only once the streams were ready.
        tokio::join!(self.publish(&wake, &shutdown), self.maintain(&shutdown));
        listener.abort();
    }

    /// Makes sure of the streams, then publishes until `shutdown`.
    async fn publish(&self, wake: &Notify, shutdown: &CancellationToken) {
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            // While NATS is down an attempt waits out two JetStream request timeouts
            // (10 s): a shutdown ends it rather than waits for it.
            let ensured = tokio::select! {
                _ = shutdown.cancelled() => return,
                ensured = ensure_streams(&self.jetstream, &self.nats) => ensured,
            };
            match ensured {
                Ok(()) => {
                    self.streams_ready.store(true, Ordering::Release);
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "streams not ready, retrying");
                    backoff.sleep(shutdown).await;
                }
            }
        }
        // Several lanes of rounds: while one marks and commits its rows, another claims
        // what was inserted meanwhile (SKIP LOCKED keeps their rows apart).
        let lanes = (0..self.rounds_in_flight).map(|_| self.publish_rounds(wake, shutdown));
        futures::future::join_all(lanes).await;
    }

    /// Rounds one after another while a backlog fills them, else on NOTIFY or the poll.
    async fn publish_rounds(&self, wake: &Notify, shutdown: &CancellationToken) {
        let mut backoff = Backoff::default();
        // Rounds that failed or marked only part of their rows, in series.
        let mut rounds = FailureLog::default();
        while !shutdown.is_cancelled() {
            // No round while NATS is not connected: its publishes would only fill the
            // client's queue, to be sent after the reconnect whether or not the round
            // still waits for them, and a full queue holds each further publish for
            // async-nats's send timeout (5 s).
            if !self.nats_connected_or_stopping(shutdown).await {
                break;
            }
            // A (re)connect may be to a NATS server that restarted with less than it had:
            // check before publishing more, whichever lane noticed.
            let connects = self.connects();
            let due = lock(&self.stream_unverified).due(connects);
            if let Some(collided) = due.or_else(|| self.periodic_stream_check_due().then(Vec::new))
            {
                // A stop while NATS is gone does not wait for the check's requests, which
                // cannot be answered before the process ends (nor do the rounds' acks);
                // a repair cut short is rolled back with its transaction.
                let checked = tokio::select! {
                    checked = self.check_stream(&collided) => checked,
                    () = self.stopping_while_disconnected(shutdown) => break,
                };
                if let Err(error) = checked {
                    // No lane publishes until a check succeeds: new publishes would take
                    // the sequences a lost tail freed, and a later check that probed one
                    // of them would find it held, letting the prune delete the rows of
                    // what was lost before any repair.
                    lock(&self.stream_unverified).failed(!from_postgres(&error));
                    metrics::counter!("relay_errors_total").increment(1);
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "stream check failed, publishing nothing until one succeeds"
                    );
                    backoff.sleep(shutdown).await;
                    continue;
                }
                lock(&self.stream_unverified).checked(&collided, connects);
            }
            match self.relay_once(shutdown, connects).await {
                Ok(round) => {
                    lock(&self.pacer).finished(round.marked);
                    if round.marked < round.claimed && !shutdown.is_cancelled() {
                        // Some rows went through: what failed is theirs alone (a row
                        // JetStream refuses for good, say), and the next round goes at
                        // once, for the rest of the outbox and the rows handed back.
                        // Only a round that marked nothing backs off; until 2026-12-07
                        // every partial round did, and one row that always failed held
                        // the relay to a few hundred rows a second. The backoff starts
                        // over only after a round that marked all it claimed, so such a
                        // row, alone in a round between partial ones, waits ever
                        // longer (up to 5 s) rather than 100 ms each time.
                        metrics::counter!("relay_errors_total").increment(1);
                        rounds.failed(
                            &round.shortfall(),
                            "a relay round marked only part of its rows; the rest stays in the outbox",
                            "again a relay round marked only part of its rows",
                        );
                        continue;
                    }
                    backoff.reset();
                    rounds.succeeded("relay rounds mark every row they claim again");
                    if round.claimed as i64 == self.batch_size {
                        continue;
                    }
                }
                Err(error) => {
                    match error.downcast::<stream_check::SequenceCollision>() {
                        // The stream handed out a sequence a kept row holds: it lost messages.
                        Ok(collision) => {
                            tracing::info!(
                                "a published sequence is already recorded for another row, checking the stream"
                            );
                            lock(&self.stream_unverified).collided(collision.sequences);
                        }
                        Err(error) => {
                            metrics::counter!("relay_errors_total").increment(1);
                            // One WARN for a series of failed or partial rounds, not
                            // one a round: a row refused for good makes a long one.
                            rounds.failed(
                                &format!("{error:#}"),
                                "relay round failed, backing off",
                                "again a relay round failed, backing off",
                            );
                        }
                    }
                    backoff.sleep(shutdown).await;
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
            // Unpaced (the default) the slot is always now: no timer for it.
            let now = tokio::time::Instant::now();
            let start = lock(&self.pacer).reserve(now);
            if start > now {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(start) => {}
                }
            }
        }
    }

    /// Backlog gauges every 2 s and pruning (with its vacuum) every `prune_interval`,
    /// beside the rounds, so a long delete or VACUUM never holds a publish back; and
    /// beside each other, so it never holds the gauges back either (nor the alert on a
    /// growing backlog, nor readiness's reset). Until 2026-12-07 one loop ran both, and
    /// the gauges stood still for as long as a prune took.
    async fn maintain(&self, shutdown: &CancellationToken) {
        let report = async {
            let mut report = tokio::time::interval(BACKLOG_REPORT_INTERVAL);
            report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = report.tick() => {}
                }
                self.report_backlog().await;
            }
        };
        let prune = async {
            // Not more often than the gauges (0 included), as when one loop ran both.
            let every = self.prune_interval.max(BACKLOG_REPORT_INTERVAL);
            let mut prune = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // A stop does not wait for a prune (hours of rows past their retention,
                // a delete waiting on a lock, a long vacuum): the statement under way is
                // cancelled, and what was deleted before it stays deleted.
                let pruned = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    pruned = async {
                        prune.tick().await;
                        self.prune().await
                    } => pruned,
                };
                if let Err(error) = pruned {
                    tracing::warn!(error = format!("{error:#}"), "pruning failed");
                }
            }
        };
        tokio::join!(report, prune);
    }

    /// One claim-publish-mark round on the connection numbered `checked_connects`, the
    /// one the stream check gate let it start on: how many rows it claimed and how many
    /// of them it marked published. A round that claimed rows and marked none (but for
    /// a stop) is an error.
    async fn relay_once(
        &self,
        shutdown: &CancellationToken,
        checked_connects: u64,
    ) -> anyhow::Result<Round> {
        let mut client = self.pool.get().await.context("getting a connection")?;
        let transaction = client.transaction().await?;
        // Prepared once per session: a round is then one message per statement, with no
        // parse and plan in PostgreSQL (both were ~1% of its CPU at 2,000 readings/s).
        let probe = transaction.prepare_cached(PROBE).await?;
        let claim = transaction.prepare_cached(CLAIM).await?;
        let horizon = transaction.prepare_cached(HORIZON).await?;
        // One round trip for the three, run in the order polled (each is sent at its
        // first poll): the probe, then the claim, which starts at the floor as it
        // stands, then the transaction id the claim's locks gave the round, which the
        // probe's bound waits on before it moves the floor for the rounds after.
        let (floor, epoch) = lock(&self.claim_floor).current();
        let claim_sent = Instant::now();
        let (probed, rows, horizon) = futures::try_join!(
            async {
                let probed = transaction.query_one(&probe, &[&floor]).await;
                probed.context("probing the claim floor")
            },
            async {
                let rows = transaction.query(&claim, &[&self.batch_size, &floor]).await;
                rows.context("claiming outbox rows")
            },
            async {
                let horizon = transaction.query_one(&horizon, &[]).await;
                horizon.context("reading the round's transaction id")
            },
        )?;
        lock(&self.claim_floor).observe(Probe {
            xmin: probed.get(0),
            horizon: horizon.get(0),
            bound: probed.get(1),
            epoch,
        });
        if rows.is_empty() {
            return Ok(Round::default());
        }
        let claimed = rows.len();
        let round = self
            .publish_and_mark(transaction, rows, shutdown, (checked_connects, claim_sent))
            .await;
        // Rows this round claimed but did not mark stay in the outbox; a later round
        // publishes them again.
        let handed_back = match &round {
            Ok((marked, _)) => claimed - marked,
            Err(_) => claimed,
        };
        metrics::counter!("relay_retries_total").increment(handed_back as u64);
        let (marked, refused) = round?;
        let round = Round {
            claimed,
            marked,
            refused,
        };
        // Rows a stop handed back are the stop's doing, not a failed round.
        if marked == 0 && !shutdown.is_cancelled() {
            anyhow::bail!("{}", round.shortfall());
        }
        Ok(round)
    }

    /// Publishes the claimed rows, awaits their PubAcks, marks the acknowledged ones
    /// and commits; returns how many rows it marked published, and the first publish
    /// not acknowledged (its event id and why). It publishes no more
    /// once a stream check is due (a reconnect past `checked_connects`, another lane's
    /// collision or failed check): the gate is passed at the round's start only; nor
    /// once the claim, sent at `claim_sent`, may have lapsed ([`Relay::claim_holds_for`]).
    async fn publish_and_mark(
        &self,
        transaction: deadpool_postgres::Transaction<'_>,
        rows: Vec<tokio_postgres::Row>,
        shutdown: &CancellationToken,
        (checked_connects, claim_sent): (u64, Instant),
    ) -> anyhow::Result<(usize, Option<String>)> {
        let connects_before = self.connects();
        // Rows an earlier round published and got PubAcks for but could not mark are
        // marked with those sequences, where the stream still holds them, and not
        // published again; those it could not check in time are left for a later round.
        let taken =
            lock(&self.acked_unmarked).take(rows.iter().map(|row| (row.get(0), row.get(1))));
        let (reused, unchecked) = self
            .still_held(
                taken
                    .iter()
                    .map(|(&key, ack)| (key, ack.sequence))
                    .collect(),
            )
            .await;
        let waiting = if unchecked.is_empty() {
            HashSet::new()
        } else {
            let waiting: HashSet<(i64, Uuid)> = unchecked.keys().copied().collect();
            let rounds = lock(&self.acked_unmarked).keep_unchecked(&taken, unchecked);
            if rounds == UNCHECKED_ROUNDS_TO_WARN {
                // Once a streak: the rows wait for good while NATS cannot answer.
                tracing::warn!(
                    rows = waiting.len(),
                    rounds,
                    "remembered acks could not be checked against the stream for many rounds; their rows wait until NATS answers the stream's message fetches"
                );
            } else {
                tracing::info!(
                    rows = waiting.len(),
                    rounds,
                    "remembered acks could not be checked against the stream in time; their rows wait for a round that can check them"
                );
            }
            waiting
        };
        // The rest is published, but for rows a stream check made unpublished again
        // whose republish deadline passed (`republish_before`): the projector no longer
        // remembers applying them, so a copy now would count twice. They are marked
        // published without a sequence, as the check does with older ones.
        let (too_late, to_publish): (Vec<&tokio_postgres::Row>, Vec<_>) = rows
            .iter()
            .filter(|row| {
                let key = (row.get(0), row.get(1));
                !reused.contains_key(&key) && !waiting.contains(&key)
            })
            .partition(|row| row.get::<_, bool>(4));
        let too_late: Vec<i64> = too_late.iter().map(|row| row.get(0)).collect();
        let started = Instant::now();
        let client = self.jetstream.client();
        // The rows are published in order, and only while NATS is connected and no stop
        // is asked for. Those left out are not marked: the round's commit (or its end)
        // hands them back to the outbox for a later round, as it does those whose acks
        // do not come.
        let mut published_ids = Vec::with_capacity(rows.len());
        let mut event_ids = Vec::with_capacity(rows.len());
        let mut sequences = Vec::with_capacity(rows.len());
        for (&(row_id, event_id), &sequence) in &reused {
            published_ids.push(row_id);
            event_ids.push(event_id);
            sequences.push(sequence);
        }
        let mut acks = Vec::with_capacity(rows.len());
        let mut left_out = None;
        // One timer for the round, not one a row.
        let lapse = tokio::time::sleep_until(tokio::time::Instant::from_std(
            claim_sent + self.claim_holds_for,
        ));
        tokio::pin!(lapse);
        for row in to_publish {
            if shutdown.is_cancelled() {
                left_out = Some("the relay is stopping");
                break;
            }
            // A publish given to the client while it is not connected waits in its
            // queue and goes out after the reconnect, whenever that is, although this
            // round may have given the row back by then and another relay published it.
            if !bootstrap::nats_connected(&client) {
                left_out = Some("NATS is not connected");
                break;
            }
            if self.connects() != checked_connects || lock(&self.stream_unverified).due {
                left_out = Some("a stream check is due");
                break;
            }
            let event_id: Uuid = row.get(1);
            let device_id: &str = row.get(2);
            let payload: Vec<u8> = row.get(3);
            let mut message_headers = async_nats::HeaderMap::new();
            message_headers.insert(headers::MSG_ID, event_id.to_string().as_str());
            message_headers.insert(headers::CONTENT_TYPE, "application/json");
            message_headers.insert(headers::EVENT_TYPE, EVENT_TYPE);
            message_headers.insert(headers::EVENT_VERSION, VERSION.to_string().as_str());
            let publish = self.jetstream.publish_with_headers(
                self.subjects.recorded(device_id),
                message_headers,
                payload.into(),
            );
            // A publish is ready at once unless it waits for an ack permit or for room in
            // the client's queue, which the client empties only while connected: that
            // wait gives way to a stop or a disconnect (a publish dropped while it waits
            // was not queued, so it is not sent).
            let ack = tokio::select! {
                biased;
                // First: a claim that may have lapsed sends nothing more, even a publish
                // ready after a wait for a permit or a pause.
                () = &mut lapse => {
                    left_out = Some("the claim may have lapsed with its session");
                    break;
                }
                ack = publish => ack,
                _ = shutdown.cancelled() => {
                    left_out = Some("the relay is stopping");
                    break;
                }
                () = self.disconnected() => {
                    left_out = Some("NATS is not connected");
                    break;
                }
            };
            // The client's queue stayed full for its send timeout (5 s): NATS does not
            // take what is written to it, and the rest would each wait as long.
            let queue_stuck =
                matches!(&ack, Err(error) if error.kind() == PublishErrorKind::TimedOut);
            acks.push((row, ack));
            if queue_stuck {
                left_out = Some("a publish waited out its send timeout");
                break;
            }
        }
        let published = acks.len();
        if let Some(reason) = left_out {
            tracing::info!(
                published,
                claimed = rows.len(),
                reason,
                "publishing the round stopped early; the rest stays in the outbox"
            );
        }
        let mut refused = None;
        let collected = async {
            for (row, ack) in acks {
                let acked = match ack {
                    Ok(future) => future
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|ack| acknowledged_sequence(&ack, &self.nats.stream)),
                    Err(error) => Err(anyhow::Error::from(error)),
                };
                match acked {
                    Ok(sequence) => {
                        published_ids.push(row.get::<_, i64>(0));
                        event_ids.push(row.get::<_, Uuid>(1));
                        sequences.push(sequence);
                    }
                    Err(error) => {
                        refused.get_or_insert_with(|| {
                            format!("event {}: {error:#}", row.get::<_, Uuid>(1))
                        });
                    }
                }
            }
        };
        // A publish written to a connection that then dropped gets no ack: rather than
        // wait out the ack timeout (5 s) for it, the acks still missing shortly after a
        // reconnect are given up on, and the round marks what was acknowledged (one
        // that marked nothing fails); the next round publishes the rest again (JetStream drops any copy of
        // what did arrive, by its message id). Without a reconnect (NATS down or hung)
        // the missing acks are given up on together after `ACK_DEADLINE`, or at once
        // when the relay is stopping.
        tokio::select! {
            biased;
            () = collected => {}
            () = self.reconnected_since(connects_before) => {
                tracing::warn!(
                    acknowledged = published_ids.len(),
                    published,
                    "NATS reconnected while the round awaited its acks; publishing the rest again"
                );
            }
            () = tokio::time::sleep(ACK_DEADLINE) => {
                tracing::warn!(
                    acknowledged = published_ids.len(),
                    published,
                    "acks still missing at the round's deadline; publishing the rest again"
                );
            }
            () = self.stopping_while_disconnected(shutdown) => {
                tracing::info!(
                    acknowledged = published_ids.len(),
                    published,
                    "stopping while NATS is not connected; the unacknowledged rows stay in the outbox"
                );
            }
        }
        // From the first publish sent to the last PubAck received: rounds that sent none
        // (acks remembered from an earlier round, rows held back or past their deadline)
        // would pull its figures towards 0.
        if published > 0 {
            metrics::histogram!("relay_publish_seconds").record(started.elapsed().as_secs_f64());
        }
        // What JetStream did with this round's publishes, whatever becomes of the mark;
        // acks given up on for a stop say nothing.
        if published > 0 && !shutdown.is_cancelled() {
            lock(&self.publishing).publishes_ended(published_ids.len() - reused.len());
        }
        let marked = async {
            let mark = transaction.prepare_cached(MARK).await?;
            transaction
                .execute(&mark, &[&published_ids, &sequences])
                .await?;
            if !too_late.is_empty() {
                let strip = transaction.prepare_cached(STRIP_TOO_LATE).await?;
                transaction.execute(&strip, &[&too_late]).await?;
            }
            transaction.commit().await
        };
        if let Err(error) = marked.await {
            let collided = stream_check::is_sequence_collision(&error);
            let error = anyhow::Error::from(error).context("marking rows published");
            if collided {
                return Err(error.context(stream_check::SequenceCollision { sequences }));
            }
            // The acks stand: past JetStream's duplicate window (PostgreSQL down for
            // longer, say) a copy published again would be stored, and past the
            // projector's horizon counted twice.
            lock(&self.acked_unmarked)
                .remember(published_ids.iter().zip(&event_ids).zip(&sequences));
            return Err(error);
        }
        self.not_republished(
            too_late.len() as u64,
            "by a round, past the repair's deadline",
        );
        metrics::counter!("relay_marked_without_publishing_total").increment(reused.len() as u64);
        metrics::counter!("relay_published_total").increment(published_ids.len() as u64);
        metrics::histogram!("relay_batch_size").record(rows.len() as f64);
        // Each marked row left a dead version behind, and a dead entry in the
        // unpublished index that every claim walks past until a vacuum.
        self.count_dead("outbox", (published_ids.len() + too_late.len()) as u64);
        metrics::histogram!("relay_round_seconds").record(started.elapsed().as_secs_f64());
        Ok((published_ids.len() + too_late.len(), refused))
    }

    /// How many times the NATS client has connected so far.
    fn connects(&self) -> u64 {
        self.jetstream
            .client()
            .statistics()
            .connects
            .load(Ordering::Relaxed)
    }

    /// Ends `ACK_GRACE_AFTER_RECONNECT` after the client connected again, if it does
    /// after `connects_before` connections.
    async fn reconnected_since(&self, connects_before: u64) {
        while self.connects() == connects_before {
            tokio::time::sleep(RECONNECT_POLL).await;
        }
        tokio::time::sleep(ACK_GRACE_AFTER_RECONNECT).await;
    }

    /// Waits until the NATS client is connected; false if a stop came first.
    async fn nats_connected_or_stopping(&self, shutdown: &CancellationToken) -> bool {
        if !bootstrap::nats_connected(&self.jetstream.client()) {
            tracing::debug!("NATS not connected, waiting for it before the next round");
        }
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = self.nats_state(true) => !shutdown.is_cancelled(),
        }
    }

    /// Ends once the NATS client is not connected.
    async fn disconnected(&self) {
        self.nats_state(false).await;
    }

    /// Ends once whether the NATS client is connected is `connected` (polled every
    /// `RECONNECT_POLL`).
    async fn nats_state(&self, connected: bool) {
        let client = self.jetstream.client();
        while bootstrap::nats_connected(&client) != connected {
            tokio::time::sleep(RECONNECT_POLL).await;
        }
    }

    /// Ends once a stop is asked for while NATS is not connected. The acks a round still
    /// awaits then cannot come before the process ends (the client's buffered publishes
    /// die with it), so the round hands their rows back rather than wait out
    /// `ACK_DEADLINE`. While NATS is connected, the round waits for its acks as usual.
    async fn stopping_while_disconnected(&self, shutdown: &CancellationToken) {
        shutdown.cancelled().await;
        self.disconnected().await;
    }

    /// Publishes the outbox backlog (rows and age of the oldest) and the stream's last
    /// sequence as gauges.
    ///
    /// Each reading gets a second. The backlog's two statements run on one connection,
    /// the age first, so that it is reported even when counting a large backlog takes
    /// longer (the age is what alerts). Statements given up at the deadline are
    /// cancelled, not left queued on a pooled connection for a round's claim to wait
    /// behind ([`db::cancel_if_given_up`]): a lock on the outbox holds them up for as
    /// long as it is held.
    async fn report_backlog(&self) {
        // Every row below the floor is published: neither statement reads the index
        // entries below it, which a claim skips for the same reason.
        let (floor, _) = lock(&self.claim_floor).current();
        let backlog = db::on_pooled(&self.pool, "outbox backlog gauge", async |client| {
            let oldest = async {
                if let Ok(row) = client.query_one(OLDEST_UNPUBLISHED_AGE, &[&floor]).await {
                    metrics::gauge!("relay_outbox_oldest_age_seconds").set(row.get::<_, f64>(0));
                }
            };
            let rows = async {
                if let Ok(row) = client.query_one(UNPUBLISHED_ROWS, &[&floor]).await {
                    let unpublished = row.get::<_, i64>(0);
                    metrics::gauge!("relay_outbox_backlog_rows").set(unpublished as f64);
                    if unpublished == 0 {
                        lock(&self.publishing).nothing_waits();
                    }
                }
            };
            futures::join!(oldest, rows);
            Ok::<(), std::convert::Infallible>(())
        });
        // Neither gauge moves when no connection answered in time.
        let _ = tokio::time::timeout(Duration::from_secs(1), backlog).await;
        let last_sequence = async {
            let mut stream = self
                .jetstream
                .get_stream(self.subjects.stream())
                .await
                .ok()?;
            stream
                .info()
                .await
                .ok()
                .map(|info| info.state.last_sequence)
        };
        if let Ok(Some(sequence)) =
            tokio::time::timeout(Duration::from_secs(1), last_sequence).await
        {
            metrics::gauge!("relay_stream_last_sequence").set(sequence as f64);
        }
    }

    /// Whether the periodic stream check is due; if so, the caller makes it and the
    /// other lanes wait for the next interval.
    fn periodic_stream_check_due(&self) -> bool {
        let mut last = lock(&self.last_stream_check);
        if last.elapsed() <= self.stream_check_interval {
            return false;
        }
        *last = Instant::now();
        true
    }

    /// Adds `rows` dead row versions of `table`; returns those since its last vacuum.
    fn count_dead(&self, table: &'static str, rows: u64) -> u64 {
        let mut counts = lock(&self.dead_since_vacuum);
        let count = counts.entry(table).or_default();
        *count += rows;
        *count
    }

    /// Deletes the rows of each [`Pruning`] past their retention, a small batch per
    /// statement so that ingest never waits on a long delete. Dropped half-way (a stop),
    /// it cancels the statement under way.
    async fn prune(&self) -> anyhow::Result<()> {
        db::on_pooled(&self.pool, "pruning", async |client| {
            self.prune_on(client).await
        })
        .await
    }

    /// [`Self::prune`], on `client`.
    async fn prune_on(&self, client: &deadpool_postgres::Client) -> anyhow::Result<()> {
        for Pruning {
            table,
            statement,
            retention_secs,
            until,
        } in &self.prunings
        {
            let table = *table;
            // None: PostgreSQL's now().
            let until: Option<time::OffsetDateTime> = match until {
                PruneUntil::Now => None,
                PruneUntil::StreamHeld => match *lock(&self.stream_held_at) {
                    Some(held_at) => Some(held_at),
                    None => continue,
                },
            };
            let mut pruned = 0;
            loop {
                // Sent as text, not prepared: each execution is planned with its values
                // (a generic plan would guess that a third of the table is past the
                // retention, the guess that made the sequential scans below).
                let deleted = client
                    .execute(
                        statement.as_str(),
                        &[retention_secs, &self.prune_batch, &until],
                    )
                    .await
                    .with_context(|| format!("pruning {table}"))?;
                metrics::counter!("relay_pruned_total", "table" => table).increment(deleted);
                pruned += deleted;
                if (deleted as i64) < self.prune_batch {
                    break;
                }
            }
            self.vacuum_when_due(client, table, pruned)
                .await
                .with_context(|| format!("vacuuming {table}"))?;
        }
        Ok(())
    }

    /// Deleted rows leave dead tuples; until a vacuum marks their space free, every
    /// insert takes new pages and a pruned table grows for ever although its row count
    /// stays flat. Autovacuum does that where it is on (it is off on this project's CI
    /// server, and it may lag), so the relay vacuums a table itself once the dead rows it
    /// left since its last vacuum (pruned rows; for the outbox also the old versions of
    /// rows it marked published) reach a fifth of the rows the table holds
    /// (autovacuum's default threshold) and at least `prune_batch`. A plain VACUUM
    /// takes no lock that inserts or deletes wait for; `SKIP_LOCKED` passes a table that
    /// another relay or autovacuum is vacuuming, and `TRUNCATE false` avoids the brief
    /// exclusive lock of cutting off the table's empty tail, which would stall ingest.
    async fn vacuum_when_due(
        &self,
        client: &deadpool_postgres::Client,
        table: &'static str,
        pruned: u64,
    ) -> anyhow::Result<()> {
        let since_vacuum = self.count_dead(table, pruned);
        if since_vacuum < self.prune_batch as u64 {
            return Ok(());
        }
        let rows: f32 = client
            .query_one(
                "SELECT greatest(reltuples, 0)::float4 FROM pg_class WHERE oid = $1::text::regclass",
                &[&table],
            )
            .await?
            .get(0);
        if (since_vacuum as f64) < f64::from(rows) / 5.0 {
            return Ok(());
        }
        let started = Instant::now();
        client
            .batch_execute(&format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {table}"))
            .await?;
        lock(&self.dead_since_vacuum).insert(table, 0);
        metrics::counter!("relay_vacuums_total", "table" => table).increment(1);
        tracing::debug!(
            table,
            since_vacuum,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "vacuumed"
        );
        Ok(())
    }
}

/// The stream sequence a PubAck gives its row, or why it does not count as one: an ack
/// from another stream (one that also captures the subject, made by an operator) or
/// with sequence 0 (a clustered 2.9 server's answer to a duplicate whose original is
/// still being replicated) would mark the row published where the stream may not hold
/// it; the row stays unpublished and goes out again.
fn acknowledged_sequence(
    ack: &async_nats::jetstream::publish::PublishAck,
    stream: &str,
) -> anyhow::Result<i64> {
    if ack.stream != stream {
        anyhow::bail!("acknowledged by stream {:?}, not {stream:?}", ack.stream);
    }
    let sequence = i64::try_from(ack.sequence)
        .ok()
        .filter(|&sequence| sequence > 0)
        .with_context(|| format!("acknowledged with sequence {}", ack.sequence))?;
    if ack.duplicate {
        metrics::counter!("relay_duplicate_acks_total").increment(1);
    }
    Ok(sequence)
}

/// Whether PostgreSQL (a query, or the pool's connection) failed `error`.
fn from_postgres(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<tokio_postgres::Error>() || cause.is::<deadpool_postgres::PoolError>()
    })
}

/// Whether the stream must be checked before any lane publishes more, and what with.
/// Shared by the lanes: a check one lane needs holds every lane's publishing back.
#[derive(Debug, Default)]
struct StreamUnverified {
    /// The NATS client's connect count the last check was due for: a relay's first
    /// connection and every reconnect (a server restarted with less than it had, say)
    /// make a check due.
    connects_checked: u64,
    /// A check is due (a reconnect, a collision, a failed check) and none succeeded yet.
    due: bool,
    /// The last check failed on NATS's side (not PostgreSQL's, which `/readyz` names
    /// on its own) and none succeeded since.
    nats_failing: bool,
    /// The sequences of rounds whose marking collided with kept rows, for the check to
    /// probe ([`Relay::check_stream`]).
    collided: Vec<i64>,
}

impl StreamUnverified {
    /// The collided sequences to check with, when a check is due on connection number
    /// `connects`.
    fn due(&mut self, connects: u64) -> Option<Vec<i64>> {
        // Only forward: a lane that read the count just before a reconnect comes later.
        if connects > self.connects_checked {
            self.connects_checked = connects;
            self.due = true;
        }
        self.due.then(|| self.collided.clone())
    }

    /// A check on connection number `connects`, with `collided`, succeeded.
    fn checked(&mut self, collided: &[i64], connects: u64) {
        self.nats_failing = false;
        self.collided
            .retain(|sequence| !collided.contains(sequence));
        // Unless a reconnect or a collision came meanwhile.
        if self.collided.is_empty() && connects >= self.connects_checked {
            self.due = false;
        }
    }

    /// A check failed; `on_nats` unless PostgreSQL failed it.
    fn failed(&mut self, on_nats: bool) {
        self.nats_failing = on_nats;
        self.due = true;
    }

    /// A round's marking collided with kept rows at `sequences`.
    fn collided(&mut self, sequences: Vec<i64>) {
        self.collided.extend(sequences);
        self.due = true;
    }
}

/// The stream sequences PubAcks gave rows whose round then failed to mark them, by row
/// id and event id. A round uses one only once the stream was seen to hold that event
/// at that sequence (`Relay::still_held`), so they outlast a reconnect: a server that
/// restarted and lost the message (2.9 fsyncs every 2 minutes) is found not to hold it,
/// and the row is published again. Until 2026-12-07 a reconnect forgot them all, and a
/// PostgreSQL outage longer than JetStream's duplicate window with a NATS reconnect in
/// it stored every such row twice (past the projector's horizon, counted twice).
/// Bounded: past [`AckedUnmarked::MAX_ROWS`] the oldest rows are forgotten first (rows
/// another relay marked are never claimed here again, and only this bound ends them) and
/// published again if they come back. A row whose check cannot be made (NATS slow to
/// answer, or not at all) waits for a round that can make it, however many rounds that
/// takes: published again past JetStream's duplicate window, it would be stored twice.
/// Until 2026-12-07 it was published again after three rounds, and a NATS that stopped
/// answering for 12 s after a PostgreSQL outage stored those rows twice.
#[derive(Debug, Default)]
struct AckedUnmarked {
    /// Ordered by row id, so by age.
    acks: BTreeMap<(i64, Uuid), RememberedAck>,
}

/// One row's remembered PubAck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RememberedAck {
    sequence: i64,
    /// Rounds in a row whose check of the row could not be made (for the log).
    unchecked_rounds: u32,
}

impl AckedUnmarked {
    const MAX_ROWS: usize = 100_000;

    /// Remembers again the rows a round could not check (`(row id, event id) →
    /// sequence`; `taken` is what [`Self::take`] gave that round), to wait for a later
    /// round; returns the most rounds in a row one of them went unchecked. A row whose
    /// check was made is not remembered again, its count with it.
    fn keep_unchecked(
        &mut self,
        taken: &HashMap<(i64, Uuid), RememberedAck>,
        unchecked: HashMap<(i64, Uuid), i64>,
    ) -> u32 {
        let mut most_rounds = 0;
        for (key, sequence) in unchecked {
            let unchecked_rounds = taken.get(&key).map_or(0, |ack| ack.unchecked_rounds) + 1;
            most_rounds = most_rounds.max(unchecked_rounds);
            self.acks.insert(
                key,
                RememberedAck {
                    sequence,
                    unchecked_rounds,
                },
            );
        }
        most_rounds
    }

    /// Remembers the `(row id, event id)`'s acknowledged sequences.
    fn remember<'a>(&mut self, acked: impl Iterator<Item = ((&'a i64, &'a Uuid), &'a i64)>) {
        self.acks
            .extend(acked.map(|((&row_id, &event_id), &sequence)| {
                let ack = RememberedAck {
                    sequence,
                    unchecked_rounds: 0,
                };
                ((row_id, event_id), ack)
            }));
        while self.acks.len() > Self::MAX_ROWS {
            self.acks.pop_first();
        }
    }

    /// Takes out what is remembered of the rows `keys` (`(row id, event id)`).
    fn take(
        &mut self,
        keys: impl Iterator<Item = (i64, Uuid)>,
    ) -> HashMap<(i64, Uuid), RememberedAck> {
        if self.acks.is_empty() {
            return HashMap::new();
        }
        keys.filter_map(|key| self.acks.remove(&key).map(|ack| (key, ack)))
            .collect()
    }
}

/// The rounds in a row a remembered ack went unchecked after which the relay says so at
/// WARN, once a streak.
const UNCHECKED_ROUNDS_TO_WARN: u32 = 10;

/// How often the relay reports its backlog gauges, and the shortest time between two
/// prunes.
const BACKLOG_REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// The longest a round waits for its PubAcks, all of them together. async-nats's ack
/// timeout (JetStream's default 5 s) runs from when each ack is awaited, and a round
/// awaits them one after another, so a NATS that stopped answering would otherwise hold
/// a round of n rows (and a shutdown behind it) for n times 5 s.
const ACK_DEADLINE: Duration = Duration::from_secs(5);

/// How often a round that awaits acks looks whether NATS reconnected meanwhile.
const RECONNECT_POLL: Duration = Duration::from_millis(100);
/// How long after a reconnect a round still waits for acks: those of publishes the
/// client buffered while disconnected and sent on the new connection come within it.
const ACK_GRACE_AFTER_RECONNECT: Duration = Duration::from_millis(500);

/// How many publishes may await their PubAcks at once: every row of every round in
/// flight, twice over. async-nats takes one permit per publish (waiting for one when
/// none is left) and returns it when the PubAck is awaited, or, for an ack a round gave
/// up on, when it comes or `ACK_DEADLINE` after the give-up (the context's ack timeout),
/// so the second set keeps the rounds after a give-up from waiting for those. A round
/// publishes all its rows before it awaits an ack: with fewer permits than the rounds
/// in flight publish between them (its default is 5,000, less than 2 rounds of 3,000),
/// each waited for a permit that only another's acks would return, for good.
fn ack_permits(batch_size: i64, rounds_in_flight: usize) -> usize {
    let batch = usize::try_from(batch_size).unwrap_or(0).max(1);
    batch
        .saturating_mul(rounds_in_flight.max(1))
        .saturating_mul(2)
        .min(tokio::sync::Semaphore::MAX_PERMITS)
}

/// Claims the oldest unpublished rows; other relays skip them until this round ends.
const CLAIM: &str = "SELECT id, event_id, device_id, payload,
        republish_before IS NOT NULL AND republish_before <= now() AS too_late FROM outbox
    WHERE published_at IS NULL AND id >= $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Marks rows published without publishing them: rows the stream check made unpublished
/// again whose republish deadline passed before a round claimed them (their sequence
/// is already gone).
const STRIP_TOO_LATE: &str = "UPDATE outbox SET published_at = now() WHERE id = ANY($1)";

/// The age in seconds of the unpublished row with the lowest id at or above `$1` (the
/// claim floor), 0 when there is none. Rows get their ids in the order they are
/// inserted, so that is the oldest row of the backlog, to within the moments its
/// transaction and a concurrent one took to draw their ids; found through the index of
/// unpublished rows the claims walk, where `min(created_at)` read every row of the
/// backlog.
const OLDEST_UNPUBLISHED_AGE: &str = "SELECT coalesce((
    SELECT EXTRACT(EPOCH FROM now() - created_at) FROM outbox
    WHERE published_at IS NULL AND id >= $1 ORDER BY id LIMIT 1), 0)::float8";

/// How many rows are unpublished at or above `$1` (the claim floor): all of them.
const UNPUBLISHED_ROWS: &str =
    "SELECT count(*) FROM outbox WHERE published_at IS NULL AND id >= $1";

/// Marks the acknowledged rows published, with the stream sequence of each.
const MARK: &str = "UPDATE outbox SET published_at = now(), stream_seq = marked.seq
    FROM unnest($1::bigint[], $2::bigint[]) AS marked(id, seq)
    WHERE outbox.id = marked.id";

/// One table the relay prunes, and its statement, built once at start.
struct Pruning {
    table: &'static str,
    statement: String,
    retention_secs: f64,
    until: PruneUntil,
}

/// The moment a [`Pruning`]'s retention counts back from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PruneUntil {
    /// PostgreSQL's `now()`, for rows nothing depends on once their retention is over.
    Now,
    /// The newest stream check that found the stream holding what was published
    /// ([`Relay::stream_held_at`]), for published outbox rows: a row is what lets the
    /// relay republish its event if the stream loses it, and until a check has seen the
    /// stream hold it for the retention (longer than the NATS host may keep it
    /// unsynced), it may still be lost. No such check yet: nothing is pruned.
    StreamHeld,
}

impl Pruning {
    /// Published outbox rows and idempotency keys past their retention; readings only
    /// when a retention is configured (they are kept for good otherwise).
    fn configured(settings: &Settings) -> Vec<Self> {
        let mut prunings = vec![
            Self::new(
                "outbox",
                "published_at",
                settings.relay.published_retention_secs,
                PruneUntil::StreamHeld,
            ),
            Self::new(
                "idempotency_keys",
                "created_at",
                settings.ingest.idempotency_retention_secs,
                PruneUntil::Now,
            ),
        ];
        if settings.ingest.reading_retention_secs > 0 {
            prunings.push(Self::new(
                "readings",
                "received_at",
                settings.ingest.reading_retention_secs,
                PruneUntil::Now,
            ));
        }
        prunings
    }

    /// Rows of `table` whose `time_column` is more than `retention_secs` before `until`.
    fn new(table: &'static str, time_column: &str, retention_secs: u64, until: PruneUntil) -> Self {
        Self {
            table,
            statement: prune_statement(table, time_column),
            retention_secs: retention_secs as f64,
            until,
        }
    }
}

/// Deletes up to `$2` rows of `table` whose `time_column` is more than `$1` seconds
/// before `$3` (now when null), oldest first, skipping rows another relay is deleting.
///
/// The rows are found through the time column's index, in its order, and deleted by
/// their tuple ids. Without the ORDER BY, PostgreSQL chose a sequential scan for "the
/// first prune_batch rows older than the retention", expecting a third of the table to
/// match, and with nothing past the retention (the first ten minutes of a pipeline, and
/// whenever the relay has caught up) it read the whole table every `prune_interval`:
/// 1.2 s for a 6M-row outbox and 1.0 s for its keys, every 10 s, on a 2-core box
/// (2026-12-01; 0.1 and 0.4 ms with the index). `ctid = ANY(ARRAY(...))` keeps the
/// delete itself a TID scan of the locked rows, whatever the table's size.
fn prune_statement(table: &str, time_column: &str) -> String {
    format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {table}
             WHERE {time_column} < coalesce($3::timestamptz, now()) - make_interval(secs => $1)
             ORDER BY {time_column} LIMIT $2 FOR UPDATE SKIP LOCKED))"
    )
}

/// Holds a `LISTEN outbox` connection open and wakes the relay on each notification
/// (ingest sends one after its commits); reconnects with backoff when the connection
/// drops, and wakes the relay then too. `relay_listening` is 1 while it listens; the
/// first failure of a series is a warning (the relay then finds new rows only by its
/// poll), and listening again after one is logged.
async fn listen_for_inserts(
    config: tokio_postgres::Config,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut log = FailureLog::default();
    metrics::gauge!("relay_listening").set(0.0);
    while !shutdown.is_cancelled() {
        let listened = async {
            let (client, mut connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .context("connecting")?;
            let wake_on_message = wake.clone();
            let mut messages =
                futures::stream::poll_fn(move |context| connection.poll_message(context));
            let mut driver = tokio::spawn(async move {
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => wake_on_message.notify_one(),
                        Ok(_) => {}
                        Err(error) => return Some(error),
                    }
                }
                None
            });
            let listen = format!("LISTEN {}", crate::outbox_notify::CHANNEL);
            if let Err(error) = client.batch_execute(&listen).await {
                driver.abort();
                return Err(anyhow::Error::from(error).context("LISTEN"));
            }
            metrics::gauge!("relay_listening").set(1.0);
            log.succeeded("listening for outbox notifications again");
            backoff.reset();
            wake.notify_one();
            let ended = tokio::select! {
                _ = shutdown.cancelled() => {
                    driver.abort();
                    return Ok(());
                }
                ended = &mut driver => ended,
            };
            metrics::gauge!("relay_listening").set(0.0);
            match ended {
                Ok(Some(error)) => Err(anyhow::Error::from(error).context("the connection")),
                _ => Err(anyhow::anyhow!("the connection closed")),
            }
        };
        if let Err(error) = listened.await {
            log.failed(
                &format!("{error:#}"),
                "outbox listen failed; the relay finds new rows by polling until it listens again",
                "outbox listen failed again",
            );
        }
        backoff.sleep(&shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_letter_stream_knows_letter_ids_as_long_as_it_keeps_letters() {
        let nats = |max_age_secs| NatsSettings {
            url: "nats://127.0.0.1:4222".to_owned(),
            stream: "TELEMETRY".to_owned(),
            consumer: "projector".to_owned(),
            max_age_secs,
            duplicate_window_secs: 120,
        };
        let windows = |max_age_secs| {
            let [events, letters] = stream_configs(&nats(max_age_secs));
            (events.duplicate_window, letters.duplicate_window)
        };
        assert_eq!(
            windows(604_800),
            (Duration::from_secs(120), Duration::from_secs(604_800))
        );
        assert_eq!(
            windows(0),
            (
                Duration::from_secs(120),
                DEAD_LETTER_IDS_KEPT_WITHOUT_AGE_LIMIT
            ),
            "no age limit: a week"
        );
    }

    #[test]
    fn a_relay_checks_the_stream_on_its_first_connection_and_after_every_reconnect() {
        let mut unverified = StreamUnverified::default();
        assert_eq!(unverified.due(1), Some(vec![]), "the first connection");
        unverified.checked(&[], 1);
        assert_eq!(unverified.due(1), None);
        assert_eq!(unverified.due(2), Some(vec![]), "a reconnect");
        // A reconnect while the check ran: that check does not cover the new connection.
        assert_eq!(unverified.due(3), Some(vec![]));
        unverified.checked(&[], 2);
        assert_eq!(unverified.due(3), Some(vec![]));
        unverified.checked(&[], 3);
        assert_eq!(unverified.due(3), None);
    }

    #[test]
    fn a_failed_check_holds_publishing_back_until_one_succeeds() {
        let mut unverified = StreamUnverified::default();
        unverified.due(1);
        unverified.checked(&[], 1);
        unverified.failed(true);
        assert!(unverified.nats_failing);
        assert_eq!(
            unverified.due(1),
            Some(vec![]),
            "a failed periodic check too"
        );
        unverified.checked(&[], 1);
        assert!(!unverified.nats_failing);
        assert_eq!(unverified.due(1), None);
        // PostgreSQL's failure holds publishing back too; readiness names it on its own.
        unverified.failed(false);
        assert!(!unverified.nats_failing);
        assert_eq!(unverified.due(1), Some(vec![]));
    }

    #[test]
    fn collided_sequences_stay_due_for_every_lane_until_a_check_probed_them() {
        let mut unverified = StreamUnverified::default();
        unverified.due(1);
        unverified.checked(&[], 1);
        unverified.collided(vec![41, 42]);
        // Any lane's next check probes them, not only the colliding lane's.
        assert_eq!(unverified.due(1), Some(vec![41, 42]));
        // Another lane collides while that check runs.
        unverified.collided(vec![43]);
        unverified.checked(&[41, 42], 1);
        assert_eq!(unverified.due(1), Some(vec![43]));
        // A check without them (a periodic one) leaves them due.
        unverified.checked(&[], 1);
        assert_eq!(unverified.due(1), Some(vec![43]));
        unverified.checked(&[43], 1);
        assert_eq!(unverified.due(1), None);
    }

    /// One round that takes `key`'s remembered ack (if any) and cannot check it: the
    /// rounds in a row it went unchecked, when the row waits for a later round.
    fn unchecked_round(memory: &mut AckedUnmarked, key: (i64, Uuid)) -> Option<u32> {
        let taken = memory.take(std::iter::once(key));
        let rounds = memory.keep_unchecked(&taken, HashMap::from([(key, 70)]));
        memory.acks.contains_key(&key).then_some(rounds)
    }

    #[test]
    fn a_row_whose_remembered_ack_cannot_be_checked_waits_for_a_round_that_can() {
        let mut memory = AckedUnmarked::default();
        let key = (7, Uuid::nil());
        for round in 1..=10 {
            assert_eq!(unchecked_round(&mut memory, key), Some(round));
        }
        assert_eq!(
            memory.acks.get(&key).map(|ack| ack.sequence),
            Some(70),
            "remembered still, never published again"
        );
    }

    #[test]
    fn a_row_whose_check_was_made_counts_its_unchecked_rounds_anew() {
        let mut memory = AckedUnmarked::default();
        let key = (7, Uuid::nil());
        assert_eq!(unchecked_round(&mut memory, key), Some(1));
        assert_eq!(unchecked_round(&mut memory, key), Some(2));
        // A round whose check is made: taken, and not remembered again.
        let _ = memory.take(std::iter::once(key));
        memory.remember(std::iter::once(((&key.0, &key.1), &70)));
        assert_eq!(
            unchecked_round(&mut memory, key),
            Some(1),
            "checked since: counted from one"
        );
    }

    #[test]
    fn remembered_acks_past_the_bound_lose_the_oldest_rows_first() {
        let mut memory = AckedUnmarked::default();
        let rows = AckedUnmarked::MAX_ROWS as i64 + 2;
        let ids: Vec<i64> = (0..rows).collect();
        let events = vec![Uuid::nil(); ids.len()];
        let sequences: Vec<i64> = ids.iter().map(|id| id + 100).collect();
        memory.remember(ids.iter().zip(&events).zip(&sequences));
        assert_eq!(memory.acks.len(), AckedUnmarked::MAX_ROWS);
        let sequence_of = |(key, ack): (&(i64, Uuid), &RememberedAck)| (*key, ack.sequence);
        assert_eq!(
            memory.acks.first_key_value().map(sequence_of),
            Some(((2, Uuid::nil()), 102)),
            "the two oldest rows forgotten"
        );
        assert_eq!(
            memory.acks.last_key_value().map(sequence_of),
            Some(((rows - 1, Uuid::nil()), rows + 99))
        );
    }

    #[test]
    fn only_a_puback_of_the_stream_with_a_sequence_marks_its_row() {
        let ack = |json: &str| -> async_nats::jetstream::publish::PublishAck {
            serde_json::from_str(json).expect("a PubAck")
        };
        let sequence = |json: &str| acknowledged_sequence(&ack(json), "TELEMETRY").ok();
        assert_eq!(sequence(r#"{"stream":"TELEMETRY","seq":7}"#), Some(7));
        assert_eq!(
            sequence(r#"{"stream":"TELEMETRY","seq":7,"duplicate":true}"#),
            Some(7),
            "a duplicate's ack names the original's sequence"
        );
        assert_eq!(
            sequence(r#"{"stream":"TELEMETRY","seq":0,"duplicate":true}"#),
            None,
            "a duplicate whose original is not stored yet"
        );
        assert_eq!(sequence(r#"{"stream":"OTHER","seq":7}"#), None);
        assert_eq!(
            sequence(r#"{"stream":"TELEMETRY","seq":18446744073709551615}"#),
            None
        );
    }

    #[test]
    fn every_row_of_every_round_in_flight_has_an_ack_permit_twice_over() {
        assert_eq!(ack_permits(3_000, 2), 12_000);
        assert_eq!(ack_permits(1_000, 0), 2_000, "one round at least");
        assert_eq!(ack_permits(-1, 2), 4, "one row at least");
        assert_eq!(
            ack_permits(i64::MAX, usize::MAX),
            tokio::sync::Semaphore::MAX_PERMITS,
            "no more than a semaphore holds"
        );
    }
}

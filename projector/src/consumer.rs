//! The durable pull consumer: JetStream batches in, Redis pipelines out, acks after.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::stream::{ConsumerErrorKind, RawMessageErrorKind};
use async_nats::jetstream::{self, AckKind};
use contract::event::{headers, DecodeError, TelemetryRecorded};
use contract::reading::check_device_id;
use contract::settings::{key_and_variable, NatsSettings, Settings};
use contract::subjects::{device_token, Subjects};
use contract::timestamp::unix_millis;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use ingest::redis_connection::{login_refused, RedisConnection};
use ingest::sync::lock;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use ingest::bootstrap::{nats_connected, Backoff};

use crate::apply::{AsOf, Delivered, ReadModel};
use crate::dlq;
use crate::eviction::EvictionWatch;
use crate::pull::{answer, hand_back, Pulls};
use crate::rebuild::{Generations, Rebuild, RebuildError};
use crate::restart::RestartWatch;

/// How long a stopping projector waits for its last acks to leave.
const ACK_FLUSH_DEADLINE: Duration = Duration::from_secs(1);

/// One projector: consumes the durable consumer and keeps the read model.
pub struct Projector {
    jetstream: jetstream::Context,
    redis: RedisConnection,
    read_model: ReadModel,
    /// The generations as last read, which batches are applied with (checked in Redis
    /// by each call, see [`ReadModel::apply_as_of`]) until a call finds them changed.
    generations: std::sync::Mutex<Option<Generations>>,
    subjects: Subjects,
    /// The streams' settings, for making the dead-letter stream again
    /// ([`ingest::relay::create_dead_letter_stream`]).
    nats: NatsSettings,
    consumer_name: String,
    batch_size: usize,
    batches_in_flight: usize,
    ack_wait: Duration,
    /// Whether the durable consumer was found with `ack_wait` or given it (once per
    /// process, at the first session that reached it; see [`Projector::keep_ack_wait`]).
    ack_wait_kept: AtomicBool,
    /// Whether the last try to apply a batch failed as every batch would (Redis away or
    /// taking no writes, no read model yet; see [`takes_no_batch`]): then one batch at a
    /// time is pulled, and the rest of the consumer's messages are left to projectors
    /// that can apply them.
    stalled: AtomicBool,
    /// When a device's call last went through: a refusal within an ack wait of that is
    /// the refused device's ([`Projector::refusal_is_the_devices`]).
    last_through: std::sync::Mutex<Option<Instant>>,
}

/// The durable consumer cannot be given this projector's `projector.ack_wait_secs`: the
/// projector stops rather than run with an ack wait its dedup horizon was not checked
/// against (an applied event whose ack was lost could come back past the horizon and
/// count twice).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AckWaitRefused(String);

impl Projector {
    pub fn new(settings: &Settings, nats: async_nats::Client, redis: RedisConnection) -> Self {
        Self {
            jetstream: jetstream::new(nats),
            redis,
            read_model: ReadModel::new(
                settings.redis.prefix.clone(),
                settings.projector.dedup_horizon_secs.saturating_mul(1000) as i64,
            ),
            generations: std::sync::Mutex::default(),
            subjects: Subjects::for_stream(&settings.nats.stream),
            nats: settings.nats.clone(),
            consumer_name: settings.nats.consumer.clone(),
            batch_size: settings.projector.batch_size,
            batches_in_flight: settings.projector.batches_in_flight.max(1),
            ack_wait: Duration::from_secs(settings.projector.ack_wait_secs),
            ack_wait_kept: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            last_through: std::sync::Mutex::new(None),
        }
    }

    /// A rebuild over the same stream and read model.
    pub fn rebuild(&self) -> Rebuild {
        Rebuild {
            jetstream: self.jetstream.clone(),
            redis: self.redis.clone(),
            read_model: self.read_model.clone(),
            subjects: self.subjects.clone(),
            consumer: self.consumer_name.clone(),
            ack_wait: self.ack_wait,
            batch_size: self.batch_size,
        }
    }

    /// Consumes until `shutdown`; the batches in hand are applied and acked first. Ends
    /// early, with [`AckWaitRefused`], when the durable consumer cannot be given the
    /// configured ack wait.
    pub async fn run(&mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        let mut refused = None;
        while !shutdown.is_cancelled() {
            // A session that ran for a while and then ended (the consumer repaired or
            // deleted, NATS restarted) is a new outage to the backoff: it reconnects at
            // once, not after the longest delay that earlier outages left behind.
            match self.consume(&shutdown).await {
                Ok(()) => backoff.reset(),
                Err(error) if error.is::<AckWaitRefused>() => {
                    refused = Some(error);
                    break;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = delay.as_millis() as u64,
                        "consumer interrupted, reconnecting"
                    );
                    Backoff::sleep_through(delay, &shutdown).await;
                }
            }
        }
        // Acks are plain publishes: make sure they left before the process goes. While
        // NATS is down a flush would wait for it to come back; the acks cannot leave
        // then, and their messages are delivered again and skipped as applied.
        let client = self.jetstream.client();
        let flushed = nats_connected(&client)
            && tokio::time::timeout(ACK_FLUSH_DEADLINE, client.flush())
                .await
                .is_ok_and(|flush| flush.is_ok());
        if !flushed {
            tracing::warn!(
                "the last acks may not have reached NATS; their messages will be delivered again"
            );
        }
        refused.map_or(Ok(()), Err)
    }

    /// Applies batches as they arrive, up to `batches_in_flight` at once: while Redis
    /// works on one, the next is decoded and sent (each is acked when Redis confirmed
    /// it; the aggregates do not care in which order batches land).
    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // Opening waits on JetStream requests (5 s each while NATS is down) with nothing
        // in hand yet, so a shutdown ends it rather than waits for it.
        let mut pulls = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            pulls = self.open_pulls() => pulls?,
        };
        let mut in_flight = FuturesUnordered::new();
        let ended = loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                batch = pulls.next_batch(), if self.room_for_a_batch(in_flight.len()) => batch,
            };
            // No lingering for more: while batches are applied the next one gathers, so
            // batches grow with the load by themselves, and a quiet pipeline answers at
            // once (measured: a 2 ms linger cost 3-4 ms of end-to-end p50 at 500/s).
            match batch {
                Ok(messages) => in_flight.push(self.handle(messages, Instant::now(), shutdown)),
                // What the pulls cannot get past (the consumer deleted, a request
                // refused, NATS away) ends the session; the next one makes the
                // consumer again if it is gone.
                Err(error) => {
                    break Err(
                        anyhow::Error::new(error).context("pulling from the durable consumer")
                    )
                }
            }
        };
        // The batches in hand are finished (applied and acked, or handed back when
        // Redis fails during a shutdown) before the consumer goes; what arrived after
        // them is handed back too, for the next session or projector.
        while in_flight.next().await.is_some() {}
        let handed_back = pulls.stop().await;
        if handed_back > 0 {
            tracing::info!(
                messages = handed_back,
                "handed back what was pulled but not applied"
            );
        }
        ended
    }

    /// Whether another batch may be pulled while `in_flight` are applied: up to
    /// `batches_in_flight`, but while batches cannot be applied only one at a time. Pulled
    /// and held, the others would wait out the ack wait ([`Projector::held_too_long`])
    /// while another projector could apply them; the one tries Redis again.
    fn room_for_a_batch(&self, in_flight: usize) -> bool {
        in_flight == 0
            || (in_flight < self.batches_in_flight && !self.stalled.load(Ordering::Relaxed))
    }

    /// Pulls on the durable consumer; the consumer is made when it is missing.
    async fn open_pulls(&self) -> anyhow::Result<Pulls> {
        let stream = self
            .jetstream
            .get_stream(self.subjects.stream())
            .await
            .with_context(|| {
                format!(
                    "stream {} not found yet (the relay creates it)",
                    self.subjects.stream()
                )
            })?;
        // One request when the consumer is there, as it is but for the first start.
        let consumer: jetstream::consumer::Consumer<pull::Config> =
            match stream.get_consumer(&self.consumer_name).await {
                Ok(consumer) => self.keep_ack_wait(&stream, consumer).await?,
                Err(error) if consumer_not_found(error.as_ref()) => {
                    let deliver_policy = self.where_a_new_consumer_starts(&stream).await?;
                    // Two projectors that make it at once with different starts: one
                    // creation fails, and that projector's next session finds the other's.
                    stream
                        .create_consumer(durable_consumer_config(
                            &self.consumer_name,
                            self.ack_wait,
                            deliver_policy,
                        ))
                        .await
                        .context("creating the durable consumer")?
                }
                Err(error) => {
                    return Err(anyhow::anyhow!(error).context("looking up the durable consumer"))
                }
            };
        self.ack_wait_kept.store(true, Ordering::Relaxed);
        Pulls::open(&self.jetstream, consumer, self.batch_size)
            .await
            .context("subscribing to the pull inbox")
    }

    /// Gives the durable consumer, found made by an earlier projector, this projector's
    /// `projector.ack_wait_secs`, which the settings checked the dedup horizon against.
    /// Once per process: after that, a projector of another configuration (a rolling
    /// restart) may set its own, and this one does not set it back at every reconnect.
    ///
    /// nats-server 2.9 changes the ack wait in place ("create" on an existing durable
    /// consumer updates it) but refuses any change to a consumer that starts at a time,
    /// as a repair makes it ([`recreate_consumer`]); then this projector stops with
    /// [`AckWaitRefused`], which says what to do. nats-server 2.10 changes that one too.
    async fn keep_ack_wait(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: jetstream::consumer::Consumer<pull::Config>,
    ) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let live = consumer.cached_info().config.ack_wait;
        if live == self.ack_wait || self.ack_wait_kept.load(Ordering::Relaxed) {
            return Ok(consumer);
        }
        // The consumer's own configuration with the one change: anything else that
        // differs is a change the server may refuse.
        let mut config = consumer.cached_info().config.clone();
        config.ack_wait = self.ack_wait;
        if let Err(error) = stream.create_consumer(config).await {
            if let ConsumerErrorKind::JetStream(refusal) = error.kind() {
                if refusal.error_code() == jetstream::ErrorCode::CONSUMER_CREATE {
                    return Err(self.ack_wait_refused(live, &refusal).into());
                }
            }
            return Err(
                anyhow::Error::new(error).context("changing the durable consumer's ack wait")
            );
        }
        tracing::info!(
            consumer = %self.consumer_name,
            was_secs = live.as_secs(),
            now_secs = self.ack_wait.as_secs(),
            "changed the durable consumer's ack wait to projector.ack_wait_secs"
        );
        stream
            .get_consumer(&self.consumer_name)
            .await
            .map_err(|error| anyhow::anyhow!(error).context("looking up the durable consumer"))
    }

    /// The one line a projector stops with when the server refused to change the
    /// durable consumer's ack wait (`live`) to this projector's.
    fn ack_wait_refused(&self, live: Duration, refusal: &jetstream::Error) -> AckWaitRefused {
        let stream = self.subjects.stream();
        let consumer = &self.consumer_name;
        AckWaitRefused(format!(
            "{} is {} s but the durable consumer {consumer} of stream {stream} waits {} s for an ack, and nats-server refused to change it ({refusal}; nats-server 2.9 changes nothing of a consumer that a repair made); set it back to {} s (the dedup horizon must exceed it), or stop every projector, remove the consumer (nats consumer rm {stream} {consumer}) and start them again: it is made again where it stood, with the configured ack wait",
            key_and_variable("projector.ack_wait_secs"),
            self.ack_wait.as_secs(),
            live.as_secs(),
            live.as_secs(),
        ))
    }

    /// Where the durable consumer starts when this projector has to make it: just past
    /// what the read model applied, as the newest consumer anchor kept for it says
    /// (see [`newest_read_model_anchor`]), and at the start of the stream when there is
    /// none (a read model that no consumer wrote to yet).
    ///
    /// That anchor is mostly this consumer's own: the consumer was deleted (`nats
    /// consumer rm`, or lost with the server's state), and delivering the whole stream
    /// again would count every event applied longer ago than the dedup horizon a second
    /// time. It is another consumer's when `nats.consumer` was renamed: the read model
    /// is the same, so the new consumer goes on where the old one stood, for the same
    /// reason.
    async fn where_a_new_consumer_starts(
        &self,
        stream: &jetstream::stream::Stream,
    ) -> anyhow::Result<DeliverPolicy> {
        let mut redis = self.redis.clone();
        let newest = newest_read_model_anchor(&mut redis, &self.read_model.prefix)
            .await
            .context("reading the consumer anchors")?;
        let Some((taken_of, anchor)) = newest else {
            return Ok(DeliverPolicy::All);
        };
        let first_sequence = stream
            .get_info()
            .await
            .context("stream info")?
            .state
            .first_sequence;
        let policy = resume_after(
            anchor_fate(stream, &anchor, first_sequence).await?,
            self.read_model
                .dedup_horizon_start(OffsetDateTime::now_utc()),
        );
        if taken_of == self.consumer_name {
            tracing::warn!(
                consumer = %self.consumer_name,
                anchor_stream_sequence = anchor.stream_sequence,
                ?policy,
                "the durable consumer is missing: made again from where the last one stood"
            );
        } else {
            tracing::warn!(
                consumer = %self.consumer_name,
                previous_consumer = %taken_of,
                anchor_stream_sequence = anchor.stream_sequence,
                ?policy,
                stream = self.subjects.stream(),
                "the durable consumer is new to this read model: made from where the previous consumer stood; once no projector uses that one, remove it (nats consumer rm <stream> <previous_consumer>)"
            );
        }
        Ok(policy)
    }

    /// Applies a batch, `taken` from the inbox then, and acks it only after Redis
    /// confirmed ([`Projector::apply_and_ack`]); beside that, sends its poison to the
    /// DLQ, all of it at once. Dead letters wait for the dead-letter stream's ack (up to
    /// 5 s each), which the batch's events do not wait out, nor the poison Redis: until
    /// 2026-12-07 poison went first, one letter after another, and a dead-letter stream
    /// that did not answer held the events behind it past the ack wait, unapplied, for
    /// as long as it stayed silent.
    async fn handle(
        &self,
        messages: Vec<jetstream::Message>,
        taken: Instant,
        shutdown: &CancellationToken,
    ) {
        let mut delivered = Vec::with_capacity(messages.len());
        let mut to_ack = Vec::with_capacity(messages.len());
        let mut poison = Vec::new();
        let mut redelivered = 0;
        for message in messages {
            let Ok((stream_sequence, stored_at, deliveries)) = message
                .info()
                .map(|info| (info.stream_sequence, info.published, info.delivered))
            else {
                // Every JetStream delivery carries its info in its reply subject; a
                // message without it is none of the durable consumer's, and there is
                // nothing to ack it to. Said, not skipped without a word.
                tracing::warn!(
                    subject = %message.subject,
                    "a message without JetStream delivery info, left unanswered"
                );
                continue;
            };
            if deliveries > 1 {
                redelivered += 1;
            }
            match decode(&message, stored_at) {
                Ok(event) => {
                    delivered.push(Delivered {
                        event,
                        stream_sequence,
                        stored_at,
                    });
                    to_ack.push(message);
                }
                Err(reason) => poison.push((message, stream_sequence, stored_at, reason.into())),
            }
        }
        metrics::counter!("projector_redelivered_total").increment(redelivered);
        // Side by side: neither waits for the other (the events not for the dead-letter
        // stream's acks, the poison not for Redis).
        tokio::join!(
            async {
                if !delivered.is_empty() {
                    self.apply_and_ack(delivered, to_ack, taken, shutdown).await;
                }
            },
            self.dead_letter_unless_stopping(poison, shutdown),
        );
    }

    /// Applies a batch's events (`delivered`, of the messages `to_ack`), `taken` from the
    /// inbox then; acks them only after Redis confirmed. A batch Redis has not taken
    /// within the ack wait is given up ([`Projector::held_too_long`]).
    async fn apply_and_ack(
        &self,
        delivered: Vec<Delivered>,
        to_ack: Vec<jetstream::Message>,
        taken: Instant,
        shutdown: &CancellationToken,
    ) {
        let mut redis = self.redis.clone();
        let started = Instant::now();
        let mut backoff = Backoff::default();
        let mut applied_before = 0;
        let applied = loop {
            let left = delivered.len().saturating_sub(applied_before as usize);
            if self.held_too_long(taken, left) {
                metrics::counter!("projector_events_applied_total").increment(applied_before);
                return;
            }
            // Redis away, or its meta hash unreadable, is an error to count, not a read
            // model still to be built.
            let error = match self.generations(&mut redis).await {
                Err(error) => error,
                Ok(generations) if generations.targets().is_empty() => {
                    // The read model is gone (Redis restarted, flushed) or not built yet:
                    // the supervisor starts a rebuild; these events wait for its
                    // generation.
                    self.forget_generations();
                    tracing::debug!(
                        "no read model generation yet, waiting for the rebuild to start"
                    );
                    if shutdown.is_cancelled() {
                        break None;
                    }
                    self.stalled.store(true, Ordering::Relaxed);
                    self.pause(&mut backoff, taken, shutdown).await;
                    continue;
                }
                Ok(generations) => {
                    let now_ms = unix_millis(OffsetDateTime::now_utc());
                    match self
                        .read_model
                        .apply_as_of(&mut redis, &generations, &delivered, now_ms)
                        .await
                    {
                        Ok(AsOf::Applied(applied)) => break Some(applied_before + applied.applied),
                        Ok(AsOf::Stale { applied }) => {
                            // A rebuild began or switched over: read the generations again.
                            applied_before += applied;
                            self.forget_generations();
                            continue;
                        }
                        Ok(AsOf::Refused {
                            applied,
                            events,
                            others_through,
                        }) if self.refusal_is_the_devices(others_through, &delivered, &events) => {
                            // The other events went through: acked now, not held (and
                            // redelivered) with the refused ones, which are left
                            // unacked for JetStream to deliver again after the ack
                            // wait, holding no batch slot meanwhile, or dead-lettered.
                            let (refused, through): (Vec<_>, Vec<_>) = delivered
                                .into_iter()
                                .zip(to_ack)
                                .partition(|(item, _)| events.contains_key(&item.event.event_id));
                            let (through, through_messages): (Vec<_>, Vec<_>) =
                                through.into_iter().unzip();
                            self.acknowledge(
                                &through_messages,
                                &through,
                                applied_before + applied,
                                started,
                                shutdown,
                            )
                            .await;
                            metrics::counter!("projector_errors_total").increment(1);
                            // While a rebuild runs, the refusal may be the live
                            // generation's alone, and the switch mend it: nothing is
                            // dead-lettered that the new generation would miss.
                            if generations.building.is_none() {
                                self.dead_letter_refused(refused, &events, shutdown).await;
                            }
                            return;
                        }
                        Ok(AsOf::Refused {
                            applied, events, ..
                        }) => {
                            // Nothing went through lately: a refusal every call may meet
                            // (a script error on every device, an ACL denying the script
                            // a command), which the batch waits out like any failure.
                            applied_before += applied;
                            refusal(&events)
                        }
                        Err(error) => error,
                    }
                }
            };
            metrics::counter!("projector_errors_total").increment(1);
            // A batch failed as a whole: what went through before says nothing of the
            // next refusal.
            *lock(&self.last_through) = None;
            tracing::warn!(%error, events = delivered.len(), "applying to redis failed, retrying");
            if shutdown.is_cancelled() {
                break None;
            }
            if takes_no_batch(&error) {
                self.stalled.store(true, Ordering::Relaxed);
            }
            self.pause(&mut backoff, taken, shutdown).await;
        };
        let Some(applied) = applied else {
            // Stopping while Redis cannot take the batch: handed back, for the next
            // projector at once; the script skips whatever did get applied.
            hand_back(&to_ack).await;
            return;
        };
        self.acknowledge(&to_ack, &delivered, applied, started, shutdown)
            .await;
    }

    /// Whether Redis's refusal of some of a batch's calls ([`AsOf::Refused`]) is the
    /// refused devices' own: another device's calls went through in the same batch
    /// (`others_through`), or the batch holds one device's events (a redelivery comes
    /// alone on a quiet pipeline) and another device's call went through within an ack
    /// wait before it, with no batch failing as a whole since. A refusal that every
    /// call meets (a script error on every device, an ACL that denies the script a
    /// command, the meta hash of another type) is not: nothing goes through then, and
    /// the events wait rather than go to the dead-letter stream.
    fn refusal_is_the_devices(
        &self,
        others_through: bool,
        delivered: &[Delivered],
        refused: &BTreeMap<uuid::Uuid, String>,
    ) -> bool {
        let mut last_through = lock(&self.last_through);
        if others_through {
            *last_through = Some(Instant::now());
            return true;
        }
        let mut devices = delivered
            .iter()
            .filter(|item| refused.contains_key(&item.event.event_id))
            .map(|item| item.event.device_id.as_str());
        let first = devices.next();
        if devices.any(|device_id| Some(device_id) != first) {
            // Several devices refused, none through: the server's doing (the batch
            // fails as a whole, which forgets `last_through`).
            return false;
        }
        last_through.is_some_and(|at| at.elapsed() < self.ack_wait)
    }

    /// Acks `messages`, whose events (`delivered`) Redis took, `applied` of them new,
    /// in a batch begun then; counts them.
    async fn acknowledge(
        &self,
        messages: &[jetstream::Message],
        delivered: &[Delivered],
        applied: u64,
        started: Instant,
        shutdown: &CancellationToken,
    ) {
        if delivered.is_empty() {
            return;
        }
        self.stalled.store(false, Ordering::Relaxed);
        *lock(&self.last_through) = Some(Instant::now());
        answer(messages, AckKind::Ack, shutdown).await;
        let now = OffsetDateTime::now_utc();
        for item in delivered {
            let lag = (now - item.event.received_at).as_seconds_f64().max(0.0);
            metrics::histogram!("projector_end_to_end_seconds").record(lag);
        }
        let duplicates = (delivered.len() as u64).saturating_sub(applied);
        metrics::counter!("projector_events_applied_total").increment(applied);
        metrics::counter!("projector_duplicates_skipped_total").increment(duplicates);
        metrics::histogram!("projector_batch_size").record(delivered.len() as f64);
        metrics::histogram!("projector_apply_seconds").record(started.elapsed().as_secs_f64());
    }

    /// Dead-letters those of the `refused` events (Redis refused their calls with the
    /// error `events` names) delivered [`DELIVERIES_BEFORE_REFUSED_IS_DEAD`] times or
    /// more; leaves the others unacked, to come again after the ack wait. So a device
    /// whose keys Redis cannot apply to holds its events for two ack waits, in case an
    /// operator mends them, not for ever (API.md §6: not retried forever).
    async fn dead_letter_refused(
        &self,
        refused: Vec<(Delivered, jetstream::Message)>,
        events: &BTreeMap<uuid::Uuid, String>,
        shutdown: &CancellationToken,
    ) {
        let mut letters = Vec::new();
        for (item, message) in refused {
            let deliveries = message.info().map_or(1, |info| info.delivered);
            let Some(error) = events.get(&item.event.event_id) else {
                continue;
            };
            if deliveries < DELIVERIES_BEFORE_REFUSED_IS_DEAD {
                tracing::warn!(
                    event_id = %item.event.event_id,
                    device_id = item.event.device_id,
                    deliveries,
                    %error,
                    "redis refused an event, leaving it to be delivered again"
                );
                continue;
            }
            tracing::error!(
                event_id = %item.event.event_id,
                device_id = item.event.device_id,
                deliveries,
                %error,
                "redis refused an event on every delivery, dead-lettering it; mend the device's keys, then re-drive it (projector dlq redrive)"
            );
            let reason = dlq::Reason::Refused(error.clone());
            letters.push((message, item.stream_sequence, item.stored_at, reason));
        }
        self.dead_letter_unless_stopping(letters, shutdown).await;
    }

    /// Dead-letters `letters` (message, stream sequence, stored at, reason), all at
    /// once, unless a stop comes first: a stop does not wait for dead letters (each
    /// waits up to 5 s for the dead-letter stream's ack), and one not sent stays unacked
    /// and comes again.
    async fn dead_letter_unless_stopping(
        &self,
        letters: Vec<(jetstream::Message, u64, OffsetDateTime, dlq::Reason)>,
        shutdown: &CancellationToken,
    ) {
        if letters.is_empty() {
            return;
        }
        let sent = futures::future::join_all(letters.into_iter().map(
            |(message, stream_sequence, stored_at, reason)| {
                self.dead_letter(message, stream_sequence, stored_at, reason)
            },
        ));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {}
            _ = sent => {}
        }
    }

    /// Whether a batch `taken` from the inbox then, and not yet taken by Redis, is to be
    /// given up, unapplied and unacked: once the ack wait has run out, JetStream delivers
    /// its events again, maybe to a projector that reaches Redis while this one does not
    /// (a partition, a paused host). Applied here after that projector's record of them
    /// left with the dedup horizon, they would count twice. So a projector applies what
    /// it holds within the ack wait of taking it (and a Redis response timeout), or
    /// never. Its messages waited in the inbox no longer than that too (until a batch in
    /// flight ended), while the other copy is applied an ack wait after the delivery at
    /// the earliest: the two lie less than an ack wait and 10 s apart, well within the
    /// horizon (900 s against an ack wait of 30 s by default).
    fn held_too_long(&self, taken: Instant, events: usize) -> bool {
        let held = taken.elapsed();
        if held < self.ack_wait {
            return false;
        }
        metrics::counter!("projector_events_given_up_total").increment(events as u64);
        tracing::warn!(
            events,
            held_ms = held.as_millis() as u64,
            ack_wait_secs = self.ack_wait.as_secs(),
            "gave up a batch not applied within the ack wait, jetstream delivers it again"
        );
        true
    }

    /// Waits before a batch `taken` then is tried again: the backoff's delay, but not
    /// past the ack wait, when the batch is given up ([`Projector::held_too_long`]).
    async fn pause(&self, backoff: &mut Backoff, taken: Instant, shutdown: &CancellationToken) {
        let until = (Instant::now() + backoff.next_delay()).min(taken + self.ack_wait);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }

    /// The generations to apply to: as last read, or read now (and kept).
    async fn generations(&self, redis: &mut RedisConnection) -> redis::RedisResult<Generations> {
        if let Some(generations) = lock(&self.generations).clone() {
            return Ok(generations);
        }
        let generations = Generations::read(redis, &self.read_model.prefix).await?;
        *lock(&self.generations) = Some(generations.clone());
        Ok(generations)
    }

    fn forget_generations(&self) {
        *lock(&self.generations) = None;
    }

    /// Publishes the message to the DLQ stream with the reason, then terminates it
    /// (API.md §6: terminated, not retried forever).
    ///
    /// The dead letter has the original's headers but JetStream's publish directives
    /// ([`dlq::goes_on_to_dead_letter`]) and its payload. Should the DLQ stream refuse
    /// that copy for good ([`dlq::refused_for_good`]: the server answers with an error,
    /// or the DLQ headers push the message past max_payload), a stripped copy goes
    /// instead ([`dlq::DeadLetterCopy::stripped`]): the reason and origin, the refusal,
    /// and the payload's size and first bytes. The whole message stays in the event
    /// stream for its retention, at the sequence the dead letter names, whereas a
    /// message whose copy is refused every time would come back every ack wait for good,
    /// blocking nothing but never leaving the consumer's pending count.
    ///
    /// If no copy reached the DLQ stream (NATS unreachable, no DLQ stream, no ack in
    /// time) the message stays unacked and comes back to try again.
    async fn dead_letter(
        &self,
        message: jetstream::Message,
        stream_sequence: u64,
        stored_at: OffsetDateTime,
        reason: dlq::Reason,
    ) {
        let device_id = device_hint(&message.payload, &message.subject);
        // The event id as the relay published it (API.md §7: a failure's log line names
        // it where there is one); a payload that cannot be decoded has none of its own.
        let event_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(contract::event::headers::MSG_ID))
            .map(|id| id.as_str());
        tracing::warn!(
            stream_sequence,
            event_id,
            device_id = device_id.as_deref().unwrap_or("unknown"),
            %reason,
            "dead-lettering message"
        );
        let subject = self.subjects.dlq(device_id.as_deref());
        let letter =
            dlq::DeadLetterCopy::new(self.subjects.stream(), stream_sequence, stored_at, &reason);
        let full = || letter.full(message.headers.as_ref());
        let mut published = self
            .publish_dead_letter(subject.clone(), full(), message.payload.clone())
            .await;
        if matches!(&published, Err(error) if error.kind() == PublishErrorKind::StreamNotFound) {
            // Nothing takes dead letters: an operator removed the stream. Made again as
            // the relay makes it, or the message would stay unacked for good.
            match ingest::relay::create_dead_letter_stream(&self.jetstream, &self.nats).await {
                Ok(()) => {
                    tracing::warn!(
                        stream = self.subjects.dlq_stream(),
                        "no dead-letter stream took the message, made sure it exists"
                    );
                    published = self
                        .publish_dead_letter(subject.clone(), full(), message.payload.clone())
                        .await;
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "making the dead-letter stream again failed"
                    )
                }
            }
        }
        if let Err(error) = &published {
            if dlq::refused_for_good(error) {
                let refusal = error.to_string();
                tracing::warn!(
                    error = refusal,
                    stream_sequence,
                    "the dead-letter stream refused the message, dead-lettering it stripped"
                );
                let (headers, payload) = letter.stripped(&refusal, &message.payload);
                published = self.publish_dead_letter(subject, headers, payload).await;
            }
        }
        match published {
            Ok(()) => {
                // Also when the stream acknowledged a copy of a letter it took before (a
                // termination lost, or a PubAck: that attempt counted nothing), so that an
                // alert on the counter sees every poison message.
                count_dead_letters(reason.label(), 1);
                if let Err(error) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(%error, stream_sequence, "terminating a dead-lettered message failed");
                }
            }
            Err(error) => {
                tracing::warn!(%error, stream_sequence, "dead-lettering failed, will retry on redelivery")
            }
        }
    }

    /// Publishes a dead letter and waits for the DLQ stream's ack.
    async fn publish_dead_letter(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), PublishError> {
        self.jetstream
            .publish_with_headers(subject, headers, payload)
            .await?
            .await
            .map(drop)
    }
}

/// Decodes a delivered event, with its `Event-Version` header, and checks that its
/// subject names its device (`<stream>.recorded.<device_id>`, API.md §6): one
/// published under another device's subject would be counted for a device that
/// `nats stream view --subject` never shows it under. Also checks its date against
/// `stored_at`, when the stream stored it ([`TelemetryRecorded::check_lead`]).
pub fn decode(
    message: &async_nats::Message,
    stored_at: OffsetDateTime,
) -> Result<TelemetryRecorded, DecodeError> {
    let version = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(headers::EVENT_VERSION))
        .map(|value| value.as_str());
    let event = TelemetryRecorded::decode(&message.payload, version)?;
    match device_token(message.subject.as_str()) {
        Some(device) if device == event.device_id => {}
        Some(device) => {
            return Err(DecodeError::Invalid(format!(
                "device_id {} under the subject of device {}",
                event.device_id,
                device.chars().take(64).collect::<String>()
            )))
        }
        None => {
            return Err(DecodeError::Invalid(format!(
                "a subject of more tokens than <stream>.recorded.<device_id>: {}",
                message.subject.chars().take(96).collect::<String>()
            )))
        }
    }
    event.check_lead(stored_at)?;
    Ok(event)
}

/// The device a poison message most likely belongs to, if it can be told safely.
fn device_hint(payload: &[u8], subject: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WithDevice {
        device_id: String,
    }
    serde_json::from_slice::<WithDevice>(payload)
        .ok()
        .map(|with_device| with_device.device_id)
        .or_else(|| device_token(subject).map(str::to_owned))
        .filter(|device_id| check_device_id(device_id).is_ok())
}

/// Where the durable consumer stood at the previous look: the stream sequence of its ack
/// floor and the stored time of the message there. If that message is later gone or
/// another one (with another time) sits at its sequence, the stream lost messages
/// below the consumer's position. An anchor speaks for the consumer it was taken of
/// only (`consumer_start`, see [`consumer_start`]): one recreated since by another
/// projector's repair starts from elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConsumerAnchor {
    stream_sequence: u64,
    stored_at: OffsetDateTime,
    consumer_start: Option<OffsetDateTime>,
}

/// Tells the durable consumer's incarnations apart, also across NATS restarts (which
/// renew its `created` time): the start time a repair gives it, a moment no other
/// repair shares; `None` for a consumer that delivers the whole stream, as first made.
fn consumer_start(info: &async_nats::jetstream::consumer::Info) -> Option<OffsetDateTime> {
    match info.config.deliver_policy {
        DeliverPolicy::ByStartTime { start_time } => Some(start_time),
        _ => None,
    }
}

impl ConsumerAnchor {
    /// `<sequence> <stored-at nanos> <consumer start nanos, or "all">`.
    fn encode(&self) -> String {
        let start = self.consumer_start.map_or("all".to_owned(), |start| {
            start.unix_timestamp_nanos().to_string()
        });
        format!(
            "{} {} {start}",
            self.stream_sequence,
            self.stored_at.unix_timestamp_nanos(),
        )
    }

    /// `None` for anything else, such as an anchor of the two-field form stored before
    /// anchors named their consumer (the next look takes a new one).
    fn decode(text: &str) -> Option<Self> {
        let time =
            |field: &str| OffsetDateTime::from_unix_timestamp_nanos(field.parse().ok()?).ok();
        match text.split(' ').collect::<Vec<_>>()[..] {
            [sequence, stored_at, consumer_start] => Some(Self {
                stream_sequence: sequence.parse().ok()?,
                stored_at: time(stored_at)?,
                consumer_start: match consumer_start {
                    "all" => None,
                    start => Some(time(start)?),
                },
            }),
            _ => None,
        }
    }
}

/// The anchor stored at `key`, if there is a readable one.
async fn read_anchor(
    redis: &mut RedisConnection,
    key: &str,
) -> redis::RedisResult<Option<ConsumerAnchor>> {
    let stored: Option<String> = redis::cmd("GET").arg(key).query_async(redis).await?;
    Ok(stored.as_deref().and_then(ConsumerAnchor::decode))
}

/// The newest consumer anchor kept for the read model under `prefix`, of whichever
/// consumer it was taken (its name comes with it): the one whose message the stream
/// stored last, so the furthest any consumer is known to have acked into this read
/// model. Each consumer keeps its own anchor ([`consumer_anchor_key`]), and one
/// renamed away from leaves its last one behind: a consumer going back to that name
/// starts past where the read model stands, not past its own older anchor.
///
/// Read only when a consumer has to be made, so a `SCAN` of the keyspace is affordable.
///
/// [`consumer_anchor_key`]: contract::read_model::consumer_anchor_key
async fn newest_read_model_anchor(
    redis: &mut RedisConnection,
    prefix: &str,
) -> redis::RedisResult<Option<(String, ConsumerAnchor)>> {
    let key_of = |consumer: &str| contract::read_model::consumer_anchor_key(prefix, consumer);
    let pattern =
        contract::read_model::consumer_anchor_key(&contract::read_model::glob_escaped(prefix), "*");
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        keys.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut newest: Option<(String, ConsumerAnchor)> = None;
    for key in keys {
        let Some(consumer) = key.strip_prefix(&key_of("")) else {
            continue;
        };
        let Some(anchor) = read_anchor(redis, &key).await? else {
            continue;
        };
        let newer = newest.as_ref().is_none_or(|(_, kept)| {
            (anchor.stored_at, anchor.stream_sequence) > (kept.stored_at, kept.stream_sequence)
        });
        if newer {
            newest = Some((consumer.to_owned(), anchor));
        }
    }
    Ok(newest)
}

/// The stream sequence of the newest consumer anchor kept for the read model under
/// `prefix` ([`newest_read_model_anchor`]), past which a durable consumer made now
/// starts; 0 without one.
pub(crate) async fn newest_anchored_sequence(
    redis: &mut RedisConnection,
    prefix: &str,
) -> redis::RedisResult<u64> {
    Ok(newest_read_model_anchor(redis, prefix)
        .await?
        .map_or(0, |(_, anchor)| anchor.stream_sequence))
}

/// Whether a consumer look-up failed because there is no such consumer.
fn consumer_not_found(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<async_nats::jetstream::context::ConsumerInfoError>()
        .is_some_and(|error| error.kind() == ConsumerInfoErrorKind::NotFound)
}

/// What became of the message an anchor was taken at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnchorFate {
    /// The stream still holds it at its sequence.
    Kept { sequence: u64 },
    /// Below the stream's first sequence: retention dropped it, and everything before.
    Expired,
    /// Gone, or another message at its sequence: the stream went back below it.
    Replaced,
}

impl AnchorFate {
    /// From the stream's first sequence and the stored time of the message the stream
    /// holds at the anchor's sequence (`found`, `None` if none).
    fn of(
        anchor: &ConsumerAnchor,
        stream_first_sequence: u64,
        found: Option<OffsetDateTime>,
    ) -> Self {
        if anchor.stream_sequence < stream_first_sequence {
            AnchorFate::Expired
        } else if found == Some(anchor.stored_at) {
            AnchorFate::Kept {
                sequence: anchor.stream_sequence,
            }
        } else {
            AnchorFate::Replaced
        }
    }
}

/// Whether Redis failing a batch with `error` fails every batch alike: it is out of
/// reach, refuses the login or the script, or takes no writes now (loading its data,
/// busy with a script, out of memory, a replica). A failure of one device's call (a
/// key of another type) does not stop the projector pulling the other devices' events.
/// The server's errors arrive one per failed call of the batch's pipeline.
fn takes_no_batch(error: &redis::RedisError) -> bool {
    let whole_server = |code: &str| {
        matches!(
            code,
            "LOADING" | "BUSY" | "OOM" | "READONLY" | "MASTERDOWN" | "NOAUTH" | "NOPERM"
        )
    };
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || login_refused(error)
        || error.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, server_error)| whole_server(server_error.code()))
        })
}

/// Looks up what became of the anchor's message (no fetch for an expired one).
async fn anchor_fate(
    stream: &jetstream::stream::Stream,
    anchor: &ConsumerAnchor,
    stream_first_sequence: u64,
) -> anyhow::Result<AnchorFate> {
    let found = if anchor.stream_sequence < stream_first_sequence {
        None
    } else {
        stored_at(stream, anchor.stream_sequence).await?
    };
    Ok(AnchorFate::of(anchor, stream_first_sequence, found))
}

/// Where a durable consumer made again starts, from what became of the message at the
/// anchor of the one before it:
/// - kept: just past it. Everything up to it was acked, so applied; what comes after
///   and was applied too comes again and is skipped as long as it was applied within
///   the dedup horizon (the anchor is at most a second old while a projector runs,
///   and is taken again when one stops);
/// - expired (retention dropped it, and with it everything acked): the whole stream;
/// - replaced: the stream went back too (see [`recreate_consumer`]), so from the
///   start of the dedup horizon, as a repair does.
fn resume_after(fate: AnchorFate, horizon_start: OffsetDateTime) -> DeliverPolicy {
    match fate {
        AnchorFate::Kept { sequence } => DeliverPolicy::ByStartSequence {
            start_sequence: sequence + 1,
        },
        AnchorFate::Expired => DeliverPolicy::All,
        AnchorFate::Replaced => DeliverPolicy::ByStartTime {
            start_time: horizon_start,
        },
    }
}

/// The supervisor's view of the durable consumer between looks; the anchor is kept in
/// Redis too, so that a projector started after a NATS restart still has it, and
/// written there again when Redis lost it (see [`ConsumerWatch::refresh_anchor`]).
struct ConsumerWatch {
    redis: RedisConnection,
    anchor_key: String,
    anchor: Option<ConsumerAnchor>,
    anchor_loaded: bool,
}

impl ConsumerWatch {
    fn new(rebuild: &Rebuild) -> Self {
        Self {
            redis: rebuild.redis.clone(),
            anchor_key: contract::read_model::consumer_anchor_key(
                &rebuild.read_model.prefix,
                &rebuild.consumer,
            ),
            anchor: None,
            anchor_loaded: false,
        }
    }

    /// Looks at the anchor stored in Redis, once per look. The first read becomes this
    /// watch's anchor. Later, an anchor found missing while this watch holds one (Redis
    /// restarted or was flushed, and lost it with the read model) is written again at
    /// once: the look takes a new one only when the ack floor moves, which on a quiet
    /// stream may not happen before an operator deletes the consumer, and without an
    /// anchor the consumer made again delivers the whole stream (every event applied
    /// longer ago than the dedup horizon counted twice).
    async fn refresh_anchor(&mut self) {
        if !self.anchor_loaded {
            match read_anchor(&mut self.redis, &self.anchor_key).await {
                Ok(stored) => {
                    self.anchor_loaded = true;
                    self.anchor = stored;
                }
                Err(error) => tracing::debug!(%error, "reading the consumer anchor failed"),
            }
            return;
        }
        let Some(anchor) = self.anchor else {
            return;
        };
        // NX writes only a missing anchor, in the same command that looks: another
        // projector that wrote its anchor since has the newer one.
        let restored: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&self.anchor_key)
            .arg(anchor.encode())
            .arg("NX")
            .query_async(&mut self.redis)
            .await;
        match restored {
            Ok(Some(_)) => tracing::info!(
                anchor_stream_sequence = anchor.stream_sequence,
                "the consumer anchor was missing from redis, wrote it again"
            ),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "writing the missing consumer anchor again failed")
            }
        }
    }

    /// Replaces the anchor. One is never removed: until the consumer has acked a
    /// message of the stream, the last anchor of the one before it says the most
    /// about where a consumer made again should start (see [`resume_after`]).
    async fn set_anchor(&mut self, anchor: ConsumerAnchor) {
        if self.anchor == Some(anchor) {
            return;
        }
        self.anchor = Some(anchor);
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&self.anchor_key)
            .arg(anchor.encode())
            .query_async(&mut self.redis)
            .await;
        if let Err(error) = stored {
            tracing::debug!(%error, "remembering the consumer anchor failed");
        }
    }
}

/// Why the durable consumer had to be recreated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamWentBack {
    /// The consumer has delivered past the stream's last sequence.
    ConsumerAheadOfStream,
    /// The message at the consumer's former ack floor is gone or was replaced.
    AnchorMessageReplaced,
}

/// Publishes the durable consumer's backlog as gauges (`num_pending`, `num_ack_pending`,
/// `num_redelivered`) and repairs the consumer when its stream went back below it.
///
/// nats-server 2.9 keeps a durable consumer's position when its stream restarts with
/// fewer messages (an OS crash before the server's fsync): the consumer's delivered
/// and ack-floor sequences stay above the stream's last sequence, and the new messages
/// that reuse the lost sequences are never delivered. Either sign — the consumer ahead
/// of the stream, or the message at its previous ack floor replaced — recreates it
/// (see [`recreate_consumer`]).
async fn watch_consumer(rebuild: &Rebuild, watch: &mut ConsumerWatch) {
    let looked = tokio::time::timeout(Duration::from_secs(5), look_at_consumer(rebuild, watch));
    match looked.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(
                error = format!("{error:#}"),
                "looking at the consumer failed"
            )
        }
        Err(_) => tracing::debug!("looking at the consumer timed out"),
    }
}

async fn look_at_consumer(rebuild: &Rebuild, watch: &mut ConsumerWatch) -> anyhow::Result<()> {
    let stream = rebuild
        .jetstream
        .get_stream(rebuild.subjects.stream())
        .await
        .context("looking up the stream")?;
    // The consumer first, the stream second: the stream only grows between the two
    // reads, so a consumer seen past the stream's end really is past it. The other
    // order reads a new message's delivery against a stream state from before it and,
    // under load, takes the ordinary race for a stream that went back.
    let info = stream
        .consumer_info(&rebuild.consumer)
        .await
        .context("consumer info")?;
    let stream_state = stream.get_info().await.context("stream info")?.state;
    metrics::gauge!("projector_consumer_pending").set(info.num_pending as f64);
    metrics::gauge!("projector_consumer_ack_pending").set(info.num_ack_pending as f64);
    metrics::gauge!("projector_consumer_redelivered").set(info.num_redelivered as f64);

    watch.refresh_anchor().await;
    // An anchor of a consumer recreated since (by another projector's repair, or by an
    // operator) says nothing about this one: without this, every projector would repair
    // the stream's loss once more, each redelivering the dedup horizon.
    let previous = watch
        .anchor
        .filter(|anchor| anchor.consumer_start == consumer_start(&info));
    let went_back = if info.delivered.stream_sequence > stream_state.last_sequence {
        Some(StreamWentBack::ConsumerAheadOfStream)
    } else if let Some(previous) = previous {
        let fate = anchor_fate(&stream, &previous, stream_state.first_sequence).await?;
        (fate == AnchorFate::Replaced).then_some(StreamWentBack::AnchorMessageReplaced)
    } else {
        None
    };
    if let Some(reason) = went_back {
        // The anchor stays: it names the consumer it was taken of, which the new one
        // is not, and says where a consumer made again should start.
        return recreate_consumer(rebuild, &stream, &info, stream_state.last_sequence, reason)
            .await;
    }
    let ack_floor = info.ack_floor.stream_sequence;
    if previous.is_some_and(|previous| previous.stream_sequence == ack_floor) {
        return Ok(());
    }
    if ack_floor < stream_state.first_sequence.max(1) {
        return Ok(());
    }
    if let Some(stored_at) = stored_at(&stream, ack_floor).await? {
        let anchor = ConsumerAnchor {
            stream_sequence: ack_floor,
            stored_at,
            consumer_start: consumer_start(&info),
        };
        watch.set_anchor(anchor).await;
    }
    Ok(())
}

/// When the stream stored the message at `sequence`; `None` if it holds none there.
async fn stored_at(
    stream: &jetstream::stream::Stream,
    sequence: u64,
) -> anyhow::Result<Option<OffsetDateTime>> {
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(Some(message.time)),
        Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("fetching stream message {sequence}")),
    }
}

/// How long a projector may hold the consumer repair lock (a repair is two JetStream
/// requests; the lock is released when they are done).
const REPAIR_LOCK_TTL: Duration = Duration::from_secs(10);

/// Deletes the durable consumer and creates it again, delivering every message stored
/// within the projector's dedup horizon. That cannot skip a message the stream gained
/// after it went back (as long as this runs within the horizon of the NATS restart;
/// it runs within seconds), and what it delivers again that was applied already is
/// skipped by `apply.lua`, which remembers applied event ids for the same horizon.
///
/// Every projector watches the consumer, so one repair is made for all of them: under
/// a lock in Redis, and only if the consumer is still the one `info` describes (one
/// that another projector created since is left alone).
async fn recreate_consumer(
    rebuild: &Rebuild,
    stream: &jetstream::stream::Stream,
    info: &async_nats::jetstream::consumer::Info,
    stream_last_sequence: u64,
    reason: StreamWentBack,
) -> anyhow::Result<()> {
    let mut redis = rebuild.redis.clone();
    let lock = contract::read_model::consumer_repair_lock_key(
        &rebuild.read_model.prefix,
        &rebuild.consumer,
    );
    let taken = crate::lock::take(&mut redis, &lock, REPAIR_LOCK_TTL)
        .await
        .context("taking the consumer repair lock")?;
    let Some(owner) = taken else {
        tracing::debug!(
            ?reason,
            "another projector is repairing the durable consumer"
        );
        return Ok(());
    };
    let repaired = async {
        let current = stream
            .consumer_info(&rebuild.consumer)
            .await
            .context("consumer info")?;
        if consumer_start(&current) != consumer_start(info) {
            tracing::debug!(
                ?reason,
                "the durable consumer was recreated meanwhile, by another projector"
            );
            return Ok(());
        }
        let start_time = rebuild
            .read_model
            .dedup_horizon_start(OffsetDateTime::now_utc());
        stream
            .delete_consumer(&rebuild.consumer)
            .await
            .context("deleting the durable consumer")?;
        stream
            .create_consumer(durable_consumer_config(
                &rebuild.consumer,
                rebuild.ack_wait,
                DeliverPolicy::ByStartTime { start_time },
            ))
            .await
            .context("recreating the durable consumer")?;
        metrics::counter!("projector_consumer_recreated_total").increment(1);
        tracing::warn!(
            ?reason,
            consumer = %rebuild.consumer,
            delivered_stream_sequence = info.delivered.stream_sequence,
            ack_floor_stream_sequence = info.ack_floor.stream_sequence,
            stream_last_sequence,
            redeliver_from = %start_time,
            "stream went back below the durable consumer, recreated it to redeliver the dedup horizon"
        );
        Ok(())
    }
    .await;
    crate::lock::release(&mut redis, &lock, &owner).await;
    repaired
}

/// The durable pull consumer every projector shares.
fn durable_consumer_config(
    name: &str,
    ack_wait: Duration,
    deliver_policy: DeliverPolicy,
) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        deliver_policy,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Takes the anchor once more, for a projector that stops: its last acks are then part
/// of it, should the consumer be made again while no projector runs.
pub async fn take_anchor(rebuild: &Rebuild) {
    // The consumer's position comes from NATS: while it is down there is none to take.
    if nats_connected(&rebuild.jetstream.client()) {
        watch_consumer(rebuild, &mut ConsumerWatch::new(rebuild)).await;
    }
}

/// Watches the read model and rebuilds it when it is missing (never built, or lost with
/// a Redis restart), when Redis restarted and loaded it from its files while the stream
/// still holds every event ([`RestartWatch`]), or when a rebuild was abandoned by a
/// process that died. Several projectors may run this; the rebuild lock lets one of them
/// do the work. It also deletes the keys a rebuild that died after its switch left
/// ([`Rebuild::delete_retired`]). Every second it also looks at the durable consumer
/// (`watch_consumer`), and every few seconds at whether Redis may evict keys
/// ([`EvictionWatch`]).
pub async fn supervise(rebuild: Rebuild, shutdown: CancellationToken) {
    let mut redis = rebuild.redis.clone();
    let prefix = rebuild.read_model.prefix.clone();
    let mut consumer_watch = ConsumerWatch::new(&rebuild);
    let mut eviction_watch = EvictionWatch::default();
    let mut restart_watch = RestartWatch::default();
    // A rebuild replays the stream, minutes of it maybe: it runs in a task of its own, so
    // the looks at the consumer (its gauges, its anchor, the repair of a stream that went
    // back) and at Redis go on meanwhile. Aborted when dropped, with the supervisor.
    let rebuild = Arc::new(rebuild);
    let mut rebuilding: Option<AbortOnDropHandle<Result<u64, RebuildError>>> = None;
    while !shutdown.is_cancelled() {
        if let Some(finished) = rebuilding.take_if(|running| running.is_finished()) {
            report_rebuild(finished.await);
        }
        let generations = tokio::select! {
            _ = shutdown.cancelled() => break,
            generations = Generations::read(&mut redis, &prefix) => generations,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = eviction_watch.look(&mut redis) => {}
        }
        // While a rebuild of this supervisor's runs, nothing needs looking at.
        let needed = match (&rebuilding, &generations) {
            (Some(_), _) | (None, Err(_)) => false,
            (
                None,
                Ok(Generations {
                    current: None,
                    building: None,
                    ..
                }),
            ) => true,
            (
                None,
                Ok(Generations {
                    building: Some(_), ..
                }),
            ) => {
                let holder: redis::RedisResult<Option<String>> = redis::cmd("GET")
                    .arg(contract::read_model::rebuild_lock_key(&prefix))
                    .query_async(&mut redis)
                    .await;
                matches!(holder, Ok(None))
            }
            (None, Ok(live)) => tokio::select! {
                _ = shutdown.cancelled() => break,
                reloaded = restart_watch.reloaded(&rebuild, live) => reloaded,
            },
        };
        // Keys of a generation a rebuild switched away from, left by its process's death.
        if let (None, false, Ok(generations)) = (&rebuilding, needed, &generations) {
            if !generations.retired.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    deleted = rebuild.delete_retired() => {
                        if let Err(error) = deleted {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "deleting a retired generation failed, will retry"
                            );
                        }
                    }
                }
            }
        }
        // A look at the consumer waits out a request timeout while NATS is down.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = watch_consumer(&rebuild, &mut consumer_watch) => {}
        }
        if needed {
            let (rebuild, shutdown) = (rebuild.clone(), shutdown.clone());
            rebuilding = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                rebuild.run(&shutdown).await
            })));
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // A rebuild stops with the same token.
    if let Some(running) = rebuilding {
        report_rebuild(running.await);
    }
}

/// Logs how a rebuild the supervisor started ended.
fn report_rebuild(ended: Result<Result<u64, RebuildError>, tokio::task::JoinError>) {
    match ended {
        Ok(Ok(generation)) => tracing::info!(generation, "read model rebuilt"),
        Ok(Err(RebuildError::AlreadyRunning)) => {}
        Ok(Err(error)) => {
            tracing::warn!(error = format!("{error:#}"), "rebuild failed, will retry")
        }
        Err(error) => tracing::warn!(%error, "rebuild task failed, will retry"),
    }
}

/// A refusal of a batch's calls not taken for their devices' own
/// ([`Projector::refusal_is_the_devices`]), as an error of the whole batch: Redis's
/// first answer.
fn refusal(events: &BTreeMap<uuid::Uuid, String>) -> redis::RedisError {
    let line = events.values().next().cloned().unwrap_or_default();
    redis::RedisError::from((redis::ErrorKind::Extension, "redis refused the calls", line))
}

/// The deliveries after which an event Redis still refuses to apply
/// ([`crate::apply::refuses_only_the_call`]) goes to the dead-letter stream: a few ack
/// waits to mend its device's keys in.
pub const DELIVERIES_BEFORE_REFUSED_IS_DEAD: i64 = 3;

/// Adds `events` to the dead letters counted for `reason`
/// (`projector_dlq_total{reason}`, one of [`dlq::Reason::labels`]).
pub fn count_dead_letters(reason: &'static str, events: u64) {
    metrics::counter!("projector_dlq_total", "reason" => reason).increment(events);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchor_reads_back_as_written() {
        let time = |nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("in range");
        for consumer_start in [None, Some(time(1_763_999_000_000_000_001))] {
            let anchor = ConsumerAnchor {
                stream_sequence: 42,
                stored_at: time(1_764_000_000_123_456_789),
                consumer_start,
            };
            assert_eq!(ConsumerAnchor::decode(&anchor.encode()), Some(anchor));
        }
    }

    #[test]
    fn a_consumer_made_again_starts_past_its_anchor_unless_the_stream_changed_under_it() {
        let time = |nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("in range");
        let anchor = ConsumerAnchor {
            stream_sequence: 42,
            stored_at: time(1_764_000_000_123_456_789),
            consumer_start: None,
        };
        let horizon_start = time(1_764_000_900_000_000_000);
        let cases = [
            // The message at the anchor is the one it was taken of.
            (
                Some(anchor.stored_at),
                1,
                DeliverPolicy::ByStartSequence { start_sequence: 43 },
            ),
            // Retention dropped it, and everything acked with it.
            (None, 43, DeliverPolicy::All),
            // Gone or another message: the stream went back below it.
            (
                None,
                1,
                DeliverPolicy::ByStartTime {
                    start_time: horizon_start,
                },
            ),
            (
                Some(time(1_764_000_000_123_456_790)),
                1,
                DeliverPolicy::ByStartTime {
                    start_time: horizon_start,
                },
            ),
        ];
        for (found, first_sequence, expected) in cases {
            assert_eq!(
                resume_after(
                    AnchorFate::of(&anchor, first_sequence, found),
                    horizon_start
                ),
                expected,
                "{found:?} at 42, stream from {first_sequence}"
            );
        }
    }

    #[test]
    fn an_anchor_that_names_no_consumer_or_is_garbled_is_none() {
        for text in [
            "42 1764000000123456789",
            "",
            "42 x 1",
            "-1 1 1",
            "42 1 1 1",
            "42 1 every",
            "42 99999999999999999999999999999 1",
        ] {
            assert_eq!(ConsumerAnchor::decode(text), None, "{text:?}");
        }
    }
}

//! Generations of the read model: which one is live, rebuilding a new one from the
//! stream while the live projector keeps going, switching over, and self-healing.
//!
//! A rebuild (the `projector rebuild` command, or a projector that finds the read model
//! gone, e.g. after a Redis restart without persistence):
//! 1. takes the rebuild lock (one rebuild at a time, refreshed while it runs);
//! 2. names a new generation (past the live one and past any a rebuild whose process
//!    died left in `building`; a rebuild that fails or is stopped abandons its own,
//!    `Rebuild::abandon`) and sets it as `building` in the meta hash, if it still holds
//!    the lock; only then does it delete
//!    the abandoned generation's keys, so that no live projector writes to it after
//!    their deletion (a generation's keys are deleted only once the meta hash no longer
//!    names it: device hashes and index keys never expire). From then on
//!    every live projector applies each batch to the live generation *and* to the one
//!    being built. A live projector applies its batches with the generations it read
//!    last, and every script call checks in Redis, atomically with its writes, that the
//!    meta hash still names them (`guard.lua`); a call that finds them changed writes
//!    nothing and the batch is applied again with the generations read anew. So any
//!    event applied to the live generation only was applied before `building` was set,
//!    or is one the replay applies alone (step 3); either way it was in the stream
//!    before, and the replay below brings it to the new one;
//! 3. notes the stream's last sequence and replays the stream up to it into the new
//!    generation (the per-generation dedup set skips what the live projectors applied
//!    there already); a replay whose consumer is lost, as with a NATS restart, goes on
//!    with a new one just past what it applied. Each of the replay's calls is guarded
//!    as the live projectors' are, by the meta hash as the replay began: a replay
//!    whose read model was lost under it (`FLUSHALL`, a Redis restart without
//!    persistence) or whose build
//!    another rebuild took over writes nothing more and fails, instead of leaving keys
//!    of a generation nothing names. The dedup set forgets after the dedup
//!    horizon, and a replay of a long stream can take longer than that, so the replay
//!    takes first what the live projectors may also apply: everything past their
//!    consumer's ack floor, read *before* `building` was set. Both apply that part
//!    within moments of each other, while the dedup set still holds what the other
//!    applied. The older part, however long its replay, is the replay's alone: the
//!    floor is written with `building` ([`ReplayThrough`]), and a live projector whose
//!    consumer went back below it (NATS lost the consumer's latest acks in a crash, a
//!    repair redelivered the dedup horizon) applies what comes again from there to the
//!    live generation only. An event the stream holds twice, one copy on each side of
//!    the floor (the relay published it again past JetStream's duplicate window), would
//!    so come once at the start and once at the older part's end: the replay remembers
//!    the ids it met first past the floor and leaves their copies out of the older part
//!    (`PastTheFloor`). Once the replay has read the stream's last sequence it writes
//!    that too ([`meta::REPLAY_LAST`]), under the guard, and from then on live projectors
//!    leave everything up to it to the replay: projectors that were stopped or far
//!    behind and come back while a replay longer than the horizon runs would otherwise
//!    apply their backlog (past the floor) to the new generation long after the replay
//!    did, and it would count twice there;
//! 4. switches `generation` to the new one and clears `building`, in one script that
//!    checks it still owns the lock and the build, and names the old one `retired`. It
//!    also writes what the new generation holds ([`meta::BUILT_THROUGH`]): the replay's
//!    last sequence. The live projectors' consumer delivers what lies past its ack floor
//!    after the switch too, and if they were stopped (or far behind) through the
//!    rebuild, that comes past the dedup horizon after the replay applied it; a live
//!    projector leaves out of the new generation what it holds already, or it would
//!    count twice. A message stored later at such a sequence (the stream went back and
//!    grew again) is new and is applied;
//! 5. deletes the old generation's keys after a short grace period, and then its name
//!    from `retired`. Should its process die before, a live projector's supervisor
//!    deletes them once the lock is free ([`Rebuild::delete_retired`]). A build an
//!    earlier rebuild abandoned is named `retired` by the script that names the new one
//!    `building` (step 2), and deleted at once, the same way.

use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer};
use contract::event::TelemetryRecorded;
use contract::read_model::{
    generation_pattern, live_generation, meta, meta_key, rebuild_lock_key, LAYOUT,
};
use contract::subjects::Subjects;
use contract::timestamp::unix_millis;
use futures::StreamExt;
use ingest::redis_connection::RedisConnection;
use redis::Script;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::apply::{Delivered, ReadModel};
use crate::lock;

/// How long the rebuild lock lives unless refreshed.
const LOCK_TTL: Duration = Duration::from_secs(15);
/// How long the old generation stays after the switch, for reads already under way.
const SWITCH_GRACE: Duration = Duration::from_secs(2);
/// How long the replay waits for its next messages before it takes its consumer for
/// lost.
const REPLAY_STALL: Duration = Duration::from_secs(5);
/// Consumers the replay makes in a row without a message in between before the rebuild
/// fails (and is tried again from the start), and the pause before each.
const REPLAY_CONSUMER_ATTEMPTS: u32 = 10;
const REPLAY_CONSUMER_PAUSE: Duration = Duration::from_secs(1);

/// The replay's messages, as many as are ready at a time.
type ReplayBatches = futures::stream::ReadyChunks<consumer::pull::Ordered>;

/// The live and the building generation, as the meta hash names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generations {
    pub current: Option<u64>,
    pub building: Option<u64>,
    /// A generation named live but of another key layout ([`LAYOUT`]): no read model
    /// as far as this version can tell; the rebuild replaces it and deletes its keys.
    pub outdated: Option<u64>,
    /// What the build's replay alone applies to `building` (see [`ReplayThrough`]);
    /// written with `building`, so the guard on that field covers it too.
    pub replay_through: Option<ReplayThrough>,
    /// What the build's replay applies, once it began: every message up to the stream's
    /// last sequence then ([`meta::REPLAY_LAST`]). Live projectors leave it to the
    /// replay as they leave what `replay_through` covers; part of the guard.
    pub replay_last: Option<ReplayThrough>,
    /// What the rebuild that made `current` live replayed into it, which it holds
    /// already ([`meta::BUILT_THROUGH`]); written by the switch with `generation`, so the
    /// guard on that field covers it, and kept only when it names `current`.
    pub built_through: Option<ReplayThrough>,
    /// The meta hash's generation, layout, building and replay_last fields as read
    /// (empty for none): a batch applied with these generations writes nothing if they
    /// changed since ([`ReadModel::apply_as_of`]).
    pub fields: [String; 4],
    /// The meta hash's `redis_run`: the Redis server the live generation was built on
    /// (see [`crate::restart`]).
    pub redis_run: Option<String>,
    /// Generations switched away from whose keys are still to be deleted
    /// ([`meta::RETIRED`]).
    pub retired: Vec<u64>,
}

/// The live projectors' ack floor when a build began (`stream_sequence`) and the time
/// the stream had stored its newest message at just after (`stored_at`): every message
/// at or below that sequence was stored by then. The build's replay applies each such
/// message to the new generation, and it alone: a live projector applies one that
/// comes to it again (its consumer went back: NATS lost the consumer's latest acks in
/// a crash, a repair redelivered the dedup horizon, an operator made it again) to the
/// live generation only. Otherwise the live projector could apply it to the new
/// generation longer than the dedup horizon before the replay does, and it would
/// count twice there. A message stored later at such a sequence (the stream went back
/// and grew again) is new, and goes to both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayThrough {
    pub stream_sequence: u64,
    pub stored_at: OffsetDateTime,
}

impl ReplayThrough {
    /// Whether the replay alone applies the message at `delivered`'s position.
    pub fn covers(&self, delivered: &Delivered) -> bool {
        delivered.stream_sequence <= self.stream_sequence && delivered.stored_at <= self.stored_at
    }

    /// `<stream sequence> <stored-at unix nanoseconds>`, the meta hash's field.
    fn encode(&self) -> String {
        format!(
            "{} {}",
            self.stream_sequence,
            self.stored_at.unix_timestamp_nanos()
        )
    }

    /// The meta hash's field `name` as read, `<sequence> <nanoseconds>`, if there is one.
    fn field(name: &str, text: Option<&str>) -> redis::RedisResult<Option<Self>> {
        text.map(|text| {
            Self::decode(text).ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "a field of the meta hash is not <sequence> <nanoseconds>",
                    name.to_owned(),
                ))
            })
        })
        .transpose()
    }

    fn decode(text: &str) -> Option<Self> {
        let (sequence, stored_at) = text.split_once(' ')?;
        Some(Self {
            stream_sequence: sequence.parse().ok()?,
            stored_at: OffsetDateTime::from_unix_timestamp_nanos(stored_at.parse().ok()?).ok()?,
        })
    }
}

/// The meta hash's `generation`, `layout`, `building`, `replay_through`, `redis_run`,
/// `retired`, `built_through` and `replay_last`.
type MetaFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl Generations {
    pub async fn read(connection: &mut RedisConnection, prefix: &str) -> redis::RedisResult<Self> {
        let (
            generation,
            layout,
            building,
            replay_through,
            redis_run,
            retired,
            built_through,
            replay_last,
        ): MetaFields = redis::cmd("HMGET")
            .arg(meta_key(prefix))
            .arg(meta::LIVE)
            .arg(meta::BUILDING)
            .arg(meta::REPLAY_THROUGH)
            .arg(meta::REDIS_RUN)
            .arg(meta::RETIRED)
            .arg(meta::BUILT_THROUGH)
            .arg(meta::REPLAY_LAST)
            .query_async(connection)
            .await?;
        let fields = [generation, layout, building, replay_last].map(Option::unwrap_or_default);
        let number = |field: &str| -> redis::RedisResult<Option<u64>> {
            if field.is_empty() {
                return Ok(None);
            }
            field.parse().map(Some).map_err(|_| {
                (
                    redis::ErrorKind::UnexpectedReturnType,
                    "a field of the meta hash is not a number",
                )
                    .into()
            })
        };
        let [generation, layout, building] = [
            number(&fields[0])?,
            number(&fields[1])?,
            number(&fields[2])?,
        ];
        let current = live_generation(generation, layout);
        // `<generation> <sequence> <nanoseconds>`, of the live generation or of none.
        let built_through = match built_through {
            None => None,
            Some(text) => {
                let (built, through) = text.split_once(' ').unwrap_or_default();
                let built: u64 = built.parse().map_err(|_| {
                    (
                        redis::ErrorKind::UnexpectedReturnType,
                        "the meta hash's built_through does not begin with a generation",
                    )
                })?;
                ReplayThrough::field(meta::BUILT_THROUGH, Some(through))?
                    .filter(|_| current == Some(built))
            }
        };
        Ok(Self {
            current,
            building,
            outdated: generation.filter(|_| current.is_none()),
            replay_through: ReplayThrough::field(meta::REPLAY_THROUGH, replay_through.as_deref())?,
            replay_last: ReplayThrough::field(
                meta::REPLAY_LAST,
                Some(fields[3].as_str()).filter(|text| !text.is_empty()),
            )?,
            built_through,
            fields,
            redis_run,
            // Written by the begin and switch scripts alone, as numbers.
            retired: retired
                .unwrap_or_default()
                .split_ascii_whitespace()
                .filter_map(|generation| generation.parse().ok())
                .collect(),
        })
    }

    /// Where a live projector applies what the build's replay applies alone: the live
    /// generation only (guarded by the same fields as [`Self::targets`]).
    pub fn live_target(&self) -> Vec<u64> {
        self.current.into_iter().collect()
    }

    /// Where a live projector applies what the live generation holds already
    /// ([`Self::built_through`]): the one being built, if any (guarded by the same
    /// fields as [`Self::targets`]).
    pub fn building_target(&self) -> Vec<u64> {
        self.building
            .filter(|building| Some(*building) != self.current)
            .into_iter()
            .collect()
    }

    /// Where live events go: the live generation first, then the one being built.
    pub fn targets(&self) -> Vec<u64> {
        let mut targets = self.live_target();
        targets.extend(self.building_target());
        targets
    }
}

/// Everything a rebuild needs.
pub struct Rebuild {
    pub jetstream: jetstream::Context,
    pub redis: RedisConnection,
    pub read_model: ReadModel,
    pub subjects: Subjects,
    /// The live projectors' durable consumer (its backlog is reported as metrics).
    pub consumer: String,
    /// The ack wait that consumer is made with when a repair recreates it
    /// (`projector.ack_wait_secs`, which the dedup horizon was checked against).
    pub ack_wait: Duration,
    pub batch_size: usize,
}

/// Why no rebuild was done.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("another rebuild is running")]
    AlreadyRunning,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl Rebuild {
    /// Builds a new generation from the stream and switches to it; returns its number.
    pub async fn run(&self, shutdown: &CancellationToken) -> Result<u64, RebuildError> {
        self.holding_lock(|owner, lost_lock| async move {
            self.build_and_switch(&owner, shutdown, &lost_lock).await
        })
        .await?
        .ok_or(RebuildError::AlreadyRunning)?
        .map_err(RebuildError::Failed)
    }

    /// Runs `work` holding the rebuild lock, which is refreshed meanwhile; `work` gets
    /// the lock's owner id and a token cancelled when the lock is lost. `None` when
    /// another holds the lock.
    async fn holding_lock<T, Work>(
        &self,
        work: impl FnOnce(String, CancellationToken) -> Work,
    ) -> anyhow::Result<Option<T>>
    where
        Work: std::future::Future<Output = T>,
    {
        let mut redis = self.redis.clone();
        let prefix = &self.read_model.prefix;
        let Some(owner) = lock::take(&mut redis, &rebuild_lock_key(prefix), LOCK_TTL)
            .await
            .context("taking the rebuild lock")?
        else {
            return Ok(None);
        };
        let lost_lock = CancellationToken::new();
        // Aborted when dropped: work whose future is dropped half-way (its task aborted,
        // as a projector's stop does past its deadline) leaves the lock to expire
        // instead of refreshing it for as long as the process lives.
        let refresher = AbortOnDropHandle::new(tokio::spawn(keep_lock(
            redis.clone(),
            prefix.clone(),
            owner.clone(),
            lost_lock.clone(),
        )));
        let done = work(owner.clone(), lost_lock).await;
        drop(refresher);
        lock::release(&mut redis, &rebuild_lock_key(prefix), &owner).await;
        Ok(Some(done))
    }

    async fn build_and_switch(
        &self,
        owner: &str,
        shutdown: &CancellationToken,
        lost_lock: &CancellationToken,
    ) -> anyhow::Result<u64> {
        let mut redis = self.redis.clone();
        let prefix = &self.read_model.prefix;
        let before = Generations::read(&mut redis, prefix).await?;
        let replaced = before.current.or(before.outdated);
        // A rebuild whose process died (or that could not reach Redis to abandon its build)
        // left this half-built.
        let abandoned = before
            .building
            .filter(|abandoned| Some(*abandoned) != replaced);
        let now_ms = unix_millis(OffsetDateTime::now_utc()).max(0) as u64;
        // Past both: the abandoned generation's keys are deleted while this one is built.
        let generation = [replaced, abandoned]
            .into_iter()
            .flatten()
            .fold(now_ms, |generation, old| generation.max(old + 1));
        let mut stream = self
            .jetstream
            .get_stream(self.subjects.stream())
            .await
            .context("opening the stream")?;
        // Before `building` is set, the floor first (see the module's step 3).
        let live_ack_floor = self.live_ack_floor(&stream).await?;
        let replay_through = ReplayThrough {
            stream_sequence: live_ack_floor,
            stored_at: stream
                .info()
                .await
                .context("reading stream info")?
                .state
                .last_timestamp,
        };
        let began: i64 = BEGIN_BUILD
            .key(meta_key(prefix))
            .key(rebuild_lock_key(prefix))
            .arg(owner)
            .arg(generation)
            .arg(replay_through.encode())
            .arg(
                abandoned
                    .map(|abandoned| abandoned.to_string())
                    .unwrap_or_default(),
            )
            .invoke_async(&mut redis)
            .await?;
        if began != 1 {
            bail!("the rebuild lock lapsed before the build of generation {generation} began");
        }
        let built: anyhow::Result<(u64, bool)> = async {
            if let Some(abandoned) = abandoned {
                // Only now that `building` names another generation: live projectors
                // write to the abandoned one as long as it names that one, and a key
                // written after its deletion would stay for good. From here on each of
                // their calls that still names it writes nothing (guard.lua), and the
                // keys of the calls before are there when the deletion's SCAN begins.
                // Named retired by the same call, so that a projector deletes what this
                // process does not reach, a stop's included.
                self.delete_retired_now(&mut redis, abandoned, shutdown)
                    .await;
            }
            tracing::info!(
                generation,
                ?replay_through,
                "rebuilding the read model from the stream"
            );
            // Read before the replay: a server that restarts during it and loads its
            // files has another, and the supervisor rebuilds again.
            let built_on = crate::restart::run_id(&mut redis)
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            let replayed = self
                .replay_into(generation, stream, live_ack_floor, shutdown, lost_lock)
                .await?;
            let switched: i64 = SWITCH
                .key(meta_key(prefix))
                .key(rebuild_lock_key(prefix))
                .arg(generation)
                .arg(owner)
                .arg(LAYOUT)
                .arg(built_on)
                .invoke_async(&mut redis)
                .await?;
            if switched != 1 {
                bail!("the build of generation {generation} was taken over or the read model was reset meanwhile");
            }
            Ok(replayed)
        }
        .await;
        let (replayed, short_of_history) = match built {
            Ok(built) => built,
            Err(error) => {
                self.abandon(&mut redis, generation, shutdown).await;
                return Err(error);
            }
        };
        tracing::info!(
            generation,
            replayed,
            "read model switched to the new generation"
        );
        if short_of_history {
            // Once it is served (a projector's rebuild: `projector rebuild` exports no
            // metrics, its WARN says it).
            metrics::counter!("projector_rebuilds_short_of_history_total").increment(1);
        }
        if let Some(old) = replaced.filter(|old| *old != generation) {
            tokio::time::sleep(SWITCH_GRACE).await;
            // The rebuild is done whatever becomes of this: the switch named the old
            // generation retired. Until 2026-12-07 a failed deletion reported the
            // switched rebuild as failed, and it was made again.
            self.delete_retired_now(&mut redis, old, shutdown).await;
        }
        Ok(generation)
    }

    /// Deletes the keys of `generation`, which the meta hash names retired, now, unless a
    /// stop comes first: what a stop or a failure leaves, a projector deletes later
    /// ([`Rebuild::delete_retired`]). The one way a rebuild deletes a generation it
    /// replaced, abandoned or found abandoned.
    async fn delete_retired_now(
        &self,
        redis: &mut RedisConnection,
        generation: u64,
        shutdown: &CancellationToken,
    ) {
        let deleted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            deleted = delete_retired_generation(redis, &self.read_model.prefix, generation) => deleted,
        };
        if let Err(error) = deleted {
            tracing::warn!(
                generation,
                error = format!("{error:#}"),
                "deleting a retired generation failed; a projector deletes the rest of it later"
            );
        }
    }

    /// Abandons this process's build of `generation`, which failed or was stopped: no
    /// longer `building` (if the meta hash still names it so) but `retired` (unless it is
    /// live after all: a switch whose reply was lost), and its keys deleted, unless the
    /// process is stopping (then a projector deletes them, [`Rebuild::delete_retired`]).
    /// So projectors rebuild on their own only what is missing or reloaded: until
    /// 2026-12-07 a failed or stopped build stayed `building`, and a live projector began
    /// a rebuild of its own a second later, an operator's Ctrl-C of `projector rebuild`
    /// included. A build this cannot abandon (Redis away) stays `building`, and a
    /// projector takes it up once the lock has expired.
    async fn abandon(
        &self,
        redis: &mut RedisConnection,
        generation: u64,
        shutdown: &CancellationToken,
    ) {
        let prefix = &self.read_model.prefix;
        let abandoned: redis::RedisResult<i64> = ABANDON
            .key(meta_key(prefix))
            .arg(generation)
            .invoke_async(redis)
            .await;
        match abandoned {
            Ok(1) => self.delete_retired_now(redis, generation, shutdown).await,
            Ok(_) => {}
            Err(error) => tracing::warn!(
                generation,
                %error,
                "abandoning a failed build failed; a projector will take it for abandoned and rebuild"
            ),
        }
    }

    /// Deletes the keys of the generations the meta hash names retired: a rebuild
    /// switched away from them, or began after their build was abandoned, and its
    /// process died before it deleted them (in the grace after the switch, or during
    /// the deletion). Only while no rebuild holds the
    /// lock, so a rebuild's own grace is waited out; a lock a dead process left expires.
    /// The lock is held (and refreshed) until the deletion ends.
    pub async fn delete_retired(&self) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        self.holding_lock(|_, _| self.delete_retired_under_lock(&mut redis))
            .await?
            .unwrap_or(Ok(()))
    }

    /// [`Rebuild::delete_retired`] once it holds the lock: the meta hash is read again,
    /// as a rebuild that ended just before may have deleted them already.
    async fn delete_retired_under_lock(&self, redis: &mut RedisConnection) -> anyhow::Result<()> {
        let prefix = &self.read_model.prefix;
        let generations = Generations::read(redis, prefix).await?;
        for &generation in &generations.retired {
            // Never the keys of the live one or the one being built (the numbers only
            // grow, so a retired one is neither; this keeps it so whatever wrote the
            // field): such a name only leaves the list.
            if generations.current == Some(generation) || generations.building == Some(generation) {
                unretire(redis, prefix, generation).await?;
                continue;
            }
            let keys = delete_retired_generation(redis, prefix, generation).await?;
            tracing::info!(
                generation,
                keys,
                "deleted the keys of a retired generation a rebuild left behind"
            );
        }
        Ok(())
    }

    /// The stream sequence up to which the live projectors' durable consumer has acked
    /// every message. While there is no such consumer (deleted, or not made yet), the
    /// sequence of the newest consumer anchor, past which a projector makes it again
    /// (0 without one): the events it then delivers are past this floor, so the replay
    /// takes them first, not at the end of a whole-stream first part.
    async fn live_ack_floor(&self, stream: &jetstream::stream::Stream) -> anyhow::Result<u64> {
        match stream.consumer_info(&self.consumer).await {
            Ok(info) => Ok(info.ack_floor.stream_sequence),
            Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                crate::consumer::newest_anchored_sequence(
                    &mut self.redis.clone(),
                    &self.read_model.prefix,
                )
                .await
                .context("reading the consumer anchors")
            }
            Err(error) => Err(error).context("reading the live consumer's ack floor"),
        }
    }

    /// Replays the stream from its first message up to its last sequence right now: what
    /// follows `live_ack_floor` first, then what precedes it (the module's step 3); the
    /// count replayed, and whether the stream had let its oldest events go (the
    /// all-time figures then cover only what it holds; a WARN says so). That last
    /// sequence is written first ([`meta::REPLAY_LAST`]).
    async fn replay_into(
        &self,
        generation: u64,
        mut stream: jetstream::stream::Stream,
        live_ack_floor: u64,
        shutdown: &CancellationToken,
        lost_lock: &CancellationToken,
    ) -> anyhow::Result<(u64, bool)> {
        let state = &stream.info().await.context("reading stream info")?.state;
        let (first_sequence, last_sequence) = (state.first_sequence, state.last_sequence);
        let short_of_history = first_sequence > 1;
        if short_of_history {
            // Said where an operator looks, as the docs say it: the all-time figures
            // cannot come back whole (README, "Rebuilding the read model").
            tracing::warn!(
                generation,
                first_sequence,
                first_stored_at = %state.first_timestamp,
                "the stream no longer holds its oldest events (its retention, or removed): the rebuilt all-time figures cover only what it holds; the readings table in PostgreSQL keeps the rest"
            );
        }
        let replay_last = ReplayThrough {
            stream_sequence: last_sequence,
            stored_at: state.last_timestamp,
        };
        // From here on live projectors leave all of it to the replay (meta::REPLAY_LAST).
        // Every call of the replay is guarded by the meta hash as the script leaves it:
        // once it changes (the read model lost, another rebuild taking over), the replay
        // writes nothing more and fails.
        let set: Option<[Option<String>; 4]> = REPLAY_LAST_SET
            .key(meta_key(&self.read_model.prefix))
            .arg(generation)
            .arg(replay_last.encode())
            .invoke_async(&mut self.redis.clone())
            .await?;
        let Some(fields) = set else {
            bail!("the build of generation {generation} was taken over or the read model was reset before its replay began");
        };
        let fields = &fields.map(Option::unwrap_or_default);
        let split = live_ack_floor.min(last_sequence);
        let mut replayed = 0;
        let mut past_the_floor = PastTheFloor::default();
        if split < last_sequence {
            replayed += self
                .replay_range(
                    (generation, fields),
                    &stream,
                    (split, last_sequence),
                    // Every event past the floor is replayed.
                    |event| {
                        past_the_floor.remember(event);
                        true
                    },
                    shutdown,
                    lost_lock,
                )
                .await?;
        }
        if split >= first_sequence.max(1) {
            let past_the_floor = past_the_floor.sorted();
            replayed += self
                .replay_range(
                    (generation, fields),
                    &stream,
                    (0, split),
                    |event| !past_the_floor.holds(event),
                    shutdown,
                    lost_lock,
                )
                .await?;
        }
        Ok((replayed, short_of_history))
    }

    /// Replays the stream's messages after `after` up to `last_sequence`, those events
    /// that `keep` keeps, into `generation` while the meta hash holds `fields`.
    ///
    /// The replay reads through an ordered consumer, which lives in the server's memory:
    /// a NATS restart loses it, and async-nats would notice only when its idle heartbeat
    /// (15 s, not settable for an ordered consumer) went missing, and then fail the
    /// rebuild. So the replay takes its consumer for lost when no message came for
    /// [`REPLAY_STALL`], or when the consumer fails, and makes a new one just past the
    /// last event it applied: what it applied stays, and nothing is applied twice.
    async fn replay_range(
        &self,
        (generation, fields): (u64, &[String; 4]),
        stream: &jetstream::stream::Stream,
        (after, last_sequence): (u64, u64),
        mut keep: impl FnMut(&TelemetryRecorded) -> bool,
        shutdown: &CancellationToken,
        lost_lock: &CancellationToken,
    ) -> anyhow::Result<u64> {
        let mut redis = self.redis.clone();
        let mut replayed = 0u64;
        let mut applied_through = after;
        let mut consumer_failures = 0u32;
        let mut batches: Option<ReplayBatches> = None;
        // Whether the stream held no message past the last one applied when that one
        // was delivered (its delivery info's `pending`).
        let mut nothing_after = false;
        loop {
            let next = match batches.as_mut() {
                None => match self.replay_consumer(stream, applied_through).await {
                    Ok(made) => {
                        batches = Some(made);
                        continue;
                    }
                    Err(error) => Err(error),
                },
                Some(current) => tokio::select! {
                    _ = shutdown.cancelled() => bail!("shut down during the rebuild"),
                    _ = lost_lock.cancelled() => bail!("lost the rebuild lock"),
                    next = tokio::time::timeout(REPLAY_STALL, current.next()) => match next {
                        Ok(Some(batch)) => batch
                            .into_iter()
                            .collect::<Result<Vec<_>, _>>()
                            .context("replay message"),
                        Ok(None) => Err(anyhow::anyhow!("the replay stream ended")),
                        Err(_) => Err(anyhow::anyhow!("no message for {REPLAY_STALL:?}")),
                    },
                },
            };
            let batch = match next {
                Ok(batch) => batch,
                Err(error) => {
                    batches = None;
                    if nothing_after {
                        // The newest messages are gone (an operator's `nats stream rmm`),
                        // and JetStream keeps the last sequence: nothing is left to wait
                        // for. Until 2026-12-07 the replay waited for them, failed after
                        // ten stalls (a minute) with its consumer taken for lost, and
                        // the rebuild began again from the start.
                        return Ok(replayed);
                    }
                    consumer_failed(
                        error,
                        &mut consumer_failures,
                        applied_through,
                        shutdown,
                        lost_lock,
                    )
                    .await?;
                    continue;
                }
            };
            consumer_failures = 0;
            let mut events = Vec::with_capacity(batch.len());
            let mut batch_through = applied_through;
            for message in batch {
                let Ok((stream_sequence, stored_at, pending)) = message
                    .info()
                    .map(|info| (info.stream_sequence, info.published, info.pending))
                else {
                    continue;
                };
                batch_through = batch_through.max(stream_sequence);
                nothing_after = pending == 0;
                if stream_sequence > last_sequence {
                    continue;
                }
                // Poison was dead-lettered by the live projector; it counts nowhere.
                if let Ok(event) = crate::consumer::decode(&message, stored_at) {
                    if !keep(&event) {
                        continue;
                    }
                    events.push(Delivered {
                        event,
                        stream_sequence,
                        stored_at,
                    });
                }
            }
            let now_ms = unix_millis(OffsetDateTime::now_utc());
            let applied = self
                .read_model
                .apply_replayed(&mut redis, generation, fields, &events, now_ms)
                .await
                .context("applying replayed events")?;
            if applied.is_none() {
                bail!("the build of generation {generation} was taken over or the read model was reset during its replay");
            }
            replayed += events.len() as u64;
            applied_through = batch_through;
            if applied_through >= last_sequence {
                return Ok(replayed);
            }
        }
    }

    /// An ordered consumer of the whole stream, or of what follows `applied_through`.
    async fn replay_consumer(
        &self,
        stream: &jetstream::stream::Stream,
        applied_through: u64,
    ) -> anyhow::Result<ReplayBatches> {
        let deliver_policy = match applied_through {
            0 => consumer::DeliverPolicy::All,
            applied => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: applied + 1,
            },
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                ..Default::default()
            })
            .await
            .context("creating the replay consumer")?;
        Ok(consumer
            .messages()
            .await
            .context("starting the replay")?
            .ready_chunks(self.batch_size))
    }
}

/// The ids of the events the replay met first past the live projectors' ack floor, so
/// that the older part's replay leaves out a second copy of one of them.
///
/// The stream holds an event twice when the relay published it again past JetStream's
/// duplicate window (killed between publish and mark and back more than 2 minutes
/// later, or its NATS connection lost in that gap). With one copy below the floor and
/// one above, the copy above reaches the new generation at once, the one below only
/// when the older part's replay gets to it; past the dedup horizon, the generation's
/// dedup set has forgotten the first and it would count twice. Copies lie as far apart
/// as the events published between them: one relay republishes what it had in flight
/// first when it is back, so they are close; others running meanwhile add what they
/// publish. So only the first [`PastTheFloor::MAX`] ids are kept, 16 bytes each.
#[derive(Debug, Default)]
struct PastTheFloor(Vec<uuid::Uuid>);

impl PastTheFloor {
    /// Ids kept at most (16 MiB).
    const MAX: usize = 1 << 20;

    /// Keeps `event`'s id while there is room.
    fn remember(&mut self, event: &TelemetryRecorded) {
        if self.0.len() < Self::MAX {
            self.0.push(event.event_id);
            if self.0.len() == Self::MAX {
                tracing::warn!(
                    remembered = Self::MAX,
                    "the replay remembers no more ids past the live ack floor: a copy of a later one below the floor would count twice if the rest of the replay outlasts the dedup horizon"
                );
            }
        }
    }

    fn sorted(mut self) -> Self {
        self.0.sort_unstable();
        self
    }

    /// Whether a copy of `event` was met past the floor (once [`Self::sorted`]).
    fn holds(&self, event: &TelemetryRecorded) -> bool {
        self.0.binary_search(&event.event_id).is_ok()
    }
}

/// Counts one more failure of the replay's consumer in a row: an error once there were
/// [`REPLAY_CONSUMER_ATTEMPTS`], else a warning and a pause of
/// [`REPLAY_CONSUMER_PAUSE`] before the next consumer (unless the rebuild ends).
async fn consumer_failed(
    error: anyhow::Error,
    failures_in_a_row: &mut u32,
    applied_through: u64,
    shutdown: &CancellationToken,
    lost_lock: &CancellationToken,
) -> anyhow::Result<()> {
    *failures_in_a_row += 1;
    if *failures_in_a_row >= REPLAY_CONSUMER_ATTEMPTS {
        return Err(error.context(format!(
            "the replay's consumer failed {failures_in_a_row} times in a row"
        )));
    }
    tracing::warn!(
        error = format!("{error:#}"),
        applied_through,
        "the replay lost its consumer, making a new one past what it applied"
    );
    tokio::select! {
        _ = shutdown.cancelled() => bail!("shut down during the rebuild"),
        _ = lost_lock.cancelled() => bail!("lost the rebuild lock"),
        _ = tokio::time::sleep(REPLAY_CONSUMER_PAUSE) => Ok(()),
    }
}

/// Refreshes the lock while the rebuild runs; cancels `lost` if someone else has it.
async fn keep_lock(
    mut redis: RedisConnection,
    prefix: String,
    owner: String,
    lost: CancellationToken,
) {
    let key = rebuild_lock_key(&prefix);
    loop {
        tokio::time::sleep(LOCK_TTL / 3).await;
        // A failed refresh is tried again; only a lock known to be lost ends the build.
        if let Ok(false) = lock::refresh(&mut redis, &key, &owner, LOCK_TTL).await {
            lost.cancel();
            return;
        }
    }
}

/// Makes `generation` live (of this layout, built on the Redis run `ARGV[4]`, or on one
/// not known when empty), but only if this rebuild still owns the lock and the build;
/// what its replay applied (`replay_last`) becomes what the generation holds
/// ([`meta::BUILT_THROUGH`]), and the generation it replaces is named `retired`
/// ([`meta::RETIRED`]). Hashed once per process, as the locks' scripts are.
static SWITCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{RETIRE}
         if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
         if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
         local old = redis.call('HGET', KEYS[1], 'generation')
         if old and old ~= ARGV[1] then retire(KEYS[1], old) end
         local replayed = redis.call('HGET', KEYS[1], 'replay_last')
         redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'layout', ARGV[3])
         if replayed then
           redis.call('HSET', KEYS[1], 'built_through', ARGV[1] .. ' ' .. replayed)
         end
         redis.call('HDEL', KEYS[1], 'building', 'replay_through', 'replay_last', 'redis_run')
         if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'redis_run', ARGV[4]) end
         return 1"
    ))
});

/// Names generation `ARGV[1]`, a build that failed, retired unless it is the live one
/// (its reply lost, a switch that went through), and no longer being built if `building`
/// names it; returns whether it named it retired ([`Rebuild::abandon`]). Retired also when
/// another build took `building` over: no one else names this generation, whose keys
/// (what live projectors wrote to it meanwhile) would otherwise stay for good.
static ABANDON: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{RETIRE}
         if redis.call('HGET', KEYS[1], 'generation') == ARGV[1] then return 0 end
         if redis.call('HGET', KEYS[1], 'building') == ARGV[1] then
           redis.call('HDEL', KEYS[1], 'building', 'replay_through', 'replay_last')
         end
         retire(KEYS[1], ARGV[1])
         return 1"
    ))
});

/// A Lua function of the scripts that name a generation retired: `retire(meta,
/// generation)` adds it to the meta hash's `retired` list.
const RETIRE: &str = "local function retire(meta, generation)
           local retired = redis.call('HGET', meta, 'retired')
           redis.call('HSET', meta, 'retired', retired and (retired .. ' ' .. generation) or generation)
         end";

/// If the rebuild lock `KEYS[2]` is still owner `ARGV[1]`'s (a rebuild whose lock lapsed
/// while Redis was away must not take another's build over), names generation `ARGV[2]`
/// the one being built, from `replay_through` `ARGV[3]`, with an abandoned build's
/// `replay_last` gone (this build sets its own), and adds the abandoned build's
/// generation `ARGV[4]` (when not empty) to `retired`: its keys are
/// deleted next, and a process that dies meanwhile leaves the rest to a projector
/// ([`Rebuild::delete_retired`]). Until 2026-12-07 it was named nowhere once `building`
/// moved on, and what the deletion had not reached stayed for good.
static BEGIN_BUILD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{RETIRE}
         if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
         redis.call('HSET', KEYS[1], 'building', ARGV[2], 'replay_through', ARGV[3])
         redis.call('HDEL', KEYS[1], 'replay_last')
         if ARGV[4] ~= '' then retire(KEYS[1], ARGV[4]) end
         return 1"
    ))
});

/// Sets the meta hash's `replay_last` to `ARGV[2]` if `building` still names generation
/// `ARGV[1]`, and returns the fields the guard compares then (generation, layout,
/// building, replay_last, as [`Generations::fields`] has them); nil if not.
static REPLAY_LAST_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return nil end
         redis.call('HSET', KEYS[1], 'replay_last', ARGV[2])
         return redis.call('HMGET', KEYS[1], 'generation', 'layout', 'building', 'replay_last')",
    )
});

/// Takes generation `ARGV[1]` off the meta hash's `retired` list (its keys are gone),
/// as a number; writes the hash only if the list named it (every write to the meta hash
/// makes query drop what it keeps, `query::tracking`).
static UNRETIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local retired = redis.call('HGET', KEYS[1], 'retired')
         if not retired then return 0 end
         local kept, named = {}, false
         for generation in string.gmatch(retired, '%S+') do
           if tonumber(generation) == tonumber(ARGV[1]) then named = true
           else table.insert(kept, generation) end
         end
         if not named then return 0 end
         if #kept == 0 then redis.call('HDEL', KEYS[1], 'retired')
         else redis.call('HSET', KEYS[1], 'retired', table.concat(kept, ' ')) end
         return 1",
    )
});

/// Takes `generation` off the meta hash's `retired` list.
async fn unretire(
    redis: &mut RedisConnection,
    prefix: &str,
    generation: u64,
) -> anyhow::Result<()> {
    let _: i64 = UNRETIRE
        .key(meta_key(prefix))
        .arg(generation)
        .invoke_async(redis)
        .await?;
    Ok(())
}

/// Deletes the keys of `generation`, which a switch named retired, and then its name
/// from the `retired` list; returns how many keys went.
async fn delete_retired_generation(
    redis: &mut RedisConnection,
    prefix: &str,
    generation: u64,
) -> anyhow::Result<u64> {
    let deleted = delete_generation(redis, prefix, generation).await?;
    unretire(redis, prefix, generation).await?;
    Ok(deleted)
}

/// Unlinks every key of a generation, a thousand at a time.
pub async fn delete_generation(
    redis: &mut RedisConnection,
    prefix: &str,
    generation: u64,
) -> anyhow::Result<u64> {
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(generation_pattern(prefix, generation))
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK").arg(&keys).query_async(redis).await?;
            deleted += keys.len() as u64;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replays_own_part_reads_back_as_written_and_nothing_else_is_taken_for_it() {
        let through = ReplayThrough {
            stream_sequence: 20_000,
            stored_at: OffsetDateTime::from_unix_timestamp_nanos(1_764_460_800_123_456_789)
                .expect("in range"),
        };
        assert_eq!(through.encode(), "20000 1764460800123456789");
        assert_eq!(ReplayThrough::decode(&through.encode()), Some(through));
        for garbage in ["", "20000", "20000 x", "-1 5", "20000 5 7", "20000  5"] {
            assert_eq!(ReplayThrough::decode(garbage), None, "{garbage:?}");
        }
    }
}

//! Reading the Redis read model: the live generation, one device's figures and
//! buckets, the devices index. Read-only: plain reads, and one script for a page of the
//! devices index (`devices_page.lua`) flagged `no-writes`, so Redis refuses any write
//! from it. A device view is cached while nothing it depends on changed (see
//! `Validity`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use contract::read_model::{
    fields, live_generation, meta, meta_key, Aggregate, DeviceHeader, DeviceKeys, DeviceStats,
    DevicesIndex, Resolution, Window, COARSE, FINE, LAYOUT, LISTING_TTL_MS, WINDOWS,
};
use ingest::redis_connection::RedisConnection;
use redis::{RedisResult, Script};

use crate::tracking::TrackedReads;

/// Why the read model could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply: {0}")]
    Reply(#[from] redis::ParsingError),
    /// The cursor's position is gone (the read model was rebuilt meanwhile).
    #[error("the listing's position is gone")]
    CursorLost,
    /// The cursor's walk began longer ago than the listing TTL.
    #[error("the listing's walk has expired")]
    CursorExpired,
    /// No live generation: the read model is being (re)built.
    #[error("the read model is being rebuilt")]
    Rebuilding,
}

impl ReadError {
    /// Whether Redis refused the read for good, so that the answer is a `500` to fix
    /// (logged as an error) rather than a `503` to retry: its ACL leaves the query's
    /// user short of a command (`NOPERM`), or a key is of another type than the read
    /// model's (`WRONGTYPE`), also when those came from inside the read's transaction
    /// (then Redis aborts it, `EXECABORT`, or fails that command alone). Everything
    /// else is `false`: Redis away or loading, out of memory or busy inside the
    /// transaction (`OOM`, `LOADING`, `BUSY`), a reply that did not parse.
    pub fn is_lasting(&self) -> bool {
        let Self::Redis(error) = self else {
            return false;
        };
        if error.code().is_some_and(lasting_code) {
            return true;
        }
        error.clone().into_server_errors().is_some_and(|errors| {
            !errors.is_empty() && errors.iter().all(|(_, error)| lasting_code(error.code()))
        })
    }
}

/// Redis's error codes that no retry can help (see [`ReadError::is_lasting`]).
fn lasting_code(code: &str) -> bool {
    matches!(code, "NOPERM" | "WRONGTYPE")
}

/// One device's figures with its window aggregates, read at one instant.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub stats: DeviceStats,
    /// Per metric, per window name: the aggregate (`None` when the window is empty).
    pub windows: BTreeMap<String, BTreeMap<&'static str, Option<Aggregate>>>,
    /// The first 10 s bucket in which these windows would be other ones without a new
    /// event (see `ByResolution::windows_change_at`).
    pub windows_change_at: i64,
}

/// One device of a devices page.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub device_id: String,
    pub last_seen_ms: i64,
    pub sample_count: u64,
}

/// Where a walk through the devices list stands, as its cursor carries it: the
/// generation it walks, its snapshot (Redis's clock, ms), and the index entry it goes on
/// after (which need not be in the index any more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkPosition {
    pub generation: u64,
    pub snapshot_ms: i64,
    pub after: String,
}

/// A page of the devices list.
#[derive(Debug, Clone, Default)]
pub struct DevicesPage {
    pub devices: Vec<DeviceEntry>,
    /// Where the walk goes on; `None` when this page ends it.
    pub next: Option<WalkPosition>,
    /// Index entries the page looked at (at most [`scan_budget`] of its limit).
    pub scanned: u64,
}

#[derive(Clone)]
pub struct ReadModel {
    redis: RedisConnection,
    prefix: Arc<str>,
    /// The meta hash's key, made once: every request reads it.
    meta_key: Arc<str>,
    /// The live generation as last read (0: none read yet); a validity check assumes
    /// it and checks it in the same round trip.
    last_generation: Arc<AtomicU64>,
    /// Validity reads kept until Redis says they changed; `None` reads every time.
    tracked: Option<Arc<TrackedReads>>,
    /// Reads one page of the devices index (`devices_page.lua`, read-only).
    devices_page_script: Arc<Script>,
}

/// What everything shown of a device at an instant depends on: the generation, the
/// device's packed header (every applied event raises its `sample_count`, every
/// delivery moves its `updated_at` and `as_of_seq`), and the current 10 s bucket (the
/// windows move with it; a 5 min boundary is also a 10 s one). Pruning only drops
/// buckets already outside every window. So an answer made at the same generation and
/// header is exact from the bucket it was made in until the bucket in which its
/// windows would hold other buckets ([`DeviceView::windows_change_at`]).
#[derive(Debug, Clone)]
pub struct Validity {
    generation: u64,
    header: Vec<u8>,
    fine_bucket: i64,
}

/// Answers kept with the validity they were made at and the 10 s bucket their windows
/// change in, per device and `?metrics=` selection; bounded by [`ANSWERS_MAX`] and
/// [`ANSWERS_BYTES_MAX`].
#[derive(Debug)]
pub struct AnswerCache<T> {
    answers: Mutex<Answers<T>>,
}

#[derive(Debug)]
struct Answers<T> {
    kept: HashMap<AnswerKey, Kept<T>>,
    /// The sum of the kept answers' [`Kept::bytes`].
    bytes: usize,
}

#[derive(Debug)]
struct Kept<T> {
    made_at: Validity,
    /// The first 10 s bucket the answer is no longer exact in.
    until: i64,
    answer: T,
    /// What keeping it costs, roughly: the answer, its key and its validity.
    bytes: usize,
}

/// The size in bytes of a kept answer.
pub trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for bytes::Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl<T> Kept<T> {
    /// Whether the windows are still what they were when the answer was made, in the
    /// 10 s bucket `fine_bucket`, if the device did not change.
    fn windows_hold_in(&self, fine_bucket: i64) -> bool {
        (self.made_at.fine_bucket..self.until).contains(&fine_bucket)
    }
}

/// One device, one `?metrics=` selection.
pub type AnswerKey = (String, Option<Vec<String>>);

/// Answers kept at most (each a rendered stats document of about 2 KiB for 3 metrics).
pub const ANSWERS_MAX: usize = 10_000;

/// Answers left when a full cache had to drop some still exact: room for an eighth
/// more before the next drop, which walks the whole map.
pub const ANSWERS_AFTER_DROP: usize = ANSWERS_MAX * 7 / 8;

/// Bytes of answers kept at most (each its document, its key and its validity). The
/// count alone did not bound the memory: a device with 32 metrics answers about 20 KiB,
/// and every distinct
/// `?metrics=` list (as long as a request line allows) was kept on its own, so 10,000
/// answers could hold a few hundred MiB. 32 MiB holds the 10,000 answers of 3 metrics
/// the count allows (about 2.3 KiB each with their keys and validity, 22 MiB in all),
/// with room to spare, and keeps query's RSS under its 64 MiB target whatever is asked.
pub const ANSWERS_BYTES_MAX: usize = 32 << 20;

/// Bytes of answers left when a drop was needed ([`ANSWERS_AFTER_DROP`]'s 7/8).
pub const ANSWERS_BYTES_AFTER_DROP: usize = ANSWERS_BYTES_MAX * 7 / 8;

/// Bytes of the largest answer kept (4 MiB, what a drop leaves room for): one answer
/// kept after a drop never takes the cache past [`ANSWERS_BYTES_MAX`]. Up to
/// 2026-12-07 an answer of up to [`ANSWERS_BYTES_AFTER_DROP`] was kept after the drop
/// that left that much, so the cache could hold 56 MiB.
pub const ANSWER_BYTES_MAX: usize = ANSWERS_BYTES_MAX - ANSWERS_BYTES_AFTER_DROP;

/// A kept answer's cost beyond its answer, key and header: the map's entry, the
/// validity and the key's allocations.
const KEPT_OVERHEAD_BYTES: usize = 128;

impl<T: Clone> Default for AnswerCache<T> {
    fn default() -> Self {
        Self {
            answers: Mutex::new(Answers {
                kept: HashMap::new(),
                bytes: 0,
            }),
        }
    }
}

impl<T: Clone + Weight> AnswerCache<T> {
    /// The answer kept for `key`, if it was made at the generation and header of
    /// `validity` and is still exact in its 10 s bucket.
    pub fn get(&self, key: &AnswerKey, validity: &Validity) -> Option<T> {
        let answers = self.answers.lock().ok()?;
        let kept = answers.kept.get(key)?;
        let made_at = &kept.made_at;
        (made_at.generation == validity.generation
            && made_at.header == validity.header
            && kept.windows_hold_in(validity.fine_bucket))
        .then(|| kept.answer.clone())
    }

    /// Whether an answer is kept for `key` that is still exact in `fine_bucket` if the
    /// device did not change: only then is its validity worth reading.
    pub fn may_serve(&self, key: &AnswerKey, fine_bucket: i64) -> bool {
        self.answers.lock().is_ok_and(|answers| {
            answers
                .kept
                .get(key)
                .is_some_and(|kept| kept.windows_hold_in(fine_bucket))
        })
    }

    /// Keeps `answer`, made at `validity` and exact until the 10 s bucket `until`, for
    /// `key`. When the cache is full (by count or by bytes) it first drops the answers
    /// no longer exact now (they can never be served again), then, if more than
    /// [`ANSWERS_AFTER_DROP`] or [`ANSWERS_BYTES_AFTER_DROP`] are left, the ones made
    /// longest ago down to that. An answer over [`ANSWER_BYTES_MAX`] is not kept. When a
    /// dashboard asks for a
    /// few more devices than fit, few answers go at a time: simulated uniform requests
    /// over 10,600 devices missed 9% of the time, 19% when half of the answers were
    /// dropped at once (as before); over 11,000, 12.5% against 23%. (The bench's
    /// `/stats` point asks for 10,000 devices while the answers of its end-to-end
    /// probes' devices are still exact.)
    pub fn insert(&self, key: AnswerKey, validity: Validity, until: i64, answer: T) {
        let bytes = answer.weight()
            + key.0.len()
            + key
                .1
                .iter()
                .flatten()
                .map(|name| std::mem::size_of::<String>() + name.len())
                .sum::<usize>()
            + validity.header.len()
            + KEPT_OVERHEAD_BYTES;
        if bytes > ANSWER_BYTES_MAX {
            return;
        }
        let Ok(mut guard) = self.answers.lock() else {
            return;
        };
        let answers = &mut *guard;
        if let Some(replaced) = answers.kept.remove(&key) {
            answers.bytes -= replaced.bytes;
        }
        if answers.kept.len() >= ANSWERS_MAX || answers.bytes + bytes > ANSWERS_BYTES_MAX {
            answers
                .kept
                .retain(|_, kept| kept.until > validity.fine_bucket);
            answers.bytes = answers.kept.values().map(|kept| kept.bytes).sum();
            let over = |count: usize, bytes: usize| {
                count > ANSWERS_AFTER_DROP || bytes > ANSWERS_BYTES_AFTER_DROP
            };
            if over(answers.kept.len(), answers.bytes) {
                let mut made: Vec<(i64, usize, &AnswerKey)> = answers
                    .kept
                    .iter()
                    .map(|(key, kept)| (kept.made_at.fine_bucket, kept.bytes, key))
                    .collect();
                if answers.bytes <= ANSWERS_BYTES_AFTER_DROP {
                    // Only the count is over: the oldest `excess` in linear time, as a
                    // full cache of small answers (the usual case) always dropped them.
                    let excess = answers.kept.len() - ANSWERS_AFTER_DROP;
                    made.select_nth_unstable_by_key(excess - 1, |(bucket, _, _)| *bucket);
                    made.truncate(excess);
                }
                made.sort_unstable_by_key(|(bucket, _, _)| *bucket);
                let (mut count, mut left) = (answers.kept.len(), answers.bytes);
                let mut oldest = Vec::new();
                for (_, bytes, key) in made {
                    if !over(count, left) {
                        break;
                    }
                    count -= 1;
                    left -= bytes;
                    oldest.push(key.clone());
                }
                for key in &oldest {
                    answers.kept.remove(key);
                }
                answers.bytes = left;
            }
        }
        answers.bytes += bytes;
        answers.kept.insert(
            key,
            Kept {
                made_at: validity,
                until,
                answer,
                bytes,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.answers.lock().map_or(0, |answers| answers.kept.len())
    }

    /// The bytes the kept answers cost ([`ANSWERS_BYTES_MAX`] at most).
    pub fn bytes(&self) -> usize {
        self.answers.lock().map_or(0, |answers| answers.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReadModel {
    /// A read model that reads the validity of every request from Redis.
    pub fn new(redis: RedisConnection, prefix: String) -> Self {
        Self {
            redis,
            meta_key: meta_key(&prefix).into(),
            prefix: prefix.into(),
            last_generation: Arc::new(AtomicU64::new(0)),
            tracked: None,
            devices_page_script: Arc::new(Script::new(include_str!("devices_page.lua"))),
        }
    }

    /// A read model that keeps validity reads in `tracked`. `redis` must be a RESP3
    /// connection whose pushes reach [`TrackedReads::handle_push`].
    pub fn tracked(redis: RedisConnection, prefix: String, tracked: Arc<TrackedReads>) -> Self {
        Self {
            tracked: Some(tracked),
            ..Self::new(redis, prefix)
        }
    }

    /// The read of the meta hash's fields that [`live_generation`] decides on.
    fn live_generation_read(&self) -> redis::Cmd {
        let mut read = redis::cmd("HMGET");
        read.arg(&*self.meta_key).arg(meta::LIVE);
        read
    }

    /// What the device's answers depend on right now, if this process keeps it (see
    /// [`crate::tracking`]): `Some(None)` for a device known not to exist, `None` when
    /// nothing is kept.
    pub fn kept_validity(&self, device_id: &str, now_ms: i64) -> Option<Option<Validity>> {
        let fine_bucket = FINE.bucket(now_ms);
        let (generation, header) = self.tracked.as_ref()?.lookup(device_id, fine_bucket)?;
        Some(header.map(|header| Validity {
            generation,
            header,
            fine_bucket,
        }))
    }

    /// What the device's answers depend on right now, read (one small pipelined read);
    /// `None` for an unknown device.
    pub async fn read_validity(
        &self,
        device_id: &str,
        now_ms: i64,
    ) -> Result<Option<Validity>, ReadError> {
        let (validity, _): (_, (Option<Vec<u8>>,)) = self
            .read_in_live_generation(
                device_id,
                FINE.bucket(now_ms),
                |read, generation| self.add_header_read(read, generation, device_id),
                |(header,): &(Option<Vec<u8>>,)| header.clone(),
            )
            .await?;
        Ok(validity)
    }

    /// Adds the read of the device's packed header in `generation` to `read`.
    fn add_header_read(&self, read: &mut redis::Pipeline, generation: u64, device_id: &str) {
        read.cmd("HGET")
            .arg(DeviceKeys::stats_of(&self.prefix, generation, device_id))
            .arg(fields::HEADER);
    }

    /// A device's figures and windows at `now_ms`, limited to `metrics` if given, with
    /// the validity they were read at; `None` for an unknown device. One round trip
    /// when the generation is the one read last time: the meta hash, the device hash
    /// and its buckets hash (a device keeps at most 1 h 5 min of 10 s buckets and
    /// 24 h 15 min of 5 min buckets per metric); the windows are summed here. The read
    /// is kept as the device's validity read.
    pub async fn device_now(
        &self,
        device_id: &str,
        metrics: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Option<(Validity, DeviceView)>, ReadError> {
        let (validity, (hash, buckets)): (_, (Fields, Fields)) = self
            .read_in_live_generation(
                device_id,
                FINE.bucket(now_ms),
                |read, generation| {
                    let keys = DeviceKeys::new(&self.prefix, generation, device_id);
                    read.hgetall(&keys.stats).hgetall(&keys.buckets);
                },
                |(hash, _)| header_of(hash),
            )
            .await?;
        let Some(validity) = validity else {
            return Ok(None);
        };
        Ok(view_of(hash, &buckets, metrics, now_ms).map(|view| (validity, view)))
    }

    /// The replies of the commands `device_read` adds for the device's keys in the live
    /// generation, with the validity they were read at (`None`: `header_of` the replies
    /// found no header, an unknown device). One round trip with the meta hash when the
    /// generation is the one read last time (a rebuild's switch costs one more); then
    /// the meta hash and the header are kept as the device's validity read, tracked by
    /// Redis from here on.
    async fn read_in_live_generation<T: redis::FromRedisValue>(
        &self,
        device_id: &str,
        fine_bucket: i64,
        device_read: impl Fn(&mut redis::Pipeline, u64),
        header_of: impl Fn(&T) -> Option<Vec<u8>>,
    ) -> Result<(Option<Validity>, T), ReadError> {
        let validity_of = |generation: u64, value: &T| {
            header_of(value).map(|header| Validity {
                generation,
                header,
                fine_bucket,
            })
        };
        let assumed = self.last_generation.load(Ordering::Relaxed);
        let mut ticket = self
            .tracked
            .as_ref()
            .and_then(|tracked| tracked.begin(device_id));
        // The meta hash and the device's keys in `generation`, in MULTI/EXEC: the reads
        // run at one instant. A plain pipeline's commands run one by one, and Redis may
        // run another client's between them (it reads a client's bytes as they arrive):
        // a reading applied between the device hash and its buckets showed in the
        // windows and not in the all-time figures.
        let read_in = |generation: u64, tracking: bool| {
            let mut read = redis::pipe();
            read.atomic();
            if tracking {
                // Whatever connection carries this read tracks it (a reconnect starts
                // untracked); turning it on again is a no-op.
                read.cmd("CLIENT").arg("TRACKING").arg("ON").ignore();
            }
            read.add_command(self.live_generation_read());
            device_read(&mut read, generation);
            read
        };
        let mut redis = self.redis.clone();
        let (generation, replies) =
            match read_with_meta(&mut redis, &read_in(assumed, ticket.is_some())).await {
                // Refused for good with tracking: if the same read goes through without
                // it, `CLIENT TRACKING` was what the ACL refused (see `tracking`).
                Err(error) if ticket.is_some() && error.is_lasting() => {
                    let untracked = read_with_meta(&mut redis, &read_in(assumed, false)).await?;
                    if let Some(tracked) = &self.tracked {
                        tracked.refuse(&error);
                    }
                    ticket = None;
                    untracked
                }
                read => read?,
            };
        if generation == assumed {
            let value: T = redis::from_redis_value(redis::Value::Array(replies))?;
            let validity = validity_of(generation, &value);
            if let (Some(tracked), Some(ticket)) = (&self.tracked, ticket) {
                let header = validity.as_ref().map(|validity| validity.header.clone());
                tracked.finish(ticket, generation, header, fine_bucket);
            }
            return Ok((validity, value));
        }
        self.last_generation.store(generation, Ordering::Relaxed);
        // Read again in that generation, with the meta hash in the same transaction: a
        // read model lost or switched again meanwhile is a rebuild under way (503), not
        // a device unknown to it (404).
        let (again, replies) = read_with_meta(&mut redis, &read_in(generation, false)).await?;
        if again != generation {
            return Err(ReadError::Rebuilding);
        }
        let value: T = redis::from_redis_value(redis::Value::Array(replies))?;
        Ok((validity_of(generation, &value), value))
    }

    pub async fn ping(&self) -> RedisResult<()> {
        let mut redis = self.redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut redis)
            .await
            .map(|_| ())
    }

    /// The live generation; [`ReadError::Rebuilding`] when there is none.
    pub async fn generation(&self) -> Result<u64, ReadError> {
        let mut redis = self.redis.clone();
        let (generation, layout): MetaFields =
            self.live_generation_read().query_async(&mut redis).await?;
        live_generation(generation, layout).ok_or(ReadError::Rebuilding)
    }

    /// A device's figures and windows at `now_ms`, limited to `metrics` if given;
    /// `None` for an unknown device (see [`ReadModel::device_now`]).
    pub async fn device(
        &self,
        device_id: &str,
        metrics: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Option<DeviceView>, ReadError> {
        let read = self.device_now(device_id, metrics, now_ms).await?;
        Ok(read.map(|(_, view)| view))
    }

    /// The non-empty buckets of one metric in `buckets` (which may be empty), oldest
    /// first, read at `now_ms`, or why there are none to look for: an unknown device, or
    /// a metric the device never reported. One round trip when the generation is the
    /// one read last time: the device's header (kept as its validity read, as
    /// [`ReadModel::read_validity`] keeps it), whether it has the metric's all-time
    /// figures, and the buckets asked for.
    pub async fn series(
        &self,
        device_id: &str,
        metric: &str,
        resolution: Resolution,
        buckets: std::ops::RangeInclusive<i64>,
        now_ms: i64,
    ) -> Result<Series, ReadError> {
        let mut names: Vec<String> = buckets
            .clone()
            .map(|bucket| resolution.field(bucket, metric))
            .collect();
        if names.is_empty() {
            // HMGET needs a field: an empty range asks for the empty name, which no
            // bucket has, and zipped with the empty range its answer yields nothing.
            names.push(String::new());
        }
        let (validity, (_, metric_known, values)): (_, SeriesReplies) = self
            .read_in_live_generation(
                device_id,
                FINE.bucket(now_ms),
                |read, generation| {
                    let keys = DeviceKeys::new(&self.prefix, generation, device_id);
                    self.add_header_read(read, generation, device_id);
                    read.hexists(&keys.stats, fields::metric(metric));
                    read.cmd("HMGET").arg(&keys.buckets).arg(&names);
                },
                |(header, ..): &SeriesReplies| header.clone(),
            )
            .await?;
        if validity.is_none() {
            return Ok(Series::UnknownDevice);
        }
        if !metric_known {
            return Ok(Series::UnknownMetric);
        }
        Ok(Series::Points(
            buckets
                .zip(values)
                .filter_map(|(bucket, value)| Some((bucket, Aggregate::from_bytes(&value?)?)))
                .collect(),
        ))
    }

    /// One page of a walk through the devices list, most recently seen first: up to
    /// `limit` devices as the index stood at the walk's snapshot, after `from` (a
    /// position an earlier page of the walk returned) or from the front for a new walk,
    /// with the position to go on from (`None`: the walk is over). The index is read by
    /// one read-only script (`devices_page.lua`), atomically, looking at
    /// [`scan_budget`]`(limit)` entries at most, so a page may hold fewer than `limit`
    /// devices, even none, and still not be the last. Then the devices' headers are read
    /// in one pipeline with the meta hash: a device whose header is gone is left out,
    /// and a page whose generation stopped being live meanwhile is not served.
    /// [`ReadError::CursorLost`] when `from`'s generation is not the live one,
    /// [`ReadError::CursorExpired`] when the walk is older than the listing TTL.
    pub async fn devices(
        &self,
        limit: usize,
        from: Option<&WalkPosition>,
    ) -> Result<DevicesPage, ReadError> {
        let mut redis = self.redis.clone();
        // A new walk tries the generation read last; once more after a switch.
        let mut generation = match from {
            Some(position) => position.generation,
            None => match self.last_generation.load(Ordering::Relaxed) {
                // Kept, or a query that serves only the list read it before every walk.
                0 => {
                    let read = self.generation().await?;
                    self.last_generation.store(read, Ordering::Relaxed);
                    read
                }
                assumed => assumed,
            },
        };
        let (granule, after) = match from {
            Some(position) => (
                DevicesIndex::granule_of(&position.after)
                    .ok_or(ReadError::CursorLost)?
                    .to_string(),
                position.after.as_str(),
            ),
            None => (String::new(), ""),
        };
        for _attempt in 0..3 {
            let index = DevicesIndex::new(&self.prefix, generation);
            let reply: Vec<redis::Value> = self
                .devices_page_script
                .key(&*self.meta_key)
                .key(&index.log)
                .key(&index.created)
                .key(&index.retired)
                .arg(generation)
                .arg(LAYOUT)
                // An empty argument, not none at all, for a new walk.
                .arg(from.map_or_else(String::new, |position| position.snapshot_ms.to_string()))
                .arg(LISTING_TTL_MS)
                .arg(limit)
                .arg(scan_budget(limit))
                .arg(&granule)
                .arg(after)
                .invoke_async(&mut redis)
                .await?;
            let page = match IndexPage::of(reply)? {
                Scanned::Page(page) => page,
                Scanned::Expired => return Err(ReadError::CursorExpired),
                Scanned::Gone { live } => {
                    generation = walk_on(from.is_some(), live)?;
                    self.last_generation.store(generation, Ordering::Relaxed);
                    continue;
                }
            };
            let mut read = redis::pipe();
            for entry in &page.entries {
                let device_id = DevicesIndex::device_of(entry).unwrap_or_default();
                self.add_header_read(&mut read, generation, device_id);
            }
            read.add_command(self.live_generation_read());
            let mut replies: Vec<redis::Value> = read.query_async(&mut redis).await?;
            let meta: MetaFields = redis::from_redis_value(
                replies
                    .pop()
                    .ok_or_else(|| redis::ParsingError::from("no reply to the meta read"))?,
            )?;
            let live = live_generation(meta.0, meta.1);
            if live != Some(generation) {
                // Switched over since the script ran: the headers may be being deleted.
                generation = walk_on(from.is_some(), live)?;
                self.last_generation.store(generation, Ordering::Relaxed);
                continue;
            }
            let headers: Vec<Option<Vec<u8>>> =
                redis::from_redis_value(redis::Value::Array(replies))?;
            let devices = page
                .entries
                .iter()
                .zip(headers)
                .filter_map(|(entry, header)| {
                    // A device without a header (its keys evicted) is left out rather
                    // than shown as never seen.
                    let header = DeviceHeader::from_bytes(&header?)?;
                    Some(DeviceEntry {
                        device_id: DevicesIndex::device_of(entry)?.to_owned(),
                        last_seen_ms: header.last_seen_ms,
                        sample_count: header.sample_count,
                    })
                })
                .collect();
            let next = page.continue_after.map(|after| WalkPosition {
                generation,
                snapshot_ms: page.snapshot_ms,
                after,
            });
            return Ok(DevicesPage {
                devices,
                next,
                scanned: page.scanned,
            });
        }
        Err(ReadError::Rebuilding)
    }
}

/// Runs `read`, a transaction that begins with the meta hash's read
/// ([`ReadModel::live_generation_read`]); returns the live generation it found
/// ([`ReadError::Rebuilding`] when there is none) and the replies after that one.
async fn read_with_meta(
    redis: &mut RedisConnection,
    read: &redis::Pipeline,
) -> Result<(u64, Vec<redis::Value>), ReadError> {
    let mut replies: Vec<redis::Value> = read.query_async(redis).await?;
    if replies.is_empty() {
        return Err(redis::ParsingError::from("no reply to the meta read").into());
    }
    let meta: MetaFields = redis::from_redis_value(replies.remove(0))?;
    let generation = live_generation(meta.0, meta.1).ok_or(ReadError::Rebuilding)?;
    Ok((generation, replies))
}

/// Index entries one page of the devices list looks at, at most, for a page of `limit`
/// devices: eight per device of the page and the one past it, at least 512 and at most
/// 2,048. A script blocks Redis while it runs, and `devices_page.lua` takes about 0.9 µs
/// an entry (measured on an index of 1,000 devices × 60 moves, Redis 7.0: 512 entries
/// 0.59 ms, 808 0.81 ms, 2,048 1.87 ms, 8,008 6.8 ms), so a page blocks Redis for 2 ms
/// at most. From `limit` 255 on the budget is 2,048, still twice the page and the one
/// past it at the largest `limit`, so a page of live devices fills in one call.
pub fn scan_budget(limit: usize) -> usize {
    (8 * (limit + 1)).clamp(512, 2_048)
}

/// Where a walk goes on once its generation is no longer the live one, `live`: a walk
/// begun on a cursor is lost (a rebuild switched: start again, a `400`); a new walk
/// goes on in the live one; with none at all, as after Redis restarted empty, it is a
/// `503` until a rebuild made one, with a cursor or without (a `400` there would only
/// send the client to a new walk that fails too).
fn walk_on(with_cursor: bool, live: Option<u64>) -> Result<u64, ReadError> {
    match live {
        None => Err(ReadError::Rebuilding),
        Some(_) if with_cursor => Err(ReadError::CursorLost),
        Some(live) => Ok(live),
    }
}

/// What `devices_page.lua` answered.
enum Scanned {
    Page(IndexPage),
    /// The generation is not the live one; `live` is, if any.
    Gone {
        live: Option<u64>,
    },
    /// The walk is older than the listing TTL.
    Expired,
}

/// A page as the index holds it.
struct IndexPage {
    snapshot_ms: i64,
    scanned: u64,
    continue_after: Option<String>,
    entries: Vec<String>,
}

impl IndexPage {
    /// The script's reply: a status, then for a gone generation the meta hash's
    /// generation and layout, for a page the snapshot, the entries looked
    /// at, the entry to continue after (empty at the end) and the visible entries.
    fn of(reply: Vec<redis::Value>) -> Result<Scanned, ReadError> {
        let mut reply = reply.into_iter();
        let mut next = || {
            reply
                .next()
                .ok_or_else(|| redis::ParsingError::from("a devices page reply too short"))
        };
        let status: i64 = redis::from_redis_value(next()?)?;
        match status {
            PAGE_GONE => {
                let (generation, layout): MetaFields = (
                    redis::from_redis_value(next()?)?,
                    redis::from_redis_value(next()?)?,
                );
                return Ok(Scanned::Gone {
                    live: live_generation(generation, layout),
                });
            }
            PAGE_EXPIRED => return Ok(Scanned::Expired),
            PAGE_SCANNED => {}
            other => {
                return Err(redis::ParsingError::from(format!(
                    "a devices page reply of status {other}"
                ))
                .into())
            }
        }
        let snapshot_ms: i64 = redis::from_redis_value(next()?)?;
        let scanned: u64 = redis::from_redis_value(next()?)?;
        let continue_after: String = redis::from_redis_value(next()?)?;
        let entries: Vec<String> = reply
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()?;
        Ok(Scanned::Page(Self {
            snapshot_ms,
            scanned,
            continue_after: Some(continue_after).filter(|after| !after.is_empty()),
            entries,
        }))
    }
}

/// `devices_page.lua`'s statuses.
const PAGE_SCANNED: i64 = 1;
const PAGE_GONE: i64 = -1;
const PAGE_EXPIRED: i64 = -2;

/// The device's packed header in its hash as `HGETALL` returns it.
fn header_of(hash: &Fields) -> Option<Vec<u8>> {
    hash.iter()
        .find(|(field, _)| field == fields::HEADER)
        .map(|(_, value)| value.clone())
}

/// A device's figures and windows at `now_ms` from its hash and its buckets hash,
/// limited to `metrics` if given; `None` without a header (an unknown device).
fn view_of(
    hash: Fields,
    buckets: &Fields,
    metrics: Option<&[String]>,
    now_ms: i64,
) -> Option<DeviceView> {
    let mut stats = DeviceStats::from_hash(hash)?;
    if let Some(wanted) = metrics {
        stats.metrics.retain(|name, _| wanted.contains(name));
    }
    let buckets = ByResolution::new(buckets, &stats, now_ms);
    let none = BTreeMap::new();
    let windows = stats
        .metrics
        .keys()
        .map(|name| {
            let per_window = WINDOWS
                .iter()
                .map(|window| {
                    let buckets = buckets.for_window(window).get(name).unwrap_or(&none);
                    (window.name, window_aggregate(window, buckets, now_ms))
                })
                .collect();
            (name.clone(), per_window)
        })
        .collect();
    Some(DeviceView {
        windows_change_at: buckets.windows_change_at(now_ms),
        stats,
        windows,
    })
}

/// The oldest bucket any window of `resolution` needs at `now_ms`.
fn oldest_needed(resolution: &Resolution, now_ms: i64) -> i64 {
    let longest = WINDOWS
        .iter()
        .filter(|window| window.resolution == *resolution)
        .map(Window::bucket_count)
        .max()
        .unwrap_or(1);
    resolution.bucket(now_ms) - longest + 1
}

/// A series read's replies: the device's packed header, whether it has the metric, and
/// the buckets asked for.
type SeriesReplies = (Option<Vec<u8>>, bool, Vec<Option<Vec<u8>>>);

/// What a series read found.
#[derive(Debug, PartialEq)]
pub enum Series {
    /// No readings are known for the device.
    UnknownDevice,
    /// The device never reported the metric (a misspelt name, say).
    UnknownMetric,
    /// The non-empty buckets asked for, oldest first: `(bucket, aggregate)`.
    Points(Vec<(i64, Aggregate)>),
}

/// The meta hash's `generation` and `layout`.
type MetaFields = (Option<u64>, Option<u64>);

/// A hash as `HGETALL` returns it: field names are text, the figures packed.
type Fields = Vec<(String, Vec<u8>)>;

/// Per metric, its buckets by bucket number.
type Buckets = BTreeMap<String, BTreeMap<i64, Aggregate>>;

/// The buckets of a device's metrics that some window needs at an instant or will
/// without a new event (those dated ahead), per resolution.
struct ByResolution {
    fine: Buckets,
    coarse: Buckets,
}

impl ByResolution {
    fn new(fields: &Fields, stats: &DeviceStats, now_ms: i64) -> Self {
        Self {
            fine: buckets_by_metric(fields, stats, &FINE, now_ms),
            coarse: buckets_by_metric(fields, stats, &COARSE, now_ms),
        }
    }

    /// The buckets `window` is summed from.
    fn for_window(&self, window: &Window) -> &Buckets {
        if window.resolution == FINE {
            &self.fine
        } else {
            &self.coarse
        }
    }

    /// The first 10 s bucket after `now_ms`'s in which some window would hold other
    /// buckets than at `now_ms`, if no event came: when the oldest bucket in a window
    /// leaves it, or a bucket dated ahead (clock skew) enters it. Until then the windows
    /// are exactly what they are now. `i64::MAX` when nothing would move.
    fn windows_change_at(&self, now_ms: i64) -> i64 {
        let mut change_at = i64::MAX;
        for window in &WINDOWS {
            // Where a bucket of the window's resolution starts, in 10 s buckets.
            let as_fine =
                |bucket: i64| bucket.saturating_mul(window.resolution.width_ms / FINE.width_ms);
            let held = window.buckets(now_ms);
            let ahead = held.end() + 1..;
            for buckets in self.for_window(window).values() {
                if let Some((oldest, _)) = buckets.range(held.clone()).next() {
                    change_at = change_at.min(as_fine(oldest + window.bucket_count()));
                }
                if let Some((first_ahead, _)) = buckets.range(ahead.clone()).next() {
                    change_at = change_at.min(as_fine(*first_ahead));
                }
            }
        }
        change_at
    }
}

/// The buckets of `resolution` in the buckets hash that some window needs at `now_ms`
/// or later (dated ahead), per metric of `stats`.
fn buckets_by_metric(
    fields: &Fields,
    stats: &DeviceStats,
    resolution: &Resolution,
    now_ms: i64,
) -> Buckets {
    let oldest = oldest_needed(resolution, now_ms);
    let mut by_metric = Buckets::new();
    for (field, value) in fields {
        let Some((bucket, metric)) = resolution.parse_field(field) else {
            continue;
        };
        let Some(aggregate) = Aggregate::from_bytes(value) else {
            continue;
        };
        if bucket >= oldest && stats.metrics.contains_key(metric) {
            by_metric
                .entry(metric.to_owned())
                .or_default()
                .insert(bucket, aggregate);
        }
    }
    by_metric
}

fn window_aggregate(
    window: &Window,
    buckets: &BTreeMap<i64, Aggregate>,
    now_ms: i64,
) -> Option<Aggregate> {
    Aggregate::merge_all(
        buckets
            .range(window.buckets(now_ms))
            .map(|(_, aggregate)| *aggregate),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weight for &str {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    impl Weight for usize {
        fn weight(&self) -> usize {
            std::mem::size_of::<usize>()
        }
    }

    fn validity(sample_count: u8, fine_bucket: i64) -> Validity {
        Validity {
            generation: 1,
            header: vec![sample_count; 56],
            fine_bucket,
        }
    }

    fn key(device: usize) -> AnswerKey {
        (format!("sensor-{device}"), None)
    }

    #[test]
    fn an_answer_is_served_only_at_the_validity_it_was_made_at() {
        let cache = AnswerCache::default();
        cache.insert(key(1), validity(1, 10), 12, "doc");
        assert_eq!(cache.get(&key(1), &validity(1, 10)), Some("doc"));
        assert_eq!(cache.get(&key(1), &validity(2, 10)), None, "new events");
        assert_eq!(
            cache.get(&key(1), &validity(1, 11)),
            Some("doc"),
            "windows still the same"
        );
        assert_eq!(cache.get(&key(1), &validity(1, 12)), None, "windows moved");
        assert_eq!(cache.get(&key(1), &validity(1, 9)), None, "made later");
        assert_eq!(cache.get(&key(2), &validity(1, 10)), None);
        let selection = ("sensor-1".to_owned(), Some(vec!["temperature".to_owned()]));
        assert_eq!(
            cache.get(&selection, &validity(1, 10)),
            None,
            "another selection"
        );
    }

    #[test]
    fn large_answers_are_kept_within_the_byte_bound_newest_first() {
        let cache = AnswerCache::default();
        let mebibyte = bytes::Bytes::from(vec![b'x'; 1 << 20]);
        for device in 0..100 {
            // All still exact; each made a bucket later than the one before.
            cache.insert(
                key(device),
                validity(1, device as i64),
                1_000,
                mebibyte.clone(),
            );
        }
        assert!(
            cache.len() <= ANSWERS_BYTES_MAX >> 20,
            "{} answers of 1 MiB kept",
            cache.len()
        );
        assert!(cache.bytes() <= ANSWERS_BYTES_MAX);
        assert!(
            cache.get(&key(99), &validity(1, 99)).is_some(),
            "the newest kept"
        );
        assert!(
            cache.get(&key(0), &validity(1, 99)).is_none(),
            "the oldest dropped"
        );
        let kept: usize = (0..100)
            .filter(|&device| cache.get(&key(device), &validity(1, 99)).is_some())
            .count();
        assert_eq!(kept, cache.len());

        let huge = bytes::Bytes::from(vec![b'x'; ANSWERS_BYTES_MAX]);
        cache.insert(key(1_000), validity(1, 99), 1_000, huge);
        assert!(
            cache.get(&key(1_000), &validity(1, 99)).is_none(),
            "too large to keep"
        );
        assert_eq!(cache.len(), kept);
    }

    #[test]
    fn one_large_answer_kept_after_a_drop_keeps_the_cache_within_its_bound() {
        let cache = AnswerCache::default();
        let mebibyte = bytes::Bytes::from(vec![b'x'; 1 << 20]);
        for device in 0..31 {
            cache.insert(key(device), validity(1, 0), 1_000, mebibyte.clone());
        }
        // 31 MiB (and their keys) kept: each answer below that is kept calls for a
        // drop, which leaves up to 28 MiB.
        for large in [20 << 20, ANSWER_BYTES_MAX + 1, ANSWER_BYTES_MAX - 4096] {
            let answer = bytes::Bytes::from(vec![b'x'; large]);
            cache.insert(key(1_000), validity(1, 1), 1_000, answer);
            assert!(
                cache.bytes() <= ANSWERS_BYTES_MAX,
                "{} bytes kept after an answer of {large}",
                cache.bytes()
            );
        }
        assert!(
            cache.get(&key(1_000), &validity(1, 1)).is_some(),
            "an answer within the largest kept is kept"
        );
    }

    #[test]
    fn a_full_cache_drops_answers_no_longer_exact_first_then_the_oldest_made() {
        let cache = AnswerCache::default();
        for device in 0..ANSWERS_MAX {
            // Made in bucket 10; a tenth of them stay exact until bucket 20.
            let until = if device % 10 == 0 { 20 } else { 11 };
            cache.insert(key(device), validity(1, 10), until, device);
        }
        cache.insert(key(ANSWERS_MAX), validity(1, 11), 12, ANSWERS_MAX);
        assert_eq!(
            cache.len(),
            ANSWERS_MAX / 10 + 1,
            "only the answers still exact stay"
        );
        assert_eq!(cache.get(&key(10), &validity(1, 11)), Some(10));

        // Every answer still exact: the ones made longest ago go, down to 7/8. A fifth
        // were made in bucket 8, the rest in bucket 10 (all exact until bucket 30).
        let cache = AnswerCache::default();
        let made_early = ANSWERS_MAX / 5;
        for device in 0..ANSWERS_MAX {
            let made = if device % 5 == 0 { 8 } else { 10 };
            cache.insert(key(device), validity(1, made), 30, device);
        }
        cache.insert(key(ANSWERS_MAX), validity(1, 10), 30, ANSWERS_MAX);
        assert_eq!(cache.len(), ANSWERS_AFTER_DROP + 1);
        let dropped = ANSWERS_MAX - ANSWERS_AFTER_DROP;
        let early_kept = (0..ANSWERS_MAX)
            .filter(|device| device % 5 == 0)
            .filter(|&device| cache.get(&key(device), &validity(1, 10)).is_some())
            .count();
        assert_eq!(
            early_kept,
            made_early - dropped,
            "only early answers dropped"
        );
        let late_kept = (0..ANSWERS_MAX)
            .filter(|device| device % 5 != 0)
            .filter(|&device| cache.get(&key(device), &validity(1, 10)).is_some())
            .count();
        assert_eq!(
            late_kept,
            ANSWERS_MAX - made_early,
            "every later answer kept"
        );
        assert_eq!(
            cache.get(&key(ANSWERS_MAX), &validity(1, 10)),
            Some(ANSWERS_MAX)
        );
    }

    /// The buckets hash of one metric, `temperature`, with one reading in each of
    /// `fine` and `coarse`.
    fn buckets(fine: &[i64], coarse: &[i64]) -> (Fields, DeviceStats) {
        let aggregate = Aggregate {
            count: 1,
            sum: 1.0,
            min: 1.0,
            max: 1.0,
        }
        .to_bytes();
        let fields = fine
            .iter()
            .map(|bucket| FINE.field(*bucket, "temperature"))
            .chain(
                coarse
                    .iter()
                    .map(|bucket| COARSE.field(*bucket, "temperature")),
            )
            .map(|field| (field, aggregate.clone()))
            .collect();
        let stats = DeviceStats {
            metrics: BTreeMap::from([("temperature".to_owned(), Default::default())]),
            ..Default::default()
        };
        (fields, stats)
    }

    fn windows_change_at(fields: &Fields, stats: &DeviceStats, now_ms: i64) -> i64 {
        ByResolution::new(fields, stats, now_ms).windows_change_at(now_ms)
    }

    #[test]
    fn windows_change_when_their_oldest_bucket_leaves_or_a_bucket_dated_ahead_enters() {
        // Now: 10 s bucket 1,000,000, 5 min bucket 33,333 (which began in 10 s bucket
        // 999,990).
        let now_ms = 1_000_000 * 10_000 + 4_000;
        let (fields, stats) = buckets(&[999_997], &[33_333]);
        // In 1m (6 buckets) until 1,000,003; in 24h (288 coarse buckets) much longer.
        assert_eq!(windows_change_at(&fields, &stats, now_ms), 1_000_003);

        // Older than 1m, inside 5m (30 buckets): leaves it 30 buckets on.
        let (fields, stats) = buckets(&[999_990], &[33_333]);
        assert_eq!(windows_change_at(&fields, &stats, now_ms), 1_000_020);
        // Older than 5m, inside 15m (90 buckets); older than 15m, inside 1h (360).
        let (fields, stats) = buckets(&[999_950], &[33_333]);
        assert_eq!(windows_change_at(&fields, &stats, now_ms), 1_000_040);
        let (fields, stats) = buckets(&[999_900], &[33_333]);
        assert_eq!(windows_change_at(&fields, &stats, now_ms), 1_000_260);
        // The first change of any bucket decides.
        let (fields, stats) = buckets(&[999_900, 999_990, 999_999], &[33_333]);
        assert_eq!(windows_change_at(&fields, &stats, now_ms), 1_000_005);

        // Only the 24h window: its oldest coarse bucket leaves 288 coarse buckets on.
        let (fields, stats) = buckets(&[], &[33_300]);
        assert_eq!(
            windows_change_at(&fields, &stats, now_ms),
            (33_300 + 288) * 30
        );

        // Dated ahead: enters the 1m window in its own bucket.
        let (fields, stats) = buckets(&[999_997, 1_000_002], &[33_333]);
        assert_eq!(windows_change_at(&fields, &stats, now_ms), 1_000_002);

        // Out of every window (kept until pruned) or of a metric not shown: no change.
        let (fields, stats) = buckets(&[990_000], &[]);
        assert_eq!(windows_change_at(&fields, &stats, now_ms), i64::MAX);
        let (fields, _) = buckets(&[999_997], &[]);
        assert_eq!(
            windows_change_at(&fields, &DeviceStats::default(), now_ms),
            i64::MAX
        );
    }
}

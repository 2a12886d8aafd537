//! Reading the Redis read model: the live generation, one device's figures and
//! buckets, the devices index. Read-only by construction: plain reads, no scripts. A
//! device view is cached while nothing it depends on changed (see `Validity`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use contract::read_model::{
    fields, live_generation, meta, meta_key, Aggregate, DeviceHeader, DeviceKeys, DeviceStats,
    DevicesIndex, Resolution, Window, COARSE, FINE, WINDOWS,
};
use redis::aio::ConnectionManager;
use redis::RedisResult;

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
    /// No live generation: the read model is being (re)built.
    #[error("the read model is being rebuilt")]
    Rebuilding,
}

/// One device's figures with its window aggregates, read at one instant.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub stats: DeviceStats,
    /// Per metric, per window name: the aggregate (`None` when the window is empty).
    pub windows: BTreeMap<String, BTreeMap<&'static str, Option<Aggregate>>>,
}

/// One device of a devices page.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub device_id: String,
    pub last_seen_ms: i64,
    pub sample_count: u64,
    /// Its index entry, the position a cursor continues after.
    pub entry: String,
}

/// A page of the devices list.
pub type DevicesPage = Vec<DeviceEntry>;

#[derive(Clone)]
pub struct ReadModel {
    redis: ConnectionManager,
    prefix: String,
    views: Arc<Mutex<Views>>,
    /// The live generation as last read (0: none read yet); a cached read assumes it
    /// and checks it in the same round trip.
    last_generation: Arc<AtomicU64>,
}

/// A cached device view: one device, one `?metrics=` selection.
type ViewKey = (String, Option<Vec<String>>);

/// The cached views, each with the validity it was read at.
type Views = HashMap<ViewKey, (Validity, Arc<DeviceView>)>;

/// What a cached view depends on. Every event applied to a device raises its
/// `sample_count`, a rebuild changes the generation, and the windows move with the
/// current 10 s bucket (a 5 min boundary is also a 10 s one); pruning only drops
/// buckets already outside every window. So a view with the same validity is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Validity {
    generation: u64,
    sample_count: u64,
    fine_bucket: i64,
}

/// Views kept at most; past it the cache starts over.
const VIEWS_MAX: usize = 10_000;

impl ReadModel {
    pub fn new(redis: ConnectionManager, prefix: String) -> Self {
        Self {
            redis,
            prefix,
            views: Arc::new(Mutex::new(HashMap::new())),
            last_generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A device's figures and windows at `now_ms`, from the cache when nothing it
    /// depends on changed (one small read checks that), else read in full.
    pub async fn device_cached(
        &self,
        device_id: &str,
        metrics: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Option<Arc<DeviceView>>, ReadError> {
        let (generation, sample_count) = self.generation_and_sample_count(device_id).await?;
        let Some(sample_count) = sample_count else {
            return Ok(None);
        };
        let validity = Validity {
            generation,
            sample_count,
            fine_bucket: FINE.bucket(now_ms),
        };
        let key: ViewKey = (device_id.to_owned(), metrics.map(<[String]>::to_vec));
        if let Some((cached, view)) = self
            .views
            .lock()
            .ok()
            .and_then(|views| views.get(&key).cloned())
        {
            if cached == validity {
                return Ok(Some(view));
            }
        }
        let view = self
            .device_in(generation, device_id, metrics, now_ms)
            .await?
            .map(Arc::new);
        if let (Some(view), Ok(mut views)) = (&view, self.views.lock()) {
            // Stored only if it is the state the validity describes (events may have
            // been applied between the two reads).
            if view.stats.sample_count == sample_count {
                if views.len() >= VIEWS_MAX {
                    views.clear();
                }
                views.insert(key, (validity, view.clone()));
            }
        }
        Ok(view)
    }

    /// The live generation and the device's `sample_count` in it, in one round trip
    /// when the generation is the one read last time (a rebuild's switch costs one more).
    async fn generation_and_sample_count(
        &self,
        device_id: &str,
    ) -> Result<(u64, Option<u64>), ReadError> {
        let assumed = self.last_generation.load(Ordering::Relaxed);
        let mut redis = self.redis.clone();
        let (meta, header): (MetaFields, Option<Vec<u8>>) = redis::pipe()
            .cmd("HMGET")
            .arg(meta_key(&self.prefix))
            .arg(meta::GENERATION)
            .arg(meta::LAYOUT)
            .cmd("HGET")
            .arg(DeviceKeys::new(&self.prefix, assumed, device_id).stats)
            .arg(fields::HEADER)
            .query_async(&mut redis)
            .await?;
        let generation = live_generation(meta.0, meta.1).ok_or(ReadError::Rebuilding)?;
        if generation == assumed {
            return Ok((generation, sample_count(header)));
        }
        self.last_generation.store(generation, Ordering::Relaxed);
        let header: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(DeviceKeys::new(&self.prefix, generation, device_id).stats)
            .arg(fields::HEADER)
            .query_async(&mut redis)
            .await?;
        Ok((generation, sample_count(header)))
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
        let (generation, layout): MetaFields = redis::cmd("HMGET")
            .arg(meta_key(&self.prefix))
            .arg(meta::GENERATION)
            .arg(meta::LAYOUT)
            .query_async(&mut redis)
            .await?;
        live_generation(generation, layout).ok_or(ReadError::Rebuilding)
    }

    /// A device's figures and windows at `now_ms`, limited to `metrics` if given;
    /// `None` for an unknown device. One round trip: the device hash and its buckets
    /// hash (a device keeps at most 1 h 5 min of 10 s buckets and 24 h 15 min of
    /// 5 min buckets per metric); the windows are summed here.
    pub async fn device(
        &self,
        device_id: &str,
        metrics: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Option<DeviceView>, ReadError> {
        let generation = self.generation().await?;
        self.device_in(generation, device_id, metrics, now_ms).await
    }

    /// [`ReadModel::device`] in a generation the caller has read already.
    async fn device_in(
        &self,
        generation: u64,
        device_id: &str,
        metrics: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Option<DeviceView>, ReadError> {
        let keys = DeviceKeys::new(&self.prefix, generation, device_id);
        let mut redis = self.redis.clone();
        let (hash, buckets): (Fields, Fields) = redis::pipe()
            .hgetall(&keys.stats)
            .hgetall(&keys.buckets)
            .query_async(&mut redis)
            .await?;
        let Some(mut stats) = DeviceStats::from_hash(hash) else {
            return Ok(None);
        };
        if let Some(wanted) = metrics {
            stats.metrics.retain(|name, _| wanted.contains(name));
        }
        let fine = buckets_by_metric(&buckets, &stats, &FINE, now_ms);
        let coarse = buckets_by_metric(&buckets, &stats, &COARSE, now_ms);
        let none = BTreeMap::new();
        let windows = stats
            .metrics
            .keys()
            .map(|name| {
                let per_window = WINDOWS
                    .iter()
                    .map(|window| {
                        let by_metric = if window.resolution == FINE {
                            &fine
                        } else {
                            &coarse
                        };
                        let buckets = by_metric.get(name).unwrap_or(&none);
                        (window.name, window_aggregate(window, buckets, now_ms))
                    })
                    .collect();
                (name.clone(), per_window)
            })
            .collect();
        Ok(Some(DeviceView { stats, windows }))
    }

    /// The non-empty buckets of one metric in `buckets` (not empty), oldest first;
    /// `None` for an unknown device.
    pub async fn series(
        &self,
        device_id: &str,
        metric: &str,
        resolution: Resolution,
        buckets: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<Vec<(i64, Aggregate)>>, ReadError> {
        let generation = self.generation().await?;
        let keys = DeviceKeys::new(&self.prefix, generation, device_id);
        let fields: Vec<String> = buckets
            .clone()
            .map(|bucket| resolution.field(bucket, metric))
            .collect();
        let mut redis = self.redis.clone();
        let (exists, values): (bool, Vec<Option<Vec<u8>>>) = redis::pipe()
            .exists(&keys.stats)
            .cmd("HMGET")
            .arg(&keys.buckets)
            .arg(&fields)
            .query_async(&mut redis)
            .await?;
        if !exists {
            return Ok(None);
        }
        Ok(Some(
            buckets
                .zip(values)
                .filter_map(|(bucket, value)| Some((bucket, Aggregate::from_bytes(&value?)?)))
                .collect(),
        ))
    }

    /// Up to `limit` devices as the index stood at `snapshot_ms`, most recently seen
    /// first, after `after` (an entry returned earlier in the same walk) if given.
    pub async fn devices(
        &self,
        limit: usize,
        snapshot_ms: i64,
        after: Option<&str>,
    ) -> Result<DevicesPage, ReadError> {
        let generation = self.generation().await?;
        let index = DevicesIndex::new(&self.prefix, generation);
        let mut redis = self.redis.clone();
        let mut start = match after {
            None => 0,
            Some(entry) => {
                let rank: Option<i64> = redis::cmd("ZREVRANK")
                    .arg(&index.log)
                    .arg(entry)
                    .query_async(&mut redis)
                    .await?;
                // A walk's entries stay in the log for the listing TTL, which the cursor
                // is checked against; a missing one means the index was rebuilt.
                rank.ok_or(ReadError::CursorLost)? + 1
            }
        };
        let chunk = (limit * 2).max(64) as i64;
        let mut visible: Vec<String> = Vec::with_capacity(limit);
        while visible.len() < limit {
            let entries: Vec<String> = redis::cmd("ZRANGE")
                .arg(&index.log)
                .arg(start)
                .arg(start + chunk - 1)
                .arg("REV")
                .query_async(&mut redis)
                .await?;
            if entries.is_empty() {
                break;
            }
            start += entries.len() as i64;
            let mut pipeline = redis::pipe();
            for entry in &entries {
                pipeline
                    .hget(&index.created, entry)
                    .zscore(&index.retired, entry);
            }
            let times: Vec<Option<i64>> = pipeline.query_async(&mut redis).await?;
            for (entry, times) in entries.into_iter().zip(times.chunks(2)) {
                let created = times.first().copied().flatten();
                let retired = times.get(1).copied().flatten();
                let was_live = created.is_some_and(|created| created <= snapshot_ms)
                    && retired.is_none_or(|retired| retired > snapshot_ms);
                if was_live && visible.len() < limit {
                    visible.push(entry);
                }
            }
        }
        if visible.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for entry in &visible {
            let device_id = DevicesIndex::device_of(entry).unwrap_or_default();
            pipeline
                .cmd("HGET")
                .arg(DeviceKeys::new(&self.prefix, generation, device_id).stats)
                .arg(fields::HEADER);
        }
        let headers: Vec<Option<Vec<u8>>> = pipeline.query_async(&mut redis).await?;
        Ok(visible
            .into_iter()
            .zip(headers)
            .map(|(entry, header)| {
                let header = header
                    .as_deref()
                    .and_then(DeviceHeader::from_bytes)
                    .unwrap_or_default();
                DeviceEntry {
                    device_id: DevicesIndex::device_of(&entry)
                        .unwrap_or_default()
                        .to_owned(),
                    last_seen_ms: header.last_seen_ms,
                    sample_count: header.sample_count,
                    entry,
                }
            })
            .collect())
    }
}

/// The buckets any window of `resolution` needs at `now_ms`.
fn span(resolution: &Resolution, now_ms: i64) -> std::ops::RangeInclusive<i64> {
    let longest = WINDOWS
        .iter()
        .filter(|window| window.resolution == *resolution)
        .map(Window::bucket_count)
        .max()
        .unwrap_or(1);
    let current = resolution.bucket(now_ms);
    (current - longest + 1)..=current
}

/// The meta hash's `generation` and `layout`.
type MetaFields = (Option<u64>, Option<u64>);

/// A hash as `HGETALL` returns it: field names are text, the figures packed.
type Fields = Vec<(String, Vec<u8>)>;

/// The `sample_count` of a packed device header; `None` for an unknown device.
fn sample_count(header: Option<Vec<u8>>) -> Option<u64> {
    header
        .as_deref()
        .and_then(DeviceHeader::from_bytes)
        .map(|header| header.sample_count)
}

/// The buckets of `resolution` in the buckets hash that some window needs at `now_ms`,
/// per metric of `stats`.
fn buckets_by_metric(
    fields: &Fields,
    stats: &DeviceStats,
    resolution: &Resolution,
    now_ms: i64,
) -> BTreeMap<String, BTreeMap<i64, Aggregate>> {
    let span = span(resolution, now_ms);
    let mut by_metric: BTreeMap<String, BTreeMap<i64, Aggregate>> = BTreeMap::new();
    for (field, value) in fields {
        let Some((bucket, metric)) = resolution.parse_field(field) else {
            continue;
        };
        let Some(aggregate) = Aggregate::from_bytes(value) else {
            continue;
        };
        if span.contains(&bucket) && stats.metrics.contains_key(metric) {
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

//! Reading the Redis read model: the live generation, one device's figures and
//! buckets, the devices index. Read-only by construction: plain reads and a script
//! flagged `no-writes`.

use std::collections::BTreeMap;

use contract::read_model::{
    fields, meta, meta_key, Aggregate, DeviceKeys, DeviceStats, DevicesIndex, Resolution, Window,
    COARSE, FINE, WINDOWS,
};
use redis::aio::ConnectionManager;
use redis::{RedisResult, Script, Value};

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
    stats_script: Script,
}

impl ReadModel {
    pub fn new(redis: ConnectionManager, prefix: String) -> Self {
        Self {
            redis,
            prefix,
            stats_script: Script::new(include_str!("stats.lua")),
        }
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
        let generation: Option<u64> = redis::cmd("HGET")
            .arg(meta_key(&self.prefix))
            .arg(meta::GENERATION)
            .query_async(&mut redis)
            .await?;
        generation.ok_or(ReadError::Rebuilding)
    }

    /// A device's figures and windows at `now_ms`, limited to `metrics` if given;
    /// `None` for an unknown device.
    pub async fn device(
        &self,
        device_id: &str,
        metrics: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Option<DeviceView>, ReadError> {
        let generation = self.generation().await?;
        let keys = DeviceKeys::new(&self.prefix, generation, device_id);
        let fine = span(&FINE, now_ms);
        let coarse = span(&COARSE, now_ms);
        let mut invocation = self.stats_script.key(&keys.stats);
        invocation
            .key(&keys.fine)
            .key(&keys.coarse)
            .arg(*fine.start())
            .arg(*fine.end())
            .arg(*coarse.start())
            .arg(*coarse.end());
        for metric in metrics.unwrap_or_default() {
            invocation.arg(metric);
        }
        let mut redis = self.redis.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut redis).await?;
        let mut parts = reply.into_iter();
        let (Some(hash), Some(names)) = (parts.next(), parts.next()) else {
            return Ok(None);
        };
        let hash: Vec<(String, String)> = redis::from_redis_value(hash)?;
        let names: Vec<String> = redis::from_redis_value(names)?;
        let Some(mut stats) = DeviceStats::from_hash(hash) else {
            return Ok(None);
        };
        let mut windows = BTreeMap::new();
        for name in names {
            let (Some(fine_values), Some(coarse_values)) = (parts.next(), parts.next()) else {
                break;
            };
            let fine_buckets = bucket_map(*fine.start(), redis::from_redis_value(fine_values)?);
            let coarse_buckets =
                bucket_map(*coarse.start(), redis::from_redis_value(coarse_values)?);
            let per_window = WINDOWS
                .iter()
                .map(|window| {
                    let buckets = if window.resolution == FINE {
                        &fine_buckets
                    } else {
                        &coarse_buckets
                    };
                    (window.name, window_aggregate(window, buckets, now_ms))
                })
                .collect();
            windows.insert(name, per_window);
        }
        if let Some(wanted) = metrics {
            stats.metrics.retain(|name, _| wanted.contains(name));
        }
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
            .map(|bucket| contract::read_model::bucket_field(bucket, metric))
            .collect();
        let mut redis = self.redis.clone();
        let (exists, values): (bool, Vec<Option<String>>) = redis::pipe()
            .exists(&keys.stats)
            .cmd("HMGET")
            .arg(keys.buckets(&resolution))
            .arg(&fields)
            .query_async(&mut redis)
            .await?;
        if !exists {
            return Ok(None);
        }
        Ok(Some(
            buckets
                .zip(values)
                .filter_map(|(bucket, value)| Some((bucket, Aggregate::parse(value.as_deref()?)?)))
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
                .cmd("HMGET")
                .arg(DeviceKeys::new(&self.prefix, generation, device_id).stats)
                .arg(fields::LAST_SEEN)
                .arg(fields::SAMPLE_COUNT);
        }
        let figures: Vec<(Option<i64>, Option<u64>)> = pipeline.query_async(&mut redis).await?;
        Ok(visible
            .into_iter()
            .zip(figures)
            .map(|(entry, (last_seen, count))| DeviceEntry {
                device_id: DevicesIndex::device_of(&entry)
                    .unwrap_or_default()
                    .to_owned(),
                last_seen_ms: last_seen.unwrap_or_default(),
                sample_count: count.unwrap_or(0),
                entry,
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

fn bucket_map(first: i64, values: Vec<Option<String>>) -> BTreeMap<i64, Aggregate> {
    (first..)
        .zip(values)
        .filter_map(|(bucket, value)| Some((bucket, Aggregate::parse(value.as_deref()?)?)))
        .collect()
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

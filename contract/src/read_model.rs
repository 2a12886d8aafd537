//! The Redis read model: key layout, generations, buckets and windows.
//!
//! The projector writes these keys (from its Lua script) and the query service reads
//! them; this module is where the two agree. Every key of one device carries the
//! device id as a hash tag (`{sensor-1}`), so a device's keys live in one Redis Cluster
//! slot and one script call can touch all of them; no script touches two devices.
//!
//! The read model lives in a *generation*: a rebuild writes a new one beside the live
//! one and then switches the `generation` field of the meta hash over in one `HSET`.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<p>meta` | hash | `generation` (current), `building` (being rebuilt) |
//! | `<p>rebuild-lock` | string | who is rebuilding, with an expiry |
//! | `<p>g<G>:{devices}:log`, `:created`, `:retired`, `:current` | sorted sets, hashes | the devices index, see [`DevicesIndex`] |
//! | `<p>g<G>:device:{<id>}` | hash | the device's all-time figures, fields below |
//! | `<p>g<G>:device:{<id>}:applied` | sorted set | event ids applied, scored by apply time, trimmed to the dedup horizon |
//! | `<p>g<G>:device:{<id>}:b10s` | hash | 10 s buckets: field `<bucket>:<metric>` = `count sum min max` |
//! | `<p>g<G>:device:{<id>}:b5m` | hash | 5 min buckets, same fields |
//!
//! Device fields: `first_seen`, `last_seen`, `updated_at` (ms since the epoch),
//! `sample_count`, `as_of_seq` (highest stream sequence applied). Per metric `<m>`:
//! `m:<m>:count`, `m:<m>:sum`, `m:<m>:min`, `m:<m>:max`, `m:<m>:last`, `m:<m>:last_at`.
//! Metric names cannot hold `:`, so the field names parse back without ambiguity.
//! A bucket's number is `floor(recorded_at_ms / width_ms)`.

use std::collections::BTreeMap;

/// The hash naming the current generation (and the one being built, if any).
pub fn meta_key(prefix: &str) -> String {
    format!("{prefix}meta")
}

/// Fields of the meta hash.
pub mod meta {
    pub const GENERATION: &str = "generation";
    pub const BUILDING: &str = "building";
}

/// Held (with an expiry) by whoever is rebuilding.
pub fn rebuild_lock_key(prefix: &str) -> String {
    format!("{prefix}rebuild-lock")
}

/// Where the projectors remember the durable consumer's ack floor as of their last look
/// (`<stream sequence> <stored-at unix nanoseconds>` of the message there), to notice a
/// stream that went back below it even across projector restarts.
pub fn consumer_anchor_key(prefix: &str, consumer: &str) -> String {
    format!("{prefix}consumer-anchor:{consumer}")
}

/// Matches every key of one generation, for deleting it.
pub fn generation_pattern(prefix: &str, generation: u64) -> String {
    format!("{prefix}g{generation}:*")
}

/// The devices index of one generation: a small multi-version index, so that a walk
/// through `GET /v1/devices` sees the order as it was when the walk began.
///
/// Each time a device's `last_seen` moves to a later 10 s granule, a new *entry*
/// `<granule ms>:<device>` (scored by the granule) is added to `log` with its creation
/// time in `created`, and the device's previous entry is *retired* (scored by the time
/// it was superseded). A walk that began at `t0` sees the entries created by `t0` and
/// not retired by `t0`: every device exactly once. Retired entries are deleted after
/// [`LISTING_TTL_MS`]; a cursor older than that is refused. All four keys share the
/// hash tag `{devices}`, so the index script runs on one Redis Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesIndex {
    pub log: String,
    pub created: String,
    pub retired: String,
    pub current: String,
}

impl DevicesIndex {
    pub fn new(prefix: &str, generation: u64) -> Self {
        let base = format!("{prefix}g{generation}:{{devices}}");
        Self {
            log: format!("{base}:log"),
            created: format!("{base}:created"),
            retired: format!("{base}:retired"),
            current: format!("{base}:current"),
        }
    }

    /// The entry of a device at a granule.
    pub fn entry(granule_ms: i64, device_id: &str) -> String {
        format!("{granule_ms}:{device_id}")
    }

    /// The device of an entry.
    pub fn device_of(entry: &str) -> Option<&str> {
        entry.split_once(':').map(|(_, device_id)| device_id)
    }
}

/// The index orders devices by `last_seen` to this granularity (then by id).
pub const LISTING_GRANULE_MS: i64 = 10_000;

/// How long a walk through the devices list may take; retired entries live this long.
pub const LISTING_TTL_MS: i64 = 600_000;

/// The granule of a `last_seen`.
pub fn listing_granule(last_seen_ms: i64) -> i64 {
    last_seen_ms.div_euclid(LISTING_GRANULE_MS) * LISTING_GRANULE_MS
}

/// The keys of one device in one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub stats: String,
    pub applied: String,
    pub fine: String,
    pub coarse: String,
}

impl DeviceKeys {
    pub fn new(prefix: &str, generation: u64, device_id: &str) -> Self {
        let base = format!("{prefix}g{generation}:device:{{{device_id}}}");
        Self {
            applied: format!("{base}:applied"),
            fine: format!("{base}:{}", FINE.key_suffix),
            coarse: format!("{base}:{}", COARSE.key_suffix),
            stats: base,
        }
    }

    /// The bucket hash of a resolution.
    pub fn buckets(&self, resolution: &Resolution) -> &str {
        if resolution.key_suffix == FINE.key_suffix {
            &self.fine
        } else {
            &self.coarse
        }
    }
}

/// Device-level hash fields.
pub mod fields {
    pub const FIRST_SEEN: &str = "first_seen";
    pub const LAST_SEEN: &str = "last_seen";
    pub const SAMPLE_COUNT: &str = "sample_count";
    pub const UPDATED_AT: &str = "updated_at";
    pub const AS_OF_SEQ: &str = "as_of_seq";
    /// Prefix of the per-metric fields.
    pub const METRIC_PREFIX: &str = "m:";
}

/// A bucket size and how long its buckets are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// As written in `?resolution=`: `10s` or `5m`.
    pub name: &'static str,
    pub width_ms: i64,
    /// Buckets whose end is older than this are deleted (a little over the longest
    /// window that uses them).
    pub retention_ms: i64,
    pub key_suffix: &'static str,
}

/// 10 s buckets for the windows up to 1 h, kept 1 h 5 min.
pub const FINE: Resolution = Resolution {
    name: "10s",
    width_ms: 10_000,
    retention_ms: 65 * 60_000,
    key_suffix: "b10s",
};

/// 5 min buckets for the 24 h window, kept 24 h 15 min.
pub const COARSE: Resolution = Resolution {
    name: "5m",
    width_ms: 300_000,
    retention_ms: 24 * 3_600_000 + 15 * 60_000,
    key_suffix: "b5m",
};

pub const RESOLUTIONS: [Resolution; 2] = [FINE, COARSE];

impl Resolution {
    /// The bucket an instant falls in.
    pub fn bucket(&self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.width_ms)
    }

    /// The oldest bucket still kept at `now_ms`.
    pub fn oldest_kept(&self, now_ms: i64) -> i64 {
        self.bucket(now_ms - self.retention_ms) + 1
    }

    pub fn by_name(name: &str) -> Option<Resolution> {
        RESOLUTIONS
            .into_iter()
            .find(|resolution| resolution.name == name)
    }
}

/// A rolling window: the `bucket_count` most recent buckets of a resolution, the
/// current (partial) bucket included. Its edge is exact to one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub name: &'static str,
    pub length_ms: i64,
    pub resolution: Resolution,
}

pub const WINDOWS: [Window; 5] = [
    Window {
        name: "1m",
        length_ms: 60_000,
        resolution: FINE,
    },
    Window {
        name: "5m",
        length_ms: 300_000,
        resolution: FINE,
    },
    Window {
        name: "15m",
        length_ms: 900_000,
        resolution: FINE,
    },
    Window {
        name: "1h",
        length_ms: 3_600_000,
        resolution: FINE,
    },
    Window {
        name: "24h",
        length_ms: 86_400_000,
        resolution: COARSE,
    },
];

impl Window {
    pub fn bucket_count(&self) -> i64 {
        self.length_ms / self.resolution.width_ms
    }

    /// The buckets in the window at `now_ms`, oldest first.
    pub fn buckets(&self, now_ms: i64) -> std::ops::RangeInclusive<i64> {
        let current = self.resolution.bucket(now_ms);
        (current - self.bucket_count() + 1)..=current
    }

    /// Whether a reading recorded at `at_ms` counts in the window at `now_ms`.
    pub fn contains(&self, at_ms: i64, now_ms: i64) -> bool {
        self.buckets(now_ms)
            .contains(&self.resolution.bucket(at_ms))
    }
}

/// The field of one metric in one bucket.
pub fn bucket_field(bucket: i64, metric: &str) -> String {
    format!("{bucket}:{metric}")
}

/// count, sum, min and max of the readings in a bucket or a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Aggregate {
    pub fn of(value: f64) -> Self {
        Self {
            count: 1,
            sum: value,
            min: value,
            max: value,
        }
    }

    /// Parses a bucket value `count sum min max`; `None` if malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let aggregate = Self {
            count: parts.next()?.parse().ok()?,
            sum: parts.next()?.parse().ok()?,
            min: parts.next()?.parse().ok()?,
            max: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(aggregate)
    }

    pub fn merge(self, other: Self) -> Self {
        Self {
            count: self.count + other.count,
            sum: self.sum + other.sum,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
        }
    }

    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Merges whatever buckets there are; `None` when there are none.
    pub fn merge_all(buckets: impl IntoIterator<Item = Aggregate>) -> Option<Self> {
        buckets.into_iter().reduce(Self::merge)
    }
}

/// All-time figures of one metric of one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricStats {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The value of the reading with the latest `recorded_at` (on a tie, the larger value).
    pub last: f64,
    pub last_at_ms: i64,
}

impl MetricStats {
    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Everything the read model knows of one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceStats {
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub sample_count: u64,
    pub updated_at_ms: i64,
    pub as_of_seq: u64,
    pub metrics: BTreeMap<String, MetricStats>,
}

impl DeviceStats {
    /// Reads a device hash as `HGETALL` returns it; `None` when the hash is empty.
    /// A field that does not parse is skipped rather than trusted.
    pub fn from_hash(entries: impl IntoIterator<Item = (String, String)>) -> Option<Self> {
        let mut stats = DeviceStats::default();
        let mut seen_any = false;
        for (field, value) in entries {
            seen_any = true;
            if let Some(rest) = field.strip_prefix(fields::METRIC_PREFIX) {
                let Some((name, aggregate)) = rest.rsplit_once(':') else {
                    continue;
                };
                let metric = stats.metrics.entry(name.to_owned()).or_default();
                match aggregate {
                    "count" => metric.count = value.parse().unwrap_or(0),
                    "sum" => metric.sum = value.parse().unwrap_or(f64::NAN),
                    "min" => metric.min = value.parse().unwrap_or(f64::NAN),
                    "max" => metric.max = value.parse().unwrap_or(f64::NAN),
                    "last" => metric.last = value.parse().unwrap_or(f64::NAN),
                    "last_at" => metric.last_at_ms = value.parse().unwrap_or(0),
                    _ => {}
                }
                continue;
            }
            match field.as_str() {
                fields::FIRST_SEEN => stats.first_seen_ms = value.parse().unwrap_or(0),
                fields::LAST_SEEN => stats.last_seen_ms = value.parse().unwrap_or(0),
                fields::SAMPLE_COUNT => stats.sample_count = value.parse().unwrap_or(0),
                fields::UPDATED_AT => stats.updated_at_ms = value.parse().unwrap_or(0),
                fields::AS_OF_SEQ => stats.as_of_seq = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        seen_any.then_some(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_device_share_a_hash_tag() {
        let keys = DeviceKeys::new("t1:", 7, "sensor-1");
        assert_eq!(keys.stats, "t1:g7:device:{sensor-1}");
        assert_eq!(keys.applied, "t1:g7:device:{sensor-1}:applied");
        assert_eq!(keys.buckets(&FINE), "t1:g7:device:{sensor-1}:b10s");
        assert_eq!(keys.buckets(&COARSE), "t1:g7:device:{sensor-1}:b5m");
    }

    #[test]
    fn windows_hold_their_most_recent_buckets() {
        let now = 1_000_000_005_000; // 5 s into a 10 s bucket
        let one_minute = WINDOWS[0];
        assert_eq!(one_minute.bucket_count(), 6);
        assert!(one_minute.contains(now, now));
        assert!(
            one_minute.contains(now - 55_000, now),
            "first bucket of the window"
        );
        assert!(
            !one_minute.contains(now - 65_000, now),
            "one bucket too old"
        );
        assert!(
            !one_minute.contains(now + 10_000, now),
            "the future is in no window yet"
        );
        let day = WINDOWS[4];
        assert_eq!(day.bucket_count(), 288);
        assert!(day.contains(now - 23 * 3_600_000, now));
        assert!(!day.contains(now - 25 * 3_600_000, now));
    }

    #[test]
    fn bucket_values_parse_and_merge() {
        let bucket = Aggregate::parse("2 43 21.5 21.5").expect("valid");
        let merged = bucket.merge(Aggregate::of(-1.0));
        assert_eq!(
            merged,
            Aggregate {
                count: 3,
                sum: 42.0,
                min: -1.0,
                max: 21.5
            }
        );
        assert_eq!(Aggregate::parse("2 43 21.5"), None);
        assert_eq!(Aggregate::merge_all([]), None);
    }

    #[test]
    fn hash_parses_back_into_stats() {
        let hash = [
            ("first_seen", "1000"),
            ("last_seen", "2000"),
            ("sample_count", "2"),
            ("updated_at", "3000"),
            ("as_of_seq", "7"),
            ("m:temperature:count", "2"),
            ("m:temperature:sum", "43"),
            ("m:temperature:min", "21.5"),
            ("m:temperature:max", "21.5"),
            ("m:temperature:last", "21.5"),
            ("m:temperature:last_at", "2000"),
        ]
        .map(|(field, value)| (field.to_owned(), value.to_owned()));
        let stats = DeviceStats::from_hash(hash).expect("not empty");
        assert_eq!(stats.sample_count, 2);
        assert_eq!(stats.as_of_seq, 7);
        let temperature = &stats.metrics["temperature"];
        assert_eq!(temperature.avg(), Some(21.5));
        assert_eq!(temperature.last_at_ms, 2000);
        assert_eq!(DeviceStats::from_hash(Vec::new()), None);
    }
}

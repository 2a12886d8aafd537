//! The Redis read model: key layout, generations, buckets and windows.
//!
//! The projector writes these keys (from its Lua script) and the query service reads
//! them; this module is where the two agree. Every key of one device carries the
//! device id as a hash tag (`{sensor-1}`), and no script touches two devices. Every
//! guarded script call and every query read also reads the meta hash in the same step,
//! and that key has no tag: the read model needs one Redis (replicas allowed), not
//! Redis Cluster, where those calls would span two slots (`CROSSSLOT`). The tags leave
//! a move to Cluster needing only a per-slot copy of the meta hash's fields.
//!
//! The read model lives in a *generation*: a rebuild writes a new one beside the live
//! one and then switches the `generation` field of the meta hash over in one `HSET`.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<p>meta` | hash | `generation` (current), `building` (being rebuilt) with `replay_through` and `replay_last` ([`meta::REPLAY_THROUGH`], [`meta::REPLAY_LAST`]), `built_through` (what the rebuild replayed into the current one, [`meta::BUILT_THROUGH`]), `layout` (of the current one, [`LAYOUT`]), `redis_run` (the Redis server it was built on, [`meta::REDIS_RUN`]), `retired` (generations whose keys are still to be deleted, [`meta::RETIRED`]) |
//! | `<p>rebuild-lock` | string | who is rebuilding, with an expiry |
//! | `<p>g<G>:{devices}:log`, `:created`, `:retired`, `:current` | sorted sets, hashes | the devices index, see [`DevicesIndex`] |
//! | `<p>g<G>:device:{<id>}` | hash | the device's all-time figures, fields below |
//! | `<p>g<G>:device:{<id>}:applied` | sorted set | event ids applied, scored by apply time, trimmed to the dedup horizon |
//! | `<p>g<G>:device:{<id>}:buckets` | hash | 10 s buckets (`f<bucket>:<metric>`) and 5 min buckets (`c<bucket>:<metric>`); past 128 fields also [`BUCKETS_HASH_TABLE_FIELD`] |
//!
//! Figures are stored *packed*: little-endian IEEE 754 doubles back to back, the form
//! Redis's Lua `struct.pack('<d…')` writes, so the script folds numbers without ever
//! printing or parsing them (decimal conversions were a fifth of its Redis time).
//! Counts, sequences and milliseconds are whole numbers, exact in a double up to 2^53.
//! - device field `h` ([`DeviceHeader`]): first_seen, last_seen, sample_count,
//!   as_of_seq (highest stream sequence applied), updated_at, and two of the script's
//!   own schedules (when the applied set is trimmed next, the oldest 10 s bucket kept
//!   at the last pruning);
//! - device field `m:<metric>` ([`MetricStats`]): count, sum, min, max, last, last_at;
//! - bucket field ([`Aggregate`]): count, sum, min, max.
//!
//! Metric names cannot hold `:`, so the field names parse back without ambiguity.
//! A bucket's number is `floor(recorded_at_ms / width_ms)`. Operators read the figures
//! through the query API; `redis-cli` shows the packed fields as bytes.

use std::collections::BTreeMap;

/// A field of a buckets hash that holds no bucket: its value, longer than Redis's
/// `hash-max-listpack-value`, makes Redis keep the hash as a hash table. `apply.lua`
/// adds it once the hash holds 128 fields, where looking the newest buckets up in a
/// listpack (a scan from the front) costs more CPU than the table's memory is worth.
/// Readers skip it like any field that is not a bucket.
pub const BUCKETS_HASH_TABLE_FIELD: &str = "~";

/// The hash naming the current generation (and the one being built, if any).
pub fn meta_key(prefix: &str) -> String {
    format!("{prefix}meta")
}

/// Fields of the meta hash.
pub mod meta {
    pub const GENERATION: &str = "generation";
    pub const BUILDING: &str = "building";
    /// Set with [`BUILDING`]: `<stream sequence> <stored-at unix nanoseconds>`, the
    /// live projectors' ack floor when the build began and the stream's newest stored
    /// time just after. The build's replay alone applies the messages at or below that
    /// sequence stored by then to the generation being built; live projectors leave
    /// them out of it (a live consumer that went back, as after a NATS crash, delivers
    /// some again, maybe longer than the dedup horizon before the replay reaches them).
    pub const REPLAY_THROUGH: &str = "replay_through";
    /// Set once the build's replay began, as [`REPLAY_THROUGH`] is: the stream's last
    /// sequence then and its newest stored time. The replay applies every message at
    /// or below it stored by then, so live projectors leave those out of the generation
    /// being built from then on too, however long after they get them: projectors that
    /// were stopped or far behind and come back during a replay longer than the dedup
    /// horizon counted their backlog (past the floor) twice there. Written only while
    /// the field `building` names the build, and part of the guard (`guard.lua`), so a
    /// live projector reads it before its next batch.
    pub const REPLAY_LAST: &str = "replay_last";
    /// Written by a rebuild's switch: `<generation> <stream sequence> <stored-at unix
    /// nanoseconds>`, the stream's last sequence when the build's replay began and its
    /// newest stored time then. The replay applied every message at or below that
    /// sequence stored by then to that generation, which holds them: live projectors
    /// leave them out of it when they get them (again) after the switch. A consumer
    /// whose projectors were stopped through the rebuild delivers them past the dedup
    /// horizon, and they counted twice.
    pub const BUILT_THROUGH: &str = "built_through";
    /// The [`LAYOUT`](super::LAYOUT) the current generation was built with.
    pub const LAYOUT: &str = "layout";
    /// The `run_id` of the Redis server the current generation was built on (or first
    /// seen on): a server that restarted and loaded the read model from its files has
    /// another, and the read model lacks what was applied after the files were written.
    pub const REDIS_RUN: &str = "redis_run";
    /// Generations switched away from, or builds abandoned, whose keys are still to be
    /// deleted, separated by spaces. The switch names the one it replaced here, and the
    /// rebuild deletes its keys after a short grace; a rebuild that fails or is stopped
    /// names its own build here, and a rebuild names a build an earlier one left
    /// `building` here as it begins, each deleting its keys at once; one whose process
    /// died first is deleted by a live projector once no rebuild holds the lock. Without it, those keys stayed for good
    /// (device hashes and index keys never expire).
    pub const RETIRED: &str = "retired";
    /// The fields to `HMGET` for [`live_generation`](super::live_generation), in its
    /// argument order.
    pub const LIVE: &[&str] = &[GENERATION, LAYOUT];
}

/// The version of the key layout and encodings described above. A live generation of
/// another layout (or of none, as before layouts were numbered) counts as no read
/// model: the projector rebuilds it from the stream and the query side answers `503`
/// meanwhile, rather than misreading it. Bump it with every incompatible change.
pub const LAYOUT: u64 = 2;

/// The live generation as the meta hash's `generation` and `layout` fields name it:
/// `None` when there is none, or when it is of another layout.
pub fn live_generation(generation: Option<u64>, layout: Option<u64>) -> Option<u64> {
    generation.filter(|_| layout == Some(LAYOUT))
}

/// Held (with an expiry) by whoever is rebuilding.
pub fn rebuild_lock_key(prefix: &str) -> String {
    format!("{prefix}rebuild-lock")
}

/// Where the projectors remember the durable consumer's ack floor as of their last look
/// (`<stream sequence> <stored-at unix nanoseconds>` of the message there, then the
/// consumer's start time as unix nanoseconds, or `all`), to notice a stream that went
/// back below it even across projector restarts, and to make a deleted consumer again
/// where it stood.
pub fn consumer_anchor_key(prefix: &str, consumer: &str) -> String {
    format!("{prefix}consumer-anchor:{consumer}")
}

/// Held (with an expiry) by the projector that recreates the durable consumer after its
/// stream went back below it, so that several projectors make one repair.
pub fn consumer_repair_lock_key(prefix: &str, consumer: &str) -> String {
    format!("{prefix}consumer-repair-lock:{consumer}")
}

/// Matches every key of one generation, for deleting it. The prefix is matched
/// literally, whatever glob characters it holds.
pub fn generation_pattern(prefix: &str, generation: u64) -> String {
    format!("{}g{generation}:*", glob_escaped(prefix))
}

/// `text` with Redis's glob characters escaped, to match it literally in a `SCAN` or
/// `KEYS` pattern.
pub fn glob_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// The devices index of one generation: a small multi-version index, so that a walk
/// through `GET /v1/devices` sees the order as it was when the walk began.
///
/// Each time a device's `last_seen` moves to a later 10 s granule, a new *entry*
/// `<granule ms>:<device>` (scored by the granule) is added to `log` with its creation
/// time in `created`, and the device's previous entry is *retired* (scored by the time
/// it was superseded), both stamped with one value: Redis's `TIME` (ms) when the
/// projector's `index.lua` call runs. `log` is walked highest score first, equal
/// scores by member bytes descending.
///
/// A walk takes its snapshot `t0` from the same clock on its first page (query's
/// `devices_page.lua`) and sees the entries created before `t0` and not retired before
/// `t0` (`created < t0`, no `retired` or `retired >= t0`): every device exactly once,
/// whatever moves happen during the walk. Each page is one read-only script that goes
/// on after the previous page's `(granule, entry)` by that order, whether or not the
/// entry is still there, and looks at a bounded number of entries. Retired entries are
/// deleted once retired [`LISTING_TTL_MS`] ago; a cursor that old (by Redis's clock)
/// is refused, and so is one of a generation no longer live. All four keys share the
/// hash tag `{devices}` (with the untagged meta hash beside them in each script call:
/// see the module's note on Redis Cluster).
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

    /// The granule of an entry (its score in `log`).
    pub fn granule_of(entry: &str) -> Option<i64> {
        entry
            .split_once(':')
            .and_then(|(granule, _)| granule.parse().ok())
    }
}

/// The index orders devices by `last_seen` to this granularity (then by id).
pub const LISTING_GRANULE_MS: i64 = 10_000;

/// How long a walk through the devices list may take (by Redis's clock, from its first
/// page); retired entries live this long.
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
    pub buckets: String,
}

impl DeviceKeys {
    pub fn new(prefix: &str, generation: u64, device_id: &str) -> Self {
        let base = Self::stats_of(prefix, generation, device_id);
        Self {
            applied: format!("{base}:applied"),
            buckets: format!("{base}:buckets"),
            stats: base,
        }
    }

    /// The device hash's key alone (what [`DeviceKeys::new`] names `stats`), for the
    /// reads that need no other key.
    pub fn stats_of(prefix: &str, generation: u64, device_id: &str) -> String {
        format!("{prefix}g{generation}:device:{{{device_id}}}")
    }

    /// The generation and device of a device hash's key, as [`DeviceKeys::stats_of`]
    /// makes it; `None` for any other key (another device key, the index, the meta hash).
    pub fn parse_stats<'k>(prefix: &str, key: &'k str) -> Option<(u64, &'k str)> {
        let (generation, device) = key
            .strip_prefix(prefix)?
            .strip_prefix('g')?
            .split_once(":device:{")?;
        Some((generation.parse().ok()?, device.strip_suffix('}')?))
    }
}

/// Device-level hash fields.
pub mod fields {
    /// The packed [`DeviceHeader`](super::DeviceHeader).
    pub const HEADER: &str = "h";
    /// Prefix of the per-metric fields.
    pub const METRIC_PREFIX: &str = "m:";

    /// The field of one metric's all-time figures.
    pub fn metric(name: &str) -> String {
        format!("{METRIC_PREFIX}{name}")
    }
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
    /// What its bucket fields start with in the buckets hash.
    pub field_tag: char,
}

/// 10 s buckets for the windows up to 1 h, kept 1 h 5 min.
pub const FINE: Resolution = Resolution {
    name: "10s",
    width_ms: 10_000,
    retention_ms: 65 * 60_000,
    field_tag: 'f',
};

/// 5 min buckets for the 24 h window, kept 24 h 15 min.
pub const COARSE: Resolution = Resolution {
    name: "5m",
    width_ms: 300_000,
    retention_ms: 24 * 3_600_000 + 15 * 60_000,
    field_tag: 'c',
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

    /// The field of one metric in one of its buckets.
    pub fn field(&self, bucket: i64, metric: &str) -> String {
        format!("{}{bucket}:{metric}", self.field_tag)
    }

    /// The bucket and metric of one of its fields; `None` for another resolution's
    /// field or a malformed one.
    pub fn parse_field<'a>(&self, field: &'a str) -> Option<(i64, &'a str)> {
        let (bucket, metric) = field.strip_prefix(self.field_tag)?.split_once(':')?;
        Some((bucket.parse().ok()?, metric))
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

/// Doubles packed back to back, little-endian: what `struct.pack('<dd…')` makes.
pub fn pack<const N: usize>(values: [f64; N]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// The doubles of [`pack`]; `None` unless `bytes` holds exactly `N` of them.
fn unpack<const N: usize>(bytes: &[u8]) -> Option<[f64; N]> {
    if bytes.len() != N * 8 {
        return None;
    }
    let mut values = [0.0; N];
    for (value, chunk) in values.iter_mut().zip(bytes.chunks_exact(8)) {
        *value = f64::from_le_bytes(chunk.try_into().ok()?);
    }
    Some(values)
}

/// A whole number kept in a double (a count, a sequence, milliseconds).
fn whole(value: f64) -> i64 {
    value as i64
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

    /// A bucket field's value: count, sum, min, max, packed.
    pub fn to_bytes(&self) -> Vec<u8> {
        pack([self.count as f64, self.sum, self.min, self.max])
    }

    /// The aggregate of [`Aggregate::to_bytes`]; `None` if malformed.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let [count, sum, min, max] = unpack(bytes)?;
        Some(Self {
            count: whole(count).max(0) as u64,
            sum,
            min,
            max,
        })
    }

    /// The aggregate of both sets of readings. The counts come from Redis, so a corrupt
    /// one may be anything up to `i64::MAX`: they saturate rather than overflow.
    pub fn merge(self, other: Self) -> Self {
        Self {
            count: self.count.saturating_add(other.count),
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
#[derive(Debug, Clone, Copy, Default, PartialEq)]
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
    /// The figures of one reading.
    pub fn of(value: f64, recorded_at_ms: i64) -> Self {
        Self {
            count: 1,
            sum: value,
            min: value,
            max: value,
            last: value,
            last_at_ms: recorded_at_ms,
        }
    }

    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The figures of both sets of readings. Commutative up to the rounding of `sum`:
    /// `last` is the value of the latest `last_at`, on a tie the larger value
    /// (`apply.lua` merges the same way).
    pub fn merge(self, other: Self) -> Self {
        let later = other.last_at_ms > self.last_at_ms
            || (other.last_at_ms == self.last_at_ms && other.last > self.last);
        let (last, last_at_ms) = if later {
            (other.last, other.last_at_ms)
        } else {
            (self.last, self.last_at_ms)
        };
        Self {
            count: self.count.saturating_add(other.count),
            sum: self.sum + other.sum,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
            last,
            last_at_ms,
        }
    }

    /// A metric field's value: count, sum, min, max, last, last_at, packed.
    pub fn to_bytes(&self) -> Vec<u8> {
        pack([
            self.count as f64,
            self.sum,
            self.min,
            self.max,
            self.last,
            self.last_at_ms as f64,
        ])
    }

    /// The figures of [`MetricStats::to_bytes`]; `None` if malformed.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let [count, sum, min, max, last, last_at] = unpack(bytes)?;
        Some(Self {
            count: whole(count).max(0) as u64,
            sum,
            min,
            max,
            last,
            last_at_ms: whole(last_at),
        })
    }
}

/// The device hash's header field `h`: its figures that are not per metric, and the
/// script's own schedules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceHeader {
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub sample_count: u64,
    pub as_of_seq: u64,
    pub updated_at_ms: i64,
    /// When the applied set is trimmed to the dedup horizon next.
    pub trim_at_ms: i64,
    /// The oldest 10 s bucket kept when the buckets were last pruned.
    pub pruned_fine: i64,
}

impl DeviceHeader {
    pub fn to_bytes(&self) -> Vec<u8> {
        pack([
            self.first_seen_ms as f64,
            self.last_seen_ms as f64,
            self.sample_count as f64,
            self.as_of_seq as f64,
            self.updated_at_ms as f64,
            self.trim_at_ms as f64,
            self.pruned_fine as f64,
        ])
    }

    /// The header of [`DeviceHeader::to_bytes`]; `None` if malformed.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let [first, last, count, seq, updated, trim_at, pruned] = unpack(bytes)?;
        Some(Self {
            first_seen_ms: whole(first),
            last_seen_ms: whole(last),
            sample_count: whole(count).max(0) as u64,
            as_of_seq: whole(seq).max(0) as u64,
            updated_at_ms: whole(updated),
            trim_at_ms: whole(trim_at),
            pruned_fine: whole(pruned),
        })
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
    /// Reads a device hash as `HGETALL` returns it; `None` without a header (an unknown
    /// device). A metric field that does not decode is skipped rather than trusted.
    pub fn from_hash(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Option<Self> {
        let mut header = None;
        let mut metrics = BTreeMap::new();
        for (field, value) in entries {
            if field == fields::HEADER {
                header = DeviceHeader::from_bytes(&value);
            } else if let Some(name) = field.strip_prefix(fields::METRIC_PREFIX) {
                if let Some(figures) = MetricStats::from_bytes(&value) {
                    metrics.insert(name.to_owned(), figures);
                }
            }
        }
        let header = header?;
        Some(Self {
            first_seen_ms: header.first_seen_ms,
            last_seen_ms: header.last_seen_ms,
            sample_count: header.sample_count,
            updated_at_ms: header.updated_at_ms,
            as_of_seq: header.as_of_seq,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_matched_literally_in_a_pattern() {
        assert_eq!(glob_escaped("t_abc:"), "t_abc:");
        assert_eq!(glob_escaped(r"a*b?[c]\d"), r"a\*b\?\[c\]\\d");
        assert_eq!(generation_pattern("app[1]:", 7), r"app\[1\]:g7:*");
    }

    #[test]
    fn keys_of_one_device_share_a_hash_tag() {
        let keys = DeviceKeys::new("t1:", 7, "sensor-1");
        assert_eq!(keys.stats, "t1:g7:device:{sensor-1}");
        assert_eq!(keys.applied, "t1:g7:device:{sensor-1}:applied");
        assert_eq!(keys.buckets, "t1:g7:device:{sensor-1}:buckets");
        assert_eq!(DeviceKeys::stats_of("t1:", 7, "sensor-1"), keys.stats);
        assert_eq!(
            DeviceKeys::parse_stats("t1:", &keys.stats),
            Some((7, "sensor-1"))
        );
        for other in [
            &keys.applied,
            &keys.buckets,
            "t1:meta",
            "t2:g7:device:{sensor-1}",
        ] {
            assert_eq!(DeviceKeys::parse_stats("t1:", other), None, "{other}");
        }
    }

    #[test]
    fn bucket_fields_name_their_resolution_and_parse_back() {
        assert_eq!(
            FINE.field(176_400_000, "temperature"),
            "f176400000:temperature"
        );
        assert_eq!(COARSE.field(-3, "rh"), "c-3:rh");
        assert_eq!(
            FINE.parse_field("f176400000:temperature"),
            Some((176_400_000, "temperature"))
        );
        assert_eq!(COARSE.parse_field("c-3:rh"), Some((-3, "rh")));
        assert_eq!(COARSE.parse_field("f176400000:temperature"), None);
        assert_eq!(FINE.parse_field("fx:temperature"), None);
        assert_eq!(FINE.parse_field("f12"), None);
        for resolution in RESOLUTIONS {
            assert_eq!(resolution.parse_field(BUCKETS_HASH_TABLE_FIELD), None);
        }
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
    fn bucket_values_pack_and_merge() {
        let bucket = Aggregate::from_bytes(
            &Aggregate {
                count: 2,
                sum: 43.0,
                min: 21.5,
                max: 21.5,
            }
            .to_bytes(),
        )
        .expect("valid");
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
        assert_eq!(Aggregate::from_bytes(&[0; 24]), None);
        assert_eq!(Aggregate::from_bytes(b"2 43 21.5 21.5"), None);
        assert_eq!(Aggregate::merge_all([]), None);
    }

    #[test]
    fn corrupt_counts_from_redis_saturate_instead_of_overflowing() {
        let huge = Aggregate {
            count: 9_000_000_000_000_000_000,
            ..Aggregate::of(1.0)
        };
        let bucket = Aggregate::from_bytes(&huge.to_bytes()).expect("valid");
        let merged = Aggregate::merge_all([bucket, bucket, bucket]).expect("three buckets");
        assert_eq!(merged.count, u64::MAX);
        let figures = MetricStats {
            count: u64::MAX,
            ..MetricStats::of(1.0, 0)
        };
        assert_eq!(figures.merge(figures).count, u64::MAX);
    }

    #[test]
    fn packing_keeps_every_double_exactly() {
        for value in [0.1, -0.0, 1e300, -1e-300, f64::MAX, f64::MIN_POSITIVE, 21.5] {
            let figures = MetricStats::of(value, 1_764_460_800_123);
            assert_eq!(MetricStats::from_bytes(&figures.to_bytes()), Some(figures));
        }
        // The layout the script reads: eight little-endian bytes per number, in order.
        let packed = Aggregate::of(2.5).to_bytes();
        assert_eq!(packed.len(), 32);
        assert_eq!(&packed[..8], 1.0_f64.to_le_bytes());
        assert_eq!(&packed[8..16], 2.5_f64.to_le_bytes());
    }

    #[test]
    fn metric_figures_merge_in_any_order_with_the_latest_reading_last() {
        let early = MetricStats::of(30.0, 1_000);
        let late = MetricStats::of(10.0, 2_000);
        let late_tie = MetricStats::of(20.0, 2_000);
        let one_way = early.merge(late).merge(late_tie);
        let other_way = late_tie.merge(late).merge(early);
        assert_eq!(one_way, other_way);
        assert_eq!(
            one_way,
            MetricStats {
                count: 3,
                sum: 60.0,
                min: 10.0,
                max: 30.0,
                last: 20.0,
                last_at_ms: 2_000,
            }
        );
    }

    #[test]
    fn hash_parses_back_into_stats() {
        let header = DeviceHeader {
            first_seen_ms: 1000,
            last_seen_ms: 2000,
            sample_count: 2,
            as_of_seq: 7,
            updated_at_ms: 3000,
            trim_at_ms: 4000,
            pruned_fine: 5,
        };
        let temperature = MetricStats::of(21.5, 1000).merge(MetricStats::of(21.5, 2000));
        let hash = vec![
            (fields::HEADER.to_owned(), header.to_bytes()),
            (fields::metric("temperature"), temperature.to_bytes()),
            (fields::metric("broken"), b"21.5".to_vec()),
        ];
        let stats = DeviceStats::from_hash(hash).expect("has a header");
        assert_eq!(stats.sample_count, 2);
        assert_eq!(stats.as_of_seq, 7);
        assert_eq!(stats.updated_at_ms, 3000);
        assert_eq!(stats.first_seen_ms, 1000);
        let temperature = &stats.metrics["temperature"];
        assert_eq!(temperature.avg(), Some(21.5));
        assert_eq!(temperature.last_at_ms, 2000);
        assert!(!stats.metrics.contains_key("broken"));
        assert_eq!(DeviceStats::from_hash(Vec::new()), None);
        assert_eq!(DeviceHeader::from_bytes(&header.to_bytes()), Some(header));
    }
}

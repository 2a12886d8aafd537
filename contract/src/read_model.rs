//! The Redis read model: key layout and hash fields.
//!
//! The projector writes these keys (from its Lua script) and the query service reads
//! them; this module is where the two agree. Every key of one device carries the
//! device id as a hash tag (`{sensor-1}`), so a device's keys live in one Redis Cluster
//! slot and one script call can touch all of them.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<prefix>device:{<id>}` | hash | the device's figures, fields below |
//! | `<prefix>device:{<id>}:applied` | sorted set | event ids applied, scored by apply time; trimmed to the dedup horizon |
//!
//! Device fields: `first_seen`, `last_seen`, `updated_at` (ms since the epoch),
//! `sample_count`, `as_of_seq` (highest stream sequence applied). Per metric `<m>`:
//! `m:<m>:count`, `m:<m>:sum`, `m:<m>:min`, `m:<m>:max`, `m:<m>:last`, `m:<m>:last_at`.
//! Metric names cannot hold `:`, so the field names parse back without ambiguity.

use std::collections::BTreeMap;

/// The hash holding one device's figures.
pub fn device_key(prefix: &str, device_id: &str) -> String {
    format!("{prefix}device:{{{device_id}}}")
}

/// The sorted set of event ids already applied to one device.
pub fn applied_key(prefix: &str, device_id: &str) -> String {
    format!("{prefix}device:{{{device_id}}}:applied")
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
        assert_eq!(device_key("t1:", "sensor-1"), "t1:device:{sensor-1}");
        assert_eq!(applied_key("", "sensor-1"), "device:{sensor-1}:applied");
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

//! Latency histograms, status counters and rates: what every load loop reports.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest latency the histograms hold (longer ones are clamped to it): 120 s.
const MAX_MICROS: u64 = 120_000_000;

/// A latency histogram in microseconds (HdrHistogram, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // Constant, valid bounds: construction cannot fail.
        let histogram = Histogram::new_with_bounds(1, MAX_MICROS, 3)
            .expect("1 µs .. 120 s with 3 digits is a valid histogram");
        Self { histogram }
    }

    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(MAX_MICROS);
        self.histogram
            .saturating_record(micros.clamp(1, MAX_MICROS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// `{"count", "p50_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms"}`.
    pub fn summary(&self) -> Value {
        let empty = self.histogram.is_empty();
        json!({
            "count": self.count(),
            "p50_ms": round3(self.quantile_ms(0.50)),
            "p99_ms": round3(self.quantile_ms(0.99)),
            "p999_ms": round3(self.quantile_ms(0.999)),
            "max_ms": if empty { 0.0 } else { round3(self.histogram.max() as f64 / 1000.0) },
            "mean_ms": if empty { 0.0 } else { round3(self.histogram.mean() / 1000.0) },
        })
    }
}

/// Answers counted by status (`"202"`, `"503"`) or failure kind (`"io"`, `"timeout"`).
#[derive(Debug, Clone, Default)]
pub struct Statuses {
    counts: BTreeMap<String, u64>,
}

impl Statuses {
    pub fn add(&mut self, key: &str) {
        self.add_n(key, 1);
    }

    pub fn add_n(&mut self, key: &str, n: u64) {
        if n > 0 {
            *self.counts.entry(key.to_owned()).or_default() += n;
        }
    }

    pub fn merge(&mut self, other: &Statuses) {
        for (key, count) in &other.counts {
            self.add_n(key, *count);
        }
    }

    /// Everything except `ok_key`, as a JSON object.
    pub fn errors_json(&self, ok_key: &str) -> Value {
        let errors: serde_json::Map<String, Value> = self
            .counts
            .iter()
            .filter(|(key, _)| key.as_str() != ok_key)
            .map(|(key, count)| (key.clone(), json!(count)))
            .collect();
        Value::Object(errors)
    }
}

/// `count` per second over `elapsed`; 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        0.0
    } else {
        round1(count as f64 / seconds)
    }
}

pub fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_out_in_milliseconds() {
        let mut latency = Latency::new();
        for micros in 1..=1000u64 {
            latency.record(Duration::from_micros(micros * 10));
        }
        let p50 = latency.quantile_ms(0.5);
        assert!((4.9..=5.1).contains(&p50), "p50 {p50}");
        let p99 = latency.quantile_ms(0.99);
        assert!((9.8..=10.0).contains(&p99), "p99 {p99}");
        assert_eq!(latency.count(), 1000);
    }

    #[test]
    fn merge_adds_counts_and_huge_values_are_clamped() {
        let mut left = Latency::new();
        left.record(Duration::from_millis(1));
        let mut right = Latency::new();
        right.record(Duration::from_secs(10_000));
        left.merge(&right);
        assert_eq!(left.count(), 2);
        assert!(left.quantile_ms(1.0) >= 119_000.0);
        assert_eq!(Latency::new().summary()["p99_ms"], json!(0.0));
    }

    #[test]
    fn statuses_list_only_errors() {
        let mut statuses = Statuses::default();
        statuses.add_n("202", 5);
        statuses.add("503");
        statuses.add_n("io", 0);
        assert_eq!(statuses.errors_json("202"), json!({"503": 1}));
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
    }
}

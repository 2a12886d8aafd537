//! What the load looks like: device ids, idempotency keys and realistic JSON bodies.

use std::fmt::Write as _;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A tiny, fast, deterministic generator (xorshift64*): enough to spread load over
/// devices and vary values, and one per worker so no lock is shared.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..bound` (`bound` ≥ 1).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    /// Uniform in `[low, high)`.
    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        low + unit * (high - low)
    }
}

/// A run id unique enough to keep idempotency keys of two runs apart.
pub fn run_id() -> String {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("{:x}{:x}", nanos as u64, std::process::id())
}

/// `<prefix><n>`: the devices of the load pool are `bench-dev-0 .. bench-dev-<D-1>`.
pub fn device_id(prefix: &str, n: u64) -> String {
    format!("{prefix}{n}")
}

/// Unique per run, worker and request; visible ASCII, well under 128 characters.
pub fn idempotency_key(run: &str, worker: usize, seq: u64) -> String {
    format!("{run}-{worker}-{seq}")
}

/// Now, as RFC 3339 with milliseconds (`2026-11-22T10:15:30.25Z`).
pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    let millis = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    millis.format(&Rfc3339).unwrap_or_default()
}

/// The three metrics a typical environmental sensor sends.
fn write_metrics(out: &mut String, rng: &mut Rng) {
    let _ = write!(
        out,
        r#"{{"temperature":{:.2},"humidity":{:.1},"battery":{:.3}}}"#,
        rng.between(15.0, 30.0),
        rng.between(20.0, 80.0),
        rng.between(3.3, 4.2),
    );
}

/// A `POST /v1/telemetry` body.
pub fn reading_json(device: &str, recorded_at: &str, rng: &mut Rng) -> String {
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        r#"{{"device_id":"{device}","recorded_at":"{recorded_at}","metrics":"#
    );
    write_metrics(&mut out, rng);
    out.push('}');
    out
}

/// A `POST /v1/telemetry/batch` body of `count` readings over the device pool.
pub fn batch_json(
    run: &str,
    worker: usize,
    first_seq: u64,
    count: usize,
    device_prefix: &str,
    devices: u64,
    rng: &mut Rng,
) -> String {
    let recorded_at = now_rfc3339();
    let mut out = String::with_capacity(32 + count * 200);
    out.push_str(r#"{"readings":["#);
    for i in 0..count {
        if i > 0 {
            out.push(',');
        }
        let key = idempotency_key(run, worker, first_seq + i as u64);
        let device = device_id(device_prefix, rng.below(devices));
        let _ = write!(
            out,
            r#"{{"idempotency_key":"{key}","device_id":"{device}","recorded_at":"{recorded_at}","metrics":"#
        );
        write_metrics(&mut out, rng);
        out.push('}');
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::reading::{check_device_id, check_idempotency_key, ReadingBody, TimeBounds};

    fn bounds() -> TimeBounds {
        TimeBounds {
            max_future: time::Duration::minutes(5),
            max_age: time::Duration::days(7),
        }
    }

    #[test]
    fn a_single_body_is_a_valid_reading() {
        let mut rng = Rng::new(7);
        let body = reading_json("bench-dev-42", &now_rfc3339(), &mut rng);
        let parsed: ReadingBody = serde_json::from_str(&body).expect("parses");
        let reading = parsed
            .validate(OffsetDateTime::now_utc(), bounds())
            .expect("valid");
        assert_eq!(reading.metrics.len(), 3);
        assert!(reading.recorded_at.is_some());
    }

    #[test]
    fn a_batch_body_holds_valid_readings_with_distinct_keys() {
        let mut rng = Rng::new(1);
        let body = batch_json("run", 3, 100, 5, "bench-dev-", 10, &mut rng);
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("parses");
        let readings = parsed["readings"].as_array().expect("array");
        assert_eq!(readings.len(), 5);
        let mut keys = std::collections::BTreeSet::new();
        for item in readings {
            let key = item["idempotency_key"].as_str().expect("key");
            assert!(check_idempotency_key(key.as_bytes()).is_ok());
            keys.insert(key.to_owned());
            let mut item = item.clone();
            item.as_object_mut()
                .expect("object")
                .remove("idempotency_key");
            let reading: ReadingBody = serde_json::from_value(item).expect("reading");
            reading
                .validate(OffsetDateTime::now_utc(), bounds())
                .expect("valid");
        }
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn ids_and_keys_follow_the_rules() {
        assert!(check_device_id(&device_id("bench-dev-", 9_999)).is_ok());
        let key = idempotency_key(&run_id(), 255, u64::MAX);
        assert!(check_idempotency_key(key.as_bytes()).is_ok());
    }

    #[test]
    fn rng_stays_in_range_and_varies() {
        let mut rng = Rng::new(0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let n = rng.below(10);
            assert!(n < 10);
            seen.insert(n);
            let x = rng.between(3.3, 4.2);
            assert!((3.3..4.2).contains(&x));
        }
        assert_eq!(seen.len(), 10);
    }
}

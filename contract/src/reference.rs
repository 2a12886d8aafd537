//! The reference model: what the read model must say, as a plain fold over readings.
//!
//! Tests feed the same events to the real projector (through JetStream and Redis) and to
//! this model, then compare. It keeps every reading and recomputes every figure from
//! them, sharing nothing with the projector but the window definitions.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::read_model::{Aggregate, DeviceStats, MetricStats, Window};

/// One reading as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelReading {
    pub event_id: Uuid,
    pub device_id: String,
    pub recorded_at_ms: i64,
    pub metrics: BTreeMap<String, f64>,
}

/// All readings applied so far, each once.
#[derive(Debug, Clone, Default)]
pub struct ReferenceModel {
    readings: BTreeMap<Uuid, ModelReading>,
}

impl ReferenceModel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a reading; applying the same event id again changes nothing.
    pub fn apply(&mut self, reading: ModelReading) {
        self.readings.entry(reading.event_id).or_insert(reading);
    }

    pub fn devices(&self) -> Vec<String> {
        let mut devices: Vec<String> = self
            .readings
            .values()
            .map(|reading| reading.device_id.clone())
            .collect();
        devices.sort();
        devices.dedup();
        devices
    }

    fn of_device<'a>(&'a self, device_id: &'a str) -> impl Iterator<Item = &'a ModelReading> + 'a {
        self.readings
            .values()
            .filter(move |reading| reading.device_id == device_id)
    }

    /// The all-time figures of a device (`updated_at` and `as_of_seq` left at 0).
    pub fn device(&self, device_id: &str) -> Option<DeviceStats> {
        let readings: Vec<&ModelReading> = self.of_device(device_id).collect();
        if readings.is_empty() {
            return None;
        }
        let mut metrics: BTreeMap<String, MetricStats> = BTreeMap::new();
        for reading in &readings {
            for (name, value) in &reading.metrics {
                let at = reading.recorded_at_ms;
                let metric = metrics.entry(name.clone()).or_insert(MetricStats {
                    count: 0,
                    sum: 0.0,
                    min: *value,
                    max: *value,
                    last: *value,
                    last_at_ms: at,
                });
                metric.count += 1;
                metric.sum += value;
                metric.min = metric.min.min(*value);
                metric.max = metric.max.max(*value);
                if (at, *value) > (metric.last_at_ms, metric.last) {
                    metric.last = *value;
                    metric.last_at_ms = at;
                }
            }
        }
        Some(DeviceStats {
            first_seen_ms: readings
                .iter()
                .map(|reading| reading.recorded_at_ms)
                .min()
                .unwrap_or_default(),
            last_seen_ms: readings
                .iter()
                .map(|reading| reading.recorded_at_ms)
                .max()
                .unwrap_or_default(),
            sample_count: readings.len() as u64,
            updated_at_ms: 0,
            as_of_seq: 0,
            metrics,
        })
    }

    /// The aggregate of one metric of one device over a window at `now_ms`.
    pub fn window(
        &self,
        device_id: &str,
        metric: &str,
        window: &Window,
        now_ms: i64,
    ) -> Option<Aggregate> {
        Aggregate::merge_all(
            self.of_device(device_id)
                .filter(|reading| window.contains(reading.recorded_at_ms, now_ms))
                .filter_map(|reading| reading.metrics.get(metric).copied().map(Aggregate::of)),
        )
    }
}

/// Whether two sums of the same numbers, added in different orders, agree.
pub fn sums_agree(left: f64, right: f64) -> bool {
    (left - right).abs() <= 1e-9 * left.abs().max(right.abs()).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_model::WINDOWS;

    fn reading(device: &str, at: i64, value: f64) -> ModelReading {
        ModelReading {
            event_id: Uuid::now_v7(),
            device_id: device.to_owned(),
            recorded_at_ms: at,
            metrics: BTreeMap::from([("t".to_owned(), value)]),
        }
    }

    #[test]
    fn duplicates_count_once_and_last_goes_by_recorded_at() {
        let mut model = ReferenceModel::new();
        let newest = reading("d", 2_000, 5.0);
        model.apply(newest.clone());
        model.apply(newest);
        model.apply(reading("d", 1_000, 9.0));
        let stats = model.device("d").expect("known");
        assert_eq!(stats.sample_count, 2);
        assert_eq!((stats.first_seen_ms, stats.last_seen_ms), (1_000, 2_000));
        let metric = &stats.metrics["t"];
        assert_eq!(
            (metric.last, metric.min, metric.max, metric.sum),
            (5.0, 5.0, 9.0, 14.0)
        );
    }

    #[test]
    fn a_tie_on_recorded_at_keeps_the_larger_value() {
        let mut model = ReferenceModel::new();
        model.apply(reading("d", 1_000, 3.0));
        model.apply(reading("d", 1_000, 4.0));
        model.apply(reading("d", 1_000, 2.0));
        assert_eq!(model.device("d").expect("known").metrics["t"].last, 4.0);
    }

    #[test]
    fn windows_hold_only_recent_readings() {
        let now = 10_000_000_000;
        let mut model = ReferenceModel::new();
        model.apply(reading("d", now - 20_000, 1.0));
        model.apply(reading("d", now - 600_000, 2.0));
        let one_minute = model.window("d", "t", &WINDOWS[0], now).expect("not empty");
        assert_eq!(one_minute.count, 1);
        let hour = model.window("d", "t", &WINDOWS[3], now).expect("not empty");
        assert_eq!((hour.count, hour.min, hour.max), (2, 1.0, 2.0));
        assert_eq!(model.window("d", "missing", &WINDOWS[3], now), None);
    }

    #[test]
    fn sums_agree_within_rounding() {
        assert!(sums_agree(0.1 + 0.2, 0.3));
        assert!(!sums_agree(1.0, 1.001));
    }
}

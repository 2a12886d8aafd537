//! The reference model: what the read model must say, as a plain fold over readings.
//!
//! Tests feed the same events to the real projector (through JetStream and Redis) and to
//! this model, then compare. It keeps every reading and recomputes every figure from
//! them with plain loops. It shares only plain data types with
//! [`read_model`](crate::read_model) (`DeviceStats`, `MetricStats`, `Aggregate` as
//! answers, `Window` as a name to look up): no code. The windows are written out again
//! here from API.md §4 and the README's *Windows* paragraph, with constants of their
//! own ([`WINDOW_RULES`]), so that the bucket and window arithmetic the projector and the
//! query share is checked against the documented rule, not against itself.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::read_model::{Aggregate, DeviceStats, MetricStats, Window};

/// A rolling window as the documents define it: the readings whose `recorded_at` lies
/// in the window's most recent `length_ms / bucket_ms` buckets of `bucket_ms`, the
/// bucket `now` falls in (the current, partial one) included. A bucket is the span of
/// whole multiples of its width from the epoch: `[k × bucket_ms, (k + 1) × bucket_ms)`.
/// So the window's far edge is exact to one bucket, and a reading recorded after the
/// current bucket ends (in the future) is in no window until its bucket comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRule {
    pub name: &'static str,
    pub length_ms: i64,
    pub bucket_ms: i64,
}

const SECOND_MS: i64 = 1_000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;

/// API.md §4: 10 s buckets for the windows up to 1 h, 5 min buckets for 24 h.
pub const WINDOW_RULES: [WindowRule; 5] = [
    WindowRule {
        name: "1m",
        length_ms: MINUTE_MS,
        bucket_ms: 10 * SECOND_MS,
    },
    WindowRule {
        name: "5m",
        length_ms: 5 * MINUTE_MS,
        bucket_ms: 10 * SECOND_MS,
    },
    WindowRule {
        name: "15m",
        length_ms: 15 * MINUTE_MS,
        bucket_ms: 10 * SECOND_MS,
    },
    WindowRule {
        name: "1h",
        length_ms: HOUR_MS,
        bucket_ms: 10 * SECOND_MS,
    },
    WindowRule {
        name: "24h",
        length_ms: 24 * HOUR_MS,
        bucket_ms: 5 * MINUTE_MS,
    },
];

impl WindowRule {
    /// The rule of the window called `name` (`1m` … `24h`), if the documents define one.
    pub fn named(name: &str) -> Option<WindowRule> {
        WINDOW_RULES.into_iter().find(|rule| rule.name == name)
    }

    /// Whether a reading recorded at `at_ms` is in the window at `now_ms`.
    pub fn holds(&self, at_ms: i64, now_ms: i64) -> bool {
        // The current bucket runs from `current_start` to `current_end` (exclusive); the
        // window is it and the buckets before it, `length_ms / bucket_ms` in all.
        let current_start = now_ms - now_ms.rem_euclid(self.bucket_ms);
        let current_end = current_start + self.bucket_ms;
        let window_start = current_end - self.length_ms;
        window_start <= at_ms && at_ms < current_end
    }
}

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

    /// The aggregate of one metric of one device over a window at `now_ms`; only the
    /// window's name is read (see [`ReferenceModel::window_named`]).
    pub fn window(
        &self,
        device_id: &str,
        metric: &str,
        window: &Window,
        now_ms: i64,
    ) -> Option<Aggregate> {
        self.window_named(device_id, metric, window.name, now_ms)
    }

    /// The aggregate of one metric of one device over the window called `name` at
    /// `now_ms` ([`WINDOW_RULES`]); `None` when the window holds none of its readings.
    /// Panics on a window the documents do not define: an oracle that answered "empty"
    /// there would agree with a read model that lost the window.
    pub fn window_named(
        &self,
        device_id: &str,
        metric: &str,
        name: &str,
        now_ms: i64,
    ) -> Option<Aggregate> {
        let rule = WindowRule::named(name)
            .unwrap_or_else(|| panic!("the reference model defines no window {name:?}"));
        let mut figures: Option<Aggregate> = None;
        for reading in self.of_device(device_id) {
            let Some(&value) = reading.metrics.get(metric) else {
                continue;
            };
            if !rule.holds(reading.recorded_at_ms, now_ms) {
                continue;
            }
            match &mut figures {
                None => {
                    figures = Some(Aggregate {
                        count: 1,
                        sum: value,
                        min: value,
                        max: value,
                    })
                }
                Some(figures) => {
                    figures.count += 1;
                    figures.sum += value;
                    if value < figures.min {
                        figures.min = value;
                    }
                    if value > figures.max {
                        figures.max = value;
                    }
                }
            }
        }
        figures
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

    /// 3 s into a 10 s bucket and into a 5 min bucket: the current buckets began at
    /// 1_800_000_000_000 and end at 1_800_000_010_000 (10 s) and 1_800_000_300_000 (5 min).
    const NOW: i64 = 1_800_000_003_000;

    /// Which of `instants` the model counts in the window called `name` at [`NOW`], one
    /// reading (its value the instant's index) at each.
    fn counted(name: &str, instants: &[i64]) -> Vec<usize> {
        instants
            .iter()
            .enumerate()
            .filter(|(_, at)| {
                let mut model = ReferenceModel::new();
                model.apply(reading("d", **at, 1.0));
                model.window_named("d", "t", name, NOW).is_some()
            })
            .map(|(index, _)| index)
            .collect()
    }

    #[test]
    fn a_window_is_its_most_recent_buckets_the_current_partial_one_included() {
        // 1m: six 10 s buckets, from 1_799_999_950_000 (53 s before NOW) to the end of
        // the current bucket (7 s after NOW), that end excluded.
        let one_minute = [
            1_799_999_949_999,
            1_799_999_950_000,
            NOW,
            1_800_000_009_999,
            1_800_000_010_000,
        ];
        assert_eq!(counted("1m", &one_minute), [1, 2, 3]);
        // 1h: 360 buckets, from 3_593 s before NOW.
        let hour = [1_799_996_409_999, 1_799_996_410_000];
        assert_eq!(counted("1h", &hour), [1]);
        // 24h: 288 five-minute buckets, from 1_799_913_900_000 (86_103 s before NOW) to
        // 1_800_000_300_000 (297 s after NOW), that end excluded.
        let day = [
            1_799_913_899_999,
            1_799_913_900_000,
            1_800_000_299_999,
            1_800_000_300_000,
        ];
        assert_eq!(counted("24h", &day), [1, 2]);
    }

    #[test]
    fn a_reading_dated_ahead_is_in_no_window_until_its_bucket_comes() {
        let ahead = NOW + 12_000;
        let mut model = ReferenceModel::new();
        model.apply(reading("d", ahead, 7.0));
        for name in ["1m", "5m", "15m", "1h"] {
            assert_eq!(model.window_named("d", "t", name, NOW), None, "{name}");
        }
        // Its 10 s bucket begins at 1_800_000_010_000.
        let counted_at = |now: i64| model.window_named("d", "t", "1m", now).map(|a| a.count);
        assert_eq!(counted_at(1_800_000_009_999), None);
        assert_eq!(counted_at(1_800_000_010_000), Some(1));
        // It is in the 5 min bucket of NOW already.
        assert_eq!(
            model.window_named("d", "t", "24h", NOW).map(|a| a.count),
            Some(1)
        );
        // And it leaves the 1m window when its bucket is six buckets old.
        assert_eq!(counted_at(1_800_000_069_999), Some(1));
        assert_eq!(counted_at(1_800_000_070_000), None);
    }

    #[test]
    fn a_window_sums_counts_and_bounds_only_its_own_readings_of_the_metric() {
        let mut model = ReferenceModel::new();
        for (age, value) in [(1_000, -2.5), (20_000, 4.0), (59_000, 1.5), (70_000, 100.0)] {
            model.apply(reading("d", NOW - age, value));
        }
        model.apply(reading("other", NOW, -50.0));
        let mut humidity = reading("d", NOW, 33.0);
        humidity.metrics = BTreeMap::from([("rh".to_owned(), 33.0)]);
        model.apply(humidity);
        // 1m at NOW reaches back 53 s: the 59 s and 70 s old readings are out.
        assert_eq!(
            model.window_named("d", "t", "1m", NOW),
            Some(Aggregate {
                count: 2,
                sum: 1.5,
                min: -2.5,
                max: 4.0
            })
        );
        assert_eq!(
            model.window_named("d", "t", "5m", NOW),
            Some(Aggregate {
                count: 4,
                sum: 103.0,
                min: -2.5,
                max: 100.0
            })
        );
        assert_eq!(model.window_named("d", "missing", "5m", NOW), None);
    }

    #[test]
    #[should_panic(expected = "defines no window \"2h\"")]
    fn a_window_the_documents_do_not_define_is_no_empty_answer() {
        ReferenceModel::new().window_named("d", "t", "2h", NOW);
    }

    #[test]
    fn every_window_of_the_read_model_has_a_rule_here() {
        for window in WINDOWS {
            assert!(WindowRule::named(window.name).is_some(), "{}", window.name);
        }
        assert_eq!(WINDOWS.len(), WINDOW_RULES.len());
    }

    proptest::proptest! {
        /// `read_model`'s bucket arithmetic, which the projector and the query share,
        /// against the documented rule, at instants on and around every window's edges
        /// and a reading's bucket boundaries.
        #[test]
        fn the_read_models_windows_hold_what_the_documented_rule_holds(
            now in 0i64..4_000_000_000_000,
            rule in proptest::sample::select(WINDOW_RULES.to_vec()),
            steps in -2i64..=2,
            nudge in proptest::prop_oneof![-1i64..=1, 0..300_000i64],
            ahead in proptest::bool::ANY,
        ) {
            let window = WINDOWS
                .iter()
                .find(|window| window.name == rule.name)
                .expect("every rule is a window of the read model");
            let current_start = now - now.rem_euclid(rule.bucket_ms);
            let edge = if ahead {
                current_start + rule.bucket_ms
            } else {
                current_start + rule.bucket_ms - rule.length_ms
            };
            let at = edge + steps * rule.bucket_ms + nudge;
            proptest::prop_assert_eq!(
                window.contains(at, now),
                rule.holds(at, now),
                "{} at {} now {}",
                rule.name,
                at,
                now
            );
        }
    }

    #[test]
    fn sums_agree_within_rounding() {
        assert!(sums_agree(0.1 + 0.2, 0.3));
        assert!(!sums_agree(1.0, 1.001));
    }
}

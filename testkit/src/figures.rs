//! The read model's figures of a device against the reference model's.

use contract::read_model::DeviceStats;
use contract::reference::sums_agree;

/// How two sums of the same numbers must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sums {
    /// To the bit. For values whose every partial sum is exact in binary (multiples of
    /// 1/4, small enough), where the order of addition, which differs between the
    /// projector and the reference fold, cannot matter.
    Exact,
    /// Within rounding ([`sums_agree`]), for any values.
    WithinRounding,
}

impl Sums {
    /// Whether `left` and `right` agree this way.
    pub fn agree(self, left: f64, right: f64) -> bool {
        match self {
            Sums::Exact => left == right,
            Sums::WithinRounding => sums_agree(left, right),
        }
    }
}

/// Asserts that `actual`, the read model's figures of `device`, are `expected`'s: the
/// sample count, first and last seen, the metric names, and every metric's count, sum,
/// min, max, last value and its time. Windows and bookkeeping (`as_of_seq`,
/// `updated_at`) are the caller's to compare.
pub fn assert_same_figures(device: &str, actual: &DeviceStats, expected: &DeviceStats, sums: Sums) {
    assert_eq!(
        actual.sample_count, expected.sample_count,
        "{device}: sample_count"
    );
    assert_eq!(
        actual.first_seen_ms, expected.first_seen_ms,
        "{device}: first_seen"
    );
    assert_eq!(
        actual.last_seen_ms, expected.last_seen_ms,
        "{device}: last_seen"
    );
    assert_eq!(
        actual.metrics.keys().collect::<Vec<_>>(),
        expected.metrics.keys().collect::<Vec<_>>(),
        "{device}: metric names"
    );
    for (name, want) in &expected.metrics {
        let got = &actual.metrics[name];
        assert_eq!(got.count, want.count, "{device} {name}: count");
        assert!(
            sums.agree(got.sum, want.sum),
            "{device} {name}: sum {} != {}",
            got.sum,
            want.sum
        );
        assert_eq!(got.min, want.min, "{device} {name}: min");
        assert_eq!(got.max, want.max, "{device} {name}: max");
        assert_eq!(got.last, want.last, "{device} {name}: last");
        assert_eq!(got.last_at_ms, want.last_at_ms, "{device} {name}: last_at");
    }
}

#[cfg(test)]
mod tests {
    use contract::read_model::{DeviceStats, MetricStats};

    use super::{assert_same_figures, Sums};

    /// A device with one metric whose sum is `sum`.
    fn device(sum: f64) -> DeviceStats {
        let mut stats = DeviceStats {
            first_seen_ms: 1_000,
            last_seen_ms: 2_000,
            sample_count: 2,
            ..DeviceStats::default()
        };
        let figures = MetricStats {
            count: 2,
            sum,
            min: 0.1,
            max: 0.2,
            last: 0.2,
            last_at_ms: 2_000,
        };
        stats.metrics.insert("temperature".to_owned(), figures);
        stats
    }

    #[test]
    fn sums_added_in_another_order_agree_within_rounding() {
        assert_same_figures("d", &device(0.1 + 0.2), &device(0.3), Sums::WithinRounding);
    }

    #[test]
    #[should_panic(expected = "d temperature: sum")]
    fn sums_added_in_another_order_are_not_exact() {
        assert_same_figures("d", &device(0.1 + 0.2), &device(0.3), Sums::Exact);
    }

    #[test]
    #[should_panic(expected = "d temperature: sum")]
    fn a_sum_off_by_more_than_rounding_fails() {
        assert_same_figures("d", &device(0.3001), &device(0.3), Sums::WithinRounding);
    }

    #[test]
    #[should_panic(expected = "d: metric names")]
    fn a_missing_metric_fails() {
        let mut actual = device(0.3);
        actual.metrics.clear();
        assert_same_figures("d", &actual, &device(0.3), Sums::Exact);
    }
}

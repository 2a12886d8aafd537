//! How busy the whole box was while a load loop ran, from the `cpu` line of
//! `/proc/stat`: every process counts, the load generator's own work included. The
//! report shows it with the CPU per reading under the points where it tells whether the
//! box was out of CPU or waiting (PERFORMANCE.md *How the bench measures*), and
//! `loadgen busy` prints it for `scripts/bench`, which waits for a quiet box.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The box's CPU time counters at one moment, in clock ticks, all cores together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    busy: u64,
    total: u64,
    cores: usize,
}

impl Sample {
    /// Now, or `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From the text of `/proc/stat`: the first eight fields of its `cpu` line (user,
    /// nice, system, idle, iowait, irq, softirq, steal; guest time is inside user and
    /// nice already), busy being all but idle and iowait; one `cpuN` line per core.
    fn parse(stat: &str) -> Option<Self> {
        let mut lines = stat.lines();
        let mut fields = lines.next()?.split_ascii_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks = fields
            .take(8)
            .map(str::parse::<u64>)
            .collect::<Result<Vec<u64>, _>>()
            .ok()?;
        if ticks.len() < 5 {
            return None;
        }
        let total: u64 = ticks.iter().sum();
        let idle = ticks[3] + ticks[4];
        let cores = lines
            .map_while(|line| line.strip_prefix("cpu"))
            .filter(|core| core.starts_with(|c: char| c.is_ascii_digit()))
            .count();
        Some(Self {
            busy: total - idle,
            total,
            cores: cores.max(1),
        })
    }

    /// What the box did from `earlier` to this sample, `elapsed` apart.
    pub fn since(&self, earlier: &Sample, elapsed: Duration) -> Option<Usage> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        if total == 0 {
            return None;
        }
        let busy_share = busy as f64 / total as f64;
        Some(Usage {
            busy_percent: 100.0 * busy_share,
            cpu_seconds: busy_share * self.cores as f64 * elapsed.as_secs_f64(),
        })
    }
}

/// A span of time being measured: the counters and the clock at its start, so that
/// every caller pairs them the same way.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    start: Option<Sample>,
    started: Instant,
}

impl Span {
    /// Starts measuring now.
    pub fn start() -> Self {
        Self {
            start: Sample::now(),
            started: Instant::now(),
        }
    }

    /// What the box did from the start until now; `None` where `/proc/stat` cannot be
    /// read or did not move.
    pub fn usage(&self) -> Option<Usage> {
        Sample::now()?.since(self.start.as_ref()?, self.started.elapsed())
    }

    /// [`Span::usage`] as a load point's JSON carries it (`null` without one).
    pub fn to_json(self) -> Value {
        self.usage().map_or(Value::Null, Usage::to_json)
    }
}

/// How busy the box was over a span: its share of all cores' time, and that share as
/// CPU seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub busy_percent: f64,
    pub cpu_seconds: f64,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "busy_percent": (self.busy_percent * 10.0).round() / 10.0,
            "cpu_seconds": (self.cpu_seconds * 1000.0).round() / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 50 800 40 3 2 0 7 0\n\
                        cpu0 50 2 25 400 20 2 1 0 3 0\n\
                        cpu1 50 3 25 400 20 1 1 0 4 0\n\
                        intr 12345 0 0\n";

    #[test]
    fn busy_is_everything_but_idle_and_iowait_over_every_core() {
        let sample = Sample::parse(STAT).expect("a well-formed /proc/stat");
        assert_eq!(
            sample,
            Sample {
                busy: 160,
                total: 1000,
                cores: 2
            }
        );
    }

    #[test]
    fn usage_is_the_busy_share_of_all_cores_over_the_span() {
        let before = Sample {
            busy: 1_000,
            total: 5_000,
            cores: 2,
        };
        let after = Sample {
            busy: 1_750,
            total: 6_000,
            cores: 2,
        };
        let usage = after
            .since(&before, Duration::from_secs(5))
            .expect("counters moved forward");
        assert_eq!(usage.busy_percent, 75.0);
        assert_eq!(usage.cpu_seconds, 7.5);
        assert_eq!(
            usage.to_json(),
            json!({"busy_percent": 75.0, "cpu_seconds": 7.5})
        );
    }

    #[test]
    fn no_usage_without_time_passing_or_with_counters_going_back() {
        let sample = Sample::parse(STAT).expect("a well-formed /proc/stat");
        assert_eq!(sample.since(&sample, Duration::from_secs(1)), None);
        let later = Sample {
            busy: 100,
            total: 2_000,
            cores: 2,
        };
        assert_eq!(later.since(&sample, Duration::from_secs(1)), None);
    }

    #[test]
    fn text_that_is_not_proc_stat_gives_no_sample() {
        for text in ["", "intr 1 2 3\n", "cpu  1 2 x 4 5\n", "cpu  1 2 3\n"] {
            assert_eq!(Sample::parse(text), None, "{text:?}");
        }
    }
}

//! How busy the whole box was while a load loop ran, from the `cpu` line of
//! `/proc/stat`: every process counts, the load generator's own work included. The
//! report shows it with the CPU per reading under the points where it tells whether the
//! box was out of CPU or waiting (PERFORMANCE.md *How the bench measures*), and
//! `loadgen busy` prints it for `scripts/bench`, which waits for a quiet box.
//!
//! It also splits that time by process, from each process's `/proc/<pid>/stat`, into
//! the servers and the pipeline's own processes (all PostgreSQL backends together), and
//! the time a shared host's hypervisor stole, so that every run says where the box's
//! CPU went.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A process's share of the box over `seconds` (`percent` of one core, as
/// `processes_percent_of_a_core` records it), as its CPU time per unit of work done in
/// that span (readings, events), in µs.
pub fn micros_per_unit(percent: f64, seconds: f64, units: f64) -> f64 {
    percent / 100.0 * seconds * 1e6 / units
}

/// The box's CPU time counters at one moment, in clock ticks, all cores together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    busy: u64,
    /// Part of `busy`: time the hypervisor ran another guest while this one was ready.
    steal: u64,
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
    /// nice already), busy being all but idle and iowait, steal included (a box whose
    /// neighbours take its cores is not free to do more); one `cpuN` line per core.
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
            steal: ticks.get(7).copied().unwrap_or(0),
            total,
            cores: cores.max(1),
        })
    }

    /// The ticks that passed from `earlier` to this sample, as a sample of their own;
    /// `None` when none passed or a counter went back.
    fn minus(&self, earlier: &Sample) -> Option<Sample> {
        Some(Sample {
            busy: self.busy.checked_sub(earlier.busy)?,
            steal: self.steal.checked_sub(earlier.steal)?,
            total: self
                .total
                .checked_sub(earlier.total)
                .filter(|total| *total > 0)?,
            cores: self.cores,
        })
    }

    /// How busy the box was over a span of `elapsed` in which these ticks passed
    /// ([`Sample::minus`]), not yet split by process.
    fn over(&self, elapsed: Duration) -> Usage {
        let busy_share = self.busy as f64 / self.total.max(1) as f64;
        Usage {
            busy_percent: 100.0 * busy_share,
            cpu_seconds: busy_share * self.cores as f64 * elapsed.as_secs_f64(),
            seconds: elapsed.as_secs_f64(),
            processes: BTreeMap::new(),
        }
    }
}

/// The processes the split names, by the command name (`comm`) the kernel gives them,
/// and the name each counts under; every other process counts as `other`.
const NAMED: &[(&str, &str)] = &[
    ("postgres", "PostgreSQL"),
    ("redis-server", "Redis"),
    ("nats-server", "NATS"),
    ("ingest", "ingest"),
    ("relay", "relay"),
    ("projector", "projector"),
    ("query", "query"),
    ("loadgen", "loadgen"),
    ("pgbench", "pgbench"),
];

/// What the split calls the box's busy time that no named process accounts for: other
/// processes, the kernel's own threads and interrupts, processes that ended meanwhile.
const OTHER: &str = "other";

/// What the split calls the busy time the hypervisor gave to other guests while this
/// one had work (`/proc/stat`'s steal): on a shared host it is neither the pipeline's
/// nor the box's own, and it comes and goes with the neighbours.
const STEAL: &str = "steal";

/// The CPU time (user and system, in clock ticks) of each process now, by pid, with
/// the name it counts under; empty where `/proc` cannot be read.
fn processes_now() -> HashMap<u32, (&'static str, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (command, ticks) = parse_process_stat(&stat)?;
            Some((pid, (counts_as(command), ticks)))
        })
        .collect()
}

/// The command name and CPU ticks (utime + stime, fields 14 and 15) of a
/// `/proc/<pid>/stat`; the name, in parentheses, may itself hold spaces and parentheses.
fn parse_process_stat(stat: &str) -> Option<(&str, u64)> {
    let command = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_ascii_whitespace();
    let user: u64 = fields.nth(11)?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((command, user + system))
}

fn counts_as(command: &str) -> &'static str {
    NAMED
        .iter()
        .find(|(name, _)| *name == command)
        .map_or(OTHER, |(_, counts_as)| counts_as)
}

/// Each name's CPU time from `before` to `after` (a process new since counts whole),
/// as a percentage of one core over a span in which the `/proc/stat` counters moved
/// by `moved` (the same clock ticks, [`Sample::minus`]); the busy ticks the hypervisor
/// stole count as [`STEAL`], and what the rest holds beyond the named processes as
/// [`OTHER`].
fn split(
    before: &HashMap<u32, (&'static str, u64)>,
    after: &HashMap<u32, (&'static str, u64)>,
    moved: &Sample,
) -> BTreeMap<&'static str, f64> {
    let Sample {
        busy,
        steal,
        total,
        cores,
    } = *moved;
    let mut ticks: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (pid, (name, now)) in after {
        let earlier = before.get(pid).map_or(0, |(_, ticks)| *ticks);
        *ticks.entry(name).or_default() += now.saturating_sub(earlier);
    }
    let named: u64 = ticks
        .iter()
        .filter(|(name, _)| **name != OTHER)
        .map(|(_, ticks)| ticks)
        .sum();
    ticks.insert(STEAL, steal);
    ticks.insert(OTHER, busy.saturating_sub(steal).saturating_sub(named));
    let per_core = total as f64 / cores.max(1) as f64;
    ticks
        .into_iter()
        .filter(|(_, ticks)| *ticks > 0)
        .map(|(name, ticks)| (name, 100.0 * ticks as f64 / per_core))
        .collect()
}

/// A span of time being measured: the counters and the clock at its start, so that
/// every caller pairs them the same way.
#[derive(Debug, Clone)]
pub struct Span {
    start: Option<Sample>,
    processes: HashMap<u32, (&'static str, u64)>,
    started: Instant,
}

impl Span {
    /// Starts measuring now.
    pub fn start() -> Self {
        Self {
            start: Sample::now(),
            processes: processes_now(),
            started: Instant::now(),
        }
    }

    /// What the box did from the start until now; `None` where `/proc/stat` cannot be
    /// read or did not move.
    pub fn usage(&self) -> Option<Usage> {
        let processes = processes_now();
        let moved = Sample::now()?.minus(self.start.as_ref()?)?;
        let mut usage = moved.over(self.started.elapsed());
        usage.processes = split(&self.processes, &processes, &moved);
        Some(usage)
    }

    /// [`Span::usage`] as a load point's JSON carries it (`null` without one).
    pub fn to_json(&self) -> Value {
        self.usage().as_ref().map_or(Value::Null, Usage::to_json)
    }
}

/// How busy the box was over a span: its share of all cores' time, that share as CPU
/// seconds, the span's length, and how it splits by process (percent of one core each,
/// so a process's CPU seconds are its percent of `seconds`).
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub busy_percent: f64,
    pub cpu_seconds: f64,
    pub seconds: f64,
    pub processes: BTreeMap<&'static str, f64>,
}

impl Usage {
    pub fn to_json(&self) -> Value {
        let processes: serde_json::Map<String, Value> = self
            .processes
            .iter()
            .map(|(name, percent)| ((*name).to_owned(), json!((percent * 10.0).round() / 10.0)))
            .collect();
        json!({
            "busy_percent": (self.busy_percent * 10.0).round() / 10.0,
            "cpu_seconds": (self.cpu_seconds * 1000.0).round() / 1000.0,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "processes_percent_of_a_core": processes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample of a 2-core box: busy (steal included), steal and total ticks.
    fn two_cores(busy: u64, steal: u64, total: u64) -> Sample {
        Sample {
            busy,
            steal,
            total,
            cores: 2,
        }
    }

    const STAT: &str = "cpu  100 5 50 800 40 3 2 6 7 0\n\
                        cpu0 50 2 25 400 20 2 1 3 3 0\n\
                        cpu1 50 3 25 400 20 1 1 3 4 0\n\
                        intr 12345 0 0\n";

    #[test]
    fn busy_is_everything_but_idle_and_iowait_over_every_core() {
        let sample = Sample::parse(STAT).expect("a well-formed /proc/stat");
        assert_eq!(sample, two_cores(166, 6, 1006));
    }

    #[test]
    fn usage_is_the_busy_share_of_all_cores_over_the_span() {
        let before = two_cores(1_000, 0, 5_000);
        let after = two_cores(1_750, 0, 6_000);
        let usage = after
            .minus(&before)
            .expect("counters moved forward")
            .over(Duration::from_secs(5));
        assert_eq!(usage.busy_percent, 75.0);
        assert_eq!(usage.cpu_seconds, 7.5);
        assert_eq!(
            usage.to_json(),
            json!({"busy_percent": 75.0, "cpu_seconds": 7.5, "seconds": 5.0, "processes_percent_of_a_core": {}})
        );
    }

    #[test]
    fn no_usage_without_time_passing_or_with_counters_going_back() {
        let sample = Sample::parse(STAT).expect("a well-formed /proc/stat");
        assert_eq!(sample.minus(&sample), None);
        let later = two_cores(100, 0, 2_000);
        assert_eq!(later.minus(&sample), None);
    }

    #[test]
    fn text_that_is_not_proc_stat_gives_no_sample() {
        for text in ["", "intr 1 2 3\n", "cpu  1 2 x 4 5\n", "cpu  1 2 3\n"] {
            assert_eq!(Sample::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_process_stat_gives_its_name_and_user_plus_system_ticks() {
        let stat = "4242 (redis-server) S 1 4242 4242 0 -1 4194560 120 0 0 0 1500 320 0 0 20 0 5 0 99 0 0\n";
        assert_eq!(parse_process_stat(stat), Some(("redis-server", 1820)));
        let odd = "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0 5 0 0\n";
        assert_eq!(parse_process_stat(odd), Some(("a) b (c", 33)));
        for text in ["", "7 (short) R 1 2 3\n", "7 no parentheses 1 2 3"] {
            assert_eq!(parse_process_stat(text), None, "{text:?}");
        }
    }

    #[test]
    fn processes_count_under_their_names_steal_as_steal_and_the_rest_as_other() {
        assert_eq!(counts_as("postgres"), "PostgreSQL");
        assert_eq!(counts_as("redis-server"), "Redis");
        assert_eq!(counts_as("bash"), OTHER);
        let before = HashMap::from([
            (10, ("PostgreSQL", 1_000)),
            (11, ("PostgreSQL", 500)),
            (20, ("Redis", 300)),
            (30, ("ingest", 50)),
            (40, (OTHER, 10)),
        ]);
        // Over the span: one backend ended, one began; Redis used 200 ticks, ingest
        // none; 2 cores, 1,000 ticks in all of which 800 busy, 100 of them stolen by the
        // hypervisor.
        let after = HashMap::from([
            (10, ("PostgreSQL", 1_250)),
            (12, ("PostgreSQL", 50)),
            (20, ("Redis", 500)),
            (30, ("ingest", 50)),
            (40, (OTHER, 40)),
        ]);
        let moved = two_cores(2_800, 150, 10_000)
            .minus(&two_cores(2_000, 50, 9_000))
            .expect("counters moved forward");
        let split = split(&before, &after, &moved);
        assert_eq!(
            split,
            BTreeMap::from([
                ("PostgreSQL", 60.0),
                ("Redis", 40.0),
                (STEAL, 20.0),
                (OTHER, 40.0)
            ])
        );
        let busy_percent_of_a_core = 2.0 * 800.0 / 1_000.0 * 100.0;
        assert_eq!(split.values().sum::<f64>(), busy_percent_of_a_core);
    }
}

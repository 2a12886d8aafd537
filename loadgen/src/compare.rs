//! The table of `scripts/ab`: two settings, A and B, measured in alternating pairs of
//! closed-loop load points, side by side.
//!
//! Input: a directory of `loadgen ingest` (or `static`, `e2e`, `backlog`) results named
//! `<pair>-<position>-<arm>.json`: `1-1-a.json` and `1-2-b.json` are pair 1 with A run
//! first, `2-1-b.json` and `2-2-a.json` pair 2 with B first. A pair with either run
//! missing is left out. With the whole pipeline running, `1-1-a.drain.json` is the
//! `loadgen watch --until-empty` that followed the load until the relay and projector
//! had caught up: its seconds are shown, and the box's CPU while it ran counts in the
//! run's CPU per reading (the work an arm leaves behind is still its work).
//!
//! A `/stats` GET point (`loadgen query`, `loadgen static --stats`) carries no readings,
//! and its rate here would be 0: the table is not for reads.
//!
//! A box that is shared and drifts makes one run of each worth little; pairs that flip
//! their order and the medians over them are the evidence.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::box_cpu;
use crate::report::{median, table, thousands, Results};

/// What one run of an arm measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Readings a second (a load point or the end-to-end point), or events a second
    /// (a drain).
    pub rate: f64,
    /// Latency of the answers, or of the readings becoming visible in `/stats` for the
    /// end-to-end point.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub busy_percent: Option<f64>,
    /// The box's CPU per reading or event, microseconds (the drain after a load
    /// included).
    pub cpu_us: Option<f64>,
    /// The same CPU per reading or event split by process (loadgen's names:
    /// `PostgreSQL`, `Redis`, `ingest`, ..., `other`), where loadgen split it.
    pub cpu_us_by_process: BTreeMap<String, f64>,
    /// Seconds from the end of the load until the backlog was drained.
    pub drain_seconds: Option<f64>,
    /// Answers that were not the expected status.
    pub errors: u64,
    /// The rate was set, not measured (the end-to-end point posts at a fixed rate).
    pub fixed_rate: bool,
}

impl Run {
    fn of(results: &Results, file: &str) -> Option<Self> {
        let result = results.get(file)?;
        // A load point counts readings, the end-to-end point (`loadgen e2e`) the ones
        // accepted, a drain (`loadgen backlog`) its backlog's events.
        let first_of = |names: [&str; 3]| names.into_iter().find_map(|name| result.get(name));
        let rate = first_of(["readings_per_s", "accepted_per_s", "events_per_s"])?.as_f64()?;
        let count = first_of(["readings", "accepted", "backlog"]).and_then(Value::as_f64);
        let latency = result
            .get("latency")
            .or_else(|| result.get("visible_latency"));
        let quantile = |name: &str| latency.and_then(|l| l.get(name)?.as_f64());
        let drain = results.get(&format!("{file}.drain"));
        let counted = count.filter(|count| *count > 0.0);
        // The point and the drain after it, if any, each with the box's CPU over the span
        // loadgen measured it in (not the point's own seconds: a drain's clock starts
        // later): the CPU seconds in all, and each process's share of a core as CPU per
        // reading.
        let mut cpu_seconds = Some(0.0);
        let mut cpu_us_by_process: BTreeMap<String, f64> = BTreeMap::new();
        for part in [Some(result), drain].into_iter().flatten() {
            // A drain that found the backlog empty at once ends within a tick of
            // `/proc/stat`, so it has no figure: it cost nothing measurable.
            let instant = part.get("seconds").and_then(Value::as_f64) == Some(0.0);
            let part_cpu_seconds = part
                .pointer("/box_cpu/cpu_seconds")
                .and_then(Value::as_f64)
                .or(instant.then_some(0.0));
            cpu_seconds = cpu_seconds
                .zip(part_cpu_seconds)
                .map(|(sum, cpu)| sum + cpu);
            let seconds = part.pointer("/box_cpu/seconds").and_then(Value::as_f64);
            let split = part
                .pointer("/box_cpu/processes_percent_of_a_core")
                .and_then(Value::as_object);
            let (Some(seconds), Some(split), Some(count)) = (seconds, split, counted) else {
                continue;
            };
            for (name, percent) in split {
                if let Some(percent) = percent.as_f64() {
                    *cpu_us_by_process.entry(name.clone()).or_default() +=
                        box_cpu::micros_per_unit(percent, seconds, count);
                }
            }
        }
        let cpu_us = cpu_seconds
            .zip(counted)
            .map(|(cpu_seconds, count)| cpu_seconds * 1e6 / count);
        let errors = result
            .get("errors")
            .and_then(|errors| errors.as_object())
            .map_or(0, |counts| counts.values().filter_map(|n| n.as_u64()).sum());
        Some(Self {
            rate,
            p50_ms: quantile("p50_ms"),
            p99_ms: quantile("p99_ms"),
            busy_percent: result
                .pointer("/box_cpu/busy_percent")
                .and_then(|v| v.as_f64()),
            cpu_us,
            cpu_us_by_process,
            drain_seconds: drain.and_then(|drain| drain.get("seconds")?.as_f64()),
            errors,
            fixed_rate: result.get("target_rate").is_some(),
        })
    }
}

/// One pair: both arms' runs and which ran first.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub number: u32,
    pub b_first: bool,
    pub a: Run,
    pub b: Run,
}

/// `(pair, position, arm)` of a stem like `3-2-a`; `None` for any other name.
fn parse_stem(stem: &str) -> Option<(u32, u8, char)> {
    let mut parts = stem.split('-');
    let pair = parts.next()?.parse().ok()?;
    let position = parts.next()?.parse().ok().filter(|p| *p == 1 || *p == 2)?;
    let arm = match parts.next()? {
        "a" => 'a',
        "b" => 'b',
        _ => return None,
    };
    parts.next().is_none().then_some((pair, position, arm))
}

/// The complete pairs in `results`, in pair order.
pub fn pairs(results: &Results) -> Vec<Pair> {
    // pair -> arm -> (position, file)
    let mut found: BTreeMap<u32, BTreeMap<char, (u8, &str)>> = BTreeMap::new();
    for stem in results.keys() {
        if let Some((pair, position, arm)) = parse_stem(stem) {
            found
                .entry(pair)
                .or_default()
                .insert(arm, (position, stem.as_str()));
        }
    }
    found
        .into_iter()
        .filter_map(|(number, arms)| {
            let &(a_position, a_file) = arms.get(&'a')?;
            let &(b_position, b_file) = arms.get(&'b')?;
            if a_position == b_position {
                return None;
            }
            Some(Pair {
                number,
                b_first: b_position < a_position,
                a: Run::of(results, a_file)?,
                b: Run::of(results, b_file)?,
            })
        })
        .collect()
}

/// What the pairs say, by the medians and pair by pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub pairs: usize,
    pub median_a: f64,
    pub median_b: f64,
    /// The median of the pairs' B/A rate ratios.
    pub median_ratio: f64,
    /// The same over the pairs A ran first in, and over those B ran first in: a gap
    /// between the two is what running first or second does by itself, which the
    /// alternation spreads over both arms.
    pub median_ratio_by_order: (Option<f64>, Option<f64>),
    /// Pairs in which B made more readings a second than A.
    pub b_faster: usize,
    /// Pairs (with both CPU figures) in which a reading cost the box less CPU under B,
    /// out of how many had both.
    pub b_cheaper: (usize, usize),
    pub median_cpu_us: (Option<f64>, Option<f64>),
    /// Per process, each arm's median CPU per reading or event over the runs loadgen
    /// split (a process missing from such a run counts as 0 there), largest first.
    pub median_cpu_us_by_process: Vec<(String, Option<f64>, Option<f64>)>,
    pub median_p50_ms: (Option<f64>, Option<f64>),
    pub median_p99_ms: (Option<f64>, Option<f64>),
    /// Pairs (with both p99s) in which B's p99 was lower, out of how many had both.
    pub b_lower_p99: (usize, usize),
}

/// Each arm's median of `figure` over the pairs that have it.
fn medians(pairs: &[Pair], figure: fn(&Run) -> Option<f64>) -> (Option<f64>, Option<f64>) {
    let of = |arm: fn(&Pair) -> &Run| {
        median(
            &pairs
                .iter()
                .filter_map(|p| figure(arm(p)))
                .collect::<Vec<_>>(),
        )
    };
    (of(|p| &p.a), of(|p| &p.b))
}

/// Per process, each arm's median CPU per reading over its runs that carry a split,
/// largest (of either arm) first.
fn medians_by_process(pairs: &[Pair]) -> Vec<(String, Option<f64>, Option<f64>)> {
    let names: std::collections::BTreeSet<&String> = pairs
        .iter()
        .flat_map(|p| {
            p.a.cpu_us_by_process
                .keys()
                .chain(p.b.cpu_us_by_process.keys())
        })
        .collect();
    let of = |arm: fn(&Pair) -> &Run, name: &str| {
        median(
            &pairs
                .iter()
                .map(arm)
                .filter(|run| !run.cpu_us_by_process.is_empty())
                .map(|run| run.cpu_us_by_process.get(name).copied().unwrap_or(0.0))
                .collect::<Vec<_>>(),
        )
    };
    let mut rows: Vec<(String, Option<f64>, Option<f64>)> = names
        .into_iter()
        .map(|name| (name.clone(), of(|p| &p.a, name), of(|p| &p.b, name)))
        .collect();
    let largest =
        |row: &(String, Option<f64>, Option<f64>)| row.1.unwrap_or(0.0).max(row.2.unwrap_or(0.0));
    rows.sort_by(|x, y| largest(y).total_cmp(&largest(x)).then(x.0.cmp(&y.0)));
    rows
}

/// In how many pairs B's `figure` was lower than A's, out of the pairs with both.
fn b_lower(pairs: &[Pair], figure: fn(&Run) -> Option<f64>) -> (usize, usize) {
    let both: Vec<(f64, f64)> = pairs
        .iter()
        .filter_map(|p| Some((figure(&p.a)?, figure(&p.b)?)))
        .collect();
    (both.iter().filter(|(a, b)| b < a).count(), both.len())
}

pub fn verdict(pairs: &[Pair]) -> Option<Verdict> {
    let ratios_of = |wanted: fn(&Pair) -> bool| -> Option<f64> {
        median(
            &pairs
                .iter()
                .filter(|p| p.a.rate > 0.0 && wanted(p))
                .map(|p| p.b.rate / p.a.rate)
                .collect::<Vec<_>>(),
        )
    };
    let (median_a, median_b) = medians(pairs, |run| Some(run.rate));
    Some(Verdict {
        pairs: pairs.len(),
        median_a: median_a?,
        median_b: median_b?,
        median_ratio: ratios_of(|_| true)?,
        median_ratio_by_order: (ratios_of(|p| !p.b_first), ratios_of(|p| p.b_first)),
        b_faster: pairs.iter().filter(|p| p.b.rate > p.a.rate).count(),
        b_cheaper: b_lower(pairs, |run| run.cpu_us),
        median_cpu_us: medians(pairs, |run| run.cpu_us),
        median_cpu_us_by_process: medians_by_process(pairs),
        median_p50_ms: medians(pairs, |run| run.p50_ms),
        median_p99_ms: medians(pairs, |run| run.p99_ms),
        b_lower_p99: b_lower(pairs, |run| run.p99_ms),
    })
}

fn optional(value: Option<f64>, decimals: usize, unit: &str) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}{unit}"))
}

/// The pairs as a table (Markdown, like the bench's), then the verdict; `a` and `b`
/// name the settings.
pub fn render(pairs: &[Pair], a: &str, b: &str) -> String {
    let mut out =
        format!("A: {a}\nB: {b}\nrates: readings a second (a load, accepted at the end-to-end point), events a second (a drain)\n\n");
    let drained = pairs
        .iter()
        .any(|p| p.a.drain_seconds.is_some() || p.b.drain_seconds.is_some());
    let mut header = vec![
        "pair",
        "first",
        "A /s",
        "B /s",
        "B/A",
        "A p50",
        "B p50",
        "A p99",
        "B p99",
        "A busy",
        "B busy",
        "A µs each",
        "B µs each",
        "errors A/B",
    ];
    if drained {
        header.extend(["A drain", "B drain"]);
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for pair in pairs {
        let ratio = if pair.a.rate > 0.0 {
            format!("{:.3}", pair.b.rate / pair.a.rate)
        } else {
            "n/a".to_owned()
        };
        let mut row = vec![
            pair.number.to_string(),
            if pair.b_first { "B" } else { "A" }.to_owned(),
            thousands(pair.a.rate),
            thousands(pair.b.rate),
            ratio,
            optional(pair.a.p50_ms, 2, " ms"),
            optional(pair.b.p50_ms, 2, " ms"),
            optional(pair.a.p99_ms, 2, " ms"),
            optional(pair.b.p99_ms, 2, " ms"),
            optional(pair.a.busy_percent, 0, "%"),
            optional(pair.b.busy_percent, 0, "%"),
            optional(pair.a.cpu_us, 1, ""),
            optional(pair.b.cpu_us, 1, ""),
            format!("{}/{}", pair.a.errors, pair.b.errors),
        ];
        if drained {
            row.push(optional(pair.a.drain_seconds, 1, " s"));
            row.push(optional(pair.b.drain_seconds, 1, " s"));
        }
        rows.push(row);
    }
    out.push_str(&table(&header, &rows));
    out.push('\n');
    match verdict(pairs) {
        None => out.push_str("no complete pair: nothing to compare\n"),
        Some(v) => {
            out.push_str(&format!(
                "medians over {} pairs: A {}/s, B {}/s; median pair B/A {:.3}\n",
                v.pairs,
                thousands(v.median_a),
                thousands(v.median_b),
                v.median_ratio
            ));
            out.push_str(&format!(
                "median pair B/A with A run first {}, with B run first {} (the gap is the order's own effect)\n",
                optional(v.median_ratio_by_order.0, 3, ""),
                optional(v.median_ratio_by_order.1, 3, ""),
            ));
            if pairs.iter().all(|p| p.a.fixed_rate && p.b.fixed_rate) {
                out.push_str(
                    "both arms posted at the same fixed rate: the latency tells them apart\n",
                );
            } else {
                out.push_str(&format!(
                    "B was faster than A in {} of {} pairs\n",
                    v.b_faster, v.pairs
                ));
            }
            out.push_str(&format!(
                "CPU per reading or event (µs, the box's busy time{} over the count): medians A {}, B {}; B cheaper in {} of {} pairs\n",
                if drained { " with the drain" } else { "" },
                optional(v.median_cpu_us.0, 1, ""),
                optional(v.median_cpu_us.1, 1, ""),
                v.b_cheaper.0,
                v.b_cheaper.1
            ));
            // Processes under 0.5 µs in both arms are left out of the line.
            let by_process: Vec<String> = v
                .median_cpu_us_by_process
                .iter()
                .filter(|(_, a, b)| a.unwrap_or(0.0).max(b.unwrap_or(0.0)) >= 0.5)
                .map(|(name, a, b)| {
                    format!("{name} {} / {}", optional(*a, 1, ""), optional(*b, 1, ""))
                })
                .collect();
            if !by_process.is_empty() {
                out.push_str(&format!(
                    "the same by process (µs, medians, A / B): {}\n",
                    by_process.join(", ")
                ));
            }
            out.push_str(&format!(
                "latency (ms): medians p50 A {}, B {}; p99 A {}, B {}; B's p99 lower in {} of {} pairs\n",
                optional(v.median_p50_ms.0, 2, ""),
                optional(v.median_p50_ms.1, 2, ""),
                optional(v.median_p99_ms.0, 2, ""),
                optional(v.median_p99_ms.1, 2, ""),
                v.b_lower_p99.0,
                v.b_lower_p99.1
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(readings_per_s: f64, seconds: f64, cpu_seconds: f64) -> serde_json::Value {
        json!({
            "readings_per_s": readings_per_s,
            "readings": readings_per_s * seconds,
            "latency": {"p99_ms": 9.5},
            "box_cpu": {"busy_percent": cpu_seconds / seconds / 2.0 * 100.0, "cpu_seconds": cpu_seconds},
            "errors": {},
        })
    }

    #[test]
    fn runs_are_paired_by_their_names_and_the_order_is_read_from_the_positions() {
        let mut results = Results::new();
        results.insert("1-1-a".into(), point(1000.0, 10.0, 1.0));
        results.insert("1-2-b".into(), point(1100.0, 10.0, 1.0));
        results.insert("2-1-b".into(), point(900.0, 10.0, 1.0));
        results.insert("2-2-a".into(), point(1000.0, 10.0, 1.0));
        // Incomplete, malformed or foreign names are left out.
        results.insert("3-1-a".into(), point(5.0, 10.0, 1.0));
        results.insert("4-1-a".into(), point(5.0, 10.0, 1.0));
        results.insert("4-1-b".into(), point(5.0, 10.0, 1.0));
        results.insert("5-3-a".into(), point(5.0, 10.0, 1.0));
        results.insert("ingest_c64".into(), point(5.0, 10.0, 1.0));
        let pairs = pairs(&results);
        assert_eq!(
            pairs
                .iter()
                .map(|p| (p.number, p.b_first, p.a.rate, p.b.rate))
                .collect::<Vec<_>>(),
            vec![(1, false, 1000.0, 1100.0), (2, true, 1000.0, 900.0)]
        );
        assert_eq!(pairs[0].a.cpu_us, Some(100.0));
        assert_eq!(pairs[0].a.p99_ms, Some(9.5));
    }

    #[test]
    fn the_verdict_counts_pairs_won_and_takes_medians_of_rates_ratios_and_cpu() {
        let mut results = Results::new();
        // (A, B) readings/s and CPU seconds over 10 s.
        let runs = [
            ((1000.0, 2.0), (1200.0, 2.0)),
            ((1000.0, 2.0), (900.0, 2.0)),
            ((2000.0, 3.0), (2100.0, 2.0)),
        ];
        for (i, ((a_rate, a_cpu), (b_rate, b_cpu))) in runs.into_iter().enumerate() {
            let pair = i + 1;
            let (a_position, b_position) = if pair % 2 == 1 { (1, 2) } else { (2, 1) };
            results.insert(format!("{pair}-{a_position}-a"), point(a_rate, 10.0, a_cpu));
            results.insert(format!("{pair}-{b_position}-b"), point(b_rate, 10.0, b_cpu));
        }
        let verdict = verdict(&pairs(&results)).expect("three pairs");
        assert_eq!(verdict.pairs, 3);
        assert_eq!(verdict.median_a, 1000.0);
        assert_eq!(verdict.median_b, 1200.0);
        assert_eq!(verdict.median_ratio, 1.05);
        assert_eq!(verdict.b_faster, 2);
        // Pairs 1 and 3 ran A first (1.2, 1.05), pair 2 B first (0.9).
        assert_eq!(verdict.median_ratio_by_order, (Some(1.125), Some(0.9)));
        // CPU per reading: A 200, 200, 150 µs; B 166.7, 222.2, 95.2 µs.
        assert_eq!(verdict.b_cheaper, (2, 3));
        assert_eq!(verdict.median_cpu_us.0, Some(200.0));
        let b_cpu = verdict.median_cpu_us.1.expect("B's CPU figures");
        assert!((b_cpu - 166.667).abs() < 0.001, "{b_cpu}");

        let table = render(&pairs(&results), "x=1", "x=2");
        assert!(table.starts_with("A: x=1\nB: x=2\n"), "{table}");
        assert!(table.contains("median pair B/A 1.050"), "{table}");
        assert!(
            table.contains("with A run first 1.125, with B run first 0.900"),
            "{table}"
        );
        assert!(
            table.contains("B was faster than A in 2 of 3 pairs"),
            "{table}"
        );
        assert!(table.contains("B cheaper in 2 of 3 pairs"), "{table}");
    }

    #[test]
    fn the_cpu_per_reading_splits_by_process_with_the_drain_and_medians_per_arm() {
        let split = |readings: f64, postgres: f64, ingest: f64| {
            // 10 s at `readings`/s; shares of a core.
            json!({"readings_per_s": readings, "readings": readings * 10.0, "seconds": 10.0,
                   "box_cpu": {"busy_percent": 50.0, "cpu_seconds": 10.0, "seconds": 10.0,
                       "processes_percent_of_a_core": {"PostgreSQL": postgres, "ingest": ingest}}})
        };
        let mut results = Results::new();
        // A: PostgreSQL 60% of a core over 10 s for 10,000 readings = 600 µs each.
        results.insert("1-1-a".into(), split(1000.0, 60.0, 40.0));
        results.insert("1-2-b".into(), split(1000.0, 80.0, 40.0));
        results.insert("2-1-b".into(), split(1000.0, 90.0, 20.0));
        results.insert("2-2-a".into(), split(1000.0, 70.0, 40.0));
        // Pair 1's A drained with Redis at 50% of a core over the 2 s loadgen measured
        // (its drain clock, 1.5 s, started later): 100 µs a reading more, Redis's.
        results.insert(
            "1-1-a.drain".into(),
            json!({"seconds": 1.5, "box_cpu": {"busy_percent": 25.0, "cpu_seconds": 1.0, "seconds": 2.0,
                   "processes_percent_of_a_core": {"Redis": 50.0}}}),
        );
        let pairs = pairs(&results);
        assert_eq!(
            pairs[0].a.cpu_us_by_process,
            BTreeMap::from([
                ("PostgreSQL".to_owned(), 600.0),
                ("Redis".to_owned(), 100.0),
                ("ingest".to_owned(), 400.0)
            ])
        );
        let verdict = verdict(&pairs).expect("two pairs");
        // Redis: A 100 and 0 (pair 2's A has no Redis), B 0 and 0.
        assert_eq!(
            verdict.median_cpu_us_by_process,
            vec![
                ("PostgreSQL".to_owned(), Some(650.0), Some(850.0)),
                ("ingest".to_owned(), Some(400.0), Some(300.0)),
                ("Redis".to_owned(), Some(50.0), Some(0.0)),
            ]
        );
        let table = render(&pairs, "x=1", "x=2");
        assert!(
            table.contains(
                "the same by process (µs, medians, A / B): PostgreSQL 650.0 / 850.0, ingest 400.0 / 300.0, Redis 50.0 / 0.0\n"
            ),
            "{table}"
        );
        // Runs loadgen did not split show no such line.
        let mut plain = Results::new();
        plain.insert("1-1-a".into(), point(1000.0, 10.0, 1.0));
        plain.insert("1-2-b".into(), point(1000.0, 10.0, 1.0));
        assert!(!render(&super::pairs(&plain), "x=1", "x=2").contains("by process"));
    }

    #[test]
    fn the_drain_after_a_run_counts_in_its_cpu_per_reading_and_shows_its_seconds() {
        let mut results = Results::new();
        results.insert("1-1-a".into(), point(1000.0, 10.0, 1.0));
        results.insert("1-2-b".into(), point(1000.0, 10.0, 1.0));
        results.insert(
            "1-1-a.drain".into(),
            json!({"seconds": 2.5, "box_cpu": {"busy_percent": 50.0, "cpu_seconds": 2.5}}),
        );
        // B's drain found nothing left: no CPU figure, and none needed.
        results.insert(
            "1-2-b.drain".into(),
            json!({"seconds": 0.0, "box_cpu": null}),
        );
        let pairs = pairs(&results);
        // A: (1 + 2.5) CPU seconds over 10,000 readings; B's drain took no time.
        assert_eq!(pairs[0].a.cpu_us, Some(350.0));
        assert_eq!(pairs[0].a.drain_seconds, Some(2.5));
        assert_eq!(pairs[0].b.cpu_us, Some(100.0));
        assert_eq!(pairs[0].b.drain_seconds, Some(0.0));
        let table = render(&pairs, "a", "b");
        assert!(table.contains("A drain"), "{table}");
        assert!(table.contains("2.5 s"), "{table}");
        assert!(table.contains("busy time with the drain"), "{table}");
        assert!(!render(&pairs[..0], "a", "b").contains("A drain"));
    }

    #[test]
    fn a_drain_is_compared_by_its_events_a_second_and_its_cpu_per_event() {
        let mut results = Results::new();
        let drain = |events_per_s: f64, cpu_seconds: f64| {
            json!({"what": "projector", "backlog": 100000, "events_per_s": events_per_s,
                   "seconds": 100000.0 / events_per_s,
                   "box_cpu": {"busy_percent": 90.0, "cpu_seconds": cpu_seconds}})
        };
        results.insert("1-1-a".into(), drain(20000.0, 8.0));
        results.insert("1-2-b".into(), drain(25000.0, 6.0));
        let pairs = pairs(&results);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].a.rate, pairs[0].b.rate), (20000.0, 25000.0));
        assert_eq!(
            (pairs[0].a.cpu_us, pairs[0].b.cpu_us),
            (Some(80.0), Some(60.0))
        );
        assert_eq!(pairs[0].a.p99_ms, None);
        assert!(render(&pairs, "a", "b").contains("B was faster than A in 1 of 1 pairs"));
    }

    #[test]
    fn the_end_to_end_point_is_compared_by_its_visibility_latency() {
        let mut results = Results::new();
        let e2e = |p50: f64, p99: f64| {
            json!({"target_rate": 3000.0, "accepted": 60000, "accepted_per_s": 3000.0,
                   "post_latency": {"p50_ms": 1.0, "p99_ms": 2.0},
                   "visible_latency": {"p50_ms": p50, "p99_ms": p99},
                   "box_cpu": {"busy_percent": 90.0, "cpu_seconds": 30.0}})
        };
        results.insert("1-1-a".into(), e2e(8.0, 90.0));
        results.insert("1-2-b".into(), e2e(9.0, 60.0));
        results.insert("2-1-b".into(), e2e(7.0, 70.0));
        results.insert("2-2-a".into(), e2e(6.0, 50.0));
        let pairs = pairs(&results);
        assert_eq!(pairs[0].a.rate, 3000.0);
        assert_eq!(
            (pairs[0].a.p50_ms, pairs[0].a.p99_ms),
            (Some(8.0), Some(90.0))
        );
        assert_eq!(pairs[0].a.cpu_us, Some(500.0));
        let verdict = verdict(&pairs).expect("two pairs");
        assert_eq!(verdict.median_p50_ms, (Some(7.0), Some(8.0)));
        assert_eq!(verdict.median_p99_ms, (Some(70.0), Some(65.0)));
        assert_eq!(verdict.b_lower_p99, (1, 2));
        let table = render(&pairs, "a", "b");
        assert!(table.contains("B's p99 lower in 1 of 2 pairs"), "{table}");
        assert!(table.contains("the same fixed rate"), "{table}");
        assert!(!table.contains("was faster"), "{table}");
    }

    #[test]
    fn without_a_complete_pair_there_is_no_verdict() {
        let mut results = Results::new();
        results.insert("1-1-a".into(), point(1000.0, 10.0, 1.0));
        assert_eq!(verdict(&pairs(&results)), None);
        assert!(render(&pairs(&results), "a", "b").contains("no complete pair"));
    }

    #[test]
    fn failed_answers_are_shown_beside_their_run() {
        let mut results = Results::new();
        results.insert("1-1-a".into(), point(1000.0, 10.0, 1.0));
        let mut failing = point(800.0, 10.0, 1.0);
        failing["errors"] = json!({"503": 7, "io": 2});
        results.insert("1-2-b".into(), failing);
        let pairs = pairs(&results);
        assert_eq!(pairs[0].b.errors, 9);
        assert!(render(&pairs, "a", "b").contains("0/9"));
    }
}

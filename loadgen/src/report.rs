//! The closing table of `scripts/bench`: every figure beside the limit measured in the
//! same run, the ratio, the target of issue 5 and whether it was met.
//!
//! Input: a directory of JSON files, one per measurement, named by what they measured
//! (`pg_1_c64.json`, `ingest_c64.json`, `relay_drain.json`, …; see `scripts/bench`).
//! A missing file shows as `n/a` and its target as not met.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::box_cpu;

/// Measurements by file stem.
pub type Results = BTreeMap<String, Value>;

/// Loads every `*.json` in `dir`.
pub fn load(dir: &Path) -> anyhow::Result<Results> {
    let mut results = Results::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        match serde_json::from_str(&text) {
            Ok(value) => {
                results.insert(stem.to_owned(), value);
            }
            Err(error) => eprintln!("loadgen: skipping {}: {error}", path.display()),
        }
    }
    Ok(results)
}

/// Was a target met?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    /// A limit or an informational figure: no target.
    None,
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub figure: String,
    pub value: String,
    pub limit: String,
    pub ratio: String,
    pub target: String,
    pub met: Met,
}

fn num(results: &Results, file: &str, pointer: &str) -> Option<f64> {
    results.get(file)?.pointer(pointer)?.as_f64()
}

/// The last known sample of a series less its first (`loadgen watch`'s samples, with
/// `null` where a look failed).
fn series_growth(results: &Results, file: &str, pointer: &str) -> Option<f64> {
    let samples = results.get(file)?.pointer(pointer)?.as_array()?;
    let mut known = samples.iter().filter_map(Value::as_f64);
    let first = known.next()?;
    Some(known.next_back().unwrap_or(first) - first)
}

/// `14,876`.
pub fn thousands(value: f64) -> String {
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        out.insert(0, '-');
    }
    out
}

fn rate(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{} {unit}", thousands(v)))
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2} ms"))
}

/// `value / limit`, shown as `4.21x` or `37%`.
#[derive(Debug, Clone, Copy)]
enum Style {
    Times,
    Percent,
}

fn ratio(value: Option<f64>, limit: Option<f64>, style: Style) -> (Option<f64>, String) {
    match (value, limit) {
        (Some(v), Some(l)) if l > 0.0 => {
            let r = v / l;
            let text = match style {
                Style::Times => format!("{r:.2}x"),
                Style::Percent => format!("{:.0}%", r * 100.0),
            };
            (Some(r), text)
        }
        _ => (None, "n/a".to_owned()),
    }
}

fn met(ok: Option<bool>) -> Met {
    if ok == Some(true) {
        Met::Yes
    } else {
        Met::No
    }
}

struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn push(
        &mut self,
        figure: &str,
        value: String,
        limit: String,
        ratio: String,
        target: &str,
        met: Met,
    ) {
        self.rows.push(Row {
            figure: figure.to_owned(),
            value,
            limit,
            ratio,
            target: target.to_owned(),
            met,
        });
    }

    fn info(&mut self, figure: &str, value: String, reference: &str) {
        self.push(figure, value, "-".into(), "-".into(), reference, Met::None);
    }

    /// A figure against a limit, with a minimum ratio as its target (if any).
    #[allow(clippy::too_many_arguments)]
    fn against(
        &mut self,
        figure: &str,
        value: Option<f64>,
        unit: &str,
        limit_name: &str,
        limit: Option<f64>,
        style: Style,
        minimum: Option<(f64, &str)>,
    ) {
        let (r, text) = ratio(value, limit, style);
        let limit_unit = if limit_name.starts_with("pgbench@") {
            "txn/s"
        } else {
            unit
        };
        let limit_text = format!("{limit_name} {}", rate(limit, limit_unit));
        let (target, verdict) = match minimum {
            Some((min, label)) => (label, met(r.map(|r| r >= min))),
            None => ("-", Met::None),
        };
        self.push(figure, rate(value, unit), limit_text, text, target, verdict);
    }

    /// A ceiling (`ceiling_figure`) against pgbench@64, then what a point made
    /// (`value`, under `share_figure`) as a share of it.
    #[allow(clippy::too_many_arguments)]
    fn ceiling_and_share(
        &mut self,
        ceiling_figure: &str,
        ceiling: Option<f64>,
        pgbench_64: Option<f64>,
        share_figure: &str,
        value: Option<f64>,
        unit: &str,
        ceiling_name: &str,
    ) {
        self.against(
            ceiling_figure,
            ceiling,
            unit,
            "pgbench@64",
            pgbench_64,
            Style::Times,
            None,
        );
        self.against(
            share_figure,
            value,
            unit,
            ceiling_name,
            ceiling,
            Style::Percent,
            None,
        );
    }

    /// A limit measured once more at the end of the run (file `<file>_end`), as a share
    /// of its first measurement: how far the box drifted while the figures were taken.
    fn again_at_the_end(&mut self, results: &Results, file: &str, pointer: &str, unit: &str) {
        let end = num(results, &format!("{file}_end"), pointer);
        if end.is_some() {
            self.against(
                "  again at the end of the run",
                end,
                unit,
                "at the start",
                num(results, file, pointer),
                Style::Percent,
                None,
            );
        }
    }

    fn latency(&mut self, figure: &str, results: &Results, file: &str) {
        let p = |q: &str| num(results, file, &format!("/latency/{q}"));
        let value = match (p("p50_ms"), p("p99_ms"), p("p999_ms")) {
            (Some(a), Some(b), Some(c)) => format!("{a:.2} / {b:.2} / {c:.2} ms"),
            _ => "n/a".to_owned(),
        };
        self.info(figure, value, "-");
    }

    /// How busy the box was during a load point and its CPU per reading (every process,
    /// the load generator's included), when loadgen measured them.
    fn box_cpu(&mut self, results: &Results, file: &str) {
        let busy = num(results, file, "/box_cpu/busy_percent");
        if let (Some(busy), Some(per_reading)) = (busy, cpu_per_reading(results, file)) {
            self.info(
                "    box busy / CPU per reading",
                format!("{busy:.0}% / {per_reading:.0} µs"),
                "-",
            );
        }
        let readings = num(results, file, "/readings").map(|readings| (readings, "a reading"));
        self.processes(results, file, readings);
    }

    /// Where the box's CPU went during a point, by process (percent of one core each,
    /// largest first, under 1% left out), when loadgen split it; given the units the
    /// point carried (readings, drained events) and what one is called, also each
    /// process's CPU per unit in µs (its share of a core over the span it was measured
    /// over, `box_cpu.seconds`; one decimal under 10 µs).
    fn processes(&mut self, results: &Results, file: &str, units: Option<(f64, &str)>) {
        let Some(split) = results
            .get(file)
            .and_then(|point| point.pointer("/box_cpu/processes_percent_of_a_core"))
            .and_then(Value::as_object)
        else {
            return;
        };
        let mut shares: Vec<(&str, f64)> = split
            .iter()
            .filter_map(|(name, percent)| Some((name.as_str(), percent.as_f64()?)))
            .filter(|(_, percent)| *percent >= 1.0)
            .collect();
        if shares.is_empty() {
            return;
        }
        shares.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        let text: Vec<String> = shares
            .iter()
            .map(|(name, percent)| format!("{name} {percent:.0}"))
            .collect();
        self.info("    CPU by process, % of a core", text.join(", "), "-");
        let span = num(results, file, "/box_cpu/seconds");
        if let Some(((units, per), span)) = units.filter(|(units, _)| *units > 0.0).zip(span) {
            let text: Vec<String> = shares
                .iter()
                .map(|(name, percent)| {
                    let micros = box_cpu::micros_per_unit(*percent, span, units);
                    // Per event a process may cost well under 10 µs: keep a decimal there.
                    let places = usize::from(micros < 10.0);
                    format!("{name} {micros:.places$}")
                })
                .collect();
            self.info(
                &format!("    CPU by process, µs {per}"),
                text.join(", "),
                "-",
            );
        }
    }

    fn errors(&mut self, results: &Results, file: &str) {
        let errors = results
            .get(file)
            .and_then(|v| v.get("errors"))
            .and_then(Value::as_object)
            .filter(|errors| !errors.is_empty());
        if let Some(errors) = errors {
            let text: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            self.info("    non-2xx answers", text.join(", "), "-");
        }
    }
}

/// Whether a closed-loop point had next to no answers but the expected one (at most
/// 0.1% of its requests): its latency percentiles are of every answer.
fn few_errors(results: &Results, file: &str) -> bool {
    let requests = num(results, file, "/requests").unwrap_or(0.0);
    let ok = num(results, file, "/ok").unwrap_or(0.0);
    requests > 0.0 && requests - ok <= requests * 0.001
}

/// Whether the sustained minute's backlog stayed bounded: outbox and consumer backlog
/// together at most 2 s of ingest, and no more than 1 s of ingest higher at the end
/// than at the start (a backlog growing slowly stays small for a minute, and grows on).
fn backlog_bounded(
    outbox_max: Option<f64>,
    pending_max: Option<f64>,
    growth: Option<f64>,
    sustained: Option<f64>,
) -> Option<bool> {
    let (outbox, pending, growth, rate) = (outbox_max?, pending_max?, growth?, sustained?);
    Some(outbox + pending <= 2.0 * rate && growth < rate)
}

/// The table's rows from the results of one run.
pub fn rows(results: &Results) -> Vec<Row> {
    let mut t = Table { rows: Vec::new() };
    let pg1 = |clients: u32| num(results, &format!("pg_1_c{clients}"), "/tps");
    let pg500 = num(results, "pg_500", "/readings_per_s");
    let pg500_clients = num(results, "pg_500", "/clients").unwrap_or(0.0);
    let static_rps = num(results, "static", "/ok_per_s");
    let static_clients = num(results, "static", "/concurrency").unwrap_or(0.0);
    let publish = num(results, "publish", "/msgs_per_s");
    let redis = num(results, "redis", "/calls_per_s");
    let redis_pipeline = num(results, "redis", "/pipeline").unwrap_or(0.0);

    // The limits.
    for clients in [1, 16, 64] {
        t.info(
            &format!("LIMIT pgbench 1 reading/txn, {clients} clients"),
            rate(pg1(clients), "txn/s"),
            if clients == 64 { "ref ~6,000/s" } else { "-" },
        );
        t.again_at_the_end(results, &format!("pg_1_c{clients}"), "/tps", "txn/s");
    }
    // What the outbox trigger's NOTIFY inside every transaction cost: PostgreSQL
    // serialises the commits of notifying transactions (ingest now notifies after its
    // commits instead).
    if let Some(value) = num(results, "pg_notify_1_c64", "/tps") {
        let clients = num(results, "pg_notify_1_c64", "/clients").unwrap_or(0.0);
        t.info(
            &format!("  same with a NOTIFY in each txn (the old trigger), {clients} clients"),
            rate(Some(value), "txn/s"),
            "-",
        );
    }
    t.info(
        &format!("LIMIT pgbench 500 readings/txn, {pg500_clients} clients"),
        rate(pg500, "readings/s"),
        "ref ~59,000/s",
    );
    t.info(
        &format!("LIMIT static HTTP 202, {static_clients} clients"),
        rate(static_rps, "req/s"),
        "ref ~80,000/s",
    );
    t.again_at_the_end(results, "static", "/ok_per_s", "req/s");
    // The limit of the query figure: the same server answering its GET with a document
    // the size of query's (runs before 2026-12-06 measured only the POST).
    let static_stats = num(results, "static_stats", "/ok_per_s");
    if static_stats.is_some() {
        t.info(
            "LIMIT static HTTP 200 to a /stats GET, same clients",
            rate(static_stats, "req/s"),
            "-",
        );
    }
    t.info(
        "LIMIT JetStream publish, pipelined acks",
        rate(publish, "msgs/s"),
        "ref 80-130k/s",
    );
    t.info(
        &format!("LIMIT Redis EVALSHA, pipeline {redis_pipeline}"),
        rate(redis, "calls/s"),
        "ref ~65,000/s",
    );

    // What the 64-client burst (HTTP and the group commit) would carry on the whole box
    // at the CPU it cost: shown with the burst and one of the stages' ceiling below.
    let burst_on_a_full_box = on_a_full_box(
        results,
        "ingest_c64",
        num(results, "ingest_c64", "/readings"),
    );

    // Ingest burst.
    for clients in [1u32, 16, 64, 256] {
        let file = format!("ingest_c{clients}");
        let value = num(results, &file, "/ok_per_s");
        let pg_clients = clients.min(64);
        let minimum = (clients == 64).then_some((4.0, ">= 4x"));
        t.against(
            &format!("ingest POST, {clients} clients (burst)"),
            value,
            "req/s",
            &format!("pgbench@{pg_clients}"),
            pg1(pg_clients),
            Style::Times,
            minimum,
        );
        if clients == 64 {
            t.against(
                "ingest POST, 64 clients vs 500/txn",
                value,
                "readings/s",
                "pgbench500",
                pg500,
                Style::Percent,
                Some((0.4, ">= 40%")),
            );
            t.against(
                "ingest POST, 64 clients vs static HTTP",
                value,
                "req/s",
                "static",
                static_rps,
                Style::Percent,
                None,
            );
            // Whether 4x pgbench@64 is within what the limits allow at all.
            t.ceiling_and_share(
                "  ceiling of ingest from the limits (pgbench500 + static)",
                ceiling(&[pg500, static_rps]),
                pg1(64),
                "ingest POST, 64 clients vs that ceiling",
                value,
                "req/s",
                "ceiling",
            );
            // Whether 4x needs a cheaper reading or only a fuller box.
            t.against(
                "  the burst on a full box (its own CPU a reading)",
                burst_on_a_full_box,
                "req/s",
                "pgbench@64",
                pg1(64),
                Style::Times,
                None,
            );
        }
        t.latency("    latency p50 / p99 / p99.9", results, &file);
        if clients == 64 {
            t.box_cpu(results, &file);
        }
        t.errors(results, &file);
    }

    // Batch POSTs.
    let batch_available = results
        .get("batch_100")
        .and_then(|v| v.get("available"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if batch_available {
        let clients = num(results, "batch_100", "/concurrency").unwrap_or(0.0);
        t.against(
            &format!("ingest batch POST of 100, {clients} clients"),
            num(results, "batch_100", "/readings_per_s"),
            "readings/s",
            "pgbench500",
            pg500,
            Style::Percent,
            Some((0.7, ">= 70%")),
        );
        t.latency("    latency p50 / p99 / p99.9", results, "batch_100");
        t.box_cpu(results, "batch_100");
        t.errors(results, "batch_100");
    } else {
        t.push(
            "ingest batch POST of 100",
            "n/a: batch endpoint not available (404)".into(),
            format!("pgbench500 {}", rate(pg500, "readings/s")),
            "n/a".into(),
            ">= 70%",
            Met::No,
        );
    }
    if let Some(fill) = num(results, "fill", "/readings_per_s") {
        t.against(
            "  group commit without HTTP (backlog fill)",
            Some(fill),
            "readings/s",
            "pgbench500",
            pg500,
            Style::Percent,
            None,
        );
    }

    // Authentication (issue 4): alternating runs with the same bearer header, compared
    // by their medians.
    let auth_runs = |mode: &str| -> Vec<f64> {
        let prefix = format!("auth_{mode}_");
        results
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .filter_map(|(_, value)| value.pointer("/ok_per_s")?.as_f64())
            .collect()
    };
    let (auth_off, auth_on) = (auth_runs("off"), auth_runs("on"));
    if !auth_off.is_empty() || !auth_on.is_empty() {
        t.against(
            &format!(
                "ingest POST, 64 clients, auth on (median of {})",
                auth_on.len()
            ),
            median(&auth_on),
            "req/s",
            "auth off",
            median(&auth_off),
            Style::Percent,
            Some((0.95, ">= 95%")),
        );
        let runs = |rates: &[f64]| {
            let rates: Vec<String> = rates.iter().map(|rate| thousands(*rate)).collect();
            rates.join(" ")
        };
        t.info(
            "    runs auth off / on, req/s",
            format!("{} / {}", runs(&auth_off), runs(&auth_on)),
            "-",
        );
        for mode in ["off", "on"] {
            for file in (1..=auth_off.len().max(auth_on.len())).map(|i| format!("auth_{mode}_{i}"))
            {
                t.errors(results, &file);
            }
        }
    }

    // Sustained, whole pipeline.
    let sustained = num(results, "sustained", "/ok_per_s");
    let sustained_seconds = num(results, "sustained", "/seconds").unwrap_or(0.0).round();
    let sustained_clients = num(results, "sustained", "/concurrency").unwrap_or(0.0);
    t.against(
        &format!("sustained {sustained_seconds} s, whole pipeline, {sustained_clients} clients"),
        sustained,
        "req/s",
        "pgbench@64",
        pg1(64),
        Style::Times,
        Some((2.5, ">= 2.5x")),
    );
    t.latency("    latency p50 / p99 / p99.9", results, "sustained");
    t.box_cpu(results, "sustained");
    t.errors(results, "sustained");
    let outbox_max = num(results, "sustained_watch", "/outbox_unpublished/max");
    let pending_max = num(results, "sustained_watch", "/consumer_pending/max");
    // What piled up before the projector over the minute (outbox and consumer backlog,
    // last sample against the first).
    let growth = ["/outbox_unpublished/samples", "/consumer_pending/samples"]
        .into_iter()
        .map(|pointer| series_growth(results, "sustained_watch", pointer))
        .sum::<Option<f64>>();
    t.push(
        "    max backlog: outbox / consumer pending",
        format!(
            "{} / {}",
            outbox_max.map_or("n/a".into(), thousands),
            pending_max.map_or("n/a".into(), thousands)
        ),
        "-".into(),
        "-".into(),
        "bounded: <= 2 s of ingest, < 1 s more at the end",
        met(backlog_bounded(outbox_max, pending_max, growth, sustained)),
    );
    // What the whole pipeline carried: ingest's rate less that growth.
    let carried = match (sustained, growth) {
        (Some(rate), Some(growth)) if sustained_seconds > 0.0 => {
            Some(rate - growth / sustained_seconds)
        }
        _ => None,
    };
    t.against(
        "    reached the read model (ingest less backlog growth)",
        carried,
        "events/s",
        "sustained",
        sustained,
        Style::Percent,
        None,
    );
    // Whether 2.5x pgbench@64 is within what the limits allow at all: a reading is
    // written by PostgreSQL, answered over HTTP, published and applied in Redis.
    t.ceiling_and_share(
        "  ceiling of the pipeline from the limits (all four)",
        ceiling(&[pg500, static_rps, publish, redis]),
        pg1(64),
        "sustained vs that ceiling",
        sustained,
        "readings/s",
        "ceiling",
    );
    // Whether 2.5x is within what the pipeline's own stages allow: a reading carried
    // as cheaply as each stage carries one alone at full tilt (the burst, the relay's
    // drain, the projector's drain), the three sharing the whole box.
    let drain_on_a_full_box = |file| on_a_full_box(results, file, drained_events(results, file));
    t.ceiling_and_share(
        "  ceiling of its stages (burst + drains, each on a full box)",
        ceiling(&[
            burst_on_a_full_box,
            drain_on_a_full_box("relay_drain"),
            drain_on_a_full_box("projector_drain"),
        ]),
        pg1(64),
        "sustained vs the stages' ceiling",
        sustained,
        "readings/s",
        "stages",
    );

    // End to end.
    let e2e_rate = num(results, "e2e", "/target_rate");
    let timed_out = num(results, "e2e", "/timed_out").unwrap_or(0.0);
    let tracked = num(results, "e2e", "/tracked").unwrap_or(0.0);
    let visible_probes = num(results, "e2e", "/visible").unwrap_or(0.0);
    // Samples due while the probe cap was full, and readings not sent at all while the
    // in-flight cap was: both come in a stall, exactly when the latency is at its
    // worst, so neither may pass unseen (until 2026-12-06 they did not count).
    let untracked = num(results, "e2e", "/untracked_probe_cap").unwrap_or(0.0);
    let skipped = num(results, "e2e", "/skipped_in_flight_cap").unwrap_or(0.0);
    let posted = num(results, "e2e", "/posted").unwrap_or(0.0);
    // Results written before the count was judged have no refusals to judge.
    let accepted = num(results, "e2e", "/accepted").unwrap_or(posted);
    // A probe not seen (timed out, or its POST refused or failed) is a miss too: the
    // percentiles are of the probes seen only. So is a reading of the load refused or
    // failed (a 429, a 503, a timeout): a pipeline that turns part of its load away
    // carries less, and its probes look faster for it.
    let due = tracked + untracked;
    let few_missed = due > 0.0
        && (tracked - visible_probes) + untracked <= due * 0.001
        && skipped <= (posted + skipped) * 0.001
        && posted - accepted <= posted * 0.001;
    // The p99 target is the line past which `loadgen e2e` counts a probe as slow.
    let slow_ms = crate::e2e::SLOW.as_secs_f64() * 1000.0;
    let p99_target = format!("< {slow_ms} ms");
    for (label, pointer, bound, target) in [
        ("p50", "/visible_latency/p50_ms", 10.0, "< 10 ms"),
        (
            "p99",
            "/visible_latency/p99_ms",
            slow_ms,
            p99_target.as_str(),
        ),
    ] {
        let value = num(results, "e2e", pointer);
        t.push(
            &format!("e2e 202 -> visible in /stats, {label}"),
            ms(value),
            format!("at {}", rate(e2e_rate, "req/s")),
            "-".into(),
            target,
            met(value.map(|v| v < bound && few_missed)),
        );
    }
    t.info(
        "    probes visible / timed out, of tracked",
        format!(
            "{} / {}, of {}",
            thousands(visible_probes),
            thousands(timed_out),
            thousands(tracked)
        ),
        "-",
    );
    if untracked > 0.0 || skipped > 0.0 {
        t.info(
            "    samples left untracked / readings not sent (caps)",
            format!("{} / {}", thousands(untracked), thousands(skipped)),
            "-",
        );
    }
    t.errors(results, "e2e");
    // Whether the slow probes came together (an episode that held back every stage at
    // once) or one here and there (a steady tail).
    if let Some(slow) = num(results, "e2e", "/slow") {
        t.info(
            &format!(
                "    probes over {} ms / seconds they fell in",
                num(results, "e2e", "/slow_ms").unwrap_or(0.0)
            ),
            format!(
                "{} / {} of {} s",
                thousands(slow),
                thousands(num(results, "e2e", "/slow_seconds").unwrap_or(0.0)),
                num(results, "e2e", "/seconds").map_or("-".into(), |s| format!("{s:.0}"))
            ),
            "-",
        );
    }
    // Its probes are not its load: no CPU a reading.
    t.processes(results, "e2e", None);
    // The same at a fixed light rate: the latency of the stages themselves, without
    // the queueing of a pipeline run near its slowest stage's capacity.
    if let Some(light_rate) = num(results, "e2e_light", "/target_rate") {
        t.info(
            &format!(
                "    e2e at a light {}, p50 / p99",
                rate(Some(light_rate), "req/s")
            ),
            format!(
                "{} / {}",
                ms(num(results, "e2e_light", "/visible_latency/p50_ms")),
                ms(num(results, "e2e_light", "/visible_latency/p99_ms"))
            ),
            "-",
        );
    }

    // Backlog drains.
    for (file, name, limit_name, limit) in [
        ("relay_drain", "relay", "JetStream publish", publish),
        ("projector_drain", "projector", "Redis EVALSHA", redis),
    ] {
        let backlog = num(results, file, "/backlog").unwrap_or(0.0);
        let value = num(results, file, "/events_per_s");
        t.against(
            &format!("{name} drain of {}", thousands(backlog)),
            value,
            "events/s",
            "sustained",
            sustained,
            Style::Times,
            Some((2.0, ">= 2x")),
        );
        t.against(
            &format!("    {name} vs {limit_name} limit"),
            value,
            "/s",
            limit_name,
            limit,
            Style::Percent,
            None,
        );
        let events = drained_events(results, file).map(|events| (events, "an event"));
        t.processes(results, file, events);
    }

    // Query.
    let query = num(results, "query", "/ok_per_s");
    let query_clients = num(results, "query", "/concurrency").unwrap_or(0.0);
    let (query_limit, query_limit_name) = match static_stats {
        Some(_) => ("static_stats", "static GET"),
        None => ("static", "static"),
    };
    t.against(
        &format!("/stats GET, {query_clients} clients"),
        query,
        "req/s",
        query_limit_name,
        num(results, query_limit, "/ok_per_s"),
        Style::Percent,
        Some((0.5, ">= 50%")),
    );
    let query_p99 = num(results, "query", "/latency/p99_ms");
    // The same load generator's p99 against the static answer: the floor this box
    // puts under any p99 at this concurrency, for reading the target against.
    let static_p99 = num(results, query_limit, "/latency/p99_ms");
    t.push(
        "    /stats p99",
        ms(query_p99),
        static_p99.map_or_else(|| "-".into(), |p99| format!("static p99 {}", ms(Some(p99)))),
        "-".into(),
        "< 5 ms",
        // The p99 is of every answer, so fast refusals would lower it: it counts only
        // when next to none came.
        met(query_p99.map(|v| v < 5.0 && few_errors(results, "query"))),
    );
    t.errors(results, "query");

    // Memory.
    for process in ["ingest", "relay", "projector", "query"] {
        let kib = num(results, "rss", &format!("/{process}"));
        let mib = kib.map(|k| k / 1024.0);
        t.push(
            &format!("peak RSS {process}"),
            mib.map_or("n/a".into(), |m| format!("{m:.1} MiB")),
            "-".into(),
            "-".into(),
            "< 64 MiB",
            met(mib.map(|m| m < 64.0)),
        );
    }
    t.rows
}

/// The box's CPU time (every process) per reading a load point carried, in µs.
fn cpu_per_reading(results: &Results, file: &str) -> Option<f64> {
    let cpu_seconds = num(results, file, "/box_cpu/cpu_seconds")?;
    let readings = num(results, file, "/readings")?;
    (readings > 0.0).then(|| cpu_seconds * 1e6 / readings)
}

/// The rate a point would have reached with the whole box at the CPU a unit cost it
/// there: its `units` (readings, events) over the box time they took, how busy the box
/// was times the span that was measured over (a drain's span also holds its process's
/// start, so a drain's figure errs low). A rough bound (a point's cost a unit may change
/// with the load); `None` without the box's figures.
fn on_a_full_box(results: &Results, file: &str, units: Option<f64>) -> Option<f64> {
    let busy_share = num(results, file, "/box_cpu/busy_percent")? / 100.0;
    let box_seconds = busy_share * num(results, file, "/box_cpu/seconds")?;
    let units = units?;
    (units > 0.0 && box_seconds > 0.0).then(|| units / box_seconds)
}

/// The events a drain emptied its backlog of; `None` when it did not empty it.
fn drained_events(results: &Results, file: &str) -> Option<f64> {
    if results.get(file)?.get("drained")?.as_bool()? {
        num(results, file, "/backlog")
    } else {
        None
    }
}

/// The most a box could carry of work that needs each of these limits once per unit,
/// if every step cost it no more than in its limit's own measurement: each limit
/// measurement has the whole box, so a unit takes `1/rate` of it in each step, and the
/// steps add up. A rough bound (not every limit is set by the CPU); `None` when a limit
/// is missing.
fn ceiling(limits: &[Option<f64>]) -> Option<f64> {
    let mut cost = 0.0;
    for limit in limits {
        let rate = limit.filter(|rate| *rate > 0.0)?;
        cost += 1.0 / rate;
    }
    (cost > 0.0).then(|| 1.0 / cost)
}

/// The middle value (the mean of the two middle ones for an even count); `None` when
/// empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => sorted.get(middle).copied(),
        _ => Some((sorted.get(middle - 1)? + sorted.get(middle)?) / 2.0),
    }
}

/// The rows as an aligned text table, with a count of targets met.
pub fn render(rows: &[Row]) -> String {
    let header = [
        "figure",
        "value",
        "limit (same run)",
        "ratio",
        "target",
        "met?",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.figure.clone(),
                row.value.clone(),
                row.limit.clone(),
                row.ratio.clone(),
                row.target.clone(),
                match row.met {
                    Met::Yes => "yes".into(),
                    Met::No => "NO".into(),
                    Met::None => "-".into(),
                },
            ]
        })
        .collect();
    let mut out = table(&header, &cells);
    let targets = rows.iter().filter(|r| r.met != Met::None).count();
    let met = rows.iter().filter(|r| r.met == Met::Yes).count();
    out.push_str(&format!("\ntargets met: {met} of {targets}\n"));
    out
}

/// `lines` under `header` as a Markdown table, each column as wide as its widest cell
/// (the closing table here, `scripts/ab`'s in `compare`).
pub fn table(header: &[&str], lines: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for line in lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let format_line = |line: &[String]| {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("| {} |", padded.join(" | ")).trim_end().to_owned()
    };
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = format_line(&header);
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
    for line in lines {
        out.push_str(&format_line(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Results {
        let mut r = Results::new();
        r.insert("pg_1_c64".into(), json!({"tps": 6000.0}));
        r.insert(
            "pg_500".into(),
            json!({"readings_per_s": 60000.0, "clients": 4}),
        );
        r.insert(
            "static".into(),
            json!({"ok_per_s": 80000.0, "concurrency": 64}),
        );
        r.insert(
            "ingest_c64".into(),
            json!({"ok_per_s": 30000.0, "latency": {"p50_ms": 2.0, "p99_ms": 5.0, "p999_ms": 9.0}, "errors": {}}),
        );
        r.insert("batch_100".into(), json!({"available": false}));
        r.insert(
            "sustained".into(),
            json!({"ok_per_s": 16000.0, "seconds": 60.2, "concurrency": 64}),
        );
        r.insert(
            "sustained_watch".into(),
            json!({
                "outbox_unpublished": {"max": 900, "samples": [0, 900, 300]},
                "consumer_pending": {"max": 40000, "samples": [null, 10, 40000, 36010]}
            }),
        );
        r.insert("rss".into(), json!({"ingest": 30000, "relay": 70000}));
        r
    }

    #[test]
    fn the_ceilings_add_up_what_each_limit_costs_the_box() {
        let mut results = sample();
        let rows = rows(&results);
        // 1 / (1/60,000 + 1/80,000) = 34,286 req/s: 5.71x pgbench@64; the burst 88% of it.
        let ingest = find(&rows, "  ceiling of ingest");
        assert_eq!(ingest.value, "34,286 req/s");
        assert_eq!((ingest.ratio.as_str(), ingest.met), ("5.71x", Met::None));
        assert_eq!(
            find(&rows, "ingest POST, 64 clients vs that ceiling").ratio,
            "88%"
        );
        // Without the JetStream and Redis limits there is no pipeline ceiling.
        assert_eq!(find(&rows, "  ceiling of the pipeline").value, "n/a");
        assert_eq!(find(&rows, "sustained vs that ceiling").ratio, "n/a");

        results.insert("publish".into(), json!({"msgs_per_s": 100000.0}));
        results.insert("redis".into(), json!({"calls_per_s": 120000.0}));
        let rows = super::rows(&results);
        // 1 / (1/60k + 1/80k + 1/100k + 1/120k) = 21,053 readings/s: 3.51x; sustained 76%.
        let pipeline = find(&rows, "  ceiling of the pipeline");
        assert_eq!(pipeline.value, "21,053 readings/s");
        assert_eq!(pipeline.limit, "pgbench@64 6,000 txn/s");
        assert_eq!(pipeline.ratio, "3.51x");
        let share = find(&rows, "sustained vs that ceiling");
        assert_eq!((share.ratio.as_str(), share.met), ("76%", Met::None));
    }

    #[test]
    fn the_stages_ceiling_puts_the_burst_and_both_drains_on_a_full_box_each() {
        let mut results = sample();
        // 300,000 readings with the box 75% busy for 10 s: 40,000 a second on a full box.
        results.insert(
            "ingest_c64".into(),
            json!({"ok_per_s": 30000.0, "readings": 300000, "seconds": 10.0,
                   "box_cpu": {"busy_percent": 75.0, "cpu_seconds": 15.0, "seconds": 10.0}}),
        );
        // 200,000 events, 80% of the box for 2.5 s (the drain's own clock is shorter):
        // 100,000 a second; the projector's 100% for 5 s: 40,000.
        results.insert(
            "relay_drain".into(),
            json!({"backlog": 200000, "drained": true, "remaining": 0, "events_per_s": 90000.0, "seconds": 2.2,
                   "box_cpu": {"busy_percent": 80.0, "cpu_seconds": 4.0, "seconds": 2.5}}),
        );
        let projector_drain = json!({"backlog": 200000, "drained": true, "remaining": 0,
            "events_per_s": 42000.0, "box_cpu": {"busy_percent": 100.0, "cpu_seconds": 10.0, "seconds": 5.0}});
        results.insert("projector_drain".into(), projector_drain.clone());
        let rows = rows(&results);
        let burst = find(&rows, "  the burst on a full box");
        assert_eq!(burst.value, "40,000 req/s");
        assert_eq!(burst.ratio, "6.67x");
        // 1 / (1/40k + 1/100k + 1/40k) = 16,667 readings/s: 2.78x; sustained 96%.
        let stages = find(&rows, "  ceiling of its stages");
        assert_eq!(stages.value, "16,667 readings/s");
        assert_eq!((stages.ratio.as_str(), stages.met), ("2.78x", Met::None));
        assert_eq!(find(&rows, "sustained vs the stages' ceiling").ratio, "96%");

        // A drain that did not empty its backlog gives no ceiling.
        let mut unfinished = projector_drain;
        unfinished["drained"] = json!(false);
        unfinished["remaining"] = json!(5000);
        results.insert("projector_drain".into(), unfinished);
        let rows = super::rows(&results);
        assert_eq!(find(&rows, "  ceiling of its stages").value, "n/a");
        assert_eq!(find(&rows, "sustained vs the stages' ceiling").ratio, "n/a");
        assert_eq!(
            find(&rows, "  the burst on a full box").value,
            "40,000 req/s"
        );
    }

    #[test]
    fn a_ceiling_needs_every_limit() {
        assert_eq!(ceiling(&[Some(50.0), Some(50.0)]), Some(25.0));
        assert_eq!(ceiling(&[Some(50.0), None]), None);
        assert_eq!(ceiling(&[Some(50.0), Some(0.0)]), None);
        assert_eq!(ceiling(&[]), None);
    }

    fn find<'a>(rows: &'a [Row], figure: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.figure.starts_with(figure))
            .unwrap_or_else(|| panic!("no row {figure}"))
    }

    #[test]
    fn ratios_and_verdicts() {
        let rows = rows(&sample());
        let burst = find(&rows, "ingest POST, 64 clients (burst)");
        assert_eq!(burst.ratio, "5.00x");
        assert_eq!(burst.met, Met::Yes);
        let vs500 = find(&rows, "ingest POST, 64 clients vs 500/txn");
        assert_eq!(vs500.ratio, "50%");
        assert_eq!(vs500.met, Met::Yes);
        let sustained = find(&rows, "sustained 60 s");
        assert_eq!(sustained.ratio, "2.67x");
        assert_eq!(sustained.met, Met::Yes);
        // 40,000 pending > 2 s × 16,000/s.
        assert_eq!(find(&rows, "    max backlog").met, Met::No);
        // The backlog grew by 300 + 36,000 in 60 s: 16,000 - 605 reached Redis.
        let carried = find(&rows, "    reached the read model");
        assert_eq!(carried.value, "15,395 events/s");
        assert_eq!(carried.limit, "sustained 16,000 events/s");
        assert_eq!(carried.ratio, "96%");
        assert_eq!(carried.met, Met::None);
        assert_eq!(find(&rows, "ingest batch POST of 100").met, Met::No);
        assert_eq!(find(&rows, "peak RSS ingest").met, Met::Yes);
        assert_eq!(find(&rows, "peak RSS relay").met, Met::No);
        // Missing measurements are not met.
        assert_eq!(find(&rows, "relay drain").met, Met::No);
        assert_eq!(find(&rows, "peak RSS query").value, "n/a");
    }

    #[test]
    fn a_backlog_that_grows_all_minute_is_not_bounded_though_it_stays_under_two_seconds() {
        let mut results = sample();
        results.insert(
            "sustained".into(),
            json!({"ok_per_s": 12458.0, "seconds": 60.0, "concurrency": 64}),
        );
        // The projector 400/s behind: 24,000 after the minute, under 2 s of ingest.
        let rising: Vec<f64> = (0..=60).map(|second| second as f64 * 400.0).collect();
        results.insert(
            "sustained_watch".into(),
            json!({
                "outbox_unpublished": {"max": 500, "samples": [0, 500, 20]},
                "consumer_pending": {"max": 24000, "samples": rising}
            }),
        );
        assert_eq!(find(&rows(&results), "    max backlog").met, Met::No);
        // The same peak, back down at the end: bounded.
        results.insert(
            "sustained_watch".into(),
            json!({
                "outbox_unpublished": {"max": 500, "samples": [0, 500, 20]},
                "consumer_pending": {"max": 24000, "samples": [0, 24000, 300]}
            }),
        );
        assert_eq!(find(&rows(&results), "    max backlog").met, Met::Yes);
        // Outbox and consumer together past 2 s of ingest: not bounded.
        results.insert(
            "sustained_watch".into(),
            json!({
                "outbox_unpublished": {"max": 12000, "samples": [0, 12000, 20]},
                "consumer_pending": {"max": 14000, "samples": [0, 14000, 300]}
            }),
        );
        assert_eq!(find(&rows(&results), "    max backlog").met, Met::No);
    }

    #[test]
    fn end_to_end_latencies_are_met_only_when_nearly_every_probe_was_seen() {
        let mut results = sample();
        let e2e = |visible: u64, timed_out: u64| {
            json!({
                "target_rate": 8000.0, "tracked": 500, "visible": visible,
                "timed_out": timed_out, "errors": {"503": 500 - visible - timed_out},
                "visible_latency": {"p50_ms": 3.0, "p99_ms": 20.0}
            })
        };
        results.insert("e2e".into(), e2e(500, 0));
        assert_eq!(
            find(&rows(&results), "e2e 202 -> visible in /stats, p99").met,
            Met::Yes
        );
        // Every probe's POST refused: no latency seen, nothing timed out, nothing met.
        results.insert("e2e".into(), e2e(0, 0));
        let rows_refused = rows(&results);
        assert_eq!(
            find(&rows_refused, "e2e 202 -> visible in /stats, p50").met,
            Met::No
        );
        assert_eq!(
            find(&rows_refused, "e2e 202 -> visible in /stats, p99").met,
            Met::No
        );
        assert_eq!(find(&rows_refused, "    non-2xx answers").value, "503: 500");
        // Two of 500 not seen is past 0.1%.
        results.insert("e2e".into(), e2e(498, 1));
        assert_eq!(
            find(&rows(&results), "e2e 202 -> visible in /stats, p99").met,
            Met::No
        );
    }

    #[test]
    fn stats_reads_are_set_against_a_static_get_where_one_was_measured() {
        let mut results = sample();
        results.insert(
            "query".into(),
            json!({"ok_per_s": 41000.0, "concurrency": 64, "latency": {"p99_ms": 3.0}}),
        );
        // Only the POST measured (runs before 2026-12-06): against it.
        let stats = find(&rows(&results), "/stats GET, 64 clients").clone();
        assert_eq!(stats.limit, "static 80,000 req/s");
        assert_eq!(stats.ratio, "51%");
        results.insert(
            "static_stats".into(),
            json!({"ok_per_s": 90000.0, "concurrency": 64, "latency": {"p99_ms": 1.5}}),
        );
        let rows = rows(&results);
        let stats = find(&rows, "/stats GET, 64 clients");
        assert_eq!(stats.limit, "static GET 90,000 req/s");
        assert_eq!(stats.ratio, "46%");
        assert_eq!(stats.met, Met::No);
        assert_eq!(find(&rows, "    /stats p99").limit, "static p99 1.50 ms");
    }

    #[test]
    fn authentication_is_judged_by_the_medians_of_alternating_runs() {
        let mut results = sample();
        for (i, (off, on)) in [(17000.0, 16500.0), (15000.0, 17100.0), (16000.0, 15400.0)]
            .into_iter()
            .enumerate()
        {
            results.insert(format!("auth_off_{}", i + 1), json!({"ok_per_s": off}));
            results.insert(format!("auth_on_{}", i + 1), json!({"ok_per_s": on}));
        }
        let rows = rows(&results);
        let auth = find(&rows, "ingest POST, 64 clients, auth on");
        assert_eq!(auth.value, "16,500 req/s");
        assert_eq!(auth.limit, "auth off 16,000 req/s");
        assert_eq!(auth.ratio, "103%");
        assert_eq!(auth.met, Met::Yes);
        assert_eq!(
            find(&rows, "    runs auth off / on").value,
            "17,000 15,000 16,000 / 16,500 17,100 15,400"
        );
        // Two of three runs with auth on at 12,000: the median is 75% of auth off.
        results.insert("auth_on_1".into(), json!({"ok_per_s": 12000.0}));
        results.insert("auth_on_2".into(), json!({"ok_per_s": 12000.0}));
        let rows = super::rows(&results);
        assert_eq!(find(&rows, "ingest POST, 64 clients, auth on").met, Met::No);
    }

    #[test]
    fn the_box_cpu_per_reading_shows_only_where_loadgen_measured_it() {
        let results = sample();
        assert!(!rows(&results)
            .iter()
            .any(|row| row.figure.contains("box busy") || row.figure.contains("box CPU")));

        let mut results = sample();
        // 30,000 req/s for 10 s, the box 80% busy on 2 cores: 16 s of CPU for 300,000.
        results.insert(
            "ingest_c64".into(),
            json!({"ok_per_s": 30000.0, "readings_per_s": 30000.0, "seconds": 10.0, "readings": 300000,
                   "box_cpu": {"busy_percent": 80.0, "cpu_seconds": 16.0}}),
        );
        // 16,000 req/s for 60.2 s, the box 97% busy: 116.8 s of CPU for 963,200.
        results.insert(
            "sustained".into(),
            json!({"ok_per_s": 16000.0, "readings_per_s": 16000.0, "seconds": 60.2, "readings": 963200,
                   "concurrency": 64, "box_cpu": {"busy_percent": 97.0, "cpu_seconds": 116.8}}),
        );
        let rows = rows(&results);
        // The box row between the row starting with `figure` and the one starting with
        // `next`.
        let between = |figure: &str, next: &str| {
            rows.iter()
                .skip_while(|row| !row.figure.starts_with(figure))
                .skip(1)
                .take_while(|row| !row.figure.starts_with(next))
                .find(|row| row.figure == "    box busy / CPU per reading")
                .map(|row| row.value.as_str())
        };
        assert_eq!(
            between("ingest POST, 64 clients (burst)", "ingest POST, 256"),
            Some("80% / 53 µs")
        );
        assert_eq!(between("sustained 60 s", "e2e"), Some("97% / 121 µs"));
        assert_eq!(
            between("ingest POST, 16 clients", "ingest POST, 64 clients (burst)"),
            None
        );
    }

    #[test]
    fn the_cpu_by_process_shows_largest_first_under_its_point_without_the_crumbs() {
        let mut results = sample();
        results.insert(
            "sustained".into(),
            json!({"ok_per_s": 16000.0, "readings_per_s": 16000.0, "seconds": 60.0, "readings": 960000,
                   "concurrency": 64, "box_cpu": {"busy_percent": 97.0, "cpu_seconds": 116.4, "seconds": 60.0,
                   "processes_percent_of_a_core": {"NATS": 33.4, "PostgreSQL": 51.2, "Redis": 37.0,
                       "ingest": 28.3, "other": 0.4, "projector": 14.6, "relay": 11.0, "loadgen": 12.7, "query": 0.6}}}),
        );
        results.insert(
            "projector_drain".into(),
            json!({"backlog": 200000, "events_per_s": 30000.0, "drained": true,
                   "box_cpu": {"busy_percent": 90.0, "cpu_seconds": 14.4, "seconds": 8.0,
                   "processes_percent_of_a_core": {"Redis": 95.0, "projector": 60.0, "NATS": 25.0}}}),
        );
        let rows = rows(&results);
        let row_under = |figure: &str, row_figure: &str| {
            rows.iter()
                .skip_while(|row| !row.figure.starts_with(figure))
                .skip(1)
                .take_while(|row| row.figure.starts_with("    "))
                .find(|row| row.figure == row_figure)
                .map(|row| row.value.clone())
        };
        let under = |figure: &str| row_under(figure, "    CPU by process, % of a core");
        assert_eq!(
            under("sustained 60 s").as_deref(),
            Some("PostgreSQL 51, Redis 37, NATS 33, ingest 28, projector 15, loadgen 13, relay 11")
        );
        assert_eq!(
            under("projector drain").as_deref(),
            Some("Redis 95, projector 60, NATS 25")
        );
        // The same shares as CPU per unit: a share of a core over the measured span,
        // over the readings the point carried or the events the drain emptied.
        assert_eq!(
            row_under("sustained 60 s", "    CPU by process, µs a reading").as_deref(),
            Some("PostgreSQL 32, Redis 23, NATS 21, ingest 18, projector 9.1, loadgen 7.9, relay 6.9")
        );
        assert_eq!(
            row_under("projector drain", "    CPU by process, µs an event").as_deref(),
            Some("Redis 38, projector 24, NATS 10")
        );
        // Points loadgen did not split show no such rows.
        assert_eq!(under("relay drain"), None);
        assert_eq!(under("ingest batch POST of 100"), None);
        assert_eq!(
            row_under("relay drain", "    CPU by process, µs an event"),
            None
        );
    }

    #[test]
    fn a_drain_that_did_not_empty_its_backlog_shows_no_cpu_per_event() {
        let mut results = sample();
        results.insert(
            "projector_drain".into(),
            json!({"backlog": 200000, "events_per_s": 30000.0, "drained": false,
                   "box_cpu": {"busy_percent": 90.0, "cpu_seconds": 14.4, "seconds": 8.0,
                   "processes_percent_of_a_core": {"Redis": 95.0, "projector": 60.0}}}),
        );
        let rows = rows(&results);
        assert!(rows
            .iter()
            .any(|row| row.figure == "    CPU by process, % of a core"
                && row.value == "Redis 95, projector 60"));
        assert!(!rows
            .iter()
            .any(|row| row.figure == "    CPU by process, µs an event"));
    }

    #[test]
    fn end_to_end_latencies_are_not_met_when_a_cap_left_samples_out() {
        let mut results = sample();
        let e2e = |untracked: u64, skipped: u64| {
            json!({
                "target_rate": 4000.0, "tracked": 500, "visible": 500, "timed_out": 0,
                "posted": 80_000 - skipped, "accepted": 80_000 - skipped,
                "untracked_probe_cap": untracked,
                "skipped_in_flight_cap": skipped,
                "visible_latency": {"p50_ms": 3.0, "p99_ms": 20.0}
            })
        };
        results.insert("e2e".into(), e2e(0, 0));
        assert_eq!(
            find(&rows(&results), "e2e 202 -> visible in /stats, p99").met,
            Met::Yes
        );
        assert!(!rows(&results)
            .iter()
            .any(|row| row.figure.contains("left untracked")));
        // Samples due during a stall that the probe cap left out.
        results.insert("e2e".into(), e2e(20, 0));
        let rows_untracked = rows(&results);
        for label in ["p50", "p99"] {
            let row = format!("e2e 202 -> visible in /stats, {label}");
            assert_eq!(find(&rows_untracked, &row).met, Met::No);
        }
        assert_eq!(
            find(
                &rows_untracked,
                "    samples left untracked / readings not sent (caps)"
            )
            .value,
            "20 / 0"
        );
        // Readings not sent at the in-flight cap: the run fell short of its rate.
        results.insert("e2e".into(), e2e(0, 400));
        assert_eq!(
            find(&rows(&results), "e2e 202 -> visible in /stats, p50").met,
            Met::No
        );
    }

    #[test]
    fn end_to_end_latencies_are_not_met_when_ingest_turned_part_of_the_load_away() {
        let mut results = sample();
        let e2e = |accepted: u64| {
            json!({
                "target_rate": 4000.0, "tracked": 500, "visible": 500, "timed_out": 0,
                "posted": 80_000, "accepted": accepted,
                "errors": {"429": 80_000 - accepted},
                "visible_latency": {"p50_ms": 3.0, "p99_ms": 20.0}
            })
        };
        // 80 refused of 80,000 is 0.1%: still met.
        results.insert("e2e".into(), e2e(79_920));
        assert_eq!(
            find(&rows(&results), "e2e 202 -> visible in /stats, p99").met,
            Met::Yes
        );
        // Every probe seen, but 81 of the load refused.
        results.insert("e2e".into(), e2e(79_919));
        for label in ["p50", "p99"] {
            let row = format!("e2e 202 -> visible in /stats, {label}");
            assert_eq!(find(&rows(&results), &row).met, Met::No);
        }
    }

    #[test]
    fn the_stats_p99_is_met_only_when_next_to_every_answer_was_a_200() {
        let mut results = sample();
        let query = |ok: u64| {
            json!({"ok_per_s": 60000.0, "concurrency": 64, "requests": 100_000, "ok": ok,
                   "latency": {"p99_ms": 3.0}})
        };
        results.insert("query".into(), query(99_900));
        assert_eq!(find(&rows(&results), "    /stats p99").met, Met::Yes);
        // Fast refusals lower the p99 of every answer: past 0.1% it is not met.
        results.insert("query".into(), query(99_899));
        assert_eq!(find(&rows(&results), "    /stats p99").met, Met::No);
    }

    #[test]
    fn the_slow_probes_show_with_the_seconds_they_fell_in_only_when_counted() {
        let mut results = sample();
        results.insert(
            "e2e".into(),
            json!({"target_rate": 4000.0, "seconds": 20.004, "tracked": 500, "visible": 500,
                   "timed_out": 0, "visible_latency": {"p50_ms": 8.0, "p99_ms": 90.0}}),
        );
        assert!(!rows(&results)
            .iter()
            .any(|row| row.figure.contains("probes over")));
        results.insert(
            "e2e".into(),
            json!({"target_rate": 4000.0, "seconds": 20.004, "tracked": 500, "visible": 500,
                   "timed_out": 0, "visible_latency": {"p50_ms": 8.0, "p99_ms": 90.0},
                   "slow_ms": 50, "slow": 9, "slow_seconds": 2}),
        );
        let rows = rows(&results);
        let slow = find(&rows, "    probes over 50 ms / seconds they fell in");
        assert_eq!(slow.value, "9 / 2 of 20 s");
        assert_eq!(slow.met, Met::None);
        assert_eq!(
            find(&rows, "e2e 202 -> visible in /stats, p99").met,
            Met::No
        );
    }

    #[test]
    fn the_notify_in_each_transaction_shows_under_its_limit_only_when_measured() {
        let mut results = sample();
        assert!(!rows(&results)
            .iter()
            .any(|row| row.figure.contains("NOTIFY")));
        results.insert(
            "pg_notify_1_c64".into(),
            json!({"tps": 2900.0, "clients": 64, "readings_per_tx": 1}),
        );
        let rows = rows(&results);
        let position = |figure: &str| rows.iter().position(|row| row.figure.starts_with(figure));
        let notify = position("  same with a NOTIFY in each txn").expect("a NOTIFY row");
        assert_eq!(
            position("LIMIT pgbench 1 reading/txn, 64"),
            Some(notify - 1)
        );
        assert_eq!(
            rows[notify].figure,
            "  same with a NOTIFY in each txn (the old trigger), 64 clients"
        );
        assert_eq!(rows[notify].value, "2,900 txn/s");
        assert_eq!(rows[notify].met, Met::None);
    }

    #[test]
    fn limits_measured_again_at_the_end_show_the_drift_under_their_first_figure() {
        let mut results = sample();
        assert!(!rows(&results)
            .iter()
            .any(|row| row.figure.contains("at the end")));
        results.insert("static_end".into(), json!({"ok_per_s": 60000.0}));
        results.insert("pg_1_c64_end".into(), json!({"tps": 6600.0}));
        let rows = rows(&results);
        let position = |figure: &str| rows.iter().position(|row| row.figure.starts_with(figure));
        let static_at = position("LIMIT static HTTP").expect("static row");
        let again = &rows[static_at + 1];
        assert_eq!(again.figure, "  again at the end of the run");
        assert_eq!(again.value, "60,000 req/s");
        assert_eq!(again.limit, "at the start 80,000 req/s");
        assert_eq!(again.ratio, "75%");
        assert_eq!(again.met, Met::None);
        let pg_at = position("LIMIT pgbench 1 reading/txn, 64").expect("pgbench row");
        assert_eq!(rows[pg_at + 1].ratio, "110%");
        // Only the limits measured again get a row.
        let pg1_at = position("LIMIT pgbench 1 reading/txn, 1 ").expect("pgbench@1 row");
        assert!(rows[pg1_at + 1].figure.starts_with("LIMIT"));
    }

    #[test]
    fn medians_of_odd_even_and_empty_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn without_authentication_runs_there_is_no_authentication_row() {
        let rows = rows(&sample());
        assert!(!rows.iter().any(|row| row.figure.contains("auth on")));
    }

    #[test]
    fn rendering_aligns_and_counts() {
        let text = render(&rows(&sample()));
        let lines: Vec<&str> = text.lines().take(3).collect();
        assert!(lines[0].starts_with("| figure"));
        assert!(lines[1].starts_with("|---"));
        assert!(text.contains("targets met: "));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(14876.0), "14,876");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(-1234.0), "-1,234");
    }
}

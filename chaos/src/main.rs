//! `chaos`: the run behind `scripts/chaos` (issue 7). A fleet of devices that retry
//! until they get a `202` drives the whole pipeline while faults are injected one kind
//! at a time and then mixed; after each phase the fleet pauses, the run waits for the
//! pipeline to recover and checks the invariants, and at the end it prints one table:
//! fault, injections, readings acknowledged, lost, double-counted, time to recover.
//!
//! `scripts/chaos` owns the servers (its own PostgreSQL, NATS and Redis on spare
//! loopback ports), builds the binaries and passes everything here; run it, not this.
//!
//! # Layout
//! - `fleet`: the simulated devices and what they observed
//! - `control`: processes and servers of the run, and the signals that break them
//! - `faults`: each fault, injected
//! - `check`: the invariants

mod check;
mod control;
mod faults;
mod fleet;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use contract::settings::Settings;

use crate::check::{settle, Checker, Findings};
use crate::control::Lab;
use crate::faults::{Fault, Outcome, Run, SECOND_RELAY_APPLICATION};
use crate::fleet::{Fleet, ALLOWED_STATUSES};
use testkit::FaultProxy;

#[derive(Debug, Parser)]
#[command(about = "chaos run of the pipeline; start it with scripts/chaos")]
struct Args {
    /// The fast subset for CI: fewer faults, shorter outages.
    #[arg(long)]
    quick: bool,
    /// Only these faults, comma-separated (see --list).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Print the faults and exit.
    #[arg(long)]
    list: bool,
    /// Devices posting readings, at least one: a run with none would find nothing lost
    /// for want of anything acknowledged.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u16).range(1..))]
    devices: u16,
    /// Milliseconds between two readings of one device.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Longest wait for the pipeline to recover after a phase, in seconds.
    #[arg(long, default_value_t = 120)]
    recover_limit_secs: u64,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:21423")]
    nats_proxy: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:21380")]
    redis_proxy: SocketAddr,
    /// Admin address of the second relay.
    #[arg(long, default_value = "127.0.0.1:21093")]
    second_relay: SocketAddr,
    /// Admin address of the second projector.
    #[arg(long, default_value = "127.0.0.1:21094")]
    second_projector: SocketAddr,
}

/// One line of the table.
struct Row {
    fault: Fault,
    injections: u32,
    acknowledged: u64,
    findings: Findings,
    recovered_in: Option<Duration>,
    notes: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list {
        for fault in Fault::ALL {
            println!("{:<28} {}", fault.name(), fault.describe());
        }
        return Ok(());
    }
    let faults = Fault::chosen(&args.faults, args.quick)?;
    let settings = Settings::load().context("loading settings")?;
    let repo_root = std::env::current_dir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| repo_root.join(".data/chaos"));
    let bin_dir = args
        .bin_dir
        .clone()
        .unwrap_or_else(|| repo_root.join("target/release"));

    let nats_upstream = upstream(&settings.nats.url, 4222)?;
    let redis_upstream = upstream(&settings.redis.url, 6379)?;
    let nats_proxy = FaultProxy::start(args.nats_proxy, nats_upstream).await?;
    let redis_proxy = FaultProxy::start(args.redis_proxy, redis_upstream).await?;
    let direct_env: Vec<(String, String)> = std::env::vars()
        .filter(|(key, _)| key.starts_with("PIPELINE__"))
        .collect();
    let proxied_env = direct_env
        .iter()
        .cloned()
        .chain([
            (
                "PIPELINE__NATS__URL".to_owned(),
                format!("nats://{}", nats_proxy.listen),
            ),
            (
                "PIPELINE__REDIS__URL".to_owned(),
                format!("redis://{}", redis_proxy.listen),
            ),
        ])
        .collect();
    let lab = Lab::new(
        repo_root,
        data_dir,
        bin_dir,
        proxied_env,
        direct_env,
        nats_upstream.port(),
        redis_upstream.port(),
    );

    eprintln!("==> starting the pipeline (scripts/up) and a second relay and projector");
    lab.up().await?;
    let separator = if settings.database.url.contains('?') {
        '&'
    } else {
        '?'
    };
    lab.start_extra(
        "relay-b",
        "relay",
        &[
            (
                "PIPELINE__RELAY__ADMIN_LISTEN",
                args.second_relay.to_string(),
            ),
            (
                "PIPELINE__DATABASE__URL",
                format!(
                    "{}{separator}application_name={SECOND_RELAY_APPLICATION}",
                    settings.database.url
                ),
            ),
        ],
    )?;
    lab.start_extra(
        "projector-b",
        "projector",
        &[(
            "PIPELINE__PROJECTOR__ADMIN_LISTEN",
            args.second_projector.to_string(),
        )],
    )?;

    let checker = Checker {
        database_url: settings.database.url.clone(),
        jetstream: async_nats::jetstream::new(
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(settings.nats.url.as_str())
                .await?,
        ),
        stream: settings.nats.stream.clone(),
        consumer: settings.nats.consumer.clone(),
        query_url: format!("http://{}", settings.query.listen),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
    };
    let run_id = format!("{:x}", rand::random::<u32>());
    let fleet = Fleet::start(
        &format!("http://{}", settings.ingest.listen),
        &run_id,
        usize::from(args.devices),
        Duration::from_millis(args.interval_ms),
    );
    let run = Run {
        lab: &lab,
        second_relay: args.second_relay,
        second_projector: args.second_projector,
        settings: &settings,
        fleet: &fleet,
        nats_proxy: &nats_proxy,
        redis_proxy: &redis_proxy,
        quick: args.quick,
        checker: &checker,
        recover_limit: Duration::from_secs(args.recover_limit_secs),
    };

    let mut rows = Vec::new();
    let mut reported = Findings::default();
    let mut acknowledged_before = 0u64;
    for fault in faults {
        eprintln!("==> {}: {}", fault.name(), fault.describe());
        fleet.resume();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut outcome = Outcome::default();
        let injected = run.inject(fault, &mut outcome).await;
        // The fault is over (the process restarted, the server is back, the link
        // healed): the recovery measured from here covers the devices' retries too.
        let fault_over = Instant::now();
        let settled = settle(&checker, &fleet, fault_over, run.recover_limit).await;
        let Outcome {
            injections,
            mut notes,
            checked,
        } = outcome;
        let observed = fleet.observed();
        let recovered_in = settled.recovered_in;
        let mut findings = settled.findings;
        findings.merge(checked);
        if let Err(error) = injected {
            findings
                .problems
                .push(format!("injection failed: {error:#}"));
        }
        notes.extend(settled.note);
        // Lost and double-counted are totals over the run; a row shows what its phase
        // added to the previous phase's totals. Those may have gone down (a rebuild of
        // the read model counts each event once again), so the base is the previous
        // totals, not the highest: new double counts after a rebuild showed as 0.
        let row_findings = Findings {
            lost: findings.lost.saturating_sub(reported.lost),
            double_counted: findings
                .double_counted
                .saturating_sub(reported.double_counted),
            problems: findings.problems.clone(),
        };
        reported.lost = findings.lost;
        reported.double_counted = findings.double_counted;
        for problem in &row_findings.problems {
            eprintln!("    problem: {problem}");
        }
        let acknowledged = observed.acked.len() as u64 - acknowledged_before;
        acknowledged_before = observed.acked.len() as u64;
        eprintln!(
            "<== {}: {injections} injections, {acknowledged} acknowledged, {} lost, {} double-counted, recovered in {}",
            fault.name(),
            row_findings.lost,
            row_findings.double_counted,
            recovered_in.map_or("-".to_owned(), |took| format!("{:.1} s", took.as_secs_f64()))
        );
        rows.push(Row {
            fault,
            injections,
            acknowledged,
            findings: row_findings,
            recovered_in,
            notes,
        });
    }
    let observed = fleet.observed();
    fleet.stop().await;
    lab.stop_extras();

    let passed = print_table(&rows, &observed);
    if passed {
        println!("\nchaos: PASSED");
        Ok(())
    } else {
        println!("\nchaos: FAILED");
        std::process::exit(1);
    }
}

fn print_table(rows: &[Row], observed: &fleet::Observed) -> bool {
    println!();
    println!(
        "| {:<26} | {:>10} | {:>12} | {:>4} | {:>14} | {:>16} |",
        "fault", "injections", "acknowledged", "lost", "double-counted", "time to recover"
    );
    println!(
        "|{:-<28}|{:->12}|{:->14}|{:->6}|{:->16}|{:->18}|",
        "", ":", ":", ":", ":", ":"
    );
    let mut passed = true;
    for row in rows {
        let recovered = row.recovered_in.map_or("not recovered".to_owned(), |took| {
            format!("{:.1} s", took.as_secs_f64())
        });
        println!(
            "| {:<26} | {:>10} | {:>12} | {:>4} | {:>14} | {:>16} |",
            row.fault.name(),
            row.injections,
            row.acknowledged,
            row.findings.lost,
            row.findings.double_counted,
            recovered
        );
        // A row passes only on evidence: its fault was injected and readings were
        // acknowledged in its phase (nothing lost of nothing proves nothing).
        passed &= row.findings.is_clean()
            && row.recovered_in.is_some()
            && row.injections > 0
            && row.acknowledged > 0;
    }
    println!();
    for row in rows {
        for note in &row.notes {
            println!("{}: {note}", row.fault.name());
        }
        // Printed with the table, which is what `.data/chaos-last-run.txt` keeps: a row
        // failed for a problem alone shows 0 lost and 0 double-counted.
        for problem in &row.findings.problems {
            println!("{}: problem: {problem}", row.fault.name());
        }
    }
    let statuses: Vec<String> = observed
        .statuses
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    println!(
        "answers seen by the devices: {}; requests without an answer (refused, reset, timed out): {}",
        statuses.join(", "),
        observed.transport_errors
    );
    let outside = observed
        .statuses
        .keys()
        .filter(|status| !ALLOWED_STATUSES.contains(status))
        .count();
    if outside > 0 || !observed.unexpected.is_empty() {
        passed = false;
        println!("answers outside 202/409/429/503:");
        for answer in observed.unexpected.iter().take(20) {
            println!("  {answer}");
        }
    }
    passed
}

fn upstream(url: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?', ','])
        .next()
        .unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    with_port
        .parse()
        .with_context(|| format!("{url} is not a loopback address the chaos run can proxy"))
}

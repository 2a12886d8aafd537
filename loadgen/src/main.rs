//! `loadgen`: the measuring instrument of `scripts/bench` and `scripts/ab` (issue 5).
//!
//! Every subcommand prints one JSON object on stdout and human notes on stderr. It only
//! ever loads loopback addresses, and every loop is bounded in count and in time.
//!
//! # Layout
//! - `main.rs`: the command line (clap) and one function per subcommand.
//! - [`http`]: a lean HTTP/1.1 client, one keep-alive connection per worker.
//! - [`load`]: the closed-loop driver (`ingest`, `static`, `query`).
//! - [`workloads`]: single POSTs, batch POSTs and `/stats` GETs.
//! - [`bodies`]: device ids, idempotency keys, realistic reading JSON.
//! - [`static_server`]: the in-process fixed-`202` server of the "static HTTP" limit.
//! - [`e2e`]: fixed-rate posting with `/stats` visibility probes.
//! - [`nats`]: the JetStream publish limit, consumer backlog, stream deletion.
//! - [`redis_limit`]: the `EVALSHA` limit and prefix cleanup.
//! - [`backlog`]: backlog fill (ingest's group commit), drain timing, watching.
//! - [`report`]: the closing table.
//! - [`compare`]: the table of `scripts/ab`, two settings in alternating pairs.
//! - [`stats`]: HdrHistogram latencies, status counts, rates.

mod backlog;
mod bodies;
mod box_cpu;
mod compare;
mod e2e;
mod http;
mod load;
mod nats;
mod redis_limit;
mod report;
mod static_server;
mod stats;
mod workloads;

use std::path::PathBuf;
use std::sync::Arc;

use hyper::header::HeaderValue;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backlog::{Drainer, Sources};
use crate::http::{Pool, Target};
use crate::load::{Drive, Workload};
use crate::workloads::{BatchPost, SinglePost, StatsGet};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load generator and meters for scripts/bench (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every closed HTTP loop shares.
#[derive(clap::Args, Debug, Clone)]
struct LoopArgs {
    /// Concurrent clients, each on its own keep-alive connection.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Upper bound on requests, whatever the duration.
    #[arg(long, default_value_t = 50_000_000)]
    max_requests: u64,
}

impl LoopArgs {
    fn drive(&self) -> Drive {
        Drive {
            concurrency: self.concurrency.clamp(1, 4096),
            duration: seconds(self.duration),
            max_requests: self.max_requests,
        }
    }
}

/// The device pool the load spreads over.
#[derive(clap::Args, Debug, Clone)]
struct DeviceArgs {
    /// Devices in the pool: `<prefix>0 .. <prefix><N-1>`.
    #[arg(long, default_value_t = 10_000)]
    devices: u64,
    #[arg(long, default_value = "bench-dev-")]
    device_prefix: String,
}

/// Where the backlogs are.
#[derive(clap::Args, Debug, Clone)]
struct SourceArgs {
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    nats: Option<String>,
    #[arg(long, default_value = "BENCH")]
    stream: String,
    #[arg(long, default_value = "projector")]
    consumer: String,
}

impl SourceArgs {
    fn sources(&self) -> Sources {
        Sources {
            database_url: self.database_url.clone(),
            nats_url: self.nats.clone(),
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// POST readings to ingest: single (`/v1/telemetry`) or `--batch K`.
    Ingest {
        #[arg(long, default_value = "http://127.0.0.1:18080")]
        url: String,
        #[command(flatten)]
        run: LoopArgs,
        #[command(flatten)]
        devices: DeviceArgs,
        /// Readings per `POST /v1/telemetry/batch`; single POSTs without it.
        #[arg(long)]
        batch: Option<usize>,
    },
    /// The static-HTTP limit: an in-process fixed-202 server under the same client.
    Static {
        #[command(flatten)]
        run: LoopArgs,
        /// `GET /v1/devices/{id}/stats` answered with a fixed `200` document (the limit
        /// of the query figure) instead of the single POST of ingest's.
        #[arg(long)]
        stats: bool,
    },
    /// End-to-end latency: fixed-rate POSTs, `/stats` polled until visible.
    E2e {
        #[arg(long, default_value = "http://127.0.0.1:18080")]
        ingest_url: String,
        #[arg(long, default_value = "http://127.0.0.1:18081")]
        query_url: String,
        /// Readings per second.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// About how many readings a second are followed to visibility (each is
        /// polled until seen: keep the probe small beside the load).
        #[arg(long, default_value_t = 25.0)]
        track_per_s: f64,
        /// Give up on a reading after this long (counted as timed out).
        #[arg(long, default_value_t = 5000)]
        deadline_ms: u64,
        #[arg(long, default_value_t = 2048)]
        max_in_flight: usize,
        /// Most readings followed to visibility at once.
        #[arg(long, default_value_t = 32)]
        max_probes: usize,
        #[command(flatten)]
        devices: DeviceArgs,
    },
    /// GET `/v1/devices/{id}/stats` over the device pool.
    Query {
        #[arg(long, default_value = "http://127.0.0.1:18081")]
        url: String,
        #[command(flatten)]
        run: LoopArgs,
        #[command(flatten)]
        devices: DeviceArgs,
    },
    /// The JetStream publish limit, into a throw-away stream it creates and deletes.
    Publish {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        #[arg(long, default_value = "BENCH_PUB")]
        stream: String,
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// Un-awaited PubAcks at most (capped at 2,000).
        #[arg(long, default_value_t = nats::MAX_WINDOW)]
        window: usize,
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// The Redis script-call limit: EVALSHA pipelined; its keys are removed after.
    Redis {
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        url: String,
        #[arg(long, default_value = "bench:limit:")]
        prefix: String,
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        #[arg(long, default_value_t = 200)]
        pipeline: usize,
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// Writes N readings (reading, key, outbox row) through ingest's group commit.
    Fill {
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        #[arg(long, default_value_t = 4_000)]
        in_flight: usize,
        #[command(flatten)]
        devices: DeviceArgs,
    },
    /// Times the relay or projector draining its backlog (start it after --ready-file),
    /// and how busy the box was from then until the backlog was gone.
    Backlog {
        #[arg(long, value_enum)]
        what: Drainer,
        #[command(flatten)]
        sources: SourceArgs,
        /// Created once the initial backlog has been read: start the drainer then.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long, default_value_t = 60.0)]
        start_timeout: f64,
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Samples outbox backlog and consumer pending every interval (and how busy the box
    /// was meanwhile).
    Watch {
        #[command(flatten)]
        sources: SourceArgs,
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop once both are zero; exit 3 if they are not by the end.
        #[arg(long)]
        until_empty: bool,
        /// With --until-empty: also wait for the read model generation under this prefix.
        #[arg(long)]
        redis: Option<String>,
        #[arg(long)]
        redis_prefix: Option<String>,
    },
    /// Deletes the bench's streams and Redis keys.
    Cleanup {
        #[arg(long)]
        nats: Option<String>,
        #[arg(long)]
        stream: Vec<String>,
        #[arg(long)]
        redis: Option<String>,
        #[arg(long)]
        redis_prefix: Vec<String>,
    },
    /// Prints the closing table from a directory of results.
    Report {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Prints the table of `scripts/ab` from a directory of paired runs
    /// (`<pair>-<position>-<a|b>.json`).
    Compare {
        #[arg(long)]
        dir: PathBuf,
        /// What arm A is (the settings it ran with).
        #[arg(long, default_value = "A")]
        a: String,
        /// What arm B is.
        #[arg(long, default_value = "B")]
        b: String,
    },
    /// Prints one number or string of a JSON file (a JSON pointer, e.g. /ok_per_s).
    Field { file: PathBuf, pointer: String },
    /// Prints how busy the whole box is over the next SECONDS, as a whole percentage
    /// (all but idle and iowait time, every core; scripts/bench waits for a quiet box).
    Busy {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.clamp(0.0, 86_400.0))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(Some(value)) => println!("{value}"),
        Ok(None) => {}
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            std::process::exit(1);
        }
    }
}

async fn run(command: Command) -> anyhow::Result<Option<Value>> {
    match command {
        Command::Ingest {
            url,
            run,
            devices,
            batch,
        } => ingest(&url, &run, &devices, batch).await.map(Some),
        Command::Static { run, stats } => static_limit(&run, stats).await.map(Some),
        Command::E2e {
            ingest_url,
            query_url,
            rate,
            duration,
            track_per_s,
            deadline_ms,
            max_in_flight,
            max_probes,
            devices,
        } => {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
                anyhow::bail!("--rate must be in (0, 1000000], got {rate}");
            }
            let ingest = Pool::new(Target::parse(&ingest_url)?, 512);
            let query = Pool::new(Target::parse(&query_url)?, 256);
            let plan = e2e::Plan {
                rate,
                duration: seconds(duration),
                track_per_s,
                deadline: Duration::from_millis(deadline_ms.clamp(10, 60_000)),
                max_in_flight,
                max_probes,
                device_prefix: devices.device_prefix,
                devices: devices.devices.max(1),
            };
            eprintln!("loadgen: e2e at {rate:.0} readings/s for {duration} s");
            Ok(Some(e2e::run(ingest, query, plan).await))
        }
        Command::Query { url, run, devices } => {
            let workload = Arc::new(StatsGet {
                device_prefix: devices.device_prefix,
                devices: devices.devices.max(1),
            });
            drive(&url, workload, &run).await.map(Some)
        }
        Command::Publish {
            nats,
            stream,
            count,
            window,
            timeout,
        } => nats::publish_limit(&nats, &stream, count, window, seconds(timeout))
            .await
            .map(Some),
        Command::Redis {
            url,
            prefix,
            count,
            pipeline,
            timeout,
        } => redis_limit::evalsha_limit(&url, &prefix, count, pipeline, seconds(timeout))
            .await
            .map(Some),
        Command::Fill {
            database_url,
            count,
            in_flight,
            devices,
        } => backlog::fill(
            &database_url,
            count,
            &devices.device_prefix,
            devices.devices.max(1),
            in_flight,
        )
        .await
        .map(Some),
        Command::Backlog {
            what,
            sources,
            ready_file,
            start_timeout,
            timeout,
            interval_ms,
        } => backlog::drain(
            what,
            &sources.sources(),
            ready_file.as_deref(),
            seconds(start_timeout),
            seconds(timeout),
            Duration::from_millis(interval_ms.clamp(1, 10_000)),
        )
        .await
        .map(Some),
        Command::Watch {
            sources,
            duration,
            interval_ms,
            until_empty,
            redis,
            redis_prefix,
        } => {
            let redis = match (&redis, &redis_prefix) {
                (Some(url), Some(prefix)) => Some((url.as_str(), prefix.as_str())),
                _ => None,
            };
            let (report, emptied) = backlog::watch(
                &sources.sources(),
                redis,
                seconds(duration),
                Duration::from_millis(interval_ms.clamp(10, 60_000)),
                until_empty,
            )
            .await?;
            println!("{report}");
            if until_empty && !emptied {
                std::process::exit(3);
            }
            Ok(None)
        }
        Command::Cleanup {
            nats,
            stream,
            redis,
            redis_prefix,
        } => cleanup(nats.as_deref(), &stream, redis.as_deref(), &redis_prefix)
            .await
            .map(Some),
        Command::Report { dir } => {
            let results = report::load(&dir)?;
            print!("{}", report::render(&report::rows(&results)));
            Ok(None)
        }
        Command::Compare { dir, a, b } => {
            let results = report::load(&dir)?;
            print!("{}", compare::render(&compare::pairs(&results), &a, &b));
            Ok(None)
        }
        Command::Busy { seconds: span } => {
            let measured = box_cpu::Span::start();
            tokio::time::sleep(seconds(span)).await;
            let usage = measured
                .usage()
                .context("/proc/stat cannot be read or did not move")?;
            println!("{:.0}", usage.busy_percent);
            Ok(None)
        }
        Command::Field { file, pointer } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            match value.pointer(&pointer) {
                Some(Value::String(text)) => println!("{text}"),
                Some(other) => println!("{other}"),
                None => anyhow::bail!("{} has no {pointer}", file.display()),
            }
            Ok(None)
        }
    }
}

async fn drive(url: &str, workload: Arc<dyn Workload>, args: &LoopArgs) -> anyhow::Result<Value> {
    let target = Target::parse(url)?;
    let ok_status = workload.ok_status();
    let drive = args.drive();
    eprintln!(
        "loadgen: {} clients for {:?} against {}",
        drive.concurrency, drive.duration, target.address
    );
    let report = load::run(target, workload, drive).await;
    if report.ok == 0 {
        eprintln!(
            "loadgen: no successful answer; first problem: {}",
            report.first_error.as_deref().unwrap_or("none recorded")
        );
    }
    Ok(report.to_json(ok_status, drive.concurrency))
}

async fn ingest(
    url: &str,
    args: &LoopArgs,
    devices: &DeviceArgs,
    batch: Option<usize>,
) -> anyhow::Result<Value> {
    let run = bodies::run_id();
    let Some(size) = batch else {
        let authorization = std::env::var("LOADGEN_AUTHORIZATION")
            .ok()
            .and_then(|value| HeaderValue::from_str(&value).ok());
        let workload = Arc::new(SinglePost {
            run,
            device_prefix: devices.device_prefix.clone(),
            devices: devices.devices.max(1),
            authorization,
        });
        return drive(url, workload, args).await;
    };
    let size = size.clamp(1, 1000);
    let workload = Arc::new(BatchPost {
        run: format!("{run}b"),
        device_prefix: devices.device_prefix.clone(),
        devices: devices.devices.max(1),
        size,
    });
    // One probe first: the batch endpoint may not exist yet.
    let target = Target::parse(url)?;
    let mut sender = http::connect(&target).await?;
    let probe = target.request(
        Method::POST,
        "/v1/telemetry/batch",
        Some(
            bodies::batch_json(
                &run,
                0,
                0,
                1,
                &devices.device_prefix,
                1,
                &mut bodies::Rng::new(9),
            )
            .into(),
        ),
    );
    let (status, _) = http::exchange(&mut sender, probe).await?;
    if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
        eprintln!(
            "loadgen: batch endpoint not available (POST /v1/telemetry/batch answered {status})"
        );
        return Ok(json!({
            "available": false,
            "note": "batch endpoint not available",
            "status": status.as_u16(),
            "batch": size,
        }));
    }
    let mut report = drive(url, workload, args).await?;
    if let Value::Object(fields) = &mut report {
        fields.insert("available".into(), json!(true));
        fields.insert("batch".into(), json!(size));
    }
    Ok(report)
}

async fn static_limit(args: &LoopArgs, stats: bool) -> anyhow::Result<Value> {
    let server = static_server::StaticServer::start()?;
    let url = format!("http://{}", server.address);
    let device_prefix = "bench-dev-".to_owned();
    let workload: Arc<dyn Workload> = if stats {
        Arc::new(StatsGet {
            device_prefix,
            devices: 10_000,
        })
    } else {
        Arc::new(SinglePost {
            run: bodies::run_id(),
            device_prefix,
            devices: 10_000,
            authorization: None,
        })
    };
    let report = drive(&url, workload, args).await;
    drop(server);
    report
}

async fn cleanup(
    nats_url: Option<&str>,
    streams: &[String],
    redis_url: Option<&str>,
    prefixes: &[String],
) -> anyhow::Result<Value> {
    let mut report = serde_json::Map::new();
    if let (Some(url), false) = (nats_url, streams.is_empty()) {
        let deleted = nats::delete_streams(url, streams).await?;
        report.insert("streams_deleted".into(), json!(deleted));
    }
    if let (Some(url), false) = (redis_url, prefixes.is_empty()) {
        let mut connection = redis_limit::connect(url).await?;
        let mut removed = 0;
        for prefix in prefixes {
            removed += redis_limit::delete_prefix(&mut connection, prefix).await?;
        }
        report.insert("redis_keys_removed".into(), json!(removed));
    }
    Ok(Value::Object(report))
}

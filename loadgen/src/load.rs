//! The closed-loop driver: N workers, each on its own keep-alive connection, each
//! sending its next request as soon as the previous one is answered, until the
//! duration is over or the request budget is spent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};

use crate::bodies::Rng;
use crate::box_cpu;
use crate::http::{connect, exchange, Sender, Target};
use crate::stats::{per_second, Latency, Statuses};

/// What the workers send and how an answer counts.
pub trait Workload: Send + Sync + 'static {
    /// The `seq`-th request of `worker`.
    fn request(
        &self,
        target: &Target,
        worker: usize,
        seq: u64,
        rng: &mut Rng,
    ) -> Request<Full<Bytes>>;
    /// The status a successful answer has.
    fn ok_status(&self) -> StatusCode;
    /// Readings a successful answer carried (1 for a single POST, K for a batch).
    fn readings(&self, body: &[u8]) -> u64;
}

/// How long and how hard to drive.
#[derive(Debug, Clone, Copy)]
pub struct Drive {
    pub concurrency: usize,
    pub duration: Duration,
    /// Upper bound on requests whatever the duration.
    pub max_requests: u64,
}

/// What one closed loop measured.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub ok: u64,
    pub readings: u64,
    pub statuses: Statuses,
    pub latency: Latency,
    pub elapsed: Duration,
    /// How busy the whole box was meanwhile (`None` off Linux).
    pub box_cpu: Option<box_cpu::Usage>,
    /// The first answer that was not a success, to show what went wrong.
    pub first_error: Option<String>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.readings += other.readings;
        self.statuses.merge(&other.statuses);
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    pub fn to_json(&self, ok_status: StatusCode, concurrency: usize) -> Value {
        json!({
            "concurrency": concurrency,
            "seconds": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "requests": self.requests,
            "ok": self.ok,
            "readings": self.readings,
            "errors": self.statuses.errors_json(ok_status.as_str()),
            "first_error": self.first_error,
            "req_per_s": per_second(self.requests, self.elapsed),
            "ok_per_s": per_second(self.ok, self.elapsed),
            "readings_per_s": per_second(self.readings, self.elapsed),
            "latency": self.latency.summary(),
            "box_cpu": self.box_cpu.as_ref().map(box_cpu::Usage::to_json),
        })
    }
}

/// Runs the closed loop against `target`.
pub async fn run(target: Target, workload: Arc<dyn Workload>, drive: Drive) -> Report {
    let target = Arc::new(target);
    let budget = Arc::new(AtomicU64::new(0));
    let box_cpu = box_cpu::Span::start();
    let started = Instant::now();
    let deadline = started + drive.duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..drive.concurrency.max(1) {
        workers.spawn(work(
            target.clone(),
            workload.clone(),
            worker,
            deadline,
            budget.clone(),
            drive.max_requests,
        ));
    }
    let mut report = Report::default();
    while let Some(done) = workers.join_next().await {
        if let Ok(part) = done {
            report.merge(part);
        }
    }
    report.elapsed = started.elapsed();
    report.box_cpu = box_cpu.usage();
    report
}

async fn work(
    target: Arc<Target>,
    workload: Arc<dyn Workload>,
    worker: usize,
    deadline: Instant,
    budget: Arc<AtomicU64>,
    max_requests: u64,
) -> Report {
    let mut report = Report::default();
    let mut rng = Rng::new(worker as u64 + 1);
    let mut sender: Option<Sender> = None;
    let ok_status = workload.ok_status();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now >= deadline || budget.fetch_add(1, Ordering::Relaxed) >= max_requests {
            break;
        }
        let mut connection = match sender.take() {
            Some(open) if !open.is_closed() => open,
            _ => match connect(&target).await {
                Ok(open) => open,
                Err(error) => {
                    report.statuses.add("connect_error");
                    report
                        .first_error
                        .get_or_insert_with(|| format!("{error:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let request = workload.request(&target, worker, seq, &mut rng);
        seq += 1;
        report.requests += 1;
        let sent = Instant::now();
        // A hung server cannot keep the loop past its deadline by more than 10 s.
        let limit = deadline.saturating_duration_since(sent) + Duration::from_secs(10);
        match tokio::time::timeout(limit, exchange(&mut connection, request)).await {
            Ok(Ok((status, body))) => {
                report.latency.record(sent.elapsed());
                report.statuses.add(status.as_str());
                if status == ok_status {
                    report.ok += 1;
                    report.readings += workload.readings(&body);
                } else if report.first_error.is_none() {
                    report.first_error = Some(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    ));
                }
                sender = Some(connection);
            }
            Ok(Err(error)) => {
                report.statuses.add("io_error");
                report
                    .first_error
                    .get_or_insert_with(|| format!("{error:#}"));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(_) => {
                report.statuses.add("timeout");
                break;
            }
        }
    }
    report
}

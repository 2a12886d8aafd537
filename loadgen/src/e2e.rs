//! End-to-end latency: readings posted at a fixed rate (open loop); a sample of them go
//! to fresh devices whose `/stats` is polled every millisecond until it answers `200`
//! with `sample_count ≥ 1`. The figure is the time from the `202` to that answer.
//!
//! Only the sample is polled (about `track_per_s` readings a second, at most
//! `max_probes` at once), every 1 ms at first and less often once a reading is late
//! (see [`poll_interval`]); the other readings go to the normal device pool. The probe
//! must stay small beside the load it measures: each tracked reading costs one `GET`
//! per poll, ~30 of them at a 50 ms latency. At 2,000 readings/s, 100 tracked a second
//! sent more `GET`s than there were `POST`s (query at 12% of a core instead of 4–5%) and
//! raised the p50 it measured from 26–33 to 46 ms; 25 a second (the default) keep the
//! probe at a fraction of the load, so a run needs 20 s for ~500 samples.
//!
//! Besides the percentiles the summary counts the probes over [`SLOW`] (the p99 target)
//! and the distinct seconds of the run they fell in ([`slow_spread`]), which tells a
//! flush that held back every stage for a second from a tail spread over the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::bodies::{device_id, idempotency_key, now_rfc3339, reading_json, Rng};
use crate::http::Pool;
use crate::stats::{per_second, Latency, Statuses};

/// The knobs of one e2e run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rate: f64,
    pub duration: Duration,
    pub track_per_s: f64,
    pub deadline: Duration,
    pub max_in_flight: usize,
    /// Most readings followed at once; beyond it a due sample is posted untracked.
    pub max_probes: usize,
    pub device_prefix: String,
    pub devices: u64,
}

/// Every how many readings one is tracked, for about `track_per_s` a second.
pub fn track_every(rate: f64, track_per_s: f64) -> u64 {
    if track_per_s <= 0.0 || rate <= track_per_s {
        1
    } else {
        (rate / track_per_s).round().max(1.0) as u64
    }
}

/// Every 1 ms for the first 20 ms, then every 2 ms up to 100 ms, then every 5 ms: fine
/// resolution where the targets are, and a slow pipeline is not polled into the ground.
pub fn poll_interval(waited: Duration) -> Duration {
    match waited.as_millis() {
        0..20 => Duration::from_millis(1),
        20..100 => Duration::from_millis(2),
        _ => Duration::from_millis(5),
    }
}

/// The end-to-end p99 target (the report judges the p99 by it); a probe slower than this
/// is counted as slow.
pub const SLOW: Duration = Duration::from_millis(50);

/// How the probes slower than [`SLOW`] spread over a run: how many there were, and in
/// how many distinct seconds of it their `202`s came (`probes` holds, per visible
/// probe, when its `202` came after the start and how long it then took to show). Many
/// slow probes in few seconds are an episode that held back every stage at once (a
/// flush of the disk); as many seconds as slow probes are a steady tail.
pub fn slow_spread(probes: &[(Duration, Duration)]) -> (u64, u64) {
    let mut seconds: Vec<u64> = probes
        .iter()
        .filter(|(_, latency)| *latency > SLOW)
        .map(|(accepted_after, _)| accepted_after.as_secs())
        .collect();
    let slow = seconds.len() as u64;
    seconds.sort_unstable();
    seconds.dedup();
    (slow, seconds.len() as u64)
}

/// How many readings are due `elapsed` into a run at `rate`/s, capped at `total`.
pub fn due(rate: f64, elapsed: Duration, total: u64) -> u64 {
    ((rate * elapsed.as_secs_f64()) as u64).min(total)
}

#[derive(Debug)]
enum Visible {
    NotTracked,
    /// Shown `latency` after its `202`, which came at `accepted_at`.
    After {
        accepted_at: Instant,
        latency: Duration,
    },
    TimedOut,
}

#[derive(Debug)]
struct Outcome {
    status: String,
    accepted: bool,
    post_latency: Option<Duration>,
    visible: Visible,
}

#[derive(Deserialize)]
struct StatsAnswer {
    #[serde(default)]
    sample_count: u64,
}

pub async fn run(ingest: Arc<Pool>, query: Arc<Pool>, plan: Plan) -> Value {
    let box_cpu = crate::box_cpu::Span::start();
    let started = Instant::now();
    let run = crate::bodies::run_id();
    let total = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    let every = track_every(plan.rate, plan.track_per_s);
    let in_flight = Arc::new(Semaphore::new(plan.max_in_flight.max(1)));
    let probes = Arc::new(Semaphore::new(plan.max_probes.max(1)));
    let mut tasks = JoinSet::new();
    let mut statuses = Statuses::default();
    let mut post_latency = Latency::new();
    let mut visible = Latency::new();
    let (mut tracked, mut timed_out, mut accepted, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    let mut probe_cap_hits = 0u64;
    let mut shown = Vec::new();
    let mut absorb = |outcome: Outcome| {
        statuses.add(&outcome.status);
        if outcome.accepted {
            accepted += 1;
        }
        if let Some(latency) = outcome.post_latency {
            post_latency.record(latency);
        }
        match outcome.visible {
            Visible::NotTracked => {}
            Visible::After {
                accepted_at,
                latency,
            } => {
                visible.record(latency);
                shown.push((accepted_at.saturating_duration_since(started), latency));
            }
            Visible::TimedOut => timed_out += 1,
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut rng = Rng::new(0xE2E);
    while sent < total {
        tick.tick().await;
        let due_now = due(plan.rate, started.elapsed(), total);
        while sent < due_now {
            let seq = sent;
            sent += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                // Open loop: a reading that cannot be sent now is counted, not queued.
                skipped += 1;
                continue;
            };
            let mut probe = None;
            if seq % every == 0 {
                match probes.clone().try_acquire_owned() {
                    Ok(permit) => probe = Some(permit),
                    Err(_) => probe_cap_hits += 1,
                }
            }
            let track = probe.is_some();
            if track {
                tracked += 1;
            }
            let device = if track {
                format!("e2e-{run}-{seq}")
            } else {
                device_id(&plan.device_prefix, rng.below(plan.devices))
            };
            let body = reading_json(&device, &now_rfc3339(), &mut rng);
            let key = idempotency_key(&run, 0, seq);
            let ingest = ingest.clone();
            let query = query.clone();
            let deadline = plan.deadline;
            let post = Post {
                device,
                body,
                key,
                track,
                due_at: started + Duration::from_secs_f64((seq + 1) as f64 / plan.rate),
            };
            tasks.spawn(async move {
                let outcome = post_and_probe(&ingest, &query, post, deadline).await;
                drop((permit, probe));
                outcome
            });
        }
        while let Some(done) = tasks.try_join_next() {
            if let Ok(outcome) = done {
                absorb(outcome);
            }
        }
    }
    let posting = started.elapsed();
    let box_cpu = box_cpu.to_json();
    // Every task ends by its own deadline; this bound is only a safety net.
    let _ = tokio::time::timeout(plan.deadline + Duration::from_secs(15), async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(outcome) = done {
                absorb(outcome);
            }
        }
    })
    .await;
    tasks.abort_all();
    let (slow, slow_seconds) = slow_spread(&shown);
    json!({
        "target_rate": plan.rate,
        "seconds": (posting.as_secs_f64() * 1000.0).round() / 1000.0,
        "posted": sent - skipped,
        "accepted": accepted,
        "accepted_per_s": per_second(accepted, posting),
        "skipped_in_flight_cap": skipped,
        "errors": statuses.errors_json("202"),
        "post_latency": post_latency.summary(),
        "tracked": tracked,
        "untracked_probe_cap": probe_cap_hits,
        "visible": visible.count(),
        "timed_out": timed_out,
        "deadline_ms": plan.deadline.as_millis() as u64,
        "visible_latency": visible.summary(),
        "slow_ms": SLOW.as_millis() as u64,
        "slow": slow,
        "slow_seconds": slow_seconds,
        "box_cpu": box_cpu,
    })
}

/// One reading to post, and whether to follow it into `/stats`.
struct Post {
    device: String,
    body: String,
    key: String,
    track: bool,
    /// When the open loop's clock made it due: its POST latency counts from here, so
    /// any lag of the loop behind the clock is in it (no coordinated omission).
    due_at: Instant,
}

async fn post_and_probe(ingest: &Pool, query: &Pool, post: Post, deadline: Duration) -> Outcome {
    let Post {
        device,
        body,
        key,
        track,
        due_at,
    } = post;
    let mut request = ingest
        .target()
        .request(Method::POST, "/v1/telemetry", Some(body.into()));
    if let Ok(value) = HeaderValue::from_str(&key) {
        request.headers_mut().insert("idempotency-key", value);
    }
    let answer = tokio::time::timeout(deadline, ingest.send(request)).await;
    let (status, accepted_at) = match answer {
        Ok(Ok((status, _))) => (status, Instant::now()),
        Ok(Err(_)) => return failed("io_error"),
        Err(_) => return failed("timeout"),
    };
    let accepted = status == StatusCode::ACCEPTED;
    let mut outcome = Outcome {
        status: status.as_str().to_owned(),
        accepted,
        post_latency: Some(accepted_at.saturating_duration_since(due_at)),
        visible: Visible::NotTracked,
    };
    if !(track && accepted) {
        return outcome;
    }
    let path = format!("/v1/devices/{device}/stats");
    outcome.visible = loop {
        let request = query.target().request(Method::GET, &path, None);
        if let Ok((StatusCode::OK, body)) = query.send(request).await {
            let seen = serde_json::from_slice::<StatsAnswer>(&body)
                .map(|stats| stats.sample_count >= 1)
                .unwrap_or(false);
            if seen {
                break Visible::After {
                    accepted_at,
                    latency: accepted_at.elapsed(),
                };
            }
        }
        let waited = accepted_at.elapsed();
        if waited >= deadline {
            break Visible::TimedOut;
        }
        tokio::time::sleep(poll_interval(waited)).await;
    };
    outcome
}

fn failed(status: &str) -> Outcome {
    Outcome {
        status: status.to_owned(),
        accepted: false,
        post_latency: None,
        visible: Visible::NotTracked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_thins_out_with_the_rate() {
        assert_eq!(track_every(50.0, 100.0), 1);
        assert_eq!(track_every(5_000.0, 100.0), 50);
        assert_eq!(track_every(5_000.0, 0.0), 1);
    }

    #[test]
    fn polling_slows_down_after_the_targets() {
        assert_eq!(
            poll_interval(Duration::from_millis(3)),
            Duration::from_millis(1)
        );
        assert_eq!(
            poll_interval(Duration::from_millis(50)),
            Duration::from_millis(2)
        );
        assert_eq!(
            poll_interval(Duration::from_secs(2)),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn slow_probes_are_counted_with_the_seconds_they_fell_in() {
        let ms = Duration::from_millis;
        let probes = [
            (ms(100), ms(5)),
            (ms(1_200), ms(80)),
            (ms(1_900), ms(120)),
            (ms(1_950), SLOW),
            (ms(7_010), ms(51)),
            (ms(9_000), ms(2)),
        ];
        assert_eq!(slow_spread(&probes), (3, 2));
        assert_eq!(slow_spread(&probes[..1]), (0, 0));
        assert_eq!(slow_spread(&[]), (0, 0));
    }

    #[test]
    fn due_follows_the_clock_and_stops_at_the_total() {
        assert_eq!(due(1000.0, Duration::from_millis(250), 10_000), 250);
        assert_eq!(due(1000.0, Duration::from_secs(60), 10_000), 10_000);
    }
}

//! Simulated devices that behave like real ones: each sends its readings one at a
//! time and retries a reading with the same idempotency key and the same body until it
//! gets a `202`, whatever the pipeline does meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// A reading that ingest acknowledged with `202`.
#[derive(Debug, Clone)]
pub struct Acked {
    pub device_id: String,
    pub idempotency_key: String,
    pub event_id: Uuid,
    pub recorded_at_ms: i64,
    pub metrics: BTreeMap<String, f64>,
}

/// What the fleet saw: acknowledgements and every other answer.
#[derive(Debug, Default)]
pub struct Observed {
    pub acked: Vec<Acked>,
    /// Answers by status code, `202` included.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer (refused, reset, timed out).
    pub transport_errors: u64,
    /// Answers outside 202/409/429/503 (API.md: the only ones allowed during faults).
    pub unexpected: Vec<String>,
}

/// The only statuses a device may see while the pipeline is being broken.
pub const ALLOWED_STATUSES: [u16; 4] = [202, 409, 429, 503];

pub struct Fleet {
    observed: Arc<Mutex<Observed>>,
    producing: watch::Sender<bool>,
    busy: Arc<AtomicU64>,
    devices: JoinSet<()>,
}

impl Fleet {
    /// Starts `devices` devices, each sending one new reading every `interval`.
    pub fn start(ingest_url: &str, run_id: &str, devices: usize, interval: Duration) -> Self {
        let observed = Arc::new(Mutex::new(Observed::default()));
        let (producing, _) = watch::channel(true);
        let busy = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(devices)
            .build()
            .unwrap_or_default();
        let mut tasks = JoinSet::new();
        for index in 0..devices {
            let device = Device {
                device_id: format!("dev-{run_id}-{index:03}"),
                url: format!("{ingest_url}/v1/telemetry"),
                http: http.clone(),
                observed: observed.clone(),
                busy: busy.clone(),
            };
            tasks.spawn(device.run(producing.subscribe(), interval));
        }
        Self {
            observed,
            producing,
            busy,
            devices: tasks,
        }
    }

    /// Stops starting new readings and waits, at most `limit`, until every started one
    /// got its `202`; whether they all did. (A pipeline that never answers `202` again
    /// would otherwise hold the run here for good, with no table.)
    pub async fn pause(&self, limit: Duration) -> bool {
        self.producing.send_replace(false);
        let started = std::time::Instant::now();
        while self.busy.load(Ordering::SeqCst) > 0 {
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    pub fn resume(&self) {
        self.producing.send_replace(true);
    }

    /// A copy of what was observed so far.
    pub fn observed(&self) -> Observed {
        let observed = self
            .observed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Observed {
            acked: observed.acked.clone(),
            statuses: observed.statuses.clone(),
            transport_errors: observed.transport_errors,
            unexpected: observed.unexpected.clone(),
        }
    }

    pub async fn stop(mut self) {
        self.pause(Duration::from_secs(30)).await;
        self.devices.abort_all();
        while self.devices.join_next().await.is_some() {}
    }
}

struct Device {
    device_id: String,
    url: String,
    http: reqwest::Client,
    observed: Arc<Mutex<Observed>>,
    busy: Arc<AtomicU64>,
}

impl Device {
    async fn run(self, mut producing: watch::Receiver<bool>, interval: Duration) {
        let mut sequence = 0u64;
        loop {
            if producing.wait_for(|on| *on).await.is_err() {
                return;
            }
            self.busy.fetch_add(1, Ordering::SeqCst);
            // A reading counts as started only when `busy` says so, so pause() cannot
            // miss one that slipped past the check above.
            if !*producing.borrow() {
                self.busy.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let (reading, body) = self.next_reading(sequence);
            self.deliver(reading, body).await;
            self.busy.fetch_sub(1, Ordering::SeqCst);
            sequence += 1;
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::time::sleep(interval.mul_f64(jitter)).await;
        }
    }

    fn next_reading(&self, sequence: u64) -> (Acked, String) {
        let mut random = rand::rng();
        // One reading in ten arrives late, up to three minutes after it was recorded.
        let late_ms = if random.random_ratio(1, 10) {
            random.random_range(1_000..180_000)
        } else {
            0
        };
        let now_ms = contract::timestamp::unix_millis(time::OffsetDateTime::now_utc());
        let recorded_at_ms = now_ms - late_ms;
        let metrics = BTreeMap::from([
            (
                "temperature".to_owned(),
                f64::from(random.random_range(-2_000..4_000)) / 100.0,
            ),
            (
                "humidity".to_owned(),
                f64::from(random.random_range(0..10_000)) / 100.0,
            ),
        ]);
        let body = json!({
            "device_id": self.device_id,
            "recorded_at": contract::timestamp::format_millis(recorded_at_ms),
            "metrics": metrics,
        })
        .to_string();
        let reading = Acked {
            device_id: self.device_id.clone(),
            idempotency_key: format!("k-{sequence}"),
            event_id: Uuid::nil(),
            recorded_at_ms,
            metrics,
        };
        (reading, body)
    }

    /// Sends until `202`, with a capped backoff between attempts.
    async fn deliver(&self, mut reading: Acked, body: String) {
        let mut backoff = Duration::from_millis(50);
        let mut unexpected_answers = 0;
        loop {
            let sent = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("idempotency-key", &reading.idempotency_key)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let answer = response.text().await.unwrap_or_default();
                    let event_id = serde_json::from_str::<serde_json::Value>(&answer)
                        .ok()
                        .and_then(|answer| answer["event_id"].as_str()?.parse::<Uuid>().ok());
                    let mut observed = self.lock();
                    *observed.statuses.entry(status).or_default() += 1;
                    match (status, event_id) {
                        (202, Some(event_id)) => {
                            reading.event_id = event_id;
                            observed.acked.push(reading);
                            return;
                        }
                        (409 | 429 | 503, _) => {}
                        _ => {
                            observed.unexpected.push(format!(
                                "{} key {}: {status} {}",
                                reading.device_id,
                                reading.idempotency_key,
                                answer.chars().take(200).collect::<String>()
                            ));
                            // A device tries again later; a bug does not go away, so
                            // it gives the reading up after a few answers like this.
                            unexpected_answers += 1;
                            if unexpected_answers >= 10 {
                                return;
                            }
                        }
                    }
                }
                Err(_) => self.lock().transport_errors += 1,
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

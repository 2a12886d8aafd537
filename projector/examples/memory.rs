//! Measures the Redis memory of the read model (issue "Rolling windows"): one device
//! with 2 metrics after 24 h of 1 Hz readings, and the dedup record per event.
//!
//! Runs the real `apply.lua` against the configured Redis under a throw-away prefix,
//! simulating the clock (each batch is applied "at" its readings' time, so buckets and
//! the dedup horizon are trimmed as they would be live), prints `MEMORY USAGE` of each
//! key, and deletes what it wrote. `cargo run --release -p projector --example memory`.

use std::collections::BTreeMap;

use contract::event::TelemetryRecorded;
use contract::read_model::DeviceKeys;
use contract::settings::Settings;
use contract::timestamp::{from_unix_millis, unix_millis};
use projector::apply::{Delivered, ReadModel};
use time::OffsetDateTime;
use uuid::Uuid;

const DAY_SECS: i64 = 86_400;
const BATCH: i64 = 500;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let client = redis::Client::open(settings.redis.url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let prefix = format!("memory-{}:", Uuid::now_v7().simple());
    let read_model = ReadModel::new(
        prefix.clone(),
        settings.projector.dedup_horizon_secs as i64 * 1000,
    );
    let generation = 1;
    let start_ms = unix_millis(OffsetDateTime::now_utc()) - DAY_SECS * 1000;
    let mut sequence = 0u64;
    for batch_start in (0..DAY_SECS).step_by(BATCH as usize) {
        let events: Vec<Delivered> = (batch_start..(batch_start + BATCH).min(DAY_SECS))
            .map(|second| {
                sequence += 1;
                let at = from_unix_millis(start_ms + second * 1000).expect("in range");
                let metrics = BTreeMap::from([
                    (
                        "temperature".to_owned(),
                        20.0 + (second % 100) as f64 / 10.0,
                    ),
                    ("humidity".to_owned(), 40.0 + (second % 37) as f64),
                ]);
                Delivered {
                    event: TelemetryRecorded::new(
                        Uuid::now_v7(),
                        "sensor-0001".to_owned(),
                        at,
                        at,
                        metrics,
                    ),
                    stream_sequence: sequence,
                    stored_at: at,
                }
            })
            .collect();
        let now_ms = start_ms + (batch_start + BATCH) * 1000;
        read_model
            .apply(&mut redis, &[generation], &events, now_ms)
            .await?;
    }
    let keys = DeviceKeys::new(&prefix, generation, "sensor-0001");
    let mut total = 0u64;
    println!(
        "one device, 2 metrics, 24 h at 1 Hz ({DAY_SECS} readings), dedup horizon {} s:",
        settings.projector.dedup_horizon_secs
    );
    for (what, key) in [
        ("device hash", &keys.stats),
        ("dedup record (applied ids)", &keys.applied),
        ("buckets (10 s and 5 min)", &keys.buckets),
    ] {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut redis)
            .await?;
        let entries: u64 = match what {
            "dedup record (applied ids)" => {
                redis::cmd("ZCARD").arg(key).query_async(&mut redis).await?
            }
            "device hash" => redis::cmd("HLEN").arg(key).query_async(&mut redis).await?,
            _ => redis::cmd("HLEN").arg(key).query_async(&mut redis).await?,
        };
        let bytes = bytes.unwrap_or(0);
        total += bytes;
        println!("  {what:<28} {bytes:>9} bytes  ({entries} entries)");
    }
    println!("  {:<28} {total:>9} bytes", "total");
    let applied: u64 = redis::cmd("ZCARD")
        .arg(&keys.applied)
        .query_async(&mut redis)
        .await?;
    let applied_bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&keys.applied)
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut redis)
        .await?;
    let per_id = applied_bytes as f64 / applied.max(1) as f64;
    let horizon = settings.projector.dedup_horizon_secs as f64;
    println!(
        "dedup record: {per_id:.0} bytes per applied id; at 1,000 events/s and a {horizon:.0} s horizon: {:.0} MiB",
        per_id * 1000.0 * horizon / 1_048_576.0
    );
    let leftovers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await?;
    if !leftovers.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&leftovers)
            .query_async(&mut redis)
            .await?;
    }
    Ok(())
}

//! Measures Redis's CPU per event of the projector's writes (`apply.lua` and
//! `index.lua`) for devices with a given history, on a simulated clock.
//!
//! `devices` devices with three metrics each report `per_device` readings a second in
//! random order; the first `history_secs` seconds of them are applied unmeasured, then
//! `events` more are measured: Redis's own CPU time (`INFO cpu`, so run it against a
//! Redis nothing else uses) and memory per event, and the size and encoding of one
//! buckets hash. Batches hold `batch` events, as the projector's do at a moderate rate.
//! Everything is written under a throw-away prefix, deleted at the end. `index.lua`
//! stamps with Redis's clock, not the simulated one, so no retired index entry expires
//! during a run: its index holds the whole history's moves, more than a live one.
//!
//! `cargo run --release -p projector --example apply_cost -- [devices per_device history_secs events batch]`
//! (defaults 1000 0.38 1200 40000 40: ~400 bucket fields per device). A history of 420 s
//! gives ~165 fields per device, about what the bench's devices hold.

use std::collections::BTreeMap;

use contract::event::TelemetryRecorded;
use contract::read_model::DeviceKeys;
use contract::settings::Settings;
use contract::timestamp::{from_unix_millis, unix_millis};
use projector::apply::{Delivered, ReadModel};
use time::OffsetDateTime;
use uuid::Uuid;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let argument = |index: usize, default: f64| -> anyhow::Result<f64> {
        match arguments.get(index) {
            Some(text) => Ok(text.parse()?),
            None => Ok(default),
        }
    };
    let devices = argument(0, 1000.0)? as u64;
    let per_device = argument(1, 0.38)?;
    let history_secs = argument(2, 1200.0)?;
    let measured = argument(3, 40_000.0)? as u64;
    let batch = argument(4, 40.0)?.max(1.0) as u64;

    let settings = Settings::load()?;
    let client = redis::Client::open(settings.redis.url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let prefix = format!("apply-cost-{}:", Uuid::now_v7().simple());
    let read_model = ReadModel::new(
        prefix.clone(),
        settings.projector.dedup_horizon_secs as i64 * 1000,
    );
    let rate = devices as f64 * per_device;
    let history = (history_secs * rate) as u64;
    let start_ms = unix_millis(OffsetDateTime::now_utc()) - (history_secs * 1000.0) as i64;
    let mut random = Xorshift(0x9E37_79B9_7F4A_7C15);

    let memory_before = used_memory(&mut redis).await?;
    let mut cpu_before = 0.0;
    let mut sequence = 0u64;
    while sequence < history + measured {
        if sequence == history {
            cpu_before = redis_cpu_seconds(&mut redis).await?;
        }
        let end = (sequence + batch).min(if sequence < history {
            history
        } else {
            history + measured
        });
        let events: Vec<Delivered> = (sequence..end)
            .map(|number| {
                let at_ms = start_ms + (number as f64 / rate * 1000.0) as i64;
                let at = from_unix_millis(at_ms).expect("a time in range");
                let device = format!("device-{}", random.next() % devices);
                let value = (random.next() % 1000) as f64;
                let metrics = BTreeMap::from([
                    ("temperature".to_owned(), 15.0 + value / 66.0),
                    ("humidity".to_owned(), 20.0 + value / 17.0),
                    ("battery".to_owned(), 3.3 + value / 1111.0),
                ]);
                Delivered {
                    event: TelemetryRecorded::new(Uuid::now_v7(), device, at, at, metrics),
                    stream_sequence: number + 1,
                    stored_at: at,
                }
            })
            .collect();
        let now_ms = start_ms + (end as f64 / rate * 1000.0) as i64;
        read_model.apply(&mut redis, &[1], &events, now_ms).await?;
        sequence = end;
    }
    let cpu = redis_cpu_seconds(&mut redis).await? - cpu_before;
    let memory = used_memory(&mut redis).await?.saturating_sub(memory_before);

    let sample = DeviceKeys::new(&prefix, 1, "device-0").buckets;
    let fields: u64 = redis::cmd("HLEN")
        .arg(&sample)
        .query_async(&mut redis)
        .await?;
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(&sample)
        .query_async(&mut redis)
        .await?;
    println!(
        "{devices} devices, {history_secs} s of history at {per_device}/s each, batches of {batch}: \
         Redis CPU {:.1} µs per event over {measured} events; memory {:.1} MiB \
         ({:.1} KiB per device); a buckets hash: {fields} fields, {encoding}",
        cpu * 1e6 / measured as f64,
        memory as f64 / 1_048_576.0,
        memory as f64 / 1024.0 / devices as f64,
    );

    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(())
}

/// Redis's CPU time so far, user and system, in seconds.
async fn redis_cpu_seconds(redis: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(redis).await?;
    Ok(["used_cpu_user:", "used_cpu_sys:"]
        .iter()
        .filter_map(|field| {
            info.lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|value| value.trim().parse::<f64>().ok())
        })
        .sum())
}

/// Redis's `used_memory`, bytes.
async fn used_memory(redis: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(redis).await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0))
}

/// xorshift64*: a fixed, fast sequence of devices and values.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

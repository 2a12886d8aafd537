//! Applying events to the Redis read model: one script call per device per batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use contract::event::TelemetryRecorded;
use contract::read_model::{
    listing_granule, DeviceKeys, DevicesIndex, COARSE, FINE, LISTING_TTL_MS,
};
use contract::timestamp::unix_millis;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

/// An event together with the stream sequence it was delivered at.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub event: TelemetryRecorded,
    pub stream_sequence: u64,
}

/// Where the read model lives, how long applied event ids are remembered, and the two
/// scripts that write it (hashed once, when the read model is made).
#[derive(Debug, Clone)]
pub struct ReadModel {
    pub prefix: String,
    pub dedup_horizon_ms: i64,
    /// Applies one device's events atomically and idempotently (`apply.lua`).
    apply_script: Script,
    /// Keeps the devices index, one call per generation per batch (`index.lua`).
    index_script: Script,
    /// The granule this process last moved each device to in each generation's index,
    /// so a batch sends only the devices whose granule moved on; `index.lua` would leave
    /// the others as they are. Shared by the clones (the rebuild's copy).
    listed: Arc<Mutex<HashMap<u64, HashMap<String, i64>>>>,
}

/// Devices remembered per generation in [`ReadModel::listed`] before it starts over
/// (a few MiB).
const LISTED_MAX: usize = 100_000;

/// What one `apply` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u64,
    pub duplicates: u64,
}

impl ReadModel {
    pub fn new(prefix: String, dedup_horizon_ms: i64) -> Self {
        Self {
            prefix,
            dedup_horizon_ms,
            apply_script: Script::new(include_str!("apply.lua")),
            index_script: Script::new(include_str!("index.lua")),
            listed: Arc::default(),
        }
    }

    /// Applies `events` (any devices, any order, duplicates allowed) to each of
    /// `generations` (the first one counts for [`Applied`]) in one pipeline: one script
    /// call per device, then one call moving each device in the devices index.
    /// On `NOSCRIPT` (Redis restarted) the script is loaded again and the pipeline
    /// retried; the script skips whatever did apply.
    pub async fn apply<C: ConnectionLike>(
        &self,
        connection: &mut C,
        generations: &[u64],
        events: &[Delivered],
        now_ms: i64,
    ) -> RedisResult<Applied> {
        if events.is_empty() || generations.is_empty() {
            return Ok(Applied::default());
        }
        let mut by_device: BTreeMap<&str, Vec<&Delivered>> = BTreeMap::new();
        for delivered in events {
            by_device
                .entry(delivered.event.device_id.as_str())
                .or_default()
                .push(delivered);
        }
        let mut pipeline = redis::pipe();
        for (device_id, device_events) in &by_device {
            let command = pipeline
                .cmd("EVALSHA")
                .arg(self.apply_script.get_hash())
                .arg(4 * generations.len());
            for generation in generations {
                let keys = DeviceKeys::new(&self.prefix, *generation, device_id);
                command
                    .arg(keys.stats)
                    .arg(keys.applied)
                    .arg(keys.fine)
                    .arg(keys.coarse);
            }
            command
                .arg(now_ms)
                .arg(self.dedup_horizon_ms)
                .arg(FINE.width_ms)
                .arg(FINE.retention_ms)
                .arg(COARSE.width_ms)
                .arg(COARSE.retention_ms);
            for delivered in device_events {
                let event = &delivered.event;
                command
                    .arg(event.event_id.as_bytes().as_slice())
                    .arg(unix_millis(event.recorded_at))
                    .arg(delivered.stream_sequence)
                    .arg(event.metrics.len());
                for (name, value) in &event.metrics {
                    command.arg(name).arg(value.to_string());
                }
            }
        }
        // One index call per generation for the whole batch, after the device calls,
        // with the devices whose granule moved past the one this process last listed.
        let granules: Vec<(&str, i64)> = by_device
            .iter()
            .map(|(device_id, device_events)| {
                let latest = device_events
                    .iter()
                    .map(|delivered| unix_millis(delivered.event.recorded_at))
                    .max()
                    .unwrap_or_default();
                (*device_id, listing_granule(latest))
            })
            .collect();
        let moved: Vec<(u64, Vec<(&str, i64)>)> = {
            let listed = self
                .listed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            generations
                .iter()
                .map(|generation| {
                    let known = listed.get(generation);
                    let entries = granules
                        .iter()
                        .filter(|(device_id, granule)| {
                            known
                                .and_then(|known| known.get(*device_id))
                                .is_none_or(|known| granule > known)
                        })
                        .copied()
                        .collect();
                    (*generation, entries)
                })
                .collect()
        };
        for (generation, entries) in &moved {
            if entries.is_empty() {
                continue;
            }
            let index = DevicesIndex::new(&self.prefix, *generation);
            let command = pipeline
                .cmd("EVALSHA")
                .arg(self.index_script.get_hash())
                .arg(4)
                .arg(&index.log)
                .arg(&index.created)
                .arg(&index.retired)
                .arg(&index.current)
                .arg(now_ms)
                .arg(LISTING_TTL_MS);
            for (device_id, granule) in entries {
                command.arg(*device_id).arg(*granule);
            }
            command.ignore();
        }
        let counts: Vec<u64> = match pipeline.query_async(connection).await {
            Ok(counts) => counts,
            Err(error)
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.apply_script
                    .prepare_invoke()
                    .load_async(connection)
                    .await?;
                self.index_script
                    .prepare_invoke()
                    .load_async(connection)
                    .await?;
                pipeline.query_async(connection).await?
            }
            Err(error) => return Err(error),
        };
        let mut listed = self
            .listed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A retired generation is never listed again: past the live one and one being
        // built (the rebuild's copy writes only the latter), keep those written to now.
        if listed.len() > 2 {
            listed.retain(|generation, _| generations.contains(generation));
        }
        for (generation, entries) in moved {
            let devices = listed.entry(generation).or_default();
            if devices.len() + entries.len() > LISTED_MAX {
                devices.clear();
            }
            for (device_id, granule) in entries {
                devices.insert(device_id.to_owned(), granule);
            }
        }
        let applied: u64 = counts.iter().sum();
        Ok(Applied {
            applied,
            duplicates: events.len() as u64 - applied,
        })
    }
}

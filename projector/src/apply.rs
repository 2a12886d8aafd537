//! Applying events to the Redis read model: one script call per device per batch.
//!
//! The batch's events are grouped by device and folded here, in the projector, into the
//! figures of the batch alone (`DeviceFold`); `apply.lua` then records the events' ids
//! and merges those figures into the stored ones. So Redis, which every projector
//! shares, does one merge per touched field instead of one per event and metric, and
//! never prints or parses a number.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use contract::read_model::{
    fields, listing_granule, meta_key, pack, Aggregate, DeviceKeys, DevicesIndex, MetricStats,
    COARSE, FINE, LISTING_TTL_MS,
};
use contract::timestamp::unix_millis;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::rebuild::Generations;

/// An event together with where the stream holds it: the sequence it was delivered at
/// and when the stream stored it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub event: contract::event::TelemetryRecorded,
    pub stream_sequence: u64,
    pub stored_at: time::OffsetDateTime,
}

/// Where the read model lives, how long applied event ids are remembered, and the two
/// scripts that write it (hashed once, when the read model is made).
#[derive(Debug, Clone)]
pub struct ReadModel {
    pub prefix: String,
    /// The meta hash, the last key of a guarded call (`guard.lua`).
    meta_key: String,
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

/// What `apply.lua` and `index.lua` return, alone, for a guarded call that found the
/// generations changed since they were read (`guard.lua`).
const STALE: i64 = -2;

/// How far a projector's clock may run ahead of Redis's before its fold leaves out a
/// bucket that Redis still keeps. `apply.lua` drops the buckets past their retention by
/// the earlier of the two clocks; the fold leaves out only those of readings older
/// still.
const CLOCK_AHEAD_MARGIN_MS: i64 = 3_600_000;

/// Fields one script call may touch at most; a device's longer batch (a replay spanning
/// many buckets) is split over several calls, which keeps every `HMGET`/`HSET` far
/// below Lua's limit on unpacked values.
const FIELDS_PER_CALL_MAX: usize = 1_500;

/// What one `apply` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u64,
    pub duplicates: u64,
}

/// What one pipeline of [`ReadModel::apply_guarded`] did.
struct Guarded<'a> {
    applied: Applied,
    /// A guarded call found the generations changed.
    stale: bool,
    /// The calls (their events) Redis refused ([`refuses_only_the_call`]), with its
    /// error.
    refused: Vec<(Vec<&'a Delivered>, redis::RedisError)>,
    /// A call of a device none of whose calls was refused went through.
    others_through: bool,
}

/// What [`ReadModel::apply_as_of`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsOf {
    /// Every call went through.
    Applied(Applied),
    /// Redis refused some calls ([`refuses_only_the_call`]: a key of another type, a
    /// script error on what the keys hold): the events of the refused calls are named
    /// here by id, with Redis's error; `applied` counts the events the other calls
    /// applied to the first generation, and `others_through` says whether a device none
    /// of whose calls was refused had one go through (if not, the refusal may be one
    /// every call would meet). A refused call
    /// wrote nothing: `apply.lua` reads and checks all it reads before its first write.
    Refused {
        applied: u64,
        events: BTreeMap<uuid::Uuid, String>,
        others_through: bool,
    },
    /// The generations changed since they were read (a rebuild began or switched
    /// over, the read model was lost): some calls wrote nothing. The batch is to be
    /// applied again with the generations read anew; `applied` counts the events the
    /// other calls applied to the first generation.
    Stale { applied: u64 },
}

/// The figures of some events of one device, as `apply.lua` merges them into the
/// stored ones: per metric its all-time figures, per bucket field its aggregate (of a
/// bucket kept at `now_ms` less [`CLOCK_AHEAD_MARGIN_MS`]; the script leaves out those
/// past their retention by the earlier of `now_ms` and Redis's clock).
#[derive(Debug, Clone, PartialEq)]
struct DeviceFold<'a> {
    event_ids: Vec<&'a [u8]>,
    first_recorded_ms: i64,
    last_recorded_ms: i64,
    max_sequence: u64,
    metrics: BTreeMap<&'a str, MetricStats>,
    buckets: BTreeMap<String, Aggregate>,
}

impl<'a> DeviceFold<'a> {
    /// Folds `events` (of one device, no event id twice).
    fn of(events: &[&'a Delivered], now_ms: i64) -> Self {
        let oldest_sent = [FINE, COARSE]
            .map(|resolution| resolution.oldest_kept(now_ms.saturating_sub(CLOCK_AHEAD_MARGIN_MS)));
        let mut fold = Self {
            event_ids: Vec::with_capacity(events.len()),
            first_recorded_ms: i64::MAX,
            last_recorded_ms: i64::MIN,
            max_sequence: 0,
            metrics: BTreeMap::new(),
            buckets: BTreeMap::new(),
        };
        for delivered in events {
            let event = &delivered.event;
            let recorded_ms = unix_millis(event.recorded_at);
            fold.event_ids.push(event.event_id.as_bytes().as_slice());
            fold.first_recorded_ms = fold.first_recorded_ms.min(recorded_ms);
            fold.last_recorded_ms = fold.last_recorded_ms.max(recorded_ms);
            fold.max_sequence = fold.max_sequence.max(delivered.stream_sequence);
            for (name, &value) in &event.metrics {
                let reading = MetricStats::of(value, recorded_ms);
                fold.metrics
                    .entry(name.as_str())
                    .and_modify(|figures| *figures = figures.merge(reading))
                    .or_insert(reading);
                for (resolution, oldest) in [FINE, COARSE].iter().zip(oldest_sent) {
                    let bucket = resolution.bucket(recorded_ms);
                    if bucket < oldest {
                        continue; // long past the retention: in no window
                    }
                    fold.buckets
                        .entry(resolution.field(bucket, name))
                        .and_modify(|aggregate| *aggregate = aggregate.merge(Aggregate::of(value)))
                        .or_insert(Aggregate::of(value));
                }
            }
        }
        fold
    }

    /// The call's arguments after the keys, as `apply.lua` reads them.
    fn arguments(&self, now_ms: i64, dedup_horizon_ms: i64) -> Vec<Vec<u8>> {
        let header = pack([
            now_ms as f64,
            dedup_horizon_ms as f64,
            FINE.width_ms as f64,
            FINE.retention_ms as f64,
            COARSE.width_ms as f64,
            COARSE.retention_ms as f64,
            (COARSE.retention_ms + COARSE.width_ms) as f64,
            self.event_ids.len() as f64,
            self.first_recorded_ms as f64,
            self.last_recorded_ms as f64,
            self.max_sequence as f64,
            self.metrics.len() as f64,
            self.buckets.len() as f64,
        ]);
        let mut arguments = Vec::with_capacity(
            1 + self.event_ids.len() + 2 * (self.metrics.len() + self.buckets.len()),
        );
        arguments.push(header);
        arguments.extend(self.event_ids.iter().map(|id| id.to_vec()));
        for (name, figures) in &self.metrics {
            arguments.push(fields::metric(name).into_bytes());
            arguments.push(figures.to_bytes());
        }
        for (field, aggregate) in &self.buckets {
            arguments.push(field.as_bytes().to_vec());
            arguments.push(aggregate.to_bytes());
        }
        arguments
    }
}

/// A guarded call's last four arguments: the meta hash's fields as read.
fn guard_fields(command: &mut redis::Pipeline, guard: Option<&[String; 4]>) {
    if let Some(fields) = guard {
        command.arg(fields.as_slice());
    }
}

/// Splits one device's events (each id once) into calls of at most
/// [`FIELDS_PER_CALL_MAX`] fields, in order.
fn calls_of<'a, 'b>(events: &'b [&'a Delivered]) -> Vec<&'b [&'a Delivered]> {
    let mut calls = Vec::new();
    let mut start = 0;
    let mut fields = 0;
    for (index, delivered) in events.iter().enumerate() {
        // A metric's device field and its two bucket fields, at most.
        let touched = 3 * delivered.event.metrics.len();
        if index > start && fields + touched > FIELDS_PER_CALL_MAX {
            calls.push(&events[start..index]);
            start = index;
            fields = 0;
        }
        fields += touched;
    }
    if start < events.len() {
        calls.push(&events[start..]);
    }
    calls
}

impl ReadModel {
    /// The earliest moment whose applied event ids are still remembered at `now`: a
    /// delivery of anything applied since then is skipped.
    pub fn dedup_horizon_start(&self, now: time::OffsetDateTime) -> time::OffsetDateTime {
        now - time::Duration::milliseconds(self.dedup_horizon_ms)
    }

    pub fn new(prefix: String, dedup_horizon_ms: i64) -> Self {
        Self {
            meta_key: meta_key(&prefix),
            prefix,
            dedup_horizon_ms,
            apply_script: Script::new(concat!(
                include_str!("guard.lua"),
                include_str!("apply.lua")
            )),
            index_script: Script::new(concat!(
                include_str!("guard.lua"),
                include_str!("index.lua")
            )),
            listed: Arc::default(),
        }
    }

    /// The granules last listed; a batch that panicked while holding them left them
    /// consistent (each update is an insert, a clear or a retain), so a poisoned lock
    /// is taken over.
    fn listed(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashMap<String, i64>>> {
        ingest::sync::lock(&self.listed)
    }

    /// Adds one `apply.lua` call for `events` (one device) to `pipeline`, guarded by
    /// the meta hash's fields as read when `guard` is given.
    fn add_call(
        &self,
        pipeline: &mut redis::Pipeline,
        generations: &[u64],
        guard: Option<&[String; 4]>,
        device_id: &str,
        events: &[&Delivered],
        now_ms: i64,
    ) {
        let command = pipeline
            .cmd("EVALSHA")
            .arg(self.apply_script.get_hash())
            .arg(3 * generations.len() + usize::from(guard.is_some()));
        for generation in generations {
            let keys = DeviceKeys::new(&self.prefix, *generation, device_id);
            command.arg(keys.stats).arg(keys.applied).arg(keys.buckets);
        }
        self.guard_key(command, guard);
        for argument in DeviceFold::of(events, now_ms).arguments(now_ms, self.dedup_horizon_ms) {
            command.arg(argument);
        }
        guard_fields(command, guard);
    }

    /// A guarded call's last key: the meta hash.
    fn guard_key(&self, command: &mut redis::Pipeline, guard: Option<&[String; 4]>) {
        if guard.is_some() {
            command.arg(&self.meta_key);
        }
    }

    /// Runs `pipeline` of script calls, each call's result or error on its own; on
    /// `NOSCRIPT` (Redis restarted) loads the scripts again and runs it once more (the
    /// apply script skips whatever did apply).
    async fn run<C: ConnectionLike>(
        &self,
        connection: &mut C,
        pipeline: &mut redis::Pipeline,
    ) -> RedisResult<Vec<RedisResult<Vec<i64>>>> {
        let pipeline = pipeline.ignore_errors();
        let results: Vec<RedisResult<Vec<i64>>> = pipeline.query_async(connection).await?;
        let no_script = |result: &RedisResult<Vec<i64>>| {
            matches!(result, Err(error)
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        };
        if !results.iter().any(no_script) {
            return Ok(results);
        }
        self.apply_script
            .prepare_invoke()
            .load_async(connection)
            .await?;
        self.index_script
            .prepare_invoke()
            .load_async(connection)
            .await?;
        pipeline.query_async(connection).await
    }

    /// Applies `events` (any devices, any order, duplicates allowed) to each of
    /// `generations` (the first one counts for [`Applied`]) in one pipeline: one script
    /// call per device, then one call moving each device in the devices index.
    /// A generation that holds some but not all of a device's events gets those events
    /// again one call each, in a second pipeline.
    pub async fn apply<C: ConnectionLike>(
        &self,
        connection: &mut C,
        generations: &[u64],
        events: &[Delivered],
        now_ms: i64,
    ) -> RedisResult<Applied> {
        let events: Vec<&Delivered> = events.iter().collect();
        let guarded = self
            .apply_guarded(connection, generations, None, &events, now_ms)
            .await?;
        match guarded.refused.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(guarded.applied),
        }
    }

    /// Applies `events` to `generation` alone, as a rebuild's replay does, if the meta
    /// hash still holds `fields` (its generation, layout, building and replay_last
    /// fields, [`Generations::fields`](crate::rebuild::Generations::fields)); `None`
    /// when they changed (the read model was lost, another rebuild took over) and
    /// nothing was written; the first refused call's error is the batch's. Unguarded, a
    /// replay that went on after its read model was lost wrote keys of a generation
    /// nothing names any more, which no expiry and no later rebuild ever removed.
    pub async fn apply_replayed<C: ConnectionLike>(
        &self,
        connection: &mut C,
        generation: u64,
        fields: &[String; 4],
        events: &[Delivered],
        now_ms: i64,
    ) -> RedisResult<Option<Applied>> {
        let events: Vec<&Delivered> = events.iter().collect();
        let guarded = self
            .apply_guarded(connection, &[generation], Some(fields), &events, now_ms)
            .await?;
        if guarded.stale {
            return Ok(None);
        }
        match guarded.refused.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(Some(guarded.applied)),
        }
    }

    /// Applies `events` as [`apply`](Self::apply) does to the generations as they
    /// were read, `generations.targets()`, if the meta hash still names them: each
    /// script call checks that in Redis, so a live projector need not read the meta
    /// hash before every batch. Calls that find it changed write nothing. What the
    /// build's replay applies alone ([`ReplayThrough`](crate::rebuild::ReplayThrough))
    /// goes to the live generation only, and what the rebuild that made the live
    /// generation replayed into it (`built_through`) goes to it no more: an event in
    /// neither counts as a duplicate.
    pub async fn apply_as_of<C: ConnectionLike>(
        &self,
        connection: &mut C,
        generations: &Generations,
        events: &[Delivered],
        now_ms: i64,
    ) -> RedisResult<AsOf> {
        let held_by_live = |delivered: &Delivered| {
            generations
                .built_through
                .is_some_and(|through| through.covers(delivered))
        };
        let replayed_alone = |delivered: &Delivered| {
            generations.building.is_some()
                && [generations.replay_through, generations.replay_last]
                    .iter()
                    .flatten()
                    .any(|through| through.covers(delivered))
        };
        // To both generations, to the live one only, to the one being built only.
        let mut parts: [(Vec<u64>, Vec<&Delivered>); 3] = [
            (generations.targets(), Vec::new()),
            (generations.live_target(), Vec::new()),
            (generations.building_target(), Vec::new()),
        ];
        let mut total = Applied::default();
        for delivered in events {
            match (held_by_live(delivered), replayed_alone(delivered)) {
                (false, false) => parts[0].1.push(delivered),
                (false, true) => parts[1].1.push(delivered),
                (true, false) if !parts[2].0.is_empty() => parts[2].1.push(delivered),
                (true, _) => total.duplicates += 1,
            }
        }
        let mut stale = false;
        let mut refused = BTreeMap::new();
        let mut others_through = false;
        for (targets, part) in parts {
            let guarded = self
                .apply_guarded(
                    connection,
                    &targets,
                    Some(&generations.fields),
                    &part,
                    now_ms,
                )
                .await?;
            total.applied += guarded.applied.applied;
            total.duplicates += guarded.applied.duplicates;
            stale |= guarded.stale;
            others_through |= guarded.others_through;
            for (call, error) in guarded.refused {
                let line = redis_error_line(&error);
                for delivered in call {
                    refused.insert(delivered.event.event_id, line.clone());
                }
            }
        }
        Ok(if stale {
            AsOf::Stale {
                applied: total.applied,
            }
        } else if !refused.is_empty() {
            AsOf::Refused {
                applied: total.applied,
                events: refused,
                others_through,
            }
        } else {
            AsOf::Applied(total)
        })
    }

    /// [`apply`](Self::apply), each call guarded by `guard` when given, with what the
    /// pipeline told besides ([`Guarded`]). After a stale call nothing is remembered as
    /// listed, and mixed calls are not split up: the batch comes again. An error of a
    /// call other than a refusal ([`refuses_only_the_call`]) is the batch's.
    ///
    /// The devices index of the generation being built (`building` in the meta hash's
    /// fields a guarded call checks, never the live one) keeps no superseded entry: no walk reads it before
    /// its switch, and none after the switch sees an entry superseded before it
    /// (devices_page.lua), so a guarded call deletes them at once. Until 2026-12-07 they
    /// were kept for the listing TTL, as the live generation's are, and a replay of a
    /// long history kept one entry for every move of every device in its last ten minutes.
    async fn apply_guarded<'a, C: ConnectionLike>(
        &self,
        connection: &mut C,
        generations: &[u64],
        guard: Option<&[String; 4]>,
        events: &[&'a Delivered],
        now_ms: i64,
    ) -> RedisResult<Guarded<'a>> {
        let mut refused = Vec::new();
        if events.is_empty() || generations.is_empty() {
            return Ok(Guarded {
                applied: Applied::default(),
                stale: false,
                refused,
                others_through: false,
            });
        }
        // Copies of one event in the batch (a republish under another Nats-Msg-Id) go to
        // the script once, as the copy with the highest stream sequence: the event counts
        // once, and `as_of_seq` still reaches every sequence the batch delivered, as it
        // would if the copies had come in batches of their own.
        let mut position: HashMap<uuid::Uuid, usize> = HashMap::with_capacity(events.len());
        let mut kept: Vec<&'a Delivered> = Vec::with_capacity(events.len());
        for &delivered in events {
            match position.entry(delivered.event.event_id) {
                Entry::Vacant(slot) => {
                    slot.insert(kept.len());
                    kept.push(delivered);
                }
                Entry::Occupied(slot) => {
                    let copy = &mut kept[*slot.get()];
                    if delivered.stream_sequence > copy.stream_sequence {
                        *copy = delivered;
                    }
                }
            }
        }
        let mut by_device: BTreeMap<&'a str, Vec<&'a Delivered>> = BTreeMap::new();
        for delivered in kept {
            by_device
                .entry(delivered.event.device_id.as_str())
                .or_default()
                .push(delivered);
        }
        let mut pipeline = redis::pipe();
        let mut calls: Vec<(&'a str, &[&'a Delivered])> = Vec::new();
        // The devices a call of which went through.
        let mut through: BTreeSet<&'a str> = BTreeSet::new();
        for (device_id, device_events) in &by_device {
            for call in calls_of(device_events) {
                self.add_call(&mut pipeline, generations, guard, device_id, call, now_ms);
                calls.push((device_id, call));
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
            let listed = self.listed();
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
                .arg(4 + usize::from(guard.is_some()))
                .arg(&index.log)
                .arg(&index.created)
                .arg(&index.retired)
                .arg(&index.current);
            self.guard_key(command, guard);
            // No clock: the script stamps with Redis's (see index.lua).
            // The fields are the meta hash's generation, layout, building, replay_last.
            let unread = guard.is_some_and(|[live, _, building, _]| {
                let named = generation.to_string();
                *building == named && *live != named
            });
            command.arg(if unread { 0 } else { LISTING_TTL_MS });
            for (device_id, granule) in entries {
                command.arg(*device_id).arg(*granule);
            }
            guard_fields(command, guard);
        }
        let mut results = self.run(connection, &mut pipeline).await?;
        // The index calls are the batch's: one refused fails it. One that found the
        // generations changed (a pipeline is no transaction: a rebuild may begin between
        // its device calls and its index calls) wrote nothing, and the batch is stale:
        // were it applied, its devices would be remembered as listed, and no later batch
        // would write their entries.
        let mut index_stale = false;
        for result in results.split_off(calls.len().min(results.len())) {
            index_stale |= result?.as_slice() == [STALE];
        }
        let mut refuse = |call: &[&'a Delivered], error: redis::RedisError| {
            if refuses_only_the_call(&error) {
                refused.push((call.to_vec(), error));
                Ok(())
            } else {
                Err(error)
            }
        };
        let mut results_of_calls = Vec::with_capacity(calls.len());
        for ((device_id, call), result) in calls.iter().zip(results) {
            results_of_calls.push(match result {
                Ok(per_generation) => {
                    through.insert(device_id);
                    per_generation
                }
                Err(error) => {
                    refuse(call, error)?;
                    Vec::new()
                }
            });
        }
        let is_stale = |result: &Vec<i64>| result.as_slice() == [STALE];
        let stale = index_stale || results_of_calls.iter().any(is_stale);
        let mut applied = 0u64;
        // A generation that held some of a call's events but not all got nothing from it
        // (its figures include those it has): each event alone is all-or-nothing.
        let mut retry = redis::pipe();
        let mut retry_counts = Vec::new();
        for ((device_id, call), per_generation) in calls.iter().zip(&results_of_calls) {
            for (position, (generation, result)) in
                generations.iter().zip(per_generation).enumerate()
            {
                if *result >= 0 {
                    if position == 0 {
                        applied += *result as u64;
                    }
                    continue;
                }
                if stale {
                    continue;
                }
                for delivered in call.iter() {
                    self.add_call(
                        &mut retry,
                        &[*generation],
                        guard,
                        device_id,
                        &[delivered],
                        now_ms,
                    );
                    retry_counts.push((position == 0, *delivered));
                }
            }
        }
        let mut stale_retry = false;
        if !retry_counts.is_empty() {
            let results = self.run(connection, &mut retry).await?;
            for ((counts, delivered), result) in retry_counts.into_iter().zip(results) {
                let result = match result {
                    Ok(result) => {
                        through.insert(delivered.event.device_id.as_str());
                        result
                    }
                    Err(error) => {
                        refuse(&[delivered], error)?;
                        continue;
                    }
                };
                stale_retry |= is_stale(&result);
                if counts {
                    applied += result.first().map_or(0, |count| (*count).max(0) as u64);
                }
            }
        }
        let applied = Applied {
            applied,
            duplicates: (events.len() as u64).saturating_sub(applied),
        };
        // Whether a device none of whose calls was refused had one go through.
        let refused_devices: BTreeSet<&str> = refused
            .iter()
            .flat_map(|(call, _)| call.first())
            .map(|delivered| delivered.event.device_id.as_str())
            .collect();
        let others_through = through.difference(&refused_devices).next().is_some();
        let guarded = Guarded {
            applied,
            stale: stale || stale_retry,
            refused,
            others_through,
        };
        if guarded.stale {
            return Ok(guarded);
        }
        let mut listed = self.listed();
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
        Ok(guarded)
    }
}

/// `error` as Redis wrote it (`WRONGTYPE Operation against a key ...`).
fn redis_error_line(error: &redis::RedisError) -> String {
    match (error.code(), error.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => error.to_string(),
    }
}

/// Whether `error`, Redis's answer to one script call, may be that call's own: a key
/// of another type (`WRONGTYPE`), a script error on what the keys hold (`ERR`), when
/// other devices' calls go through (the consumer judges that). Not so for
/// an error of the whole server (`LOADING`, `BUSY`, `OOM`, `READONLY`, `NOPERM`, ...)
/// nor for an `ERR` of the server's settings or an operator's hand: an ACL that denies
/// the script a command or a key (`ERR ACL failure in script`, `ERR The user executing
/// the script can't run this command or subcommand`), a script killed (`SCRIPT KILL`).
/// Those are mended on the server, and the events wait for that.
pub fn refuses_only_the_call(error: &redis::RedisError) -> bool {
    match error.code() {
        Some("WRONGTYPE") => true,
        Some("ERR") => {
            let detail = error.detail().unwrap_or_default();
            !["ACL", "user executing the script", "Script killed"]
                .iter()
                .any(|settings| detail.contains(settings))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use contract::event::TelemetryRecorded;
    use contract::timestamp::from_unix_millis;
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;

    const NOW: i64 = 1_764_460_800_000;

    fn delivered(recorded_ms: i64, sequence: u64, metrics: &[(&str, f64)]) -> Delivered {
        Delivered {
            event: TelemetryRecorded::new(
                Uuid::now_v7(),
                "sensor-1".to_owned(),
                from_unix_millis(recorded_ms).expect("in range"),
                OffsetDateTime::UNIX_EPOCH,
                metrics
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), *value))
                    .collect::<BTreeMap<_, _>>(),
            ),
            stream_sequence: sequence,
            stored_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_fold_holds_the_batch_figures_per_metric_and_per_kept_bucket() {
        let events = [
            delivered(NOW - 5_000, 7, &[("temperature", 20.0), ("humidity", 40.0)]),
            delivered(NOW - 1_000, 9, &[("temperature", 10.0)]),
            delivered(NOW - 1_000, 8, &[("temperature", 30.0)]),
            // Past the 10 s buckets' retention and the margin for a clock running ahead,
            // inside the 5 min buckets' retention.
            delivered(NOW - 3 * 3_600_000, 3, &[("temperature", 5.0)]),
            // Past the 10 s buckets' retention by less than that margin: `apply.lua`
            // decides by the earlier clock.
            delivered(NOW - 90 * 60_000, 2, &[("humidity", 50.0)]),
        ];
        let references: Vec<&Delivered> = events.iter().collect();
        let fold = DeviceFold::of(&references, NOW);
        assert_eq!(fold.event_ids.len(), 5);
        assert_eq!(fold.first_recorded_ms, NOW - 3 * 3_600_000);
        assert_eq!(fold.last_recorded_ms, NOW - 1_000);
        assert_eq!(fold.max_sequence, 9);
        let temperature = &fold.metrics["temperature"];
        assert_eq!(
            (
                temperature.count,
                temperature.sum,
                temperature.min,
                temperature.max
            ),
            (4, 65.0, 5.0, 30.0)
        );
        assert_eq!(
            (temperature.last, temperature.last_at_ms),
            (30.0, NOW - 1_000),
            "the latest reading, the larger value on a tie"
        );
        assert_eq!(fold.metrics["humidity"].count, 2);
        // NOW is on a 10 s boundary: the three recent readings share the bucket before it.
        let fine_now = FINE.field(FINE.bucket(NOW - 1_000), "temperature");
        assert_eq!(fold.buckets[&fine_now].count, 3);
        let old = NOW - 3 * 3_600_000;
        assert!(!fold
            .buckets
            .contains_key(&FINE.field(FINE.bucket(old), "temperature")));
        let within_margin = FINE.field(FINE.bucket(NOW - 90 * 60_000), "humidity");
        assert_eq!(fold.buckets[&within_margin].count, 1);
        assert_eq!(
            fold.buckets[&COARSE.field(COARSE.bucket(old), "temperature")].sum,
            5.0
        );
    }

    #[test]
    fn the_call_header_is_thirteen_packed_numbers_then_ids_metrics_and_buckets() {
        let events = [delivered(NOW - 1_000, 1, &[("temperature", 20.0)])];
        let references: Vec<&Delivered> = events.iter().collect();
        let arguments = DeviceFold::of(&references, NOW).arguments(NOW, 900_000);
        let header: Vec<f64> = arguments[0]
            .chunks_exact(8)
            .map(|bytes| f64::from_le_bytes(bytes.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(header.len(), 13);
        assert_eq!(
            header[..7],
            [
                NOW as f64,
                900_000.0,
                FINE.width_ms as f64,
                FINE.retention_ms as f64,
                COARSE.width_ms as f64,
                COARSE.retention_ms as f64,
                (COARSE.retention_ms + COARSE.width_ms) as f64
            ]
        );
        assert_eq!(
            header[7..],
            [
                1.0,
                (NOW - 1_000) as f64,
                (NOW - 1_000) as f64,
                1.0,
                1.0,
                2.0
            ]
        );
        assert_eq!(arguments[1].len(), 16, "the event id's bytes");
        assert_eq!(arguments[2], b"m:temperature");
        assert_eq!(
            MetricStats::from_bytes(&arguments[3]),
            Some(MetricStats::of(20.0, NOW - 1_000))
        );
        assert_eq!(arguments.len(), 4 + 2 * 2, "two bucket fields");
    }

    #[test]
    fn long_device_batches_are_split_into_calls_in_order() {
        let many: Vec<(String, f64)> = (0..32).map(|index| (format!("m{index}"), 1.0)).collect();
        let many: Vec<(&str, f64)> = many
            .iter()
            .map(|(name, value)| (name.as_str(), *value))
            .collect();
        let events: Vec<Delivered> = (0..40).map(|index| delivered(NOW, index, &many)).collect();
        let references: Vec<&Delivered> = events.iter().collect();
        let calls = calls_of(&references);
        // 96 fields an event: 15 events (1,440 fields) a call.
        assert_eq!(
            calls.iter().map(|call| call.len()).collect::<Vec<_>>(),
            vec![15, 15, 10]
        );
        let small = [delivered(NOW, 1, &[("temperature", 1.0)])];
        let small: Vec<&Delivered> = small.iter().collect();
        assert_eq!(calls_of(&small).len(), 1);
        assert!(calls_of(&[]).is_empty());
    }
}

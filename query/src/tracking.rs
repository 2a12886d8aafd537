//! Validity reads kept in the process and kept fresh by Redis (server-assisted
//! client-side caching, RESP3 `CLIENT TRACKING`).
//!
//! Every `/stats` request needs the live generation and the device's packed header
//! (`ReadModel::validity`). Redis remembers which keys this connection read while
//! tracking is on and pushes an `invalidate` message, on the same connection, when one
//! of them changes. So the two reads are kept here until their key changes, and a
//! device that did not change is answered without a round trip.
//!
//! The race this must get right: the reply to a read and the invalidation of a write
//! that came after it travel in that order on the connection, but the reply is taken
//! by the request's task and the push by the connection manager's, so the push can be
//! handled first. A read therefore marks its device as being read (`begin`, a unique
//! token) before it is sent; an invalidation, a flush or a disconnection removes the
//! mark; the reply is kept (`finish`) only if its mark is still there. Either the
//! push is handled before the reply is kept (the mark is gone, nothing is kept) or
//! after (it removes what was kept).
//!
//! A reconnect loses the pushes sent meanwhile: the connection manager's
//! `Disconnection` push empties everything. Each read pipeline turns tracking on
//! again first (`CLIENT TRACKING ON` is idempotent), so whatever connection carries a
//! read also tracks it. And a kept header is served only in the 10 s bucket it was
//! read in, the bucket every rendered document is tied to anyway: at each boundary
//! the device is read again, so nothing can stay stale longer than that, whatever
//! happens to a push.
//!
//! Tracking is an optimisation, never a condition of a read: a Redis user whose ACL
//! leaves out `CLIENT` (a read-only user: `+@read` and the few commands the README
//! lists, `CLIENT` not among them) refuses every read that turns tracking on. The first such read is made again without it, and if that goes
//! through, tracking is given up for the life of the process ([`TrackedReads::refuse`]):
//! every read then goes to Redis, as with tracking off. Until 2026-12-07 such a user got
//! a `500` for every `/stats` and `/series`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use contract::read_model::{meta_key, DeviceKeys};
use redis::{PushInfo, PushKind, Value};

/// Devices kept at most; past it the map starts empty again.
pub const TRACKED_MAX: usize = 20_000;

/// The validity reads this process keeps, and the invalidations that end them.
#[derive(Debug)]
pub struct TrackedReads {
    /// The read model's key prefix: a push names a device hash by its key.
    prefix: String,
    /// The meta hash's key: its change (a rebuild's switch) ends every kept read.
    meta_key: String,
    state: Mutex<State>,
    /// Redis refused `CLIENT TRACKING` ([`TrackedReads::refuse`]): nothing is kept.
    refused: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    next_token: u64,
    /// Per device id: being read, or what its read returned.
    devices: HashMap<String, Slot>,
}

#[derive(Debug, PartialEq)]
enum Slot {
    Reading(u64),
    /// The live generation and the device's packed header in it (`None`: no such
    /// device), as read in `fine_bucket`. Any change of the meta hash forgets every
    /// slot, so the generation is still the live one.
    Known {
        generation: u64,
        header: Option<Vec<u8>>,
        fine_bucket: i64,
    },
}

/// A read in flight: what `finish` needs to tell whether its reply may be kept.
#[derive(Debug)]
pub struct Ticket {
    device_id: String,
    token: u64,
}

impl TrackedReads {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            meta_key: meta_key(prefix),
            state: Mutex::default(),
            refused: AtomicBool::new(false),
        }
    }

    /// The live generation and the device's header in it, if kept and read in
    /// `fine_bucket`.
    pub fn lookup(&self, device_id: &str, fine_bucket: i64) -> Option<(u64, Option<Vec<u8>>)> {
        let state = self.state.lock().ok()?;
        match state.devices.get(device_id)? {
            Slot::Known {
                generation,
                header,
                fine_bucket: read_in,
            } if *read_in == fine_bucket => Some((*generation, header.clone())),
            _ => None,
        }
    }

    /// Marks the device as being read; call before the read is sent. `None`: read
    /// without tracking (Redis refused it, or the lock is poisoned).
    pub fn begin(&self, device_id: &str) -> Option<Ticket> {
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        let mut state = self.state.lock().ok()?;
        if state.devices.len() >= TRACKED_MAX && !state.devices.contains_key(device_id) {
            state.devices.clear();
        }
        state.next_token += 1;
        let token = state.next_token;
        state
            .devices
            .insert(device_id.to_owned(), Slot::Reading(token));
        Some(Ticket {
            device_id: device_id.to_owned(),
            token,
        })
    }

    /// Keeps what the read of `ticket` (the meta hash and the device hash, in one
    /// pipeline) returned, unless a push removed its mark since it began.
    pub fn finish(
        &self,
        ticket: Ticket,
        generation: u64,
        header: Option<Vec<u8>>,
        fine_bucket: i64,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(slot) = state.devices.get_mut(&ticket.device_id) {
            if *slot == Slot::Reading(ticket.token) {
                *slot = Slot::Known {
                    generation,
                    header,
                    fine_bucket,
                };
            }
        }
    }

    /// Handles a push of the connection the reads are made on.
    pub fn handle_push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::Disconnection => self.forget_all(),
            PushKind::Invalidate => {
                for value in &push.data {
                    self.invalidate(value);
                }
            }
            _ => {}
        }
    }

    /// An `invalidate` message's payload: the keys that changed, or nil when the whole
    /// database was flushed.
    fn invalidate(&self, value: &Value) {
        match value {
            Value::Nil => self.forget_all(),
            Value::Array(keys) | Value::Set(keys) => {
                for key in keys {
                    self.invalidate(key);
                }
            }
            Value::BulkString(key) => self.invalidate_key(key),
            Value::SimpleString(key) => self.invalidate_key(key.as_bytes()),
            _ => {}
        }
    }

    fn invalidate_key(&self, key: &[u8]) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        if key == self.meta_key {
            return self.forget_all();
        }
        let Some((_, device_id)) = DeviceKeys::parse_stats(&self.prefix, key) else {
            return;
        };
        if let Ok(mut state) = self.state.lock() {
            state.devices.remove(device_id);
        }
    }

    /// Gives tracking up for good: Redis refused a read that turned it on (`error`) and
    /// took the same read without. Logged once, as a warning: every read then costs a
    /// round trip, and the Redis user wants `+client|tracking` to save them.
    pub fn refuse(&self, error: &impl std::fmt::Display) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %error,
                "redis refused client tracking, reading without it"
            );
        }
        self.forget_all();
    }

    /// Forgets every kept read and every read in flight.
    fn forget_all(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.devices.clear();
        }
    }

    /// Kept or in-flight device reads.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |state| state.devices.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "p:";
    const META: &str = "p:meta";
    /// Device `d`'s hash in generation 1, as a push names it.
    const DEVICE_KEY: &str = "p:g1:device:{d}";
    const BUCKET: i64 = 100;

    fn invalidation(keys: &[&str]) -> PushInfo {
        PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(
                keys.iter()
                    .map(|key| Value::BulkString(key.as_bytes().to_vec()))
                    .collect(),
            )],
        }
    }

    fn lookup(tracked: &TrackedReads, bucket: i64) -> Option<(u64, Option<Vec<u8>>)> {
        tracked.lookup("d", bucket)
    }

    fn read(tracked: &TrackedReads, header: &[u8]) {
        let ticket = tracked.begin("d").expect("lock");
        tracked.finish(ticket, 1, Some(header.to_vec()), BUCKET);
    }

    #[test]
    fn a_finished_read_is_served_in_its_bucket_only() {
        let tracked = TrackedReads::new(PREFIX);
        assert_eq!(lookup(&tracked, BUCKET), None);
        read(&tracked, b"h1");
        assert_eq!(lookup(&tracked, BUCKET), Some((1, Some(b"h1".to_vec()))));
        assert_eq!(lookup(&tracked, BUCKET + 1), None);
    }

    #[test]
    fn an_invalidation_handled_before_the_reply_is_kept_wins() {
        let tracked = TrackedReads::new(PREFIX);
        let ticket = tracked.begin("d").expect("lock");
        tracked.handle_push(&invalidation(&[DEVICE_KEY]));
        tracked.finish(ticket, 1, Some(b"old".to_vec()), BUCKET);
        assert_eq!(
            lookup(&tracked, BUCKET),
            None,
            "a reply older than a push was kept"
        );
    }

    #[test]
    fn an_invalidation_after_the_reply_removes_it() {
        let tracked = TrackedReads::new(PREFIX);
        read(&tracked, b"h1");
        tracked.handle_push(&invalidation(&[
            "p:g1:device:{other}",
            "p:g1:device:{d}:buckets",
            DEVICE_KEY,
        ]));
        assert_eq!(lookup(&tracked, BUCKET), None);
    }

    #[test]
    fn of_two_reads_of_one_key_only_the_last_begun_is_kept() {
        let tracked = TrackedReads::new(PREFIX);
        let first = tracked.begin("d").expect("lock");
        let second = tracked.begin("d").expect("lock");
        tracked.finish(second, 1, Some(b"new".to_vec()), BUCKET);
        tracked.finish(first, 1, Some(b"old".to_vec()), BUCKET);
        assert_eq!(lookup(&tracked, BUCKET), Some((1, Some(b"new".to_vec()))));
    }

    #[test]
    fn a_meta_change_a_flush_or_a_disconnection_forgets_everything_even_reads_in_flight() {
        let pushes = [
            invalidation(&[META]),
            PushInfo {
                kind: PushKind::Invalidate,
                data: vec![Value::Nil],
            },
            PushInfo {
                kind: PushKind::Disconnection,
                data: vec![],
            },
        ];
        for push in pushes {
            let tracked = TrackedReads::new(PREFIX);
            read(&tracked, b"h1");
            let in_flight = tracked.begin("e").expect("lock");
            tracked.handle_push(&push);
            tracked.finish(in_flight, 1, None, BUCKET);
            assert_eq!(lookup(&tracked, BUCKET), None, "kept after {push:?}");
            assert!(tracked.is_empty(), "kept after {push:?}");
            // Kept again through a read begun afterwards.
            read(&tracked, b"h2");
            assert_eq!(lookup(&tracked, BUCKET), Some((1, Some(b"h2".to_vec()))));
        }
    }

    #[test]
    fn an_unknown_device_is_kept_as_unknown_until_its_key_changes() {
        let tracked = TrackedReads::new(PREFIX);
        let ticket = tracked.begin("d").expect("lock");
        tracked.finish(ticket, 1, None, BUCKET);
        assert_eq!(lookup(&tracked, BUCKET), Some((1, None)));
        tracked.handle_push(&invalidation(&[DEVICE_KEY]));
        assert_eq!(lookup(&tracked, BUCKET), None);
    }

    #[test]
    fn the_map_starts_over_when_full() {
        let tracked = TrackedReads::new(PREFIX);
        for device in 0..TRACKED_MAX {
            let ticket = tracked.begin(&format!("sensor-{device}")).expect("lock");
            tracked.finish(ticket, 1, None, BUCKET);
        }
        assert_eq!(tracked.len(), TRACKED_MAX);
        read(&tracked, b"h1");
        assert_eq!(tracked.len(), 1);
        assert_eq!(lookup(&tracked, BUCKET), Some((1, Some(b"h1".to_vec()))));
    }

    #[test]
    fn once_refused_nothing_is_kept_or_read_with_tracking() {
        let tracked = TrackedReads::new(PREFIX);
        read(&tracked, b"h1");
        let in_flight = tracked.begin("e").expect("lock");
        tracked.refuse(&"NOPERM");
        assert_eq!(lookup(&tracked, BUCKET), None);
        tracked.finish(in_flight, 1, None, BUCKET);
        assert!(tracked.is_empty());
        assert!(
            tracked.begin("d").is_none(),
            "a read after the refusal is untracked"
        );
    }
}

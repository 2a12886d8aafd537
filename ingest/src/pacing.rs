//! When the next round of a batching stage may start: soon after a light round, spaced
//! out after a busy one. Ingest's group commits ([`crate::store`]), its NOTIFYs
//! ([`crate::outbox_notify`]) and the relay's rounds ([`crate::relay`]) are paced by
//! it. The commits are paced by default (`ingest.commit_interval_ms`, 4): the wait
//! comes before the `202`, a commit paces everything after it, and a closed loop of
//! clients is never held (see the store). The NOTIFYs and relay rounds, whose waits
//! come after the `202`, are not (`ingest.notify_interval_ms`,
//! `relay.round_interval_ms`, 0): an operator who would rather spend latency than CPU
//! sets them (e.g. 4).
//!
//! A round has a fixed cost beside its cost per row: a NOTIFY is a transaction, and the
//! relay round it wakes is a transaction with a commit and the statements' round trips
//! in PostgreSQL, then a burst of publishes that NATS and the projector each handle as
//! a batch. Rounds started as soon as the previous one allows run as often as those
//! round trips go, whatever the rate, so the fixed cost follows the round rate and not
//! the load: so paced (NOTIFYs at most every 1 ms, relay rounds at once), the 2-core
//! box was as busy at 2,400 readings/s as at 3,600, and 85–90% busy at 3,600
//! (PERFORMANCE.md). So after a round that covered at least [`BUSY_ROWS`] rows (readings
//! arrive faster than rounds go) the next starts no sooner than the busy interval after
//! that one started, and gathers what arrived meanwhile; after a lighter round, an empty
//! one or a quiet spell, the light interval applies (zero: at once), so a trickle pays
//! no wait. What it costs: a reading waits for the next slot, about half an interval
//! at each paced stage; measured at 4 ms, 11% of a core freed at 3,600 readings/s for
//! 0.5–4.5 ms more end-to-end p50, which is why it is off by default.
//!
//! Several tasks may share one pacer (the relay's lanes): each reservation takes the
//! next slot, so two lanes woken by one NOTIFY do not claim in the same instant.

use std::time::Duration;

use tokio::time::Instant;

/// A round that covered this many rows or more makes the next one wait the busy
/// interval. Unpaced rounds cover about one row at 500 readings/s and four at 2,000/s;
/// paced at 4 ms they cover `rate × 4 ms`, so pacing holds down to about 1,000
/// readings/s and lets go below that.
pub const BUSY_ROWS: usize = 4;

/// The shared schedule of one stage's rounds.
#[derive(Debug)]
pub struct Pacer {
    light: Duration,
    busy: Duration,
    /// The start given to the latest round (a slot may lie in the future).
    previous: Option<Instant>,
    /// Whether the round that finished last covered [`BUSY_ROWS`] or more.
    was_busy: bool,
}

impl Pacer {
    /// Rounds at least `light` apart, and `busy` apart after a busy round.
    pub fn new(light: Duration, busy: Duration) -> Self {
        Self {
            light,
            busy,
            previous: None,
            was_busy: false,
        }
    }

    /// Reserves the start of a round wanted at `now`: `now`, or the interval after the
    /// previous start if that is later.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let start = self.earliest(now);
        self.started(start);
        start
    }

    /// Records that a round started at `at`, whether or not it waited for its slot.
    pub fn started(&mut self, at: Instant) {
        self.previous = Some(at);
    }

    /// The start a round wanted at `now` would get, without reserving it.
    pub fn earliest(&self, now: Instant) -> Instant {
        let interval = if self.was_busy { self.busy } else { self.light };
        match self.previous {
            Some(previous) => now.max(previous + interval),
            None => now,
        }
    }

    /// Records how many rows a round covered.
    pub fn finished(&mut self, rows: usize) {
        self.was_busy = rows >= BUSY_ROWS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIGHT: Duration = Duration::from_millis(1);
    const BUSY: Duration = Duration::from_millis(4);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_round_starts_at_once() {
        let now = Instant::now();
        assert_eq!(Pacer::new(LIGHT, BUSY).reserve(now), now);
    }

    #[test]
    fn after_light_rounds_the_light_interval_applies() {
        let mut pacer = Pacer::new(LIGHT, BUSY);
        let start = Instant::now();
        pacer.reserve(start);
        pacer.finished(BUSY_ROWS - 1);
        assert_eq!(pacer.reserve(start), start + LIGHT);
        pacer.finished(0);
        let later = start + ms(10);
        assert_eq!(pacer.reserve(later), later);
    }

    #[test]
    fn after_a_busy_round_the_next_starts_the_busy_interval_after_it() {
        let mut pacer = Pacer::new(LIGHT, BUSY);
        let start = Instant::now();
        pacer.reserve(start);
        pacer.finished(BUSY_ROWS);
        assert_eq!(pacer.reserve(start + ms(1)), start + BUSY);
        pacer.finished(1);
        assert_eq!(pacer.reserve(start + BUSY), start + BUSY + LIGHT);
    }

    #[test]
    fn a_wish_past_the_slot_starts_at_once() {
        let mut pacer = Pacer::new(LIGHT, BUSY);
        let start = Instant::now();
        pacer.reserve(start);
        pacer.finished(500);
        let late = start + BUSY * 3;
        assert_eq!(pacer.reserve(late), late);
    }

    #[test]
    fn rounds_wanted_together_take_successive_slots() {
        let mut pacer = Pacer::new(Duration::ZERO, BUSY);
        let start = Instant::now();
        pacer.reserve(start);
        pacer.finished(20);
        let woken = start + ms(1);
        assert_eq!(pacer.reserve(woken), start + BUSY);
        assert_eq!(pacer.reserve(woken), start + BUSY * 2);
    }

    #[test]
    fn earliest_tells_the_slot_without_taking_it() {
        let mut pacer = Pacer::new(Duration::ZERO, BUSY);
        let start = Instant::now();
        pacer.started(start);
        pacer.finished(BUSY_ROWS);
        assert_eq!(pacer.earliest(start + ms(1)), start + BUSY);
        assert_eq!(pacer.earliest(start + ms(1)), start + BUSY);
        pacer.started(start + ms(2));
        assert_eq!(pacer.earliest(start + ms(2)), start + ms(2) + BUSY);
    }

    #[test]
    fn zero_intervals_never_wait() {
        let mut pacer = Pacer::new(Duration::ZERO, Duration::ZERO);
        let start = Instant::now();
        pacer.reserve(start);
        pacer.finished(1000);
        assert_eq!(pacer.reserve(start), start);
    }
}

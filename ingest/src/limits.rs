//! Per-device rate limiting of ingest (API.md §5): the generic cell rate algorithm
//! (GCRA), as the `governor` crate has it, kept here because an attempt that stored
//! nothing gives its allowance back, which `governor` cannot do.
//!
//! Each ingest process keeps its own limiter: with N copies behind a load balancer a
//! device may send up to N times the configured rate. Replays count too, so a device
//! that retries in a tight loop is slowed down like any other. An attempt answered
//! `503` (PostgreSQL down, the commit queue full, the deadline passed) or `409
//! idempotency-key-in-use` stored nothing: it leaves the allowance as if it had not been
//! made, so the retry its `Retry-After` asks for is not met with a `429` (until
//! 2026-12-06 it was, and a gateway's batch retried after an outage had half its items
//! refused).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Readings per second and burst allowed per device; off when the rate is 0.
pub struct DeviceLimiter {
    rule: Option<Rule>,
    /// Each device's theoretical arrival time, in nanoseconds since `epoch`: the
    /// instant by which its allowance is whole again. A device not here has it whole.
    arrivals: Mutex<HashMap<Box<str>, u64>>,
    epoch: Instant,
}

/// The allowance: one reading per `interval_ns`, and up to `tolerance_ns` ahead of that
/// pace (the burst less one).
#[derive(Debug, Clone, Copy)]
struct Rule {
    interval_ns: u64,
    tolerance_ns: u64,
}

impl DeviceLimiter {
    /// `per_second` 0 turns limiting off; `burst` is raised to at least 1.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let rule = (per_second > 0).then(|| {
            let interval_ns = (1_000_000_000 / u64::from(per_second)).max(1);
            Rule {
                interval_ns,
                tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1) - 1)),
            }
        });
        Self {
            rule,
            arrivals: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// Takes one reading's share of `device_id`'s allowance, or `Err(wait)` when the
    /// device is over its limit and should retry after `wait`. The share goes back when
    /// the [`Admitted`] is dropped without being spent.
    pub fn admit(&self, device_id: &str) -> Result<Admitted<'_>, Duration> {
        let share = match self.rule {
            None => None,
            Some(rule) => {
                let refilled_at = self.take(rule, device_id, self.now_ns())?;
                Some((device_id.into(), refilled_at))
            }
        };
        Ok(Admitted {
            limiter: self,
            share,
        })
    }

    /// How often [`Self::forget_idle`] should run: the longest a device's entry can
    /// outlive its last reading (the burst's tolerance and one interval: 2 s at the
    /// defaults), between 1 s and 60 s. Memory then holds about that long of distinct
    /// devices; until 2026-12-07 the prune ran every 60 s whatever the limit, so a
    /// client posting under fresh device ids (a batch of 1,000 too old to store, say)
    /// grew the map by a minute of them.
    pub fn forget_every(&self) -> Duration {
        let lifetime = self.rule.map_or(Duration::from_secs(60), |rule| {
            Duration::from_nanos(rule.tolerance_ns.saturating_add(rule.interval_ns))
        });
        lifetime.clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Forgets devices whose allowance has refilled, so memory follows active devices.
    pub fn forget_idle(&self) {
        self.forget_idle_at(self.now_ns());
    }

    fn forget_idle_at(&self, now: u64) {
        let mut arrivals = self.arrivals();
        arrivals.retain(|_, arrival| *arrival > now);
        // Rehashing holds every request up; only when most of the room is unused.
        if arrivals.capacity() > 4 * arrivals.len().max(1024) {
            arrivals.shrink_to_fit();
        }
    }

    /// Takes one share of `device_id`'s allowance at `now`: `Ok` with the instant by
    /// which that share would have come back, or `Err(wait)`.
    fn take(&self, rule: Rule, device_id: &str, now: u64) -> Result<u64, Duration> {
        let mut arrivals = self.arrivals();
        let arrival = arrivals
            .get(device_id)
            .map_or(now, |&arrival| arrival.max(now));
        let ahead = arrival - now;
        if ahead > rule.tolerance_ns {
            return Err(Duration::from_nanos(ahead - rule.tolerance_ns));
        }
        let next = arrival.saturating_add(rule.interval_ns);
        match arrivals.get_mut(device_id) {
            Some(slot) => *slot = next,
            None => {
                arrivals.insert(device_id.into(), next);
            }
        }
        Ok(next)
    }

    /// Gives back a share taken at an instant that made the arrival time
    /// `refilled_at`, if that time is still ahead of `now`. Until then every later
    /// take moved the arrival time on from at least there, so the share is still in
    /// it; from then on the device's allowance may have refilled (or been forgotten)
    /// and been used again, and subtracting the share would let a reading through that
    /// the limit refuses.
    fn give_back(&self, rule: Rule, device_id: &str, refilled_at: u64, now: u64) {
        if now >= refilled_at {
            return;
        }
        let mut arrivals = self.arrivals();
        if let Some(arrival) = arrivals.get_mut(device_id) {
            *arrival = arrival.saturating_sub(rule.interval_ns);
            if *arrival <= now {
                arrivals.remove(device_id);
            }
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The arrivals, also after a panic elsewhere while they were held.
    fn arrivals(&self) -> MutexGuard<'_, HashMap<Box<str>, u64>> {
        crate::sync::lock(&self.arrivals)
    }
}

/// One reading's share of its device's allowance, taken by [`DeviceLimiter::admit`].
/// Dropped unspent (the attempt stored nothing and was answered `503`, or not at all),
/// it goes back to the device.
#[must_use = "dropping it gives the allowance back"]
pub struct Admitted<'a> {
    limiter: &'a DeviceLimiter,
    /// The device and when the share would have come back anyway; `None` when
    /// limiting is off or the share is spent.
    share: Option<(Box<str>, u64)>,
}

impl Admitted<'_> {
    /// Keeps the share taken: the attempt got its answer (stored, replayed, refused as
    /// a reused key).
    pub fn spend(mut self) {
        self.share = None;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let (Some(rule), Some((device_id, refilled_at))) = (self.limiter.rule, self.share.take())
        {
            self.limiter
                .give_back(rule, &device_id, refilled_at, self.limiter.now_ns());
        }
    }
}

/// The bytes of request bodies the process holds at once (`ingest.max_body_bytes_held`).
/// The connection cap alone bounds the connections, not what they hold: 1,024 clients
/// each sending all but the last byte of a 1 MiB batch body held 1 GiB until the
/// request deadline. A request holds its body's buffer from the first byte until the
/// body is parsed and, for aged readings, looked up; from its submission on the commit
/// queue's room bounds what waits (`ingest.queue_capacity`), so that a slow database
/// shows as a full queue. A body that finds the budget spent is answered `503` at once,
/// as a full commit queue is, and the client retries with the same key.
pub struct BodyBudget {
    bytes: Semaphore,
    total: usize,
}

impl BodyBudget {
    /// A budget of `bytes`, cut to the most tokio's semaphore holds.
    pub fn new(bytes: usize) -> Self {
        let total = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Semaphore::new(total),
            total,
        }
    }

    /// An empty share, grown with [`HeldBytes::hold`] as a body arrives.
    pub fn share(&self) -> HeldBytes<'_> {
        HeldBytes {
            budget: &self.bytes,
            held: None,
        }
    }

    /// Bytes not held by any request.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Bytes held by requests.
    pub fn held(&self) -> usize {
        self.total.saturating_sub(self.available())
    }
}

/// A request's share of the [`BodyBudget`], given back when dropped.
pub struct HeldBytes<'a> {
    budget: &'a Semaphore,
    held: Option<SemaphorePermit<'a>>,
}

impl HeldBytes<'_> {
    /// Holds `bytes` in all, taking what more that needs; `false`, with nothing more
    /// taken, when the budget has it not (or it needs 4 GiB more at once, more than a
    /// semaphore takes in one go).
    pub fn hold(&mut self, bytes: usize) -> bool {
        let held = self.held.as_ref().map_or(0, SemaphorePermit::num_permits);
        let more = bytes.saturating_sub(held);
        if more == 0 {
            return true;
        }
        let Ok(more) = u32::try_from(more) else {
            return false;
        };
        let Ok(permit) = self.budget.try_acquire_many(more) else {
            return false;
        };
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        true
    }
}

/// Seconds for a `Retry-After` header: the wait rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const SECOND_DURATION: Duration = Duration::from_secs(1);

    #[test]
    fn a_share_of_the_body_budget_grows_while_it_lasts_and_goes_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut first = budget.share();
        assert!(first.hold(60));
        assert!(first.hold(40), "less than held takes nothing");
        let mut second = budget.share();
        assert!(!second.hold(41), "past the budget");
        assert_eq!(budget.available(), 40, "a refused hold takes nothing");
        assert!(second.hold(40));
        assert_eq!(budget.held(), 100);
        assert!(!first.hold(61));
        drop(first);
        assert_eq!(budget.available(), 60);
        drop(second);
        assert_eq!(budget.available(), 100);
        assert!(!budget.share().hold(usize::MAX), "more than any share");
        assert_eq!(
            BodyBudget::new(usize::MAX).available(),
            Semaphore::MAX_PERMITS
        );
    }

    fn rule_of(limiter: &DeviceLimiter) -> Rule {
        limiter.rule.expect("limiting on")
    }

    #[test]
    fn devices_are_limited_separately() {
        let limiter = DeviceLimiter::new(1, 2);
        for _ in 0..2 {
            limiter.admit("a").expect("within the burst").spend();
        }
        assert!(limiter.admit("a").is_err(), "burst of 2 used up");
        assert!(limiter.admit("b").is_ok(), "another device is unaffected");
    }

    #[test]
    fn a_burst_refills_at_the_rate_and_the_wait_says_when() {
        let limiter = DeviceLimiter::new(2, 3);
        let rule = rule_of(&limiter);
        for _ in 0..3 {
            assert!(limiter.take(rule, "a", 0).is_ok());
        }
        assert_eq!(
            limiter.take(rule, "a", 0),
            Err(Duration::from_millis(500)),
            "the fourth at once waits for one interval"
        );
        assert!(limiter.take(rule, "a", SECOND / 2).is_ok(), "one back");
        assert!(limiter.take(rule, "a", SECOND / 2).is_err());
        assert!(
            (0..3).all(|_| limiter.take(rule, "a", 10 * SECOND).is_ok()),
            "idle long enough, the whole burst again, and no more"
        );
        assert!(limiter.take(rule, "a", 10 * SECOND).is_err());
    }

    #[test]
    fn a_share_dropped_unspent_goes_back_and_a_spent_one_does_not() {
        let limiter = DeviceLimiter::new(1, 2);
        for _ in 0..10 {
            drop(limiter.admit("a").expect("nothing spent yet"));
        }
        limiter.admit("a").expect("within the burst").spend();
        limiter.admit("a").expect("within the burst").spend();
        assert!(limiter.admit("a").is_err(), "the spent ones count");
    }

    #[test]
    fn a_share_given_back_after_it_would_have_refilled_is_not_counted_again() {
        let limiter = DeviceLimiter::new(1, 1);
        let rule = rule_of(&limiter);
        // A is taken at 0 and hangs; its share would be back at 1 s.
        let a = limiter.take(rule, "a", 0).expect("first");
        assert_eq!(a, SECOND);
        // B takes the refilled allowance at 1.5 s and is stored.
        assert!(limiter.take(rule, "a", SECOND * 3 / 2).is_ok());
        // A ends in a 503 at 1.6 s: giving its share back then would let a third
        // reading through 0.1 s after B, at a rate of one a second.
        limiter.give_back(rule, "a", a, SECOND * 8 / 5);
        assert!(limiter.take(rule, "a", SECOND * 8 / 5).is_err());
    }

    #[test]
    fn a_share_given_back_in_time_is_exactly_undone() {
        let limiter = DeviceLimiter::new(1, 2);
        let rule = rule_of(&limiter);
        let first = limiter.take(rule, "a", 0).expect("first");
        let second = limiter.take(rule, "a", SECOND / 10).expect("second");
        limiter.give_back(rule, "a", first, SECOND / 5);
        limiter.give_back(rule, "a", second, SECOND / 5);
        assert!(
            limiter.arrivals().is_empty(),
            "the allowance is whole again"
        );
        assert!((0..2).all(|_| limiter.take(rule, "a", SECOND / 5).is_ok()));
        assert!(limiter.take(rule, "a", SECOND / 5).is_err());
    }

    #[test]
    fn idle_devices_are_forgotten() {
        let limiter = DeviceLimiter::new(1, 5);
        let rule = rule_of(&limiter);
        assert!(limiter.take(rule, "a", 0).is_ok());
        assert!(limiter.take(rule, "b", SECOND).is_ok());
        limiter.forget_idle_at(SECOND);
        let kept: Vec<String> = limiter.arrivals().keys().map(|id| id.to_string()).collect();
        assert_eq!(kept, ["b"], "a's allowance is whole again at 1 s");
    }

    #[test]
    fn idle_devices_are_forgotten_about_as_often_as_an_entry_outlives_its_reading() {
        // The defaults: 50/s with bursts of 100, an entry whole again 2 s after.
        assert_eq!(
            DeviceLimiter::new(50, 100).forget_every(),
            2 * SECOND_DURATION
        );
        let limiter = DeviceLimiter::new(50, 100);
        let rule = rule_of(&limiter);
        for _ in 0..100 {
            limiter.take(rule, "a", 0).expect("within the burst");
        }
        let every = u64::try_from(limiter.forget_every().as_nanos()).expect("fits");
        limiter.forget_idle_at(every);
        assert!(
            limiter.arrivals().is_empty(),
            "a whole burst at once is forgotten by the first prune after it"
        );
        // Bounded both ways: a fast limit is not pruned every few milliseconds, a slow
        // one (1 a minute, bursts of 10) not kept for ten minutes between prunes.
        assert_eq!(DeviceLimiter::new(1000, 1).forget_every(), SECOND_DURATION);
        assert_eq!(
            DeviceLimiter::new(1, 600).forget_every(),
            60 * SECOND_DURATION
        );
        assert_eq!(
            DeviceLimiter::new(0, 0).forget_every(),
            60 * SECOND_DURATION
        );
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let limiter = DeviceLimiter::new(0, 0);
        assert!((0..1000).all(|_| limiter.admit("a").map(Admitted::spend).is_ok()));
        assert!(limiter.arrivals().is_empty());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}

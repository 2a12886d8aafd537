//! Per-device rate limiting of ingest (API.md §5), with the `governor` crate.
//!
//! Each ingest process keeps its own limiter: with N copies behind a load balancer a
//! device may send up to N times the configured rate. Replays count too, so a device
//! that retries in a tight loop is slowed down like any other.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Readings per second and burst allowed per device; `None` when disabled.
pub struct DeviceLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl DeviceLimiter {
    /// `per_second` 0 turns limiting off; `burst` is raised to at least 1.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when `device_id` is over its limit and should retry after `wait`.
    pub fn check(&self, device_id: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&device_id.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets devices whose allowance has refilled, so memory follows active devices.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Seconds for a `Retry-After` header: the wait rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_limited_separately() {
        let limiter = DeviceLimiter::new(1, 2);
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_err(), "burst of 2 used up");
        assert!(limiter.check("b").is_ok(), "another device is unaffected");
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let limiter = DeviceLimiter::new(0, 0);
        assert!((0..1000).all(|_| limiter.check("a").is_ok()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}

//! Whether Redis may evict the read model's keys.
//!
//! With `maxmemory` set and any `maxmemory-policy` but `noeviction`, a full Redis drops
//! keys to make room: a device's bucket hash (its figures lose readings), its meta, or
//! the applied event ids that let the projector skip a redelivery (which is then
//! counted twice). Nothing errors; the numbers are just wrong. Managed Redis services
//! often ship with `maxmemory` set and a `volatile-*` policy, and the event ids carry a
//! TTL, so they go first. Like Sidekiq and BullMQ, the projector cannot change a
//! server's policy, so it says so: a WARN when it finds the server may evict (and INFO
//! when that ends), and the gauge `projector_redis_may_evict` (1 or 0) for an alert.
//! It reads `INFO memory`, which managed services allow where `CONFIG GET` is not.

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

/// How often the supervisor reads the server's memory settings again.
pub const LOOK_INTERVAL: Duration = Duration::from_secs(5);

/// A server's `maxmemory` and `maxmemory-policy`, as `INFO memory` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPolicy {
    /// Bytes; 0 is no limit, so nothing is ever evicted.
    pub maxmemory: u64,
    pub policy: String,
}

impl MemoryPolicy {
    /// The two fields of an `INFO memory` answer; `None` when either is missing.
    pub fn from_info(info: &str) -> Option<Self> {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
        };
        Some(Self {
            maxmemory: field("maxmemory")?.parse().ok()?,
            policy: field("maxmemory_policy")?.to_owned(),
        })
    }

    /// True when a full server would drop keys rather than refuse writes.
    pub fn may_evict(&self) -> bool {
        self.maxmemory > 0 && self.policy != "noeviction"
    }
}

/// Reads the server's policy every [`LOOK_INTERVAL`] and reports what changed.
#[derive(Debug, Default)]
pub struct EvictionWatch {
    last_look: Option<Instant>,
    may_evict: Option<bool>,
}

impl EvictionWatch {
    /// Looks at the server unless the last look was less than [`LOOK_INTERVAL`] ago;
    /// a server that does not answer is looked at again next time.
    pub async fn look(&mut self, redis: &mut impl ConnectionLike) {
        if self
            .last_look
            .is_some_and(|looked| looked.elapsed() < LOOK_INTERVAL)
        {
            return;
        }
        let info: redis::RedisResult<String> =
            redis::cmd("INFO").arg("memory").query_async(redis).await;
        let Some(policy) = info.ok().as_deref().and_then(MemoryPolicy::from_info) else {
            return;
        };
        self.last_look = Some(Instant::now());
        let may_evict = policy.may_evict();
        metrics::gauge!("projector_redis_may_evict").set(if may_evict { 1.0 } else { 0.0 });
        if self.may_evict == Some(may_evict) {
            return;
        }
        if may_evict {
            tracing::warn!(
                maxmemory = policy.maxmemory,
                maxmemory_policy = %policy.policy,
                "Redis may evict the read model's keys when it is full: figures would lose \
                 readings and redeliveries would count twice; set maxmemory-policy noeviction \
                 (or maxmemory 0) on a Redis of the pipeline's own"
            );
        } else if self.may_evict.is_some() {
            tracing::info!(
                maxmemory = policy.maxmemory,
                maxmemory_policy = %policy.policy,
                "Redis no longer evicts keys"
            );
        }
        self.may_evict = Some(may_evict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(maxmemory: &str, policy: &str) -> String {
        format!(
            "# Memory\r\nused_memory:1048576\r\nmaxmemory:{maxmemory}\r\nmaxmemory_human:{maxmemory}B\r\nmaxmemory_policy:{policy}\r\nallocator_frag_ratio:1.01\r\n"
        )
    }

    #[test]
    fn only_a_server_with_a_limit_and_an_evicting_policy_may_evict() {
        let policy = |maxmemory, name| MemoryPolicy::from_info(&info(maxmemory, name));
        assert_eq!(
            policy("67108864", "allkeys-lru"),
            Some(MemoryPolicy {
                maxmemory: 67_108_864,
                policy: "allkeys-lru".to_owned()
            })
        );
        for (maxmemory, name, evicts) in [
            ("67108864", "allkeys-lru", true),
            ("67108864", "volatile-lru", true),
            ("67108864", "volatile-ttl", true),
            ("67108864", "noeviction", false),
            ("0", "allkeys-lru", false),
            ("0", "noeviction", false),
        ] {
            let found = policy(maxmemory, name).expect("both fields");
            assert_eq!(found.may_evict(), evicts, "{maxmemory} {name}");
        }
    }

    #[test]
    fn an_answer_without_both_fields_is_no_answer() {
        assert_eq!(
            MemoryPolicy::from_info("# Memory\r\nused_memory:1\r\n"),
            None
        );
        assert_eq!(
            MemoryPolicy::from_info("maxmemory:lots\r\nmaxmemory_policy:noeviction\r\n"),
            None
        );
        // `maxmemory_human` and `maxmemory_policy` share the prefix but are not it.
        assert_eq!(
            MemoryPolicy::from_info("maxmemory_human:0B\r\nmaxmemory_policy:noeviction\r\n"),
            None
        );
    }
}

//! Locks in Redis that expire: one holder at a time (the rebuild, the consumer repair),
//! each taking identified by a fresh owner id so that only its holder refreshes and
//! releases it.

use std::sync::LazyLock;
use std::time::Duration;

use ingest::redis_connection::RedisConnection;
use redis::Script;

/// Extends the lock's expiry if the owner still holds it (hashed once per process).
static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    )
});

/// Deletes the lock if the owner still holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});

/// Takes `key` for `ttl` unless someone holds it. Returns the owner id now holding it
/// (to refresh and release it with), or `None` when another holder has it.
pub(crate) async fn take(
    redis: &mut RedisConnection,
    key: &str,
    ttl: Duration,
) -> redis::RedisResult<Option<String>> {
    let owner = uuid::Uuid::now_v7().to_string();
    let taken: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(&owner)
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(redis)
        .await?;
    Ok(taken.map(|_| owner))
}

/// Extends `key` to `ttl` from now if `owner` still holds it; `false` when it has been
/// lost (expired, or taken by another holder since).
pub(crate) async fn refresh(
    redis: &mut RedisConnection,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let kept: i64 = REFRESH
        .key(key)
        .arg(owner)
        .arg(ttl.as_millis() as u64)
        .invoke_async(redis)
        .await?;
    Ok(kept == 1)
}

/// Deletes `key` if `owner` still holds it (an expired lock may have a new owner by
/// now). Best effort: a lock left behind expires.
pub(crate) async fn release(redis: &mut RedisConnection, key: &str, owner: &str) {
    let released: redis::RedisResult<i64> = RELEASE.key(key).arg(owner).invoke_async(redis).await;
    if let Err(error) = released {
        tracing::debug!(%error, key, "releasing a lock failed; it expires");
    }
}

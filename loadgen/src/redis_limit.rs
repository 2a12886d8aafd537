//! Redis: the script-call limit (`EVALSHA` of a small script, pipelined) and removing
//! every key under a prefix.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use contract::settings::{connecting_to, redacted};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};

use crate::stats::{per_second, Latency};

/// About what one event costs the projector's script: a counter, a sum, a last value.
const SCRIPT: &str = r"
redis.call('HINCRBY', KEYS[1], 'count', 1)
redis.call('HINCRBYFLOAT', KEYS[1], 'sum', ARGV[1])
redis.call('HSET', KEYS[1], 'last', ARGV[1])
return 1";

pub async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client =
        redis::Client::open(url).with_context(|| format!("Redis URL {}", redacted(url)))?;
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .with_context(|| format!("{} timed out", connecting_to("Redis", url)))?
    .with_context(|| connecting_to("Redis", url))
}

/// A prefix that can be used in `SCAN MATCH <prefix>*` without matching anything else:
/// not empty, no glob characters.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix.len() < 2 || prefix.contains(['*', '?', '[', ']', '\\']) {
        bail!("Redis prefix {prefix:?} must be at least 2 characters with no glob characters");
    }
    Ok(())
}

/// `count` script calls in pipelines of `pipeline`, over 1,000 keys under `prefix`;
/// the keys are removed afterwards.
pub async fn evalsha_limit(
    url: &str,
    prefix: &str,
    count: u64,
    pipeline: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    check_prefix(prefix)?;
    let mut connection = connect(url).await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SCRIPT)
        .query_async(&mut connection)
        .await
        .context("SCRIPT LOAD")?;
    let pipeline = pipeline.max(1);
    let mut latency = Latency::new();
    let started = Instant::now();
    let run = tokio::time::timeout(timeout, async {
        let mut done = 0u64;
        while done < count {
            let size = (count - done).min(pipeline as u64);
            let mut pipe = redis::pipe();
            for i in 0..size {
                let n = done + i;
                pipe.cmd("EVALSHA")
                    .arg(&sha)
                    .arg(1)
                    .arg(format!("{prefix}k:{{{}}}", n % 1000))
                    .arg(n % 97)
                    .ignore();
            }
            let sent = Instant::now();
            pipe.query_async::<()>(&mut connection)
                .await
                .context("EVALSHA pipeline")?;
            latency.record(sent.elapsed());
            done += size;
        }
        Ok::<_, anyhow::Error>(done)
    })
    .await;
    let elapsed = started.elapsed();
    let removed = delete_prefix(&mut connection, prefix).await;
    let done = match run {
        Ok(done) => done?,
        Err(_) => bail!("{count} script calls took longer than {timeout:?}"),
    };
    Ok(json!({
        "calls": done,
        "pipeline": pipeline,
        "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "calls_per_s": per_second(done, elapsed),
        "pipeline_latency": latency.summary(),
        "keys_removed": removed?,
    }))
}

/// Removes every key that starts with `prefix` (SCAN + UNLINK); returns how many.
pub async fn delete_prefix(
    connection: &mut MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<u64> {
    check_prefix(prefix)?;
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    let mut removed = 0u64;
    // Bounded: a keyspace is walked in far fewer rounds than this.
    for _ in 0..1_000_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .context("SCAN")?;
        let keys: Vec<String> = keys.into_iter().filter(|k| k.starts_with(prefix)).collect();
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(connection)
                .await
                .context("UNLINK")?;
            removed += n;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_with_globs_or_empty_are_refused() {
        assert!(check_prefix("bench:").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("b").is_err());
        assert!(check_prefix("bench*").is_err());
        assert!(check_prefix("be[n]ch:").is_err());
    }
}

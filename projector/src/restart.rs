//! Whether Redis restarted and loaded the read model from its files.
//!
//! A Redis that saves snapshots (Debian's `redis-server` package does by default) and
//! is killed — the OOM killer, a host crash — comes back with the read model as of its
//! last save. The figures then lack every event applied after it, and the durable
//! consumer never delivers those again: they were acked. Nothing errors; the numbers
//! are just short, for good. (A Redis that keeps nothing comes back empty, and the
//! missing read model is rebuilt: that case is the supervisor's own.)
//!
//! Redis gives itself a new `run_id` at every start. The meta hash keeps the one of the
//! server its live generation was built on (`redis_run`, written by the rebuild's
//! switch, or by the first look at a read model without one). A read model that came
//! back from a file brings the old `run_id` with it: the projector rebuilds it from the
//! stream, which holds the events the file missed. A restart that lost nothing (an
//! append-only file synced at every write, a clean `SHUTDOWN SAVE`) is rebuilt too:
//! the projector cannot tell the two apart, and a replay is only time.

use contract::read_model::{meta, meta_key};
use redis::aio::ConnectionLike;

/// The server's `run_id`, from `INFO server`; `None` when it does not answer or says
/// none.
pub async fn run_id(redis: &mut impl ConnectionLike) -> Option<String> {
    let info: redis::RedisResult<String> =
        redis::cmd("INFO").arg("server").query_async(redis).await;
    run_id_of(&info.ok()?).map(str::to_owned)
}

/// The `run_id` field of an `INFO server` answer.
pub fn run_id_of(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("run_id:"))
        .filter(|run_id| !run_id.is_empty())
}

/// Compares the server's `run_id` with the read model's at each look, and says so once
/// per server when they differ.
#[derive(Debug, Default)]
pub struct RestartWatch {
    /// The `run_id` of the server last found to hold a reloaded read model.
    warned_about: Option<String>,
}

impl RestartWatch {
    /// True when the live read model was built on another run of the server than this
    /// one, so that it must be rebuilt. A read model without a `redis_run` (one built
    /// before projectors kept it) is taken as this run's and marked so; no read model,
    /// or a server that does not answer, is not a reloaded one.
    pub async fn reloaded(&mut self, redis: &mut impl ConnectionLike, prefix: &str) -> bool {
        let Some(run_id) = run_id(redis).await else {
            return false;
        };
        let key = meta_key(prefix);
        let fields: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("HMGET")
            .arg(&key)
            .arg(meta::GENERATION)
            .arg(meta::REDIS_RUN)
            .query_async(redis)
            .await;
        match fields {
            Ok((Some(_), None)) => {
                let marked: redis::RedisResult<i64> = redis::cmd("HSETNX")
                    .arg(&key)
                    .arg(meta::REDIS_RUN)
                    .arg(&run_id)
                    .query_async(redis)
                    .await;
                if let Err(error) = marked {
                    tracing::debug!(%error, "marking the read model with the Redis run failed");
                }
                false
            }
            Ok((Some(_), Some(built_on))) if built_on != run_id => {
                if self.warned_about.as_ref() != Some(&run_id) {
                    metrics::counter!("projector_redis_reloads_total").increment(1);
                    tracing::warn!(
                        built_on,
                        run_id,
                        "Redis restarted and loaded the read model from its files: it lacks \
                         what was applied after they were written, so it is rebuilt from the \
                         stream; run Redis without persistence (save \"\", appendonly no)"
                    );
                    self.warned_about = Some(run_id);
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_id_is_read_from_its_own_line_only() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:5d2f0c3a9b\r\ntcp_port:6379\r\n";
        assert_eq!(run_id_of(info), Some("5d2f0c3a9b"));
        assert_eq!(run_id_of("# Server\r\nredis_version:7.0.15\r\n"), None);
        assert_eq!(run_id_of("run_id:\r\n"), None);
        // Another field that merely ends in the same name is not it.
        assert_eq!(run_id_of("master_run_id:abc\r\n"), None);
    }
}

//! Whether Redis restarted, or another server took over, with the read model loaded
//! from files or a replica.
//!
//! A Redis that saves snapshots (the default of `redis-server` without a config file,
//! and of Debian's package) and is killed — the OOM killer, a host crash — comes back
//! with the read model as of its last save. The figures then lack every event applied
//! after it, and the durable consumer never delivers those again: they were acked.
//! Nothing errors; the numbers are just short, for good. A replica promoted by a
//! failover can lag the same way. (A Redis that keeps nothing comes back empty, and the
//! missing read model is rebuilt: that case is the supervisor's own.)
//!
//! Redis gives itself a new `run_id` at every start, and every server has its own. The
//! meta hash keeps the one of the server its live generation was built on (`redis_run`,
//! written by the rebuild's switch, or by the first look at a read model without one).
//! A read model that carries another came back from a file or a replica. Whether it
//! lost anything the projector cannot tell (a clean `SHUTDOWN SAVE` loses nothing), so:
//! - while the stream still holds every event it was ever given (its first sequence is
//!   1), the read model is rebuilt from it, which restores it exactly;
//! - once the stream has let its oldest events go (its retention), a rebuild would cut
//!   every device's all-time figures back to what the stream holds, so the projector
//!   only says so — a WARN, `projector_redis_reloads_total`, the `RedisReloaded` alert —
//!   and an operator decides whether to run `projector rebuild`.

use contract::read_model::{meta, meta_key};
use redis::aio::ConnectionLike;

use crate::rebuild::{Generations, Rebuild};

/// The server's `run_id`, from `INFO server`; `Ok(None)` when the answer has none.
pub async fn run_id(redis: &mut impl ConnectionLike) -> redis::RedisResult<Option<String>> {
    let info: String = redis::cmd("INFO").arg("server").query_async(redis).await?;
    Ok(run_id_of(&info).map(str::to_owned))
}

/// The `run_id` field of an `INFO server` answer.
pub fn run_id_of(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("run_id:"))
        .filter(|run_id| !run_id.is_empty())
}

/// Compares the server's `run_id` with the read model's at each look, and says once per
/// server what it found.
#[derive(Debug, Default)]
pub struct RestartWatch {
    /// The `run_id` of the server last found to hold a read model built on another.
    reported: Option<String>,
    /// Whether a server that refuses `INFO` (an ACL without `@dangerous`) was reported.
    refused_reported: bool,
}

impl RestartWatch {
    /// True when the live read model, as the supervisor just read the meta hash
    /// (`generations`), was built on another server or run than this one and the stream
    /// still holds every event, so that a rebuild restores it exactly. A read model
    /// without a `redis_run` (one built before projectors kept it) is taken as this
    /// server's and marked so; no read model, a server or a NATS that does not answer,
    /// is no reason to rebuild (the next look tries again).
    pub async fn reloaded(&mut self, rebuild: &Rebuild, generations: &Generations) -> bool {
        if generations.current.is_none() {
            return false;
        }
        let mut redis = rebuild.redis.clone();
        let run_id = match run_id(&mut redis).await {
            Ok(Some(run_id)) => run_id,
            Ok(None) => return false,
            Err(error) => {
                // A server's own refusal carries a code (NOPERM, ERR); one away, none.
                if error.code().is_some() && !self.refused_reported {
                    self.refused_reported = true;
                    tracing::warn!(
                        %error,
                        "Redis refuses INFO: a restart that loads an old read model from its \
                         files cannot be told, and would leave figures short"
                    );
                }
                return false;
            }
        };
        let key = meta_key(&rebuild.read_model.prefix);
        let built_on = match &generations.redis_run {
            None => {
                mark(&mut redis, &key, &run_id, "HSETNX").await;
                return false;
            }
            Some(built_on) if *built_on != run_id => built_on,
            Some(_) => return false,
        };
        let Some(first_sequence) = first_sequence(rebuild).await else {
            return false;
        };
        let holds_everything = first_sequence <= 1;
        if self.reported.as_ref() != Some(&run_id) {
            self.reported = Some(run_id.clone());
            metrics::counter!("projector_redis_reloads_total").increment(1);
            if holds_everything {
                tracing::warn!(
                    built_on,
                    run_id,
                    "the read model was built on another Redis run or server: it came back \
                     from files or a replica and may lack what was applied since; the stream \
                     holds every event, so it is rebuilt from it"
                );
            } else {
                tracing::warn!(
                    built_on,
                    run_id,
                    first_sequence,
                    "the read model was built on another Redis run or server: it came back \
                     from files or a replica and may lack what was applied since; not rebuilt, \
                     as the stream no longer holds its oldest events and a rebuild would cut \
                     all-time figures to its retention (projector rebuild does it)"
                );
            }
        }
        if !holds_everything {
            // Taken as this server's from now on: reported once, not rebuilt.
            mark(&mut redis, &key, &run_id, "HSET").await;
        }
        holds_everything
    }
}

/// Sets the meta hash's `redis_run` to `run_id` (`command`: `HSET`, or `HSETNX` to
/// leave one already there).
async fn mark(redis: &mut impl ConnectionLike, key: &str, run_id: &str, command: &str) {
    let marked: redis::RedisResult<i64> = redis::cmd(command)
        .arg(key)
        .arg(meta::REDIS_RUN)
        .arg(run_id)
        .query_async(redis)
        .await;
    if let Err(error) = marked {
        tracing::debug!(%error, "marking the read model with the Redis run failed");
    }
}

/// The stream's first sequence: above 1 once it let its oldest events go. One request:
/// looking the stream up brings its state.
async fn first_sequence(rebuild: &Rebuild) -> Option<u64> {
    let stream = rebuild
        .jetstream
        .get_stream(rebuild.subjects.stream())
        .await
        .ok()?;
    Some(stream.cached_info().state.first_sequence)
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

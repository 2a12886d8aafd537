//! A Redis connection manager that comes back after a refused login.
//!
//! redis-rs's `ConnectionManager` connects again when its connection breaks, but a
//! connection attempt that the server refuses (a login refused: a password or an ACL
//! user changed or disabled for a while, `ERR max number of clients reached` in answer
//! to the login) stays its connection for good: every later command fails with that
//! error, and no new attempt is ever made (redis 1.8 reconnects after I/O errors
//! only). The projector and `query` would then fail until restarted, however soon the
//! login worked again. [`RedisConnection`] makes a new manager when a command fails
//! so, and the next command tries again.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, Value};

/// A [`ConnectionManager`] made again when its connection attempt was refused. Clones
/// share it.
#[derive(Clone)]
pub struct RedisConnection {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The manager in use, and how many were made before it.
    current: Mutex<(u64, ConnectionManager)>,
}

impl RedisConnection {
    /// A manager of `client` with `config`; it connects at its first command.
    pub fn new_lazy(client: redis::Client, config: ConnectionManagerConfig) -> RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                config,
                current: Mutex::new((0, manager)),
            }),
        })
    }

    /// The manager in use and its number.
    fn current(&self) -> (u64, ConnectionManager) {
        let current = self.lock();
        (current.0, current.1.clone())
    }

    /// After a command on manager `made` failed with `error`: a refused connection
    /// attempt makes a new manager, unless another command made one already.
    fn after_failure(&self, made: u64, error: &redis::RedisError) {
        if !login_refused(error) {
            return;
        }
        let mut current = self.lock();
        if current.0 != made {
            return;
        }
        match ConnectionManager::new_lazy_with_config(
            self.shared.client.clone(),
            self.shared.config.clone(),
        ) {
            Ok(manager) => {
                *current = (made + 1, manager);
                tracing::warn!(
                    %error,
                    "redis refused the login, logging in again at the next command"
                );
            }
            Err(error) => tracing::warn!(%error, "making a new redis connection manager failed"),
        }
    }

    /// A command that panicked while holding the lock left a whole value behind.
    fn lock(&self) -> MutexGuard<'_, (u64, ConnectionManager)> {
        crate::sync::lock(&self.shared.current)
    }

    /// Sends what `send` sends on the manager in use, and makes a new one if the login
    /// was refused.
    async fn send<T, Sent>(&self, send: impl FnOnce(ConnectionManager) -> Sent) -> RedisResult<T>
    where
        Sent: Future<Output = RedisResult<T>>,
    {
        let (made, manager) = self.current();
        let result = send(manager).await;
        if let Err(error) = &result {
            self.after_failure(made, error);
        }
        result
    }
}

/// Whether `error` is the server refusing the login: `AUTH`'s refusal, or `HELLO`'s
/// (`WRONGPASS`) when the connection speaks RESP3, as query's does. Only a connection
/// attempt sends them.
pub fn login_refused(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::AuthenticationFailed || error.code() == Some("WRONGPASS")
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(
            self.send(move |mut manager| async move { manager.send_packed_command(cmd).await }),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.send(move |mut manager| async move {
            manager.send_packed_commands(pipeline, offset, count).await
        }))
    }

    fn get_db(&self) -> i64 {
        self.shared
            .client
            .get_connection_info()
            .redis_settings()
            .db()
    }
}

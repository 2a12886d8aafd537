//! A Redis user (ACL) of the test's own: a service logged in as it can be refused, or
//! cut off from Redis while the others go on.

use crate::TestEnv;

/// A Redis user named after the test's key prefix, removed when dropped.
pub struct RedisUser {
    name: String,
    admin_url: String,
}

impl RedisUser {
    /// A user that may do everything but what `rules` take away (`-hmget`, ...).
    pub async fn create(env: &TestEnv, rules: &[&str]) -> Self {
        let name = env.settings.redis.prefix.trim_end_matches(':').to_owned();
        let user = Self {
            name,
            admin_url: env.settings.redis.url.clone(),
        };
        user.set(&["on", ">password", "~*", "&*", "+@all"], rules)
            .await;
        user
    }

    /// The Redis URL that logs in as this user.
    pub fn url(&self) -> String {
        self.admin_url
            .replacen("redis://", &format!("redis://{}:password@", self.name), 1)
    }

    /// Cuts the user off, as a partition between its service and Redis would: its
    /// connections are closed and every login is refused until [`Self::enable`].
    pub async fn disable(&self) {
        self.set(&["off"], &[]).await;
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(&self.name)
            .query_async(&mut self.admin().await)
            .await
            .expect("CLIENT KILL USER");
    }

    /// Lets the user log in again.
    pub async fn enable(&self) {
        self.set(&["on"], &[]).await;
    }

    async fn set(&self, rules: &[&str], more: &[&str]) {
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&self.name)
            .arg(rules)
            .arg(more)
            .query_async(&mut self.admin().await)
            .await
            .expect("ACL SETUSER");
    }

    async fn admin(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.admin_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

impl Drop for RedisUser {
    fn drop(&mut self) {
        if let Ok(mut redis) =
            redis::Client::open(self.admin_url.as_str()).and_then(|client| client.get_connection())
        {
            let _: redis::RedisResult<i64> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.name)
                .query(&mut redis);
        }
    }
}

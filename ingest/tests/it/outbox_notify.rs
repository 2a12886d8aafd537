//! How the relays learn of new outbox rows: ingest sends `NOTIFY outbox` after its
//! commits (no trigger any more), the relay wakes on it without waiting for its poll,
//! and a notification never arrives before its rows are visible.

use std::time::{Duration, Instant};

use futures::StreamExt;
use testkit::{eventually, TestEnv};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::relay::{spawn_relay, stream_messages, wait_for_stream_messages};
use crate::support::{
    applied_versions, count, migrate, migration_file_versions, reading, wait_for_counts, Ingest,
};

/// A session listening on the relays' channel, as a relay's is.
struct Listener {
    _client: tokio_postgres::Client,
    notifications: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    async fn start(env: &TestEnv) -> Self {
        let (client, mut connection) =
            tokio_postgres::connect(&env.settings.database.url, tokio_postgres::NoTls)
                .await
                .expect("test database reachable");
        let (sender, notifications) = mpsc::unbounded_channel();
        let mut messages =
            futures::stream::poll_fn(move |context| connection.poll_message(context));
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(notification) = message {
                    let _ = sender.send(notification.channel().to_owned());
                }
            }
        });
        client
            .batch_execute("LISTEN outbox")
            .await
            .expect("LISTEN outbox");
        Self {
            _client: client,
            notifications,
        }
    }

    /// Waits (at most 5 s) for the next notification on `outbox`.
    async fn next(&mut self) {
        let channel = tokio::time::timeout(Duration::from_secs(5), self.notifications.recv())
            .await
            .expect("a NOTIFY within 5 s")
            .expect("the listening session is open");
        assert_eq!(channel, "outbox");
    }

    /// Forgets the notifications received so far.
    fn clear(&mut self) {
        while self.notifications.try_recv().is_ok() {}
    }
}

#[tokio::test]
async fn an_idle_relay_publishes_a_posted_reading_at_once_though_it_polls_once_a_minute() {
    let mut env = TestEnv::new();
    // Only a notification can wake the relay within the test's deadline.
    env.settings.relay.poll_interval_ms = 60_000;
    let ingest = Ingest::spawn(&env.settings).await;
    // Written before the relay starts: its first round publishes it, whatever wakes it.
    ingest.accept("k-0", &reading("sensor-1", 0.0)).await;
    let relay = spawn_relay(&env.settings);
    let jetstream = env.jetstream().await;
    wait_for_stream_messages(&jetstream, env.subjects.stream(), 1).await;
    let db = env.postgres().await;
    wait_for_counts(
        &db,
        Duration::from_secs(10),
        "the relay idle: its row marked, its session waiting on LISTEN",
        "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL),
                (SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND state = 'idle'
                   AND query = 'LISTEN outbox')",
        &[0, 1],
    )
    .await;

    // Well within the minute the next poll is due in, even on a loaded box.
    const BY_NOTIFICATION: Duration = Duration::from_secs(15);
    let posted = Instant::now();
    ingest.accept("k-1", &reading("sensor-1", 1.0)).await;
    eventually(
        BY_NOTIFICATION,
        "the second reading published long before the next poll",
        || async { (stream_messages(&jetstream, env.subjects.stream()).await? == 2).then_some(()) },
    )
    .await;
    assert!(posted.elapsed() < BY_NOTIFICATION);

    relay.stop().await;
    ingest.stop().await;
}

#[tokio::test]
async fn migrations_drop_the_outbox_notify_trigger_also_where_it_exists() {
    let env = TestEnv::new();
    migrate(&env).await;
    let db = env.postgres().await;
    let notify_trigger_and_function = || async {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM pg_trigger
                         WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal),
                        (SELECT count(*) FROM pg_proc WHERE proname = 'outbox_notify')",
                &[],
            )
            .await
            .expect("catalog query");
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    assert_eq!(
        notify_trigger_and_function().await,
        (0, 0),
        "a new database"
    );

    // A database at version 3 has the trigger of migration 0001.
    db.batch_execute(
        "CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('outbox', ''); RETURN NULL; END $$;
         CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
             FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
         DELETE FROM schema_migrations WHERE version = 4;",
    )
    .await
    .expect("back to version 3");
    assert_eq!(notify_trigger_and_function().await, (1, 1));
    migrate(&env).await;
    assert_eq!(
        notify_trigger_and_function().await,
        (0, 0),
        "an upgraded database"
    );
    assert_eq!(applied_versions(&db).await, migration_file_versions());
}

#[tokio::test]
async fn each_ingest_notifies_after_its_own_commits_and_the_rows_are_visible_by_then() {
    let env = TestEnv::new();
    let first = Ingest::spawn(&env.settings).await;
    let second = Ingest::spawn(&env.settings).await;
    let mut listener = Listener::start(&env).await;
    let db = env.postgres().await;

    for (posted, (ingest, key)) in [(&first, "k-1"), (&second, "k-2"), (&first, "k-3")]
        .into_iter()
        .enumerate()
    {
        listener.clear();
        let device = format!("sensor-{posted}");
        let answer = tokio::spawn({
            let http = ingest.http.clone();
            let url = format!("{}/v1/telemetry", ingest.base_url);
            let body = reading(&device, 1.0).to_string();
            let key = key.to_owned();
            async move {
                http.post(url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", key)
                    .body(body)
                    .send()
                    .await
                    .expect("request sent")
                    .status()
                    .as_u16()
            }
        });
        listener.next().await;
        // Whether or not the 202 has arrived yet, the row it answers for is committed.
        assert_eq!(
            count(&db, "outbox").await,
            posted as i64 + 1,
            "the outbox row of {key} is visible when its NOTIFY arrives"
        );
        assert_eq!(answer.await.expect("request task"), 202);
    }

    // A replay inserts no outbox row and sends no NOTIFY.
    listener.clear();
    let replay = first.accept("k-1", &reading("sensor-0", 1.0)).await;
    assert!(replay.headers().contains_key("idempotent-replayed"));
    let quiet =
        tokio::time::timeout(Duration::from_millis(500), listener.notifications.recv()).await;
    assert!(quiet.is_err(), "no NOTIFY for a replay");

    first.stop().await;
    second.stop().await;
}

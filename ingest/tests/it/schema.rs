//! The write path's schema: every B-tree entry a reading costs is one a statement of the
//! pipeline reads (migrations 0005 and 0006 dropped the others), also on a database that
//! was migrated before they existed.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use testkit::{maintenance_postgres, TestEnv};

use crate::support::{applied_versions, column, migrate, migration_file_versions};

/// Every index of the three tables a reading writes, as `table.index`, in name order.
const INDEXES: &str = "SELECT tablename || '.' || indexname FROM pg_indexes
    WHERE schemaname = 'public' AND tablename IN ('readings', 'idempotency_keys', 'outbox')
    ORDER BY 1";

#[tokio::test]
async fn a_reading_writes_only_indexes_that_a_statement_reads() {
    let env = TestEnv::new();
    migrate(&env).await;
    let db = env.postgres().await;

    let indexes: Vec<String> = column(&db, INDEXES).await;

    assert_eq!(
        indexes,
        [
            // (device_id, idempotency_key): dedup at the door; `created_at`: the key prune
            "idempotency_keys.idempotency_keys_created_at",
            "idempotency_keys.idempotency_keys_pkey",
            // rows by id (the mark), the stream check by sequence, the prune, the claim
            "outbox.outbox_pkey",
            "outbox.outbox_published_at",
            "outbox.outbox_stream_seq",
            "outbox.outbox_unpublished",
            // an event is stored once (the outbox row relies on it, 0005); the reading prune
            "readings.readings_pkey",
            "readings.readings_received_at",
        ]
    );
}

#[tokio::test]
async fn migration_6_drops_the_device_index_of_a_database_that_has_it() {
    let env = TestEnv::new();
    migrate(&env).await;
    let db = env.postgres().await;
    // A database at version 5, with the index of migration 0001 and readings in it.
    db.batch_execute(
        "CREATE INDEX readings_device_recorded_at ON readings (device_id, recorded_at);
         INSERT INTO readings (event_id, device_id, recorded_at, received_at, metrics)
             SELECT gen_random_uuid(), 'sensor-' || g % 10, now(), now(), '{}'
             FROM generate_series(1, 100) AS g;
         DELETE FROM schema_migrations WHERE version = 6;",
    )
    .await
    .expect("back to version 5");
    let before: Vec<String> = column(&db, INDEXES).await;
    assert!(before.contains(&"readings.readings_device_recorded_at".to_owned()));

    migrate(&env).await;

    let after: Vec<String> = column(&db, INDEXES).await;
    assert!(
        !after
            .iter()
            .any(|index| index.contains("device_recorded_at")),
        "{after:?}"
    );
    assert_eq!(after.len(), before.len() - 1, "only that index went");
    let readings: Vec<i64> = column(&db, "SELECT count(*) FROM readings").await;
    assert_eq!(readings, [100], "the readings stay");
    assert_eq!(applied_versions(&db).await, migration_file_versions());
}

/// A `202` promises a reading that survives a crash: where the database (or server, or
/// role) has `synchronous_commit = off`, every pooled session turns it back on; a
/// setting that still flushes locally is left as the operator chose it. Either way the
/// session sets it (and read committed) itself, so that a reload of the server's
/// configuration with `synchronous_commit = off` leaves the pool's sessions as they are:
/// a value set in a session outranks the configuration file's.
#[tokio::test]
async fn pooled_sessions_commit_durably_whatever_the_database_default() {
    let env = TestEnv::new();
    migrate(&env).await;
    let db = env.postgres().await;
    let database = &env.database;
    for (default, pooled) in [
        ("off", "on"),
        ("local", "local"),
        ("remote_apply", "remote_apply"),
    ] {
        db.batch_execute(&format!(
            "ALTER DATABASE \"{database}\" SET synchronous_commit = {default}"
        ))
        .await
        .expect("database default set");
        let plain = env.postgres().await;
        let show = "SHOW synchronous_commit";
        let plain_sees: String = plain.query_one(show, &[]).await.expect("show").get(0);
        assert_eq!(plain_sees, default, "a new plain session gets the default");
        let pool = ingest::db::pool(&env.settings.database).expect("pool");
        let session = pool.get().await.expect("pooled session");
        let pooled_sees: String = session.query_one(show, &[]).await.expect("show").get(0);
        assert_eq!(pooled_sees, pooled, "a pooled session under {default}");
        let sources: Vec<String> = column(
            &session,
            "SELECT source FROM pg_settings WHERE name IN \
             ('synchronous_commit', 'default_transaction_isolation') ORDER BY name",
        )
        .await;
        assert_eq!(
            sources,
            ["session", "session"],
            "set by the session itself under {default}, beyond a reload's reach"
        );
    }
}

/// A URL that names no database means the one named after its user, as libpq and
/// tokio-postgres read it: that is the one ingest creates. Until 2026-12-06 it looked
/// for `postgres`, found it, and the database its sessions then asked for was never
/// created: ingest answered 503 for good.
#[tokio::test]
async fn a_url_without_a_database_gets_the_one_named_after_its_user_created() {
    let mut env = TestEnv::new();
    let url = env.settings.database.url.clone();
    let server = url
        .rsplit_once('@')
        .and_then(|(_, host)| host.split_once('/'))
        .map(|(server, _)| server.to_owned())
        .expect("a URL of the form postgres://user@host:port/database");
    let admin = maintenance_postgres(&env.settings)
        .await
        .expect("admin session");
    // A role named like the test's database, with a password for a server that asks.
    let role = env.database.clone();
    let password = format!("{:032x}", rand::random::<u128>());
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN CREATEDB PASSWORD '{password}'"
        ))
        .await
        .expect("role created");
    env.settings.database.url = format!("postgres://{role}:{password}@{server}");

    let outcome = AssertUnwindSafe(async {
        migrate(&env).await;
        let db = env.postgres().await;
        let database: String = db
            .query_one("SELECT current_database()", &[])
            .await
            .expect("database named")
            .get(0);
        assert_eq!(database, role);
        assert_eq!(applied_versions(&db).await, migration_file_versions());
    })
    .catch_unwind()
    .await;
    env.settings.database.url = url;
    // The role owns the database it created: both go, also when the test failed.
    let mut dropped = Ok(());
    for statement in [
        format!("DROP DATABASE IF EXISTS \"{role}\" WITH (FORCE)"),
        format!("DROP ROLE \"{role}\""),
    ] {
        dropped = dropped.and(admin.batch_execute(&statement).await);
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    dropped.expect("database and role dropped");
}

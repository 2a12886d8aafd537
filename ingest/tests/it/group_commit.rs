//! The group commit with several commits in flight: the same keys in concurrent
//! commits, every submission answered, every key stored once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use contract::reading::Reading;
use ingest::outbox_notify::Notifier;
use ingest::store::{GroupCommit, NewReading, Outcome, Store};
use testkit::TestEnv;
use time::OffsetDateTime;

use crate::support::migrate;

fn reading(device: usize, temperature: f64) -> Reading {
    Reading {
        device_id: format!("sensor-{device}"),
        recorded_at: Some(OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1)),
        metrics: BTreeMap::from([("temperature".to_owned(), temperature)]),
    }
}

#[tokio::test]
async fn parallel_commits_store_each_key_once_and_answer_every_submission() {
    let env = TestEnv::new();
    migrate(&env).await;
    let pool = ingest::db::pool(&env.settings.database).expect("pool");
    // Small batches and a low threshold, so that many commits run side by side.
    let limits = GroupCommit {
        batch_max: 25,
        concurrency: 4,
        parallel_min: 1,
        queue_capacity: 10_000,
    };
    let notifier = Notifier::new(
        ingest::db::pg_config(&env.settings.database).expect("database url"),
        Duration::from_secs(2),
    );
    let (store, dispatcher) = Store::start(pool, limits, Some(notifier));

    // 200 keys over 20 devices; each key sent three times, twice with the same reading
    // and once with a different one, in an order that spreads the copies of a key over
    // different commits.
    const KEYS: usize = 200;
    let mut submissions: Vec<(usize, f64)> = Vec::new();
    for copy in 0..3 {
        for key in 0..KEYS {
            submissions.push((key, if copy == 2 { 99.0 } else { key as f64 }));
        }
    }
    let total = submissions.len();
    let shuffled: Vec<(usize, f64)> = (0..total)
        .map(|index| submissions[(index * 7919) % total])
        .collect();
    let tasks = shuffled.into_iter().map(|(key, temperature)| {
        let store = store.clone();
        tokio::spawn(async move {
            let new = NewReading::new(
                reading(key % 20, temperature),
                format!("key-{key}"),
                OffsetDateTime::now_utc(),
            );
            (key, temperature, store.submit(new).await)
        })
    });
    let answers = futures::future::join_all(tasks).await;
    drop(store);
    dispatcher
        .await
        .expect("dispatcher ends once every store is dropped");

    let mut accepted_value: HashMap<usize, f64> = HashMap::new();
    let mut answered = 0;
    for answer in &answers {
        let (key, temperature, outcome) = answer.as_ref().expect("task finished");
        let outcome = outcome.as_ref().expect("the commit succeeded");
        answered += 1;
        if let Outcome::Accepted { .. } = outcome {
            let first = accepted_value.insert(*key, *temperature);
            assert!(first.is_none(), "key {key} was accepted twice");
        }
    }
    assert_eq!(answered, total, "every submission got an answer");
    assert_eq!(accepted_value.len(), KEYS, "every key was accepted once");
    for answer in answers {
        let (key, temperature, outcome) = answer.expect("task finished");
        let stored = accepted_value[&key];
        match outcome.expect("the commit succeeded") {
            Outcome::Accepted { .. } => {}
            Outcome::Replayed { .. } => assert_eq!(temperature, stored, "key {key}"),
            Outcome::KeyReused => assert_ne!(temperature, stored, "key {key}"),
            Outcome::KeyInFlux => panic!("key {key}: no key expires in this test"),
        }
    }

    let db = env.postgres().await;
    for table in ["readings", "idempotency_keys", "outbox"] {
        let rows: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, KEYS as i64, "{table} holds one row per key");
    }
    let stored: Vec<(String, f64)> = db
        .query(
            "SELECT k.idempotency_key, (r.metrics->>'temperature')::float8
             FROM idempotency_keys k JOIN readings r USING (event_id)",
            &[],
        )
        .await
        .expect("stored readings")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for (key, temperature) in stored {
        let index: usize = key.trim_start_matches("key-").parse().expect("key-<n>");
        assert_eq!(
            temperature, accepted_value[&index],
            "{key}: the accepted reading is the stored one"
        );
    }
}

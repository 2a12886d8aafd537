//! `POST /v1/telemetry/batch` (API.md §2): per-item results, one bad item never fails
//! the others, the accepted ones commit together, a whole retry changes nothing.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::{eventually, TestEnv};

use crate::relay::{spawn_projector, spawn_relay};
use crate::support::{
    assert_problem, count, hold_key_copied, lock_waiter, queue_table_lock, rate_limited_ingest,
    reading, Ingest,
};
use crate::telemetry_api::{two_seconds_ago, wait_until_aged, SHORT_MAX_AGE_SECS};

fn item(key: &str, device: &str, temperature: f64) -> Value {
    json!({"idempotency_key": key, "device_id": device, "metrics": {"temperature": temperature}})
}

/// A field given twice is `invalid-json` in a batch item as it is in a single POST
/// (each item follows the rules of §1), and fails only its own item. A metric named
/// twice is a field given twice too: neither value is kept in place of the other.
#[tokio::test]
async fn a_field_given_twice_fails_its_item_as_it_fails_a_single_post() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let twice = [
        (
            r#""device_id": "gw-1", "device_id": "gw-2", "metrics": {"temperature": 1}"#,
            "duplicate field `device_id`",
        ),
        (
            r#""device_id": "gw-1", "metrics": {"temperature": 1, "temperature": 99}"#,
            "metric `temperature` is given more than once",
        ),
    ];
    for (index, (fields, named)) in twice.iter().enumerate() {
        let single = ingest
            .post_text(&format!("single-{index}"), format!("{{{fields}}}"))
            .await;
        let problem = assert_problem(single, 400, "invalid-json").await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(named), "{problem}");

        let item_twice = format!(r#"{{"idempotency_key": "twice-{index}", {fields}}}"#);
        let good = item(&format!("good-{index}"), "gw-1", 2.0);
        let response = ingest
            .post_batch_text(format!(r#"{{"readings": [{item_twice}, {good}]}}"#))
            .await;
        assert_eq!(response.status().as_u16(), 200);
        let answer: Value = response.json().await.expect("json");
        let rejected = &answer["results"][0];
        assert_eq!(rejected["status"], "rejected", "{answer}");
        assert_eq!(rejected["error"]["type"], "invalid-json");
        let detail = rejected["error"]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(named), "{answer}");
        assert_eq!(answer["results"][1]["status"], "accepted", "{answer}");
    }
    let db = env.postgres().await;
    assert_eq!(
        count(&db, "readings").await,
        2,
        "only the good items are stored"
    );
    ingest.stop().await;
}

/// A reading, a batch item or a batch body must be a JSON object. serde's derived
/// structs also took an array of their fields in order, so that
/// `["sensor-1", null, {"temperature": 1}]` was stored as a reading, and for any other
/// value the detail named a Rust type (`expected struct ReadingBody`).
#[tokio::test]
async fn a_reading_written_as_an_array_or_any_other_value_is_invalid_json() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    // (a single POST's body, a batch item): each the other's fields as an array too.
    let not_objects = [
        (
            r#"["gw-1", null, {"temperature": 1}]"#,
            r#"["k-array", "gw-1", null, {"temperature": 1}]"#,
        ),
        (r#""gw-1""#, r#""gw-1""#),
        ("7", "7"),
        ("null", "null"),
    ];
    for (index, (body, batch_item)) in not_objects.iter().enumerate() {
        let single = ingest
            .post_text(&format!("single-{index}"), (*body).to_owned())
            .await;
        let problem = assert_problem(single, 400, "invalid-json").await;
        assert_eq!(problem["detail"], "expected a JSON object", "{body}");

        let good = item(&format!("good-{index}"), "gw-1", 2.0);
        let response = ingest
            .post_batch_text(format!(r#"{{"readings": [{batch_item}, {good}]}}"#))
            .await;
        assert_eq!(response.status().as_u16(), 200);
        let answer: Value = response.json().await.expect("json");
        let rejected = &answer["results"][0];
        assert_eq!(rejected["status"], "rejected", "{answer}");
        assert_eq!(
            rejected["error"]["detail"], "expected a JSON object",
            "{answer}"
        );
        assert_eq!(answer["results"][1]["status"], "accepted", "{answer}");
    }
    let as_array = ingest
        .post_batch_text(format!("[[{}]]", item("whole-batch", "gw-1", 3.0)))
        .await;
    let problem = assert_problem(as_array, 400, "invalid-json").await;
    assert_eq!(problem["detail"], "expected a JSON object");
    let db = env.postgres().await;
    assert_eq!(
        count(&db, "readings").await,
        not_objects.len() as i64,
        "only the good items are stored"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn mixed_batch_gets_per_item_results_and_stores_exactly_the_accepted_readings() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let earlier = ingest.post("old", &reading("gw-1", 5.0)).await;
    let earlier: Value = earlier.json().await.expect("json");

    let batch = json!({"readings": [
        item("a", "gw-1", 1.0),                                            // 0 accepted
        item("b", "gw-2", 2.0),                                            // 1 accepted
        {"idempotency_key": "c", "device_id": "bad id", "metrics": {"t": 1}}, // 2 rejected: rule
        {"idempotency_key": "d", "device_id": "gw-1", "metrics": {"t": 1}, "extra": 1}, // 3 rejected: shape
        "not an object",                                                   // 4 rejected: shape
        {"device_id": "gw-1", "metrics": {"t": 1}},                        // 5 rejected: no key
        item("a", "gw-1", 1.0),                                            // 6 duplicate of 0
        item("b", "gw-2", 9.0),                                            // 7 conflict with 1
        item("old", "gw-1", 5.0),                                          // 8 duplicate of the earlier POST
        item("old", "gw-1", 6.0),                                          // 9 conflict with the earlier POST
        item("a", "gw-3", 3.0),                                            // 10 accepted: keys are per device
        {"idempotency_key": null, "device_id": "gw-1", "metrics": {"t": 1}}, // 11 rejected: no key
        {"idempotency_key": 7, "device_id": "gw-1", "metrics": {"t": 1}},    // 12 rejected: bad key
    ]});
    let response = ingest.post_batch(&batch).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.expect("json");
    let statuses = statuses(&answer);
    assert_eq!(
        statuses,
        [
            "accepted",
            "accepted",
            "rejected",
            "rejected",
            "rejected",
            "rejected",
            "duplicate",
            "conflict",
            "duplicate",
            "conflict",
            "accepted",
            "rejected",
            "rejected"
        ]
    );
    let results = answer["results"].as_array().expect("results");
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], index);
    }
    assert_eq!(
        results[6]["event_id"], results[0]["event_id"],
        "a duplicate names the earlier event"
    );
    assert_eq!(results[8]["event_id"], earlier["event_id"]);
    assert_eq!(results[2]["error"]["type"], "invalid-reading");
    assert_eq!(results[2]["error"]["field"], "device_id");
    assert_eq!(results[2]["error"]["detail"], "1 rule broken");
    assert_eq!(results[3]["error"]["type"], "invalid-json");
    // An item without a usable key is refused as a single POST without the header is.
    for index in [5, 11, 12] {
        let error = &results[index]["error"];
        assert_eq!(
            error["type"], "missing-idempotency-key",
            "item {index}: {error}"
        );
        assert_eq!(error["field"], "idempotency_key", "item {index}");
    }
    assert_eq!(results[7]["error"]["type"], "idempotency-key-reused");
    assert_counts(&answer, [3, 2, 2, 6]);

    let db = env.postgres().await;
    assert_eq!(
        count(&db, "readings").await,
        4,
        "the earlier reading and the 3 accepted"
    );
    assert_eq!(count(&db, "outbox").await, 4);

    // And exactly those reach the read model.
    let relay = spawn_relay(&env.settings);
    let projector = spawn_projector(&env.settings);
    for (device, expected_count, expected_sum) in
        [("gw-1", 2, 6.0), ("gw-2", 1, 2.0), ("gw-3", 1, 3.0)]
    {
        let stats = eventually(Duration::from_secs(20), "batch projected", || async {
            env.device_stats(device)
                .await
                .filter(|stats| stats.sample_count >= expected_count)
        })
        .await;
        assert_eq!(stats.sample_count, expected_count, "{device}");
        assert_eq!(stats.metrics["temperature"].sum, expected_sum, "{device}");
    }
    projector.stop().await;
    relay.stop().await;
    ingest.stop().await;
}

#[tokio::test]
async fn batch_retried_whole_is_all_duplicates_and_changes_nothing() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let items: Vec<Value> = (0..50)
        .map(|index| {
            item(
                &format!("k-{index}"),
                &format!("gw-{}", index % 7),
                index as f64,
            )
        })
        .collect();
    let batch = json!({ "readings": items });
    let first: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    assert_eq!(first["accepted"], 50);
    let retry: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    assert_eq!(
        (&retry["accepted"], &retry["duplicates"]),
        (&json!(0), &json!(50))
    );
    for (before, after) in first["results"]
        .as_array()
        .expect("results")
        .iter()
        .zip(retry["results"].as_array().expect("results"))
    {
        assert_eq!(after["status"], "duplicate");
        assert_eq!(after["event_id"], before["event_id"]);
    }
    let db = env.postgres().await;
    assert_eq!(count(&db, "readings").await, 50);
    assert_eq!(count(&db, "outbox").await, 50);
    ingest.stop().await;
}

/// An item lists at most `ITEM_ERRORS_LISTED` broken rules and its detail counts them
/// all, so a batch of items that each break many rules is not answered with many times
/// its body (a single POST's 422 lists up to 32 bad metrics and counts the rest, under
/// 8 KiB).
#[tokio::test]
async fn a_batch_of_items_breaking_many_rules_gets_an_answer_near_its_size() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let bad_names: serde_json::Map<String, Value> = (0..33)
        .map(|index| (format!("Q{index}"), json!(1)))
        .collect();
    let readings: Vec<Value> = (0..1000)
        .map(|index| json!({"idempotency_key": format!("k-{index}"), "device_id": "gw-1", "metrics": bad_names}))
        .collect();
    let body = json!({ "readings": readings }).to_string();
    let response = ingest.post_batch_text(body.clone()).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer = response.text().await.expect("answer");
    assert!(
        answer.len() < 2 * body.len(),
        "an answer of {} bytes to a body of {}",
        answer.len(),
        body.len()
    );
    let answer: Value = serde_json::from_str(&answer).expect("json");
    assert_counts(&answer, [0, 0, 0, 1000]);
    let first = &answer["results"][0]["error"];
    assert_eq!(first["type"], "invalid-reading", "{first}");
    assert_eq!(first["detail"], "34 rules broken", "{first}");
    assert_eq!(
        first["errors"].as_array().map(Vec::len),
        Some(ingest::http::batch::ITEM_ERRORS_LISTED),
        "{first}"
    );
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

#[tokio::test]
async fn batch_limits_are_enforced_as_problems() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    assert_problem(
        ingest.post_batch(&json!({"readings": []})).await,
        422,
        "invalid-reading",
    )
    .await;
    let too_many: Vec<Value> = (0..1001)
        .map(|index| item(&format!("k-{index}"), "gw-1", 1.0))
        .collect();
    assert_problem(
        ingest.post_batch(&json!({ "readings": too_many })).await,
        422,
        "invalid-reading",
    )
    .await;
    // Far past the limit and under 1 MiB: the items past the 1001st are only read as
    // JSON (a broken one is still a 400), and the answer is the same 422.
    let zeros = vec!["0"; 400_000].join(",");
    assert_problem(
        ingest
            .post_batch_text(format!("{{\"readings\":[{zeros}]}}"))
            .await,
        422,
        "invalid-reading",
    )
    .await;
    assert_problem(
        ingest
            .post_batch_text(format!("{{\"readings\":[{zeros},{{]}}"))
            .await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        ingest
            .post_batch(&json!({"readings": [], "extra": 1}))
            .await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(ingest.post_batch(&json!([1, 2])).await, 400, "invalid-json").await;
    let padding = " ".repeat(1024 * 1024);
    let oversized = ingest
        .post_batch_text(format!("{{\"readings\":[{padding}]}}"))
        .await;
    assert_problem(oversized, 413, "payload-too-large").await;
    let form = ingest
        .http
        .post(format!("{}/v1/telemetry/batch", ingest.base_url))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .expect("sent");
    assert_problem(form, 415, "unsupported-media-type").await;
    // A full batch of 1000 under 1 MiB is fine.
    let full: Vec<Value> = (0..1000)
        .map(|index| item(&format!("k-{index}"), "gw-1", 1.0))
        .collect();
    let answer: Value = ingest
        .post_batch(&json!({ "readings": full }))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(answer["accepted"], 1000);
    assert_eq!(count(&env.postgres().await, "readings").await, 1000);
    ingest.stop().await;
}

/// A gateway retrying a batch whose answer it lost, once the readings' `recorded_at`
/// aged past `ingest.max_age_secs`, gets `duplicate` with the first `event_id`s (API.md
/// §2), not `rejected`; an aged reading under a new key, or another aged reading under
/// a stored key, is still `rejected` by the age rule.
#[tokio::test]
async fn batch_item_retried_after_its_recorded_at_aged_past_the_limit_is_a_duplicate() {
    let mut env = TestEnv::new();
    env.settings.ingest.max_age_secs = SHORT_MAX_AGE_SECS;
    let ingest = Ingest::spawn(&env.settings).await;
    let recorded_at = two_seconds_ago();
    let at = contract::timestamp::format(recorded_at);
    let aged_item = |key: &str, temperature: f64| json!({"idempotency_key": key, "device_id": "gw-1", "recorded_at": at, "metrics": {"temperature": temperature}});
    let batch = json!({"readings": [aged_item("k-1", 1.0), aged_item("k-2", 2.0)]});
    let first: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    assert_eq!(first["accepted"], 2, "{first}");

    wait_until_aged(recorded_at).await;
    let whole_retry: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    assert_eq!(
        (&whole_retry["duplicates"], &whole_retry["rejected"]),
        (&json!(2), &json!(0)),
        "{whole_retry}"
    );
    for index in 0..2 {
        assert_eq!(whole_retry["results"][index]["status"], "duplicate");
        assert_eq!(
            whole_retry["results"][index]["event_id"],
            first["results"][index]["event_id"]
        );
    }

    let mixed = json!({"readings": [
        aged_item("k-1", 1.0),         // 0 duplicate of the stored k-1
        aged_item("k-3", 1.0),         // 1 rejected: the same old reading under a new key
        aged_item("k-2", 9.0),         // 2 rejected: another old reading under a stored key
        item("k-4", "gw-1", 4.0),      // 3 accepted
    ]});
    let answer: Value = ingest.post_batch(&mixed).await.json().await.expect("json");
    let statuses = statuses(&answer);
    assert_eq!(
        statuses,
        ["duplicate", "rejected", "rejected", "accepted"],
        "{answer}"
    );
    assert_eq!(
        answer["results"][0]["event_id"],
        first["results"][0]["event_id"]
    );
    for index in [1, 2] {
        let error = &answer["results"][index]["error"];
        assert_eq!(error["type"], "invalid-reading", "{answer}");
        assert_eq!(error["field"], "recorded_at", "{answer}");
    }
    assert_counts(&answer, [1, 1, 0, 2]);

    let db = env.postgres().await;
    assert_eq!(count(&db, "readings").await, 3);
    assert_eq!(count(&db, "idempotency_keys").await, 3);
    assert_eq!(count(&db, "outbox").await, 3);
    ingest.stop().await;
}

/// Items older than `ingest.max_age_secs` are looked up in PostgreSQL as a single POST's
/// reading is, so each takes its share of its device's rate limit before the look-up,
/// whatever it finds: past the burst an item is `rate-limited`, not looked up. Until
/// 2026-12-07 only a duplicate found took a share, and a gateway could have any number
/// of such batches looked up.
#[tokio::test]
async fn items_too_old_take_their_share_of_the_rate_limit_before_their_look_up() {
    let (env, ingest) = rate_limited_ingest().await;
    let old = |index: usize| json!({"idempotency_key": format!("k-{index}"), "device_id": "gw-1", "recorded_at": "2000-01-01T00:00:00Z", "metrics": {"t": 1}});
    let batch = json!({"readings": (0..5).map(old).collect::<Vec<_>>()});
    let answer: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    let errors: Vec<&str> = answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|result| result["error"]["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        errors,
        [
            "invalid-reading",
            "invalid-reading",
            "invalid-reading",
            "rate-limited",
            "rate-limited"
        ],
        "{answer}"
    );
    assert_counts(&answer, [0, 0, 0, 5]);
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

/// The batch answer's counts: accepted, duplicates, conflicts, rejected.
fn assert_counts(answer: &Value, [accepted, duplicates, conflicts, rejected]: [u64; 4]) {
    assert_eq!(
        (
            &answer["accepted"],
            &answer["duplicates"],
            &answer["conflicts"],
            &answer["rejected"]
        ),
        (
            &json!(accepted),
            &json!(duplicates),
            &json!(conflicts),
            &json!(rejected)
        ),
        "accepted, duplicates, conflicts, rejected: {answer}"
    );
}

/// Each item's `status` in a batch answer, in order.
fn statuses(answer: &Value) -> Vec<&str> {
    answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|result| result["status"].as_str().unwrap_or_default())
        .collect()
}

/// A group commit stores its new readings in one statement, then looks up the stored
/// answers of the keys that were there before. When that look-up fails (its session
/// cut here, after the statement committed), what the statement stored is still
/// answered `accepted`, and only the item that needed the look-up is to be retried:
/// a `503` for the whole batch would say that none of it was stored.
///
/// It failed while a failed look-up failed the whole commit: the batch was answered
/// `503` with its new item stored.
#[tokio::test]
async fn a_look_up_that_fails_after_the_commit_still_answers_what_it_stored() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("old", &reading("gw-1", 5.0)).await;
    let db = env.postgres().await;
    // An open insert of the new key: ingest's statement waits for it.
    let holder = hold_key_copied(&env, "old", "new").await;
    let batch = json!({"readings": [item("new", "gw-1", 1.0), item("old", "gw-1", 5.0)]});
    let cut_the_look_up = async {
        eventually(Duration::from_secs(10), "ingest's insert waiting", || {
            lock_waiter(&db, "INSERT INTO idempotency_keys")
        })
        .await;
        // Queued behind ingest's insert, this lock is granted when it commits, and the
        // look-up after it waits in turn.
        let locked = queue_table_lock(&env, &db, "idempotency_keys").await;
        holder.batch_execute("ROLLBACK").await.expect("rollback");
        let look_up = eventually(Duration::from_secs(10), "ingest's look-up waiting", || {
            lock_waiter(&db, "JOIN unnest($1::text[], $2::text[])")
        })
        .await;
        db.execute("SELECT pg_terminate_backend($1)", &[&look_up])
            .await
            .expect("the look-up's session cut");
        let locker = locked.await.expect("the locker");
        locker.batch_execute("ROLLBACK").await.expect("unlocked");
    };
    let (response, ()) = tokio::join!(ingest.post_batch(&batch), cut_the_look_up);
    assert_eq!(response.status().as_u16(), 200, "answered item by item");
    let answer: Value = response.json().await.expect("json");
    assert_eq!(statuses(&answer), ["accepted", "rejected"]);
    assert_eq!(
        answer["results"][1]["error"]["type"],
        "idempotency-key-in-use"
    );
    assert_eq!(
        count(&db, "readings").await,
        2,
        "the earlier reading and the new one"
    );

    // Retried with the same keys, as the answer asks: both are the stored readings. (A
    // pooled connection to the session cut may answer a first retry with a 503.)
    let retried = eventually(Duration::from_secs(10), "the retry answered", || async {
        let response = ingest.post_batch(&batch).await;
        if response.status() != 200 {
            return None;
        }
        response.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(statuses(&retried), ["duplicate", "duplicate"]);
    assert_eq!(count(&db, "readings").await, 2);
    ingest.stop().await;
}

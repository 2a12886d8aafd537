//! `POST /v1/telemetry`: every rule of API.md §1 and §3.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::{eventually, Running, TestEnv};
use uuid::Uuid;

use crate::support::{
    assert_problem, assert_replayed, close_database, count, lock_waiter, loopback_listener,
    queue_table_lock, rate_limited_ingest, reading, reopen_database, Ingest,
};

#[tokio::test]
async fn accepted_reading_writes_reading_key_and_outbox_row_together() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let response = ingest.accept("k-1", &reading("sensor-1", 21.5)).await;
    assert!(response.headers().get("idempotent-replayed").is_none());
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["device_id"], "sensor-1");
    assert_eq!(body["status"], "accepted");
    let event_id: Uuid = body["event_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("uuid");
    assert_eq!(event_id.get_version_num(), 7, "event ids are UUID v7");

    let db = env.postgres().await;
    let row = db
        .query_one(
            "SELECT r.device_id, k.idempotency_key, o.event_id, convert_from(o.payload, 'UTF8')::jsonb,
                    r.metrics
             FROM readings r
             JOIN idempotency_keys k ON k.event_id = r.event_id
             JOIN outbox o ON o.event_id = r.event_id
             WHERE r.event_id = $1",
            &[&event_id],
        )
        .await
        .expect("reading, key and outbox row exist");
    assert_eq!(row.get::<_, String>(0), "sensor-1");
    assert_eq!(row.get::<_, String>(1), "k-1");
    let payload: Value = row.get(3);
    assert_eq!(payload["event_id"], event_id.to_string());
    assert_eq!(payload["metrics"]["temperature"], 21.5);
    let stored_metrics: Value = row.get(4);
    assert_eq!(
        stored_metrics, payload["metrics"],
        "the reading row keeps the metrics the event carries"
    );
    assert_eq!(count(&db, "readings").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn replay_returns_stored_answer_when_key_and_reading_match() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let an_hour_ago = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("valid")
        - time::Duration::hours(1);
    let in_utc = contract::timestamp::format(an_hour_ago);
    let in_cet = an_hour_ago
        .to_offset(time::UtcOffset::from_hms(1, 0, 0).expect("valid offset"))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formats");
    assert_ne!(in_utc, in_cet);
    let first = json!({"device_id": "sensor-1", "recorded_at": in_utc, "metrics": {"temperature": 21.5, "humidity": 40, "offset": 0}});
    let first_response = ingest.accept("k-1", &first).await;
    let first_body = first_response.text().await.expect("body");

    // The same reading spelled differently: other key order, number spelling (`-0` is
    // `0`) and offset.
    let same = json!({"metrics": {"offset": -0.0, "humidity": 40.0, "temperature": 2.15e1}, "recorded_at": in_cet, "device_id": "sensor-1"});
    let replay = ingest.accept("k-1", &same).await;
    assert_replayed(&replay);
    assert_eq!(replay.text().await.expect("body"), first_body);
    let db = env.postgres().await;
    assert_eq!(count(&db, "readings").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn retry_without_recorded_at_is_a_replay_not_a_conflict() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let body = reading("sensor-1", 1.0);
    ingest.accept("k-1", &body).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let retry = ingest.accept("k-1", &body).await;
    assert!(retry.headers().get("idempotent-replayed").is_some());
    ingest.stop().await;
}

#[tokio::test]
async fn reused_key_with_a_different_reading_is_rejected_with_422() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("k-1", &reading("sensor-1", 21.5)).await;
    let conflict = ingest.post("k-1", &reading("sensor-1", 22.0)).await;
    assert_problem(conflict, 422, "idempotency-key-reused").await;
    assert_eq!(count(&env.postgres().await, "readings").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn keys_are_scoped_per_device() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("k-1", &reading("sensor-1", 1.0)).await;
    let other_device = ingest.accept("k-1", &reading("sensor-2", 2.0)).await;
    assert!(other_device.headers().get("idempotent-replayed").is_none());
    assert_eq!(count(&env.postgres().await, "readings").await, 2);
    ingest.stop().await;
}

#[tokio::test]
async fn concurrent_duplicates_store_exactly_one_reading() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let body = json!({"device_id": "sensor-1", "recorded_at": contract::timestamp::format(time::OffsetDateTime::now_utc()), "metrics": {"temperature": 20.0}});
    let requests = (0..64).map(|_| ingest.post("same-key", &body));
    let responses = futures::future::join_all(requests).await;
    let mut event_ids = std::collections::BTreeSet::new();
    let mut fresh = 0;
    for response in responses {
        // A concurrent duplicate waits for the first commit and gets its replay: a 409
        // is only for a key pruned in that instant, which no key here is.
        let status = response.status().as_u16();
        assert_eq!(status, 202, "{:?}", response.text().await);
        match response.headers().get("idempotent-replayed") {
            None => fresh += 1,
            Some(replayed) => assert_eq!(replayed, "true"),
        }
        let answer: Value = response.json().await.expect("json");
        event_ids.insert(answer["event_id"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(fresh, 1, "exactly one request was answered as the original");
    assert_eq!(event_ids.len(), 1, "every answer names the same event");
    let db = env.postgres().await;
    assert_eq!(count(&db, "readings").await, 1);
    assert_eq!(count(&db, "idempotency_keys").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn missing_or_malformed_idempotency_key_is_400() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let without_key = ingest
        .http
        .post(format!("{}/v1/telemetry", ingest.base_url))
        .header("content-type", "application/json")
        .body(reading("sensor-1", 1.0).to_string())
        .send()
        .await
        .expect("sent");
    assert_problem(without_key, 400, "missing-idempotency-key").await;
    let too_long = "k".repeat(129);
    for key in ["has space", too_long.as_str(), "tab\there"] {
        let response = ingest.post(key, &reading("sensor-1", 1.0)).await;
        assert_problem(response, 400, "missing-idempotency-key").await;
    }
    let longest = "k".repeat(128);
    ingest.accept(&longest, &reading("sensor-1", 1.0)).await;
    assert_eq!(count(&env.postgres().await, "readings").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn non_json_content_type_is_415() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = ingest
            .http
            .post(format!("{}/v1/telemetry", ingest.base_url))
            .header("idempotency-key", "k-1")
            .body(reading("sensor-1", 1.0).to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        assert_problem(
            request.send().await.expect("sent"),
            415,
            "unsupported-media-type",
        )
        .await;
    }
    let with_charset = ingest
        .http
        .post(format!("{}/v1/telemetry", ingest.base_url))
        .header("idempotency-key", "k-1")
        .header("content-type", "application/json; charset=utf-8")
        .body(reading("sensor-1", 1.0).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(with_charset.status().as_u16(), 202);
    ingest.stop().await;
}

/// Ingest decodes no content coding. A body declared compressed is refused with 415 and
/// `Accept-Encoding: identity` (RFC 9110 §12.5.3), on both endpoints, before anything is
/// written: read as JSON regardless, a plain body a proxy or client library labelled
/// `gzip` was stored as a reading, and a real gzip body was a 400 `invalid-json`.
#[tokio::test]
async fn a_body_declared_compressed_is_415_naming_the_coding_ingest_takes() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let single = reading("sensor-1", 1.0).to_string();
    let batch = json!({"readings": [{
        "idempotency_key": "k-batch",
        "device_id": "sensor-1",
        "metrics": {"temperature": 1.0}
    }]})
    .to_string();
    // The ten bytes every gzip stream starts with, then what would be deflated JSON.
    let gzip_start = [
        0x1f_u8, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xab, 0x56,
    ];
    let declared = |path: &str, coding: &str, body: Vec<u8>| {
        ingest
            .http
            .post(format!("{}{path}", ingest.base_url))
            .header("idempotency-key", "k-1")
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(body)
    };
    for (path, coding, body) in [
        ("/v1/telemetry", "gzip", single.clone().into_bytes()),
        ("/v1/telemetry", "gzip", gzip_start.to_vec()),
        ("/v1/telemetry", "br", single.clone().into_bytes()),
        (
            "/v1/telemetry",
            "identity, GZIP",
            single.clone().into_bytes(),
        ),
        ("/v1/telemetry/batch", "deflate", batch.clone().into_bytes()),
    ] {
        let response = declared(path, coding, body).send().await.expect("sent");
        assert_eq!(
            response
                .headers()
                .get("accept-encoding")
                .and_then(|value| value.to_str().ok()),
            Some("identity"),
            "{path} with {coding}"
        );
        let problem = assert_problem(response, 415, "unsupported-media-type").await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("Content-Encoding"), "{detail}");
    }
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    assert_eq!(count(&env.postgres().await, "outbox").await, 0);
    let identity = declared("/v1/telemetry", "identity", single.into_bytes())
        .send()
        .await
        .expect("sent");
    assert_eq!(identity.status().as_u16(), 202, "identity is no coding");
    ingest.stop().await;
}

/// A transfer coding under `chunked` is a compression as much as a `Content-Encoding`:
/// hyper takes off only the chunks, so `Transfer-Encoding: gzip, chunked` left a gzip
/// body to be read as JSON (a plain one labelled so was stored until 2026-12-07). And
/// two `Content-Type`s name no one type to read a body as: the first was taken.
#[tokio::test]
async fn a_transfer_coding_under_chunked_or_a_second_content_type_is_415() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let address = ingest.base_url.trim_start_matches("http://").to_owned();
    let body = reading("sensor-1", 1.0).to_string();
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let sized = format!("Content-Length: {}\r\n\r\n{body}", body.len());
    let cases = [
        (
            "Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            &chunked,
            "Transfer-Encoding gzip",
        ),
        (
            "Content-Type: application/json\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            &chunked,
            "Transfer-Encoding gzip",
        ),
        (
            "Content-Type: application/json\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            &chunked,
            "Transfer-Encoding chunked",
        ),
        (
            "Content-Type: application/json\r\nContent-Type: text/plain\r\n",
            &sized,
            "Content-Type",
        ),
        (
            "Content-Type: application/json\r\nContent-Type: application/json\r\n",
            &sized,
            "Content-Type",
        ),
    ];
    // The batch endpoint reads its body through the same check.
    for path in ["/v1/telemetry", "/v1/telemetry/batch"] {
        for (index, (headers, rest, named)) in cases.iter().enumerate() {
            let mut stream = tokio::net::TcpStream::connect(&address)
                .await
                .expect("connect");
            let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nIdempotency-Key: k-{index}\r\n{headers}{rest}"
        );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.expect("answered");
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 415"),
                "{path} case {index}: {answer}"
            );
            assert!(
                answer.contains("application/problem+json") && answer.contains(named),
                "case {index}: {answer}"
            );
            assert!(
                !answer.to_ascii_lowercase().contains("accept-encoding"),
                "Accept-Encoding names content codings only: case {index}: {answer}"
            );
        }
    }
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

#[tokio::test]
async fn body_over_64_kib_is_413_and_nothing_is_written() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let padding = " ".repeat(64 * 1024);
    let body = format!("{{\"device_id\":\"sensor-1\",{padding}\"metrics\":{{\"t\":1}}}}");
    let response = ingest.post_text("k-1", body).await;
    assert_problem(response, 413, "payload-too-large").await;
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

/// API.md's bounds (§1, §2) are inclusive: a body of exactly 64 KiB (a batch's of
/// exactly 1 MiB), a 64-character device id, 32 metrics and a 64-character metric name
/// are accepted; one byte, character or metric more is refused.
#[tokio::test]
async fn every_bound_of_a_reading_and_its_body_is_inclusive() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let padded_to =
        |valid: String, size: usize| format!("{}{valid}", " ".repeat(size - valid.len()));
    let single = reading("sensor-1", 1.0).to_string();
    let limit = env.settings.ingest.max_body_bytes;
    assert_eq!(limit, 64 * 1024);
    let response = ingest
        .post_text("k-size", padded_to(single.clone(), limit))
        .await;
    assert_eq!(response.status().as_u16(), 202, "a body of exactly 64 KiB");
    let response = ingest
        .post_text("k-size-2", padded_to(single, limit + 1))
        .await;
    assert_problem(response, 413, "payload-too-large").await;
    let mut item = reading("sensor-1", 2.0);
    item["idempotency_key"] = json!("k-batch");
    let batch = json!({ "readings": [item] }).to_string();
    let limit = env.settings.ingest.max_batch_body_bytes;
    assert_eq!(limit, 1024 * 1024);
    let response = ingest
        .post_batch_text(padded_to(batch.clone(), limit))
        .await;
    assert_eq!(response.status().as_u16(), 200, "a batch of exactly 1 MiB");
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["accepted"], 1, "{answer}");
    let response = ingest.post_batch_text(padded_to(batch, limit + 1)).await;
    assert_problem(response, 413, "payload-too-large").await;

    let longest_name = format!("m{}", "0".repeat(63));
    let mut metrics: serde_json::Map<String, Value> = (1..32)
        .map(|index| (format!("m{index}"), json!(index)))
        .collect();
    metrics.insert(longest_name.clone(), json!(0));
    let device = "d".repeat(64);
    let widest = json!({"device_id": device, "metrics": metrics});
    assert_eq!(
        ingest.post("k-widest", &widest).await.status().as_u16(),
        202
    );
    for (key, too_wide) in [
        (
            "k-device",
            json!({"device_id": "d".repeat(65), "metrics": {"t": 1}}),
        ),
        (
            "k-name",
            json!({"device_id": "sensor-1", "metrics": {format!("{longest_name}0"): 1}}),
        ),
        ("k-metrics", {
            let mut metrics = metrics.clone();
            metrics.insert("m32".to_owned(), json!(32));
            json!({"device_id": "sensor-1", "metrics": metrics})
        }),
    ] {
        let response = ingest.post(key, &too_wide).await;
        assert_problem(response, 422, "invalid-reading").await;
    }
    assert_eq!(count(&env.postgres().await, "readings").await, 3);
    ingest.stop().await;
}

/// A chunked body declares no length: its limit is checked on what arrives, a byte
/// past it a `413` on either endpoint, and nothing is written.
#[tokio::test]
async fn a_chunked_body_past_the_limit_is_413_and_nothing_is_written() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let address = ingest.base_url.trim_start_matches("http://").to_owned();
    for (path, limit) in [
        ("/v1/telemetry", env.settings.ingest.max_body_bytes),
        (
            "/v1/telemetry/batch",
            env.settings.ingest.max_batch_body_bytes,
        ),
    ] {
        // Valid JSON but for its size, padded with white space to one byte past the limit.
        let mut item = reading("sensor-1", 1.0);
        let valid = if path.ends_with("batch") {
            item["idempotency_key"] = json!("k-1");
            json!({"readings": [item]}).to_string()
        } else {
            item.to_string()
        };
        let body = format!("{}{valid}", " ".repeat(limit + 1 - valid.len()));
        assert_eq!(body.len(), limit + 1);
        let (half, rest) = body.split_at(body.len() / 2);
        let chunked = format!(
            "{:x}\r\n{half}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n",
            half.len(),
            rest.len()
        );
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nIdempotency-Key: k-1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"
        );
        let mut stream = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        // Whatever the read ends with, what arrived before is in `answer`.
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(
            answer.contains("application/problem+json") && answer.contains("payload-too-large"),
            "{path}: {answer}"
        );
    }
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

#[tokio::test]
async fn malformed_json_and_unknown_fields_are_400() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    for (index, body) in [
        "not json",
        "{\"device_id\":\"sensor-1\",\"metrics\":{\"t\":1}",
        "{\"device_id\":\"sensor-1\",\"metrics\":{\"t\":1},\"firmware\":\"1.0\"}",
        "{\"device_id\":42,\"metrics\":{\"t\":1}}",
        "{\"metrics\":{\"t\":1}}",
        "[]",
        "",
    ]
    .iter()
    .enumerate()
    {
        let response = ingest
            .post_text(&format!("k-{index}"), body.to_string())
            .await;
        assert_problem(response, 400, "invalid-json").await;
    }
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

#[tokio::test]
async fn readings_that_break_a_rule_are_422_naming_the_field() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let now = time::OffsetDateTime::now_utc();
    let format = |instant: time::OffsetDateTime| contract::timestamp::format(instant);
    let too_many: serde_json::Map<String, Value> = (0..33)
        .map(|index| (format!("m{index}"), json!(1)))
        .collect();
    let cases = [
        (
            json!({"device_id": "sensor 1", "metrics": {"t": 1}}),
            "device_id",
        ),
        (json!({"device_id": "", "metrics": {"t": 1}}), "device_id"),
        (
            json!({"device_id": "x".repeat(65), "metrics": {"t": 1}}),
            "device_id",
        ),
        (
            json!({"device_id": "sensor.1", "metrics": {"t": 1}}),
            "device_id",
        ),
        (json!({"device_id": "sensor-1", "metrics": {}}), "metrics"),
        (
            json!({"device_id": "sensor-1", "metrics": too_many}),
            "metrics",
        ),
        (
            json!({"device_id": "sensor-1", "metrics": {"Temp": 1}}),
            "metrics.Temp",
        ),
        (
            json!({"device_id": "sensor-1", "metrics": {"1t": 1}}),
            "metrics.1t",
        ),
        (
            json!({"device_id": "sensor-1", "metrics": {"t": "21.5"}}),
            "metrics.t",
        ),
        (
            json!({"device_id": "sensor-1", "metrics": {"t": null}}),
            "metrics.t",
        ),
        (
            json!({"device_id": "sensor-1", "recorded_at": "2026-11-22 10:00", "metrics": {"t": 1}}),
            "recorded_at",
        ),
        (
            // RFC 3339 separates the date from the time by `T` (a space at most).
            json!({"device_id": "sensor-1", "recorded_at": format(now).replacen('T', "X", 1), "metrics": {"t": 1}}),
            "recorded_at",
        ),
        (
            json!({"device_id": "sensor-1", "recorded_at": format(now).replacen('T', "1", 1), "metrics": {"t": 1}}),
            "recorded_at",
        ),
        (
            json!({"device_id": "sensor-1", "recorded_at": format(now + time::Duration::minutes(6)), "metrics": {"t": 1}}),
            "recorded_at",
        ),
        (
            json!({"device_id": "sensor-1", "recorded_at": format(now - time::Duration::days(8)), "metrics": {"t": 1}}),
            "recorded_at",
        ),
    ];
    for (index, (body, field)) in cases.iter().enumerate() {
        let response = ingest.post(&format!("k-{index}"), body).await;
        let problem = assert_problem(response, 422, "invalid-reading").await;
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|error| error["field"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            fields.contains(field),
            "case {index}: {fields:?} should name {field}"
        );
    }
    let inside_bounds = json!({"device_id": "sensor-1", "recorded_at": format(now - time::Duration::days(6)), "metrics": {"t": 1}});
    ingest.accept("k-ok", &inside_bounds).await;
    assert_eq!(count(&env.postgres().await, "readings").await, 1);
    ingest.stop().await;
}

/// A `metrics` object of distinct names that each break the name rule (upper case),
/// about `bytes` long, and how many names it holds.
fn bad_metric_names(bytes: usize) -> (String, usize) {
    let mut metrics = String::from("{");
    let mut names = 0;
    while metrics.len() < bytes {
        if names > 0 {
            metrics.push(',');
        }
        metrics.push_str(&format!("\"Bad_{names:05}\":1"));
        names += 1;
    }
    metrics.push('}');
    (metrics, names)
}

/// Asserts that a problem's `errors` says what is wrong with a reading of `names` bad
/// metric names in few entries: the count rule, the first metrics by name, and how many
/// more were left out.
fn assert_bounded_metric_errors(errors: &Value, names: usize) {
    let errors = errors.as_array().expect("errors is a list");
    let fields: Vec<&str> = errors
        .iter()
        .filter_map(|error| error["field"].as_str())
        .collect();
    assert!(
        errors.len() <= 40,
        "{} entries for {names} bad names",
        errors.len()
    );
    assert_eq!(
        fields.first(),
        Some(&"metrics"),
        "the count rule: {fields:?}"
    );
    assert_eq!(fields.get(1), Some(&"metrics.Bad_00000"), "{fields:?}");
    let listed = fields
        .iter()
        .filter(|field| field.starts_with("metrics.Bad_"))
        .count();
    let last = errors.last().expect("not empty");
    assert_eq!(last["field"], "metrics");
    let left_out = (names - listed).to_string();
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|message| message.contains(&left_out)),
        "the last entry says {left_out} more were left out: {last}"
    );
}

#[tokio::test]
async fn thousands_of_bad_metric_names_get_a_small_422_saying_how_many_were_left_out() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let (metrics, names) = bad_metric_names(60 * 1024);
    let body = format!(r#"{{"device_id":"sensor-1","metrics":{metrics}}}"#);
    assert!(body.len() < 64 * 1024, "under the body limit");

    let response = ingest.post_text("k-1", body).await;
    let problem = assert_problem(response, 422, "invalid-reading").await;
    // Every broken rule counts, listed or not: the metric count and each bad name.
    assert_eq!(
        problem["detail"],
        format!("{} rules broken, see errors", names + 1)
    );
    let size = problem.to_string().len();
    assert!(
        size < 8 * 1024,
        "a {size}-byte problem for {names} bad metric names"
    );
    assert_bounded_metric_errors(&problem["errors"], names);

    // A batch item with the same metrics: its error lists the first four rules broken
    // and counts them all, its neighbour accepted.
    let batch = format!(
        r#"{{"readings":[{{"idempotency_key":"b-1","device_id":"sensor-1","metrics":{metrics}}},
            {{"idempotency_key":"b-2","device_id":"sensor-1","metrics":{{"t":1}}}}]}}"#
    );
    let response = ingest.post_batch_text(batch).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.expect("json");
    let error = &answer["results"][0]["error"];
    assert_eq!(error["detail"], format!("{} rules broken", names + 1));
    let size = error.to_string().len();
    assert!(
        size < 8 * 1024,
        "a {size}-byte item error for {names} bad metric names"
    );
    let fields: Vec<&str> = error["errors"]
        .as_array()
        .expect("errors is a list")
        .iter()
        .filter_map(|error| error["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        [
            "metrics",
            "metrics.Bad_00000",
            "metrics.Bad_00001",
            "metrics.Bad_00002"
        ],
        "{error}"
    );
    assert_eq!(answer["results"][1]["status"], "accepted");
    assert_eq!(count(&env.postgres().await, "readings").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn recorded_at_defaults_to_the_receive_time() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let before = time::OffsetDateTime::now_utc();
    ingest.accept("k-1", &reading("sensor-1", 1.0)).await;
    let after = time::OffsetDateTime::now_utc();
    let row = env
        .postgres()
        .await
        .query_one("SELECT recorded_at, received_at FROM readings", &[])
        .await
        .expect("one reading");
    let recorded: time::OffsetDateTime = row.get(0);
    let received: time::OffsetDateTime = row.get(1);
    assert_eq!(recorded, received);
    assert!(recorded >= before - time::Duration::milliseconds(1) && recorded <= after);
    ingest.stop().await;
}

#[tokio::test]
async fn database_outage_is_503_with_retry_after_and_writes_nothing_half() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("k-1", &reading("sensor-1", 1.0)).await;

    close_database(&env).await;
    for attempt in 0..3 {
        let response = ingest
            .post(&format!("k-down-{attempt}"), &reading("sensor-1", 2.0))
            .await;
        assert!(response.headers().get("retry-after").is_some());
        assert_problem(response, 503, "unavailable").await;
    }
    let ready = ingest.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 503);

    reopen_database(&env).await;
    ingest.accept("k-down-0", &reading("sensor-1", 2.0)).await;
    let db = env.postgres().await;
    assert_eq!(count(&db, "readings").await, 2);
    assert_eq!(count(&db, "idempotency_keys").await, 2);
    assert_eq!(count(&db, "outbox").await, 2);
    ingest.stop().await;
}

/// The advisory lock a gate waits for (advisory locks are per database, and each test
/// has its own).
const GATE_LOCK: i64 = 4242;

/// Closes a gate on `table`: every insert into it waits, inside its statement, for an
/// advisory lock `db`'s session holds until [`open_gate`].
async fn close_gate(db: &tokio_postgres::Client, table: &str) {
    db.batch_execute(&format!(
        "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_advisory_xact_lock_shared({GATE_LOCK}); RETURN NEW; END $$;
         CREATE TRIGGER gate BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION gate();
         SELECT pg_advisory_lock({GATE_LOCK});"
    ))
    .await
    .expect("the gate closed");
}

/// Opens [`close_gate`]'s gate: what waits at it goes on, and later inserts pass.
async fn open_gate(db: &tokio_postgres::Client) {
    db.execute("SELECT pg_advisory_unlock($1)", &[&GATE_LOCK])
        .await
        .expect("the gate opened");
}

/// A session that dies in the middle of a commit, its statement having written part of
/// its rows (the key and the reading, held at a gate before its outbox row), leaves none
/// of them: the reading, its idempotency record and its outbox event are one
/// transaction (API.md §1, "nothing half-written"), the request gets a `503`, and its
/// retry with the same key stores the reading anew, not a replay of something half
/// there. The outage test above closes the database before any statement is sent.
#[tokio::test]
async fn a_commit_whose_session_dies_half_way_leaves_none_of_its_rows() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    ingest.accept("k-1", &reading("sensor-1", 1.0)).await;
    let db = env.postgres().await;
    close_gate(&db, "outbox").await;

    let half_reading = reading("sensor-1", 2.0);
    let half = ingest.post("k-2", &half_reading);
    let ended = async {
        let pid = eventually(
            Duration::from_secs(10),
            "the commit waiting at the gate",
            || async { lock_waiter(&db, "stored_outbox").await },
        )
        .await;
        db.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("the commit's session ended");
    };
    let (half, ()) = tokio::join!(half, ended);
    assert_problem(half, 503, "unavailable").await;
    for table in ["readings", "idempotency_keys", "outbox"] {
        assert_eq!(count(&db, table).await, 1, "only k-1's row in {table}");
    }

    open_gate(&db).await;
    let retry = ingest.accept("k-2", &reading("sensor-1", 2.0)).await;
    assert!(
        retry.headers().get("idempotent-replayed").is_none(),
        "stored by the retry, not found half there"
    );
    for table in ["readings", "idempotency_keys", "outbox"] {
        assert_eq!(count(&db, table).await, 2, "{table}");
    }
    ingest.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_404_problems() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let response = ingest.get("/v1/nothing").await;
    assert_problem(response, 404, "not-found").await;
    ingest.stop().await;
}

/// A method a route does not take is a 405 problem with the `Allow` header RFC 9110
/// asks for, whose detail holds for every route (it said "readings are sent with POST"
/// for `POST /healthz` too).
#[tokio::test]
async fn a_method_a_route_does_not_take_is_a_405_problem_naming_the_ones_it_does() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/v1/telemetry", "POST"),
        (reqwest::Method::DELETE, "/v1/telemetry/batch", "POST"),
        (reqwest::Method::POST, "/healthz", "GET,HEAD"),
        (reqwest::Method::PUT, "/metrics", "GET,HEAD"),
    ] {
        let response = ingest
            .http
            .request(method.clone(), format!("{}{path}", ingest.base_url))
            .send()
            .await
            .expect("sent");
        let allow = response
            .headers()
            .get(reqwest::header::ALLOW)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        assert_eq!(allow.as_deref(), Some(allowed), "{method} {path}");
        let problem = assert_problem(response, 405, "method-not-allowed").await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("Allow"), "{method} {path}: {problem}");
    }
    ingest.stop().await;
}

#[tokio::test]
async fn a_device_over_its_rate_limit_gets_429_and_others_are_unaffected() {
    let (env, ingest) = rate_limited_ingest().await;
    for index in 0..3 {
        // Within the burst.
        ingest
            .accept(&format!("k-{index}"), &reading("chatty", 1.0))
            .await;
    }
    let limited = ingest.post("k-3", &reading("chatty", 1.0)).await;
    let retry_after: u64 = testkit::header(&limited, "retry-after")
        .and_then(|value| value.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!(
        (1..=2).contains(&retry_after),
        "retry after {retry_after} s"
    );
    assert_problem(limited, 429, "rate-limited").await;
    assert_eq!(
        ingest
            .post("k-0", &reading("quiet", 1.0))
            .await
            .status()
            .as_u16(),
        202,
        "another device is unaffected"
    );

    // In a batch, the over-limit device's items are rejected, the others accepted.
    let batch = json!({"readings": [
        {"idempotency_key": "b-1", "device_id": "chatty", "metrics": {"t": 1}},
        {"idempotency_key": "b-2", "device_id": "quiet", "metrics": {"t": 1}},
    ]});
    let answer: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    assert_eq!(answer["results"][0]["status"], "rejected");
    assert_eq!(answer["results"][0]["error"]["type"], "rate-limited");
    assert_eq!(answer["results"][1]["status"], "accepted");
    assert_eq!(count(&env.postgres().await, "readings").await, 5);
    ingest.stop().await;
}

/// An attempt answered `503` stored nothing, so it costs its device none of its rate
/// limit: the retries that `Retry-After` asks for, once PostgreSQL is back, get their
/// readings in. Until 2026-12-06 every refused attempt used up the allowance: the
/// fourth attempt below was a `429` during the outage, and the batch retried after it
/// had its items refused as `rate-limited`.
#[tokio::test]
async fn attempts_answered_503_use_up_none_of_the_rate_limit() {
    let (env, ingest) = rate_limited_ingest().await;
    let batch = json!({"readings": [
        {"idempotency_key": "b-1", "device_id": "chatty", "metrics": {"t": 1}},
        {"idempotency_key": "b-2", "device_id": "chatty", "metrics": {"t": 2}},
        {"idempotency_key": "b-3", "device_id": "chatty", "metrics": {"t": 3}},
    ]});

    close_database(&env).await;
    for attempt in 0..4 {
        let response = ingest
            .post(&format!("k-{attempt}"), &reading("chatty", 1.0))
            .await;
        assert_problem(response, 503, "unavailable").await;
    }
    assert_problem(ingest.post_batch(&batch).await, 503, "unavailable").await;
    reopen_database(&env).await;

    let answer: Value = ingest.post_batch(&batch).await.json().await.expect("json");
    assert_eq!(
        answer["accepted"], 3,
        "the whole burst is left after the outage: {answer}"
    );
    // The limit still holds: of five more sent at once, some are refused (one a second
    // comes back, so all five would need the batch and them to take over 3 s).
    let keys: Vec<String> = (0..5).map(|attempt| format!("k-more-{attempt}")).collect();
    let body = reading("chatty", 1.0);
    let answers = futures::future::join_all(keys.iter().map(|key| ingest.post(key, &body))).await;
    let statuses: Vec<u16> = answers
        .iter()
        .map(|answer| answer.status().as_u16())
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    ingest.stop().await;
}

/// A reading older than `ingest.max_age_secs` is looked up in PostgreSQL, in case it is
/// the retry of one stored while young, so it takes its share of the device's rate
/// limit before that, whatever the look-up finds: past the burst the next is a `429`
/// without a look-up. Until 2026-12-07 only a replay found took a share, and every one
/// of these was looked up and answered `422`, without limit.
#[tokio::test]
async fn readings_too_old_take_their_share_of_the_rate_limit_before_their_look_up() {
    let (env, ingest) = rate_limited_ingest().await;
    let old =
        json!({"device_id": "chatty", "recorded_at": "2000-01-01T00:00:00Z", "metrics": {"t": 1}});
    let mut statuses = Vec::new();
    for attempt in 0..5 {
        let answer = ingest.post(&format!("k-{attempt}"), &old).await;
        statuses.push(answer.status().as_u16());
    }
    assert_eq!(statuses[..3], [422, 422, 422], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

/// `ingest.max_body_bytes_held`: bodies being received hold their bytes of the budget,
/// so a client that sends most of a large batch body and stalls cannot make ingest hold
/// a batch's worth for each of its connections. While the budget is held a reading is
/// answered `503` with `Retry-After` at once and nothing is stored: the same key is
/// accepted afresh, not replayed, once the stalled body is gone.
#[tokio::test]
async fn bodies_held_past_the_budget_are_answered_503_and_the_budget_comes_back() {
    use tokio::io::AsyncWriteExt;
    let mut env = TestEnv::new();
    env.settings.ingest.max_body_bytes = 8_192;
    env.settings.ingest.max_batch_body_bytes = 65_536;
    env.settings.ingest.max_body_bytes_held = 65_536;
    // Longer than the wait for the refusal below, so the stalled body is held all along.
    env.settings.ingest.request_timeout_ms = 30_000;
    let ingest = Ingest::spawn(&env.settings).await;
    let address = ingest.base_url.trim_start_matches("http://").to_owned();

    let mut stalled = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let head = "POST /v1/telemetry/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65536\r\n\r\n";
    stalled.write_all(head.as_bytes()).await.expect("write");
    stalled
        .write_all(&[b' '; 65_500])
        .await
        .expect("most of the body");
    let metrics_url = format!("{}/metrics", ingest.base_url);
    let held = || async {
        testkit::prometheus::scrape(&ingest.http, &metrics_url)
            .await
            .and_then(|scrape| scrape.value("ingest_body_bytes_held", &[]))
    };
    eventually(
        Duration::from_secs(10),
        "the stalled body's buffer held",
        || async { held().await.filter(|held| *held >= 65_500.0) },
    )
    .await;

    // A reading whose declared length does not fit what is free is refused before its
    // upload.
    let key = "k-1";
    let response = ingest.post(key, &reading("sensor-1", 1.0)).await;
    assert!(
        response.headers().get("retry-after").is_some(),
        "a 503 says when to retry"
    );
    let problem = assert_problem(response, 503, "unavailable").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("request bodies")),
        "{problem}"
    );
    // A batch alike: a 503 for the whole request, none of its items stored.
    let batch = json!({"readings": [
        {"idempotency_key": "k-batch-1", "device_id": "sensor-1", "metrics": {"temperature": 3.0}},
    ]});
    let response = ingest.post_batch(&batch).await;
    assert!(
        response.headers().get("retry-after").is_some(),
        "a batch's 503 says when to retry"
    );
    assert_problem(response, 503, "unavailable").await;
    // One sent in chunks, without a length, is refused as its buffer grows.
    let mut chunked = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let body = reading("sensor-1", 2.0).to_string();
    let request = format!(
        "POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: k-2\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    chunked.write_all(request.as_bytes()).await.expect("write");
    let mut answer = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut chunked, &mut answer)
        .await
        .expect("answered");
    assert_eq!(String::from_utf8_lossy(&answer), "HTTP/1.1 503");
    let scrape = testkit::prometheus::scrape(&ingest.http, &metrics_url)
        .await
        .expect("a scrape");
    assert!(
        scrape
            .value("ingest_body_budget_refusals_total", &[])
            .is_some_and(|refusals| refusals >= 3.0),
        "the refusals are counted"
    );
    assert_eq!(
        count(&env.postgres().await, "readings").await,
        0,
        "nothing refused is stored"
    );

    drop(stalled);
    eventually(
        Duration::from_secs(10),
        "the stalled body's buffer given back",
        || async { held().await.filter(|held| *held == 0.0) },
    )
    .await;
    let accepted = ingest.post(key, &reading("sensor-1", 1.0)).await;
    assert_eq!(accepted.status().as_u16(), 202);
    assert!(
        accepted.headers().get("idempotent-replayed").is_none(),
        "stored afresh: the 503 stored nothing"
    );
    assert_eq!(count(&env.postgres().await, "readings").await, 1);
    ingest.stop().await;
}

#[tokio::test]
async fn slow_or_idle_clients_are_disconnected_and_huge_headers_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = TestEnv::new();
    env.settings.http.header_read_timeout_ms = 300;
    let ingest = Ingest::spawn(&env.settings).await;
    let address = ingest.base_url.trim_start_matches("http://").to_owned();

    // Headers trickling in never finish: the server hangs up after the deadline.
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    slow.write_all(b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the server closed the connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "after about the 300 ms deadline"
    );

    // An idle kept-alive connection is closed too.
    let mut idle = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the idle connection was closed");

    // A request head over the limit is refused.
    let huge = ingest
        .http
        .post(format!("{}/v1/telemetry", ingest.base_url))
        .header("content-type", "application/json")
        .header("idempotency-key", "k-1")
        .header("x-padding", "p".repeat(64 * 1024))
        .body(reading("sensor-1", 1.0).to_string())
        .send()
        .await;
    match huge {
        Ok(response) => assert_eq!(response.status().as_u16(), 431),
        Err(error) => assert!(
            error.is_request() || error.is_connect() || error.to_string().contains("closed"),
            "{error}"
        ),
    }
    assert_eq!(count(&env.postgres().await, "readings").await, 0);
    ingest.stop().await;
}

/// `http.max_connections`: at the cap a further client's request waits (accepted and
/// waiting for a slot, or in the listen backlog: not refused) while every open connection has a
/// request in flight, and is answered as soon as one closes. A connection idle for
/// `IDLE_RECLAIMED` (kept alive after its answer) is closed to make room: until
/// 2026-12-07 it held its slot until the header deadline (here 30 s). (Raw connections
/// only: a pooling client would hold a slot of its own.)
#[tokio::test]
async fn connections_over_the_cap_wait_for_a_busy_one_and_take_an_idle_ones_place() {
    use crate::raw_http::{assert_unanswered, closed_by_server, exchange, read_answer};
    use ingest::http::server::IDLE_RECLAIMED;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = TestEnv::new();
    env.settings.http.max_connections = 2;
    env.settings.http.header_read_timeout_ms = 30_000;
    env.settings.ingest.request_timeout_ms = 30_000;
    // The listener the binary makes: its backlog is the cap too.
    let listener = loopback_listener(&env.settings.http);
    let address = listener.local_addr().expect("local addr");
    let settings = env.settings.clone();
    let service = Running::spawn(|shutdown| ingest::serve(settings, listener, shutdown));
    let connect = || async {
        tokio::net::TcpStream::connect(address)
            .await
            .expect("connect")
    };
    let ask = |connection: &'static str| {
        format!("GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n")
    };
    eventually(Duration::from_secs(20), "ingest ready", || async {
        let mut probe = connect().await;
        probe.write_all(ask("close").as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        probe.read_to_end(&mut answer).await.ok()?;
        answer.starts_with(b"HTTP/1.1 200").then_some(())
    })
    .await;
    // A connection busy with a request whose body has not all come.
    let busy = || async {
        let mut stream = connect().await;
        let head = "POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: k-1\r\nContent-Length: 100\r\n\r\n{";
        stream.write_all(head.as_bytes()).await.expect("write");
        stream
    };

    let mut open = vec![busy().await, busy().await];
    let mut third = connect().await;
    third
        .write_all(ask("close").as_bytes())
        .await
        .expect("write");
    assert_unanswered(
        &mut third,
        IDLE_RECLAIMED + Duration::from_secs(1),
        "not served while two connections are busy",
    )
    .await;
    drop(open.pop());
    read_answer(&mut third).await.assert_ok();

    // One busy connection and one idle after its answer: the cap again. While nobody
    // waits, the idle one keeps its place however long it idles.
    let mut idle = connect().await;
    exchange(&mut idle, &ask("keep-alive")).await.assert_ok();
    tokio::time::sleep(IDLE_RECLAIMED * 2).await;
    exchange(&mut idle, &ask("keep-alive")).await.assert_ok();
    // A fourth connection is served in its place (not after the header deadline), and
    // it is closed.
    let mut fourth = connect().await;
    exchange(&mut fourth, &ask("close")).await.assert_ok();
    closed_by_server(&mut idle).await;
    // The busy one was left alone: the rest of its body gets its request the 202, on a
    // connection that stays open.
    let mut still_busy = open.pop().expect("the busy connection");
    let rest_of_body = r#""device_id": "sensor-1", "metrics": {"t": 1}}"#;
    let rest_of_body = format!("{}{rest_of_body}", " ".repeat(99 - rest_of_body.len()));
    let answer = exchange(&mut still_busy, &rest_of_body).await;
    assert!(answer.status_line.starts_with("HTTP/1.1 202"), "{answer:?}");
    assert!(!answer.says_close(), "{answer:?}");
    drop(still_busy);
    service.stop().await;
}

/// `ingest.max_age_secs` of the tests whose readings age past the limit between a
/// request and its retry: a few seconds rather than 7 days.
pub(crate) const SHORT_MAX_AGE_SECS: u64 = 5;

/// A `recorded_at` of 2 s ago: within [`SHORT_MAX_AGE_SECS`] for about three seconds
/// more, time enough for a first request on a loaded box.
pub(crate) fn two_seconds_ago() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::seconds(2)
}

/// Waits until `recorded_at` is older than [`SHORT_MAX_AGE_SECS`], with a margin: a
/// time that must pass, so a sleep rather than a poll.
pub(crate) async fn wait_until_aged(recorded_at: time::OffsetDateTime) {
    let aged_at = recorded_at
        + time::Duration::seconds(SHORT_MAX_AGE_SECS as i64)
        + time::Duration::milliseconds(250);
    let remaining = aged_at - time::OffsetDateTime::now_utc();
    if remaining.is_positive() {
        tokio::time::sleep(remaining.unsigned_abs()).await;
    }
}

/// A device whose `202` was lost retries the same bytes under the same key once its
/// `recorded_at` has aged past `ingest.max_age_secs` (a gateway flushing its backlog
/// after an outage): it gets the stored answer, as API.md §1 promises for the same
/// device, key and request within the key's retention, not a `422`. Nothing else that
/// old gets in: neither the reading under a new key nor another reading under the key.
#[tokio::test]
async fn retry_of_a_stored_reading_gets_its_stored_answer_after_its_recorded_at_aged_past_the_limit(
) {
    let mut env = TestEnv::new();
    env.settings.ingest.max_age_secs = SHORT_MAX_AGE_SECS;
    let ingest = Ingest::spawn(&env.settings).await;
    let recorded_at = two_seconds_ago();
    let stored = json!({"device_id": "sensor-1", "recorded_at": contract::timestamp::format(recorded_at), "metrics": {"temperature": 21.5}});
    let first = ingest.accept("k-1", &stored).await;
    let first_body = first.text().await.expect("body");

    wait_until_aged(recorded_at).await;
    let retry = ingest.post("k-1", &stored).await;
    let status = retry.status().as_u16();
    assert_replayed(&retry);
    let retry_body = retry.text().await.expect("body");
    assert_eq!(status, 202, "the stored status, not a 422: {retry_body}");
    assert_eq!(retry_body, first_body, "the stored body");

    let new_key = ingest.post("k-2", &stored).await;
    let problem = assert_problem(new_key, 422, "invalid-reading").await;
    assert_eq!(problem["errors"][0]["field"], "recorded_at", "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .is_some_and(|message| message.contains("is older than")),
        "{problem}"
    );
    let another = json!({"device_id": "sensor-1", "recorded_at": contract::timestamp::format(recorded_at), "metrics": {"temperature": 22.0}});
    let problem = assert_problem(ingest.post("k-1", &another).await, 422, "invalid-reading").await;
    assert_eq!(
        problem["errors"][0]["field"], "recorded_at",
        "the age rule wins over the key's reuse: {problem}"
    );

    let db = env.postgres().await;
    assert_eq!(count(&db, "readings").await, 1);
    assert_eq!(count(&db, "idempotency_keys").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);
    drop(db);

    // The look-up of the aged retry's key fails as the store's other steps do: a 503
    // to retry, then the stored answer.
    close_database(&env).await;
    let response = ingest.post("k-1", &stored).await;
    assert!(response.headers().get("retry-after").is_some());
    assert_problem(response, 503, "unavailable").await;
    reopen_database(&env).await;
    let retry = ingest.post("k-1", &stored).await;
    assert_eq!(retry.status().as_u16(), 202);
    assert!(retry.headers().get("idempotent-replayed").is_some());
    assert_eq!(retry.text().await.expect("body"), first_body);
    ingest.stop().await;
}

/// The look-up of an aged retry's stored answer, held up by a lock on
/// `idempotency_keys` (an operator's `VACUUM FULL` or `REINDEX`), ends at the request's
/// deadline with a `503`, and its statement is cancelled with it: it does not stay
/// queued on a pooled connection for the next commit to wait behind.
///
/// It failed while the look-up ran on a plain pooled connection: after the `503` its
/// statement went on waiting for the lock.
#[tokio::test]
async fn an_aged_retrys_look_up_given_up_at_the_deadline_leaves_no_statement_waiting() {
    let mut env = TestEnv::new();
    env.settings.ingest.max_age_secs = SHORT_MAX_AGE_SECS;
    env.settings.ingest.request_timeout_ms = 1_000;
    let ingest = Ingest::spawn(&env.settings).await;
    let recorded_at = two_seconds_ago();
    let stored = json!({"device_id": "sensor-1", "recorded_at": contract::timestamp::format(recorded_at), "metrics": {"temperature": 21.5}});
    ingest.accept("k-1", &stored).await;
    wait_until_aged(recorded_at).await;

    let mut blocker = env.postgres().await;
    let lock = testkit::lock_table(&mut blocker, "idempotency_keys").await;
    assert_problem(ingest.post("k-1", &stored).await, 503, "unavailable").await;
    let db = env.postgres().await;
    eventually(
        Duration::from_secs(5),
        "no statement of ingest left waiting for the lock",
        || async { (testkit::lock_waiters(&db, "idempotency_keys").await == 0).then_some(()) },
    )
    .await;
    lock.rollback().await.expect("released");
    let retry = ingest.post("k-1", &stored).await;
    assert_replayed(&retry);
    assert_eq!(retry.status().as_u16(), 202, "the stored answer");
    ingest.stop().await;
}

/// A retry that aged past `ingest.max_age_secs` while its first request was still
/// committing waits for that commit and gets its replay, as any concurrent duplicate
/// does (API.md §1): the first request committed the reading. The look-up of aged
/// retries used to read the keys without waiting, found none yet and answered `422`
/// for a reading that was stored (a device that then "repaired" it under a new key
/// would have had it counted twice).
#[tokio::test]
async fn an_aged_retry_of_a_reading_still_committing_waits_for_it_and_gets_its_replay() {
    let mut env = TestEnv::new();
    env.settings.ingest.max_age_secs = SHORT_MAX_AGE_SECS;
    env.settings.ingest.request_timeout_ms = 30_000;
    let ingest = Ingest::spawn(&env.settings).await;
    // A gate the first commit stops at once it has inserted its key: a trigger on
    // `readings` that waits for an advisory lock the test holds.
    let db = env.postgres().await;
    close_gate(&db, "readings").await;
    let recorded_at = two_seconds_ago();
    let stored = json!({"device_id": "sensor-1", "recorded_at": contract::timestamp::format(recorded_at), "metrics": {"temperature": 21.5}});

    let first = ingest.post("k-1", &stored);
    let retry = async {
        eventually(
            Duration::from_secs(10),
            "the first commit at the gate",
            || async { (testkit::lock_waiters(&db, "stored_outbox").await == 1).then_some(()) },
        )
        .await;
        wait_until_aged(recorded_at).await;
        let retry = ingest.post("k-1", &stored);
        tokio::pin!(retry);
        let probe_waits = eventually(
            Duration::from_secs(10),
            "the retry waiting for the first commit",
            || async {
                (testkit::lock_waiters(&db, "00000000-0000-0000-0000-000000000000").await == 1)
                    .then_some(())
            },
        );
        tokio::select! {
            response = &mut retry => panic!(
                "the retry was answered while the first request was committing: {} {:?}",
                response.status(),
                response.text().await
            ),
            () = probe_waits => {}
        }
        open_gate(&db).await;
        retry.await
    };
    let (first, retry) = tokio::join!(first, retry);
    assert_eq!(first.status().as_u16(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.text().await.expect("body");
    assert_replayed(&retry);
    let status = retry.status().as_u16();
    let retry_body = retry.text().await.expect("body");
    assert_eq!(status, 202, "the first request's answer: {retry_body}");
    assert_eq!(retry_body, first_body);
    assert_eq!(count(&db, "readings").await, 1);
    assert_eq!(
        count(&db, "idempotency_keys").await,
        1,
        "the look-up wrote nothing"
    );
    assert_eq!(count(&db, "outbox").await, 1);
    ingest.stop().await;
}

/// A retry whose key was there when its insert ran but gone when its stored answer was
/// looked up (pruned at the end of its retention in that instant) cannot be answered
/// either way: a `409 idempotency-key-in-use` with `Retry-After`, as API.md §1 allows a
/// request that cannot wait, and no second reading.
///
/// The instant is made: a transaction deleting the key holds the retry's insert, a
/// table lock queued behind the insert holds the look-up after it, and the key is
/// deleted under that lock.
#[tokio::test]
async fn a_key_gone_between_its_insert_and_its_look_up_is_409_with_retry_after() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let stored = reading("sensor-1", 21.5);
    ingest.accept("k-1", &stored).await;
    let db = env.postgres().await;
    let holder = env.postgres().await;
    holder
        .batch_execute("BEGIN; DELETE FROM idempotency_keys WHERE idempotency_key = 'k-1'")
        .await
        .expect("the key's deletion open");
    let prune_under_the_look_up = async {
        eventually(
            Duration::from_secs(10),
            "the retry's insert waiting",
            || lock_waiter(&db, "INSERT INTO idempotency_keys"),
        )
        .await;
        let locked = queue_table_lock(&env, &db, "idempotency_keys").await;
        // The deletion rolled back: the insert finds the key and does nothing, and
        // its look-up waits behind the lock.
        holder.batch_execute("ROLLBACK").await.expect("rollback");
        let locker = locked.await.expect("the locker");
        eventually(
            Duration::from_secs(10),
            "the retry's look-up waiting",
            || lock_waiter(&db, "JOIN unnest($1::text[], $2::text[])"),
        )
        .await;
        locker
            .batch_execute("DELETE FROM idempotency_keys WHERE idempotency_key = 'k-1'; COMMIT")
            .await
            .expect("the key pruned");
    };
    let (response, ()) = tokio::join!(ingest.post("k-1", &stored), prune_under_the_look_up);
    assert!(response.headers().get("retry-after").is_some());
    assert_problem(response, 409, "idempotency-key-in-use").await;
    assert_eq!(count(&db, "readings").await, 1, "no second reading");
    ingest.stop().await;
}

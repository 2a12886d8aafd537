//! The metrics of the `query` binary (README, "Operator's runbook"): requests by route
//! and status, and their latency, served on `/metrics` and moving with each request.

use std::collections::BTreeMap;

use contract::event::TelemetryRecorded;

use contract::timestamp::{from_unix_millis, unix_millis};
use projector::apply::{Delivered, ReadModel};
use testkit::process::ServiceProcess;
use testkit::TestEnv;
use time::OffsetDateTime;
use uuid::Uuid;

const STATS: (&str, &str) = ("route", "/v1/devices/{device_id}/stats");

/// Makes generation 1 live and applies one reading of `device` to it, as the projector
/// would have.
async fn one_projected_reading(env: &TestEnv, device: &str) {
    env.set_live_generation(1).await;
    let mut redis = env.redis().await;
    let now = OffsetDateTime::now_utc();
    let event = TelemetryRecorded::new(
        Uuid::now_v7(),
        device.to_owned(),
        from_unix_millis(unix_millis(now) - 1_000).expect("in range"),
        now,
        BTreeMap::from([("temperature".to_owned(), 21.5)]),
    );
    let applied = ReadModel::new(env.settings.redis.prefix.clone(), 60_000)
        .apply(
            &mut redis,
            &[1],
            &[Delivered {
                event,
                stream_sequence: 1,
            }],
            unix_millis(now),
        )
        .await
        .expect("applied");
    assert_eq!(applied.applied, 1);
}

#[tokio::test]
async fn query_metrics_count_stats_requests_by_status_and_time_them() {
    let env = TestEnv::new();
    one_projected_reading(&env, "sensor-1").await;
    let query = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_query"),
        &env,
        "PIPELINE__QUERY__LISTEN",
        &[],
    );
    query.ready().await;
    let before = query.metrics().await;

    for (device, status) in [("sensor-1", 200), ("sensor-9", 404), ("bad!id", 400)] {
        let response = query
            .http
            .get(format!("{}/v1/devices/{device}/stats", query.base_url))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status().as_u16(), status, "stats of {device}");
    }

    let after = query.metrics().await;
    for status in ["200", "404", "400"] {
        let labels = [STATS, ("status", status)];
        assert_eq!(
            after.value("http_requests_total", &labels),
            Some(before.value_or_zero("http_requests_total", &labels) + 1.0),
            "one {status} counted under the route's pattern, not the device id"
        );
    }
    let latency = "http_request_duration_seconds_count";
    assert_eq!(
        after.value(latency, &[STATS]),
        Some(before.value_or_zero(latency, &[STATS]) + 3.0),
        "each request timed"
    );
    assert!(
        after.value_or_zero("http_request_duration_seconds_sum", &[STATS])
            > before.value_or_zero("http_request_duration_seconds_sum", &[STATS])
    );
    assert!(
        after.value(
            "http_request_duration_seconds_bucket",
            &[STATS, ("le", "+Inf")]
        ) == Some(after.value_or_zero(latency, &[STATS])),
        "a histogram with buckets"
    );

    assert_eq!(query.terminate().await.code(), Some(0));
}

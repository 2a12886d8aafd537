//! The metrics of the `query` binary (README, "Operator's runbook"): requests by route
//! and status, and their latency, served on `/metrics` and moving with each request.

use testkit::process::ServiceProcess;
use testkit::TestEnv;

use crate::support::one_projected_reading;

const STATS: (&str, &str) = ("route", "/v1/devices/{device_id}/stats");

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
    testkit::prometheus::assert_counters_served_from_start(&before, "query");

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

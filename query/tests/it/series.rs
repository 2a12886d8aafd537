//! `GET /v1/devices/{device_id}/series` (API.md §4, README): the buckets of one metric
//! that hold readings, oldest first, each stamped `t` with its start, with `count`,
//! `avg`, `min`, `max`; `from` and `to` choose the buckets; a bad request is a `400`
//! problem naming its field.

use std::collections::BTreeMap;

use contract::event::TelemetryRecorded;
use contract::timestamp::{format_millis, from_unix_millis, parse, unix_millis};
use serde_json::Value;
use testkit::{eventually, TestEnv};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::read_model::publish;
use crate::support::{assert_problem, one_projected_reading, Query, ReadSide, DEADLINE};

const TEN_SECONDS: i64 = 10_000;
const FIVE_MINUTES: i64 = 300_000;

/// A point as the test expects it: its bucket's start (ms), count, avg, min, max.
type Point = (i64, u64, f64, f64, f64);

/// The `(t, count, avg, min, max)` of each point of a series answer, in its order.
fn points_of(series: &Value) -> Vec<Point> {
    series["points"]
        .as_array()
        .unwrap_or_else(|| panic!("points: {series}"))
        .iter()
        .map(|point| {
            let t = point["t"]
                .as_str()
                .and_then(parse)
                .unwrap_or_else(|| panic!("t is RFC 3339: {point}"));
            let number = |field: &str| {
                point[field]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{field}: {point}"))
            };
            (
                unix_millis(t),
                point["count"].as_u64().expect("count"),
                number("avg"),
                number("min"),
                number("max"),
            )
        })
        .collect()
}

/// `GET /v1/devices/series-1/series?<query>`, which must answer 200; its points.
async fn series(query: &Query, parameters: &str) -> Vec<Point> {
    let path = format!("/v1/devices/series-1/series?{parameters}");
    let response = query.get(&path).await;
    assert_eq!(response.status().as_u16(), 200, "{path}");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["device_id"], "series-1", "{body}");
    points_of(&body)
}

/// Publishes a reading of `series-1` recorded at `recorded_ms` with `metrics`.
async fn publish_reading(
    env: &TestEnv,
    jetstream: &async_nats::jetstream::Context,
    recorded_ms: i64,
    metrics: BTreeMap<String, f64>,
) {
    let event = TelemetryRecorded::new(
        Uuid::now_v7(),
        "series-1".to_owned(),
        from_unix_millis(recorded_ms).expect("in range"),
        OffsetDateTime::now_utc(),
        metrics,
    );
    publish(
        &env.subjects,
        jetstream,
        &event,
        &event.event_id.to_string(),
    )
    .await;
}

/// Waits until `series-1` counts `samples` readings.
async fn projected(query: &Query, samples: u64) {
    eventually(DEADLINE, "the readings projected", || async {
        let (status, stats) = query.stats("series-1", "").await;
        (status == 200 && stats["sample_count"] == samples).then_some(())
    })
    .await;
}

/// `from=…&to=…` for the instants `from_ms` and `to_ms`.
fn range(from_ms: i64, to_ms: i64) -> String {
    format!(
        "from={}&to={}",
        format_millis(from_ms).expect("instant in range"),
        format_millis(to_ms).expect("instant in range"),
    )
}

#[tokio::test]
async fn series_points_are_the_buckets_of_the_readings_oldest_first_within_from_and_to() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    // The start of a 5 min bucket 40-45 minutes ago: every 10 s bucket below is still
    // kept (1 h 5 min) and inside the default range (the last hour).
    let now = unix_millis(OffsetDateTime::now_utc());
    let base = (now - 40 * 60_000).div_euclid(FIVE_MINUTES) * FIVE_MINUTES;
    // (ms after `base`, temperature, humidity), published newest first.
    let readings: [(i64, f64, Option<f64>); 7] = [
        (300_000 + 5_000, 1.0, None),
        (69_999, 6.0, None),
        (65_000, 10.0, None),
        (61_000, 8.0, Some(30.0)),
        (20_000, -1.5, Some(50.0)),
        (9_999, 4.0, None),
        (1_000, 2.0, None),
    ];
    for (offset, temperature, humidity) in readings {
        let mut metrics = BTreeMap::from([("temperature".to_owned(), temperature)]);
        if let Some(humidity) = humidity {
            metrics.insert("humidity".to_owned(), humidity);
        }
        publish_reading(env, jetstream, base + offset, metrics).await;
    }
    projected(query, 7).await;

    // Worked out by hand from the readings above.
    let fine_temperature: Vec<Point> = vec![
        (base, 2, 3.0, 2.0, 4.0),
        (base + 20_000, 1, -1.5, -1.5, -1.5),
        (base + 60_000, 3, 8.0, 6.0, 10.0),
        (base + 300_000, 1, 1.0, 1.0, 1.0),
    ];
    assert_eq!(
        series(query, "metric=temperature&resolution=10s").await,
        fine_temperature
    );
    assert_eq!(
        series(query, "metric=temperature").await,
        fine_temperature,
        "resolution defaults to 10s"
    );
    assert_eq!(
        series(query, "metric=humidity").await,
        vec![
            (base + 20_000, 1, 50.0, 50.0, 50.0),
            (base + 60_000, 1, 30.0, 30.0, 30.0),
        ],
        "only the metric asked for"
    );
    assert_eq!(
        series(query, "metric=temperature&resolution=5m").await,
        vec![
            (base, 6, 4.75, -1.5, 10.0),
            (base + 300_000, 1, 1.0, 1.0, 1.0),
        ]
    );
    // A metric it never had (a misspelt name, say) is not an empty series: until
    // 2026-12-06 `metric=temprature` answered `200 {"points": []}`.
    for parameters in ["metric=co2", "metric=temprature&resolution=5m"] {
        let path = format!("/v1/devices/series-1/series?{parameters}");
        let problem = assert_problem(query.get(&path).await, 404, "not-found").await;
        assert_eq!(problem["errors"][0]["field"], "metric", "{problem}");
    }

    // Ranges that take whole buckets in or leave them out.
    for (from, to, expected) in [
        // From the second bucket's start to the third bucket's last millisecond.
        (
            base + 20_000,
            base + 69_999,
            fine_temperature[1..3].to_vec(),
        ),
        (
            base + 20_000,
            base + 59_999,
            fine_temperature[1..2].to_vec(),
        ),
        (base, base + 9_999, fine_temperature[..1].to_vec()),
        // Between the buckets that hold readings.
        (base + 70_000, base + 299_999, Vec::new()),
        (base + 300_000, now, fine_temperature[3..].to_vec()),
        // One instant: its bucket.
        (
            base + 65_000,
            base + 65_000,
            fine_temperature[2..3].to_vec(),
        ),
    ] {
        let parameters = format!("metric=temperature&{}", range(from, to));
        assert_eq!(
            series(query, &parameters).await,
            expected,
            "from +{} to +{} ms",
            from - base,
            to - base
        );
    }
    // An offset's `+` typed into a URL unescaped arrives as a space (form encoding):
    // it is read as the `+` it was, as `%2B` is (until 2026-12-06 it was a 400).
    let an_hour_east = |ms: i64| {
        from_unix_millis(ms)
            .expect("in range")
            .to_offset(time::UtcOffset::from_hms(1, 0, 0).expect("an offset"))
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats")
    };
    for plus in ["+", "%2B"] {
        let parameters = format!(
            "metric=temperature&from={}&to={}",
            an_hour_east(base + 20_000).replace('+', plus),
            an_hour_east(base + 69_999).replace('+', plus),
        );
        assert_eq!(
            series(query, &parameters).await,
            fine_temperature[1..3].to_vec(),
            "{parameters}"
        );
    }
    let coarse = series(
        query,
        &format!(
            "metric=temperature&resolution=5m&{}",
            range(base + FIVE_MINUTES, now)
        ),
    )
    .await;
    assert_eq!(coarse, vec![(base + 300_000, 1, 1.0, 1.0, 1.0)]);
    let fine_before = series(
        query,
        &format!(
            "metric=temperature&resolution=10s&{}",
            range(base - 10 * TEN_SECONDS, base - 1)
        ),
    )
    .await;
    assert_eq!(fine_before, vec![], "nothing before the first reading");
    side.stop().await;
}

#[tokio::test]
async fn a_malformed_series_request_is_a_400_problem_naming_its_field() {
    let env = TestEnv::new();
    // A device that exists, so that only the request can be wrong.
    one_projected_reading(&env, "series-1").await;
    let query = Query::spawn(&env.settings).await;
    let now = unix_millis(OffsetDateTime::now_utc());
    let later_first = range(now, now - 60_000);
    let a_millisecond_later_first = range(now, now - 1);
    for (parameters, field) in [
        ("".to_owned(), "metric"),
        ("resolution=10s".to_owned(), "metric"),
        ("metric=".to_owned(), "metric"),
        ("metric=Temperature".to_owned(), "metric"),
        ("metric=temperature&resolution=1m".to_owned(), "resolution"),
        ("metric=temperature&resolution=10S".to_owned(), "resolution"),
        ("metric=temperature&resolution=".to_owned(), "resolution"),
        (format!("metric=temperature&{later_first}"), "from"),
        (
            format!("metric=temperature&{a_millisecond_later_first}"),
            "from",
        ),
        ("metric=temperature&from=yesterday".to_owned(), "from"),
        (
            "metric=temperature&from=2026-11-22T10:15:30".to_owned(),
            "from",
        ),
        (
            "metric=temperature&to=2026-13-01T00:00:00Z".to_owned(),
            "to",
        ),
        ("metric=temperature&to=1764000000000".to_owned(), "to"),
        // In years RFC 3339 cannot write in UTC, as the answer echoes them.
        (
            "metric=temperature&to=9999-12-31T23:59:59-23:59".to_owned(),
            "to",
        ),
        (
            "metric=temperature&from=0000-01-01T00:00:00%2B01:00".to_owned(),
            "from",
        ),
    ] {
        let path = format!("/v1/devices/series-1/series?{parameters}");
        let problem = assert_problem(query.get(&path).await, 400, "invalid-request").await;
        assert_eq!(
            problem["errors"][0]["field"], field,
            "{path}: the problem names {field}: {problem}"
        );
    }
    // The same device answers a well-formed request.
    let response = query
        .get("/v1/devices/series-1/series?metric=temperature")
        .await;
    assert_eq!(response.status().as_u16(), 200);
    // A `to` at the first instant RFC 3339 writes: the default `from` an hour before it
    // stops there, echoed as a timestamp, not in Unix seconds.
    let response = query
        .get("/v1/devices/series-1/series?metric=temperature&to=0000-01-01T00:00:00Z")
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["from"], "0000-01-01T00:00:00Z", "{body}");
    assert_eq!(body["to"], "0000-01-01T00:00:00Z", "{body}");
    query.stop().await;
}

/// API.md §4: an unknown device is a `404 not-found` on its series as on its stats,
/// whether the range asked for holds buckets the read model keeps or lies wholly before
/// them (answered without reading any bucket); so is a metric the known device never
/// reported; a known device's range from before them is an empty series, not a 404.
#[tokio::test]
async fn the_series_of_an_unknown_device_is_a_404_whatever_the_range() {
    let env = TestEnv::new();
    one_projected_reading(&env, "series-1").await;
    let query = Query::spawn(&env.settings).await;
    let now = unix_millis(OffsetDateTime::now_utc());
    let long_ago = range(now - 400 * 86_400_000, now - 399 * 86_400_000);
    for parameters in [
        "metric=temperature".to_owned(),
        "metric=temperature&resolution=5m".to_owned(),
        format!("metric=temperature&{long_ago}"),
    ] {
        let path = format!("/v1/devices/no-such-device/series?{parameters}");
        assert_problem(query.get(&path).await, 404, "not-found").await;
    }
    for parameters in [
        "metric=humidity".to_owned(),
        format!("metric=humidity&{long_ago}"),
    ] {
        let path = format!("/v1/devices/series-1/series?{parameters}");
        let problem = assert_problem(query.get(&path).await, 404, "not-found").await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("humidity")),
            "the detail names the metric: {problem}"
        );
    }
    let known = series(&query, &format!("metric=temperature&{long_ago}")).await;
    assert_eq!(
        known,
        vec![],
        "a known device's range from long ago is empty"
    );
    query.stop().await;
}

/// Ingest accepts readings dated up to `ingest.max_future_secs` (5 min) ahead, and the
/// projector keeps their buckets: a series whose `to` reaches them shows them. The
/// range used to end one bucket past now, and a reading from a device whose clock ran
/// two minutes fast was left out of its series while `/stats` counted it.
#[tokio::test]
async fn a_reading_dated_ahead_within_the_future_limit_is_in_a_series_that_reaches_it() {
    let side = ReadSide::start().await;
    let (now, ahead) = one_reading_ahead(&side, 120_000).await;
    let query = &side.query;
    let limit = side.env.settings.ingest.max_future_secs as i64 * 1000;
    let reaching = range(now - 60_000, now + limit);
    assert_eq!(
        temperatures(query, "10s", &reaching).await,
        vec![its_point(ahead, TEN_SECONDS)]
    );
    assert_eq!(
        temperatures(query, "5m", &reaching).await,
        vec![its_point(ahead, FIVE_MINUTES)]
    );
    // Far past the limit, `to` still reads a bounded range.
    let far = range(now - 60_000, now + 400 * 86_400_000);
    assert_eq!(
        temperatures(query, "10s", &far).await,
        vec![its_point(ahead, TEN_SECONDS)]
    );
}

/// However far ahead `ingest.max_future_secs` lets readings be dated (12 hours at most),
/// a series reads at most one retention of buckets past now (1 h 5 min of 10 s buckets,
/// 24 h 15 min of 5 min ones), so that one request's read stays bounded: a reading two
/// hours ahead is in the 5 min series and not in the 10 s one.
#[tokio::test]
async fn a_series_reads_at_most_a_retention_ahead_whatever_the_future_limit() {
    let side = ReadSide::start_with(|settings| {
        settings.ingest.max_future_secs = contract::settings::FUTURE_MAX_SECS
    })
    .await;
    let (now, ahead) = one_reading_ahead(&side, 2 * 3_600_000).await;
    let query = &side.query;
    let reaching = range(now - 60_000, now + 3 * 3_600_000);
    assert_eq!(
        temperatures(query, "10s", &reaching).await,
        vec![],
        "10 s buckets past 1 h 5 min ahead are not read"
    );
    assert_eq!(
        temperatures(query, "5m", &reaching).await,
        vec![its_point(ahead, FIVE_MINUTES)]
    );
}

/// Publishes one temperature reading of `series-1`, 21.0, dated `ahead_ms` past now, and
/// waits until it is projected; now and its `recorded_at` (ms).
async fn one_reading_ahead(side: &ReadSide, ahead_ms: i64) -> (i64, i64) {
    let now = unix_millis(OffsetDateTime::now_utc());
    let temperature = BTreeMap::from([("temperature".to_owned(), 21.0)]);
    publish_reading(&side.env, &side.jetstream, now + ahead_ms, temperature).await;
    projected(&side.query, 1).await;
    (now, now + ahead_ms)
}

/// The temperature series of `series-1` at `resolution` over `range` (`from=…&to=…`).
async fn temperatures(query: &Query, resolution: &str, range: &str) -> Vec<Point> {
    series(
        query,
        &format!("metric=temperature&resolution={resolution}&{range}"),
    )
    .await
}

/// The point of [`one_reading_ahead`]'s reading recorded at `at_ms` in buckets
/// `width_ms` wide.
fn its_point(at_ms: i64, width_ms: i64) -> Point {
    (at_ms.div_euclid(width_ms) * width_ms, 1, 21.0, 21.0, 21.0)
}

/// A bucket whose readings sum past a double's range has no average: its point says
/// `"avg": null` (as `openapi.json` allows), with its count, min and max as they are.
#[tokio::test]
async fn a_bucket_whose_sum_overflows_has_a_null_average() {
    let side = ReadSide::start().await;
    let (env, jetstream, query) = (&side.env, &side.jetstream, &side.query);
    let now = unix_millis(OffsetDateTime::now_utc());
    let at = (now - 10 * 60_000).div_euclid(TEN_SECONDS) * TEN_SECONDS;
    for offset in [1_000, 2_000] {
        let metrics = BTreeMap::from([("temperature".to_owned(), 1.7e308)]);
        publish_reading(env, jetstream, at + offset, metrics).await;
    }
    projected(query, 2).await;

    let path = "/v1/devices/series-1/series?metric=temperature";
    let response = query.get(path).await;
    assert_eq!(response.status().as_u16(), 200, "{path}");
    let body: Value = response.json().await.expect("json");
    let points = body["points"].as_array().expect("points");
    assert_eq!(points.len(), 1, "{body}");
    let point = &points[0];
    assert_eq!(point["count"], 2, "{body}");
    assert!(point["avg"].is_null(), "{body}");
    assert_eq!(point["min"], 1.7e308, "{body}");
    assert_eq!(point["max"], 1.7e308, "{body}");
}

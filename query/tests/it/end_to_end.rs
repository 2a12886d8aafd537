//! The whole pipeline in one process: readings posted to ingest (with retries of the
//! same Idempotency-Key, some concurrent) come out of the query API counted once, with
//! the figures an independent fold over the accepted readings gives (API.md §1, §4).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use contract::timestamp::{format_millis, parse, unix_millis};
use reqwest::Client;
use serde_json::{json, Value};
use testkit::{eventually, TestEnv};
use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::support::{
    http_client, spawn_projector, spawn_relay, Ingest, Query, SplitMix, DEADLINE,
};

const DEVICES: usize = 5;
const READINGS_PER_DEVICE: usize = 12;
const METRICS: [&str; 3] = ["temperature", "humidity", "pressure"];

/// Ages in seconds (before the first POST) that the readings are spread over, one range
/// per window of API.md §4 and one older than all of them. Each range keeps clear of
/// the window edges by more than one bucket plus the test's own run time.
const AGE_RANGES: [(i64, i64); 6] = [
    (1, 15),
    (90, 240),
    (330, 840),
    (960, 3_400),
    (3_900, 85_000),
    (90_000, 500_000),
];

/// (name, length, bucket width) of each window, in ms, as API.md §4 defines them.
const WINDOWS: [(&str, i64, i64); 5] = [
    ("1m", 60_000, 10_000),
    ("5m", 300_000, 10_000),
    ("15m", 900_000, 10_000),
    ("1h", 3_600_000, 10_000),
    ("24h", 86_400_000, 300_000),
];

/// One reading as posted.
#[derive(Debug, Clone)]
struct Posted {
    key: String,
    device: String,
    recorded_at_ms: i64,
    metrics: BTreeMap<String, f64>,
}

impl Posted {
    fn body(&self) -> Value {
        json!({
            "device_id": self.device,
            "recorded_at": format_millis(self.recorded_at_ms).expect("instant in range"),
            "metrics": self.metrics,
        })
    }
}

/// What ingest answered to one POST.
#[derive(Debug)]
struct Answer {
    replayed: bool,
    body: String,
    event_id: String,
}

/// POSTs a reading, waiting out `409` (the same key being committed by a concurrent
/// request) as a client honouring `Retry-After` would, only faster.
async fn post(http: &Client, base_url: &str, reading: &Posted) -> Answer {
    let mut attempts = 0;
    loop {
        let response = http
            .post(format!("{base_url}/v1/telemetry"))
            .header("content-type", "application/json")
            .header("idempotency-key", &reading.key)
            .body(reading.body().to_string())
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        if status == 409 && attempts < 200 {
            assert!(response.headers().get("retry-after").is_some());
            attempts += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(status, 202, "{}: {:?}", reading.key, response.text().await);
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true");
        let body = response.text().await.expect("body");
        let json: Value = serde_json::from_str(&body).expect("json answer");
        return Answer {
            replayed,
            event_id: json["event_id"].as_str().expect("event_id").to_owned(),
            body,
        };
    }
}

/// Posts `reading` once, or `copies` times at once, or once and then again.
async fn post_with_retries(
    http: Client,
    base_url: String,
    reading: Posted,
    copies: usize,
    replay_after: bool,
) -> (Posted, Vec<Answer>) {
    let mut answers = Vec::new();
    let mut concurrent = JoinSet::new();
    for _ in 0..copies {
        let (http, base_url, reading) = (http.clone(), base_url.clone(), reading.clone());
        concurrent.spawn(async move { post(&http, &base_url, &reading).await });
    }
    while let Some(answer) = concurrent.join_next().await {
        answers.push(answer.expect("post task"));
    }
    if replay_after {
        let replay = post(&http, &base_url, &reading).await;
        assert!(replay.replayed, "{}: a retry is a replay", reading.key);
        assert_eq!(
            replay.body, answers[0].body,
            "{}: the replay is the stored answer",
            reading.key
        );
        answers.push(replay);
    }
    (reading, answers)
}

/// The readings: every device gets readings in every age range, some metrics each, no
/// two of one device at the same instant (API.md leaves ties open).
fn readings(random: &mut SplitMix, started_ms: i64) -> Vec<Posted> {
    let mut readings = Vec::new();
    for device_index in 0..DEVICES {
        let device = format!("e2e-sensor-{device_index}");
        let mut instants = BTreeSet::new();
        for index in 0..READINGS_PER_DEVICE {
            let (low, high) = AGE_RANGES[index % AGE_RANGES.len()];
            let recorded_at_ms = loop {
                let at = started_ms - random.between(low * 1000, high * 1000);
                if instants.insert(at) {
                    break at;
                }
            };
            let mut metrics = BTreeMap::new();
            for name in METRICS {
                // Every other reading has a temperature; besides, a random choice of
                // the other metrics, never none at all.
                let wanted = match name {
                    "temperature" => index % 2 == 0,
                    _ => random.between(0, 3) > 0,
                };
                if wanted || (name == "pressure" && metrics.is_empty()) {
                    metrics.insert(
                        name.to_owned(),
                        random.between(-2_000, 6_000) as f64 / 100.0,
                    );
                }
            }
            readings.push(Posted {
                key: format!("{device}-reading-{index}"),
                device: device.clone(),
                recorded_at_ms,
                metrics,
            });
        }
    }
    readings
}

/// Relative comparison for figures computed by summing in different orders.
fn assert_close(actual: f64, expected: f64, what: &str) {
    let tolerance = 1e-9 * expected.abs().max(1.0);
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} is not {expected}"
    );
}

fn millis(value: &Value, what: &str) -> i64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string"));
    unix_millis(parse(text).unwrap_or_else(|| panic!("{what} {text} is RFC 3339")))
}

/// count, sum, min, max of some values; `None` when there are none.
fn aggregate(values: &[f64]) -> Option<(u64, f64, f64, f64)> {
    (!values.is_empty()).then(|| {
        (
            values.len() as u64,
            values.iter().sum(),
            values.iter().copied().fold(f64::INFINITY, f64::min),
            values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    })
}

/// Checks `{count, avg, min, max}` (a window, or the all-time figures) against values.
fn assert_aggregate(view: &Value, values: &[f64], what: &str) {
    match aggregate(values) {
        None => {
            assert_eq!(view["count"], 0, "{what}: count");
            for field in ["avg", "min", "max"] {
                assert!(view[field].is_null(), "{what}: {field} of an empty window");
            }
        }
        Some((count, sum, min, max)) => {
            assert_eq!(view["count"], count, "{what}: count");
            let avg = view["avg"].as_f64().unwrap_or(f64::NAN);
            assert_close(
                avg * count as f64,
                sum,
                &format!("{what}: sum (avg × count)"),
            );
            assert_close(avg, sum / count as f64, &format!("{what}: avg"));
            assert_eq!(view["min"].as_f64(), Some(min), "{what}: min");
            assert_eq!(view["max"].as_f64(), Some(max), "{what}: max");
        }
    }
}

/// Compares one stats document with the readings of its device, read between
/// `asked_ms` and `answered_ms`.
fn assert_stats(stats: &Value, readings: &[&Posted], asked_ms: i64, answered_ms: i64) {
    let device = &readings[0].device;
    assert_eq!(stats["device_id"], device.as_str());
    assert_eq!(
        stats["sample_count"],
        readings.len(),
        "{device}: sample_count"
    );
    let instants = readings.iter().map(|reading| reading.recorded_at_ms);
    assert_eq!(
        millis(&stats["first_seen"], "first_seen"),
        instants.clone().min().expect("readings"),
        "{device}: first_seen is the earliest recorded_at"
    );
    assert_eq!(
        millis(&stats["last_seen"], "last_seen"),
        instants.max().expect("readings"),
        "{device}: last_seen is the latest recorded_at"
    );
    millis(&stats["updated_at"], "updated_at");
    let names: BTreeSet<&String> = readings
        .iter()
        .flat_map(|reading| reading.metrics.keys())
        .collect();
    let metrics = stats["metrics"].as_object().expect("metrics object");
    assert_eq!(
        metrics.keys().collect::<BTreeSet<_>>(),
        names,
        "{device}: metric names"
    );
    for name in names {
        let what = format!("{device} {name}");
        let metric = &metrics[name.as_str()];
        let values: Vec<(i64, f64)> = readings
            .iter()
            .filter_map(|reading| Some((reading.recorded_at_ms, *reading.metrics.get(name)?)))
            .collect();
        let all: Vec<f64> = values.iter().map(|(_, value)| *value).collect();
        assert_aggregate(metric, &all, &what);
        let (last_at, last) = values
            .iter()
            .max_by_key(|(at, _)| *at)
            .copied()
            .expect("values");
        assert_eq!(metric["last"].as_f64(), Some(last), "{what}: last");
        assert_eq!(
            millis(&metric["last_at"], "last_at"),
            last_at,
            "{what}: last_at"
        );
        for (window, length, width) in WINDOWS {
            let inside: Vec<f64> = values
                .iter()
                .filter(|(at, _)| {
                    let surely_in = answered_ms - at <= length - width;
                    let surely_out = asked_ms - at >= length + width;
                    assert!(
                        surely_in || surely_out,
                        "{what}: a reading aged {} ms is within a bucket of the {window} edge; the test ran too slowly",
                        answered_ms - at
                    );
                    surely_in
                })
                .map(|(_, value)| *value)
                .collect();
            assert_aggregate(
                &metric["windows"][window],
                &inside,
                &format!("{what} window {window}"),
            );
        }
    }
}

/// Messages in this test's event stream (0 before the relay created it).
async fn stream_messages(env: &TestEnv) -> u64 {
    let Ok(mut stream) = env
        .jetstream()
        .await
        .get_stream(env.subjects.stream())
        .await
    else {
        return 0;
    };
    stream.info().await.map_or(0, |info| info.state.messages)
}

#[tokio::test]
async fn readings_posted_with_retries_come_out_of_the_query_api_counted_once() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let mut relay = spawn_relay(&env.settings);
    let mut projector = None;
    let query = Query::spawn(&env.settings).await;
    let http = http_client();

    let started_ms = unix_millis(OffsetDateTime::now_utc());
    let mut random = SplitMix(0x0e2e_2026);
    let readings = readings(&mut random, started_ms);
    // Each device's newest reading goes first, so every other one arrives late.
    let mut order: Vec<Posted> = Vec::new();
    let mut rest: Vec<Posted> = Vec::new();
    for device_readings in readings.chunks(READINGS_PER_DEVICE) {
        let newest = device_readings
            .iter()
            .max_by_key(|reading| reading.recorded_at_ms)
            .expect("readings");
        order.push(newest.clone());
        rest.extend(
            device_readings
                .iter()
                .filter(|reading| reading.key != newest.key)
                .cloned(),
        );
    }
    random.shuffle(&mut rest);
    order.extend(rest);

    let mut answered = Vec::new();
    for (chunk_index, chunk) in order.chunks(10).enumerate() {
        if chunk_index == 3 {
            // The projector starts late: its first build replays the events already in
            // the stream while its durable consumer delivers the same events again.
            let relayed = answered.len() as u64;
            eventually(DEADLINE, "the first readings relayed", || async {
                (stream_messages(&env).await >= relayed).then_some(())
            })
            .await;
            projector = Some(spawn_projector(&env.settings));
        }
        if chunk_index == 4 {
            relay.stop().await;
            relay = spawn_relay(&env.settings);
        }
        let mut posts = JoinSet::new();
        for (index, reading) in chunk.iter().enumerate() {
            let position = chunk_index * 10 + index;
            let copies = if position % 5 == 2 { 3 } else { 1 };
            let replay_after = position % 4 == 1;
            posts.spawn(post_with_retries(
                http.clone(),
                ingest.base_url.clone(),
                reading.clone(),
                copies,
                replay_after,
            ));
        }
        while let Some(result) = posts.join_next().await {
            answered.push(result.expect("post task"));
        }
    }
    let mut event_ids = BTreeSet::new();
    for (reading, answers) in &answered {
        let fresh = answers.iter().filter(|answer| !answer.replayed).count();
        assert_eq!(fresh, 1, "{}: accepted exactly once", reading.key);
        let ids: BTreeSet<&str> = answers
            .iter()
            .map(|answer| answer.event_id.as_str())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "{}: every answer names one event",
            reading.key
        );
        event_ids.extend(ids);
    }
    assert_eq!(event_ids.len(), readings.len(), "one event per reading");

    let mut by_device: BTreeMap<&str, Vec<&Posted>> = BTreeMap::new();
    for reading in &readings {
        by_device.entry(&reading.device).or_default().push(reading);
    }
    for (device, device_readings) in &by_device {
        eventually(DEADLINE, &format!("{device} fully projected"), || async {
            let (status, stats) = query.stats(device, "").await;
            let projected = stats["sample_count"].as_u64().unwrap_or(0);
            (status == 200 && projected >= device_readings.len() as u64).then_some(())
        })
        .await;
    }
    for (device, device_readings) in &by_device {
        let asked_ms = unix_millis(OffsetDateTime::now_utc());
        let (status, stats) = query.stats(device, "").await;
        let answered_ms = unix_millis(OffsetDateTime::now_utc());
        assert_eq!(status, 200);
        assert_stats(&stats, device_readings, asked_ms, answered_ms);
        // Asked again, the answer comes from the cached view and its rendered document
        // (windows aside: a 10 s boundary may pass between the two questions).
        let (status, again) = query.stats(device, "").await;
        assert_eq!(status, 200);
        let without_windows = |document: &Value| {
            let mut document = document.clone();
            if let Some(metrics) = document["metrics"].as_object_mut() {
                for metric in metrics.values_mut() {
                    metric["windows"] = Value::Null;
                }
            }
            document
        };
        assert_eq!(
            without_windows(&again),
            without_windows(&stats),
            "{device}: the same figures asked twice"
        );
        assert!(stats["as_of_seq"].as_u64().unwrap_or(0) > 0);

        // `?metrics=` limits the metrics and changes nothing else.
        let (status, temperature_only) = query.stats(device, "?metrics=temperature").await;
        assert_eq!(status, 200);
        let names: Vec<&String> = temperature_only["metrics"]
            .as_object()
            .expect("metrics")
            .keys()
            .collect();
        assert_eq!(names, ["temperature"], "{device}: ?metrics=temperature");
        for field in ["first_seen", "last_seen", "sample_count"] {
            assert_eq!(temperature_only[field], stats[field], "{device}: {field}");
        }
        for aggregate in ["count", "avg", "min", "max", "last", "last_at"] {
            assert_eq!(
                temperature_only["metrics"]["temperature"][aggregate],
                stats["metrics"]["temperature"][aggregate],
                "{device}: temperature {aggregate} filtered"
            );
        }
        let (status, two) = query.stats(device, "?metrics=humidity,temperature").await;
        assert_eq!(status, 200);
        let wanted: BTreeSet<&str> = stats["metrics"]
            .as_object()
            .expect("metrics")
            .keys()
            .map(String::as_str)
            .filter(|name| ["humidity", "temperature"].contains(name))
            .collect();
        let got: BTreeSet<&str> = two["metrics"]
            .as_object()
            .expect("metrics")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(got, wanted, "{device}: ?metrics=humidity,temperature");
    }

    // No retry made a second event.
    assert_eq!(stream_messages(&env).await, readings.len() as u64);

    // The devices list: every device once, most recently seen first, page by page.
    let mut listed: Vec<Value> = Vec::new();
    let mut path = "/v1/devices?limit=2".to_owned();
    let mut ended = false;
    for _page in 0..=DEVICES {
        let response = query.get(&path).await;
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let page: Value = response.json().await.expect("json");
        listed.extend(page["devices"].as_array().expect("devices").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/devices?limit=2&cursor={cursor}"),
            None => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "the walk ends with a null cursor: {listed:?}");
    let mut expected: Vec<(&str, i64, usize)> = by_device
        .iter()
        .map(|(device, readings)| {
            let last_seen = readings
                .iter()
                .map(|reading| reading.recorded_at_ms)
                .max()
                .expect("readings");
            (*device, last_seen, readings.len())
        })
        .collect();
    // Most recently seen first to the listing's 10 s granule, then by device id, both
    // descending (README: the devices list).
    expected.sort_by_key(|(device, last_seen, _)| {
        std::cmp::Reverse((
            contract::read_model::listing_granule(*last_seen),
            device.to_string(),
        ))
    });
    let got: Vec<(&str, i64, usize)> = listed
        .iter()
        .map(|device| {
            (
                device["device_id"].as_str().expect("device_id"),
                millis(&device["last_seen"], "last_seen"),
                device["sample_count"].as_u64().expect("sample_count") as usize,
            )
        })
        .collect();
    assert_eq!(got, expected, "GET /v1/devices");

    query.stop().await;
    projector.expect("the projector was started").stop().await;
    relay.stop().await;
    ingest.stop().await;
}

//! Property test of the query API's parameters: random paths and query strings, with
//! numbers at the edges of their type and timestamps at the edges of RFC 3339, never
//! cause a panic or a 5xx, and every refusal is a problem document (API.md §3, §4).

use proptest::prelude::*;
use testkit::fuzz::{check_answer, run_cases};
use testkit::TestEnv;

use crate::support::{one_projected_reading, Query};

/// A whole number: anywhere in `i64`, or at one of its edges.
fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => any::<i64>(),
        1 => prop::sample::select(vec![i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX]),
    ]
}

/// An RFC 3339 timestamp anywhere from year 0 to 9999, in any offset it may carry.
fn timestamp() -> impl Strategy<Value = String> {
    (
        0..=9999u32,
        1..=12u32,
        1..=31u32,
        0..=23u32,
        0..=59u32,
        0..=60u32,
        prop::sample::select(vec!["Z", "+00:00", "-23:59", "+23:59", "+14:00"]),
    )
        .prop_map(|(year, month, day, hour, minute, second, offset)| {
            format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.250{offset}")
        })
}

/// What a parameter might be given: sensible, shaped like a cursor, at the edges of its
/// type, or anything printable.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "temperature",
            "temperature,humidity",
            "10s",
            "5m",
            "1",
            "1000"
        ])
        .prop_map(str::to_owned),
        number().prop_map(|number| number.to_string()),
        cursor(),
        timestamp(),
        "[ -~]{0,40}",
    ]
}

/// Shaped like a cursor (`<generation>.<snapshot ms>.<granule ms>.<device id>`, or
/// without the generation as before), with any numbers.
fn cursor() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just(String::new()),
            // The live generation of the test (`one_projected_reading`).
            Just("1.".to_owned()),
            number().prop_map(|generation| format!("{generation}.")),
            any::<u64>().prop_map(|generation| format!("{generation}.")),
        ],
        number(),
        number(),
        prop_oneof!["[A-Za-z0-9_-]{1,64}", "[A-Za-z0-9_.:-]{0,70}"],
    )
        .prop_map(|(generation, snapshot, granule, device)| {
            format!("{generation}{snapshot}.{granule}.{device}")
        })
}

/// One query parameter: mostly a value of the kind its name takes, else any value.
fn parameter() -> impl Strategy<Value = (&'static str, String)> {
    let name = prop::sample::select(vec![
        "metrics",
        "metric",
        "resolution",
        "from",
        "to",
        "limit",
        "cursor",
        "other",
    ]);
    prop_oneof![
        cursor().prop_map(|cursor| ("cursor", cursor)),
        number().prop_map(|limit| ("limit", limit.to_string())),
        (prop::sample::select(vec!["from", "to"]), timestamp()),
        (
            prop::sample::select(vec!["metric", "metrics"]),
            "[a-z][a-z0-9_]{0,64}(,[a-z][a-z0-9_]{0,8}){0,2}"
        ),
        (name, value()),
    ]
}

/// A device id: the one that exists, one that does not, any valid one, or anything.
fn device() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("sensor-1".to_owned()),
        Just("never-seen".to_owned()),
        "[A-Za-z0-9_-]{1,64}",
        "[ -~]{0,70}",
    ]
}

#[derive(Debug, Clone)]
struct Request {
    path: String,
    parameters: Vec<(&'static str, String)>,
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(vec!["stats", "series", "list"]),
        device(),
        prop::collection::vec(parameter(), 0..4),
    )
        .prop_map(|(route, device, parameters)| {
            let device = path_segment(&device);
            let path = match route {
                "list" => "/v1/devices".to_owned(),
                route => format!("/v1/devices/{device}/{route}"),
            };
            Request { path, parameters }
        })
}

/// `segment` percent-encoded for a URL path, every byte but the unreserved ones.
fn path_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

async fn send(query: &Query, request: &Request) -> Result<(), TestCaseError> {
    let response = query
        .http
        .get(format!("{}{}", query.base_url, request.path))
        .query(&request.parameters)
        .send()
        .await;
    check_answer(response, request).await
}

#[test]
fn random_paths_and_parameters_never_cause_a_panic_or_a_5xx_and_refusals_are_problems() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let env = TestEnv::new();
    let query = runtime.block_on(async {
        one_projected_reading(&env, "sensor-1").await;
        let query = Query::spawn(&env.settings).await;
        query.first_document("sensor-1", "sensor-1's stats").await;
        query
    });
    run_cases(1000, &request(), |request| {
        runtime.block_on(send(&query, &request))
    });
    runtime.block_on(query.stop());
}

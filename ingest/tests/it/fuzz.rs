//! Property test of request decoding: random and mutated bodies and headers never cause
//! a panic or a 5xx, and every refusal is a problem document.

use std::sync::atomic::{AtomicUsize, Ordering};

use ingest::auth::Kind;
use proptest::prelude::*;
use serde_json::{json, Value};
use testkit::fuzz::{check_answer, run_cases};
use testkit::TestEnv;

use crate::support::Ingest;

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(
            |number| serde_json::Number::from_f64(number).map_or(Value::Null, Value::Number)
        ),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{0,10}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A valid reading with some of its parts replaced by arbitrary JSON.
fn mutated_reading() -> impl Strategy<Value = Value> {
    (any_json(), any_json(), any_json(), 0..4u8).prop_map(
        |(device, recorded_at, metrics, which)| {
            let mut reading = json!({
                "device_id": "sensor-1",
                "recorded_at": contract::timestamp::format(time::OffsetDateTime::now_utc()),
                "metrics": {"temperature": 21.5}
            });
            match which {
                0 => reading["device_id"] = device,
                1 => reading["recorded_at"] = recorded_at,
                2 => reading["metrics"] = metrics,
                _ => reading["metrics"]["temperature"] = metrics,
            }
            reading
        },
    )
}

/// Bytes: a mutated valid body, arbitrary JSON, or arbitrary bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        mutated_reading().prop_map(|value| value.to_string().into_bytes()),
        (mutated_reading(), any::<prop::sample::Index>(), any::<u8>()).prop_map(
            |(value, index, byte)| {
                let mut bytes = value.to_string().into_bytes();
                let position = index.index(bytes.len());
                bytes[position] = byte;
                bytes
            }
        ),
        any_json().prop_map(|value| value.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..200),
        mutated_reading().prop_map(|value| json!({"readings": [value, {"idempotency_key": 7}]})
            .to_string()
            .into_bytes()),
    ]
}

/// A header value: usually sensible, sometimes anything a header may carry.
fn header_value(sensible: &'static str) -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(Some(sensible.to_owned())),
        1 => Just(None),
        1 => "[ -~]{0,140}".prop_map(Some),
    ]
}

/// The sensible `Authorization` of a generated request; the instance with tokens on
/// swaps in a gateway token it issued, so that such requests get past authentication
/// to the decoding under test (with an unknown token every one of them was a `401`).
const SOME_TOKEN: &str =
    "Bearer tp_0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone)]
struct Request {
    batch: bool,
    body: Vec<u8>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    authorization: Option<String>,
}

fn request() -> impl Strategy<Value = Request> {
    (
        any::<bool>(),
        body(),
        header_value("application/json"),
        header_value("key-1"),
        header_value(SOME_TOKEN),
    )
        .prop_map(
            |(batch, body, content_type, idempotency_key, authorization)| Request {
                batch,
                body,
                content_type,
                idempotency_key,
                authorization,
            },
        )
}

/// Sends `request` and checks the answer; its status, when there was one.
async fn send(ingest: &Ingest, request: &Request) -> Result<Option<u16>, TestCaseError> {
    let path = if request.batch {
        "/v1/telemetry/batch"
    } else {
        "/v1/telemetry"
    };
    let mut builder = ingest
        .http
        .post(format!("{}{path}", ingest.base_url))
        .body(request.body.clone());
    for (name, value) in [
        ("content-type", &request.content_type),
        ("idempotency-key", &request.idempotency_key),
        ("authorization", &request.authorization),
    ] {
        if let Some(value) = value {
            builder = builder.header(name, value.as_str());
        }
    }
    let response = builder.send().await;
    let status = response
        .as_ref()
        .ok()
        .map(|answer| answer.status().as_u16());
    check_answer(response, request).await?;
    Ok(status)
}

#[test]
fn random_requests_never_cause_a_panic_or_a_5xx_and_refusals_are_problems() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let env = TestEnv::new();
    let ingest = runtime.block_on(Ingest::spawn(&env.settings));
    let mut with_auth = TestEnv::new();
    with_auth.settings.auth.enabled = true;
    let guarded = runtime.block_on(Ingest::spawn(&with_auth.settings));
    let pool = ingest::db::pool(&with_auth.settings.database).expect("pool");
    let (_, token) = runtime
        .block_on(ingest::auth::issue(&pool, Kind::Gateway, None, "fuzz"))
        .expect("issued");
    let bearer = format!("Bearer {token}");
    let authenticated = AtomicUsize::new(0);
    run_cases(300, &request(), |request| {
        runtime.block_on(async {
            send(&ingest, &request).await?;
            let mut with_token = request.clone();
            if with_token.authorization.as_deref() == Some(SOME_TOKEN) {
                with_token.authorization = Some(bearer.clone());
            }
            if send(&guarded, &with_token).await? != Some(401) {
                authenticated.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    });
    // About 3 in 5 carry the token; fewer than 1 in 3 getting past it means the
    // instance with tokens on tested nothing but its 401.
    let authenticated = authenticated.into_inner();
    assert!(
        authenticated > 100,
        "{authenticated} of 300 cases got past authentication"
    );
    runtime.block_on(async {
        ingest.stop().await;
        guarded.stop().await;
    });
}

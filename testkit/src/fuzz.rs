//! Property tests of the HTTP APIs: random requests, and what every answer must be.

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// What every answer of the HTTP APIs must be, whatever the request (API.md §3): no 5xx,
/// a JSON body, and for a refusal a problem document whose `status` is the answer's.
/// `request` names the request in a failure.
pub async fn check_answer(
    response: reqwest::Result<reqwest::Response>,
    request: &impl std::fmt::Debug,
) -> Result<(), TestCaseError> {
    let fail = |what: String| TestCaseError::fail(format!("{what} for {request:?}"));
    let response = response.map_err(|error| fail(format!("no answer ({error})")))?;
    let status = response.status().as_u16();
    if status >= 500 {
        return Err(fail(format!("server error {status}")));
    }
    let content_type = crate::content_type(&response);
    let expected = if status >= 400 {
        "application/problem+json"
    } else {
        "application/json"
    };
    if content_type != expected {
        return Err(fail(format!(
            "{status} as {content_type:?}, not {expected}"
        )));
    }
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|error| fail(format!("{status} whose body is not JSON ({error})")))?;
    if status >= 400 && body["status"].as_u64() != Some(u64::from(status)) {
        return Err(fail(format!(
            "{status} whose problem says {}",
            body["status"]
        )));
    }
    Ok(())
}

/// Runs `cases` random inputs of `strategy` through `check`, and panics with the
/// smallest failing input proptest shrinks to.
pub fn run_cases<S: Strategy>(
    cases: u32,
    strategy: &S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    if let Err(error) = runner.run(strategy, check) {
        panic!("{error}");
    }
}

//! What the query API answers when it cannot answer with figures: every error is a
//! problem document without internals (API.md §3, §4, §7).

use std::time::{Duration, Instant};

use contract::settings::Settings;
use query::http::devices::{LIST_LIMIT_MAX, SELECTED_METRICS_MAX};
use testkit::process::{failed_run, free_port, the_only_line};
use testkit::{eventually, RedisUser, TestEnv};

use crate::support::{
    apply_reading, assert_problem, ensure_streams, one_projected_reading, spawn_projector, Ingest,
    Query, DEADLINE,
};

#[tokio::test]
async fn unknown_devices_malformed_requests_and_unknown_routes_are_problems() {
    let env = TestEnv::new();
    ensure_streams(&env).await;
    let projector = spawn_projector(&env.settings);
    let query = Query::spawn(&env.settings).await;

    // Once the (empty) read model exists, an unknown device is 404.
    let response = eventually(DEADLINE, "the read model to exist", || async {
        let response = query.get("/v1/devices/never-seen/stats").await;
        (response.status().as_u16() != 503).then_some(response)
    })
    .await;
    assert_problem(response, 404, "not-found").await;
    let longest_valid = "d".repeat(64);
    assert_problem(
        query
            .get(&format!("/v1/devices/{longest_valid}/stats"))
            .await,
        404,
        "not-found",
    )
    .await;

    // As many metrics as a selection may name: not a malformed request.
    let names = |count: usize| -> String {
        (0..count)
            .map(|index| format!("m{index}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_problem(
        query
            .get(&format!(
                "/v1/devices/never-seen/stats?metrics={}",
                names(SELECTED_METRICS_MAX)
            ))
            .await,
        404,
        "not-found",
    )
    .await;

    let too_long = "d".repeat(65);
    for path in [
        format!(
            "/v1/devices/sensor-1/stats?metrics={}",
            names(SELECTED_METRICS_MAX + 1)
        ),
        "/v1/devices/bad%20id/stats".to_owned(),
        format!("/v1/devices/{too_long}/stats"),
        "/v1/devices/a.b/stats".to_owned(),
        "/v1/devices/caf%C3%A9/stats".to_owned(),
        "/v1/devices/sensor-1/stats?metrics=Temperature".to_owned(),
        "/v1/devices/sensor-1/stats?metrics=temperature,2nd".to_owned(),
        "/v1/devices/sensor-1/stats?metrics=a.b".to_owned(),
        "/v1/devices/sensor-1/stats?metrics=".to_owned(),
        "/v1/devices/sensor-1/stats?metrics=,".to_owned(),
    ] {
        let problem = assert_problem(query.get(&path).await, 400, "invalid-request").await;
        assert!(
            problem["errors"][0]["field"].is_string(),
            "{path}: the problem names the field: {problem}"
        );
    }

    // The devices list's `limit`: 1 to LIST_LIMIT_MAX, a whole number.
    let most = format!("/v1/devices?limit={LIST_LIMIT_MAX}");
    let response = query.get(&most).await;
    assert_eq!(response.status().as_u16(), 200, "{most}");
    let page: serde_json::Value = response.json().await.expect("json");
    assert_eq!(page["devices"], serde_json::json!([]), "{page}");
    for limit in [
        "0".to_owned(),
        (LIST_LIMIT_MAX + 1).to_string(),
        "-1".to_owned(),
        "abc".to_owned(),
        "1.5".to_owned(),
        String::new(),
    ] {
        let path = format!("/v1/devices?limit={limit}");
        let problem = assert_problem(query.get(&path).await, 400, "invalid-request").await;
        assert_eq!(problem["errors"][0]["field"], "limit", "{path}: {problem}");
    }

    for path in [
        "/v1/nothing",
        "/v1/devices/sensor-1",
        "/v1/devices/sensor-1/stats/more",
    ] {
        assert_problem(query.get(path).await, 404, "not-found").await;
    }

    for path in ["/healthz", "/readyz"] {
        assert_eq!(query.get(path).await.status().as_u16(), 200, "{path}");
    }
    query.stop().await;
    projector.stop().await;
}

#[tokio::test]
async fn requests_axum_rejects_before_a_handler_runs_are_problems_too() {
    let env = TestEnv::new();
    ensure_streams(&env).await;
    let projector = spawn_projector(&env.settings);
    let query = Query::spawn(&env.settings).await;
    eventually(DEADLINE, "the read model to exist", || async {
        let response = query.get("/v1/devices/never-seen/stats").await;
        (response.status().as_u16() == 404).then_some(())
    })
    .await;

    // A path segment that is not UTF-8, and a query string that does not deserialize.
    assert_problem(
        query.get("/v1/devices/%FF/stats").await,
        400,
        "invalid-request",
    )
    .await;
    assert_problem(
        query
            .get("/v1/devices/sensor-1/stats?metrics=a&metrics=b")
            .await,
        400,
        "invalid-request",
    )
    .await;
    // A parameter the route does not have, refused naming it rather than ignored.
    for (path, named) in [
        ("/v1/devices/sensor-1/stats?metric=temperature", "`metric`"),
        ("/v1/devices?limt=5", "`limt`"),
        (
            "/v1/devices/sensor-1/series?metric=t&metrics=t",
            "`metrics`",
        ),
        ("/v1/devices/sensor-1/series?metric=t&metric=u", "`metric`"),
    ] {
        let problem = assert_problem(query.get(path).await, 400, "invalid-request").await;
        let message = problem["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{path}: {problem}");
    }
    // A method the route does not have.
    let response = query
        .http
        .post(format!("{}/v1/devices/sensor-1/stats", query.base_url))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response.headers().get(reqwest::header::ALLOW),
        Some(&reqwest::header::HeaderValue::from_static("GET,HEAD")),
        "405 names the methods the route takes"
    );
    assert_eq!(
        testkit::content_type(&response),
        "application/problem+json",
        "405 is a problem document"
    );
    query.stop().await;
    projector.stop().await;
}

#[tokio::test]
async fn with_redis_unreachable_readiness_and_stats_are_503_with_retry_after() {
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    settings.redis.url = "redis://127.0.0.1:1".to_owned();
    let query = Query::spawn(&settings).await;

    assert_eq!(query.get("/healthz").await.status().as_u16(), 200, "alive");
    for path in ["/readyz", "/v1/devices/sensor-1/stats", "/v1/devices"] {
        let started = Instant::now();
        let response = query.get(path).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} answers promptly while Redis is down"
        );
        let retry_after =
            testkit::header(&response, "retry-after").and_then(|value| value.parse::<u64>().ok());
        assert!(retry_after.is_some(), "{path}: Retry-After in seconds");
        assert_problem(response, 503, "unavailable").await;
    }
    // Malformed requests are still told apart from an outage.
    assert_problem(
        query.get("/v1/devices/bad%20id/stats").await,
        400,
        "invalid-request",
    )
    .await;
    query.stop().await;
}

/// `/readyz` names what does not answer, as every other process's does (API.md §7):
/// Redis, and PostgreSQL too while authentication is on, since read tokens live there.
#[tokio::test]
async fn readiness_names_each_dependency_that_does_not_answer() {
    let env = TestEnv::new();
    // Ingest creates the database and its tokens table.
    let mut with_auth = env.settings.clone();
    with_auth.auth.enabled = true;
    let ingest = Ingest::spawn(&with_auth).await;
    let mut no_postgres = with_auth.clone();
    no_postgres.database.url = "postgres://postgres@127.0.0.1:1/telemetry".to_owned();
    let mut no_redis = env.settings.clone();
    no_redis.redis.url = "redis://127.0.0.1:1".to_owned();
    let mut neither = no_postgres.clone();
    neither.redis.url = no_redis.redis.url.clone();
    // Each set-up with the checks of its 200, or what its 503 names.
    let cases: [(&Settings, Result<serde_json::Value, &str>); 5] = [
        (&env.settings, Ok(serde_json::json!({"redis": "ok"}))),
        (
            &with_auth,
            Ok(serde_json::json!({"redis": "ok", "postgres": "ok"})),
        ),
        (&no_postgres, Err("postgres")),
        (&no_redis, Err("redis")),
        (&neither, Err("redis, postgres")),
    ];
    for (settings, expected) in cases {
        let query = Query::spawn(settings).await;
        let down = expected.as_ref().err().copied();
        let readiness = testkit::settled_readiness(&query.base_url, down).await;
        if let Ok(checks) = expected {
            assert_eq!(
                readiness,
                serde_json::json!({"status": "ready", "checks": checks})
            );
        }
        query.stop().await;
    }
    ingest.stop().await;
}

/// With `auth.service_credentials_required` every server URL carries a secret: a start
/// refused over the Redis URL names the server but never its password.
#[test]
fn a_start_refused_over_the_redis_url_names_it_but_not_its_password() {
    let env = TestEnv::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let stderr = failed_run(
        env!("CARGO_BIN_EXE_query"),
        &[],
        &env,
        &[
            ("PIPELINE__QUERY__LISTEN", &listen),
            (
                "PIPELINE__REDIS__URL",
                "redis://:s3cret-pw@127.0.0.1:notaport",
            ),
        ],
    );
    let line = the_only_line(&stderr);
    assert!(line.starts_with("query: "), "{line}");
    assert!(
        line.contains("redis.url (PIPELINE__REDIS__URL) redis://:***@127.0.0.1:notaport"),
        "{line}"
    );
    assert!(!line.contains("s3cret-pw"), "shows the secret: {line}");
}

/// A Redis user whose ACL leaves out `CLIENT` (the read-only user the README gives
/// query, which never writes, without `+client|tracking`) refuses every read that turns
/// tracking on. Tracking only saves round trips, so query reads without it: the figures
/// are answered, and stay current, where every `/stats` and `/series` was a `500` until
/// 2026-12-07.
#[tokio::test]
async fn a_redis_user_that_may_not_turn_tracking_on_still_reads_the_figures() {
    let env = TestEnv::new();
    one_projected_reading(&env, "sensor-1").await;
    let user = RedisUser::create(
        &env,
        &[
            "-@all",
            "+@read",
            "+multi",
            "+exec",
            "+ping",
            "+time",
            "+evalsha",
            "+script|load",
        ],
    )
    .await;
    let mut settings = env.settings.clone();
    settings.redis.url = user.url();
    let query = Query::spawn(&settings).await;
    let (status, stats) = query.stats("sensor-1", "").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["sample_count"], 1, "{stats}");
    // Nothing is kept that Redis would not say changed: the next reading shows.
    apply_reading(&env, "sensor-1", 30.0, 2).await;
    let (status, stats) = query.stats("sensor-1", "").await;
    assert_eq!(
        (status, &stats["sample_count"]),
        (200, &2.into()),
        "{stats}"
    );
    // The device's series and the devices list answer as well.
    for path in [
        "/v1/devices/sensor-1/series?metric=temperature",
        "/v1/devices?limit=10",
    ] {
        let response = query.get(path).await;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("sensor-1"), "{path}: {body}");
    }
    query.stop().await;
}

/// A read Redis refuses for good (here the query's Redis user may not run `HMGET`, an
/// ACL left short; then a device hash of another type) is a `500` to fix, logged as an
/// error: a retry cannot help. It was a `503` "retry shortly" for as long as it
/// lasted, while `/readyz` said 200 (Redis answers its `PING`). Redis away stays a
/// `503`.
#[tokio::test]
async fn a_read_redis_refuses_for_good_is_an_internal_error_not_a_retry() {
    let env = TestEnv::new();
    ensure_streams(&env).await;
    let projector = spawn_projector(&env.settings);
    eventually(DEADLINE, "the read model to exist", || env.generation()).await;
    let user = RedisUser::create(&env, &["-hmget"]).await;
    let mut settings = env.settings.clone();
    settings.redis.url = user.url();
    let query = Query::spawn(&settings).await;
    assert_stats_problem(&query, "sensor-1", 500, "internal").await;
    assert_eq!(query.get("/readyz").await.status().as_u16(), 200);
    query.stop().await;

    // A device's hash of another type: Redis fails that command inside the read's
    // transaction.
    let generation = env.generation().await.expect("a live generation");
    let stats =
        contract::read_model::DeviceKeys::new(&env.settings.redis.prefix, generation, "sensor-2")
            .stats;
    env.overwrite_with_a_string(&stats).await;
    let query = Query::spawn(&env.settings).await;
    assert_stats_problem(&query, "sensor-2", 500, "internal").await;
    query.stop().await;

    settings.redis.url = "redis://127.0.0.1:1".to_owned();
    let away = Query::spawn(&settings).await;
    assert_stats_problem(&away, "sensor-1", 503, "unavailable").await;
    away.stop().await;
    projector.stop().await;
}

/// A login Redis refused for a while (the query's ACL user disabled, a password changed
/// and changed back) is a `503` while it lasts, and query answers again once Redis takes
/// it. redis-rs's connection manager never tried again after a refused login: query
/// answered `503` until restarted.
#[tokio::test]
async fn a_redis_login_refused_for_a_while_is_a_503_while_it_lasts() {
    let env = TestEnv::new();
    ensure_streams(&env).await;
    let projector = spawn_projector(&env.settings);
    eventually(DEADLINE, "the read model to exist", || env.generation()).await;
    let user = RedisUser::create(&env, &[]).await;
    let mut settings = env.settings.clone();
    settings.redis.url = user.url();
    let query = Query::spawn(&settings).await;
    assert_stats_problem(&query, "sensor-1", 404, "not-found").await;

    user.disable().await;
    assert_stats_problem(&query, "sensor-1", 503, "unavailable").await;
    user.enable().await;
    eventually(DEADLINE, "query to read Redis again", || async {
        let answer = query.get("/v1/devices/sensor-1/stats").await;
        (answer.status().as_u16() == 404).then_some(())
    })
    .await;
    query.stop().await;
    projector.stop().await;
}

/// Asserts that `query` answers `device`'s `/stats` with the problem `status`, `kind`,
/// with `Retry-After` when it is a `503` and without when a retry cannot help.
async fn assert_stats_problem(query: &Query, device: &str, status: u16, kind: &str) {
    let answer = query.get(&format!("/v1/devices/{device}/stats")).await;
    assert_eq!(
        testkit::header(&answer, "retry-after").is_some(),
        status == 503,
        "Retry-After on a {status}"
    );
    assert_problem(answer, status, kind).await;
}

//! Read tokens for the query API (API.md §5): only a read token reads, on every route.

use ingest::auth::{issue, revoke, Kind};
use testkit::{eventually, TestEnv};

use crate::support::{
    assert_problem, ensure_streams, http_client, spawn_projector, Ingest, Query, DEADLINE,
};

#[tokio::test]
async fn only_a_valid_read_token_may_use_the_query_api() {
    let mut env = TestEnv::new();
    env.settings.auth.enabled = true;
    env.settings.auth.cache_ttl_secs = 0;
    // Ingest creates the database and the tokens table.
    let ingest = Ingest::spawn(&env.settings).await;
    let query = Query::spawn(&env.settings).await;
    ensure_streams(&env).await;
    let projector = spawn_projector(&env.settings);
    let pool = ingest::db::pool(&env.settings.database).expect("pool");
    let (_, read_token) = issue(&pool, Kind::Read, None, "dashboard")
        .await
        .expect("issued");
    let (_, device_token) = issue(&pool, Kind::Device, Some("sensor-1"), "")
        .await
        .expect("issued");
    let (_, gateway_token) = issue(&pool, Kind::Gateway, None, "").await.expect("issued");
    let (revoked_id, revoked_token) = issue(&pool, Kind::Read, None, "").await.expect("issued");
    assert!(revoke(&pool, revoked_id).await.expect("revoked"));

    let http = http_client();
    // Every route of the API, each with what a read token gets once the read model
    // exists: sensor-1 is unknown, the devices list answers.
    let routes = [
        ("/v1/devices/sensor-1/stats", 404),
        ("/v1/devices", 200),
        ("/v1/devices?limit=5", 200),
        ("/v1/devices/sensor-1/series?metric=temperature", 404),
        (
            "/v1/devices/sensor-1/series?metric=temperature&resolution=5m",
            404,
        ),
    ];
    for (path, with_read_token) in routes {
        let get = |authorization: Option<String>| {
            let mut request = http.get(format!("{}{path}", query.base_url));
            if let Some(authorization) = authorization {
                request = request.header("authorization", authorization);
            }
            request.send()
        };
        let missing = get(None).await.expect("sent");
        assert_eq!(
            testkit::header(&missing, "www-authenticate"),
            Some("Bearer"),
            "{path}"
        );
        assert_problem(missing, 401, "unauthorized").await;
        for refused in [
            format!("Bearer {revoked_token}"),
            "Bearer nonsense".to_owned(),
            format!("Basic {read_token}"),
            read_token.clone(),
        ] {
            assert_problem(get(Some(refused)).await.expect("sent"), 401, "unauthorized").await;
        }
        for ingest_token in [&device_token, &gateway_token] {
            assert_problem(
                get(Some(format!("Bearer {ingest_token}")))
                    .await
                    .expect("sent"),
                403,
                "forbidden",
            )
            .await;
        }
        // A read token gets through to the handler.
        let read_token = &read_token;
        let get = &get;
        eventually(
            DEADLINE,
            &format!("{path}: {with_read_token} with the read token"),
            || async move {
                let response = get(Some(format!("Bearer {read_token}"))).await.ok()?;
                (response.status().as_u16() == with_read_token).then_some(())
            },
        )
        .await;
    }
    // Two `Authorization` headers are refused, whichever comes first.
    for (first, second) in [
        (format!("Bearer {read_token}"), "Bearer nonsense".to_owned()),
        ("Bearer nonsense".to_owned(), format!("Bearer {read_token}")),
    ] {
        let response = http
            .get(format!("{}/v1/devices", query.base_url))
            .header("authorization", first)
            .header("authorization", second)
            .send()
            .await
            .expect("sent");
        assert_problem(response, 401, "unauthorized").await;
    }
    // Health endpoints stay open for probes.
    let health = http
        .get(format!("{}/healthz", query.base_url))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status().as_u16(), 200);
    query.stop().await;
    projector.stop().await;
    ingest.stop().await;
}

//! Read tokens for the query API (API.md §5): only a read token reads.

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
    let get = |authorization: Option<String>| {
        let mut request = http.get(format!("{}/v1/devices/sensor-1/stats", query.base_url));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        request.send()
    };
    let missing = get(None).await.expect("sent");
    assert_eq!(
        missing
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok()),
        Some("Bearer")
    );
    assert_problem(missing, 401, "unauthorized").await;
    assert_problem(
        get(Some(format!("Bearer {revoked_token}")))
            .await
            .expect("sent"),
        401,
        "unauthorized",
    )
    .await;
    assert_problem(
        get(Some("Bearer nonsense".to_owned())).await.expect("sent"),
        401,
        "unauthorized",
    )
    .await;
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
    // A read token gets through to the handler: this unknown device is a 404 once the
    // projector has created the read model.
    let read_token = &read_token;
    let get = &get;
    eventually(DEADLINE, "a 404 with the read token", || async move {
        let response = get(Some(format!("Bearer {read_token}"))).await.ok()?;
        (response.status().as_u16() == 404).then_some(())
    })
    .await;
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

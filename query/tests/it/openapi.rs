//! The OpenAPI document matches the routes: every documented path and method reaches a
//! handler on the service that owns it, and both services serve the document.

use serde_json::Value;
use testkit::TestEnv;

use crate::support::{ensure_streams, http_client, spawn_projector, Ingest, Query};

#[tokio::test]
async fn every_documented_operation_is_routed_and_the_document_is_served() {
    let env = TestEnv::new();
    let ingest = Ingest::spawn(&env.settings).await;
    let query = Query::spawn(&env.settings).await;
    ensure_streams(&env).await;
    let projector = spawn_projector(&env.settings);
    let http = http_client();
    let document: Value = serde_json::from_str(contract::OPENAPI).expect("the document is JSON");
    assert_eq!(document["openapi"], "3.1.0");
    for base in [&ingest.base_url, &query.base_url] {
        let served: Value = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        assert_eq!(served, document, "{base} serves the document");
    }
    let paths = document["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().expect("operations") {
            let tags: Vec<&str> = operation["tags"]
                .as_array()
                .expect("tags")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let bases: Vec<&String> = match tags.as_slice() {
                ["ingest"] => vec![&ingest.base_url],
                ["query"] => vec![&query.base_url],
                _ => vec![&ingest.base_url, &query.base_url],
            };
            for base in bases {
                let url = format!("{base}{}", path.replace("{device_id}", "sensor-1"));
                let request = match method.as_str() {
                    "get" => http.get(&url),
                    "post" => http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body("{}"),
                    other => panic!("undocumented method {other}"),
                };
                let response = request.send().await.expect("sent");
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                assert_ne!(status, 405, "{method} {url} is routed");
                assert!(
                    !body.contains("no such resource"),
                    "{method} {url} is routed: {status} {body}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 11, "checked {checked} operations");
    // And nothing routed is undocumented: the public routes of both routers.
    for route in [
        "/v1/telemetry",
        "/v1/telemetry/batch",
        "/v1/devices",
        "/v1/devices/{device_id}/stats",
        "/v1/devices/{device_id}/series",
    ] {
        assert!(paths.contains_key(route), "{route} is documented");
    }
    query.stop().await;
    projector.stop().await;
    ingest.stop().await;
}

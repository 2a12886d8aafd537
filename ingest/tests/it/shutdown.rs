//! SIGTERM under load: ingest stops taking connections, answers what it accepted,
//! commits what it answered, and exits 0. Before PostgreSQL ever answered it is alive,
//! not ready, refuses readings, and stops at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::process::{free_port, service_command, KilledOnDrop};
use testkit::{assert_problem, eventually, TestEnv};

use crate::support::{column, reading, Ingest};

#[tokio::test]
async fn sigterm_under_load_loses_no_accepted_reading_and_exits_zero() {
    let env = TestEnv::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = KilledOnDrop::new(
        service_command(
            env!("CARGO_BIN_EXE_ingest"),
            &env,
            &[("PIPELINE__INGEST__LISTEN", &listen)],
        )
        .spawn()
        .expect("ingest starts"),
    );
    let base_url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    eventually(Duration::from_secs(20), "ingest ready", || async {
        let response = http.get(format!("{base_url}/readyz")).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;

    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    // Requests that ended in a transport error other than a refused connection: a
    // reading in flight that was neither finished nor handed back (API.md §7).
    let broken = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for client in 0..16 {
        let http = http.clone();
        let base_url = base_url.clone();
        let accepted = accepted.clone();
        let broken = broken.clone();
        clients.push(tokio::spawn(async move {
            for sequence in 0..2_000 {
                let key = format!("c{client}-{sequence}");
                let sent = http
                    .post(format!("{base_url}/v1/telemetry"))
                    .header("content-type", "application/json")
                    .header("idempotency-key", &key)
                    .body(reading(&format!("dev-{client}"), sequence as f64).to_string())
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().as_u16() == 202 => {
                        if let Ok(mut accepted) = accepted.lock() {
                            accepted.insert(key);
                        }
                    }
                    Ok(response) => assert!(
                        response.status().as_u16() == 503,
                        "only 202, or 503 while draining: {}",
                        response.status()
                    ),
                    // The listener is gone: the request never reached ingest.
                    Err(error) if error.is_connect() => return,
                    Err(error) => {
                        if let Ok(mut broken) = broken.lock() {
                            broken.push((key, format!("{error:?}")));
                        }
                        return;
                    }
                }
            }
        }));
    }
    eventually(Duration::from_secs(20), "load under way", || async {
        (accepted.lock().ok()?.len() > 300).then_some(())
    })
    .await;
    testkit::process::signal(child.id(), "-TERM");
    for client in clients {
        client.await.expect("client task");
    }
    let status = tokio::task::spawn_blocking(move || {
        child.wait_within(Duration::from_secs(20), "ingest after SIGTERM")
    })
    .await
    .expect("waited");
    assert_eq!(status.code(), Some(0), "ingest exits 0 after SIGTERM");

    let accepted = accepted.lock().expect("accepted keys").clone();
    let db = env.postgres().await;
    let stored: BTreeSet<String> =
        column(&db, "SELECT idempotency_key FROM idempotency_keys").await;
    let missing: Vec<&String> = accepted.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "every 202 is stored: {} missing",
        missing.len()
    );
    let row = db
        .query_one("SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM outbox), (SELECT count(*) FROM idempotency_keys)", &[])
        .await
        .expect("counts");
    let (readings, outbox, keys): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (readings, outbox),
        (keys, keys),
        "one reading and one event per key"
    );
    assert!(readings as usize >= accepted.len());

    // Each cut-off request with whether its reading was stored (a client cannot tell).
    let broken: Vec<String> = broken
        .lock()
        .expect("broken requests")
        .iter()
        .map(|(key, error)| format!("{key} (stored: {}): {error}", stored.contains(key)))
        .collect();
    assert!(
        broken.is_empty(),
        "after SIGTERM a request is answered (202 or 503) or its connection refused, \
         never cut off (API.md §7): {broken:#?}"
    );
}

/// Before PostgreSQL ever answered (its migrations still retrying), ingest is alive
/// (`/healthz` 200), not ready (`/readyz` a 503 naming postgres), refuses readings with
/// a 503 and `Retry-After`, and a stop is clean (so `main` exits 0) and prompt.
#[tokio::test]
async fn before_postgres_ever_answered_ingest_is_alive_not_ready_and_refuses_readings() {
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    settings.database.url = "postgres://postgres@127.0.0.1:1/telemetry".to_owned();
    let ingest = Ingest::start(&settings);

    let healthz = ingest.get("/healthz").await;
    assert_eq!(healthz.status(), 200);
    testkit::settled_readiness(&ingest.base_url, Some("postgres")).await;
    let single = ingest.post("k-1", &reading("sensor-1", 1.0)).await;
    assert!(single.headers().contains_key("retry-after"));
    assert_problem(single, 503, "unavailable").await;
    let batch = ingest
        .post_batch(&serde_json::json!({"readings": [
            {"idempotency_key": "k-2", "device_id": "sensor-1", "metrics": {"t": 1}}
        ]}))
        .await;
    assert!(batch.headers().contains_key("retry-after"));
    assert_problem(batch, 503, "unavailable").await;

    ingest
        .stop_within(Duration::from_secs(3), "ingest before PostgreSQL answered")
        .await;
}

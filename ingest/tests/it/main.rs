//! Integration tests of the ingest service and the relay, against the real PostgreSQL
//! and NATS; each test has its own database and stream (see `testkit`).

mod auth;
mod batch;
mod fuzz;
mod graceful_stop;
mod group_commit;
mod listen;
mod metrics;
mod open_connections;
mod outbox_notify;
mod raw_http;
mod relay;
mod relay_stream_loss;
mod schema;
mod settings;
mod shutdown;
mod support;
mod telemetry_api;

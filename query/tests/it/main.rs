//! Integration tests of the query API against the real Redis, and of the whole pipeline
//! (ingest, relay, projector, query in this process) against the real PostgreSQL, NATS
//! and Redis; each test has its own database, stream and key prefix (see `testkit`).

mod auth;
mod deadline;
mod devices_list;
mod end_to_end;
mod errors;
mod fuzz;
mod metrics;
mod one_instant;
mod openapi;
mod read_model;
mod series;
mod settings;
mod support;

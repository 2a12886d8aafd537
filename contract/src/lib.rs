//! What the pipeline's services agree on, written down once.
//!
//! `ingest`, `relay`, `projector` and `query` are separate processes; everything that
//! two of them must agree on lives here, so that a change to the contract is one change.
//! The crate does no network I/O and has no async runtime: plain types and functions.
//! Its only contact with the outside world is [`settings::Settings::load`], which reads
//! the configuration files at start-up.
//!
//! # Layout
//! - [`reading`]: the body of `POST /v1/telemetry`, its validation rules and fingerprint.
//! - [`event`]: the versioned `telemetry.recorded` event published on JetStream.
//! - [`subjects`]: stream and subject names derived from the configured stream.
//! - [`read_model`]: the Redis key layout and hash fields the projector writes and the
//!   query service reads.
//! - [`reference`](mod@reference): the reference model (a fold over readings) tests compare against.
//! - [`problem`]: RFC 9457 problem documents every HTTP error is rendered as.
//! - [`timestamp`]: the one RFC 3339 format used in responses and events.
//! - [`settings`]: the layered configuration of every process.
//! - [`OPENAPI`]: the OpenAPI document of both HTTP APIs (`openapi/openapi.json`).

/// The OpenAPI 3.1 document of the ingest and query APIs, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi/openapi.json");

pub mod event;
pub mod problem;
pub mod read_model;
pub mod reading;
pub mod reference;
pub mod settings;
pub mod subjects;
pub mod timestamp;

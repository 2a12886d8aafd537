//! `POST /v1/telemetry` (API.md §1).

use std::future::Future;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use contract::reading::{check_idempotency_key, from_json_object, Invalid, Reading, ReadingBody};
use futures::StreamExt;
use time::OffsetDateTime;

use super::error::ApiError;
use super::{AppState, ReadingOutcome};
use crate::auth::Grant;
use crate::limits::{retry_after_secs, Admitted, BodyBudget, HeldBytes};
use crate::store::{NewReading, Outcome, StoreError};

/// Tells a client that it got the stored answer of an earlier request.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /v1/telemetry`, authentication included within the request deadline.
pub async fn post_telemetry(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let answer = accept(&state, &headers, body).await;
    if answer.as_ref().is_err_and(ApiError::rejects_reading) {
        ReadingOutcome::Rejected.count(1);
    }
    answer
}

async fn accept(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let outcome = within_deadline(state, async {
        let grant = state.authenticate(headers).await?;
        require_json(headers)?;
        may_post_some(grant.as_ref())?;
        let idempotency_key = idempotency_key(headers)?;
        let (bytes, held) =
            read_body(body, headers, state.max_body_bytes, &state.body_budget).await?;
        let body: ReadingBody = from_json_object(&bytes).map_err(ApiError::InvalidJson)?;
        drop(bytes);
        let received_at = OffsetDateTime::now_utc();
        let reading = match check(state, grant.as_ref(), body, received_at)? {
            Checked::Valid(reading) => reading,
            Checked::Aged(reading, invalid) => {
                return replay_of_aged(state, reading, invalid, &idempotency_key).await
            }
            Checked::Invalid(invalid) => return Err(ApiError::InvalidReading(invalid)),
        };
        let admitted = admit(state, &reading.device_id)?;
        // From here the commit queue's room bounds what waits (`limits::BodyBudget`).
        drop(held);
        let outcome = state
            .store
            .submit(NewReading::new(reading, idempotency_key, received_at))
            .await
            .map_err(store_error)?;
        settle(admitted, &outcome);
        Ok(outcome)
    })
    .await?;
    Ok(answer(outcome))
}

/// A reading's body checked in API.md's order, for both endpoints: the token may post
/// its device ([`may_post`], a `403`), then the reading's rules.
pub(super) enum Checked {
    /// Breaks no rule.
    Valid(Reading),
    /// Invalid only for its age: the reading it was while young, and the rule broken.
    Aged(Reading, Invalid),
    /// Breaks other rules: the `422`.
    Invalid(Invalid),
}

/// Checks `body` ([`Checked`]) as received at `received_at`.
pub(super) fn check(
    state: &AppState,
    grant: Option<&Grant>,
    body: ReadingBody,
    received_at: OffsetDateTime,
) -> Result<Checked, ApiError> {
    may_post(grant, &body.device_id)?;
    Ok(match body.validate(received_at, state.time_bounds) {
        Ok(reading) => Checked::Valid(reading),
        Err(mut invalid) => match invalid.aged.take() {
            Some(reading) => Checked::Aged(reading, invalid),
            None => Checked::Invalid(invalid),
        },
    })
}

/// The answer to a reading invalid only for its age (`invalid`): the `422`, unless it is
/// the retry of a reading stored under this device and key while it was young (its
/// `202` lost on the way, say); that retry gets the stored answer as any replay does.
/// The look-up is a read of the database, so it takes a share of the device's rate
/// limit first, whatever it finds (a `503` gives it back): until 2026-12-07 only a
/// replay found did, and a device sending old readings under new keys had every one
/// looked up, without limit, on the pool the token checks share.
async fn replay_of_aged(
    state: &AppState,
    reading: Reading,
    invalid: Invalid,
    idempotency_key: &str,
) -> Result<Outcome, ApiError> {
    let admitted = admit(state, &reading.device_id)?;
    let replays = state
        .store
        .replays_of_aged(&[(&reading, idempotency_key)])
        .await
        .map_err(store_error)?;
    admitted.spend();
    replays
        .into_iter()
        .flatten()
        .next()
        .ok_or(ApiError::InvalidReading(invalid))
}

/// Whether a reading of `device_id`, which the token may post ([`may_post`]), may be
/// posted now: the device is within its rate limit (`429` otherwise). The batch asks
/// the same of each item. The share of the limit taken goes back unless it is spent
/// once the request has its answer: a `503` costs the device nothing.
pub(super) fn admit<'a>(state: &'a AppState, device_id: &str) -> Result<Admitted<'a>, ApiError> {
    state
        .limiter
        .admit(device_id)
        .map_err(|wait| ApiError::RateLimited(retry_after_secs(wait)))
}

/// Spends the share of the rate limit of an attempt that got its answer (stored,
/// replayed, refused as a reused key). One whose key was in flux stored nothing and is
/// told to retry, as a `503` is, so its share goes back.
pub(super) fn settle(share: Admitted<'_>, outcome: &Outcome) {
    if !matches!(outcome, Outcome::KeyInFlux) {
        share.spend();
    }
}

/// A token that may post no device (a read token) gets its `403` before its body is
/// read, on both endpoints: the batch's answer is not a `200` with every item
/// forbidden, and until 2026-12-07 a single POST read and checked the body first (a
/// malformed one was a `400` or `422`, and a stalled one held its share of the body
/// budget).
pub(super) fn may_post_some(grant: Option<&Grant>) -> Result<(), ApiError> {
    if grant.is_some_and(|grant| !grant.may_ingest_any()) {
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

/// Whether the request's token (if authentication is on) allows posting readings of
/// `device_id`: a `403` otherwise, as soon as the `device_id` is read, before the
/// reading's rules are checked (API.md §5: a device token "may post only that device's
/// readings: otherwise `403`"). Until 2026-12-07 the rules came first, so a device
/// token's broken reading of another device got the `422` listing them (a batch item
/// `rejected` as `invalid-reading`), and one only too old a `422` as well.
fn may_post(grant: Option<&Grant>, device_id: &str) -> Result<(), ApiError> {
    if grant.is_none_or(|grant| grant.may_ingest(device_id)) {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

/// Runs a request's `work` within `ingest.request_timeout_ms`, from its first step (the
/// token look-up) to its commit: past the deadline the client gets a `503 unavailable`
/// with `Retry-After` instead of waiting on, and may retry with the same key(s). Both
/// `POST /v1/telemetry` and the batch are answered through this one deadline.
pub async fn within_deadline<T>(
    state: &AppState,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(state.request_timeout, work)
        .await
        .unwrap_or_else(|_elapsed| {
            Err(ApiError::Unavailable(
                "the request took too long; retrying it with the same idempotency key(s) is safe",
            ))
        })
}

/// A write that did not happen (or, a connection lost as its commit went through, one
/// whose outcome is unknown): the client should retry with the same key(s), which gets
/// the stored answer if there is one.
pub fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::Overloaded => {
            ApiError::Unavailable("too many readings waiting for a commit; retry shortly")
        }
        StoreError::Unavailable(_) => {
            ApiError::Unavailable("the database is unavailable; retry shortly")
        }
    }
}

fn answer(outcome: Outcome) -> Response {
    let json = HeaderValue::from_static("application/json");
    match outcome {
        Outcome::Accepted { body } => {
            ReadingOutcome::Accepted.count(1);
            (StatusCode::ACCEPTED, [(header::CONTENT_TYPE, json)], body).into_response()
        }
        Outcome::Replayed { status, body, .. } => {
            ReadingOutcome::Replayed.count(1);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            let replayed = (
                IDEMPOTENT_REPLAYED.clone(),
                HeaderValue::from_static("true"),
            );
            (status, [(header::CONTENT_TYPE, json), replayed], body).into_response()
        }
        Outcome::KeyReused => {
            ReadingOutcome::Conflict.count(1);
            ApiError::IdempotencyKeyReused.into_response()
        }
        Outcome::KeyInFlux => {
            ReadingOutcome::Rejected.count(1);
            ApiError::IdempotencyKeyInUse.into_response()
        }
    }
}

/// One `Content-Type`, `application/json`, with or without parameters such as
/// `charset=utf-8`, and not compressed: ingest decodes no content coding, and one it
/// read as JSON regardless would be a body the device did not mean (RFC 9110 §8.4:
/// `identity` alone is none). The same holds for a transfer coding: hyper takes off
/// `chunked` and hands on what is under it (`Transfer-Encoding: gzip, chunked` was read
/// as plain JSON until 2026-12-07).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    // Two `Content-Type`s (RFC 9110 §8.3 allows one) name no one type to read it as.
    let essence = match (types.next(), types.next()) {
        (Some(value), None) => value
            .to_str()
            .ok()
            .and_then(|value| value.split(';').next())
            .map(|essence| essence.trim().to_ascii_lowercase()),
        _ => None,
    };
    if essence.as_deref() != Some("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    // The one coding each header may name, and whether more than once: `chunked` twice
    // (RFC 9112 §7: never applied twice) would leave hyper's one pass of it the other's
    // framing to hand on as the body.
    for (name, header, plain, repeatable) in [
        (
            "Content-Encoding",
            header::CONTENT_ENCODING,
            "identity",
            true,
        ),
        (
            "Transfer-Encoding",
            header::TRANSFER_ENCODING,
            "chunked",
            false,
        ),
    ] {
        let mut plain_seen = false;
        for value in headers.get_all(header) {
            let text = String::from_utf8_lossy(value.as_bytes());
            for coding in text.split(',').map(str::trim) {
                if coding.is_empty() {
                    continue;
                }
                let once_more = plain_seen && !repeatable;
                if !coding.eq_ignore_ascii_case(plain) || once_more {
                    return Err(ApiError::UnsupportedCoding {
                        header: name,
                        coding: coding.chars().take(32).collect(),
                    });
                }
                plain_seen = true;
            }
        }
    }
    Ok(())
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::MissingIdempotencyKey(
            "must be sent exactly once".to_owned(),
        ));
    };
    check_idempotency_key(value.as_bytes()).map_err(ApiError::MissingIdempotencyKey)?;
    // Checked above: visible ASCII only, so this is valid UTF-8.
    Ok(String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// Reads at most `limit` bytes; a declared or actual larger body is a 413. Its buffer
/// is held in `budget` as it grows, until the share returned is dropped: a body the
/// budget has no room for, or declares a length it has no room for now, is a 503
/// (`limits::BodyBudget`).
pub async fn read_body<'a>(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    budget: &'a BodyBudget,
) -> Result<(Bytes, HeldBytes<'a>), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    // Not set aside: a client that declares a length and sends nothing holds nothing.
    // It only spares a client the upload of a body that would not fit.
    if declared.is_some_and(|length| length > budget.available() as u64) {
        return Err(body_budget_spent());
    }
    // hyper refuses a body longer than its declared length.
    let most = declared.map_or(limit, |length| limit.min(length as usize));
    let mut chunks = body.into_data_stream();
    let mut collected: Vec<u8> = Vec::new();
    let mut held = budget.share();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|_| ApiError::InvalidJson("the request body could not be read".to_owned()))?;
        let needed = collected.len() + chunk.len();
        if needed > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        // The buffer's capacity is what the body holds: it doubles as a vector's does,
        // but never past the declared length or `limit`, so a body of the limit fits a
        // budget of the limit, and one that passed the check above is not refused for
        // its buffer's slack.
        if needed > collected.capacity() {
            let capacity = needed.max(collected.capacity() * 2).min(most.max(needed));
            if !held.hold(capacity) {
                return Err(body_budget_spent());
            }
            collected.reserve_exact(capacity - collected.len());
        }
        collected.extend_from_slice(&chunk);
    }
    Ok((Bytes::from(collected), held))
}

/// The 503 of a body the budget has no room for, counted.
fn body_budget_spent() -> ApiError {
    metrics::counter!("ingest_body_budget_refusals_total").increment(1);
    ApiError::Unavailable("too many request bodies are being received at once; retry shortly")
}

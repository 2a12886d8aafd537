//! `POST /v1/telemetry/batch` (API.md §2): up to 1000 readings from a gateway, each
//! with its own idempotency key and its own result; all accepted ones commit together.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use contract::problem::{ProblemKind, TYPE_BASE};
use contract::reading::{check_idempotency_key, BatchBody, BatchItem, FieldError, BATCH_MAX};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::ApiError;
use super::telemetry::{read_body, require_json, store_error, within_deadline};
use super::{AppState, ReadingOutcome};
use crate::auth::Grant;
use crate::limits::retry_after_secs;
use crate::store::{NewReading, Outcome};

/// The per-item answer.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ItemResult {
    Accepted { index: usize, event_id: Uuid },
    Duplicate { index: usize, event_id: Uuid },
    Conflict { index: usize, error: ItemError },
    Rejected { index: usize, error: ItemError },
}

/// Why an item was not accepted: a problem type, a detail, the first field concerned,
/// and every broken rule.
#[derive(Debug, Serialize)]
pub struct ItemError {
    #[serde(rename = "type")]
    type_uri: String,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
}

impl ItemError {
    fn new(kind: ProblemKind, detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        Self {
            type_uri: format!("{TYPE_BASE}{}", kind.slug()),
            detail: detail.into(),
            field: errors.first().map(|error| error.field.clone()),
            errors,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    accepted: usize,
    duplicates: usize,
    conflicts: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

/// `POST /v1/telemetry/batch`, authentication included within the request deadline.
pub async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchResponse>, ApiError> {
    within_deadline(&state, async {
        let grant = state.authenticate(&headers).await?;
        require_json(&headers)?;
        handle(&state, grant.as_ref(), &headers, body).await
    })
    .await
}

async fn handle(
    state: &AppState,
    grant: Option<&Grant>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<BatchResponse>, ApiError> {
    let bytes = read_body(body, headers, state.max_batch_body_bytes).await?;
    let batch: BatchBody =
        serde_json::from_slice(&bytes).map_err(|error| ApiError::InvalidJson(error.to_string()))?;
    if batch.readings.is_empty() || batch.readings.len() > BATCH_MAX {
        return Err(ApiError::InvalidReading(vec![FieldError::new(
            "readings",
            format!("must hold 1 to {BATCH_MAX} readings"),
        )]));
    }
    let received_at = OffsetDateTime::now_utc();
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(batch.readings.len());
    let mut to_store: Vec<(usize, NewReading)> = Vec::new();
    for (index, item) in batch.readings.into_iter().enumerate() {
        match prepare(state, grant, item, received_at) {
            Ok(reading) => {
                results.push(None);
                to_store.push((index, reading));
            }
            Err(error) => results.push(Some(ItemResult::Rejected { index, error })),
        }
    }
    let (indexes, readings): (Vec<usize>, Vec<NewReading>) = to_store.into_iter().unzip();
    let event_ids: Vec<Uuid> = readings.iter().map(|reading| reading.event_id).collect();
    let outcomes = state
        .store
        .submit_all(readings)
        .await
        .map_err(store_error)?;
    for ((index, event_id), outcome) in indexes.into_iter().zip(event_ids).zip(outcomes) {
        results[index] = Some(match outcome {
            Outcome::Accepted { .. } => ItemResult::Accepted { index, event_id },
            Outcome::Replayed { event_id, .. } => ItemResult::Duplicate { index, event_id },
            Outcome::KeyReused => ItemResult::Conflict {
                index,
                error: ItemError::new(
                    ProblemKind::IdempotencyKeyReused,
                    "this idempotency_key was already used for a different reading of this device",
                    Vec::new(),
                ),
            },
            Outcome::KeyInFlux => ItemResult::Rejected {
                index,
                error: ItemError::new(
                    ProblemKind::IdempotencyKeyInUse,
                    "a request with this idempotency_key is being processed; retry the item",
                    Vec::new(),
                ),
            },
        });
    }
    let results: Vec<ItemResult> = results.into_iter().flatten().collect();
    let count =
        |wanted: fn(&ItemResult) -> bool| results.iter().filter(|result| wanted(result)).count();
    let accepted = count(|result| matches!(result, ItemResult::Accepted { .. }));
    let duplicates = count(|result| matches!(result, ItemResult::Duplicate { .. }));
    let conflicts = count(|result| matches!(result, ItemResult::Conflict { .. }));
    let rejected = count(|result| matches!(result, ItemResult::Rejected { .. }));
    ReadingOutcome::Accepted.count(accepted as u64);
    ReadingOutcome::Replayed.count(duplicates as u64);
    ReadingOutcome::Conflict.count(conflicts as u64);
    ReadingOutcome::Rejected.count(rejected as u64);
    Ok(Json(BatchResponse {
        accepted,
        duplicates,
        conflicts,
        rejected,
        results,
    }))
}

/// Decodes and checks one item the way `POST /v1/telemetry` checks a request.
fn prepare(
    state: &AppState,
    grant: Option<&Grant>,
    item: &serde_json::value::RawValue,
    received_at: OffsetDateTime,
) -> Result<NewReading, ItemError> {
    let item: BatchItem = serde_json::from_str(item.get())
        .map_err(|error| ItemError::new(ProblemKind::InvalidJson, error.to_string(), Vec::new()))?;
    let (key, body) = item.into_parts();
    check_idempotency_key(key.as_bytes()).map_err(|message| {
        ItemError::new(
            ProblemKind::MissingIdempotencyKey,
            format!("idempotency_key {message}"),
            vec![FieldError::new("idempotency_key", message)],
        )
    })?;
    let reading = body
        .validate(received_at, state.time_bounds)
        .map_err(|errors| {
            ItemError::new(
                ProblemKind::InvalidReading,
                format!("{} rule(s) broken", errors.len()),
                errors,
            )
        })?;
    if grant.is_some_and(|grant| !grant.may_ingest(&reading.device_id)) {
        return Err(ItemError::new(
            ProblemKind::Forbidden,
            "this token may not post readings for this device",
            Vec::new(),
        ));
    }
    state.limiter.check(&reading.device_id).map_err(|wait| {
        ItemError::new(
            ProblemKind::RateLimited,
            format!(
                "this device sends faster than its limit; retry after {} s",
                retry_after_secs(wait)
            ),
            Vec::new(),
        )
    })?;
    Ok(NewReading::new(reading, key, received_at))
}

//! `POST /v1/telemetry/batch` (API.md §2): up to 1000 readings from a gateway, each
//! with its own idempotency key and its own result; all accepted ones commit together.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use contract::problem::ProblemKind;
use contract::reading::{
    from_json_object, BatchBody, BatchItem, FieldError, Invalid, Reading, BATCH_MAX,
};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::ApiError;
use super::telemetry::{
    admit, check, may_post_some, read_body, require_json, settle, store_error, within_deadline,
    Checked,
};
use super::{AppState, ReadingOutcome};
use crate::auth::Grant;
use crate::limits::Admitted;
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

/// Broken rules an item's `errors` lists at most; its `detail` counts them all.
pub const ITEM_ERRORS_LISTED: usize = 4;

/// Why an item was not accepted: the problem type's slug (`invalid-reading`, as API.md
/// §2 writes it, not the URI a problem document's `type` is), a detail, the first
/// field concerned, and the first [`ITEM_ERRORS_LISTED`] broken rules. A single POST's
/// `422` lists up to 32 bad metrics and more; an item as many would make a batch's
/// answer about thirteen times its body (1,000 items of 33 bad names, 313 KB, were
/// answered with 4.1 MB, held until the client took it), where a single POST's
/// answer stays under 8 KiB. Until 2026-12-07 an item listed them all.
#[derive(Debug, Serialize)]
pub struct ItemError {
    #[serde(rename = "type")]
    slug: String,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
}

/// An item refused as a single POST would be refused: the same case, detail and errors.
impl From<ApiError> for ItemError {
    fn from(error: ApiError) -> Self {
        let problem = error.problem();
        Self::of(problem.slug().to_owned(), problem.detail, problem.errors)
    }
}

impl ItemError {
    fn new(kind: ProblemKind, detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        Self::of(kind.slug().to_owned(), detail.into(), errors)
    }

    fn of(slug: String, detail: String, mut errors: Vec<FieldError>) -> Self {
        if errors.len() > ITEM_ERRORS_LISTED {
            errors.truncate(ITEM_ERRORS_LISTED);
            // The answer holds every item's list until the client took it.
            errors.shrink_to_fit();
        }
        Self {
            slug,
            detail,
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
        may_post_some(grant.as_ref())?;
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
    let (bytes, held) = read_body(
        body,
        headers,
        state.max_batch_body_bytes,
        &state.body_budget,
    )
    .await?;
    let batch: BatchBody = from_json_object(&bytes).map_err(ApiError::InvalidJson)?;
    if batch.readings.is_empty() || batch.readings.len() > BATCH_MAX {
        return Err(ApiError::InvalidReading(Invalid::one(FieldError::new(
            "readings",
            format!("must hold 1 to {BATCH_MAX} readings"),
        ))));
    }
    let received_at = OffsetDateTime::now_utc();
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(batch.readings.len());
    // Each with its share of its device's rate limit: spent once the batch has its
    // answer, given back if it ends in a `503` with nothing stored.
    let mut to_store: Vec<(usize, NewReading, Admitted<'_>)> = Vec::new();
    let mut aged: Vec<(usize, Aged)> = Vec::new();
    for (index, item) in batch.readings.into_iter().enumerate() {
        match prepare(state, grant, item, received_at) {
            Ok(Prepared::Valid(reading, share)) => {
                results.push(None);
                to_store.push((index, reading, share));
            }
            Ok(Prepared::Aged(item)) => {
                results.push(None);
                aged.push((index, item));
            }
            Err(error) => results.push(Some(ItemResult::Rejected { index, error })),
        }
    }
    drop(bytes);
    // Before the commit, so that a 503 of this look-up still means that nothing of the
    // batch was stored.
    let mut aged_shares = Vec::new();
    for (index, result) in answer_aged(state, aged, &mut aged_shares).await? {
        results[index] = Some(result);
    }
    // From here the commit queue's room bounds what waits (`limits::BodyBudget`).
    drop(held);
    let mut indexes = Vec::with_capacity(to_store.len());
    let mut readings = Vec::with_capacity(to_store.len());
    let mut shares = Vec::with_capacity(to_store.len());
    for (index, reading, share) in to_store {
        indexes.push(index);
        readings.push(reading);
        shares.push(share);
    }
    let event_ids: Vec<Uuid> = readings.iter().map(|reading| reading.event_id).collect();
    let outcomes = state
        .store
        .submit_all(readings)
        .await
        .map_err(store_error)?;
    aged_shares.into_iter().for_each(Admitted::spend);
    let answered = indexes.into_iter().zip(event_ids).zip(outcomes).zip(shares);
    for (((index, event_id), outcome), share) in answered {
        settle(share, &outcome);
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

/// An item that may get a result other than `rejected`.
enum Prepared<'a> {
    /// Valid and admitted, with its share of the rate limit: to be stored, or answered
    /// from its key's record.
    Valid(NewReading, Admitted<'a>),
    /// Invalid only for its age: `rejected`, unless it is the retry of a stored reading.
    Aged(Aged),
}

/// An item whose `recorded_at` is too old and nothing else is wrong with it.
struct Aged {
    idempotency_key: String,
    /// The reading as it was while it was young.
    reading: Reading,
    /// The age rule broken, its answer when its key does not hold this reading.
    invalid: Invalid,
}

/// The results of the items that are invalid only for their age, by index: `duplicate`
/// with the earlier `event_id` for the retry of a reading its device and key hold,
/// `rejected` for the others, as a single POST answers them (the token may post their
/// devices: [`prepare`] checked): each is looked up after taking its share of its
/// device's rate limit, whatever the look-up finds (one over the limit is `rate-limited` and not
/// looked up; until 2026-12-07 only a duplicate found took a share). One look-up for
/// all of them, none when there are none. The shares join `admitted`, to be spent once
/// the batch has its answer.
async fn answer_aged<'a>(
    state: &'a AppState,
    aged: Vec<(usize, Aged)>,
    admitted: &mut Vec<Admitted<'a>>,
) -> Result<Vec<(usize, ItemResult)>, ApiError> {
    let rejected = |index: usize, item: Aged| ItemResult::Rejected {
        index,
        error: invalid_reading(item.invalid),
    };
    let mut results = Vec::with_capacity(aged.len());
    let mut looked_up = Vec::with_capacity(aged.len());
    for (index, item) in aged {
        match admit(state, &item.reading.device_id) {
            Ok(share) => looked_up.push((index, item, share)),
            Err(error) => results.push((
                index,
                ItemResult::Rejected {
                    index,
                    error: error.into(),
                },
            )),
        }
    }
    let retries: Vec<(&Reading, &str)> = looked_up
        .iter()
        .map(|(_, item, _)| (&item.reading, item.idempotency_key.as_str()))
        .collect();
    // Failed, the look-up drops the shares, which gives them back: a `503` costs nothing.
    let replays = state
        .store
        .replays_of_aged(&retries)
        .await
        .map_err(store_error)?;
    for ((index, item, share), replay) in looked_up.into_iter().zip(replays) {
        admitted.push(share);
        let result = match replay {
            Some(Outcome::Replayed { event_id, .. }) => ItemResult::Duplicate { index, event_id },
            _ => rejected(index, item),
        };
        results.push((index, result));
    }
    Ok(results)
}

/// Decodes and checks one item the way `POST /v1/telemetry` checks a request.
fn prepare<'a>(
    state: &'a AppState,
    grant: Option<&Grant>,
    item: &serde_json::value::RawValue,
    received_at: OffsetDateTime,
) -> Result<Prepared<'a>, ItemError> {
    let item: BatchItem = from_json_object(item.get().as_bytes())
        .map_err(|detail| ItemError::new(ProblemKind::InvalidJson, detail, Vec::new()))?;
    let (key, body) = item.into_parts();
    let key = key.map_err(|message| {
        ItemError::new(
            ProblemKind::MissingIdempotencyKey,
            format!("idempotency_key {message}"),
            vec![FieldError::new("idempotency_key", message)],
        )
    })?;
    let reading = match check(state, grant, body, received_at)? {
        Checked::Valid(reading) => reading,
        Checked::Aged(reading, invalid) => {
            return Ok(Prepared::Aged(Aged {
                idempotency_key: key,
                reading,
                invalid,
            }))
        }
        Checked::Invalid(invalid) => return Err(invalid_reading(invalid)),
    };
    let share = admit(state, &reading.device_id)?;
    Ok(Prepared::Valid(
        NewReading::new(reading, key, received_at),
        share,
    ))
}

/// The error of an item that breaks the rules of a reading.
fn invalid_reading(invalid: Invalid) -> ItemError {
    ItemError::new(
        ProblemKind::InvalidReading,
        invalid.summary(),
        invalid.errors,
    )
}

//! The device endpoints of API.md §4: stats, the devices list, series.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use contract::read_model::{Aggregate, DevicesIndex, MetricStats, Resolution, FINE};
use contract::reading::{check_device_id, check_metric_name, FieldError};
use contract::timestamp::{format_millis, parse, unix_millis, writable, EARLIEST_WRITABLE_MILLIS};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::ApiError;
use super::AppState;
use crate::read_model::{AnswerKey, DeviceView, Series, WalkPosition};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Comma-separated metric names; all metrics when absent.
    metrics: Option<String>,
}

/// The stats document; field order and names follow API.md §4.
#[derive(Debug, Serialize)]
pub struct StatsResponse {
    device_id: String,
    first_seen: Option<String>,
    last_seen: Option<String>,
    sample_count: u64,
    /// When the projector last applied an event to this device.
    updated_at: Option<String>,
    /// The highest stream sequence reflected in these figures, for lag displays.
    as_of_seq: u64,
    metrics: BTreeMap<String, MetricView>,
}

#[derive(Debug, Serialize)]
struct MetricView {
    last: f64,
    last_at: Option<String>,
    count: u64,
    avg: Option<f64>,
    min: f64,
    max: f64,
    windows: Windows,
}

/// The windows of a metric, serialised in their definition order (1m first).
#[derive(Debug)]
struct Windows(Vec<(&'static str, WindowView)>);

impl Serialize for Windows {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, view) in &self.0 {
            map.serialize_entry(name, view)?;
        }
        map.end()
    }
}

/// A window or a bucket: count, avg, min, max; nulls when empty.
#[derive(Debug, Serialize)]
pub struct WindowView {
    count: u64,
    avg: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

impl From<Option<Aggregate>> for WindowView {
    fn from(aggregate: Option<Aggregate>) -> Self {
        Self {
            count: aggregate.map_or(0, |aggregate| aggregate.count),
            avg: aggregate.and_then(|aggregate| aggregate.avg()),
            min: aggregate.map(|aggregate| aggregate.min),
            max: aggregate.map(|aggregate| aggregate.max),
        }
    }
}

impl MetricView {
    fn new(
        metric: &MetricStats,
        windows: Option<&BTreeMap<&'static str, Option<Aggregate>>>,
    ) -> Self {
        Self {
            last: metric.last,
            last_at: format_millis(metric.last_at_ms),
            count: metric.count,
            avg: metric.avg(),
            min: metric.min,
            max: metric.max,
            windows: Windows(
                contract::read_model::WINDOWS
                    .iter()
                    .map(|window| {
                        let aggregate =
                            windows.and_then(|windows| windows.get(window.name).copied().flatten());
                        (window.name, WindowView::from(aggregate))
                    })
                    .collect(),
            ),
        }
    }
}

impl StatsResponse {
    fn new(device_id: String, view: &DeviceView) -> Self {
        let metrics = view
            .stats
            .metrics
            .iter()
            .map(|(name, metric)| {
                (
                    name.clone(),
                    MetricView::new(metric, view.windows.get(name)),
                )
            })
            .collect();
        Self {
            device_id,
            first_seen: format_millis(view.stats.first_seen_ms),
            last_seen: format_millis(view.stats.last_seen_ms),
            sample_count: view.stats.sample_count,
            updated_at: format_millis(view.stats.updated_at_ms),
            as_of_seq: view.stats.as_of_seq,
            metrics,
        }
    }
}

/// `GET /v1/devices/{device_id}/stats`: the device's validity (kept in the process
/// while Redis pushes no change, else one small read, made only if a kept document
/// could still be exact) tells whether the document served last time for this device
/// and selection is still exact (same header, windows not moved since); if not, the
/// device is read whole in one round trip and the document rendered again.
pub async fn stats(
    State(state): State<AppState>,
    DevicePath(device_id): DevicePath,
    QueryParams(query): QueryParams<StatsQuery>,
) -> Result<Response, ApiError> {
    let wanted = metric_filter(query.metrics.as_deref())?;
    let now_ms = unix_millis(OffsetDateTime::now_utc());
    let key: AnswerKey = (device_id, wanted);
    let validity = match state.read_model.kept_validity(&key.0, now_ms) {
        Some(kept) => Some(kept.ok_or(ApiError::DeviceNotFound)?),
        None if state.documents.may_serve(&key, FINE.bucket(now_ms)) => Some(
            state
                .read_model
                .read_validity(&key.0, now_ms)
                .await?
                .ok_or(ApiError::DeviceNotFound)?,
        ),
        None => None,
    };
    if let Some(document) = validity.and_then(|validity| state.documents.get(&key, &validity)) {
        return Ok(json_document(document));
    }
    let (device_id, wanted) = key;
    let (validity, view) = state
        .read_model
        .device_now(&device_id, wanted.as_deref(), now_ms)
        .await?
        .ok_or(ApiError::DeviceNotFound)?;
    let mut rendered = serde_json::to_vec(&StatsResponse::new(device_id.clone(), &view))
        .map_err(|error| ApiError::Internal(format!("rendering stats: {error}")))?;
    // Kept at its length, which is what the answers' bound weighs: the buffer grows by
    // doubling, and a 2.1 KiB document sat in 4 KiB.
    rendered.shrink_to_fit();
    let document = Bytes::from(rendered);
    state.documents.insert(
        (device_id, wanted),
        validity,
        view.windows_change_at,
        document.clone(),
    );
    Ok(json_document(document))
}

/// A rendered JSON document as the answer.
fn json_document(document: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeviceSummary {
    device_id: String,
    last_seen: Option<String>,
    sample_count: u64,
}

#[derive(Debug, Serialize)]
pub struct ListResponse {
    devices: Vec<DeviceSummary>,
    next_cursor: Option<String>,
}

/// Largest page of `GET /v1/devices`.
pub const LIST_LIMIT_MAX: usize = 1000;

/// `GET /v1/devices?limit=&cursor=`: most recently seen first, keyset-paginated. A
/// page may hold fewer than `limit` devices (even none) and still have a
/// `next_cursor`: each page looks at a bounded part of the index (see
/// [`ReadModel::devices`](crate::read_model::ReadModel::devices)); the walk ends only
/// at `next_cursor: null`.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<ListResponse>, ApiError> {
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=LIST_LIMIT_MAX).contains(limit))
            .ok_or_else(|| {
                invalid(
                    "limit",
                    format!("must be a whole number from 1 to {LIST_LIMIT_MAX}"),
                )
            })?,
    };
    let from = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let page = state.read_model.devices(limit, from.as_ref()).await?;
    let devices = page
        .devices
        .into_iter()
        .map(|device| DeviceSummary {
            device_id: device.device_id,
            last_seen: format_millis(device.last_seen_ms),
            sample_count: device.sample_count,
        })
        .collect();
    Ok(Json(ListResponse {
        devices,
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

/// A cursor is `<generation>.<snapshot ms>.<granule ms>.<device id>`: the read model's
/// generation the walk reads, when it began (Redis's clock), and the index entry it
/// continues after. Every part is safe in a URL.
fn encode_cursor(position: &WalkPosition) -> String {
    format!(
        "{}.{}.{}",
        position.generation,
        position.snapshot_ms,
        position.after.replacen(':', ".", 1)
    )
}

/// The walk position of a cursor this API returned. Any numbers are taken: a
/// generation that is not the live one, or a walk older than the listing TTL, is
/// refused when the page is read (by Redis's clock). A cursor of before generations
/// were named (three parts) is refused here.
fn decode_cursor(cursor: &str) -> Result<WalkPosition, ApiError> {
    let mut parts = cursor.splitn(4, '.');
    let decoded = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(generation), Some(snapshot), Some(granule), Some(device_id)) => {
            match (
                generation.parse::<u64>(),
                snapshot.parse::<i64>(),
                granule.parse::<i64>(),
                check_device_id(device_id),
            ) {
                (Ok(generation), Ok(snapshot_ms), Ok(granule), Ok(())) => Some(WalkPosition {
                    generation,
                    snapshot_ms,
                    after: DevicesIndex::entry(granule, device_id),
                }),
                _ => None,
            }
        }
        _ => None,
    };
    decoded.ok_or_else(|| invalid("cursor", "is not a cursor this API returned"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    metric: Option<String>,
    resolution: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SeriesPoint {
    t: Option<String>,
    #[serde(flatten)]
    aggregate: WindowView,
}

#[derive(Debug, Serialize)]
pub struct SeriesResponse {
    device_id: String,
    metric: String,
    resolution: &'static str,
    from: Option<String>,
    to: Option<String>,
    points: Vec<SeriesPoint>,
}

/// `GET /v1/devices/{device_id}/series?metric=&resolution=10s|5m&from=&to=`
///
/// Points are the buckets of `resolution` that hold readings, oldest first, each
/// stamped with its start; empty buckets are omitted. `to` defaults to now, `from` to
/// `to` minus 1 h (10 s) or 24 h (5 min); `from` is raised to the oldest bucket kept.
pub async fn series(
    State(state): State<AppState>,
    DevicePath(device_id): DevicePath,
    QueryParams(query): QueryParams<SeriesQuery>,
) -> Result<Json<SeriesResponse>, ApiError> {
    let metric = query
        .metric
        .ok_or_else(|| invalid("metric", "is required"))?;
    check_metric_name(&metric).map_err(|message| invalid("metric", message))?;
    let resolution = match query.resolution.as_deref() {
        None => FINE,
        Some(name) => {
            Resolution::by_name(name).ok_or_else(|| invalid("resolution", "must be 10s or 5m"))?
        }
    };
    // An instant is echoed in UTC, which RFC 3339 writes for years 0000 to 9999 only.
    let instant = |field: &'static str, text: Option<&str>| -> Result<Option<i64>, ApiError> {
        text.map(|text| {
            parse(&offset_plus_restored(text))
                .filter(|instant| writable(*instant))
                .map(unix_millis)
                .ok_or_else(|| {
                    invalid(
                        field,
                        "must be an RFC 3339 timestamp, within years 0000 to 9999 in UTC",
                    )
                })
        })
        .transpose()
    };
    let now_ms = unix_millis(OffsetDateTime::now_utc());
    let to = instant("to", query.to.as_deref())?.unwrap_or(now_ms);
    let default_span = if resolution == FINE {
        3_600_000
    } else {
        86_400_000
    };
    let from = instant("from", query.from.as_deref())?
        .unwrap_or((to - default_span).max(EARLIEST_WRITABLE_MILLIS));
    if from > to {
        return Err(invalid("from", "must not be after to"));
    }
    let first = resolution.bucket(from).max(resolution.oldest_kept(now_ms));
    // No bucket past the latest a reading may be dated in holds anything (one more for
    // the clocks of ingest's and this host); stopping there, and at most a retention
    // ahead (`ingest.max_future_secs` may be set to 12 hours), bounds the read whatever
    // `to` says.
    let latest = now_ms.saturating_add(state.max_future_ms.min(resolution.retention_ms));
    let last = resolution.bucket(to).min(resolution.bucket(latest) + 1);
    // `first > last` (a range wholly before the buckets kept) reads no bucket, but still
    // tells an unknown device or metric from one with nothing in the range.
    let points = match state
        .read_model
        .series(&device_id, &metric, resolution, first..=last, now_ms)
        .await?
    {
        Series::UnknownDevice => return Err(ApiError::DeviceNotFound),
        Series::UnknownMetric => return Err(ApiError::MetricNotFound(metric)),
        Series::Points(points) => points,
    };
    Ok(Json(SeriesResponse {
        device_id,
        metric,
        resolution: resolution.name,
        from: format_millis(from),
        to: format_millis(to),
        points: points
            .into_iter()
            .map(|(bucket, aggregate)| SeriesPoint {
                t: format_millis(bucket * resolution.width_ms),
                aggregate: WindowView::from(Some(aggregate)),
            })
            .collect(),
    }))
}

/// A timestamp of the query string with the `+` of its offset given back: `+` means a
/// space there (form encoding), so `from=2026-11-22T10:00:00+01:00` typed into a URL
/// unescaped arrives as `…10:00:00 01:00`, and was refused as not RFC 3339. Only the
/// part after the date (and the date-time separator, which may be a space) is mended.
fn offset_plus_restored(text: &str) -> std::borrow::Cow<'_, str> {
    match (text.get(..11), text.get(11..)) {
        (Some(date), Some(time)) if time.contains(' ') => {
            format!("{date}{}", time.replace(' ', "+")).into()
        }
        _ => text.into(),
    }
}

/// The `{device_id}` of the path; a path that is not UTF-8 is a problem document too.
pub struct DevicePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for DevicePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(device_id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                invalid(
                    "device_id",
                    "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
                )
            })?;
        valid_device_id(&device_id)?;
        Ok(Self(device_id))
    }
}

/// The query string. One that does not parse, names a parameter the route does not
/// have (`?metric=` on `/stats`, `?limt=`) or gives one twice is a `400` naming it, as
/// Stripe refuses an unknown parameter: a typo answered with the unfiltered default
/// would look like an answer to the question asked.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or_default())
            .map(Self)
            .map_err(|error| {
                invalid(
                    "query",
                    format!("{error}; give each documented parameter at most once"),
                )
            })
    }
}

fn valid_device_id(device_id: &str) -> Result<(), ApiError> {
    check_device_id(device_id).map_err(|message| invalid("device_id", message))
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(vec![FieldError::new(field, message)])
}

/// Most metrics one `?metrics=` may name, twice a reading's most.
pub const SELECTED_METRICS_MAX: usize = 2 * contract::reading::METRICS_MAX;

/// Parses `?metrics=a,b`: at least one name and at most [`SELECTED_METRICS_MAX`], each
/// following the metric-name rule. The metrics `?metrics=` selects, sorted and each
/// once: one selection, however it is written, is one kept answer (every spelling was
/// kept on its own). Until 2026-12-07 a selection had no bound: a 16 KiB query of
/// ~4,300 short names was a kept answer's key of ~230 KB weighed as 12 KB, and ~2,700
/// of them held ~0.6 GB under the answers' 32 MiB bound.
fn metric_filter(metrics: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(list) = metrics else {
        return Ok(None);
    };
    let mut wanted = Vec::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        check_metric_name(name).map_err(|message| invalid("metrics", message))?;
        wanted.push(name.to_owned());
    }
    if wanted.is_empty() {
        // `?metrics=` with no name was answered with no metrics at all, as if the
        // device had none; leaving the parameter out asks for all of them.
        return Err(invalid("metrics", "must name at least one metric"));
    }
    wanted.sort_unstable();
    wanted.dedup();
    if wanted.len() > SELECTED_METRICS_MAX {
        return Err(invalid(
            "metrics",
            format!("may name at most {SELECTED_METRICS_MAX} metrics"),
        ));
    }
    wanted.shrink_to_fit();
    Ok(Some(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_of_metrics_is_one_whatever_its_order_and_repeats() {
        let selection = |text: &str| metric_filter(Some(text)).ok().flatten();
        let canonical = Some(vec!["humidity".to_owned(), "temperature".to_owned()]);
        assert_eq!(selection("temperature,humidity"), canonical);
        assert_eq!(selection("humidity, temperature,humidity,"), canonical);
        assert!(metric_filter(Some("Temperature")).is_err());
        assert_eq!(metric_filter(None).ok(), Some(None));
        assert!(metric_filter(Some("")).is_err(), "no name at all");
        assert!(metric_filter(Some(" , ,")).is_err(), "separators alone");
        let names = |count: usize| {
            (0..count)
                .map(|index| format!("m{index}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let most = metric_filter(Some(&names(SELECTED_METRICS_MAX))).expect("the most");
        assert_eq!(most.map(|wanted| wanted.len()), Some(SELECTED_METRICS_MAX));
        assert!(metric_filter(Some(&names(SELECTED_METRICS_MAX + 1))).is_err());
        let repeated = format!("{},m0", names(SELECTED_METRICS_MAX));
        assert!(metric_filter(Some(&repeated)).is_ok(), "counted once named");
    }

    #[test]
    fn an_offsets_plus_sent_unescaped_is_read_as_the_plus_it_was() {
        let restored = |text: &str| offset_plus_restored(text).into_owned();
        assert_eq!(
            restored("2026-11-22T10:00:00 01:00"),
            "2026-11-22T10:00:00+01:00"
        );
        assert_eq!(
            restored("2026-11-22 10:00:00 01:00"),
            "2026-11-22 10:00:00+01:00",
            "a space as the date-time separator stays"
        );
        for kept in [
            "2026-11-22T10:00:00Z",
            "2026-11-22 10:00:00Z",
            "short",
            "ééééééé x",
        ] {
            assert_eq!(restored(kept), kept);
        }
        assert!(parse(&restored("2026-11-22T10:00:00 01:00")).is_some());
    }

    #[test]
    fn a_cursor_names_its_generation_snapshot_and_entry_and_reads_back() {
        let position = WalkPosition {
            generation: 1_799_999_000_000,
            snapshot_ms: 1_800_000_000_000,
            after: "1799999990000:sensor-1".to_owned(),
        };
        let cursor = encode_cursor(&position);
        assert_eq!(cursor, "1799999000000.1800000000000.1799999990000.sensor-1");
        assert!(cursor
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte)));
        assert_eq!(decode_cursor(&cursor).ok(), Some(position));
        // Any numbers of their type are taken; Redis judges them.
        for snapshot_ms in [i64::MIN, i64::MIN + 1, -1] {
            let forged = format!("{}.{snapshot_ms}.0.sensor-1", u64::MAX);
            assert!(decode_cursor(&forged).is_ok(), "{forged}");
        }
    }

    #[test]
    fn a_cursor_of_another_shape_is_refused() {
        for cursor in [
            // Before cursors named their generation.
            "1800000000000.1799999990000.sensor-1",
            "1.2.3",
            "-1.1800000000000.1799999990000.sensor-1",
            "1.1800000000000.1799999990000.sensor.1",
            "1.1800000000000.1799999990000.",
            "1.x.1799999990000.sensor-1",
            "",
        ] {
            assert!(decode_cursor(cursor).is_err(), "{cursor}");
        }
    }
}

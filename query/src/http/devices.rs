//! `GET /v1/devices/{device_id}/stats` (API.md §4).

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::Json;
use contract::read_model::{device_key, DeviceStats, MetricStats};
use contract::reading::{check_device_id, check_metric_name, FieldError};
use contract::timestamp::format_millis;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;

#[derive(Debug, Deserialize)]
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
}

impl From<&MetricStats> for MetricView {
    fn from(metric: &MetricStats) -> Self {
        Self {
            last: metric.last,
            last_at: format_millis(metric.last_at_ms),
            count: metric.count,
            avg: metric.avg(),
            min: metric.min,
            max: metric.max,
        }
    }
}

pub async fn stats(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    Query(query): Query<StatsQuery>,
) -> Result<Json<StatsResponse>, ApiError> {
    check_device_id(&device_id)
        .map_err(|message| ApiError::InvalidRequest(vec![FieldError::new("device_id", message)]))?;
    let wanted = metric_filter(query.metrics.as_deref())?;
    let mut redis = state.redis.clone();
    let hash: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(device_key(&state.prefix, &device_id))
        .query_async(&mut redis)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "reading the device hash failed");
            ApiError::Unavailable
        })?;
    let stats = DeviceStats::from_hash(hash).ok_or(ApiError::DeviceNotFound)?;
    let metrics = stats
        .metrics
        .iter()
        .filter(|(name, _)| {
            wanted
                .as_ref()
                .is_none_or(|wanted| wanted.contains(name.as_str()))
        })
        .map(|(name, metric)| (name.clone(), MetricView::from(metric)))
        .collect();
    Ok(Json(StatsResponse {
        device_id,
        first_seen: format_millis(stats.first_seen_ms),
        last_seen: format_millis(stats.last_seen_ms),
        sample_count: stats.sample_count,
        updated_at: format_millis(stats.updated_at_ms),
        as_of_seq: stats.as_of_seq,
        metrics,
    }))
}

/// Parses `?metrics=a,b`; every name must follow the metric-name rule.
fn metric_filter(metrics: Option<&str>) -> Result<Option<BTreeSet<String>>, ApiError> {
    let Some(list) = metrics else {
        return Ok(None);
    };
    let mut wanted = BTreeSet::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        check_metric_name(name).map_err(|message| {
            ApiError::InvalidRequest(vec![FieldError::new("metrics", message)])
        })?;
        wanted.insert(name.to_owned());
    }
    Ok(Some(wanted))
}

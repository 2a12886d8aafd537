//! The query service's one HTTP error type, rendered as `application/problem+json`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use contract::problem::{Problem, ProblemKind, CONTENT_TYPE};
use contract::read_model::LISTING_TTL_MS;
use contract::reading::FieldError;

use crate::read_model::ReadError;
use ingest::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request")]
    InvalidRequest(Vec<FieldError>),
    #[error("device not found")]
    DeviceNotFound,
    /// `/series` for a metric the device never reported: a misspelt name is told from
    /// a metric with nothing in the range asked for.
    #[error("metric not found")]
    MetricNotFound(String),
    #[error("no such route")]
    NoSuchRoute,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("read model unavailable")]
    Unavailable,
    #[error("read model rebuilding")]
    Rebuilding,
    #[error("unauthorized: {0}")]
    Unauthorized(AuthError),
    #[error("forbidden")]
    Forbidden,
    #[error("credentials cannot be checked")]
    AuthUnavailable,
    /// The request was not answered within `query.request_timeout_ms`.
    #[error("request deadline passed")]
    DeadlinePassed,
    /// Unexpected; logged once with its cause, answered as an opaque 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable => Self::AuthUnavailable,
            error => Self::Unauthorized(error),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        match &error {
            ReadError::Rebuilding => Self::Rebuilding,
            ReadError::CursorLost => Self::InvalidRequest(vec![FieldError::new(
                "cursor",
                "the listing's position is gone (the read model was rebuilt); start again without a cursor",
            )]),
            ReadError::CursorExpired => Self::InvalidRequest(vec![FieldError::new(
                "cursor",
                format!(
                    "has expired: a listing must be walked within {} minutes; start again without a cursor",
                    LISTING_TTL_MS / 60_000
                ),
            )]),
            // Logged as an error when answered (`Internal`).
            ReadError::Redis(_) if error.is_lasting() => {
                Self::Internal(format!("reading the read model failed: {error}"))
            }
            ReadError::Redis(_) | ReadError::Reply(_) => {
                tracing::warn!(%error, "reading the read model failed");
                Self::Unavailable
            }
        }
    }
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::InvalidRequest(errors) => Problem::new(
                ProblemKind::InvalidRequest,
                "the request is malformed, see errors",
            )
            .with_errors(errors.clone()),
            Self::DeviceNotFound => Problem::new(
                ProblemKind::NotFound,
                "no readings are known for this device",
            ),
            Self::MetricNotFound(metric) => Problem::new(
                ProblemKind::NotFound,
                format!("this device has reported no metric named {metric}"),
            )
            .with_errors(vec![FieldError::new(
                "metric",
                "names no metric of this device",
            )]),
            Self::NoSuchRoute => Problem::new(ProblemKind::NotFound, "no such resource"),
            Self::MethodNotAllowed => Problem::new(
                ProblemKind::MethodNotAllowed,
                "this resource is read with GET",
            ),
            Self::Unavailable => Problem::new(
                ProblemKind::Unavailable,
                "the read model (redis) is not answering; retry shortly",
            ),
            Self::Unauthorized(error) => Problem::new(
                ProblemKind::Unauthorized,
                format!("{error}; send Authorization: Bearer <read token>"),
            ),
            Self::Forbidden => Problem::new(
                ProblemKind::Forbidden,
                "this token may not read; use a read token",
            ),
            Self::AuthUnavailable => Problem::new(
                ProblemKind::Unavailable,
                "credentials cannot be checked right now; retry shortly",
            ),
            Self::DeadlinePassed => Problem::new(
                ProblemKind::Unavailable,
                "the request took too long to answer; retry shortly",
            ),
            Self::Rebuilding => Problem::new(
                ProblemKind::Unavailable,
                "the read model is being rebuilt from the event stream; retry shortly",
            ),
            Self::Internal(_) => {
                Problem::new(ProblemKind::Internal, "an unexpected error occurred")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        let problem = self.problem();
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response =
            (status, serde_json::to_vec(&problem).unwrap_or_default()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

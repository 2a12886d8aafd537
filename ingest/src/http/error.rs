//! The ingest service's one HTTP error type, rendered as `application/problem+json`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use contract::problem::{Problem, ProblemKind, CONTENT_TYPE};
use contract::reading::Invalid;

use crate::auth::AuthError;

/// Every way a request can fail; each maps to one problem type and status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("{header} {coding} is not accepted")]
    UnsupportedCoding {
        /// `Content-Encoding` or `Transfer-Encoding`.
        header: &'static str,
        /// The first coding refused, cut to 32 characters.
        coding: String,
    },
    #[error("idempotency key: {0}")]
    MissingIdempotencyKey(String),
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("invalid json: {0}")]
    InvalidJson(String),
    #[error("invalid reading")]
    InvalidReading(Invalid),
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    #[error("idempotency key in use by a concurrent request")]
    IdempotencyKeyInUse,
    #[error("service unavailable: {0}")]
    Unavailable(&'static str),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("rate limited, retry after {0} s")]
    RateLimited(u64),
    #[error("unauthorized: {0}")]
    Unauthorized(AuthError),
    #[error("forbidden")]
    Forbidden,
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable => {
                Self::Unavailable("credentials cannot be checked right now; retry shortly")
            }
            error => Self::Unauthorized(error),
        }
    }
}

impl ApiError {
    /// Whether this answer refuses the reading itself by one of the rules a batch item
    /// is `rejected` for (API.md §2), so `ingest_readings_total{outcome="rejected"}`
    /// counts it. Requests refused before their body is read (401, 415, 413) and
    /// failures of the service (503) are not readings refused, only requests.
    pub fn rejects_reading(&self) -> bool {
        matches!(
            self,
            Self::MissingIdempotencyKey(_)
                | Self::InvalidJson(_)
                | Self::InvalidReading(_)
                | Self::Forbidden
                | Self::RateLimited(_)
                | Self::IdempotencyKeyInUse
        )
    }

    pub(super) fn problem(&self) -> Problem {
        match self {
            Self::UnsupportedMediaType => Problem::new(
                ProblemKind::UnsupportedMediaType,
                "send the reading as JSON with Content-Type: application/json",
            ),
            Self::UnsupportedCoding { header, coding } => Problem::new(
                ProblemKind::UnsupportedMediaType,
                format!(
                    "{header} {coding} is not accepted; send the body uncompressed, without Content-Encoding and with no transfer coding but chunked"
                ),
            ),
            Self::MissingIdempotencyKey(rule) => Problem::new(
                ProblemKind::MissingIdempotencyKey,
                format!("the Idempotency-Key header is required and {rule}"),
            ),
            Self::PayloadTooLarge(limit) => Problem::new(
                ProblemKind::PayloadTooLarge,
                format!("the body may be at most {limit} bytes"),
            ),
            Self::InvalidJson(detail) => Problem::new(ProblemKind::InvalidJson, detail.clone()),
            Self::InvalidReading(invalid) => Problem::new(
                ProblemKind::InvalidReading,
                format!("{}, see errors", invalid.summary()),
            )
            .with_errors(invalid.errors.clone()),
            Self::IdempotencyKeyReused => Problem::new(
                ProblemKind::IdempotencyKeyReused,
                "this Idempotency-Key was already used for a different reading of this device; use a new key for a new reading",
            ),
            Self::IdempotencyKeyInUse => Problem::new(
                ProblemKind::IdempotencyKeyInUse,
                "a request with this Idempotency-Key is being processed; retry after a moment",
            ),
            Self::Unavailable(detail) => Problem::new(ProblemKind::Unavailable, *detail),
            Self::NotFound => Problem::new(ProblemKind::NotFound, "no such resource"),
            Self::MethodNotAllowed => Problem::new(
                ProblemKind::MethodNotAllowed,
                "this resource does not take this method; the Allow header lists those it takes",
            ),
            Self::Unauthorized(error) => Problem::new(
                ProblemKind::Unauthorized,
                format!("{error}; send Authorization: Bearer <token>"),
            ),
            Self::Forbidden => Problem::new(
                ProblemKind::Forbidden,
                "this token may not post readings for this device",
            ),
            Self::RateLimited(seconds) => Problem::new(
                ProblemKind::RateLimited,
                format!("this device sends faster than its limit; retry after {seconds} s"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = problem_response(&self.problem());
        if let Self::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::UnsupportedCoding {
            header: "Content-Encoding",
            ..
        } = self
        {
            // RFC 9110 §12.5.3: a 415 for a content coding says which codings would do
            // (`Accept-Encoding` names content codings, so not for a transfer coding).
            response.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if let Self::RateLimited(seconds) = self {
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Renders a problem with its status, media type and, where retrying helps, `Retry-After`.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
    ) {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

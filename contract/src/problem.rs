//! RFC 9457 problem documents: the body of every 4xx and 5xx response (API.md §3).

use serde::{Deserialize, Serialize};

use crate::reading::FieldError;

/// Where the problem types are documented; each type is this plus its slug.
pub const TYPE_BASE: &str = "https://telemetry-pipeline.dev/problems/";
/// The media type of a problem document.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// The cases API.md §3 names, each with its status and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    InvalidJson,
    InvalidRequest,
    InvalidReading,
    MissingIdempotencyKey,
    IdempotencyKeyReused,
    IdempotencyKeyInUse,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unauthorized,
    Forbidden,
    RateLimited,
    Unavailable,
    NotFound,
    MethodNotAllowed,
    Internal,
}

impl ProblemKind {
    pub fn slug(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid-json",
            Self::InvalidRequest => "invalid-request",
            Self::InvalidReading => "invalid-reading",
            Self::MissingIdempotencyKey => "missing-idempotency-key",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
            Self::IdempotencyKeyInUse => "idempotency-key-in-use",
            Self::PayloadTooLarge => "payload-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate-limited",
            Self::Unavailable => "unavailable",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Internal => "internal",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Self::InvalidJson | Self::InvalidRequest | Self::MissingIdempotencyKey => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::IdempotencyKeyInUse => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::InvalidReading | Self::IdempotencyKeyReused => 422,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::InvalidJson => "Request body is not valid JSON of the expected shape",
            Self::InvalidRequest => "Request path or query is malformed",
            Self::InvalidReading => "Reading breaks a validation rule",
            Self::MissingIdempotencyKey => "Idempotency-Key header is missing or malformed",
            Self::IdempotencyKeyReused => {
                "Idempotency key was already used for a different request"
            }
            Self::IdempotencyKeyInUse => "A request with this idempotency key is in progress",
            Self::PayloadTooLarge => "Request body is too large",
            Self::UnsupportedMediaType => "Content-Type must be application/json",
            Self::Unauthorized => "Missing or invalid credentials",
            Self::Forbidden => "Not allowed with this token",
            Self::RateLimited => "Too many requests",
            Self::Unavailable => "Service temporarily unavailable",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed on this resource",
            Self::Internal => "Internal error",
        }
    }
}

/// One problem document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("{TYPE_BASE}{}", kind.slug()),
            title: kind.title().to_owned(),
            status: kind.status(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    /// The slug naming the case (`invalid-reading`): the type without [`TYPE_BASE`].
    pub fn slug(&self) -> &str {
        self.type_uri
            .strip_prefix(TYPE_BASE)
            .unwrap_or(&self.type_uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_serializes_as_rfc_9457() {
        let problem = Problem::new(ProblemKind::InvalidReading, "1 rule broken").with_errors(vec![
            FieldError::new("metrics.t", "must be a finite number"),
        ]);
        let json = serde_json::to_value(&problem).expect("serializable");
        assert_eq!(
            json["type"],
            "https://telemetry-pipeline.dev/problems/invalid-reading"
        );
        assert_eq!(json["status"], 422);
        assert_eq!(json["errors"][0]["field"], "metrics.t");
        assert_eq!(problem.slug(), "invalid-reading");
    }
}

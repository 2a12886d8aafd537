//! The `telemetry.recorded` event: one per accepted reading, published by the relay.
//!
//! Schema changes are additive (consumers ignore fields they do not know); a change that
//! is not bumps [`VERSION`], and consumers send versions they do not know to the DLQ.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::reading::{check_device_id, check_metric_name, from_json_object, METRICS_MAX};
use crate::settings::FUTURE_MAX_SECS;
use crate::timestamp;

/// The `event_type` field and `Event-Type` header.
pub const EVENT_TYPE: &str = "telemetry.recorded";
/// The schema version this code writes and reads.
pub const VERSION: u32 = 1;

/// How far past the time its stream stored it an event's `recorded_at` may lie for the
/// projector to count it: twice the most ingest may accept ahead of its clock
/// ([`FUTURE_MAX_SECS`]), the rest for the clocks of the hosts between ingest and NATS.
/// An event dated further ahead (a hand-made `nats pub`, a bug) would hold its device's
/// `last` and `last_seen` until that date; it goes to the DLQ as `invalid` instead.
pub const LEAD_MAX: time::Duration = time::Duration::seconds(2 * FUTURE_MAX_SECS as i64);

/// NATS header names of a published event.
pub mod headers {
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const EVENT_TYPE: &str = "Event-Type";
    pub const EVENT_VERSION: &str = "Event-Version";
    /// On a DLQ message: why it was dead-lettered.
    pub const DLQ_REASON: &str = "Dlq-Reason";
    /// On a DLQ message: the stream it came from.
    pub const DLQ_STREAM: &str = "Dlq-Stream";
    /// On a DLQ message: its sequence in that stream.
    pub const DLQ_STREAM_SEQUENCE: &str = "Dlq-Stream-Sequence";
    /// On a stripped DLQ message: why the DLQ stream refused the full copy.
    pub const DLQ_STRIPPED: &str = "Dlq-Stripped";
    /// On a stripped DLQ message: the original payload's size in bytes (the copy holds
    /// only its start).
    pub const DLQ_PAYLOAD_BYTES: &str = "Dlq-Payload-Bytes";
}

/// The payload of a `telemetry.recorded` message (API.md §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecorded {
    pub event_id: Uuid,
    pub event_type: String,
    pub version: u32,
    pub device_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub metrics: BTreeMap<String, f64>,
}

/// Why a message cannot be projected; it goes to the DLQ with this as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable: {0}")]
    Undecodable(String),
    #[error("unknown-version: {0}")]
    UnknownVersion(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// Every [`DecodeError::reason`], as `projector_dlq_total` labels its series.
    pub const REASONS: [&'static str; 3] = ["undecodable", "unknown-version", "invalid"];

    /// The short reason written in the DLQ header.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Undecodable(_) => "undecodable",
            Self::UnknownVersion(_) => "unknown-version",
            Self::Invalid(_) => "invalid",
        }
    }
}

impl TelemetryRecorded {
    /// Builds the event for an accepted reading, times normalised to UTC.
    pub fn new(
        event_id: Uuid,
        device_id: String,
        recorded_at: OffsetDateTime,
        received_at: OffsetDateTime,
        metrics: BTreeMap<String, f64>,
    ) -> Self {
        Self {
            event_id,
            event_type: EVENT_TYPE.to_owned(),
            version: VERSION,
            device_id,
            recorded_at: recorded_at.to_offset(time::UtcOffset::UTC),
            received_at: received_at.to_offset(time::UtcOffset::UTC),
            metrics,
        }
    }

    /// The JSON payload as published.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings, numbers and maps with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and checks a payload; `version_header` is the `Event-Version` header if any.
    pub fn decode(payload: &[u8], version_header: Option<&str>) -> Result<Self, DecodeError> {
        if let Some(version) = version_header {
            if version.trim() != VERSION.to_string() {
                return Err(DecodeError::UnknownVersion(format!(
                    "Event-Version {version}"
                )));
            }
        }
        // An object only: serde alone also takes the fields as an array, in order.
        let event: Self = from_json_object(payload).map_err(|error| {
            #[derive(Deserialize)]
            struct Versioned {
                version: u32,
            }
            match from_json_object::<Versioned>(payload) {
                Ok(versioned) if versioned.version != VERSION => {
                    DecodeError::UnknownVersion(format!("version {}", versioned.version))
                }
                _ => DecodeError::Undecodable(error),
            }
        })?;
        if event.version != VERSION {
            return Err(DecodeError::UnknownVersion(format!(
                "version {}",
                event.version
            )));
        }
        if event.event_type != EVENT_TYPE {
            return Err(DecodeError::Invalid(format!(
                "event_type {}",
                event.event_type
            )));
        }
        check_device_id(&event.device_id)
            .map_err(|message| DecodeError::Invalid(format!("device_id {message}")))?;
        if event.metrics.is_empty() || event.metrics.len() > METRICS_MAX {
            return Err(DecodeError::Invalid(format!(
                "{} metrics, not 1 to {METRICS_MAX}",
                event.metrics.len()
            )));
        }
        for (name, value) in &event.metrics {
            check_metric_name(name)
                .map_err(|message| DecodeError::Invalid(format!("metric {message}")))?;
            if !value.is_finite() {
                return Err(DecodeError::Invalid(format!("metric {name} is not finite")));
            }
        }
        Ok(event)
    }

    /// Checks that the event is dated at most [`LEAD_MAX`] after `stored_at`, the time
    /// its stream stored it, which a replay of the same message sees again.
    pub fn check_lead(&self, stored_at: OffsetDateTime) -> Result<(), DecodeError> {
        if self.recorded_at - stored_at <= LEAD_MAX {
            return Ok(());
        }
        Err(DecodeError::Invalid(format!(
            "recorded_at {} is more than {} h after the stream stored the event at {}",
            timestamp::format(self.recorded_at),
            LEAD_MAX.whole_hours(),
            timestamp::format(stored_at)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_for_the_dead_letter_counter() {
        for error in [
            DecodeError::Undecodable(String::new()),
            DecodeError::UnknownVersion(String::new()),
            DecodeError::Invalid(String::new()),
        ] {
            assert!(DecodeError::REASONS.contains(&error.reason()), "{error}");
        }
    }

    fn event() -> TelemetryRecorded {
        let at = timestamp::parse("2026-11-22T10:15:30.25Z").expect("valid");
        TelemetryRecorded::new(
            Uuid::now_v7(),
            "sensor-1".to_owned(),
            at,
            at,
            BTreeMap::from([("temperature".to_owned(), 21.5)]),
        )
    }

    #[test]
    fn event_round_trips_through_json() {
        let event = event();
        let decoded = TelemetryRecorded::decode(&event.to_json(), Some("1")).expect("decodes");
        assert_eq!(decoded, event);
    }

    #[test]
    fn payload_has_the_documented_fields() {
        let json: serde_json::Value = serde_json::from_slice(&event().to_json()).expect("json");
        assert_eq!(json["event_type"], "telemetry.recorded");
        assert_eq!(json["version"], 1);
        assert_eq!(json["recorded_at"], "2026-11-22T10:15:30.25Z");
        assert_eq!(json["metrics"]["temperature"], 21.5);
    }

    #[test]
    fn unknown_versions_and_garbage_are_told_apart() {
        let mut json: serde_json::Value = serde_json::from_slice(&event().to_json()).expect("json");
        json["version"] = 2.into();
        let payload = serde_json::to_vec(&json).expect("json");
        assert_eq!(
            TelemetryRecorded::decode(&payload, None).map_err(|error| error.reason()),
            Err("unknown-version")
        );
        assert_eq!(
            TelemetryRecorded::decode(b"not json", None).map_err(|error| error.reason()),
            Err("undecodable")
        );
        assert_eq!(
            TelemetryRecorded::decode(&event().to_json(), Some("7"))
                .map_err(|error| error.reason()),
            Err("unknown-version")
        );
    }

    #[test]
    fn an_event_dated_more_than_a_day_after_it_was_stored_is_invalid() {
        let event = event();
        let stored_at = event.recorded_at - LEAD_MAX;
        assert_eq!(event.check_lead(stored_at), Ok(()));
        assert_eq!(event.check_lead(event.recorded_at + LEAD_MAX), Ok(()));
        let error = event
            .check_lead(stored_at - time::Duration::milliseconds(1))
            .expect_err("a millisecond more");
        assert_eq!(error.reason(), "invalid");
        assert!(
            error.to_string().contains("more than 24 h after"),
            "{error}"
        );
        // The furthest dates either way are told, not a panic.
        let far = TelemetryRecorded {
            recorded_at: timestamp::parse("9999-12-31T23:59:59Z").expect("valid"),
            ..event
        };
        let earliest = timestamp::parse("0001-01-01T00:00:00Z").expect("valid");
        assert_eq!(
            far.check_lead(earliest).map_err(|e| e.reason()),
            Err("invalid")
        );
    }

    #[test]
    fn an_event_written_as_an_array_of_its_fields_is_undecodable() {
        let json: serde_json::Value = serde_json::from_slice(&event().to_json()).expect("json");
        let fields = [
            "event_id",
            "event_type",
            "version",
            "device_id",
            "recorded_at",
            "received_at",
            "metrics",
        ]
        .map(|field| json[field].clone());
        let payload = serde_json::to_vec(&fields).expect("json");
        assert!(serde_json::from_slice::<TelemetryRecorded>(&payload).is_ok());
        assert_eq!(
            TelemetryRecorded::decode(&payload, Some("1")).map_err(|error| error.reason()),
            Err("undecodable")
        );
    }

    #[test]
    fn unknown_fields_are_ignored_for_additive_changes() {
        let mut json: serde_json::Value = serde_json::from_slice(&event().to_json()).expect("json");
        json["firmware"] = "1.2.3".into();
        let payload = serde_json::to_vec(&json).expect("json");
        assert!(TelemetryRecorded::decode(&payload, Some("1")).is_ok());
    }
}

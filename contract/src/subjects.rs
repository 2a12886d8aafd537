//! Stream and subject names, all derived from the one configured stream name.
//!
//! The stream `TELEMETRY` captures `telemetry.recorded.>` and its dead-letter stream
//! `TELEMETRY_DLQ` captures `telemetry.dlq.>`. Subjects are rooted at the lower-cased
//! stream name, so a test that configures its own stream also gets its own subjects:
//! two streams may not capture overlapping subjects in JetStream.

/// The names one pipeline uses on NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    stream: String,
    root: String,
}

impl Subjects {
    /// Names for the stream called `stream` (e.g. `TELEMETRY`).
    pub fn for_stream(stream: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            root: stream.to_ascii_lowercase(),
        }
    }

    /// The event stream, e.g. `TELEMETRY`.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The dead-letter stream, e.g. `TELEMETRY_DLQ`.
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.stream)
    }

    /// What the event stream captures, e.g. `telemetry.recorded.>`.
    pub fn recorded_filter(&self) -> String {
        format!("{}.recorded.>", self.root)
    }

    /// What the dead-letter stream captures, e.g. `telemetry.dlq.>`.
    pub fn dlq_filter(&self) -> String {
        format!("{}.dlq.>", self.root)
    }

    /// Where one device's events go, e.g. `telemetry.recorded.sensor-0042`.
    pub fn recorded(&self, device_id: &str) -> String {
        format!("{}.recorded.{device_id}", self.root)
    }

    /// Where a dead-lettered message goes; `unknown` when its device is not known.
    pub fn dlq(&self, device_id: Option<&str>) -> String {
        format!("{}.dlq.{}", self.root, device_id.unwrap_or("unknown"))
    }
}

/// The device a recorded or dead-letter subject names: the last of its three tokens
/// (`telemetry.recorded.sensor-0042` → `sensor-0042`). A stream name and a device id
/// hold no `.`, so a subject of any other number of tokens names no device: `None`
/// (`telemetry.recorded.a.b`, published by hand, would otherwise pass for device `b`'s).
/// What the token holds is not checked here.
pub fn device_token(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some(_), Some(_), Some(device), None) => Some(device),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_token_is_what_the_subject_was_made_with() {
        let subjects = Subjects::for_stream("TELEMETRY");
        assert_eq!(
            device_token(&subjects.recorded("sensor-0042")),
            Some("sensor-0042")
        );
        assert_eq!(
            device_token(&subjects.dlq(Some("sensor-7"))),
            Some("sensor-7")
        );
        assert_eq!(device_token(&subjects.dlq(None)), Some("unknown"));
        assert_eq!(device_token("telemetry.recorded.a.b"), None);
        assert_eq!(device_token("telemetry.recorded"), None);
    }

    #[test]
    fn default_stream_gives_the_documented_subjects() {
        let subjects = Subjects::for_stream("TELEMETRY");
        assert_eq!(
            subjects.recorded("sensor-0042"),
            "telemetry.recorded.sensor-0042"
        );
        assert_eq!(subjects.dlq(None), "telemetry.dlq.unknown");
        assert_eq!(subjects.dlq_stream(), "TELEMETRY_DLQ");
        assert_eq!(subjects.recorded_filter(), "telemetry.recorded.>");
    }
}

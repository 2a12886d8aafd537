//! The dead-letter stream for operators: what is in it and why, and re-driving chosen
//! messages to the live subject once the projector can handle them (`projector dlq`).

use anyhow::{bail, Context};
use async_nats::jetstream;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use contract::event::{headers, DecodeError};
use contract::subjects::{device_token, Subjects};
use time::OffsetDateTime;

/// Why a message goes to the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// It is no event the projector may apply (API.md §6): undecodable, of an unknown
    /// version, or invalid.
    Decode(DecodeError),
    /// Redis refused every call applying it, with this error, until it had been
    /// delivered [`crate::consumer::DELIVERIES_BEFORE_REFUSED_IS_DEAD`] times: its
    /// device's keys hold what the scripts cannot work on (a key of another type, a
    /// field written by something else). Re-driven once they are mended.
    Refused(String),
}

impl Reason {
    /// [`Reason::Refused`]'s label.
    const REFUSED: &'static str = "refused";

    /// Every [`Reason::label`], as `projector_dlq_total` labels its series: the decode
    /// errors' reasons, then `refused`.
    pub fn labels() -> impl Iterator<Item = &'static str> {
        DecodeError::REASONS.into_iter().chain([Self::REFUSED])
    }

    /// The short reason, first in the `Dlq-Reason` header.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Decode(error) => error.reason(),
            Self::Refused(_) => Self::REFUSED,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decode(error) => error.fmt(formatter),
            Self::Refused(error) => write!(formatter, "refused: {error}"),
        }
    }
}

impl From<DecodeError> for Reason {
    fn from(error: DecodeError) -> Self {
        Self::Decode(error)
    }
}

/// The most of its payload a stripped dead letter holds: enough to tell what the message
/// was (the original stays in the event stream, at its `Dlq-Stream-Sequence`).
pub const STRIPPED_PAYLOAD_MAX: usize = 4096;

/// The longest header value a dead letter gets from text it did not choose (a reason
/// quoting the message, a server's error), in bytes.
pub const HEADER_VALUE_MAX: usize = 256;

/// `text` as a NATS header value: control characters escaped (`\r`, `\n`, `\u{1b}`: a
/// line break would end the header, and async-nats panics on one) and cut to
/// [`HEADER_VALUE_MAX`] bytes at a character boundary.
pub fn header_value(text: &str) -> String {
    let mut value = String::with_capacity(text.len().min(HEADER_VALUE_MAX));
    for character in text.chars() {
        let before = value.len();
        if character.is_control() {
            value.extend(character.escape_default());
        } else {
            value.push(character);
        }
        if value.len() > HEADER_VALUE_MAX {
            // An escape is not split: the character goes whole or not at all.
            value.truncate(before);
            break;
        }
    }
    value
}

/// Whether a header of a poison message goes on to its dead letter. JetStream's own
/// (`Nats-*`) do not: they are directives to the server that takes the publish
/// (`Nats-Expected-Stream`, `Nats-Expected-Last-*`, `Nats-Rollup`, `Nats-TTL`, ...),
/// which the DLQ stream would act on or refuse the copy for, every time; and the dead
/// letter gets a `Nats-Msg-Id` of its own. Nor do `Dlq-*` headers: the dead letter's
/// are its own, and a re-drive drops them all.
pub fn goes_on_to_dead_letter(name: &str) -> bool {
    let has_prefix = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    };
    !has_prefix("Nats-") && !has_prefix("Dlq-")
}

/// Whether the DLQ stream refused a dead letter for good, so that publishing the same
/// copy again would fail again: it exceeds the server's max_payload, or the server
/// answered the publish with an error. Not so when no answer came (NATS unreachable, no
/// ack in time) or nothing listens on the subject (no DLQ stream yet).
pub fn refused_for_good(error: &PublishError) -> bool {
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => true,
        PublishErrorKind::Other => {
            std::error::Error::source(error).is_some_and(|source| source.is::<jetstream::Error>())
        }
        _ => false,
    }
}

/// The dead letter of one poison message: its headers naming the reason and the origin,
/// and its `Nats-Msg-Id`, the same for every attempt, so that the DLQ stream keeps one
/// copy when a message is dead-lettered again (its termination was lost). The id names
/// the message's stored time with its sequence: sequences come again when the stream
/// starts over (made again, a NATS host that lost its newest messages), and a poison
/// message at a sequence another had within the DLQ stream's duplicate window was
/// dropped as its copy, then terminated, until 2026-12-06.
#[derive(Debug)]
pub struct DeadLetterCopy {
    headers: HeaderMap,
}

impl DeadLetterCopy {
    /// The dead letter of the message at `stream_sequence` of `stream`, stored then.
    pub fn new(
        stream: &str,
        stream_sequence: u64,
        stored_at: OffsetDateTime,
        reason: &Reason,
    ) -> Self {
        let mut letter = HeaderMap::new();
        // The original id must not make JetStream drop this copy as a duplicate.
        let stored_ns = stored_at.unix_timestamp_nanos();
        letter.insert(
            headers::MSG_ID,
            header_value(&format!("dlq-{stream}-{stream_sequence}-{stored_ns}")).as_str(),
        );
        letter.insert(
            headers::DLQ_REASON,
            header_value(&reason.to_string()).as_str(),
        );
        letter.insert(headers::DLQ_STREAM, header_value(stream).as_str());
        letter.insert(
            headers::DLQ_STREAM_SEQUENCE,
            stream_sequence.to_string().as_str(),
        );
        Self { headers: letter }
    }

    /// The headers of the copy with the original's headers (but JetStream's, see
    /// [`goes_on_to_dead_letter`]) and the dead letter's own; its payload is the
    /// original's.
    pub fn full(&self, original: Option<&HeaderMap>) -> HeaderMap {
        // The dead letter's own headers are `Nats-Msg-Id` and `Dlq-*`, none of which
        // goes on from the original: no name is in both.
        let mut copy = self.headers.clone();
        for (name, values) in original.into_iter().flat_map(HeaderMap::iter) {
            if !goes_on_to_dead_letter(name.as_ref()) {
                continue;
            }
            for value in values {
                copy.append(name.clone(), value.clone());
            }
        }
        copy
    }

    /// The copy that goes when the DLQ stream refused the full one with `refusal`: the
    /// dead letter's own headers, why, the payload's size, and the payload's first
    /// [`STRIPPED_PAYLOAD_MAX`] bytes.
    pub fn stripped(&self, refusal: &str, payload: &Bytes) -> (HeaderMap, Bytes) {
        let mut copy = self.headers.clone();
        copy.insert(headers::DLQ_STRIPPED, header_value(refusal).as_str());
        copy.insert(
            headers::DLQ_PAYLOAD_BYTES,
            payload.len().to_string().as_str(),
        );
        (
            copy,
            payload.slice(..payload.len().min(STRIPPED_PAYLOAD_MAX)),
        )
    }
}

/// One dead-lettered message as `projector dlq list` shows it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub sequence: u64,
    pub subject: String,
    pub reason: String,
    pub original_sequence: Option<u64>,
    pub payload_preview: String,
}

/// Up to `limit` dead letters, oldest first.
pub async fn list(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limit: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut stream = jetstream
        .get_stream(subjects.dlq_stream())
        .await
        .with_context(|| format!("opening {}", subjects.dlq_stream()))?;
    let state = stream.info().await?.state.clone();
    let mut letters = Vec::new();
    let mut sequence = state.first_sequence;
    while sequence <= state.last_sequence && letters.len() < limit && state.messages > 0 {
        // Deleted (re-driven) sequences are gaps: skip them.
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|value| value.as_str().to_owned())
            };
            let preview: String = String::from_utf8_lossy(&message.payload)
                .chars()
                .take(120)
                .collect();
            letters.push(DeadLetter {
                sequence,
                subject: message.subject.to_string(),
                reason: header(headers::DLQ_REASON).unwrap_or_default(),
                original_sequence: header(headers::DLQ_STREAM_SEQUENCE)
                    .and_then(|text| text.parse().ok()),
                payload_preview: preview,
            });
        }
        sequence += 1;
    }
    Ok(letters)
}

/// Publishes dead letter `sequence` again on its device's live subject (without the DLQ
/// headers) and removes it from the DLQ; returns its new sequence in the event stream.
/// The projector skips it if its event id was applied already, so re-driving twice is
/// harmless.
pub async fn redrive(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    sequence: u64,
) -> anyhow::Result<u64> {
    let dlq = jetstream.get_stream(subjects.dlq_stream()).await?;
    let message = dlq
        .get_raw_message(sequence)
        .await
        .with_context(|| format!("no dead letter at sequence {sequence}"))?;
    let kept_bytes = message
        .headers
        .get(headers::DLQ_PAYLOAD_BYTES)
        .and_then(|value| value.as_str().parse::<usize>().ok());
    if let Some(original_bytes) = kept_bytes.filter(|bytes| *bytes > message.payload.len()) {
        bail!(
            "dead letter {sequence} holds only the first {} of its {original_bytes} bytes; the whole message is in the event stream at its {}",
            message.payload.len(),
            headers::DLQ_STREAM_SEQUENCE
        );
    }
    let Some(device_id) =
        device_token(&message.subject).filter(|device_id| *device_id != "unknown")
    else {
        bail!(
            "dead letter {sequence} names no device ({}); it cannot be re-driven",
            message.subject
        );
    };
    let mut republished = async_nats::HeaderMap::new();
    for (name, values) in message.headers.iter() {
        let name = name.to_string();
        if name.starts_with("Dlq-") || name == headers::MSG_ID {
            continue;
        }
        for value in values {
            republished.append(name.as_str(), value.as_str());
        }
    }
    // The letter's stored time as well as its sequence: a dead-letter stream made again
    // (the projector makes a missing one) numbers its letters from 1 anew, and a letter
    // re-driven within the duplicate window of an earlier one at the same sequence was
    // taken for that one's copy, and deleted, its event lost. The same letter re-driven
    // again (its deletion failed) is still the same message.
    let message_id = format!(
        "redrive-{}-{sequence}-{}",
        subjects.dlq_stream(),
        message.time.unix_timestamp_nanos()
    );
    republished.insert(headers::MSG_ID, message_id.as_str());
    let ack = jetstream
        .publish_with_headers(
            subjects.recorded(device_id),
            republished,
            message.payload.clone(),
        )
        .await?
        .await
        .context("the event stream did not acknowledge the re-driven message")?;
    dlq.delete_message(sequence).await.with_context(|| {
        format!(
            "re-driven as {}, but removing dead letter {sequence} failed",
            ack.sequence
        )
    })?;
    Ok(ack.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_label_listed_and_leads_its_header_with_it() {
        let reasons = [
            Reason::Decode(DecodeError::Undecodable("eof".to_owned())),
            Reason::Decode(DecodeError::UnknownVersion("9".to_owned())),
            Reason::Decode(DecodeError::Invalid("nan".to_owned())),
            Reason::Refused("WRONGTYPE Operation against a key".to_owned()),
        ];
        let labels: Vec<&str> = reasons.iter().map(Reason::label).collect();
        assert_eq!(labels, Reason::labels().collect::<Vec<_>>());
        for reason in &reasons {
            assert!(
                reason
                    .to_string()
                    .starts_with(&format!("{}: ", reason.label())),
                "{reason}"
            );
        }
    }

    #[test]
    fn a_header_value_has_its_control_characters_escaped_and_is_cut_at_a_character() {
        assert_eq!(
            header_value("invalid: event_type telemetry.recorded\r\nX: 1\t\u{1b}"),
            "invalid: event_type telemetry.recorded\\r\\nX: 1\\t\\u{1b}"
        );
        assert_eq!(
            header_value("plain \"quoted\" text"),
            "plain \"quoted\" text"
        );
        let long = "é".repeat(HEADER_VALUE_MAX);
        let cut = header_value(&long);
        assert_eq!(cut.len(), HEADER_VALUE_MAX, "128 two-byte characters");
        let breaks = "\n".repeat(HEADER_VALUE_MAX);
        let cut = header_value(&breaks);
        assert_eq!(cut, "\\n".repeat(HEADER_VALUE_MAX / 2), "no escape split");
    }

    fn reason() -> Reason {
        Reason::Decode(DecodeError::Invalid(
            "event_type telemetry.recorded\r\nX: 1".to_owned(),
        ))
    }

    /// When the message at sequence 42 was stored.
    fn stored_at() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_764_930_000_123_456_789).expect("in range")
    }

    #[test]
    fn a_dead_letters_id_is_its_messages_alone_also_when_the_stream_reuses_its_sequence() {
        let id = |stored_at| {
            DeadLetterCopy::new("TELEMETRY", 42, stored_at, &reason())
                .full(None)
                .get(headers::MSG_ID)
                .map(|value| value.as_str().to_owned())
        };
        assert_eq!(id(stored_at()), id(stored_at()), "dead-lettered again");
        assert_ne!(
            id(stored_at()),
            id(stored_at() + time::Duration::nanoseconds(1)),
            "another message at the sequence, after the stream started over"
        );
    }

    #[test]
    fn a_full_copy_keeps_the_original_headers_but_jetstreams_own() {
        let mut original = HeaderMap::new();
        original.insert(headers::MSG_ID, "event-1");
        original.insert(headers::EVENT_TYPE, "telemetry.recorded");
        original.insert("Nats-Expected-Stream", "TELEMETRY");
        original.insert("nats-rollup", "sub");
        original.insert("Nats-TTL", "1s");
        original.insert(headers::DLQ_REASON, "forged");
        let copy =
            DeadLetterCopy::new("TELEMETRY", 42, stored_at(), &reason()).full(Some(&original));
        let value = |name: &str| copy.get(name).map(|value| value.as_str().to_owned());
        assert_eq!(
            value(headers::EVENT_TYPE).as_deref(),
            Some("telemetry.recorded")
        );
        assert_eq!(
            value(headers::MSG_ID).as_deref(),
            Some("dlq-TELEMETRY-42-1764930000123456789")
        );
        for directive in ["Nats-Expected-Stream", "nats-rollup", "Nats-TTL"] {
            assert_eq!(value(directive), None, "{directive}");
        }
        assert_eq!(
            value(headers::DLQ_REASON).as_deref(),
            Some("invalid: event_type telemetry.recorded\\r\\nX: 1")
        );
        assert_eq!(
            copy.get_all(headers::DLQ_REASON).count(),
            1,
            "the poison's own Dlq-* headers are not kept"
        );
        assert_eq!(value(headers::DLQ_STREAM_SEQUENCE).as_deref(), Some("42"));
        let bare = DeadLetterCopy::new("TELEMETRY", 42, stored_at(), &reason()).full(None);
        assert_eq!(bare.iter().count(), 4);
    }

    #[test]
    fn a_stripped_copy_has_the_dead_letters_headers_why_and_the_payloads_start() {
        let letter = DeadLetterCopy::new("TELEMETRY", 42, stored_at(), &reason());
        let payload = Bytes::from(vec![b'x'; 2 * STRIPPED_PAYLOAD_MAX]);
        let (copy, kept) = letter.stripped("max payload size exceeded", &payload);
        assert_eq!(kept.len(), STRIPPED_PAYLOAD_MAX);
        let value = |name: &str| copy.get(name).map(|value| value.as_str().to_owned());
        assert_eq!(
            value(headers::DLQ_PAYLOAD_BYTES),
            Some((2 * STRIPPED_PAYLOAD_MAX).to_string())
        );
        assert_eq!(
            value(headers::DLQ_STRIPPED).as_deref(),
            Some("max payload size exceeded")
        );
        assert_eq!(
            value(headers::MSG_ID).as_deref(),
            Some("dlq-TELEMETRY-42-1764930000123456789")
        );
        let (_, small) = letter.stripped("refused", &Bytes::from_static(b"not json"));
        assert_eq!(&small[..], b"not json");
    }

    #[test]
    fn only_a_servers_refusal_or_an_oversized_copy_is_refused_for_good() {
        let api_error: jetstream::Error = serde_json::from_str(
            r#"{"code":400,"err_code":10060,"description":"expected stream does not match"}"#,
        )
        .expect("api error");
        let refused = [
            PublishError::new(PublishErrorKind::MaxPayloadExceeded),
            PublishError::with_source(PublishErrorKind::Other, api_error),
            PublishError::new(PublishErrorKind::WrongLastSequence),
        ];
        for error in &refused {
            assert!(refused_for_good(error), "{error}");
        }
        let not_yet = [
            PublishError::new(PublishErrorKind::TimedOut),
            PublishError::new(PublishErrorKind::StreamNotFound),
            PublishError::new(PublishErrorKind::BrokenPipe),
            PublishError::with_source(PublishErrorKind::Other, "connection closed"),
        ];
        for error in &not_yet {
            assert!(!refused_for_good(error), "{error}");
        }
    }
}

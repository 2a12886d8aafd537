//! The dead-letter stream for operators: what is in it and why, and re-driving chosen
//! messages to the live subject once the projector can handle them (`projector dlq`).

use anyhow::{bail, Context};
use async_nats::jetstream;
use contract::event::headers;
use contract::subjects::{device_token, Subjects};

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
    let device_id = device_token(&message.subject);
    if device_id == "unknown" {
        bail!(
            "dead letter {sequence} names no device ({}); it cannot be re-driven",
            message.subject
        );
    }
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
    let message_id = format!("redrive-{}-{sequence}", subjects.dlq_stream());
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

//! JetStream: the publish limit (pipelined acks into a throw-away stream), consumer
//! backlog readings, and deleting the streams a bench created.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use contract::event::{headers, TelemetryRecorded, EVENT_TYPE, VERSION};
use contract::settings::connecting_to;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::stats::{per_second, Latency};

/// Most un-awaited PubAcks: async-nats 0.51 caps them at 5,000 and hangs beyond.
pub const MAX_WINDOW: usize = 2_000;

pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    ingest::bootstrap::nats_options(url)
        .name("loadgen")
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| connecting_to("NATS", url))
}

/// Subjects of the throw-away stream: `<lowercase name>.x.>`.
pub fn throwaway_filter(stream: &str) -> String {
    format!("{}.x.>", stream.to_ascii_lowercase())
}

/// Publishes `count` event-sized messages with the relay's headers into a stream it
/// creates (file storage, like the pipeline's) and deletes afterwards, awaiting the
/// PubAcks in a sliding window of at most [`MAX_WINDOW`].
pub async fn publish_limit(
    url: &str,
    stream_name: &str,
    count: u64,
    window: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let client = connect(url).await?;
    let jetstream = jetstream::new(client.clone());
    if jetstream.get_stream(stream_name).await.is_ok() {
        eprintln!(
            "loadgen: stream {stream_name} exists (left over from an earlier run); recreating it"
        );
        jetstream.delete_stream(stream_name).await?;
    }
    jetstream
        .create_stream(stream::Config {
            name: stream_name.to_owned(),
            subjects: vec![throwaway_filter(stream_name)],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {stream_name}"))?;
    let result = tokio::time::timeout(
        timeout,
        publish_all(&jetstream, stream_name, count, window.clamp(1, MAX_WINDOW)),
    )
    .await;
    let deleted = jetstream.delete_stream(stream_name).await;
    let _ = client.flush().await;
    let report = match result {
        Ok(report) => report?,
        Err(_) => bail!("publishing {count} messages took longer than {timeout:?}"),
    };
    deleted.with_context(|| format!("deleting stream {stream_name}"))?;
    Ok(report)
}

async fn publish_all(
    jetstream: &jetstream::Context,
    stream_name: &str,
    count: u64,
    window: usize,
) -> anyhow::Result<Value> {
    let root = stream_name.to_ascii_lowercase();
    let now = OffsetDateTime::now_utc();
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert("temperature".to_owned(), 21.53);
    metrics.insert("humidity".to_owned(), 40.2);
    metrics.insert("battery".to_owned(), 3.871);
    let payload: bytes::Bytes = TelemetryRecorded::new(
        Uuid::now_v7(),
        "bench-dev-4242".to_owned(),
        now,
        now,
        metrics,
    )
    .to_json()
    .into();
    let mut pending = VecDeque::with_capacity(window);
    let mut ack_latency = Latency::new();
    let (mut acked, mut duplicates) = (0u64, 0u64);
    let started = Instant::now();
    for i in 0..count {
        let mut message_headers = async_nats::HeaderMap::new();
        message_headers.insert(headers::MSG_ID, Uuid::now_v7().to_string().as_str());
        message_headers.insert(headers::CONTENT_TYPE, "application/json");
        message_headers.insert(headers::EVENT_TYPE, EVENT_TYPE);
        message_headers.insert(headers::EVENT_VERSION, VERSION.to_string().as_str());
        let future = jetstream
            .publish_with_headers(
                format!("{root}.x.bench-dev-{}", i % 1000),
                message_headers,
                payload.clone(),
            )
            .await
            .context("publishing")?;
        pending.push_back((Instant::now(), future));
        if pending.len() >= window {
            if let Some((sent, future)) = pending.pop_front() {
                let ack = future.await.context("awaiting a PubAck")?;
                ack_latency.record(sent.elapsed());
                acked += 1;
                duplicates += u64::from(ack.duplicate);
            }
        }
    }
    while let Some((sent, future)) = pending.pop_front() {
        let ack = future.await.context("awaiting a PubAck")?;
        ack_latency.record(sent.elapsed());
        acked += 1;
        duplicates += u64::from(ack.duplicate);
    }
    let elapsed = started.elapsed();
    Ok(json!({
        "stream": stream_name,
        "messages": count,
        "acked": acked,
        "duplicates": duplicates,
        "payload_bytes": payload.len(),
        "window": window,
        "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "msgs_per_s": per_second(acked, elapsed),
        "ack_latency": ack_latency.summary(),
    }))
}

/// `num_pending + num_ack_pending` of a consumer; `None` while the stream or the
/// consumer does not exist.
pub async fn consumer_backlog(
    jetstream: &jetstream::Context,
    stream_name: &str,
    consumer: &str,
) -> Option<u64> {
    let stream = jetstream.get_stream(stream_name).await.ok()?;
    let info = stream.consumer_info(consumer).await.ok()?;
    Some(info.num_pending + info.num_ack_pending as u64)
}

/// Deletes the named streams; a stream that does not exist is fine.
pub async fn delete_streams(url: &str, names: &[String]) -> anyhow::Result<Vec<String>> {
    let client = connect(url).await?;
    let jetstream = jetstream::new(client.clone());
    let mut deleted = Vec::new();
    for name in names {
        if jetstream.get_stream(name).await.is_ok() {
            jetstream
                .delete_stream(name)
                .await
                .with_context(|| format!("deleting stream {name}"))?;
            deleted.push(name.clone());
        }
    }
    let _ = client.flush().await;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throwaway_subjects_are_rooted_at_the_lowercase_name() {
        assert_eq!(throwaway_filter("BENCH_PUB"), "bench_pub.x.>");
    }
}

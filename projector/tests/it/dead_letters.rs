//! Poison messages: to the DLQ stream with their reason, terminated, never blocking the
//! events behind them (API.md §6).

use std::time::Duration;

use async_nats::HeaderMap;
use contract::event::headers;
use testkit::{eventually, TestEnv};

use crate::support::{
    consumer_info, drained, event, now_ms, publish, publish_raw, reference, relay_headers,
    stream_messages, streams, Projector, CATCH_UP,
};

#[tokio::test]
async fn poison_messages_go_to_the_dlq_with_their_reason_and_the_next_event_is_still_projected() {
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    settings.projector.ack_wait_secs = 1;
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&settings).await;
    let base = now_ms() - 60_000;
    let good_before = event("sensor-1", base, &[("temperature", 20.0)]);
    let good_after = event("sensor-1", base + 1, &[("temperature", 21.0)]);
    let newer = event("sensor-2", base + 2, &[("temperature", 99.0)]);
    let mut version_2: serde_json::Value =
        serde_json::from_slice(&newer.to_json()).expect("event json");
    version_2["version"] = 2.into();
    let mut version_2_headers = relay_headers("v2-payload");
    version_2_headers.insert(headers::EVENT_VERSION, "2");
    let mut no_version_header = HeaderMap::new();
    no_version_header.insert(headers::MSG_ID, "v2-no-header");

    publish(&env, &jetstream, &good_before).await;
    // (payload, subject, headers, expected DLQ subject, expected reason)
    let poison = [
        (
            b"not json at all".to_vec(),
            env.subjects.recorded("sensor-1"),
            relay_headers("garbage"),
            env.subjects.dlq(Some("sensor-1")),
            "undecodable",
        ),
        (
            b"{\"event_id\": 42".to_vec(),
            // Not a valid device id: the DLQ subject says `unknown`.
            format!(
                "{}.recorded.bad!id",
                env.subjects.stream().to_ascii_lowercase()
            ),
            relay_headers("truncated"),
            env.subjects.dlq(None),
            "undecodable",
        ),
        (
            serde_json::to_vec(&version_2).expect("json"),
            env.subjects.recorded("sensor-2"),
            version_2_headers,
            env.subjects.dlq(Some("sensor-2")),
            "unknown-version",
        ),
        (
            serde_json::to_vec(&version_2).expect("json"),
            env.subjects.recorded("sensor-2"),
            no_version_header,
            env.subjects.dlq(Some("sensor-2")),
            "unknown-version",
        ),
        (
            newer.to_json(),
            env.subjects.recorded("sensor-2"),
            {
                let mut future_header = relay_headers("v1-payload-v2-header");
                future_header.insert(headers::EVENT_VERSION, "2");
                future_header
            },
            env.subjects.dlq(Some("sensor-2")),
            "unknown-version",
        ),
    ];
    let mut poison_sequences = Vec::new();
    for (payload, subject, message_headers, _, _) in &poison {
        let ack = publish_raw(
            &jetstream,
            subject.clone(),
            message_headers.clone(),
            payload.clone(),
        )
        .await;
        poison_sequences.push(ack.sequence);
    }
    let last_sequence = publish(&env, &jetstream, &good_after).await;

    // The good event behind the poison is projected.
    let expected = reference([&good_before, &good_after]);
    let stats = eventually(CATCH_UP, "the event after the poison", || async {
        env.device_stats("sensor-1")
            .await
            .filter(|stats| stats.sample_count == 2)
    })
    .await;
    crate::support::assert_figures("sensor-1", &stats, &expected["sensor-1"]);
    assert_eq!(
        env.device_stats("sensor-2").await,
        None,
        "nothing of the poison reached the read model"
    );

    // Every poison message is in the DLQ, once, with its reason and origin.
    let dlq_stream = env.subjects.dlq_stream();
    eventually(CATCH_UP, "every poison message dead-lettered", || async {
        (stream_messages(&jetstream, &dlq_stream).await == poison.len() as u64).then_some(())
    })
    .await;
    let dlq = jetstream.get_stream(&dlq_stream).await.expect("dlq stream");
    for (index, ((payload, _, _, dlq_subject, reason), sequence)) in
        poison.iter().zip(&poison_sequences).enumerate()
    {
        let message = dlq
            .get_raw_message(index as u64 + 1)
            .await
            .expect("dlq message");
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(message.subject.as_str(), dlq_subject, "poison #{index}");
        assert!(
            header(headers::DLQ_REASON).starts_with(reason),
            "poison #{index}: reason {:?} is not {reason}",
            header(headers::DLQ_REASON)
        );
        assert_eq!(header(headers::DLQ_STREAM), env.subjects.stream());
        assert_eq!(header(headers::DLQ_STREAM_SEQUENCE), sequence.to_string());
        assert_eq!(
            &message.payload[..],
            &payload[..],
            "poison #{index}: payload kept"
        );
    }

    // Terminated, not left to be redelivered: everything acked, nothing pending, and
    // still so after the (1 s) ack wait has passed. Only waiting can show an absence.
    let info = drained(&env, &jetstream, last_sequence).await;
    assert_eq!(info.num_redelivered, 0);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let info = consumer_info(&env, &jetstream).await;
    assert_eq!(info.num_redelivered, 0, "no poison message came back");
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.delivered.consumer_sequence, last_sequence);
    assert_eq!(
        stream_messages(&jetstream, &dlq_stream).await,
        poison.len() as u64
    );
    projector.stop().await;
}

//! Poison messages: to the DLQ stream with their reason, terminated, never blocking the
//! events behind them (API.md §6).

use std::time::Duration;

use async_nats::HeaderMap;
use contract::event::headers;
use futures::StreamExt;
use testkit::process::ServiceProcess;
use testkit::{eventually, TestEnv};

use crate::support::{
    assert_same_figures, consumer_info, drained, event, live_generation, now_ms, projector_process,
    publish, publish_raw, reference, relay_headers, stored_message, stream_messages, streams,
    Projector, Sums, CATCH_UP,
};

#[tokio::test]
async fn poison_messages_go_to_the_dlq_with_their_reason_and_the_next_event_is_still_projected() {
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    settings.projector.ack_wait_secs = 1;
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&settings).await;
    // Its read model first: the good events would otherwise wait for the first build,
    // maybe past the 1 s ack wait, and come again (the test counts deliveries).
    live_generation(&env).await;
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

    // Sound events that break the contract: one under another device's subject (where
    // `nats stream view --subject` would never show it), one with more metrics than a
    // reading may carry.
    let misfiled = event("sensor-2", base + 3, &[("temperature", 50.0)]);
    let names: Vec<String> = (0..=contract::reading::METRICS_MAX)
        .map(|index| format!("m{index}"))
        .collect();
    let too_many: Vec<(&str, f64)> = names.iter().map(|name| (name.as_str(), 1.0)).collect();
    let overfull = event("sensor-2", base + 4, &too_many);
    // Dated two days ahead (a hand-made `nats pub`): counted, it would hold the device's
    // `last` and `last_seen` until then; more than a day after its storage is invalid.
    let dated_ahead = event(
        "sensor-2",
        now_ms() + 2 * 86_400_000,
        &[("temperature", 60.0)],
    );

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
        (
            misfiled.to_json(),
            env.subjects.recorded("sensor-3"),
            relay_headers("misfiled"),
            env.subjects.dlq(Some("sensor-2")),
            "invalid",
        ),
        (
            // Its device's subject with a token before it: under no device's subject.
            misfiled.to_json(),
            env.subjects.recorded("sensor-3.sensor-2"),
            relay_headers("misfiled-deeper"),
            env.subjects.dlq(Some("sensor-2")),
            "invalid",
        ),
        (
            overfull.to_json(),
            env.subjects.recorded("sensor-2"),
            relay_headers("overfull"),
            env.subjects.dlq(Some("sensor-2")),
            "invalid",
        ),
        (
            dated_ahead.to_json(),
            env.subjects.recorded("sensor-2"),
            relay_headers("dated-ahead"),
            env.subjects.dlq(Some("sensor-2")),
            "invalid",
        ),
        (
            as_array(&newer),
            env.subjects.recorded("sensor-2"),
            relay_headers("as-array"),
            // Named by its subject: the array's first field is the event id.
            env.subjects.dlq(Some("sensor-2")),
            "undecodable",
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
    let stats = sensor_1_counted(&env, 2, CATCH_UP, "the event after the poison").await;
    assert_same_figures("sensor-1", &stats, &expected["sensor-1"], Sums::Exact);
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
    // Matched by the original sequence they name: batches are applied concurrently, so
    // the DLQ's order need not be the stream's.
    let dlq = jetstream.get_stream(&dlq_stream).await.expect("dlq stream");
    let mut dead_letters = std::collections::BTreeMap::new();
    for dlq_sequence in 1..=poison.len() as u64 {
        let message = dlq
            .get_raw_message(dlq_sequence)
            .await
            .expect("dlq message");
        let original = message
            .headers
            .get(headers::DLQ_STREAM_SEQUENCE)
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default();
        dead_letters.insert(original, message);
    }
    for (index, ((payload, _, _, dlq_subject, reason), sequence)) in
        poison.iter().zip(&poison_sequences).enumerate()
    {
        let message = dead_letters
            .get(&sequence.to_string())
            .unwrap_or_else(|| panic!("poison #{index} (sequence {sequence}) is in the DLQ"));
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
        assert_eq!(
            &message.payload[..],
            &payload[..],
            "poison #{index}: payload kept"
        );
    }

    // Terminated, not left to be redelivered: everything acked, nothing pending, and
    // still so after the (1 s) ack wait has passed twice: nothing delivered meanwhile.
    // Only waiting can show an absence. (A delivery that a loaded box did not ack
    // within 1 s came again before; that is no poison message coming back.)
    let before = drained(&env, &jetstream, last_sequence).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let info = consumer_info(&env, &jetstream).await;
    assert_eq!(
        info.delivered.consumer_sequence, before.delivered.consumer_sequence,
        "no poison message came back"
    );
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(
        stream_messages(&jetstream, &dlq_stream).await,
        poison.len() as u64
    );
    projector.stop().await;
}

#[tokio::test]
async fn a_dead_letter_is_listed_with_its_reason_and_redriven_to_its_live_subject() {
    let env = TestEnv::new();
    let jetstream = crate::support::streams(&env).await;
    let projector = crate::support::Projector::spawn(&env.settings).await;
    let poisoned = crate::support::event(
        "sensor-7",
        crate::support::now_ms(),
        &[("temperature", 1.0)],
    );
    let mut poison_headers = crate::support::relay_headers(&poisoned.event_id.to_string());
    poison_headers.insert("Event-Version", "9");
    let original = crate::support::publish_raw(
        &jetstream,
        env.subjects.recorded("sensor-7"),
        poison_headers,
        poisoned.to_json(),
    )
    .await;

    let letters = testkit::eventually(
        crate::support::CATCH_UP,
        "the poison in the DLQ",
        || async {
            let letters = projector::dlq::list(&jetstream, &env.subjects, 10)
                .await
                .ok()?;
            (!letters.is_empty()).then_some(letters)
        },
    )
    .await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.subject, env.subjects.dlq(Some("sensor-7")));
    assert!(
        letter.reason.starts_with("unknown-version"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.original_sequence, Some(original.sequence));

    let live_sequence = projector::dlq::redrive(&jetstream, &env.subjects, letter.sequence)
        .await
        .expect("re-driven");
    assert!(live_sequence > original.sequence);
    let redriven =
        crate::support::stored_message(&jetstream, env.subjects.stream(), live_sequence).await;
    assert_eq!(redriven.subject.as_str(), env.subjects.recorded("sensor-7"));
    assert_eq!(redriven.payload, poisoned.to_json());
    assert!(
        redriven.headers.get("Dlq-Reason").is_none(),
        "the DLQ headers are stripped"
    );
    assert_eq!(
        redriven
            .headers
            .get("Event-Version")
            .map(|value| value.as_str().to_owned())
            .as_deref(),
        Some("9"),
        "the original headers travel on"
    );
    // Gone from the DLQ until the projector (still unable to read version 9) puts it back.
    let after = projector::dlq::list(&jetstream, &env.subjects, 10)
        .await
        .expect("list");
    assert!(after
        .iter()
        .all(|letter| letter.original_sequence != Some(original.sequence)));
    let again = testkit::eventually(
        crate::support::CATCH_UP,
        "the still-poisoned copy back in the DLQ",
        || async {
            let letters = projector::dlq::list(&jetstream, &env.subjects, 10)
                .await
                .ok()?;
            letters
                .into_iter()
                .find(|letter| letter.original_sequence == Some(live_sequence))
        },
    )
    .await;
    assert!(again.reason.starts_with("unknown-version"));
    assert!(
        projector::dlq::redrive(&jetstream, &env.subjects, letter.sequence)
            .await
            .is_err(),
        "a dead letter is re-driven once"
    );
    projector.stop().await;
}

/// A dead-letter stream made again numbers its letters from 1 anew: a letter re-driven
/// within the duplicate window (2 minutes) of an earlier letter at the same sequence
/// must reach the event stream. It was taken for that letter's copy (the same message
/// id), deleted from the DLQ all the same, and its event was lost (a review of
/// 2026-12-07).
#[tokio::test]
async fn a_letter_at_a_sequence_an_earlier_redriven_letter_had_is_redriven_all_the_same() {
    let env = TestEnv::new();
    let jetstream = crate::support::streams(&env).await;
    let dlq_stream = env.subjects.dlq_stream().to_owned();
    // A reading's event put in the DLQ under its device's subject, as a letter.
    let letter = |device: &'static str| {
        let event =
            crate::support::event(device, crate::support::now_ms(), &[("temperature", 1.0)]);
        let (jetstream, env) = (&jetstream, &env);
        async move {
            let stored = crate::support::publish_raw(
                jetstream,
                env.subjects.dlq(Some(device)),
                crate::support::relay_headers(&event.event_id.to_string()),
                event.to_json(),
            )
            .await;
            (event, stored)
        }
    };
    let (_, stored) = letter("sensor-1").await;
    projector::dlq::redrive(&jetstream, &env.subjects, stored.sequence)
        .await
        .expect("the first letter re-driven");

    // The DLQ stream made again, empty, numbering from 1.
    let config = jetstream
        .get_stream(&dlq_stream)
        .await
        .expect("dlq stream")
        .cached_info()
        .config
        .clone();
    jetstream.delete_stream(&dlq_stream).await.expect("deleted");
    jetstream.create_stream(config).await.expect("made again");
    let (second, stored_again) = letter("sensor-2").await;
    assert_eq!(stored_again.sequence, stored.sequence, "the same sequence");
    let live_sequence = projector::dlq::redrive(&jetstream, &env.subjects, stored_again.sequence)
        .await
        .expect("the second letter re-driven");
    let redriven =
        crate::support::stored_message(&jetstream, env.subjects.stream(), live_sequence).await;
    assert_eq!(
        redriven.payload,
        second.to_json(),
        "the second letter's event reached the event stream, not the first's copy"
    );
}

/// An event's fields as a JSON array, in the order serde's derived struct takes them.
fn as_array(event: &contract::event::TelemetryRecorded) -> Vec<u8> {
    let json: serde_json::Value = serde_json::from_slice(&event.to_json()).expect("event json");
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
    serde_json::to_vec(&fields).expect("json")
}

/// The dead letters in the test's DLQ stream, by the original stream sequence they name.
async fn dead_letters_by_origin(
    jetstream: &async_nats::jetstream::Context,
    env: &TestEnv,
) -> std::collections::BTreeMap<u64, async_nats::jetstream::message::StreamMessage> {
    let dlq = jetstream
        .get_stream(env.subjects.dlq_stream())
        .await
        .expect("dlq stream");
    let last = dlq.get_info().await.expect("dlq info").state.last_sequence;
    let mut letters = std::collections::BTreeMap::new();
    for sequence in 1..=last {
        let Ok(message) = dlq.get_raw_message(sequence).await else {
            continue;
        };
        let original = message
            .headers
            .get(headers::DLQ_STREAM_SEQUENCE)
            .and_then(|value| value.as_str().parse().ok())
            .expect("a dead letter names its original sequence");
        letters.insert(original, message);
    }
    letters
}

/// A header of a dead letter, empty if absent.
fn header(message: &async_nats::jetstream::message::StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .map(|value| value.as_str().to_owned())
        .unwrap_or_default()
}

/// A reason quotes the message's own text (its `event_type`, the character of its
/// `event_id` that is no UUID's), which may hold a line break, and a NATS header value
/// cannot: async-nats panics on one. The dead letter goes out with the reason escaped,
/// and the projector goes on.
#[tokio::test]
async fn a_poison_message_whose_reason_quotes_a_line_break_is_dead_lettered_and_the_projector_goes_on(
) {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&env.settings).await;
    let base = now_ms() - 60_000;
    let sound: serde_json::Value =
        serde_json::from_slice(&event("sensor-1", base, &[("temperature", 1.0)]).to_json())
            .expect("event json");
    let mut forged_type = sound.clone();
    forged_type["event_type"] = "telemetry.recorded\r\nX: 1".into();
    let mut forged_id = sound;
    forged_id["event_id"] = "0190a0b0-0000-7000-8000-00000000000\n".into();
    let poison = [
        (
            forged_type,
            "forged-type",
            "invalid",
            "telemetry.recorded\\r\\nX: 1",
        ),
        (forged_id, "forged-id", "undecodable", "\\n"),
    ];
    let mut sequences = Vec::new();
    for (payload, message_id, _, _) in &poison {
        let ack = publish_raw(
            &jetstream,
            env.subjects.recorded("sensor-1"),
            relay_headers(message_id),
            serde_json::to_vec(payload).expect("json"),
        )
        .await;
        sequences.push(ack.sequence);
    }
    let good = event("sensor-1", base + 1, &[("temperature", 21.0)]);
    let last_sequence = publish(&env, &jetstream, &good).await;

    sensor_1_counted(&env, 1, CATCH_UP, "the event after the poison").await;
    let dlq_stream = env.subjects.dlq_stream();
    eventually(CATCH_UP, "both poison messages dead-lettered", || async {
        (stream_messages(&jetstream, &dlq_stream).await == 2).then_some(())
    })
    .await;
    let letters = dead_letters_by_origin(&jetstream, &env).await;
    for ((_, message_id, reason, escaped), sequence) in poison.iter().zip(&sequences) {
        let letter = &letters[sequence];
        let written = header(letter, headers::DLQ_REASON);
        assert!(
            written.starts_with(reason),
            "{message_id}: reason {written:?} is not {reason}"
        );
        assert!(
            written.contains(escaped),
            "{message_id}: the line break is escaped in {written:?}"
        );
    }
    drained(&env, &jetstream, last_sequence).await;
    // Still running: a later event is projected too.
    publish(
        &env,
        &jetstream,
        &event("sensor-1", base + 2, &[("temperature", 22.0)]),
    )
    .await;
    sensor_1_counted(
        &env,
        2,
        CATCH_UP,
        "an event published after the dead letters",
    )
    .await;
    projector.stop().await;
}

/// Poison the DLQ stream refuses a plain copy of: one published with a header telling
/// JetStream which stream must take it (`Nats-Expected-Stream`, the event stream's
/// name), and one so close to the server's max_payload that the DLQ headers push its
/// copy over. Each is dead-lettered once, the first whole but for JetStream's publish
/// directives, the second stripped to the DLQ headers and the start of its payload, and
/// terminated: not delivered again and again (API.md §6).
#[tokio::test]
async fn poison_the_dlq_refuses_a_plain_copy_of_is_dead_lettered_once_and_terminated() {
    let env = TestEnv::new();
    let mut settings = env.settings.clone();
    settings.projector.ack_wait_secs = 1;
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&settings).await;
    // Its read model first: the good events would otherwise wait for the first build,
    // maybe past the 1 s ack wait, and come again (the test counts deliveries).
    live_generation(&env).await;

    let mut expecting_headers = relay_headers("expects-the-event-stream");
    expecting_headers.insert("Nats-Expected-Stream", env.subjects.stream());
    let expecting = publish_raw(
        &jetstream,
        env.subjects.recorded("sensor-1"),
        expecting_headers,
        b"not json".to_vec(),
    )
    .await;
    // The relay's headers take 112 bytes: the message is 38 bytes short of the limit.
    let max_payload = jetstream.client().server_info().max_payload;
    let big = vec![b'x'; max_payload - 150];
    let oversized = publish_raw(
        &jetstream,
        env.subjects.recorded("sensor-1"),
        relay_headers("fills-max-payload"),
        big.clone(),
    )
    .await;
    let good = event("sensor-1", now_ms() - 1_000, &[("temperature", 21.0)]);
    let last_sequence = publish(&env, &jetstream, &good).await;

    let dlq_stream = env.subjects.dlq_stream();
    eventually(CATCH_UP, "both poison messages dead-lettered", || async {
        (stream_messages(&jetstream, &dlq_stream).await >= 2).then_some(())
    })
    .await;
    let letters = dead_letters_by_origin(&jetstream, &env).await;
    let whole = &letters[&expecting.sequence];
    assert!(header(whole, headers::DLQ_REASON).starts_with("undecodable"));
    assert_eq!(&whole.payload[..], b"not json");
    assert_eq!(
        header(whole, "Nats-Expected-Stream"),
        "",
        "directive dropped"
    );
    assert_eq!(
        header(whole, headers::EVENT_TYPE),
        "telemetry.recorded",
        "the other headers kept"
    );
    let stripped = &letters[&oversized.sequence];
    assert!(header(stripped, headers::DLQ_REASON).starts_with("undecodable"));
    assert_eq!(
        header(stripped, headers::DLQ_PAYLOAD_BYTES),
        big.len().to_string()
    );
    assert!(
        header(stripped, headers::DLQ_STRIPPED).contains("max payload"),
        "{:?}",
        header(stripped, headers::DLQ_STRIPPED)
    );
    assert!(
        !stripped.payload.is_empty()
            && stripped.payload.len() < big.len()
            && big.starts_with(&stripped.payload),
        "the start of the payload, {} bytes",
        stripped.payload.len()
    );

    // Terminated, not left to be redelivered, and dead-lettered once: still so after
    // two (1 s) ack waits. Only waiting can show an absence.
    let before = drained(&env, &jetstream, last_sequence).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let info = consumer_info(&env, &jetstream).await;
    assert_eq!(
        info.delivered.consumer_sequence, before.delivered.consumer_sequence,
        "no poison message came back"
    );
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(stream_messages(&jetstream, &dlq_stream).await, 2);
    assert_eq!(
        env.device_stats("sensor-1")
            .await
            .map(|stats| stats.sample_count),
        Some(1)
    );
    assert!(
        projector::dlq::redrive(&jetstream, &env.subjects, stripped.sequence)
            .await
            .is_err(),
        "a stripped dead letter is not re-driven: its payload is cut"
    );
    projector.stop().await;
}

/// API.md §7: logs are JSON in production, one line per failure naming the event id
/// where there is one. A poison message's line names the `Nats-Msg-Id` the relay gave
/// it, with its stream sequence, device and reason, read from the projector binary's
/// own output.
#[tokio::test]
async fn a_dead_lettered_message_is_one_json_log_line_naming_its_event_id() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let (projector, log) = ServiceProcess::spawn_logged(
        env!("CARGO_BIN_EXE_projector"),
        &env,
        "PIPELINE__PROJECTOR__ADMIN_LISTEN",
        &[("PIPELINE__LOG__FORMAT", "json")],
    );

    let poison = publish_raw(
        &jetstream,
        env.subjects.recorded("sensor-7"),
        relay_headers("poison-event-1"),
        b"not json at all".to_vec(),
    )
    .await;
    let entry = testkit::process::log_entry_until(
        &log,
        Duration::from_secs(15),
        "the projector logged the dead letter",
        "dead-lettering message",
    );
    assert_eq!(entry["level"], "WARN", "{entry}");
    assert_eq!(entry["event_id"], "poison-event-1", "{entry}");
    assert_eq!(entry["stream_sequence"], poison.sequence, "{entry}");
    assert_eq!(entry["device_id"], "sensor-7", "{entry}");
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("undecodable")),
        "{entry}"
    );
    assert!(projector.terminate().await.success());
}

/// A stop does not wait for dead letters: each waits up to 5 s for the dead-letter
/// stream's ack, and a batch of poison messages while that stream does not answer (here
/// it is gone, and a listener on its subjects takes the copies without answering) took
/// 5 s a message, the stop with it. A message not dead-lettered stays unacked and comes
/// again.
#[tokio::test]
async fn a_stop_does_not_wait_for_the_dead_letters_of_a_batch() {
    const POISON: usize = 20;
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let mut silent = silent_dead_letter_stream(&env, &jetstream).await;
    let projector = Projector::spawn(&env.settings).await;
    live_generation(&env).await;
    publish_poison(&env, &jetstream, POISON).await;
    tokio::time::timeout(CATCH_UP, silent.next())
        .await
        .expect("a dead letter within the catch-up time")
        .expect("the listener's subscription");
    projector
        .stop_within(Duration::from_secs(3), "a stop while dead letters wait")
        .await;
}

/// A batch's events are applied and acked while its dead letters wait for the
/// dead-letter stream's ack, and the letters are sent all at once. Until 2026-12-07
/// poison went to the DLQ first, one letter after another (up to 5 s each), and a
/// dead-letter stream that did not answer (here it is gone, and a listener on its
/// subjects takes the copies without answering) held the event behind ten poison
/// messages for 50 s, past the ack wait, unapplied.
#[tokio::test]
async fn a_batchs_events_are_applied_while_its_dead_letters_wait_for_a_silent_dead_letter_stream() {
    const POISON: usize = 10;
    // Far below the 50 s the letters took one after another.
    const WITHIN: Duration = Duration::from_secs(15);
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    // The read model built, the projector stopped: what is published meanwhile waits in
    // the durable consumer and comes in the next projector's first batch.
    let projector = Projector::spawn(&env.settings).await;
    live_generation(&env).await;
    projector.stop().await;
    let mut silent = silent_dead_letter_stream(&env, &jetstream).await;
    publish_poison(&env, &jetstream, POISON).await;
    let good = event("sensor-1", now_ms(), &[("temperature", 21.5)]);
    publish(&env, &jetstream, &good).await;

    let projector = Projector::spawn(&env.settings).await;
    sensor_1_counted(
        &env,
        1,
        WITHIN,
        "the event applied while the dead letters before it wait",
    )
    .await;
    let letters = tokio::time::timeout(WITHIN, silent.by_ref().take(POISON).count())
        .await
        .unwrap_or_else(|_| panic!("{POISON} dead letters sent at once, within {WITHIN:?}"));
    assert_eq!(letters, POISON);
    projector
        .stop_within(Duration::from_secs(3), "a stop while dead letters wait")
        .await;
}

/// The figures of `sensor-1` once they count `samples` readings, within `within`.
async fn sensor_1_counted(
    env: &TestEnv,
    samples: u64,
    within: Duration,
    what: &str,
) -> contract::read_model::DeviceStats {
    eventually(within, what, || async {
        env.device_stats("sensor-1")
            .await
            .filter(|stats| stats.sample_count == samples)
    })
    .await
}

/// The payload of [`publish_poison`]'s messages.
const POISON_PAYLOAD: &[u8] = b"not json at all";

/// Publishes `count` messages that are not JSON ([`POISON_PAYLOAD`]) under sensor-1's
/// subject, with message ids `poison-0`, `poison-1`, ...; their stream sequences.
async fn publish_poison(
    env: &TestEnv,
    jetstream: &async_nats::jetstream::Context,
    count: usize,
) -> Vec<u64> {
    let mut sequences = Vec::with_capacity(count);
    for index in 0..count {
        let ack = publish_raw(
            jetstream,
            env.subjects.recorded("sensor-1"),
            relay_headers(&format!("poison-{index}")),
            POISON_PAYLOAD.to_vec(),
        )
        .await;
        sequences.push(ack.sequence);
    }
    sequences
}

/// Makes the dead-letter stream silent: it is gone, and a listener on its subjects takes
/// the copies without answering, so each dead letter waits out its 5 s for an ack. The
/// listener's subscription, to count the copies.
async fn silent_dead_letter_stream(
    env: &TestEnv,
    jetstream: &async_nats::jetstream::Context,
) -> async_nats::Subscriber {
    jetstream
        .delete_stream(env.subjects.dlq_stream())
        .await
        .expect("the dead-letter stream removed");
    let client = async_nats::connect(&env.settings.nats.url)
        .await
        .expect("nats");
    let silent = client
        .subscribe(env.subjects.dlq_filter())
        .await
        .expect("a listener that never answers");
    client.flush().await.expect("subscribed");
    silent
}

/// Stream sequences come again when the stream starts over (deleted and made again by
/// the relay, a NATS host that lost its newest messages). A poison message at a
/// sequence another one had is dead-lettered too: its dead letter's id named the
/// sequence alone, and the DLQ stream dropped it as a copy of the first within its
/// duplicate window, while the projector terminated it.
#[tokio::test]
async fn a_poison_message_at_a_sequence_used_before_is_dead_lettered_too() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let projector = Projector::spawn(&env.settings).await;
    live_generation(&env).await;
    let dlq_stream = env.subjects.dlq_stream();
    let mut sequences = Vec::new();
    for (letters, id) in [(1, "poison-before"), (2, "poison-after")] {
        let ack = publish_raw(
            &jetstream,
            env.subjects.recorded("sensor-1"),
            relay_headers(id),
            b"not json".to_vec(),
        )
        .await;
        sequences.push(ack.sequence);
        eventually(CATCH_UP, &format!("{letters} dead letters"), || async {
            (stream_messages(&jetstream, &dlq_stream).await == letters).then_some(())
        })
        .await;
        if letters == 1 {
            // The event stream starts over; the DLQ stream stays.
            jetstream
                .delete_stream(env.subjects.stream())
                .await
                .expect("stream deleted");
            streams(&env).await;
        }
    }
    assert_eq!(
        sequences,
        [1, 1],
        "the second poison message reuses sequence 1"
    );
    projector.stop().await;
}

/// An operator removed the dead-letter stream: the projector makes it again for the next
/// poison message, which is dead-lettered and terminated, not left unacked for good
/// (redelivered every ack wait, holding back the consumer's ack floor).
#[tokio::test]
async fn a_poison_message_is_dead_lettered_after_the_dead_letter_stream_was_removed() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let dlq_stream = env.subjects.dlq_stream();
    jetstream
        .delete_stream(&dlq_stream)
        .await
        .expect("the dead-letter stream removed");
    let projector = Projector::spawn(&env.settings).await;
    live_generation(&env).await;
    let poison = publish_raw(
        &jetstream,
        env.subjects.recorded("sensor-1"),
        relay_headers("poison"),
        b"not json".to_vec(),
    )
    .await;
    let good = event("sensor-1", now_ms(), &[("temperature", 20.0)]);
    let last_sequence = publish(&env, &jetstream, &good).await;
    eventually(CATCH_UP, "the poison message dead-lettered", || async {
        jetstream
            .get_stream(&dlq_stream)
            .await
            .ok()
            .filter(|stream| stream.cached_info().state.messages == 1)
            .map(|_| ())
    })
    .await;
    let letters = dead_letters_by_origin(&jetstream, &env).await;
    assert_eq!(
        letters.keys().copied().collect::<Vec<_>>(),
        [poison.sequence],
        "the one dead letter is the poison message's"
    );
    let info = drained(&env, &jetstream, last_sequence).await;
    assert_eq!(info.num_ack_pending, 0, "the poison message was terminated");
    projector.stop().await;
}

/// A poison message whose letter the DLQ stream already holds (stored by an earlier
/// dead-lettering whose termination was lost, or before a repair delivered the message
/// again) is terminated without a second letter, which could be re-driven a second
/// time: the stream knows a letter's id for as long as it keeps letters. It had the
/// server's 2-minute duplicate window. The dead-lettering still counts in
/// `projector_dlq_total` (the earlier attempt may have counted nothing: its PubAck
/// lost), so an alert on it sees the poison message.
#[tokio::test]
async fn a_poison_message_whose_letter_the_dlq_already_holds_is_not_dead_lettered_twice() {
    let env = TestEnv::new();
    let jetstream = streams(&env).await;
    let dlq_stream = env.subjects.dlq_stream();
    let window = jetstream
        .get_stream(&dlq_stream)
        .await
        .expect("the dead-letter stream")
        .cached_info()
        .config
        .duplicate_window;
    assert_eq!(
        window,
        Duration::from_secs(env.settings.nats.max_age_secs),
        "the dead-letter stream knows a letter's id as long as it keeps letters"
    );
    let poison = publish_poison(&env, &jetstream, 1).await[0];
    // The letter an earlier dead-lettering of it stored, with the id every attempt
    // gives it.
    let stored = stored_message(&jetstream, env.subjects.stream(), poison).await;
    let reason = projector::dlq::Reason::Decode(contract::event::DecodeError::Undecodable(
        "an earlier attempt".to_owned(),
    ));
    let letter =
        projector::dlq::DeadLetterCopy::new(env.subjects.stream(), poison, stored.time, &reason);
    jetstream
        .publish_with_headers(
            env.subjects.dlq(Some("sensor-1")),
            letter.full(None),
            POISON_PAYLOAD.to_vec().into(),
        )
        .await
        .expect("published")
        .await
        .expect("the earlier letter stored");

    let projector = projector_process(&env, &[]);
    projector.ready().await;
    // Dead-lettered again (not acked plainly): counted, and terminated.
    projector
        .metrics_until(
            Duration::from_secs(15),
            "the poison message dead-lettered",
            |scrape| {
                (scrape.value_or_zero("projector_dlq_total", &[("reason", "undecodable")]) == 1.0)
                    .then_some(())
            },
        )
        .await;
    drained(&env, &jetstream, poison).await;
    assert_eq!(
        stream_messages(&jetstream, &dlq_stream).await,
        1,
        "one letter of the poison message"
    );
    assert_eq!(projector.terminate().await.code(), Some(0));
}

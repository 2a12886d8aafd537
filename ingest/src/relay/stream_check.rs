//! The stream check: does JetStream still hold what the relay published?
//!
//! Debian's nats-server 2.9 fsyncs a stream only every 2 minutes, so an OS crash of the
//! NATS host can cut the stream back to an earlier last sequence; after the restart the
//! server hands the lost sequences out again to new messages. Every published outbox row
//! remembers the sequence its PubAck returned (`outbox.stream_seq`, unique) and is kept
//! for `relay.published_retention_secs`, which is what this check compares against.
//!
//! # How a loss is noticed
//! - Every `relay.stream_check_interval_ms` and after every reconnect to NATS, the
//!   relay reads the kept row with the highest sequence, looks the stream up
//!   (`STREAM.INFO`, which makes it again when it is gone) and fetches the stream
//!   message at that sequence (`STREAM.MSG.GET`). Its `Nats-Msg-Id` must be the
//!   row's event id; a missing message or another id means the stream lost it.
//! - New publishes that reuse lost sequences cannot hide a loss: a sequence a kept row
//!   still holds cannot be recorded for a second row (unique index), so that round fails
//!   with a collision and triggers the check, which probes the kept row holding the
//!   lowest of the round's sequences: the stream has another message at it. Not the
//!   newest row: a round that ran beside the colliding one (or after it) may have
//!   recorded newer publishes past the lost ones, held, while the colliding rows could
//!   never be recorded until the lost ones are republished.
//!
//! # How it is repaired
//! A truncation loses a suffix of the stream, so the kept rows whose message is gone
//! form a range of sequences up to the probed row (rows recorded after the loss can
//! only hold sequences past every kept one: lower ones collide). The check finds its
//! first row by bisection over the kept rows below the probed one (one fetch per step,
//! logarithmic in their sequences' span even across a gap: `row_to_bisect`)
//! and, in one transaction under an advisory lock (so that concurrent relays repair
//! once), marks every kept row from there on unpublished again. The normal rounds then
//! republish them: JetStream drops the copies of messages it still holds (duplicate
//! window, so a row recorded after the loss gets its own sequence back) and appends the
//! lost ones with new sequences.
//!
//! # Horizon
//! Rows already pruned cannot be republished. A published row is pruned only once a
//! check found the stream holding the newest kept row at least
//! `published_retention_secs` after the row was published (`Relay::stream_held_at`),
//! and that retention must exceed the time a NATS host may hold unsynced data (2
//! minutes on 2.9). So a NATS host that crashed and stayed down longer than the
//! retention still finds the rows of what it lost kept: while no check succeeds,
//! nothing published is pruned. Messages older than the stream's first sequence
//! (expired by `max_age`) count as held, not lost.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::stream::{self, RawMessageErrorKind};
use async_nats::jetstream::ErrorCode;
use contract::event::headers;
use futures::StreamExt;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::{ensure_streams, Relay};

/// Held by the relay that repairs the outbox after a stream loss; any constant works as
/// long as every relay uses the same one.
const STREAM_REPAIR_LOCK: i64 = 0x7e1e_0002;

/// How long one stream request of the check may take.
const STREAM_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a round checks remembered sequences against the stream, the stream's look-up
/// and the fetches together; a second less than the session's
/// `relay.idle_in_transaction_timeout_ms` when that is shorter, as the round's claim
/// holds its transaction open meanwhile ([`Relay::remembered_check_deadline`]).
const REMEMBERED_CHECK_MAX: Duration = Duration::from_secs(4);

/// Remembered sequences fetched from the stream at once.
const REMEMBERED_CHECKS_IN_FLIGHT: usize = 32;

/// A published outbox row: the sequence its PubAck returned and its event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PublishedRow {
    stream_seq: i64,
    event_id: Uuid,
}

impl PublishedRow {
    /// From a row of `stream_seq, event_id`.
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Self {
            stream_seq: row.get(0),
            event_id: row.get(1),
        }
    }
}

/// What a stream check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCheckOutcome {
    /// The stream holds the probed row (or no row is kept, or the probed one expired
    /// from the stream); `read_at` is PostgreSQL's time when the check read that row.
    Held { read_at: time::OffsetDateTime },
    /// The stream lost the probed row: the kept rows from the first lost one on were
    /// marked unpublished again (`republished_rows`) or, past the republish window,
    /// stripped of their sequence.
    Repaired { republished_rows: u64 },
}

impl Relay {
    /// Checks that the stream still holds the message of the probed row (the kept row
    /// holding the lowest of `collided`, the sequences of a round whose marking
    /// collided, else the newest published row) and, if not, marks every kept row whose
    /// message the stream lost as unpublished again.
    ///
    /// Claims start from the index's start again afterwards (the module `relay::claim_floor`):
    /// this relay's repair, or another relay's, may have made rows below the floor
    /// unpublished.
    ///
    /// A check that probed the newest kept row (no `collided` sequences) and found it
    /// held moves [`Relay::stream_held_at`](super::Relay) on, and with it what the
    /// outbox prune may delete: a truncation loses a suffix, so that row held means
    /// every kept row below it is. A lower probed row says nothing of the rows above it.
    pub async fn check_stream(&self, collided: &[i64]) -> anyhow::Result<StreamCheckOutcome> {
        let checked = self.check_stream_once(collided).await;
        crate::sync::lock(&self.claim_floor).reset();
        if let Ok(StreamCheckOutcome::Held { read_at }) = checked {
            if collided.is_empty() {
                let mut held_at = crate::sync::lock(&self.stream_held_at);
                // Lanes check side by side: an older read may finish last.
                if held_at.is_none_or(|earlier| earlier < read_at) {
                    *held_at = Some(read_at);
                }
            }
        }
        checked
    }

    async fn check_stream_once(&self, collided: &[i64]) -> anyhow::Result<StreamCheckOutcome> {
        if !crate::bootstrap::nats_connected(&self.jetstream.client()) {
            anyhow::bail!("not connected to NATS");
        }
        let client = self.pool.get().await.context("getting a connection")?;
        let (probed, read_at) = row_to_probe(&client, collided).await?;
        let Some(probed) = probed else {
            // Nothing published is kept: nothing the stream could have lost.
            return Ok(StreamCheckOutcome::Held { read_at });
        };
        drop(client);
        let stream = self.event_stream().await?;
        if self.stream_holds(&stream, probed).await? {
            return Ok(StreamCheckOutcome::Held { read_at });
        }
        self.republish_lost_rows(&stream, collided).await
    }

    /// The event stream; recreated if it is gone (deleted, or a NATS host that lost its
    /// store), in which case the check finds every kept row lost.
    async fn event_stream(&self) -> anyhow::Result<stream::Stream> {
        let name = self.subjects.stream();
        let looked_up =
            tokio::time::timeout(STREAM_REQUEST_TIMEOUT, self.jetstream.get_stream(name))
                .await
                .context("timed out looking up the stream")?;
        match looked_up {
            Ok(stream) => return Ok(stream),
            Err(error) if is_stream_not_found(&error) => {
                tracing::warn!(stream = name, "stream is gone, creating it again");
            }
            Err(error) => {
                return Err(error).with_context(|| format!("looking up stream {name}"));
            }
        }
        tokio::time::timeout(
            STREAM_REQUEST_TIMEOUT,
            ensure_streams(&self.jetstream, &self.nats),
        )
        .await
        .context("timed out creating the streams")??;
        tokio::time::timeout(STREAM_REQUEST_TIMEOUT, self.jetstream.get_stream(name))
            .await
            .context("timed out looking up the stream")?
            .with_context(|| format!("looking up stream {name}"))
    }

    /// Whether the stream message at the row's sequence is the row's event.
    async fn stream_holds<I>(
        &self,
        stream: &stream::Stream<I>,
        row: PublishedRow,
    ) -> anyhow::Result<bool> {
        let Ok(sequence) = u64::try_from(row.stream_seq) else {
            return Ok(false);
        };
        let fetched =
            tokio::time::timeout(STREAM_REQUEST_TIMEOUT, stream.get_raw_message(sequence))
                .await
                .context("timed out fetching a stream message")?;
        match fetched {
            Ok(message) => {
                let expected_id = row.event_id.to_string();
                Ok(message
                    .headers
                    .get(headers::MSG_ID)
                    .is_some_and(|message_id| message_id.as_str() == expected_id))
            }
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(error) => Err(error).with_context(|| format!("fetching stream message {sequence}")),
        }
    }

    /// How long a round's check of remembered sequences may take: [`REMEMBERED_CHECK_MAX`],
    /// or a second less than the claim holds (2 s at the shortest session timeout the
    /// settings allow, 3 s).
    fn remembered_check_deadline(&self) -> Duration {
        REMEMBERED_CHECK_MAX.min(self.claim_holds_for.saturating_sub(Duration::from_secs(1)))
    }

    /// Sorts the sequences earlier PubAcks gave rows that were not marked
    /// (`(row id, event id) → sequence`): `held`, those whose message the stream still
    /// holds at that sequence, to be marked with it; `unchecked`, those whose check
    /// could not be made within [`Relay::remembered_check_deadline`] (the round's transaction
    /// is open meanwhile), to be remembered again and left for a later round. The rest
    /// (a repair, this relay's or another's, a recreated stream or an expired message
    /// made them stale) are published again like any row.
    pub(super) async fn still_held(
        &self,
        remembered: HashMap<(i64, Uuid), i64>,
    ) -> (HashMap<(i64, Uuid), i64>, HashMap<(i64, Uuid), i64>) {
        if remembered.is_empty() {
            return (HashMap::new(), remembered);
        }
        let name = self.subjects.stream();
        // One deadline for the stream's look-up and the fetches together, so that the
        // whole check fits in the session timeout (until 2026-12-07 each had 2 s of its
        // own, 4 s in all whatever the timeout).
        let deadline = tokio::time::sleep(self.remembered_check_deadline());
        tokio::pin!(deadline);
        // A handle without `STREAM.INFO`: the fetches say all there is to know (a stream
        // that is gone fails each of them), and until 2026-12-07 the look-up was a
        // request of its own inside the deadline, heavier than a fetch on a busy server.
        let Ok(stream) = self.jetstream.get_stream_no_info(name).await else {
            return (HashMap::new(), remembered);
        };
        let mut unchecked = remembered.clone();
        let mut failed = None;
        let mut held = HashMap::with_capacity(remembered.len());
        let stream = &stream;
        let mut checks =
            futures::stream::iter(remembered.into_iter().map(|(key, stream_seq)| async move {
                let row = PublishedRow {
                    stream_seq,
                    event_id: key.1,
                };
                (key, stream_seq, self.stream_holds(stream, row).await)
            }))
            .buffer_unordered(REMEMBERED_CHECKS_IN_FLIGHT);
        loop {
            tokio::select! {
                checked = checks.next() => match checked {
                    Some((key, stream_seq, Ok(true))) => {
                        unchecked.remove(&key);
                        held.insert(key, stream_seq);
                    }
                    Some((key, stream_seq, Ok(false))) => {
                        tracing::info!(
                            event_id = %key.1,
                            stream_seq,
                            "a remembered ack's event is not at its sequence in the stream; its row is published again"
                        );
                        unchecked.remove(&key);
                    }
                    Some((_, _, Err(error))) => {
                        failed.get_or_insert(error);
                    }
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        if let Some(error) = failed {
            tracing::info!(
                error = format!("{error:#}"),
                "a remembered ack could not be checked against the stream"
            );
        }
        (held, unchecked)
    }

    /// Under the repair lock: finds the first kept row the stream lost and marks it and
    /// every later kept row unpublished, in one transaction.
    async fn republish_lost_rows(
        &self,
        stream: &stream::Stream,
        collided: &[i64],
    ) -> anyhow::Result<StreamCheckOutcome> {
        let mut client = self.pool.get().await.context("getting a connection")?;
        let transaction = client.transaction().await?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&STREAM_REPAIR_LOCK])
            .await
            .context("taking the stream repair lock")?;
        // Another relay may have repaired while this one waited for the lock.
        let (probed, read_at) = row_to_probe(&transaction, collided).await?;
        let Some(probed) = probed else {
            return Ok(StreamCheckOutcome::Held { read_at });
        };
        if self.stream_holds(stream, probed).await? {
            return Ok(StreamCheckOutcome::Held { read_at });
        }
        // Messages below the stream's first sequence expired (max_age); not lost.
        let first_kept_sequence = tokio::time::timeout(STREAM_REQUEST_TIMEOUT, stream.get_info())
            .await
            .context("timed out reading the stream info")?
            .context("reading the stream info")?
            .state
            .first_sequence;
        let mut lowest_unverified = i64::try_from(first_kept_sequence).unwrap_or(i64::MAX);
        if probed.stream_seq < lowest_unverified {
            // Expired or purged from the stream on purpose: nothing a republish should undo.
            return Ok(StreamCheckOutcome::Held { read_at });
        }
        let mut first_lost = probed;
        // Bisection over the sequences: every kept row below `lowest_unverified` is held,
        // `first_lost` is not, and the kept rows between are unknown. A truncation loses
        // a suffix, so a held row says every kept row below it is held too, and a lost
        // one that every kept row above it (up to `first_lost`) is lost: whichever row of
        // the range is probed, the range shrinks and this stays true.
        while let Some(probe) =
            row_to_bisect(&transaction, lowest_unverified, first_lost.stream_seq).await?
        {
            if self.stream_holds(stream, probe).await? {
                lowest_unverified = probe.stream_seq + 1;
            } else {
                first_lost = probe;
            }
        }
        // Rows published within the projector's dedup horizon, less a tenth for the
        // republish to reach it, are republished: it skips those it applied. Older ones
        // are not: it no longer remembers applying them, so it would count twice every
        // one it had applied, which is nearly all of them. They lose their sequence
        // (kept rows must not hold sequences the stream hands out again) and stay
        // published, to be pruned. The deadline is kept (`republish_before`, the
        // earliest of every repair's, counted from the row's first publish): a round
        // that claims the row only after it strips it the same way (NATS down again
        // before the republish, no relay running).
        let republish_window_secs = self.projector_dedup_horizon.as_secs_f64() * 0.9;
        let marked = transaction
            .query_one(
                "WITH marked AS (
                     UPDATE outbox SET stream_seq = NULL,
                         published_at = CASE
                             WHEN lost.deadline > clock_timestamp() THEN NULL
                             ELSE lost.published_at END,
                         republish_before = lost.deadline
                     FROM (SELECT id, stream_seq, published_at,
                                  least(republish_before,
                                        published_at + make_interval(secs => $2)) AS deadline
                           FROM outbox WHERE stream_seq >= $1) AS lost
                     WHERE outbox.id = lost.id
                     RETURNING lost.stream_seq, outbox.published_at IS NULL AS republish)
                 SELECT count(*) FILTER (WHERE republish), count(*) FILTER (WHERE NOT republish),
                        min(stream_seq), max(stream_seq)
                 FROM marked",
                &[&first_lost.stream_seq, &republish_window_secs],
            )
            .await
            .context("marking lost rows unpublished")?;
        transaction
            .commit()
            .await
            .context("committing the stream repair")?;
        let republished_rows = u64::try_from(marked.get::<_, i64>(0)).unwrap_or_default();
        let beyond_horizon_rows = u64::try_from(marked.get::<_, i64>(1)).unwrap_or_default();
        let first_sequence: Option<i64> = marked.get(2);
        let last_sequence: Option<i64> = marked.get(3);
        metrics::counter!("relay_republished_total").increment(republished_rows);
        tracing::warn!(
            rows = republished_rows,
            first_sequence,
            last_sequence,
            stream = self.subjects.stream(),
            first_lost_event_id = %first_lost.event_id,
            "stream lost published events, republishing them"
        );
        self.not_republished(beyond_horizon_rows, "by the repair");
        Ok(StreamCheckOutcome::Repaired { republished_rows })
    }

    /// Counts and logs `rows` events the stream lost that are not published again: their
    /// first publish is past the projector's dedup horizon. `noticed` says where: by the
    /// repair, or by a round that claimed rows the repair had left to republish after
    /// their deadline.
    pub(super) fn not_republished(&self, rows: u64, noticed: &'static str) {
        if rows == 0 {
            return;
        }
        metrics::counter!("relay_lost_beyond_dedup_horizon_total").increment(rows);
        tracing::error!(
            rows,
            noticed,
            dedup_horizon_secs = self.projector_dedup_horizon.as_secs(),
            stream = self.subjects.stream(),
            "stream lost events published before the projector's dedup horizon, not republishing them: the read model keeps those the projector applied, the stream no longer holds them"
        );
    }
}

/// The row a check probes: the kept row holding the lowest of `collided` (sequences a
/// round was handed that kept rows hold), else the one with the highest sequence, or
/// none when no row is kept; with PostgreSQL's time of the read.
async fn row_to_probe(
    client: &impl deadpool_postgres::GenericClient,
    collided: &[i64],
) -> anyhow::Result<(Option<PublishedRow>, time::OffsetDateTime)> {
    let row = client
        .query_one(
            "SELECT now(), probe.stream_seq, probe.event_id FROM (SELECT) AS one
             LEFT JOIN LATERAL (
                 SELECT stream_seq, event_id FROM (
                     (SELECT 0 AS preference, stream_seq, event_id FROM outbox
                      WHERE stream_seq = ANY($1) ORDER BY stream_seq LIMIT 1)
                     UNION ALL
                     (SELECT 1, stream_seq, event_id FROM outbox WHERE stream_seq IS NOT NULL
                      ORDER BY stream_seq DESC LIMIT 1)
                 ) AS candidates
                 ORDER BY preference LIMIT 1
             ) AS probe ON true",
            &[&collided],
        )
        .await
        .context("reading the row to probe")?;
    let probed = match (row.get(1), row.get(2)) {
        (Some(stream_seq), Some(event_id)) => Some(PublishedRow {
            stream_seq,
            event_id,
        }),
        _ => None,
    };
    Ok((probed, row.get(0)))
}

/// The kept row the bisection probes next among those with a sequence in
/// `[from, before)`: the lowest at or above the middle of that range, else the highest
/// below it; none when the range holds no kept row.
///
/// Either way, within two probes the sequences left to search halve or no kept row is
/// left among them, so the search takes a number of fetches logarithmic in the range,
/// however the kept rows lie in it. Not the lowest row of the range when its upper
/// half is empty: a stream that starts again from sequence 1 (deleted and recreated, a
/// NATS host that lost its store) leaves the rows relayed since at low sequences, held,
/// below a gap and the lost rows above it, and probing the lowest held row only moved
/// the search up by that one row, a fetch per held row, while the repair held its lock.
async fn row_to_bisect(
    client: &impl deadpool_postgres::GenericClient,
    from: i64,
    before: i64,
) -> anyhow::Result<Option<PublishedRow>> {
    let middle = bisection_middle(from, before);
    let row = client
        .query_opt(
            "SELECT stream_seq, event_id FROM (
                 (SELECT 0 AS preference, stream_seq, event_id FROM outbox
                  WHERE stream_seq >= $2 AND stream_seq < $3 ORDER BY stream_seq LIMIT 1)
                 UNION ALL
                 (SELECT 1, stream_seq, event_id FROM outbox
                  WHERE stream_seq >= $1 AND stream_seq < $2 ORDER BY stream_seq DESC LIMIT 1)
             ) AS candidates
             ORDER BY preference LIMIT 1",
            &[&from, &middle, &before],
        )
        .await
        .context("reading the row to probe next")?;
    Ok(row.as_ref().map(PublishedRow::from_row))
}

/// The middle of the sequences `[from, before)`, rounded down; `from` when the range is
/// empty.
fn bisection_middle(from: i64, before: i64) -> i64 {
    from + (before - from).max(0) / 2
}

fn is_stream_not_found(error: &GetStreamError) -> bool {
    matches!(
        error.kind(),
        GetStreamErrorKind::JetStream(error) if error.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

/// The sequences a round's PubAcks returned, when marking its rows with them collided
/// with kept rows: the context of that round's error.
#[derive(Debug)]
pub(super) struct SequenceCollision {
    pub(super) sequences: Vec<i64>,
}

impl std::fmt::Display for SequenceCollision {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} sequences handed out, some of them held by kept rows",
            self.sequences.len()
        )
    }
}

/// Whether marking a round failed because the stream handed out a sequence that a kept
/// row already holds: the sign that the stream lost that row's message.
pub(super) fn is_sequence_collision(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|database_error| {
        database_error.code() == &SqlState::UNIQUE_VIOLATION
            && database_error.constraint() == Some("outbox_stream_seq")
    })
}

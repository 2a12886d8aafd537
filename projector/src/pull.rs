//! The durable consumer's messages, pulled with requests the projector sends itself.
//!
//! async-nats's `messages()` stream keeps up to one and a half batches requested (a new
//! batch whenever half a batch or less is outstanding, sent by a task of its own), and
//! a stream dropped at a stop takes with it what it had fetched: those messages wait out the ack wait (30 s) before any
//! projector gets them again. Here the consume loop sends the pull requests, each
//! expiring after [`PULL_EXPIRES`], so a stop can be exact:
//!
//! 1. no pull request is sent once the projector stops;
//! 2. every request still outstanding ends within [`PULL_EXPIRES`], served in full or
//!    answered with a `408` that says how much of it was left; until then the inbox is
//!    read on, so nothing the server delivers for them goes to a projector that is gone
//!    (an unsubscribe would race a message the server just gave to a waiting request);
//! 3. what arrived for them is handed back at once (nak), for the next projector.
//!
//! A request that expires every second is also how the projector knows the server
//! still holds its requests: nothing heard for [`QUIET`] means they were lost (a NATS
//! restart, a consumer deleted as the request arrived), and they are sent again; the
//! session ends while the connection is down, or when the consumer is gone.
//!
//! A request the consumer's wait queue has no room for (`409 Exceeded MaxWaiting`: its
//! `max_waiting` set low, or hundreds of projectors) is sent again after
//! [`WAIT_QUEUE_FULL_PAUSE`], not at once, which would be refused at once again.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::{BatchConfig, BatchRequestError, Config};
use async_nats::jetstream::consumer::Consumer;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use ingest::bootstrap::nats_connected;

/// How long a pull request waits on the server for messages before it expires: also
/// the longest a stopping projector waits for its requests to end.
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// With requests outstanding and nothing heard for this long (a message, a `408`), the
/// server no longer holds them.
const QUIET: Duration = Duration::from_secs(2);

/// How long the projector waits before it asks again when the consumer's wait queue was
/// full (`409 Exceeded MaxWaiting`): a place in it frees up when a request there ends
/// (a projector's at the latest [`PULL_EXPIRES`] after it came), and a request sent
/// again at once would be refused again at once.
const WAIT_QUEUE_FULL_PAUSE: Duration = Duration::from_millis(500);

/// Why pulling ended; the session ends with it and the next one starts afresh.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    #[error("sending a pull request")]
    Request(#[from] BatchRequestError),
    #[error("the durable consumer was deleted")]
    ConsumerDeleted,
    #[error("NATS is not connected and the pull requests went unanswered for {QUIET:?}")]
    Disconnected,
    #[error("the server answered a pull request with {status}: {description}")]
    Refused {
        status: StatusCode,
        description: String,
    },
    #[error("the inbox subscription ended")]
    Ended,
}

/// The messages asked for that the server has neither delivered nor given up on.
///
/// Like async-nats's own stream: a request for a whole batch goes out whenever half a
/// batch or less is outstanding, so the next batch is on its way while one is applied,
/// and at most one and a half batches are outstanding (a batch more for a while when
/// requests taken for lost were only late).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outstanding {
    batch: usize,
    messages: usize,
}

impl Outstanding {
    fn new(batch: usize) -> Self {
        Self {
            batch: batch.max(1),
            messages: 0,
        }
    }

    /// Whether a request for another batch is due.
    fn wants_more(&self) -> bool {
        self.messages <= self.batch / 2
    }

    fn requested(&mut self) {
        self.messages += self.batch;
    }

    fn delivered(&mut self) {
        self.messages = self.messages.saturating_sub(1);
    }

    /// A request ended (expired, or cut short) with `left` of its messages undelivered;
    /// the server does not say how many when it refused the request for want of room,
    /// and then the whole batch is taken as given up.
    fn gave_up(&mut self, left: Option<usize>) {
        self.messages = self.messages.saturating_sub(left.unwrap_or(self.batch));
    }

    /// Every request forgotten (the server lost them).
    fn forget(&mut self) {
        self.messages = 0;
    }

    fn any(&self) -> bool {
        self.messages > 0
    }
}

/// One session's pulls on the durable consumer.
pub(crate) struct Pulls {
    consumer: Consumer<Config>,
    context: jetstream::Context,
    inbox: async_nats::Subject,
    subscriber: Subscriber,
    outstanding: Outstanding,
    /// When the server was last heard from (a message, a status), or the first request
    /// of those outstanding was sent.
    heard: Instant,
    /// No request is sent before this: the wait queue was full.
    paused_until: Option<Instant>,
    /// Whether this session has logged a full wait queue yet (once is enough).
    wait_queue_full_logged: bool,
    /// What ended the pulls right after messages that were returned first.
    failed: Option<PullError>,
}

impl Pulls {
    /// Subscribes to an inbox of this session's own; the first request goes out with
    /// the first [`Pulls::next_batch`].
    pub(crate) async fn open(
        context: &jetstream::Context,
        consumer: Consumer<Config>,
        batch: usize,
    ) -> Result<Self, async_nats::SubscribeError> {
        let client = context.client();
        let inbox = async_nats::Subject::from(client.new_inbox());
        let subscriber = client.subscribe(inbox.clone()).await?;
        Ok(Self {
            consumer,
            context: context.clone(),
            inbox,
            subscriber,
            outstanding: Outstanding::new(batch),
            heard: Instant::now(),
            paused_until: None,
            wait_queue_full_logged: false,
            failed: None,
        })
    }

    /// The next messages: waits for one, then takes every one already arrived, up to a
    /// batch. Sends the pull requests that are due first. Cancel-safe: a message leaves
    /// the inbox only in a batch that is returned.
    pub(crate) async fn next_batch(&mut self) -> Result<Vec<jetstream::Message>, PullError> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        let mut batch = Vec::new();
        while batch.is_empty() {
            self.request_if_due().await?;
            let received = tokio::select! {
                biased;
                received = self.subscriber.next() => received,
                () = tokio::time::sleep_until(self.heard + QUIET), if self.outstanding.any() => {
                    self.requests_unanswered().await?;
                    continue;
                }
                () = sleep_until_some(self.paused_until) => continue,
            };
            if let Err(error) = self.take_ready(received, &mut batch) {
                if batch.is_empty() {
                    return Err(error);
                }
                // The messages taken go first; the error ends the next call.
                self.failed = Some(error);
            }
        }
        Ok(batch)
    }

    /// Takes `first` into `batch`, then every message already arrived, up to a batch.
    fn take_ready(
        &mut self,
        first: Option<async_nats::Message>,
        batch: &mut Vec<jetstream::Message>,
    ) -> Result<(), PullError> {
        let mut received = first;
        loop {
            self.take(received.ok_or(PullError::Ended)?, batch)?;
            if batch.len() >= self.outstanding.batch {
                return Ok(());
            }
            match self.subscriber.next().now_or_never() {
                Some(next) => received = next,
                None => return Ok(()),
            }
        }
    }

    /// Stops pulling: reads the inbox on until every request outstanding has ended
    /// (within [`PULL_EXPIRES`] and a second), and hands back (nak) every message that
    /// arrived for them. Returns how many.
    pub(crate) async fn stop(mut self) -> usize {
        let mut handed_back = 0;
        let ended = tokio::time::timeout(PULL_EXPIRES + Duration::from_secs(1), async {
            // While NATS is away nothing arrives, and the server forgets the requests.
            while self.outstanding.any() && nats_connected(&self.context.client()) {
                let Some(message) = self.subscriber.next().await else {
                    break;
                };
                let mut arrived = Vec::new();
                let taken = self.take(message, &mut arrived);
                handed_back += hand_back(&arrived).await;
                if taken.is_err() {
                    // The requests ended with the session (the consumer deleted, ...).
                    break;
                }
            }
        })
        .await;
        if ended.is_err() {
            tracing::warn!(
                handed_back,
                outstanding = self.outstanding.messages,
                "pull requests still open at the stop; what they deliver waits out the ack wait"
            );
        }
        handed_back
    }

    /// No answer for [`QUIET`] with requests outstanding: while connected, the server
    /// lost them and they are sent again, unless the consumer is gone; while not, the
    /// session ends. The consumer is asked for: deleted as a request was on its way (or
    /// between one's expiry and the next), it sent no `409 Consumer Deleted` for that
    /// one, and nats-server 2.9 answers a request to a consumer that does not exist with
    /// nothing at all, so the requests sent again would go unanswered for good.
    async fn requests_unanswered(&mut self) -> Result<(), PullError> {
        if !nats_connected(&self.context.client()) {
            return Err(PullError::Disconnected);
        }
        // At most a request's life: the inbox is not read meanwhile, and a JetStream
        // slow to answer after a restart would hold the pulls up for the client's whole
        // request timeout (10 s).
        match tokio::time::timeout(PULL_EXPIRES, self.consumer.get_info()).await {
            Ok(Err(error))
                if matches!(
                    error.kind(),
                    ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                ) =>
            {
                self.outstanding.forget();
                return Err(PullError::ConsumerDeleted);
            }
            // Not known either way (no answer in time, the consumer offline, another
            // error): the requests are sent again, and the next quiet spell asks again.
            Ok(Err(error)) => tracing::debug!(%error, "looking up the durable consumer failed"),
            Err(_elapsed) => tracing::debug!("looking up the durable consumer timed out"),
            Ok(Ok(_)) => {}
        }
        tracing::debug!(
            outstanding = self.outstanding.messages,
            "pull requests unanswered, sending them again"
        );
        self.outstanding.forget();
        Ok(())
    }

    async fn request_if_due(&mut self) -> Result<(), PullError> {
        if self
            .paused_until
            .is_some_and(|until| Instant::now() < until)
        {
            return Ok(());
        }
        self.paused_until = None;
        if !self.outstanding.wants_more() {
            return Ok(());
        }
        let request = BatchConfig {
            batch: self.outstanding.batch,
            expires: Some(PULL_EXPIRES),
            ..BatchConfig::default()
        };
        self.consumer
            .request_batch(request, self.inbox.clone())
            .await?;
        if !self.outstanding.any() {
            // Nothing was awaited: the quiet time runs from this request on.
            self.heard = Instant::now();
        }
        self.outstanding.requested();
        Ok(())
    }

    /// The request was refused whole: the consumer's wait queue (its `max_waiting`) is
    /// full, of this projector's requests or of others'. The next one waits a moment.
    fn wait_queue_full(&mut self) {
        self.outstanding.gave_up(None);
        self.paused_until = Some(Instant::now() + WAIT_QUEUE_FULL_PAUSE);
        if !self.wait_queue_full_logged {
            self.wait_queue_full_logged = true;
            tracing::warn!(
                pause_ms = WAIT_QUEUE_FULL_PAUSE.as_millis() as u64,
                "the durable consumer's wait queue (max_waiting) is full, pausing after each refused pull request"
            );
        }
    }

    /// Sorts what arrived on the inbox: a message goes into `batch`, a status into the
    /// accounting of what is outstanding, or ends the session.
    fn take(
        &mut self,
        message: async_nats::Message,
        batch: &mut Vec<jetstream::Message>,
    ) -> Result<(), PullError> {
        self.heard = Instant::now();
        match message.status.unwrap_or(StatusCode::OK) {
            StatusCode::OK => {
                self.outstanding.delivered();
                batch.push(jetstream::Message {
                    message,
                    context: self.context.clone(),
                });
                Ok(())
            }
            StatusCode::IDLE_HEARTBEAT => Ok(()),
            status @ (StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED) => {
                let description = message.description.unwrap_or_default();
                if description == "Consumer Deleted" {
                    // The server ends every request with it: none is left to wait for.
                    self.outstanding.forget();
                    return Err(PullError::ConsumerDeleted);
                }
                if description == "Exceeded MaxWaiting" {
                    self.wait_queue_full();
                    return Ok(());
                }
                let left = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get("Nats-Pending-Messages"))
                    .and_then(|left| left.as_str().parse().ok());
                if left.is_none()
                    && (description.starts_with("Exceeded MaxRequest")
                        || description == "Consumer is push based")
                {
                    // Every request is of the same shape and refused alike.
                    self.outstanding.forget();
                    return Err(PullError::Refused {
                        status,
                        description,
                    });
                }
                self.outstanding.gave_up(left);
                Ok(())
            }
            status => {
                // A 503 (no consumer answers its requests any more) ends them all;
                // another status at least the request it answers.
                if status == StatusCode::NO_RESPONDERS {
                    self.outstanding.forget();
                } else {
                    self.outstanding.gave_up(None);
                }
                Err(PullError::Refused {
                    status,
                    description: message.description.unwrap_or_default(),
                })
            }
        }
    }
}

/// Sleeps until `until`, or for ever when there is none.
async fn sleep_until_some(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// Hands messages that were not applied back to JetStream (a nak), for the next
/// projector at once rather than after the ack wait. Only on a stop, so it sends what
/// the client takes without waiting ([`answer`]). Returns how many naks were sent.
pub(crate) async fn hand_back(messages: &[jetstream::Message]) -> usize {
    let stopping = CancellationToken::new();
    stopping.cancel();
    answer(messages, AckKind::Nak(None), &stopping).await
}

/// Answers each of `messages` with `kind`; returns how many answers were sent. An
/// answer is a publish into the client's queue of commands (2,048), which nobody empties
/// while NATS is away: once `stop` is cancelled an answer that has to wait for room is
/// not sent, nor are the ones after it, so a stop never waits for NATS to come back.
/// A message left unanswered comes again after the ack wait (an applied one is skipped
/// as a duplicate).
pub(crate) async fn answer(
    messages: &[jetstream::Message],
    kind: AckKind,
    stop: &CancellationToken,
) -> usize {
    let mut sent = 0;
    for message in messages {
        let answered = tokio::select! {
            biased;
            answered = message.ack_with(kind) => answered,
            _ = stop.cancelled() => {
                tracing::debug!(
                    unanswered = messages.len() - sent,
                    "stopping while NATS takes no answers; the messages will be redelivered after the ack wait"
                );
                break;
            }
        };
        match answered {
            Ok(()) => sent += 1,
            Err(error) => tracing::debug!(
                %error,
                "answer not sent; the message will be redelivered after the ack wait"
            ),
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::Outstanding;

    #[test]
    fn a_batch_is_asked_for_whenever_half_a_batch_or_less_is_outstanding() {
        let mut outstanding = Outstanding::new(100);
        assert!(outstanding.wants_more());
        outstanding.requested();
        assert!(!outstanding.wants_more());
        for _ in 0..49 {
            outstanding.delivered();
        }
        assert!(!outstanding.wants_more(), "51 outstanding");
        outstanding.delivered();
        assert!(outstanding.wants_more(), "50 outstanding");
        outstanding.requested();
        assert_eq!(outstanding.messages, 150, "at most one and a half batches");
    }

    #[test]
    fn an_ended_request_gives_up_what_it_did_not_deliver() {
        let mut outstanding = Outstanding::new(100);
        outstanding.requested();
        outstanding.requested();
        for _ in 0..30 {
            outstanding.delivered();
        }
        outstanding.gave_up(Some(70));
        assert_eq!(outstanding.messages, 100);
        outstanding.gave_up(None);
        assert!(
            !outstanding.any(),
            "an ending without a count gives up a batch"
        );
        outstanding.gave_up(Some(5));
        outstanding.delivered();
        assert!(!outstanding.any(), "never below nothing");
    }

    #[test]
    fn requests_the_server_lost_are_forgotten() {
        let mut outstanding = Outstanding::new(10);
        outstanding.requested();
        outstanding.forget();
        assert!(outstanding.wants_more() && !outstanding.any());
    }

    #[test]
    fn a_batch_of_none_still_asks_for_one() {
        let mut outstanding = Outstanding::new(0);
        outstanding.requested();
        assert_eq!(outstanding.messages, 1);
    }
}

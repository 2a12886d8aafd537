//! The durable consumer's messages, pulled with requests the projector sends itself.
//!
//! async-nats's `messages()` stream asks for the next batch from a task of its own
//! whenever less than half a batch is outstanding, and a stream dropped at a stop takes
//! with it what it had fetched: those messages wait out the ack wait (30 s) before any
//! projector gets them again. Here the consume loop sends the pull requests, to one
//! inbox of its own, so a stop can be exact:
//!
//! 1. no pull request is sent once the projector stops;
//! 2. the inbox is drained (`UNSUB`, then a `PING` whose `PONG` comes after every
//!    message the server sent before it took the `UNSUB`), and the server drops the
//!    requests still waiting, as nothing listens on their inbox any more;
//! 3. what arrived for the requests outstanding is handed back at once (nak), for the
//!    next projector to take without waiting.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::{BatchConfig, Config};
use async_nats::jetstream::consumer::Consumer;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

/// How long a pull request waits on the server for messages before it expires.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// How often a connection lost and found again is looked for: the server forgets the
/// pull requests of a client that went away, and they are sent again.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

/// Why pulling ended; the session ends with it and the next one starts afresh.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    #[error("sending a pull request: {0}")]
    Request(String),
    #[error("the durable consumer was deleted")]
    ConsumerDeleted,
    #[error("no answer from the server for {0:?} while pull requests were outstanding")]
    MissedHeartbeat(Duration),
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
/// and at most one and a half batches are ever outstanding.
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
    /// the server does not say how many when the request was cut short for want of
    /// room, and then the whole batch is taken as given up.
    fn gave_up(&mut self, left: Option<usize>) {
        self.messages = self.messages.saturating_sub(left.unwrap_or(self.batch));
    }

    /// Every request forgotten (a reconnect: the server may have lost them).
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
    heartbeat: Duration,
    outstanding: Outstanding,
    /// When the server was last heard from (a message, a heartbeat, a status).
    heard: Instant,
    /// Whether the client was seen without its connection since the requests were sent.
    disconnected: bool,
}

impl Pulls {
    /// Subscribes to an inbox of this session's own; the first request goes out with
    /// the first [`Pulls::next_batch`].
    pub(crate) async fn open(
        context: &jetstream::Context,
        consumer: Consumer<Config>,
        batch: usize,
        heartbeat: Duration,
    ) -> Result<Self, PullError> {
        let client = context.client();
        let inbox = async_nats::Subject::from(client.new_inbox());
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|error| PullError::Request(error.to_string()))?;
        Ok(Self {
            consumer,
            context: context.clone(),
            inbox,
            subscriber,
            heartbeat,
            outstanding: Outstanding::new(batch),
            heard: Instant::now(),
            disconnected: false,
        })
    }

    /// The next messages: waits for one, then takes every one already arrived, up to a
    /// batch. Sends the pull requests that are due first.
    pub(crate) async fn next_batch(&mut self) -> Result<Vec<jetstream::Message>, PullError> {
        let mut batch = Vec::new();
        while batch.is_empty() {
            self.request_if_due().await?;
            let quiet_for = 2 * self.heartbeat;
            let received = tokio::select! {
                received = self.subscriber.next() => received,
                () = tokio::time::sleep(RECONNECT_CHECK) => {
                    self.look_at_the_connection();
                    if self.outstanding.any() && self.heard.elapsed() > quiet_for {
                        return Err(PullError::MissedHeartbeat(quiet_for));
                    }
                    continue;
                }
            };
            self.take(received.ok_or(PullError::Ended)?, &mut batch)?;
            while batch.len() < self.outstanding.batch {
                match self.subscriber.next().now_or_never() {
                    Some(Some(message)) => self.take(message, &mut batch)?,
                    Some(None) => return Err(PullError::Ended),
                    None => break,
                }
            }
        }
        Ok(batch)
    }

    /// Stops pulling: drains the inbox within `deadline` and hands back (nak) every
    /// message that arrived for the requests outstanding. Returns how many.
    pub(crate) async fn stop(mut self, deadline: Duration) -> usize {
        if self.subscriber.drain().await.is_err() {
            return 0;
        }
        let mut handed_back = 0;
        let drained = tokio::time::timeout(deadline, async {
            while let Some(message) = self.subscriber.next().await {
                if message.status.is_none_or(|status| status == StatusCode::OK) {
                    let message = jetstream::Message {
                        message,
                        context: self.context.clone(),
                    };
                    if message.ack_with(AckKind::Nak(None)).await.is_ok() {
                        handed_back += 1;
                    }
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                handed_back,
                "the pull inbox did not drain in time; what it still held waits out the ack wait"
            );
        }
        handed_back
    }

    async fn request_if_due(&mut self) -> Result<(), PullError> {
        if !self.outstanding.wants_more() {
            return Ok(());
        }
        let request = BatchConfig {
            batch: self.outstanding.batch,
            expires: Some(PULL_EXPIRES),
            idle_heartbeat: self.heartbeat,
            ..BatchConfig::default()
        };
        self.consumer
            .request_batch(request, self.inbox.clone())
            .await
            .map_err(|error| PullError::Request(error.to_string()))?;
        if !self.outstanding.any() {
            // Nothing was awaited: the quiet time runs from this request on.
            self.heard = Instant::now();
        }
        self.outstanding.requested();
        Ok(())
    }

    /// After a reconnect the server may have forgotten the requests (it restarted):
    /// they are sent again. Should it have kept them, a batch more is outstanding.
    fn look_at_the_connection(&mut self) {
        let connected =
            self.context.client().connection_state() == async_nats::connection::State::Connected;
        if !connected {
            self.disconnected = true;
        } else if self.disconnected {
            self.disconnected = false;
            self.outstanding.forget();
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
            StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED => {
                let description = message.description.unwrap_or_default();
                if description == "Consumer Deleted" {
                    return Err(PullError::ConsumerDeleted);
                }
                let left = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get("Nats-Pending-Messages"))
                    .and_then(|left| left.as_str().parse().ok());
                if left.is_none() && description.starts_with("Exceeded MaxRequest") {
                    // The same request would be refused again.
                    return Err(PullError::Refused {
                        status: StatusCode::REQUEST_TERMINATED,
                        description,
                    });
                }
                self.outstanding.gave_up(left);
                Ok(())
            }
            status => Err(PullError::Refused {
                status,
                description: message.description.unwrap_or_default(),
            }),
        }
    }
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
    fn a_reconnect_forgets_every_request() {
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

//! A service started as a task in the test's own process, and stopping it as a test
//! should: promptly, and failing the test unless the service exits cleanly.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the services running in a test's process log to its output, unless `RUST_LOG`
/// says otherwise: their warnings, and what they report at info.
const LOG_FILTER: &str = "warn,ingest=info,projector=info,query=info";

/// Sends the log of the services running in this process to the test's captured output
/// (nextest shows it when the test fails), so a failing test shows what the services
/// did. Each test runs in its own process under nextest; a second call does nothing.
fn log_to_test_output() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| LOG_FILTER.to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// How long a cancelled service may take to finish.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// What a service's task returns, and whether that was a clean exit.
pub trait Exit: Send + 'static {
    /// Fails the test unless this is a clean exit.
    fn expect_clean(self);
}

impl Exit for () {
    fn expect_clean(self) {}
}

impl<E: Debug + Send + 'static> Exit for Result<(), E> {
    fn expect_clean(self) {
        if let Err(error) = self {
            panic!("the service returned an error after cancellation: {error:?}");
        }
    }
}

/// One service task and the token that stops it. Dropped without [`Running::stop`] (a
/// test that failed), it cancels the service and aborts its task, so that the service
/// writes nothing after the test's environment is cleaned up.
pub struct Running<T> {
    shutdown: CancellationToken,
    /// `None` once stopped.
    task: Option<JoinHandle<T>>,
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl<T: Exit> Running<T> {
    /// Spawns the future `service` makes from a new shutdown token.
    pub fn spawn<F>(service: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        log_to_test_output();
        let shutdown = CancellationToken::new();
        let task = Some(tokio::spawn(service(shutdown.clone())));
        Self { shutdown, task }
    }

    /// Cancels the service and waits for it. A service that outlives `STOP_DEADLINE`,
    /// panicked or returned an error fails the test.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let Some(task) = self.task.as_mut() else {
            return;
        };
        // The task stays ours until it ended: one that outlives the deadline is aborted
        // by the drop as the test fails.
        let ended = tokio::time::timeout(STOP_DEADLINE, task)
            .await
            .unwrap_or_else(|_| {
                panic!("the service did not stop within {STOP_DEADLINE:?} of cancellation")
            });
        self.task = None;
        ended
            .expect("the service task did not panic")
            .expect_clean();
    }

    /// As [`Self::stop`], and fails the test unless stopping took less than `limit`: a
    /// liveness bound for a stop that must not wait for a dependency that is away.
    pub async fn stop_within(self, limit: Duration, what: &str) {
        let stopping = Instant::now();
        self.stop().await;
        let took = stopping.elapsed();
        assert!(
            took < limit,
            "{what}: stopping took {took:?}, not under {limit:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_cancels_a_service_that_runs_until_cancelled() {
        let service = Running::spawn(|shutdown| async move { shutdown.cancelled().await });
        service.stop().await;
    }

    #[tokio::test]
    async fn dropping_cancels_the_service_and_aborts_its_task() {
        let (ended, ends) = tokio::sync::oneshot::channel::<()>();
        let service = Running::spawn(|shutdown| async move {
            // Never ends by itself: only the abort ends it (dropping `ended`).
            let _ended = ended;
            shutdown.cancelled().await;
            std::future::pending::<()>().await
        });
        drop(service);
        tokio::time::timeout(Duration::from_secs(5), ends)
            .await
            .expect("the task was aborted")
            .expect_err("the task ended by its abort, sending nothing");
    }

    #[tokio::test]
    #[should_panic(expected = "the service task did not panic")]
    async fn a_service_that_panicked_fails_the_stop() {
        let service: Running<()> = Running::spawn(|shutdown| async move {
            shutdown.cancelled().await;
            panic!("the service fails on its way out");
        });
        service.stop().await;
    }

    #[tokio::test]
    #[should_panic(expected = "the service returned an error after cancellation")]
    async fn a_service_that_returned_an_error_fails_the_stop() {
        let service = Running::spawn(|shutdown| async move {
            shutdown.cancelled().await;
            Err::<(), _>("the connection closed uncleanly")
        });
        service.stop().await;
    }
}

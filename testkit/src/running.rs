//! A service started as a task in the test's own process, and stopping it as a test
//! should: promptly, and failing the test if the service panicked.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a cancelled service may take to finish.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// One service task and the token that stops it.
pub struct Running<T> {
    shutdown: CancellationToken,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Running<T> {
    /// Spawns the future `service` makes from a new shutdown token.
    pub fn spawn<F>(service: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(service(shutdown.clone()));
        Self { shutdown, task }
    }

    /// Cancels the service and waits for it, at most `STOP_DEADLINE`, and returns what
    /// it returned. A service that outlives the deadline or panicked fails the test.
    pub async fn stop(self) -> T {
        self.shutdown.cancel();
        tokio::time::timeout(STOP_DEADLINE, self.task)
            .await
            .expect("the service stops within 10 s of cancellation")
            .expect("the service task did not panic")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_cancels_the_service_and_returns_what_it_returned() {
        let service = Running::spawn(|shutdown| async move {
            shutdown.cancelled().await;
            "stopped"
        });
        assert_eq!(service.stop().await, "stopped");
    }

    #[tokio::test]
    #[should_panic(expected = "the service task did not panic")]
    async fn a_service_that_panicked_fails_the_stop() {
        let service = Running::spawn(|shutdown| async move {
            shutdown.cancelled().await;
            panic!("the service fails on its way out");
        });
        service.stop().await;
    }
}

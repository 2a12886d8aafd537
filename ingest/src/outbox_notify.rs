//! Wakes the relays after a group commit: `NOTIFY outbox`, sent on a connection of its
//! own, outside the readings' transaction.
//!
//! Until migration 0004 a statement-level trigger on `outbox` queued the NOTIFY inside
//! each group commit. PostgreSQL serialises the commits of all transactions that queued
//! a NOTIFY: `PreCommit_Notify` takes a cluster-wide lock on the notification queue and
//! holds it until the commit record is flushed, so the parallel group commits could not
//! overlap their WAL flushes (pgbench doing ingest's statement, 1 reading per
//! transaction at 64 clients, makes about half as many transactions a second with the
//! NOTIFY as without; PERFORMANCE.md). Now a commit that inserted outbox rows
//! raises a `Signal` once it has returned, and one task per ingest process sends the
//! NOTIFY:
//!
//! - At most one NOTIFY is in flight; the signals raised meanwhile collapse into one
//!   more, sent no sooner than [`MIN_INTERVAL`] after the previous one started, or,
//!   when `ingest.notify_interval_ms` is set (0 by default), that long after it when
//!   the previous one covered several rows ([`crate::pacing`]: under load the relay's
//!   rounds, which follow the NOTIFYs, then gather more rows each). After a quiet spell
//!   the first signal is sent at once.
//! - Rows are visible when the relay hears of them: a NOTIFY covers only the commits
//!   that had returned before it was sent.
//! - The session runs with `synchronous_commit = off`: a NOTIFY's transaction gets an
//!   xid and writes a commit record, but it carries no data, so it need not wait for
//!   the WAL flush (nor hold the notification queue's lock during one). One lost in a
//!   crash costs a relay poll interval.
//! - It never holds a request back: signalling is a `try_send` on a channel of one. A
//!   failed NOTIFY is logged (a warning for the first of a series), the connection is
//!   dropped, and the next signal is sent after a backoff; meanwhile the relays' poll
//!   finds the rows.
//! - It ends once every `Signal` is gone (the dispatcher ended), after sending what
//!   it still owes unless PostgreSQL was failing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bootstrap::{Backoff, FailureLog};
use crate::db;
use crate::pacing::Pacer;

/// The channel the relays listen on (`LISTEN outbox` in `relay.rs`).
pub const CHANNEL: &str = "outbox";

/// The shortest time between the starts of two NOTIFYs of one process after a light
/// one (under [`crate::pacing::BUSY_ROWS`] rows). Measured here
/// (PERFORMANCE.md): 0 and 1 ms alike, as a commit takes longer than 1 ms and
/// the cap rarely binds (about 0.9 NOTIFY per commit); 5 ms more than halved the
/// NOTIFYs and cut the relay's rounds by a third, but added 2-3 ms to the end-to-end
/// p50 at 200-500 readings/s. 1 ms caps a faster machine at 1,000 NOTIFYs a second
/// per ingest process.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// How to reach PostgreSQL for the NOTIFYs.
#[derive(Debug, Clone)]
pub struct Notifier {
    config: tokio_postgres::Config,
    attempt_timeout: Duration,
    busy_interval: Duration,
}

impl Notifier {
    /// A notifier connecting with `config`; one attempt (connecting included) is given
    /// up after `attempt_timeout`. Unpaced: NOTIFYs [`MIN_INTERVAL`] apart at most.
    pub fn new(config: tokio_postgres::Config, attempt_timeout: Duration) -> Self {
        Self {
            config,
            attempt_timeout,
            busy_interval: MIN_INTERVAL,
        }
    }

    /// A NOTIFY that covered several rows is followed by the next no sooner than
    /// `busy_interval` after it (`ingest.notify_interval_ms`; never below
    /// [`MIN_INTERVAL`], so 0 leaves the notifier unpaced).
    pub fn paced(self, busy_interval: Duration) -> Self {
        Self {
            busy_interval: busy_interval.max(MIN_INTERVAL),
            ..self
        }
    }

    /// Starts the task; it ends after the last clone of the returned [`Signal`] is
    /// dropped.
    pub(crate) fn start(self) -> (Signal, tokio::task::JoinHandle<()>) {
        let (sender, signals) = mpsc::channel(1);
        let rows = Arc::new(AtomicUsize::new(0));
        let connection = Connection {
            config: self.config,
            client: None,
            attempt_timeout: self.attempt_timeout,
        };
        let pacer = Pacer::new(MIN_INTERVAL, self.busy_interval);
        let task = tokio::spawn(run(signals, rows.clone(), pacer, connection));
        (Signal { sender, rows }, task)
    }
}

/// Raised by a commit that inserted outbox rows, after it returned; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Signal {
    sender: mpsc::Sender<()>,
    /// Outbox rows committed since the last NOTIFY went out.
    rows: Arc<AtomicUsize>,
}

impl Signal {
    /// Asks for a NOTIFY for `rows` new outbox rows; never waits. A signal already
    /// waiting covers this one too.
    pub(crate) fn raise(&self, rows: usize) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        let _ = self.sender.try_send(());
    }
}

/// Sends one notification.
trait Notify {
    async fn notify(&mut self) -> anyhow::Result<()>;
}

/// The PostgreSQL session the NOTIFYs go out on, opened when first needed and again
/// after a failure.
struct Connection {
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
    attempt_timeout: Duration,
}

impl Connection {
    async fn open(&self) -> anyhow::Result<tokio_postgres::Client> {
        let client = db::connect(&self.config).await?;
        // The NOTIFY's commit carries no data: it need not wait for the WAL flush.
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .context("setting synchronous_commit off")?;
        Ok(client)
    }
}

impl Notify for Connection {
    async fn notify(&mut self) -> anyhow::Result<()> {
        let attempt_timeout = self.attempt_timeout;
        let attempt = async {
            let client = match self.client.take() {
                Some(client) if !client.is_closed() => client,
                _ => self.open().await?,
            };
            client
                .batch_execute(&format!("NOTIFY {CHANNEL}"))
                .await
                .context("sending NOTIFY")?;
            anyhow::Ok(client)
        };
        // On any failure the session is dropped; the next attempt opens a new one.
        let client = tokio::time::timeout(attempt_timeout, attempt)
            .await
            .context("NOTIFY timed out")??;
        self.client = Some(client);
        Ok(())
    }
}

/// Sends a NOTIFY for each burst of signals (see the module comment) until the signals'
/// senders are all gone; `rows` counts the outbox rows the signals stand for.
async fn run(
    mut signals: mpsc::Receiver<()>,
    rows: Arc<AtomicUsize>,
    mut pacer: Pacer,
    mut sender: impl Notify,
) {
    // Set while failing: the backoff's end, which replaces the pacer's slot.
    let mut backoff_until: Option<Instant> = None;
    let mut backoff = Backoff::default();
    let mut log = FailureLog::default();
    while signals.recv().await.is_some() {
        let deadline = backoff_until.unwrap_or_else(|| pacer.reserve(Instant::now()));
        if deadline > Instant::now() {
            let open = wait_until(&mut signals, deadline).await;
            if !open && log.failing() {
                // Shutting down while PostgreSQL fails: the relays' poll finds the rows.
                return;
            }
        }
        // Every commit signalled up to here has returned: this NOTIFY covers it too.
        let _ = signals.try_recv();
        let covered = rows.swap(0, Ordering::Relaxed);
        match sender.notify().await {
            Ok(()) => {
                metrics::counter!("ingest_outbox_notify_total").increment(1);
                log.succeeded("outbox notify sent again");
                backoff.reset();
                backoff_until = None;
                pacer.finished(covered);
            }
            Err(error) => {
                log.failed(
                    &format!("{error:#}"),
                    "outbox notify failed; relays find the rows by polling until it works",
                    "outbox notify failed again",
                );
                // The next NOTIFY covers these rows too.
                rows.fetch_add(covered, Ordering::Relaxed);
                backoff_until = Some(Instant::now() + backoff.next_delay());
            }
        }
    }
}

/// Waits until `deadline`; signals arriving meanwhile are absorbed (the NOTIFY sent next
/// covers them). Returns false at once when the channel closes.
async fn wait_until(signals: &mut mpsc::Receiver<()>, deadline: Instant) -> bool {
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            signal = signals.recv() => {
                if signal.is_none() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use tokio::sync::Semaphore;

    use super::*;

    /// Longer than tokio's timer resolution (1 ms), so the paused clock can show it.
    const INTERVAL: Duration = Duration::from_millis(10);
    /// After a NOTIFY that covered several rows.
    const BUSY_INTERVAL: Duration = Duration::from_millis(40);

    /// A stand-in for PostgreSQL: records each attempt, holds it until `gate` gives a
    /// permit, and fails while `failing` is set.
    #[derive(Clone)]
    struct Recorder {
        attempts: Arc<Mutex<Vec<(Instant, bool)>>>,
        in_flight: Arc<Mutex<(usize, usize)>>,
        gate: Arc<Semaphore>,
        failing: Arc<AtomicBool>,
    }

    impl Recorder {
        fn open_gate() -> Self {
            Self {
                attempts: Arc::default(),
                in_flight: Arc::default(),
                gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
                failing: Arc::default(),
            }
        }

        fn closed_gate() -> Self {
            Self {
                gate: Arc::new(Semaphore::new(0)),
                ..Self::open_gate()
            }
        }

        fn attempts(&self) -> Vec<(Instant, bool)> {
            self.attempts.lock().expect("not poisoned").clone()
        }

        fn sent(&self) -> Vec<Instant> {
            let attempts = self.attempts();
            attempts
                .iter()
                .filter(|(_, ok)| *ok)
                .map(|(at, _)| *at)
                .collect()
        }

        /// The most attempts that were in flight at once.
        fn most_in_flight(&self) -> usize {
            self.in_flight.lock().expect("not poisoned").1
        }
    }

    impl Notify for Recorder {
        async fn notify(&mut self) -> anyhow::Result<()> {
            let started = Instant::now();
            {
                let mut in_flight = self.in_flight.lock().expect("not poisoned");
                in_flight.0 += 1;
                in_flight.1 = in_flight.1.max(in_flight.0);
            }
            self.gate.acquire().await?.forget();
            self.in_flight.lock().expect("not poisoned").0 -= 1;
            let ok = !self.failing.load(Ordering::SeqCst);
            self.attempts
                .lock()
                .expect("not poisoned")
                .push((started, ok));
            anyhow::ensure!(ok, "postgres is down");
            Ok(())
        }
    }

    fn start(recorder: &Recorder) -> (Signal, tokio::task::JoinHandle<()>) {
        start_with(recorder, BUSY_INTERVAL)
    }

    fn start_with(
        recorder: &Recorder,
        busy_interval: Duration,
    ) -> (Signal, tokio::task::JoinHandle<()>) {
        let (sender, signals) = mpsc::channel(1);
        let rows = Arc::new(AtomicUsize::new(0));
        let pacer = Pacer::new(INTERVAL, busy_interval);
        let task = tokio::spawn(run(signals, rows.clone(), pacer, recorder.clone()));
        (Signal { sender, rows }, task)
    }

    /// Raises a signal for `rows` rows every millisecond, `commits` times.
    async fn commit_every_millisecond(signal: &Signal, commits: usize, rows: usize) {
        for _ in 0..commits {
            signal.raise(rows);
            settle().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// About one NOTIFY per `interval` (`expected` of them), each at least that long
    /// after the one before.
    fn assert_one_per_interval(
        sent: &[Instant],
        expected: std::ops::RangeInclusive<usize>,
        interval: Duration,
    ) {
        assert!(
            expected.contains(&sent.len()),
            "one NOTIFY per {interval:?}, not one per commit: {}",
            sent.len()
        );
        for pair in sent.windows(2) {
            assert!(pair[1] - pair[0] >= interval, "{pair:?}");
        }
    }

    /// Lets the notifier task run until it waits, without moving the clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_signal_after_a_quiet_spell_notifies_at_once() {
        let recorder = Recorder::open_gate();
        let (signal, _task) = start(&recorder);
        let raised = Instant::now();
        signal.raise(1);
        settle().await;
        assert_eq!(recorder.sent(), vec![raised]);

        tokio::time::sleep(Duration::from_secs(5)).await;
        let raised_again = Instant::now();
        signal.raise(1);
        settle().await;
        assert_eq!(recorder.sent(), vec![raised, raised_again]);
    }

    #[tokio::test(start_paused = true)]
    async fn signals_raised_while_a_notify_is_in_flight_collapse_into_one_more() {
        let recorder = Recorder::closed_gate();
        let (signal, _task) = start(&recorder);
        signal.raise(1);
        settle().await;
        for _ in 0..10 {
            signal.raise(1);
            settle().await;
        }
        recorder.gate.add_permits(100);
        settle().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(recorder.sent().len(), 2, "one NOTIFY, then one for the ten");
        assert_eq!(recorder.most_in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn notifies_of_a_busy_ingest_are_at_least_the_minimum_interval_apart() {
        let recorder = Recorder::open_gate();
        // No longer interval after busy NOTIFYs: this is about the shortest one.
        let (signal, _task) = start_with(&recorder, INTERVAL);
        // A commit of one row returning every millisecond for 100 ms.
        commit_every_millisecond(&signal, 100, 1).await;
        tokio::time::sleep(INTERVAL).await;
        assert_one_per_interval(&recorder.sent(), 9..=11, INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn notifies_covering_several_rows_are_the_busy_interval_apart() {
        let recorder = Recorder::open_gate();
        let (signal, _task) = start(&recorder);
        // Commits of BUSY_ROWS rows every millisecond for 200 ms, then single rows.
        commit_every_millisecond(&signal, 200, crate::pacing::BUSY_ROWS).await;
        tokio::time::sleep(BUSY_INTERVAL).await;
        let busy = recorder.sent();
        assert_one_per_interval(&busy, 5..=6, BUSY_INTERVAL);
        // A light NOTIFY (one row) lets the next follow after the light interval.
        tokio::time::sleep(BUSY_INTERVAL).await;
        signal.raise(1);
        settle().await;
        let light_sent = Instant::now();
        assert_eq!(recorder.sent().last(), Some(&light_sent));
        signal.raise(1);
        settle().await;
        tokio::time::sleep(INTERVAL).await;
        settle().await;
        let sent = recorder.sent();
        assert_eq!(sent.len(), busy.len() + 2);
        assert_eq!(sent[sent.len() - 1] - sent[sent.len() - 2], INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_notify_backs_off_and_recovers_when_postgres_is_back() {
        let recorder = Recorder::open_gate();
        recorder.failing.store(true, Ordering::SeqCst);
        let (signal, _task) = start(&recorder);
        // Commits keep signalling (every 10 ms for 10 s) while NOTIFY fails.
        for _ in 0..1_000 {
            signal.raise(1);
            settle().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let attempts = recorder.attempts();
        assert!(
            (6..=8).contains(&attempts.len()),
            "backoff of 0.1, 0.2, 0.4 ... s between attempts, not one per signal: {}",
            attempts.len()
        );
        for pair in attempts.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(100));
        }

        recorder.failing.store(false, Ordering::SeqCst);
        for _ in 0..600 {
            signal.raise(1);
            settle().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sent = recorder.sent();
        assert!(
            sent.len() > 100,
            "after the backoff, NOTIFYs go out as commits return: {}",
            sent.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_notifier_sends_what_it_owes_and_ends_when_the_signals_are_gone() {
        let recorder = Recorder::closed_gate();
        let (signal, task) = start(&recorder);
        signal.raise(1);
        settle().await;
        signal.raise(1);
        drop(signal);
        recorder.gate.add_permits(10);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the notifier ends")
            .expect("the notifier did not panic");
        assert_eq!(recorder.sent().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_notifier_ends_without_waiting_out_its_backoff_when_postgres_fails() {
        let recorder = Recorder::open_gate();
        recorder.failing.store(true, Ordering::SeqCst);
        let (signal, task) = start(&recorder);
        signal.raise(1);
        settle().await;
        signal.raise(1);
        drop(signal);
        let dropped = Instant::now();
        task.await.expect("the notifier did not panic");
        assert_eq!(Instant::now(), dropped, "no backoff waited out");
        assert_eq!(recorder.attempts().len(), 1);
    }
}

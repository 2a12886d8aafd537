//! The faults of the chaos run, each injected while the fleet keeps sending.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use contract::settings::Settings;
use rand::seq::IndexedRandom;

use testkit::prometheus::Scrape;

use crate::check::{settle, Checker, Findings};
use crate::control::{alive, cpu_ticks, rss_kib, ticks_per_second, Lab, Server};
use crate::fleet::Fleet;
use testkit::FaultProxy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillRelay,
    KillProjector,
    KillIngest,
    PauseProjector,
    PauseRelay,
    RestartNats,
    NatsLosesTail,
    RestartPostgres,
    RestartRedis,
    PartitionRelayNats,
    PartitionProjectorRedis,
    NatsOutage,
    PostgresOutage,
    RedisOutage,
    DeleteConsumer,
    Mixed,
}

/// Processes the run watches for crashes (the names of their pid files).
const PROCESSES: [&str; 6] = [
    "ingest",
    "relay",
    "projector",
    "query",
    "relay-b",
    "projector-b",
];

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::KillRelay,
        Fault::KillProjector,
        Fault::KillIngest,
        Fault::PauseProjector,
        Fault::PauseRelay,
        Fault::RestartNats,
        Fault::NatsLosesTail,
        Fault::RestartPostgres,
        Fault::RestartRedis,
        Fault::PartitionRelayNats,
        Fault::PartitionProjectorRedis,
        Fault::NatsOutage,
        Fault::PostgresOutage,
        Fault::RedisOutage,
        Fault::DeleteConsumer,
        Fault::Mixed,
    ];

    /// The fast subset `scripts/test` runs.
    const QUICK: [Fault; 9] = [
        Fault::KillRelay,
        Fault::KillProjector,
        Fault::PauseProjector,
        Fault::NatsLosesTail,
        Fault::RestartPostgres,
        Fault::RestartRedis,
        Fault::PartitionRelayNats,
        Fault::NatsOutage,
        Fault::DeleteConsumer,
    ];

    /// Faults the mixed phase draws from.
    const MIXABLE: [Fault; 9] = [
        Fault::KillRelay,
        Fault::KillProjector,
        Fault::KillIngest,
        Fault::PauseProjector,
        Fault::RestartNats,
        Fault::RestartPostgres,
        Fault::RestartRedis,
        Fault::PartitionRelayNats,
        Fault::PartitionProjectorRedis,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRelay => "kill -9 relay",
            Fault::KillProjector => "kill -9 projector",
            Fault::KillIngest => "kill -9 ingest",
            Fault::PauseProjector => "SIGSTOP projector",
            Fault::PauseRelay => "SIGSTOP relay",
            Fault::RestartNats => "restart NATS",
            Fault::NatsLosesTail => "NATS crash loses tail",
            Fault::RestartPostgres => "restart PostgreSQL",
            Fault::RestartRedis => "restart Redis",
            Fault::PartitionRelayNats => "partition relay-NATS",
            Fault::PartitionProjectorRedis => "partition projector-Redis",
            Fault::NatsOutage => "NATS down, load goes on",
            Fault::PostgresOutage => "PostgreSQL down 20 s",
            Fault::RedisOutage => "Redis down 20 s",
            Fault::DeleteConsumer => "nats consumer rm projector",
            Fault::Mixed => "mixed",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Fault::KillRelay => "kill-relay",
            Fault::KillProjector => "kill-projector",
            Fault::KillIngest => "kill-ingest",
            Fault::PauseProjector => "pause-projector",
            Fault::PauseRelay => "pause-relay",
            Fault::RestartNats => "restart-nats",
            Fault::NatsLosesTail => "nats-loses-tail",
            Fault::RestartPostgres => "restart-postgres",
            Fault::RestartRedis => "restart-redis",
            Fault::PartitionRelayNats => "partition-relay-nats",
            Fault::PartitionProjectorRedis => "partition-projector-redis",
            Fault::NatsOutage => "nats-outage",
            Fault::PostgresOutage => "postgres-outage",
            Fault::RedisOutage => "redis-outage",
            Fault::DeleteConsumer => "delete-consumer",
            Fault::Mixed => "mixed",
        }
    }

    pub fn describe(self) -> String {
        let text = match self {
            Fault::KillRelay => "SIGKILL the relay, restart it with scripts/up (a second relay runs throughout)",
            Fault::KillProjector => "SIGKILL the projector, restart it with scripts/up (a second projector runs throughout)",
            Fault::KillIngest => "SIGKILL ingest mid-request, restart it with scripts/up",
            Fault::PauseProjector => "SIGSTOP the projector past the ack wait, so its messages go to the other one, then SIGCONT",
            Fault::PauseRelay => "SIGSTOP the relay mid-round past the duplicate window, then SIGCONT",
            Fault::RestartNats => "SIGTERM nats-server and start it again",
            Fault::NatsLosesTail => "SIGKILL nats-server, cut the stream's last messages off its store (an OS crash before 2.9's fsync), start it: the relay republishes what was lost",
            Fault::RestartPostgres => "pg_ctl stop -m immediate (a crash), then start",
            Fault::RestartRedis => "SIGKILL redis-server (no persistence: the read model is gone), start it again",
            Fault::PartitionRelayNats => "the fault proxy holds every byte between relay/projector and NATS past the ack wait",
            Fault::PartitionProjectorRedis => "the fault proxy holds every byte between projector/query and Redis",
            Fault::NatsOutage => "NATS down for a long time while devices keep sending: ingest must go on, memory stay flat, nothing spin",
            Fault::PostgresOutage => "PostgreSQL down while devices keep sending: ingest answers 503, the relay backs off, nothing spins, grows or crashes",
            Fault::RedisOutage => "Redis down while events keep coming: the projector backs off, nothing spins, grows or crashes",
            Fault::DeleteConsumer => "after the dedup horizon and 5 s more of load, delete the projectors' durable consumer (an operator's nats consumer rm): a projector makes it again past where it stood, so events applied beyond the horizon do not count twice",
            Fault::Mixed => "faults of the kinds above drawn at random, one after another",
        };
        format!("[{}] {text}", self.key())
    }

    /// The faults named on the command line, or all (the quick subset with `quick`).
    pub fn chosen(names: &[String], quick: bool) -> anyhow::Result<Vec<Fault>> {
        if names.is_empty() {
            return Ok(if quick {
                Self::QUICK.to_vec()
            } else {
                Self::ALL.to_vec()
            });
        }
        names
            .iter()
            .map(|name| {
                Self::ALL
                    .into_iter()
                    .find(|fault| fault.key() == name.trim())
                    .with_context(|| format!("unknown fault '{name}' (see --list)"))
            })
            .collect()
    }

    /// The process this fault kills, which `scripts/up` then starts again.
    fn killed(self) -> Option<&'static str> {
        match self {
            Fault::KillRelay => Some("relay"),
            Fault::KillProjector => Some("projector"),
            Fault::KillIngest => Some("ingest"),
            _ => None,
        }
    }
}

/// What an injection did, as far as it got: the caller owns it, so what a phase found
/// before an error stays.
#[derive(Default)]
pub struct Outcome {
    pub injections: u32,
    pub notes: Vec<String>,
    /// What checks made before the phase's end found (the mixed phase's, before a
    /// restart of Redis).
    pub checked: Findings,
}

/// The `application_name` of the second relay's PostgreSQL sessions, which tells its
/// claims from those of the relay the run pauses.
pub const SECOND_RELAY_APPLICATION: &str = "relay-b";

pub struct Run<'a> {
    pub lab: &'a Lab,
    pub second_relay: std::net::SocketAddr,
    pub second_projector: std::net::SocketAddr,
    pub settings: &'a Settings,
    pub fleet: &'a Fleet,
    pub nats_proxy: &'a FaultProxy,
    pub redis_proxy: &'a FaultProxy,
    pub quick: bool,
    /// The invariants, checked between the mixed phase's faults too.
    pub checker: &'a Checker,
    /// Longest wait for the pipeline to recover after a phase.
    pub recover_limit: Duration,
}

impl Run<'_> {
    /// Injects `fault` (its repeats, or the mixed phase's draws), recording into
    /// `outcome` as it goes.
    pub async fn inject(&self, fault: Fault, outcome: &mut Outcome) -> anyhow::Result<()> {
        let pids_before: Vec<Option<u32>> =
            PROCESSES.iter().map(|name| self.lab.pid(name)).collect();
        let mut killed = Vec::new();
        if fault == Fault::Mixed {
            let rounds = if self.quick { 3 } else { 8 };
            let mut drawn = Vec::new();
            for _ in 0..rounds {
                let pick = *Fault::MIXABLE
                    .choose(&mut rand::rng())
                    .unwrap_or(&Fault::KillRelay);
                if pick == Fault::RestartRedis && !drawn.is_empty() {
                    // Redis keeps nothing, so the read model is built again from the
                    // stream, each event once: a double count the faults before left
                    // would be gone by the phase's check. They are checked first.
                    let settled =
                        settle(self.checker, self.fleet, Instant::now(), self.recover_limit).await;
                    outcome.checked.merge(settled.findings);
                    outcome.notes.push(format!(
                        "checked before restart-redis (after {}): {}",
                        drawn.join(", "),
                        if outcome.checked.is_clean() {
                            "clean"
                        } else {
                            "NOT clean"
                        }
                    ));
                    self.fleet.resume();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                drawn.push(pick.key());
                killed.extend(pick.killed());
                outcome.injections += self.inject_once(pick, &mut outcome.notes).await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            outcome.notes.push(format!("drawn: {}", drawn.join(", ")));
        } else {
            killed.extend(fault.killed());
            let repeats = match fault {
                Fault::KillRelay | Fault::KillProjector | Fault::KillIngest if !self.quick => 3,
                Fault::RestartNats | Fault::RestartPostgres if !self.quick => 2,
                _ => 1,
            };
            for round in 0..repeats {
                if round > 0 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                outcome.injections += self.inject_once(fault, &mut outcome.notes).await?;
            }
        }
        // A process the fault killed runs again under a new pid; every other one runs
        // under the pid it had. (`scripts/up`, which the kills call, starts whatever is
        // not running, so before 2026-12-07 a crash during a kill went unseen.)
        for (name, before) in PROCESSES.iter().zip(pids_before) {
            let now = self.lab.pid(name);
            let restarted = killed.contains(name);
            if !now.is_some_and(alive) || (before != now && !restarted) {
                bail!("{name} died during the fault (pid {before:?}, now {now:?}): it must back off, not crash");
            }
        }
        Ok(())
    }

    async fn inject_once(&self, fault: Fault, notes: &mut Vec<String>) -> anyhow::Result<u32> {
        let ack_wait = Duration::from_secs(self.settings.projector.ack_wait_secs);
        match fault {
            Fault::KillRelay | Fault::KillProjector | Fault::KillIngest => {
                let name = fault.killed().context("a kill fault names its process")?;
                // Gone before `scripts/up` looks, or it would find it still running.
                self.lab.kill_and_wait(name, "KILL").await?;
                let took = self.lab.up().await?;
                notes.push(format!(
                    "{name} back through scripts/up in {:.1} s",
                    took.as_secs_f64()
                ));
            }
            Fault::PauseProjector => {
                let hold = ack_wait + Duration::from_secs(3);
                // The case to prove is a projector stopped holding a batch, which the
                // other one applies once its ack wait ran out and the stopped one then
                // skips; caught between two fetches, it held none, so pause it again (at
                // most 3 times) until it skipped some.
                let stopped = self.settings.projector.admin_listen;
                let skipped_so_far = || counter(stopped, "projector_duplicates_skipped_total");
                let applied_by_other =
                    || counter(self.second_projector, "projector_events_applied_total");
                for pause in 1..=3 {
                    // A failed scrape proves nothing either way: that pause counts no skip.
                    let skipped_before = skipped_so_far().await;
                    let applied_before = applied_by_other().await.unwrap_or(0.0);
                    self.lab.signal("projector", "STOP")?;
                    tokio::time::sleep(hold).await;
                    let applied_while_stopped = applied_by_other().await.unwrap_or(0.0);
                    self.lab.signal("projector", "CONT")?;
                    let resumed = Instant::now();
                    let mut skipped = 0.0;
                    while let Some(before) = skipped_before {
                        if let Some(after) = skipped_so_far().await {
                            skipped = after - before;
                        }
                        if skipped > 0.0 || resumed.elapsed() > Duration::from_secs(5) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    notes.push(format!(
                        "pause {pause}: projector stopped for {} s; meanwhile the other one applied {:.0}; after SIGCONT the stopped one skipped {skipped:.0} events as already applied",
                        hold.as_secs(),
                        applied_while_stopped - applied_before,
                    ));
                    if skipped > 0.0 {
                        return Ok(pause);
                    }
                }
                notes
                    .push("no pause caught the projector holding a batch: not injected".to_owned());
                return Ok(0);
            }
            Fault::PauseRelay => {
                // Past the session timeout (another relay takes the claim over) and past
                // the duplicate window (JetStream no longer drops the second copy).
                let window = Duration::from_secs(self.settings.nats.duplicate_window_secs);
                let session =
                    Duration::from_millis(self.settings.relay.idle_in_transaction_timeout_ms);
                let hold = window.max(session) + Duration::from_secs(3);
                // Caught after its claim, the relay may not have sent anything yet; the
                // case to prove is the one where it had, so pause it again (at most 3
                // times) until the stream shows the other relay's second copies.
                for pause in 1..=3 {
                    let (mut stream, start) = self.recent_stream().await?;
                    let copies_before = second_copies(&mut stream, start).await?;
                    let attempts = self.stop_relay_mid_round().await?;
                    tokio::time::sleep(hold).await;
                    self.lab.signal("relay", "CONT")?;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let copies = second_copies(&mut stream, start)
                        .await?
                        .saturating_sub(copies_before);
                    notes.push(format!(
                        "pause {pause}: relay stopped holding a claim (caught at attempt {attempts}) for {} s; second copies in the stream: {copies}",
                        hold.as_secs()
                    ));
                    if copies > 0 {
                        return Ok(pause);
                    }
                }
                // The case the fault is for never happened: no injection to count, so
                // the row fails rather than pass on three pauses that proved nothing.
                notes.push("no pause caught the relay with publishes out: not injected".to_owned());
                return Ok(0);
            }
            Fault::RestartNats => {
                self.lab
                    .bounce_server(Server::Nats, "TERM", || Ok(()))
                    .await?
            }
            Fault::NatsLosesTail => self.nats_loses_tail(notes).await?,
            Fault::RestartPostgres => {
                self.lab
                    .bounce_server(Server::Postgres, "KILL", || Ok(()))
                    .await?
            }
            Fault::RestartRedis => {
                self.lab
                    .bounce_server(Server::Redis, "KILL", || Ok(()))
                    .await?
            }
            Fault::PartitionRelayNats | Fault::PartitionProjectorRedis => {
                let proxy = if fault == Fault::PartitionRelayNats {
                    self.nats_proxy
                } else {
                    self.redis_proxy
                };
                let hold = ack_wait + Duration::from_secs(3);
                proxy.partition();
                tokio::time::sleep(hold).await;
                let held = proxy.heal();
                notes.push(format!(
                    "partitioned for {} s; {held} bytes held until the heal",
                    hold.as_secs()
                ));
                if held == 0 {
                    // Nothing tried to cross: the partition was never felt.
                    notes.push("no bytes crossed the partition: not injected".to_owned());
                    return Ok(0);
                }
            }
            Fault::NatsOutage => {
                let seconds = if self.quick { 10 } else { 60 };
                self.outage(Server::Nats, Duration::from_secs(seconds), notes)
                    .await?
            }
            Fault::PostgresOutage => {
                self.outage(Server::Postgres, Duration::from_secs(20), notes)
                    .await?
            }
            Fault::RedisOutage => {
                self.outage(Server::Redis, Duration::from_secs(20), notes)
                    .await?
            }
            Fault::DeleteConsumer => self.delete_consumer(notes).await?,
            Fault::Mixed => bail!("mixed does not nest"),
        }
        Ok(1)
    }

    /// An unclean crash of the NATS host: the newest messages of the stream never
    /// reached the disk. The relays must notice and republish what the stream lost.
    async fn nats_loses_tail(&self, notes: &mut Vec<String>) -> anyhow::Result<()> {
        let republished_before = self.republished().await;
        let messages_dir =
            testkit::stream_messages_dir(&self.lab.nats_store(), &self.settings.nats.stream);
        let mut cut = (0, 0);
        self.lab
            .bounce_server(Server::Nats, "KILL", || {
                // The newest quarter of the last block, at most 256 KiB (~1,000 events).
                cut = testkit::truncate_stream_store(&messages_dir, |size| {
                    size - (size / 4).min(256 * 1024)
                })?;
                Ok(())
            })
            .await?;
        let restarted = Instant::now();
        let Some(republished) = poll_until(Duration::from_millis(200), || async {
            let republished = self.republished().await - republished_before;
            (republished > 0.0).then_some(republished)
        })
        .await
        else {
            bail!("the stream lost its tail but no relay republished anything within 30 s");
        };
        notes.push(format!(
            "last block cut from {} to {} bytes; the relays republished {republished:.0} lost events within {:.1} s",
            cut.0,
            cut.1,
            restarted.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Deletes the durable consumer, as `nats consumer rm` does, and waits until a
    /// projector has made it again. First the devices send for the dedup horizon and
    /// a little more, so that the read model holds events applied longer ago than it
    /// (whatever rebuilt it last): a consumer made again from the start of the stream
    /// would count those twice.
    async fn delete_consumer(&self, notes: &mut Vec<String>) -> anyhow::Result<()> {
        let horizon = Duration::from_secs(self.settings.projector.dedup_horizon_secs);
        let load = horizon + Duration::from_secs(5);
        tokio::time::sleep(load).await;
        let stream = self.stream().await?;
        let consumer = &self.settings.nats.consumer;
        let before = stream.consumer_info(consumer).await?;
        stream.delete_consumer(consumer).await?;
        let deleted = Instant::now();
        let Some(made_again) = poll_until(Duration::from_millis(100), || async {
            stream.consumer_info(consumer).await.ok()
        })
        .await
        else {
            bail!("no projector made the deleted consumer again within 30 s");
        };
        notes.push(format!(
            "deleted after {} s of load (dedup horizon {} s) at ack floor {}; made again in {:.1} s, delivering {:?}",
            load.as_secs(),
            horizon.as_secs(),
            before.ack_floor.stream_sequence,
            deleted.elapsed().as_secs_f64(),
            made_again.config.deliver_policy
        ));
        Ok(())
    }

    /// The event stream, on a connection of its own (straight to NATS, past the proxy).
    async fn stream(&self) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
        let client = async_nats::connect(self.settings.nats.url.as_str()).await?;
        Ok(async_nats::jetstream::new(client)
            .get_stream(&self.settings.nats.stream)
            .await?)
    }

    /// `relay_republished_total` of both relays.
    async fn republished(&self) -> f64 {
        let mut total = 0.0;
        for admin in [self.settings.relay.admin_listen, self.second_relay] {
            total += scrape(admin).await.total("relay_republished_total");
        }
        total
    }

    /// The stream and the sequence from which a pause's second copies are counted:
    /// the rows a relay holds when it is stopped may have been published a little
    /// before, by as many messages as its rounds in flight claim (both relays'
    /// counted, twice over). Copies are counted in the stream itself, not as its
    /// messages against the outbox's published rows, which under load differ by
    /// whatever is published but not marked yet.
    async fn recent_stream(&self) -> anyhow::Result<(async_nats::jetstream::stream::Stream, u64)> {
        let mut stream = self.stream().await?;
        let last = stream.info().await?.state.last_sequence;
        let relay = &self.settings.relay;
        let reach =
            u64::try_from(relay.batch_size).unwrap_or(0) * relay.rounds_in_flight as u64 * 4;
        Ok((stream, last.saturating_sub(reach) + 1))
    }

    /// SIGSTOPs the relay `scripts/up` started while it holds a claim: its session is
    /// idle in a transaction whose last statement was the claim, so it has published
    /// (or is publishing) rows it has not marked yet. Returns the attempts it took.
    async fn stop_relay_mid_round(&self) -> anyhow::Result<u32> {
        let (postgres, connection) =
            tokio_postgres::connect(&self.settings.database.url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let in_round = || async {
            postgres
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE state = 'idle in transaction' AND query LIKE '%SKIP LOCKED%'
                        AND application_name <> $1",
                    &[&SECOND_RELAY_APPLICATION],
                )
                .await
                .map(|row| row.get::<_, i64>(0) > 0)
        };
        for attempt in 1..=2_000 {
            if in_round().await? {
                self.lab.signal("relay", "STOP")?;
                let still = in_round().await;
                if matches!(still, Ok(true)) {
                    return Ok(attempt);
                }
                // Not left stopped whatever the look said.
                self.lab.signal("relay", "CONT")?;
                still?;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        bail!("never caught the relay inside a round")
    }

    /// A server stays down while devices keep sending: the processes that need it back
    /// off (little CPU), none grows or crashes, and with NATS down ingest still accepts
    /// into the outbox.
    async fn outage(
        &self,
        server: Server,
        outage: Duration,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let watched = ["ingest", "relay", "projector", "relay-b", "projector-b"];
        let pids: Vec<(&str, u32)> = watched
            .iter()
            .filter_map(|name| Some((*name, self.lab.pid(name)?)))
            .collect();
        let cpu_before: Vec<Option<u64>> = pids.iter().map(|(_, pid)| cpu_ticks(*pid)).collect();
        let mut peak_kib = vec![0u64; pids.len()];
        let first_kib: Vec<u64> = pids
            .iter()
            .map(|(_, pid)| rss_kib(*pid).unwrap_or(0))
            .collect();
        let acked_before = self.fleet.observed().acked.len();
        self.lab.stop_server(server).await?;
        let started = Instant::now();
        while started.elapsed() < outage {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for ((_, pid), peak) in pids.iter().zip(peak_kib.iter_mut()) {
                *peak = (*peak).max(rss_kib(*pid).unwrap_or(0));
            }
        }
        let acked_during = self.fleet.observed().acked.len() - acked_before;
        let seconds = started.elapsed().as_secs_f64();
        let mut cpu = Vec::new();
        let mut refused = None;
        for (((name, pid), before), (peak, first)) in pids
            .iter()
            .zip(&cpu_before)
            .zip(peak_kib.iter().zip(&first_kib))
        {
            let used = match (before, cpu_ticks(*pid)) {
                (Some(before), Some(after)) => {
                    (after - before) as f64 / ticks_per_second() / seconds * 100.0
                }
                _ => f64::NAN,
            };
            cpu.push(format!(
                "{name} {used:.1}% CPU, RSS {} -> peak {} MiB",
                first / 1024,
                peak / 1024
            ));
            if *peak > 64 * 1024 {
                refused.get_or_insert(format!(
                    "{name} grew to {} MiB while {server:?} was down",
                    peak / 1024
                ));
            }
            // The processes that wait for this server must back off; the others work
            // as usual (the relay keeps publishing while Redis is down).
            let waits_for_it = match server {
                Server::Nats => name.starts_with("relay") || name.starts_with("projector"),
                Server::Postgres => name.starts_with("relay"),
                Server::Redis => name.starts_with("projector"),
            };
            if waits_for_it && used > 20.0 {
                refused.get_or_insert(format!("{name} used {used:.0}% CPU while {server:?} was down: it spins instead of backing off"));
            }
        }
        notes.push(format!(
            "{} s without {server:?}: {acked_during} readings accepted meanwhile ({:.0}/s); {}",
            outage.as_secs(),
            acked_during as f64 / seconds,
            cpu.join("; ")
        ));
        // Back before any verdict: left down, the server would fail every later phase
        // too, and the devices would retry their readings for good.
        self.lab.start_server(server).await?;
        if let Some(refused) = refused {
            bail!(refused);
        }
        if server == Server::Nats && acked_during == 0 {
            bail!("ingest accepted nothing while NATS was down");
        }
        Ok(())
    }
}

/// How long a fault waits for the pipeline's answer to it (a republish, a consumer
/// made again) before it counts as missing.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// Calls `check` every `interval` until it gives a value, for at most [`ANSWER_LIMIT`].
async fn poll_until<T, Fut>(interval: Duration, mut check: impl FnMut() -> Fut) -> Option<T>
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    while started.elapsed() < ANSWER_LIMIT {
        if let Some(value) = check().await {
            return Some(value);
        }
        tokio::time::sleep(interval).await;
    }
    None
}

/// The /metrics of a process; empty when it does not answer within 2 s (a stopped
/// process accepts connections, the kernel does that, but never answers).
async fn scrape(admin: std::net::SocketAddr) -> Scrape {
    try_scrape(admin).await.unwrap_or_else(|| Scrape::parse(""))
}

/// The total of the counter `name` at `admin`, or `None` when its metrics could not be
/// read.
async fn counter(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    Some(try_scrape(admin).await?.total(name))
}

/// The metrics at `admin`, or `None` when they could not be read within 2 s.
async fn try_scrape(admin: std::net::SocketAddr) -> Option<Scrape> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let response = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?;
    let text = response.error_for_status().ok()?.text().await.ok()?;
    Some(Scrape::parse(&text))
}

/// Second copies in `stream` from sequence `start` on: messages beyond the distinct
/// events they carry.
async fn second_copies(
    stream: &mut async_nats::jetstream::stream::Stream,
    start: u64,
) -> anyhow::Result<u64> {
    let (messages, events) = crate::check::read_stream(stream, start).await?;
    Ok(messages - events.len() as u64)
}

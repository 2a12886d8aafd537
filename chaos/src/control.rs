//! The lab: the pipeline and the servers of one chaos run, and the hands that break
//! them. Processes start and restart through the project's own `scripts/up`; servers
//! restart through the same `scripts/lib.sh` functions `scripts/up` uses.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A server the run owns and may kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Nats,
    Redis,
}

impl Server {
    fn ensure_function(self) -> &'static str {
        match self {
            Server::Postgres => "ensure_postgres",
            Server::Nats => "ensure_nats",
            Server::Redis => "ensure_redis",
        }
    }
}

pub struct Lab {
    pub repo_root: PathBuf,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// `PIPELINE__*` of the processes `scripts/up` starts (NATS and Redis through the
    /// fault proxies).
    pub proxied_env: Vec<(String, String)>,
    /// `PIPELINE__*` with the servers' own addresses: the second relay and projector,
    /// and the server functions of `scripts/lib.sh`.
    pub direct_env: Vec<(String, String)>,
    pub nats_port: u16,
    pub redis_port: u16,
    extras: Mutex<Vec<Child>>,
}

impl Lab {
    pub fn new(
        repo_root: PathBuf,
        data_dir: PathBuf,
        bin_dir: PathBuf,
        proxied_env: Vec<(String, String)>,
        direct_env: Vec<(String, String)>,
        nats_port: u16,
        redis_port: u16,
    ) -> Self {
        Self {
            repo_root,
            data_dir,
            bin_dir,
            proxied_env,
            direct_env,
            nats_port,
            redis_port,
            extras: Mutex::new(Vec::new()),
        }
    }

    fn log_file(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let dir = self.data_dir.join("log");
        std::fs::create_dir_all(&dir)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .with_context(|| format!("opening the log of {name}"))
    }

    /// `scripts/up`: starts whichever of the four processes is not running and waits
    /// for every `/readyz`.
    pub async fn up(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let log = self.log_file("chaos-up")?;
        let mut command = tokio::process::Command::new(self.repo_root.join("scripts/up"));
        command
            .current_dir(&self.repo_root)
            .envs(self.proxied_env.iter().cloned())
            .env("PIPELINE_DATA_DIR", &self.data_dir)
            .env("WAIT_READY_TIMEOUT", "60")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let status = command.status().await.context("running scripts/up")?;
        if !status.success() {
            bail!(
                "scripts/up failed ({status}); see {}",
                self.data_dir.join("log/chaos-up.log").display()
            );
        }
        Ok(started.elapsed())
    }

    /// Starts a process `scripts/up` does not manage (a second relay or projector),
    /// talking to the servers directly; its pid goes to `run/<name>.pid`.
    pub fn start_extra(
        &self,
        name: &str,
        binary: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let log = self.log_file(name)?;
        let child = Command::new(self.bin_dir.join(binary))
            .current_dir(&self.repo_root)
            .envs(self.direct_env.iter().cloned())
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        std::fs::write(self.pid_file(name), child.id().to_string())?;
        self.extras
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(child);
        Ok(())
    }

    /// Terminates the extra processes and waits for them, at most [`EXTRA_STOP_GRACE`]
    /// in all before it kills those still running: one stuck in its shutdown (a server
    /// that stayed down, say) must not keep the run from printing its table.
    pub fn stop_extras(&self) {
        let mut extras = self
            .extras
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for child in extras.iter_mut() {
            let _ = signal(child.id(), "TERM");
        }
        let deadline = Instant::now() + EXTRA_STOP_GRACE;
        for child in extras.iter_mut() {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("chaos: pid {} outlived its SIGTERM; killing it", child.id());
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        extras.clear();
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.data_dir.join("run").join(format!("{name}.pid"))
    }

    /// The pid in `run/<name>.pid`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.pid_file(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn signal(&self, name: &str, signal_name: &str) -> anyhow::Result<u32> {
        let pid = self
            .pid(name)
            .with_context(|| format!("{name} has no pid file"))?;
        signal(pid, signal_name)?;
        Ok(pid)
    }

    /// Kills a server with `signal_name`, lets `between` run while it is down, then
    /// starts it again with the function `scripts/up` uses.
    pub async fn bounce_server(
        &self,
        server: Server,
        signal_name: &str,
        between: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match server {
            Server::Postgres => {
                // pg_ctl's immediate mode is the crash PostgreSQL itself documents.
                self.lib_sh("private_postgres_ctl stop -m immediate")
                    .await?;
            }
            Server::Nats => {
                self.kill_and_wait(&format!("nats-{}", self.nats_port), signal_name)
                    .await?
            }
            Server::Redis => {
                self.kill_and_wait(&format!("redis-{}", self.redis_port), signal_name)
                    .await?
            }
        }
        // Started again whatever `between` did: left down, the server would fail every
        // later phase too.
        let between = between();
        self.lib_sh(server.ensure_function()).await?;
        between
    }

    /// Stops a server for good (a long outage); `start_server` brings it back.
    pub async fn stop_server(&self, server: Server) -> anyhow::Result<()> {
        match server {
            Server::Postgres => self.lib_sh("private_postgres_ctl stop -m immediate").await,
            Server::Nats => {
                self.kill_and_wait(&format!("nats-{}", self.nats_port), "KILL")
                    .await
            }
            Server::Redis => {
                self.kill_and_wait(&format!("redis-{}", self.redis_port), "KILL")
                    .await
            }
        }
    }

    pub async fn start_server(&self, server: Server) -> anyhow::Result<()> {
        self.lib_sh(server.ensure_function()).await
    }

    /// Sends `signal_name` to the process of `run/<name>.pid` and waits, at most 20 s,
    /// until it is gone.
    pub async fn kill_and_wait(&self, name: &str, signal_name: &str) -> anyhow::Result<()> {
        let pid = self.signal(name, signal_name)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) {
            if Instant::now() > deadline {
                bail!("{name} (pid {pid}) did not exit after SIG{signal_name}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Runs `source scripts/lib.sh && <call>` with the servers' own addresses.
    async fn lib_sh(&self, call: &str) -> anyhow::Result<()> {
        let log = self.log_file("chaos-servers")?;
        let status = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!("source scripts/lib.sh && {call}"))
            .current_dir(&self.repo_root)
            .envs(self.direct_env.iter().cloned())
            .env("PIPELINE_DATA_DIR", &self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .await
            .with_context(|| format!("running {call}"))?;
        if !status.success() {
            bail!(
                "{call} failed ({status}); see {}",
                self.data_dir.join("log/chaos-servers.log").display()
            );
        }
        Ok(())
    }

    /// The JetStream store directory of the run's NATS server.
    pub fn nats_store(&self) -> PathBuf {
        self.data_dir.join(format!("nats-{}", self.nats_port))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_extras();
    }
}

/// How long [`Lab::stop_extras`] waits for the extra processes to end after SIGTERM.
const EXTRA_STOP_GRACE: Duration = Duration::from_secs(10);

pub fn signal(pid: u32, signal_name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg("-s")
        .arg(signal_name)
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -s {signal_name} {pid} failed");
    }
    Ok(())
}

/// The fields of `/proc/<pid>/stat` after the command name: the state first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|state| state != "Z"))
}

/// User + system CPU time of a process, in clock ticks (`ticks_per_second`).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counted from the state.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

pub fn ticks_per_second() -> f64 {
    // Linux reports /proc times in USER_HZ, which is 100 on every common platform.
    100.0
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

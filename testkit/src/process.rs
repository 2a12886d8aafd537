//! Running a service's real binary against a test's resources: a free port for its
//! listener, its `/readyz` awaited, its `/metrics` scraped, SIGTERM to stop it, and a
//! kill when the test fails before that.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::prometheus::{scrape, Scrape};
use crate::{eventually, TestEnv};

/// A TCP port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|probe| probe.local_addr())
        .expect("a free port on loopback")
        .port()
}

/// Sends `signal` (as kill(1) names it: `-STOP`, `-CONT`, `-TERM`) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// SIGTERM to `child`, then waits (at most 15 s) for its exit status; `name` says what
/// it is in the failure message.
pub async fn terminate(mut child: Child, name: &str) -> ExitStatus {
    signal(child.id(), "-TERM");
    tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} stops within 15 s of SIGTERM"))
    .expect("waited")
    .expect("exit status")
}

/// `program` on `env`'s resources ([`TestEnv::process_env`]) with `extra` variables on
/// top, its stdin, stdout and stderr null until the caller pipes what it reads.
pub fn service_command(program: &str, env: &TestEnv, extra: &[(&str, &str)]) -> Command {
    let mut command = Command::new(program);
    command
        .envs(env.process_env())
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Runs `program` with `args` on `env`'s resources ([`TestEnv::process_env`]) and
/// `extra` variables on top, and expects it to stop by itself, unsuccessfully, within
/// 10 s: a start or a command refused. Returns what it wrote to stderr.
pub fn failed_run(program: &str, args: &[&str], env: &TestEnv, extra: &[(&str, &str)]) -> String {
    let what = format!("{program} {} with {extra:?}", args.join(" "));
    let mut child = service_command(program, env, extra)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{what} starts: {error}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("status readable") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{what} exited successfully");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr piped"), &mut stderr)
        .expect("stderr readable");
    stderr
}

/// The one line that is not blank in `stderr` (failing unless there is exactly one): a
/// refused start says why in one line (API.md §8).
pub fn the_only_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    lines[0]
}

/// One spawned service binary; killed when dropped unless [`ServiceProcess::terminate`]
/// stopped it first.
pub struct ServiceProcess {
    name: String,
    child: KilledOnDrop,
    /// `http://127.0.0.1:<port>` of its listener (the admin port for relay and projector).
    pub base_url: String,
    pub http: reqwest::Client,
}

impl ServiceProcess {
    /// Starts `program` with `env`'s [`TestEnv::process_env`], its listener
    /// (`listen_key`, e.g. `PIPELINE__INGEST__LISTEN`) on a free port, and `extra`
    /// variables on top. Its output is discarded.
    pub fn spawn(program: &str, env: &TestEnv, listen_key: &str, extra: &[(&str, &str)]) -> Self {
        Self::start(program, env, listen_key, extra, Stdio::null())
    }

    /// [`Self::spawn`], with the lines the process writes to stdout (its log) coming
    /// through the returned receiver as they are written.
    pub fn spawn_logged(
        program: &str,
        env: &TestEnv,
        listen_key: &str,
        extra: &[(&str, &str)],
    ) -> (Self, std::sync::mpsc::Receiver<String>) {
        let mut process = Self::start(program, env, listen_key, extra, Stdio::piped());
        let stdout = process
            .child
            .0
            .as_mut()
            .and_then(|child| child.stdout.take())
            .expect("stdout piped");
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let stdout = std::io::BufReader::new(stdout);
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        (process, received)
    }

    fn start(
        program: &str,
        env: &TestEnv,
        listen_key: &str,
        extra: &[(&str, &str)],
        stdout: Stdio,
    ) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = service_command(program, env, &[(listen_key, &listen)])
            .envs(extra.iter().copied())
            .stdout(stdout)
            .spawn()
            .unwrap_or_else(|error| panic!("{program} starts: {error}"));
        Self {
            name: program.rsplit('/').next().unwrap_or(program).to_owned(),
            child: KilledOnDrop::new(child),
            base_url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self) {
        let url = format!("{}/readyz", self.base_url);
        eventually(
            Duration::from_secs(30),
            &format!("{} ready at {url}", self.name),
            || async {
                let response = self.http.get(&url).send().await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
    }

    /// Its `/metrics`, parsed (waits up to 10 s for an answer).
    pub async fn metrics(&self) -> Scrape {
        let url = format!("{}/metrics", self.base_url);
        eventually(
            Duration::from_secs(10),
            &format!("{} to serve {url}", self.name),
            || scrape(&self.http, &url),
        )
        .await
    }

    /// Polls `/metrics` until `check` finds what it waits for; returns that.
    pub async fn metrics_until<T>(
        &self,
        deadline: Duration,
        what: &str,
        check: impl Fn(&Scrape) -> Option<T>,
    ) -> T {
        let url = format!("{}/metrics", self.base_url);
        let what = format!("{}: {what}", self.name);
        eventually(deadline, &what, || async {
            check(&scrape(&self.http, &url).await?)
        })
        .await
    }

    /// Its pid, for a signal ([`signal`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would stop it, and waits until it is gone.
    pub fn kill(mut self) {
        let mut child = self.child.take();
        child.kill().expect("SIGKILL sent");
        child.wait().expect("killed process reaped");
    }

    /// SIGTERM, then waits (at most 15 s) for the exit status.
    pub async fn terminate(mut self) -> ExitStatus {
        let child = self.child.take();
        terminate(child, &self.name).await
    }
}

/// A child process a test runs itself, killed (a stopped one too) and reaped when
/// dropped: a test that fails half-way leaves no process behind.
pub struct KilledOnDrop(Option<Child>);

impl KilledOnDrop {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.0
            .as_ref()
            .map(Child::id)
            .expect("a child until it exited")
    }

    /// Waits at most `limit` for the child to exit by itself (after a SIGTERM, say) and
    /// returns its status; fails the test naming `what` otherwise, and the drop kills it.
    pub fn wait_within(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let child = self.0.as_mut().expect("a child until it exited");
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("the child's status") {
                self.0 = None;
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{what} did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The child, which is then the caller's to end.
    pub fn take(&mut self) -> Child {
        self.0.take().expect("a child until taken")
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads `log` (the lines of [`ServiceProcess::spawn_logged`]) until one that `done`
/// accepts, for at most `within` in all; the lines read, that one last. Panics naming
/// `what` when none came in time.
pub fn log_lines_until(
    log: &std::sync::mpsc::Receiver<String>,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{what} within {within:?}"));
        let last = done(&line);
        lines.push(line);
        if last {
            return lines;
        }
    }
}

/// [`log_lines_until`]'s last line: the one `done` accepted.
pub fn log_line_until(
    log: &std::sync::mpsc::Receiver<String>,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let mut lines = log_lines_until(log, within, what, done);
    lines.pop().unwrap_or_default()
}

/// [`log_line_until`] in a JSON log (`PIPELINE__LOG__FORMAT=json`): the entry of the
/// first line whose `message` contains `message`.
pub fn log_entry_until(
    log: &std::sync::mpsc::Receiver<String>,
    within: Duration,
    what: &str,
    message: &str,
) -> serde_json::Value {
    let line = log_line_until(log, within, what, |line| line.contains(message));
    let entry: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert!(
        entry["message"]
            .as_str()
            .is_some_and(|logged| logged.contains(message)),
        "{what}: {entry}"
    );
    entry
}

//! A nats-server of a test's own, for tests that kill it, cut its store back and start
//! it again (the shared server on 4222 must never be touched that way).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

/// Debian's nats-server 2.9, the version the pipeline runs against on this box.
pub const NATS_SERVER_BINARY: &str = "/usr/sbin/nats-server";

/// A private JetStream server on a free port with its store in a temporary directory;
/// killed and its directory removed when dropped.
pub struct PrivateNats {
    port: u16,
    store_dir: PathBuf,
    /// Whether the server runs JetStream (`-js`), as the pipeline's must.
    jetstream: bool,
    /// Its HTTP monitoring port (`-m`), where it tells how many clients it has.
    monitor_port: u16,
    /// A configuration file (`-c`), for users and their permissions.
    config: Option<PathBuf>,
    process: Option<Child>,
}

impl PrivateNats {
    /// Starts the server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// A server started without JetStream, an operator's mistake: it takes connections
    /// and messages, but no stream can be made or read.
    pub fn start_without_jetstream() -> Self {
        Self::start_with(false)
    }

    /// A JetStream server started with `config` as its configuration file (users and
    /// their permissions, say; the command line's port, store and JetStream flags win
    /// over the file's).
    pub fn start_with_config(config: &str) -> Self {
        let mut server = Self::new(true);
        let path = server.store_dir.join("nats-server.conf");
        std::fs::write(&path, config).expect("configuration written");
        server.config = Some(path);
        server.start_on_free_ports()
    }

    /// Stops the server (SIGTERM, so it keeps what it stored), writes `config` over its
    /// configuration file and starts it again. (A reload by SIGHUP left 2.9.10 timing
    /// out the relay's JetStream requests after its user's permissions changed.)
    pub fn restart_with_config(&mut self, config: &str) {
        let path = self
            .config
            .clone()
            .expect("a server started with a configuration file");
        self.stop();
        std::fs::write(path, config).expect("configuration written");
        self.restart();
    }

    fn start_with(jetstream: bool) -> Self {
        Self::new(jetstream).start_on_free_ports()
    }

    /// Starts a new server. A free port is free only when looked at: another process
    /// (a client's connection, another test's server) may take it before the server
    /// binds it, and the server then exits at once. It gets new ports then, twice at
    /// most; CI once waited 10 s for a server that was gone.
    fn start_on_free_ports(mut self) -> Self {
        for _attempt in 0..2 {
            if self.try_restart() {
                return self;
            }
            self.port = crate::process::free_port();
            self.monitor_port = crate::process::free_port();
        }
        self.restart();
        self
    }

    /// A server not started yet, on a free port with a new store directory.
    fn new(jetstream: bool) -> Self {
        let port = crate::process::free_port();
        let suffix: u64 = rand::rng().random();
        let store_dir = std::env::temp_dir().join(format!("private-nats-{suffix:x}"));
        std::fs::create_dir_all(&store_dir).expect("store directory created");
        Self {
            port,
            store_dir,
            jetstream,
            monitor_port: crate::process::free_port(),
            config: None,
            process: None,
        }
    }

    /// Waits until the server has `clients` client connections or more (its `/varz`),
    /// so that a test can tell a client that connected from one still trying.
    pub async fn wait_for_clients(&self, clients: u64) {
        let varz = format!("http://127.0.0.1:{}/varz", self.monitor_port);
        let http = reqwest::Client::new();
        crate::eventually(
            Duration::from_secs(10),
            &format!("{clients} clients of the private nats-server"),
            || async {
                let answer: serde_json::Value =
                    http.get(&varz).send().await.ok()?.json().await.ok()?;
                let connected = answer["connections"].as_u64()?;
                (connected >= clients).then_some(())
            },
        )
        .await;
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `nats://<userinfo>@127.0.0.1:<port>`: the URL with credentials (`user:password`,
    /// or a token), for a server started with users ([`Self::start_with_config`]). For
    /// the services under test only: testkit's own connections (`TestEnv::jetstream`,
    /// its cleanup) take the URL without sending its credentials, as async-nats does
    /// (testkit cannot use `ingest::bootstrap::nats_options`), and are refused there.
    pub fn url_as(&self, userinfo: &str) -> String {
        format!("nats://{userinfo}@127.0.0.1:{}", self.port)
    }

    /// The `-sd` directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The directory holding a stream's message blocks (`*.blk`, `*.idx`, `index.db`).
    pub fn stream_messages_dir(&self, stream: &str) -> PathBuf {
        stream_messages_dir(&self.store_dir, stream)
    }

    /// SIGKILL: nothing is flushed or synced, as in a crash of the server process.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// SIGTERM, and waits (at most 15 s) until the server has exited: it writes what it
    /// holds to its files first, each consumer's position included.
    pub fn stop(&mut self) {
        let Some(process) = &mut self.process else {
            return;
        };
        // Kept in `self` until it has exited: a panic here leaves it to `Drop`'s kill.
        crate::process::signal(process.id(), "-TERM");
        let started = Instant::now();
        while process
            .try_wait()
            .expect("the private nats-server's status")
            .is_none()
        {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "private nats-server did not stop within 15 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = None;
    }

    /// SIGSTOP: the server holds its connections open and reads nothing from them, so
    /// what a client writes now is lost when the server is then killed.
    pub fn freeze(&self) {
        if let Some(process) = &self.process {
            crate::process::signal(process.id(), "-STOP");
        }
    }

    /// SIGCONT: a frozen server ([`Self::freeze`]) goes on.
    pub fn thaw(&self) {
        if let Some(process) = &self.process {
            crate::process::signal(process.id(), "-CONT");
        }
    }

    /// Starts the server again on the same port and store, with JetStream or without
    /// (an operator's mistake after an upgrade, say).
    pub fn restart_with_jetstream(&mut self, jetstream: bool) {
        self.jetstream = jetstream;
        self.restart();
    }

    /// Starts the server again on the same port and store (after [`Self::kill`]).
    pub fn restart(&mut self) {
        assert!(
            self.try_restart(),
            "private nats-server on {} exited before it listened",
            self.port
        );
    }

    /// [`Self::restart`]; `false` when the server exited before it listened (its port
    /// taken, say).
    fn try_restart(&mut self) -> bool {
        self.kill();
        let mut command = Command::new(NATS_SERVER_BINARY);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        command.args(["-m", &self.monitor_port.to_string()]);
        if self.jetstream {
            command.arg("-js");
        }
        let process = command
            .arg("-sd")
            .arg(&self.store_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (apt-get install nats-server)");
        let process = self.process.insert(process);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if matches!(process.try_wait(), Ok(Some(_))) {
                self.process = None;
                return false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "private nats-server did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Cuts the stream's last message block back to `keep_fraction` of its size (see
    /// [`truncate_stream_store`]). The server must be stopped. Returns the block's size
    /// before and after.
    pub fn truncate_stream(&self, stream: &str, keep_fraction: f64) -> (u64, u64) {
        truncate_stream_store(&self.stream_messages_dir(stream), |size| {
            (size as f64 * keep_fraction) as u64
        })
        .expect("stream store truncated")
    }

    /// An OS crash of the NATS host before nats-server 2.9's fsync, one that lost the
    /// stream's newest records but not the files the server rewrites (each consumer's
    /// position): stops the server cleanly, so that those files hold its latest state
    /// (after a SIGKILL whether they do would depend on the server's flush timer), cuts
    /// the stream's last block to half, starts the server again and waits until it
    /// answers for the stream it rebuilds. Returns the stream's last sequence then,
    /// checked to have gone back from `last_before` (and not to nothing).
    pub async fn crash_losing_tail(&mut self, stream: &str, last_before: u64) -> u64 {
        let cut = self.crash_cutting_tail(stream);
        self.restart_after_crash(stream, last_before, cut).await
    }

    /// The crash of [`Self::crash_losing_tail`] without the restart: the host stays
    /// down until [`Self::restart_after_crash`]. Returns the block's size before and
    /// after the cut, for that call.
    pub fn crash_cutting_tail(&mut self, stream: &str) -> (u64, u64) {
        self.stop();
        self.truncate_stream(stream, 0.5)
    }

    /// Starts the server after [`Self::crash_cutting_tail`] (`cut` is what it
    /// returned) and waits until it answers for the stream it rebuilds. Returns the
    /// stream's last sequence then, checked to have gone back from `last_before` (and
    /// not to nothing).
    pub async fn restart_after_crash(
        &mut self,
        stream: &str,
        last_before: u64,
        (size_before, size_after): (u64, u64),
    ) -> u64 {
        self.restart();
        let client = async_nats::connect(self.url())
            .await
            .expect("the private nats-server reachable");
        let jetstream = async_nats::jetstream::new(client);
        // The server rebuilds the cut stream before it answers for it; with the whole
        // suite running on two cores that once took longer than 10 s.
        let last_after = crate::eventually(
            Duration::from_secs(30),
            "the stream back after the restart",
            || async {
                let mut stream = jetstream.get_stream(stream).await.ok()?;
                Some(stream.info().await.ok()?.state.last_sequence)
            },
        )
        .await;
        assert!(
            last_after > 0 && last_after < last_before,
            "the stream went back from {last_before} to {last_after} (block cut from {size_before} to {size_after} bytes)"
        );
        last_after
    }
}

/// The directory holding a stream's message blocks (`*.blk`, `*.idx`, `index.db`) in
/// the `-sd` store directory of a nats-server 2.9.
pub fn stream_messages_dir(store_dir: &Path, stream: &str) -> PathBuf {
    store_dir
        .join("jetstream")
        .join("$G")
        .join("streams")
        .join(stream)
        .join("msgs")
}

/// Cuts a stopped server's last message block of a stream to `keep(size)` bytes and
/// removes the index files, so that the next start rebuilds the stream from the
/// shortened block (a torn last record is discarded): the stream loses its newest
/// messages as after an OS crash before the server's fsync. Returns the block's size
/// before and after.
pub fn truncate_stream_store(
    messages_dir: &Path,
    keep: impl FnOnce(u64) -> u64,
) -> std::io::Result<(u64, u64)> {
    let mut blocks: Vec<PathBuf> = std::fs::read_dir(messages_dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    blocks.sort();
    for path in &blocks {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if name.ends_with(".idx") || name == "index.db" || name.ends_with(".fss") {
            std::fs::remove_file(path)?;
        }
    }
    let last_block = blocks
        .iter()
        .filter(|path| path.extension().is_some_and(|extension| extension == "blk"))
        .max_by_key(|path| {
            path.file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .ok_or_else(|| std::io::Error::other("the stream has no message block"))?
        .clone();
    let size = std::fs::metadata(&last_block)?.len();
    let kept = keep(size).min(size);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last_block)?
        .set_len(kept)?;
    Ok((size, kept))
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between the look for a free one and the server's bind (here its
    /// monitoring port): the server exits at once, and the start goes on with new ports
    /// instead of waiting 10 s for a server that is gone and failing the test that
    /// wanted it. (It starts nats-server itself.)
    #[test]
    fn a_server_whose_port_was_taken_meanwhile_starts_on_new_ones() {
        let server = PrivateNats::new(true);
        let taken = std::net::TcpListener::bind(("127.0.0.1", server.monitor_port))
            .expect("the port taken");
        let taken_port = server.monitor_port;
        let started = Instant::now();
        let server = server.start_on_free_ports();
        assert_ne!(server.monitor_port, taken_port, "new ports");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no wait for a server that was gone: {:?}",
            started.elapsed()
        );
        assert!(std::net::TcpStream::connect(("127.0.0.1", server.port)).is_ok());
        drop(taken);
    }
}

//! A redis-server of a test's own, for settings the shared server on 6379 must never
//! be given (a memory limit, an eviction policy), or to kill it and start it again.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::process::free_port;

/// A private Redis on a free port that saves nothing by itself; killed when dropped.
pub struct PrivateRedis {
    port: u16,
    /// What it was started with past the port and persistence settings.
    settings: Vec<String>,
    /// Where it writes its snapshot on `SAVE` (and loads it from when it starts), for a
    /// server started by [`Self::start_saving`]; removed when dropped.
    dir: Option<PathBuf>,
    process: Child,
}

impl PrivateRedis {
    /// Starts `redis-server` with `settings` (`["--maxmemory", "64mb"]`) on top of a
    /// free port and no persistence, and waits until it answers `PING`.
    pub fn start(settings: &[&str]) -> Self {
        Self::start_in(settings, None)
    }

    /// [`Self::start`], with a directory of its own for the snapshot a `SAVE` writes,
    /// which [`Self::crash_and_restart`] then loads, as a Redis that saves snapshots (the
    /// default of Debian's `redis-server`) loads its last one after a crash.
    pub fn start_saving(settings: &[&str]) -> Self {
        let suffix: u64 = rand::rng().random();
        let dir = std::env::temp_dir().join(format!("private-redis-{suffix:x}"));
        std::fs::create_dir_all(&dir).expect("snapshot directory created");
        Self::start_in(settings, Some(dir))
    }

    fn start_in(settings: &[&str], dir: Option<PathBuf>) -> Self {
        let port = free_port();
        let settings: Vec<String> = settings.iter().map(|setting| setting.to_string()).collect();
        let process = spawn(port, &settings, dir.as_ref());
        let server = Self {
            port,
            settings,
            dir,
            process,
        };
        server.wait_until_it_answers();
        server
    }

    /// SIGKILL, then the server again on the same port, settings and directory: a server
    /// of [`Self::start_saving`] comes back with what its last `SAVE` wrote.
    pub fn crash_and_restart(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        self.process = spawn(self.port, &self.settings, self.dir.as_ref());
        self.wait_until_it_answers();
    }

    fn wait_until_it_answers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.try_command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} answers",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command and returns the first line of its answer (`+OK`).
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|| panic!("redis-server on {} answers {args:?}", self.port))
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        Some(line.trim_end().to_owned())
    }
}

/// `redis-server` on `port` with `settings`, saving nothing by itself; with `dir`, its
/// snapshot file lives there.
fn spawn(port: u16, settings: &[String], dir: Option<&PathBuf>) -> Child {
    let mut command = Command::new("redis-server");
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"]);
    if let Some(dir) = dir {
        command.arg("--dir").arg(dir);
    }
    command
        .args(settings)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("redis-server starts: {error}"))
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

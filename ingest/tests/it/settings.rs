//! API.md §8: settings come from `PIPELINE__<SECTION>__<KEY>` over the config files, and
//! a missing or invalid setting stops the process at start with one line naming the
//! key. `scripts/ab` relies on both: an arm is a set of such variables, and a misspelt
//! one must stop the run rather than measure the defaults twice. `scripts/up` honours
//! the same layers through `ingest config env` and `scripts/lib.sh`'s
//! `load_effective_config`.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contract::settings::{environment_variable, key_and_variable};
use testkit::process::{
    failed_run, free_port, service_command, signal, the_only_line, KilledOnDrop,
};
use testkit::TestEnv;

#[test]
fn a_misspelt_or_invalid_setting_stops_ingest_and_the_relay_at_start_with_one_line_naming_the_key()
{
    let env = TestEnv::new();
    let ingest = env!("CARGO_BIN_EXE_ingest");
    let relay = env!("CARGO_BIN_EXE_relay");
    let cases = [
        // A key no section has (`commit_parallel_min` misspelt).
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__COMMIT_PARALLEL_MN", "8"),
            "commit_parallel_mn",
        ),
        // A value the key's rules refuse.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__COMMIT_CONCURRENCY", "0"),
            "ingest.commit_concurrency",
        ),
        // A duration past 100 years, which `now + max_future` would overflow: ingest used
        // to start, and every reading with a `recorded_at` lost its answer to a panic.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__MAX_FUTURE_SECS", "99999999999999"),
            "ingest.max_future_secs (PIPELINE__INGEST__MAX_FUTURE_SECS)",
        ),
        // Past PostgreSQL's range for its session setting: the relay ran, but never got a
        // connection, and its `/readyz` blamed PostgreSQL.
        (
            relay,
            "PIPELINE__RELAY__ADMIN_LISTEN",
            (
                "PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS",
                "3000000000",
            ),
            "relay.idle_in_transaction_timeout_ms",
        ),
        // A zero that is no off switch: ingest started, and every POST got a 503.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__REQUEST_TIMEOUT_MS", "0"),
            "ingest.request_timeout_ms (PIPELINE__INGEST__REQUEST_TIMEOUT_MS) must be at least 1",
        ),
        // A burst of 0 is no off switch either (the rate is): it was raised to 1 unsaid.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__RATE_LIMIT_BURST", "0"),
            "ingest.rate_limit_burst (PIPELINE__INGEST__RATE_LIMIT_BURST) must be at least 1",
        ),
        // A group commit past PostgreSQL's 1 GB statement for the largest readings.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__COMMIT_BATCH_MAX", "10001"),
            "ingest.commit_batch_max (PIPELINE__INGEST__COMMIT_BATCH_MAX) must be at most 10000",
        ),
        // Two settings at odds: JetStream refuses the stream (a duplicate window of 2
        // minutes over a stream that keeps 1), and the relay retried that for good.
        (
            relay,
            "PIPELINE__RELAY__ADMIN_LISTEN",
            ("PIPELINE__NATS__MAX_AGE_SECS", "60"),
            "must be at most nats.max_age_secs (60 s)",
        ),
        // A count past any use: tokio's semaphore panicked at start, with a backtrace.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__QUEUE_CAPACITY", "18446744073709551615"),
            "ingest.queue_capacity (PIPELINE__INGEST__QUEUE_CAPACITY) must be at most 1000000",
        ),
        // A zero that refused every reading with a `recorded_at`.
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__INGEST__MAX_AGE_SECS", "0"),
            "ingest.max_age_secs (PIPELINE__INGEST__MAX_AGE_SECS) must be at least 1",
        ),
        // A log level that is no filter: the process started at `info`, unsaid.
        (
            relay,
            "PIPELINE__RELAY__ADMIN_LISTEN",
            ("PIPELINE__LOG__LEVEL", "debug,tokio=loud"),
            "log.level (PIPELINE__LOG__LEVEL) is not a tracing filter",
        ),
        // A session timeout no round fits in: the relay started, every round lapsed
        // before its first publish, and it marked nothing for good.
        (
            relay,
            "PIPELINE__RELAY__ADMIN_LISTEN",
            ("PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS", "1"),
            "relay.idle_in_transaction_timeout_ms (PIPELINE__RELAY__IDLE_IN_TRANSACTION_TIMEOUT_MS) must be at least 3000",
        ),
        // A pool with no connection for look-ups beside ingest's group commits (the
        // relay runs on such a pool: it has no look-ups).
        (
            ingest,
            "PIPELINE__INGEST__LISTEN",
            ("PIPELINE__DATABASE__POOL_SIZE", "2"),
            "database.pool_size (PIPELINE__DATABASE__POOL_SIZE) must exceed ingest.commit_concurrency (2) in ingest",
        ),
        // A value of the wrong type.
        (
            relay,
            "PIPELINE__RELAY__ADMIN_LISTEN",
            ("PIPELINE__RELAY__ROUNDS_IN_FLIGHT", "two"),
            "relay.rounds_in_flight",
        ),
    ];
    for (program, listen_key, setting, key) in cases {
        let listen = format!("127.0.0.1:{}", free_port());
        let stderr = failed_run(program, &[], &env, &[(listen_key, &listen), setting]);
        let line = the_only_line(&stderr);
        assert!(
            line.contains(key),
            "the line names {key} for {setting:?}: {stderr}"
        );
    }
    // `scripts/up` checks the configuration with `ingest config env` before it starts
    // anything: ingest's own rules refuse there too.
    let stderr = failed_run(
        ingest,
        &["config", "env"],
        &env,
        &[("PIPELINE__DATABASE__POOL_SIZE", "2")],
    );
    assert!(
        the_only_line(&stderr)
            .contains("database.pool_size (PIPELINE__DATABASE__POOL_SIZE) must exceed"),
        "{stderr}"
    );
}

/// A listen address another process holds stops the start with one line naming the key,
/// its variable and the address, and status 2, as an invalid setting does. It used to
/// end with status 1 and `Error: Address already in use (os error 98)`, naming neither
/// the setting nor the address.
#[test]
fn a_listen_address_in_use_stops_ingest_and_the_relay_with_one_line_naming_the_key_and_the_address()
{
    let env = TestEnv::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let address = taken.local_addr().expect("its address").to_string();
    for (program, key) in [
        (env!("CARGO_BIN_EXE_ingest"), "ingest.listen"),
        (env!("CARGO_BIN_EXE_relay"), "relay.admin_listen"),
    ] {
        let mut child = service_command(
            program,
            &env,
            &[(environment_variable(key).as_str(), address.as_str())],
        )
        .stderr(Stdio::piped())
        .spawn()
        .expect("the service starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("status readable") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{program} kept running on {address}, which is taken");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr piped")
            .read_to_string(&mut stderr)
            .expect("stderr readable");
        let line = the_only_line(&stderr);
        assert!(
            line.contains(&format!("{} {address}", key_and_variable(key)))
                && line.contains("address already in use"),
            "the line names {key} and {address}: {stderr}"
        );
        assert_eq!(status.code(), Some(2), "{program}: {stderr}");
    }
    drop(taken);
}

/// With `auth.service_credentials_required` every server URL carries a secret: a start
/// refused over one names the server, but never its password or token.
#[test]
fn a_start_refused_over_a_server_url_names_the_server_but_not_its_secret() {
    let env = TestEnv::new();
    let listen = format!("127.0.0.1:{}", free_port());
    for (url, shown) in [
        (
            "nats://relay:s3cret-pw@127.0.0.1:notaport",
            "nats://relay:***@127.0.0.1:notaport",
        ),
        (
            "nats://s3cret-pw@127.0.0.1:99999",
            "nats://***@127.0.0.1:99999",
        ),
    ] {
        let stderr = failed_run(
            env!("CARGO_BIN_EXE_relay"),
            &[],
            &env,
            &[
                ("PIPELINE__RELAY__ADMIN_LISTEN", &listen),
                ("PIPELINE__NATS__URL", url),
            ],
        );
        let line = the_only_line(&stderr);
        assert!(line.starts_with("relay: "), "{line}");
        assert!(line.contains(shown), "names {shown}: {line}");
        assert!(!line.contains("s3cret-pw"), "shows the secret: {line}");
    }
    // Ingest's commands end the same way: PostgreSQL unreachable at a URL with a
    // password stops `ingest migrate` with one line that names it, without the secret.
    let stderr = failed_run(
        env!("CARGO_BIN_EXE_ingest"),
        &["migrate"],
        &env,
        &[(
            "PIPELINE__DATABASE__URL",
            "postgres://postgres:s3cret-pw@127.0.0.1:1/telemetry",
        )],
    );
    let line = the_only_line(&stderr);
    assert!(
        line.starts_with("ingest: connecting to PostgreSQL"),
        "{line}"
    );
    assert!(!line.contains("s3cret-pw"), "shows the secret: {line}");
}

/// The relay's log at `level` with NATS unreachable at a URL with a password: read
/// until it holds `until`, then for `more`; the relay is then stopped.
fn relay_log_with_nats_down(env: &TestEnv, level: &str, until: &str, more: Duration) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = service_command(
        env!("CARGO_BIN_EXE_relay"),
        env,
        &[
            ("PIPELINE__RELAY__ADMIN_LISTEN", &listen),
            ("PIPELINE__NATS__URL", "nats://relay:s3cret-pw@127.0.0.1:1"),
            ("PIPELINE__LOG__LEVEL", level),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("relay starts");
    let outputs = [
        Box::new(child.stdout.take().expect("stdout piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr piped")),
    ];
    // Killed if the wait below fails the test: it would retry NATS for good.
    let mut child = KilledOnDrop::new(child);
    let log = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = outputs
        .into_iter()
        .map(|output| {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    let mut log = log.lock().expect("log");
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.lock().expect("log").contains(until) {
        assert!(
            Instant::now() < deadline,
            "the relay's log never held {until:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A duration that must pass: async-nats retries its connection several times in it.
    std::thread::sleep(more);
    signal(child.id(), "-TERM");
    child.wait_within(Duration::from_secs(15), "the relay after SIGTERM");
    for reader in readers {
        reader.join().expect("output read");
    }
    let log = log.lock().expect("log").clone();
    log
}

/// async-nats writes each server address it tries at debug level, password included:
/// `log.level = "debug"` keeps those lines out, and only naming `async_nats` in the
/// level brings them back.
#[test]
fn debug_logs_never_show_a_nats_password_unless_async_nats_debug_is_asked_for() {
    let env = TestEnv::new();
    // Asked for: the lines exist and carry the password.
    relay_log_with_nats_down(&env, "debug,async_nats=debug", "s3cret-pw", Duration::ZERO);
    let log = relay_log_with_nats_down(
        &env,
        "debug",
        "relay admin listening",
        Duration::from_secs(1),
    );
    assert!(log.contains("DEBUG"), "debug lines are written: {log}");
    assert!(
        log.contains("nats: IO error"),
        "the failed attempts are still reported: {log}"
    );
    assert!(
        !log.contains("s3cret-pw"),
        "a debug line shows the password: {log}"
    );
}

/// A directory of the test's own under the system's temporary directory, removed when
/// dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "{name}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).expect("temporary directory created");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config directory with the shipped `default.toml` and `dev_toml` as `dev.toml`.
fn config_dir_with_dev(dev_toml: &str) -> TempDir {
    let directory = TempDir::new("ingest-config-env");
    std::fs::copy(
        testkit::config_dir().join("default.toml"),
        directory.0.join("default.toml"),
    )
    .expect("default.toml copied");
    std::fs::write(directory.0.join("dev.toml"), dev_toml).expect("dev.toml written");
    directory
}

/// `program` with none of the caller's settings (`PIPELINE__*`, `APP_ENV`,
/// `APP_CONFIG_DIR`), reading the config files in `config` and `extra` variables; its
/// output captured.
fn run_with_config(program: &str, config: &TempDir, extra: &[(&str, &str)]) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("PIPELINE__") || name_text == "APP_ENV" {
            command.env_remove(&name);
        }
    }
    command
        .env("APP_CONFIG_DIR", &config.0)
        .envs(extra.iter().copied())
        .stdin(Stdio::null());
    command
}

/// `bash -c script` with `scripts/lib.sh` as `$1` and the ingest binary under test as
/// `$2`; its status, stdout and stderr.
fn lib_sh(script: &str, config: &TempDir, extra: &[(&str, &str)]) -> Output {
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/lib.sh");
    run_with_config("bash", config, extra)
        .args(["-c", script, "bash", lib, env!("CARGO_BIN_EXE_ingest")])
        .output()
        .expect("bash runs")
}

/// The lines `output` printed, after asserting that it ended with success.
fn lines_of_success(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "{output:?}, stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A URL with what a shell would take apart if it were not quoted: a quote, a `$`, a space.
const AWKWARD_DATABASE_URL: &str = "postgres://app:it's $ecret pw@127.0.0.1:15432/telemetry";

/// `config/dev.toml` moving ingest, the projector's admin listener and the database.
fn moved_dev_toml() -> String {
    format!(
        "[ingest]\nlisten = \"127.0.0.1:18080\"\n\n[projector]\nadmin_listen = \"[::1]:19092\"\n\n[database]\nurl = \"{AWKWARD_DATABASE_URL}\"\n"
    )
}

/// API.md §8: `scripts/up` honours the config files as the processes do. It asks
/// `ingest config env` for the effective values: each file's, else the default's, and a
/// shell reading the lines gets them back unchanged.
#[test]
fn ingest_config_env_prints_the_effective_config_of_every_layer_quoted_for_the_shell() {
    let config = config_dir_with_dev(&moved_dev_toml());
    let output = run_with_config(env!("CARGO_BIN_EXE_ingest"), &config, &[])
        .args(["config", "env"])
        .output()
        .expect("ingest runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ingest config env: {output:?}, stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            r"PIPELINE__DATABASE__URL='postgres://app:it'\''s $ecret pw@127.0.0.1:15432/telemetry'",
            "PIPELINE__NATS__URL='nats://127.0.0.1:4222'",
            "PIPELINE__REDIS__URL='redis://127.0.0.1:6379'",
            "PIPELINE__INGEST__LISTEN='127.0.0.1:18080'",
            "PIPELINE__QUERY__LISTEN='127.0.0.1:8081'",
            "PIPELINE__RELAY__ADMIN_LISTEN='127.0.0.1:9091'",
            "PIPELINE__PROJECTOR__ADMIN_LISTEN='[::1]:19092'",
        ]
    );

    // What `eval "$(ingest config env)"` sets is the value itself.
    let evaluated = lib_sh(
        r#"eval "$("$2" config env)" && printf '%s' "$PIPELINE__DATABASE__URL""#,
        &config,
        &[],
    );
    assert!(evaluated.status.success(), "{evaluated:?}");
    assert_eq!(
        String::from_utf8_lossy(&evaluated.stdout),
        AWKWARD_DATABASE_URL
    );
}

/// The defect: with `[ingest] listen = "127.0.0.1:18080"` in `config/dev.toml`, ingest
/// bound 18080 while `scripts/up` checked, waited on and printed 8080, and a database in
/// a config file was never checked or started. After `load_effective_config` the
/// scripts' functions give what the processes use, and a variable still wins.
#[test]
fn scripts_load_the_effective_config_so_up_checks_and_prints_what_the_processes_use() {
    let config = config_dir_with_dev(&moved_dev_toml());
    let script = r#"source "$1" && load_effective_config "$2" &&
        process_listen ingest && echo && process_url ingest && echo &&
        process_url projector && echo && process_url query && echo &&
        database_url && echo && nats_url && echo &&
        parse_url "$(database_url)" 5432 && echo "$URL_HOST $URL_PORT""#;

    let from_files = lib_sh(script, &config, &[]);
    assert_eq!(
        lines_of_success(&from_files),
        [
            "127.0.0.1:18080",
            "http://127.0.0.1:18080",
            "http://[::1]:19092",
            "http://127.0.0.1:8081",
            AWKWARD_DATABASE_URL,
            "nats://127.0.0.1:4222",
            "127.0.0.1 15432",
        ]
    );

    let variables_win = lib_sh(
        script,
        &config,
        &[
            ("PIPELINE__INGEST__LISTEN", "127.0.0.1:18081"),
            (
                "PIPELINE__DATABASE__URL",
                "postgres://postgres@127.0.0.1:15433/other",
            ),
        ],
    );
    assert_eq!(
        lines_of_success(&variables_win),
        [
            "127.0.0.1:18081",
            "http://127.0.0.1:18081",
            "http://[::1]:19092",
            "http://127.0.0.1:8081",
            "postgres://postgres@127.0.0.1:15433/other",
            "nats://127.0.0.1:4222",
            "127.0.0.1 15433",
        ]
    );
}

/// A config file or variable the processes would refuse stops `ingest config env` with
/// status 2 and one line naming the key, and with it the script, before it checks or
/// starts anything.
#[test]
fn an_unusable_effective_config_stops_the_scripts_with_one_line_naming_the_key() {
    let config = config_dir_with_dev("[ingest]\nlisten = \"nowhere\"\n");
    assert_config_env_refused(
        &mut run_with_config(env!("CARGO_BIN_EXE_ingest"), &config, &[]),
        "ingest.listen",
    );

    let script = r#"source "$1" && load_effective_config "$2" && echo loaded"#;
    let stopped = lib_sh(script, &config, &[]);
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success(), "{stopped:?}");
    assert!(stopped.stdout.is_empty(), "{stopped:?}");
    assert!(
        stderr.contains("ingest.listen") && stderr.contains("configuration cannot be used"),
        "{stderr}"
    );

    // A line break in a URL would split its line: refused, naming the key.
    let config = config_dir_with_dev("");
    let stopped = lib_sh(
        script,
        &config,
        &[("PIPELINE__REDIS__URL", "redis://127.0.0.1:6379\nx")],
    );
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success(), "{stopped:?}");
    assert!(
        stderr.contains("redis.url (PIPELINE__REDIS__URL) contains a control character"),
        "{stderr}"
    );
}

/// An `APP_ENV` without its file used to apply `default.toml` alone (`production`: tokens
/// off, unsaid), and a float where an integer belongs was rounded (`0.4` turned the rate
/// limit off): both stop `ingest` with status 2 and one line, naming `APP_ENV` and the
/// missing file, or the key.
#[test]
fn an_app_env_without_its_file_or_a_float_for_an_integer_stops_ingest_with_one_line() {
    let config = config_dir_with_dev("[ingest]\nrate_limit_per_second = 0.4\n");
    for (app_env, named) in [
        (Some("production"), "APP_ENV \"production\""),
        (Some("production"), "production.toml does not exist"),
        (None, "ingest.rate_limit_per_second"),
    ] {
        let mut command = run_with_config(env!("CARGO_BIN_EXE_ingest"), &config, &[]);
        if let Some(app_env) = app_env {
            command.env("APP_ENV", app_env);
        }
        assert_config_env_refused(&mut command, named);
    }
}

/// `ingest config env` run by `command` stops with status 2, prints nothing on stdout
/// and one line on stderr that contains `named`.
fn assert_config_env_refused(command: &mut Command, named: &str) {
    let refused = command
        .args(["config", "env"])
        .output()
        .expect("ingest runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(named), "names {named}: {stderr}");
}

/// Credentials in `nats.url` reach the server: `user:password@` (percent-encoded) and a
/// bare `token@`. async-nats 0.51 parses them out of the URL but never sends them, so
/// every service pointed at a NATS that asks for a password (as `docker-compose.yml`'s
/// does) was refused and retried for ever.
#[tokio::test]
async fn a_nats_url_with_a_password_or_a_token_logs_in_with_it() {
    for (config, url_credentials) in [
        (
            r#"authorization { users = [ { user: "re lay", password: "p@ss:w/rd" } ] }"#,
            "re%20lay:p%40ss%3Aw%2Frd",
        ),
        (r#"authorization { token: "s3cr3t" }"#, "s3cr3t"),
    ] {
        let nats = testkit::PrivateNats::start_with_config(config);
        let url = nats.url_as(url_credentials);
        let client = ingest::bootstrap::connect_nats(&url, "test")
            .await
            .expect("the URL is usable");
        testkit::eventually(Duration::from_secs(10), config, || async {
            ingest::bootstrap::nats_connected(&client).then_some(())
        })
        .await;
        // The same server refuses a client without the credentials.
        let refused = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(nats.url())
            .await;
        assert!(
            refused.is_err(),
            "{config}: a client without credentials is refused"
        );
    }
}

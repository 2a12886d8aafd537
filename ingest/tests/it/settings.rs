//! API.md §8: settings come from `PIPELINE__<SECTION>__<KEY>` over the config files, and
//! a missing or invalid setting stops the process at start with one line naming the
//! key. `scripts/ab` relies on both: an arm is a set of such variables, and a misspelt
//! one must stop the run rather than measure the defaults twice.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::process::{failed_run, free_port, service_command, signal};
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
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "one line for {setting:?}: {stderr}");
        assert!(
            lines[0].contains(key),
            "the line names {key} for {setting:?}: {stderr}"
        );
    }
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
        assert!(stderr.contains(shown), "names {shown}: {stderr}");
        assert!(!stderr.contains("s3cret-pw"), "shows the secret: {stderr}");
    }
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
    let log = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("stdout piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr piped")),
    ]
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
    child.wait().expect("the relay exits");
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

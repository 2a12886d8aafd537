//! API.md §8: settings come from `PIPELINE__<SECTION>__<KEY>` over the config files, and
//! a missing or invalid setting stops the process at start with one line naming the
//! key. `scripts/ab` relies on both: an arm is a set of such variables, and a misspelt
//! one must stop the run rather than measure the defaults twice.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::process::free_port;
use testkit::TestEnv;

/// Runs `program` on `env`'s resources with `extra` variables on top and expects it to
/// stop by itself, unsuccessfully, within 10 s; returns what it wrote to stderr.
fn refused_start(program: &str, env: &TestEnv, listen_key: &str, extra: (&str, &str)) -> String {
    let mut child = Command::new(program)
        .envs(env.process_env())
        .env(listen_key, format!("127.0.0.1:{}", free_port()))
        .env(extra.0, extra.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{program} starts: {error}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("status readable") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{program} with {}={} kept running", extra.0, extra.1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !status.success(),
        "{program} with {}={} exited successfully",
        extra.0,
        extra.1
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut stderr)
        .expect("stderr readable");
    stderr
}

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
        // A value of the wrong type.
        (
            relay,
            "PIPELINE__RELAY__ADMIN_LISTEN",
            ("PIPELINE__RELAY__ROUNDS_IN_FLIGHT", "two"),
            "relay.rounds_in_flight",
        ),
    ];
    for (program, listen_key, setting, key) in cases {
        let stderr = refused_start(program, &env, listen_key, setting);
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

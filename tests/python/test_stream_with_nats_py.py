"""An independent client's check of the events on JetStream (API.md §6).

The Rust tests check the relay with the Rust client the relay itself uses; this one
reads the stream with nats-py, as a consumer in another language would. It starts the
`ingest` and `relay` binaries that `cargo test` built (target/debug; CARGO_TARGET_DIR is
honoured), on their own database, stream and free ports, posts three readings over
HTTP, and checks each message's subject, headers and payload. It builds nothing: when
the binaries are missing it skips and says so. It removes the database and the streams
it made, also when it fails.

Needs PostgreSQL, NATS with JetStream and nothing else, at the addresses of
config/default.toml (PIPELINE__NATS__URL and PIPELINE__DATABASE__URL's server are
honoured when set).
"""

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
from nats.js.api import StorageType
from nats.js.errors import NotFoundError

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
BINARIES = {name: TARGET / "debug" / name for name in ("ingest", "relay")}
NATS_URL = os.environ.get("PIPELINE__NATS__URL", "nats://127.0.0.1:4222")
DATABASE_SERVER = os.environ.get(
    "PIPELINE__DATABASE__URL", "postgres://postgres@127.0.0.1:5432/telemetry"
).rsplit("/", 1)[0]
DEADLINE_SECS = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def eventually(what, check, deadline=DEADLINE_SECS):
    """Calls `check` every 100 ms until it returns something truthy, or fails."""
    started = time.monotonic()
    while True:
        outcome = check()
        if outcome:
            return outcome
        if time.monotonic() - started > deadline:
            pytest.fail(f"timed out after {deadline} s waiting for {what}")
        time.sleep(0.1)


async def eventually_async(what, check, deadline=DEADLINE_SECS):
    started = time.monotonic()
    while True:
        outcome = await check()
        if outcome:
            return outcome
        if time.monotonic() - started > deadline:
            pytest.fail(f"timed out after {deadline} s waiting for {what}")
        await asyncio.sleep(0.1)


def http(method, url, body=None, headers=None):
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()
    except OSError:
        return None, None, b""


def psql(sql, database="postgres"):
    """Runs `sql` on `database`; what it printed, unaligned and without headers."""
    server = urlsplit(DATABASE_SERVER)
    return subprocess.run(
        [
            "psql",
            "-h", server.hostname or "127.0.0.1",
            "-p", str(server.port or 5432),
            "-U", server.username or "postgres",
            "-d", database,
            "-v", "ON_ERROR_STOP=1",
            "-qAtc", sql,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


def rfc3339(text):
    assert text.endswith("Z") or text[-6] in "+-", f"{text!r} has an offset"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def pipeline(tmp_path):
    """ingest and relay on a database and stream of their own; torn down afterwards."""
    missing = [str(path) for path in BINARIES.values() if not path.is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not built; run `cargo test` or `cargo build` first")
    if shutil.which("psql") is None:
        pytest.skip("psql is needed to drop the test database")
    suffix = secrets.token_hex(5)
    stream = f"T_PY_{suffix.upper()}"
    database = f"t_py_{suffix}"
    ingest_listen = f"127.0.0.1:{free_port()}"
    relay_listen = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "APP_ENV": "dev",
        "APP_CONFIG_DIR": str(REPO / "config"),
        "PIPELINE__DATABASE__URL": f"{DATABASE_SERVER}/{database}",
        "PIPELINE__NATS__URL": NATS_URL,
        "PIPELINE__NATS__STREAM": stream,
        "PIPELINE__INGEST__LISTEN": ingest_listen,
        "PIPELINE__RELAY__ADMIN_LISTEN": relay_listen,
        "PIPELINE__RELAY__POLL_INTERVAL_MS": "200",
    }
    processes = {}
    logs = {}
    try:
        for name, binary in BINARIES.items():
            logs[name] = open(tmp_path / f"{name}.log", "wb")
            processes[name] = subprocess.Popen(
                [str(binary)], env=env, stdout=logs[name], stderr=subprocess.STDOUT
            )
        for name, listen in (("ingest", ingest_listen), ("relay", relay_listen)):

            def ready(name=name, listen=listen):
                if processes[name].poll() is not None:
                    log = (tmp_path / f"{name}.log").read_text(errors="replace")
                    pytest.fail(f"{name} exited with {processes[name].returncode}:\n{log}")
                return http("GET", f"http://{listen}/readyz")[0] == 200

            eventually(f"{name} /readyz 200", ready)
        yield {
            "ingest": f"http://{ingest_listen}",
            "stream": stream,
            "database": database,
            "processes": processes,
        }
        for name, process in processes.items():
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0, f"{name} exits 0 on SIGTERM"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs.values():
            log.close()
        # Each clean-up step on its own: NATS away must not keep the database.
        try:
            asyncio.run(delete_streams(stream))
        finally:
            psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def delete_streams(stream):
    client = await nats.connect(NATS_URL)
    try:
        jetstream = client.jetstream()
        for name in (stream, f"{stream}_DLQ"):
            try:
                await jetstream.delete_stream(name)
            except NotFoundError:
                pass
    finally:
        await client.close()


def test_relayed_events_read_with_nats_py_have_the_documented_subject_headers_and_payload(
    pipeline,
):
    now = datetime.now(timezone.utc).replace(microsecond=250_000)
    readings = [
        ("k-1", {"device_id": "py-sensor-1", "recorded_at": (now - timedelta(minutes=3)).isoformat(),
                 "metrics": {"temperature": 21.5, "humidity": 40.25}}),
        ("k-2", {"device_id": "py-sensor-2", "recorded_at": (now - timedelta(minutes=2)).isoformat(),
                 "metrics": {"temperature": -4.0}}),
        ("k-3", {"device_id": "py-sensor-1", "recorded_at": (now - timedelta(minutes=1)).isoformat(),
                 "metrics": {"pressure": 1013.25}}),
    ]
    accepted = {}
    event_ids = {}
    for key, reading in readings:
        status, _, body = http(
            "POST",
            f"{pipeline['ingest']}/v1/telemetry",
            json.dumps(reading).encode(),
            {"Content-Type": "application/json", "Idempotency-Key": key},
        )
        assert status == 202, body
        answer = json.loads(body)
        assert answer["status"] == "accepted"
        accepted[answer["event_id"]] = reading
        event_ids[key] = answer["event_id"]
    # A retry is answered from the stored record and makes no second event.
    status, headers, body = http(
        "POST",
        f"{pipeline['ingest']}/v1/telemetry",
        json.dumps(readings[0][1]).encode(),
        {"Content-Type": "application/json", "Idempotency-Key": "k-1"},
    )
    assert status == 202 and headers["Idempotent-Replayed"] == "true"
    assert json.loads(body)["event_id"] == event_ids["k-1"], "the first answer's event"
    # Every event relayed before the stream is counted: a second event of the retry
    # would be in the outbox by now, and published.
    eventually(
        "every outbox row published",
        lambda: psql(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL", pipeline["database"]
        ) == "0",
    )
    assert psql("SELECT count(*) FROM outbox", pipeline["database"]) == "3", "one event a reading"

    asyncio.run(check_stream(pipeline["stream"], accepted))


async def check_stream(stream, accepted):
    root = stream.lower()
    client = await nats.connect(NATS_URL)
    try:
        jetstream = client.jetstream()

        async def all_relayed():
            try:
                info = await jetstream.stream_info(stream)
            except NotFoundError:
                return None
            return info if info.state.messages >= len(accepted) else None

        info = await eventually_async("3 messages in the stream", all_relayed)
        assert info.state.messages == len(accepted), "one message per accepted reading"
        assert info.config.subjects == [f"{root}.recorded.>"]
        assert info.config.storage == StorageType.FILE
        assert info.config.duplicate_window == 120, "duplicate window of 2 minutes"
        assert info.config.max_age == 7 * 24 * 3600, "kept by age, 7 days"
        dlq = await jetstream.stream_info(f"{stream}_DLQ")
        assert dlq.config.subjects == [f"{root}.dlq.>"]
        assert dlq.config.storage == StorageType.FILE
        assert dlq.config.max_age == 7 * 24 * 3600

        seen = {}
        for sequence in range(1, len(accepted) + 1):
            message = await jetstream.get_msg(stream, sequence)
            payload = json.loads(message.data)
            event_id = payload["event_id"]
            assert event_id in accepted, f"message {sequence} is an accepted reading"
            reading = accepted[event_id]
            assert message.subject == f"{root}.recorded.{reading['device_id']}"
            assert message.headers["Nats-Msg-Id"] == event_id
            assert message.headers["Content-Type"] == "application/json"
            assert message.headers["Event-Type"] == "telemetry.recorded"
            assert message.headers["Event-Version"] == "1"
            assert uuid.UUID(event_id).version == 7
            assert payload["event_type"] == "telemetry.recorded"
            assert payload["version"] == 1
            assert payload["device_id"] == reading["device_id"]
            assert rfc3339(payload["recorded_at"]) == datetime.fromisoformat(reading["recorded_at"])
            received_at = rfc3339(payload["received_at"])
            assert abs(datetime.now(timezone.utc) - received_at) < timedelta(minutes=5)
            assert payload["metrics"] == reading["metrics"]
            seen[event_id] = sequence
        assert set(seen) == set(accepted), "every accepted reading is in the stream once"

        # Delivered to a consumer of our own, in stream order, with the same headers.
        subscription = await jetstream.pull_subscribe(f"{root}.recorded.>", stream=stream)
        messages = await subscription.fetch(len(accepted), timeout=5)
        assert [message.metadata.sequence.stream for message in messages] == [1, 2, 3]
        for message in messages:
            assert message.headers["Nats-Msg-Id"] == json.loads(message.data)["event_id"]
            await message.ack()
        await subscription.unsubscribe()
    finally:
        await client.close()

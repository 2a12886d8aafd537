-- pgbench script for scripts/bench: one transaction writing :n readings with the
-- statement shape of ingest's group commit (INSERT in ingest/src/store.rs): the
-- idempotency keys with ON CONFLICT DO NOTHING RETURNING, then, for the keys inserted,
-- the readings and the outbox rows - one implicit transaction, one commit. Ingest binds
-- the values as arrays (unnest); here the same rows are made in the statement, with
-- time-ordered event ids like ingest's UUIDv7.
--
-- With notify=1 the transaction also queues `NOTIFY outbox`, as the trigger dropped by
-- migration 0004 did in every group commit: that shows what it cost (PostgreSQL
-- serialises the commits of notifying transactions). Ingest now notifies after the
-- commit, on a session of its own. notify=0 is ingest's statement.
--
-- scripts/bench runs it with PGOPTIONS='-c plan_cache_mode=force_generic_plan': ingest's
-- statement runs on a generic plan, this one would otherwise be planned anew in every
-- transaction (scripts/bench, pgbench_point).
--
--   export PGOPTIONS='-c plan_cache_mode=force_generic_plan'
--   pgbench -n -M prepared -f readings.sql -D n=1   -D notify=0 -c 64 -j 2 -T 10 bench_pgbench
--   pgbench -n -M prepared -f readings.sql -D n=500 -D notify=0 -c 4  -j 2 -T 10 bench_pgbench
--   pgbench -n -M prepared -f readings.sql -D n=1   -D notify=1 -c 64 -j 2 -T 10 bench_pgbench
\set r random(1, 9000000000000000000)
WITH made AS (
    SELECT g,
           'bench-dev-' || ((:r::bigint + g) % 10000) AS device_id,
           (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
               || substr(md5(:r::text || '-' || g::text), 1, 20))::uuid AS event_id
    FROM generate_series(1, :n::int) AS g
), input AS (
    SELECT device_id,
           :client_id::text || '-' || :r::text || '-' || g::text AS idempotency_key,
           sha256(convert_to(event_id::text, 'UTF8')) AS fingerprint,
           event_id,
           now() AS recorded_at,
           now() AS received_at,
           '{"battery": 3.871, "humidity": 40.2, "temperature": 21.53}'::jsonb AS metrics,
           '{"device_id":"' || device_id || '","event_id":"' || event_id
               || '","status":"accepted"}' AS response_body,
           convert_to('{"event_id":"' || event_id
               || '","event_type":"telemetry.recorded","version":1,"device_id":"' || device_id
               || '","recorded_at":"2026-11-22T10:15:30.25Z","received_at":"2026-11-22T10:15:30.251Z",'
               || '"metrics":{"battery":3.871,"humidity":40.2,"temperature":21.53}}', 'UTF8') AS payload
    FROM made
), keys AS (
    INSERT INTO idempotency_keys (device_id, idempotency_key, fingerprint, event_id, status_code, response_body)
    SELECT device_id, idempotency_key, fingerprint, event_id, 202, response_body FROM input
    ON CONFLICT DO NOTHING
    RETURNING event_id
), stored_readings AS (
    INSERT INTO readings (event_id, device_id, recorded_at, received_at, metrics)
    SELECT input.event_id, device_id, recorded_at, received_at, metrics
    FROM input JOIN keys USING (event_id)
), stored_outbox AS (
    INSERT INTO outbox (event_id, device_id, payload)
    SELECT input.event_id, device_id, payload
    FROM input JOIN keys USING (event_id)
), notified AS (
    -- Evaluated once (a volatile CTE is materialised), and only when notify=1.
    SELECT pg_notify('outbox', '') WHERE :notify::int = 1
)
SELECT event_id FROM keys WHERE (SELECT count(*) FROM notified) >= 0;

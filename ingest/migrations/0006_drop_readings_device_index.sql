-- `readings_device_recorded_at`, the (device_id, recorded_at) index of `readings`: no
-- statement of the pipeline reads it (the read model is Redis; a rebuild replays the
-- stream; the retention prune goes by `received_at`), yet every reading inserted an
-- entry at its device's place in it. With 10,000 devices those places are spread over
-- the whole index, so as the table grows the index outgrows the shared buffers and each
-- insert costs more.
--
-- 64 single-reading POSTs in flight on a 2-core box, three fresh databases taken in turn
-- for four rounds of 12 s (~250k readings each round, 2026-12-01): with the index
-- 20.5k / 21.4k / 20.3k / 19.2k req/s and 34 / 33 / 33 / 38 µs of PostgreSQL CPU per
-- reading; without it 22.4k / 22.8k / 22.2k / 21.6k req/s and 30 / 28 / 29 / 30 µs.
-- pgbench with ingest's statement at 500 readings per transaction, 4 clients, rounds of
-- 8 s: 73.7k / 59.3k / 51.2k readings/s with it, 77.3k / 75.0k / 68.9k without.
--
-- A deployment that looks up one device's history in PostgreSQL creates it again,
-- without blocking ingest:
--   CREATE INDEX CONCURRENTLY readings_device_recorded_at ON readings (device_id, recorded_at);

DROP INDEX IF EXISTS readings_device_recorded_at;

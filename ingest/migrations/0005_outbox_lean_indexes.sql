-- Two outbox indexes that every reading paid for and no statement reads:
--
-- * `outbox_event_id_key`, the UNIQUE on event_id: the event id is the primary key of
--   `readings`, written by the same statement for the same keys (ingest/src/store.rs),
--   so a second outbox row for one event cannot be made there; nothing looks outbox
--   rows up by event id. Each reading inserted an entry, and so did each mark published
--   (the UPDATE cannot be HOT: its columns are indexed), and so did each republish.
-- * `outbox_stream_seq` held an entry for every unpublished row (stream_seq is NULL until
--   the PubAck); every statement that reads it asks for sequences (`stream_seq >= $1`,
--   `IS NOT NULL`). As a partial index it stays unique among the sequences, which is all
--   0003 wanted, under the same name (the relay recognises the violation by it).
--
-- pgbench with ingest's statement, 500 readings per transaction, 4 clients, alternating
-- runs on a 2-core box (2026-12-01): 57.0k / 63.6k readings/s before, 68.5k / 68.3k after.

ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_key;
DROP INDEX IF EXISTS outbox_stream_seq;
CREATE UNIQUE INDEX outbox_stream_seq ON outbox (stream_seq) WHERE stream_seq IS NOT NULL;

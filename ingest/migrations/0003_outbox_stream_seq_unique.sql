-- A stream sequence belongs to one message: two kept outbox rows marked with the same
-- sequence mean the stream lost one of them (a NATS host crash truncated it, or it was
-- recreated) and handed the sequence out again. The unique index makes the relay's
-- "mark published" fail at that moment instead of recording the contradiction, which
-- sends the relay to its stream check (relay.rs, `check_stream`); it also serves the
-- check's lookups by sequence. Rows that already share a sequence are made unpublished
-- so that the relay publishes them again (at least once; the projector drops copies).

UPDATE outbox SET published_at = NULL, stream_seq = NULL
WHERE stream_seq IN (
    SELECT stream_seq FROM outbox WHERE stream_seq IS NOT NULL
    GROUP BY stream_seq HAVING count(*) > 1);

CREATE UNIQUE INDEX outbox_stream_seq ON outbox (stream_seq);

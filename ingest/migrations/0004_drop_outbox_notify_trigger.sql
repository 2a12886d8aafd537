-- Ingest wakes the relays itself now: after a group commit that inserted outbox rows it
-- sends `NOTIFY outbox` on a session of its own (ingest/src/outbox_notify.rs). The
-- trigger queued that NOTIFY inside every commit, and PostgreSQL serialises the commits
-- of all transactions that queued one (PreCommit_Notify holds a cluster-wide lock on
-- the notification queue until the commit record is flushed), so parallel group
-- commits could not overlap their WAL flushes.
--
-- While ingest processes older than this migration still run, their commits notify no
-- one; the relays find those rows by polling (relay.poll_interval_ms).

DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();

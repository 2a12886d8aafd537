-- The write side: every accepted reading, the idempotency record that answered it, and
-- the outbox row the relay publishes. All three are written in one transaction.

CREATE TABLE readings (
    event_id     uuid        PRIMARY KEY,
    device_id    text        NOT NULL,
    recorded_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    metrics      jsonb       NOT NULL
);
CREATE INDEX readings_device_recorded_at ON readings (device_id, recorded_at);
CREATE INDEX readings_received_at ON readings (received_at);

CREATE TABLE idempotency_keys (
    device_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    fingerprint      bytea       NOT NULL,
    event_id         uuid        NOT NULL,
    status_code      smallint    NOT NULL,
    response_body    text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

CREATE TABLE outbox (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid        NOT NULL UNIQUE,
    device_id     text        NOT NULL,
    payload       bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    stream_seq    bigint
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- One notification per inserting statement wakes the relays; delivered at commit.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Credentials (API.md §5): device tokens (one device), gateway tokens (any device) and
-- read tokens (the query API). Only a SHA-256 of each token is stored; the token itself
-- is shown once, when issued.

CREATE TABLE api_tokens (
    id          uuid        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('device', 'gateway', 'read')),
    device_id   text,
    token_hash  bytea       NOT NULL UNIQUE,
    label       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((kind = 'device') = (device_id IS NOT NULL))
);

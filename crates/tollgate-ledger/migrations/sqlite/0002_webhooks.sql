-- tollgate ledger schema, version 2: webhook delivery from the events outbox.
-- Identical in ../sqlite and ../postgres.
--
-- An event is due while delivered_at_us and failed_at_us are NULL and
-- next_attempt_at_us has passed. A dispatcher claims it by writing a lease
-- (lease_owner, lease_until_us) in one statement, so replicas never deliver the
-- same event at the same time; a lease left by a killed process simply expires.
ALTER TABLE events ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN next_attempt_at_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN lease_owner TEXT;
ALTER TABLE events ADD COLUMN lease_until_us BIGINT;
-- set when the attempts ran out (the event is kept, never delivered again)
ALTER TABLE events ADD COLUMN failed_at_us BIGINT;
CREATE INDEX events_due ON events (next_attempt_at_us) WHERE delivered_at_us IS NULL AND failed_at_us IS NULL;

-- One row per (event, endpoint) that answered 2xx: a retried event is sent again
-- only to the endpoints that have not accepted it yet.
CREATE TABLE webhook_deliveries (
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status   BIGINT NOT NULL,
    at_us    BIGINT NOT NULL,
    PRIMARY KEY (event_id, endpoint)
);

-- Endpoints that answered 410 Gone: nothing more is sent to them.
CREATE TABLE webhook_endpoints (
    id             TEXT PRIMARY KEY,
    disabled_at_us BIGINT NOT NULL,
    status         BIGINT NOT NULL
);

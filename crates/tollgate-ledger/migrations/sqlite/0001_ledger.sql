-- tollgate ledger schema, version 1 (SQLite). Kept column-for-column identical to
-- ../postgres/0001_ledger.sql so both backends run the same queries.
-- Times are microseconds since the Unix epoch (BIGINT) in both databases.

CREATE TABLE orgs (
    id            TEXT PRIMARY KEY,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE accounts (
    id            TEXT PRIMARY KEY,
    org           TEXT NOT NULL REFERENCES orgs (id),
    plan          TEXT NOT NULL,
    overrides     TEXT NOT NULL DEFAULT '{}',
    created_at_us BIGINT NOT NULL,
    -- materialised balance; the journal is the record, this is its running sum
    balance       BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0)
);

CREATE TABLE apps (
    account       TEXT NOT NULL REFERENCES accounts (id),
    name          TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (account, name)
);

-- Only the SHA-256 of the secret part of a key is stored.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    account       TEXT NOT NULL,
    app           TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    revoked_at_us BIGINT,
    FOREIGN KEY (account, app) REFERENCES apps (account, name)
);
CREATE INDEX api_keys_account ON api_keys (account, created_at_us);

-- Append-only credits journal. kind: grant | reserve | commit | release | expire.
-- grant: amount added; reserve: amount held; commit: amount charged (the rest of the
-- reservation, `refund`, went back to the balance); release/expire: amount returned.
CREATE TABLE credit_journal (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts (id),
    kind            TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount >= 0),
    refund          BIGINT NOT NULL DEFAULT 0 CHECK (refund >= 0),
    reservation     TEXT,
    grant_kind      TEXT,
    reason          TEXT,
    idempotency_key TEXT,
    at_us           BIGINT NOT NULL
);
CREATE INDEX credit_journal_account ON credit_journal (account, kind);
CREATE UNIQUE INDEX credit_journal_grant_key ON credit_journal (account, idempotency_key) WHERE kind = 'grant';
-- at most one settlement (commit, release or expire) per reservation
CREATE UNIQUE INDEX credit_journal_settlement ON credit_journal (reservation) WHERE kind <> 'reserve' AND kind <> 'grant';

-- state: open | committed | released | expired
CREATE TABLE reservations (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts (id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    state           TEXT NOT NULL,
    committed       BIGINT,
    idempotency_key TEXT,
    created_at_us   BIGINT NOT NULL,
    expires_at_us   BIGINT NOT NULL,
    settled_at_us   BIGINT
);
CREATE INDEX reservations_open_expiry ON reservations (expires_at_us) WHERE state = 'open';

-- One row per (account, Idempotency-Key) while it holds or has charged a reservation.
-- state: reserved | completed. A released reservation deletes its row.
CREATE TABLE idempotency (
    account       TEXT NOT NULL REFERENCES accounts (id),
    key           TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    reservation   TEXT NOT NULL,
    state         TEXT NOT NULL,
    status        BIGINT,
    content_type  TEXT,
    body          BLOB,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX idempotency_reservation ON idempotency (reservation);

-- Durable outbox of usage events.
CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    at_us           BIGINT NOT NULL,
    account         TEXT,
    kind            TEXT NOT NULL,
    data            TEXT NOT NULL,
    delivered_at_us BIGINT
);
CREATE INDEX events_at ON events (at_us, id);
CREATE INDEX events_account_at ON events (account, at_us, id);

//! Ledger integration tests: every test runs on an SQLite temp file and on the
//! machine's PostgreSQL in a fresh schema (dropped afterwards). Test ids (C1, G2, …)
//! refer to RELIABILITY-PLAN.md section 3.

mod common;

mod accounts;
mod crash;
mod credits;
mod keys;
mod outbox;
mod properties;
mod sqlite_busy;

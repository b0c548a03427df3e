//! The events outbox seen from a webhook dispatcher: claim due events under a
//! lease, record which endpoints accepted them, finish or reschedule them.
//!
//! Delivery is at-least-once. An event stays due until every endpoint that
//! wants it answered 2xx (or its attempts ran out), so a crash anywhere between
//! sending and [`Ledger::finish_event`] only means it is sent again after its
//! lease expires; consumers dedupe on the event id (`webhook-id`).
//!
//! Claims: one statement takes up to `limit` due events and writes this
//! dispatcher's lease on them. SQLite runs it under `BEGIN IMMEDIATE` (one
//! writer at a time); PostgreSQL selects with `FOR UPDATE SKIP LOCKED`, so two
//! replicas claiming at once take disjoint sets and neither waits. While a
//! lease is live no other dispatcher claims the event, so replicas never
//! deliver the same event concurrently.

use std::time::Duration;

use crate::backend::{ATTEMPTS, Backend, read, write_tx};
use crate::ledger::{IMMEDIATE, now_us, parse_json, ts};
use crate::{Event, Ledger, LedgerError};

/// An event claimed for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedEvent {
    /// The event.
    pub event: Event,
    /// Failed delivery rounds so far (0 on the first try).
    pub attempts: u32,
    /// Endpoints that already accepted it (2xx) in an earlier round.
    pub delivered_to: Vec<String>,
}

/// Counts of the outbox, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Events still to be delivered (due now or later).
    pub pending: u64,
    /// Events delivered to every endpoint that wanted them.
    pub delivered: u64,
    /// Events whose attempts ran out.
    pub failed: u64,
}

const CLAIM_SQLITE: &str = "UPDATE events SET lease_owner = $1, lease_until_us = $2 \
     WHERE id IN (SELECT id FROM events WHERE delivered_at_us IS NULL AND failed_at_us IS NULL \
       AND next_attempt_at_us <= $3 AND (lease_until_us IS NULL OR lease_until_us <= $3) \
       ORDER BY next_attempt_at_us, at_us, id LIMIT $4) \
     RETURNING id, at_us, account, kind, data, attempts";
const CLAIM_POSTGRES: &str = "UPDATE events SET lease_owner = $1, lease_until_us = $2 \
     WHERE id IN (SELECT id FROM events WHERE delivered_at_us IS NULL AND failed_at_us IS NULL \
       AND next_attempt_at_us <= $3 AND (lease_until_us IS NULL OR lease_until_us <= $3) \
       ORDER BY next_attempt_at_us, at_us, id LIMIT $4 FOR UPDATE SKIP LOCKED) \
     RETURNING id, at_us, account, kind, data, attempts";

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

impl Ledger {
    /// Whether any event is due for delivery now (a cheap read, so an idle
    /// dispatcher takes no write lock).
    ///
    /// # Errors
    /// Database errors.
    pub async fn has_due_events(&self) -> Result<bool, LedgerError> {
        let now = now_us();
        let row: Option<(String,)> = read!(self, |db| {
            Ok(sqlx::query_as(
                "SELECT id FROM events WHERE delivered_at_us IS NULL AND failed_at_us IS NULL \
                 AND next_attempt_at_us <= $1 AND (lease_until_us IS NULL OR lease_until_us <= $1) LIMIT 1",
            )
            .bind(now)
            .fetch_optional(db)
            .await?)
        })?;
        Ok(row.is_some())
    }

    /// Claims up to `limit` due events (oldest schedule first) for `lease`:
    /// no other dispatcher gets them until the lease ends or the event is
    /// finished or rescheduled.
    ///
    /// # Errors
    /// Database errors; [`LedgerError::Corrupt`] for undecodable event data.
    pub async fn claim_events(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<ClaimedEvent>, LedgerError> {
        let sql = match &self.inner.backend {
            Backend::Sqlite(_) => CLAIM_SQLITE,
            Backend::Postgres(_) => CLAIM_POSTGRES,
        };
        type Row = (String, i64, Option<String>, String, String, i64);
        let mut rows: Vec<Row> = write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let now = now_us();
            let rows: Vec<Row> = sqlx::query_as(sql)
                .bind(owner)
                .bind(now.saturating_add(micros(lease)))
                .bind(now)
                .bind(i64::from(limit.max(1)))
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(rows)
        })?;
        rows.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let retried: Vec<String> = rows
            .iter()
            .filter(|r| r.5 > 0)
            .map(|r| r.0.clone())
            .collect();
        let mut done: Vec<(String, String)> = Vec::new();
        for id in &retried {
            let mut d: Vec<(String, String)> = read!(self, |db| {
                Ok(sqlx::query_as(
                    "SELECT event_id, endpoint FROM webhook_deliveries WHERE event_id = $1",
                )
                .bind(id)
                .fetch_all(db)
                .await?)
            })?;
            done.append(&mut d);
        }
        rows.into_iter()
            .map(|(id, at_us, account, kind, data, attempts)| {
                let delivered_to = done
                    .iter()
                    .filter(|(e, _)| *e == id)
                    .map(|(_, ep)| ep.clone())
                    .collect();
                Ok(ClaimedEvent {
                    event: Event {
                        id,
                        at: ts(at_us),
                        account,
                        kind,
                        data: parse_json("event data", &data)?,
                    },
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    delivered_to,
                })
            })
            .collect()
    }

    /// Records that `endpoint` accepted `event_id` with `status` (2xx).
    /// Idempotent.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_delivery(
        &self,
        event_id: &str,
        endpoint: &str,
        status: u16,
    ) -> Result<(), LedgerError> {
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            sqlx::query(
                "INSERT INTO webhook_deliveries (event_id, endpoint, status, at_us) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (event_id, endpoint) DO NOTHING",
            )
            .bind(event_id)
            .bind(endpoint)
            .bind(i64::from(status))
            .bind(now_us())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Marks an event delivered (every endpoint that wanted it accepted it, or
    /// none wanted it). Only after this does the outbox stop offering it.
    ///
    /// # Errors
    /// Database errors.
    pub async fn finish_event(&self, event_id: &str) -> Result<(), LedgerError> {
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            sqlx::query(
                "UPDATE events SET delivered_at_us = $2, lease_owner = NULL, lease_until_us = NULL \
                 WHERE id = $1 AND delivered_at_us IS NULL",
            )
            .bind(event_id)
            .bind(now_us())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// After a failed round: counts the attempt and makes the event due again
    /// `after` from now, or gives it up for good when `give_up`. Only the
    /// lease holder `owner` may do it (a stale dispatcher changes nothing).
    ///
    /// # Errors
    /// Database errors.
    pub async fn reschedule_event(
        &self,
        event_id: &str,
        owner: &str,
        after: Duration,
        give_up: bool,
    ) -> Result<(), LedgerError> {
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let now = now_us();
            sqlx::query(
                "UPDATE events SET attempts = attempts + 1, next_attempt_at_us = $3, \
                 failed_at_us = $4, lease_owner = NULL, lease_until_us = NULL \
                 WHERE id = $1 AND lease_owner = $2 AND delivered_at_us IS NULL",
            )
            .bind(event_id)
            .bind(owner)
            .bind(now.saturating_add(micros(after)))
            .bind(give_up.then_some(now))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Disables a webhook endpoint for good (it answered `status`, 410 Gone).
    ///
    /// # Errors
    /// Database errors.
    pub async fn disable_endpoint(&self, endpoint: &str, status: u16) -> Result<(), LedgerError> {
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            sqlx::query(
                "INSERT INTO webhook_endpoints (id, disabled_at_us, status) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(endpoint)
            .bind(now_us())
            .bind(i64::from(status))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Enables an endpoint that [`Ledger::disable_endpoint`] disabled; events
    /// still pending are sent to it again. Returns whether it was disabled.
    ///
    /// # Errors
    /// Database errors.
    pub async fn enable_endpoint(&self, endpoint: &str) -> Result<bool, LedgerError> {
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let done = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
                .bind(endpoint)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Ids of the endpoints disabled by [`Ledger::disable_endpoint`].
    ///
    /// # Errors
    /// Database errors.
    pub async fn disabled_endpoints(&self) -> Result<Vec<String>, LedgerError> {
        let rows: Vec<(String,)> = read!(self, |db| {
            Ok(
                sqlx::query_as("SELECT id FROM webhook_endpoints ORDER BY id")
                    .fetch_all(db)
                    .await?,
            )
        })?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Pending, delivered and failed event counts.
    ///
    /// # Errors
    /// Database errors.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, LedgerError> {
        let (pending, delivered, failed): (i64, i64, i64) = read!(self, |db| {
            Ok(sqlx::query_as(
                "SELECT \
                 CAST(COALESCE(SUM(CASE WHEN delivered_at_us IS NULL AND failed_at_us IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN delivered_at_us IS NOT NULL THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN failed_at_us IS NOT NULL THEN 1 ELSE 0 END), 0) AS BIGINT) \
                 FROM events",
            )
            .fetch_one(db)
            .await?)
        })?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(OutboxStats {
            pending: n(pending),
            delivered: n(delivered),
            failed: n(failed),
        })
    }
}

//! The two databases behind one set of queries.
//!
//! Every query is written once, in SQL both SQLite and PostgreSQL accept
//! (`$1` placeholders, `RETURNING`, `ON CONFLICT`, BIGINT microsecond times, JSON as
//! TEXT). The [`write_tx!`] and [`read!`] macros expand that one body for each
//! concrete pool, so the same text is type-checked against both drivers without
//! `sqlx::Any` (which lacks the types we need) and without a boxed future per call.
//!
//! Write transactions: SQLite starts them with `BEGIN IMMEDIATE` (the write lock is
//! taken up front, so the busy timeout applies and no `SQLITE_BUSY` surfaces from a
//! read-to-write upgrade); PostgreSQL runs at its default READ COMMITTED, where the
//! invariants are stated in the statements themselves (conditional `UPDATE … WHERE
//! balance >= $2 RETURNING`, `UPDATE … WHERE state = 'open'`, unique indexes).
//! PostgreSQL deadlocks/serialization failures and SQLite busy errors are retried a
//! few times with a short pause. Every PostgreSQL operation is bounded in time
//! as a whole ([`PG_OPERATION_TIMEOUT`]); SQLite's are local and wait out its busy
//! timeout instead.

use std::future::Future;
use std::time::Duration;

use sqlx::{PgPool, SqlitePool};

use crate::LedgerError;

/// A pool for one of the two databases.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Backend {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// Pins the output type of an async block so `?` inside it converts to
/// [`LedgerError`].
pub(crate) fn typed<T, F: Future<Output = Result<T, LedgerError>>>(f: F) -> F {
    f
}

/// How long one PostgreSQL operation may take in all: waiting for a pooled
/// connection (or making one; the pool gives up on that after 1 s), its
/// statements and its commit. The pool's acquire bound alone left a
/// statement on a healthy connection unbounded, so a database stuck behind
/// a lock (or stopped after the pool's health check) held a charging
/// request until its request timeout (504) instead of the prompt 503 that
/// RELIABILITY-PLAN B9/C4 ask for. Not tighter: 64 callers charging one
/// account through 10 connections on a loaded 2-core machine wait over 1 s
/// for the account's row lock, and that is slow service, not an outage. A
/// request makes at most two ledger calls (reserve, then commit or
/// release), so a dead database costs it at most twice this.
pub(crate) const PG_OPERATION_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs one PostgreSQL read within [`PG_OPERATION_TIMEOUT`].
pub(crate) async fn bounded<T, F: Future<Output = Result<T, LedgerError>>>(
    f: F,
) -> Result<T, LedgerError> {
    tokio::time::timeout(PG_OPERATION_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(timed_out(true)))
}

/// The error of a PostgreSQL operation that ran out of
/// [`PG_OPERATION_TIMEOUT`]. Before a connection was handed out nothing ran,
/// and the error says so as the pool's own does (`PoolTimedOut`: the call
/// may simply be made again); after it, the operation's future was dropped
/// mid-way: an open transaction is rolled back when its connection goes
/// back to the pool, but a commit already sent may have taken effect
/// (reservations left open expire; an `Idempotency-Key` settles a retry).
pub(crate) fn timed_out(connected: bool) -> LedgerError {
    if connected {
        LedgerError::TimedOut {
            after: PG_OPERATION_TIMEOUT,
        }
    } else {
        LedgerError::Database(sqlx::Error::PoolTimedOut)
    }
}

/// How many times a transaction that hit a transient conflict is tried in all.
pub(crate) const ATTEMPTS: u32 = 5;

/// `write_tx!(ledger, sqlite_begin, attempts, |tx| body)`: runs `body` (an
/// expression of type `Result<T, LedgerError>`, usually an `async`-free block that
/// awaits queries on `&mut *tx`) inside a transaction. The body commits with
/// `tx.commit().await?`; returning without committing rolls back.
macro_rules! write_tx {
    ($ledger:expr, $sqlite_begin:expr, $attempts:expr, |$tx:ident| $body:expr) => {{
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            $ledger.inner.count_query();
            let result = match &$ledger.inner.backend {
                $crate::backend::Backend::Sqlite(pool) => {
                    $crate::backend::typed(async {
                        #[allow(unused_mut)]
                        let mut $tx = pool.begin_with($sqlite_begin).await?;
                        $body
                    })
                    .await
                }
                $crate::backend::Backend::Postgres(pool) => {
                    let mut connected = false;
                    let run = $crate::backend::typed(async {
                        #[allow(unused_mut)]
                        let mut $tx = pool.begin().await?;
                        connected = true;
                        $body
                    });
                    match tokio::time::timeout($crate::backend::PG_OPERATION_TIMEOUT, run).await {
                        Ok(result) => result,
                        Err(_) => Err($crate::backend::timed_out(connected)),
                    }
                }
            };
            match result {
                Err(e) if e.is_retryable_conflict() && attempt < $attempts => {
                    tokio::time::sleep(std::time::Duration::from_millis(2 * u64::from(attempt)))
                        .await;
                }
                other => break other,
            }
        }
    }};
}

/// `read!(ledger, |db| body)`: runs `body` with `db` bound to the pool (an
/// executor for single statements, each its own snapshot).
///
/// Both macros count one database operation per run (a read, or one attempt
/// of a write transaction): [`Ledger::db_queries`](crate::Ledger::db_queries).
macro_rules! read {
    ($ledger:expr, |$db:ident| $body:expr) => {{
        $ledger.inner.count_query();
        match &$ledger.inner.backend {
            $crate::backend::Backend::Sqlite($db) => $crate::backend::typed(async { $body }).await,
            $crate::backend::Backend::Postgres($db) => {
                $crate::backend::bounded($crate::backend::typed(async { $body })).await
            }
        }
    }};
}

pub(crate) use read;
pub(crate) use write_tx;

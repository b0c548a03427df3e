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
//! few times with a short pause.

use std::future::Future;

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
                    $crate::backend::typed(async {
                        #[allow(unused_mut)]
                        let mut $tx = pool.begin().await?;
                        $body
                    })
                    .await
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
                $crate::backend::typed(async { $body }).await
            }
        }
    }};
}

pub(crate) use read;
pub(crate) use write_tx;

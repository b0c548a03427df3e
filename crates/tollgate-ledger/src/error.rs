//! [`LedgerError`]: what went wrong in a ledger call.
//!
//! No variant ever carries an API key, a secret or a database URL: ids (account,
//! key id, reservation) are public identifiers, secrets never enter an error.

/// An error from a [`Ledger`](crate::Ledger) call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The named thing does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// `"account"`, `"key"` or `"reservation"`.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// Creating the named thing failed because it already exists.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// `"account"`.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A credit amount outside `1..=10^12` (commits accept `0..=reserved`).
    #[error("invalid credit amount {amount}: amounts must be between 1 and 1000000000000")]
    InvalidAmount {
        /// The amount given.
        amount: i64,
    },
    /// A commit asked to charge more than the reservation holds; nothing changed.
    #[error("cannot commit {amount} credits: the reservation holds only {reserved}")]
    CommitAboveReservation {
        /// Credits held by the reservation.
        reserved: i64,
        /// Credits the commit asked for.
        amount: i64,
    },
    /// The reservation was already committed, released or expired; nothing changed.
    #[error("the reservation was already committed, released or expired")]
    ReservationSettled,
    /// An argument is not acceptable (empty id, overrides not a JSON object, …).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The database location could not be understood (the URL itself is never echoed,
    /// as it may hold a password).
    #[error("invalid database location: {reason}")]
    InvalidDatabase {
        /// What is wrong.
        reason: &'static str,
    },
    /// Stored data could not be decoded (e.g. overrides that are not JSON).
    #[error("stored {what} is corrupt")]
    Corrupt {
        /// What could not be decoded.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The operating system's random source failed while generating a key.
    #[error("the operating system's random source failed")]
    Random(#[source] getrandom::Error),
    /// The database could not be opened at start: the reason in plain words
    /// (the server's message without its source line) and what to change.
    #[error("{reason}{hint}")]
    Open {
        /// What went wrong.
        reason: String,
        /// What to change, or empty.
        hint: &'static str,
    },
    /// A schema migration failed.
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The database failed or could not be reached; see [`LedgerError::is_unavailable`].
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// A PostgreSQL operation (waiting for a connection, its statements and
    /// its commit) did not finish within its bound: the database hangs or is
    /// overloaded. Unavailable, like a refused connection.
    #[error("the database did not answer within {}ms", after.as_millis())]
    TimedOut {
        /// The bound that ran out.
        after: std::time::Duration,
    },
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        LedgerError::Database(e)
    }
}

impl LedgerError {
    /// A failure to open a database, in words an operator can act on: the
    /// server's own message (PostgreSQL's comes with the C source line it
    /// was raised at, which tells an operator nothing) plus a hint for the
    /// usual mistakes. Errors that are not about reaching or logging in to
    /// the database stay [`LedgerError::Database`].
    pub(crate) fn open(e: sqlx::Error) -> LedgerError {
        let hint = match &e {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("28000") => {
                    " (name an existing role in the URL: postgres://USER@HOST:PORT/DATABASE)"
                }
                Some("28P01") => " (check the user and password in the URL)",
                Some("3D000") => {
                    " (create it first, e.g. `createdb NAME`, or name an existing database in the URL)"
                }
                // SQLite: SQLITE_CANTOPEN.
                Some("14") => " (check that the directory exists and is writable)",
                _ => "",
            },
            sqlx::Error::PoolTimedOut => {
                return LedgerError::Open {
                    reason: "no connection could be made before the connect timeout".to_owned(),
                    hint: " (is the database server running, and is the host and port in the URL right?)",
                };
            }
            sqlx::Error::Io(_) => {
                " (is the database server running, and is the host and port in the URL right?)"
            }
            _ => return LedgerError::Database(e),
        };
        let reason = match &e {
            sqlx::Error::Database(db) => db.message().to_owned(),
            other => other.to_string(),
        };
        LedgerError::Open { reason, hint }
    }

    /// True when the database is down, unreachable, overloaded or shutting down:
    /// the request did not happen and may be retried later (the server answers 503).
    pub fn is_unavailable(&self) -> bool {
        match self {
            LedgerError::Database(e) => sqlx_unavailable(e),
            LedgerError::Open { .. } | LedgerError::TimedOut { .. } => true,
            LedgerError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sqlx_unavailable(e),
            _ => false,
        }
    }

    /// True for transient conflicts that the ledger retries itself (PostgreSQL
    /// deadlock or serialization failure, SQLite busy/locked).
    pub(crate) fn is_retryable_conflict(&self) -> bool {
        match self {
            LedgerError::Database(sqlx::Error::Database(db)) => matches!(
                db.code().as_deref(),
                Some("40001") | Some("40P01") | Some("5") | Some("6") | Some("517") | Some("261")
            ),
            _ => false,
        }
    }
}

fn sqlx_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // PostgreSQL: connection exceptions, shutdown, too many connections, crash recovery.
            Some(code) if code.starts_with("08") => true,
            Some("57P01" | "57P02" | "57P03" | "53300" | "53000") => true,
            // SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_IOERR (10), SQLITE_FULL (13),
            // SQLITE_CANTOPEN (14) and their extended codes.
            // (PostgreSQL codes are always five characters, SQLite's are shorter.)
            Some(code) if code.len() < 5 => code
                .parse::<i32>()
                .map(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
                .unwrap_or(false),
            _ => false,
        },
        _ => false,
    }
}

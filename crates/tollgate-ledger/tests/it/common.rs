//! Fresh databases per test, a seeded RNG and shared checks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate_ledger::{Idempotency, Ledger, NewAccount, ReservationId, ReserveOutcome};

/// PostgreSQL for tests; override with `TOLLGATE_TEST_DATABASE_URL`.
pub fn pg_url() -> String {
    std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// How to reach a test database, also from a child process.
#[derive(Debug, Clone)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres { url: String, schema: String },
}

impl Location {
    pub async fn open(&self) -> Ledger {
        match self {
            Location::Sqlite(path) => Ledger::open(&format!("sqlite://{}", path.display()))
                .await
                .expect("open sqlite"),
            Location::Postgres { url, schema } => Ledger::open_postgres_schema(url, schema)
                .await
                .expect("open postgres schema"),
        }
    }

    /// `sqlite:PATH` or `postgres:SCHEMA` (for a child's environment).
    pub fn encode(&self) -> String {
        match self {
            Location::Sqlite(p) => format!("sqlite:{}", p.display()),
            Location::Postgres { schema, .. } => format!("postgres:{schema}"),
        }
    }

    pub fn decode(s: &str) -> Location {
        match s.split_once(':') {
            Some(("sqlite", p)) => Location::Sqlite(p.into()),
            Some(("postgres", schema)) => Location::Postgres {
                url: pg_url(),
                schema: schema.to_owned(),
            },
            _ => panic!("bad location {s}"),
        }
    }
}

/// A database that exists for one test.
pub struct TestDb {
    pub ledger: Ledger,
    pub location: Location,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub async fn fresh(kind: Kind) -> TestDb {
    match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let location = Location::Sqlite(dir.path().join("ledger.db"));
            TestDb {
                ledger: location.open().await,
                location,
                _dir: Some(dir),
            }
        }
        Kind::Postgres => {
            let nanos = jiff::Timestamp::now().as_nanosecond();
            let schema = format!(
                "tg_ledger_test_{}_{}_{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                nanos % 1_000_000_000
            );
            let location = Location::Postgres {
                url: pg_url(),
                schema,
            };
            TestDb {
                ledger: location.open().await,
                location,
                _dir: None,
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Location::Postgres { url, schema } = &self.location {
            let (url, schema) = (url.clone(), schema.clone());
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                        )))
                        .execute(&mut c)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

pub async fn account(ledger: &Ledger, id: &str, grant: i64) {
    ledger
        .create_account(&NewAccount {
            id: id.to_owned(),
            plan: "test".to_owned(),
            org: None,
            created_at: None,
            grant,
        })
        .await
        .expect("create account");
}

/// Reserves `amount` credits of `account`, which must succeed: the reservation.
pub async fn reserved(
    ledger: &Ledger,
    account: &str,
    amount: i64,
    idempotency: Option<&Idempotency>,
    ttl: Duration,
) -> ReservationId {
    match ledger.reserve(account, amount, idempotency, ttl).await {
        Ok(ReserveOutcome::Reserved { id, .. }) => id,
        other => panic!("reserve {amount} on {account}: {other:?}"),
    }
}

/// Accounts whose stored balance differs from a replay of their journal rows (C7).
pub async fn drifting_accounts(ledger: &Ledger) -> Vec<String> {
    ledger
        .query_strings_for_test(
            "SELECT a.id FROM accounts a WHERE a.balance <> COALESCE((SELECT SUM(CASE j.kind \
             WHEN 'grant' THEN j.amount WHEN 'reserve' THEN -j.amount WHEN 'commit' THEN j.refund \
             ELSE j.amount END) FROM credit_journal j WHERE j.account = a.id), 0)",
        )
        .await
        .expect("reconciliation query")
}

/// Idempotency keys with more than one committed charge.
pub async fn double_charged_keys(ledger: &Ledger) -> Vec<String> {
    ledger
        .query_strings_for_test(
            "SELECT account || '/' || idempotency_key FROM credit_journal WHERE kind = 'commit' \
             AND idempotency_key IS NOT NULL GROUP BY account, idempotency_key HAVING COUNT(*) > 1",
        )
        .await
        .expect("duplicate query")
}

/// splitmix64: small, seeded, good enough for choosing test actions.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// `both!(name, body)`: `name::sqlite` and `name::postgres` run `body(Kind)`.
macro_rules! both {
    ($name:ident, $body:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $body($crate::common::Kind::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $body($crate::common::Kind::Postgres).await
            }
        }
    };
}
pub(crate) use both;

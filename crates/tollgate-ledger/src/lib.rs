//! Durable state of the tollgate gateway on SQLite or PostgreSQL: orgs, accounts,
//! apps, hashed API keys, the credits journal with reservations and idempotency
//! records, and the events outbox. This crate owns every SQL table; both databases
//! run the same versioned migrations (`migrations/sqlite`, `migrations/postgres`)
//! and the same queries.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tollgate_ledger::LedgerError> {
//! use std::time::Duration;
//! use tollgate_ledger::{KeyCheck, Ledger, NewAccount, ReserveOutcome};
//!
//! # let unique = jiff::Timestamp::now().as_nanosecond();
//! let dir = std::env::temp_dir().join(format!("tg-ledger-doc-{}-{unique}", std::process::id()));
//! std::fs::create_dir_all(&dir).expect("temp dir");
//! let ledger = Ledger::open(dir.join("ledger.db").to_str().expect("utf-8")).await?;
//! let account = ledger
//!     .create_account(&NewAccount { id: "acme".into(), plan: "free".into(), org: None, created_at: None, grant: 200 })
//!     .await?;
//! assert_eq!(account.balance, 200);
//!
//! let key = ledger.create_key("acme", None).await?;
//! assert!(matches!(ledger.verify_key(key.key.expose()).await?, KeyCheck::Valid(_)));
//!
//! let ReserveOutcome::Reserved { id, balance } = ledger.reserve("acme", 3, None, Duration::from_secs(60)).await? else {
//!     panic!("200 credits cover 3")
//! };
//! assert_eq!(balance, 197);
//! assert_eq!(ledger.commit(id, 2, None).await?, 198);
//! assert_eq!(ledger.audit("acme").await?.drift(), 0);
//! # ledger.close().await;
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```
//!
//! Main types: [`Ledger`], [`LedgerError`], [`ReserveOutcome`], [`KeyCheck`], [`Audit`].
//!
//! Guarantees (each has a test in `tests/it`):
//! - Credits: for every account, Σ grants = balance + committed + open reservations,
//!   at every moment and across `kill -9`; the balance never goes negative; one
//!   idempotency key is charged at most once.
//! - Keys: only SHA-256 of the secret is stored; a key never appears in `Debug`,
//!   `Display` or an error; revocation takes effect within [`REVOCATION_BOUND`].

mod backend;
mod error;
pub mod key;
mod ledger;
mod outbox;
mod types;

pub use error::LedgerError;
pub use key::Secret;
pub use ledger::{Ledger, MAX_AMOUNT, REVOCATION_BOUND};
pub use outbox::{ClaimedEvent, OutboxStats};
pub use types::{
    Account, AccountChange, Audit, CommitEvents, CreatedKey, Derived, Event, GrantKind,
    Idempotency, KeyCheck, KeyIdentity, KeyInfo, NewAccount, NewEvent, ReservationId,
    ReserveOutcome, StoredResponse,
};

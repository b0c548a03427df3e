//! [`Ledger`]: every operation on the durable state.
//!
//! Credits are an append-only journal (`credit_journal`) plus a materialised
//! balance (`accounts.balance`) changed in the same transaction as the journal row.
//! A reservation takes credits with one conditional statement,
//! `UPDATE accounts SET balance = balance - $2 WHERE id = $1 AND balance >= $2
//! RETURNING balance`, so the "never below zero" rule is stated in SQL and holds at
//! PostgreSQL's READ COMMITTED as well as under SQLite's single writer. Settling a
//! reservation (commit, release, expiry) is `UPDATE reservations … WHERE state =
//! 'open'`: exactly one of racing settlements wins, a unique index on the journal
//! backs it up.
//!
//! Idempotency: the `(account, key)` record is inserted in the reservation's own
//! transaction, so a reservation and its record exist together or not at all. Same
//! key + different fingerprint → [`ReserveOutcome::Mismatch`]; while reserved →
//! [`ReserveOutcome::InProgress`]; once committed → [`ReserveOutcome::Completed`]
//! with the stored response; a release (or expiry) deletes the record, so the key
//! may reserve again. A key is therefore charged at most once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use moka::future::Cache;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection};

use crate::backend::{ATTEMPTS, Backend, read, write_tx};
use crate::key;
use crate::{
    Account, AccountChange, Audit, CommitEvents, CreatedKey, Event, GrantKind, Idempotency,
    KeyCheck, KeyIdentity, KeyInfo, LedgerError, NewAccount, NewEvent, ReservationId,
    ReserveOutcome, StoredResponse,
};

/// How long a verified key (or a known-unknown id) is cached in memory, and an
/// account looked up by [`Ledger::account_identity`] (or a known-unknown account
/// id). A revoked key stops working on every replica at most this long after
/// `revoke_key` returns (immediately on the replica that revoked it); plan and
/// override changes reach cached identities within the same bound (at once on
/// the replica that made them). It is also the negative-cache TTL: a well-formed
/// but unknown key id costs at most one database read per id per this bound
/// (concurrent misses for one id share that read).
pub const REVOCATION_BOUND: Duration = Duration::from_secs(2);

/// A cached key or account identity read again once it is this old, in the
/// background, by the first request that finds it so: requests keep being
/// answered from the cache while the database is read, so a hot key never
/// waits for the database at the end of [`REVOCATION_BOUND`] (unless that
/// read takes longer than the rest of the bound).
const REFRESH_AFTER: Duration = Duration::from_millis(1500);

/// Largest amount of one grant, reservation or commit (10^12 credits).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Cached key lookups (entries, ≈ 300 B each), positive and negative.
const KEY_CACHE_CAPACITY: u64 = 100_000;
/// Cached account identities (entries, ≈ 300 B each), positive and negative.
const ACCOUNT_CACHE_CAPACITY: u64 = 100_000;
/// Ids of keys that exist, remembered for [`KNOWN_ID_TTL`] (entries ≈ 100 B).
const KNOWN_ID_CAPACITY: u64 = 100_000;
/// How long a key id that was found in the database is remembered as real.
const KNOWN_ID_TTL: Duration = Duration::from_secs(3600);
/// SQLite waits this long for the write lock before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const SQLITE_MAX_CONNECTIONS: u32 = 8;
const PG_MAX_CONNECTIONS: u32 = 10;
/// How long reaching PostgreSQL at start may take before opening fails.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a pooled PostgreSQL connection (including
/// making one) before its ledger call fails as unavailable: short, so that
/// while the database is down or overloaded charging requests get a prompt
/// 503 (RELIABILITY-PLAN B9/C4) instead of waiting out the request timeout.
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Reservations settled per `expire_reservations` batch, and idempotency
/// records deleted per `prune_idempotency` batch.
const EXPIRY_BATCH: i64 = 500;
const MAX_ID_LEN: usize = 128;
/// Idempotency record and journal row of the one-time grant made at account creation.
const CREATION_GRANT_KEY: &str = "account-created";

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Handle to the ledger database; cheap to clone (an `Arc` inside), `Send + Sync`.
#[derive(Clone)]
pub struct Ledger {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: Backend,
    keys: Cache<String, Loaded<CachedKey>>,
    accounts: Cache<String, Loaded<Option<Arc<KeyIdentity>>>>,
    /// Hits of `keys` and `accounts`, read without moka's bookkeeping.
    key_front: Front<CachedKey>,
    account_front: Front<Option<Arc<KeyIdentity>>>,
    /// Ids of keys found in the database lately (see [`Ledger::key_id_known`]).
    known_ids: Cache<String, ()>,
    /// Database operations run (see [`Ledger::db_queries`]).
    queries: AtomicU64,
    /// Key and account reads for identification (see [`Ledger::identity_lookups`]).
    lookups: AtomicU64,
    /// Moves on every invalidation of cached keys or accounts: a background
    /// refresh that read the database before an invalidation does not keep
    /// what it read (see [`Ledger::refresh`]).
    invalidations: AtomicU64,
}

impl Inner {
    /// Counts one database operation (called by `read!` and `write_tx!`).
    pub(crate) fn count_query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.inner.backend.name())
            .finish_non_exhaustive()
    }
}

/// A cached value, when it was read from the database, and whether a
/// request has taken on reading it again (shared by the copies in moka and
/// in the front).
#[derive(Clone)]
struct Loaded<V> {
    value: V,
    at: tokio::time::Instant,
    refreshing: Arc<AtomicBool>,
}

impl<V> Loaded<V> {
    fn now(value: V) -> Loaded<V> {
        Loaded::read_at(value, tokio::time::Instant::now())
    }

    /// `value`, read by a query that started at `at` (its age counts from
    /// then, so it is never served longer than the bound after the read).
    fn read_at(value: V, at: tokio::time::Instant) -> Loaded<V> {
        Loaded {
            value,
            at,
            refreshing: Arc::default(),
        }
    }
}

impl<V> Loaded<V> {
    /// The refresh flag, taken, when this value is past [`REFRESH_AFTER`]
    /// and nobody has taken on reading it again.
    fn claim_refresh(&self) -> Option<Arc<AtomicBool>> {
        if self.at.elapsed() >= REFRESH_AFTER {
            self.take_refresh()
        } else {
            None
        }
    }

    /// The refresh flag, taken, unless somebody has taken on reading this
    /// value again.
    fn take_refresh(&self) -> Option<Arc<AtomicBool>> {
        (!self.refreshing.load(Ordering::Relaxed) && !self.refreshing.swap(true, Ordering::AcqRel))
            .then(|| Arc::clone(&self.refreshing))
    }
}

/// A hit in a [`Front`]: the value, and the entry's refresh flag when this
/// caller is the one to read it again (it is past [`REFRESH_AFTER`] and
/// nobody else took that on).
struct Hit<V> {
    value: V,
    refresh: Option<Arc<AtomicBool>>,
}

/// A [`Front`] entry: the value as read, and the instants it is due to be
/// read again ([`REFRESH_AFTER`]) and expires (the front's TTL) after its
/// read, worked out once when it is kept, so that a hit reads the clock once
/// and compares instead of measuring the entry's age twice. `None`: never
/// (an instant past the clock's range).
struct FrontEntry<V> {
    loaded: Loaded<V>,
    refresh_at: Option<tokio::time::Instant>,
    expires_at: Option<tokio::time::Instant>,
}

impl<V> FrontEntry<V> {
    /// Whether this entry is as old as the TTL at `now` (as
    /// `at.elapsed() >= ttl`).
    fn is_expired(&self, now: tokio::time::Instant) -> bool {
        self.expires_at.is_some_and(|end| now >= end)
    }
}

/// One shard of a [`Front`].
type Shard<V> = std::sync::RwLock<std::collections::HashMap<Box<str>, FrontEntry<V>>>;

/// Shards of a [`Front`] (by a cheap hash of the key: spreads the read
/// locks' counters over several cache lines; each shard's map has its own
/// keyed hasher).
const FRONT_SHARDS: usize = 16;

/// The entries of a moka cache that were read lately, in front of it: a hit
/// is a read lock and a hash lookup instead of moka's bookkeeping (its read
/// log, frequency sketch, housekeeping), about a fifth of the instructions.
/// An entry keeps the time its value was read from the database and is used
/// only while younger than `ttl` (the moka cache's TTL), so it is never
/// served longer than moka would serve it. Entries come from moka (a hit or
/// a load); invalidating removes them from both (see [`Ledger`]'s callers of
/// [`Front::remove`]). Bounded: a full shard first drops its expired
/// entries, then everything (the values stay in moka, so refilling costs no
/// database read).
struct Front<V> {
    shards: Box<[Shard<V>]>,
    ttl: Duration,
    shard_capacity: usize,
}

impl<V: Clone> Front<V> {
    fn new(capacity: u64, ttl: Duration) -> Front<V> {
        let shard_capacity =
            (usize::try_from(capacity).unwrap_or(usize::MAX) / FRONT_SHARDS).max(1);
        Front {
            shards: (0..FRONT_SHARDS).map(|_| Default::default()).collect(),
            ttl,
            shard_capacity,
        }
    }

    fn shard(&self, key: &str) -> &Shard<V> {
        // FNV-1a: only picks the shard.
        let h = key.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        &self.shards[h as usize % FRONT_SHARDS]
    }

    /// The value for `key`, if present and younger than the TTL; with the
    /// entry's refresh flag, taken, when it is past [`REFRESH_AFTER`] and
    /// not being read again yet.
    fn get(&self, key: &str) -> Option<Hit<V>> {
        let now = tokio::time::Instant::now();
        let shard = self
            .shard(key)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hit = shard.get(key)?;
        if hit.is_expired(now) {
            return None;
        }
        Some(Hit {
            value: hit.loaded.value.clone(),
            refresh: if hit.refresh_at.is_some_and(|at| now >= at) {
                hit.loaded.take_refresh()
            } else {
                None
            },
        })
    }

    /// Keeps `loaded` for `key` (unless already expired).
    fn insert(&self, key: &str, loaded: &Loaded<V>) {
        let entry = FrontEntry {
            loaded: loaded.clone(),
            refresh_at: loaded.at.checked_add(REFRESH_AFTER),
            expires_at: loaded.at.checked_add(self.ttl),
        };
        let now = tokio::time::Instant::now();
        if entry.is_expired(now) {
            return;
        }
        let mut shard = self
            .shard(key)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shard.len() >= self.shard_capacity && !shard.contains_key(key) {
            shard.retain(|_, v| !v.is_expired(now));
            if shard.len() >= self.shard_capacity {
                shard.clear();
            }
        }
        shard.insert(key.into(), entry);
    }

    fn remove(&self, key: &str) {
        self.shard(key)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Removes every entry whose value matches `drop`.
    fn remove_if(&self, drop: impl Fn(&V) -> bool) {
        for shard in &self.shards {
            shard
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|_, v| !drop(&v.loaded.value));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

/// Which identity cache a background refresh reads for.
#[derive(Clone, Copy)]
enum Cached {
    Key,
    Account,
}

/// What the key cache holds for a key id.
#[derive(Clone)]
enum CachedKey {
    /// No key with this id.
    Missing,
    Known {
        secret_sha256: [u8; 32],
        revoked: bool,
        identity: Arc<KeyIdentity>,
    },
}

impl CachedKey {
    /// A key with this id exists (valid or revoked).
    fn is_known(&self) -> bool {
        matches!(self, CachedKey::Known { .. })
    }
}

/// Write transactions start with `BEGIN IMMEDIATE` on SQLite.
pub(crate) const IMMEDIATE: &str = "BEGIN IMMEDIATE";
/// Deliberately wrong: a deferred SQLite transaction (teeth of test C5).
const DEFERRED: &str = "BEGIN";

pub(crate) fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

pub(crate) fn ts(us: i64) -> jiff::Timestamp {
    // Every stored time was written from a valid Timestamp.
    jiff::Timestamp::from_microsecond(us).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn check_amount(amount: i64) -> Result<(), LedgerError> {
    if amount <= 0 || amount > MAX_AMOUNT {
        return Err(LedgerError::InvalidAmount { amount });
    }
    Ok(())
}

fn check_id(what: &'static str, id: &str) -> Result<(), LedgerError> {
    if id.is_empty() {
        return Err(LedgerError::InvalidInput {
            what,
            reason: "must not be empty",
        });
    }
    if id.len() > MAX_ID_LEN {
        return Err(LedgerError::InvalidInput {
            what,
            reason: "must be at most 128 bytes",
        });
    }
    // Printable ASCII (the usual id) has neither; anything else is read
    // as characters.
    let printable = id.bytes().fold(true, |ok, b| ok & b.is_ascii_graphic());
    if !printable && id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(LedgerError::InvalidInput {
            what,
            reason: "must not contain whitespace or control characters",
        });
    }
    Ok(())
}

fn not_found(what: &'static str, id: &str) -> LedgerError {
    LedgerError::NotFound {
        what,
        id: redact(id),
    }
}

/// An id echoed in an error, unless it looks like a whole key (a caller passed a
/// key where an id belongs): then only its public prefix.
fn redact(id: &str) -> String {
    let prefix_len = key::KEY_PREFIX.len() + key::ID_LEN;
    if id.starts_with(key::KEY_PREFIX) && id.len() > prefix_len {
        format!("{}***", id.get(..prefix_len).unwrap_or(key::KEY_PREFIX))
    } else {
        id.to_owned()
    }
}

pub(crate) fn parse_json(what: &'static str, text: &str) -> Result<serde_json::Value, LedgerError> {
    serde_json::from_str(text).map_err(|source| LedgerError::Corrupt { what, source })
}

type AccountRow = (String, String, String, i64, String, i64);

fn account_from_row(row: AccountRow) -> Result<Account, LedgerError> {
    let (id, plan, org, created_at_us, overrides, balance) = row;
    Ok(Account {
        id,
        plan,
        org,
        created_at: ts(created_at_us),
        overrides: parse_json("overrides", &overrides)?,
        balance,
    })
}

type KeyRow = (String, String, String, i64, Option<i64>);

fn key_info_from_row(row: KeyRow) -> KeyInfo {
    let (id, account, app, created_at_us, revoked_at_us) = row;
    KeyInfo {
        prefix: format!("{}{id}", key::KEY_PREFIX),
        id,
        account,
        app,
        created_at: ts(created_at_us),
        revoked: revoked_at_us.is_some(),
    }
}

fn is_schema_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `insert_event!(tx, account, kind, data, at_us)`: appends an event to the
/// outbox inside the caller's transaction (a macro, as the body is expanded
/// once per database driver).
macro_rules! insert_event {
    ($tx:expr, $account:expr, $kind:expr, $data:expr, $at_us:expr) => {
        sqlx::query(
            "INSERT INTO events (id, at_us, account, kind, data) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind($at_us)
        .bind($account)
        .bind($kind)
        .bind($data.to_string())
        .execute($tx)
        .await
    };
}

/// Settles a reservation's money in `$tx`: adds `$back` to the account's
/// balance and appends the journal row (`$kind` of `$amount`, `$refund` back
/// for a commit, 0 otherwise). Evaluates to the new balance. Commit, release and expiry
/// all end a reservation with this one step.
macro_rules! settle_journal {
    ($tx:expr, $account:expr, $back:expr, $kind:expr, $amount:expr, $refund:expr,
     $reservation:expr, $idem_key:expr, $at_us:expr) => {{
        let (balance,): (i64,) = sqlx::query_as(
            "UPDATE accounts SET balance = balance + $2 WHERE id = $1 RETURNING balance",
        )
        .bind($account)
        .bind($back)
        .fetch_one(&mut *$tx)
        .await?;
        sqlx::query(
            "INSERT INTO credit_journal (id, account, kind, amount, refund, reservation, idempotency_key, at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind($account)
        .bind($kind)
        .bind($amount)
        .bind($refund)
        .bind($reservation)
        .bind($idem_key)
        .bind($at_us)
        .execute(&mut *$tx)
        .await?;
        balance
    }};
}

/// How a settlement ends a reservation.
#[derive(Clone, Copy)]
enum Release {
    Released,
    Expired,
}

impl Release {
    fn state(self) -> &'static str {
        match self {
            Release::Released => "released",
            Release::Expired => "expired",
        }
    }
    fn journal_kind(self) -> &'static str {
        match self {
            Release::Released => "release",
            Release::Expired => "expire",
        }
    }
}

impl Ledger {
    fn from_backend(backend: Backend) -> Ledger {
        let keys = Cache::builder()
            .max_capacity(KEY_CACHE_CAPACITY)
            .time_to_live(REVOCATION_BOUND)
            .support_invalidation_closures()
            .build();
        let accounts = Cache::builder()
            .max_capacity(ACCOUNT_CACHE_CAPACITY)
            .time_to_live(REVOCATION_BOUND)
            .build();
        let known_ids = Cache::builder()
            .max_capacity(KNOWN_ID_CAPACITY)
            .time_to_live(KNOWN_ID_TTL)
            .build();
        Ledger {
            inner: Arc::new(Inner {
                backend,
                keys,
                accounts,
                key_front: Front::new(KEY_CACHE_CAPACITY, REVOCATION_BOUND),
                account_front: Front::new(ACCOUNT_CACHE_CAPACITY, REVOCATION_BOUND),
                known_ids,
                queries: AtomicU64::new(0),
                lookups: AtomicU64::new(0),
                invalidations: AtomicU64::new(0),
            }),
        }
    }

    /// Opens (and migrates) a ledger. `postgres://…`/`postgresql://…` → PostgreSQL;
    /// `sqlite://PATH`, `sqlite:PATH` or a plain path → an SQLite file, created if
    /// missing, in WAL mode with `synchronous=FULL`, a 30 s busy timeout and
    /// `BEGIN IMMEDIATE` for every write.
    ///
    /// # Errors
    /// [`LedgerError::InvalidDatabase`] for an unusable location (never echoed),
    /// [`LedgerError::Database`] when it cannot be reached, [`LedgerError::Migrate`].
    pub async fn open(database: &str) -> Result<Ledger, LedgerError> {
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            let options: PgConnectOptions =
                database.parse().map_err(|_| LedgerError::InvalidDatabase {
                    reason: "not a valid postgres:// URL",
                })?;
            return Self::open_pg(options).await;
        }
        let path = database
            .strip_prefix("sqlite://")
            .or_else(|| database.strip_prefix("sqlite:"))
            .unwrap_or(database);
        if path.is_empty() || path.starts_with(":memory:") {
            return Err(LedgerError::InvalidDatabase {
                reason: "SQLite needs a file path (in-memory databases are not shared between connections)",
            });
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(LedgerError::open)?;
        SQLITE_MIGRATOR
            .run(&pool)
            .await
            .map_err(LedgerError::Migrate)?;
        Ok(Self::from_backend(Backend::Sqlite(pool)))
    }

    /// Opens (and migrates) a ledger in PostgreSQL schema `schema` (created if
    /// missing; lowercase letters, digits and `_`). Tests use a unique schema each.
    ///
    /// # Errors
    /// As [`Ledger::open`]; [`LedgerError::InvalidInput`] for a bad schema name.
    pub async fn open_postgres_schema(url: &str, schema: &str) -> Result<Ledger, LedgerError> {
        if !is_schema_name(schema) {
            return Err(LedgerError::InvalidInput {
                what: "schema",
                reason: "use 1-63 lowercase letters, digits or _, not starting with a digit",
            });
        }
        let options: PgConnectOptions = url.parse().map_err(|_| LedgerError::InvalidDatabase {
            reason: "not a valid postgres:// URL",
        })?;
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(LedgerError::open)?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Self::open_pg(options.options([("search_path", schema)])).await
    }

    async fn open_pg(options: PgConnectOptions) -> Result<Ledger, LedgerError> {
        // Reach the server once, with the longer start-up bound and a clear
        // error; the pool's own bound is the short per-request one.
        let first = tokio::time::timeout(
            PG_CONNECT_TIMEOUT,
            sqlx::PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| LedgerError::open(sqlx::Error::PoolTimedOut))?
        .map_err(LedgerError::open)?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(PG_MAX_CONNECTIONS)
            .acquire_timeout(PG_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        PG_MIGRATOR.run(&pool).await.map_err(LedgerError::Migrate)?;
        Ok(Self::from_backend(Backend::Postgres(pool)))
    }

    /// Database operations this handle has run since it was opened: one per
    /// read (a single statement, or a few in one call) and one per attempt of a
    /// write transaction. Tests use it to prove that a path touches no database
    /// (malformed keys) or touches it a bounded number of times (negative cache).
    pub fn db_queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }

    /// Database reads made to identify a caller: key lookups by
    /// [`Ledger::verify_key`] and account reads by [`Ledger::account_identity`]
    /// (cache misses only; background work such as expiring reservations is
    /// not counted here but in [`Ledger::db_queries`]).
    pub fn identity_lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// Closes the pool; later calls fail with an unavailable error.
    pub async fn close(&self) {
        match &self.inner.backend {
            Backend::Sqlite(p) => p.close().await,
            Backend::Postgres(p) => p.close().await,
        }
    }

    // ----- accounts -----------------------------------------------------------

    /// Creates an account (and its org if new). A `grant > 0` is booked as a
    /// [`GrantKind::Free`] grant in the same transaction.
    ///
    /// # Errors
    /// [`LedgerError::AlreadyExists`], [`LedgerError::InvalidInput`],
    /// [`LedgerError::InvalidAmount`] (grant < 0 or > 10^12), database errors.
    pub async fn create_account(&self, new: &NewAccount) -> Result<Account, LedgerError> {
        check_id("account id", &new.id)?;
        check_id("plan", &new.plan)?;
        let org = new.org.clone().unwrap_or_else(|| new.id.clone());
        check_id("org", &org)?;
        if new.grant != 0 {
            check_amount(new.grant)?;
        }
        let now = now_us();
        let created_at_us = new.created_at.map_or(now, |t| t.as_microsecond());
        let account = write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            sqlx::query(
                "INSERT INTO orgs (id, created_at_us) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&org)
            .bind(created_at_us)
            .execute(&mut *tx)
            .await?;
            let row: Option<AccountRow> = sqlx::query_as(
                "INSERT INTO accounts (id, org, plan, overrides, created_at_us, balance) \
                 VALUES ($1, $2, $3, '{}', $4, $5) ON CONFLICT (id) DO NOTHING \
                 RETURNING id, plan, org, created_at_us, overrides, balance",
            )
            .bind(&new.id)
            .bind(&org)
            .bind(&new.plan)
            .bind(created_at_us)
            .bind(new.grant)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Err(LedgerError::AlreadyExists {
                    what: "account",
                    id: redact(&new.id),
                });
            };
            if new.grant > 0 {
                sqlx::query(
                    "INSERT INTO credit_journal (id, account, kind, amount, grant_kind, reason, idempotency_key, at_us) \
                     VALUES ($1, $2, 'grant', $3, $4, $5, $6, $7)",
                )
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(&new.id)
                .bind(new.grant)
                .bind(GrantKind::Free.as_str())
                .bind("plan grant at account creation")
                .bind(CREATION_GRANT_KEY)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            account_from_row(row)
        })?;
        // A cached "unknown account" entry for this id must go.
        self.invalidate_account(&new.id).await;
        Ok(account)
    }

    /// The account, or `None`.
    ///
    /// # Errors
    /// Database errors; [`LedgerError::Corrupt`] for undecodable overrides.
    pub async fn account(&self, id: &str) -> Result<Option<Account>, LedgerError> {
        let row: Option<AccountRow> = read!(self, |db| {
            Ok(sqlx::query_as(
                "SELECT id, plan, org, created_at_us, overrides, balance FROM accounts WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(db)
            .await?)
        })?;
        row.map(account_from_row).transpose()
    }

    /// Who an account is, for deciding its requests without a key (the
    /// decision API by account): its plan, org, creation time and overrides,
    /// as a [`KeyIdentity`] with an empty `key_id` and app `default`. `None`
    /// for an unknown account.
    ///
    /// Cached in memory, positive and negative, for [`REVOCATION_BOUND`] in a
    /// bounded cache: a cached account costs no database read; an unknown id
    /// costs at most one read per id per bound (concurrent misses share it);
    /// ids that no account can have (empty, longer than 128 bytes) cost none.
    /// Plan and override changes made on this replica apply at once, made on
    /// another within the bound. The balance is not part of it (read
    /// [`Ledger::balance`]).
    ///
    /// # Errors
    /// Database errors; [`LedgerError::Corrupt`] for undecodable overrides.
    pub async fn account_identity(
        &self,
        id: &str,
    ) -> Result<Option<Arc<KeyIdentity>>, LedgerError> {
        if let Some(hit) = self.account_identity_now(id) {
            return Ok(hit);
        }
        if let Some(hit) = self.inner.accounts.get(id).await {
            self.inner.account_front.insert(id, &hit);
            if let Some(flag) = hit.claim_refresh() {
                self.refresh(Cached::Account, id, flag, hit.value.is_some());
            }
            return Ok(hit.value);
        }
        let load =
            || async { Ok::<_, LedgerError>(Loaded::now(self.load_account_identity(id).await?)) };
        let mut failed = None;
        let loaded = self
            .inner
            .accounts
            .optionally_get_with_by_ref(id, async {
                load().await.map_err(|e| failed = Some(e)).ok()
            })
            .await;
        match (loaded, failed) {
            (Some(v), _) => {
                self.inner.account_front.insert(id, &v);
                Ok(v.value)
            }
            (None, Some(e)) => Err(e),
            // The load this call waited on (another caller's) failed: try itself.
            (None, None) => load().await.map(|v| v.value),
        }
    }

    /// [`Ledger::account_identity`] without waiting: the answer when it is
    /// at hand (an id no account can have, or one read lately), `None` when
    /// only the cache behind or the database can tell (then call
    /// [`Ledger::account_identity`]). Lets a caller skip a future for the
    /// usual cached account.
    pub fn account_identity_now(&self, id: &str) -> Option<Option<Arc<KeyIdentity>>> {
        if check_id("account id", id).is_err() {
            return Some(None);
        }
        let hit = self.inner.account_front.get(id)?;
        if let Some(flag) = hit.refresh {
            self.refresh(Cached::Account, id, flag, hit.value.is_some());
        }
        Some(hit.value)
    }

    /// Reads who account `id` is from the database (see
    /// [`Ledger::account_identity`]).
    async fn load_account_identity(
        &self,
        id: &str,
    ) -> Result<Option<Arc<KeyIdentity>>, LedgerError> {
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(self.account(id).await?.map(|a| {
            Arc::new(KeyIdentity {
                key_id: String::new(),
                account: a.id,
                org: a.org,
                app: "default".to_owned(),
                plan: a.plan,
                account_created_at: a.created_at,
                overrides: a.overrides,
                derived: Default::default(),
            })
        }))
    }

    /// Reads a cached key (by id) or account again in the background, for
    /// the caller that took the entry's refresh `flag` (see
    /// [`REFRESH_AFTER`]); what it reads replaces the cached entry, unless an
    /// invalidation happened since the read began. On failure the flag is
    /// put back, so a later request tries again; the entry still expires at
    /// [`REVOCATION_BOUND`], and then a request reads the database itself
    /// and sees the error.
    ///
    /// Only what exists is read ahead (`known`): an id with no key or
    /// account is left to expire, flag kept, so a client sending ids that
    /// do not exist still costs at most one read per id per bound.
    fn refresh(&self, what: Cached, id: &str, flag: Arc<AtomicBool>, known: bool) {
        if !known {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            flag.store(false, Ordering::Release);
            return;
        };
        let ledger = self.clone();
        let id = id.to_owned();
        runtime.spawn(async move {
            let generation = ledger.inner.invalidations.load(Ordering::SeqCst);
            let at = tokio::time::Instant::now();
            let inner = &ledger.inner;
            let kept = match what {
                Cached::Key => match ledger.load_key(&id).await {
                    Ok(v) => {
                        let loaded = Loaded::read_at(v, at);
                        ledger
                            .keep_refreshed(generation, &id, loaded, &inner.keys, &inner.key_front)
                            .await;
                        true
                    }
                    Err(_) => false,
                },
                Cached::Account => match ledger.load_account_identity(&id).await {
                    Ok(v) => {
                        let loaded = Loaded::read_at(v, at);
                        ledger
                            .keep_refreshed(
                                generation,
                                &id,
                                loaded,
                                &inner.accounts,
                                &inner.account_front,
                            )
                            .await;
                        true
                    }
                    Err(_) => false,
                },
            };
            if !kept {
                flag.store(false, Ordering::Release);
            }
        });
    }

    /// Puts a refreshed entry in both caches; takes it out again if an
    /// invalidation (counted in `invalidations`) happened after `generation`
    /// was read, before the database read began: what was read may be older
    /// than the change. An invalidation that comes later removes it itself.
    async fn keep_refreshed<V: Clone + Send + Sync + 'static>(
        &self,
        generation: u64,
        id: &str,
        loaded: Loaded<V>,
        cache: &Cache<String, Loaded<V>>,
        front: &Front<V>,
    ) {
        cache.insert(id.to_owned(), loaded.clone()).await;
        front.insert(id, &loaded);
        if self.inner.invalidations.load(Ordering::SeqCst) != generation {
            front.remove(id);
            cache.invalidate(id).await;
            front.remove(id);
        }
    }

    /// Drops a cached account identity (both caches; the front again after
    /// moka, so that a reader that copied the old entry from moka meanwhile
    /// does not keep it).
    async fn invalidate_account(&self, id: &str) {
        self.inner.invalidations.fetch_add(1, Ordering::SeqCst);
        self.inner.account_front.remove(id);
        self.inner.accounts.invalidate(id).await;
        self.inner.account_front.remove(id);
    }

    /// Drops a cached key lookup (as [`Ledger::invalidate_account`]).
    async fn invalidate_key(&self, id: &str) {
        self.inner.invalidations.fetch_add(1, Ordering::SeqCst);
        self.inner.key_front.remove(id);
        self.inner.keys.invalidate(id).await;
        self.inner.key_front.remove(id);
    }

    /// The cached key lookup for `id`: the front, else moka (copied to the front).
    async fn cached_key(&self, id: &str) -> Option<CachedKey> {
        if let Some(hit) = self.inner.key_front.get(id) {
            if let Some(flag) = hit.refresh {
                self.refresh(Cached::Key, id, flag, hit.value.is_known());
            }
            return Some(hit.value);
        }
        let hit = self.inner.keys.get(id).await?;
        self.inner.key_front.insert(id, &hit);
        if let Some(flag) = hit.claim_refresh() {
            self.refresh(Cached::Key, id, flag, hit.value.is_known());
        }
        Some(hit.value)
    }

    /// Changes plan and/or overrides. Cached keys of the account on this replica
    /// see the change at once, other replicas within [`REVOCATION_BOUND`].
    ///
    /// # Errors
    /// [`LedgerError::NotFound`], [`LedgerError::InvalidInput`] (overrides not an
    /// object, bad plan), database errors.
    pub async fn update_account(
        &self,
        id: &str,
        change: &AccountChange,
    ) -> Result<Account, LedgerError> {
        if let Some(plan) = &change.plan {
            check_id("plan", plan)?;
        }
        let overrides = match &change.overrides {
            Some(v) if !v.is_object() => {
                return Err(LedgerError::InvalidInput {
                    what: "overrides",
                    reason: "must be a JSON object",
                });
            }
            Some(v) => Some(v.to_string()),
            None => None,
        };
        let row: Option<AccountRow> = write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let row = sqlx::query_as(
                "UPDATE accounts SET plan = COALESCE($2, plan), overrides = COALESCE($3, overrides) \
                 WHERE id = $1 RETURNING id, plan, org, created_at_us, overrides, balance",
            )
            .bind(id)
            .bind(change.plan.as_deref())
            .bind(overrides.as_deref())
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(row)
        })?;
        let account = account_from_row(row.ok_or_else(|| not_found("account", id))?)?;
        self.invalidate_account(&account.id).await;
        let owned = |v: &CachedKey, owner: &str| matches!(v, CachedKey::Known { identity, .. } if identity.account == owner);
        self.inner.key_front.remove_if(|v| owned(v, &account.id));
        let owner = account.id.clone();
        // Only fails when invalidation closures are not enabled, and they are.
        let _ = self
            .inner
            .keys
            .invalidate_entries_if(move |_, v| owned(&v.value, &owner));
        self.inner.key_front.remove_if(|v| owned(v, &account.id));
        Ok(account)
    }

    // ----- keys ---------------------------------------------------------------

    /// Creates a key for an app of the account (`"default"` when `app` is `None`;
    /// the app is created on first use). The returned key is the only copy.
    ///
    /// # Errors
    /// [`LedgerError::NotFound`] (account), [`LedgerError::InvalidInput`] (app
    /// name), [`LedgerError::Random`], database errors.
    pub async fn create_key(
        &self,
        account: &str,
        app: Option<&str>,
    ) -> Result<CreatedKey, LedgerError> {
        let app = app.unwrap_or("default");
        check_id("app", app)?;
        let generated = key::generate()?;
        let now = now_us();
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let exists: Option<(String,)> = sqlx::query_as("SELECT id FROM accounts WHERE id = $1")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(not_found("account", account));
            }
            sqlx::query(
                "INSERT INTO apps (account, name, created_at_us) VALUES ($1, $2, $3) \
                 ON CONFLICT (account, name) DO NOTHING",
            )
            .bind(account)
            .bind(app)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO api_keys (id, account, app, secret_sha256, created_at_us) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&generated.id)
            .bind(account)
            .bind(app)
            .bind(&generated.secret_sha256)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })?;
        // A cached "missing" entry for this id (astronomically unlikely) must go.
        self.invalidate_key(&generated.id).await;
        Ok(CreatedKey {
            prefix: format!("{}{}", key::KEY_PREFIX, generated.id),
            id: generated.id,
            key: generated.key,
        })
    }

    /// Keys of an account, oldest first (never the keys themselves).
    ///
    /// # Errors
    /// [`LedgerError::NotFound`] (account), database errors.
    pub async fn list_keys(&self, account: &str) -> Result<Vec<KeyInfo>, LedgerError> {
        let (exists, rows): (Option<(String,)>, Vec<KeyRow>) = read!(self, |db| {
            let exists = sqlx::query_as("SELECT id FROM accounts WHERE id = $1")
                .bind(account)
                .fetch_optional(db)
                .await?;
            let rows = sqlx::query_as(
                "SELECT id, account, app, created_at_us, revoked_at_us FROM api_keys \
                 WHERE account = $1 ORDER BY created_at_us, id",
            )
            .bind(account)
            .fetch_all(db)
            .await?;
            Ok((exists, rows))
        })?;
        if exists.is_none() {
            return Err(not_found("account", account));
        }
        Ok(rows.into_iter().map(key_info_from_row).collect())
    }

    /// Revokes a key (idempotent: revoking twice keeps the first time). Effective at
    /// once on this replica, within [`REVOCATION_BOUND`] on the others.
    ///
    /// # Errors
    /// [`LedgerError::NotFound`], database errors.
    pub async fn revoke_key(&self, key_id: &str) -> Result<KeyInfo, LedgerError> {
        let now = now_us();
        let row: Option<KeyRow> = write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let row = sqlx::query_as(
                "UPDATE api_keys SET revoked_at_us = COALESCE(revoked_at_us, $2) WHERE id = $1 \
                 RETURNING id, account, app, created_at_us, revoked_at_us",
            )
            .bind(key_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(row)
        })?;
        self.invalidate_key(key_id).await;
        row.map(key_info_from_row)
            .ok_or_else(|| not_found("key", key_id))
    }

    /// Checks a presented API key. Malformed keys and bad checksums are refused
    /// without touching the database; lookups (including "no such id") are cached
    /// for [`REVOCATION_BOUND`] in a bounded cache keyed by the public id, and
    /// concurrent misses for one id share one database read; the secret's
    /// SHA-256 is compared in constant time.
    ///
    /// # Errors
    /// Database errors only (an unknown key is `Ok(KeyCheck::Unknown)`).
    pub async fn verify_key(&self, presented: &str) -> Result<KeyCheck, LedgerError> {
        let Some(parsed) = key::parse(presented) else {
            return Ok(KeyCheck::Unknown);
        };
        let cached = match self.cached_key(parsed.id).await {
            Some(c) => c,
            None => {
                let mut failed = None;
                let loaded = self
                    .inner
                    .keys
                    .optionally_get_with_by_ref(parsed.id, async {
                        self.load_key(parsed.id)
                            .await
                            .map(Loaded::now)
                            .map_err(|e| failed = Some(e))
                            .ok()
                    })
                    .await;
                match (loaded, failed) {
                    (Some(c), _) => {
                        self.inner.key_front.insert(parsed.id, &c);
                        c.value
                    }
                    (None, Some(e)) => return Err(e),
                    // The read this call waited on (another caller's) failed.
                    (None, None) => self.load_key(parsed.id).await?,
                }
            }
        };
        Ok(Self::judge(&parsed, cached))
    }

    /// [`Ledger::verify_key`] without the database: the answer when it needs no
    /// query (a malformed key or bad checksum, or a key id in the cache), `None`
    /// when only a database read can tell. Callers use it to let known-good keys
    /// through before spending anything on the others (an abuse guard).
    pub async fn verify_key_cached(&self, presented: &str) -> Option<KeyCheck> {
        let Some(parsed) = key::parse(presented) else {
            return Some(KeyCheck::Unknown);
        };
        let cached = self.cached_key(parsed.id).await?;
        Some(Self::judge(&parsed, cached))
    }

    /// [`Ledger::verify_key_cached`] without waiting: the answer when it is
    /// at hand (a malformed key or bad checksum, or a key id read lately),
    /// `None` when the cache behind or the database must be asked (then call
    /// [`Ledger::verify_key_cached`] or [`Ledger::verify_key`]). Lets a caller
    /// skip a future for the usual cached key.
    pub fn verify_key_now(&self, presented: &str) -> Option<KeyCheck> {
        let Some(parsed) = key::parse(presented) else {
            return Some(KeyCheck::Unknown);
        };
        let hit = self.inner.key_front.get(parsed.id)?;
        if let Some(flag) = hit.refresh {
            self.refresh(Cached::Key, parsed.id, flag, hit.value.is_known());
        }
        Some(Self::judge(&parsed, hit.value))
    }

    /// Whether the presented key's public id belonged to a real key (valid or
    /// revoked) when it was last looked up, within the last hour: no database
    /// work. Such ids are a bounded set chosen by the operator, not by a
    /// client, so an abuse guard may let them be looked up (at most once per
    /// id per [`REVOCATION_BOUND`]) even from a client it otherwise blocks.
    pub fn key_id_known(&self, presented: &str) -> bool {
        match key::parse_id(presented) {
            Some(id) => self.inner.known_ids.contains_key(id),
            None => false,
        }
    }

    fn judge(parsed: &key::Parsed<'_>, cached: CachedKey) -> KeyCheck {
        match cached {
            CachedKey::Missing => KeyCheck::Unknown,
            CachedKey::Known {
                secret_sha256,
                revoked,
                identity,
            } => {
                if !key::hash_matches(&parsed.secret_sha256, &secret_sha256) {
                    KeyCheck::Unknown
                } else if revoked {
                    KeyCheck::Revoked {
                        key_id: identity.key_id.clone(),
                    }
                } else {
                    KeyCheck::Valid(identity)
                }
            }
        }
    }

    async fn load_key(&self, id: &str) -> Result<CachedKey, LedgerError> {
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        type Row = (
            String,
            Option<i64>,
            String,
            String,
            String,
            String,
            i64,
            String,
        );
        let row: Option<Row> = read!(self, |db| {
            Ok(sqlx::query_as(
                "SELECT k.secret_sha256, k.revoked_at_us, k.account, k.app, a.org, a.plan, \
                 a.created_at_us, a.overrides \
                 FROM api_keys k JOIN accounts a ON a.id = k.account WHERE k.id = $1",
            )
            .bind(id)
            .fetch_optional(db)
            .await?)
        })?;
        let Some((hash, revoked_at, account, app, org, plan, created_at_us, overrides)) = row
        else {
            return Ok(CachedKey::Missing);
        };
        let Some(secret_sha256) = key::decode_stored(&hash) else {
            return Ok(CachedKey::Missing);
        };
        self.inner.known_ids.insert(id.to_owned(), ()).await;
        Ok(CachedKey::Known {
            secret_sha256,
            revoked: revoked_at.is_some(),
            identity: Arc::new(KeyIdentity {
                key_id: id.to_owned(),
                account,
                org,
                app,
                plan,
                account_created_at: ts(created_at_us),
                overrides: parse_json("overrides", &overrides)?,
                derived: Default::default(),
            }),
        })
    }

    // ----- credits ------------------------------------------------------------

    /// Grants credits. The same `idempotency_key` (per account) grants once: a
    /// repeat changes nothing and returns the current balance.
    ///
    /// # Errors
    /// [`LedgerError::InvalidAmount`], [`LedgerError::NotFound`],
    /// [`LedgerError::InvalidInput`] (empty idempotency key), database errors.
    pub async fn grant(
        &self,
        account: &str,
        amount: i64,
        kind: GrantKind,
        reason: &str,
        idempotency_key: &str,
    ) -> Result<i64, LedgerError> {
        check_amount(amount)?;
        check_id("idempotency key", idempotency_key)?;
        let now = now_us();
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let exists: Option<(i64,)> =
                sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
                    .bind(account)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                return Err(not_found("account", account));
            }
            let inserted: Option<(String,)> = sqlx::query_as(
                "INSERT INTO credit_journal (id, account, kind, amount, grant_kind, reason, idempotency_key, at_us) \
                 VALUES ($1, $2, 'grant', $3, $4, $5, $6, $7) \
                 ON CONFLICT (account, idempotency_key) WHERE kind = 'grant' DO NOTHING RETURNING id",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(account)
            .bind(amount)
            .bind(kind.as_str())
            .bind(reason)
            .bind(idempotency_key)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let (balance,): (i64,) = if inserted.is_some() {
                sqlx::query_as(
                    "UPDATE accounts SET balance = balance + $2 WHERE id = $1 RETURNING balance",
                )
                .bind(account)
                .bind(amount)
                .fetch_one(&mut *tx)
                .await?
            } else {
                sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
                    .bind(account)
                    .fetch_one(&mut *tx)
                    .await?
            };
            tx.commit().await?;
            Ok(balance)
        })
    }

    /// Holds `amount` credits for at most `ttl` (then
    /// [`expire_reservations`](Ledger::expire_reservations) releases them). With an
    /// idempotency key, see the module docs for replays.
    ///
    /// # Errors
    /// [`LedgerError::InvalidAmount`], [`LedgerError::NotFound`] (account),
    /// [`LedgerError::InvalidInput`] (empty idempotency key), database errors.
    /// Not enough credits is `Ok(ReserveOutcome::Insufficient)`.
    pub async fn reserve(
        &self,
        account: &str,
        amount: i64,
        idempotency: Option<&Idempotency>,
        ttl: Duration,
    ) -> Result<ReserveOutcome, LedgerError> {
        self.reserve_with(account, amount, idempotency, ttl, IMMEDIATE, ATTEMPTS)
            .await
    }

    /// Teeth of test C5: [`Ledger::reserve`] with a *deferred* SQLite transaction and
    /// no retries, which surfaces `SQLITE_BUSY` under concurrent writers. Never use.
    #[doc(hidden)]
    pub async fn reserve_deferred_for_test(
        &self,
        account: &str,
        amount: i64,
        ttl: Duration,
    ) -> Result<ReserveOutcome, LedgerError> {
        self.reserve_with(account, amount, None, ttl, DEFERRED, 1)
            .await
    }

    async fn reserve_with(
        &self,
        account: &str,
        amount: i64,
        idempotency: Option<&Idempotency>,
        ttl: Duration,
        sqlite_begin: &'static str,
        attempts: u32,
    ) -> Result<ReserveOutcome, LedgerError> {
        check_amount(amount)?;
        if let Some(idem) = idempotency {
            check_id("idempotency key", &idem.key)?;
        }
        let ttl_us = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 4);
        write_tx!(self, sqlite_begin, attempts, |tx| {
            let now = now_us();
            let reservation = uuid::Uuid::now_v7().to_string();
            // Existence only; the balance check is the conditional UPDATE below.
            let exists: Option<(i64,)> =
                sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
                    .bind(account)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                return Err(not_found("account", account));
            }
            if let Some(idem) = idempotency {
                // First statement that writes: a concurrent holder of the same key
                // makes PostgreSQL wait here (holding no other lock) until it ends.
                let inserted: Option<(String,)> = sqlx::query_as(
                    "INSERT INTO idempotency (account, key, fingerprint, reservation, state, created_at_us) \
                     VALUES ($1, $2, $3, $4, 'reserved', $5) ON CONFLICT (account, key) DO NOTHING RETURNING key",
                )
                .bind(account)
                .bind(&idem.key)
                .bind(&idem.fingerprint)
                .bind(&reservation)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                if inserted.is_none() {
                    type Row = (String, String, Option<i64>, Option<String>, Option<Vec<u8>>);
                    let existing: Option<Row> = sqlx::query_as(
                        "SELECT fingerprint, state, status, content_type, body FROM idempotency \
                         WHERE account = $1 AND key = $2",
                    )
                    .bind(account)
                    .bind(&idem.key)
                    .fetch_optional(&mut *tx)
                    .await?;
                    return Ok(match existing {
                        // Released between our insert and this read: the caller retries.
                        None => ReserveOutcome::InProgress,
                        Some((fingerprint, ..)) if fingerprint != idem.fingerprint => {
                            ReserveOutcome::Mismatch
                        }
                        Some((_, state, status, content_type, body)) if state == "completed" => {
                            ReserveOutcome::Completed(StoredResponse {
                                status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                                content_type,
                                body: body.unwrap_or_default(),
                            })
                        }
                        Some(_) => ReserveOutcome::InProgress,
                    });
                }
            }
            let updated: Option<(i64,)> = sqlx::query_as(
                "UPDATE accounts SET balance = balance - $2 WHERE id = $1 AND balance >= $2 RETURNING balance",
            )
            .bind(account)
            .bind(amount)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((balance,)) = updated else {
                let (balance,): (i64,) =
                    sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
                        .bind(account)
                        .fetch_one(&mut *tx)
                        .await?;
                // Dropping the transaction rolls back the idempotency record.
                return Ok(ReserveOutcome::Insufficient { balance });
            };
            let idem_key = idempotency.map(|i| i.key.as_str());
            sqlx::query(
                "INSERT INTO reservations (id, account, amount, state, idempotency_key, created_at_us, expires_at_us) \
                 VALUES ($1, $2, $3, 'open', $4, $5, $6)",
            )
            .bind(&reservation)
            .bind(account)
            .bind(amount)
            .bind(idem_key)
            .bind(now)
            .bind(now.saturating_add(ttl_us))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO credit_journal (id, account, kind, amount, reservation, idempotency_key, at_us) \
                 VALUES ($1, $2, 'reserve', $3, $4, $5, $6)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(account)
            .bind(amount)
            .bind(&reservation)
            .bind(idem_key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(ReserveOutcome::Reserved {
                id: ReservationId(reservation),
                balance,
            })
        })
    }

    /// Teeth of tests C1 and C9: a deliberately wrong reservation that reads the
    /// balance, then writes `balance = read - amount` (read-modify-write). Under
    /// concurrency it loses updates and over-spends. Never use.
    #[doc(hidden)]
    pub async fn reserve_read_modify_write_for_test(
        &self,
        account: &str,
        amount: i64,
        ttl: Duration,
    ) -> Result<ReserveOutcome, LedgerError> {
        check_amount(amount)?;
        let (read_balance,): (i64,) = read!(self, |db| {
            Ok(sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
                .bind(account)
                .fetch_one(db)
                .await?)
        })?;
        if read_balance < amount {
            return Ok(ReserveOutcome::Insufficient {
                balance: read_balance,
            });
        }
        tokio::task::yield_now().await;
        let ttl_us = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 4);
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let now = now_us();
            let reservation = uuid::Uuid::now_v7().to_string();
            sqlx::query("UPDATE accounts SET balance = $2 WHERE id = $1")
                .bind(account)
                .bind(read_balance - amount)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO reservations (id, account, amount, state, created_at_us, expires_at_us) \
                 VALUES ($1, $2, $3, 'open', $4, $5)",
            )
            .bind(&reservation)
            .bind(account)
            .bind(amount)
            .bind(now)
            .bind(now.saturating_add(ttl_us))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO credit_journal (id, account, kind, amount, reservation, at_us) \
                 VALUES ($1, $2, 'reserve', $3, $4, $5)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(account)
            .bind(amount)
            .bind(&reservation)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(ReserveOutcome::Reserved {
                id: ReservationId(reservation.clone()),
                balance: read_balance - amount,
            })
        })
    }

    /// Charges `amount` (`0..=reserved`) of a reservation and returns the rest to
    /// the balance; stores `response` for idempotent replay. Returns the balance.
    ///
    /// # Errors
    /// [`LedgerError::CommitAboveReservation`], [`LedgerError::InvalidAmount`]
    /// (negative), [`LedgerError::ReservationSettled`], [`LedgerError::NotFound`],
    /// database errors. On any error nothing changed.
    pub async fn commit(
        &self,
        reservation: ReservationId,
        amount: i64,
        response: Option<&StoredResponse>,
    ) -> Result<i64, LedgerError> {
        self.commit_with_events(reservation, amount, response, CommitEvents::default())
            .await
    }

    /// [`Ledger::commit`], writing the events `events` asks for into the outbox
    /// *in the same transaction* as the charge: a charge and its events are
    /// durable together or not at all (nothing is lost to a `kill -9` between
    /// them). Returns the balance.
    ///
    /// # Errors
    /// As [`Ledger::commit`].
    pub async fn commit_with_events(
        &self,
        reservation: ReservationId,
        amount: i64,
        response: Option<&StoredResponse>,
        events: CommitEvents,
    ) -> Result<i64, LedgerError> {
        if !(0..=MAX_AMOUNT).contains(&amount) {
            return Err(LedgerError::InvalidAmount { amount });
        }
        let id = reservation.0.as_str();
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let now = now_us();
            let row: Option<(String, i64, String, Option<String>)> = sqlx::query_as(
                "SELECT account, amount, state, idempotency_key FROM reservations WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((account, reserved, _, idem_key)) = row else {
                return Err(not_found("reservation", id));
            };
            if amount > reserved {
                return Err(LedgerError::CommitAboveReservation { reserved, amount });
            }
            let settled: Option<(i64,)> = sqlx::query_as(
                "UPDATE reservations SET state = 'committed', committed = $2, settled_at_us = $3 \
                 WHERE id = $1 AND state = 'open' RETURNING amount",
            )
            .bind(id)
            .bind(amount)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if settled.is_none() {
                return Err(LedgerError::ReservationSettled);
            }
            let refund = reserved - amount;
            let balance = settle_journal!(
                tx,
                &account,
                refund,
                "commit",
                amount,
                refund,
                id,
                idem_key.as_deref(),
                now
            );
            if idem_key.is_some() {
                sqlx::query(
                    "UPDATE idempotency SET state = 'completed', status = $2, content_type = $3, body = $4 \
                     WHERE reservation = $1",
                )
                .bind(id)
                .bind(response.map(|r| i64::from(r.status)))
                .bind(response.and_then(|r| r.content_type.as_deref()))
                .bind(response.map(|r| r.body.as_slice()))
                .execute(&mut *tx)
                .await?;
            }
            if events.charged && amount > 0 {
                let data = serde_json::json!({
                    "reservation": id,
                    "amount": amount,
                    "balance": balance,
                    "idempotency_key": idem_key,
                });
                insert_event!(&mut *tx, &account, "credits_charged", data, now)?;
            }
            if let Some(threshold) = events.low_below
                && balance < threshold
                && balance + amount >= threshold
            {
                let data = serde_json::json!({ "balance": balance, "threshold": threshold });
                insert_event!(&mut *tx, &account, "credits_low", data, now)?;
            }
            tx.commit().await?;
            Ok(balance)
        })
    }

    /// Returns a reservation's credits to the balance; its idempotency key (if
    /// any) may reserve again. Returns the balance.
    ///
    /// # Errors
    /// [`LedgerError::ReservationSettled`], [`LedgerError::NotFound`], database
    /// errors.
    pub async fn release(&self, reservation: ReservationId) -> Result<i64, LedgerError> {
        self.settle_release(&reservation.0, Release::Released).await
    }

    async fn settle_release(&self, id: &str, how: Release) -> Result<i64, LedgerError> {
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            let now = now_us();
            let settled: Option<(String, i64, Option<String>)> = sqlx::query_as(
                "UPDATE reservations SET state = $2, settled_at_us = $3 \
                 WHERE id = $1 AND state = 'open' RETURNING account, amount, idempotency_key",
            )
            .bind(id)
            .bind(how.state())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((account, amount, idem_key)) = settled else {
                let exists: Option<(String,)> =
                    sqlx::query_as("SELECT id FROM reservations WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match exists {
                    Some(_) => LedgerError::ReservationSettled,
                    None => not_found("reservation", id),
                });
            };
            let balance = settle_journal!(
                tx,
                &account,
                amount,
                how.journal_kind(),
                amount,
                0_i64,
                id,
                idem_key.as_deref(),
                now
            );
            if idem_key.is_some() {
                sqlx::query("DELETE FROM idempotency WHERE reservation = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(balance)
        })
    }

    /// Releases every open reservation whose TTL has passed; returns how many.
    /// Run it periodically (the server does, every second or so).
    ///
    /// # Errors
    /// Database errors.
    pub async fn expire_reservations(&self) -> Result<u64, LedgerError> {
        let mut expired = 0u64;
        loop {
            let now = now_us();
            let due: Vec<(String,)> = read!(self, |db| {
                Ok(sqlx::query_as(
                    "SELECT id FROM reservations WHERE state = 'open' AND expires_at_us <= $1 \
                     ORDER BY expires_at_us LIMIT $2",
                )
                .bind(now)
                .bind(EXPIRY_BATCH)
                .fetch_all(db)
                .await?)
            })?;
            let batch = due.len();
            for (id,) in due {
                match self.settle_release(&id, Release::Expired).await {
                    Ok(_) => expired += 1,
                    // Committed or released meanwhile: that outcome stands.
                    Err(LedgerError::ReservationSettled) => {}
                    Err(e) => return Err(e),
                }
            }
            if (batch as i64) < EXPIRY_BATCH {
                return Ok(expired);
            }
        }
    }

    /// Deletes completed idempotency records created more than `retention` ago;
    /// returns how many. A request retried with such a key after that is a new
    /// request (and charged again), so `retention` must exceed the longest time a
    /// client keeps retrying (the server's default is 24 hours). Records of open
    /// reservations are never pruned (settling them removes or completes them).
    ///
    /// # Errors
    /// Database errors.
    pub async fn prune_idempotency(&self, retention: Duration) -> Result<u64, LedgerError> {
        let cutoff =
            now_us().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
        let mut pruned = 0u64;
        loop {
            let deleted = write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
                let done = sqlx::query(
                    "DELETE FROM idempotency WHERE (account, key) IN \
                     (SELECT account, key FROM idempotency \
                      WHERE state = 'completed' AND created_at_us < $1 LIMIT $2)",
                )
                .bind(cutoff)
                .bind(EXPIRY_BATCH)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            })?;
            pruned += deleted;
            if deleted < EXPIRY_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }

    /// The stored balance.
    ///
    /// # Errors
    /// [`LedgerError::NotFound`], database errors.
    pub async fn balance(&self, account: &str) -> Result<i64, LedgerError> {
        let row: Option<(i64,)> = read!(self, |db| {
            Ok(sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
                .bind(account)
                .fetch_optional(db)
                .await?)
        })?;
        row.map(|(b,)| b)
            .ok_or_else(|| not_found("account", account))
    }

    /// Recomputes the account's credits from the journal rows (one statement, one
    /// snapshot) beside the stored balance; see [`Audit::is_consistent`].
    ///
    /// # Errors
    /// [`LedgerError::NotFound`], database errors.
    pub async fn audit(&self, account: &str) -> Result<Audit, LedgerError> {
        type Row = (i64, i64, i64, i64, i64, i64);
        let row: Option<Row> = read!(self, |db| {
            Ok(sqlx::query_as(
                "SELECT a.balance, \
                 CAST(COALESCE((SELECT SUM(amount) FROM credit_journal WHERE account = $1 AND kind = 'grant'), 0) AS BIGINT), \
                 CAST(COALESCE((SELECT SUM(amount) FROM credit_journal WHERE account = $1 AND kind = 'commit'), 0) AS BIGINT), \
                 CAST(COALESCE((SELECT SUM(amount) FROM credit_journal WHERE account = $1 AND kind = 'reserve'), 0) AS BIGINT), \
                 CAST(COALESCE((SELECT SUM(amount + refund) FROM credit_journal WHERE account = $1 \
                                AND kind IN ('commit', 'release', 'expire')), 0) AS BIGINT), \
                 CAST(COALESCE((SELECT SUM(amount) FROM reservations WHERE account = $1 AND state = 'open'), 0) AS BIGINT) \
                 FROM accounts a WHERE a.id = $1",
            )
            .bind(account)
            .fetch_optional(db)
            .await?)
        })?;
        let (balance, grants, committed, reserved, settled, open_table) =
            row.ok_or_else(|| not_found("account", account))?;
        Ok(Audit {
            grants,
            balance,
            committed,
            open_reserved: reserved - settled,
            open_reservations_table: open_table,
        })
    }

    // ----- events -------------------------------------------------------------

    /// Appends an event to the outbox.
    ///
    /// # Errors
    /// [`LedgerError::InvalidInput`] (empty kind), database errors.
    pub async fn record_event(&self, event: &NewEvent) -> Result<(), LedgerError> {
        check_id("event kind", &event.kind)?;
        write_tx!(self, IMMEDIATE, ATTEMPTS, |tx| {
            insert_event!(
                &mut *tx,
                event.account.as_deref(),
                &event.kind,
                event.data,
                now_us()
            )?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Events, oldest first, optionally of one account and at or after `since`;
    /// at most `limit` (capped at 1000).
    ///
    /// # Errors
    /// Database errors, [`LedgerError::Corrupt`].
    pub async fn events(
        &self,
        account: Option<&str>,
        since: Option<jiff::Timestamp>,
        limit: u32,
    ) -> Result<Vec<Event>, LedgerError> {
        let since_us = since.map_or(i64::MIN, |t| t.as_microsecond());
        let limit = i64::from(limit.min(1000));
        let rows: Vec<(String, i64, Option<String>, String, String)> = read!(self, |db| {
            Ok(sqlx::query_as(
                "SELECT id, at_us, account, kind, data FROM events \
                 WHERE ($1 IS NULL OR account = $1) AND at_us >= $2 ORDER BY at_us, id LIMIT $3",
            )
            .bind(account)
            .bind(since_us)
            .bind(limit)
            .fetch_all(db)
            .await?)
        })?;
        rows.into_iter()
            .map(|(id, at_us, account, kind, data)| {
                Ok(Event {
                    id,
                    at: ts(at_us),
                    account,
                    kind,
                    data: parse_json("event data", &data)?,
                })
            })
            .collect()
    }

    /// Runs a statement directly (tests: dumps, integrity checks, fault injection).
    #[doc(hidden)]
    pub async fn execute_for_test(&self, sql: &str) -> Result<u64, LedgerError> {
        let sql = sql.to_owned();
        read!(self, |db| {
            Ok(sqlx::query(AssertSqlSafe(sql.clone()))
                .execute(db)
                .await?
                .rows_affected())
        })
    }

    /// Runs a query returning one text column per row (tests: dumps, checks).
    #[doc(hidden)]
    pub async fn query_strings_for_test(&self, sql: &str) -> Result<Vec<String>, LedgerError> {
        let sql = sql.to_owned();
        let rows: Vec<(String,)> = read!(self, |db| {
            Ok(sqlx::query_as(AssertSqlSafe(sql.clone()))
                .fetch_all(db)
                .await?)
        })?;
        Ok(rows.into_iter().map(|(s,)| s).collect())
    }
}

#[cfg(test)]
mod front_tests {
    use super::{FRONT_SHARDS, Front, Loaded, REFRESH_AFTER, REVOCATION_BOUND};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    impl<V: Clone> Front<V> {
        fn value(&self, key: &str) -> Option<V> {
            self.get(key).map(|hit| hit.value)
        }
    }

    #[test]
    fn an_entry_past_refresh_after_is_handed_to_one_refresher_at_a_time() {
        let f: Front<u32> = Front::new(100, REVOCATION_BOUND);
        f.insert("young", &Loaded::now(1));
        let hit = f.get("young").expect("cached");
        assert!(hit.refresh.is_none(), "a young entry is not read again");
        let read = tokio::time::Instant::now() - REFRESH_AFTER - Duration::from_millis(10);
        f.insert("old", &Loaded::read_at(2, read));
        let first = f.get("old").expect("still within the bound");
        assert_eq!(first.value, 2);
        let flag = first.refresh.expect("the first caller reads it again");
        assert!(
            f.get("old").expect("cached").refresh.is_none(),
            "only one caller at a time"
        );
        // A failed refresh puts the flag back: the next caller tries again.
        flag.store(false, Ordering::Release);
        assert!(f.get("old").expect("cached").refresh.is_some());
    }

    #[test]
    fn entries_expire_with_the_time_they_were_loaded() {
        let f: Front<u32> = Front::new(100, Duration::from_millis(200));
        f.insert("a", &Loaded::now(1));
        assert_eq!(f.value("a"), Some(1));
        assert_eq!(f.value("b"), None);
        // Loaded long ago (as a moka entry near its end): served only for
        // what is left of its TTL, and not kept at all once past it.
        let old = Loaded::read_at(2, tokio::time::Instant::now() - Duration::from_millis(150));
        f.insert("b", &old);
        assert_eq!(f.value("b"), Some(2));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(f.value("b"), None);
        assert_eq!(f.value("a"), Some(1));
        let expired = Loaded::read_at(3, tokio::time::Instant::now() - Duration::from_millis(200));
        f.insert("c", &expired);
        assert_eq!(f.value("c"), None);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(f.value("a"), None);
    }

    #[test]
    fn remove_and_remove_if_drop_entries() {
        let f: Front<u32> = Front::new(100, Duration::from_secs(60));
        for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
            f.insert(k, &Loaded::now(v));
        }
        f.remove("a");
        assert_eq!(f.value("a"), None);
        f.remove_if(|v| *v == 2);
        assert_eq!((f.value("b"), f.value("c")), (None, Some(3)));
    }

    #[test]
    fn size_stays_bounded() {
        let f: Front<u32> = Front::new(64, Duration::from_secs(60));
        for i in 0..10_000u32 {
            f.insert(&format!("key-{i}"), &Loaded::now(i));
            assert!(f.len() <= 64, "{} entries", f.len());
        }
        // The last one written is there.
        assert_eq!(f.value("key-9999"), Some(9999));
        let small: Front<u32> = Front::new(1, Duration::from_secs(60));
        for i in 0..(FRONT_SHARDS as u32 * 3) {
            small.insert(&i.to_string(), &Loaded::now(i));
        }
        assert!(small.len() <= FRONT_SHARDS);
    }
}

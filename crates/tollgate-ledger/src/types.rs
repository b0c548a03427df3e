//! Values that go in and out of the [`Ledger`](crate::Ledger).

use serde::Serialize;

use crate::Secret;

/// An account to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAccount {
    /// Account id (1–128 printable characters, no whitespace).
    pub id: String,
    /// Plan name.
    pub plan: String,
    /// Org; `None` = an org of its own, named like the account.
    pub org: Option<String>,
    /// Creation time; `None` = now. Limits rolled out "for accounts created after"
    /// a date compare with it.
    pub created_at: Option<jiff::Timestamp>,
    /// Credits granted at creation (the plan's one-time free grant), booked in the
    /// same transaction; 0 for none.
    pub grant: i64,
}

/// A stored account.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Account {
    /// Account id.
    pub id: String,
    /// Plan name.
    pub plan: String,
    /// Org (the account id unless given at creation).
    pub org: String,
    /// Creation time.
    pub created_at: jiff::Timestamp,
    /// Per-account overrides, a JSON object (`{}` by default).
    pub overrides: serde_json::Value,
    /// Credit balance (whole credits), excluding open reservations.
    pub balance: i64,
}

/// A change to an account; `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountChange {
    /// New plan.
    pub plan: Option<String>,
    /// New overrides (must be a JSON object; replaces the old one).
    pub overrides: Option<serde_json::Value>,
}

/// A key just created: the only time the key itself is available.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// Key id (the public 12-character part).
    pub id: String,
    /// The full key. Prints as `***`.
    pub key: Secret,
    /// `tg_` + id: shown in listings, safe to log.
    pub prefix: String,
}

/// A key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyInfo {
    /// Key id.
    pub id: String,
    /// `tg_` + id.
    pub prefix: String,
    /// Account the key belongs to.
    pub account: String,
    /// App of the account the key belongs to (`"default"` if none was given).
    pub app: String,
    /// Creation time.
    pub created_at: jiff::Timestamp,
    /// Whether the key was revoked.
    pub revoked: bool,
}

/// The outcome of [`Ledger::verify_key`](crate::Ledger::verify_key).
#[derive(Debug, Clone, PartialEq)]
pub enum KeyCheck {
    /// A live key, and who it belongs to (shared with the key cache: no copy).
    Valid(std::sync::Arc<KeyIdentity>),
    /// A real key that was revoked (403).
    Revoked {
        /// Its id.
        key_id: String,
    },
    /// Malformed, wrong checksum, unknown id or wrong secret (401). These cases are
    /// deliberately not told apart.
    Unknown,
}

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyIdentity {
    /// Key id.
    pub key_id: String,
    /// Account.
    pub account: String,
    /// Org of the account.
    pub org: String,
    /// App of the key.
    pub app: String,
    /// Plan of the account.
    pub plan: String,
    /// When the account was created.
    pub account_created_at: jiff::Timestamp,
    /// The account's overrides (JSON object).
    pub overrides: serde_json::Value,
    /// What a user of the ledger derives from this identity once and keeps
    /// with it while the ledger's cache shares it (the server: the account
    /// as a ready header value). Empty when made; see [`Derived`].
    #[serde(skip)]
    pub derived: Derived,
}

/// A value derived once from a [`KeyIdentity`] and kept with it, of a type
/// the ledger does not know (it has no HTTP types): made by the first
/// [`Derived::get_or_init`] and shared by every holder of the identity's
/// `Arc`. A cache only: never compared (identities equal whatever it holds),
/// serialized or printed, and a clone starts empty.
#[derive(Default)]
pub struct Derived(std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>);

impl Derived {
    /// The kept value, made by `init` if there is none yet; `None` when a
    /// value of another type is kept.
    pub fn get_or_init<T: std::any::Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> T,
    ) -> Option<&T> {
        self.0.get_or_init(|| Box::new(init())).downcast_ref()
    }
}

impl Clone for Derived {
    fn clone(&self) -> Derived {
        Derived::default()
    }
}

impl PartialEq for Derived {
    fn eq(&self, _: &Derived) -> bool {
        true
    }
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Derived(..)")
    }
}

/// Why credits were granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// The plan's one-time free grant.
    Free,
    /// Credits bought (top-up).
    Purchase,
    /// A periodic plan allowance.
    Allowance,
    /// A manual correction by an operator.
    Adjustment,
}

impl GrantKind {
    /// The name stored in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Free => "free",
            GrantKind::Purchase => "purchase",
            GrantKind::Allowance => "allowance",
            GrantKind::Adjustment => "adjustment",
        }
    }
}

/// Id of a credit reservation (a UUID v7 string).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ReservationId(pub String);

impl std::fmt::Display for ReservationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An `Idempotency-Key` with the fingerprint of the request that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The caller's idempotency key (scoped to the account).
    pub key: String,
    /// A hash of method, path and body, computed by the server: the same key with a
    /// different fingerprint is [`ReserveOutcome::Mismatch`].
    pub fingerprint: String,
}

/// The outcome of [`Ledger::reserve`](crate::Ledger::reserve).
#[derive(Debug, Clone, PartialEq)]
pub enum ReserveOutcome {
    /// Credits are held; commit or release them.
    Reserved {
        /// The reservation.
        id: ReservationId,
        /// Balance after the reservation.
        balance: i64,
    },
    /// Not enough credits (402); nothing changed.
    Insufficient {
        /// The current balance.
        balance: i64,
    },
    /// The same idempotency key holds an open reservation (409, retry later).
    InProgress,
    /// The same idempotency key was already committed: replay this response, charge
    /// nothing.
    Completed(StoredResponse),
    /// The same idempotency key was used for a different request (422).
    Mismatch,
}

/// A response kept for idempotent replay. A commit without a response replays as
/// status 200 with an empty body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Body (the server stores at most 64 KiB).
    pub body: Vec<u8>,
}

/// An account's credits recomputed from the journal, with the stored balance.
///
/// Invariant: `grants == balance + committed + open_reserved`, and the journal's
/// open reservations equal the open rows of the reservations table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Audit {
    /// Σ granted credits (journal).
    pub grants: i64,
    /// The stored (materialised) balance.
    pub balance: i64,
    /// Σ committed charges (journal).
    pub committed: i64,
    /// Σ credits of reservations not yet settled (journal).
    pub open_reserved: i64,
    /// Σ credits of reservations in state `open` (reservations table).
    pub open_reservations_table: i64,
}

impl Audit {
    /// `grants - (balance + committed + open_reserved)`: 0 when consistent.
    pub fn drift(&self) -> i64 {
        self.grants - (self.balance + self.committed + self.open_reserved)
    }

    /// True when the invariant holds exactly.
    pub fn is_consistent(&self) -> bool {
        self.drift() == 0 && self.open_reserved == self.open_reservations_table && self.balance >= 0
    }
}

/// An event to put in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Account concerned, if any.
    pub account: Option<String>,
    /// `soft_limit_crossed`, `limit_rejections`, `credits_low`, `credits_exhausted`, `credits_charged`,
    /// `key_created`, `key_revoked`.
    pub kind: String,
    /// Details (JSON).
    pub data: serde_json::Value,
}

/// An event from the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Event id (UUID v7; time-ordered, the dedupe key for consumers).
    pub id: String,
    /// When it was recorded.
    pub at: jiff::Timestamp,
    /// Account concerned, if any.
    pub account: Option<String>,
    /// Kind (see [`NewEvent::kind`]).
    pub kind: String,
    /// Details.
    pub data: serde_json::Value,
}

/// Events [`Ledger::commit_with_events`](crate::Ledger::commit_with_events)
/// writes in the charge's own transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitEvents {
    /// Write a `credits_charged` event (`reservation`, `amount`, `balance`,
    /// `idempotency_key`) for every charge above zero.
    pub charged: bool,
    /// Write a `credits_low` event (`balance`, `threshold`) when this charge
    /// takes the balance below this threshold.
    pub low_below: Option<i64>,
}

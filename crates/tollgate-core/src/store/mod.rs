//! Where counters live: the [`Store`] trait and its in-memory implementation.
//!
//! The engine hands a store *every* limit of a request at once, as a slice of
//! [`Check`]s, and the store decides them together: the request is admitted
//! only if every blocking check admits, and then (and only then) each check
//! that admits has its cost taken. A rejected request consumes nothing. This
//! shape is what lets a Redis store decide a request in one script call (one
//! round trip), and the in-memory store in one pass under per-counter locks.

pub mod memory;

/// Store conformance suite: one behaviour, every store.
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;

use std::future::Future;
use std::time::Duration;

use crate::algorithm::Evaluation;
use crate::algorithm::gcra::GcraRate;
use crate::algorithm::sliding_window::SlidingWindow;
use crate::clock::Nanos;
use crate::error::StoreError;

pub use memory::MemoryStore;

/// The identity of one counter: a 128-bit hash of the limit name and the
/// scope values (the strings themselves are never stored). The high 64 bits
/// depend on the scope values only, so the counters of limits whose scopes
/// have the same values share them; the in-memory store keeps those counters
/// in one entry. The low 64 bits tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CounterKey(pub u128);

/// The numbers a store needs to evaluate one counter. Calendar windows come
/// with their window end already resolved (the engine knows the time zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    /// Token bucket.
    Gcra(GcraRate),
    /// Sliding window.
    Sliding(SlidingWindow),
    /// Calendar window: N and the end of the current window.
    Calendar {
        /// N.
        limit: u64,
        /// End of the window containing `now`.
        end: Nanos,
    },
    /// Concurrency: N and the lease TTL.
    Concurrency {
        /// N.
        limit: u64,
        /// Lease time to live.
        ttl: Duration,
    },
}

/// One limit of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// The counter.
    pub key: CounterKey,
    /// Its numbers.
    pub params: Params,
    /// Units this request takes.
    pub cost: u64,
    /// Whether a refusal by this check refuses the whole request (enforced
    /// limits whose action is to reject). Non-blocking checks (soft, shadow,
    /// forward-with-marker) are evaluated and take their cost only when they
    /// admit and the request is admitted.
    pub blocking: bool,
}

/// A counter store. Implementations must make [`Store::decide`] atomic over
/// all its checks (no other decision may interleave between reading and
/// writing any of them), or document the bound on what can go wrong.
pub trait Store: Send + Sync + 'static {
    /// Decides all `checks` of one request at `now`, writing one evaluation per
    /// check into `out` (same order, `out.len() >= checks.len()`). Returns
    /// whether the request is admitted. Concurrency checks that admit record a
    /// lease with id `lease`.
    ///
    /// # Errors
    /// The store cannot decide (unreachable, timed out, full); nothing was consumed.
    fn decide(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Releases the lease `lease` on each concurrency counter in `keys`.
    ///
    /// # Errors
    /// The store cannot be reached; the leases then expire by their TTL.
    fn release(
        &self,
        now: Nanos,
        keys: &[CounterKey],
        lease: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The in-memory store that limits with `on_store_error = "local"` are
    /// decided on, at their local share, when [`Store::decide`] fails. `None`
    /// (the default): such limits fail closed. A store that offers one must
    /// also release leases on it (a lease taken locally is released there).
    fn local_fallback(&self) -> Option<&MemoryStore> {
        None
    }

    /// The in-memory store this store decides on, when it is one (or wraps
    /// one with nothing else to do): the engine then decides synchronously,
    /// without [`Store::decide`]'s future. `None` (the default): every
    /// decision goes through [`Store::decide`].
    fn as_memory(&self) -> Option<&MemoryStore> {
        None
    }
}

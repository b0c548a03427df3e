//! The counter store the server runs on, chosen at startup (`--store`).
//!
//! An enum rather than a boxed trait object, so the engine stays generic and
//! no future is boxed per decision.
//!
//! A shared (Redis) store comes with a local in-memory fallback: when Redis
//! cannot decide, limits with `on_store_error = "local"` are decided on it at
//! their `local_share` (see `docs/policy.md`). Its counters live only in this
//! process, are swept like the in-memory store's, and are simply left behind
//! once Redis answers again.

use tollgate_core::algorithm::Evaluation;
use tollgate_core::{Check, CounterKey, MemoryStore, Nanos, Store, StoreError};

/// Every store the server can use.
#[derive(Debug)]
pub enum AnyStore {
    /// In process memory (one replica).
    Memory(MemoryStore),
    /// Redis or Redis Cluster, shared by replicas, and the local fallback.
    Redis(tollgate_redis::RedisStore, MemoryStore),
}

/// The kind of a store error (`timeout`, `connection`, `oom`, `circuit_open`,
/// …): the `kind` label of `store_errors_total`.
pub use tollgate_redis::error_kind;

/// Seed of counter-key hashing when replicas share a store and no
/// `TOLLGATE_STORE_SECRET` is set: every replica must derive the same Redis
/// key for the same counter (ASCII of tollgate). Public, hence the warning at
/// startup; see [`crate::config::StoreSecret`].
pub const SHARED_KEY_SEED: u64 = 0x746f_6c6c_6761_7465;

impl AnyStore {
    /// A Redis store, with a local fallback holding at most `max_counters`.
    pub fn redis(store: tollgate_redis::RedisStore, max_counters: usize) -> AnyStore {
        AnyStore::Redis(store, MemoryStore::new(max_counters))
    }

    /// Drops idle counters (in memory and in the local fallback; Redis keys
    /// expire by TTL).
    pub fn sweep(&self, now: Nanos) {
        match self {
            AnyStore::Memory(m) | AnyStore::Redis(_, m) => {
                m.sweep(now);
            }
        }
    }

    /// Whether the store takes calls now, without waiting: `false` while the
    /// Redis store's circuit breaker is open. The `store_unavailable` gauge.
    pub fn is_available(&self) -> bool {
        match self {
            AnyStore::Memory(_) => true,
            AnyStore::Redis(r, _) => r.is_available(),
        }
    }

    /// Whether the store answers (always, in memory).
    pub async fn is_ready(&self) -> bool {
        match self {
            AnyStore::Memory(_) => true,
            AnyStore::Redis(r, _) => r.is_ready().await,
        }
    }

    /// Live counters held in this process (the local fallback's, with Redis).
    pub fn live_counters(&self) -> usize {
        match self {
            AnyStore::Memory(m) | AnyStore::Redis(_, m) => m.len(),
        }
    }
}

impl Store for AnyStore {
    async fn decide(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(m) => m.decide_now(now, checks, lease, out),
            // Boxed: the Redis future is large, and every caller's future
            // (the proxy's, `/v1/check`'s) would carry its size otherwise.
            AnyStore::Redis(r, _) => Box::pin(r.decide(now, checks, lease, out)).await,
        }
    }

    async fn release(&self, now: Nanos, keys: &[CounterKey], lease: u64) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => {
                m.release_now(now, keys, lease);
                Ok(())
            }
            AnyStore::Redis(r, local) => {
                // A lease may have been taken on the fallback: free it there too.
                local.release_now(now, keys, lease);
                r.release(now, keys, lease).await
            }
        }
    }

    fn local_fallback(&self) -> Option<&MemoryStore> {
        match self {
            AnyStore::Memory(_) => None,
            AnyStore::Redis(_, local) => Some(local),
        }
    }

    fn as_memory(&self) -> Option<&MemoryStore> {
        match self {
            AnyStore::Memory(m) => Some(m),
            AnyStore::Redis(..) => None,
        }
    }
}

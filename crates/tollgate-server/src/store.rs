//! The counter store the server runs on, chosen at startup (`--store`).
//!
//! An enum rather than a boxed trait object, so the engine stays generic and
//! no future is boxed per decision.

use tollgate_core::algorithm::Evaluation;
use tollgate_core::{Check, CounterKey, MemoryStore, Nanos, Store, StoreError};

/// Every store the server can use.
#[derive(Debug)]
pub enum AnyStore {
    /// In process memory (one replica).
    Memory(MemoryStore),
    /// Redis or Redis Cluster, shared by replicas.
    Redis(tollgate_redis::RedisStore),
}

/// Seed of counter-key hashing when replicas share a store: every replica
/// must derive the same Redis key for the same counter (ASCII of tollgate).
pub const SHARED_KEY_SEED: u64 = 0x746f_6c6c_6761_7465;

impl AnyStore {
    /// Drops idle counters (in-memory store only; Redis keys expire by TTL).
    pub fn sweep(&self, now: Nanos) {
        match self {
            AnyStore::Memory(m) => {
                m.sweep(now);
            }
            AnyStore::Redis(_) => {}
        }
    }

    /// Whether the store answers (always, in memory).
    pub async fn is_ready(&self) -> bool {
        match self {
            AnyStore::Memory(_) => true,
            AnyStore::Redis(r) => r.is_ready().await,
        }
    }

    /// Live counters held in this process.
    pub fn live_counters(&self) -> usize {
        match self {
            AnyStore::Memory(m) => m.len(),
            AnyStore::Redis(_) => 0,
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
            AnyStore::Redis(r) => r.decide(now, checks, lease, out).await,
        }
    }

    async fn release(&self, now: Nanos, keys: &[CounterKey], lease: u64) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => {
                m.release_now(now, keys, lease);
                Ok(())
            }
            AnyStore::Redis(r) => r.release(now, keys, lease).await,
        }
    }
}

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
}

impl AnyStore {
    /// Drops idle counters (in-memory store only; Redis keys expire by TTL).
    pub fn sweep(&self, now: Nanos) {
        match self {
            AnyStore::Memory(m) => {
                m.sweep(now);
            }
        }
    }

    /// Live counters held in this process.
    pub fn live_counters(&self) -> usize {
        match self {
            AnyStore::Memory(m) => m.len(),
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
        }
    }

    async fn release(&self, now: Nanos, keys: &[CounterKey], lease: u64) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(m) => {
                m.release_now(now, keys, lease);
                Ok(())
            }
        }
    }
}

//! At most N requests in flight: leases, each released when its response ends
//! or, if its holder crashed, when its TTL runs out.
//!
//! The state is the list of live leases (id, expiry, cost); it is never longer
//! than N. A lease past its expiry no longer counts. On refusal `retry_after`
//! is a hint, not a promise: the time until the earliest lease expires, at
//! most one second, since leases usually end long before their TTL.

use std::time::Duration;

use super::Evaluation;
use crate::clock::{Nanos, duration_nanos};

/// Longest `retry_after` suggested for a full concurrency limit.
pub const RETRY_HINT: Duration = Duration::from_secs(1);

/// One live lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Identifier chosen by the engine, unique per request.
    pub id: u64,
    /// When the lease stops counting even if never released.
    pub expires: Nanos,
    /// Slots held.
    pub cost: u64,
}

/// The live leases of one counter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseSet {
    /// Leases, unordered.
    pub leases: Vec<Lease>,
}

impl LeaseSet {
    /// Slots held by leases still live at `now`.
    pub fn in_use(&self, now: Nanos) -> u64 {
        self.leases
            .iter()
            .filter(|l| l.expires > now)
            .map(|l| l.cost)
            .sum()
    }

    /// Drops the lease `id`; returns whether it was held.
    pub fn release(&mut self, id: u64) -> bool {
        let before = self.leases.len();
        self.leases.retain(|l| l.id != id);
        before != self.leases.len()
    }
}

/// Evaluates a lease of `cost` slots against `limit` slots without changing `set`.
pub fn evaluate(set: &LeaseSet, now: Nanos, cost: u64, limit: u64) -> Evaluation {
    let used = set.in_use(now);
    let left = limit.saturating_sub(used);
    if cost > limit {
        return Evaluation::never(left, Nanos::ZERO);
    }
    if cost <= left {
        return Evaluation {
            admit: true,
            never: false,
            remaining: left - cost,
            reset: Nanos::ZERO,
            retry_after: Nanos::ZERO,
        };
    }
    let earliest = set
        .leases
        .iter()
        .filter(|l| l.expires > now)
        .map(|l| l.expires)
        .min()
        .unwrap_or(now);
    let retry_after = Nanos(
        earliest
            .0
            .saturating_sub(now.0)
            .min(duration_nanos(RETRY_HINT))
            .max(1),
    );
    Evaluation {
        admit: false,
        never: false,
        remaining: left,
        reset: Nanos::ZERO,
        retry_after,
    }
}

/// Tries to acquire a lease of `cost` slots with id `id` for `ttl` against
/// `limit` slots, adding it to `set` only when admitted (expired leases are
/// pruned either way).
pub fn acquire(
    set: &mut LeaseSet,
    now: Nanos,
    cost: u64,
    limit: u64,
    ttl: Duration,
    id: u64,
) -> Evaluation {
    set.leases.retain(|l| l.expires > now);
    let eval = evaluate(set, now, cost, limit);
    if eval.admit && cost > 0 {
        set.leases.push(Lease {
            id,
            expires: now.plus(ttl),
            cost,
        });
    }
    eval
}

/// Whether no lease is live at `now` (safe to drop).
pub fn is_fresh(set: &LeaseSet, now: Nanos) -> bool {
    set.in_use(now) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_limit_and_frees_on_release_or_expiry() {
        let mut s = LeaseSet::default();
        let ttl = Duration::from_secs(30);
        let t = Nanos::from_secs(1);
        assert!(acquire(&mut s, t, 1, 2, ttl, 1).admit);
        assert!(acquire(&mut s, t, 1, 2, ttl, 2).admit);
        let e = acquire(&mut s, t, 1, 2, ttl, 3);
        assert!(!e.admit);
        assert_eq!(e.retry_after_duration(), RETRY_HINT);
        assert!(s.release(1));
        assert!(!s.release(1));
        assert!(acquire(&mut s, t, 1, 2, ttl, 4).admit);
        let after_ttl = t.plus(ttl);
        assert!(acquire(&mut s, after_ttl, 2, 2, ttl, 5).admit);
        assert!(acquire(&mut s, t, 3, 2, ttl, 6).never);
    }
}

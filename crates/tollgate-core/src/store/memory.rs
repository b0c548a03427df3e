//! The in-memory store: a lock-free hash map of counters, each behind its own
//! small mutex.
//!
//! **Exact.** A request locks the counters of all its limits (in key order, so
//! two requests can never deadlock), evaluates them, and writes them only if
//! it is admitted. No other decision on those counters can interleave, so the
//! in-memory store never over-admits and a rejected request consumes nothing.
//! Requests on different keys never touch the same lock; lookups take no lock
//! at all (`papaya`).
//!
//! **Bounded.** A counter remembers when it will be back to its fresh state
//! (full bucket, empty window). [`MemoryStore::sweep`] drops counters past that
//! instant, which never hands out extra capacity: a dropped counter and a
//! fresh one are the same thing. The map holds at most `max_counters`; when it
//! is full and sweeping frees nothing, new counters are refused with
//! [`StoreError::CounterCapReached`] and each limit's `on_store_error` decides.
//! Counters over their limit are never evicted to make room, so an attacker
//! minting keys cannot flush their own block.
//!
//! Memory: the 128-bit key hash, the state and the lock, about 100 bytes per
//! live counter (measured in `BENCHMARKS.md`). Strings are never stored.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::algorithm::calendar_window::{self, CalendarState};
use crate::algorithm::concurrency::{self, LeaseSet};
use crate::algorithm::gcra::gcra;
use crate::algorithm::sliding_window::{self, SlidingState};
use crate::algorithm::{Evaluation, concurrency::Lease};
use crate::clock::Nanos;
use crate::error::StoreError;
use crate::policy::MAX_LIMITS_PER_REQUEST;
use crate::store::{Check, CounterKey, Params, Store};

#[cfg(tollgate_loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(tollgate_loom))]
use std::sync::{Mutex, MutexGuard};

/// Default cap on live counters (about 100 MB at ~100 bytes each).
pub const DEFAULT_MAX_COUNTERS: usize = 1_000_000;

/// Minimum time between two sweeps triggered by a full map.
const SWEEP_INTERVAL_NS: u64 = Nanos::SECOND;

/// Counter state by algorithm. `Fresh` until its first admitted request.
#[derive(Debug, Default)]
pub(crate) enum Counter {
    #[default]
    Fresh,
    Gcra(Nanos),
    Sliding(Box<SlidingState>),
    Calendar(CalendarState),
    Leases(Box<LeaseSet>),
}

/// A counter and its lock.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
pub(crate) struct SlotState {
    /// Removed from the map by a sweep: a decision that locked it looks it up again.
    dead: bool,
    /// When the counter is back to its fresh state.
    fresh_at: Nanos,
    counter: Counter,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding the lock cannot leave a half-written state
        // (every write is one assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Hashes a [`CounterKey`] (already a hash) by folding it to 64 bits.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 ^= (v as u64) ^ ((v >> 64) as u64);
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// Counters in process memory. See the module docs for its guarantees.
#[derive(Debug)]
pub struct MemoryStore {
    map: papaya::HashMap<CounterKey, Slot, KeyHasher>,
    max_counters: usize,
    last_sweep: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(DEFAULT_MAX_COUNTERS)
    }
}

impl MemoryStore {
    /// A store holding at most `max_counters` live counters.
    pub fn new(max_counters: usize) -> MemoryStore {
        let map = papaya::HashMap::builder()
            .hasher(KeyHasher(0))
            .resize_mode(papaya::ResizeMode::Blocking)
            .build();
        MemoryStore {
            map,
            max_counters: max_counters.max(1),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Number of live counters.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no counter is live.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Drops every counter that is back to its fresh state at `now`; returns
    /// how many were dropped. Call it periodically (the server does, every
    /// few seconds); a full map also triggers it, at most once a second.
    pub fn sweep(&self, now: Nanos) -> usize {
        self.last_sweep.store(now.0, Ordering::Relaxed);
        let guard = self.map.guard();
        let mut dropped = 0;
        self.map.retain(
            |_, slot| {
                let mut s = slot.lock();
                if s.fresh_at <= now {
                    s.dead = true;
                    dropped += 1;
                    false
                } else {
                    true
                }
            },
            &guard,
        );
        dropped
    }

    fn slot<'g>(
        &self,
        key: CounterKey,
        now: Nanos,
        guard: &'g impl papaya::Guard,
    ) -> Result<&'g Slot, StoreError> {
        if let Some(s) = self.map.get(&key, guard) {
            return Ok(s);
        }
        if self.map.len() >= self.max_counters {
            let last = self.last_sweep.load(Ordering::Relaxed);
            if now.0.saturating_sub(last) >= SWEEP_INTERVAL_NS
                && self
                    .last_sweep
                    .compare_exchange(last, now.0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                self.sweep(now);
            }
            if self.map.len() >= self.max_counters {
                return Err(StoreError::CounterCapReached {
                    cap: self.max_counters,
                });
            }
        }
        Ok(self.map.get_or_insert_with(key, Slot::default, guard))
    }

    /// [`Store::decide`] without a future: the in-memory store never waits.
    ///
    /// # Errors
    /// [`StoreError::CounterCapReached`] when a new counter does not fit.
    pub fn decide_now(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        let n = checks.len().min(MAX_LIMITS_PER_REQUEST);
        let checks = &checks[..n];
        let guard = self.map.guard();
        // Lock order: by key. `owner[i]` is the check whose lock check i uses
        // (only differs if two checks share a key).
        let mut order = [0u8; MAX_LIMITS_PER_REQUEST];
        for (i, o) in order.iter_mut().enumerate().take(n) {
            *o = i as u8;
        }
        order[..n].sort_unstable_by_key(|&i| checks[usize::from(i)].key);
        let mut owner = [0u8; MAX_LIMITS_PER_REQUEST];
        for j in 0..n {
            let i = usize::from(order[j]);
            owner[i] = if j > 0 && checks[usize::from(order[j - 1])].key == checks[i].key {
                owner[usize::from(order[j - 1])]
            } else {
                i as u8
            };
        }
        loop {
            let mut slots: [Option<&Slot>; MAX_LIMITS_PER_REQUEST] = [None; MAX_LIMITS_PER_REQUEST];
            for (i, c) in checks.iter().enumerate() {
                if usize::from(owner[i]) == i {
                    slots[i] = Some(self.slot(c.key, now, &guard)?);
                }
            }
            if let Some(admitted) =
                decide_locked(now, checks, lease, out, &slots, &order[..n], &owner)
            {
                return Ok(admitted);
            }
            // A sweep removed one of the counters between lookup and lock: look up again.
        }
    }

    /// Releases lease `lease` on the concurrency counters `keys`.
    pub fn release_now(&self, now: Nanos, keys: &[CounterKey], lease: u64) {
        let guard = self.map.guard();
        for key in keys {
            if let Some(slot) = self.map.get(key, &guard) {
                let mut s = slot.lock();
                if let Counter::Leases(set) = &mut s.counter {
                    set.release(lease);
                    set.leases.retain(|l| l.expires > now);
                }
            }
        }
    }
}

/// Locks the slots in `order`, evaluates every check, and commits if admitted.
/// Returns `None` if a slot turned out to be dead (swept) and must be looked up again.
pub(crate) fn decide_locked(
    now: Nanos,
    checks: &[Check],
    lease: u64,
    out: &mut [Evaluation],
    slots: &[Option<&Slot>],
    order: &[u8],
    owner: &[u8],
) -> Option<bool> {
    let mut locks: [Option<MutexGuard<'_, SlotState>>; MAX_LIMITS_PER_REQUEST] =
        std::array::from_fn(|_| None);
    for &i in order {
        let i = usize::from(i);
        if let Some(slot) = slots[i] {
            let g = slot.lock();
            if g.dead {
                return None;
            }
            locks[i] = Some(g);
        }
    }
    let mut admitted = true;
    for (i, check) in checks.iter().enumerate() {
        let state = locks[usize::from(owner[i])]
            .as_mut()
            .expect("every owner is locked");
        out[i] = apply(state, check, now, lease, false);
        if check.blocking && !out[i].admit {
            admitted = false;
        }
    }
    if admitted {
        for (i, check) in checks.iter().enumerate() {
            if out[i].admit {
                let state = locks[usize::from(owner[i])]
                    .as_mut()
                    .expect("every owner is locked");
                apply(state, check, now, lease, true);
            }
        }
    }
    Some(admitted)
}

/// Test hook for loom models (A4): a counter outside the map, decided through
/// the same locking path as [`MemoryStore::decide_now`] (papaya cannot run
/// under loom). Only built with `--cfg tollgate_loom`.
#[cfg(tollgate_loom)]
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct LoomSlot(Slot);

#[cfg(tollgate_loom)]
impl LoomSlot {
    /// Decides `checks` (distinct keys) against `slots`, one per check, with
    /// `decide_locked`; `None` if a slot was dead.
    #[doc(hidden)]
    pub fn decide(
        now: Nanos,
        checks: &[Check],
        slots: &[&LoomSlot],
        out: &mut [Evaluation],
    ) -> Option<bool> {
        let n = checks.len().min(MAX_LIMITS_PER_REQUEST);
        let mut order: Vec<u8> = (0..n as u8).collect();
        order.sort_unstable_by_key(|&i| checks[usize::from(i)].key);
        let owner: Vec<u8> = (0..n as u8).collect();
        let slots: Vec<Option<&Slot>> = slots.iter().map(|s| Some(&s.0)).collect();
        decide_locked(now, &checks[..n], 0, out, &slots, &order, &owner)
    }
}

/// Evaluates one check against its counter; with `commit`, writes the new state.
fn apply(s: &mut SlotState, check: &Check, now: Nanos, lease: u64, commit: bool) -> Evaluation {
    let cost = check.cost;
    match check.params {
        Params::Gcra(rate) => {
            let tat = match s.counter {
                Counter::Gcra(t) => Some(t),
                _ => None,
            };
            let (e, next) = gcra(tat, now, cost, &rate);
            if commit && e.admit {
                s.counter = Counter::Gcra(next);
                s.fresh_at = next;
            }
            e
        }
        Params::Sliding(window) => {
            let state = match &s.counter {
                Counter::Sliding(b) => Some(&**b),
                _ => None,
            };
            let (e, next) = sliding_window::evaluate(state, now, cost, &window);
            if commit && e.admit {
                match &mut s.counter {
                    Counter::Sliding(b) => **b = next,
                    other => *other = Counter::Sliding(Box::new(next)),
                }
                s.fresh_at = now.plus(e.reset);
            }
            e
        }
        Params::Calendar { limit, end } => {
            let state = match &s.counter {
                Counter::Calendar(c) => Some(c),
                _ => None,
            };
            let (e, next) = calendar_window::evaluate(state, now, cost, limit, end);
            if commit && e.admit {
                s.fresh_at = next.end;
                s.counter = Counter::Calendar(next);
            }
            e
        }
        Params::Concurrency { limit, ttl } => {
            if !commit {
                return match &s.counter {
                    Counter::Leases(set) => concurrency::evaluate(set, now, cost, limit),
                    _ => concurrency::evaluate(&LeaseSet::default(), now, cost, limit),
                };
            }
            if !matches!(s.counter, Counter::Leases(_)) {
                s.counter = Counter::Leases(Box::default());
            }
            let Counter::Leases(set) = &mut s.counter else {
                unreachable!("set just above")
            };
            let e = concurrency::acquire(set, now, cost, limit, ttl, lease);
            s.fresh_at = set
                .leases
                .iter()
                .map(|l: &Lease| l.expires)
                .max()
                .unwrap_or(now)
                .max(s.fresh_at);
            e
        }
    }
}

impl Store for MemoryStore {
    fn decide(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> impl std::future::Future<Output = Result<bool, StoreError>> + Send {
        std::future::ready(self.decide_now(now, checks, lease, out))
    }

    fn release(
        &self,
        now: Nanos,
        keys: &[CounterKey],
        lease: u64,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        self.release_now(now, keys, lease);
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;
    use std::time::Duration;

    use super::*;
    use crate::algorithm::gcra::GcraRate;
    use crate::algorithm::sliding_window::SlidingWindow;

    fn bucket(cap: u64) -> Params {
        Params::Gcra(GcraRate::new(
            NonZeroU64::new(cap).unwrap(),
            NonZeroU64::new(1).unwrap(),
            Duration::from_secs(1),
        ))
    }

    #[test]
    fn rejected_request_consumes_nothing_from_other_limits() {
        let store = MemoryStore::default();
        let now = Nanos::from_secs(100);
        let big = Check {
            key: CounterKey(1),
            params: bucket(100),
            cost: 1,
            blocking: true,
        };
        let small = Check {
            key: CounterKey(2),
            params: bucket(2),
            cost: 1,
            blocking: true,
        };
        let mut out = [Evaluation::default(); 2];
        assert!(store.decide_now(now, &[big, small], 0, &mut out).unwrap());
        assert!(store.decide_now(now, &[big, small], 0, &mut out).unwrap());
        for _ in 0..10 {
            assert!(!store.decide_now(now, &[big, small], 0, &mut out).unwrap());
        }
        // The big bucket admitted 2; rejected requests took nothing, so one more leaves 97.
        let mut one = [Evaluation::default(); 1];
        assert!(store.decide_now(now, &[big], 0, &mut one).unwrap());
        assert_eq!(
            one[0].remaining, 97,
            "the big bucket lost nothing to rejected requests"
        );
    }

    #[test]
    fn sweep_drops_only_fresh_counters() {
        let store = MemoryStore::default();
        let now = Nanos::from_secs(100);
        let w = Params::Sliding(SlidingWindow::new(5, Duration::from_secs(3)));
        let mut out = [Evaluation::default(); 1];
        for k in 0..100u128 {
            store
                .decide_now(
                    now,
                    &[Check {
                        key: CounterKey(k),
                        params: w,
                        cost: 1,
                        blocking: true,
                    }],
                    0,
                    &mut out,
                )
                .unwrap();
        }
        assert_eq!(store.len(), 100);
        assert_eq!(store.sweep(now.plus(Duration::from_secs(1))), 0);
        assert_eq!(store.sweep(now.plus(Duration::from_secs(4))), 100);
        assert!(store.is_empty());
    }

    #[test]
    fn cap_refuses_new_counters_but_keeps_blocked_ones() {
        let store = MemoryStore::new(2);
        let now = Nanos::from_secs(100);
        let mut out = [Evaluation::default(); 1];
        let c = |k| Check {
            key: CounterKey(k),
            params: bucket(1),
            cost: 1,
            blocking: true,
        };
        assert!(store.decide_now(now, &[c(1)], 0, &mut out).unwrap());
        assert!(store.decide_now(now, &[c(2)], 0, &mut out).unwrap());
        assert_eq!(
            store.decide_now(now, &[c(3)], 0, &mut out),
            Err(StoreError::CounterCapReached { cap: 2 })
        );
        // key 1 is still blocked: it was not evicted to make room
        assert!(!store.decide_now(now, &[c(1)], 0, &mut out).unwrap());
        // once its bucket refills, a sweep frees room
        let later = now.plus(Duration::from_secs(2));
        assert!(store.decide_now(later, &[c(3)], 0, &mut out).unwrap());
    }
}

//! The in-memory store: a sharded hash map of *scopes*, each holding the
//! counters of every limit that shares its scope values behind one small mutex.
//!
//! **One lookup, one lock per scope.** A [`CounterKey`]'s high 64 bits name its
//! scope (the hash of the scope values) and its low 64 bits the counter within
//! it (mixed with the limit name). The map is keyed by the scope; its entry
//! holds the lock and the counters in one allocation, sized for the limits
//! that made it and grown when a scope needs more. A request whose three
//! limits are all scoped by account therefore costs one map lookup and one
//! lock, not three: that is what makes multi-limit decisions about as cheap as
//! single-limit ones. When the policy resolved at load that every limit of a
//! request shares its scope (and none holds a lease or has a rollout date),
//! the engine takes the *one-scope path* ([`MemoryStore::decide_scope`]): one
//! hash of the scope values, and the store runs the plan and operation's
//! one-scope program compiled at load ([`OneScope`]: per limit, its counter,
//! its algorithm with its numbers and its result but for the evaluation)
//! and pushes the results into the decision, with no per-limit [`Check`]s;
//! the same counters, the same guarantees.
//!
//! **Exact.** A request locks the entries of all its scopes (in scope order, so
//! two requests can never deadlock), evaluates every counter, and writes them
//! only if it is admitted. No other decision on those counters can interleave,
//! so the in-memory store never over-admits and a rejected request consumes
//! nothing. The general path's lookups take a shard's read lock (`dashmap`),
//! which readers share, and then each entry's mutex. The one-scope path
//! takes its shard's *write* lock instead and no entry mutex: exclusive
//! access to the entry for one lock instead of two (about 30 instructions
//! per decision), at the price of decisions on other scopes of the same
//! shard (1 in 64) waiting for it; they would contend on the shard's lock
//! word's cache line with read locks too.
//!
//! **Bounded.** A counter remembers when it will be back to its fresh state
//! (full bucket, empty window). [`MemoryStore::sweep`] drops counters past that
//! instant, and entries left with no counter, which never hands out extra
//! capacity: a dropped counter and a fresh one are the same thing. The store
//! holds at most `max_counters` live counters (and as many entries), and a
//! scope at most [`MAX_COUNTERS_PER_SCOPE`]; when it is
//! full and sweeping frees nothing, new counters are refused with
//! [`StoreError::CounterCapReached`] and each limit's `on_store_error` decides.
//! Counters over their limit are never evicted to make room, so an attacker
//! minting keys cannot flush their own block. A counter is created only when a
//! request is admitted and takes from it.
//!
//! **Memory comes back.** A sweep that leaves the map's tables at most 1/8
//! full shrinks them to the size of what is left (see
//! [`MemoryStore::sweep`]): after a burst of keys goes idle and is swept, the
//! store is back to its size before the burst.
//!
//! Memory: the 64-bit scope hash, the lock, and per counter its 64-bit tag,
//! its fresh instant and its state (measured in `BENCHMARKS.md`). Strings are
//! never stored.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::{Ref, RefMut};

use crate::algorithm::Evaluation;
use crate::algorithm::calendar_window::{self, CalendarState};
use crate::algorithm::concurrency::{self, Lease, LeaseSet};
use crate::algorithm::gcra::{GcraRate, gcra, gcra_with_tau};
use crate::algorithm::sliding_window::{self, SlidingState, SlidingWindow};
use crate::clock::Nanos;
use crate::decision::{Decision, LimitResult, Outcome};
use crate::error::StoreError;
use crate::policy::{MAX_LIMITS_PER_REQUEST, OneScope, Step, StepAlgorithm};
use crate::store::{Check, CounterKey, Params, Store};

#[cfg(tollgate_loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(tollgate_loom))]
use std::sync::{Mutex, MutexGuard};

/// Default cap on live counters (about 100 MB at ~100 bytes each).
pub const DEFAULT_MAX_COUNTERS: usize = 1_000_000;

/// Minimum time between two sweeps triggered by a full store.
const SWEEP_INTERVAL_NS: u64 = Nanos::SECOND;

/// Checks per request that [`MemoryStore::decide_now`] sizes its stack arrays
/// for when no more are given.
const FEW_CHECKS: usize = 4;

/// The scope part of a counter key: which map entry holds the counter.
fn scope(key: CounterKey) -> u64 {
    (key.0 >> 64) as u64
}

/// The counter part of a counter key: which counter of its entry.
fn tag(key: CounterKey) -> u64 {
    key.0 as u64
}

/// Counter state by algorithm. `Fresh` until its first admitted request.
///
/// 16 bytes, so that a [`Cell`] is 32 and the entry of three counters 112
/// (two cache lines, not three): a bucket's state (its TAT) and a calendar
/// window's end are the instants the counter is fresh again, so they live
/// in the cell's `fresh_at`, not here.
#[derive(Debug, Default)]
pub(crate) enum Counter {
    #[default]
    Fresh,
    /// A token bucket whose TAT is the cell's `fresh_at`.
    Gcra,
    /// A sliding log: one entry inline, more on the heap (see `sliding_window`).
    Sliding(SlidingState),
    /// The count of the calendar window ending at the cell's `fresh_at`.
    Calendar {
        count: u64,
    },
    Leases(Box<LeaseSet>),
}

/// One counter of a scope (32 bytes).
#[derive(Debug)]
pub(crate) struct Cell {
    /// The low 64 bits of its [`CounterKey`].
    tag: u64,
    /// When the counter is back to its fresh state; for a bucket, its TAT;
    /// for a calendar window, the window's end.
    fresh_at: Nanos,
    counter: Counter,
}

/// The cell of a counter not created yet.
const FRESH: &Cell = &Cell {
    tag: 0,
    fresh_at: Nanos(0),
    counter: Counter::Fresh,
};

impl Cell {
    /// The bucket's TAT, if the cell holds a bucket.
    #[inline(always)]
    fn tat(&self) -> Option<Nanos> {
        match self.counter {
            Counter::Gcra => Some(self.fresh_at),
            _ => None,
        }
    }

    /// The calendar window's state, if the cell holds one.
    #[inline(always)]
    fn calendar(&self) -> Option<CalendarState> {
        match self.counter {
            Counter::Calendar { count } => Some(CalendarState {
                end: self.fresh_at,
                count,
            }),
            _ => None,
        }
    }

    /// An unused place in a scope's array.
    fn empty() -> Cell {
        Cell {
            tag: 0,
            fresh_at: Nanos(0),
            counter: Counter::Fresh,
        }
    }
}

/// Most counters one scope entry holds (limits sharing the same scope
/// values); past it, a new counter in that scope is refused as if the store
/// were full.
pub const MAX_COUNTERS_PER_SCOPE: usize = 256;

/// The counters of one scope and their lock, in one allocation: `C` is
/// `[Cell; N]` when made, `[Cell]` in the map. A scope's entry is sized at
/// creation for the limits that made it (the one-scope path: all of a
/// request's limits), so its counters sit next to its lock (one cache miss
/// on a large map, not two); a scope that needs more counters gets a larger
/// entry, its counters moved under the map's write lock.
#[derive(Debug)]
pub(crate) struct Slot<C: ?Sized = [Cell]> {
    state: Mutex<Group<C>>,
}

/// The counters of a scope: the first `len` of `cells`.
#[derive(Debug)]
pub(crate) struct Group<C: ?Sized = [Cell]> {
    len: u16,
    cells: C,
}

fn boxed<const N: usize>() -> Box<Slot> {
    Box::new(Slot {
        state: Mutex::new(Group {
            len: 0,
            cells: std::array::from_fn::<Cell, N, _>(|_| Cell::empty()),
        }),
    })
}

impl Slot {
    /// An empty entry with room for at least `n` counters (and not much
    /// more); `None` past [`MAX_COUNTERS_PER_SCOPE`].
    fn with_capacity(n: usize) -> Option<Box<Slot>> {
        Some(match n {
            0 | 1 => boxed::<1>(),
            2 => boxed::<2>(),
            3 => boxed::<3>(),
            4 => boxed::<4>(),
            5..=8 => boxed::<8>(),
            9..=16 => boxed::<16>(),
            17..=32 => boxed::<32>(),
            33..=64 => boxed::<64>(),
            65..=128 => boxed::<128>(),
            129..=MAX_COUNTERS_PER_SCOPE => boxed::<MAX_COUNTERS_PER_SCOPE>(),
            _ => return None,
        })
    }

    /// The counters, through exclusive access to the entry (its shard
    /// write-locked): no lock to take, and nobody else can hold it.
    #[cfg(not(tollgate_loom))]
    #[inline]
    fn group_mut(&mut self) -> &mut Group {
        self.state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Under loom, through the lock (the map's locks do not run there).
    #[cfg(tollgate_loom)]
    fn group_mut(&mut self) -> MutexGuard<'_, Group> {
        self.lock()
    }

    #[inline]
    fn lock(&self) -> MutexGuard<'_, Group> {
        // A panic while holding the lock cannot leave a half-written state
        // (every write is one assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Group {
    #[inline]
    fn as_slice(&self) -> &[Cell] {
        &self.cells[..usize::from(self.len)]
    }

    #[inline]
    fn as_mut_slice(&mut self) -> &mut [Cell] {
        &mut self.cells[..usize::from(self.len)]
    }

    fn find(&self, tag: u64) -> Option<usize> {
        self.as_slice().iter().position(|c| c.tag == tag)
    }

    /// Room for this many more counters.
    #[inline]
    fn free(&self) -> usize {
        self.cells.len() - usize::from(self.len)
    }

    /// Adds a fresh counter; returns its index. The caller checked
    /// [`Group::free`] first.
    fn push(&mut self, tag: u64) -> usize {
        let k = usize::from(self.len);
        self.cells[k] = Cell {
            tag,
            fresh_at: Nanos(0),
            counter: Counter::Fresh,
        };
        self.len += 1;
        k
    }

    /// Drops the counters that are fresh at `now`; returns how many.
    fn drop_fresh(&mut self, now: Nanos) -> usize {
        let len = usize::from(self.len);
        let mut kept = 0;
        for k in 0..len {
            if self.cells[k].fresh_at > now {
                self.cells.swap(kept, k);
                kept += 1;
            }
        }
        for c in &mut self.cells[kept..len] {
            *c = Cell::empty();
        }
        self.len = kept as u16;
        len - kept
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves every counter into `to` (which has room for them).
    fn move_into(&mut self, to: &mut Group) {
        for k in 0..usize::from(self.len) {
            to.cells[k] = std::mem::replace(&mut self.cells[k], Cell::empty());
        }
        to.len = self.len;
        self.len = 0;
    }
}

/// The count of live counters against the cap.
#[derive(Debug)]
pub(crate) struct Room {
    live: AtomicUsize,
    max: usize,
}

impl Room {
    /// Takes room for `n` new counters, if there is.
    fn reserve(&self, n: usize) -> bool {
        let before = self.live.fetch_add(n, Ordering::Relaxed);
        if before + n > self.max {
            self.live.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn free(&self, n: usize) {
        self.live.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Hashes a scope (already a hash) with one multiply, which also spreads
/// small test keys over the table.
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
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
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
    /// Scope → its entry. A decision holds its shard's read lock from the
    /// lookup until its entry is unlocked, so a sweep (which takes the
    /// shard's write lock to remove entries) can never free an entry a
    /// decision is using, and no entry is ever "dead".
    map: DashMap<u64, Box<Slot>, KeyHasher>,
    /// Entries in `map` (bounded by the cap, as counters are).
    entries: AtomicUsize,
    room: Room,
    last_sweep: AtomicU64,
    /// Times a sweep shrank the map's tables to give back idle scopes' memory.
    rebuilds: AtomicU64,
}

/// Shards of the map: readers of different shards share no cache line.
const SHARDS: usize = 64;

/// A sweep shrinks the map's tables when at most 1/`SHRINK_RATIO` of
/// their capacity is used ...
const SHRINK_RATIO: usize = 8;
/// ... and they can hold at least this many entries (small tables are not
/// worth it).
const SHRINK_MIN_ENTRIES: usize = 1024;

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(DEFAULT_MAX_COUNTERS)
    }
}

/// What a locked decision came to.
pub(crate) enum Locked {
    Decided(bool),
    /// Admitted, but its new counters do not fit under the cap (nothing written).
    Full,
    /// Admitted, but the entry of scope `at` (an index into the request's
    /// scopes) has no room for its new counters: it needs `cells` in all
    /// (nothing written).
    Grow {
        at: u8,
        cells: usize,
    },
}

impl MemoryStore {
    /// A store holding at most `max_counters` live counters.
    pub fn new(max_counters: usize) -> MemoryStore {
        MemoryStore {
            map: DashMap::with_hasher_and_shard_amount(KeyHasher(0), SHARDS),
            entries: AtomicUsize::new(0),
            room: Room {
                live: AtomicUsize::new(0),
                max: max_counters.max(1),
            },
            last_sweep: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
        }
    }

    /// Number of live counters.
    pub fn len(&self) -> usize {
        self.room.live.load(Ordering::Relaxed)
    }

    /// Whether no counter is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every counter that is back to its fresh state at `now`, and every
    /// scope entry left empty; returns how many counters were dropped. Call it
    /// periodically (the server does, every few seconds); a full store also
    /// triggers it, at most once a second.
    ///
    /// When the sweep leaves the map's tables at most 1/8 full (and they can
    /// hold at least 1,024 entries), they are shrunk to the size of what is
    /// left, so that the memory of a burst of keys comes back once they go
    /// idle. Each shard is locked in turn (decisions on its scopes wait for
    /// it; the others go on).
    pub fn sweep(&self, now: Nanos) -> usize {
        self.last_sweep.store(now.0, Ordering::Relaxed);
        let mut dropped = 0;
        let mut removed = 0;
        // Each shard under its write lock: no decision holds one of its
        // entries, so every entry lock below is free.
        self.map.retain(|_, slot| {
            let mut g = slot.lock();
            dropped += g.drop_fresh(now);
            if g.is_empty() {
                removed += 1;
                false
            } else {
                true
            }
        });
        self.room.free(dropped);
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        let capacity = self.map.capacity();
        if capacity >= SHRINK_MIN_ENTRIES
            && self.entries.load(Ordering::Relaxed) * SHRINK_RATIO <= capacity
        {
            self.map.shrink_to_fit();
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// How many times a sweep has shrunk the map's tables to give back the
    /// memory of idle scopes.
    pub fn index_rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// Sweeps if the last sweep is at least [`SWEEP_INTERVAL_NS`] old; returns
    /// whether it did.
    fn sweep_when_full(&self, now: Nanos) -> bool {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.0.saturating_sub(last) >= SWEEP_INTERVAL_NS
            && self
                .last_sweep
                .compare_exchange(last, now.0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep(now);
            return true;
        }
        false
    }

    /// Adds an empty entry for `scope`, with room for `cells` counters, if it
    /// has none, and returns it (its shard write-locked). Must not be called while
    /// holding another entry of the map (it takes the shard's write lock).
    fn insert(
        &self,
        scope: u64,
        cells: usize,
        now: Nanos,
    ) -> Result<RefMut<'_, u64, Box<Slot>>, StoreError> {
        if self.entries.load(Ordering::Relaxed) >= self.room.max {
            self.sweep_when_full(now);
            if self.entries.load(Ordering::Relaxed) >= self.room.max {
                return Err(StoreError::CounterCapReached { cap: self.room.max });
            }
        }
        Ok(match self.map.entry(scope) {
            Entry::Occupied(e) => e.into_ref(),
            Entry::Vacant(e) => {
                self.entries.fetch_add(1, Ordering::Relaxed);
                let slot = Slot::with_capacity(cells)
                    .or_else(|| Slot::with_capacity(1))
                    .expect("one counter always fits");
                e.insert(slot)
            }
        })
    }

    /// Gives the entry of `scope` room for `cells` counters: a larger entry,
    /// its counters moved into it under the shard's write lock (no decision
    /// holds it). Must not be called while holding another entry of the map.
    ///
    /// # Errors
    /// [`StoreError::CounterCapReached`] past [`MAX_COUNTERS_PER_SCOPE`].
    fn grow(&self, scope: u64, cells: usize) -> Result<(), StoreError> {
        let Some(mut entry) = self.map.get_mut(&scope) else {
            return Ok(()); // swept meanwhile: the next lookup adds it again
        };
        let mut g = entry.lock();
        if g.free() + usize::from(g.len) >= cells {
            return Ok(()); // grown meanwhile
        }
        let Some(bigger) = Slot::with_capacity(cells) else {
            return Err(StoreError::CounterCapReached { cap: self.room.max });
        };
        g.move_into(&mut bigger.lock());
        drop(g);
        *entry = bigger;
        Ok(())
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
        // Most requests meet a few limits: size the stack arrays for exactly
        // that many.
        match checks.len() {
            0 | 1 => self.decide_n::<1>(now, checks, lease, out),
            2 => self.decide_n::<2>(now, checks, lease, out),
            3 => self.decide_n::<3>(now, checks, lease, out),
            ..=FEW_CHECKS => self.decide_n::<FEW_CHECKS>(now, checks, lease, out),
            _ => self.decide_n::<MAX_LIMITS_PER_REQUEST>(now, checks, lease, out),
        }
    }

    fn decide_n<const N: usize>(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        let n = checks.len().min(N);
        let checks = &checks[..n];
        // The distinct scopes, sorted: the lock order. `scope_of[i]` is the
        // position of check i's scope.
        let mut scopes = [0u64; N];
        let mut scope_of = [0u8; N];
        let mut m = 0;
        if let Some(first) = checks.first() {
            scopes[0] = scope(first.key);
            m = 1;
        }
        // Usually every limit of a request shares one scope: nothing to sort.
        if checks.iter().any(|c| scope(c.key) != scopes[0]) {
            m = 0;
            for c in checks {
                let s = scope(c.key);
                let at = scopes[..m].partition_point(|&x| x < s);
                if at < m && scopes[at] == s {
                    continue;
                }
                scopes.copy_within(at..m, at + 1);
                scopes[at] = s;
                m += 1;
            }
            for (o, c) in scope_of.iter_mut().zip(checks) {
                let s = scope(c.key);
                *o = scopes[..m].partition_point(|&x| x < s) as u8;
            }
        }
        let mut swept = false;
        loop {
            // Look every scope up (a shard read lock each, held until the
            // decision is made); a missing one is added with every lookup
            // dropped (adding takes the shard's write lock), then look up again.
            let mut refs: [Option<Ref<'_, u64, Box<Slot>>>; N] = std::array::from_fn(|_| None);
            let mut missing = None;
            for (r, &s) in refs.iter_mut().zip(&scopes[..m]) {
                *r = self.map.get(&s);
                if r.is_none() {
                    missing = Some(s);
                    break;
                }
            }
            if let Some(s) = missing {
                drop(refs);
                drop(self.insert(s, 1, now)?.downgrade());
                continue;
            }
            let mut slots: [Option<&Slot>; N] = [None; N];
            for (slot, r) in slots.iter_mut().zip(&refs[..m]) {
                *slot = r.as_deref().map(|b| &**b);
            }
            match decide_locked::<N>(
                now,
                checks,
                lease,
                out,
                &slots[..m],
                &scope_of[..n],
                &self.room,
            ) {
                Locked::Decided(admitted) => return Ok(admitted),
                Locked::Grow { at, cells } => {
                    drop(refs);
                    self.grow(scopes[usize::from(at)], cells)?;
                }
                Locked::Full => {
                    drop(refs);
                    if swept || !self.sweep_when_full(now) {
                        return Err(StoreError::CounterCapReached { cap: self.room.max });
                    }
                    swept = true;
                }
            }
        }
    }

    /// The one-scope path: decides the request whose limits the policy
    /// compiled into `program` at load (they share one scope, hold no lease
    /// and have distinct names: [`OneScope`]) and whose scope values hash
    /// to `values`; appends one result per limit to `decision`, in order,
    /// and sets its outcome. Returns whether the request is admitted.
    ///
    /// The same counters as [`MemoryStore::decide_now`] (a limit's counter
    /// key is `values ^ name_hash`, as the engine builds it), the same
    /// guarantees, without the per-limit [`Check`]s and the scope sorting of
    /// the general path: one lookup and one lock, the results copied from
    /// the program, each counter evaluated once, in one pass that writes
    /// it as it goes and puts back what it wrote if the request is refused
    /// (see `scope_locked`): a refused request consumes nothing.
    ///
    /// # Errors
    /// [`StoreError::CounterCapReached`] when a new counter does not fit;
    /// nothing was consumed nor appended.
    #[inline(always)]
    pub(crate) fn decide_scope<const N: usize>(
        &self,
        now: Nanos,
        values: u128,
        program: &OneScope,
        cost: Option<u64>,
        decision: &mut Decision,
    ) -> Result<bool, StoreError> {
        let scope = (values >> 64) as u64;
        let mut swept = false;
        loop {
            // The shard's write lock makes this decision the only one on
            // every entry of the shard: the entry's own mutex is not taken
            // (see `Slot::group_mut`).
            let mut slot = match self.map.get_mut(&scope) {
                Some(slot) => slot,
                None => self.insert(scope, program.steps.len().min(N), now)?,
            };
            let locked = scope_locked::<N, _>(
                slot.group_mut(),
                now,
                values,
                program,
                cost,
                &self.room,
                decision,
            );
            match locked {
                Locked::Decided(admitted) => return Ok(admitted),
                Locked::Grow { cells, .. } => {
                    drop(slot);
                    self.grow(scope, cells)?;
                }
                Locked::Full => {
                    drop(slot);
                    if swept || !self.sweep_when_full(now) {
                        return Err(StoreError::CounterCapReached { cap: self.room.max });
                    }
                    swept = true;
                }
            }
        }
    }

    /// Releases lease `lease` on the concurrency counters `keys`.
    pub fn release_now(&self, now: Nanos, keys: &[CounterKey], lease: u64) {
        for &key in keys {
            let Some(slot) = self.map.get(&scope(key)) else {
                continue;
            };
            let mut g = slot.lock();
            if let Some(k) = g.find(tag(key))
                && let Counter::Leases(set) = &mut g.as_mut_slice()[k].counter
            {
                set.release(lease);
                set.leases.retain(|l| l.expires > now);
            }
        }
    }
}

/// Locks the scope entries `slots` (given in lock order), evaluates every
/// check (check i against entry `scope_of[i]`), and commits if admitted.
/// `N` bounds the number of checks (stack arrays).
pub(crate) fn decide_locked<const N: usize>(
    now: Nanos,
    checks: &[Check],
    lease: u64,
    out: &mut [Evaluation],
    slots: &[Option<&Slot>],
    scope_of: &[u8],
    room: &Room,
) -> Locked {
    if let [one] = slots {
        // One scope (the usual case): one lock, no guard array.
        let g = one.expect("every scope is looked up").lock();
        return decide_groups::<N, _>(now, checks, lease, out, &mut [Some(g)], scope_of, room);
    }
    let mut locks: [Option<MutexGuard<'_, Group>>; MAX_LIMITS_PER_REQUEST] =
        std::array::from_fn(|_| None);
    for (lock, slot) in locks.iter_mut().zip(slots) {
        let g = slot.expect("every scope is looked up").lock();
        *lock = Some(g);
    }
    decide_groups::<N, _>(
        now,
        checks,
        lease,
        out,
        &mut locks[..slots.len()],
        scope_of,
        room,
    )
}

/// The state an admitted check writes, computed when it was evaluated (so a
/// counter is evaluated once per decision, not again on commit).
#[derive(Clone, Copy)]
enum Next {
    /// Computed on commit (concurrency leases, and a counter that an earlier
    /// check of the same request already took from).
    OnCommit,
    Gcra(Nanos),
    Calendar(CalendarState),
    /// Admitted on the log as it is: record the cost (no second
    /// evaluation), with the window of the check's (or limit's) `Params`.
    Sliding,
}

/// [`decide_locked`] once every scope entry is locked: `groups[scope_of[i]]`
/// holds check i's counter.
fn decide_groups<const N: usize, G: std::ops::DerefMut<Target = Group>>(
    now: Nanos,
    checks: &[Check],
    lease: u64,
    out: &mut [Evaluation],
    groups: &mut [Option<G>],
    scope_of: &[u8],
    room: &Room,
) -> Locked {
    let mut next = [Next::OnCommit; N];
    // Index of each check's counter in its entry (`NO_CELL`: not there yet).
    let mut at = [NO_CELL; N];
    let mut admitted = true;
    let mut new = 0;
    // New counters per scope entry (is there room in it?).
    let mut need = [0usize; N];
    for (i, check) in checks.iter().enumerate().take(N) {
        let g = groups[usize::from(scope_of[i])]
            .as_deref()
            .expect("every scope is locked");
        let cells = g.as_slice();
        let t = tag(check.key);
        // An entry's counters are usually in the order of the checks that
        // created them: try that one first.
        let cell = match cells.get(i) {
            Some(c) if c.tag == t => Some(i),
            _ => cells.iter().position(|c| c.tag == t),
        };
        let counter = cell.map_or(FRESH, |k| &cells[k]);
        out[i] = evaluate(counter, &check.params, check.cost, now, &mut next[i]);
        let admit = out[i].admit;
        if check.blocking && !admit {
            admitted = false;
        }
        // An earlier check of this request that takes from the same counter:
        // this one is committed on the state that one leaves.
        let shared = checks[..i]
            .iter()
            .zip(&out[..i])
            .any(|(c, e)| c.key == check.key && e.admit);
        if shared {
            next[i] = Next::OnCommit;
        }
        // A counter this request would create (once, even if two checks share it).
        match cell {
            Some(k) => at[i] = u8::try_from(k).unwrap_or(NO_CELL),
            None if admit && !shared => {
                new += 1;
                need[usize::from(scope_of[i])] += 1;
            }
            None => {}
        }
    }
    if !admitted {
        return Locked::Decided(false);
    }
    for (j, (g, &more)) in groups.iter().zip(&need).enumerate() {
        let g = g.as_deref().expect("every scope is locked");
        if more > g.free() {
            return Locked::Grow {
                at: j as u8,
                cells: usize::from(g.len) + more,
            };
        }
    }
    if new > 0 && !room.reserve(new) {
        return Locked::Full;
    }
    for (i, check) in checks.iter().enumerate().take(N) {
        if !out[i].admit {
            continue;
        }
        let g = groups[usize::from(scope_of[i])]
            .as_deref_mut()
            .expect("every scope is locked");
        let k = match at[i] {
            NO_CELL => {
                let t = tag(check.key);
                match g.find(t) {
                    Some(k) => k,
                    None => g.push(t),
                }
            }
            k => usize::from(k),
        };
        let cell = &mut g.as_mut_slice()[k];
        if !write_next(cell, &next[i], &check.params, check.cost, now) {
            commit(cell, &check.params, check.cost, now, lease);
        }
    }
    Locked::Decided(true)
}

/// [`MemoryStore::decide_scope`] once the scope's entry `g` is locked:
/// evaluates every limit's counter, writes them only if the request is
/// admitted, appends the results and sets the decision's outcome (nothing
/// when the new counters do not fit: [`Locked::Full`], [`Locked::Grow`]).
///
/// **The results first.** The program's results (each limit's number and
/// mode, its evaluation blank) are copied into the decision in one go,
/// and each limit's evaluation is written into its result as it is made.
///
/// **One pass.** The entry is this decision's alone (shard write-locked,
/// or locked in the loom model), so an admitting limit's counter is
/// written as soon as it is evaluated, while no blocking limit has refused
/// yet, when the counter already holds its algorithm's usual state (a
/// bucket, a calendar window, a sliding log of one entry that the cost
/// merges into: a word or two, kept in an [`Undo`]). If a later blocking
/// limit refuses, or the new counters do not fit, those few words are put
/// back before anything is answered, so a refused request still consumes
/// nothing. Any other counter (a new one, a log moving to its ring, a state
/// of another algorithm after a reload) is written after the loop, once
/// the request is known to be admitted, as before.
#[inline]
fn scope_locked<const N: usize, G: std::ops::DerefMut<Target = Group>>(
    mut g: G,
    now: Nanos,
    values: u128,
    program: &OneScope,
    cost: Option<u64>,
    room: &Room,
    decision: &mut Decision,
) -> Locked {
    // `&mut Group` on the one-scope path (its shard write-locked), a
    // guard of the entry's mutex in the loom model.
    let g: &mut Group = &mut g;
    let steps = &program.steps[..program.steps.len().min(N)];
    let low = values as u64;
    // Each limit's result is pushed as it is evaluated; taken back out if
    // the request does not fit (`Grow`, `Full`).
    let base = decision.results().len();
    // What the counters written in the loop held.
    let mut undo = [Undo::NONE; N];
    let mut pass = Pass {
        admitted: true,
        refused: false,
        later: false,
    };
    let len = usize::from(g.len);
    let cells = &mut g.cells[..len];
    if N <= FEW_CHECKS {
        // Unrolled: each limit's code with its index known (a loop here
        // stays a loop).
        macro_rules! at {
            ($i:literal) => {
                if let (Some(step), Some(u)) = (steps.get($i), undo.get_mut($i)) {
                    pass.step($i, step, u, cells, low, cost, now, decision);
                }
            };
        }
        at!(0);
        at!(1);
        at!(2);
        at!(3);
    } else {
        for (i, (step, u)) in steps.iter().zip(&mut undo).enumerate() {
            pass.step(i, step, u, cells, low, cost, now, decision);
        }
    }
    if !pass.admitted {
        undo_writes(g, steps, &undo);
    } else if pass.later
        && let Some(locked) =
            write_later(g, low, steps, decision.results_from(base), &undo, now, room)
    {
        decision.truncate(base);
        return locked;
    }
    if pass.refused {
        decision.settle(pass.admitted, 0);
    } else {
        // Every limit admits: nothing forwarded, no lease on one scope.
        decision.outcome = Outcome::Admitted;
    }
    Locked::Decided(pass.admitted)
}

/// What `scope_locked`'s loop keeps from limit to limit.
struct Pass {
    /// Whether no blocking limit refused so far.
    admitted: bool,
    /// Whether any limit refused (blocking or not): only then does the
    /// outcome need a pass over the results.
    refused: bool,
    /// Whether a limit admits whose counter is written after the loop.
    later: bool,
}

impl Pass {
    /// Evaluates limit `i` (`step`) on its counter among `cells` (the
    /// scope entry's), writes it in place when it can (what it held kept
    /// in `u`), and pushes its result.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        i: usize,
        step: &Step,
        u: &mut Undo,
        cells: &mut [Cell],
        low: u64,
        cost: Option<u64>,
        now: Nanos,
        decision: &mut Decision,
    ) {
        let t = low ^ step.name_hash;
        let c = cost.unwrap_or(step.result.cost);
        // Cells are usually in the order of the limits that made them.
        let cell = match cells.get(i) {
            Some(c) if c.tag == t => Some(i),
            _ => cells.iter().position(|c| c.tag == t),
        };
        let (eval, wrote) = match cell {
            Some(k) => {
                let (e, wrote) =
                    evaluate_in_place(&mut cells[k], &step.algorithm, c, now, self.admitted, u);
                if wrote {
                    u.cell = k as u16;
                }
                (e, wrote)
            }
            None => (
                evaluate_step(FRESH, &step.algorithm, c, now, &mut Next::OnCommit),
                false,
            ),
        };
        let admit = eval.admit;
        self.refused |= !admit;
        if !admit && step.result.blocking {
            self.admitted = false;
        }
        self.later |= admit && !wrote;
        decision.push(LimitResult {
            cost: c,
            // Built from its fields, not moved whole: a move copies its 6
            // bytes of padding along, through every temporary it passed by
            // (`BENCHMARKS.md` core11: 57 instructions per 3-limit
            // decision); from its fields it stays in registers.
            eval: Evaluation {
                admit: eval.admit,
                never: eval.never,
                remaining: eval.remaining,
                reset: eval.reset,
                retry_after: eval.retry_after,
            },
            ..step.result
        });
    }
}

/// The words a counter written by `scope_locked`'s loop held before, to put
/// back if the request is refused after all: its `fresh_at` (a bucket's
/// TAT, a calendar window's end), and a calendar window's count in `a`, or
/// a sliding log's one entry in `a` and `b`.
#[derive(Clone, Copy)]
struct Undo {
    fresh_at: Nanos,
    a: u64,
    b: u32,
    /// Index of the cell in its entry; [`Undo::NOT_WRITTEN`] if the loop
    /// did not write it.
    cell: u16,
}

impl Undo {
    const NOT_WRITTEN: u16 = u16::MAX;

    const NONE: Undo = Undo {
        fresh_at: Nanos(0),
        a: 0,
        b: 0,
        cell: Undo::NOT_WRITTEN,
    };
}

/// Evaluates a limit whose algorithm is `alg` on its counter `cell` and,
/// if it admits and `write` (no blocking limit refused so far), writes the
/// counter at once when it holds its algorithm's usual state, keeping what
/// it held in `undo`. Returns the evaluation and whether the counter was
/// written (if not, and it admits, `scope_locked` writes it after its loop).
#[inline(always)]
fn evaluate_in_place(
    cell: &mut Cell,
    alg: &StepAlgorithm,
    cost: u64,
    now: Nanos,
    write: bool,
    undo: &mut Undo,
) -> (Evaluation, bool) {
    match alg {
        &StepAlgorithm::Gcra { ref rate, tau } => match cell.counter {
            // A bucket: its TAT is the cell's `fresh_at`.
            Counter::Gcra => {
                let (e, next) = gcra_with_tau(Some(cell.fresh_at), now, cost, rate, tau);
                let wrote = write && e.admit;
                if wrote {
                    undo.fresh_at = cell.fresh_at;
                    cell.fresh_at = next;
                }
                (e, wrote)
            }
            _ => (gcra_with_tau(None, now, cost, rate, tau).0, false),
        },
        StepAlgorithm::Sliding { window } => match &mut cell.counter {
            Counter::Sliding(log) => {
                let (e, was) = log.evaluate_merge_one(now, cost, window, write);
                let Some(was) = was else {
                    return (e, false);
                };
                undo.fresh_at = cell.fresh_at;
                undo.a = was.at;
                undo.b = was.cost;
                // As `write_next` does: when the log is empty again, `now`
                // plus the reset of the evaluation that merged.
                cell.fresh_at = Nanos(now.0 + e.reset.0);
                (e, true)
            }
            _ => (SlidingState::Empty.evaluate(now, cost, window), false),
        },
        &StepAlgorithm::Calendar { limit, len } => {
            calendar_in_place(cell, limit, utc_end(now, len), cost, now, write, undo)
        }
        StepAlgorithm::ZonedCalendar { limit, calendar } => {
            calendar_in_place(cell, *limit, calendar.window(now).1, cost, now, write, undo)
        }
        alg @ StepAlgorithm::WideGcra { .. } => (
            evaluate_step(cell, alg, cost, now, &mut Next::OnCommit),
            false,
        ),
    }
}

/// [`evaluate_in_place`] for a calendar window ending at `end`.
#[inline(always)]
fn calendar_in_place(
    cell: &mut Cell,
    limit: u64,
    end: Nanos,
    cost: u64,
    now: Nanos,
    write: bool,
    undo: &mut Undo,
) -> (Evaluation, bool) {
    let Counter::Calendar { count } = &mut cell.counter else {
        return (
            calendar_window::evaluate(None, now, cost, limit, end).0,
            false,
        );
    };
    let state = CalendarState {
        end: cell.fresh_at,
        count: *count,
    };
    let (e, next) = calendar_window::evaluate(Some(&state), now, cost, limit, end);
    if write && e.admit {
        undo.fresh_at = cell.fresh_at;
        undo.a = *count;
        *count = next.count;
        cell.fresh_at = next.end;
        return (e, true);
    }
    (e, false)
}

/// The end of the UTC calendar window of `len` ns containing `now`.
#[inline(always)]
fn utc_end(now: Nanos, len: u64) -> Nanos {
    Nanos((now.0 - now.0 % len).saturating_add(len))
}

/// Puts back what `scope_locked`'s loop wrote (each `undo` with a cell):
/// every counter as it was before the decision.
#[cold]
fn undo_writes(g: &mut Group, steps: &[Step], undo: &[Undo]) {
    for (step, u) in steps.iter().zip(undo) {
        if u.cell == Undo::NOT_WRITTEN {
            continue;
        }
        let cell = &mut g.cells[usize::from(u.cell)];
        cell.fresh_at = u.fresh_at;
        match (&step.algorithm, &mut cell.counter) {
            (StepAlgorithm::Gcra { .. }, Counter::Gcra) => {}
            (
                StepAlgorithm::Calendar { .. } | StepAlgorithm::ZonedCalendar { .. },
                Counter::Calendar { count },
            ) => *count = u.a,
            (StepAlgorithm::Sliding { .. }, Counter::Sliding(log)) => {
                *log = SlidingState::One(sliding_window::Entry { at: u.a, cost: u.b });
            }
            _ => unreachable!("the loop writes only these states, in place"),
        }
    }
}

/// Writes the counters `scope_locked`'s loop left for after it (those
/// whose result admits and whose `undo` has no cell): new counters, added
/// to the entry, and counters not in their algorithm's usual state.
/// Evaluated again on the cell as it is (the same state the loop
/// evaluated: the loop wrote other counters only), then written as the
/// general path writes them. When the new counters do not fit (the entry
/// or the store), puts back what the loop wrote, writes nothing, and
/// returns what to do.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn write_later(
    g: &mut Group,
    low: u64,
    steps: &[Step],
    results: &[LimitResult],
    undo: &[Undo],
    now: Nanos,
    room: &Room,
) -> Option<Locked> {
    let left = || {
        steps
            .iter()
            .zip(results)
            .zip(undo)
            .filter(|((_, r), u)| r.eval.admit && u.cell == Undo::NOT_WRITTEN)
            .map(|((step, r), _)| (step, r.cost))
    };
    let new = left()
        .filter(|(step, _)| g.find(low ^ step.name_hash).is_none())
        .count();
    if new > g.free() {
        undo_writes(g, steps, undo);
        return Some(Locked::Grow {
            at: 0,
            cells: usize::from(g.len) + new,
        });
    }
    if new > 0 && !room.reserve(new) {
        undo_writes(g, steps, undo);
        return Some(Locked::Full);
    }
    for (step, c) in left() {
        let t = low ^ step.name_hash;
        let k = match g.find(t) {
            Some(k) => k,
            None => g.push(t),
        };
        let cell = &mut g.as_mut_slice()[k];
        let mut next = Next::OnCommit;
        let params = step.algorithm.params_at(now);
        evaluate(cell, &params, c, now, &mut next);
        if !write_next(cell, &next, &params, c, now) {
            commit(cell, &params, c, now, 0);
        }
    }
    None
}

/// Marks "no counter yet" in `decide_groups`' index array.
const NO_CELL: u8 = u8::MAX;

/// Test hook for loom models (A4): counters outside the map, decided through
/// the same locking path as [`MemoryStore::decide_now`] (the map's locks do
/// not run under loom). Only built with `--cfg tollgate_loom`.
#[cfg(tollgate_loom)]
#[doc(hidden)]
#[derive(Debug)]
pub struct LoomSlot(Box<Slot>);

#[cfg(tollgate_loom)]
use crate::policy::{CompiledPolicy, OperationId, PlanId};

#[cfg(tollgate_loom)]
impl Default for LoomSlot {
    fn default() -> Self {
        LoomSlot(Slot::with_capacity(MAX_LIMITS_PER_REQUEST).expect("within the cap"))
    }
}

#[cfg(tollgate_loom)]
impl LoomSlot {
    /// Decides the one-scope limits of `operation` under `plan` (see
    /// [`MemoryStore::decide_scope`]) against `slot` with `scope_locked`,
    /// the one-scope path's locked part; returns whether admitted and each
    /// limit's `remaining`, or `None` if the slot was dead (or the limits
    /// do not take the one-scope path).
    #[doc(hidden)]
    pub fn decide_scope(
        now: Nanos,
        values: u128,
        policy: &CompiledPolicy,
        (plan, operation): (PlanId, OperationId),
        cost: Option<u64>,
        slot: &LoomSlot,
    ) -> Option<(bool, Vec<u64>)> {
        let program = policy.one_scope(plan, operation)?;
        let room = Room {
            live: AtomicUsize::new(0),
            max: usize::MAX,
        };
        let mut decision = Decision::new(now);
        match scope_locked::<MAX_LIMITS_PER_REQUEST, _>(
            slot.0.lock(),
            now,
            values,
            program,
            cost,
            &room,
            &mut decision,
        ) {
            Locked::Decided(admitted) => Some((
                admitted,
                decision
                    .results()
                    .iter()
                    .map(|r| r.eval.remaining)
                    .collect(),
            )),
            Locked::Full | Locked::Grow { .. } => None,
        }
    }

    /// Decides `checks` (distinct keys) against `slots`, one scope entry per
    /// check, with `decide_locked`; `None` if a slot was dead.
    #[doc(hidden)]
    pub fn decide(
        now: Nanos,
        checks: &[Check],
        slots: &[&LoomSlot],
        out: &mut [Evaluation],
    ) -> Option<bool> {
        let n = checks.len().min(MAX_LIMITS_PER_REQUEST);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| checks[i].key);
        let mut scope_of = vec![0u8; n];
        for (j, &i) in order.iter().enumerate() {
            scope_of[i] = j as u8;
        }
        let sorted: Vec<Option<&Slot>> = order.iter().map(|&i| Some(&*slots[i].0)).collect();
        let room = Room {
            live: AtomicUsize::new(0),
            max: usize::MAX,
        };
        match decide_locked::<MAX_LIMITS_PER_REQUEST>(
            now,
            &checks[..n],
            0,
            out,
            &sorted,
            &scope_of,
            &room,
        ) {
            Locked::Decided(admitted) => Some(admitted),
            Locked::Full | Locked::Grow { .. } => None,
        }
    }
}

/// Evaluates one check against its counter, without changing it; writes
/// into `next` the state to write if the request is admitted.
#[inline]
fn evaluate(counter: &Cell, params: &Params, cost: u64, now: Nanos, next: &mut Next) -> Evaluation {
    match params {
        Params::Gcra(rate) => evaluate_gcra(counter, rate, cost, now, next),
        Params::Sliding(window) => evaluate_sliding(counter, window, cost, now, next),
        &Params::Calendar { limit, end } => evaluate_calendar(counter, limit, end, cost, now, next),
        &Params::Concurrency { limit, .. } => {
            *next = Next::OnCommit;
            match &counter.counter {
                Counter::Leases(set) => concurrency::evaluate(set, now, cost, limit),
                _ => concurrency::evaluate(&LeaseSet::default(), now, cost, limit),
            }
        }
    }
}

/// [`evaluate`] for a limit of the one-scope path: its numbers read in
/// place from its step (not copied out as [`Params`]), a calendar window's
/// end resolved only for a calendar window.
#[inline(always)]
fn evaluate_step(
    counter: &Cell,
    alg: &StepAlgorithm,
    cost: u64,
    now: Nanos,
    next: &mut Next,
) -> Evaluation {
    match alg {
        StepAlgorithm::Gcra { rate, .. } | StepAlgorithm::WideGcra { rate } => {
            evaluate_gcra(counter, rate, cost, now, next)
        }
        StepAlgorithm::Sliding { window } => evaluate_sliding(counter, window, cost, now, next),
        &StepAlgorithm::Calendar { limit, len } => {
            evaluate_calendar(counter, limit, utc_end(now, len), cost, now, next)
        }
        StepAlgorithm::ZonedCalendar { limit, calendar } => {
            evaluate_calendar(counter, *limit, calendar.window(now).1, cost, now, next)
        }
    }
}

#[inline(always)]
fn evaluate_gcra(
    counter: &Cell,
    rate: &GcraRate,
    cost: u64,
    now: Nanos,
    next: &mut Next,
) -> Evaluation {
    let (e, tat) = gcra(counter.tat(), now, cost, rate);
    *next = Next::Gcra(tat);
    e
}

#[inline(always)]
fn evaluate_sliding(
    counter: &Cell,
    window: &SlidingWindow,
    cost: u64,
    now: Nanos,
    next: &mut Next,
) -> Evaluation {
    let state = match &counter.counter {
        Counter::Sliding(s) => s,
        _ => &SlidingState::Empty,
    };
    // The log is written in place on commit (it may hold a ring).
    *next = Next::Sliding;
    state.evaluate(now, cost, window)
}

#[inline(always)]
fn evaluate_calendar(
    counter: &Cell,
    limit: u64,
    end: Nanos,
    cost: u64,
    now: Nanos,
    next: &mut Next,
) -> Evaluation {
    let state = counter.calendar();
    let (e, state) = calendar_window::evaluate(state.as_ref(), now, cost, limit, end);
    *next = Next::Calendar(state);
    e
}

/// Writes an admitted limit's counter with the state `next` computed when
/// it was evaluated (a sliding window records `cost` on its log, whose
/// numbers are `params`); returns `false`, writing nothing, for
/// [`Next::OnCommit`] (the caller then calls [`commit`]).
#[inline(always)]
fn write_next(cell: &mut Cell, next: &Next, params: &Params, cost: u64, now: Nanos) -> bool {
    match next {
        Next::OnCommit => return false,
        &Next::Gcra(tat) => {
            // Already a bucket (the usual case): nothing to drop or write.
            if !matches!(cell.counter, Counter::Gcra) {
                cell.counter = Counter::Gcra;
            }
            cell.fresh_at = tat;
        }
        &Next::Calendar(state) => {
            cell.fresh_at = state.end;
            match &mut cell.counter {
                Counter::Calendar { count } => *count = state.count,
                other => *other = Counter::Calendar { count: state.count },
            }
        }
        Next::Sliding => {
            let Params::Sliding(window) = params else {
                return false;
            };
            if !matches!(cell.counter, Counter::Sliding(_)) {
                cell.counter = Counter::Sliding(SlidingState::Empty);
            }
            if let Counter::Sliding(log) = &mut cell.counter {
                log.record_admitted(now, cost, window);
                // `now` plus the admitting evaluation's reset, without
                // going through its `Duration`.
                cell.fresh_at = log.empty_at(now, window.length);
            }
        }
    }
    true
}

/// Takes an admitted check's cost from its counter, evaluated again on the
/// state as it is now: for leases, and for a counter that an earlier check of
/// the same request already took from (so that both count).
fn commit(s: &mut Cell, params: &Params, cost: u64, now: Nanos, lease: u64) {
    match *params {
        Params::Gcra(rate) => {
            let (e, next) = gcra(s.tat(), now, cost, &rate);
            if e.admit {
                s.counter = Counter::Gcra;
                s.fresh_at = next;
            }
        }
        Params::Sliding(window) => {
            // In place: the log's ring keeps its capacity (no allocation per
            // decision once it has reached its high-water size).
            if !matches!(s.counter, Counter::Sliding(_)) {
                s.counter = Counter::Sliding(SlidingState::Empty);
            }
            let Counter::Sliding(log) = &mut s.counter else {
                unreachable!("set just above")
            };
            let e = log.admit(now, cost, &window);
            if e.admit {
                s.fresh_at = now.after(e.reset);
            }
        }
        Params::Calendar { limit, end } => {
            let state = s.calendar();
            let (e, next) = calendar_window::evaluate(state.as_ref(), now, cost, limit, end);
            if e.admit {
                s.fresh_at = next.end;
                s.counter = Counter::Calendar { count: next.count };
            }
        }
        Params::Concurrency { limit, ttl } => {
            if !matches!(s.counter, Counter::Leases(_)) {
                s.counter = Counter::Leases(Box::default());
            }
            let Counter::Leases(set) = &mut s.counter else {
                unreachable!("set just above")
            };
            concurrency::acquire(set, now, cost, limit, ttl, lease);
            s.fresh_at = set
                .leases
                .iter()
                .map(|l: &Lease| l.expires)
                .max()
                .unwrap_or(now)
                .max(s.fresh_at);
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

    fn as_memory(&self) -> Option<&MemoryStore> {
        Some(self)
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

    /// A check on counter `tag` of scope `scope`.
    fn in_scope(scope: u64, tag: u64, params: Params) -> Check {
        Check {
            key: CounterKey((u128::from(scope) << 64) | u128::from(tag)),
            params,
            cost: 1,
            blocking: true,
        }
    }

    #[test]
    fn a_growing_scope_entry_keeps_every_counter_exactly() {
        // One scope, counters added one request at a time: its entry is
        // made for one counter and grows (1, 2, 3, 4, 8, 16, 32, 64), its
        // counters moved each time; each must keep its count.
        let store = MemoryStore::default();
        let now = Nanos::from_secs(100);
        let mut one = [Evaluation::default(); 1];
        for n in 1..=40u64 {
            for tag in 1..=n {
                assert!(
                    store
                        .decide_now(now, &[in_scope(7, tag, bucket(1_000))], 0, &mut one)
                        .unwrap()
                );
                // Counter `tag` has taken one per round since round `tag`.
                assert_eq!(
                    one[0].remaining,
                    1_000 - (n - tag + 1),
                    "counter {tag}, round {n}"
                );
            }
        }
        assert_eq!(store.len(), 40);
        // Three new counters of one request in a full entry of 40 (room for 64)
        // and then past 64: the entry grows under the request, all-or-nothing.
        let mut three = [Evaluation::default(); 3];
        for base in [100, 200, 300, 400, 500, 600, 700, 800] {
            let checks = [
                in_scope(7, base, bucket(5)),
                in_scope(7, base + 1, bucket(5)),
                in_scope(7, 1, bucket(1_000)),
            ];
            assert!(store.decide_now(now, &checks, 0, &mut three).unwrap());
            assert_eq!(three[0].remaining, 4);
        }
        assert_eq!(store.len(), 56);
        assert!(
            store
                .decide_now(now, &[in_scope(7, 1, bucket(1_000))], 0, &mut one)
                .unwrap()
        );
        assert_eq!(
            one[0].remaining,
            1_000 - 40 - 8 - 1,
            "counter 1 lost nothing in the moves"
        );
    }

    /// The entry of a scope of three counters fits two cache lines (it was
    /// 136 B, three lines, with 40-byte cells): what a 1M-key store misses
    /// per decision.
    #[test]
    fn three_counters_fit_two_cache_lines() {
        use crate::algorithm::sliding_window::Entry;
        assert_eq!(size_of::<Entry>(), 12);
        assert_eq!(size_of::<SlidingState>(), 16);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<Cell>(), 32);
        assert!(size_of::<Slot<[Cell; 3]>>() <= 112);
        assert!(size_of::<Slot<[Cell; 1]>>() <= 48);
    }

    #[test]
    fn a_scope_holds_at_most_max_counters_per_scope() {
        let store = MemoryStore::default();
        let now = Nanos::from_secs(100);
        let mut one = [Evaluation::default(); 1];
        for tag in 0..MAX_COUNTERS_PER_SCOPE as u64 {
            assert!(
                store
                    .decide_now(now, &[in_scope(9, tag, bucket(2))], 0, &mut one)
                    .unwrap()
            );
        }
        assert_eq!(
            store.decide_now(now, &[in_scope(9, 999, bucket(2))], 0, &mut one),
            Err(StoreError::CounterCapReached {
                cap: DEFAULT_MAX_COUNTERS
            })
        );
        // The others are intact, and other scopes unaffected.
        assert!(
            store
                .decide_now(now, &[in_scope(9, 0, bucket(2))], 0, &mut one)
                .unwrap()
        );
        assert_eq!(one[0].remaining, 0);
        assert!(
            store
                .decide_now(now, &[in_scope(10, 999, bucket(2))], 0, &mut one)
                .unwrap()
        );
        assert_eq!(store.len(), MAX_COUNTERS_PER_SCOPE + 1);
    }

    #[test]
    fn sweep_keeps_the_live_counters_of_a_partly_fresh_entry() {
        let store = MemoryStore::default();
        let now = Nanos::from_secs(100);
        let mut one = [Evaluation::default(); 1];
        // Counters 0..6 of one scope: even ones take 1 (fresh after 1 s),
        // odd ones 50 (fresh after 50 s).
        for tag in 0..6u64 {
            let mut check = in_scope(3, tag, bucket(100));
            check.cost = if tag % 2 == 0 { 1 } else { 50 };
            assert!(store.decide_now(now, &[check], 0, &mut one).unwrap());
        }
        let later = now.plus(Duration::from_secs(2));
        assert_eq!(store.sweep(later), 3);
        assert_eq!(store.len(), 3);
        for tag in [1u64, 3, 5] {
            assert!(
                store
                    .decide_now(later, &[in_scope(3, tag, bucket(100))], 0, &mut one)
                    .unwrap()
            );
            // 100 - 50 + 2 refilled - 1.
            assert_eq!(one[0].remaining, 51, "counter {tag} kept its count");
        }
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

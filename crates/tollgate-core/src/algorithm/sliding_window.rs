//! "At most N in any window of length T": a sliding log of admissions.
//!
//! A *window of length T* is a half-open span `[t, t + T)`: a unit admitted at
//! `a` counts against every decision at `now` with `a ≤ now < a + T`, and is
//! back exactly `T` after it was taken. (So `Retry-After` never exceeds T.)
//!
//! The state is a log of entries `(at, cost)`, oldest first. A request of
//! cost `c` is admitted when the cost of the entries still in the window,
//! plus `c`, is at most N; it is then appended at `now`. Entries are *merged*
//! only in the safe direction: an admission joins the newest entry, which is
//! stamped with the later of the two instants, so merged cost is never taken
//! as older than it is and never comes back early. Two precisions:
//!
//! - [`Precision::Exact`] (default): entries merge only when they share the
//!   same nanosecond. The log is then the exact sliding log: it admits
//!   exactly what an ideal "N per T" limiter admits (A9: wrong decisions 0).
//!   It holds at most `min(N, admissions in the last T)` entries of 16 B, so
//!   policy validation allows it for N ≤ [`MAX_EXACT_LIMIT`] (16 KiB at most
//!   per counter, reached only by a key admitted 1,024 times within T). An
//!   account override may raise N above that: the log then keeps at most
//!   [`MAX_EXACT_LIMIT`] entries and merges into the newest beyond it (safe,
//!   slightly conservative).
//! - [`Precision::Approximate`]: for very large N (9,000 per day): admissions
//!   within the same sub-window of width `g = ⌈T / 15⌉` (aligned on the
//!   epoch) merge into one entry stamped with the latest of them, so the log
//!   holds at most [`APPROXIMATE_ENTRIES`] = 16 entries (≤ 256 B), whatever
//!   N. A unit then comes back between T and T + g after it was taken, never
//!   earlier: safe, up to one sub-window conservative.
//!
//! In memory a log of one entry is held inline (no allocation: the common case
//! of a key seen once per window); from the second entry it moves to a
//! growable ring on the heap, which keeps its capacity while the counter
//! lives (no allocation per decision once a key's log has reached its
//! high-water size).
//!
//! `retry_after` is exact for the rule: the request is refused one nanosecond
//! before it and admitted at it, assuming no other traffic; it is at most T
//! (unless the clock stepped back) and never zero when waiting is needed.

use std::collections::VecDeque;
use std::time::Duration;

use super::Evaluation;
use crate::clock::{Nanos, duration_nanos};

/// Largest N an exact window accepts in a policy (and the most entries an
/// exact log keeps). Larger limits need `precision = "approximate"`.
pub const MAX_EXACT_LIMIT: u32 = 1_024;
/// Most entries an approximate log keeps.
pub const APPROXIMATE_ENTRIES: u32 = 16;
/// Longest window: 100 days (the Redis script computes instants' differences
/// as doubles, exact below 2^53 ns ≈ 104 days).
pub const MAX_LENGTH: Duration = Duration::from_secs(100 * 86_400);

/// How closely a sliding window follows the ideal sliding log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// An exact sliding log (N ≤ [`MAX_EXACT_LIMIT`]).
    #[default]
    Exact,
    /// Admissions merged per sub-window of `⌈T / 15⌉`: at most 16 entries.
    Approximate,
}

/// The numbers of a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindow {
    /// N: units allowed in any window.
    pub limit: u64,
    /// T, in nanoseconds.
    pub length: u64,
    /// Approximate: admissions in the same sub-window of `granule` ns
    /// (`⌈T / 15⌉`, aligned on the epoch) merge. Exact: 0 (admissions merge
    /// only at the same nanosecond). Kept in this one field so that
    /// [`crate::store::Params`] stays 32 bytes.
    pub granule: u64,
}

impl SlidingWindow {
    /// An exact window admitting `limit` units per `window`. `limit` must fit
    /// in `u32` (policy validation enforces it) and `window` must be non-zero.
    pub fn new(limit: u32, window: Duration) -> SlidingWindow {
        SlidingWindow::with_precision(limit, window, Precision::Exact)
    }

    /// A window of the given precision.
    pub fn with_precision(limit: u32, window: Duration, precision: Precision) -> SlidingWindow {
        let length = duration_nanos(window).max(1);
        SlidingWindow {
            limit: u64::from(limit),
            length,
            granule: match precision {
                Precision::Exact => 0,
                Precision::Approximate => length.div_ceil(u64::from(APPROXIMATE_ENTRIES) - 1),
            },
        }
    }

    /// Exact or approximate.
    pub fn precision(&self) -> Precision {
        if self.granule == 0 {
            Precision::Exact
        } else {
            Precision::Approximate
        }
    }

    /// The same window with another N (an account override).
    pub fn with_limit(&self, limit: u32) -> SlidingWindow {
        SlidingWindow {
            limit: u64::from(limit),
            ..*self
        }
    }

    /// Most entries a log of this window keeps before merging into the newest.
    pub fn max_entries(&self) -> usize {
        match self.precision() {
            Precision::Exact => MAX_EXACT_LIMIT as usize,
            Precision::Approximate => APPROXIMATE_ENTRIES as usize,
        }
    }
}

/// One entry of a log: `cost` admitted at `at` (ns), the latest instant of
/// the admissions merged into it.
///
/// 12 bytes, aligned on 4 (`packed(4)`): a [`SlidingState`] holding one
/// entry inline is then 16 bytes, not 24, and so is the in-memory store's
/// counter (its entry of three counters fits two cache lines); a log's ring
/// takes 12 bytes per entry. Fields are read by value (no reference to
/// `at`, which may sit on a 4-byte boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct Entry {
    /// Instant, nanoseconds.
    pub at: u64,
    /// Cost (saturating: an entry of `u32::MAX` blocks every N until it leaves).
    pub cost: u32,
}

/// A log of more than one entry, on the heap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Log {
    /// Sum of the entries' costs.
    total: u64,
    entries: VecDeque<Entry>,
}

/// The admissions of one counter still to leave its window (or already
/// left: they are dropped when the next admission is written).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SlidingState {
    /// Nothing admitted.
    #[default]
    Empty,
    /// One entry, inline.
    One(Entry),
    /// Several entries.
    Many(Box<Log>),
}

impl SlidingState {
    /// The entries, oldest first, as two slices.
    pub fn entries(&self) -> (&[Entry], &[Entry]) {
        match self {
            SlidingState::Empty => (&[], &[]),
            SlidingState::One(e) => (std::slice::from_ref(e), &[]),
            SlidingState::Many(l) => l.entries.as_slices(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        let (a, b) = self.entries();
        a.iter().chain(b)
    }

    fn newest(&self) -> Option<&Entry> {
        match self {
            SlidingState::Empty => None,
            SlidingState::One(e) => Some(e),
            SlidingState::Many(l) => l.entries.back(),
        }
    }

    /// Cost still in the window at `now`, and how many (oldest) entries left it.
    fn live(&self, now: u64, length: u64) -> (u64, usize) {
        let log = match self {
            SlidingState::Empty => return (0, 0),
            SlidingState::One(e) if now < e.at.saturating_add(length) => {
                return (u64::from(e.cost), 0);
            }
            SlidingState::One(_) => return (0, 1),
            SlidingState::Many(log) => log,
        };
        let mut used = log.total;
        let mut gone = 0;
        for e in &log.entries {
            if now < e.at.saturating_add(length) {
                break;
            }
            used -= u64::from(e.cost);
            gone += 1;
        }
        (used, gone)
    }

    /// Number of entries held (live or not yet dropped).
    pub fn len(&self) -> usize {
        match self {
            SlidingState::Empty => 0,
            SlidingState::One(_) => 1,
            SlidingState::Many(l) => l.entries.len(),
        }
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held beyond the state itself.
    pub fn heap_bytes(&self) -> usize {
        match self {
            SlidingState::Many(l) => size_of::<Log>() + l.entries.capacity() * size_of::<Entry>(),
            _ => 0,
        }
    }

    /// Evaluates `cost` at `now` without changing anything.
    #[inline]
    pub fn evaluate(&self, now: Nanos, cost: u64, window: &SlidingWindow) -> Evaluation {
        // At most one entry (the usual case: a key seen once, or within one
        // sub-window): [`SlidingState::evaluate_log`]'s rules without its
        // walk. A unit test compares the two.
        let (now, t) = (now.0, window.length);
        let (used, newest) = match self {
            SlidingState::Empty => (0, None),
            SlidingState::One(e) if now < e.at.saturating_add(t) => (u64::from(e.cost), Some(e.at)),
            SlidingState::One(e) => (0, Some(e.at)),
            SlidingState::Many(_) => return self.evaluate_log(Nanos(now), cost, window),
        };
        let end = |at: u64| until(now, at.saturating_add(t));
        // Until the cost now in the window has left it (an entry's cost is
        // never 0, so `used > 0` means the one entry is live).
        let reset = || match newest {
            Some(at) if used > 0 => end(at),
            _ => Nanos::ZERO,
        };
        if cost > window.limit {
            return Evaluation::never(window.limit.saturating_sub(used), reset());
        }
        if used + cost <= window.limit {
            return Evaluation {
                admit: true,
                never: false,
                remaining: window.limit - used - cost,
                // Recorded at `now`, or merged into a newer entry.
                reset: if cost > 0 {
                    end(newest.map_or(now, |at| at.max(now)))
                } else {
                    reset()
                },
                retry_after: Nanos::ZERO,
            };
        }
        // Refused: the one entry is live, and its leaving frees enough
        // (`cost <= N`): the wait is until it leaves, as is the reset.
        let reset = reset();
        Evaluation {
            admit: false,
            never: false,
            remaining: window.limit - used.min(window.limit),
            reset,
            retry_after: reset,
        }
    }

    /// [`SlidingState::evaluate`] of any log, walking its entries.
    #[inline(never)]
    fn evaluate_log(&self, now: Nanos, cost: u64, window: &SlidingWindow) -> Evaluation {
        let (now, t) = (now.0, window.length);
        let (used, gone) = self.live(now, t);
        let newest = self.newest().map(|e| e.at);
        // Until the cost now in the window has left it.
        let reset = || match newest {
            Some(at) if used > 0 => until(now, at.saturating_add(t)),
            _ => Nanos::ZERO,
        };
        if cost > window.limit {
            return Evaluation::never(window.limit.saturating_sub(used), reset());
        }
        if used + cost <= window.limit {
            let reset = if cost > 0 {
                // Recorded at `now`, or merged into a newer entry.
                let newest = newest.map_or(now, |at| at.max(now));
                until(now, newest.saturating_add(t))
            } else {
                reset()
            };
            return Evaluation {
                admit: true,
                never: false,
                remaining: window.limit - used - cost,
                reset,
                retry_after: Nanos::ZERO,
            };
        }
        // Walk from the oldest entry in the window until enough cost has left it.
        let excess = used + cost - window.limit;
        let mut freed = 0u64;
        let mut retry_after = Nanos::ZERO;
        for e in self.iter().skip(gone) {
            freed += u64::from(e.cost);
            if freed >= excess {
                retry_after = until(now, e.at.saturating_add(t));
                break;
            }
        }
        Evaluation {
            admit: false,
            never: false,
            remaining: window.limit - used.min(window.limit),
            reset: reset(),
            retry_after,
        }
    }

    /// Evaluates `cost` at `now` and, if it is admitted, records it (and
    /// drops the entries that left the window). Allocates only when the log
    /// grows past one entry or past its ring's capacity.
    pub fn admit(&mut self, now: Nanos, cost: u64, window: &SlidingWindow) -> Evaluation {
        let e = self.evaluate(now, cost, window);
        if e.admit {
            self.record_admitted(now, cost, window);
        }
        e
    }

    /// Records `cost` at `now` (and drops the entries that left the window),
    /// for a request that [`SlidingState::evaluate`] admitted on this same
    /// state: what [`SlidingState::admit`] does after evaluating, without
    /// evaluating again.
    pub fn record_admitted(&mut self, now: Nanos, cost: u64, window: &SlidingWindow) {
        if self.merge_one(now, cost, window).is_none() {
            self.record_any(now, cost, window);
        }
    }

    /// [`SlidingState::record_admitted`] in its usual case only: one live
    /// entry that this admission merges into (the same instant or later,
    /// or the same sub-window), what `prune` and `record` below do then,
    /// without their matches. Returns the entry as it was (the in-memory
    /// store puts it back if the request is refused after all), or `None`,
    /// changing nothing, in any other case.
    #[inline(always)]
    pub(crate) fn merge_one(
        &mut self,
        now: Nanos,
        cost: u64,
        window: &SlidingWindow,
    ) -> Option<Entry> {
        if let SlidingState::One(last) = self {
            let (n, g) = (now.0, window.granule);
            if cost > 0
                && n < last.at.saturating_add(window.length)
                && (last.at >= n || (g > 0 && last.at / g == n / g))
            {
                let was = *last;
                merge(last, n, u32::try_from(cost).unwrap_or(u32::MAX));
                return Some(was);
            }
        }
        None
    }

    /// [`SlidingState::evaluate`] and, when `write` and it admits,
    /// [`SlidingState::merge_one`], in one: the usual state of a busy key
    /// (one live entry that the cost merges into: the same instant or later,
    /// or the same sub-window) decided and written with each comparison
    /// made once. Returns the evaluation, and the entry as it was when the
    /// cost was merged into it (then `self` is written and its entry ends
    /// the window at `now` plus the evaluation's reset). Any other state:
    /// [`SlidingState::evaluate`] alone, nothing written. A unit test
    /// compares it with the two calls.
    #[inline(always)]
    pub(crate) fn evaluate_merge_one(
        &mut self,
        now: Nanos,
        cost: u64,
        window: &SlidingWindow,
        write: bool,
    ) -> (Evaluation, Option<Entry>) {
        if let SlidingState::One(last) = self {
            let (n, g, t) = (now.0, window.granule, window.length);
            let was = *last;
            let end = was.at.saturating_add(t);
            let used = u64::from(was.cost);
            if n < end
                && cost > 0
                && cost <= window.limit
                && used + cost <= window.limit
                && (was.at >= n || (g > 0 && was.at / g == n / g))
            {
                // Admitted, and merged: stamped with the later instant.
                let at = was.at.max(n);
                let eval = Evaluation {
                    admit: true,
                    never: false,
                    remaining: window.limit - used - cost,
                    reset: until(n, at.saturating_add(t)),
                    retry_after: Nanos::ZERO,
                };
                if !write {
                    return (eval, None);
                }
                merge(last, n, u32::try_from(cost).unwrap_or(u32::MAX));
                return (eval, Some(was));
            }
        }
        (self.evaluate(now, cost, window), None)
    }

    /// [`SlidingState::record_admitted`] of any log.
    #[inline(never)]
    fn record_any(&mut self, now: Nanos, cost: u64, window: &SlidingWindow) {
        self.prune(now.0, window.length);
        self.record(now.0, cost, window);
    }

    /// When a log just written by [`SlidingState::record_admitted`] at
    /// `now` is back to empty: its newest entry leaves a window of `length`
    /// ns then (`now` if it holds none). The same instant as `now` plus the
    /// admitting evaluation's `reset`: entries are stamped in non-decreasing
    /// order and none has cost 0.
    #[inline]
    pub(crate) fn empty_at(&self, now: Nanos, length: u64) -> Nanos {
        self.newest()
            .map_or(now, |e| Nanos(e.at.saturating_add(length)))
    }

    fn prune(&mut self, now: u64, length: u64) {
        match self {
            SlidingState::Empty => {}
            SlidingState::One(e) => {
                if now >= e.at.saturating_add(length) {
                    *self = SlidingState::Empty;
                }
            }
            SlidingState::Many(l) => {
                while let Some(e) = l.entries.front() {
                    if now < e.at.saturating_add(length) {
                        break;
                    }
                    l.total -= u64::from(e.cost);
                    l.entries.pop_front();
                }
            }
        }
    }

    fn record(&mut self, now: u64, cost: u64, window: &SlidingWindow) {
        if cost == 0 {
            return;
        }
        let c = u32::try_from(cost).unwrap_or(u32::MAX);
        let fresh = Entry { at: now, cost: c };
        let len = self.len();
        let g = window.granule;
        let merges = |last: &Entry| {
            last.at >= now || (g > 0 && last.at / g == now / g) || len >= window.max_entries()
        };
        match self {
            SlidingState::Empty => *self = SlidingState::One(fresh),
            SlidingState::One(last) if merges(last) => merge(last, now, c),
            SlidingState::One(last) => {
                let mut entries = VecDeque::with_capacity(4);
                entries.push_back(*last);
                entries.push_back(fresh);
                *self = SlidingState::Many(Box::new(Log {
                    total: u64::from(last.cost) + cost,
                    entries,
                }));
            }
            SlidingState::Many(l) => {
                l.total += cost;
                match l.entries.back_mut() {
                    Some(last) if merges(last) => merge(last, now, c),
                    _ => l.entries.push_back(fresh),
                }
            }
        }
    }
}

/// Adds `cost` at `now` to `last`, stamped with the later instant (safe:
/// the merged cost never leaves the window earlier than it should).
#[inline]
fn merge(last: &mut Entry, now: u64, cost: u32) {
    last.at = last.at.max(now);
    last.cost = last.cost.saturating_add(cost);
}

/// Evaluates `cost` at `now`. Returns the evaluation and the state to store if
/// admitted (a copy: the in-memory store uses [`SlidingState::admit`] in place).
pub fn evaluate(
    state: Option<&SlidingState>,
    now: Nanos,
    cost: u64,
    window: &SlidingWindow,
) -> (Evaluation, SlidingState) {
    let mut next = state.cloned().unwrap_or_default();
    let e = next.admit(now, cost, window);
    (e, next)
}

/// Whether a stored state holds nothing that still counts at `now` (safe to drop).
pub fn is_fresh(state: &SlidingState, now: Nanos, window: &SlidingWindow) -> bool {
    state.live(now.0, window.length).0 == 0
}

fn until(now: u64, at: u64) -> Nanos {
    Nanos(at.saturating_sub(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift for the randomized tests below (seeded: repeatable).
    fn rng(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m.max(1)
        }
    }

    /// `evaluate`'s path for at most one entry answers as the log's walk.
    #[test]
    fn the_one_entry_path_gives_the_log_walks_answer() {
        let mut next = rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200_000 {
            let scale = [4, 1_000, u64::MAX / 2][next(3) as usize];
            let precision = [Precision::Exact, Precision::Approximate][next(2) as usize];
            let w = SlidingWindow::with_precision(
                1 + next(20) as u32,
                Duration::from_nanos(1 + next(scale)),
                precision,
            );
            let now = Nanos(next(u64::MAX));
            let s = match next(3) {
                0 => SlidingState::Empty,
                1 => SlidingState::One(Entry {
                    at: now.0.saturating_sub(next(scale)),
                    cost: 1 + next(25) as u32,
                }),
                _ => SlidingState::One(Entry {
                    at: now.0.saturating_add(next(scale)),
                    cost: 1 + next(25) as u32,
                }),
            };
            let cost = next(25);
            assert_eq!(
                s.evaluate(now, cost, &w),
                s.evaluate_log(now, cost, &w),
                "{s:?} {now:?} {cost} {w:?}"
            );
        }
    }

    /// `evaluate_merge_one` answers as `evaluate`, and writes what
    /// `merge_one` writes after an admitting evaluation (nothing otherwise).
    #[test]
    fn evaluate_merge_one_is_evaluate_then_merge_one() {
        let mut next = rng(0x5851_F42D_4C95_7F2D);
        let mut merged = 0;
        for _ in 0..300_000 {
            let scale = [4, 1_000, u64::MAX / 2][next(3) as usize];
            let precision = [Precision::Exact, Precision::Approximate][next(2) as usize];
            let w = SlidingWindow::with_precision(
                1 + next(40) as u32,
                Duration::from_nanos(1 + next(scale)),
                precision,
            );
            let now = Nanos(next(u64::MAX));
            let mut fused = match next(4) {
                0 => SlidingState::Empty,
                1 => SlidingState::One(Entry {
                    at: now.0.saturating_sub(next(scale)),
                    cost: 1 + next(25) as u32,
                }),
                2 => SlidingState::One(Entry {
                    at: now.0.saturating_add(next(scale)),
                    cost: 1 + next(25) as u32,
                }),
                _ => SlidingState::One(Entry {
                    at: now.0,
                    cost: 1 + next(25) as u32,
                }),
            };
            let cost = next(45);
            let write = next(4) != 0;
            let mut apart = fused.clone();
            let (e, was) = fused.evaluate_merge_one(now, cost, &w, write);
            let expected = apart.evaluate(now, cost, &w);
            assert_eq!(e, expected, "{apart:?} {now:?} {cost} {w:?}");
            let expected_was = if write && expected.admit {
                apart.merge_one(now, cost, &w)
            } else {
                None
            };
            assert_eq!(was, expected_was, "{apart:?} {now:?} {cost} {w:?}");
            assert_eq!(fused, apart, "{now:?} {cost} {w:?}");
            if was.is_some() {
                merged += 1;
                assert_eq!(fused.empty_at(now, w.length), Nanos(now.0 + e.reset.0));
            }
        }
        assert!(merged > 10_000, "merged {merged} times");
    }

    /// `record_admitted`'s one-entry path writes what `prune` and `record`
    /// write, and `empty_at` is `now` plus the admitting evaluation's reset.
    #[test]
    fn recording_fast_and_slow_agree_and_empty_at_is_now_plus_reset() {
        let mut next = rng(0x2545_F491_4F6C_DD1D);
        for _ in 0..2_000 {
            let precision = [Precision::Exact, Precision::Approximate][next(2) as usize];
            let w = SlidingWindow::with_precision(
                1 + next(40) as u32,
                Duration::from_nanos(1 + next(1_000)),
                precision,
            );
            let mut fast = SlidingState::default();
            let mut now = 1_000_000u64;
            for _ in 0..100 {
                // Mostly forward, sometimes a step back.
                now = (now + next(300)).saturating_sub(next(50));
                let (at, cost) = (Nanos(now), next(4));
                let e = fast.evaluate(at, cost, &w);
                if !e.admit {
                    continue;
                }
                let mut slow = fast.clone();
                fast.record_admitted(at, cost, &w);
                slow.record_any(at, cost, &w);
                assert_eq!(fast, slow);
                assert_eq!(
                    fast.empty_at(at, w.length),
                    at.plus(e.reset_duration()),
                    "{w:?}"
                );
            }
        }
    }

    #[test]
    fn sixteen_per_three_seconds() {
        let w = SlidingWindow::new(16, Duration::from_secs(3));
        let now = Nanos::from_secs(100);
        let mut s = SlidingState::default();
        for i in 0..16 {
            let e = s.admit(now, 1, &w);
            assert!(e.admit, "request {i}");
            assert_eq!(e.remaining, 15 - i);
        }
        let e = s.evaluate(now, 1, &w);
        assert!(!e.admit);
        // Exactly T after the admissions.
        assert_eq!(e.retry_after_duration(), Duration::from_secs(3));
        let at = now.plus(e.retry_after_duration());
        assert!(!s.evaluate(Nanos(at.0 - 1), 1, &w).admit);
        assert!(s.evaluate(at, 1, &w).admit);
        assert_eq!(s.len(), 1, "same-instant admissions share one entry");
    }

    #[test]
    fn never_more_than_n_in_any_window_with_steady_traffic() {
        let w = SlidingWindow::new(10, Duration::from_secs(1));
        let mut s = SlidingState::default();
        let mut admitted = Vec::new();
        for step in 0..10_000u64 {
            let now = Nanos(step * 7_000_000);
            if s.admit(now, 1, &w).admit {
                admitted.push(now.0);
            }
        }
        for (i, &t) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|&&u| u < t + 1_000_000_000)
                .count();
            assert!(in_window <= 10);
        }
        // Exact: 10 per 1,001 ms (143 steps of 7 ms), 70 s → 700 ± 10.
        assert!(
            admitted.len() >= 690,
            "rate close to 10/s over 70 s: {}",
            admitted.len()
        );
        assert!(s.len() <= 10);
    }

    #[test]
    fn approximate_keeps_sixteen_entries_and_is_late_by_at_most_one_granule() {
        let t = Duration::from_secs(86_400);
        let w = SlidingWindow::with_precision(9_000, t, Precision::Approximate);
        assert_eq!(w.granule, 5_760 * Nanos::SECOND);
        let mut s = SlidingState::default();
        let start = 1_700_000_000 * Nanos::SECOND;
        let mut admitted = Vec::new();
        for i in 0..200_000u64 {
            let now = Nanos(start + i * 1_000_000_000);
            if s.admit(now, 1, &w).admit {
                admitted.push(now.0);
            }
            assert!(s.len() <= 16, "{} entries", s.len());
        }
        assert!(s.heap_bytes() <= 16 * 16 + 64);
        for (i, &a) in admitted.iter().enumerate() {
            let n = admitted[i..]
                .iter()
                .take_while(|&&u| u < a + t.as_nanos() as u64)
                .count();
            assert!(n <= 9_000);
        }
        // 200,000 s ≈ 2.3 days: the first 9,000 at once, then back within T + g.
        assert!(admitted.len() >= 18_000, "{}", admitted.len());
    }

    #[test]
    fn state_and_numbers_stay_small() {
        // One entry inline in the store's counter: 16 bytes, so that the
        // store's cell is 32 (its entry for three counters two cache lines).
        assert!(size_of::<SlidingState>() <= 16);
        assert_eq!(size_of::<Entry>(), 12);
        assert!(size_of::<crate::store::Params>() <= 32);
    }

    #[test]
    fn cost_above_limit_never_passes() {
        let w = SlidingWindow::new(5, Duration::from_secs(1));
        let (e, _) = evaluate(None, Nanos(0), 6, &w);
        assert!(e.never && !e.admit);
    }

    #[test]
    fn changing_the_window_length_never_hands_out_capacity_twice() {
        let now = Nanos::from_secs(100);
        let short = SlidingWindow::new(5, Duration::from_secs(3));
        let (_, s) = evaluate(None, now, 5, &short);
        // Longer window: the 5 still count, and come back exactly T later.
        let long = SlidingWindow::new(5, Duration::from_secs(6));
        let e = s.evaluate(now, 1, &long);
        assert!(!e.admit);
        assert_eq!(e.retry_after_duration(), Duration::from_secs(6));
        assert!(
            s.evaluate(now.plus(e.retry_after_duration()), 1, &long)
                .admit
        );
        // Shorter window: still counted until the shorter window has passed.
        let shorter = SlidingWindow::new(5, Duration::from_secs(1));
        assert!(
            !s.evaluate(now.plus(Duration::from_millis(999)), 1, &shorter)
                .admit
        );
        assert!(
            s.evaluate(now.plus(Duration::from_secs(1)), 1, &shorter)
                .admit
        );
        // Exact to approximate and back: the entries keep their instants.
        let approx =
            SlidingWindow::with_precision(5, Duration::from_secs(3), Precision::Approximate);
        assert_eq!(
            s.evaluate(now, 1, &approx).retry_after_duration(),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn fresh_after_the_window_passes() {
        let w = SlidingWindow::new(5, Duration::from_secs(3));
        let (_, s) = evaluate(None, Nanos::from_secs(10), 5, &w);
        assert!(!is_fresh(&s, Nanos(Nanos::from_secs(13).0 - 1), &w));
        assert!(is_fresh(&s, Nanos::from_secs(13), &w));
    }

    #[test]
    fn a_clock_step_back_merges_into_the_newest_entry() {
        let w = SlidingWindow::new(3, Duration::from_secs(1));
        let mut s = SlidingState::default();
        assert!(s.admit(Nanos::from_secs(10), 1, &w).admit);
        assert!(s.admit(Nanos::from_secs(9), 1, &w).admit);
        assert_eq!(s.len(), 1);
        // Both leave with the later instant.
        assert_eq!(
            s.evaluate(Nanos::from_secs(10), 2, &w)
                .retry_after_duration(),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn an_overridden_limit_above_the_exact_cap_stays_bounded() {
        let w = SlidingWindow::new(MAX_EXACT_LIMIT, Duration::from_secs(10)).with_limit(5_000);
        let mut s = SlidingState::default();
        let mut admitted = Vec::new();
        for i in 0..20_000u64 {
            let now = i * 1_000_000;
            if s.admit(Nanos(now), 1, &w).admit {
                admitted.push(now);
            }
            assert!(s.len() <= MAX_EXACT_LIMIT as usize);
        }
        for (i, &a) in admitted.iter().enumerate() {
            let n = admitted[i..]
                .iter()
                .take_while(|&&u| u < a + 10_000_000_000)
                .count();
            assert!(n <= 5_000, "{n} admitted in one window");
        }
        assert!(admitted.len() >= 5_000);
    }
}

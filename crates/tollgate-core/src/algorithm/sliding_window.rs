//! "At most N in any window of length T", with bounded state.
//!
//! An exact sliding log would keep one timestamp per admitted request (up to N
//! of them per counter: 72 KB for 9,000/day). Instead the window is cut into
//! sub-buckets of width `w = ⌈T / 15⌉` and the state is a ring of
//! [`SLOTS`] = 16 counts. A request is admitted when the sum of the current
//! bucket and the 15 before it, plus its cost, is at most N. Those 16 buckets
//! cover at least the last T nanoseconds, so:
//!
//! - **Safe, always**: the admitted cost in *every* interval of length T is at
//!   most N (the property tests check this against a sliding log).
//! - **Conservative by at most one sub-bucket**: a unit of capacity comes back
//!   between T and T + w after it was used (w = T/15: 200 ms for a 3 s window,
//!   4 s for a minute) instead of exactly T later.
//!
//! `retry_after` is exact for this rule: the request is refused one nanosecond
//! before it and admitted at it, assuming no other traffic.

use std::time::Duration;

use super::Evaluation;
use crate::clock::{Nanos, duration_nanos};

/// Number of sub-buckets kept per counter.
pub const SLOTS: usize = 16;
const SLOTS_U64: u64 = SLOTS as u64;

/// The numbers of a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindow {
    /// N: units allowed in any window.
    pub limit: u64,
    /// Sub-bucket width in nanoseconds, `⌈T / 15⌉`.
    pub width: u64,
}

impl SlidingWindow {
    /// A window admitting `limit` units per `window`. `limit` must fit in `u32`
    /// (policy validation enforces it) and `window` must be non-zero.
    pub fn new(limit: u32, window: Duration) -> SlidingWindow {
        let t = duration_nanos(window).max(1);
        SlidingWindow {
            limit: u64::from(limit),
            width: t.div_ceil(SLOTS_U64 - 1),
        }
    }
}

/// The counts of one counter: `counts[i % SLOTS]` holds bucket `i`, for the
/// buckets `head − 15 ..= head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlidingState {
    /// Index (time / width) of the newest bucket.
    pub head: u64,
    /// Sub-bucket width the indexes are in (0: unknown, taken as the current one).
    pub width: u64,
    /// Cost admitted per bucket.
    pub counts: [u32; SLOTS],
}

impl SlidingState {
    /// The state re-expressed in buckets of `width` (the window's length
    /// changed, e.g. on a policy reload). Each old bucket's cost moves to the
    /// new bucket holding the old bucket's *last* instant, so cost is never
    /// taken as older than it is: nothing is handed out twice. Cost whose
    /// latest possible instant has left the new window is dropped.
    fn rebucketed(&self, width: u64, cur: u64) -> SlidingState {
        if self.width == 0 || self.width == width {
            return SlidingState { width, ..*self };
        }
        let mut moved = [(0u64, 0u32); SLOTS];
        let mut newest = cur;
        for (back, slot_moved) in moved.iter_mut().enumerate() {
            let Some(i) = self.head.checked_sub(back as u64) else {
                break;
            };
            let count = self.counts[slot(i)];
            if count == 0 {
                continue;
            }
            let last_instant = (i + 1).saturating_mul(self.width).saturating_sub(1);
            let ni = last_instant / width;
            newest = newest.max(ni);
            *slot_moved = (ni, count);
        }
        let mut next = SlidingState {
            head: newest,
            width,
            counts: [0; SLOTS],
        };
        for (ni, count) in moved {
            if count > 0 && ni + SLOTS_U64 > newest {
                next.counts[slot(ni)] = next.counts[slot(ni)].saturating_add(count);
            }
        }
        next
    }

    /// The state moved forward to bucket `cur` (buckets that left the window zeroed).
    fn rotated(&self, cur: u64) -> SlidingState {
        if cur <= self.head {
            return *self; // same bucket, or the clock stepped back: keep everything
        }
        let mut next = *self;
        let gap = cur - self.head;
        if gap >= SLOTS_U64 {
            next.counts = [0; SLOTS];
        } else {
            for i in self.head + 1..=cur {
                next.counts[slot(i)] = 0;
            }
        }
        next.head = cur;
        next
    }

    fn sum(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// Index of the newest non-empty bucket.
    fn newest_used(&self) -> Option<u64> {
        (0..SLOTS_U64)
            .map(|back| self.head - back.min(self.head))
            .find(|&i| self.counts[slot(i)] > 0)
    }
}

fn slot(index: u64) -> usize {
    (index % SLOTS_U64) as usize
}

/// Evaluates `cost` at `now`. Returns the evaluation and the state to store if admitted.
pub fn evaluate(
    state: Option<&SlidingState>,
    now: Nanos,
    cost: u64,
    window: &SlidingWindow,
) -> (Evaluation, SlidingState) {
    let cur = now.0 / window.width;
    let state = match state {
        Some(s) => s.rebucketed(window.width, cur).rotated(cur),
        None => SlidingState {
            head: cur,
            width: window.width,
            counts: [0; SLOTS],
        },
    };
    let used = state.sum();
    let reset = |s: &SlidingState| match s.newest_used() {
        Some(i) => until(now, (i + SLOTS_U64) * window.width),
        None => Duration::ZERO,
    };
    if cost > window.limit {
        return (
            Evaluation::never(window.limit.saturating_sub(used), reset(&state)),
            state,
        );
    }
    if used + cost <= window.limit {
        let mut next = state;
        let i = slot(next.head);
        // cost ≤ limit ≤ u32::MAX and the ring sum stays ≤ limit, so this fits.
        next.counts[i] = next.counts[i].saturating_add(u32::try_from(cost).unwrap_or(u32::MAX));
        let eval = Evaluation {
            admit: true,
            never: false,
            remaining: window.limit - used - cost,
            reset: reset(&next),
            retry_after: Duration::ZERO,
        };
        return (eval, next);
    }
    // Walk from the oldest bucket until enough cost has left the window.
    let excess = used + cost - window.limit;
    let oldest = state.head.saturating_sub(SLOTS_U64 - 1);
    let mut freed = 0u64;
    let mut retry_after = Duration::ZERO;
    for i in oldest..=state.head {
        freed += u64::from(state.counts[slot(i)]);
        if freed >= excess {
            retry_after = until(now, (i + SLOTS_U64) * window.width);
            break;
        }
    }
    let eval = Evaluation {
        admit: false,
        never: false,
        remaining: window.limit - used.min(window.limit),
        reset: reset(&state),
        retry_after,
    };
    (eval, state)
}

/// Whether a stored state holds nothing that still counts at `now` (safe to drop).
pub fn is_fresh(state: &SlidingState, now: Nanos, window: &SlidingWindow) -> bool {
    let cur = now.0 / window.width;
    state.rebucketed(window.width, cur).rotated(cur).sum() == 0
}

fn until(now: Nanos, at: u64) -> Duration {
    Duration::from_nanos(at.saturating_sub(now.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_per_three_seconds() {
        let w = SlidingWindow::new(16, Duration::from_secs(3));
        assert_eq!(w.width, 200_000_000);
        let now = Nanos::from_secs(100);
        let mut s = None;
        for i in 0..16 {
            let (e, next) = evaluate(s.as_ref(), now, 1, &w);
            assert!(e.admit, "request {i}");
            assert_eq!(e.remaining, 15 - i);
            s = Some(next);
        }
        let (e, _) = evaluate(s.as_ref(), now, 1, &w);
        assert!(!e.admit);
        // now sits exactly on a bucket boundary: the bucket leaves 16 widths later.
        assert_eq!(e.retry_after, Duration::from_millis(3200));
        let at = now.plus(e.retry_after);
        assert!(!evaluate(s.as_ref(), Nanos(at.0 - 1), 1, &w).0.admit);
        assert!(evaluate(s.as_ref(), at, 1, &w).0.admit);
    }

    #[test]
    fn never_more_than_n_in_any_window_with_steady_traffic() {
        let w = SlidingWindow::new(10, Duration::from_secs(1));
        let mut s: Option<SlidingState> = None;
        let mut admitted = Vec::new();
        for step in 0..10_000u64 {
            let now = Nanos(step * 7_000_000);
            let (e, next) = evaluate(s.as_ref(), now, 1, &w);
            if e.admit {
                admitted.push(now.0);
                s = Some(next);
            }
        }
        for (i, &t) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|&&u| u < t + 1_000_000_000)
                .count();
            assert!(in_window <= 10);
        }
        assert!(
            admitted.len() > 600,
            "rate close to 10/s over 70 s: {}",
            admitted.len()
        );
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
        // Longer window: the 5 still count, and come back within the new T + w.
        let long = SlidingWindow::new(5, Duration::from_secs(6));
        let (e, _) = evaluate(Some(&s), now, 1, &long);
        assert!(!e.admit);
        assert!(e.retry_after <= Duration::from_millis(6_400));
        assert!(
            evaluate(Some(&s), now.plus(e.retry_after), 1, &long)
                .0
                .admit
        );
        // Shorter window: still counted until the shorter window has passed.
        let shorter = SlidingWindow::new(5, Duration::from_secs(1));
        assert!(
            !evaluate(Some(&s), now.plus(Duration::from_millis(500)), 1, &shorter)
                .0
                .admit
        );
        assert!(
            evaluate(
                Some(&s),
                now.plus(Duration::from_millis(1_300)),
                1,
                &shorter
            )
            .0
            .admit
        );
    }

    #[test]
    fn fresh_after_the_window_passes() {
        let w = SlidingWindow::new(5, Duration::from_secs(3));
        let (_, s) = evaluate(None, Nanos::from_secs(10), 5, &w);
        assert!(!is_fresh(&s, Nanos::from_secs(12), &w));
        assert!(is_fresh(&s, Nanos::from_secs(14), &w));
    }
}

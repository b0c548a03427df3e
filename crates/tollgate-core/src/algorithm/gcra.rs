//! Weighted token bucket, as the Generic Cell Rate Algorithm (GCRA).
//!
//! The state is one number, the theoretical arrival time (TAT): the instant at
//! which the bucket would be full again. A bucket of capacity `B` refilling one
//! token every `I` nanoseconds admits a request of cost `c` at `now` when
//! `max(TAT, now) + c·I − now ≤ B·I`, and then stores that sum as the new TAT.
//!
//! Exact: this is the token bucket itself, not an approximation. When the
//! refill interval is not a whole number of nanoseconds it is rounded *up*, so
//! rounding can only make the bucket refill a hair slower, never faster.

use std::num::NonZeroU64;
use std::time::Duration;

use super::Evaluation;
use crate::clock::{Nanos, duration_nanos};

/// Longest time a bucket may take to fill: 100 years.
pub const MAX_FILL_TIME_NS: u128 = 100 * 365 * 86_400 * 1_000_000_000;

/// The numbers of a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraRate {
    /// Bucket capacity in tokens.
    pub capacity: u64,
    /// Nanoseconds to refill one token (rounded up).
    pub interval: u64,
}

impl GcraRate {
    /// A bucket of `capacity` tokens refilling `refill` tokens every `per`.
    pub fn new(capacity: NonZeroU64, refill: NonZeroU64, per: Duration) -> GcraRate {
        let per = u128::from(duration_nanos(per).max(1));
        let interval = per.div_ceil(u128::from(refill.get()));
        GcraRate {
            capacity: capacity.get(),
            interval: u64::try_from(interval).unwrap_or(u64::MAX),
        }
    }

    /// Time for an empty bucket to fill, in nanoseconds.
    pub fn fill_time(&self) -> u128 {
        self.tau()
    }

    /// Whether the bucket fills within [`MAX_FILL_TIME_NS`]: states are
    /// instants in `u64` nanoseconds, so a bucket that takes centuries to fill
    /// could not be represented (policy validation refuses such buckets).
    pub fn is_representable(&self) -> bool {
        self.fill_time() <= MAX_FILL_TIME_NS
    }

    /// The burst tolerance `B·I` in nanoseconds.
    fn tau(&self) -> u128 {
        u128::from(self.capacity) * u128::from(self.interval)
    }
}

/// Evaluates `cost` tokens at `now` against a bucket whose TAT is `tat`
/// (`None` for a full bucket). Returns the evaluation and the TAT to store if
/// the request is admitted.
#[inline]
pub fn gcra(tat: Option<Nanos>, now: Nanos, cost: u64, rate: &GcraRate) -> (Evaluation, Nanos) {
    // Two returns of the same shape rather than an `Option` unwrapped into
    // the 128-bit path: the evaluation is then built in place, not built in
    // the `Option` and copied out (about 25 instructions per bucket).
    match u64_numbers(tat, now, cost, rate) {
        Some((base, tau, new_tat)) => gcra_in_u64(now, base, tau, new_tat, rate.interval),
        None => gcra_u128(tat, now, cost, rate),
    }
}

/// [`gcra`] for a bucket whose burst tolerance `B·I` was worked out
/// beforehand ([`GcraRate::tau_u64`], once per policy load): the in-memory
/// store's one-scope path, which then skips a checked multiply and two
/// tests per request. Returns the evaluation and the TAT to store if the
/// request is admitted.
#[inline(always)]
pub(crate) fn gcra_with_tau(
    tat: Option<Nanos>,
    now: Nanos,
    cost: u64,
    rate: &GcraRate,
    tau: u64,
) -> (Evaluation, Nanos) {
    match numbers_with_tau(tat, now, cost, rate, tau) {
        Some((base, tau, new_tat)) => gcra_in_u64(now, base, tau, new_tat, rate.interval),
        None => gcra_u128(tat, now, cost, rate),
    }
}

impl GcraRate {
    /// The burst tolerance `B·I` in 64-bit arithmetic, when it fits and the
    /// interval is not zero (always, for a bucket that fills within
    /// [`MAX_FILL_TIME_NS`]): what [`gcra`] works out per request, and
    /// [`gcra_with_tau`] takes ready.
    pub(crate) fn tau_u64(&self) -> Option<u64> {
        if self.interval == 0 {
            return None;
        }
        self.capacity.checked_mul(self.interval)
    }
}

/// The numbers of [`gcra`] in 64-bit arithmetic, for the usual numbers:
/// `(base, tau, new_tat)`, or `None` when the burst tolerance or the new TAT
/// would not fit in `u64`, or the cost is above the capacity (then
/// [`gcra_u128`], the same math, decides). Where both run they give the
/// same answer (a unit test compares them).
#[inline(always)]
fn u64_numbers(
    tat: Option<Nanos>,
    now: Nanos,
    cost: u64,
    rate: &GcraRate,
) -> Option<(u64, u64, u64)> {
    numbers_with_tau(tat, now, cost, rate, rate.tau_u64()?)
}

/// [`u64_numbers`] given `tau` ([`GcraRate::tau_u64`]).
#[inline(always)]
fn numbers_with_tau(
    tat: Option<Nanos>,
    now: Nanos,
    cost: u64,
    rate: &GcraRate,
    tau: u64,
) -> Option<(u64, u64, u64)> {
    if cost > rate.capacity {
        return None;
    }
    let base = tat.map_or(now.0, |t| t.0.max(now.0));
    let new_tat = base.checked_add(cost.checked_mul(rate.interval)?)?;
    Some((base, tau, new_tat))
}

/// [`gcra`] on the numbers [`u64_numbers`] found.
#[inline(always)]
fn gcra_in_u64(
    now: Nanos,
    base: u64,
    tau: u64,
    new_tat: u64,
    interval: u64,
) -> (Evaluation, Nanos) {
    let ahead = base - now.0;
    let new_ahead = new_tat - now.0;
    if new_ahead <= tau {
        let eval = Evaluation {
            admit: true,
            never: false,
            remaining: (tau - new_ahead) / interval,
            reset: Nanos(new_ahead),
            retry_after: Nanos::ZERO,
        };
        (eval, Nanos(new_tat))
    } else {
        let eval = Evaluation {
            admit: false,
            never: false,
            remaining: tau.saturating_sub(ahead) / interval,
            reset: Nanos(ahead),
            retry_after: Nanos(new_ahead - tau),
        };
        (eval, Nanos(base))
    }
}

/// [`gcra`] in 64-bit arithmetic only: `None` where [`gcra_u128`] decides.
#[cfg(test)]
fn gcra_u64(
    tat: Option<Nanos>,
    now: Nanos,
    cost: u64,
    rate: &GcraRate,
) -> Option<(Evaluation, Nanos)> {
    let (base, tau, new_tat) = u64_numbers(tat, now, cost, rate)?;
    Some(gcra_in_u64(now, base, tau, new_tat, rate.interval))
}

/// [`gcra`] in 128-bit arithmetic: any numbers.
fn gcra_u128(tat: Option<Nanos>, now: Nanos, cost: u64, rate: &GcraRate) -> (Evaluation, Nanos) {
    let interval = u128::from(rate.interval);
    let tau = rate.tau();
    let now_n = u128::from(now.0);
    let base = u128::from(tat.map_or(now.0, |t| t.0.max(now.0)));
    let ahead = base - now_n; // nanoseconds of refill still owed: tokens used = ahead / I
    let tokens_now = div(tau.saturating_sub(ahead), interval);
    if cost > rate.capacity {
        let eval = Evaluation::never(clamp(tokens_now), nanos_duration(ahead));
        return (eval, Nanos(clamp(base)));
    }
    let new_tat = base + u128::from(cost) * interval;
    let new_ahead = new_tat - now_n;
    if new_ahead <= tau {
        let eval = Evaluation {
            admit: true,
            never: false,
            remaining: clamp(div(tau - new_ahead, interval)),
            reset: nanos_duration(new_ahead),
            retry_after: Nanos::ZERO,
        };
        (eval, Nanos(clamp(new_tat)))
    } else {
        let eval = Evaluation {
            admit: false,
            never: false,
            remaining: clamp(tokens_now),
            reset: nanos_duration(ahead),
            retry_after: nanos_duration(new_ahead - tau),
        };
        (eval, Nanos(clamp(base)))
    }
}

/// Whether a stored TAT is back to a full bucket at `now` (safe to drop).
pub fn is_fresh(tat: Nanos, now: Nanos) -> bool {
    tat <= now
}

/// `a / b`, in 64-bit arithmetic when both fit (the usual case): a 128-bit
/// division is a library call several times slower.
fn div(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) => u128::from(a / b),
        _ => a / b,
    }
}

fn clamp(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn nanos_duration(v: u128) -> Nanos {
    Nanos(clamp(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(cap: u64, refill: u64, per_ms: u64) -> GcraRate {
        GcraRate::new(
            NonZeroU64::new(cap).unwrap(),
            NonZeroU64::new(refill).unwrap(),
            Duration::from_millis(per_ms),
        )
    }

    #[test]
    fn bucket_400_refill_100_admits_20_uploads_then_waits_200ms() {
        let r = rate(400, 100, 1000);
        let now = Nanos::from_secs(1000);
        let mut tat = None;
        for i in 0..20 {
            let (e, t) = gcra(tat, now, 20, &r);
            assert!(e.admit, "upload {i}");
            assert_eq!(e.remaining, 400 - 20 * (i + 1));
            tat = Some(t);
        }
        let (e, _) = gcra(tat, now, 20, &r);
        assert!(!e.admit);
        assert_eq!(e.remaining, 0);
        assert_eq!(e.retry_after_duration(), Duration::from_millis(200));
        let later = now.plus(Duration::from_millis(200));
        assert!(!gcra(tat, Nanos(later.0 - 1), 20, &r).0.admit);
        assert!(gcra(tat, later, 20, &r).0.admit);
    }

    #[test]
    fn cost_above_capacity_never_passes() {
        let r = rate(10, 1, 1000);
        let (e, _) = gcra(None, Nanos(5), 11, &r);
        assert!(e.never && !e.admit);
        assert_eq!(e.retry_after_duration(), Duration::ZERO);
    }

    #[test]
    fn zero_cost_always_admits_and_reports() {
        let r = rate(10, 1, 1000);
        let (e, t) = gcra(None, Nanos(5), 0, &r);
        assert!(e.admit);
        assert_eq!(e.remaining, 10);
        assert_eq!(t, Nanos(5));
    }

    #[test]
    fn refill_never_exceeds_capacity() {
        let r = rate(5, 1, 1000);
        let (_, t) = gcra(None, Nanos::from_secs(1), 5, &r);
        let (e, _) = gcra(Some(t), Nanos::from_secs(1_000_000), 0, &r);
        assert_eq!(e.remaining, 5);
    }

    /// A xorshift generator: `next(m)` is in `0..m`.
    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |m| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        }
    }

    /// A random bucket, TAT, time and cost, over 64- and 128-bit ranges.
    fn random_case(next: &mut impl FnMut(u64) -> u64) -> (GcraRate, Option<Nanos>, Nanos, u64) {
        let scale = [10, 1_000, 1_000_000, u64::MAX][next(4) as usize];
        let rate = GcraRate {
            capacity: 1 + next(scale.min(1 << 40)),
            interval: 1 + next(scale),
        };
        let now = Nanos(next(u64::MAX));
        let tat = [
            None,
            Some(Nanos(next(u64::MAX))),
            Some(Nanos(now.0.saturating_add(next(scale)))),
        ][next(3) as usize];
        let cost = next(rate.capacity.saturating_add(2));
        (rate, tat, now, cost)
    }

    #[test]
    fn the_64_bit_path_gives_the_128_bit_answer() {
        let mut next = rng(0x9E37_79B9_7F4A_7C15_u64);
        let mut compared = 0;
        for _ in 0..100_000 {
            let (rate, tat, now, cost) = random_case(&mut next);
            if let Some(fast) = gcra_u64(tat, now, cost, &rate) {
                assert_eq!(
                    fast,
                    gcra_u128(tat, now, cost, &rate),
                    "{rate:?} {tat:?} {now:?} {cost}"
                );
                compared += 1;
            }
        }
        assert!(compared > 10_000, "the 64-bit path ran {compared} times");
    }

    /// With its burst tolerance worked out beforehand (or not at all),
    /// a bucket answers as `gcra` does.
    #[test]
    fn gcra_with_tau_gives_gcras_answer() {
        let mut next = rng(0x2545_F491_4F6C_DD1D_u64);
        for _ in 0..100_000 {
            let (rate, tat, now, cost) = random_case(&mut next);
            let expected = gcra(tat, now, cost, &rate);
            // A bucket without one (`None`) is decided by `gcra` itself.
            if let Some(tau) = rate.tau_u64() {
                assert_eq!(
                    gcra_with_tau(tat, now, cost, &rate, tau),
                    expected,
                    "{rate:?} {tat:?} {now:?} {cost}"
                );
            }
        }
    }

    #[test]
    fn huge_costs_and_times_do_not_overflow() {
        let r = rate(u64::MAX, 1, 1);
        let (e, _) = gcra(Some(Nanos(u64::MAX)), Nanos(u64::MAX), u64::MAX, &r);
        assert!(!e.never);
    }
}

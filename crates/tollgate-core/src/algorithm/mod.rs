//! The limit algorithms, as pure functions: state and `now` go in, an
//! [`Evaluation`] and the state to write (if the request is admitted) come out.
//!
//! None of them reads a clock or touches a store, so the in-memory store, the
//! Redis script and the property tests all run the same math. Every one of them
//! is *safe*: it never admits more than its numbers allow, whatever the order of
//! calls, costs or clock steps (a clock that steps backwards only makes callers
//! wait longer). Which ones are also *exact* (never refuse what an ideal limiter
//! would admit) is said on each.
//!
//! - [`gcra`]: weighted token bucket (GCRA): capacity `B`, refill `r` per period.
//! - [`sliding_window`]: "N per T" for every window of length T.
//! - [`calendar_window`]: N per calendar minute/hour/day in a time zone.
//! - [`concurrency`]: at most N leases in flight, each with a TTL.

pub mod calendar_window;
pub mod concurrency;
pub mod gcra;
pub mod sliding_window;

use std::time::Duration;

use crate::clock::Nanos;

/// What an algorithm says about one request against one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Evaluation {
    /// Whether the cost fits now.
    pub admit: bool,
    /// The cost is larger than the limit's capacity: it can never pass.
    pub never: bool,
    /// Units left after this request if admitted, or left now if not.
    pub remaining: u64,
    /// Time until the counter is back to its fresh (full) state, in
    /// nanoseconds (a span; [`Evaluation::reset_duration`] as a `Duration`).
    /// Nanoseconds rather than `Duration`: every algorithm computes it in
    /// nanoseconds, and building a `Duration` (seconds and nanoseconds)
    /// cost each evaluation a division.
    pub reset: Nanos,
    /// When not admitted: the exact time to wait before the same cost fits
    /// (assuming no other traffic), in nanoseconds. Zero when admitted or
    /// when it can never pass.
    pub retry_after: Nanos,
}

impl Evaluation {
    /// The evaluation of a cost that exceeds the capacity `limit`.
    pub fn never(remaining: u64, reset: Nanos) -> Evaluation {
        Evaluation {
            admit: false,
            never: true,
            remaining,
            reset,
            retry_after: Nanos::ZERO,
        }
    }

    /// [`Evaluation::reset`] as a `Duration`.
    pub fn reset_duration(&self) -> Duration {
        self.reset.into()
    }

    /// [`Evaluation::retry_after`] as a `Duration`.
    pub fn retry_after_duration(&self) -> Duration {
        self.retry_after.into()
    }
}

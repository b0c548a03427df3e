//! Time: the only place tollgate reads the wall clock.
//!
//! Every algorithm takes `now` as an argument; the engine asks a [`Clock`] for it.
//! Production uses [`SystemClock`]; tests use [`ManualClock`] and move time by hand,
//! so no test sleeps. Times are [`Nanos`] since the Unix epoch (UTC), because
//! calendar windows and rollout dates are wall-clock concepts; a wall clock that
//! steps backwards never hands out extra capacity (every algorithm takes
//! `max(state, now)`), it only makes callers wait a little longer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point in time or a span, in nanoseconds. Points are measured from the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub u64);

impl Nanos {
    /// The epoch itself.
    pub const ZERO: Nanos = Nanos(0);
    /// One second.
    pub const SECOND: u64 = 1_000_000_000;

    /// Whole seconds since the epoch.
    pub fn from_secs(s: u64) -> Nanos {
        Nanos(s.saturating_mul(Self::SECOND))
    }

    /// This instant plus a duration, saturating.
    pub fn plus(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_add(duration_nanos(d)))
    }

    /// This instant plus a span in nanoseconds, saturating.
    #[inline]
    pub fn after(self, span: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(span.0))
    }

    /// The span from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl From<Nanos> for Duration {
    /// A span in nanoseconds as a `Duration`.
    fn from(n: Nanos) -> Duration {
        Duration::from_nanos(n.0)
    }
}

impl From<Duration> for Nanos {
    /// A `Duration` as a span in nanoseconds, saturating (see [`duration_nanos`]).
    fn from(d: Duration) -> Nanos {
        Nanos(duration_nanos(d))
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (about 584 years).
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up: what `Retry-After` and reset headers carry.
///
/// Never 0 when `d` is non-zero, so a caller told to wait never retries at once.
/// Takes a `Duration` or a span in [`Nanos`].
pub fn ceil_secs(d: impl Into<Nanos>) -> u64 {
    let n = d.into().0;
    n.div_ceil(Nanos::SECOND)
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Nanos;
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    #[allow(clippy::disallowed_methods)] // the one place that reads the wall clock
    fn now(&self) -> Nanos {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Nanos(duration_nanos(since))
    }
}

/// A clock that moves only when told to: for tests, simulations and benchmarks.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Nanos) -> ManualClock {
        ManualClock {
            now: AtomicU64::new(start.0),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_nanos(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t` (may move backwards, to test clock steps).
    pub fn set(&self, t: Nanos) {
        self.now.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    // Inlined into other crates' decision loops (benches, tests): a call
    // through the GOT for one atomic load otherwise.
    #[inline]
    fn now(&self) -> Nanos {
        Nanos(self.now.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    #[inline]
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_secs_never_zero_when_waiting() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Nanos::from_secs(10));
        assert_eq!(c.now(), Nanos::from_secs(10));
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Nanos(11_500_000_000));
    }
}

//! What keeps a slow or dead Redis from costing more than a bounded amount:
//! a cap on decisions in flight and a circuit breaker with a background probe.
//!
//! - **In-flight cap.** At most `max_in_flight` calls wait on Redis at once;
//!   one more fails at once with [`IN_FLIGHT_FULL`] (kind `overloaded`), so a
//!   hung Redis cannot pile up an unbounded number of waiting decisions (and
//!   their memory) in front of it (`envoyproxy/ratelimit#1241`).
//! - **Circuit breaker** (standalone Redis). After [`FAILURES_TO_OPEN`]
//!   consecutive calls that got no answer (timeout, refused or lost
//!   connection, `LOADING`, `BUSY`), or one unanswered probe, the breaker
//!   opens: calls fail at once with [`CIRCUIT_OPEN`] (kind `circuit_open`)
//!   instead of each waiting for the timeout. A reply error (`OOM`,
//!   `WRONGTYPE`, …) is an answer and does not count.
//! - **Probe.** A background task pings Redis every ~100 ms while the breaker
//!   is open (half-open probe: the first answered `PING` closes it) and every
//!   ~200 ms while it is closed and no call has succeeded since the last tick
//!   (so a Redis that stops answering while idle is noticed too). Intervals
//!   carry ±50 % jitter, so replicas do not probe in step. The probe is also
//!   what drives reconnection while the breaker is open; the connection's
//!   back-off (see `store.rs`) keeps attempts at most 10 per second.
//!
//! Timing: a hang is noticed after [`FAILURES_TO_OPEN`] timeouts under
//! traffic (5 × 50 ms with the default timeout, less with concurrent
//! calls), or within one idle probe (≤ 300 ms + [`PROBE_TIMEOUT`]) without
//! traffic: the breaker opens well within 1 s. Once Redis answers again, the
//! next open-state probe (≤ 150 ms later) closes it.

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tollgate_core::StoreError;

/// Consecutive unanswered calls that open the breaker.
pub const FAILURES_TO_OPEN: u32 = 5;
/// Probe period while the breaker is open (jittered ±50 %).
pub const PROBE_OPEN_EVERY: Duration = Duration::from_millis(100);
/// Probe period while the breaker is closed and idle (jittered ±50 %).
pub const PROBE_IDLE_EVERY: Duration = Duration::from_millis(200);
/// Longest wait for a probe's `PING` (at least the store timeout).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Default cap on calls waiting on Redis at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1_024;

/// The error of a call refused because the breaker is open.
pub const CIRCUIT_OPEN: StoreError =
    StoreError::Unavailable("redis: not answering, circuit open (CIRCUIT_OPEN)");
/// The error of a call refused because too many are already waiting.
pub const IN_FLIGHT_FULL: StoreError =
    StoreError::Unavailable("redis: too many calls in flight (OVERLOADED)");

/// Shared state of one store's breaker and in-flight count.
#[derive(Debug)]
pub(crate) struct Health {
    open: AtomicBool,
    failures: AtomicU32,
    /// A call succeeded since the probe's last tick.
    recent_ok: AtomicBool,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    max_in_flight: usize,
    /// Whether the breaker is used (standalone only).
    breaker: bool,
    /// Times the breaker opened.
    opened: AtomicU64,
}

/// One call counted in flight; uncounted on drop (also when the call's
/// future is dropped by a timeout or a cancelled request).
pub(crate) struct InFlight<'a>(&'a Health);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Health {
    pub(crate) fn new(max_in_flight: usize, breaker: bool) -> Health {
        Health {
            open: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            recent_ok: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            max_in_flight: max_in_flight.max(1),
            breaker,
            opened: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn peak_in_flight(&self) -> usize {
        self.peak_in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Admits one call, or refuses it at once (breaker open, cap reached).
    pub(crate) fn enter(&self) -> Result<InFlight<'_>, StoreError> {
        if self.is_open() {
            return Err(CIRCUIT_OPEN);
        }
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(self);
        if n >= self.max_in_flight {
            return Err(IN_FLIGHT_FULL);
        }
        if n + 1 > self.peak_in_flight.load(Ordering::Relaxed) {
            self.peak_in_flight.fetch_max(n + 1, Ordering::Relaxed);
        }
        Ok(guard)
    }

    /// Redis answered (with a value or a reply error).
    pub(crate) fn answered(&self) {
        if !self.recent_ok.load(Ordering::Relaxed) {
            self.recent_ok.store(true, Ordering::Relaxed);
        }
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.is_open() {
            self.open.store(false, Ordering::Relaxed);
        }
    }

    /// Redis did not answer a call.
    pub(crate) fn unanswered(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= FAILURES_TO_OPEN {
            self.trip();
        }
    }

    /// Opens the breaker now (a probe got no answer).
    pub(crate) fn trip(&self) {
        if self.breaker && !self.open.swap(true, Ordering::Relaxed) {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a call succeeded since the last call of this (and resets it).
    fn take_recent_ok(&self) -> bool {
        self.recent_ok.swap(false, Ordering::Relaxed)
    }
}

/// Whether `e` means Redis did not answer (as opposed to answering with an error).
pub(crate) fn is_unanswered(e: &StoreError) -> bool {
    match e {
        StoreError::Timeout(_) => true,
        StoreError::Unavailable(m) => {
            let kind = crate::store::kind_of_message(m);
            matches!(kind, "connection" | "timeout" | "loading" | "busy")
        }
        _ => false,
    }
}

/// A small jitter source (splitmix64 seeded from the OS): probe intervals only.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Jitter(u64::from_le_bytes(seed))
    }

    /// `d` scaled by a random factor in [0.5, 1.5).
    fn around(&mut self, d: Duration) -> Duration {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let f = 0.5 + (z >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(f)
    }
}

/// The background probe of one store; ends once every clone of the store is dropped.
pub(crate) async fn probe<F, Fut>(health: Weak<Health>, timeout: Duration, ping: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut jitter = Jitter::new();
    let timeout = timeout.max(PROBE_TIMEOUT);
    loop {
        let every = match health.upgrade() {
            Some(h) if h.is_open() => PROBE_OPEN_EVERY,
            Some(_) => PROBE_IDLE_EVERY,
            None => return,
        };
        tokio::time::sleep(jitter.around(every)).await;
        let Some(h) = health.upgrade() else { return };
        let open = h.is_open();
        if !open && h.take_recent_ok() {
            continue; // traffic shows Redis answers
        }
        drop(h);
        let r = tokio::time::timeout(timeout, ping()).await;
        let Some(h) = health.upgrade() else { return };
        match r {
            Ok(Ok(())) => h.answered(),
            Ok(Err(e)) if !is_unanswered(&e) => h.answered(),
            Ok(Err(_)) | Err(_) => h.trip(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_refuses_the_call_past_it_and_counts_down_on_drop() {
        let h = Health::new(2, true);
        let a = h.enter().expect("first");
        let b = h.enter().expect("second");
        assert_eq!(h.enter().err(), Some(IN_FLIGHT_FULL));
        assert_eq!(h.in_flight(), 2);
        drop(a);
        let c = h.enter().expect("room again");
        drop((b, c));
        assert_eq!(h.in_flight(), 0);
        assert_eq!(h.peak_in_flight(), 2);
    }

    #[test]
    fn breaker_opens_after_consecutive_unanswered_calls_and_closes_on_an_answer() {
        let h = Health::new(8, true);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            h.unanswered();
        }
        h.answered(); // an answer resets the streak
        for _ in 0..FAILURES_TO_OPEN - 1 {
            h.unanswered();
        }
        assert!(!h.is_open());
        h.unanswered();
        assert!(h.is_open());
        assert_eq!(h.enter().err(), Some(CIRCUIT_OPEN));
        h.answered();
        assert!(!h.is_open());
        assert_eq!(h.times_opened(), 1);
        let off = Health::new(8, false);
        off.trip();
        assert!(!off.is_open(), "no breaker in cluster mode");
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        let mut j = Jitter(1);
        let d = Duration::from_millis(100);
        let xs: Vec<_> = (0..1000).map(|_| j.around(d)).collect();
        assert!(
            xs.iter()
                .all(|x| *x >= d / 2 && *x < d + d / 2 + Duration::from_nanos(1))
        );
        assert!(xs.iter().any(|x| *x < d) && xs.iter().any(|x| *x > d));
    }
}

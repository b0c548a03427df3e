//! The invalid-key guard: API-key failures are rate-limited per client IP
//! before any database work.
//!
//! Every request whose key is not a known-good cached key (a cache miss, a
//! malformed key, an unknown or revoked one) first asks the guard whether its
//! client address is over its failure budget; if it is, tollgate answers 429
//! (`too_many_invalid_keys`, with `Retry-After`) without looking the key up.
//! Each key that then turns out unknown or revoked takes one token from the
//! address's bucket. Keys that are valid cost nothing, and a valid key already
//! in the ledger's key cache passes even from a blocked address (a shared NAT
//! with one scanner behind it does not lock out the others' working keys).
//!
//! The budget is a token bucket per address: `auth_fail_limit` failures, refilled
//! at `auth_fail_limit` per `auth_fail_window` (`[server]` in the policy file;
//! defaults 100 per minute; `auth_fail_limit = 0` turns the guard off). IPv4
//! addresses count one by one; IPv6 addresses by their /64 (one subscriber's
//! whole prefix), so an attacker cannot mint addresses to reset the budget.
//!
//! State is per address, never per key, and bounded: an entry is dropped once
//! its bucket is full again (it then holds nothing a fresh entry would not),
//! and at most `auth_guard_max_ips` addresses are tracked. When that many
//! addresses are over budget at once, new addresses are not tracked (the guard
//! fails open for them); the ledger's bounded negative cache still caps the
//! database at one read per unknown key id per `REVOCATION_BOUND`.

use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate_core::Nanos;
use tollgate_core::algorithm::gcra::{GcraRate, gcra};

/// Minimum time between two sweeps triggered by a full table.
const SWEEP_INTERVAL_NS: u64 = Nanos::SECOND;

/// Per-address failure buckets.
pub struct AuthGuard {
    rate: Option<GcraRate>,
    max_ips: usize,
    /// Address (IPv4, or IPv6 /64) → theoretical arrival time of its bucket.
    buckets: papaya::HashMap<u128, AtomicU64>,
    last_sweep: AtomicU64,
}

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard")
            .field("rate", &self.rate)
            .field("max_ips", &self.max_ips)
            .field("tracked", &self.buckets.len())
            .finish()
    }
}

impl AuthGuard {
    /// A guard allowing `limit` failures per address, refilled at `limit` per
    /// `window`, tracking at most `max_ips` addresses. `limit == 0` disables it.
    pub fn new(limit: u64, window: Duration, max_ips: usize) -> AuthGuard {
        let rate = NonZeroU64::new(limit).map(|n| GcraRate::new(n, n, window));
        AuthGuard {
            rate,
            max_ips: max_ips.max(1),
            buckets: papaya::HashMap::new(),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// How long `ip` must wait when it is over its failure budget at `now`;
    /// `None` when it may present an unverified key. Changes nothing.
    pub fn blocked(&self, ip: IpAddr, now: Nanos) -> Option<Duration> {
        let rate = self.rate.as_ref()?;
        let buckets = self.buckets.pin();
        let tat = buckets.get(&slot(ip))?.load(Ordering::Acquire);
        let (eval, _) = gcra(Some(Nanos(tat)), now, 1, rate);
        (!eval.admit).then_some(eval.retry_after)
    }

    /// Records one failed key (unknown, revoked, malformed) from `ip` at `now`.
    pub fn fail(&self, ip: IpAddr, now: Nanos) {
        let Some(rate) = self.rate.as_ref() else {
            return;
        };
        let key = slot(ip);
        let buckets = self.buckets.pin();
        let cell = match buckets.get(&key) {
            Some(c) => c,
            None => {
                if buckets.len() >= self.max_ips {
                    self.sweep_if_due(now);
                    if buckets.len() >= self.max_ips {
                        return;
                    }
                }
                buckets.get_or_insert(key, AtomicU64::new(0))
            }
        };
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let (eval, next) = gcra(Some(Nanos(current)), now, 1, rate);
            if !eval.admit {
                return;
            }
            match cell.compare_exchange_weak(current, next.0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Drops every address whose bucket is full again at `now` (it holds
    /// nothing then). Returns how many addresses are still tracked.
    pub fn sweep(&self, now: Nanos) -> usize {
        let buckets = self.buckets.pin();
        buckets.retain(|_, tat| tat.load(Ordering::Acquire) > now.0);
        buckets.len()
    }

    /// Addresses tracked (tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn sweep_if_due(&self, now: Nanos) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.0.saturating_sub(last) >= SWEEP_INTERVAL_NS
            && self
                .last_sweep
                .compare_exchange(last, now.0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep(now);
        }
    }
}

/// The table key of an address: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by /64.
fn slot(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) & !u128::from(u64::MAX)) | (1 << 32),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Nanos {
        Nanos(s * Nanos::SECOND)
    }

    #[test]
    fn blocks_after_the_budget_and_refills() {
        let g = AuthGuard::new(3, Duration::from_secs(3), 10);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(g.blocked(ip, at(100)), None);
            g.fail(ip, at(100));
        }
        let wait = g.blocked(ip, at(100)).expect("over budget");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert_eq!(g.blocked(other, at(100)), None, "per address");
        // One token back after a second (3 per 3 s).
        assert_eq!(g.blocked(ip, at(101)), None);
        // Full again after the window: swept.
        assert_eq!(g.sweep(at(103)), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let g = AuthGuard::new(1, Duration::from_secs(60), 10);
        g.fail("2001:db8:1:2::1".parse().expect("ip"), at(5));
        assert!(
            g.blocked("2001:db8:1:2:ffff::9".parse().expect("ip"), at(5))
                .is_some()
        );
        assert!(
            g.blocked("2001:db8:1:3::1".parse().expect("ip"), at(5))
                .is_none()
        );
        g.fail("::ffff:10.1.1.1".parse().expect("ip"), at(5));
        assert!(g.blocked("10.1.1.1".parse().expect("ip"), at(5)).is_some());
        assert_eq!(g.tracked(), 2);
    }

    #[test]
    fn bounded_and_disabled() {
        let g = AuthGuard::new(1, Duration::from_secs(60), 2);
        for i in 0..10u8 {
            g.fail(IpAddr::from([10, 0, 0, i]), at(1));
        }
        assert_eq!(g.tracked(), 2, "never more than max_ips addresses");
        let off = AuthGuard::new(0, Duration::from_secs(60), 2);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..10 {
            off.fail(ip, at(1));
        }
        assert_eq!((off.blocked(ip, at(1)), off.tracked()), (None, 0));
    }
}

//! The invalid-key guard: API-key failures are rate-limited per client IP
//! before any database work.
//!
//! Every request whose key is not a known-good cached key (a cache miss, a
//! malformed key, an unknown or revoked one) first takes a token from its
//! client address's failure budget; when there is none, tollgate answers 429
//! (`too_many_invalid_keys`, with `Retry-After`) without looking the key up.
//! A key that turns out valid gives its token back, so only unknown, revoked
//! and malformed keys spend the budget. Keys whose public id the ledger has
//! found in the database within the last hour skip the guard (their lookups
//! are bounded by the number of real keys, at most one per id per
//! `REVOCATION_BOUND`), so a shared NAT with one scanner behind it does not
//! lock out the others' working keys; a revoked key's id also skips it.
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

    /// Takes one token from `ip`'s failure budget at `now`, before a key that
    /// is not known to be good is looked up: `Err(wait)` when `ip` is over its
    /// budget (answer 429, look nothing up). A key that turns out valid gives
    /// its token back with [`AuthGuard::refund`]; a failed one keeps it taken.
    /// Taking before the lookup (not after it) keeps the bound exact under
    /// concurrency: lookups from one address ≤ its budget plus its refill.
    pub fn acquire(&self, ip: IpAddr, now: Nanos) -> Result<(), Duration> {
        let Some(rate) = self.rate.as_ref() else {
            return Ok(());
        };
        let key = slot(ip);
        let buckets = self.buckets.pin();
        let cell = match buckets.get(&key) {
            Some(c) => c,
            None => {
                if buckets.len() >= self.max_ips {
                    self.sweep_if_due(now);
                    if buckets.len() >= self.max_ips {
                        // Every slot holds an address over budget: fail open
                        // (the ledger's negative cache still bounds lookups).
                        return Ok(());
                    }
                }
                buckets.get_or_insert(key, AtomicU64::new(0))
            }
        };
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let (eval, next) = gcra(Some(Nanos(current)), now, 1, rate);
            if !eval.admit {
                return Err(eval.retry_after_duration());
            }
            match cell.compare_exchange_weak(current, next.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Gives back the token of an [`AuthGuard::acquire`] whose key was valid
    /// (or whose lookup failed for the database's own reasons).
    pub fn refund(&self, ip: IpAddr) {
        let Some(rate) = self.rate.as_ref() else {
            return;
        };
        let buckets = self.buckets.pin();
        if let Some(cell) = buckets.get(&slot(ip)) {
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(rate.interval))
            });
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
            assert_eq!(g.acquire(ip, at(100)), Ok(()));
        }
        let wait = g.acquire(ip, at(100)).expect_err("over budget");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert_eq!(g.acquire(other, at(100)), Ok(()), "per address");
        // A valid key gives its token back.
        g.refund(ip);
        assert_eq!(g.acquire(ip, at(100)), Ok(()));
        assert!(g.acquire(ip, at(100)).is_err());
        // One token back after a second (3 per 3 s).
        assert_eq!(g.acquire(ip, at(101)), Ok(()));
        // Full again after the window: swept.
        assert_eq!(g.sweep(at(104)), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let g = AuthGuard::new(1, Duration::from_secs(60), 10);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(g.acquire(ip("2001:db8:1:2::1"), at(5)).is_ok());
        assert!(g.acquire(ip("2001:db8:1:2:ffff::9"), at(5)).is_err());
        assert!(g.acquire(ip("2001:db8:1:3::1"), at(5)).is_ok());
        assert!(g.acquire(ip("::ffff:10.1.1.1"), at(5)).is_ok());
        assert!(g.acquire(ip("10.1.1.1"), at(5)).is_err());
        assert_eq!(g.tracked(), 3);
    }

    #[test]
    fn bounded_and_disabled() {
        let g = AuthGuard::new(1, Duration::from_secs(60), 2);
        for i in 0..10u8 {
            assert!(g.acquire(IpAddr::from([10, 0, 0, i]), at(1)).is_ok());
        }
        assert_eq!(g.tracked(), 2, "never more than max_ips addresses");
        let off = AuthGuard::new(0, Duration::from_secs(60), 2);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..10 {
            assert!(off.acquire(ip, at(1)).is_ok());
        }
        assert_eq!(off.tracked(), 0);
    }
}

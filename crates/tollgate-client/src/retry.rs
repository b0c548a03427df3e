//! When to retry and how long to wait, as the reference documents ask.
//!
//! - Only 429, 502, 503 and 504 are retried. Other 4xx (400, 401, 402 —
//!   credits will not come back by waiting —, 413, 422…) and other 5xx are
//!   returned at once; so are transport errors, since the request may have
//!   reached the server.
//! - At most 3 retries by default; exponential back-off from 1 s, doubling,
//!   capped at 30 s, with full jitter (a uniform delay in `[0, backoff]`).
//! - The delay is `max(server wait, back-off)`: the server wait is
//!   `Retry-After`, or on a 429 without it the limit's reset header
//!   (`X-Picsart-RateLimit-Reset-Time`, `X-RateLimit-Reset`, IETF `t`).
//! - A 429 whose server wait exceeds [`RetryPolicy::with_max_wait`] (60 s by
//!   default: a per-hour file-name limit or a daily limit) is not retried, nor
//!   is a 429 from a limit listed with [`RetryPolicy::with_never_retry_limit`]
//!   ("if you hit this limit, do not keep retrying the same file name").
//! - Retried POSTs carry an `Idempotency-Key`, the same on every attempt of
//!   one call, so a server that charges credits charges once.
//!
//! The waiting itself is done by [`backon`], on `tokio::time`.

use std::time::Duration;

use backon::BackoffBuilder;

/// Randomisation of the back-off delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly the exponential delay: 1 s, 2 s, 4 s…
    None,
    /// Uniform in `[0, delay]` ("full jitter"): spreads a crowd of clients best.
    #[default]
    Full,
    /// Uniform in `[delay / 2, delay]`: never much shorter than the exponential delay.
    Equal,
}

/// How a [`Client`](crate::Client) retries. `RetryPolicy::default()` is the
/// documents' policy; [`RetryPolicy::none`] never retries.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_retries: u32,
    base: Duration,
    cap: Duration,
    jitter: Jitter,
    max_wait: Duration,
    idempotency_keys: bool,
    never_retry_limits: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            jitter: Jitter::Full,
            max_wait: Duration::from_secs(60),
            idempotency_keys: true,
            never_retry_limits: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The default policy: 3 retries, 1 s doubling to at most 30 s, full
    /// jitter, server waits up to 60 s honoured, idempotency keys on POSTs.
    pub fn new() -> RetryPolicy {
        RetryPolicy::default()
    }

    /// A policy that never retries (every answer is returned as it comes).
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// Retries after the first attempt (default 3).
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// First back-off delay, doubled on each retry (default 1 s).
    pub fn with_base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Largest back-off delay before jitter (default 30 s). The server's
    /// own wait is never cut by this.
    pub fn with_cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Jitter mode (default [`Jitter::Full`]).
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Longest server-requested wait (`Retry-After` or reset) still worth a
    /// retry (default 60 s); a longer one ends the call with the response.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Whether retried POSTs get an `Idempotency-Key` header (default yes).
    pub fn with_idempotency_keys(mut self, on: bool) -> Self {
        self.idempotency_keys = on;
        self
    }

    /// A limit whose 429 is never retried, such as a duplicate-file-name
    /// limit. Matched against the IETF `RateLimit` item name and the
    /// `error.limit` field of tollgate's JSON error body.
    pub fn with_never_retry_limit(mut self, name: impl Into<String>) -> Self {
        self.never_retry_limits.push(name.into());
        self
    }

    /// Retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The longest server wait still retried.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Whether retried POSTs get an `Idempotency-Key`.
    pub fn has_idempotency_keys(&self) -> bool {
        self.idempotency_keys && self.max_retries > 0
    }

    /// Whether `name` is a limit never retried into.
    pub fn is_never_retried(&self, name: &str) -> bool {
        self.never_retry_limits.iter().any(|n| n == name)
    }

    /// Whether a status may be retried at all: 429, 502, 503, 504.
    pub fn is_retryable_status(status: u16) -> bool {
        matches!(status, 429 | 502 | 503 | 504)
    }

    /// The exponential delay before retry `n` (0-based), before jitter:
    /// `min(cap, base * 2^n)`.
    pub fn exponential(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The jittered delay before retry `n` (0-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let d = self.exponential(n);
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => d.mul_f64(unit_random()),
            Jitter::Equal => d / 2 + (d / 2).mul_f64(unit_random()),
        }
    }
}

/// A uniform number in `[0, 1]` from the OS generator (0.5 if it fails,
/// which only makes the jitter less random).
fn unit_random() -> f64 {
    match getrandom::u64() {
        Ok(v) => (v >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// The back-off delays of one call: [`RetryPolicy::backoff`] for retries
/// `0..max_retries`, then none.
#[derive(Debug, Clone)]
pub struct PolicyBackoff {
    policy: RetryPolicy,
    next: u32,
}

impl Iterator for PolicyBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.next >= self.policy.max_retries {
            return None;
        }
        let d = self.policy.backoff(self.next);
        self.next += 1;
        Some(d)
    }
}

impl BackoffBuilder for RetryPolicy {
    type Backoff = PolicyBackoff;

    fn build(self) -> PolicyBackoff {
        PolicyBackoff {
            policy: self,
            next: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for s in [429, 502, 503, 504] {
            assert!(RetryPolicy::is_retryable_status(s), "{s}");
        }
        for s in [200, 400, 401, 402, 403, 404, 409, 413, 422, 500, 501] {
            assert!(!RetryPolicy::is_retryable_status(s), "{s}");
        }
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let p = RetryPolicy::new()
            .with_jitter(Jitter::None)
            .with_max_retries(7);
        let delays: Vec<_> = p.build().map(|d| d.as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn full_jitter_stays_within_bounds() {
        let p = RetryPolicy::new();
        for n in 0..3 {
            for _ in 0..200 {
                assert!(p.backoff(n) <= p.exponential(n));
            }
        }
        let p = p.with_jitter(Jitter::Equal);
        for _ in 0..200 {
            let d = p.backoff(2);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4));
        }
    }

    #[test]
    fn default_is_three_retries() {
        assert_eq!(RetryPolicy::new().build().count(), 3);
        assert_eq!(RetryPolicy::none().build().count(), 0);
        assert!(!RetryPolicy::none().has_idempotency_keys());
    }
}

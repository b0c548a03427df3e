//! Client-side pacing: "throttle at the source" by watching the remaining
//! count, so a polite client slows down before the server says 429.
//!
//! The pacer keeps the last answer's remaining count and holds a request
//! while fewer than its cost are left (minus the cost of requests still in
//! flight). How long it holds:
//!
//! 1. with a known refill rate ([`Pacer::with_refill`], or learnt): until
//!    enough tokens have refilled, plus a small margin;
//! 2. else, when the server sent a reset (`t`, `X-RateLimit-Reset`,
//!    `…-Reset-Time`): until that reset;
//! 3. else a probe: one probe interval (1 s) after the last answer, then one
//!    request goes and its answer teaches the refill rate.
//!
//! The rate is learnt from consecutive answers of a bucket that was not full:
//! `remaining_now + cost_now - remaining_before` tokens came back over the
//! time between the answers. Waiting while a bucket is not full loses no
//! capacity, so a paced client keeps close to the limit's best throughput.
//!
//! After a 429 the pacer holds every request until the server's wait
//! (`Retry-After`, else the reset, else the probe interval) has passed.
//! One pacer describes one caller (key or account): give each its own.
//! Every wait is a `tokio::time` sleep.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::headers::RateLimitInfo;

/// Holds requests while the remaining count is too low; see the module docs.
#[derive(Debug)]
pub struct Pacer {
    /// Serialises waiting callers: first come, first served.
    gate: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    answered: Notify,
    refill: Option<f64>,
    probe: Duration,
    margin: f64,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Seen>,
    limit: Option<u64>,
    in_flight: u64,
    hold_until: Option<Instant>,
    last_cost: Option<u64>,
    learnt_tokens: f64,
    learnt_span: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    remaining: u64,
    reset: Option<Duration>,
}

/// Cost reserved by [`Pacer::acquire`]; give it back to [`Pacer::observe`].
#[derive(Debug)]
#[must_use = "pass the permit to Pacer::observe or Pacer::cancel"]
pub struct Permit {
    cost: u64,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

impl Pacer {
    /// A pacer that learns everything from the headers.
    pub fn new() -> Pacer {
        Pacer {
            gate: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            answered: Notify::new(),
            refill: None,
            probe: Duration::from_secs(1),
            margin: 0.02,
        }
    }

    /// A known refill rate (`tokens` every `per`), as published by the API
    /// (e.g. 100 tokens per second); used instead of a learnt rate.
    pub fn with_refill(mut self, tokens: u64, per: Duration) -> Pacer {
        if !per.is_zero() && tokens > 0 {
            self.refill = Some(tokens as f64 / per.as_secs_f64());
        }
        self
    }

    /// The probe interval when neither a rate nor a reset is known (default 1 s).
    pub fn with_probe(mut self, probe: Duration) -> Pacer {
        self.probe = probe;
        self
    }

    /// The refill rate in tokens per second: configured, or learnt once at
    /// least 250 ms and 5 tokens of refill were seen (counted one token low,
    /// for the server's rounding down).
    pub fn refill_per_second(&self) -> Option<f64> {
        let st = self.state.lock().expect("pacer state");
        self.rate(&st)
    }

    fn rate(&self, st: &State) -> Option<f64> {
        if self.refill.is_some() {
            return self.refill;
        }
        let span = st.learnt_span.as_secs_f64();
        (span >= 0.25 && st.learnt_tokens >= 5.0).then(|| (st.learnt_tokens - 1.0) / span)
    }

    /// Waits until a request of `cost` may go (the last answer's cost, or 1,
    /// when `None`), and reserves that cost.
    pub async fn acquire(&self, cost: Option<u64>) -> Permit {
        let _turn = self.gate.lock().await;
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            let wait_until = {
                let mut st = self.state.lock().expect("pacer state");
                let cost = cost.or(st.last_cost).unwrap_or(1).max(1);
                match self.ready_at(&st, cost, Instant::now()) {
                    None => {
                        st.in_flight += cost;
                        return Permit { cost };
                    }
                    Some(at) => at,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(wait_until) => {}
                () = answered => {}
            }
        }
    }

    /// `None` when a request of `cost` may go now, else when to look again.
    fn ready_at(&self, st: &State, cost: u64, now: Instant) -> Option<Instant> {
        if let Some(h) = st.hold_until
            && h > now
        {
            return Some(h);
        }
        let last = st.last?;
        let rate = self.rate(st);
        let elapsed = now.saturating_duration_since(last.at).as_secs_f64();
        let mut level = last.remaining as f64 + rate.unwrap_or(0.0) * elapsed;
        if let Some(limit) = st.limit {
            level = level.min(limit as f64);
        }
        let available = level - st.in_flight as f64;
        if available >= cost as f64 {
            return None;
        }
        if let Some(rate) = rate.filter(|r| *r > 0.0) {
            let secs = (cost as f64 - available) / rate * (1.0 + self.margin);
            return Some(now + Duration::from_secs_f64(secs) + Duration::from_millis(2));
        }
        if st.in_flight > 0 {
            // Their answers will say more; look again then (or after a probe).
            return Some(now + self.probe);
        }
        let at = last.at + last.reset.unwrap_or(self.probe);
        (at > now).then_some(at)
    }

    /// Records an answer: its status and headers, for the request `permit`
    /// was reserved for.
    pub fn observe(&self, permit: Permit, status: u16, info: &RateLimitInfo) {
        let now = Instant::now();
        let mut st = self.state.lock().expect("pacer state");
        st.in_flight = st.in_flight.saturating_sub(permit.cost);
        if let Some(l) = info.limit {
            st.limit = Some(l);
        }
        if let Some(c) = info.cost {
            st.last_cost = Some(c);
        }
        if status == 429 {
            let wait = info.server_wait(status).unwrap_or(self.probe);
            st.hold_until = Some(now + wait);
            st.last = Some(Seen {
                at: now,
                remaining: 0,
                reset: info.reset,
            });
        } else if let Some(remaining) = info.remaining {
            let cost = info.cost.unwrap_or(permit.cost);
            let before = remaining.saturating_add(cost);
            if let Some(prev) = st.last
                && st.limit.is_some_and(|l| before < l)
                && before >= prev.remaining
            {
                st.learnt_tokens += (before - prev.remaining) as f64;
                st.learnt_span += now.saturating_duration_since(prev.at);
            }
            st.last = Some(Seen {
                at: now,
                remaining,
                reset: info.reset,
            });
        }
        drop(st);
        self.answered.notify_waiters();
    }

    /// Gives back a reservation whose request got no answer.
    pub fn cancel(&self, permit: Permit) {
        let mut st = self.state.lock().expect("pacer state");
        st.in_flight = st.in_flight.saturating_sub(permit.cost);
        drop(st);
        self.answered.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(limit: u64, remaining: u64, cost: u64) -> RateLimitInfo {
        RateLimitInfo {
            limit: Some(limit),
            remaining: Some(remaining),
            cost: Some(cost),
            ..RateLimitInfo::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn goes_at_once_while_tokens_remain() {
        let p = Pacer::new();
        let t0 = Instant::now();
        for r in [30, 20, 10] {
            let permit = p.acquire(Some(10)).await;
            p.observe(permit, 200, &info(40, r, 10));
        }
        assert_eq!(Instant::now(), t0);
    }

    #[tokio::test(start_paused = true)]
    async fn known_rate_waits_for_the_deficit() {
        let p = Pacer::new().with_refill(100, Duration::from_secs(1));
        let permit = p.acquire(Some(20)).await;
        p.observe(permit, 200, &info(400, 0, 20));
        let t0 = Instant::now();
        let permit = p.acquire(Some(20)).await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(210),
            "{waited:?}"
        );
        p.cancel(permit);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_then_learns_the_rate() {
        let p = Pacer::new();
        let permit = p.acquire(Some(20)).await;
        p.observe(permit, 200, &info(400, 0, 20));
        let t0 = Instant::now();
        let permit = p.acquire(Some(20)).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        // 100 tokens came back in that second.
        p.observe(permit, 200, &info(400, 80, 20));
        let rate = p.refill_per_second().expect("learnt");
        assert!((98.0..=100.0).contains(&rate), "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn reset_is_waited_for_without_a_rate() {
        let p = Pacer::new();
        let permit = p.acquire(None).await;
        let mut i = info(10, 0, 1);
        i.reset = Some(Duration::from_secs(7));
        p.observe(permit, 200, &i);
        let t0 = Instant::now();
        p.cancel(p.acquire(None).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_holds_everyone_for_retry_after() {
        let p = Pacer::new().with_refill(1000, Duration::from_secs(1));
        let permit = p.acquire(None).await;
        let i = RateLimitInfo {
            retry_after: Some(Duration::from_secs(3)),
            ..RateLimitInfo::default()
        };
        p.observe(permit, 429, &i);
        let t0 = Instant::now();
        p.cancel(p.acquire(None).await);
        assert!(t0.elapsed() >= Duration::from_secs(3));
    }
}

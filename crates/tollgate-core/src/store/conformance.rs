//! One behaviour, every store: `async fn`s that take a store and assert the
//! contract of [`Store::decide`]. Each backend instantiates them with one line:
//!
//! ```ignore
//! tollgate_core::conformance_tests!(memory, tollgate_core::MemoryStore::default());
//! ```
//!
//! Times are explicit (`now` arguments), so the cases run the same on a store
//! that would otherwise use its own clock.

use std::num::NonZeroU64;
use std::time::Duration;

use crate::algorithm::Evaluation;
use crate::algorithm::gcra::GcraRate;
use crate::algorithm::sliding_window::SlidingWindow;
use crate::clock::Nanos;
use crate::store::{Check, CounterKey, Params, Store};

const T0: Nanos = Nanos(1_700_000_000_000_000_000);

fn key(tag: u128, n: u128) -> CounterKey {
    CounterKey((tag << 64) | n)
}

fn bucket(capacity: u64, refill_per_s: u64) -> Params {
    Params::Gcra(GcraRate::new(
        NonZeroU64::new(capacity).expect("non-zero"),
        NonZeroU64::new(refill_per_s).expect("non-zero"),
        Duration::from_secs(1),
    ))
}

async fn one<S: Store>(store: &S, now: Nanos, check: Check) -> (bool, Evaluation) {
    let mut out = [Evaluation::default(); 1];
    let admitted = store
        .decide(now, &[check], 0, &mut out)
        .await
        .expect("store decides");
    (admitted, out[0])
}

/// A rejected request takes nothing from any of its limits.
pub async fn rejected_request_consumes_nothing<S: Store>(store: &S) {
    let wide = Check {
        key: key(1, 1),
        params: bucket(100, 1),
        cost: 1,
        blocking: true,
    };
    let narrow = Check {
        key: key(1, 2),
        params: bucket(3, 1),
        cost: 1,
        blocking: true,
    };
    let mut out = [Evaluation::default(); 2];
    for i in 0..10 {
        let admitted = store
            .decide(T0, &[wide, narrow], 0, &mut out)
            .await
            .expect("store decides");
        assert_eq!(admitted, i < 3, "request {i}");
    }
    let (admitted, e) = one(store, T0, wide).await;
    assert!(admitted);
    assert_eq!(
        e.remaining, 96,
        "only the 3 admitted requests took from the wide limit"
    );
}

/// Non-blocking checks (soft, shadow, forward) never refuse, and take their
/// cost only when they admit.
pub async fn non_blocking_checks_never_refuse<S: Store>(store: &S) {
    let soft = Check {
        key: key(2, 1),
        params: bucket(2, 1),
        cost: 1,
        blocking: false,
    };
    let mut admitted_soft = 0;
    for _ in 0..5 {
        let (admitted, e) = one(store, T0, soft).await;
        assert!(admitted, "a soft check never refuses the request");
        admitted_soft += u32::from(e.admit);
    }
    assert_eq!(admitted_soft, 2, "crossings are reported, not counted");
}

/// `retry_after` is exact: refused 1 ns before it, admitted at it.
pub async fn retry_after_is_exact<S: Store>(store: &S) {
    let c = Check {
        key: key(3, 1),
        params: bucket(2, 1),
        cost: 2,
        blocking: true,
    };
    assert!(one(store, T0, c).await.0);
    let (admitted, e) = one(store, T0, c).await;
    assert!(!admitted);
    assert_eq!(e.retry_after_duration(), Duration::from_secs(2));
    let at = T0.plus(e.retry_after_duration());
    assert!(!one(store, Nanos(at.0 - 1), c).await.0);
    assert!(one(store, at, c).await.0);

    let w = Check {
        key: key(3, 2),
        params: Params::Sliding(SlidingWindow::new(2, Duration::from_secs(3))),
        cost: 1,
        blocking: true,
    };
    assert!(one(store, T0, w).await.0);
    assert!(one(store, T0, w).await.0);
    let (admitted, e) = one(store, T0, w).await;
    assert!(!admitted);
    let at = T0.plus(e.retry_after_duration());
    assert!(!one(store, Nanos(at.0 - 1), w).await.0);
    assert!(one(store, at, w).await.0);
}

/// A sliding window is an exact log: each unit comes back exactly T after it
/// was taken (weighted costs too), `Retry-After` is at most T, and a window
/// made longer or shorter (a policy reload) keeps what was taken.
pub async fn sliding_window_is_an_exact_log<S: Store>(store: &S) {
    let t = Duration::from_secs(3);
    let w = |cost| Check {
        key: key(6, 1),
        params: Params::Sliding(SlidingWindow::new(5, t)),
        cost,
        blocking: true,
    };
    let t1 = T0.plus(Duration::from_millis(500));
    assert!(one(store, T0, w(2)).await.0);
    assert!(one(store, t1, w(3)).await.0);
    let (admitted, e) = one(store, t1, w(1)).await;
    assert!(!admitted);
    assert_eq!(e.remaining, 0);
    assert_eq!(
        e.retry_after_duration(),
        t - Duration::from_millis(500),
        "the first 2 leave at T0 + T"
    );
    assert_eq!(e.reset_duration(), t, "empty T after the last admission");
    // 3 units: the entry of 3 must leave too, at t1 + T exactly.
    let (_, e) = one(store, t1, w(3)).await;
    assert_eq!(e.retry_after_duration(), t);
    let back = T0.plus(t);
    assert!(!one(store, Nanos(back.0 - 1), w(1)).await.0);
    assert!(one(store, back, w(2)).await.0, "2 back exactly T after");
    assert!(!one(store, back, w(1)).await.0);
    // Reload to a 6 s window: everything taken still counts, and leaves
    // 6 s after it was taken; to a 1 s window: what is older than 1 s is gone.
    let longer = Check {
        params: Params::Sliding(SlidingWindow::new(5, Duration::from_secs(6))),
        ..w(1)
    };
    let (admitted, e) = one(store, back, longer).await;
    assert!(!admitted);
    assert_eq!(
        e.retry_after_duration(),
        Duration::from_millis(3_500),
        "the 3 taken at t1 leave at t1 + 6 s"
    );
    let shorter = Check {
        params: Params::Sliding(SlidingWindow::new(5, Duration::from_secs(1))),
        ..w(3)
    };
    let (admitted, e) = one(store, back, shorter).await;
    assert!(admitted, "only the 2 taken at T0 + T count in a 1 s window");
    assert_eq!(e.remaining, 0);
}

/// An approximate sliding window merges admissions per sub-window of
/// ⌈T/15⌉ (stamped with the latest): safe, at most one sub-window late, and
/// `Retry-After` still at most T.
pub async fn approximate_sliding_window_is_late_by_at_most_a_sub_window<S: Store>(store: &S) {
    let t = Duration::from_secs(15);
    let params = Params::Sliding(SlidingWindow::with_precision(
        4,
        t,
        crate::algorithm::sliding_window::Precision::Approximate,
    ));
    let c = Check {
        key: key(7, 1),
        params,
        cost: 1,
        blocking: true,
    };
    // T0 is a whole second: sub-windows of 1 s start on it.
    let at = |ms| T0.plus(Duration::from_millis(ms));
    assert!(one(store, at(0), c).await.0);
    assert!(one(store, at(100), c).await.0);
    assert!(
        one(store, at(900), c).await.0,
        "merged with the two before, stamped 0.9 s"
    );
    assert!(
        one(store, at(1_200), c).await.0,
        "a new sub-window: a new entry"
    );
    let (admitted, e) = one(store, at(1_200), c).await;
    assert!(!admitted);
    assert_eq!(
        e.retry_after_duration(),
        t - Duration::from_millis(300),
        "the merged 3 leave at 0.9 s + T"
    );
    assert!(e.retry_after_duration() <= t);
    let back = at(900).plus(t);
    assert!(!one(store, Nanos(back.0 - 1), c).await.0);
    assert!(one(store, back, c).await.0);
}

/// A calendar window resets exactly at its end.
pub async fn calendar_window_resets_at_its_end<S: Store>(store: &S) {
    let end = T0.plus(Duration::from_secs(60));
    let c = Check {
        key: key(4, 1),
        params: Params::Calendar { limit: 2, end },
        cost: 1,
        blocking: true,
    };
    assert!(one(store, T0, c).await.0);
    assert!(one(store, T0, c).await.0);
    let (admitted, e) = one(store, Nanos(end.0 - 1), c).await;
    assert!(!admitted);
    assert_eq!(e.retry_after_duration(), Duration::from_nanos(1));
    let next = Check {
        params: Params::Calendar {
            limit: 2,
            end: end.plus(Duration::from_secs(60)),
        },
        ..c
    };
    assert!(one(store, end, next).await.0);
}

/// Leases hold a slot until released or expired.
pub async fn leases_hold_until_released<S: Store>(store: &S) {
    let params = Params::Concurrency {
        limit: 1,
        ttl: Duration::from_secs(30),
    };
    let c = Check {
        key: key(5, 1),
        params,
        cost: 1,
        blocking: true,
    };
    let mut out = [Evaluation::default(); 1];
    assert!(store.decide(T0, &[c], 7, &mut out).await.expect("decides"));
    assert!(!store.decide(T0, &[c], 8, &mut out).await.expect("decides"));
    store.release(T0, &[c.key], 7).await.expect("releases");
    assert!(store.decide(T0, &[c], 9, &mut out).await.expect("decides"));
    let expired = T0.plus(Duration::from_secs(30));
    assert!(
        store
            .decide(expired, &[c], 10, &mut out)
            .await
            .expect("decides"),
        "an unreleased lease expires after its TTL"
    );
}

/// Runs a future whose store answers without waiting on I/O (the in-memory
/// store). Backends that need a runtime instantiate the suite with their own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Instantiates every conformance case as a `#[test]` for a store expression.
#[macro_export]
macro_rules! conformance_tests {
    ($name:ident, $store:expr) => {
        mod $name {
            use $crate::store::conformance as c;
            #[test]
            fn rejected_request_consumes_nothing() {
                c::block_on(c::rejected_request_consumes_nothing(&$store));
            }
            #[test]
            fn non_blocking_checks_never_refuse() {
                c::block_on(c::non_blocking_checks_never_refuse(&$store));
            }
            #[test]
            fn retry_after_is_exact() {
                c::block_on(c::retry_after_is_exact(&$store));
            }
            #[test]
            fn sliding_window_is_an_exact_log() {
                c::block_on(c::sliding_window_is_an_exact_log(&$store));
            }
            #[test]
            fn approximate_sliding_window_is_late_by_at_most_a_sub_window() {
                c::block_on(c::approximate_sliding_window_is_late_by_at_most_a_sub_window(&$store));
            }
            #[test]
            fn calendar_window_resets_at_its_end() {
                c::block_on(c::calendar_window_resets_at_its_end(&$store));
            }
            #[test]
            fn leases_hold_until_released() {
                c::block_on(c::leases_hold_until_released(&$store));
            }
        }
    };
}

#[cfg(test)]
crate::conformance_tests!(memory, crate::MemoryStore::default());

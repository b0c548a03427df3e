//! B1 and B6 on a redis-server of our own: outages are bounded errors, never
//! panics; the store recovers by itself.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::gcra::GcraRate;
use tollgate_core::{Check, Clock, CounterKey, Params, Store, StoreError, SystemClock};
use tollgate_redis::RedisStore;

use crate::support::{OwnRedis, assert_every_key_expires, free_port};

const TIMEOUT: Duration = Duration::from_millis(50);
/// Scheduling slack on a busy 2-core machine.
const MARGIN: Duration = Duration::from_millis(25);

fn check() -> Check {
    Check {
        key: CounterKey((3 << 64) | 1),
        params: Params::Gcra(GcraRate::new(
            NonZeroU64::new(1_000_000).expect("non-zero"),
            NonZeroU64::new(1_000).expect("non-zero"),
            Duration::from_secs(1),
        )),
        cost: 1,
        blocking: true,
    }
}

async fn decide(store: &RedisStore) -> (Result<bool, StoreError>, Duration) {
    let mut out = [Evaluation::default(); 1];
    #[allow(clippy::disallowed_methods)] // measuring real elapsed time
    let t = Instant::now();
    let r = store
        .decide(SystemClock.now(), &[check()], 0, &mut out)
        .await;
    (r, t.elapsed())
}

/// Decides until one succeeds; returns the time it took.
async fn until_ok(store: &RedisStore, within: Duration) -> Duration {
    #[allow(clippy::disallowed_methods)]
    let t = Instant::now();
    loop {
        if let (Ok(true), _) = decide(store).await {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "no recovery within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_kill_then_restart() {
    let port = free_port();
    let mut server = OwnRedis::start(port, &[]);
    let store = RedisStore::builder(server.url())
        .with_timeout(TIMEOUT)
        .connect()
        .await
        .expect("store");
    for _ in 0..10 {
        assert!(matches!(decide(&store).await.0, Ok(true)));
    }
    server.kill();
    let mut took = Vec::new();
    for _ in 0..50 {
        let (r, t) = decide(&store).await;
        let e = r.expect_err("Redis is down");
        assert!(
            matches!(e, StoreError::Timeout(_) | StoreError::Unavailable(_)),
            "{e}"
        );
        took.push(t);
    }
    took.sort_unstable();
    let (p98, worst) = (took[48], took[49]);
    println!("B1: decisions during outage p98 {p98:?}, worst {worst:?} (timeout {TIMEOUT:?})");
    // The plan's bound (timeout + 5 ms) with scheduling slack for a busy
    // 2-core machine; a single descheduled decision may take longer.
    assert!(p98 <= TIMEOUT + MARGIN, "{p98:?}");
    assert!(worst <= TIMEOUT + 4 * MARGIN, "{worst:?}");
    assert!(!store.is_ready().await);
    // Restart: empty script cache; NOSCRIPT must never surface.
    let server = OwnRedis::start(port, &[]);
    let took = until_ok(&store, Duration::from_secs(2)).await;
    println!("B1: back to deciding {took:?} after Redis accepts connections");
    for _ in 0..10 {
        assert!(matches!(decide(&store).await.0, Ok(true)));
    }
    assert!(store.is_ready().await);
    assert_every_key_expires(&server.url(), store.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b6_redis_absent_at_start() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let store = RedisStore::builder(&url)
        .with_timeout(TIMEOUT)
        .connect()
        .await
        .expect("creating the store does not need Redis");
    assert!(!store.is_ready().await);
    for _ in 0..5 {
        let (r, took) = decide(&store).await;
        assert!(r.is_err());
        assert!(took <= TIMEOUT + MARGIN, "{took:?}");
    }
    let _server = OwnRedis::start(port, &[]);
    let took = until_ok(&store, Duration::from_secs(2)).await;
    println!("B6: ready {took:?} after Redis appeared");
    assert!(store.is_ready().await);
}

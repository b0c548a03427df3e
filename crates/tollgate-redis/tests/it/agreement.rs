//! Memory and Redis stores agree on seeded random runs (caller's clock):
//! same admissions, same evaluations, to the nanosecond.

use std::num::NonZeroU64;
use std::time::Duration;

use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::gcra::GcraRate;
use tollgate_core::algorithm::sliding_window::{Precision, SlidingWindow};
use tollgate_core::{Check, CounterKey, MemoryStore, Nanos, Params, Store};
use tollgate_redis::TimeSource;

use crate::support::{SHARED, assert_every_key_expires, shared_store};

/// splitmix64: a seeded generator, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn memory_and_redis_agree_on_random_runs() {
    let redis = shared_store("agree", TimeSource::Caller).await;
    let memory = MemoryStore::default();
    let minute = 60 * Nanos::SECOND;
    let mut seen = [0u32; 2];
    for seed in 1..=5u64 {
        let mut rng = Rng(seed);
        let mut now = Nanos(1_700_000_000_123_456_789 + seed * 1_000_003);
        let scope = u128::from(seed) << 64;
        let bucket = Params::Gcra(GcraRate::new(
            NonZeroU64::new(5).expect("non-zero"),
            NonZeroU64::new(3).expect("non-zero"),
            Duration::from_secs(1),
        ));
        let window = Params::Sliding(SlidingWindow::new(7, Duration::from_millis(1_500)));
        let approximate = Params::Sliding(SlidingWindow::with_precision(
            6,
            Duration::from_millis(1_500),
            Precision::Approximate,
        ));
        let lease = Params::Concurrency {
            limit: 3,
            ttl: Duration::from_millis(700),
        };
        for step in 0..300u64 {
            now = Nanos(now.0 + rng.below(120_000_000));
            let end = Nanos(now.0 - now.0 % minute + minute);
            let calendar = Params::Calendar { limit: 9, end };
            let all = [bucket, window, calendar, lease, approximate];
            let n = 1 + rng.below(4) as usize;
            let mut checks = Vec::new();
            for (i, params) in all.iter().enumerate() {
                if checks.len() < n && rng.below(2) == 0 {
                    checks.push(Check {
                        key: CounterKey(scope | i as u128),
                        params: *params,
                        cost: rng.below(4),
                        blocking: rng.below(4) != 0,
                    });
                }
            }
            if checks.is_empty() {
                continue;
            }
            let id = step + 1;
            let mut a = [Evaluation::default(); 4];
            let mut b = [Evaluation::default(); 4];
            let m = memory
                .decide(now, &checks, id, &mut a)
                .await
                .expect("memory");
            let r = redis.decide(now, &checks, id, &mut b).await.expect("redis");
            let k = checks.len();
            seen[usize::from(m)] += 1;
            assert_eq!(
                (m, &a[..k]),
                (r, &b[..k]),
                "seed {seed} step {step}: {checks:?}"
            );
            if rng.below(3) == 0 {
                let keys = [CounterKey(scope | 3)];
                let back = id - rng.below(3).min(id - 1);
                memory.release(now, &keys, back).await.expect("memory");
                redis.release(now, &keys, back).await.expect("redis");
            }
        }
    }
    println!("agreement: {} admitted, {} rejected", seen[1], seen[0]);
    assert!(
        seen[0] > 100 && seen[1] > 100,
        "both outcomes exercised: {seen:?}"
    );
    assert_every_key_expires(SHARED, redis.prefix()).await;
}

/// A counter written by the former 16-sub-bucket ring (`s <head> <width>
/// <16 counts>`, e.g. left by a replica of the previous version) is read
/// conservatively by the sliding log: its whole cost counts as taken now
/// while any of its buckets could still count, then it is gone.
#[tokio::test]
async fn a_state_of_the_former_ring_is_read_conservatively() {
    use redis::AsyncCommands;
    let store = shared_store("legacy", TimeSource::Caller).await;
    let key = CounterKey((9u128 << 64) | 1);
    let t = Duration::from_secs(3);
    let width = t.as_nanos() as u64 / 15; // the ring's sub-bucket: 200 ms
    let now = Nanos(1_700_000_000_100_000_000);
    let head = now.0 / width;
    let mut ring = format!("s {head} {width}");
    for i in 0..16u64 {
        ring.push_str(if i == head % 16 { " 5" } else { " 0" });
    }
    let mut conn = crate::support::raw(SHARED).await;
    let _: () = conn
        .set_ex(store.redis_key(key), &ring, 60)
        .await
        .expect("set");
    let check = |cost| Check {
        key,
        params: Params::Sliding(SlidingWindow::new(5, t)),
        cost,
        blocking: true,
    };
    let mut out = [Evaluation::default(); 1];
    let admitted = store
        .decide(now, &[check(1)], 1, &mut out)
        .await
        .expect("redis");
    assert!(!admitted, "the ring's 5 still count");
    assert_eq!(
        out[0].retry_after_duration(),
        t,
        "taken as admitted now: back T later"
    );
    // 16 sub-buckets after its head the ring has nothing left that counts.
    let gone = Nanos((head + 16) * width);
    let admitted = store
        .decide(gone, &[check(5)], 2, &mut out)
        .await
        .expect("redis");
    assert!(admitted, "the ring's cost left with its last bucket");
    assert_every_key_expires(SHARED, store.prefix()).await;
}

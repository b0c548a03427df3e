//! A5/A6-style exactness: many concurrent tasks through two stores (two
//! "replicas", two connections) on one counter admit exactly the limit; a
//! deliberately non-atomic GET/SET store over-admits (teeth).

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::gcra::{GcraRate, gcra};
use tollgate_core::algorithm::sliding_window::SlidingWindow;
use tollgate_core::{Check, Clock, CounterKey, Nanos, Params, Store, SystemClock};
use tollgate_redis::{RedisStore, TimeSource};

use crate::support::{SHARED, assert_every_key_expires, raw, unique_prefix};

const TASKS: u64 = 64;
const ATTEMPTS: u64 = 10; // per task: 640 attempts on a limit of 100

/// Two stores on one prefix: two replicas sharing Redis, on the server clock.
async fn replicas(test: &str) -> [RedisStore; 2] {
    let prefix = unique_prefix(test);
    let make = || {
        RedisStore::builder(SHARED)
            .with_prefix(prefix.clone())
            .with_time_source(TimeSource::Server)
            .with_timeout(Duration::from_secs(2))
            .connect()
    };
    [make().await.expect("store"), make().await.expect("store")]
}

/// Hammers `checks` from TASKS tasks spread over the replicas; returns the
/// number of admitted requests.
async fn hammer(stores: &[RedisStore; 2], checks: Vec<Check>) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let checks = Arc::new(checks);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = stores[(t % 2) as usize].clone();
        let (admitted, checks) = (admitted.clone(), checks.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = [Evaluation::default(); 4];
            for i in 0..ATTEMPTS {
                let lease = t * ATTEMPTS + i + 1;
                let now = SystemClock.now();
                if store
                    .decide(now, &checks, lease, &mut out)
                    .await
                    .expect("decides")
                {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    admitted.load(Ordering::Relaxed)
}

fn check(n: u128, params: Params) -> Check {
    Check {
        key: CounterKey((7 << 64) | n),
        params,
        cost: 1,
        blocking: true,
    }
}

fn per_day_bucket(capacity: u64) -> Params {
    // Refills one token a day: nothing comes back during the test.
    Params::Gcra(GcraRate::new(
        NonZeroU64::new(capacity).expect("non-zero"),
        NonZeroU64::new(1).expect("non-zero"),
        Duration::from_secs(86_400),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_every_algorithm_admits_exactly_the_limit() {
    let stores = replicas("a5").await;
    let end = SystemClock.now().plus(Duration::from_secs(3_600));
    let cases = [
        ("token bucket", per_day_bucket(100), 100),
        (
            "sliding window",
            Params::Sliding(SlidingWindow::new(100, Duration::from_secs(3_600))),
            100,
        ),
        ("calendar window", Params::Calendar { limit: 100, end }, 100),
        (
            "concurrency",
            Params::Concurrency {
                limit: 10,
                ttl: Duration::from_secs(60),
            },
            10,
        ),
    ];
    for (n, (name, params, limit)) in cases.into_iter().enumerate() {
        let admitted = hammer(&stores, vec![check(n as u128, params)]).await;
        println!(
            "A5 {name}: admitted {admitted} of {} attempts, limit {limit}",
            TASKS * ATTEMPTS
        );
        assert_eq!(admitted, limit, "{name}: over- or under-admission");
    }
    let keys = assert_every_key_expires(SHARED, stores[0].prefix()).await;
    assert_eq!(keys, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a6_rejected_requests_consume_nothing_from_other_limits() {
    let stores = replicas("a6").await;
    // Same scope: per-3 s (short, rejects), per-minute, per-day.
    let short = check(
        1,
        Params::Sliding(SlidingWindow::new(20, Duration::from_secs(3))),
    );
    let minute = check(
        2,
        Params::Sliding(SlidingWindow::new(500, Duration::from_secs(60))),
    );
    let day = check(3, per_day_bucket(10_000));
    let admitted = hammer(&stores, vec![short, minute, day]).await;
    // Read the day counter without taking anything (cost 0).
    let mut out = [Evaluation::default(); 1];
    let probe = Check { cost: 0, ..day };
    assert!(
        stores[0]
            .decide(SystemClock.now(), &[probe], 0, &mut out)
            .await
            .expect("decides")
    );
    let day_used = 10_000 - out[0].remaining;
    println!("A6: admitted {admitted}, day counter {day_used}");
    assert!(
        admitted >= 20,
        "at least one short window's worth: {admitted}"
    );
    assert!(admitted < TASKS * ATTEMPTS, "the short limit rejected some");
    assert_eq!(day_used, admitted, "rejected requests took nothing");
    assert_every_key_expires(SHARED, stores[0].prefix()).await;
}

/// A deliberately broken store: GET, decide in the client, SET. Not atomic.
struct GetSetStore {
    conn: redis::aio::MultiplexedConnection,
    key: String,
}

impl GetSetStore {
    async fn decide(&self, rate: &GcraRate) -> bool {
        let mut c = self.conn.clone();
        let tat: Option<u64> = redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut c)
            .await
            .expect("get");
        let now = SystemClock.now();
        let (eval, next) = gcra(tat.map(Nanos), now, 1, rate);
        if eval.admit {
            let _: () = redis::cmd("SET")
                .arg(&self.key)
                .arg(next.0)
                .arg("PX")
                .arg(60_000)
                .query_async(&mut c)
                .await
                .expect("set");
        }
        eval.admit
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_teeth_non_atomic_get_set_over_admits() {
    let key = format!("{}counter", unique_prefix("teeth"));
    let Params::Gcra(rate) = per_day_bucket(100) else {
        unreachable!("a bucket")
    };
    let replicas = [
        Arc::new(GetSetStore {
            conn: raw(SHARED).await,
            key: key.clone(),
        }),
        Arc::new(GetSetStore {
            conn: raw(SHARED).await,
            key: key.clone(),
        }),
    ];
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = replicas[(t % 2) as usize].clone();
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ATTEMPTS {
                if s.decide(&rate).await {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let admitted = admitted.load(Ordering::Relaxed);
    println!("A5 teeth (GET/SET): admitted {admitted} on a limit of 100");
    let mut c = raw(SHARED).await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .expect("del");
    assert!(
        admitted > 100,
        "the non-atomic variant must over-admit: {admitted}"
    );
}

//! F2 on a redis-server of our own: a flood of distinct scope values leaves
//! nothing behind. Every key the flood writes carries a TTL no longer than
//! its window, and Redis memory is back at its baseline within two windows.

use std::num::NonZeroU64;
use std::time::Duration;

use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::gcra::GcraRate;
use tollgate_core::algorithm::sliding_window::SlidingWindow;
use tollgate_core::{Check, Clock, CounterKey, Params, Store, SystemClock};
use tollgate_redis::RedisStore;

use crate::support::{OwnRedis, free_port, raw};

/// The window of every limit of the flood.
const WINDOW: Duration = Duration::from_secs(3);
/// Distinct scopes (CI size; the long tier floods 5 M).
const SCOPES: u64 = 30_000;
const TASKS: u64 = 16;

/// A bucket, a sliding window and a calendar window, all `WINDOW` long, on
/// scope `i` (its own hash tag).
fn checks(i: u64) -> [Check; 3] {
    let scope = u128::from(i + 1) << 64;
    let end = SystemClock.now().plus(WINDOW);
    let check = |n: u128, params| Check {
        key: CounterKey(scope | n),
        params,
        cost: 1,
        blocking: true,
    };
    [
        check(
            1,
            Params::Gcra(GcraRate::new(
                NonZeroU64::new(10).expect("non-zero"),
                NonZeroU64::new(10).expect("non-zero"),
                WINDOW,
            )),
        ),
        check(2, Params::Sliding(SlidingWindow::new(10, WINDOW))),
        check(3, Params::Calendar { limit: 10, end }),
    ]
}

async fn info_number(c: &mut redis::aio::MultiplexedConnection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(c)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .expect("field present")
}

/// Every key of the server with its TTL in ms, read with pipelined `PTTL`s.
async fn every_ttl(c: &mut redis::aio::MultiplexedConnection) -> Vec<i64> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(2_000)
            .query_async(c)
            .await
            .expect("scan");
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("PTTL").arg(k);
            }
            let ttls: Vec<i64> = pipe.query_async(c).await.expect("pttl");
            out.extend(ttls);
        }
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// F2: 30 k distinct scopes × 3 limits on Redis. Figures: keys with a TTL
/// longer than the window (or none) → 0 (100 % within window + 1 ms of
/// rounding); `used_memory` back to the baseline ± 10 % and no key left
/// ≤ 2 windows after the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_flood_every_key_expires_and_memory_returns() {
    let server = OwnRedis::start(free_port(), &[]);
    let store = RedisStore::builder(server.url())
        .with_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("store");
    let mut c = raw(&server.url()).await;
    // Load the scripts first so that the baseline includes their cache.
    let mut out = [Evaluation::default(); 3];
    assert!(
        store
            .decide(SystemClock.now(), &checks(u64::MAX - 1), 0, &mut out)
            .await
            .expect("decides")
    );
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut c)
        .await
        .expect("flush own server");
    let baseline = info_number(&mut c, "used_memory").await;

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = [Evaluation::default(); 3];
            for i in (t..SCOPES).step_by(TASKS as usize) {
                let admitted = store
                    .decide(SystemClock.now(), &checks(i), 0, &mut out)
                    .await
                    .expect("decides");
                assert!(admitted, "a fresh scope admits");
            }
        }));
    }
    for t in tasks {
        t.await.expect("flood task");
    }
    #[allow(clippy::disallowed_methods)] // measuring real elapsed time
    let flood_end = std::time::Instant::now();
    let peak = info_number(&mut c, "used_memory").await;

    let ttls = every_ttl(&mut c).await;
    let window_ms = i64::try_from(WINDOW.as_millis()).expect("small");
    let bad = ttls
        .iter()
        .filter(|&&t| t == -1 || t > window_ms + 1)
        .count();
    println!(
        "F2: {} keys found right after the flood of {SCOPES} scopes × 3 limits; \
         TTL missing or above {window_ms} ms: {bad}; used_memory {baseline} B before, {peak} B at the peak",
        ttls.len()
    );
    // Keys written early in the flood may already be gone; what is left
    // must all be on its way out.
    assert!(!ttls.is_empty(), "the flood's keys are there");
    assert_eq!(bad, 0, "every key expires within its window");

    // Back to the baseline within two windows.
    let deadline = 2 * WINDOW;
    loop {
        let keys: u64 = redis::cmd("DBSIZE")
            .query_async(&mut c)
            .await
            .expect("dbsize");
        let used = info_number(&mut c, "used_memory").await;
        let back = keys == 0 && used <= baseline + baseline / 10;
        let took = flood_end.elapsed();
        if back {
            println!(
                "F2: back to baseline {took:?} after the flood (used_memory {used} B, baseline {baseline} B, goal ≤ {deadline:?})"
            );
            break;
        }
        assert!(
            took <= deadline,
            "{keys} keys and {used} B (baseline {baseline} B) {took:?} after the flood"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);
}

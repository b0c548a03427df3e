//! Decisions per second through [`RedisStore`] with 1 and 3 limits per
//! request, against `redis-benchmark` running the same script with the same
//! arguments by `EVALSHA` (the raw rate of the script on this Redis).
//!
//! ```text
//! cargo run --release -p tollgate-redis --example redis_bench -- [redis://127.0.0.1:6379/0] [seconds]
//! ```
//!
//! Keys go under a unique `tgbench:` prefix and expire by their TTL (no flush).

use std::num::NonZeroU64;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::gcra::GcraRate;
use tollgate_core::algorithm::sliding_window::{Precision, SlidingWindow};
use tollgate_core::{Check, Clock, CounterKey, Params, Store, SystemClock};
use tollgate_redis::{DECIDE_SCRIPT, RedisStore};

const TASKS: u64 = 64;
const ACCOUNTS: u64 = 10_000;

fn checks(account: u64, limits: usize, end: u64) -> Vec<Check> {
    let scope = u128::from(account) << 64;
    let all = [
        Check {
            key: CounterKey(scope | 1),
            params: Params::Gcra(GcraRate::new(
                NonZeroU64::new(1_000_000_000).expect("non-zero"),
                NonZeroU64::new(1_000_000).expect("non-zero"),
                Duration::from_secs(1),
            )),
            cost: 1,
            blocking: true,
        },
        Check {
            key: CounterKey(scope | 2),
            // Approximate: N above 1,024 (16 entries whatever N).
            params: Params::Sliding(SlidingWindow::with_precision(
                1_000_000_000,
                Duration::from_secs(60),
                Precision::Approximate,
            )),
            cost: 1,
            blocking: true,
        },
        Check {
            key: CounterKey(scope | 3),
            params: Params::Calendar {
                limit: 1_000_000_000,
                end: tollgate_core::Nanos(end),
            },
            cost: 1,
            blocking: true,
        },
    ];
    all[..limits].to_vec()
}

#[allow(clippy::disallowed_methods)] // a benchmark measures real time
async fn store_rate(store: &RedisStore, limits: usize, secs: u64) -> f64 {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let end = SystemClock.now().0 + 3_600 * 1_000_000_000;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, done, count) = (store.clone(), done.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = [Evaluation::default(); 3];
            let mut i = t;
            while !done.load(Ordering::Relaxed) {
                let c = checks(i % ACCOUNTS, limits, end);
                i = i.wrapping_add(7919);
                if store
                    .decide(SystemClock.now(), &c, 0, &mut out)
                    .await
                    .is_ok()
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    done.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed);
    let took = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / took
}

/// The redis-benchmark arguments running the same script call.
fn benchmark_args(
    sha: &str,
    prefix: &str,
    limits: usize,
    n: u64,
    end: u64,
    pipeline: u32,
) -> Vec<String> {
    let mut a: Vec<String> = ["-p", "6379", "-c", "64", "-P", &pipeline.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["-r".into(), ACCOUNTS.to_string()]);
    a.extend(["-n".into(), n.to_string(), "-q".into()]);
    a.extend(["EVALSHA".into(), sha.into(), limits.to_string()]);
    for i in 1..=limits {
        a.push(format!("{prefix}{{__rand_int__}}:000000000000000{i}"));
    }
    a.extend(["".into(), "bench:0".into()]);
    let per = [
        ["g", "1", "1", "1000000000", "1000"],
        ["s", "1", "1", "1000000000", "4000000000"],
        ["c", "1", "1", "1000000000", ""],
    ];
    for p in &per[..limits] {
        for (j, v) in p.iter().enumerate() {
            a.push(if j == 4 && p[0] == "c" {
                end.to_string()
            } else {
                (*v).to_string()
            });
        }
    }
    a
}

fn parse_rps(out: &str) -> Option<f64> {
    // "EVALSHA ...: 41034.47 requests per second, p50=..."
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("requests per second"))?;
    let before = line.split(" requests per second").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let prefix = format!("tgbench:{}:", std::process::id());
    let store = RedisStore::builder(&url)
        .with_prefix(prefix.clone())
        .with_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("store");
    store.ping().await.expect("Redis is up");
    let sha = redis::Script::new(DECIDE_SCRIPT).get_hash().to_owned();
    let end = SystemClock.now().0 + 3_600 * 1_000_000_000;
    println!(
        "| limits/request | RedisStore decisions/s | redis-benchmark EVALSHA/s (-P 1) | (-P 16) | ratio to the best |"
    );
    println!("|---|---|---|---|---|");
    for limits in [1usize, 3] {
        let _ = store_rate(&store, limits, 1).await; // warm-up
        let ours = store_rate(&store, limits, secs).await;
        let n = (ours * secs as f64).max(10_000.0) as u64;
        let raw = |pipeline| {
            let bench = Command::new("redis-benchmark")
                .args(benchmark_args(&sha, &prefix, limits, n, end, pipeline))
                .output()
                .expect("redis-benchmark (Debian package redis-tools)");
            parse_rps(&String::from_utf8_lossy(&bench.stdout)).unwrap_or(f64::NAN)
        };
        let (p1, p16) = (raw(1), raw(16));
        println!(
            "| {limits} | {ours:.0} | {p1:.0} | {p16:.0} | {:.0} % |",
            100.0 * ours / p1.max(p16)
        );
    }
    println!();
    println!(
        "redis-benchmark command (1 limit): redis-benchmark {}",
        benchmark_args(&sha, &prefix, 1, 100_000, end, 1)
            .iter()
            .map(|a| if a.is_empty() {
                "''".to_string()
            } else {
                a.clone()
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
}

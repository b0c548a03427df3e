//! A fixed number of in-process decisions on one key, for instruction
//! counts: `valgrind --tool=callgrind` runs it in seconds, and its counts do
//! not move with the machine's load the way the criterion bench's timings do
//! (`BENCHMARKS.md`, "Instruction counts").
//!
//! ```sh
//! cargo build --profile bench -p tollgate-core --example decide_loop
//! valgrind --tool=callgrind target/release/examples/decide_loop tollgate-3-limits 200000
//! ```
//!
//! Rows (the same policies, quota and key as `benches/decide.rs`):
//! `tollgate-1-limit`, `tollgate-3-limits`, `governor`. Run each with 0
//! iterations too, and subtract: what is left is the cost of the decisions.
//! A third argument sets the number of keys (default 1; e.g. 1000000 with
//! `--cache-sim=yes` counts cache misses per decision).
#![allow(clippy::disallowed_methods)] // times itself with `Instant::now`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use tollgate_core::policy;
use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Outcome, Request};

/// The policies every row runs (shared with `examples/decide_loop.rs`; see
/// the files for their numbers).
const BUCKET: &str = include_str!("../benches/policies/bucket.toml");
const WINDOWS: &str = include_str!("../benches/policies/windows.toml");

fn main() {
    let mut args = std::env::args().skip(1);
    let row = args.next().unwrap_or_else(|| "tollgate-3-limits".into());
    let iterations: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    // Optional: how many keys (default 1), each decided once before the
    // loop, then picked with a xorshift as in the bench (for cache misses:
    // `valgrind --tool=callgrind --cache-sim=yes`).
    let n_keys: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1).max(1);
    let keys: Vec<String> = (0..n_keys).map(|i| format!("acct-{i:07}")).collect();
    let mut rng = 0x5EED_0001_u64;
    let mut pick = move || {
        if n_keys == 1 {
            return 0;
        }
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n_keys as u64) as usize
    };
    let start = Instant::now();
    let admitted = match row.as_str() {
        "tollgate-1-limit" | "tollgate-3-limits" => {
            let src = if row == "tollgate-1-limit" {
                BUCKET.to_string()
            } else {
                format!("{BUCKET}{WINDOWS}")
            };
            let policy = policy::parse(&src, "decide_loop.toml").expect("valid policy");
            let op = policy
                .operation_for("GET", "/v1/call")
                .expect("operation matches");
            let clock = ManualClock::new(Nanos::from_secs(1_700_000_000));
            let engine =
                Engine::with_clock(MemoryStore::new(16.max(4 * n_keys)), clock).with_key_seed(7);
            for key in &keys {
                let req = Request {
                    account: key,
                    ..Request::new(policy.default_plan, op)
                };
                engine.decide_now(&policy, &req);
            }
            let mut admitted = 0u64;
            for _ in 0..iterations {
                let req = Request {
                    account: black_box(&keys[pick()]),
                    ..Request::new(policy.default_plan, op)
                };
                admitted +=
                    u64::from(engine.decide_now(&policy, &req).outcome == Outcome::Admitted);
            }
            admitted
        }
        "governor" => {
            let clock = FakeRelativeClock::default();
            clock.advance(Duration::from_secs(1_000));
            let quota = Quota::with_period(Duration::from_nanos(1))
                .expect("non-zero period")
                .allow_burst(NonZeroU32::MAX);
            let limiter = RateLimiter::dashmap_with_clock(quota, clock);
            for key in &keys {
                let _ = limiter.check_key(key);
            }
            let mut admitted = 0u64;
            for _ in 0..iterations {
                admitted += u64::from(limiter.check_key(black_box(&keys[pick()])).is_ok());
            }
            admitted
        }
        other => panic!("unknown row {other}: tollgate-1-limit, tollgate-3-limits or governor"),
    };
    let elapsed = start.elapsed();
    println!(
        "{row}: {admitted} of {iterations} admitted in {elapsed:?} ({:.1} ns per decision)",
        elapsed.as_nanos() as f64 / iterations.max(1) as f64
    );
}

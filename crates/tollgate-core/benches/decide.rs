//! In-process decision throughput: tollgate's engine on the in-memory store,
//! side by side with `governor`'s keyed limiter and a naive
//! `Mutex<HashMap<u64, u64>>` GCRA, on the same workload.
//!
//! Workload, identical for every row:
//! - keys: 1 key, or 1,000,000 keys (`acct-<n>` strings, pre-generated);
//!   each call picks its key with a seeded xorshift (one seed per thread).
//!   Every key is decided once before measuring, so the rows measure the
//!   existing-key path, not first inserts.
//! - limits are far above what a run can use, so every request is admitted
//!   (the admit path is measured; each row prints its admitted share and
//!   panics if it is under 99%).
//! - time: tollgate reads a `ManualClock`, governor a
//!   `governor::clock::FakeRelativeClock`, the naive baseline an `AtomicU64`:
//!   one atomic load per decision each, advanced by 1 ms before every sample
//!   (outside the timed region). Governor's default clock (quanta) is not
//!   used so that no row pays for reading the wall clock.
//! - threads: 1, or 2 threads splitting the iterations (`std::thread::scope`,
//!   wall time from spawn to join, spawn cost included and amortised over
//!   the sample).
//!
//! Rows: `tollgate-1-limit` (token bucket), `tollgate-3-limits` (token
//! bucket, sliding window and calendar window, all scoped by account),
//! `governor` (String keys, like tollgate's), `governor-u64-keys`
//! (governor's best case), `naive` (u64 keys). Results and ratios are in `BENCHMARKS.md`.
#![allow(missing_docs)] // criterion_main! generates an undocumented `main`

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use governor::clock::FakeRelativeClock;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter, middleware::NoOpMiddleware};
use tollgate_core::policy::{self, CompiledPolicy, OperationId};
use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Outcome, Request};

/// The policies every row runs (shared with `examples/decide_loop.rs`; see
/// the files for their numbers).
const BUCKET: &str = include_str!("policies/bucket.toml");
const WINDOWS: &str = include_str!("policies/windows.toml");

const SAMPLE_CLOCK_STEP: Duration = Duration::from_millis(1);

/// xorshift64*: a seeded, allocation-free key picker.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// An index below `n`, by multiply-shift (no division).
    fn index(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// The pre-generated key set of one row.
struct Keys {
    label: &'static str,
    strings: Vec<String>,
    ids: Vec<u64>,
}

impl Keys {
    fn new(label: &'static str, n: usize) -> Keys {
        let mut rng = XorShift(0x7011_6A7E);
        Keys {
            label,
            strings: (0..n).map(|i| format!("acct-{i:07}")).collect(),
            ids: (0..n).map(|_| rng.next()).collect(),
        }
    }

    fn len(&self) -> usize {
        self.strings.len()
    }
}

/// One implementation under test: decides key `i`, says whether it admitted.
trait Limiter: Sync {
    fn decide(&self, i: usize) -> bool;
    /// Moves its clock forward (between samples, untimed).
    fn advance(&self, d: Duration);
}

struct Tollgate<'k> {
    engine: Engine<MemoryStore, ManualClock>,
    policy: CompiledPolicy,
    op: OperationId,
    keys: &'k Keys,
}

impl<'k> Tollgate<'k> {
    fn new(src: &str, keys: &'k Keys) -> Tollgate<'k> {
        let policy = policy::parse(src, "bench.toml").expect("bench policy is valid");
        let op = policy
            .operation_for("GET", "/v1/call")
            .expect("operation matches");
        // Room for 3 counters per key.
        let store = MemoryStore::new(3 * keys.len() + 16);
        let engine = Engine::with_clock(store, ManualClock::new(Nanos::from_secs(1_700_000_000)))
            .with_key_seed(7);
        Tollgate {
            engine,
            policy,
            op,
            keys,
        }
    }
}

impl Limiter for Tollgate<'_> {
    #[inline]
    fn decide(&self, i: usize) -> bool {
        let req = Request {
            account: &self.keys.strings[i],
            ..Request::new(self.policy.default_plan, self.op)
        };
        self.engine.decide_now(&self.policy, &req).outcome == Outcome::Admitted
    }

    fn advance(&self, d: Duration) {
        self.engine.clock().advance(d);
    }
}

fn governor_quota() -> Quota {
    Quota::with_period(Duration::from_nanos(1))
        .expect("non-zero period")
        .allow_burst(NonZeroU32::MAX)
}

/// `governor::RateLimiter::keyed` on a fake clock: the same DashMap store
/// and default hasher as `DefaultKeyedRateLimiter`.
struct Governor<'k, K: std::hash::Hash + Eq + Clone + Send + Sync> {
    limiter: RateLimiter<
        K,
        DashMapStateStore<K>,
        FakeRelativeClock,
        NoOpMiddleware<governor::nanos::Nanos>,
    >,
    clock: FakeRelativeClock,
    keys: &'k [K],
}

impl<'k, K: std::hash::Hash + Eq + Clone + Send + Sync> Governor<'k, K> {
    fn new(keys: &'k [K]) -> Governor<'k, K> {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(1_000));
        Governor {
            limiter: RateLimiter::dashmap_with_clock(governor_quota(), clock.clone()),
            clock,
            keys,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync> Limiter for Governor<'_, K> {
    #[inline]
    fn decide(&self, i: usize) -> bool {
        self.limiter.check_key(&self.keys[i]).is_ok()
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

/// The simplest thing that works: one lock around a map of TATs.
struct Naive<'k> {
    tats: Mutex<HashMap<u64, u64>>,
    now: AtomicU64,
    keys: &'k [u64],
}

impl Naive<'_> {
    const INTERVAL: u64 = 1;
    const TAU: u64 = u32::MAX as u64;
}

impl Limiter for Naive<'_> {
    #[inline]
    fn decide(&self, i: usize) -> bool {
        let now = self.now.load(Ordering::Relaxed);
        let mut tats = self.tats.lock().expect("no panic while locked");
        let tat = tats.entry(self.keys[i]).or_insert(now);
        let next = (*tat).max(now) + Self::INTERVAL;
        if next - now <= Self::TAU {
            *tat = next;
            true
        } else {
            false
        }
    }

    fn advance(&self, d: Duration) {
        self.now.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[inline(never)]
fn run_loop<L: Limiter>(limiter: &L, n: usize, iters: u64, seed: u64) -> u64 {
    let mut rng = XorShift(seed);
    let mut admitted = 0;
    for _ in 0..iters {
        admitted += u64::from(limiter.decide(black_box(rng.index(n))));
    }
    admitted
}

/// Benches `limiter` on 1 and 2 threads as `decide/<name>/<keys>/<n>-thread(s)`.
fn bench<L: Limiter>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, keys: &Keys, limiter: &L) {
    let n = keys.len();
    // Every key decided once: measure the existing-key path.
    for i in 0..n {
        limiter.decide(i);
    }
    for threads in [1u64, 2] {
        let id = format!(
            "{name}/{}/{threads}-thread{}",
            keys.label,
            if threads == 1 { "" } else { "s" }
        );
        let (total, admitted) = (AtomicU64::new(0), AtomicU64::new(0));
        g.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                limiter.advance(SAMPLE_CLOCK_STEP);
                #[allow(clippy::disallowed_methods)] // the bench times itself (iter_custom)
                let start = Instant::now();
                let got = if threads == 1 {
                    run_loop(limiter, n, iters, 0x5EED_0001)
                } else {
                    std::thread::scope(|s| {
                        let first = s.spawn(|| run_loop(limiter, n, iters / 2, 0x5EED_0002));
                        let second = run_loop(limiter, n, iters - iters / 2, 0x5EED_0003);
                        first.join().expect("bench thread") + second
                    })
                };
                let elapsed = start.elapsed();
                total.fetch_add(iters, Ordering::Relaxed);
                admitted.fetch_add(got, Ordering::Relaxed);
                elapsed
            });
        });
        let (total, admitted) = (total.into_inner(), admitted.into_inner());
        if total == 0 {
            continue; // filtered out on the command line
        }
        let share = admitted as f64 / total.max(1) as f64;
        println!(
            "{id}: admitted {admitted} of {total} ({:.3}%)",
            share * 100.0
        );
        assert!(share >= 0.99, "{id}: the bench must measure the admit path");
    }
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    let three = format!("{BUCKET}{WINDOWS}");
    for keys in [Keys::new("1-key", 1), Keys::new("1M-keys", 1_000_000)] {
        bench(
            &mut g,
            "tollgate-1-limit",
            &keys,
            &Tollgate::new(BUCKET, &keys),
        );
        bench(
            &mut g,
            "tollgate-3-limits",
            &keys,
            &Tollgate::new(&three, &keys),
        );
        bench(&mut g, "governor", &keys, &Governor::new(&keys.strings));
        bench(
            &mut g,
            "governor-u64-keys",
            &keys,
            &Governor::new(&keys.ids),
        );
        let naive = Naive {
            tats: Mutex::new(HashMap::new()),
            now: AtomicU64::new(1_000 * Nanos::SECOND),
            keys: &keys.ids,
        };
        bench(&mut g, "naive", &keys, &naive);
    }
    g.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);

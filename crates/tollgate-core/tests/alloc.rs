//! Memory budget of the in-memory decision path, measured with a counting
//! global allocator (`alloc-count`, a dev-only crate: the workspace forbids
//! `unsafe_code`, which a `GlobalAlloc` impl needs, so it lives outside).
//!
//! - no allocation per decision on an existing counter, after warm-up;
//! - live heap bytes per active counter (budget: 128 B, DESIGN.md);
//! - idle counters swept: every counter's allocation goes back, and so does
//!   the index (the sweep rebuilds it once at most 1/8 of its high water is
//!   live): memory returns to within 1% of the counters' peak; a next
//!   generation of counters must fit in the first one's memory.
//!
//! Everything runs in one `#[test]`, on one thread, so that the process-wide
//! byte counts are not disturbed by other tests running in parallel.
//!
//! Deferred reclamation: the store's map (`papaya`) frees removed entries and
//! replaced tables through `seize`, in batches of 32 retired objects per
//! thread, once no guard can still see them. A table replaced by a resize can
//! therefore stay allocated until 32 more objects are retired. Before each
//! reading the test sweeps a handful of throw-away counters (a limit of its
//! own that is fresh again after 1 ns) so that the pending batch is
//! reclaimed: readings then count what the store really holds, not what is
//! waiting to be freed.

use std::fmt::Write;
use std::time::Duration;

use tollgate_core::policy::{self, CompiledPolicy, OperationId};
use tollgate_core::{Clock, Engine, ManualClock, MemoryStore, Nanos, Outcome, Request};

#[global_allocator]
static ALLOC: alloc_count::CountingAlloc = alloc_count::CountingAlloc::new();

const OPERATION: &str = r#"
[operations.call]
method = "GET"
path = "/v1/call"
"#;

/// 100 tokens, 1 back per millisecond: fresh again 1 ms after its last use.
const BUCKET: &str = r#"
[limits.bucket]
algorithm = "token_bucket"
capacity = 100
refill = 1000
scope = ["account"]
"#;

/// 1,000 per 10 s.
const SLIDING: &str = r#"
[limits.sliding]
algorithm = "sliding_window"
limit = 1000
window = "10s"
scope = ["account"]
"#;

/// 100,000 per UTC day.
const CALENDAR: &str = r#"
[limits.daily]
algorithm = "calendar_window"
limit = 100000
window = "day"
scope = ["account"]
"#;

/// Fresh again 1 ns after use: counters that one sweep later can drop.
const CHURN: &str = r#"
[limits.churn]
algorithm = "token_bucket"
capacity = 1000000000
refill = 1000000000
scope = ["account"]
"#;

const COUNTERS: usize = 1_000_000;
const START: Nanos = Nanos(1_700_000_000 * Nanos::SECOND);

struct Setup {
    policy: CompiledPolicy,
    op: OperationId,
}

impl Setup {
    fn new(limits: &[&str]) -> Setup {
        let policy = policy::parse(&format!("{OPERATION}{}", limits.concat()), "alloc.toml")
            .expect("valid policy");
        let op = policy
            .operation_for("GET", "/v1/call")
            .expect("operation matches");
        Setup { policy, op }
    }

    fn decide(&self, engine: &Engine<MemoryStore, ManualClock>, account: &str) -> Outcome {
        let req = Request {
            account,
            ..Request::new(self.policy.default_plan, self.op)
        };
        engine.decide_now(&self.policy, &req).outcome
    }
}

fn engine() -> Engine<MemoryStore, ManualClock> {
    Engine::with_clock(MemoryStore::new(2 * COUNTERS), ManualClock::new(START)).with_key_seed(1)
}

#[test]
fn memory_budget_of_the_decision_path() {
    zero_allocations_per_decision();
    let bucket = counters_cost_and_come_back("token bucket", BUCKET);
    assert!(
        bucket < 128.0,
        "token bucket: {bucket:.1} B per counter, budget 128 B"
    );
    // A sliding log of one entry is held inline: the same budget.
    let sliding = counters_cost_and_come_back("sliding window", SLIDING);
    assert!(
        sliding < 128.0,
        "sliding window: {sliding:.1} B per counter, budget 128 B"
    );
}

/// (a) Token bucket + sliding window + calendar window on an existing key:
/// admitted and rejected decisions alike allocate nothing.
fn zero_allocations_per_decision() {
    let setup = Setup::new(&[BUCKET, SLIDING, CALENDAR]);
    let engine = engine();
    // Mostly 20 ms apart (the bucket refills, the sliding log takes and
    // drops entries), with bursts that exhaust the bucket so the rejection
    // path runs too.
    let run = |admitted: &mut u32, rejected: &mut u32| {
        for i in 0..10_000 {
            if i % 1000 < 800 {
                engine.clock().advance(Duration::from_millis(20));
            }
            match setup.decide(&engine, "acme") {
                Outcome::Admitted => *admitted += 1,
                Outcome::Rejected { .. } => *rejected += 1,
                other => panic!("unexpected outcome {other:?}"),
            }
        }
    };
    // Warm-up: the first decision inserts the three counters; the thread's
    // reclamation slot is set up on first use. The sliding window's log
    // grows (its ring doubles) until it holds one entry per distinct
    // admission instant of the last 10 s (about 500 here) and keeps that
    // capacity: a first pass of the same traffic (160 s, 16 windows) brings
    // it to its high-water size. The measured pass is then the steady state.
    let (mut admitted, mut rejected) = (0, 0);
    let warm = alloc_count::thread_allocations();
    run(&mut admitted, &mut rejected);
    let warmed = alloc_count::thread_allocations() - warm;
    println!(
        "(a) warm-up pass: {warmed} allocations (the counters, the sliding log's ring doubling to its high-water size)"
    );
    // Counted from after the line above: under `cargo test` (output
    // captured), printing it grows libtest's capture buffer on this thread.
    let before = alloc_count::thread_allocations();
    let (mut admitted, mut rejected) = (0, 0);
    run(&mut admitted, &mut rejected);
    let allocations = alloc_count::thread_allocations() - before;
    println!(
        "(a) 3 limits, existing key: {allocations} allocations in 10,000 decisions ({admitted} admitted, {rejected} rejected)"
    );
    assert_eq!(
        allocations, 0,
        "the in-memory decision path must not allocate"
    );
    assert!(admitted > 0 && rejected > 0, "both paths ran");
}

/// (b) Live bytes per counter with a million of them, then (c) what is left
/// once they are idle and swept. Returns the bytes per counter.
fn counters_cost_and_come_back(name: &str, limit: &str) -> f64 {
    let setup = Setup::new(&[limit]);
    let churn = Setup::new(&[CHURN]);
    let engine = engine();
    let mut account = String::with_capacity(32);
    let mut flush_deferred = |engine: &Engine<MemoryStore, ManualClock>| {
        for i in 0..256 {
            account.clear();
            write!(account, "churn-{i}").expect("write to a String");
            assert_eq!(churn.decide(engine, &account), Outcome::Admitted);
        }
        engine.clock().advance(Duration::from_nanos(1));
        assert_eq!(
            engine.store().sweep(engine.clock().now()),
            256,
            "only the throw-away counters are fresh"
        );
    };
    flush_deferred(&engine);
    let base = (ALLOC.live_bytes(), ALLOC.live_chunk_bytes());

    let mut account = String::with_capacity(32);
    for i in 0..COUNTERS {
        account.clear();
        write!(account, "acct-{i}").expect("write to a String");
        assert_eq!(setup.decide(&engine, &account), Outcome::Admitted);
    }
    assert_eq!(engine.store().len(), COUNTERS);
    flush_deferred(&engine);
    let peak = (
        ALLOC.live_bytes() - base.0,
        ALLOC.live_chunk_bytes() - base.1,
    );
    let per_counter = peak.0 as f64 / COUNTERS as f64;
    println!(
        "(b) {name}: {per_counter:.1} B per counter requested, {:.1} B per counter in glibc chunks ({COUNTERS} counters)",
        peak.1 as f64 / COUNTERS as f64
    );

    // Idle: past the bucket's refill and the window's length.
    engine.clock().advance(Duration::from_secs(30));
    assert_eq!(engine.store().sweep(engine.clock().now()), COUNTERS);
    flush_deferred(&engine);
    let left = (
        ALLOC.live_bytes() - base.0,
        ALLOC.live_chunk_bytes() - base.1,
    );
    println!(
        "(c) {name}: after sweep {} counters, {:.1} KB left of {:.1} MB ({:.3}% of the counters' bytes; glibc chunks: {:.3}%)",
        engine.store().len(),
        left.0 as f64 / 1e3,
        peak.0 as f64 / 1e6,
        100.0 * left.0 as f64 / peak.0 as f64,
        100.0 * left.1 as f64 / peak.1 as f64
    );
    // Every counter's allocation is freed, and the sweep rebuilt the index
    // (papaya keeps a table's high-water size on removals: 9 B per slot,
    // 18.9 MB for 1M counters, stayed before the rebuild existed).
    assert!(
        left.0 * 100 <= peak.0,
        "{name}: after the sweep, memory must return to within 1% of the baseline ({} B left)",
        left.0
    );

    // A second generation of counters reuses the index: no growth, no leak.
    for i in 0..COUNTERS {
        account.clear();
        write!(account, "next-{i}").expect("write to a String");
        assert_eq!(setup.decide(&engine, &account), Outcome::Admitted);
    }
    flush_deferred(&engine);
    let again = ALLOC.live_bytes() - base.0;
    println!(
        "(c) {name}: a second generation of {COUNTERS} counters: {:.1} MB ({:+.1}% against the first)",
        again as f64 / 1e6,
        100.0 * (again - peak.0) as f64 / peak.0 as f64
    );
    assert!(
        again * 10 <= peak.0 * 11,
        "{name}: a second generation must fit in the first one's memory (+10%)"
    );
    per_counter
}

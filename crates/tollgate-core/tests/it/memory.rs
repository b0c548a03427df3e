//! Memory of the in-memory store (RELIABILITY-PLAN 3.6: F5, and the sweep
//! that keeps F1's minted keys bounded).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tollgate_core::policy::CompiledPolicy;
use tollgate_core::{Clock, Engine, ManualClock, MemoryStore, Nanos, Request, policy};

/// Calendar minute, sliding window of 60 s and a bucket
/// of 5 refilling 1 per 2 s: three counters per account.
const POLICY: &str = r#"
    [limits.per_minute]
    algorithm = "calendar_window"
    limit = 100
    window = "minute"
    scope = ["account"]

    [limits.sliding]
    algorithm = "sliding_window"
    limit = 50
    window = "60s"
    scope = ["account"]

    [limits.bucket]
    algorithm = "token_bucket"
    capacity = 5
    refill = 1
    refill_every = "2s"
    scope = ["account"]
"#;

/// A minute boundary (2023-11-14T22:14:00Z).
const START: u64 = 1_700_000_040 * Nanos::SECOND;

/// Set in the child process that runs the F5 measurement alone.
const CHILD_ENV: &str = "TOLLGATE_F5_CHILD";
/// Number of decisions of the F5 run (default 1 M; the long tier uses 10 M).
const DECISIONS_ENV: &str = "TOLLGATE_F5_DECISIONS";

fn compiled() -> CompiledPolicy {
    policy::parse(POLICY, "memory.toml").expect("valid policy")
}

/// Resident set size of this process, from `VmRSS` in `/proc/self/status`
/// (in bytes; independent of the page size, unlike `statm`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

const MIB: u64 = 1 << 20;

/// F5 — leak check (governor-style): 1 M decisions (`TOLLGATE_F5_DECISIONS`
/// for more) on 1,000 fixed accounts × 3 limits, the virtual clock moving
/// 1 ms per decision so every window rolls over many times. Runs in a child
/// process of the test binary so that no other test's allocations move the
/// RSS. Figures: `len()` = 3,000 at every checkpoint → always; RSS growth
/// after warm-up ≤ 10 MiB; teeth: a deliberate 16 MiB leak is seen by the
/// same probe (≥ 12 MiB).
#[test]
fn f5_fixed_key_set_does_not_leak() {
    if std::env::var_os(CHILD_ENV).is_some() {
        f5_measure();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "memory::f5_fixed_key_set_does_not_leak",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "F5 child failed: {}", out.status);
    assert!(
        stdout.contains("F5 leak check:"),
        "the child did not run the measurement"
    );
}

fn f5_measure() {
    const KEYS: usize = 1_000;
    let decisions: usize = std::env::var(DECISIONS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let policy = compiled();
    let clock = Arc::new(ManualClock::new(Nanos(START)));
    let engine = Engine::with_clock(MemoryStore::default(), clock.clone());
    let accounts: Vec<String> = (0..KEYS).map(|k| format!("account-{k:04}")).collect();
    let base = Request::new(policy.default_plan, policy.default_operation());
    let mut admitted = 0usize;
    let mut step = |i: usize| {
        clock.advance(Duration::from_millis(1));
        if engine
            .decide_now(
                &policy,
                &Request {
                    account: &accounts[i % KEYS],
                    ..base
                },
            )
            .is_allowed()
        {
            admitted += 1;
        }
    };
    // Warm-up: every counter exists, the map has grown to its size.
    for i in 0..100_000 {
        step(i);
    }
    assert_eq!(engine.store().len(), KEYS * 3);
    let before = rss_bytes();
    for i in 0..decisions {
        step(i);
        if i % 100_000 == 0 {
            assert_eq!(
                engine.store().len(),
                KEYS * 3,
                "counters after {i} decisions"
            );
        }
    }
    assert_eq!(engine.store().len(), KEYS * 3);
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    println!(
        "F5 leak check: {decisions} decisions on {KEYS} keys ({admitted} admitted), len {}, RSS {:.1} → {:.1} MiB, growth {:.2} MiB",
        engine.store().len(),
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        growth as f64 / MIB as f64
    );
    assert!(
        growth <= 10 * MIB,
        "RSS grew {growth} bytes over {decisions} decisions"
    );

    // Teeth: the probe must see a real leak of 16 MiB.
    let leak = vec![1u8; 16 * MIB as usize];
    std::hint::black_box(&leak);
    std::mem::forget(leak);
    let leaked = rss_bytes().saturating_sub(after);
    println!(
        "F5 teeth: a deliberate 16 MiB leak shows as {:.1} MiB",
        leaked as f64 / MIB as f64
    );
    assert!(
        leaked >= 12 * MIB,
        "the RSS probe missed a 16 MiB leak ({leaked} bytes)"
    );
}

/// F1/F5 — 100 k distinct accounts in one burst (300 k counters), then idle.
/// Figures: a sweep while they still count drops 0; each sweep drops exactly
/// the counters whose window has passed (buckets at +2 s, calendar minutes
/// at +60 s, sliding windows exactly T = 60 s after the burst) → exact; after every
/// window `len()` → 0.
#[test]
fn idle_burst_of_100k_keys_is_swept_completely() {
    const KEYS: usize = 100_000;
    let policy = compiled();
    let clock = Arc::new(ManualClock::new(Nanos(START)));
    let engine = Engine::with_clock(MemoryStore::default(), clock.clone());
    let base = Request::new(policy.default_plan, policy.default_operation());
    let mut name = String::new();
    for k in 0..KEYS {
        name.clear();
        name.push_str("minted-");
        name.push_str(&k.to_string());
        assert!(
            engine
                .decide_now(
                    &policy,
                    &Request {
                        account: &name,
                        ..base
                    }
                )
                .is_allowed()
        );
    }
    let store = engine.store();
    assert_eq!(store.len(), KEYS * 3);
    let at = |s: u64| Nanos(START + s * Nanos::SECOND);
    assert_eq!(
        store.sweep(at(0)),
        0,
        "nothing is fresh while the burst still counts"
    );
    assert_eq!(
        store.sweep(Nanos(at(2).0 - 1)),
        0,
        "buckets refill one token 2 s after use"
    );
    assert_eq!(
        store.sweep(at(2)),
        KEYS,
        "buckets refilled after 2 s (one token of 5)"
    );
    assert_eq!(store.len(), KEYS * 2);
    assert_eq!(
        store.sweep(Nanos(at(60).0 - 1)),
        0,
        "calendar minutes and sliding windows still running"
    );
    assert_eq!(
        store.sweep(at(60)),
        2 * KEYS,
        "calendar minutes end on the boundary, sliding windows exactly T after the burst"
    );
    assert_eq!(store.len(), 0);
    assert!(store.is_empty());
}

/// Bucket of 20 refilling one token an hour: nothing comes back during the test.
const HOT: &str = r#"
    [limits.hot]
    algorithm = "token_bucket"
    capacity = 20
    refill = 1
    refill_every = "1h"
    scope = ["account"]
"#;

/// Fresh again 1 ns after use: scopes that the next sweep drops.
const CHURN: &str = r#"
    [limits.churn]
    algorithm = "token_bucket"
    capacity = 1000000000
    refill = 1000000000
    scope = ["account"]
"#;

/// F1/F5 — the index rebuild that gives back a burst's memory (a sweep
/// leaving at most 1/8 of the index's high water) loses and duplicates
/// nothing while other threads decide. 3 threads decide on 64 hot accounts
/// (bucket of 20, no refill during the test) and mint new scopes, while a
/// fourth mints bursts of 4,096 scopes that are idle 1 ns later and sweeps
/// them; the deciders run until the sweeper has rebuilt at least 10 times.
/// Figures: ≥ 10 rebuilds during the decisions; each hot account admits
/// exactly 20 of its ≥ 600 attempts (never more: no counter lost or copied;
/// never fewer); after the run each is still exhausted, and `len()` is 64
/// once the churn is swept.
#[test]
fn index_rebuild_during_decisions_loses_nothing() {
    const ACCOUNTS: usize = 64;
    const PASSES: usize = 200;
    const THREADS: usize = 3;
    const BURST: usize = 4_096;
    let hot = policy::parse(HOT, "hot.toml").expect("valid policy");
    let churn = policy::parse(CHURN, "churn.toml").expect("valid policy");
    let clock = Arc::new(ManualClock::new(Nanos(START)));
    let engine = Engine::with_clock(MemoryStore::default(), clock.clone());
    let accounts: Vec<String> = (0..ACCOUNTS).map(|k| format!("hot-{k:02}")).collect();
    let admitted: Vec<AtomicU64> = (0..ACCOUNTS).map(|_| AtomicU64::new(0)).collect();
    let done = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let hot_req = Request::new(hot.default_plan, hot.default_operation());
    let churn_req = Request::new(churn.default_plan, churn.default_operation());
    std::thread::scope(|s| {
        let deciders: Vec<_> = (0..THREADS)
            .map(|t| {
                let (engine, hot, churn, accounts, admitted, rounds) =
                    (&engine, &hot, &churn, &accounts, &admitted, &rounds);
                s.spawn(move || {
                    let mut name = String::new();
                    let mut pass = 0;
                    while pass < PASSES || rounds.load(Ordering::Relaxed) < 10 {
                        pass += 1;
                        for (k, account) in accounts.iter().enumerate() {
                            let req = Request { account, ..hot_req };
                            if engine.decide_now(hot, &req).is_allowed() {
                                admitted[k].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // A new scope, added while a rebuild may be running.
                        name.clear();
                        name.push_str(&format!("new-{t}-{pass}"));
                        let req = Request {
                            account: &name,
                            ..churn_req
                        };
                        assert!(engine.decide_now(churn, &req).is_allowed());
                    }
                })
            })
            .collect();
        let sweeper = s.spawn(|| {
            let mut name = String::new();
            let mut round = 0;
            while !done.load(Ordering::Relaxed) {
                for i in 0..BURST {
                    name.clear();
                    name.push_str(&format!("burst-{round}-{i}"));
                    let req = Request {
                        account: &name,
                        ..churn_req
                    };
                    assert!(engine.decide_now(&churn, &req).is_allowed());
                }
                clock.advance(Duration::from_nanos(1));
                engine.store().sweep(clock.now());
                round += 1;
                rounds.store(engine.store().index_rebuilds() as usize, Ordering::Relaxed);
            }
        });
        for d in deciders {
            d.join().expect("decider thread");
        }
        done.store(true, Ordering::Relaxed);
        sweeper.join().expect("sweeper thread");
    });
    let store = engine.store();
    let rebuilds = store.index_rebuilds();
    for (k, n) in admitted.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::Relaxed),
            20,
            "account {k}: exactly the bucket's 20 across {rebuilds} rebuilds"
        );
    }
    for account in &accounts {
        let req = Request { account, ..hot_req };
        assert!(
            !engine.decide_now(&hot, &req).is_allowed(),
            "the moved counters kept their state"
        );
    }
    clock.advance(Duration::from_nanos(1));
    store.sweep(clock.now());
    assert_eq!(store.len(), ACCOUNTS, "only the hot counters are live");
    println!(
        "index rebuild: {rebuilds} rebuilds while {THREADS} threads decided; every hot account admitted exactly 20"
    );
    assert!(
        rebuilds >= 10,
        "the sweeps must have rebuilt the index ({rebuilds})"
    );
}

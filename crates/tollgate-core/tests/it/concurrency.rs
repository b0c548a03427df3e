//! Threads hammering the same counters (RELIABILITY-PLAN 3.1: A1, A4).
//!
//! A1 runs the in-memory store under 8 OS threads on a virtual clock and
//! checks every (key, window) against its limit; its teeth run the same
//! workload and checker on a deliberately non-atomic store and require the
//! checker to catch it. A4 (loom) only builds with `--cfg tollgate_loom`:
//!
//! ```text
//! RUSTFLAGS="--cfg tollgate_loom" CARGO_TARGET_DIR=/work/target-loom \
//!     cargo test -p tollgate-core --test it loom --release
//! ```

#[cfg(not(tollgate_loom))]
mod threads {
    use std::collections::HashMap;
    use std::future::Future;
    use std::num::NonZeroU64;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Barrier, Mutex};
    use std::time::Duration;

    use tollgate_core::algorithm::Evaluation;
    use tollgate_core::algorithm::calendar_window::{self, CalendarState};
    use tollgate_core::algorithm::gcra::{GcraRate, gcra};
    use tollgate_core::algorithm::sliding_window::{self, SlidingState};
    use tollgate_core::policy::CompiledPolicy;
    use tollgate_core::{
        Check, Clock, CounterKey, Engine, ManualClock, MemoryStore, Nanos, Params, Request, Store,
        StoreError, policy,
    };

    use crate::block_on;

    /// Calendar minute 7, sliding 8 per 60 s, bucket 5 refilling 1 per 10 s;
    /// each is the binding limit at some point of the A1 schedule.
    const POLICY: &str = r#"
        [limits.per_minute]
        algorithm = "calendar_window"
        limit = 7
        window = "minute"
        scope = ["account"]

        [limits.sliding]
        algorithm = "sliding_window"
        limit = 8
        window = "60s"
        scope = ["account"]

        [limits.bucket]
        algorithm = "token_bucket"
        capacity = 5
        refill = 1
        refill_every = "10s"
        scope = ["account"]
    "#;
    const CAL_LIMIT: u64 = 7;
    const SLIDING_LIMIT: u64 = 8;
    const SLIDING_T: u64 = 60 * Nanos::SECOND;
    const BUCKET_CAP: u64 = 5;
    const BUCKET_IV: u64 = 10 * Nanos::SECOND;

    const THREADS: usize = 8;
    const KEYS: usize = 200;
    const ATTEMPTS: usize = 2; // per thread, key and step: 16 attempts per key and step

    /// A minute boundary (2023-11-14T22:14:00Z).
    const START: u64 = 1_700_000_040 * Nanos::SECOND;

    fn compiled() -> CompiledPolicy {
        policy::parse(POLICY, "a1.toml").expect("valid policy")
    }

    /// Clock steps: mostly 20 s (three per minute), sometimes 40 s or 2 min
    /// (bucket refilled, sliding window emptied), from a fixed seed.
    fn schedule(steps: usize) -> Vec<u64> {
        let mut x = 0x0A11_u64;
        let mut t = START;
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            if i > 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t += [20, 20, 20, 20, 40, 120][(x % 6) as usize] * Nanos::SECOND;
            }
            out.push(t);
        }
        out
    }

    /// Runs the A1 workload: at each step of the schedule the clock is set,
    /// then `THREADS` threads each try every key `ATTEMPTS` times, starting at
    /// different keys so they collide. Returns admitted counts `[step][key]`.
    fn hammer<F>(times: &[u64], clock: &ManualClock, decide: F) -> Vec<Vec<u64>>
    where
        F: Fn(&str) -> bool + Sync,
    {
        let accounts: Vec<String> = (0..KEYS).map(|k| format!("acct-{k}")).collect();
        let barrier = Barrier::new(THREADS + 1);
        let counts: Vec<Vec<AtomicU64>> = times
            .iter()
            .map(|_| (0..KEYS).map(|_| AtomicU64::new(0)).collect())
            .collect();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (barrier, counts, accounts, decide) = (&barrier, &counts, &accounts, &decide);
                s.spawn(move || {
                    for step in counts {
                        barrier.wait();
                        for i in 0..KEYS {
                            let k = (i + t * KEYS / THREADS) % KEYS;
                            for _ in 0..ATTEMPTS {
                                if decide(&accounts[k]) {
                                    step[k].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        barrier.wait();
                    }
                });
            }
            for &t in times {
                clock.set(Nanos(t));
                barrier.wait(); // go
                barrier.wait(); // step done
            }
        });
        counts
            .into_iter()
            .map(|s| s.into_iter().map(AtomicU64::into_inner).collect())
            .collect()
    }

    /// What the checker found.
    #[derive(Debug, Default)]
    struct Report {
        /// Max admitted / limit over (key, calendar minute).
        calendar_ratio: f64,
        /// Max admitted / limit over (key, 60 s span `[t, t + 60 s)`).
        sliding_ratio: f64,
        /// Max admitted / (capacity + ⌊W / interval⌋) over (key, span W).
        bucket_ratio: f64,
        /// Units admitted beyond a calendar limit, summed over (key, minute).
        calendar_excess: u64,
        /// (key, span) pairs over the sliding limit or the bucket envelope.
        spans_over: u64,
    }

    impl Report {
        fn over_admissions(&self) -> u64 {
            self.calendar_excess + self.spans_over
        }

        fn max_ratio(&self) -> f64 {
            self.calendar_ratio
                .max(self.sliding_ratio)
                .max(self.bucket_ratio)
        }
    }

    /// Checks admitted counts `[step][key]` at `times` against all three limits.
    #[allow(clippy::needless_range_loop)] // k indexes the inner dimension of `counts[step][key]`
    fn check(times: &[u64], counts: &[Vec<u64>]) -> Report {
        let mut r = Report::default();
        for k in 0..KEYS {
            let mut minutes: HashMap<u64, u64> = HashMap::new();
            for (i, &t) in times.iter().enumerate() {
                *minutes.entry(t / (60 * Nanos::SECOND)).or_default() += counts[i][k];
            }
            for &n in minutes.values() {
                r.calendar_ratio = r.calendar_ratio.max(n as f64 / CAL_LIMIT as f64);
                r.calendar_excess += n.saturating_sub(CAL_LIMIT);
            }
            for i in 0..times.len() {
                let mut sum = 0;
                for j in i..times.len() {
                    sum += counts[j][k];
                    let w = times[j] - times[i];
                    if w < SLIDING_T {
                        r.sliding_ratio = r.sliding_ratio.max(sum as f64 / SLIDING_LIMIT as f64);
                        if sum > SLIDING_LIMIT {
                            r.spans_over += 1;
                        }
                    }
                    let envelope = BUCKET_CAP + w / BUCKET_IV;
                    r.bucket_ratio = r.bucket_ratio.max(sum as f64 / envelope as f64);
                    if sum > envelope {
                        r.spans_over += 1;
                    }
                    if w > SLIDING_T && sum <= BUCKET_CAP {
                        break; // longer spans only loosen the bucket envelope
                    }
                }
            }
        }
        r
    }

    /// The same schedule, one request at a time: what an exact limiter admits.
    fn sequential(times: &[u64], policy: &CompiledPolicy) -> Vec<Vec<u64>> {
        let clock = Arc::new(ManualClock::new(Nanos(times[0])));
        let engine = Engine::with_clock(MemoryStore::default(), clock.clone());
        let accounts: Vec<String> = (0..KEYS).map(|k| format!("acct-{k}")).collect();
        let base = Request::new(policy.default_plan, policy.default_operation());
        times
            .iter()
            .map(|&t| {
                clock.set(Nanos(t));
                accounts
                    .iter()
                    .map(|a| {
                        (0..THREADS * ATTEMPTS)
                            .filter(|_| {
                                engine
                                    .decide_now(policy, &Request { account: a, ..base })
                                    .is_allowed()
                            })
                            .count() as u64
                    })
                    .collect()
            })
            .collect()
    }

    /// A1 — in-memory exactness under concurrency: 8 threads, 200 keys, one
    /// policy of calendar minute + sliding window + token bucket, 100 clock
    /// steps (≈ 45 calendar minutes; the plan's CI size is 100 windows, steps
    /// here are 20 s–2 min so every limit binds). Figures: max admitted/L over
    /// (key, window) → 1.000 for each limit; over-admissions → 0; admitted
    /// per (key, step) equal to a sequential run → exact.
    #[test]
    fn a1_memory_store_exact_under_concurrency() {
        let policy = compiled();
        let times = schedule(100);
        let clock = Arc::new(ManualClock::new(Nanos(START)));
        let engine = Engine::with_clock(MemoryStore::default(), clock.clone());
        let base = Request::new(policy.default_plan, policy.default_operation());
        let counts = hammer(&times, &clock, |a| {
            engine
                .decide_now(&policy, &Request { account: a, ..base })
                .is_allowed()
        });
        let r = check(&times, &counts);
        println!(
            "A1 memory store: max admitted/L calendar {:.3}, sliding {:.3}, bucket {:.3}; over-admissions {}",
            r.calendar_ratio,
            r.sliding_ratio,
            r.bucket_ratio,
            r.over_admissions()
        );
        assert_eq!(r.over_admissions(), 0, "{r:?}");
        assert_eq!(r.max_ratio(), 1.0, "{r:?}");
        for (name, ratio) in [
            ("calendar", r.calendar_ratio),
            ("sliding", r.sliding_ratio),
            ("bucket", r.bucket_ratio),
        ] {
            assert_eq!(ratio, 1.0, "{name} limit never reached exactly: {r:?}");
        }
        assert_eq!(engine.store().len(), KEYS * 3);
        let want = sequential(&times, &policy);
        for (i, (got, want)) in counts.iter().zip(&want).enumerate() {
            assert_eq!(
                got, want,
                "admitted per key at step {i} differ from a sequential run"
            );
        }
    }

    // ------------------------------------------------------------- A1 teeth

    #[derive(Debug, Clone)]
    enum BrokenState {
        Gcra(Nanos),
        Sliding(SlidingState),
        Calendar(CalendarState),
    }

    /// A deliberately non-atomic store (Kong/APISIX/boulder style): reads each
    /// counter, lets other threads run, then writes — no lock held across.
    #[derive(Debug, Default)]
    struct ReadThenWriteStore {
        map: Mutex<HashMap<CounterKey, BrokenState>>,
    }

    impl ReadThenWriteStore {
        fn decide_sync(&self, now: Nanos, checks: &[Check], out: &mut [Evaluation]) -> bool {
            let read: Vec<Option<BrokenState>> = checks
                .iter()
                .map(|c| self.map.lock().expect("lock").get(&c.key).cloned())
                .collect();
            std::thread::yield_now();
            let mut writes = Vec::new();
            let mut admitted = true;
            for (i, (c, s)) in checks.iter().zip(read).enumerate() {
                let (e, next) = match (c.params, s) {
                    (Params::Gcra(rate), s) => {
                        let tat = if let Some(BrokenState::Gcra(t)) = s {
                            Some(t)
                        } else {
                            None
                        };
                        let (e, n) = gcra(tat, now, c.cost, &rate);
                        (e, BrokenState::Gcra(n))
                    }
                    (Params::Sliding(w), s) => {
                        let st = if let Some(BrokenState::Sliding(x)) = s {
                            Some(x)
                        } else {
                            None
                        };
                        let (e, n) = sliding_window::evaluate(st.as_ref(), now, c.cost, &w);
                        (e, BrokenState::Sliding(n))
                    }
                    (Params::Calendar { limit, end }, s) => {
                        let st = if let Some(BrokenState::Calendar(x)) = s {
                            Some(x)
                        } else {
                            None
                        };
                        let (e, n) =
                            calendar_window::evaluate(st.as_ref(), now, c.cost, limit, end);
                        (e, BrokenState::Calendar(n))
                    }
                    (Params::Concurrency { .. }, _) => unreachable!("not in the A1 policy"),
                };
                out[i] = e;
                admitted &= e.admit || !c.blocking;
                writes.push((c.key, next, e.admit));
            }
            if admitted {
                std::thread::yield_now();
                for (key, next, ok) in writes {
                    if ok {
                        self.map.lock().expect("lock").insert(key, next);
                    }
                }
            }
            admitted
        }
    }

    impl Store for ReadThenWriteStore {
        fn decide(
            &self,
            now: Nanos,
            checks: &[Check],
            _lease: u64,
            out: &mut [Evaluation],
        ) -> impl Future<Output = Result<bool, StoreError>> + Send {
            std::future::ready(Ok(self.decide_sync(now, checks, out)))
        }

        fn release(
            &self,
            _now: Nanos,
            _keys: &[CounterKey],
            _lease: u64,
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            std::future::ready(Ok(()))
        }
    }

    /// A1 teeth — the A1 workload and checker on a read-then-write store must
    /// report over-admission (the test passes when the broken store
    /// over-admits). Figures: over-admissions > 0 and max admitted/L > 1.000
    /// in at least one of 5 runs of 30 steps (in practice the first).
    #[test]
    fn a1_teeth_checker_catches_a_read_then_write_store() {
        let policy = compiled();
        let times = schedule(30);
        let base = Request::new(policy.default_plan, policy.default_operation());
        let mut seen = Vec::new();
        for attempt in 0..5 {
            let clock = Arc::new(ManualClock::new(Nanos(START)));
            let engine = Engine::with_clock(ReadThenWriteStore::default(), clock.clone());
            let counts = hammer(&times, &clock, |a| {
                block_on(engine.decide(&policy, &Request { account: a, ..base })).is_allowed()
            });
            let r = check(&times, &counts);
            println!(
                "A1 teeth attempt {attempt}: over-admissions {}, max admitted/L {:.3}",
                r.over_admissions(),
                r.max_ratio()
            );
            if r.over_admissions() > 0 && r.max_ratio() > 1.0 {
                return;
            }
            seen.push(r);
        }
        panic!("the A1 checker did not catch a read-then-write store: {seen:?}");
    }

    // ------------------------------------------------- two threads, one key

    /// Two threads hammering one token-bucket key while the virtual clock
    /// moves under them (STYLE "Tests"). Figure: admitted ≤ capacity +
    /// ⌊elapsed / interval⌋ → always; and the bucket was actually drained
    /// (admitted ≥ capacity).
    #[test]
    fn two_threads_one_bucket_key_never_over_admit() {
        let rate = GcraRate::new(
            NonZeroU64::new(10).expect("10"),
            NonZeroU64::new(1).expect("1"),
            Duration::from_millis(1),
        );
        let check = Check {
            key: CounterKey(7),
            params: Params::Gcra(rate),
            cost: 1,
            blocking: true,
        };
        let store = MemoryStore::default();
        let clock = ManualClock::new(Nanos(START));
        let stop = AtomicBool::new(false);
        let admitted = AtomicU64::new(0);
        // Both workers start before the clock moves, and each makes at least
        // 100 decisions, so a busy machine cannot make the test vacuous.
        let start = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut out = [Evaluation::default(); 1];
                    let mut n = 0;
                    start.wait();
                    let mut made = 0u32;
                    while made < 100 || !stop.load(Ordering::Relaxed) {
                        made = made.saturating_add(1);
                        if store
                            .decide_now(clock.now(), &[check], 0, &mut out)
                            .expect("decides")
                        {
                            n += 1;
                        }
                    }
                    admitted.fetch_add(n, Ordering::Relaxed);
                });
            }
            start.wait();
            for _ in 0..2_000 {
                clock.advance(Duration::from_micros(100));
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Relaxed);
        });
        let elapsed = clock.now().0 - START;
        let bound = rate.capacity + elapsed / rate.interval;
        let admitted = admitted.into_inner();
        println!("two threads, one bucket: admitted {admitted}, bound {bound}");
        assert!(
            admitted <= bound,
            "admitted {admitted} > capacity + refill {bound}"
        );
        assert!(
            admitted >= rate.capacity,
            "the bucket was never drained: {admitted}"
        );
    }
}

#[cfg(tollgate_loom)]
mod loom_models {
    use std::num::NonZeroU64;
    use std::time::Duration;

    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use tollgate_core::algorithm::Evaluation;
    use tollgate_core::algorithm::gcra::GcraRate;
    use tollgate_core::store::memory::LoomSlot;
    use tollgate_core::{Check, CounterKey, Nanos, Params};

    /// A4 — loom: 3 threads decide cost 1 against one counter of limit 2
    /// (calendar window, then token bucket) through `MemoryStore`'s locking
    /// path. Figure: interleavings admitting ≠ 2 → 0 (never more, and
    /// never fewer than the limit).
    #[test]
    fn a4_loom_three_threads_limit_two() {
        let bucket = GcraRate::new(
            NonZeroU64::new(2).expect("2"),
            NonZeroU64::new(1).expect("1"),
            Duration::from_secs(60),
        );
        for params in [
            Params::Calendar {
                limit: 2,
                end: Nanos::from_secs(60),
            },
            Params::Gcra(bucket),
        ] {
            loom::model(move || {
                let slot = Arc::new(LoomSlot::default());
                let admitted = Arc::new(AtomicUsize::new(0));
                let check = Check {
                    key: CounterKey(1),
                    params,
                    cost: 1,
                    blocking: true,
                };
                let handles: Vec<_> = (0..3)
                    .map(|_| {
                        let (slot, admitted) = (slot.clone(), admitted.clone());
                        loom::thread::spawn(move || {
                            let mut out = [Evaluation::default(); 1];
                            if LoomSlot::decide(Nanos::from_secs(1), &[check], &[&*slot], &mut out)
                                == Some(true)
                            {
                                admitted.fetch_add(1, Ordering::SeqCst);
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().expect("thread");
                }
                assert_eq!(admitted.load(Ordering::SeqCst), 2);
            });
        }
    }

    /// A4 — loom: 3 threads decide one-scope requests (a calendar window of
    /// 2 and a token bucket of 3, one scope) through the in-memory store's
    /// one-scope path (`scope_locked`). Figures: interleavings admitting ≠ 2
    /// → 0; the bucket consumed exactly 2 (rejected requests took nothing).
    #[test]
    fn a4_loom_one_scope_path_three_threads_all_or_nothing() {
        // Immutable and made outside the model: a std `Arc`, not loom's.
        let policy = std::sync::Arc::new(
            tollgate_core::policy::parse(
                "[limits.d]\nalgorithm = \"calendar_window\"\nlimit = 2\nwindow = \"minute\"\n\
                 [limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 3\nrefill = 1\nrefill_every = \"1h\"\n",
                "loom.toml",
            )
            .expect("valid policy"),
        );
        loom::model(move || {
            let slot = Arc::new(LoomSlot::default());
            let admitted = Arc::new(AtomicUsize::new(0));
            let now = Nanos::from_secs(1);
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    let (slot, admitted, policy) = (slot.clone(), admitted.clone(), policy.clone());
                    loom::thread::spawn(move || {
                        let at = (policy.default_plan, policy.default_operation());
                        if let Some((true, _)) =
                            LoomSlot::decide_scope(now, 7, &policy, at, None, &slot)
                        {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("thread");
            }
            assert_eq!(admitted.load(Ordering::SeqCst), 2);
            let at = (policy.default_plan, policy.default_operation());
            let (_, remaining) =
                LoomSlot::decide_scope(now, 7, &policy, at, Some(0), &slot).expect("live slot");
            assert_eq!(
                remaining,
                vec![1, 0],
                "limits in name order: bucket `b` consumed exactly twice, window `d` used up"
            );
        });
    }

    /// A4 — loom: two requests locking the same two counters given in
    /// opposite order (lock order by key: no deadlock), counter A of limit 1,
    /// B of limit 2. Figures: deadlocks → 0; admitted requests → exactly 1;
    /// B consumed exactly 1 (the rejected request took nothing).
    #[test]
    fn a4_loom_two_counters_opposite_order_all_or_nothing() {
        loom::model(|| {
            let a = Arc::new(LoomSlot::default());
            let b = Arc::new(LoomSlot::default());
            let admitted = Arc::new(AtomicUsize::new(0));
            let end = Nanos::from_secs(60);
            let ca = Check {
                key: CounterKey(1),
                params: Params::Calendar { limit: 1, end },
                cost: 1,
                blocking: true,
            };
            let cb = Check {
                key: CounterKey(2),
                params: Params::Calendar { limit: 2, end },
                cost: 1,
                blocking: true,
            };
            let handles: Vec<_> = [false, true]
                .into_iter()
                .map(|flip| {
                    let (a, b, admitted) = (a.clone(), b.clone(), admitted.clone());
                    loom::thread::spawn(move || {
                        let mut out = [Evaluation::default(); 2];
                        let got = if flip {
                            LoomSlot::decide(Nanos::from_secs(1), &[cb, ca], &[&*b, &*a], &mut out)
                        } else {
                            LoomSlot::decide(Nanos::from_secs(1), &[ca, cb], &[&*a, &*b], &mut out)
                        };
                        if got == Some(true) {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("thread");
            }
            assert_eq!(admitted.load(Ordering::SeqCst), 1);
            let mut out = [Evaluation::default(); 1];
            let probe = Check { cost: 0, ..cb };
            assert_eq!(
                LoomSlot::decide(Nanos::from_secs(1), &[probe], &[&*b], &mut out),
                Some(true)
            );
            assert_eq!(out[0].remaining, 1, "B consumed exactly once");
        });
    }
}

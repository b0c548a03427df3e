//! RELIABILITY-PLAN H1 and H2: one recorded trace replayed with a limit in
//! enforce, shadow and soft mode. Shadow and soft never refuse; their
//! would-reject count equals the enforce run's reject count exactly.
//!
//! Exact per limit: a shadow limit takes cost only when it alone would
//! admit, as it would if enforced. With several limits in shadow at once the
//! counts can differ: each is evaluated on its own, so a request one of them
//! would refuse still counts against the others, where enforcing both would
//! have consumed nothing (docs/policy.md says so).

use std::time::Duration;

use proptest::prelude::*;
use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Outcome, Request, policy};

/// The limits replayed, one at a time.
const LIMITS: [&str; 3] = [
    "algorithm = \"token_bucket\"\ncapacity = 10\nrefill = 5",
    "algorithm = \"sliding_window\"\nlimit = 20\nwindow = \"3s\"",
    "algorithm = \"calendar_window\"\nlimit = 25\nwindow = \"minute\"",
];

fn policy_in(limit: &str, mode: &str) -> policy::CompiledPolicy {
    let src = format!("[limits.l]\n{limit}\nmode = \"{mode}\"\n");
    policy::parse(&src, "modes.toml").expect("valid policy")
}

/// (rejections, crossings) of one replay.
fn replay(limit: &str, mode: &str, trace: &[(u64, u8, u64)]) -> (usize, usize) {
    let p = policy_in(limit, mode);
    let clock = ManualClock::new(Nanos::from_secs(1_000_000));
    let engine = Engine::with_clock(MemoryStore::default(), clock);
    let accounts = ["a", "b", "c"];
    let (mut rejected, mut crossed) = (0, 0);
    for &(step_ms, account, cost) in trace {
        engine.clock().advance(Duration::from_millis(step_ms));
        let req = Request {
            account: accounts[usize::from(account % 3)],
            cost: Some(cost),
            ..Request::new(p.default_plan, p.default_operation())
        };
        let d = engine.decide_now(&p, &req);
        if matches!(d.outcome, Outcome::Rejected { .. }) {
            rejected += 1;
        }
        if d.crossings().next().is_some() {
            crossed += 1;
        }
    }
    (rejected, crossed)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn shadow_and_soft_count_exactly_what_enforce_rejects(
        trace in proptest::collection::vec((0u64..400, 0u8..3, 1u64..6), 1..300)
    ) {
        for limit in LIMITS {
            let (enforce_rejected, enforce_crossed) = replay(limit, "enforce", &trace);
            let (shadow_rejected, shadow_crossed) = replay(limit, "shadow", &trace);
            let (soft_rejected, soft_crossed) = replay(limit, "soft", &trace);
            prop_assert_eq!(enforce_crossed, 0);
            prop_assert_eq!(shadow_rejected, 0, "shadow never refuses");
            prop_assert_eq!(soft_rejected, 0, "soft never refuses");
            prop_assert_eq!(shadow_crossed, enforce_rejected, "shadow would-reject = enforce reject");
            prop_assert_eq!(soft_crossed, enforce_rejected);
        }
    }
}

/// The property above is not vacuous: a heavy trace makes every limit reject.
#[test]
fn heavy_trace_rejects_and_shadow_counts_the_same() {
    let trace: Vec<(u64, u8, u64)> = (0..300)
        .map(|i| (i % 7 * 10, (i % 3) as u8, 1 + i % 5))
        .collect();
    for limit in LIMITS {
        let (enforce_rejected, _) = replay(limit, "enforce", &trace);
        let (shadow_rejected, shadow_crossed) = replay(limit, "shadow", &trace);
        assert!(enforce_rejected > 50, "{limit}: {enforce_rejected}");
        assert_eq!(shadow_rejected, 0);
        assert_eq!(shadow_crossed, enforce_rejected, "{limit}");
    }
}

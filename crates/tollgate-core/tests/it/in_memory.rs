//! `Engine::decide_in_memory`: the decision without a future, for a store
//! that decides in memory; nothing for one that waits.

use std::time::Duration;

use crate::block_on;

use tollgate_core::algorithm::Evaluation;
use tollgate_core::policy::CompiledPolicy;
use tollgate_core::{
    Check, CounterKey, Engine, ManualClock, MemoryStore, Nanos, Request, Store, StoreError, policy,
};

/// A bucket of 3 per account and a concurrency limit of 2 (a lease).
const POLICY: &str = r#"
    [limits.bucket]
    algorithm = "token_bucket"
    capacity = 3
    refill = 1
    refill_every = "1s"
    scope = ["account"]

    [limits.parallel]
    algorithm = "concurrency"
    limit = 2
    scope = ["account"]
"#;

fn compiled() -> CompiledPolicy {
    policy::parse(POLICY, "in_memory.toml").expect("valid policy")
}

/// A memory store that the engine sees only through the [`Store`] trait,
/// as it sees a store that waits: no [`Store::as_memory`].
struct Waiting(MemoryStore);

impl Store for Waiting {
    async fn decide(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        self.0.decide_now(now, checks, lease, out)
    }

    async fn release(&self, now: Nanos, keys: &[CounterKey], lease: u64) -> Result<(), StoreError> {
        self.0.release_now(now, keys, lease);
        Ok(())
    }
}

#[test]
fn decided_in_memory_like_the_awaited_decision() {
    let p = compiled();
    let start = Nanos(1_700_000_000 * Nanos::SECOND);
    let in_place = Engine::with_clock(MemoryStore::default(), ManualClock::new(start));
    let awaited = Engine::with_clock(MemoryStore::default(), ManualClock::new(start));
    let (plan, op) = (p.default_plan, p.default_operation());
    for step in 0..40u64 {
        let account = if step % 3 == 0 { "a" } else { "b" };
        let req = Request {
            account,
            ..Request::new(plan, op)
        };
        // Every other step through the closure form (the decision lent
        // where it was built).
        let got = if step % 2 == 0 {
            in_place.decide_in_memory(&p, &req)
        } else {
            in_place.decide_in_memory_with(&p, &req, Clone::clone)
        }
        .expect("the in-memory store decides in memory");
        let want = block_on(awaited.decide(&p, &req));
        assert_eq!(got.outcome, want.outcome, "step {step}");
        assert_eq!(got.results(), want.results(), "step {step}");
        assert_eq!(got.now, want.now, "step {step}");
        assert_eq!(got.lease.is_some(), want.lease.is_some(), "step {step}");
        if step % 4 == 0 {
            in_place.release_now(&got);
            awaited.release_now(&want);
        }
        in_place.clock().advance(Duration::from_millis(300));
        awaited.clock().advance(Duration::from_millis(300));
    }
}

#[test]
fn a_store_that_waits_is_not_decided_in_memory() {
    let p = compiled();
    let engine = Engine::with_clock(
        Waiting(MemoryStore::default()),
        ManualClock::new(Nanos(Nanos::SECOND)),
    );
    let req = Request {
        account: "a",
        ..Request::new(p.default_plan, p.default_operation())
    };
    assert!(engine.decide_in_memory(&p, &req).is_none());
    assert!(
        engine
            .decide_in_memory_with(&p, &req, |_| unreachable!("nothing is decided"))
            .is_none()
    );
    // Nothing was taken: the whole bucket is still there.
    for _ in 0..2 {
        assert!(block_on(engine.decide(&p, &req)).is_allowed());
    }
}

//! The decision path: request → limits → counter keys → store → decision.
//!
//! [`Engine::decide`] looks up the limits that apply to the request's plan and
//! operation (one slice, precomputed at policy load), builds each counter key
//! by hashing the limit name and the scope values on the stack, hands every
//! check to the store at once, and turns the store's answer into a
//! [`Decision`]. Nothing on this path allocates or takes a lock of its own.
//!
//! On the in-memory store ([`Engine::decide_now`]), a request whose limits
//! share one scope (resolved at policy load: no lease, no rollout date, no
//! account override on the request) skips the checks: the scope values are
//! hashed once and the store runs the plan and operation's one-scope
//! program, laid out at load (`policy::OneScope`, `MemoryStore::decide_scope`).
//! Everything else takes the general path.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::{Xxh3, xxh3_128_with_seed};

use crate::algorithm::Evaluation;
use crate::algorithm::gcra::GcraRate;
use crate::algorithm::sliding_window::SlidingWindow;
use crate::clock::{Clock, Nanos, SystemClock};
use crate::decision::{Decision, LimitResult, Outcome};
use crate::error::StoreError;
use crate::policy::{
    AccountOverrides, Algorithm, AttributeId, CompiledPolicy, FailMode, LimitOverride, LocalShare,
    MAX_LIMITS_PER_REQUEST, Mode, OperationId, PlanId, ScopePart,
};
use crate::store::{Check, CounterKey, MemoryStore, Params, Store};
use crate::value_hash;

/// One request as the engine sees it. Strings are borrowed from the caller;
/// an empty scope value means "not known", and a limit whose scope needs an
/// unknown value does not apply to the request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's plan.
    pub plan: PlanId,
    /// The operation matched.
    pub operation: OperationId,
    /// Org id.
    pub org: &'a str,
    /// Account id.
    pub account: &'a str,
    /// App id.
    pub app: &'a str,
    /// API key id (never the secret).
    pub key: &'a str,
    /// Client IP, textual.
    pub ip: &'a str,
    /// Attribute values by [`AttributeId`]; missing entries are unknown.
    pub attributes: &'a [Option<&'a str>],
    /// When the account was created (for rollouts); unknown means enforce.
    pub account_created_at: Option<Nanos>,
    /// Replaces the operation's cost for every limit (decision API).
    pub cost: Option<u64>,
    /// Per-account numbers replacing the plan's.
    pub overrides: Option<&'a AccountOverrides>,
}

impl<'a> Request<'a> {
    /// A request for `operation` under `plan` with nothing else known.
    pub fn new(plan: PlanId, operation: OperationId) -> Request<'a> {
        Request {
            plan,
            operation,
            org: "",
            account: "",
            app: "",
            key: "",
            ip: "",
            attributes: &[],
            account_created_at: None,
            cost: None,
            overrides: None,
        }
    }

    fn part(&self, p: ScopePart) -> &'a str {
        match p {
            ScopePart::Org => self.org,
            ScopePart::Account => self.account,
            ScopePart::App => self.app,
            ScopePart::Key => self.key,
            ScopePart::Ip => self.ip,
            ScopePart::Attribute(id) => self.attribute(id),
        }
    }

    fn attribute(&self, id: AttributeId) -> &'a str {
        self.attributes
            .get(usize::from(id))
            .copied()
            .flatten()
            .unwrap_or("")
    }
}

/// Decides requests against a policy with a store and a clock.
#[derive(Debug)]
pub struct Engine<S: Store, C: Clock = SystemClock> {
    store: S,
    clock: C,
    seed: u64,
    next_lease: AtomicU64,
}

impl<S: Store> Engine<S, SystemClock> {
    /// An engine on the system clock.
    pub fn new(store: S) -> Engine<S, SystemClock> {
        Engine::with_clock(store, SystemClock)
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// An engine on `clock`. Counter keys are hashed with a random seed;
    /// replicas sharing a store must use [`Engine::with_key_seed`].
    pub fn with_clock(store: S, clock: C) -> Engine<S, C> {
        let mut seed = [0u8; 16];
        // Without randomness, fall back to a fixed seed: keys stay correct,
        // only crafted-collision resistance is lost.
        let _ = getrandom::fill(&mut seed);
        let (a, b) = seed.split_at(8);
        let seed_a = u64::from_le_bytes(a.try_into().expect("8 bytes"));
        let lease_base = u64::from_le_bytes(b.try_into().expect("8 bytes")) << 32;
        Engine {
            store,
            clock,
            seed: seed_a,
            next_lease: AtomicU64::new(lease_base),
        }
    }

    /// Sets the seed of counter-key hashing (must match across replicas sharing a store).
    pub fn with_key_seed(mut self, seed: u64) -> Engine<S, C> {
        self.seed = seed;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Decides `req` under `policy`: checks every applicable limit, admits only
    /// if every enforced limit admits, and takes the cost from all of them only then.
    pub async fn decide(&self, policy: &CompiledPolicy, req: &Request<'_>) -> Decision {
        let now = self.clock.now();
        let mut decision = Decision::new(now);
        if let Some(memory) = self.store.as_memory() {
            // In memory nothing waits: the synchronous path, which also
            // takes the one-scope shortcut.
            self.decide_now_into(memory, policy, req, &mut decision);
            return decision;
        }
        let mut checks = [EMPTY_CHECK; MAX_LIMITS_PER_REQUEST];
        let (n, lease) = self.prepare(policy, req, now, &mut checks, &mut decision);
        let mut evals = [Evaluation::default(); MAX_LIMITS_PER_REQUEST];
        let result = if n == 0 {
            Ok(true)
        } else {
            self.store
                .decide(now, &checks[..n], lease, &mut evals)
                .await
        };
        if let Err(e) = &result {
            decision.store_error = Some(e.clone());
            if let Some(local) = self.store.local_fallback()
                && decide_locally(policy, local, now, &checks[..n], lease, &mut decision)
            {
                return decision;
            }
        }
        finish(policy, &mut decision, result, &evals, lease);
        decision
    }

    /// Decides `req` on `memory` without waiting (the in-memory store, or
    /// the store [`Store::as_memory`] names): [`Engine::decide`]'s work, with
    /// the one-scope path of [`MemoryStore::decide_scope`].
    fn decide_now_into(
        &self,
        memory: &MemoryStore,
        policy: &CompiledPolicy,
        req: &Request<'_>,
        decision: &mut Decision,
    ) {
        if let Some(program) = policy.one_scope(req.plan, req.operation)
            && !req.overrides.is_some_and(|o| {
                program
                    .steps
                    .iter()
                    .any(|s| o.get(s.result.limit).is_some())
            })
        {
            // The usual scope, one value, was noted in the program at load
            // (no look-up in the policy's limit table).
            // A scope value unknown: no limit applies.
            let values = match program.part {
                Some(part) => {
                    let value = req.part(part);
                    if value.is_empty() {
                        return;
                    }
                    self.value_hash(value)
                }
                None => {
                    match self.scope_hash(&policy.limits[usize::from(program.first)].scope, req) {
                        Some(values) => values,
                        None => return,
                    }
                }
            };
            // The store appends the results and sets the outcome (nothing
            // when it fails: the general path below then decides again,
            // and answers a store error by each limit's `on_store_error`).
            // Most requests meet a few limits: its arrays sized for exactly
            // that many.
            let now = decision.now;
            let cost = req.cost;
            let decided = match program.steps.len() {
                0 | 1 => memory.decide_scope::<1>(now, values, program, cost, decision),
                2 => memory.decide_scope::<2>(now, values, program, cost, decision),
                3 => memory.decide_scope::<3>(now, values, program, cost, decision),
                ..=FEW_LIMITS => {
                    memory.decide_scope::<FEW_LIMITS>(now, values, program, cost, decision)
                }
                _ => memory
                    .decide_scope::<MAX_LIMITS_PER_REQUEST>(now, values, program, cost, decision),
            };
            if decided.is_ok() {
                return;
            }
        }
        // Most requests meet a few limits: size the check and evaluation
        // arrays for exactly that many (each unused check is 80 B of stack
        // to set up, and so on down the store).
        let limits = policy.applicable(req.plan, req.operation);
        match limits.len() {
            0 | 1 => self.decide_into::<1>(memory, policy, req, decision),
            2 => self.decide_into::<2>(memory, policy, req, decision),
            3 => self.decide_into::<3>(memory, policy, req, decision),
            ..=FEW_LIMITS => self.decide_into::<FEW_LIMITS>(memory, policy, req, decision),
            _ => self.decide_into::<MAX_LIMITS_PER_REQUEST>(memory, policy, req, decision),
        }
    }

    /// Decides `req` on `memory` by the general path (checks built per
    /// limit, then the store's `decide_now`).
    fn decide_into<const N: usize>(
        &self,
        memory: &MemoryStore,
        policy: &CompiledPolicy,
        req: &Request<'_>,
        decision: &mut Decision,
    ) {
        let now = decision.now;
        let mut checks = [EMPTY_CHECK; N];
        let (n, lease) = self.prepare(policy, req, now, &mut checks, decision);
        let mut evals = [Evaluation::default(); N];
        let result = if n == 0 {
            Ok(true)
        } else {
            memory.decide_now(now, &checks[..n], lease, &mut evals[..n])
        };
        if let Err(e) = &result {
            decision.store_error = Some(e.clone());
        }
        finish(policy, decision, result, &evals[..n], lease);
    }

    /// Releases the concurrency leases a decision holds. Idempotent.
    ///
    /// # Errors
    /// The store cannot be reached; the leases then expire by their TTL.
    pub async fn release(&self, decision: &Decision) -> Result<(), StoreError> {
        let Some(lease) = decision.lease else {
            return Ok(());
        };
        let mut keys = [CounterKey(0); MAX_LIMITS_PER_REQUEST];
        let mut n = 0;
        for k in decision.lease_keys() {
            keys[n] = k;
            n += 1;
        }
        self.store
            .release(self.clock.now(), &keys[..n], lease)
            .await
    }

    /// Fills `checks` and the decision's results for `req`; returns how
    /// many, and the lease id to use (0 when no concurrency limit applies).
    ///
    /// The per-limit numbers come ready from the policy ([`crate::policy::PlanLimit`]'s
    /// prepared constants); a request only adds its keys, its cost, a
    /// calendar window's end, and (when it has them) its account's overrides
    /// and rollout date.
    fn prepare(
        &self,
        policy: &CompiledPolicy,
        req: &Request<'_>,
        now: Nanos,
        checks: &mut [Check],
        decision: &mut Decision,
    ) -> (usize, u64) {
        let mut n = 0;
        let mut leases = false;
        let mut last = None;
        for pl in policy.applicable(req.plan, req.operation) {
            let p = &pl.prepared;
            let scope = &policy.limits[usize::from(pl.limit)].scope;
            let Some(key) = self.counter_key(p.name_hash, scope, req, &mut last) else {
                continue;
            };
            let (params, quota) = match req.overrides.and_then(|o| o.get(pl.limit)) {
                Some(ov) => params(&pl.algorithm, Some(ov), now),
                None => (pl.params_at(now), p.quota),
            };
            let rolled_back = p
                .rollout_after
                .is_some_and(|at| req.account_created_at.is_some_and(|c| c < at));
            let mode = if p.mode == Mode::Enforce && rolled_back {
                Mode::Shadow
            } else {
                p.mode
            };
            let blocking = mode == Mode::Enforce && p.reject;
            let cost = req.cost.unwrap_or(pl.cost);
            checks[n] = Check {
                key,
                params,
                cost,
                blocking,
            };
            leases |= p.is_lease;
            decision.push_keyed(
                LimitResult {
                    limit: pl.limit,
                    mode,
                    quota,
                    window_secs: pl.window_secs,
                    cost,
                    eval: Evaluation::default(),
                    blocking,
                    is_lease: p.is_lease,
                },
                key,
            );
            n += 1;
            if n == checks.len() {
                break;
            }
        }
        let lease = if leases {
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        (n, lease)
    }

    /// The counter key of the limit whose name hashes to `name` for `req`: the high 64 bits hash the
    /// scope values (length-prefixed, so that no two different scope tuples
    /// can be spelled the same way), the low 64 bits mix the rest of that
    /// 128-bit hash with a hash of the limit name. Limits whose scopes have
    /// the same values therefore share the high half, and the in-memory store
    /// keeps them in one entry (one lookup, one lock). `None` when a scope
    /// value is unknown (the limit does not apply).
    ///
    /// `last` caches the scope hash of the previous limit: the limits of one
    /// request usually share their scope, and then the values are hashed once.
    fn counter_key<'p>(
        &self,
        name: u64,
        scope: &'p [ScopePart],
        req: &Request<'_>,
        last: &mut Option<(&'p [ScopePart], Option<u128>)>,
    ) -> Option<CounterKey> {
        let values = match *last {
            Some((s, h)) if s == scope => h,
            _ => {
                let h = self.scope_hash(scope, req);
                *last = Some((scope, h));
                h
            }
        }?;
        Some(CounterKey(values ^ u128::from(name)))
    }

    /// 128-bit hash of the scope values, laid out in a stack buffer and hashed
    /// in one shot (the streaming hasher derives a seeded secret and keeps a
    /// 0.5 KB state per call). The usual scope (an id or two) goes in a
    /// 64-byte buffer, which is cheaper to set up than the 256-byte one;
    /// values too long for either go through the streaming hasher. The bytes
    /// hashed are the same whichever way (each value's length as `u32` LE,
    /// then the value), and XXH3 gives the same hash for the same bytes
    /// streamed or in one shot, so every key is the same whatever the path.
    ///
    /// The usual scope, one short value, is hashed inline (no call); the
    /// rest in [`Engine::scope_hash_parts`].
    #[inline(always)]
    fn scope_hash(&self, scope: &[ScopePart], req: &Request<'_>) -> Option<u128> {
        if let [p] = scope {
            return self.part_hash(*p, req);
        }
        self.scope_hash_parts(scope, req)
    }

    /// [`Engine::scope_hash`] of the scope of one value, `p`.
    #[inline(always)]
    fn part_hash(&self, p: ScopePart, req: &Request<'_>) -> Option<u128> {
        let part = req.part(p);
        if part.is_empty() {
            return None;
        }
        Some(self.value_hash(part))
    }

    /// [`Engine::part_hash`] of the value `part`, known (not empty).
    #[inline(always)]
    fn value_hash(&self, part: &str) -> u128 {
        // One value (the usual scope: an id): in registers, no buffer
        // (see `value_hash`: a buffer here stalled every decision).
        match value_hash::value_hash(part.as_bytes(), self.seed) {
            Some(h) => h,
            None => self.long_value_hash(part),
        }
    }

    /// [`Engine::value_hash`] of a value too long to hash in registers.
    #[inline(never)]
    fn long_value_hash(&self, part: &str) -> u128 {
        let mut h = Xxh3::with_seed(self.seed);
        h.update(&(part.len() as u32).to_le_bytes());
        h.update(part.as_bytes());
        h.digest128()
    }

    /// [`Engine::scope_hash`] of any scope.
    #[inline(never)]
    fn scope_hash_parts(&self, scope: &[ScopePart], req: &Request<'_>) -> Option<u128> {
        let mut len = 0;
        for &p in scope {
            let part = req.part(p);
            if part.is_empty() {
                return None;
            }
            len += 4 + part.len();
        }
        if len <= SMALL_KEY_BUFFER {
            return Some(self.hash_in::<SMALL_KEY_BUFFER>(scope, req, len));
        }
        if len <= KEY_BUFFER {
            return Some(self.hash_in::<KEY_BUFFER>(scope, req, len));
        }
        let mut h = Xxh3::with_seed(self.seed);
        for part in scope.iter().map(|&p| req.part(p)) {
            h.update(&(part.len() as u32).to_le_bytes());
            h.update(part.as_bytes());
        }
        Some(h.digest128())
    }

    /// [`Engine::scope_hash`] in a `B`-byte buffer (`len <= B` bytes to lay out).
    fn hash_in<const B: usize>(&self, scope: &[ScopePart], req: &Request<'_>, len: usize) -> u128 {
        let mut buf = [0u8; B];
        let mut at = 0;
        for part in scope.iter().map(|&p| req.part(p)) {
            let end = at + 4 + part.len();
            buf[at..at + 4].copy_from_slice(&(part.len() as u32).to_le_bytes());
            buf[at + 4..end].copy_from_slice(part.as_bytes());
            at = end;
        }
        xxh3_128_with_seed(&buf[..len.min(B)], self.seed)
    }
}

/// Limits per request that [`Engine::decide_now`] sizes its arrays for.
const FEW_LIMITS: usize = 4;

/// Bytes of a counter key laid out on the stack before hashing.
const KEY_BUFFER: usize = 256;

/// The smaller stack buffer, for the usual short scope values.
const SMALL_KEY_BUFFER: usize = 64;

impl<C: Clock> Engine<MemoryStore, C> {
    /// [`Engine::decide`] without a future, for the in-memory store (which never waits).
    #[inline]
    pub fn decide_now(&self, policy: &CompiledPolicy, req: &Request<'_>) -> Decision {
        // Built in the caller's frame: a `Decision` is over 1.5 KB, and one
        // built in a callee is copied out on return.
        let mut decision = Decision::new(self.clock.now());
        self.decide_now_into(&self.store, policy, req, &mut decision);
        decision
    }

    /// [`Engine::release`] without a future.
    pub fn release_now(&self, decision: &Decision) {
        if let Some(lease) = decision.lease {
            let mut keys = [CounterKey(0); MAX_LIMITS_PER_REQUEST];
            let mut n = 0;
            for k in decision.lease_keys() {
                keys[n] = k;
                n += 1;
            }
            self.store.release_now(self.clock.now(), &keys[..n], lease);
        }
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// [`Engine::decide`] without a future when the store decides in memory
    /// (the in-memory store, or the one [`Store::as_memory`] names); `None`
    /// for a store that waits: await [`Engine::decide`] then. Inlined, so
    /// the `Decision` (over 1.5 KB) is built in the caller's frame rather
    /// than copied out of a callee or a polled future.
    #[inline]
    pub fn decide_in_memory(&self, policy: &CompiledPolicy, req: &Request<'_>) -> Option<Decision> {
        let memory = self.store.as_memory()?;
        let mut decision = Decision::new(self.clock.now());
        self.decide_now_into(memory, policy, req, &mut decision);
        Some(decision)
    }

    /// [`Engine::decide_in_memory`] handing the decision to `answer` where
    /// it was built: the `Decision` (over 1.5 KB) is never moved, not even
    /// into an `Option`. `None` for a store that waits (nothing decided).
    #[inline]
    pub fn decide_in_memory_with<R>(
        &self,
        policy: &CompiledPolicy,
        req: &Request<'_>,
        answer: impl FnOnce(&Decision) -> R,
    ) -> Option<R> {
        let memory = self.store.as_memory()?;
        let mut decision = Decision::new(self.clock.now());
        self.decide_now_into(memory, policy, req, &mut decision);
        Some(answer(&decision))
    }
}

const EMPTY_CHECK: Check = Check {
    key: CounterKey(0),
    params: Params::Calendar {
        limit: 0,
        end: Nanos(0),
    },
    cost: 0,
    blocking: false,
};

/// Store numbers for an algorithm at `now`, after an account override; and the quota.
fn params(alg: &Algorithm, ov: Option<&LimitOverride>, now: Nanos) -> (Params, u64) {
    match alg {
        Algorithm::TokenBucket { rate, refill, per } => {
            let rate = match ov {
                Some(o) if o.capacity.is_some() || o.refill.is_some() => {
                    let cap = o
                        .capacity
                        .or(std::num::NonZeroU64::new(rate.capacity))
                        .expect("capacity is non-zero");
                    GcraRate::new(cap, o.refill.unwrap_or(*refill), *per)
                }
                _ => *rate,
            };
            (Params::Gcra(rate), rate.capacity)
        }
        Algorithm::SlidingWindow { window, .. } => {
            let window = match ov.and_then(|o| o.limit) {
                Some(l) => window.with_limit(u32::try_from(l.get()).unwrap_or(u32::MAX)),
                None => *window,
            };
            (Params::Sliding(window), window.limit)
        }
        Algorithm::CalendarWindow { limit, calendar } => {
            let limit = ov.and_then(|o| o.limit).map_or(*limit, |l| l.get());
            (
                Params::Calendar {
                    limit,
                    end: calendar.window(now).1,
                },
                limit,
            )
        }
        Algorithm::Concurrency { limit, ttl } => {
            let limit = ov.and_then(|o| o.limit).map_or(*limit, |l| l.get());
            (Params::Concurrency { limit, ttl: *ttl }, limit)
        }
    }
}

/// After a store error: decides the limits whose `on_store_error` is
/// `local` on `local` at their share (fail-open limits pass, unevaluated).
/// Returns `false`, leaving `d` to [`finish`], when an enforced limit fails
/// closed, when no limit is local, or when the local store cannot decide.
fn decide_locally(
    policy: &CompiledPolicy,
    local: &MemoryStore,
    now: Nanos,
    checks: &[Check],
    lease: u64,
    d: &mut Decision,
) -> bool {
    let mut any_local = false;
    for r in d.results() {
        match policy.limits[usize::from(r.limit)].on_store_error {
            FailMode::Deny if r.mode == Mode::Enforce => return false,
            FailMode::Local { .. } => any_local = true,
            _ => {}
        }
    }
    if !any_local {
        return false;
    }
    let mut local_checks = [EMPTY_CHECK; MAX_LIMITS_PER_REQUEST];
    let mut which = [0usize; MAX_LIMITS_PER_REQUEST];
    let mut m = 0;
    for (i, r) in d.results_mut().iter_mut().enumerate() {
        if let FailMode::Local { share } = policy.limits[usize::from(r.limit)].on_store_error {
            local_checks[m] = Check {
                params: local_params(checks[i].params, share),
                ..checks[i]
            };
            r.quota = share.of(r.quota).max(1);
            which[m] = i;
            m += 1;
        }
    }
    let mut local_evals = [Evaluation::default(); MAX_LIMITS_PER_REQUEST];
    let Ok(admitted) = local.decide_now(now, &local_checks[..m], lease, &mut local_evals[..m])
    else {
        return false;
    };
    // Fail-open limits were not evaluated: they pass.
    let mut evals = [Evaluation::default(); MAX_LIMITS_PER_REQUEST];
    for (e, r) in evals.iter_mut().zip(d.results()) {
        e.admit = true;
        e.remaining = r.quota;
    }
    for j in 0..m {
        evals[which[j]] = local_evals[j];
    }
    d.decided_locally = true;
    finish(policy, d, Ok(admitted), &evals[..checks.len()], lease);
    true
}

/// A limit's numbers scaled to its local share: `⌊n × share⌋` (at least 1)
/// for capacities and limits, refill intervals stretched by `1 / share`.
fn local_params(p: Params, share: LocalShare) -> Params {
    let of = |n: u64| share.of(n).max(1);
    match p {
        Params::Gcra(r) => Params::Gcra(GcraRate {
            capacity: of(r.capacity),
            interval: share.stretch(r.interval),
        }),
        Params::Sliding(w) => Params::Sliding(SlidingWindow {
            limit: of(w.limit),
            ..w
        }),
        Params::Calendar { limit, end } => Params::Calendar {
            limit: of(limit),
            end,
        },
        Params::Concurrency { limit, ttl } => Params::Concurrency {
            limit: of(limit),
            ttl,
        },
    }
}

/// Turns the store's answer into the decision's outcome.
fn finish(
    policy: &CompiledPolicy,
    d: &mut Decision,
    result: Result<bool, StoreError>,
    evals: &[Evaluation],
    lease: u64,
) {
    match result {
        Ok(admitted) => {
            for (r, e) in d.results_mut().iter_mut().zip(evals) {
                r.eval = *e;
            }
            d.settle(admitted, lease);
        }
        Err(_) => {
            let closed = d.results().iter().any(|r| {
                // `local` without a local fallback fails closed too.
                r.mode == Mode::Enforce
                    && policy.limits[usize::from(r.limit)].on_store_error != FailMode::Allow
            });
            d.outcome = if closed {
                Outcome::StoreUnavailable
            } else {
                Outcome::Admitted
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::duration_nanos;
    use crate::{ManualClock, policy};

    /// A store that is always down.
    struct DownStore;
    impl Store for DownStore {
        async fn decide(
            &self,
            _: Nanos,
            _: &[Check],
            _: u64,
            _: &mut [Evaluation],
        ) -> Result<bool, StoreError> {
            Err(StoreError::Unavailable("down"))
        }
        async fn release(&self, _: Nanos, _: &[CounterKey], _: u64) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down"))
        }
    }

    fn engine() -> Engine<MemoryStore, ManualClock> {
        Engine::with_clock(
            MemoryStore::default(),
            ManualClock::new(Nanos::from_secs(1_000_000)),
        )
    }

    #[test]
    fn store_errors_follow_each_limits_fail_mode() {
        let open = policy::parse(
            "[limits.a]\nalgorithm = \"concurrency\"\nlimit = 1\non_store_error = \"allow\"\n",
            "t",
        )
        .unwrap();
        let closed =
            policy::parse("[limits.a]\nalgorithm = \"concurrency\"\nlimit = 1\n", "t").unwrap();
        let e = Engine::with_clock(DownStore, ManualClock::new(Nanos(1)));
        let r = Request {
            account: "x",
            ..Request::new(0, open.default_operation())
        };
        assert_eq!(
            crate::store::conformance::block_on(e.decide(&open, &r)).outcome,
            Outcome::Admitted
        );
        assert_eq!(
            crate::store::conformance::block_on(e.decide(&closed, &r)).outcome,
            Outcome::StoreUnavailable
        );
    }

    /// A shared store that is always down, with a local fallback.
    #[derive(Default)]
    struct DownWithFallback(MemoryStore);
    impl Store for DownWithFallback {
        async fn decide(
            &self,
            _: Nanos,
            _: &[Check],
            _: u64,
            _: &mut [Evaluation],
        ) -> Result<bool, StoreError> {
            Err(StoreError::Timeout(Duration::from_millis(50)))
        }
        async fn release(
            &self,
            now: Nanos,
            keys: &[CounterKey],
            lease: u64,
        ) -> Result<(), StoreError> {
            self.0.release_now(now, keys, lease);
            Err(StoreError::Unavailable("down"))
        }
        fn local_fallback(&self) -> Option<&MemoryStore> {
            Some(&self.0)
        }
    }

    #[test]
    fn local_fallback_admits_the_share_of_each_local_limit() {
        let p = policy::parse(
            "[limits.w]\nalgorithm = \"sliding_window\"\nlimit = 10\nwindow = \"1m\"\non_store_error = \"local\"\nlocal_share = 0.5\n\
             [limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = 100\nrefill_every = \"1m\"\non_store_error = \"allow\"\n",
            "t",
        )
        .unwrap();
        let clock = std::sync::Arc::new(ManualClock::new(Nanos::from_secs(1_000_000)));
        let e = Engine::with_clock(DownWithFallback::default(), clock.clone());
        let r = Request {
            account: "x",
            ..Request::new(0, p.default_operation())
        };
        let block_on = crate::store::conformance::block_on;
        let mut admitted = 0;
        for _ in 0..20 {
            let d = block_on(e.decide(&p, &r));
            assert!(d.store_error.is_some() && d.decided_locally);
            match d.outcome {
                Outcome::Admitted => admitted += 1,
                Outcome::Rejected { limit } => {
                    assert_eq!(p.limits[usize::from(limit)].name, "w");
                    assert!(d.retry_after() > Duration::ZERO);
                }
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(admitted, 5, "half of 10 per minute on this replica");
        // A minute later the local window admits its share again.
        clock.advance(Duration::from_secs(65)); // T + T/15
        assert_eq!(block_on(e.decide(&p, &r)).outcome, Outcome::Admitted);

        // A fail-closed enforced limit refuses whatever the local limits say.
        let closed = policy::parse(
            "[limits.w]\nalgorithm = \"sliding_window\"\nlimit = 10\nwindow = \"1m\"\non_store_error = \"local\"\nlocal_share = 0.5\n\
             [limits.d]\nalgorithm = \"calendar_window\"\nlimit = 10\nwindow = \"day\"\n",
            "t",
        )
        .unwrap();
        let d = block_on(e.decide(&closed, &r));
        assert_eq!(d.outcome, Outcome::StoreUnavailable);
        assert!(!d.decided_locally);

        // Without a local fallback, `local` fails closed.
        let down = Engine::with_clock(DownStore, ManualClock::new(Nanos(1)));
        assert_eq!(
            crate::store::conformance::block_on(down.decide(&p, &r)).outcome,
            Outcome::StoreUnavailable
        );
    }

    #[test]
    fn local_params_scale_by_the_share() {
        let share = LocalShare::from_fraction(0.25).unwrap();
        let rate = GcraRate::new(
            std::num::NonZeroU64::new(400).unwrap(),
            std::num::NonZeroU64::new(100).unwrap(),
            Duration::from_secs(1),
        );
        let Params::Gcra(r) = local_params(Params::Gcra(rate), share) else {
            unreachable!()
        };
        assert_eq!(r.capacity, 100);
        assert_eq!(
            r.interval,
            rate.interval * 4,
            "a quarter of the refill rate"
        );
        let Params::Concurrency { limit, .. } = local_params(
            Params::Concurrency {
                limit: 3,
                ttl: Duration::from_secs(1),
            },
            share,
        ) else {
            unreachable!()
        };
        assert_eq!(limit, 1, "never below 1");
    }

    #[test]
    fn scope_hash_is_the_same_bytes_whatever_the_buffer() {
        let e = engine().with_key_seed(7);
        for n in [1, 20, 27, 28, 29, 59, 60, 61, 100, 252, 253, 400] {
            let account = "a".repeat(n);
            let app = "b".repeat(n / 2 + 1);
            let req = Request {
                account: &account,
                app: &app,
                ..Request::new(0, 0)
            };
            for scope in [
                &[ScopePart::Account][..],
                &[ScopePart::Account, ScopePart::App],
            ] {
                let mut bytes = Vec::new();
                for &p in scope {
                    let v = req.part(p);
                    bytes.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(v.as_bytes());
                }
                assert_eq!(
                    e.scope_hash(scope, &req),
                    Some(xxh3_128_with_seed(&bytes, 7)),
                    "{n} bytes, {} parts",
                    scope.len()
                );
            }
        }
    }

    /// The in-memory one-scope path (`decide_now`) decides exactly as the
    /// general path (`decide`, per-limit checks through the `Store` trait):
    /// same outcomes, same results, request after request, on limits of
    /// every algorithm, mode and action, with request costs and a clock
    /// that moves.
    #[test]
    fn one_scope_path_decides_as_the_general_path() {
        decides_as_the_general_path(
            "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 7\nrefill = 2\nrefill_every = \"1s\"\n\
             [limits.w]\nalgorithm = \"sliding_window\"\nlimit = 9\nwindow = \"3s\"\n\
             [limits.d]\nalgorithm = \"calendar_window\"\nlimit = 40\nwindow = \"minute\"\non_exceed = { action = \"forward\" }\n\
             [limits.s]\nalgorithm = \"token_bucket\"\ncapacity = 3\nrefill = 1\nmode = \"soft\"\n",
            Duration::from_millis(400),
            4,
        );
    }

    /// The same with a calendar window whose boundaries are not UTC
    /// arithmetic (an hour in Asia/Kolkata starts at :30 UTC: the
    /// program's zoned step) next to a bucket, the clock crossing hours.
    #[test]
    fn one_scope_path_decides_zoned_calendars_as_the_general_path() {
        decides_as_the_general_path(
            "[limits.h]\nalgorithm = \"calendar_window\"\nlimit = 30\nwindow = \"hour\"\ntime_zone = \"Asia/Kolkata\"\n\
             [limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = 1\nrefill_every = \"1m\"\n",
            Duration::from_secs(40),
            3,
        );
    }

    /// Decides 3,000 random requests (accounts, cost overrides, clock
    /// steps up to `max_step`) under the policy `src` (one-scope) on the
    /// one-scope path and on the general path: the same outcomes, results
    /// and counters.
    fn decides_as_the_general_path(src: &str, max_step: Duration, min_outcomes: usize) {
        let p = policy::parse(src, "t").unwrap();
        let op = p.default_operation();
        assert!(p.is_one_scope(p.default_plan, op));
        let fast = engine().with_key_seed(3);
        // Through the `Store` trait only: `Engine::decide` on a
        // `MemoryStore` would take the one-scope path too.
        let general = Engine::with_clock(
            Shared::general_only(),
            ManualClock::new(Nanos::from_secs(1_000_000)),
        )
        .with_key_seed(3);
        let accounts = ["a", "b", "c", ""];
        let mut x = 0x2545_F491_4F6C_DD1D_u64;
        let mut outcomes = std::collections::HashSet::new();
        for step in 0..3_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let r = Request {
                account: accounts[(x % 4) as usize],
                cost: [None, Some(0), Some(2), Some(8)][(x >> 8) as usize % 4],
                ..Request::new(p.default_plan, op)
            };
            let a = fast.decide_now(&p, &r);
            let b = crate::store::conformance::block_on(general.decide(&p, &r));
            assert_eq!(a.outcome, b.outcome, "step {step}");
            assert_eq!(a.results(), b.results(), "step {step}");
            assert_eq!(a.lease, b.lease);
            outcomes.insert(format!("{:?}", a.outcome));
            let dt = Duration::from_nanos((x >> 16) % duration_nanos(max_step));
            fast.clock().advance(dt);
            general.clock().advance(dt);
        }
        assert_eq!(fast.store().len(), general.store().0.len());
        assert!(
            outcomes.len() >= min_outcomes,
            "admitted, rejected, above capacity (and forwarded): {outcomes:?}"
        );
    }

    /// One store, two paths on the same counters: requests alternate at
    /// random between the one-scope path (shard write lock, no entry mutex)
    /// and the general path (the same `MemoryStore` through the `Store`
    /// trait: shard read lock and entry mutex), and decide exactly as a
    /// reference engine that takes the general path only. Keys and cells
    /// are shared, so this also checks that both paths read and write the
    /// compact cells (a bucket's TAT and a calendar window's end in
    /// `fresh_at`) the same way.
    #[test]
    fn one_scope_and_general_paths_share_counters_exactly() {
        let p = policy::parse(
            "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = 3\nrefill_every = \"1s\"\n\
             [limits.w]\nalgorithm = \"sliding_window\"\nlimit = 6\nwindow = \"2s\"\n\
             [limits.a]\nalgorithm = \"sliding_window\"\nlimit = 50\nwindow = \"5s\"\nprecision = \"approximate\"\n\
             [limits.d]\nalgorithm = \"calendar_window\"\nlimit = 30\nwindow = \"minute\"\n",
            "t",
        )
        .unwrap();
        let op = p.default_operation();
        assert!(p.is_one_scope(p.default_plan, op));
        let start = Nanos::from_secs(1_000_000);
        let store = std::sync::Arc::new(MemoryStore::default());
        let fast = Engine::with_clock(Shared(store.clone(), true), ManualClock::new(start))
            .with_key_seed(9);
        let general = Engine::with_clock(Shared(store.clone(), false), ManualClock::new(start))
            .with_key_seed(9);
        let reference =
            Engine::with_clock(Shared::general_only(), ManualClock::new(start)).with_key_seed(9);
        let accounts = ["a", "b", "c"];
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let (mut admitted, mut by_fast) = (0, 0);
        for step in 0..4_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let r = Request {
                account: accounts[(x % 3) as usize],
                cost: [None, None, Some(2), Some(7)][(x >> 8) as usize % 4],
                ..Request::new(p.default_plan, op)
            };
            let want = crate::store::conformance::block_on(reference.decide(&p, &r));
            let one_scope = (x >> 20).is_multiple_of(2);
            let engine = if one_scope { &fast } else { &general };
            by_fast += u32::from(one_scope);
            let got = crate::store::conformance::block_on(engine.decide(&p, &r));
            assert_eq!(got.outcome, want.outcome, "step {step}");
            assert_eq!(got.results(), want.results(), "step {step}");
            admitted += u32::from(got.is_allowed());
            let dt = Duration::from_millis((x >> 32) % 300);
            fast.clock().advance(dt);
            general.clock().advance(dt);
            reference.clock().advance(dt);
        }
        assert!(
            (500..3_500).contains(&admitted),
            "both outcomes: {admitted}"
        );
        assert!((1_000..3_000).contains(&by_fast), "both paths: {by_fast}");
        assert_eq!(store.len(), reference.store().0.len());
    }

    /// A shared memory store; `.1`: whether the engine may see it as one
    /// (the one-scope path) or only through the [`Store`] trait (no
    /// [`Store::as_memory`]: every decision takes the general path, with
    /// per-limit checks, shard read locks and entry mutexes).
    struct Shared(std::sync::Arc<MemoryStore>, bool);
    impl Shared {
        /// A store of its own that the engine sees only through the trait.
        fn general_only() -> Shared {
            Shared(std::sync::Arc::default(), false)
        }
    }
    impl Store for Shared {
        async fn decide(
            &self,
            now: Nanos,
            checks: &[Check],
            lease: u64,
            out: &mut [Evaluation],
        ) -> Result<bool, StoreError> {
            self.0.decide_now(now, checks, lease, out)
        }
        async fn release(
            &self,
            now: Nanos,
            keys: &[CounterKey],
            lease: u64,
        ) -> Result<(), StoreError> {
            self.0.release_now(now, keys, lease);
            Ok(())
        }
        fn as_memory(&self) -> Option<&MemoryStore> {
            self.1.then_some(&*self.0)
        }
    }

    /// A request that a blocking limit refuses consumes nothing on the
    /// one-scope path, which writes each admitting counter as it evaluates
    /// it and puts them back on a refusal: whatever the refusing limit's
    /// place, the bucket, the calendar window and the sliding log of one
    /// entry before or after it are as if the refused requests never came.
    #[test]
    fn one_scope_refusal_puts_back_the_counters_written_before_it() {
        let others = [
            "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = 1\n",
            "[limits.w]\nalgorithm = \"sliding_window\"\nlimit = 1000\nwindow = \"1m\"\nprecision = \"approximate\"\n",
            "[limits.d]\nalgorithm = \"calendar_window\"\nlimit = 1000\nwindow = \"day\"\n",
        ];
        // Limits are evaluated in the order of their names: the refusing
        // one's name puts it first, between the others, or last.
        for (at, name) in ["a", "c", "e", "x"].into_iter().enumerate() {
            let refusing = format!(
                "[limits.{name}]\nalgorithm = \"calendar_window\"\nlimit = 2\nwindow = \"hour\"\n"
            );
            let p = policy::parse(&format!("{}{refusing}", others.concat()), "t").unwrap();
            let op = p.default_operation();
            assert!(p.is_one_scope(p.default_plan, op));
            let e = engine();
            let r = Request {
                account: "a",
                ..Request::new(p.default_plan, op)
            };
            for _ in 0..2 {
                assert_eq!(e.decide_now(&p, &r).outcome, Outcome::Admitted);
            }
            for _ in 0..5 {
                let d = e.decide_now(&p, &r);
                assert!(matches!(d.outcome, Outcome::Rejected { .. }), "{name}");
                // The others admit (and were evaluated on their counters
                // as the two admitted requests left them).
                assert_eq!(d.results().iter().filter(|r| r.eval.admit).count(), 3);
            }
            // Nothing taken by the refused requests: 1000 - 2 on each.
            let free = Request { cost: Some(0), ..r };
            let d = e.decide_now(&p, &free);
            assert_eq!(d.outcome, Outcome::Admitted);
            let remaining: Vec<u64> = d.results().iter().map(|r| r.eval.remaining).collect();
            let mut want = vec![998; 3];
            want.insert(at, 0);
            assert_eq!(remaining, want, "refusing limit {name} at {at}");
            assert_eq!(e.store().len(), 4);
        }
    }

    /// A one-scope decision that must first grow its scope's entry, or finds
    /// the store full, takes back the results it pushed before deciding
    /// again: each limit has exactly one result, and the counters count once
    /// (the full store's request is then answered by the general path).
    #[test]
    fn one_scope_path_retries_with_one_result_per_limit() {
        let b = "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 7\nrefill = 1\nrefill_every = \"1s\"\n";
        let rest = "[limits.w]\nalgorithm = \"sliding_window\"\nlimit = 9\nwindow = \"3s\"\n\
             [limits.d]\nalgorithm = \"calendar_window\"\nlimit = 40\nwindow = \"minute\"\n";
        let one = policy::parse(b, "t").unwrap();
        let three = policy::parse(&format!("{b}{rest}"), "t").unwrap();
        assert!(three.is_one_scope(three.default_plan, three.default_operation()));
        let e = engine().with_key_seed(5);
        let req = |p: &CompiledPolicy| Request {
            account: "a",
            ..Request::new(p.default_plan, p.default_operation())
        };
        // The scope's entry is made with room for one counter; the
        // three-limit request needs three: `Grow`, then decided again.
        assert!(e.decide_now(&one, &req(&one)).is_allowed());
        let d = e.decide_now(&three, &req(&three));
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(d.results().len(), 3);
        // Each counter took exactly one (b: 7 - 2, w: 9 - 1, d: 40 - 1).
        let mut remaining: Vec<u64> = d.results().iter().map(|r| r.eval.remaining).collect();
        remaining.sort_unstable();
        assert_eq!(remaining, [5, 8, 39]);
        assert_eq!(e.store().len(), 3);
        // A store with room for one counter: `Full` on the one-scope path,
        // then the general path answers the store error (fail closed).
        let full = Engine::with_clock(
            MemoryStore::new(1),
            ManualClock::new(Nanos::from_secs(1_000_000)),
        );
        assert!(full.decide_now(&one, &req(&one)).is_allowed());
        let d = full.decide_now(&three, &req(&three));
        let mut limits: Vec<crate::policy::LimitId> = d.results().iter().map(|r| r.limit).collect();
        limits.dedup();
        assert_eq!(limits.len(), 3, "one result per limit: {:?}", d.results());
        assert_eq!(full.store().len(), 1, "nothing new was written");
    }

    /// Which limit sets take the one-scope path: one scope, no lease, no
    /// rollout date.
    #[test]
    fn one_scope_is_resolved_at_load() {
        let flag = |src: &str| {
            let p = policy::parse(src, "t").unwrap();
            p.is_one_scope(p.default_plan, p.default_operation())
        };
        let bucket = "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = 1\n";
        let window = "[limits.w]\nalgorithm = \"sliding_window\"\nlimit = 9\nwindow = \"3s\"\n";
        assert!(flag(bucket));
        assert!(flag(&format!("{bucket}{window}")));
        assert!(!flag(&format!("{bucket}{window}scope = [\"ip\"]\n")));
        assert!(!flag(&format!(
            "{bucket}[limits.c]\nalgorithm = \"concurrency\"\nlimit = 1\n"
        )));
        assert!(!flag(&format!(
            "{bucket}rollout_after = \"2026-06-01T00:00:00Z\"\n"
        )));
    }

    /// The one value of a one-scope request's scope is noted in its
    /// program at load, and the engine keys the counters by that value.
    #[test]
    fn one_part_is_the_scope_value_noted_at_load() {
        let src = |scope: &str| {
            format!(
                "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = 1\nrefill_every = \"1h\"\nscope = {scope}\n\
                 [limits.w]\nalgorithm = \"sliding_window\"\nlimit = 9\nwindow = \"3s\"\nscope = {scope}\n"
            )
        };
        let parts = |scope: &str| {
            let p = policy::parse(&src(scope), "t").unwrap();
            let program = p.one_scope(p.default_plan, p.default_operation());
            (program.map(|o| o.part), program.map(|o| o.steps.len()))
        };
        assert_eq!(parts("[\"ip\"]"), (Some(Some(ScopePart::Ip)), Some(2)));
        assert_eq!(parts("[\"org\", \"ip\"]"), (Some(None), Some(2)));

        let p = policy::parse(&src("[\"ip\"]"), "t").unwrap();
        let e = engine();
        let req = |ip| Request {
            account: "same-account",
            ip,
            ..Request::new(p.default_plan, p.default_operation())
        };
        assert!(e.decide_now(&p, &req("")).results().is_empty());
        assert_eq!(
            e.decide_now(&p, &req("10.0.0.1")).outcome,
            Outcome::Admitted
        );
        assert!(!e.decide_now(&p, &req("10.0.0.1")).is_allowed());
        // Another IP of the same account has its own bucket.
        assert_eq!(
            e.decide_now(&p, &req("10.0.0.2")).outcome,
            Outcome::Admitted
        );
    }

    #[test]
    fn forward_action_marks_instead_of_rejecting() {
        let p = policy::parse(
            "[limits.daily]\nalgorithm = \"calendar_window\"\nlimit = 1\nwindow = \"day\"\non_exceed = { action = \"forward\" }\n",
            "t",
        )
        .unwrap();
        let e = engine();
        let r = Request {
            account: "x",
            ..Request::new(0, p.default_operation())
        };
        assert_eq!(e.decide_now(&p, &r).outcome, Outcome::Admitted);
        assert_eq!(
            e.decide_now(&p, &r).outcome,
            Outcome::Forwarded { limit: 0 }
        );
    }

    #[test]
    fn cost_above_capacity_at_request_time_never_passes() {
        let p = policy::parse(
            "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = 1\n",
            "t",
        )
        .unwrap();
        let r = Request {
            account: "x",
            cost: Some(6),
            ..Request::new(0, p.default_operation())
        };
        let d = engine().decide_now(&p, &r);
        assert_eq!(d.outcome, Outcome::CostAboveCapacity { limit: 0 });
        assert_eq!(d.retry_after(), Duration::ZERO);
    }

    #[test]
    fn rollout_enforces_for_new_accounts_only() {
        let p = policy::parse(
            "[limits.b]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = 1\nrollout_after = \"2026-06-01T00:00:00Z\"\n",
            "t",
        )
        .unwrap();
        let e = engine();
        let cutoff = p.limits[0].rollout_after.unwrap();
        let old = Request {
            account: "old",
            account_created_at: Some(Nanos(cutoff.0 - 1)),
            ..Request::new(0, p.default_operation())
        };
        let new = Request {
            account: "new",
            account_created_at: Some(cutoff),
            ..Request::new(0, p.default_operation())
        };
        for _ in 0..3 {
            assert_eq!(e.decide_now(&p, &old).outcome, Outcome::Admitted);
        }
        assert_eq!(
            e.decide_now(&p, &old).crossings().count(),
            1,
            "old accounts run it in shadow"
        );
        assert_eq!(e.decide_now(&p, &new).outcome, Outcome::Admitted);
        assert!(matches!(
            e.decide_now(&p, &new).outcome,
            Outcome::Rejected { .. }
        ));
    }

    #[test]
    fn missing_scope_value_means_the_limit_does_not_apply() {
        let p = policy::parse(
            "[attributes]\nfile_name = \"json:name\"\n[limits.f]\nalgorithm = \"calendar_window\"\nlimit = 1\nwindow = \"hour\"\nscope = [\"file_name\"]\n",
            "t",
        )
        .unwrap();
        let e = engine();
        let none = Request::new(0, p.default_operation());
        assert!(e.decide_now(&p, &none).results().is_empty());
        let attrs = [Some("a.jpg")];
        let named = Request {
            attributes: &attrs,
            ..none
        };
        assert_eq!(e.decide_now(&p, &named).outcome, Outcome::Admitted);
        assert!(matches!(
            e.decide_now(&p, &named).outcome,
            Outcome::Rejected { .. }
        ));
    }

    #[test]
    fn leases_are_released() {
        let p = policy::parse("[limits.c]\nalgorithm = \"concurrency\"\nlimit = 1\n", "t").unwrap();
        let e = engine();
        let r = Request {
            account: "x",
            ..Request::new(0, p.default_operation())
        };
        let held = e.decide_now(&p, &r);
        assert!(held.lease.is_some());
        assert!(matches!(
            e.decide_now(&p, &r).outcome,
            Outcome::Rejected { .. }
        ));
        e.release_now(&held);
        assert_eq!(e.decide_now(&p, &r).outcome, Outcome::Admitted);
    }
}

//! Per-policy handles to the labelled decision counters, so that counting a
//! decision is an index and an atomic add instead of building label strings
//! and hashing them into the metric family on every request.
//!
//! A handle is created on first use (the family's `get_or_create`), so the
//! `/metrics` exposition is exactly what it was: a series appears once it has
//! been counted. The table belongs to one policy (it holds it, so its address
//! cannot be reused by a reloaded one); a reload builds a new table on the
//! next decision.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use tollgate_core::Outcome;
use tollgate_core::policy::{CompiledPolicy, LimitId, Mode, OperationId, PlanId};

use crate::check::template::{TEMPLATES, Template};
use crate::metrics::{DecisionLabels, LimitLabels, Metrics};

/// Decision outcomes, in table order.
pub const OUTCOMES: [&str; 5] = [
    "allowed",
    "forwarded",
    "rejected",
    "cost_above_capacity",
    "store_unavailable",
];
/// Per-limit results, in table order.
pub const RESULTS: [&str; 4] = ["within", "over", "soft", "shadow"];

/// The table index of a decision outcome.
pub fn outcome_index(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Admitted => 0,
        Outcome::Forwarded { .. } => 1,
        Outcome::Rejected { .. } => 2,
        Outcome::CostAboveCapacity { .. } => 3,
        Outcome::StoreUnavailable => 4,
    }
}

/// The table index of a limit result.
pub fn result_index(exceeded: bool, mode: Mode) -> usize {
    match (exceeded, mode) {
        (false, _) => 0,
        (true, Mode::Enforce) => 1,
        (true, Mode::Soft) => 2,
        (true, Mode::Shadow) => 3,
    }
}

/// Counts decision `d` (of operation `op` for plan `plan`) in the metrics
/// and notes, for `account`'s usage events, its rejection and soft-limit
/// crossings, without waiting: the `soft_limit_crossed` events due are
/// returned, to be recorded with [`crate::events::SoftCrossings::record`] (none, the usual
/// case, needs no future at all).
pub fn count_decision(
    st: &crate::state::AppState,
    policy: &CompiledPolicy,
    op: OperationId,
    plan: PlanId,
    d: &tollgate_core::Decision,
    account: Option<&str>,
) -> crate::events::SoftCrossings {
    let counters = st.counters.for_policy(policy, || st.policy.load_full());
    count_decision_in(st, counters.as_deref(), policy, op, plan, d, account)
}

/// [`count_decision`] with the handles of `policy` already at hand (`None`:
/// it is not the policy in force, count the slow way).
pub fn count_decision_in(
    st: &crate::state::AppState,
    counters: Option<&PolicyCounters>,
    policy: &CompiledPolicy,
    op: OperationId,
    plan: PlanId,
    d: &tollgate_core::Decision,
    account: Option<&str>,
) -> crate::events::SoftCrossings {
    use crate::metrics::StoreErrorLabels;
    let outcome = outcome_index(&d.outcome);
    match counters {
        Some(c) => c.decision(&st.metrics, plan, op, outcome).inc(),
        None => st
            .metrics
            .decisions
            .get_or_create(&DecisionLabels {
                plan: policy.plans[usize::from(plan)].name.clone(),
                operation: policy.operations[usize::from(op)].name.clone(),
                outcome: OUTCOMES[outcome].to_owned(),
            })
            .inc(),
    };
    if let Some(e) = &d.store_error {
        st.metrics
            .store_errors
            .get_or_create(&StoreErrorLabels {
                kind: crate::store::error_kind(e).to_owned(),
            })
            .inc();
        if d.decided_locally {
            st.metrics.local_fallback.inc();
        } else if d.is_allowed() {
            st.metrics.fail_open.inc();
        }
    }
    let mut crossings = crate::events::SoftCrossings::default();
    for r in d.results() {
        let name = &policy.limits[usize::from(r.limit)].name;
        let result = result_index(r.exceeded(), r.mode);
        match counters {
            Some(c) => c.limit(&st.metrics, r.limit, result).inc(),
            None => st
                .metrics
                .limits
                .get_or_create(&LimitLabels {
                    limit: name.clone(),
                    result: RESULTS[result].to_owned(),
                })
                .inc(),
        };
        let Some(account) = account else { continue };
        if r.exceeded() && r.mode == Mode::Soft && st.events.soft_crossed(account, name, d.now) {
            crossings.push(name, r.quota);
        }
    }
    if let (Outcome::Rejected { limit }, Some(account)) = (d.outcome, account) {
        st.events
            .rejected(account, &policy.limits[usize::from(limit)].name);
    }
    crossings
}

/// A `RateLimit-Policy` value as a check answer writes it (JSON-escaped,
/// without quotes), kept per plan and operation so that later checks copy it
/// instead of writing it again ([`tollgate_core::headers::HeaderSink::policy_value`]).
/// It is reused only for a decision whose enforced results are those it was
/// written from: same limits in the same order, quotas (after overrides),
/// lease flags and windows. [`POLICY_VALUES`] are kept per plan and
/// operation (a limit rolled out to new accounts only makes two); any other
/// variant is written piece by piece.
pub struct PolicyValue {
    /// Limit, quota, lease flag and window of each enforced result.
    pub from: PolicyItems,
    /// The value, escaped.
    pub escaped: Box<[u8]>,
    /// Its length before escaping.
    pub raw_len: usize,
}

/// What a [`PolicyValue`] is written from: limit, quota, lease flag and
/// window of each enforced result, in order.
pub type PolicyItems = Box<[(LimitId, u64, bool, u64)]>;

impl PolicyValue {
    /// What a `RateLimit-Policy` value of `d` is written from.
    pub fn from_results(d: &tollgate_core::Decision) -> PolicyItems {
        d.results()
            .iter()
            .filter(|r| r.mode == Mode::Enforce)
            .map(|r| (r.limit, r.quota, r.is_lease, r.window_secs))
            .collect()
    }

    /// Whether this is the `RateLimit-Policy` value of `d`.
    pub fn matches(&self, d: &tollgate_core::Decision) -> bool {
        policy_items_match(&self.from, d)
    }
}

/// Whether `items` ([`PolicyValue::from_results`]) are what a
/// `RateLimit-Policy` value of `d` is written from (the proxy keeps its
/// values with them too).
pub fn policy_items_match(
    items: &[(LimitId, u64, bool, u64)],
    d: &tollgate_core::Decision,
) -> bool {
    let mut from = items.iter();
    for r in d.results().iter().filter(|r| r.mode == Mode::Enforce) {
        match from.next() {
            Some(&(limit, quota, is_lease, window))
                if limit == r.limit
                    && quota == r.quota
                    && is_lease == r.is_lease
                    && window == r.window_secs => {}
            _ => return false,
        }
    }
    from.next().is_none()
}

/// Counter handles (and kept header values) of one policy.
pub struct PolicyCounters {
    policy: Arc<CompiledPolicy>,
    decisions: Box<[OnceLock<Counter>]>,
    limits: Box<[OnceLock<Counter>]>,
    policy_values: Box<[[OnceLock<PolicyValue>; POLICY_VALUES]]>,
    /// Check answers' templates, per plan and operation.
    templates: Box<[[OnceLock<Template>; TEMPLATES]]>,
    /// Each limit's name as a JSON string (quoted, escaped), by `LimitId`.
    limit_names: Box<[Box<[u8]>]>,
    /// Each operation's name as a JSON string, by `OperationId`.
    operation_names: Box<[Box<[u8]>]>,
    /// The policy's key header, parsed (`None`: not a valid header name, so
    /// no request carries it).
    key_header: Option<http::HeaderName>,
}

/// `s` as a JSON string, escaped as `serde_json` escapes it.
fn json_string(s: &str) -> Box<[u8]> {
    serde_json::to_vec(s)
        .expect("a string always serialises")
        .into_boxed_slice()
}

/// `RateLimit-Policy` values kept per plan and operation.
pub const POLICY_VALUES: usize = 2;

impl PolicyCounters {
    pub(crate) fn new(policy: Arc<CompiledPolicy>) -> PolicyCounters {
        let pairs = policy.plans.len() * policy.operations.len();
        let n = pairs * OUTCOMES.len();
        let m = policy.limits.len() * RESULTS.len();
        PolicyCounters {
            decisions: (0..n).map(|_| OnceLock::new()).collect(),
            limits: (0..m).map(|_| OnceLock::new()).collect(),
            policy_values: (0..pairs).map(|_| Default::default()).collect(),
            templates: (0..pairs).map(|_| Default::default()).collect(),
            limit_names: policy.limits.iter().map(|l| json_string(&l.name)).collect(),
            operation_names: policy
                .operations
                .iter()
                .map(|o| json_string(&o.name))
                .collect(),
            key_header: http::HeaderName::from_bytes(policy.key_header.as_bytes()).ok(),
            policy,
        }
    }

    /// Limit `limit`'s name as a JSON string (quoted, escaped).
    pub fn limit_name(&self, limit: LimitId) -> &[u8] {
        &self.limit_names[usize::from(limit)]
    }

    /// The policy's key header as a parsed name (`None` when it is not a
    /// valid header name), so a request's headers are searched without
    /// parsing it each time.
    pub fn key_header(&self) -> Option<&http::HeaderName> {
        self.key_header.as_ref()
    }

    /// Operation `op`'s name as a JSON string (quoted, escaped).
    pub fn operation_name(&self, op: OperationId) -> &[u8] {
        &self.operation_names[usize::from(op)]
    }

    /// Where the `RateLimit-Policy` value of checks of (plan, operation) is
    /// kept (see [`PolicyValue`]).
    pub fn policy_value(&self, plan: PlanId, op: OperationId) -> &[OnceLock<PolicyValue>] {
        let (p, o) = (usize::from(plan), usize::from(op));
        &self.policy_values[p * self.policy.operations.len() + o]
    }

    /// Where the templates of check answers of (plan, operation) are kept
    /// (see [`Template`]).
    pub(crate) fn templates(&self, plan: PlanId, op: OperationId) -> &[OnceLock<Template>] {
        let (p, o) = (usize::from(plan), usize::from(op));
        &self.templates[p * self.policy.operations.len() + o]
    }

    /// The decisions counter of (plan, operation, outcome).
    pub fn decision(
        &self,
        metrics: &Metrics,
        plan: PlanId,
        op: OperationId,
        outcome: usize,
    ) -> &Counter {
        let (p, o) = (usize::from(plan), usize::from(op));
        let i = (p * self.policy.operations.len() + o) * OUTCOMES.len() + outcome;
        self.decisions[i].get_or_init(|| {
            metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    plan: self.policy.plans[p].name.clone(),
                    operation: self.policy.operations[o].name.clone(),
                    outcome: OUTCOMES[outcome].to_owned(),
                })
                .clone()
        })
    }

    /// The per-limit results counter of (limit, result).
    pub fn limit(&self, metrics: &Metrics, limit: LimitId, result: usize) -> &Counter {
        let l = usize::from(limit);
        self.limits[l * RESULTS.len() + result].get_or_init(|| {
            metrics
                .limits
                .get_or_create(&LimitLabels {
                    limit: self.policy.limits[l].name.clone(),
                    result: RESULTS[result].to_owned(),
                })
                .clone()
        })
    }
}

/// The handles of the policy in force, rebuilt after a reload.
#[derive(Default)]
pub struct CounterCache {
    current: ArcSwapOption<PolicyCounters>,
}

impl std::fmt::Debug for CounterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CounterCache")
    }
}

impl CounterCache {
    /// The handles for `policy`; `in_force` is the policy now in force (used to
    /// build a new table when `policy` is it). `None` when `policy` is an older
    /// one (a request that started before a reload): count the slow way then.
    pub fn for_policy(
        &self,
        policy: &CompiledPolicy,
        in_force: impl FnOnce() -> Arc<CompiledPolicy>,
    ) -> Option<Arc<PolicyCounters>> {
        if let Some(c) = self.current.load_full()
            && std::ptr::eq(Arc::as_ptr(&c.policy), policy)
        {
            return Some(c);
        }
        let now = in_force();
        if !std::ptr::eq(Arc::as_ptr(&now), policy) {
            return None;
        }
        let table = Arc::new(PolicyCounters::new(now));
        self.current.store(Some(Arc::clone(&table)));
        Some(table)
    }
}

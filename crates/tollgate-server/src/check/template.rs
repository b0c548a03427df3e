//! A check's answer written from pieces kept per plan and operation.
//!
//! Most of an answer is the same for every check of one plan and operation
//! with the same outcome: the field names, each limit's quota, mode and name,
//! the header names, the `RateLimit-Policy` value, the operation. A
//! [`Template`] keeps those pieces, JSON-escaped, for the results it was
//! built from (limits, modes, quotas, lease flags, windows); an answer to a
//! decision with the same results is then the pieces with the decision's
//! numbers between them. Only the common case is covered: the IETF header
//! profile sending `RateLimit-Policy` and `RateLimit` with remaining and
//! reset on successes and rejections, a decision admitted (without a lease)
//! or rejected by one limit. Every other answer is written by
//! [`super::write_answer`]'s general writer, whose bytes these are (tested
//! below against it).

use std::sync::OnceLock;

use tollgate_core::clock::ceil_secs;
use tollgate_core::policy::{
    Action, CompiledPolicy, HeaderField, HeaderKind, LimitId, Mode, OperationId, SendOn,
};
use tollgate_core::{Decision, LimitResult, Outcome};

use super::answer;

/// Templates kept per plan and operation (a limit rolled out to new
/// accounts only, or a shadowed one, makes a second variant).
pub const TEMPLATES: usize = 2;

/// What a template is for: each result's limit, mode, quota, lease flag and
/// window, in order.
type ResultsShape = Box<[(LimitId, Mode, u64, bool, u64)]>;

/// The fixed pieces of the answers to decisions with the same results.
pub struct Template {
    from: ResultsShape,
    /// `None`: these answers are not written from pieces (a header profile
    /// or a value length not covered); the general writer writes them.
    pieces: Option<Pieces>,
}

/// A piece of JSON, as it is written.
type Piece = Box<[u8]>;

/// The pieces, JSON as it is written.
struct Pieces {
    /// By result: `"RateLimit":"\"NAME\";r=` (the header a result
    /// described by the `RateLimit` value starts).
    rate_limit: Box<[Box<[u8]>]>,
    /// `","RateLimit-Policy":"…"},"limits":[` (admitted).
    policy_admitted: Box<[u8]>,
    /// `","RateLimit-Policy":"…","Retry-After":"` (rejected).
    policy_rejected: Box<[u8]>,
    /// By result: `,"exceeded":false,"limit":Q,"mode":"M","name":N,"remaining":`.
    within: Box<[Box<[u8]>]>,
    /// By result: the same with `"exceeded":true`.
    over: Box<[Box<[u8]>]>,
    /// `],"operation":OP,"reason":null,"retry_after_s":0,"status":200}`.
    tail_admitted: Box<[u8]>,
    /// By result, rejected by it: `],"operation":OP,"reason":"limit `N`
    /// exceeded","retry_after_s":` and `,"status":S}`.
    tail_rejected: Box<[(Piece, Piece)]>,
}

/// The answer to `d` (of operation `op`) from the templates kept in `slots`,
/// building one from `d` into a free slot when `may_keep`; `None` when no
/// template covers it (write it with the general writer).
pub fn answer(
    policy: &CompiledPolicy,
    op: OperationId,
    slots: &[OnceLock<Template>],
    may_keep: bool,
    d: &Decision,
) -> Option<bytes::Bytes> {
    if d.lease.is_some() {
        return None;
    }
    let rejected_by = match d.outcome {
        Outcome::Admitted => None,
        Outcome::Rejected { limit } => Some(limit),
        _ => return None,
    };
    for slot in slots {
        let t = match slot.get() {
            Some(t) => t,
            None if may_keep => slot.get_or_init(|| Template::new(policy, op, d)),
            None => return None,
        };
        if t.matches(d) {
            return t.pieces.as_ref()?.write(d, rejected_by);
        }
    }
    None
}

impl Template {
    /// The template for decisions with the results of `d`.
    fn new(policy: &CompiledPolicy, op: OperationId, d: &Decision) -> Template {
        Template {
            from: d
                .results()
                .iter()
                .map(|r| (r.limit, r.mode, r.quota, r.is_lease, r.window_secs))
                .collect(),
            pieces: Pieces::new(policy, op, d.results()),
        }
    }

    /// Whether `d`'s results are those this template is for.
    fn matches(&self, d: &Decision) -> bool {
        let results = d.results();
        results.len() == self.from.len()
            && results.iter().zip(self.from.iter()).all(
                |(r, &(limit, mode, quota, is_lease, window))| {
                    r.limit == limit
                        && r.mode == mode
                        && r.quota == quota
                        && r.is_lease == is_lease
                        && r.window_secs == window
                },
            )
    }
}

/// `s` JSON-escaped, without quotes.
fn escaped(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    answer::escape(&mut out, s.as_bytes());
    out
}

/// `s` as a JSON string.
fn json(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    answer::string(&mut out, s);
    out
}

impl Pieces {
    /// The pieces of answers to decisions with `results` (of operation
    /// `op`); `None` when the policy's header profile is not the one
    /// covered, or a header value could be longer than
    /// [`tollgate_core::headers::VALUE_MAX`] (cut by the general writer).
    fn new(policy: &CompiledPolicy, op: OperationId, results: &[LimitResult]) -> Option<Pieces> {
        use tollgate_core::headers::VALUE_MAX;
        let profile = &policy.headers;
        let fields = [
            HeaderField::Limit,
            HeaderField::Remaining,
            HeaderField::Reset,
        ];
        let on_reject = match profile.send_on {
            SendOn::All => &profile.fields,
            _ => &profile.on_reject,
        };
        if profile.kind != HeaderKind::Ietf
            || !fields
                .iter()
                .all(|f| profile.fields.contains(f) && on_reject.contains(f))
        {
            return None;
        }
        let name = |r: &LimitResult| policy.limits[usize::from(r.limit)].name.as_str();
        // The `RateLimit-Policy` value, as `headers::render_to` writes it.
        let mut value = String::new();
        for r in results.iter().filter(|r| r.mode == Mode::Enforce) {
            if !value.is_empty() {
                value.push_str(", ");
            }
            value.push('"');
            value.push_str(name(r));
            value.push_str("\";q=");
            value.push_str(itoa::Buffer::new().format(r.quota));
            if r.is_lease {
                value.push_str(";qu=\"concurrent-requests\"");
            } else {
                value.push_str(";w=");
                value.push_str(itoa::Buffer::new().format(r.window_secs));
            }
        }
        // The longest `RateLimit` value: the name, two 20-digit numbers.
        let longest_name = results.iter().map(|r| name(r).len()).max().unwrap_or(0);
        if value.len() > VALUE_MAX || longest_name + 2 + 3 + 20 + 3 + 20 > VALUE_MAX {
            return None;
        }
        let value = escaped(&value);
        let cat = |parts: &[&[u8]]| -> Box<[u8]> { parts.concat().into_boxed_slice() };
        let rate_limit: Box<[Box<[u8]>]> = results
            .iter()
            .map(|r| {
                let head = escaped(&format!("\"{}\";r=", name(r)));
                cat(&[b"\"RateLimit\":\"", &head])
            })
            .collect();
        let limit = |r: &LimitResult, exceeded: bool| {
            cat(&[
                if exceeded {
                    b",\"exceeded\":true,\"limit\":"
                } else {
                    b",\"exceeded\":false,\"limit\":"
                },
                itoa::Buffer::new().format(r.quota).as_bytes(),
                b",\"mode\":\"",
                r.mode.as_str().as_bytes(),
                b"\",\"name\":",
                &json(name(r)),
                b",\"remaining\":",
            ])
        };
        let within: Box<[Box<[u8]>]> = results.iter().map(|r| limit(r, false)).collect();
        let over: Box<[Box<[u8]>]> = results.iter().map(|r| limit(r, true)).collect();
        let operation = json(&policy.operations[usize::from(op)].name);
        let tail_rejected: Box<[(Piece, Piece)]> = results
            .iter()
            .map(|r| {
                let l = &policy.limits[usize::from(r.limit)];
                let status = match l.on_exceed {
                    Action::Reject { status, .. } => status,
                    Action::Forward { .. } => 429,
                };
                let reason = json(&format!("limit `{}` exceeded", l.name));
                (
                    cat(&[
                        b"],\"operation\":",
                        &operation,
                        b",\"reason\":",
                        &reason,
                        b",\"retry_after_s\":",
                    ]),
                    cat(&[
                        b",\"status\":",
                        itoa::Buffer::new().format(status).as_bytes(),
                        b"}",
                    ]),
                )
            })
            .collect();
        Some(Pieces {
            policy_admitted: cat(&[b"\",\"RateLimit-Policy\":\"", &value, b"\"},\"limits\":["]),
            policy_rejected: cat(&[
                b"\",\"RateLimit-Policy\":\"",
                &value,
                b"\",\"Retry-After\":\"",
            ]),
            tail_admitted: cat(&[
                b"],\"operation\":",
                &operation,
                b",\"reason\":null,\"retry_after_s\":0,\"status\":200}",
            ]),
            rate_limit,
            within,
            over,
            tail_rejected,
        })
    }

    /// The answer to `d`, whose results are those the pieces were made for,
    /// admitted or rejected by `rejected_by`; `None` when no result is
    /// described by the `RateLimit` header (then there is none).
    fn write(&self, d: &Decision, rejected_by: Option<LimitId>) -> Option<bytes::Bytes> {
        let results = d.results();
        let described = d.described()?;
        let i = results.iter().position(|r| std::ptr::eq(r, described))?;
        // On a rejection the described result is the rejecting one: its
        // wait is `Retry-After`, the `RateLimit` reset and `retry_after_s`.
        let (head, reset, retry) = match rejected_by {
            None => (HEAD_ADMITTED, ceil_secs(described.eval.reset), None),
            Some(_) => {
                let retry = ceil_secs(described.eval.retry_after).max(1);
                (HEAD_REJECTED, retry, Some(retry))
            }
        };
        // Written in one pass into the thread's kept buffer, then copied
        // out at its length: one allocation of the exact size, which the
        // `Bytes` takes as it is (no counting of digits first).
        Some(ANSWER.with_borrow_mut(|out| {
            out.clear();
            out.extend_from_slice(head);
            out.extend_from_slice(&self.rate_limit[i]);
            answer::number(out, described.eval.remaining);
            out.extend_from_slice(T);
            answer::number(out, reset);
            match retry {
                None => out.extend_from_slice(&self.policy_admitted),
                Some(retry) => {
                    out.extend_from_slice(&self.policy_rejected);
                    answer::number(out, retry);
                    out.extend_from_slice(HEADERS_END);
                }
            }
            for (j, r) in results.iter().enumerate() {
                out.extend_from_slice(if j == 0 { COST } else { NEXT_COST });
                answer::number(out, r.cost);
                out.extend_from_slice(if r.exceeded() {
                    &self.over[j]
                } else {
                    &self.within[j]
                });
                answer::number(out, r.eval.remaining);
                out.extend_from_slice(RESET);
                answer::number(out, ceil_secs(r.eval.reset));
                out.push(b'}');
            }
            match retry {
                None => out.extend_from_slice(&self.tail_admitted),
                Some(retry) => {
                    let (before, after) = &self.tail_rejected[i];
                    out.extend_from_slice(before);
                    answer::number(out, retry);
                    out.extend_from_slice(after);
                }
            }
            let answer = bytes::Bytes::copy_from_slice(out);
            if out.capacity() > KEPT {
                *out = Vec::new();
            }
            answer
        }))
    }
}

thread_local! {
    /// The buffer a thread writes its answers from templates in, kept
    /// between checks (no allocation but the answer's own).
    static ANSWER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer longer than this is not kept (a rare long answer).
const KEPT: usize = 16 * 1024;

const HEAD_ADMITTED: &[u8] = b"{\"allowed\":true,\"headers\":{";
const HEAD_REJECTED: &[u8] = b"{\"allowed\":false,\"headers\":{";
const T: &[u8] = b";t=";
const HEADERS_END: &[u8] = b"\"},\"limits\":[";
const COST: &[u8] = b"{\"cost\":";
const NEXT_COST: &[u8] = b",{\"cost\":";
const RESET: &[u8] = b",\"reset_s\":";

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;
    use tollgate_core::policy::{self, PlanId};
    use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Request};

    use super::*;
    use crate::metric_cache::PolicyCounters;

    /// Limits of every kind, names that need escapes (in JSON and again in
    /// a header value), soft and shadowed limits, a forward and a 503, a
    /// concurrency limit, a plan's override, an escaped operation name.
    const LIMITS: &str = r#"
        [operations."up\"load"]
        method = "POST"
        path = "/up"
        cost = 2
        [limits.burst]
        algorithm = "token_bucket"
        capacity = 5
        refill = 1
        refill_every = "2s"
        [limits."da\"i\\ly"]
        algorithm = "sliding_window"
        limit = 9
        window = "3s"
        [limits."tab\tbé✓"]
        algorithm = "calendar_window"
        limit = 40
        window = "day"
        [limits.lease]
        algorithm = "concurrency"
        limit = 3
        lease_ttl = "30s"
        operations = ["up\"load"]
        [limits.soft]
        algorithm = "sliding_window"
        limit = 4
        window = "1m"
        mode = "soft"
        [limits.late]
        algorithm = "sliding_window"
        limit = 11
        window = "10s"
        rollout_after = "2020-01-01T00:00:00Z"
        [limits.fwd]
        algorithm = "sliding_window"
        limit = 13
        window = "7s"
        on_exceed = { action = "forward", header = "X-Over" }
        [limits.busy]
        algorithm = "sliding_window"
        limit = 15
        window = "5s"
        on_exceed = { action = "reject", status = 503 }
        [plans.basic]
        [plans.pro]
        overrides.burst = { capacity = 50 }
    "#;

    /// The policies the writers are compared on: the built-in default, and
    /// [`LIMITS`] under each header profile (only the first two are the
    /// templates' profile).
    fn policies() -> Vec<Arc<CompiledPolicy>> {
        let head = "[policy]\ndefault_plan = \"basic\"\n";
        let mut sources = vec![crate::config::DEFAULT_POLICY.to_owned()];
        for headers in [
            "",
            "[headers]\nprofile = \"ietf\"\nsend_on = \"success\"\non_reject = [\"limit\", \"remaining\", \"reset\", \"cost\"]\n",
            "[headers]\nprofile = \"ietf\"\nsend_on = \"success\"\non_reject = [\"reset\"]\n",
            "[headers]\nprofile = \"ietf\"\nfields = [\"limit\", \"remaining\"]\n",
            "[headers]\nprofile = \"classic\"\n",
            "[headers]\nprofile = \"none\"\n",
            "[headers]\nprofile = \"vendor\"\n[headers.names]\nlimit = \"X-L\"\nremaining = \"X-R\"\n",
        ] {
            sources.push(format!("{head}{headers}{LIMITS}"));
        }
        sources
            .iter()
            .map(|src| match policy::parse(src, "t.toml") {
                Ok(p) => Arc::new(p),
                Err(e) => panic!("{e}\n{src}"),
            })
            .collect()
    }

    /// One check: plan, account, operation, cost (`None`: the
    /// operation's), then the clock moved on, and the lease released or not.
    type Step = (u8, u8, bool, Option<u64>, u64, bool);

    /// Runs `steps` on `p`, comparing each answer `write_answer` gives with
    /// its templates (kept in a fresh table) with the general writer's; the
    /// number of answers (admitted, rejected) written from templates.
    fn compare(p: &Arc<CompiledPolicy>, steps: &[Step]) -> (usize, usize) {
        let e = Engine::with_clock(
            MemoryStore::default(),
            ManualClock::new(Nanos::from_secs(86_400 * 30_000 + 3_600)),
        );
        let table = PolicyCounters::new(Arc::clone(p));
        let plans: Vec<PlanId> = p
            .plans
            .iter()
            .map(|plan| p.plan(&plan.name).expect("plan"))
            .collect();
        let ops: Vec<OperationId> = p
            .operations
            .iter()
            .map(|o| p.operation(&o.name).expect("operation"))
            .collect();
        let mut covered = (0, 0);
        for &(plan, account, other_op, cost, advance_ms, release) in steps {
            let plan = plans[usize::from(plan) % plans.len()];
            let op = if other_op {
                ops[ops.len() - 1]
            } else {
                p.default_operation()
            };
            // Accounts created before the rollout run `late` in shadow.
            let accounts = ["a", "b", "old"];
            let account = accounts[usize::from(account) % accounts.len()];
            let created = if account == "old" { 0 } else { 86_400 * 20_000 };
            let req = Request {
                account,
                account_created_at: Some(Nanos::from_secs(created)),
                cost,
                ..Request::new(plan, op)
            };
            let d = e.decide_now(p, &req);
            let general = super::super::write_answer(p, op, &d, None);
            let may_keep = account != "b";
            let kept = super::super::write_answer(p, op, &d, Some((&table, plan, may_keep)));
            assert_eq!(
                String::from_utf8_lossy(&kept),
                String::from_utf8_lossy(&general),
                "{:?}",
                d.outcome
            );
            if answer(p, op, table.templates(plan, op), false, &d).is_some() {
                match d.outcome {
                    Outcome::Admitted => covered.0 += 1,
                    _ => covered.1 += 1,
                }
            }
            if release {
                e.release_now(&d);
            }
            e.clock().advance(Duration::from_millis(advance_ms));
        }
        covered
    }

    /// A fixed run on every policy: the answers are the general writer's,
    /// and the templates do write admitted and rejected answers (on the
    /// first two policies only).
    #[test]
    fn answers_from_templates_are_the_general_writers() {
        let mut steps = Vec::new();
        for i in 0..400u64 {
            let cost = match i % 11 {
                0 => None,
                7 => Some(1 << 20),
                n => Some(n % 4),
            };
            steps.push((
                (i % 3) as u8,
                (i % 5) as u8,
                i % 7 == 3,
                cost,
                (i * 37) % 300,
                i % 3 != 0,
            ));
        }
        for (i, p) in policies().iter().enumerate() {
            let (admitted, rejected) = compare(p, &steps);
            if i < 3 {
                assert!(
                    admitted > 20 && rejected > 20,
                    "policy {i}: {admitted} / {rejected}"
                );
            } else {
                assert_eq!((admitted, rejected), (0, 0), "policy {i}");
            }
        }
    }

    proptest! {
        #[test]
        fn any_answer_from_a_template_is_the_general_writers(
            policy in 0usize..8,
            steps in proptest::collection::vec(
                (any::<u8>(), any::<u8>(), any::<bool>(),
                 proptest::option::of(prop_oneof![0u64..6, Just(1u64 << 40), any::<u32>().prop_map(u64::from)]),
                 prop_oneof![0u64..50, 0u64..5_000, Just(86_400_000u64)], any::<bool>()),
                1..60,
            ),
        ) {
            let p = &policies()[policy];
            compare(p, &steps);
        }
    }
}

//! The answer for one request: a value, not an error.

use std::time::Duration;

use smallvec::SmallVec;

use crate::algorithm::Evaluation;
use crate::clock::Nanos;
use crate::error::StoreError;
use crate::policy::{LimitId, MAX_LIMITS_PER_REQUEST, Mode};
use crate::store::CounterKey;

/// What happens to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every enforced limit admits it: forward (or answer) it.
    Admitted,
    /// An enforced limit with a forward action is exceeded: forward it with
    /// that limit's marker header; the other limits took their cost.
    Forwarded {
        /// The exceeded limit.
        limit: LimitId,
    },
    /// An enforced limit refuses it; nothing was consumed.
    Rejected {
        /// The limit whose wait is longest (the one headers describe).
        limit: LimitId,
    },
    /// Its cost exceeds an enforced limit's capacity: it can never pass.
    CostAboveCapacity {
        /// The limit.
        limit: LimitId,
    },
    /// The store could not decide and a limit that applies fails closed.
    StoreUnavailable,
}

/// The result of one limit for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitResult {
    /// The limit.
    pub limit: LimitId,
    /// Mode in effect for this request (a rollout may turn enforce into shadow).
    pub mode: Mode,
    /// The limit's quota after overrides (capacity or N).
    pub quota: u64,
    /// Advertised window in whole seconds.
    pub window_secs: u64,
    /// Cost this request takes from the limit.
    pub cost: u64,
    /// The algorithm's evaluation.
    pub eval: Evaluation,
    /// Whether a refusal by this limit refuses the request.
    pub blocking: bool,
    /// Whether this is a concurrency limit holding a lease when admitted
    /// (its counter key is in the decision: [`Decision::lease_keys`]).
    pub is_lease: bool,
}

impl LimitResult {
    /// Whether the request is over this limit (would be refused by it alone).
    pub fn exceeded(&self) -> bool {
        !self.eval.admit
    }
}

/// The decision for one request: outcome and per-limit results. Fixed size,
/// built without allocating: the results sit in an inline array of
/// [`MAX_LIMITS_PER_REQUEST`] entries of which only the used ones are written
/// (a new decision does not zero 1.5 KB).
#[derive(Debug, Clone)]
pub struct Decision {
    /// What happens to the request.
    pub outcome: Outcome,
    /// When it was decided.
    pub now: Nanos,
    /// Lease id held on concurrency limits if admitted.
    pub lease: Option<u64>,
    /// Why the store could not decide, when it could not: the outcome then
    /// follows each limit's `on_store_error`.
    pub store_error: Option<StoreError>,
    /// Whether the limits were decided on this replica's local fallback
    /// counters (`on_store_error = "local"`) because the store failed.
    pub decided_locally: bool,
    /// Never spills to the heap: [`Decision::push`] stops at the inline capacity.
    /// 64 bytes each: the counter keys (16-byte aligned, which made a
    /// result 96 bytes) are kept apart, and only for concurrency limits.
    results: SmallVec<[LimitResult; MAX_LIMITS_PER_REQUEST]>,
    /// The counter key of each result with `is_lease`, in the same order.
    lease_keys: SmallVec<[CounterKey; MAX_LIMITS_PER_REQUEST]>,
}

impl Decision {
    /// Inlined into [`crate::Engine::decide_now`]'s caller, in another
    /// crate (the decision is built in its frame): a call otherwise.
    #[inline]
    pub(crate) fn new(now: Nanos) -> Decision {
        Decision {
            outcome: Outcome::Admitted,
            now,
            lease: None,
            store_error: None,
            decided_locally: false,
            results: SmallVec::new(),
            lease_keys: SmallVec::new(),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, r: LimitResult) {
        if self.results.len() < MAX_LIMITS_PER_REQUEST {
            self.results.push(r);
        }
    }

    /// [`Decision::push`] of a result whose counter is `key`: a
    /// concurrency limit's key is kept to release its lease.
    #[inline]
    pub(crate) fn push_keyed(&mut self, r: LimitResult, key: CounterKey) {
        if self.results.len() < MAX_LIMITS_PER_REQUEST {
            if r.is_lease {
                self.lease_keys.push(key);
            }
            self.results.push(r);
        }
    }

    /// The results from the `base`-th on.
    #[inline]
    pub(crate) fn results_from(&self, base: usize) -> &[LimitResult] {
        &self.results[base..]
    }

    /// Drops the results past the first `len` (a store that could not
    /// decide takes back what it pushed).
    #[inline]
    pub(crate) fn truncate(&mut self, len: usize) {
        self.results.truncate(len);
        let leases = self.results.iter().filter(|r| r.is_lease).count();
        self.lease_keys.truncate(leases);
    }

    #[inline]
    pub(crate) fn results_mut(&mut self) -> &mut [LimitResult] {
        &mut self.results
    }

    /// Sets the outcome of a decision the store answered (`admitted`), from
    /// its results (each holding its evaluation); `lease` is held when
    /// admitted and a concurrency limit took it.
    #[inline]
    pub(crate) fn settle(&mut self, admitted: bool, lease: u64) {
        // One pass: note what the outcome needs.
        let mut forwarded = None; // first enforced non-blocking limit exceeded
        let mut never = None; // first blocking limit the cost can never pass
        let mut longest: Option<(Nanos, LimitId)> = None; // last longest wait
        let mut leased = false;
        for r in self.results() {
            let e = &r.eval;
            if e.admit {
                leased |= r.is_lease;
            } else if r.blocking {
                if e.never && never.is_none() {
                    never = Some(r.limit);
                }
                if longest.is_none_or(|(t, _)| e.retry_after >= t) {
                    longest = Some((e.retry_after, r.limit));
                }
            } else if r.mode == Mode::Enforce && forwarded.is_none() {
                forwarded = Some(r.limit);
            }
        }
        if admitted {
            self.outcome = match forwarded {
                Some(limit) => Outcome::Forwarded { limit },
                None => Outcome::Admitted,
            };
            if leased {
                self.lease = Some(lease);
            }
        } else {
            self.outcome = match (never, longest) {
                (Some(limit), _) => Outcome::CostAboveCapacity { limit },
                (None, Some((_, limit))) => Outcome::Rejected { limit },
                (None, None) => Outcome::Admitted,
            };
        }
    }

    /// Results of every limit that applied, in policy order.
    #[inline]
    pub fn results(&self) -> &[LimitResult] {
        &self.results
    }

    /// Whether the request goes on (admitted, or forwarded with a marker).
    pub fn is_allowed(&self) -> bool {
        matches!(self.outcome, Outcome::Admitted | Outcome::Forwarded { .. })
    }

    /// The result of `limit`, if it applied.
    pub fn result(&self, limit: LimitId) -> Option<&LimitResult> {
        self.results().iter().find(|r| r.limit == limit)
    }

    /// How long to wait before retrying a rejected request (zero otherwise).
    pub fn retry_after(&self) -> Duration {
        match self.outcome {
            Outcome::Rejected { limit } => self
                .result(limit)
                .map_or(Duration::ZERO, |r| r.eval.retry_after.into()),
            _ => Duration::ZERO,
        }
    }

    /// Soft and shadow limits this request crossed (evaluated as over the
    /// limit; they did not refuse it).
    pub fn crossings(&self) -> impl Iterator<Item = &LimitResult> {
        self.results()
            .iter()
            .filter(|r| r.mode != Mode::Enforce && r.exceeded())
    }

    /// The limit headers describe: the rejecting one on a rejection, otherwise
    /// the enforced limit closest to exhaustion (smallest remaining share).
    pub fn described(&self) -> Option<&LimitResult> {
        match self.outcome {
            Outcome::Rejected { limit }
            | Outcome::Forwarded { limit }
            | Outcome::CostAboveCapacity { limit } => self.result(limit),
            _ => {
                let enforced = self
                    .results()
                    .iter()
                    .filter(|r| r.mode == Mode::Enforce && r.quota > 0);
                enforced.min_by(|a, b| {
                    // compare remaining/quota without floats: a.r·b.q vs b.r·a.q
                    let l = u128::from(a.eval.remaining) * u128::from(b.quota);
                    let r = u128::from(b.eval.remaining) * u128::from(a.quota);
                    l.cmp(&r)
                })
            }
        }
    }

    /// Counter keys of the concurrency limits holding this request's lease.
    pub fn lease_keys(&self) -> impl Iterator<Item = CounterKey> + '_ {
        let held = self.lease.is_some();
        self.results()
            .iter()
            .filter(|r| r.is_lease)
            .zip(&self.lease_keys)
            .filter(move |(r, _)| held && r.eval.admit)
            .map(|(_, &key)| key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result is one cache line (96 bytes when it held its counter key):
    /// what the one-scope path writes per limit.
    #[test]
    fn a_limit_result_is_64_bytes() {
        assert_eq!(size_of::<LimitResult>(), 64);
    }
}

//! The validated policy: what the engine and the server run.
//!
//! Everything is resolved to indexes at load time: each (plan, operation)
//! pair holds the exact list of limits that apply with their numbers and
//! costs, so a request looks up one slice and allocates nothing. A
//! `CompiledPolicy` is immutable; reload builds a new one and swaps the `Arc`.

use std::num::NonZeroU64;
use std::time::Duration;

use super::router::Router;
use crate::algorithm::Evaluation;
use crate::algorithm::calendar_window::Calendar;
use crate::algorithm::gcra::GcraRate;
use crate::algorithm::sliding_window::SlidingWindow;
use crate::clock::Nanos;
use crate::decision::LimitResult;
use crate::store::Params;

/// Index of a limit in [`CompiledPolicy::limits`].
pub type LimitId = u16;
/// Index of an operation in [`CompiledPolicy::operations`].
pub type OperationId = u16;
/// Index of a plan in [`CompiledPolicy::plans`].
pub type PlanId = u16;
/// Index of an attribute in [`CompiledPolicy::attributes`].
pub type AttributeId = u16;

/// Most limits that can apply to one request; validation refuses more.
pub const MAX_LIMITS_PER_REQUEST: usize = 16;

/// A validated policy.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// Policy name.
    pub name: String,
    /// Header carrying the API key, lower-case.
    pub key_header: String,
    /// What happens to requests matching no operation.
    pub unmatched: Unmatched,
    /// All limits, by [`LimitId`].
    pub limits: Vec<Limit>,
    /// All operations, by [`OperationId`]; the last one is the default
    /// operation used for unmatched requests.
    pub operations: Vec<Operation>,
    /// All plans, by [`PlanId`].
    pub plans: Vec<Plan>,
    /// Plan of accounts created without one.
    pub default_plan: PlanId,
    /// Request attributes usable in scopes, by [`AttributeId`].
    pub attributes: Vec<Attribute>,
    /// Header profile.
    pub headers: HeaderProfile,
    /// Credit exhaustion answer.
    pub credits: CreditRules,
    /// Upstream retry rules.
    pub upstream: UpstreamRetry,
    pub(crate) router: Router,
    /// The one-scope program of each plan and operation (index
    /// `plan × operations + operation`), `None` where the general path
    /// decides: see [`OneScope`].
    pub(crate) one_scope: Vec<Option<OneScope>>,
}

impl CompiledPolicy {
    /// The operation of a request, or `None` when no operation matches and
    /// the policy refuses unmatched routes. `path` excludes the query string.
    pub fn operation_for(&self, method: &str, path: &str) -> Option<OperationId> {
        match self.router.find(method, path) {
            Some(id) => Some(id),
            None if self.unmatched == Unmatched::Forward => Some(self.default_operation()),
            None => None,
        }
    }

    /// The operation used for requests that match no declared operation.
    pub fn default_operation(&self) -> OperationId {
        (self.operations.len() - 1) as OperationId
    }

    /// A plan by name.
    pub fn plan(&self, name: &str) -> Option<PlanId> {
        self.plans
            .iter()
            .position(|p| p.name == name)
            .map(|i| i as PlanId)
    }

    /// A limit by name.
    pub fn limit(&self, name: &str) -> Option<LimitId> {
        self.limits
            .iter()
            .position(|l| l.name == name)
            .map(|i| i as LimitId)
    }

    /// An operation by name.
    pub fn operation(&self, name: &str) -> Option<OperationId> {
        self.operations
            .iter()
            .position(|o| o.name == name)
            .map(|i| i as OperationId)
    }

    /// An attribute by name.
    pub fn attribute(&self, name: &str) -> Option<AttributeId> {
        self.attributes
            .iter()
            .position(|a| a.name == name)
            .map(|i| i as AttributeId)
    }

    /// The limits that apply to `operation` under `plan`, with their costs.
    pub fn applicable(&self, plan: PlanId, operation: OperationId) -> &[PlanLimit] {
        &self.plans[usize::from(plan)].by_operation[usize::from(operation)]
    }

    /// The one-scope program of `operation` under `plan`, if its limits
    /// take the in-memory store's one-scope path (see [`one_scope`]);
    /// `None` otherwise, and for ids out of range (then
    /// [`CompiledPolicy::applicable`] says what is wrong).
    #[inline]
    pub(crate) fn one_scope(&self, plan: PlanId, operation: OperationId) -> Option<&OneScope> {
        let ops = self.operations.len();
        let op = usize::from(operation);
        if op >= ops {
            return None;
        }
        self.one_scope.get(usize::from(plan) * ops + op)?.as_ref()
    }

    /// Whether the limits of `operation` under `plan` take the one-scope
    /// path of the in-memory store (see [`one_scope`]).
    #[cfg(test)]
    pub(crate) fn is_one_scope(&self, plan: PlanId, operation: OperationId) -> bool {
        self.one_scope(plan, operation).is_some()
    }
}

/// What the in-memory store's one-scope path runs for one plan and
/// operation, laid out at load: the scope to hash, and per limit (a
/// [`Step`]) its counter, its algorithm with its numbers, and its result
/// but for the evaluation. A decision runs the steps in order: no
/// per-limit look-up of the limit's mode, quota, window or cost, no
/// matching on the policy's algorithm beyond the step's own.
#[derive(Debug, Clone)]
pub(crate) struct OneScope {
    /// The scope's value when it is one (the usual: an account), read
    /// from the request and hashed directly; `None` for a scope of several
    /// values, hashed as [`Limit::scope`] of the first limit.
    pub(crate) part: Option<ScopePart>,
    /// The first limit (whose scope every limit shares).
    pub(crate) first: LimitId,
    /// Each limit's step, in policy order.
    pub(crate) steps: Box<[Step]>,
}

impl OneScope {
    /// The program of `applicable` (one plan and operation), if its limits
    /// take the one-scope path ([`one_scope`]).
    pub(crate) fn new(limits: &[Limit], applicable: &[PlanLimit]) -> Option<OneScope> {
        if !one_scope(limits, applicable) {
            return None;
        }
        let first = applicable.first()?.limit;
        let part = match limits[usize::from(first)].scope[..] {
            [part] => Some(part),
            _ => None,
        };
        let steps = applicable
            .iter()
            .map(|pl| Step {
                name_hash: pl.prepared.name_hash,
                result: LimitResult {
                    limit: pl.limit,
                    // No rollout date on this path: the mode is the limit's.
                    mode: pl.prepared.mode,
                    quota: pl.prepared.quota,
                    window_secs: pl.window_secs,
                    cost: pl.cost,
                    eval: Evaluation::default(),
                    blocking: pl.prepared.blocking,
                    is_lease: false,
                },
                algorithm: match (&pl.prepared.params, &pl.algorithm) {
                    (&Params::Gcra(rate), _) => match pl.prepared.tau {
                        Some(tau) => StepAlgorithm::Gcra { rate, tau },
                        None => StepAlgorithm::WideGcra { rate },
                    },
                    (&Params::Sliding(window), _) => StepAlgorithm::Sliding { window },
                    (
                        &Params::Calendar { limit, .. },
                        Algorithm::CalendarWindow { calendar, .. },
                    ) => match pl.prepared.utc_len {
                        0 => StepAlgorithm::ZonedCalendar {
                            limit,
                            calendar: Box::new(calendar.clone()),
                        },
                        len => StepAlgorithm::Calendar { limit, len },
                    },
                    _ => unreachable!("no lease here; calendar params are a calendar window's"),
                },
            })
            .collect();
        Some(OneScope { part, first, steps })
    }
}

/// One limit of a [`OneScope`] program: its counter (the low half of the
/// counter key is the scope hash's low half xor `name_hash`) and its
/// algorithm with the numbers a request without account override uses.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// [`Limit::name_hash`].
    pub(crate) name_hash: u64,
    /// The limit's result, its evaluation blank, with the operation's cost.
    pub(crate) result: LimitResult,
    /// What to evaluate.
    pub(crate) algorithm: StepAlgorithm,
}

impl StepAlgorithm {
    /// The store numbers at `now` ([`PlanLimit::params_at`]).
    pub(crate) fn params_at(&self, now: Nanos) -> Params {
        match self {
            StepAlgorithm::Gcra { rate, .. } | StepAlgorithm::WideGcra { rate } => {
                Params::Gcra(*rate)
            }
            StepAlgorithm::Sliding { window } => Params::Sliding(*window),
            &StepAlgorithm::Calendar { limit, len } => Params::Calendar {
                limit,
                end: Nanos((now.0 - now.0 % len).saturating_add(len)),
            },
            StepAlgorithm::ZonedCalendar { limit, calendar } => Params::Calendar {
                limit: *limit,
                end: calendar.window(now).1,
            },
        }
    }
}

/// A [`Step`]'s algorithm and numbers.
#[derive(Debug, Clone)]
pub(crate) enum StepAlgorithm {
    /// A token bucket whose burst tolerance `B·I` fits 64 bits (`tau`).
    Gcra { rate: GcraRate, tau: u64 },
    /// A token bucket whose math needs 128 bits.
    WideGcra { rate: GcraRate },
    /// A sliding window.
    Sliding { window: SlidingWindow },
    /// A calendar window in UTC: its windows are `len` ns, from the epoch.
    Calendar { limit: u64, len: u64 },
    /// A calendar window in another time zone.
    ZonedCalendar { limit: u64, calendar: Box<Calendar> },
}

/// Whether the limits `applicable` (one plan and operation) can be decided
/// by the in-memory store's one-scope path: at least one limit, every one
/// keyed by the same scope (so one hash of the scope values, one map entry,
/// one lock), none of them a concurrency limit (leases) or under a rollout
/// date (its mode depends on the request), and no two of them with the same
/// name hash (so their counters are distinct cells of the entry). Anything
/// else takes the general path, which handles every case.
pub(crate) fn one_scope(limits: &[Limit], applicable: &[PlanLimit]) -> bool {
    let Some(first) = applicable.first() else {
        return false;
    };
    let scope = &limits[usize::from(first.limit)].scope;
    applicable.iter().enumerate().all(|(i, pl)| {
        !pl.prepared.is_lease
            && pl.prepared.rollout_after.is_none()
            && limits[usize::from(pl.limit)].scope == *scope
            && applicable[..i]
                .iter()
                .all(|other| other.prepared.name_hash != pl.prepared.name_hash)
    })
}

/// What happens to requests that match no operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Forwarded under the default operation (the plan's limits that count every operation).
    Forward,
    /// Refused with 404.
    Reject,
}

/// A named limit.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Name, unique in the policy; also the counter key prefix, so counters
    /// survive a reload that keeps the name.
    pub name: String,
    /// Hash of `name`, mixed into counter keys (computed once, at load).
    /// Unseeded: names come from the policy, not from callers; the scope
    /// values callers control are hashed with the engine's seed.
    pub name_hash: u64,
    /// Algorithm and its numbers (before plan or account overrides).
    pub algorithm: Algorithm,
    /// What the counter is keyed by, in order.
    pub scope: Vec<ScopePart>,
    /// Enforce, soft or shadow.
    pub mode: Mode,
    /// Accounts created before this instant get the limit in shadow mode.
    pub rollout_after: Option<Nanos>,
    /// What happens to a request over the limit.
    pub on_exceed: Action,
    /// Fail-open or fail-closed when the store is unavailable.
    pub on_store_error: FailMode,
}

/// A limit's algorithm with its numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Algorithm {
    /// Weighted token bucket.
    TokenBucket {
        /// Numbers the algorithm runs.
        rate: GcraRate,
        /// Tokens added per `per` (kept so overrides can rebuild `rate`).
        refill: NonZeroU64,
        /// Refill period.
        per: Duration,
    },
    /// N in any window of length T.
    SlidingWindow {
        /// Numbers.
        window: SlidingWindow,
        /// T.
        length: Duration,
    },
    /// N per calendar unit.
    CalendarWindow {
        /// N.
        limit: u64,
        /// Unit and time zone.
        calendar: Calendar,
    },
    /// N in flight.
    Concurrency {
        /// N.
        limit: u64,
        /// Lease time to live.
        ttl: Duration,
    },
}

impl Algorithm {
    /// The capacity that a single request's cost must not exceed.
    pub fn capacity(&self) -> u64 {
        match self {
            Algorithm::TokenBucket { rate, .. } => rate.capacity,
            Algorithm::SlidingWindow { window, .. } => window.limit,
            Algorithm::CalendarWindow { limit, .. } | Algorithm::Concurrency { limit, .. } => {
                *limit
            }
        }
    }

    /// The window advertised in headers (`w`), in whole seconds: the bucket's
    /// time to refill completely, the window length, the calendar unit.
    pub fn window_secs(&self) -> u64 {
        match self {
            Algorithm::TokenBucket { rate, .. } => crate::clock::ceil_secs(Duration::from_nanos(
                rate.capacity.saturating_mul(rate.interval),
            )),
            Algorithm::SlidingWindow { length, .. } => crate::clock::ceil_secs(*length),
            Algorithm::CalendarWindow { calendar, .. } => match calendar.unit {
                crate::algorithm::calendar_window::CalendarUnit::Minute => 60,
                crate::algorithm::calendar_window::CalendarUnit::Hour => 3_600,
                crate::algorithm::calendar_window::CalendarUnit::Day => 86_400,
            },
            Algorithm::Concurrency { .. } => 0,
        }
    }

    /// The algorithm with numbers replaced by an override.
    pub fn with_override(&self, o: &LimitOverride) -> Algorithm {
        let mut a = self.clone();
        match &mut a {
            Algorithm::TokenBucket { rate, refill, per } => {
                let capacity = o
                    .capacity
                    .or(NonZeroU64::new(rate.capacity))
                    .expect("validated capacity is non-zero");
                *refill = o.refill.unwrap_or(*refill);
                *rate = GcraRate::new(capacity, *refill, *per);
            }
            Algorithm::SlidingWindow { window, .. } => {
                if let Some(l) = o.limit {
                    *window = window.with_limit(u32::try_from(l.get()).unwrap_or(u32::MAX));
                }
            }
            Algorithm::CalendarWindow { limit, .. } | Algorithm::Concurrency { limit, .. } => {
                if let Some(l) = o.limit {
                    *limit = l.get();
                }
            }
        }
        a
    }
}

/// New numbers for one limit, from a plan or an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitOverride {
    /// New N.
    pub limit: Option<NonZeroU64>,
    /// New bucket capacity.
    pub capacity: Option<NonZeroU64>,
    /// New bucket refill per the limit's refill period.
    pub refill: Option<NonZeroU64>,
}

/// One part of a limit's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopePart {
    /// The caller's org.
    Org,
    /// The caller's account.
    Account,
    /// The caller's app.
    App,
    /// The caller's API key (its id, never the secret).
    Key,
    /// The client IP address.
    Ip,
    /// A request attribute.
    Attribute(AttributeId),
}

/// How a limit acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuses requests over the limit.
    Enforce,
    /// Never refuses; a crossing is reported (event + metric).
    Soft,
    /// Never refuses; counted as would-reject, to try a limit before enforcing it.
    Shadow,
}

impl Mode {
    /// Lower-case name as in the policy file and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Soft => "soft",
            Mode::Shadow => "shadow",
        }
    }
}

/// What happens to a request over an enforced limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Refuse with `status` (429 by default) and an optional custom body.
    Reject {
        /// HTTP status.
        status: u16,
        /// Custom body and its content type; `None` for tollgate's JSON error.
        body: Option<(String, String)>,
    },
    /// Forward to the upstream with a marker header naming the limit.
    Forward {
        /// Marker header name.
        header: String,
    },
}

/// Behaviour when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Admit (fail-open).
    Allow,
    /// Refuse with 503 (fail-closed).
    Deny,
    /// Decide on this replica alone, on an in-memory counter holding `share`
    /// of the limit's numbers (`on_store_error = "local"`): with R replicas
    /// and a share of 1/R, all of them together admit at most the limit. Only
    /// where the store offers a local fallback ([`crate::Store::local_fallback`]);
    /// elsewhere it fails closed like [`FailMode::Deny`].
    Local {
        /// The fraction of the limit one replica may admit on its own.
        share: LocalShare,
    },
}

/// A fraction in (0, 1], in parts per million: the share of a limit one
/// replica may admit on its own while the shared store is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalShare(u32);

impl LocalShare {
    /// Parts per million of a whole.
    const WHOLE: u64 = 1_000_000;

    /// The share `f` (rounded down to a millionth), if `0 < f ≤ 1`.
    pub fn from_fraction(f: f64) -> Option<LocalShare> {
        if !(f > 0.0 && f <= 1.0) {
            return None;
        }
        let ppm = (f * Self::WHOLE as f64).floor() as u32;
        (ppm > 0).then_some(LocalShare(ppm))
    }

    /// The share as a fraction.
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / Self::WHOLE as f64
    }

    /// `⌊n × share⌋`.
    pub fn of(self, n: u64) -> u64 {
        let scaled = u128::from(n) * u128::from(self.0) / u128::from(Self::WHOLE);
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }

    /// `⌈n / share⌉`: a refill interval stretched so the rate is `share` of it.
    pub fn stretch(self, n: u64) -> u64 {
        let stretched = (u128::from(n) * u128::from(Self::WHOLE)).div_ceil(u128::from(self.0));
        u64::try_from(stretched).unwrap_or(u64::MAX)
    }
}

/// A named class of request.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Name.
    pub name: String,
    /// Credit cost: the amount reserved before forwarding, and committed
    /// when the upstream answers 2xx.
    pub credits: u64,
    /// Upstream response header (lower case) whose value, a whole number, is
    /// the amount committed instead of `credits` (capped at `credits`; a
    /// missing or invalid value commits `credits`). See
    /// [`Operation::credits_used`].
    pub credits_from_header: Option<String>,
    /// Whether upstream failures may be retried.
    pub retry: bool,
    /// Answered by tollgate itself.
    pub respond: Option<Respond>,
    /// Where each attribute of [`CompiledPolicy::attributes`] comes from for
    /// this operation (`None`: not available).
    pub attribute_sources: Vec<Option<AttributeSource>>,
    /// Payload rules.
    pub payload: Option<PayloadRules>,
}

impl Operation {
    /// The credits to commit for a 2xx answer whose `credits_from_header`
    /// value is `reported`: that whole number when it parses, never above
    /// `reserved`; `reserved` when the operation reads no header, or the value
    /// is missing or not a whole number (the caller was told the price up
    /// front, so a broken upstream header never makes a request free).
    pub fn credits_used(&self, reserved: u64, reported: Option<&[u8]>) -> u64 {
        if self.credits_from_header.is_none() {
            return reserved;
        }
        reported
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .map_or(reserved, |v| {
                v.parse::<u64>().map_or(reserved, |n| n.min(reserved))
            })
    }
}

/// Endpoints tollgate answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Respond {
    /// The caller's credit balance.
    Balance,
    /// The caller's account, plan, balance and limits.
    Account,
}

/// A request attribute usable in scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// Name, as used in `scope`.
    pub name: String,
}

/// Where an attribute's value is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeSource {
    /// A request header (lower-case name).
    Header(String),
    /// A query parameter.
    Query(String),
    /// A top-level string field of a JSON body.
    Json(String),
    /// The file name of the first file part of a multipart body.
    MultipartFilename,
}

/// Payload rules of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadRules {
    /// Largest body in bytes (413 above).
    pub max_body: Option<u64>,
    /// Accepted image formats (415 otherwise); empty: any.
    pub formats: Vec<ImageFormat>,
    /// Largest side in pixels.
    pub max_pixels: Option<u32>,
    /// Images over `max_pixels` are forwarded (the upstream resizes) instead of 422.
    pub forward_oversize: bool,
    /// At most one file per request (400 otherwise).
    pub single_file: bool,
}

/// Image formats recognised from their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// WEBP.
    Webp,
    /// HEIC / HEIF.
    Heic,
}

/// A plan: which limits apply, with which numbers, and its credit rules.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Name.
    pub name: String,
    /// Credits granted once at account creation.
    pub grant: u64,
    /// Credits granted every `allowance_every`.
    pub allowance: Option<(u64, AllowancePeriod)>,
    /// Balance under which a credits-low event is sent.
    pub credits_low: Option<u64>,
    /// Limits applying to each operation (index = [`OperationId`]).
    pub by_operation: Vec<Vec<PlanLimit>>,
}

/// How often a plan's allowance is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowancePeriod {
    /// Every UTC day.
    Day,
    /// Every calendar month (UTC).
    Month,
}

/// One limit as it applies to one operation under one plan.
#[derive(Debug, Clone)]
pub struct PlanLimit {
    /// The limit.
    pub limit: LimitId,
    /// Numbers after the plan's overrides.
    pub algorithm: Algorithm,
    /// Token cost of the operation for this limit.
    pub cost: u64,
    /// Advertised window in whole seconds (`algorithm.window_secs()`, computed at load).
    pub window_secs: u64,
    /// What a request without an account override sends to the store for
    /// this limit, resolved at load.
    pub(crate) prepared: Prepared,
}

impl PlanLimit {
    /// `limit` (the policy's limit `id`) as it applies with `algorithm` (after the
    /// plan's overrides) and `cost`.
    pub(crate) fn new(id: LimitId, limit: &Limit, algorithm: Algorithm, cost: u64) -> PlanLimit {
        let (params, quota) = match &algorithm {
            Algorithm::TokenBucket { rate, .. } => (Params::Gcra(*rate), rate.capacity),
            Algorithm::SlidingWindow { window, .. } => (Params::Sliding(*window), window.limit),
            Algorithm::CalendarWindow { limit, .. } => (
                Params::Calendar {
                    limit: *limit,
                    end: Nanos(0),
                },
                *limit,
            ),
            Algorithm::Concurrency { limit, ttl } => (
                Params::Concurrency {
                    limit: *limit,
                    ttl: *ttl,
                },
                *limit,
            ),
        };
        let utc_len = match &algorithm {
            Algorithm::CalendarWindow { calendar, .. } => calendar.utc_length().unwrap_or(0),
            _ => 0,
        };
        PlanLimit {
            limit: id,
            window_secs: algorithm.window_secs(),
            prepared: Prepared {
                params,
                quota,
                mode: limit.mode,
                reject: matches!(limit.on_exceed, Action::Reject { .. }),
                blocking: limit.mode == Mode::Enforce
                    && matches!(limit.on_exceed, Action::Reject { .. }),
                is_lease: matches!(params, Params::Concurrency { .. }),
                name_hash: limit.name_hash,
                rollout_after: limit.rollout_after,
                utc_len,
                tau: match &algorithm {
                    Algorithm::TokenBucket { rate, .. } => rate.tau_u64(),
                    _ => None,
                },
            },
            algorithm,
            cost,
        }
    }

    /// The store numbers at `now` without an account override: the
    /// prepared ones, with a calendar window's end resolved.
    #[inline]
    pub(crate) fn params_at(&self, now: Nanos) -> Params {
        match self.prepared.params {
            Params::Calendar { limit, .. } => Params::Calendar {
                limit,
                end: self.calendar_end(now),
            },
            p => p,
        }
    }

    /// The end of the calendar window containing `now` (for a calendar
    /// limit; arithmetic for UTC windows).
    #[inline]
    pub(crate) fn calendar_end(&self, now: Nanos) -> Nanos {
        match self.prepared.utc_len {
            0 => match &self.algorithm {
                Algorithm::CalendarWindow { calendar, .. } => calendar.window(now).1,
                _ => unreachable!("calendar params come from a calendar window"),
            },
            len => Nanos((now.0 - now.0 % len).saturating_add(len)),
        }
    }
}

/// A [`PlanLimit`]'s per-request constants, resolved at load so that a
/// decision copies them instead of matching on the algorithm and the limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared {
    /// Store numbers (a calendar window's `end` is set per request).
    pub(crate) params: Params,
    /// The quota (capacity or N).
    pub(crate) quota: u64,
    /// The limit's mode (a rollout may turn enforce into shadow per request).
    pub(crate) mode: Mode,
    /// Whether the limit's action on exceed is to reject.
    pub(crate) reject: bool,
    /// Whether its refusal refuses the request: enforced and rejecting
    /// (without a rollout date, which may turn enforce into shadow).
    pub(crate) blocking: bool,
    /// Whether it is a concurrency limit (holds a lease when admitted).
    pub(crate) is_lease: bool,
    /// [`Limit::name_hash`].
    pub(crate) name_hash: u64,
    /// [`Limit::rollout_after`].
    pub(crate) rollout_after: Option<Nanos>,
    /// A UTC calendar window's length in ns (its end is arithmetic); 0 otherwise.
    pub(crate) utc_len: u64,
    /// A bucket's burst tolerance `B·I` in ns ([`GcraRate::tau_u64`]); `None`
    /// for other algorithms (or a bucket whose math needs 128 bits).
    pub(crate) tau: Option<u64>,
}

/// The header profile of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderProfile {
    /// Which header family.
    pub kind: HeaderKind,
    /// Which responses carry the fields.
    pub send_on: SendOn,
    /// Fields sent.
    pub fields: Vec<HeaderField>,
    /// Fields still sent on rejections under `SendOn::Success`.
    pub on_reject: Vec<HeaderField>,
    /// Rejections as `application/problem+json`.
    pub problem_json: bool,
    /// Header names of the vendor profile, by field.
    pub names: Vec<(HeaderField, String)>,
}

/// Header families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderKind {
    /// `RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    Ietf,
    /// `X-RateLimit-Limit/Remaining/Reset/Cost`.
    Classic,
    /// Names from the policy.
    Vendor,
    /// No rate-limit headers (Retry-After is still sent on 429).
    None,
}

/// Which responses carry rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOn {
    /// Every response.
    All,
    /// 2xx responses only (plus `on_reject` fields on rejections).
    Success,
}

/// One piece of rate-limit information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderField {
    /// The limit's quota.
    Limit,
    /// Units left.
    Remaining,
    /// Seconds until reset.
    Reset,
    /// Cost of this request.
    Cost,
    /// Credit balance.
    Credits,
}

/// How credit exhaustion is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditRules {
    /// Status (default 402).
    pub exhausted_status: u16,
    /// Custom body; `None` for tollgate's JSON error.
    pub exhausted_body: Option<String>,
}

/// Upstream retry rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRetry {
    /// Retries after a retryable status.
    pub retries: u32,
    /// Statuses retried.
    pub retry_on: Vec<u16>,
    /// First back-off.
    pub backoff: Duration,
    /// Largest back-off.
    pub max_backoff: Duration,
    /// Largest body buffered for replay.
    pub replay_body_max: u64,
    /// Timeout per attempt.
    pub timeout: Duration,
}

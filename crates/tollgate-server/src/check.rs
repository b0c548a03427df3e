//! The decision service: `POST /v1/check` and `POST /v1/check/release`.
//!
//! The API's own code (or another gateway) asks whether a request may pass
//! and enforces the answer itself. Input names the caller by `key` (an API
//! key, verified) or `account` (looked up), the operation by `operation`
//! name or by `method` + `path`, plus `ip`, `attributes` and an optional
//! `cost`. The answer carries the decision, each limit's numbers, and the
//! exact headers tollgate would have sent. A concurrency lease comes back as
//! an opaque `lease` string to pass to `/v1/check/release`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tollgate_core::headers::{self, ResponseKind};
use tollgate_core::{CounterKey, Outcome};

use crate::error::{ApiError, json_response};
use crate::metric_cache::PolicyValue;
use crate::state::{Caller, Shared, missing_key};

mod request;
pub(crate) mod template;

/// Largest cost accepted in a check (2^40, as in the policy).
const MAX_COST: u64 = 1 << 40;

/// Body of `POST /v1/check`. `S` is the string type: `&str` borrows from
/// the request body (the usual case, no copies), `String` is axum's `Json`
/// extractor (bodies with escaped strings, and every error message).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "S: Deserialize<'de> + Ord"))]
pub struct CheckRequest<S = String> {
    /// An API key (verified like on the proxy).
    pub key: Option<S>,
    /// An account id (instead of `key`).
    pub account: Option<S>,
    /// Operation name.
    pub operation: Option<S>,
    /// Method, with `path`, to match an operation.
    pub method: Option<S>,
    /// Path, with `method`.
    pub path: Option<S>,
    /// Client IP.
    pub ip: Option<S>,
    /// Attribute values by name.
    #[serde(default)]
    pub attributes: BTreeMap<S, S>,
    /// Cost replacing the operation's.
    pub cost: Option<i64>,
}

fn opt<S: AsRef<str>>(v: &Option<S>) -> Option<&str> {
    v.as_ref().map(AsRef::as_ref)
}

/// `POST /v1/check` through the router (only reached without the direct
/// route, see [`check_direct`]).
pub async fn check(
    State(st): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<CheckRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(rejected)?;
    let answer = decide_check(&st, &req, peer.ip()).await?;
    Ok(json_answer(StatusCode::OK, answer))
}

fn rejected(e: JsonRejection) -> ApiError {
    ApiError::bad_request(format!("invalid check request: {}", e.body_text()))
}

/// `POST /v1/check`, called before the router. A body sent as
/// `application/json` is taken as it came when it is one piece of its
/// announced length ([`whole_body`]), else read with axum's `Bytes`
/// extractor (same size limit and errors), and parsed by [`decide_body`].
/// Other content types take axum's whole `Json` extractor.
pub async fn check_direct(st: &Shared, peer: SocketAddr, req: axum::extract::Request) -> Response {
    use axum::extract::FromRequest;
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    let answer = if json {
        let (parts, body) = req.into_parts();
        let bytes = match whole_body(body).await {
            Ok(bytes) => Ok(bytes),
            Err(body) => {
                bytes::Bytes::from_request(axum::extract::Request::from_parts(parts, body), &())
                    .await
            }
        };
        match bytes {
            Ok(bytes) => decide_body(st, &bytes, peer.ip()).await,
            Err(e) => Err(rejected(JsonRejection::from(e))),
        }
    } else {
        match Json::<CheckRequest>::from_request(req, &()).await {
            Ok(Json(r)) => decide_check(st, &r, peer.ip()).await,
            Err(e) => Err(rejected(e)),
        }
    };
    match answer {
        Ok(answer) => json_answer(StatusCode::OK, answer),
        Err(e) => e.into_response(),
    }
}

/// The announced length of a `POST /v1/check` sent as `application/json`
/// whose body may be taken whole ([`ONE_PIECE_MAX`]); `None` for any other
/// request. Such a request is answered by [`answer_whole`] when its body came
/// with its headers.
pub fn one_piece_json<B: hyper::body::Body>(req: &http::Request<B>) -> Option<u64> {
    if req.method() != http::Method::POST || req.uri().path() != crate::CHECK_PATH {
        return None;
    }
    let len = req.body().size_hint().exact()?;
    (is_json(req.headers()) && len <= ONE_PIECE_MAX).then_some(len)
}

/// Whether the first `Content-Type` of `headers` is `application/json` (as
/// `headers.get(CONTENT_TYPE)` finds it): the few headers of a request
/// looked at in order, cheaper than hashing the name for the map's index.
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .iter()
        .find(|(name, _)| *name == header::CONTENT_TYPE)
        .is_some_and(|(_, v)| v.as_bytes() == b"application/json")
}

/// The answer to a `POST /v1/check` whose whole JSON `body` is here (see
/// [`one_piece_json`]), within the request timeout `limit`: the same status,
/// headers and bytes as [`check_direct`] gives, the answer's bytes not boxed.
pub async fn answer_whole(
    st: &Shared,
    peer: SocketAddr,
    body: bytes::Bytes,
    limit: std::time::Duration,
) -> http::Response<crate::connection::ResponseBody> {
    use http_body_util::Either;
    let answer = std::pin::pin!(decide_body(st, &body, peer.ip()));
    match crate::connection::within(limit, answer).await {
        Ok(Ok(answer)) => json_answer_whole(answer, http::HeaderMap::new()),
        Ok(Err(e)) => e.into_response().map(Either::Right),
        Err(_) => crate::connection::request_timeout_response().map(Either::Right),
    }
}

/// [`answer_whole`] without a future, when nothing waits: `body` parsed with
/// its strings borrowed, the caller read lately and the counter store in
/// memory ([`decide_check_now`]). `None` when something would wait (or the
/// body needs axum's parse): nothing was decided, call [`answer_whole`].
///
/// `headers`: the request's header map, emptied and reused for the answer's
/// headers. Its room is kept (no allocation for the answer's map), and
/// hyper keeps the map of each answer it sends for the next request it
/// reads on the connection, so the room goes round.
pub fn answer_now(st: &Shared, body: &[u8], headers: http::HeaderMap) -> Option<Answer> {
    let body = std::str::from_utf8(body).ok()?;
    let mut req = request::empty();
    if !borrowed_into(body, &mut req) {
        return None;
    }
    Some(match decide_check_now(st, &req)? {
        Ok((answer, None)) => Ok(json_answer_whole(answer, headers)),
        Ok((answer, Some(due))) => Err(Box::new(Answered {
            response: json_answer_whole(answer, headers),
            due,
        })),
        Err(e) => Ok(e.into_response().map(http_body_util::Either::Right)),
    })
}

/// A check's answer from [`answer_now`]: the response to send as it is, or,
/// when its decision made events due, an [`Answered`] to send once they are
/// recorded ([`Answered::send`]).
pub type Answer = Result<http::Response<crate::connection::ResponseBody>, Box<Answered>>;

/// A check's answer, sent once the events its decision made due are
/// recorded ([`Answered::send`]).
pub struct Answered {
    response: http::Response<crate::connection::ResponseBody>,
    due: Due,
}

impl Answered {
    /// The answer, after the events due are recorded, within the request
    /// timeout `limit` (as [`answer_whole`]: a 504 past it).
    pub async fn send(
        self: Box<Self>,
        st: &Shared,
        limit: std::time::Duration,
    ) -> http::Response<crate::connection::ResponseBody> {
        let Answered { response, due } = *self;
        let record = std::pin::pin!(due.crossings.record(&st.ledger, &due.identity.account));
        match crate::connection::within(limit, record).await {
            Ok(()) => response,
            Err(_) => {
                crate::connection::request_timeout_response().map(http_body_util::Either::Right)
            }
        }
    }
}

/// The `200` answer of a check, its bytes not boxed, its headers written in
/// `headers` (emptied first; see [`answer_now`]).
fn json_answer_whole(
    answer: bytes::Bytes,
    mut headers: http::HeaderMap,
) -> http::Response<crate::connection::ResponseBody> {
    let mut r = http::Response::new(http_body_util::Either::Left(http_body_util::Either::Left(
        http_body_util::Full::new(answer),
    )));
    headers.clear();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    *r.headers_mut() = headers;
    r
}

/// The answer to a check sent as JSON `body`: parsed with `serde_json`
/// borrowing its strings ([`borrowed_into`]); if that fails (an escaped string,
/// or an error) axum's `Json` parse runs on the same bytes, so every answer
/// and message is the router's.
async fn decide_body(st: &Shared, body: &[u8], peer: IpAddr) -> Result<bytes::Bytes, ApiError> {
    let mut req = request::empty();
    if std::str::from_utf8(body).is_ok_and(|b| borrowed_into(b, &mut req)) {
        return decide_check(st, &req, peer).await;
    }
    match Json::<CheckRequest>::from_bytes(body) {
        Ok(Json(r)) => decide_check(st, &r, peer).await,
        Err(e) => Err(rejected(e)),
    }
}

/// Reads the check in `body` into `req` (as [`request::empty`] gives it),
/// its strings borrowed from `body`: in place by [`request::parse_into`]
/// when it has the usual shape, else by `serde_json` (as a `&str`:
/// `serde_json::from_slice` would check each string for UTF-8 again).
/// `false` when it is not a valid check or holds an escaped string: the
/// caller then runs axum's parse for its answer and messages.
fn borrowed_into<'b>(body: &'b str, req: &mut CheckRequest<&'b str>) -> bool {
    if request::parse_into(body, req) {
        return true;
    }
    match serde_json::from_str(body) {
        Ok(read) => {
            *req = read;
            true
        }
        Err(_) => false,
    }
}

/// Bodies up to this size that announce their length and arrive in one piece
/// are taken as they are ([`whole_body`]); anything else goes through axum's
/// `Bytes` extractor (its 2 MB default limit and its errors).
const ONE_PIECE_MAX: u64 = 64 * 1024;

/// The body of a check when it announced its length (at most
/// [`ONE_PIECE_MAX`]) and came in one piece, as usual for a small JSON check:
/// no collecting, no copy. Otherwise the body as it was, the piece already
/// read put back in front, for axum's extractor.
async fn whole_body(mut body: axum::body::Body) -> Result<bytes::Bytes, axum::body::Body> {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    match body.size_hint().exact() {
        Some(n) if n <= ONE_PIECE_MAX => {
            let first = match body.frame().await {
                None => return Ok(bytes::Bytes::new()),
                Some(first) => first,
            };
            match first {
                Ok(frame) => match frame.into_data() {
                    Ok(data) if data.len() as u64 == n && body.is_end_stream() => Ok(data),
                    Ok(data) => Err(Replay::body(Ok(hyper::body::Frame::data(data)), body)),
                    Err(frame) => Err(Replay::body(Ok(frame), body)),
                },
                Err(e) => Err(Replay::body(Err(e), body)),
            }
        }
        _ => Err(body),
    }
}

/// A body whose first frame was already read: that frame, then the rest.
struct Replay {
    first: Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>,
    rest: axum::body::Body,
}

impl Replay {
    fn body(
        first: Result<hyper::body::Frame<bytes::Bytes>, axum::Error>,
        rest: axum::body::Body,
    ) -> axum::body::Body {
        axum::body::Body::new(Replay {
            first: Some(first),
            rest,
        })
    }
}

impl hyper::body::Body for Replay {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        match self.first.take() {
            Some(first) => std::task::Poll::Ready(Some(first)),
            None => std::pin::Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let rest = self.rest.size_hint();
        match &self.first {
            Some(Ok(f)) => {
                let n = f.data_ref().map_or(0, |d| d.len() as u64);
                let mut h = hyper::body::SizeHint::new();
                h.set_lower(rest.lower() + n);
                if let Some(u) = rest.upper() {
                    h.set_upper(u + n);
                }
                h
            }
            _ => rest,
        }
    }
}

/// The decision of a parsed check request, as the answer to send.
async fn decide_check<S: AsRef<str> + Ord>(
    st: &Shared,
    req: &CheckRequest<S>,
    peer: IpAddr,
) -> Result<bytes::Bytes, ApiError> {
    let policy = st.policy.load_full();
    let caller = resolve(st, &policy, req, peer).await?;
    let (answer, crossings) = match decide_caller_now(st, &policy, req, &caller) {
        Some(answer) => answer?,
        // Boxed: the store's future is large, and only Redis waits.
        None => Box::pin(decide_caller(st, &policy, req, &caller)).await?,
    };
    if !crossings.is_empty() {
        Box::pin(crossings.record(&st.ledger, &caller.identity.account)).await;
    }
    Ok(answer)
}

/// [`decide_check`] without waiting, when nothing waits: the caller read
/// lately (see [`resolve_now`]) and the counter store in memory. `None`
/// when something would wait; nothing has been decided or counted then.
/// The `soft_limit_crossed` events the decision made due come with the
/// answer, for the caller to record before sending it.
fn decide_check_now<S: AsRef<str> + Ord>(
    st: &Shared,
    req: &CheckRequest<S>,
) -> Option<Result<Checked, ApiError>> {
    tollgate_core::Store::as_memory(st.engine.store())?;
    let policy = st.policy.load_full();
    let caller = match resolve_now(st, &policy, req)? {
        Ok(caller) => caller,
        Err(e) => return Some(Err(e)),
    };
    let (answer, crossings) = match decide_caller_now(st, &policy, req, &caller)? {
        Ok(answer) => answer,
        Err(e) => return Some(Err(e)),
    };
    let due = if crossings.is_empty() {
        None
    } else {
        Some(Due {
            identity: caller.identity,
            crossings,
        })
    };
    Some(Ok((answer, due)))
}

/// A check's answer, and the events it made due.
type Checked = (bytes::Bytes, Option<Due>);

/// Events a check's decision made due, to record before its answer is sent.
pub struct Due {
    identity: std::sync::Arc<tollgate_ledger::KeyIdentity>,
    crossings: crate::events::SoftCrossings,
}

/// Attributes a check names, kept on the stack up to this many in the policy.
const FEW_ATTRIBUTES: usize = 8;

/// Where a check's attribute values go: `n` slots, on the stack when few.
fn attribute_slots<'a, 'r>(
    n: usize,
    few: &'a mut [Option<&'r str>; FEW_ATTRIBUTES],
    many: &'a mut Vec<Option<&'r str>>,
) -> &'a mut [Option<&'r str>] {
    match few.get_mut(..n) {
        Some(slots) => slots,
        None => {
            many.resize(n, None);
            many
        }
    }
}

/// What a check asks besides its caller, validated.
struct Inputs<'r> {
    op: tollgate_core::policy::OperationId,
    cost: Option<u64>,
    ip: Option<&'r str>,
}

/// The operation, cost, IP and attributes (into `attrs`, by index) of `req`,
/// validated against `policy`.
fn inputs<'r, S: AsRef<str> + Ord>(
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &'r CheckRequest<S>,
    attrs: &mut [Option<&'r str>],
) -> Result<Inputs<'r>, ApiError> {
    let ip = opt(&req.ip);
    let op = match (opt(&req.operation), opt(&req.method), opt(&req.path)) {
        (Some(name), _, _) => policy
            .operation(name)
            .ok_or_else(|| ApiError::bad_request(format!("unknown operation `{name}`")))?,
        (None, Some(m), Some(p)) => policy
            .operation_for(m, p)
            .ok_or_else(|| ApiError::not_found(format!("no operation matches {m} {p}")))?,
        _ => policy.default_operation(),
    };
    let cost = match req.cost {
        None => None,
        Some(c) if (0..=MAX_COST as i64).contains(&c) => Some(c as u64),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "cost must be between 0 and {MAX_COST}, not {c}"
            )));
        }
    };
    if let Some(ip) = ip
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        return Err(ApiError::bad_request(format!(
            "ip `{ip}` is not an IP address"
        )));
    }
    for (name, value) in &req.attributes {
        let name = name.as_ref();
        let i = policy
            .attribute(name)
            .ok_or_else(|| ApiError::bad_request(format!("unknown attribute `{name}`")))?;
        attrs[usize::from(i)] = Some(value.as_ref());
    }
    Ok(Inputs { op, cost, ip })
}

/// The answer to `req` from `caller` when the counter store is in memory,
/// decided without waiting, and the events it made due; `None` for another
/// store (then [`decide_caller`]).
fn decide_caller_now<S: AsRef<str> + Ord>(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest<S>,
    caller: &Caller,
) -> Option<Result<(bytes::Bytes, crate::events::SoftCrossings), ApiError>> {
    tollgate_core::Store::as_memory(st.engine.store())?;
    let (mut few, mut many) = ([None; FEW_ATTRIBUTES], Vec::new());
    let attrs = attribute_slots(policy.attributes.len(), &mut few, &mut many);
    let input = match inputs(policy, req, attrs) {
        Ok(input) => input,
        Err(e) => return Some(Err(e)),
    };
    let core_req = tollgate_core::Request {
        cost: input.cost,
        ..caller.request(input.op, input.ip.unwrap_or(""), attrs)
    };
    // Decided in place (in memory nothing waits): no future to poll, and
    // the decision is built in this frame, not copied out.
    let answer = st.engine.decide_in_memory_with(policy, &core_req, |d| {
        answer_decision(st, policy, input.op, caller, d)
    })?;
    Some(Ok(answer))
}

/// [`decide_caller_now`] on a store that waits (Redis).
async fn decide_caller<S: AsRef<str> + Ord>(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest<S>,
    caller: &Caller,
) -> Result<(bytes::Bytes, crate::events::SoftCrossings), ApiError> {
    let (mut few, mut many) = ([None; FEW_ATTRIBUTES], Vec::new());
    let attrs = attribute_slots(policy.attributes.len(), &mut few, &mut many);
    let input = inputs(policy, req, attrs)?;
    let core_req = tollgate_core::Request {
        cost: input.cost,
        ..caller.request(input.op, input.ip.unwrap_or(""), attrs)
    };
    let d = st.engine.decide(policy, &core_req).await;
    Ok(answer_decision(st, policy, input.op, caller, &d))
}

/// Counts decision `d` (metrics, events bookkeeping) and writes its answer;
/// the `soft_limit_crossed` events it made due come back to be recorded.
fn answer_decision(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    op: tollgate_core::policy::OperationId,
    caller: &Caller,
    d: &tollgate_core::Decision,
) -> (bytes::Bytes, crate::events::SoftCrossings) {
    // The proxy's decision-latency histogram (no labels), timed from the
    // engine's `now`, read as the decision started: one clock read here.
    let elapsed = tollgate_core::Clock::now(st.engine.clock())
        .0
        .saturating_sub(d.now.0);
    st.metrics.decision_seconds.observe(elapsed as f64 / 1e9);
    let counters = st.counters.for_policy(policy, || st.policy.load_full());
    let crossings = crate::metric_cache::count_decision_in(
        st,
        counters.as_deref(),
        policy,
        op,
        caller.plan,
        d,
        Some(&caller.identity.account),
    );
    // The `RateLimit-Policy` value of (plan, operation) is kept when written
    // for a caller without overrides (the common case it is reused for).
    let table = counters
        .as_deref()
        .map(|c| (c, caller.plan, caller.overrides.is_none()));
    (write_answer(policy, op, d, table), crossings)
}

thread_local! {
    /// Buffers a check's answer is written in, kept for the next check of
    /// the thread (no allocation for them): the header list's text, and the
    /// answer, copied out at its exact length (one allocation, which the
    /// response body takes as it is).
    static SCRATCH: std::cell::Cell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Scratch buffers larger than this are not kept (a rare long answer).
const SCRATCH_KEPT: usize = 16 * 1024;

/// The JSON answer to decision `d` of operation `op`. `table`: the policy's
/// table (names written as JSON, kept `RateLimit-Policy` values), the
/// caller's plan, and whether this decision's `RateLimit-Policy` value may be
/// kept (see [`PolicyValue`]).
fn write_answer(
    policy: &tollgate_core::policy::CompiledPolicy,
    op: tollgate_core::policy::OperationId,
    d: &tollgate_core::Decision,
    table: Option<(
        &crate::metric_cache::PolicyCounters,
        tollgate_core::policy::PlanId,
        bool,
    )>,
) -> bytes::Bytes {
    // The common answers, from the pieces kept for (plan, operation).
    if let Some((t, plan, may_keep)) = table
        && let Some(answer) = template::answer(policy, op, t.templates(plan, op), may_keep, d)
    {
        return answer;
    }
    let kept = table.map(|(t, plan, may_keep)| (t.policy_value(plan, op), may_keep));
    let names = table.map(|(t, _, _)| t);
    let (allowed, status, reason) = match d.outcome {
        Outcome::Admitted => (true, 200, None),
        Outcome::Forwarded { limit } => (
            true,
            200,
            Some(format!(
                "limit `{}` exceeded; forward with its marker",
                policy.limits[usize::from(limit)].name
            )),
        ),
        Outcome::Rejected { limit } => {
            let l = &policy.limits[usize::from(limit)];
            let status = match l.on_exceed {
                tollgate_core::policy::Action::Reject { status, .. } => status,
                tollgate_core::policy::Action::Forward { .. } => 429,
            };
            (false, status, Some(format!("limit `{}` exceeded", l.name)))
        }
        Outcome::CostAboveCapacity { limit } => (
            false,
            400,
            Some(format!(
                "cost exceeds the capacity of limit `{}`",
                policy.limits[usize::from(limit)].name
            )),
        ),
        Outcome::StoreUnavailable => (false, 503, Some("counter store unavailable".to_owned())),
    };
    let kind = if allowed {
        ResponseKind::Success
    } else {
        ResponseKind::Rejected
    };
    let (text, out) = SCRATCH.take();
    let mut hdrs = HeaderList::with_text(text, kept, names);
    headers::render_to(policy, d, kind, None, &mut hdrs);
    if hdrs.too_long {
        // A value `headers::render` cuts: take its values as they are.
        hdrs = HeaderList::default();
        headers::render(policy, d, kind, None, &mut |n, v| hdrs.push(n, v));
    }
    let lease = d.lease.map(|lease| {
        let keys: Vec<String> = d.lease_keys().map(|k| format!("{:032x}", k.0)).collect();
        format!("{lease:016x}.{}", keys.join("."))
    });
    let retry_after_s = if matches!(d.outcome, Outcome::Rejected { .. }) {
        tollgate_core::clock::ceil_secs(d.retry_after()).max(1)
    } else {
        0
    };
    let mut out = answer::Writer::with_buffer(out, 768);
    out.head(allowed, &hdrs);
    if let Some(lease) = &lease {
        out.lease(lease);
    }
    out.limits(d.results().iter().map(|r| answer::LimitAnswer {
        cost: r.cost,
        exceeded: r.exceeded(),
        limit: r.quota,
        mode: r.mode.as_str(),
        name: &policy.limits[usize::from(r.limit)].name,
        name_json: names.map(|t| t.limit_name(r.limit)),
        remaining: r.eval.remaining,
        reset_s: tollgate_core::clock::ceil_secs(r.eval.reset),
    }));
    out.tail(
        &policy.operations[usize::from(op)].name,
        names.map(|t| t.operation_name(op)),
        reason.as_deref(),
        retry_after_s,
        status,
    );
    let (mut text, mut out) = (hdrs.text, out.into_bytes());
    let answer = bytes::Bytes::copy_from_slice(&out);
    text.clear();
    out.clear();
    if text.capacity() <= SCRATCH_KEPT && out.capacity() <= SCRATCH_KEPT {
        SCRATCH.set((text, out));
    }
    answer
}

/// The headers of a check answer: names and values in one buffer, written as
/// a JSON object sorted by name, a later value of a name replacing an
/// earlier one (as the `BTreeMap<String, String>` it replaces did). Values
/// are kept JSON-escaped (without their quotes), names as they are. Filled
/// by `headers::render_to` (escaping each piece as it comes, so a value is
/// never copied or scanned again), or by [`HeaderList::push`].
#[derive(Default)]
struct HeaderList<'k> {
    text: Vec<u8>,
    /// Where each header's value and name are in `text`.
    items: Items,
    /// Where the value being written starts in `text`.
    value_start: usize,
    /// Its length before escaping.
    raw_len: usize,
    /// A value was longer than `headers::render` writes it
    /// ([`headers::VALUE_MAX`]); the list is then incomplete.
    too_long: bool,
    /// Where the `RateLimit-Policy` value of this plan and operation is
    /// kept, and whether the one written here may be kept there.
    kept: Option<(&'k [std::sync::OnceLock<PolicyValue>], bool)>,
    /// What the `RateLimit-Policy` value being written is written from,
    /// when it is to be kept.
    /// The slot it goes to.
    keep: Option<(usize, crate::metric_cache::PolicyItems)>,
    /// The policy's limit names as JSON strings, when at hand: the
    /// `RateLimit` value's quoted name is written from them.
    names: Option<&'k crate::metric_cache::PolicyCounters>,
}

impl<'k> HeaderList<'k> {
    /// An empty list written in `text` (its contents dropped).
    fn with_text(
        mut text: Vec<u8>,
        kept: Option<(&'k [std::sync::OnceLock<PolicyValue>], bool)>,
        names: Option<&'k crate::metric_cache::PolicyCounters>,
    ) -> HeaderList<'k> {
        text.clear();
        HeaderList {
            text,
            kept,
            names,
            ..HeaderList::default()
        }
    }

    fn reserve(&mut self) {
        if self.text.capacity() == 0 {
            self.text.reserve(256);
        }
    }

    /// Adds header `name` with `value` (escaped here).
    fn push(&mut self, name: &str, value: &str) {
        self.reserve();
        let v = self.text.len();
        answer::escape(&mut self.text, value.as_bytes());
        let n = self.text.len();
        self.text.extend_from_slice(name.as_bytes());
        self.items.push([v, n, self.text.len()]);
        self.value_start = self.text.len();
    }

    fn raw(&mut self, n: usize) -> bool {
        self.raw_len += n;
        if self.raw_len > headers::VALUE_MAX {
            self.too_long = true;
        }
        !self.too_long
    }
}

impl HeaderList<'_> {
    /// A number's digits (nothing to escape).
    fn digits(&mut self, s: &str) {
        if self.raw(s.len()) {
            self.reserve();
            self.text.extend_from_slice(s.as_bytes());
        }
    }
}

impl headers::HeaderSink for HeaderList<'_> {
    fn text(&mut self, s: &str) {
        if self.raw(s.len()) {
            self.reserve();
            // The fixed pieces `headers::render_to` writes around names and
            // numbers, escaped by hand (the ones with a `"` would otherwise
            // be escaped byte by byte); any other text is escaped here.
            let escaped: &[u8] = match s.as_bytes() {
                b"\"" => b"\\\"",
                b"\";q=" => b"\\\";q=",
                b";w=" | b", " | b";r=" | b";t=" => s.as_bytes(),
                _ => {
                    answer::escape(&mut self.text, s.as_bytes());
                    return;
                }
            };
            self.text.extend_from_slice(escaped);
        }
    }

    fn num(&mut self, v: u64) {
        if v >= 100 {
            self.digits(itoa::Buffer::new().format(v));
        } else if v >= 10 {
            if self.raw(2) {
                self.reserve();
                self.text
                    .extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8]);
            }
        } else if self.raw(1) {
            // One digit (resets, mostly): no formatting.
            self.reserve();
            self.text.push(b'0' + v as u8);
        }
    }

    fn signed(&mut self, v: i64) {
        self.digits(itoa::Buffer::new().format(v));
    }

    fn quoted_limit_name(&mut self, limit: tollgate_core::policy::LimitId, name: &str) {
        let Some(json) = self.names.map(|t| t.limit_name(limit)) else {
            self.text("\"");
            self.text(name);
            self.text("\"");
            return;
        };
        if self.raw(name.len() + 2) {
            self.reserve();
            // `json` is the name escaped between two `"`; in the escaped
            // value each of those quotes is `\"`.
            self.text.push(b'\\');
            self.text.extend_from_slice(&json[..json.len() - 1]);
            self.text.extend_from_slice(b"\\\"");
        }
    }

    fn policy_value(&mut self, d: &tollgate_core::Decision) -> bool {
        let Some((slots, may_keep)) = self.kept else {
            return false;
        };
        for (i, slot) in slots.iter().enumerate() {
            match slot.get() {
                Some(value) if value.matches(d) => {
                    if self.raw(value.raw_len) {
                        self.reserve();
                        self.text.extend_from_slice(&value.escaped);
                    }
                    return true;
                }
                Some(_) => {}
                None => {
                    if may_keep {
                        self.keep = Some((i, PolicyValue::from_results(d)));
                    }
                    return false;
                }
            }
        }
        false
    }

    fn end(&mut self, name: &str) {
        self.reserve();
        let (v, n) = (self.value_start, self.text.len());
        if let (Some((i, from)), Some((slots, _))) = (self.keep.take(), self.kept)
            && name == headers::RATELIMIT_POLICY
            && !self.too_long
        {
            let _ = slots[i].set(PolicyValue {
                from,
                escaped: self.text[v..n].into(),
                raw_len: self.raw_len,
            });
        }
        self.text.extend_from_slice(name.as_bytes());
        self.items.push([v, n, self.text.len()]);
        self.value_start = self.text.len();
        self.raw_len = 0;
    }
}

/// Headers listed in place (no allocation) before they spill into a `Vec`;
/// `headers::render` writes at most six.
const INLINE_ITEMS: usize = 8;

/// The headers of a [`HeaderList`], each as `[value start, name start, name
/// end]` in its text (a value is written just before its name).
#[derive(Default)]
struct Items {
    inline: [[usize; 3]; INLINE_ITEMS],
    len: usize,
    more: Vec<[usize; 3]>,
}

impl Items {
    fn push(&mut self, item: [usize; 3]) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = item,
            None => self.more.push(item),
        }
        self.len += 1;
    }

    fn get(&self, i: usize) -> [usize; 3] {
        match self.inline.get(i) {
            Some(item) => *item,
            None => self.more[i - INLINE_ITEMS],
        }
    }
}

impl HeaderList<'_> {
    /// The (name, value) pairs in the order the JSON object lists them.
    fn sorted(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        // A handful of headers (at most six from `headers::render`): an
        // insertion sort of their indices on the stack, in a `Vec` only
        // beyond `SMALL`. Stable: equal names keep their order, and the
        // last one is written.
        const SMALL: usize = 16;
        let text = self.text.as_slice();
        let items = &self.items;
        let name = move |i: usize| {
            let [_, start, end] = items.get(i);
            &text[start..end]
        };
        let value = move |i: usize| {
            let [start, end, _] = items.get(i);
            &text[start..end]
        };
        let n = items.len;
        let (mut small, mut large) = ([0usize; SMALL], Vec::new());
        {
            let order: &mut [usize] = if n <= SMALL {
                &mut small[..n]
            } else {
                large.resize(n, 0);
                &mut large
            };
            for i in 0..n {
                let mut j = i;
                while j > 0 && name(order[j - 1]) > name(i) {
                    order[j] = order[j - 1];
                    j -= 1;
                }
                order[j] = i;
            }
        }
        let at = move |i: usize| if n <= SMALL { small[i] } else { large[i] };
        let last = n.saturating_sub(1);
        (0..n).filter_map(move |i| {
            let next_same = i < last && name(at(i + 1)) == name(at(i));
            (!next_same).then(|| (name(at(i)), value(at(i))))
        })
    }
}

/// A JSON answer from its serialised bytes.
fn json_answer(status: StatusCode, bytes: bytes::Bytes) -> Response {
    let mut r = Response::new(axum::body::Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The JSON text of a check answer, written straight into one buffer: the
/// fixed parts (keys, punctuation) as literals, strings escaped as
/// `serde_json` escapes them, numbers with `itoa`. Byte for byte what
/// `serde_json::to_vec` wrote for the `Serialize` structs it replaces
/// (tested against them below); about a fifth of their instructions.
mod answer {
    use super::HeaderList;

    /// One limit of a check answer.
    #[cfg_attr(test, derive(serde::Serialize, Clone, Debug))]
    pub struct LimitAnswer<'a> {
        pub cost: u64,
        pub exceeded: bool,
        pub limit: u64,
        /// `enforce`, `soft` or `shadow`: written as is.
        pub mode: &'static str,
        pub name: &'a str,
        /// `name` as a JSON string, when known (written as it is).
        #[cfg_attr(test, serde(skip))]
        pub name_json: Option<&'a [u8]>,
        pub remaining: u64,
        pub reset_s: u64,
    }

    /// The answer being written; fields in alphabetical order (as the
    /// `serde_json::Value` map the structs replaced printed them): `head`,
    /// then `lease` if any, `limits`, `tail`.
    pub struct Writer {
        out: Vec<u8>,
    }

    impl Writer {
        #[cfg(test)]
        pub fn with_capacity(n: usize) -> Writer {
            Writer {
                out: Vec::with_capacity(n),
            }
        }

        /// A writer into `out` (its contents dropped), at least `n` bytes
        /// reserved.
        pub fn with_buffer(mut out: Vec<u8>, n: usize) -> Writer {
            out.clear();
            out.reserve(n);
            Writer { out }
        }

        /// `{"allowed":…,"headers":{…}`
        pub fn head(&mut self, allowed: bool, headers: &HeaderList) {
            self.out.extend_from_slice(if allowed {
                b"{\"allowed\":true,\"headers\":{"
            } else {
                b"{\"allowed\":false,\"headers\":{"
            });
            for (i, (name, value)) in headers.sorted().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                self.out.push(b'"');
                match name {
                    // The names of the IETF profile (the default): nothing
                    // to escape.
                    b"RateLimit" | b"RateLimit-Policy" | b"Retry-After" => {
                        self.out.extend_from_slice(name);
                    }
                    _ => escape(&mut self.out, name),
                }
                self.out.extend_from_slice(b"\":\"");
                self.out.extend_from_slice(value);
                self.out.push(b'"');
            }
            self.out.push(b'}');
        }

        /// `,"lease":"…"`
        pub fn lease(&mut self, lease: &str) {
            self.out.extend_from_slice(b",\"lease\":");
            string(&mut self.out, lease);
        }

        /// `,"limits":[…]`
        pub fn limits<'a>(&mut self, limits: impl Iterator<Item = LimitAnswer<'a>>) {
            self.out.extend_from_slice(b",\"limits\":[");
            for (i, l) in limits.enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                let out = &mut self.out;
                out.extend_from_slice(b"{\"cost\":");
                number(out, l.cost);
                out.extend_from_slice(if l.exceeded {
                    b",\"exceeded\":true,\"limit\":"
                } else {
                    b",\"exceeded\":false,\"limit\":"
                });
                number(out, l.limit);
                // A mode is one of a few lowercase words: nothing to escape.
                out.extend_from_slice(b",\"mode\":\"");
                out.extend_from_slice(l.mode.as_bytes());
                out.extend_from_slice(b"\",\"name\":");
                match l.name_json {
                    Some(json) => out.extend_from_slice(json),
                    None => string(out, l.name),
                }
                out.extend_from_slice(b",\"remaining\":");
                number(out, l.remaining);
                out.extend_from_slice(b",\"reset_s\":");
                number(out, l.reset_s);
                out.push(b'}');
            }
            self.out.push(b']');
        }

        /// `,"operation":…,"reason":…,"retry_after_s":…,"status":…}`;
        /// `operation_json`: `operation` as a JSON string, when known.
        pub fn tail(
            &mut self,
            operation: &str,
            operation_json: Option<&[u8]>,
            reason: Option<&str>,
            retry_after_s: u64,
            status: u16,
        ) {
            let out = &mut self.out;
            out.extend_from_slice(b",\"operation\":");
            match operation_json {
                Some(json) => out.extend_from_slice(json),
                None => string(out, operation),
            }
            out.extend_from_slice(b",\"reason\":");
            match reason {
                Some(r) => string(out, r),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"retry_after_s\":");
            number(out, retry_after_s);
            out.extend_from_slice(b",\"status\":");
            number(out, u64::from(status));
            out.push(b'}');
        }

        pub fn into_bytes(self) -> Vec<u8> {
            self.out
        }
    }

    /// `v` in decimal. Inlined for one or two digits (zero costs and
    /// resets, small limits); longer numbers go out of line, so callers do
    /// not carry `itoa`'s frame.
    #[inline]
    pub fn number(out: &mut Vec<u8>, v: u64) {
        if v < 10 {
            out.push(b'0' + v as u8);
        } else if v < 100 {
            out.extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8]);
        } else {
            digits(out, v);
        }
    }

    #[inline(never)]
    fn digits(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    /// A JSON string, escaped as `serde_json` escapes it: `"` and `\`
    /// backslashed, control characters as `\b \t \n \f \r` or `\u00xx`
    /// (lowercase hex), everything else (DEL, non-ASCII) as is. The bytes are
    /// checked eight at a time; only a word holding a byte to escape is
    /// walked byte by byte, and the runs between escapes are copied whole.
    pub fn string(out: &mut Vec<u8>, s: &str) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        escape(out, s.as_bytes());
        out.push(b'"');
    }

    /// The inside of [`string`]: `bytes` escaped, without quotes. Inlined
    /// for short pieces; the word loop for long ones is out of line, so the
    /// many short calls (names, pieces of header values) do not pay its frame.
    #[inline]
    pub fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
        if bytes.len() < SHORT {
            escape_short(out, bytes);
        } else {
            escape_long(out, bytes);
        }
    }

    /// Strings shorter than this (most names and the pieces of header
    /// values) are checked byte by byte and copied whole.
    const SHORT: usize = 16;

    #[inline]
    fn escape_short(out: &mut Vec<u8>, bytes: &[u8]) {
        if let [b] = bytes {
            // One byte: the `"` pieces of a header value, mostly.
            match ESCAPE[usize::from(*b)] {
                0 => out.push(*b),
                b'u' => escape_control(out, *b),
                short => out.extend_from_slice(&[b'\\', short]),
            }
            return;
        }
        // Names and the fixed pieces of header values need no escape: one
        // scan, one copy.
        if bytes.iter().all(|&b| ESCAPE[usize::from(b)] == 0) {
            out.extend_from_slice(bytes);
            return;
        }
        escape_slow(out, bytes);
    }

    /// A short string with something to escape, byte by byte.
    #[inline(never)]
    fn escape_slow(out: &mut Vec<u8>, bytes: &[u8]) {
        out.reserve(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            if ESCAPE[usize::from(b)] == 0 {
                out.push(b);
            } else {
                escape_at(out, bytes, i, i);
            }
        }
    }

    /// `\u00xx` for a control character without a short escape.
    #[inline(never)]
    fn escape_control(out: &mut Vec<u8>, b: u8) {
        escape_at(out, &[b], 0, 0);
    }

    #[inline(never)]
    fn escape_long(out: &mut Vec<u8>, bytes: &[u8]) {
        let mut start = 0;
        let mut at = 0;
        // Whole words straight from the string (a fixed-size load, no copy),
        // then the last few bytes one by one.
        while let Some(word) = bytes.get(at..at + 8) {
            let w = u64::from_le_bytes([
                word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
            ]);
            if needs_escape(w) {
                for i in at..at + 8 {
                    start = escape_at(out, bytes, start, i);
                }
            }
            at += 8;
        }
        for i in at..bytes.len() {
            start = escape_at(out, bytes, start, i);
        }
        out.extend_from_slice(&bytes[start..]);
    }

    /// If `bytes[i]` needs an escape: writes the run `start..i` and the
    /// escape, and returns where the next run starts (`i + 1`); else `start`.
    #[inline(always)]
    fn escape_at(out: &mut Vec<u8>, bytes: &[u8], start: usize, i: usize) -> usize {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let b = bytes[i];
        let short = ESCAPE[usize::from(b)];
        if short == 0 {
            return start;
        }
        out.extend_from_slice(&bytes[start..i]);
        if short == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xF)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
        i + 1
    }

    /// For each byte, the letter of its escape (`u` for `\u00xx`), or 0.
    const ESCAPE: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut b = 0;
        while b < 0x20 {
            t[b] = b'u';
            b += 1;
        }
        t[0x08] = b'b';
        t[0x09] = b't';
        t[0x0A] = b'n';
        t[0x0C] = b'f';
        t[0x0D] = b'r';
        t[b'"' as usize] = b'"';
        t[b'\\' as usize] = b'\\';
        t
    };

    /// Whether any of the 8 bytes of `w` may need an escape (a control
    /// character, `"` or `\`). Never misses one; the byte-wise check decides.
    fn needs_escape(w: u64) -> bool {
        escapes(w) != 0
    }

    /// The high bit of each byte of `w` (little-endian) that may need an
    /// escape. Never misses one, and the lowest bit set is exact: a byte is
    /// wrongly flagged only above one rightly flagged (the borrow of the
    /// subtraction runs up from it).
    pub fn escapes(w: u64) -> u64 {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        (w.wrapping_sub(ONES * 0x20) & !w & HIGH)
            | zero_in(w ^ (ONES * u64::from(b'"')))
            | zero_in(w ^ (ONES * u64::from(b'\\')))
    }
}

/// The caller a check names. A key is verified as on the proxy, with the
/// invalid-key guard keyed by the check's `ip` (the end client) or, without
/// one, by the address that sent the check. An account is read through the
/// ledger's account cache (no database read while cached; changes made on
/// another replica are seen within `REVOCATION_BOUND`).
async fn resolve<S: AsRef<str>>(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest<S>,
    peer: IpAddr,
) -> Result<Caller, ApiError> {
    if let Some(caller) = resolve_now(st, policy, req) {
        return caller;
    }
    match (opt(&req.key), opt(&req.account)) {
        (Some(key), _) => {
            let key = presented_key(policy, key)?;
            let ip = opt(&req.ip)
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .unwrap_or(peer);
            st.authenticate_key(key, policy, ip).await
        }
        (None, Some(account)) => {
            let identity = st
                .ledger
                .account_identity(account)
                .await?
                .ok_or_else(|| unknown_account(account))?;
            Ok(st.caller(identity, policy))
        }
        (None, None) => Err(no_caller()),
    }
}

/// [`resolve`] without waiting: the caller when it is at hand (a valid key
/// or an account read lately, see [`tollgate_ledger::Ledger::verify_key_now`]
/// and [`tollgate_ledger::Ledger::account_identity_now`]), or the error a
/// request gets without any lookup; `None` when [`resolve`] must look (any
/// other key goes through its guard against invalid keys).
fn resolve_now<S: AsRef<str>>(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest<S>,
) -> Option<Result<Caller, ApiError>> {
    match (opt(&req.key), opt(&req.account)) {
        (Some(key), _) => match presented_key(policy, key) {
            Ok(key) => st.authenticate_key_now(key, policy).map(Ok),
            Err(e) => Some(Err(e)),
        },
        (None, Some(account)) => Some(match st.ledger.account_identity_now(account)? {
            Some(identity) => Ok(st.caller(identity, policy)),
            None => Err(unknown_account(account)),
        }),
        (None, None) => Some(Err(no_caller())),
    }
}

/// A check's `key`, read as if sent in the key header: a valid header value,
/// read only when ASCII, trimmed.
fn presented_key<'k>(
    policy: &tollgate_core::policy::CompiledPolicy,
    key: &'k str,
) -> Result<&'k str, ApiError> {
    // Without an early exit, so the loop runs a word at a time.
    let invalid = key
        .bytes()
        .fold(false, |bad, b| bad | ((b < 32 && b != b'\t') | (b == 127)));
    if invalid {
        return Err(ApiError::bad_request("key is not a valid header value"));
    }
    if !key.is_ascii() || key.trim().is_empty() {
        return Err(missing_key(policy));
    }
    Ok(key.trim())
}

fn unknown_account(account: &str) -> ApiError {
    ApiError::not_found(format!("unknown account `{account}`"))
}

fn no_caller() -> ApiError {
    ApiError::bad_request("name the caller with `key` or `account`")
}

/// Body of `POST /v1/check/release`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The `lease` string of a check answer.
    pub lease: String,
}

/// `POST /v1/check/release`: ends a concurrency lease. Idempotent.
pub async fn release(
    State(st): State<Shared>,
    body: Result<Json<ReleaseRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(format!("invalid release request: {}", e.body_text()))
    })?;
    let bad = || ApiError::bad_request("`lease` is not a lease from /v1/check");
    let mut parts = req.lease.split('.');
    let lease = u64::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    let mut keys = Vec::new();
    for p in parts.take(tollgate_core::policy::MAX_LIMITS_PER_REQUEST) {
        keys.push(CounterKey(u128::from_str_radix(p, 16).map_err(|_| bad())?));
    }
    if keys.is_empty() {
        return Err(bad());
    }
    let now = tollgate_core::Clock::now(st.engine.clock());
    if let Err(e) = tollgate_core::Store::release(st.engine.store(), now, &keys, lease).await {
        tracing::warn!(error = %e, "lease release failed; it expires by its TTL");
    }
    Ok(json_response(StatusCode::OK, &json!({ "released": true })))
}

#[cfg(test)]
mod tests {
    use super::answer::{LimitAnswer, Writer, string};
    use super::*;
    use proptest::prelude::*;
    use serde::Serialize;

    /// The answer as it was serialised before [`answer::Writer`]: the
    /// reference its bytes are compared with.
    #[derive(Serialize)]
    struct CheckAnswer<'a> {
        allowed: bool,
        headers: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
        limits: Vec<LimitAnswer<'a>>,
        operation: &'a str,
        reason: Option<String>,
        retry_after_s: u64,
        status: u16,
    }

    fn written(a: &CheckAnswer<'_>, headers: &[(String, String)]) -> Vec<u8> {
        let mut list = HeaderList::default();
        for (n, v) in headers {
            list.push(n, v);
        }
        // Names escaped here, or given as JSON strings (as the policy's
        // table keeps them): the same bytes.
        let names: Vec<Vec<u8>> = a
            .limits
            .iter()
            .map(|l| serde_json::to_vec(l.name).expect("json"))
            .collect();
        let op = serde_json::to_vec(a.operation).expect("json");
        let write = |json: bool| {
            let mut w = Writer::with_capacity(16);
            w.head(a.allowed, &list);
            if let Some(l) = &a.lease {
                w.lease(l);
            }
            w.limits(a.limits.iter().zip(&names).map(|(l, n)| LimitAnswer {
                name_json: json.then_some(n.as_slice()),
                ..l.clone()
            }));
            w.tail(
                a.operation,
                json.then_some(op.as_slice()),
                a.reason.as_deref(),
                a.retry_after_s,
                a.status,
            );
            w.into_bytes()
        };
        let plain = write(false);
        assert_eq!(plain, write(true));
        plain
    }

    /// A test body of known length sent in the given pieces.
    struct Pieces(std::collections::VecDeque<bytes::Bytes>, u64);

    impl hyper::body::Body for Pieces {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            let next = self.0.pop_front();
            if let Some(p) = &next {
                self.1 -= p.len() as u64;
            }
            std::task::Poll::Ready(next.map(|p| Ok(hyper::body::Frame::data(p))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> hyper::body::SizeHint {
            hyper::body::SizeHint::with_exact(self.1)
        }
    }

    fn pieces(p: &[&'static str]) -> axum::body::Body {
        let len = p.iter().map(|p| p.len() as u64).sum();
        axum::body::Body::new(Pieces(
            p.iter()
                .map(|p| bytes::Bytes::from_static(p.as_bytes()))
                .collect(),
            len,
        ))
    }

    #[tokio::test]
    async fn a_body_in_one_piece_is_taken_whole_and_any_other_is_put_back() {
        use http_body_util::BodyExt;
        let one = whole_body(pieces(&[r#"{"account":"a"}"#])).await;
        assert_eq!(one.ok().as_deref(), Some(&br#"{"account":"a"}"#[..]));
        assert_eq!(
            whole_body(pieces(&[])).await.ok().as_deref(),
            Some(&b""[..])
        );
        // Two pieces: the first is put back in front of the rest, and the
        // size hint still adds up.
        let two = whole_body(pieces(&[r#"{"acc"#, r#"ount":"a"}"#]))
            .await
            .expect_err("put back");
        assert_eq!(hyper::body::Body::size_hint(&two).exact(), Some(15));
        let all = two.collect().await.expect("collect").to_bytes();
        assert_eq!(&all[..], br#"{"account":"a"}"#);
        // No announced length (chunked): untouched.
        let stream = axum::body::Body::from_stream(futures_util::stream::iter([Ok::<
            _,
            std::convert::Infallible,
        >(
            bytes::Bytes::from_static(b"{}"),
        )]));
        let back = whole_body(stream).await.expect_err("untouched");
        assert_eq!(
            &back.collect().await.expect("collect").to_bytes()[..],
            b"{}"
        );
        // Too large to take whole: untouched.
        let big: &'static str = Box::leak("x".repeat(ONE_PIECE_MAX as usize + 1).into_boxed_str());
        assert!(whole_body(pieces(&[big])).await.is_err());
    }

    #[test]
    fn header_list_is_written_like_the_sorted_map_it_replaces() {
        let pairs = [
            ("RateLimit-Policy", "\"a\";q=1"),
            ("Retry-After", "3"),
            ("RateLimit", "first"),
            ("RateLimit", "second \"quoted\""),
            ("X-Custom", "v"),
        ];
        let mut list = HeaderList::default();
        let mut map = BTreeMap::new();
        for (n, v) in pairs {
            list.push(n, v);
            map.insert(n, v);
        }
        // Values are kept escaped (as inside a JSON string), names as they are.
        let sorted: Vec<(&[u8], &[u8])> = list.sorted().collect();
        let escaped: Vec<(&str, String)> = map
            .into_iter()
            .map(|(n, v)| {
                let json = serde_json::to_string(v).expect("json");
                (n, json[1..json.len() - 1].to_owned())
            })
            .collect();
        let expected: Vec<(&[u8], &[u8])> = escaped
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        assert_eq!(sorted, expected);
        assert_eq!(HeaderList::default().sorted().count(), 0);
        // More headers than the sort keeps on the stack.
        let mut many = HeaderList::default();
        let names: Vec<String> = (0..40).map(|i| format!("H-{}", (i * 7) % 23)).collect();
        let mut map = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            let v = i.to_string();
            many.push(n, &v);
            map.insert(n.clone(), v);
        }
        let sorted: Vec<(&[u8], &[u8])> = many.sorted().collect();
        let expected: Vec<(&[u8], &[u8])> = map
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        assert_eq!(sorted, expected);
    }

    /// Header values written through [`headers::render_to`] into the list
    /// (escaped piece by piece) are those `headers::render` hands out,
    /// escaped: every profile, success and rejection, with and without
    /// credits, and values longer than `headers::render` writes.
    #[test]
    fn headers_rendered_into_the_list_match_render() {
        use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Request, policy};
        let long = "n".repeat(120);
        let profiles = [
            String::new(),
            "[headers]\nprofile = \"classic\"\n".to_owned(),
            "[headers]\nprofile = \"vendor\"\nsend_on = \"success\"\non_reject = [\"reset\", \"remaining\"]\nnames = { limit = \"X-V-Limit\", remaining = \"X-V-Left\", reset = \"X-V-Reset\", credits = \"X-V-Credits\", cost = \"X-V-Cost\" }\n".to_owned(),
            "[headers]\nprofile = \"none\"\n".to_owned(),
        ];
        let mut limits = String::new();
        for (i, name) in ["burst", "q\\\"uo", "daily"].iter().enumerate() {
            limits += &format!(
                "[limits.\"{name}\"]\nalgorithm = \"sliding_window\"\nlimit = {}\nwindow = \"3s\"\n",
                i + 1
            );
        }
        limits += "[limits.soft]\nalgorithm = \"sliding_window\"\nlimit = 1\nwindow = \"3s\"\nmode = \"soft\"\n";
        let mut many = String::new();
        for i in 0..12 {
            many += &format!(
                "[limits.{long}{i}]\nalgorithm = \"calendar_window\"\nlimit = 100\nwindow = \"day\"\n"
            );
        }
        let mut checked = 0;
        for src in profiles
            .iter()
            .map(|p| format!("{p}{limits}"))
            .chain([many])
        {
            let p = match policy::parse(&src, "t.toml") {
                Ok(p) => p,
                Err(e) => panic!("{e}\n{src}"),
            };
            let p = std::sync::Arc::new(p);
            // The limit names as JSON strings, as a running server has them.
            let names = crate::metric_cache::PolicyCounters::new(p.clone());
            let e = Engine::with_clock(
                MemoryStore::default(),
                ManualClock::new(Nanos::from_secs(86_400 * 100)),
            );
            let r = Request {
                account: "a",
                ..Request::new(p.default_plan, p.default_operation())
            };
            // The `RateLimit-Policy` value kept from the first rendering
            // and copied by the later ones: the same headers.
            let slot: [std::sync::OnceLock<PolicyValue>; 2] = Default::default();
            for _ in 0..3 {
                let d = e.decide_now(&p, &r);
                for kind in [
                    ResponseKind::Success,
                    ResponseKind::Rejected,
                    ResponseKind::Other,
                ] {
                    for credits in [None, Some(-7)] {
                        let mut expected = HeaderList::default();
                        headers::render(&p, &d, kind, credits, &mut |n, v| expected.push(n, v));
                        let mut list = HeaderList::default();
                        headers::render_to(&p, &d, kind, credits, &mut list);
                        if list.too_long {
                            checked += 1;
                            continue;
                        }
                        let got: Vec<_> = list.sorted().collect();
                        let want: Vec<_> = expected.sorted().collect();
                        assert_eq!(got, want, "{src}");
                        let mut kept =
                            HeaderList::with_text(b"junk".to_vec(), Some((&slot, true)), None);
                        headers::render_to(&p, &d, kind, credits, &mut kept);
                        let got: Vec<_> = kept.sorted().collect();
                        assert_eq!(got, want, "kept: {src}");
                        let mut named = HeaderList::with_text(Vec::new(), None, Some(&names));
                        headers::render_to(&p, &d, kind, credits, &mut named);
                        let got: Vec<_> = named.sorted().collect();
                        assert_eq!(got, want, "names: {src}");
                    }
                }
            }
        }
        // The long policy went over the limit of a value at least once.
        assert!(checked > 0);
    }

    /// A kept `RateLimit-Policy` value is copied only for the results it was
    /// written from: another plan's quota, or a limit in shadow for this
    /// caller, gets its own value written piece by piece (and kept nowhere).
    #[test]
    fn a_kept_policy_value_is_used_only_for_the_same_results() {
        use tollgate_core::{Engine, ManualClock, MemoryStore, Nanos, Request, policy};
        let src = r#"
            [policy]
            default_plan = "basic"
            [limits.burst]
            algorithm = "sliding_window"
            limit = 5
            window = "3s"
            [limits."da\"ily"]
            algorithm = "calendar_window"
            limit = 100
            window = "day"
            [limits.lease]
            algorithm = "concurrency"
            limit = 3
            lease_ttl = "30s"
            [limits.late]
            algorithm = "sliding_window"
            limit = 9
            window = "1m"
            rollout_after = "2020-01-01T00:00:00Z"
            [plans.basic]
            [plans.pro]
            overrides.burst = { limit = 50 }
        "#;
        let p = match policy::parse(src, "t.toml") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let e = Engine::with_clock(
            MemoryStore::default(),
            ManualClock::new(Nanos::from_secs(86_400 * 30_000)),
        );
        let plan = |name: &str| p.plan(name).expect("plan");
        let basic = Request {
            account: "a",
            account_created_at: Some(Nanos::from_secs(86_400 * 20_000)),
            ..Request::new(plan("basic"), p.default_operation())
        };
        let pro = Request {
            account: "b",
            ..Request::new(plan("pro"), p.default_operation())
        };
        let old = Request {
            account: "c",
            account_created_at: Some(Nanos::ZERO),
            ..basic
        };
        let slots: [std::sync::OnceLock<PolicyValue>; 2] = Default::default();
        let render = |d: &tollgate_core::Decision| {
            let mut want = HeaderList::default();
            headers::render(&p, d, ResponseKind::Success, None, &mut |n, v| {
                want.push(n, v)
            });
            let mut kept = HeaderList::with_text(Vec::new(), Some((&slots, true)), None);
            headers::render_to(&p, d, ResponseKind::Success, None, &mut kept);
            let want: Vec<(Vec<u8>, Vec<u8>)> = want
                .sorted()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            let got: Vec<(Vec<u8>, Vec<u8>)> = kept
                .sorted()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(got, want);
            got.into_iter()
                .find(|(n, _)| n == b"RateLimit-Policy")
                .map(|(_, v)| String::from_utf8(v).expect("utf-8"))
        };
        let kept = |i: usize| {
            slots[i]
                .get()
                .map(|v| String::from_utf8(v.escaped.to_vec()).expect("utf-8"))
        };
        let first = render(&e.decide_now(&p, &basic));
        assert_eq!(kept(0), first);
        assert!(
            first.as_deref().is_some_and(|v| v.contains("late")),
            "{first:?}"
        );
        assert_eq!(render(&e.decide_now(&p, &basic)), first);
        let pro = render(&e.decide_now(&p, &pro));
        assert!(
            pro.as_deref().is_some_and(|v| v.contains("q=50")),
            "{pro:?}"
        );
        assert_eq!(kept(1), pro);
        // Both slots taken: a third variant is written, not kept.
        let old = render(&e.decide_now(&p, &old));
        assert!(
            old.as_deref().is_some_and(|v| !v.contains("late")),
            "{old:?}"
        );
        assert_eq!((kept(0), kept(1)), (first.clone(), pro.clone()));
        assert_eq!(render(&e.decide_now(&p, &basic)), first);
    }

    #[test]
    fn strings_are_escaped_like_serde_json() {
        let mut all_bytes = String::new();
        for c in (0u8..0x80).map(char::from) {
            all_bytes.push(c);
        }
        for s in [
            "",
            "plain",
            "\"burst\";r=50;t=0",
            "back\\slash",
            &all_bytes,
            "é ✓ 𝄞 \u{7f}\u{80}",
            "\"",
            "a\"b\\c\nd",
            "fifteen chars!\"",
            "sixteen chars!!\"",
            "\u{0}",
            "\u{1f}\t",
            "\t\"\\",
            "é",
            "eight ch",
            "nine char",
            "\"7 \u{8}\"\"",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                serde_json::to_string(s).expect("json")
            );
        }
    }

    #[test]
    fn a_typical_answer_is_written_byte_for_byte() {
        let a = CheckAnswer {
            allowed: true,
            headers: BTreeMap::new(),
            lease: None,
            limits: vec![
                LimitAnswer {
                    cost: 0,
                    exceeded: false,
                    limit: 50,
                    mode: "enforce",
                    name: "burst",
                    name_json: None,
                    remaining: 50,
                    reset_s: 0,
                },
                LimitAnswer {
                    cost: 0,
                    exceeded: false,
                    limit: 1000,
                    mode: "enforce",
                    name: "daily",
                    name_json: None,
                    remaining: 1000,
                    reset_s: 2230,
                },
            ],
            operation: "default",
            reason: None,
            retry_after_s: 0,
            status: 200,
        };
        let headers = [
            (
                "RateLimit-Policy".to_owned(),
                "\"burst\";q=50;w=5, \"daily\";q=1000;w=86400".to_owned(),
            ),
            ("RateLimit".to_owned(), "\"burst\";r=50;t=0".to_owned()),
        ];
        let a = CheckAnswer {
            headers: headers.iter().cloned().collect(),
            ..a
        };
        let text = String::from_utf8(written(&a, &headers)).expect("utf-8");
        assert_eq!(
            text,
            r#"{"allowed":true,"headers":{"RateLimit":"\"burst\";r=50;t=0","RateLimit-Policy":"\"burst\";q=50;w=5, \"daily\";q=1000;w=86400"},"limits":[{"cost":0,"exceeded":false,"limit":50,"mode":"enforce","name":"burst","remaining":50,"reset_s":0},{"cost":0,"exceeded":false,"limit":1000,"mode":"enforce","name":"daily","remaining":1000,"reset_s":2230}],"operation":"default","reason":null,"retry_after_s":0,"status":200}"#
        );
        assert_eq!(text, serde_json::to_string(&a).expect("json"));
    }

    proptest! {
        #[test]
        fn any_answer_is_written_like_serde_json(
            allowed: bool,
            headers in proptest::collection::vec(("[A-Za-z-]{1,12}", any::<String>()), 0..5),
            lease in proptest::option::of("[0-9a-f.]{0,40}"),
            limits in proptest::collection::vec(
                (any::<u64>(), any::<bool>(), any::<u64>(), any::<String>(), any::<u64>(), any::<u64>()),
                0..4,
            ),
            operation: String,
            reason in proptest::option::of(any::<String>()),
            retry_after_s: u64,
            status: u16,
        ) {
            let limits: Vec<LimitAnswer<'_>> = limits
                .iter()
                .map(|(cost, exceeded, limit, name, remaining, reset_s)| LimitAnswer {
                    cost: *cost,
                    exceeded: *exceeded,
                    limit: *limit,
                    mode: if *exceeded { "soft" } else { "enforce" },
                    name,
                    name_json: None,
                    remaining: *remaining,
                    reset_s: *reset_s,
                })
                .collect();
            let a = CheckAnswer {
                allowed,
                // A later value of a name replaces an earlier one, as in the map.
                headers: headers.iter().cloned().collect(),
                lease,
                limits,
                operation: &operation,
                reason,
                retry_after_s,
                status,
            };
            prop_assert_eq!(
                String::from_utf8(written(&a, &headers)).expect("utf-8"),
                serde_json::to_string(&a).expect("json")
            );
        }
    }

    /// `tollgate_decision_seconds_count` in the `/metrics` text.
    fn decisions_timed(st: &Shared) -> u64 {
        let text = st.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_decision_seconds_count "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no decision_seconds_count in {text}"))
    }

    /// One `POST /v1/check` over HTTP/1.1; its status.
    async fn post_check(addr: SocketAddr, content_type: &str, body: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "POST /v1/check HTTP/1.1\r\nhost: t\r\ncontent-type: {content_type}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        let text = String::from_utf8_lossy(&answer);
        text.get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text}"))
    }

    /// Issue 4: a check records the decision-latency histogram the proxy
    /// records, once per decision, whichever path answers it (answered in
    /// place, the boxed path for an account not read yet, the router's
    /// extractor), and a check that decides nothing records nothing.
    #[tokio::test]
    async fn regression_4_every_check_decision_is_timed_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = crate::config::ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.path().to_path_buf(),
            ..crate::config::ServerConfig::default()
        };
        let policy = tollgate_core::policy::parse(crate::config::DEFAULT_POLICY, "default.toml")
            .expect("default policy");
        let running = crate::start(config, policy).await.expect("server starts");
        let st = running.state.clone();
        st.ledger
            .create_account(&tollgate_ledger::NewAccount {
                id: "acme".to_owned(),
                plan: "pro".to_owned(),
                org: None,
                created_at: None,
                grant: 0,
            })
            .await
            .expect("account");
        let key = st.ledger.create_key("acme", None).await.expect("key");
        let (addr, json) = (running.addr, "application/json");
        let by_account = r#"{"account":"acme","cost":0}"#;
        let by_key = format!(r#"{{"key":"{}","cost":0}}"#, key.key.expose());
        let mut timed = decisions_timed(&st);
        for (content_type, body, what) in [
            (json, by_account, "by account, not read yet (boxed path)"),
            (json, by_account, "by account, answered in place"),
            (json, by_key.as_str(), "by key, not read yet"),
            (json, by_key.as_str(), "by key, answered in place"),
            (
                "application/json; charset=utf-8",
                by_account,
                "the router's extractor",
            ),
            (
                json,
                r#"{"account":"ac\u006de","cost":0}"#,
                "an escaped string",
            ),
        ] {
            assert_eq!(post_check(addr, content_type, body).await, 200, "{what}");
            let now = decisions_timed(&st);
            assert_eq!(now, timed + 1, "{what}");
            timed = now;
        }
        for body in [
            r#"{"account":"nobody"}"#,
            r#"{"account":"acme","operation":"nope"}"#,
            r#"{"account":"acme""#,
        ] {
            assert_ne!(post_check(addr, json, body).await, 200, "{body}");
            assert_eq!(decisions_timed(&st), timed, "nothing decided: {body}");
        }
        running.shutdown().await;
    }

    /// `is_json` finds what `headers.get(CONTENT_TYPE)` finds: the first
    /// value of the name, among other headers, repeated names and none.
    #[test]
    fn is_json_reads_the_first_content_type_as_get_does() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("content-type", "application/json")],
            &[("content-type", "application/json; charset=utf-8")],
            &[("content-type", "text/plain")],
            &[("content-type", "Application/JSON")],
            &[
                ("host", "x"),
                ("content-type", "application/json"),
                ("x-a", "1"),
            ],
            &[
                ("content-type", "application/json"),
                ("content-type", "text/plain"),
            ],
            &[
                ("content-type", "text/plain"),
                ("content-type", "application/json"),
            ],
            &[("x-a", "1"), ("x-a", "2"), ("content-length", "4")],
            &[("x-content-type", "application/json")],
        ];
        for case in cases {
            let mut h = http::HeaderMap::new();
            for (n, v) in *case {
                h.append(
                    http::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                );
            }
            let by_get = h
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() == b"application/json");
            assert_eq!(is_json(&h), by_get, "{case:?}");
        }
    }

    /// An answer made in a request's map keeps that map's room and holds
    /// only its own header, whatever the map held (many names, repeated
    /// values): the same headers as in a new map.
    #[test]
    fn an_answer_in_a_used_map_has_only_its_content_type() {
        let mut h = http::HeaderMap::new();
        for i in 0..70 {
            h.append(
                http::HeaderName::try_from(format!("x-pad-{i}")).expect("a name"),
                HeaderValue::from_static("v"),
            );
            h.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        let room = h.capacity();
        let r = json_answer_whole(bytes::Bytes::from_static(b"{}"), h);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers().len(), 1);
        assert_eq!(r.headers().keys_len(), 1);
        assert_eq!(
            r.headers()
                .get_all(header::CONTENT_TYPE)
                .iter()
                .collect::<Vec<_>>(),
            [HeaderValue::from_static("application/json")]
        );
        assert_eq!(r.headers().capacity(), room, "the room is kept");
        let fresh = json_answer_whole(bytes::Bytes::from_static(b"{}"), http::HeaderMap::new());
        assert_eq!(fresh.headers(), r.headers());
        assert_eq!(fresh.version(), r.version());
    }
}

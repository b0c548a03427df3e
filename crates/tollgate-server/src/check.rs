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
use crate::state::{Caller, Shared, missing_key};

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
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    (json && len <= ONE_PIECE_MAX).then_some(len)
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
        Ok(Ok(answer)) => json_answer_whole(answer),
        Ok(Err(e)) => e.into_response().map(Either::Right),
        Err(_) => crate::connection::request_timeout_response().map(Either::Right),
    }
}

/// [`answer_whole`] without a future, when nothing waits: `body` parsed with
/// its strings borrowed, the caller read lately and the counter store in
/// memory ([`decide_check_now`]). `None` when something would wait (or the
/// body needs axum's parse): nothing was decided, call [`answer_whole`].
pub fn answer_now(st: &Shared, body: &[u8]) -> Option<Answered> {
    let req = std::str::from_utf8(body).ok().and_then(borrowed)?;
    Some(match decide_check_now(st, &req)? {
        Ok((answer, due)) => Answered {
            response: json_answer_whole(answer),
            due,
        },
        Err(e) => Answered {
            response: e.into_response().map(http_body_util::Either::Right),
            due: None,
        },
    })
}

/// A check's answer from [`answer_now`]: sent as it is ([`Answered::ready`]),
/// or once the events its decision made due are recorded ([`Answered::send`]).
pub struct Answered {
    response: http::Response<crate::connection::ResponseBody>,
    due: Option<Due>,
}

impl Answered {
    /// The answer, when no event is due; else itself, to [`Answered::send`].
    pub fn ready(self) -> Result<http::Response<crate::connection::ResponseBody>, Box<Answered>> {
        match self.due {
            None => Ok(self.response),
            Some(_) => Err(Box::new(self)),
        }
    }

    /// The answer, after the events due are recorded, within the request
    /// timeout `limit` (as [`answer_whole`]: a 504 past it).
    pub async fn send(
        self: Box<Self>,
        st: &Shared,
        limit: std::time::Duration,
    ) -> http::Response<crate::connection::ResponseBody> {
        let Some(due) = self.due else {
            return self.response;
        };
        let record = std::pin::pin!(due.crossings.record(&st.ledger, &due.identity.account));
        match crate::connection::within(limit, record).await {
            Ok(()) => self.response,
            Err(_) => {
                crate::connection::request_timeout_response().map(http_body_util::Either::Right)
            }
        }
    }
}

/// The `200` answer of a check, its bytes not boxed.
fn json_answer_whole(answer: Vec<u8>) -> http::Response<crate::connection::ResponseBody> {
    let mut r = http::Response::new(http_body_util::Either::Left(http_body_util::Full::new(
        bytes::Bytes::from(answer),
    )));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The answer to a check sent as JSON `body`: parsed with `serde_json`
/// borrowing its strings ([`borrowed`]); if that fails (an escaped string,
/// or an error) axum's `Json` parse runs on the same bytes, so every answer
/// and message is the router's.
async fn decide_body(st: &Shared, body: &[u8], peer: IpAddr) -> Result<Vec<u8>, ApiError> {
    match std::str::from_utf8(body).ok().and_then(borrowed) {
        Some(r) => decide_check(st, &r, peer).await,
        None => match Json::<CheckRequest>::from_bytes(body) {
            Ok(Json(r)) => decide_check(st, &r, peer).await,
            Err(e) => Err(rejected(e)),
        },
    }
}

/// The check in `body`, its strings borrowed from it (parsed as a `&str`:
/// `serde_json::from_slice` would check each string for UTF-8 again). `None`
/// when it is not a valid check or holds an escaped string: the caller then
/// runs axum's parse for its answer and messages.
fn borrowed(body: &str) -> Option<CheckRequest<&str>> {
    serde_json::from_str(body).ok()
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
) -> Result<Vec<u8>, ApiError> {
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
type Checked = (Vec<u8>, Option<Due>);

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
) -> Option<Result<(Vec<u8>, crate::events::SoftCrossings), ApiError>> {
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
    Some(
        decide_in_memory(st, policy, &core_req)?
            .map(|d| answer_decision(st, policy, input.op, caller, &d)),
    )
}

/// [`decide_caller_now`] on a store that waits (Redis).
async fn decide_caller<S: AsRef<str> + Ord>(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest<S>,
    caller: &Caller,
) -> Result<(Vec<u8>, crate::events::SoftCrossings), ApiError> {
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
) -> (Vec<u8>, crate::events::SoftCrossings) {
    let crossings = crate::metric_cache::count_decision(
        st,
        policy,
        op,
        caller.plan,
        d,
        Some(&caller.identity.account),
    );
    (write_answer(policy, op, d), crossings)
}

/// The JSON answer to decision `d` of operation `op`.
fn write_answer(
    policy: &tollgate_core::policy::CompiledPolicy,
    op: tollgate_core::policy::OperationId,
    d: &tollgate_core::Decision,
) -> Vec<u8> {
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
    let mut hdrs = HeaderList::default();
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
    let mut out = answer::Writer::with_capacity(768);
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
        remaining: r.eval.remaining,
        reset_s: tollgate_core::clock::ceil_secs(r.eval.reset),
    }));
    out.tail(
        &policy.operations[usize::from(op)].name,
        reason.as_deref(),
        retry_after_s,
        status,
    );
    out.into_bytes()
}

/// The decision of `req` when the counter store is in memory, decided in
/// place: `Engine::decide` then finishes in its first poll (nothing waits in
/// memory), so its future (sized for the store's network path) is neither
/// kept in the check's future nor moved. `None` for another store: await
/// `Engine::decide`. An in-memory decision that waited (it cannot) is
/// answered 503 rather than decided twice.
fn decide_in_memory(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &tollgate_core::Request<'_>,
) -> Option<Result<tollgate_core::Decision, ApiError>> {
    use std::future::Future;
    tollgate_core::Store::as_memory(st.engine.store())?;
    let decide = std::pin::pin!(st.engine.decide(policy, req));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    Some(match decide.poll(&mut cx) {
        std::task::Poll::Ready(d) => Ok(d),
        std::task::Poll::Pending => {
            tracing::error!("an in-memory decision waited; answered 503");
            Err(ApiError::unavailable("counter store"))
        }
    })
}

/// The headers of a check answer: names and values in one buffer, written as
/// a JSON object sorted by name, a later value of a name replacing an
/// earlier one (as the `BTreeMap<String, String>` it replaces did). Values
/// are kept JSON-escaped (without their quotes), names as they are. Filled
/// by `headers::render_to` (escaping each piece as it comes, so a value is
/// never copied or scanned again), or by [`HeaderList::push`].
#[derive(Default)]
struct HeaderList {
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
}

impl HeaderList {
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

impl HeaderList {
    /// A number's digits (nothing to escape).
    fn digits(&mut self, s: &str) {
        if self.raw(s.len()) {
            self.reserve();
            self.text.extend_from_slice(s.as_bytes());
        }
    }
}

impl headers::HeaderSink for HeaderList {
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

    fn end(&mut self, name: &str) {
        self.reserve();
        let (v, n) = (self.value_start, self.text.len());
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

impl HeaderList {
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
fn json_answer(status: StatusCode, bytes: Vec<u8>) -> Response {
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
        pub fn with_capacity(n: usize) -> Writer {
            Writer {
                out: Vec::with_capacity(n),
            }
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
                string(out, l.name);
                out.extend_from_slice(b",\"remaining\":");
                number(out, l.remaining);
                out.extend_from_slice(b",\"reset_s\":");
                number(out, l.reset_s);
                out.push(b'}');
            }
            self.out.push(b']');
        }

        /// `,"operation":…,"reason":…,"retry_after_s":…,"status":…}`
        pub fn tail(
            &mut self,
            operation: &str,
            reason: Option<&str>,
            retry_after_s: u64,
            status: u16,
        ) {
            let out = &mut self.out;
            out.extend_from_slice(b",\"operation\":");
            string(out, operation);
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
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
        w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0
            || zero_in(w ^ (ONES * u64::from(b'"')))
            || zero_in(w ^ (ONES * u64::from(b'\\')))
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
        let mut w = Writer::with_capacity(16);
        w.head(a.allowed, &list);
        if let Some(l) = &a.lease {
            w.lease(l);
        }
        w.limits(a.limits.iter().cloned());
        w.tail(a.operation, a.reason.as_deref(), a.retry_after_s, a.status);
        w.into_bytes()
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
            let e = Engine::with_clock(
                MemoryStore::default(),
                ManualClock::new(Nanos::from_secs(86_400 * 100)),
            );
            let r = Request {
                account: "a",
                ..Request::new(p.default_plan, p.default_operation())
            };
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
                    }
                }
            }
        }
        // The long policy went over the limit of a value at least once.
        assert!(checked > 0);
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
                    remaining: 50,
                    reset_s: 0,
                },
                LimitAnswer {
                    cost: 0,
                    exceeded: false,
                    limit: 1000,
                    mode: "enforce",
                    name: "daily",
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
}

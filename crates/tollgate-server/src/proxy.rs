//! The proxy: identify → operation → payload rules → credits → limits →
//! forward (with bounded retries) → settle credits → headers.
//!
//! Settling: a 2xx answer commits the reservation — or, when the operation
//! sets `credits_from_header`, the whole number the upstream reports in that
//! header, capped at the reservation (missing or invalid: the reservation);
//! any other answer releases it.
//!
//! Order matters for "a rejected request consumes nothing": credits are
//! reserved first and released if a limit refuses; limits take their cost
//! only when every enforced limit admits. A body is buffered only when the
//! operation needs to look at it (payload rules, a body attribute) or when a
//! retry may need to replay it, and never beyond its cap; otherwise it
//! streams straight through. Early answers (401/413/429/402…) are sent
//! without reading the rest of the body, and hyper then closes the
//! connection instead of reusing it, so nothing left in the socket can be
//! read as a next request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Either, Limited};
use serde_json::json;
use sha2::Digest;
use tollgate_core::headers::{self, ResponseKind};
use tollgate_core::policy::{Action, AttributeSource, CompiledPolicy, Operation, Respond};
use tollgate_core::{Decision, Outcome};
use tollgate_ledger::{Idempotency, ReservationId, ReserveOutcome, StoredResponse};

use crate::client_ip::client_ip;
use crate::connection::ResponseBody;
use crate::error::{ApiError, ErrorChain, json_response};
use crate::events;
use crate::metric_cache;
use crate::metrics::{CreditLabels, Metrics, UpstreamLabels};
use crate::payload;
use crate::state::{Caller, Shared};

mod rate_headers;
mod tls;
mod upstream;
pub use tls::{HandshakeError, UpstreamTls};
pub use upstream::{UpstreamBody, UpstreamClient, UpstreamError};

/// Longest idempotent response body kept for replay.
pub const STORED_BODY_MAX: u64 = 64 * 1024;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// Every route that is not tollgate's own goes through here.
pub async fn handle(
    State(st): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    handle_direct(&st, &Peer::new(peer), req)
        .await
        .map(crate::connection::boxed)
}

/// The proxy, called without the router (see `route` in the crate root),
/// for a request from `peer` (made once per connection). A forwarded
/// answer's body is the upstream's own ([`UpstreamBody`]), not boxed into an
/// axum body: no allocation, error mapping or dynamic call per frame on the
/// way to hyper (same frames, size hints and end of stream).
pub async fn handle_direct(st: &Shared, peer: &Peer, req: Request) -> http::Response<ResponseBody> {
    // The proxy future is large (every await point's locals); boxing it here
    // moves it once instead of copying it through the connection's layers.
    // The box is allocated first and the future written into it, so that
    // the compiler builds it there rather than on the stack and then copying
    // all of it (≈ 8.8 KB, most of it not yet in use) into the box.
    let place = Box::new_uninit();
    let fut = Box::into_pin(Box::write(place, proxy(st, peer, req)));
    match fut.await {
        Ok(r) => r,
        Err(e) => e.into_response().map(Either::Right),
    }
}

async fn proxy(
    st: &Shared,
    peer: &Peer,
    req: Request,
) -> Result<http::Response<ResponseBody>, ApiError> {
    let policy = st.policy.load_full();
    let (parts, body) = req.into_parts();
    let client = client_ip(peer.addr.ip(), &parts.headers, &st.config.trusted_proxies);
    let caller = st.authenticate(&parts.headers, &policy, client).await?;
    let op_id = policy
        .operation_for(parts.method.as_str(), parts.uri.path())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no operation matches {} {}",
                parts.method,
                parts.uri.path()
            ))
        })?;
    let op = &policy.operations[usize::from(op_id)];

    // Body: buffered only when needed, never beyond its cap.
    let length = content_length(&parts.headers);
    let max_body = op.payload.as_ref().and_then(|p| p.max_body);
    if let (Some(max), Some(len)) = (max_body, length)
        && len > max
    {
        return Err(payload::too_large(max));
    }
    let needs_body = op.payload.is_some()
        || op.attribute_sources.iter().flatten().any(|s| {
            matches!(
                s,
                AttributeSource::Json(_) | AttributeSource::MultipartFilename
            )
        });
    let may_retry = op.retry && policy.upstream.retries > 0;
    // Replayable: a body of known size within the replay cap, or no body at all.
    // A chunked body of unknown size streams through and is not retried.
    let replayable = may_retry
        && match length {
            Some(len) => len <= policy.upstream.replay_body_max,
            None => !parts.headers.contains_key(header::TRANSFER_ENCODING),
        };
    let (buffered, body) = if needs_body || replayable {
        let cap = if needs_body {
            max_body.unwrap_or(st.config.inspect_body_max)
        } else {
            policy.upstream.replay_body_max
        };
        (Some(read_body(body, cap).await?), None)
    } else {
        (None, Some(body))
    };
    let inspection = match (&buffered, needs_body) {
        (Some(b), true) => {
            payload::inspect(header_str(&parts.headers, header::CONTENT_TYPE), b.clone()).await?
        }
        _ => payload::Inspection::default(),
    };
    if let Some(rules) = &op.payload {
        payload::check(rules, &inspection)?;
    }

    // Credits first, so a refused request can give them back. The ledger's
    // futures are large and off the common path: boxed where awaited, the
    // proxy future stays small (it is moved into a box per request).
    let reservation = if op.credits == 0 {
        Reserved::Ready(None)
    } else {
        Box::pin(reserve(st, &policy, op, &caller, &parts, buffered.as_ref())).await?
    };
    let reservation = match reservation {
        Reserved::Ready(r) => r,
        Reserved::Answer(resp) => return Ok(resp.map(Either::Right)),
    };

    // Limits. The client's address as text: the connection's, made once,
    // unless a trusted proxy forwarded the request.
    let forwarded;
    let ip = if client == peer.addr.ip() {
        peer.text.as_ref()
    } else {
        forwarded = IpText::new(client);
        forwarded.as_str()
    };
    let attrs = attribute_values(&policy, op, &parts, &inspection);
    let attr_refs: Vec<Option<&str>> = attrs.iter().map(|a| a.as_deref()).collect();
    // [`decide`]'s work, in place: a `Decision` is over 1.5 KB, and one
    // returned through `decide`'s future was copied twice more. In memory
    // (nothing waits) it is built here without a future (the same work as
    // `Engine::decide` does for that store), which saves one more copy.
    let started = tokio::time::Instant::now();
    let request = caller.request(op_id, ip, &attr_refs);
    let decision = match st.engine.decide_in_memory(&policy, &request) {
        Some(decision) => decision,
        None => st.engine.decide(&policy, &request).await,
    };
    // The reading that ends the decision's latency also starts the
    // upstream exchange (its latency and timeout; see `decided`).
    let decided_at = decided(st, &policy, op_id, &caller, started, &decision).await;
    // From here on, every way out gives the leases back: the response body's
    // end, an error, or the client going away (the future is dropped).
    let lease = LeaseGuard::new(st, &decision);
    match decision.outcome {
        Outcome::Admitted | Outcome::Forwarded { .. } => {}
        _ => {
            if let Some((id, _)) = &reservation {
                let _ = Box::pin(st.ledger.release(id.clone())).await;
            }
            return Ok(refusal(st, &policy, &decision, &caller).map(Either::Right));
        }
    }

    // Answered by tollgate itself.
    if let Some(respond) = op.respond {
        if let Some((id, _)) = &reservation {
            let _ = Box::pin(st.ledger.release(id.clone())).await;
        }
        let balance = st.ledger.balance(&caller.identity.account).await?;
        let body = match respond {
            Respond::Balance => json!({ "credits": { "available": balance } }),
            Respond::Account => {
                Box::pin(crate::account::account_json(st, &policy, &caller, balance)).await
            }
        };
        let mut resp = json_response(StatusCode::OK, &body);
        add_rate_headers(
            &policy,
            &decision,
            ResponseKind::Success,
            Some(balance),
            resp.headers_mut(),
        );
        return Ok(with_lease(resp, lease).map(Either::Right));
    }

    // Forward.
    let marker = match decision.outcome {
        Outcome::Forwarded { limit } => match &policy.limits[usize::from(limit)].on_exceed {
            Action::Forward { header } => Some((
                header.clone(),
                policy.limits[usize::from(limit)].name.clone(),
            )),
            Action::Reject { .. } => None,
        },
        _ => None,
    };
    let upstream_req = UpstreamRequest {
        parts: &parts,
        caller: &caller,
        marker: marker.as_ref(),
        peer,
        key_header: &policy.key_header,
    };
    let attempts = if may_retry && body.is_none() {
        policy.upstream.retries
    } else {
        0
    };
    let result = send_with_retries(
        st,
        &policy,
        &upstream_req,
        buffered,
        body,
        attempts,
        decided_at,
    )
    .await;
    let upstream = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some((id, _)) = &reservation {
                let _ = Box::pin(st.ledger.release(id.clone())).await;
            }
            return Err(e);
        }
    };

    // Settle credits on the upstream's status. The answer is changed in
    // place (its headers, rarely its body) and goes out as it is: each move
    // of an answer between parts and whole is a copy of about 200 bytes.
    let status = upstream.status();
    let mut resp: http::Response<ResponseBody> = upstream.map(|b| Either::Left(Either::Right(b)));
    let mut balance = None;
    if let Some((id, reserved)) = reservation {
        if status.is_success() {
            // The upstream may report what the request really used (never
            // more than was reserved; see `Operation::credits_used`).
            let reported = op
                .credits_from_header
                .as_deref()
                .and_then(|h| resp.headers().get(h))
                .map(HeaderValue::as_bytes);
            let amount =
                i64::try_from(op.credits_used(u64::try_from(reserved).unwrap_or(0), reported))
                    .unwrap_or(reserved);
            let stored = if has_idempotency_key(&parts.headers) {
                let ct = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_owned);
                let small = content_length(resp.headers()).is_some_and(|l| l <= STORED_BODY_MAX);
                // The upstream's body (read when small, otherwise dropped:
                // its connection closes) is replaced by the stored bytes.
                let bytes = match std::mem::replace(resp.body_mut(), Either::Right(Body::empty())) {
                    Either::Left(Either::Right(upstream)) if small => {
                        read_body(Body::new(upstream), STORED_BODY_MAX)
                            .await
                            .unwrap_or_default()
                    }
                    _ => Bytes::new(),
                };
                *resp.body_mut() = Either::Right(Body::from(bytes.clone()));
                Some(StoredResponse {
                    status: status.as_u16(),
                    content_type: ct,
                    body: bytes.to_vec(),
                })
            } else {
                None
            };
            // Events of the charge go to the outbox in the charge's transaction.
            let low_below = policy.plans[usize::from(caller.plan)]
                .credits_low
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
            let events = tollgate_ledger::CommitEvents {
                charged: st.config.webhooks.charge_events,
                low_below,
            };
            let after = Box::pin(
                st.ledger
                    .commit_with_events(id, amount, stored.as_ref(), events),
            )
            .await?;
            st.metrics
                .credits_charged
                .inc_by(u64::try_from(amount).unwrap_or(0));
            balance = Some(after);
        } else {
            balance = Some(Box::pin(st.ledger.release(id)).await?);
        }
    } else if policy
        .headers
        .fields
        .contains(&tollgate_core::policy::HeaderField::Credits)
        && status.is_success()
    {
        balance = st.ledger.balance(&caller.identity.account).await.ok();
    }
    strip_hop_by_hop(resp.headers_mut());
    let kind = if status.is_success() {
        ResponseKind::Success
    } else {
        ResponseKind::Other
    };
    add_rate_headers(&policy, &decision, kind, balance, resp.headers_mut());
    Ok(match lease {
        None => resp,
        lease => with_lease(resp.map(crate::connection::boxed), lease).map(Either::Right),
    })
}

/// The class of an upstream exchange, as counted in `upstream_responses`.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamClass {
    /// An answer, by the first digit of its status (2 to 5; others count as 5xx).
    Status(u8),
    /// No answer within the upstream timeout.
    Timeout,
    /// No answer: the connection or the exchange failed.
    Error,
}

impl UpstreamClass {
    /// The class of an answer with `status`.
    pub fn of_status(status: u16) -> UpstreamClass {
        // As `metrics::class`: 2xx, 3xx, 4xx, and everything else 5xx.
        UpstreamClass::Status(match status / 100 {
            2 => 2,
            3 => 3,
            4 => 4,
            _ => 5,
        })
    }

    fn index(self) -> usize {
        match self {
            UpstreamClass::Status(d) => usize::from(d.clamp(2, 5) - 2),
            UpstreamClass::Timeout => 4,
            UpstreamClass::Error => 5,
        }
    }

    fn label(self) -> &'static str {
        ["2xx", "3xx", "4xx", "5xx", "timeout", "error"][self.index()]
    }
}

/// Handles to the `upstream_responses` counters, one per class, made on
/// first use (the family's `get_or_create`, so a series still appears only
/// once it has been counted): counting an exchange is then an atomic add,
/// not a label `String` hashed into the family under its lock.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    classes: [std::sync::OnceLock<prometheus_client::metrics::counter::Counter>; 6],
}

impl UpstreamCounters {
    /// The counter of `class` in `metrics`' `upstream_responses` family.
    pub fn class(
        &self,
        metrics: &Metrics,
        class: UpstreamClass,
    ) -> &prometheus_client::metrics::counter::Counter {
        self.classes[class.index()].get_or_init(|| {
            metrics
                .upstream
                .get_or_create(&UpstreamLabels {
                    class: class.label().to_owned(),
                })
                .clone()
        })
    }
}

enum Reserved {
    /// The reservation (if the operation costs credits) and its amount.
    Ready(Option<(ReservationId, i64)>),
    /// Answer now (402, idempotent replay, conflict).
    Answer(Response),
}

async fn reserve(
    st: &Shared,
    policy: &CompiledPolicy,
    op: &Operation,
    caller: &Caller,
    parts: &Parts,
    body: Option<&Bytes>,
) -> Result<Reserved, ApiError> {
    if op.credits == 0 {
        return Ok(Reserved::Ready(None));
    }
    let amount = i64::try_from(op.credits).unwrap_or(i64::MAX);
    let idem = header_str(&parts.headers, names::IDEMPOTENCY_KEY)
        .filter(|k| !k.is_empty())
        .map(|key| {
            let mut h = sha2::Sha256::new();
            h.update(parts.method.as_str().as_bytes());
            h.update(b" ");
            h.update(parts.uri.path().as_bytes());
            h.update(b"\n");
            match body {
                Some(b) => h.update(b),
                None => h.update(content_length(&parts.headers).unwrap_or(0).to_le_bytes()),
            }
            let fingerprint: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Idempotency {
                key: key.chars().take(255).collect(),
                fingerprint,
            }
        });
    match st
        .ledger
        .reserve(
            &caller.identity.account,
            amount,
            idem.as_ref(),
            st.config.reservation_ttl,
        )
        .await?
    {
        ReserveOutcome::Reserved { id, .. } => Ok(Reserved::Ready(Some((id, amount)))),
        ReserveOutcome::Insufficient { balance } => {
            st.metrics
                .credits_refused
                .get_or_create(&CreditLabels {
                    plan: policy.plans[usize::from(caller.plan)].name.clone(),
                    operation: op.name.clone(),
                })
                .inc();
            events::record(
                &st.ledger,
                &caller.identity.account,
                "credits_exhausted",
                json!({ "balance": balance, "needed": amount }),
            )
            .await;
            let status = StatusCode::from_u16(policy.credits.exhausted_status)
                .unwrap_or(StatusCode::PAYMENT_REQUIRED);
            let mut resp = match &policy.credits.exhausted_body {
                Some(body) => {
                    let mut r = (status, body.clone()).into_response();
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    r
                }
                None => ApiError::new(
                    status,
                    "insufficient_credits",
                    format!("this request costs {amount} credits; the balance is {balance}"),
                )
                .with("balance", balance)
                .with("cost", amount)
                .into_response(),
            };
            resp.headers_mut()
                .insert("x-credits-remaining", HeaderValue::from(balance));
            Ok(Reserved::Answer(resp))
        }
        ReserveOutcome::InProgress => Ok(Reserved::Answer(
            ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still being processed; retry shortly",
            )
            .into_response(),
        )),
        ReserveOutcome::Mismatch => Ok(Reserved::Answer(
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_mismatch",
                "this Idempotency-Key was used for a different request",
            )
            .into_response(),
        )),
        ReserveOutcome::Completed(stored) => {
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let mut resp = (status, stored.body).into_response();
            if let Some(ct) = stored
                .content_type
                .and_then(|c| HeaderValue::from_str(&c).ok())
            {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(Reserved::Answer(resp))
        }
    }
}

/// Decides the request and records metrics and events.
pub async fn decide(
    st: &Shared,
    policy: &CompiledPolicy,
    op: tollgate_core::policy::OperationId,
    caller: &Caller,
    ip: &str,
    attrs: &[Option<&str>],
) -> Decision {
    let req = caller.request(op, ip, attrs);
    let started = tokio::time::Instant::now();
    let decision = st.engine.decide(policy, &req).await;
    decided(st, policy, op, caller, started, &decision).await;
    decision
}

/// The decision-latency histogram (from `started`), metrics and events of a
/// caller's decision: what [`decide`] and the proxy handler record.
///
/// Returns the reading of the clock that ended the decision's latency, for
/// the proxy to start its upstream exchange with (one reading instead of
/// two, microseconds apart); a fresh one when recording the decision waited
/// on the ledger (a limit's threshold crossed), so that the upstream's
/// timeout never includes that write.
async fn decided(
    st: &Shared,
    policy: &CompiledPolicy,
    op: tollgate_core::policy::OperationId,
    caller: &Caller,
    started: tokio::time::Instant,
    d: &Decision,
) -> tokio::time::Instant {
    // A monotonic reading (the engine's clock is the wall clock, which costs
    // more to read and can step).
    let ended = tokio::time::Instant::now();
    st.metrics
        .decision_seconds
        .observe(ended.saturating_duration_since(started).as_secs_f64());
    let waited = record_decision(
        st,
        policy,
        op,
        caller.plan,
        d,
        Some(&caller.identity.account),
    )
    .await;
    if waited {
        tokio::time::Instant::now()
    } else {
        ended
    }
}

/// Metrics and events of one decision; `true` when events were written to
/// the ledger (awaited: a limit's threshold was crossed).
pub async fn record_decision(
    st: &Shared,
    policy: &CompiledPolicy,
    op: tollgate_core::policy::OperationId,
    plan: tollgate_core::policy::PlanId,
    d: &Decision,
    account: Option<&str>,
) -> bool {
    let crossings = metric_cache::count_decision(st, policy, op, plan, d, account);
    if let Some(account) = account
        && !crossings.is_empty()
    {
        Box::pin(crossings.record(&st.ledger, account)).await;
        return true;
    }
    false
}

/// The answer to a refused decision.
pub fn refusal(
    st: &Shared,
    policy: &Arc<CompiledPolicy>,
    d: &Decision,
    caller: &Caller,
) -> Response {
    // Store errors are counted by kind in `record_decision`.
    let _ = (st, caller);
    match d.outcome {
        Outcome::StoreUnavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the counter store is unavailable; try again shortly",
        )
        .into_response(),
        Outcome::CostAboveCapacity { limit } => {
            let name = &policy.limits[usize::from(limit)].name;
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "cost_exceeds_limit",
                format!("this request costs more than limit `{name}` can ever hold"),
            )
            .with("limit", name.as_str())
            .into_response()
        }
        Outcome::Rejected { limit } => {
            let l = &policy.limits[usize::from(limit)];
            let retry = tollgate_core::clock::ceil_secs(d.retry_after()).max(1);
            let mut resp = match &l.on_exceed {
                Action::Reject {
                    status,
                    body: Some((body, ct)),
                } => {
                    let mut r = (
                        StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                        body.clone(),
                    )
                        .into_response();
                    if let Ok(v) = HeaderValue::from_str(ct) {
                        r.headers_mut().insert(header::CONTENT_TYPE, v);
                    }
                    r
                }
                Action::Reject { status, body: None } if policy.headers.problem_json => {
                    let mut r = (
                        StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                        headers::problem_details(policy, d),
                    )
                        .into_response();
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/problem+json"),
                    );
                    r
                }
                Action::Reject { status, .. } => ApiError::new(
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                    "rate_limited",
                    format!("limit `{}` exceeded; retry after {retry} s", l.name),
                )
                .with("limit", l.name.as_str())
                .with("retry_after_s", retry)
                .into_response(),
                Action::Forward { .. } => StatusCode::TOO_MANY_REQUESTS.into_response(),
            };
            add_rate_headers(policy, d, ResponseKind::Rejected, None, resp.headers_mut());
            resp
        }
        Outcome::Admitted | Outcome::Forwarded { .. } => StatusCode::OK.into_response(),
    }
}

/// Adds the policy's rate-limit headers (see [`rate_headers`]).
pub fn add_rate_headers(
    policy: &Arc<CompiledPolicy>,
    d: &Decision,
    kind: ResponseKind,
    credits: Option<i64>,
    out: &mut HeaderMap,
) {
    rate_headers::add(policy, d, kind, credits, out);
}

/// Header names checked at compile time (a `&str` name, or
/// `HeaderName::from_static` outside a constant, is parsed and checked on
/// every use).
mod names {
    use axum::http::HeaderName;

    pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
    pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
    pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    pub const X_RATELIMIT_COST: HeaderName = HeaderName::from_static("x-ratelimit-cost");
    pub const X_CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
    pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const TOLLGATE_ACCOUNT: HeaderName = HeaderName::from_static("tollgate-account");
}

/// The connection's peer as the proxy uses it, made once per connection
/// (not per request): its address, its text (a limit's `ip` scope when the
/// peer is the client) and that text as the `X-Forwarded-For` value the
/// upstream gets (shared by reference count).
pub struct Peer {
    addr: SocketAddr,
    text: Box<str>,
    forwarded_for: Option<HeaderValue>,
}

impl Peer {
    /// The peer at `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        let text = IpText::new(addr.ip());
        Peer {
            addr,
            text: text.as_str().into(),
            forwarded_for: HeaderValue::from_str(text.as_str()).ok(),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Peer").field(&self.addr).finish()
    }
}

/// An IP address written on the stack (no `String`).
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: std::net::IpAddr) -> IpText {
        use std::io::Write;
        let mut buf = [0u8; 48];
        if let std::net::IpAddr::V4(v4) = ip {
            // Dotted decimal without the formatting machinery (which costs
            // about 1,000 instructions per address); the same text.
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let d = digits.format(octet).as_bytes();
                buf[len..len + d.len()].copy_from_slice(d);
                len += d.len();
            }
            return IpText { buf, len };
        }
        let mut w: &mut [u8] = &mut buf;
        // 48 bytes hold any IPv6 text (at most 45).
        let _ = write!(w, "{ip}");
        let len = 48 - w.len();
        IpText { buf, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// Holds the decision's concurrency leases until the response body ends or
/// the client goes away.
fn with_lease(resp: Response, guard: Option<LeaseGuard>) -> Response {
    let Some(guard) = guard else {
        return resp;
    };
    let (parts, body) = resp.into_parts();
    let stream = body.into_data_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Releases a decision's concurrency leases when dropped.
struct LeaseGuard {
    st: Shared,
    /// Boxed: a `Decision` is large, and the guard lives across the proxy's awaits.
    decision: Box<Decision>,
}

impl LeaseGuard {
    /// A guard when `decision` holds leases (an admitted request with a
    /// concurrency limit); `None` otherwise.
    fn new(st: &Shared, decision: &Decision) -> Option<LeaseGuard> {
        decision.lease.as_ref()?;
        Some(LeaseGuard {
            st: Arc::clone(st),
            decision: Box::new(decision.clone()),
        })
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Release off the dropping thread: a remote store needs a round trip.
        // If no runtime is left (shutdown), the lease expires by its TTL.
        let st = Arc::clone(&self.st);
        let decision = self.decision.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = st.engine.release(&decision).await {
                    tracing::warn!(error = %e, "lease release failed; it expires by its TTL");
                }
            });
        }
    }
}

fn attribute_values(
    policy: &CompiledPolicy,
    op: &Operation,
    parts: &Parts,
    ins: &payload::Inspection,
) -> Vec<Option<String>> {
    (0..policy.attributes.len())
        .map(
            |i| match op.attribute_sources.get(i).and_then(Option::as_ref)? {
                AttributeSource::Header(h) => {
                    header_str(&parts.headers, h.as_str()).map(str::to_owned)
                }
                AttributeSource::Query(q) => query_param(parts.uri.query().unwrap_or(""), q),
                AttributeSource::Json(f) => ins.json_field(f).map(str::to_owned),
                AttributeSource::MultipartFilename => ins.file_name.clone(),
            },
        )
        .collect()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

struct UpstreamRequest<'a> {
    parts: &'a Parts,
    caller: &'a Caller,
    marker: Option<&'a (String, String)>,
    peer: &'a Peer,
    key_header: &'a str,
}

enum Attempt {
    /// A retryable status; the upstream's Retry-After, if any.
    Status(Response<UpstreamBody>, Option<Duration>),
    /// No answer.
    Failed(ApiError, bool),
}

/// `decided_at`: a reading of the clock taken just before (the decision's
/// end), which starts the first attempt; a retry reads the clock anew.
async fn send_with_retries(
    st: &Shared,
    policy: &CompiledPolicy,
    req: &UpstreamRequest<'_>,
    buffered: Option<Bytes>,
    streaming: Option<Body>,
    retries: u32,
    decided_at: tokio::time::Instant,
) -> Result<Response<UpstreamBody>, ApiError> {
    let retry_on = &policy.upstream.retry_on;
    let timeout = policy.upstream.timeout;
    if let Some(body) = streaming {
        // An empty body can be sent again as it is (see `attempt`), and
        // cannot break: it goes as it is.
        let empty = Bytes::new();
        let (body, replay, broken) = if hyper::body::Body::is_end_stream(&body) {
            (body, Some(&empty), None)
        } else {
            // A request body that breaks while streaming (truncated,
            // malformed chunking) is the client's fault: 400, not 502 for
            // the upstream.
            let broken = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&broken);
            let body = Body::new(body.map_err(move |e| {
                flag.store(true, Ordering::Relaxed);
                e
            }));
            (body, None, Some(broken))
        };
        return match attempt(st, req, body, replay, timeout, retry_on, decided_at).await {
            Ok(r) | Err(Attempt::Status(r, _)) => Ok(r),
            Err(Attempt::Failed(_, _))
                if broken.as_ref().is_some_and(|b| b.load(Ordering::Relaxed)) =>
            {
                Err(ApiError::bad_request(
                    "the request body could not be read (truncated or malformed)",
                ))
            }
            Err(Attempt::Failed(e, _)) => Err(e),
        };
    }
    let bytes = buffered.unwrap_or_default();
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.upstream.backoff)
        .with_max_delay(policy.upstream.max_backoff)
        .with_max_times(retries as usize)
        .with_jitter();
    let max_backoff = policy.upstream.max_backoff;
    // The first attempt starts from `decided_at`; a retry, after its
    // back-off, from a reading of its own.
    let mut first = Some(decided_at);
    let result = (|| {
        attempt(
            st,
            req,
            Body::from(bytes.clone()),
            Some(&bytes),
            timeout,
            retry_on,
            first.take().unwrap_or_else(tokio::time::Instant::now),
        )
    })
    .retry(backoff)
    .sleep(tokio::time::sleep)
    .when(|e| match e {
        Attempt::Status(..) => true,
        Attempt::Failed(_, retryable) => *retryable,
    })
    .adjust(move |e, d| match e {
        Attempt::Status(_, Some(wait)) => d.map(|d| d.max((*wait).min(max_backoff))),
        _ => d,
    })
    .notify(|_, _| {
        st.metrics.upstream_retries.inc();
    })
    .await;
    match result {
        Ok(r) | Err(Attempt::Status(r, _)) => Ok(r),
        Err(Attempt::Failed(e, _)) => Err(e),
    }
}

/// One exchange with the upstream. `replay` is the whole body when it is
/// known (empty or buffered): then an idempotent request that a pooled
/// connection lost before any answer is resent once on a new connection
/// (see [`UpstreamClient::send_or_replay`]); this is not a retry of the
/// policy's (no backoff, not counted), and credits and limits were taken
/// once, before.
///
/// `now`: a reading of the clock taken just before (microseconds earlier,
/// nothing awaited in between), which starts the exchange: its latency, its
/// timeout and the pool's idle ages.
async fn attempt(
    st: &Shared,
    req: &UpstreamRequest<'_>,
    body: Body,
    replay: Option<&Bytes>,
    timeout: Duration,
    retry_on: &[u16],
    now: tokio::time::Instant,
) -> Result<Response<UpstreamBody>, Attempt> {
    let upstream_req = build_request(st, req, body).map_err(|e| Attempt::Failed(e, false))?;
    let again = || replay.and_then(|b| build_request(st, req, Body::from(b.clone())).ok());
    // As `tokio::time::timeout(timeout, …)` from `now`, on the connection's
    // own timer (see `UpstreamClient::send_or_replay_by`); the same reading
    // starts the exchange's latency.
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
    let sent = st
        .client
        .send_or_replay_by(upstream_req, again, now, deadline)
        .await;
    st.metrics
        .upstream_seconds
        .observe(now.elapsed().as_secs_f64());
    let resp = match sent {
        Err(UpstreamError::Timeout) => {
            st.upstream_counters
                .class(&st.metrics, UpstreamClass::Timeout)
                .inc();
            let e = ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream did not answer in time",
            );
            return Err(Attempt::Failed(e, retry_on.contains(&504)));
        }
        Err(err) => {
            tracing::warn!(error = %ErrorChain(&err), "upstream request failed");
            st.upstream_counters
                .class(&st.metrics, UpstreamClass::Error)
                .inc();
            let e = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "the upstream could not be reached",
            );
            return Err(Attempt::Failed(e, retry_on.contains(&502)));
        }
        Ok(r) => r,
    };
    let status = resp.status().as_u16();
    st.upstream_counters
        .class(&st.metrics, UpstreamClass::of_status(status))
        .inc();
    if retry_on.contains(&status) {
        let wait = header_str(resp.headers(), header::RETRY_AFTER)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(Attempt::Status(resp, wait));
    }
    Ok(resp)
}

fn build_request(
    st: &Shared,
    req: &UpstreamRequest<'_>,
    body: Body,
) -> Result<http::Request<Body>, ApiError> {
    let base = &st.upstream;
    let prefix = base.path().trim_end_matches('/');
    let original = req.parts.uri.path_and_query();
    let path_and_query = match original {
        // No prefix: the request's own path and query, shared (no copy, no parse).
        Some(pq) if prefix.is_empty() => pq.clone(),
        _ => {
            let pq = original.map_or("/", |p| p.as_str());
            http::uri::PathAndQuery::try_from(format!("{prefix}{pq}"))
                .map_err(|_| ApiError::bad_request("request path cannot be forwarded"))?
        }
    };
    // Origin-form: the connection already goes to the upstream's address.
    // Set in place (the builder's `Result`-wrapped parts cost more, and
    // method and URI here are already valid).
    let mut out = http::Request::new(body);
    *out.method_mut() = req.parts.method.clone();
    *out.uri_mut() = http::Uri::from(path_and_query);
    let h = out.headers_mut();
    // Room for the copied headers and the four added below: no regrowth.
    h.reserve(req.parts.headers.len() + 4);
    for (name, value) in &req.parts.headers {
        let n = name.as_str();
        if n == "host"
            || n == req.key_header
            || n == "authorization"
            || n == "x-forwarded-for"
            || is_hop_by_hop(name)
        {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    // X-Forwarded-For: the chain is kept only from trusted proxies.
    let peer = req.peer.addr.ip();
    let trusted = st.config.trusted_proxies.iter().any(|n| n.contains(&peer));
    let value = if trusted && req.parts.headers.contains_key(names::X_FORWARDED_FOR) {
        let prior: Vec<&str> = req
            .parts
            .headers
            .get_all(names::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if prior.is_empty() {
            req.peer.forwarded_for.clone()
        } else {
            HeaderValue::from_str(&format!("{}, {}", prior.join(", "), req.peer.text)).ok()
        }
    } else {
        // The usual case: the peer alone, the connection's value (a
        // reference count).
        req.peer.forwarded_for.clone()
    };
    if let Some(v) = value {
        h.insert(names::X_FORWARDED_FOR, v);
    }
    if let Some(v) = account_value(&req.caller.identity) {
        h.insert(names::TOLLGATE_ACCOUNT, v);
    }
    if let Some((name, limit)) = req.marker
        && let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(limit),
        )
    {
        h.insert(n, v);
    }
    // Last, where the client would add it (it adds none when one is set).
    if let Some(host) = &st.upstream_host {
        h.insert(header::HOST, host.clone());
    }
    Ok(out)
}

/// The account as a header value (`None` if it cannot be one), made once
/// per identity and kept with it (the ledger's cache shares the identity
/// between requests): each request clones it, a reference count, whatever
/// the number of accounts.
fn account_value(id: &tollgate_ledger::KeyIdentity) -> Option<HeaderValue> {
    match id
        .derived
        .get_or_init(|| HeaderValue::from_str(&id.account).ok())
    {
        Some(kept) => kept.clone(),
        // Something else is kept with the identity: made here, as before.
        None => HeaderValue::from_str(&id.account).ok(),
    }
}

/// [`HOP_BY_HOP`] as header names, built once (removing by a `&str` parses
/// the name on every call).
static HOP_BY_HOP_NAMES: std::sync::LazyLock<[HeaderName; 8]> =
    std::sync::LazyLock::new(|| HOP_BY_HOP.map(HeaderName::from_static));

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // An answer usually has none and few headers: looking at its names is
    // cheaper than hashing all eight.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    for n in HOP_BY_HOP_NAMES.as_slice() {
        h.remove(n);
    }
}

/// Whether `name` is one of [`HOP_BY_HOP`]: its text matched once (by
/// length, then bytes), instead of eight `HeaderName` comparisons.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
    )
}

fn has_idempotency_key(h: &HeaderMap) -> bool {
    h.contains_key(names::IDEMPOTENCY_KEY)
}

fn header_str<K: axum::http::header::AsHeaderName>(h: &HeaderMap, name: K) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    header_str(h, header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// Reads a body into memory, refusing with 413 past `cap` bytes.
pub async fn read_body(body: Body, cap: u64) -> Result<Bytes, ApiError> {
    match Limited::new(body, usize::try_from(cap).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(payload::too_large(cap))
        }
        Err(_) => Err(ApiError::bad_request(
            "the request body could not be read (truncated or malformed)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{IpText, UpstreamClass};

    #[test]
    fn upstream_class_labels_are_the_metric_classes() {
        for status in 100..=999u16 {
            assert_eq!(
                UpstreamClass::of_status(status).label(),
                crate::metrics::class(status),
                "{status}"
            );
        }
        assert_eq!(UpstreamClass::Timeout.label(), "timeout");
        assert_eq!(UpstreamClass::Error.label(), "error");
    }

    #[test]
    fn hop_by_hop_names_are_the_list() {
        use axum::http::HeaderName;
        for n in super::HOP_BY_HOP {
            assert!(super::is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
        for n in [
            "host",
            "content-type",
            "tes",
            "t",
            "connections",
            "x-api-key",
        ] {
            assert!(!super::is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
    }

    #[test]
    fn ip_text_is_the_display_text() {
        let addrs = [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.2.3.4",
            "192.168.100.9",
            "::1",
            "::ffff:1.2.3.4",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for a in addrs {
            let ip: IpAddr = a.parse().expect("address");
            assert_eq!(IpText::new(ip).as_str(), ip.to_string(), "{a}");
        }
        // The connection's peer: its text and `X-Forwarded-For` value.
        for a in addrs {
            let ip: IpAddr = a.parse().expect("address");
            let peer = super::Peer::new(std::net::SocketAddr::new(ip, 4000));
            assert_eq!(&*peer.text, ip.to_string(), "{a}");
            let xff = peer.forwarded_for.as_ref().map(|v| v.as_bytes());
            assert_eq!(xff, Some(ip.to_string().as_bytes()), "{a}");
        }
        // Every octet value, in every position.
        for o in 0..=255u8 {
            let ip = IpAddr::from([o, 255 - o, o / 2, o.wrapping_mul(7)]);
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
    }
}

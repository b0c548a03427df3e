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
use serde::{Deserialize, Serialize};
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
    decide_check(&st, &req, peer.ip()).await
}

fn rejected(e: JsonRejection) -> ApiError {
    ApiError::bad_request(format!("invalid check request: {}", e.body_text()))
}

/// `POST /v1/check`, called before the router. A body sent as
/// `application/json` is read with axum's `Bytes` extractor (same size limit
/// and errors) and parsed borrowing its strings; if that parse fails (an
/// escaped string, or an error) axum's `Json` parse runs on the same bytes, so
/// every answer and message is the router's. Other content types take axum's
/// whole `Json` extractor.
pub async fn check_direct(st: &Shared, peer: SocketAddr, req: axum::extract::Request) -> Response {
    use axum::extract::FromRequest;
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    let answer = if json {
        match bytes::Bytes::from_request(req, &()).await {
            Ok(bytes) => match serde_json::from_slice::<CheckRequest<&str>>(&bytes) {
                Ok(r) => decide_check(st, &r, peer.ip()).await,
                Err(_) => match Json::<CheckRequest>::from_bytes(&bytes) {
                    Ok(Json(r)) => decide_check(st, &r, peer.ip()).await,
                    Err(e) => Err(rejected(e)),
                },
            },
            Err(e) => Err(rejected(JsonRejection::from(e))),
        }
    } else {
        match Json::<CheckRequest>::from_request(req, &()).await {
            Ok(Json(r)) => decide_check(st, &r, peer.ip()).await,
            Err(e) => Err(rejected(e)),
        }
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// The decision of a parsed check request, as the answer to send.
async fn decide_check<S: AsRef<str> + Ord>(
    st: &Shared,
    req: &CheckRequest<S>,
    peer: IpAddr,
) -> Result<Response, ApiError> {
    let policy = st.policy.load_full();
    let ip = opt(&req.ip);
    let caller = resolve(st, &policy, req, peer).await?;
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
    let mut attrs: Vec<Option<&str>> = vec![None; policy.attributes.len()];
    for (name, value) in &req.attributes {
        let name = name.as_ref();
        let i = policy
            .attribute(name)
            .ok_or_else(|| ApiError::bad_request(format!("unknown attribute `{name}`")))?;
        attrs[usize::from(i)] = Some(value.as_ref());
    }
    let id = &caller.identity;
    let core_req = tollgate_core::Request {
        cost,
        ..caller.request(op, ip.unwrap_or(""), &attrs)
    };
    let d = st.engine.decide(&policy, &core_req).await;
    crate::proxy::record_decision(st, &policy, op, caller.plan, &d, Some(&id.account)).await;
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
    headers::render(&policy, &d, kind, None, &mut |n, v| hdrs.push(n, v));
    let lease = d.lease.map(|lease| {
        let keys: Vec<String> = d.lease_keys().map(|k| format!("{:032x}", k.0)).collect();
        format!("{lease:016x}.{}", keys.join("."))
    });
    let out = CheckAnswer {
        allowed,
        headers: hdrs,
        lease,
        limits: Limits {
            policy: &policy,
            decision: &d,
        },
        operation: &policy.operations[usize::from(op)].name,
        reason,
        retry_after_s: if matches!(d.outcome, Outcome::Rejected { .. }) {
            tollgate_core::clock::ceil_secs(d.retry_after()).max(1)
        } else {
            0
        },
        status,
    };
    Ok(json_bytes(StatusCode::OK, &out))
}

/// The answer of `POST /v1/check`, serialised straight from borrowed data
/// (no `serde_json::Value` tree). Fields are in alphabetical order, as the
/// `Value` map they replace printed them.
#[derive(Serialize)]
struct CheckAnswer<'a> {
    allowed: bool,
    headers: HeaderList,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
    limits: Limits<'a>,
    operation: &'a str,
    reason: Option<String>,
    retry_after_s: u64,
    status: u16,
}

/// The headers of a check answer: names and values in one buffer, written as
/// a JSON object sorted by name, a later value of a name replacing an
/// earlier one (as the `BTreeMap<String, String>` it replaces did).
#[derive(Default)]
struct HeaderList {
    text: String,
    /// Name and value, as byte ranges of `text`.
    items: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl HeaderList {
    fn push(&mut self, name: &str, value: &str) {
        if self.items.is_empty() {
            self.text.reserve(256);
            self.items.reserve(8);
        }
        let n = self.text.len();
        self.text.push_str(name);
        let v = self.text.len();
        self.text.push_str(value);
        self.items.push((n..v, v..self.text.len()));
    }
}

impl Serialize for HeaderList {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        use serde::ser::SerializeMap;
        let text = self.text.as_str();
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        // Stable: equal names keep their order, and the last one is written.
        order.sort_by(|&a, &b| text[self.items[a].0.clone()].cmp(&text[self.items[b].0.clone()]));
        let mut map = s.serialize_map(None)?;
        for (i, &at) in order.iter().enumerate() {
            let (name, value) = &self.items[at];
            let next_same = order
                .get(i + 1)
                .is_some_and(|&b| text[self.items[b].0.clone()] == text[name.clone()]);
            if !next_same {
                map.serialize_entry(&text[name.clone()], &text[value.clone()])?;
            }
        }
        map.end()
    }
}

/// The limits of a check answer, written from the decision without a list.
struct Limits<'a> {
    policy: &'a tollgate_core::policy::CompiledPolicy,
    decision: &'a tollgate_core::Decision,
}

impl Serialize for Limits<'_> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        s.collect_seq(self.decision.results().iter().map(|r| LimitAnswer {
            cost: r.cost,
            exceeded: r.exceeded(),
            limit: r.quota,
            mode: r.mode.as_str(),
            name: &self.policy.limits[usize::from(r.limit)].name,
            remaining: r.eval.remaining,
            reset_s: tollgate_core::clock::ceil_secs(r.eval.reset),
        }))
    }
}

/// One limit of a check answer (alphabetical order, as above).
#[derive(Serialize)]
struct LimitAnswer<'a> {
    cost: u64,
    exceeded: bool,
    limit: u64,
    mode: &'static str,
    name: &'a str,
    remaining: u64,
    reset_s: u64,
}

/// A JSON answer serialised from any `Serialize` value into one pre-sized
/// buffer.
fn json_bytes<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut bytes = Vec::with_capacity(768);
    if serde_json::to_writer(&mut bytes, body).is_err() {
        bytes.clear();
    }
    let mut r = Response::new(axum::body::Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
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
    match (opt(&req.key), opt(&req.account)) {
        (Some(key), _) => {
            // As if sent in the key header: a valid header value, read only
            // when ASCII, trimmed.
            if !key.bytes().all(|b| b == b'\t' || (b >= 32 && b != 127)) {
                return Err(ApiError::bad_request("key is not a valid header value"));
            }
            if !key.is_ascii() || key.trim().is_empty() {
                return Err(missing_key(policy));
            }
            let ip = opt(&req.ip)
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .unwrap_or(peer);
            st.authenticate_key(key.trim(), policy, ip).await
        }
        (None, Some(account)) => {
            let identity = st
                .ledger
                .account_identity(account)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("unknown account `{account}`")))?;
            Ok(st.caller(identity, policy))
        }
        (None, None) => Err(ApiError::bad_request(
            "name the caller with `key` or `account`",
        )),
    }
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
    use super::*;

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
            map.insert(n.to_owned(), v.to_owned());
        }
        assert_eq!(
            serde_json::to_string(&list).expect("list"),
            serde_json::to_string(&map).expect("map")
        );
        assert_eq!(
            serde_json::to_string(&HeaderList::default()).expect("empty"),
            "{}"
        );
    }
}

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

/// Body of `POST /v1/check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// An API key (verified like on the proxy).
    pub key: Option<String>,
    /// An account id (instead of `key`).
    pub account: Option<String>,
    /// Operation name.
    pub operation: Option<String>,
    /// Method, with `path`, to match an operation.
    pub method: Option<String>,
    /// Path, with `method`.
    pub path: Option<String>,
    /// Client IP.
    pub ip: Option<String>,
    /// Attribute values by name.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Cost replacing the operation's.
    pub cost: Option<i64>,
}

/// `POST /v1/check`.
pub async fn check(
    State(st): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<CheckRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body
        .map_err(|e| ApiError::bad_request(format!("invalid check request: {}", e.body_text())))?;
    let policy = st.policy.load_full();
    let caller = resolve(&st, &policy, &req, peer.ip()).await?;
    let op = match (&req.operation, &req.method, &req.path) {
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
    if let Some(ip) = &req.ip
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        return Err(ApiError::bad_request(format!(
            "ip `{ip}` is not an IP address"
        )));
    }
    let mut attrs: Vec<Option<&str>> = vec![None; policy.attributes.len()];
    for (name, value) in &req.attributes {
        let i = policy
            .attribute(name)
            .ok_or_else(|| ApiError::bad_request(format!("unknown attribute `{name}`")))?;
        attrs[usize::from(i)] = Some(value.as_str());
    }
    let id = &caller.identity;
    let core_req = tollgate_core::Request {
        cost,
        ..caller.request(op, req.ip.as_deref().unwrap_or(""), &attrs)
    };
    let d = st.engine.decide(&policy, &core_req).await;
    crate::proxy::record_decision(&st, &policy, op, caller.plan, &d, Some(&id.account)).await;
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
    let mut hdrs = BTreeMap::new();
    headers::render(&policy, &d, kind, None, &mut |n, v| {
        hdrs.insert(n.to_owned(), v.to_owned());
    });
    let limits: Vec<LimitAnswer<'_>> = d
        .results()
        .iter()
        .map(|r| LimitAnswer {
            cost: r.cost,
            exceeded: r.exceeded(),
            limit: r.quota,
            mode: r.mode.as_str(),
            name: &policy.limits[usize::from(r.limit)].name,
            remaining: r.eval.remaining,
            reset_s: tollgate_core::clock::ceil_secs(r.eval.reset),
        })
        .collect();
    let lease = d.lease.map(|lease| {
        let keys: Vec<String> = d.lease_keys().map(|k| format!("{:032x}", k.0)).collect();
        format!("{lease:016x}.{}", keys.join("."))
    });
    let out = CheckAnswer {
        allowed,
        headers: hdrs,
        lease,
        limits,
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
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
    limits: Vec<LimitAnswer<'a>>,
    operation: &'a str,
    reason: Option<String>,
    retry_after_s: u64,
    status: u16,
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

/// A JSON answer serialised from any `Serialize` value into one buffer.
fn json_bytes<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = (status, bytes).into_response();
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
async fn resolve(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest,
    peer: IpAddr,
) -> Result<Caller, ApiError> {
    match (&req.key, &req.account) {
        (Some(key), _) => {
            // As if sent in the key header: a valid header value, read only
            // when ASCII, trimmed.
            if !key.bytes().all(|b| b == b'\t' || (b >= 32 && b != 127)) {
                return Err(ApiError::bad_request("key is not a valid header value"));
            }
            if !key.is_ascii() || key.trim().is_empty() {
                return Err(missing_key(policy));
            }
            let ip = req
                .ip
                .as_deref()
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

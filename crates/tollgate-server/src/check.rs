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

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tollgate_core::headers::{self, ResponseKind};
use tollgate_core::{CounterKey, Outcome};

use crate::error::{ApiError, json_response};
use crate::state::{Caller, Shared};

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
    body: Result<Json<CheckRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body
        .map_err(|e| ApiError::bad_request(format!("invalid check request: {}", e.body_text())))?;
    let policy = st.policy.load_full();
    let caller = resolve(&st, &policy, &req).await?;
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
    let mut hdrs = Map::new();
    headers::render(&policy, &d, kind, None, &mut |n, v| {
        hdrs.insert(n.to_owned(), Value::from(v));
    });
    let limits: Vec<Value> = d
        .results()
        .iter()
        .map(|r| {
            json!({
                "name": policy.limits[usize::from(r.limit)].name,
                "mode": r.mode.as_str(),
                "limit": r.quota,
                "remaining": r.eval.remaining,
                "reset_s": tollgate_core::clock::ceil_secs(r.eval.reset),
                "cost": r.cost,
                "exceeded": r.exceeded(),
            })
        })
        .collect();
    let mut out = json!({
        "allowed": allowed,
        "status": status,
        "reason": reason,
        "retry_after_s": if matches!(d.outcome, Outcome::Rejected { .. }) { tollgate_core::clock::ceil_secs(d.retry_after()).max(1) } else { 0 },
        "operation": policy.operations[usize::from(op)].name,
        "limits": limits,
        "headers": hdrs,
    });
    if let Some(lease) = d.lease {
        let keys: Vec<String> = d.lease_keys().map(|k| format!("{:032x}", k.0)).collect();
        out["lease"] = Value::from(format!("{lease:016x}.{}", keys.join(".")));
    }
    Ok(json_response(StatusCode::OK, &out))
}

async fn resolve(
    st: &Shared,
    policy: &tollgate_core::policy::CompiledPolicy,
    req: &CheckRequest,
) -> Result<Caller, ApiError> {
    match (&req.key, &req.account) {
        (Some(key), _) => {
            let mut h = axum::http::HeaderMap::new();
            let v = axum::http::HeaderValue::from_str(key)
                .map_err(|_| ApiError::bad_request("key is not a valid header value"))?;
            h.insert(
                axum::http::HeaderName::from_bytes(policy.key_header.as_bytes())
                    .map_err(|_| ApiError::bad_request("bad key header"))?,
                v,
            );
            st.authenticate(&h, policy).await
        }
        (None, Some(account)) => {
            let a = st
                .ledger
                .account(account)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("unknown account `{account}`")))?;
            Ok(st.account_caller(&a, policy))
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

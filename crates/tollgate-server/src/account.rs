//! `GET /v1/account`: the caller's account, plan, credit balance and the
//! state of every limit of its plan (read without consuming: a cost-0
//! decision).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use tollgate_core::policy::CompiledPolicy;

use crate::error::{ApiError, json_response};
use crate::state::{Caller, Shared};

/// `GET /v1/account`.
pub async fn get(
    State(st): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let policy = st.policy.load_full();
    let client = crate::client_ip::client_ip(peer.ip(), &headers, &st.config.trusted_proxies);
    let caller = st.authenticate(&headers, &policy, client).await?;
    let balance = st.ledger.balance(&caller.identity.account).await?;
    Ok(json_response(
        StatusCode::OK,
        &account_json(&st, &policy, &caller, balance).await,
    ))
}

/// The account document: id, org, plan, credits, limits with remaining and reset.
pub async fn account_json(
    st: &Shared,
    policy: &CompiledPolicy,
    caller: &Caller,
    balance: i64,
) -> Value {
    json!({
        "account": caller.identity.account,
        "org": caller.identity.org,
        "plan": policy.plans[usize::from(caller.plan)].name,
        "credits": { "available": balance },
        "limits": usage(st, policy, caller, "").await,
    })
}

/// Current state of every limit that applies to the caller's plan.
pub async fn usage(st: &Shared, policy: &CompiledPolicy, caller: &Caller, ip: &str) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for op in 0..policy.operations.len() {
        let req = tollgate_core::Request {
            cost: Some(0),
            ..caller.request(op as u16, ip, &[])
        };
        let d = st.engine.decide(policy, &req).await;
        for r in d.results() {
            if seen.insert(r.limit) {
                out.push(json!({
                    "name": policy.limits[usize::from(r.limit)].name,
                    "mode": r.mode.as_str(),
                    "limit": r.quota,
                    "remaining": r.eval.remaining,
                    "reset_s": tollgate_core::clock::ceil_secs(r.eval.reset),
                    "window_s": r.window_secs,
                }));
            }
        }
    }
    out
}

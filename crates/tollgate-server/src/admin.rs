//! The admin API, on its own listener (default 127.0.0.1:8081).
//!
//! Every call needs `Authorization: Bearer <admin token>`; the token is
//! compared in constant time. With no token configured the admin API refuses
//! everything. `/metrics`, `/healthz` and `/readyz` are open on this listener
//! (they carry no secrets: metric labels never hold keys, IPs or accounts).

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_core::policy::{AccountOverrides, OverrideValues};
use tollgate_ledger::{Account, AccountChange, GrantKind, NewAccount};

use crate::error::{ApiError, json_response};
use crate::state::Shared;

/// The admin router.
pub fn router(st: Shared) -> Router {
    let api = Router::new()
        .route("/admin/v1/accounts", post(create_account))
        .route(
            "/admin/v1/accounts/{id}",
            get(get_account).patch(patch_account),
        )
        .route(
            "/admin/v1/accounts/{id}/keys",
            post(create_key).get(list_keys),
        )
        .route("/admin/v1/keys/{id}", delete(revoke_key))
        .route("/admin/v1/accounts/{id}/credits", post(add_credits))
        .route("/admin/v1/events", get(events))
        .route("/admin/v1/reload", post(reload))
        .route("/admin/v1/webhooks", get(webhooks))
        .route("/admin/v1/webhooks/{id}/enable", post(enable_webhook))
        .fallback(|| async { ApiError::not_found("no such admin route") })
        .layer(middleware::from_fn_with_state(st.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(crate::readyz))
        .merge(api)
        .with_state(st)
}

async fn require_token(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let Some(token) = &st.config.admin_token else {
        return ApiError::admin_unauthorized(
            "the admin API is disabled: start tollgate with --admin-token or TOLLGATE_ADMIN_TOKEN",
        )
        .into_response();
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match presented {
        Some(t) if token.matches(t) => next.run(req).await,
        _ => ApiError::admin_unauthorized("send `Authorization: Bearer <admin token>`")
            .into_response(),
    }
}

async fn metrics(State(st): State<Shared>) -> Response {
    st.metrics
        .live_counters
        .set(i64::try_from(st.engine.store().live_counters()).unwrap_or(i64::MAX));
    st.metrics
        .store_unavailable
        .set(i64::from(!st.engine.store().is_available()));
    let mut r = st.metrics.encode().into_response();
    if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {}", e.body_text())))
}

/// Account ids: 1–128 characters of letters, digits, `-`, `_`, `.`, `@`.
fn valid_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "ids are 1–128 characters of letters, digits, `-`, `_`, `.`, `@`",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    id: String,
    plan: Option<String>,
    org: Option<String>,
    created_at: Option<String>,
}

async fn create_account(
    State(st): State<Shared>,
    body: Result<Json<CreateAccount>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    valid_id(&req.id)?;
    if let Some(org) = &req.org {
        valid_id(org)?;
    }
    let policy = st.policy.load_full();
    let plan_name = req
        .plan
        .unwrap_or_else(|| policy.plans[usize::from(policy.default_plan)].name.clone());
    let plan = policy.plan(&plan_name).ok_or_else(|| {
        let known: Vec<&str> = policy.plans.iter().map(|p| p.name.as_str()).collect();
        ApiError::bad_request(format!(
            "unknown plan `{plan_name}`; plans: {}",
            known.join(", ")
        ))
    })?;
    let created_at = match &req.created_at {
        Some(t) => Some(
            t.parse::<jiff::Timestamp>()
                .map_err(|_| ApiError::bad_request("created_at must be an RFC 3339 instant"))?,
        ),
        None => None,
    };
    let grant = i64::try_from(policy.plans[usize::from(plan)].grant).unwrap_or(i64::MAX);
    let account = st
        .ledger
        .create_account(&NewAccount {
            id: req.id,
            plan: plan_name,
            org: req.org,
            created_at,
            grant,
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, &account_doc(&account)))
}

fn account_doc(a: &Account) -> Value {
    json!({
        "id": a.id,
        "plan": a.plan,
        "org": a.org,
        "created_at": a.created_at.to_string(),
        "overrides": a.overrides,
        "credits": { "available": a.balance },
    })
}

async fn get_account(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let a = st
        .ledger
        .account(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown account `{id}`")))?;
    let policy = st.policy.load_full();
    let caller = st.account_caller(&a, &policy);
    let mut doc = account_doc(&a);
    doc["usage"] = Value::from(crate::account::usage(&st, &policy, &caller, "").await);
    Ok(json_response(StatusCode::OK, &doc))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchAccount {
    plan: Option<String>,
    overrides: Option<BTreeMap<String, OverrideValues>>,
}

async fn patch_account(
    State(st): State<Shared>,
    Path(id): Path<String>,
    body: Result<Json<PatchAccount>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    let policy = st.policy.load_full();
    if let Some(plan) = &req.plan
        && policy.plan(plan).is_none()
    {
        return Err(ApiError::bad_request(format!("unknown plan `{plan}`")));
    }
    let overrides = match &req.overrides {
        Some(o) => {
            AccountOverrides::parse(&policy, o).map_err(ApiError::bad_request)?;
            Some(serde_json::to_value(o).map_err(|_| ApiError::bad_request("overrides"))?)
        }
        None => None,
    };
    let a = st
        .ledger
        .update_account(
            &id,
            &AccountChange {
                plan: req.plan,
                overrides,
            },
        )
        .await?;
    Ok(json_response(StatusCode::OK, &account_doc(&a)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    app: Option<String>,
}

async fn create_key(
    State(st): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<CreateKey>>,
) -> Result<Response, ApiError> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    if let Some(app) = &req.app {
        valid_id(app)?;
    }
    let k = st.ledger.create_key(&id, req.app.as_deref()).await?;
    crate::events::record(
        &st.ledger,
        &id,
        "key_created",
        json!({ "key_id": k.id, "prefix": k.prefix }),
    )
    .await;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "id": k.id, "key": k.key.expose(), "prefix": k.prefix }),
    ))
}

async fn list_keys(State(st): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if st.ledger.account(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("unknown account `{id}`")));
    }
    let keys: Vec<Value> = st
        .ledger
        .list_keys(&id)
        .await?
        .into_iter()
        .map(|k| json!({ "id": k.id, "prefix": k.prefix, "app": k.app, "created_at": k.created_at.to_string(), "revoked": k.revoked }))
        .collect();
    Ok(json_response(StatusCode::OK, &Value::from(keys)))
}

async fn revoke_key(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let k = st.ledger.revoke_key(&id).await?;
    crate::events::record(
        &st.ledger,
        &k.account,
        "key_revoked",
        json!({ "key_id": k.id, "prefix": k.prefix }),
    )
    .await;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "id": k.id, "prefix": k.prefix, "revoked": true }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddCredits {
    amount: i64,
    reason: Option<String>,
    idempotency_key: String,
}

async fn add_credits(
    State(st): State<Shared>,
    Path(id): Path<String>,
    body: Result<Json<AddCredits>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    if req.idempotency_key.is_empty() || req.idempotency_key.len() > 255 {
        return Err(ApiError::bad_request(
            "idempotency_key must be 1–255 characters",
        ));
    }
    let reason = req.reason.unwrap_or_else(|| "purchase".to_owned());
    let balance = st
        .ledger
        .grant(
            &id,
            req.amount,
            GrantKind::Purchase,
            &reason,
            &req.idempotency_key,
        )
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "account": id, "balance": balance }),
    ))
}

#[derive(Deserialize)]
struct EventsQuery {
    account: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
}

async fn events(
    State(st): State<Shared>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let since = match &q.since {
        Some(s) => Some(
            s.parse::<jiff::Timestamp>()
                .map_err(|_| ApiError::bad_request("since must be an RFC 3339 instant"))?,
        ),
        None => None,
    };
    let events = st
        .ledger
        .events(
            q.account.as_deref(),
            since,
            q.limit.unwrap_or(100).min(1000),
        )
        .await?;
    let out: Vec<Value> =
        events.into_iter().map(|e| json!({ "id": e.id, "at": e.at.to_string(), "account": e.account, "kind": e.kind, "data": e.data })).collect();
    Ok(json_response(StatusCode::OK, &Value::from(out)))
}

/// The configured webhook endpoints (origin only: a URL's path or query may
/// carry a secret), whether each is disabled (after a 410), and the outbox.
async fn webhooks(State(st): State<Shared>) -> Result<Response, ApiError> {
    let disabled = st.ledger.disabled_endpoints().await?;
    let stats = st.ledger.outbox_stats().await?;
    let endpoints: Vec<Value> = st
        .config
        .webhooks
        .endpoints
        .iter()
        .map(|ep| {
            json!({
                "id": ep.id,
                "origin": ep.url.origin().ascii_serialization(),
                "events": ep.events,
                "disabled": disabled.contains(&ep.id),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "endpoints": endpoints,
            "outbox": {
                "pending": stats.pending,
                "delivered": stats.delivered,
                "failed": stats.failed,
            },
        }),
    ))
}

/// Enables an endpoint disabled after a 410; pending events go to it again.
async fn enable_webhook(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !st.config.webhooks.endpoints.iter().any(|ep| ep.id == id) {
        return Err(ApiError::not_found(
            "no such webhook endpoint in [server.webhooks]",
        ));
    }
    let was_disabled = st.ledger.enable_endpoint(&id).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "id": id, "disabled": false, "was_disabled": was_disabled }),
    ))
}

async fn reload(State(st): State<Shared>) -> Result<Response, ApiError> {
    match crate::reload_policy(&st) {
        Ok(name) => Ok(json_response(
            StatusCode::OK,
            &json!({ "reloaded": true, "policy": name }),
        )),
        Err(problems) => Err(ApiError::bad_request(
            "the new policy is invalid; the old one keeps serving",
        )
        .with("problems", problems)),
    }
}

//! Shared server state and caller identification.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, StatusCode, header};
use tollgate_core::policy::{
    AccountOverrides, CompiledPolicy, OperationId, OverrideValues, PlanId,
};
use tollgate_core::{Clock, Engine, Nanos};
use tollgate_ledger::{KeyCheck, KeyIdentity, Ledger};

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::events::Events;
use crate::guard::AuthGuard;
use crate::metrics::Metrics;

/// Everything a handler needs.
pub struct AppState {
    /// The policy in force; swapped atomically on reload.
    pub policy: ArcSwap<CompiledPolicy>,
    /// Decision engine over the counter store.
    pub engine: Engine<crate::store::AnyStore>,
    /// Accounts, keys, credits, events.
    pub ledger: Ledger,
    /// Pooled upstream client.
    pub client: crate::proxy::UpstreamClient,
    /// Upstream base (scheme and authority, optional path prefix).
    pub upstream: http::Uri,
    /// The `Host` header sent upstream (the upstream's authority, as the
    /// client would write it), built once.
    pub upstream_host: Option<http::HeaderValue>,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: ServerConfig,
    /// Event bookkeeping.
    pub events: Events,
    /// Handles to the decision counters of the policy in force.
    pub counters: crate::metric_cache::CounterCache,
    /// Per-address budget of failed API keys, checked before any lookup.
    pub guard: AuthGuard,
    /// Handles to the upstream answer counters (proxy).
    pub upstream_counters: crate::proxy::UpstreamCounters,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// Shared state handle.
pub type Shared = Arc<AppState>;

/// An authenticated caller.
#[derive(Debug)]
pub struct Caller {
    /// Who, from the ledger (shared with the ledger's account cache).
    pub identity: Arc<KeyIdentity>,
    /// Plan in the current policy.
    pub plan: PlanId,
    /// Per-account overrides valid in the current policy.
    pub overrides: Option<AccountOverrides>,
    /// Account creation, for rollouts.
    pub created_at: Nanos,
}

impl AppState {
    /// Identifies the caller by the policy's key header (or `Authorization: Bearer`),
    /// presented from client address `ip`.
    ///
    /// # Errors
    /// 401 without a key or with an unknown one, 403 for a revoked key, 429 when
    /// `ip` is over its budget of failed keys ([`crate::guard`]), 503 if the
    /// database is down.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        policy: &CompiledPolicy,
        ip: IpAddr,
    ) -> Result<Caller, ApiError> {
        // The key header's name parsed once per policy (a `&str` name is
        // parsed, lowercased and hashed on every lookup).
        let key = match self.counters.for_policy(policy, || self.policy.load_full()) {
            Some(table) => match table.key_header() {
                Some(name) => presented_key(headers, name),
                None => presented_key(headers, &policy.key_header),
            },
            None => presented_key(headers, &policy.key_header),
        }
        .ok_or_else(|| missing_key(policy))?;
        self.authenticate_key(key, policy, ip).await
    }

    /// Verifies an API key presented from client address `ip`: a key in the
    /// ledger's cache that is valid passes at once; a key whose id is not known
    /// to be real first takes a token from `ip`'s invalid-key budget (429 when
    /// there is none, before any database work), then is verified; a valid
    /// key gives the token back.
    ///
    /// # Errors
    /// As [`AppState::authenticate`].
    pub async fn authenticate_key(
        &self,
        key: &str,
        policy: &CompiledPolicy,
        ip: IpAddr,
    ) -> Result<Caller, ApiError> {
        if let Some(caller) = self.authenticate_key_now(key, policy) {
            return Ok(caller);
        }
        let cached = self.ledger.verify_key_cached(key).await;
        if let Some(KeyCheck::Valid(identity)) = cached {
            return Ok(self.caller(identity, policy));
        }
        // Ids of real keys (seen in the database lately) skip the guard: their
        // lookups are bounded by the key count, not by what a client sends.
        let guarded = !self.ledger.key_id_known(key);
        let now = self.engine.clock().now();
        if guarded && let Err(wait) = self.guard.acquire(ip, now) {
            let retry = tollgate_core::clock::ceil_secs(wait).max(1);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_invalid_keys",
                format!(
                    "too many requests with invalid API keys from this address; retry after {retry} s"
                ),
            )
            .with("retry_after_s", retry));
        }
        let check = match cached {
            Some(c) => c,
            // Boxed: a cache miss is rare, and its future is large.
            None => match Box::pin(self.ledger.verify_key(key)).await {
                Ok(c) => c,
                Err(e) => {
                    if guarded {
                        self.guard.refund(ip);
                    }
                    return Err(e.into());
                }
            },
        };
        match check {
            KeyCheck::Valid(identity) => {
                if guarded {
                    self.guard.refund(ip);
                }
                Ok(self.caller(identity, policy))
            }
            KeyCheck::Revoked { .. } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "revoked_key",
                "this API key has been revoked",
            )),
            KeyCheck::Unknown => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unknown_key",
                "this API key is not valid",
            )),
        }
    }

    /// The caller of a valid `key` read lately ([`Ledger::verify_key_now`]),
    /// without waiting; `None` for any other key (not read lately, unknown,
    /// revoked, malformed): [`AppState::authenticate_key`] then decides, with
    /// its guard against invalid keys.
    pub fn authenticate_key_now(&self, key: &str, policy: &CompiledPolicy) -> Option<Caller> {
        match self.ledger.verify_key_now(key)? {
            KeyCheck::Valid(identity) => Some(self.caller(identity, policy)),
            _ => None,
        }
    }

    /// The caller for an account itself (no key: the admin API's usage
    /// view); its app is `default`.
    pub fn account_caller(&self, a: &tollgate_ledger::Account, policy: &CompiledPolicy) -> Caller {
        let identity = KeyIdentity {
            key_id: String::new(),
            account: a.id.clone(),
            org: a.org.clone(),
            app: "default".to_owned(),
            plan: a.plan.clone(),
            account_created_at: a.created_at,
            overrides: a.overrides.clone(),
            derived: Default::default(),
        };
        self.caller(Arc::new(identity), policy)
    }

    /// The caller for an identity under `policy` (unknown plans fall back to the default plan).
    pub fn caller(&self, identity: Arc<KeyIdentity>, policy: &CompiledPolicy) -> Caller {
        let plan = policy.plan(&identity.plan).unwrap_or_else(|| {
            tracing::warn!(plan = %identity.plan, "account plan not in the policy; using the default plan");
            policy.default_plan
        });
        let overrides = overrides_of(policy, &identity.overrides);
        let created_at =
            Nanos(u64::try_from(identity.account_created_at.as_nanosecond()).unwrap_or(0));
        Caller {
            identity,
            plan,
            overrides,
            created_at,
        }
    }
}

impl Caller {
    /// The engine's view of this caller's request for operation `op`.
    pub fn request<'a>(
        &'a self,
        op: OperationId,
        ip: &'a str,
        attributes: &'a [Option<&'a str>],
    ) -> tollgate_core::Request<'a> {
        let id = &self.identity;
        tollgate_core::Request {
            org: &id.org,
            account: &id.account,
            app: &id.app,
            key: &id.key_id,
            ip,
            attributes,
            account_created_at: Some(self.created_at),
            overrides: self.overrides.as_ref(),
            ..tollgate_core::Request::new(self.plan, op)
        }
    }
}

/// Account overrides from their stored JSON; ignored (with a warning) if they
/// no longer fit the policy.
pub fn overrides_of(policy: &CompiledPolicy, json: &serde_json::Value) -> Option<AccountOverrides> {
    let obj = json.as_object().filter(|o| !o.is_empty())?;
    let raw: std::collections::BTreeMap<String, OverrideValues> =
        serde_json::from_value(serde_json::Value::Object(obj.clone())).ok()?;
    match AccountOverrides::parse(policy, &raw) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, "account overrides do not fit the policy; ignored");
            None
        }
    }
}

/// 401 `missing_key`.
pub fn missing_key(policy: &CompiledPolicy) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing_key",
        format!("send your API key in the `{}` header", policy.key_header),
    )
}

/// The API key a request presents in header `key_header` (a name, as
/// `&str` or parsed), or else as `Authorization: Bearer`.
pub fn presented_key(headers: &HeaderMap, key_header: impl header::AsHeaderName) -> Option<&str> {
    if let Some(v) = headers
        .get(key_header)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        return Some(v);
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

//! The policy file as written: serde types with source spans, nothing checked
//! beyond TOML syntax and field names (`deny_unknown_fields` everywhere, so a
//! typo is an error, not a silently ignored setting). `validate.rs` turns this
//! into a [`CompiledPolicy`](super::CompiledPolicy). The format is documented
//! field by field in `docs/policy.md`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A whole policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// `[policy]`: name and request identification.
    #[serde(default)]
    pub policy: Option<Spanned<RawMeta>>,
    /// `[headers]`: which rate-limit headers answers carry.
    #[serde(default)]
    pub headers: Option<Spanned<RawHeaders>>,
    /// `[credits]`: how credit exhaustion is answered.
    #[serde(default)]
    pub credits: Option<Spanned<RawCredits>>,
    /// `[attributes]`: where request attributes used as scopes come from.
    #[serde(default)]
    pub attributes: BTreeMap<String, Spanned<String>>,
    /// `[upstream]`: retries of upstream failures.
    #[serde(default)]
    pub upstream: Option<Spanned<RawUpstream>>,
    /// `[operations.NAME]`.
    #[serde(default)]
    pub operations: BTreeMap<String, Spanned<RawOperation>>,
    /// `[limits.NAME]`.
    #[serde(default)]
    pub limits: BTreeMap<String, Spanned<RawLimit>>,
    /// `[plans.NAME]`.
    #[serde(default)]
    pub plans: BTreeMap<String, Spanned<RawPlan>>,
    /// `[server]`: listeners, upstream, stores. Validated by the server crate,
    /// not here (the core knows nothing of sockets).
    #[serde(default)]
    pub server: Option<toml::Table>,
}

/// `[policy]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMeta {
    /// Policy name, shown in `/v1/account` and logs.
    pub name: Option<Spanned<String>>,
    /// Header carrying the API key (default `x-api-key`).
    pub key_header: Option<Spanned<String>>,
    /// Plan of accounts created without one (default: `default`, or the only plan).
    pub default_plan: Option<Spanned<String>>,
    /// `forward` (default) or `reject` requests matching no operation.
    pub unmatched: Option<Spanned<String>>,
    /// Default time zone of calendar windows (default `UTC`).
    pub time_zone: Option<Spanned<String>>,
}

/// `[headers]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    /// `ietf` (default), `classic`, `vendor` or `none`.
    pub profile: Option<Spanned<String>>,
    /// `all` (default) or `success` (2xx only).
    pub send_on: Option<Spanned<String>>,
    /// Fields still sent on rejections when `send_on = "success"`.
    #[serde(default)]
    pub on_reject: Vec<Spanned<String>>,
    /// Fields sent (`limit`, `remaining`, `reset`, `cost`, `credits`).
    pub fields: Option<Vec<Spanned<String>>>,
    /// Answer rejections as `application/problem+json` (default false).
    pub problem_json: Option<bool>,
    /// Header names of the `vendor` profile, per field.
    #[serde(default)]
    pub names: BTreeMap<String, Spanned<String>>,
}

/// `[credits]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCredits {
    /// Status when credits run out (default 402).
    pub exhausted_status: Option<Spanned<i64>>,
    /// Body when credits run out (default: tollgate's JSON error).
    pub exhausted_body: Option<String>,
}

/// `[upstream]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Retries after a retryable status (default 0).
    pub retries: Option<Spanned<i64>>,
    /// Statuses that are retried (default 429, 502, 503, 504).
    pub retry_on: Option<Vec<Spanned<i64>>>,
    /// First back-off (default `200ms`), doubled each retry, with full jitter.
    pub backoff: Option<Spanned<String>>,
    /// Largest back-off (default `5s`).
    pub max_backoff: Option<Spanned<String>>,
    /// Largest request body buffered so it can be replayed (default `10MB`).
    pub replay_body_max: Option<Spanned<toml::Value>>,
    /// Upstream timeout per attempt (default `60s`).
    pub timeout: Option<Spanned<String>>,
}

/// `[operations.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperation {
    /// HTTP method, or `*` / absent for any.
    pub method: Option<Spanned<String>>,
    /// One path pattern.
    pub path: Option<Spanned<String>>,
    /// Several path patterns.
    pub paths: Option<Vec<Spanned<String>>>,
    /// Token cost for every limit (default 1).
    pub cost: Option<Spanned<i64>>,
    /// Token cost per limit name, overriding `cost`.
    #[serde(default)]
    pub costs: BTreeMap<String, Spanned<i64>>,
    /// Credit cost (default 0).
    pub credits: Option<Spanned<i64>>,
    /// Upstream response header carrying the credits actually used; the
    /// amount committed, never above `credits` (the reservation).
    pub credits_from_header: Option<Spanned<String>>,
    /// Whether upstream failures of this operation are retried (default true).
    pub retry: Option<bool>,
    /// Answered by tollgate itself: `balance` or `account`.
    pub respond: Option<Spanned<String>>,
    /// Attribute sources for this operation, overriding `[attributes]`.
    #[serde(default)]
    pub attributes: BTreeMap<String, Spanned<String>>,
    /// Payload rules.
    pub payload: Option<Spanned<RawPayload>>,
}

/// `[operations.NAME.payload]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPayload {
    /// Largest body: bytes, or a string such as `"50MB"` / `"30MiB"`.
    pub max_body: Option<Spanned<toml::Value>>,
    /// Accepted image formats: `png`, `jpeg`, `webp`, `heic`.
    pub formats: Option<Vec<Spanned<String>>>,
    /// Largest side of an image, in pixels.
    pub max_pixels: Option<Spanned<i64>>,
    /// `reject` (422, default) or `forward` images over `max_pixels`.
    pub oversize: Option<Spanned<String>>,
    /// At most one file per request (default true).
    pub single_file: Option<bool>,
}

/// `[limits.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    /// `token_bucket`, `sliding_window`, `calendar_window` or `concurrency`.
    pub algorithm: Spanned<String>,
    /// N of sliding/calendar windows and concurrency.
    pub limit: Option<Spanned<i64>>,
    /// Sliding window length (`"3s"`) or calendar unit (`minute`, `hour`, `day`).
    pub window: Option<Spanned<String>>,
    /// Sliding window precision: `exact` (default, N ≤ 1,024) or `approximate`.
    pub precision: Option<Spanned<String>>,
    /// Token bucket capacity.
    pub capacity: Option<Spanned<i64>>,
    /// Tokens added per `refill_every`.
    pub refill: Option<Spanned<i64>>,
    /// Refill period (default `1s`).
    pub refill_every: Option<Spanned<String>>,
    /// Concurrency lease TTL (default `5m`).
    pub lease_ttl: Option<Spanned<String>>,
    /// What the counter is keyed by.
    pub scope: Option<Spanned<Vec<Spanned<String>>>>,
    /// Operations counted (default: all).
    pub operations: Option<Vec<Spanned<String>>>,
    /// `enforce` (default), `soft` or `shadow`.
    pub mode: Option<Spanned<String>>,
    /// Calendar time zone (default: `[policy] time_zone`).
    pub time_zone: Option<Spanned<String>>,
    /// `allow`, `deny` (default) or `local` when the store is unavailable.
    pub on_store_error: Option<Spanned<String>>,
    /// With `on_store_error = "local"`: the fraction of the limit (0 < f ≤ 1)
    /// one replica admits on its own while the store is unavailable.
    pub local_share: Option<Spanned<f64>>,
    /// Enforce only for accounts created at or after this RFC 3339 instant;
    /// older accounts run the limit in shadow mode.
    pub rollout_after: Option<Spanned<String>>,
    /// What happens to a request over this limit.
    pub on_exceed: Option<Spanned<RawAction>>,
    /// Free-form description, for people.
    pub description: Option<String>,
}

/// `[limits.NAME.on_exceed]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    /// `reject` (default) or `forward`.
    pub action: Option<Spanned<String>>,
    /// Status of a rejection (default 429).
    pub status: Option<Spanned<i64>>,
    /// Body of a rejection (default: tollgate's JSON error).
    pub body: Option<String>,
    /// Content type of `body` (default `application/json`).
    pub content_type: Option<String>,
    /// Marker header of a forward (default `Tollgate-Limit-Exceeded`).
    pub header: Option<Spanned<String>>,
}

/// `[plans.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    /// Limits of this plan (default: every limit).
    pub limits: Option<Vec<Spanned<String>>>,
    /// Credits granted once, at account creation.
    pub grant: Option<Spanned<i64>>,
    /// Credits granted every `allowance_every`.
    pub allowance: Option<Spanned<i64>>,
    /// `day` or `month` (default `month`).
    pub allowance_every: Option<Spanned<String>>,
    /// Balance under which a credits-low event is sent.
    pub credits_low: Option<Spanned<i64>>,
    /// Numbers replacing a limit's for this plan.
    #[serde(default)]
    pub overrides: BTreeMap<String, Spanned<RawOverride>>,
    /// Free-form description, for people.
    pub description: Option<String>,
}

/// A limit's numbers replaced for a plan or an account.
#[derive(Debug, Deserialize, Clone, Default, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    /// New N (windows, concurrency).
    pub limit: Option<Spanned<i64>>,
    /// New bucket capacity.
    pub capacity: Option<Spanned<i64>>,
    /// New bucket refill per period.
    pub refill: Option<Spanned<i64>>,
}

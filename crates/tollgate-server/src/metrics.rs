//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Labels are bounded: plan, operation and limit names come from the policy,
//! outcome and status class from small fixed sets. Never a key, an IP, an
//! account or a file name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

use crate::histogram::LatencyHistogram;

/// Labels of a decision.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Plan name.
    pub plan: String,
    /// Operation name.
    pub operation: String,
    /// `allowed`, `rejected`, `forwarded`, `store_unavailable`, `cost_above_capacity`.
    pub outcome: String,
}

/// Labels of a request refused for its credits.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CreditLabels {
    /// Plan name.
    pub plan: String,
    /// Operation name.
    pub operation: String,
}

/// Labels of one limit's result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Limit name.
    pub limit: String,
    /// `within`, `over` (enforced and over), `soft` (soft crossing), `shadow` (shadow would-reject).
    pub result: String,
}

/// Labels of a store error.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    /// `timeout`, `connection`, `oom`, `readonly`, `crossslot`, `wrongtype`,
    /// `loading`, `busy`, `noscript`, `noperm`, `cluster`, `reply`,
    /// `circuit_open`, `overloaded`, `counter_cap`, `other`.
    pub kind: String,
}

/// Labels of an upstream answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `2xx`, `3xx`, `4xx`, `5xx`, `error`, `timeout`.
    pub class: String,
}

/// Labels of a webhook delivery attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// Endpoint id (from the policy's `[server.webhooks]`, so bounded).
    pub endpoint: String,
    /// `accepted` (2xx), `failed` (an error, a timeout or another status; retried),
    /// `gone` (410: the endpoint is disabled).
    pub outcome: String,
}

/// The webhook dispatcher's metrics (handles into [`Metrics`]' registry).
#[derive(Debug, Clone, Default)]
pub struct WebhookMetrics {
    /// Delivery attempts by endpoint and outcome.
    pub deliveries: Family<WebhookLabels, Counter>,
    /// Events whose delivery rounds ran out (kept in the outbox, marked failed).
    pub given_up: Counter,
}

impl WebhookMetrics {
    /// Counts one attempt.
    pub fn attempt(&self, endpoint: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&WebhookLabels {
                endpoint: endpoint.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

/// Every metric tollgate exports.
pub struct Metrics {
    registry: Registry,
    /// Decisions by plan, operation, outcome.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Per-limit results.
    pub limits: Family<LimitLabels, Counter>,
    /// Decision latency, seconds.
    pub decision_seconds: LatencyHistogram,
    /// Upstream answers by status class.
    pub upstream: Family<UpstreamLabels, Counter>,
    /// Upstream latency, seconds.
    pub upstream_seconds: LatencyHistogram,
    /// Upstream retries made.
    pub upstream_retries: Counter,
    /// Decisions the store could not make, by kind of error.
    pub store_errors: Family<StoreErrorLabels, Counter>,
    /// Requests admitted because a store error met fail-open limits only.
    pub fail_open: Counter,
    /// Decisions made on the local fallback (`on_store_error = "local"`).
    pub local_fallback: Counter,
    /// 1 while the store does not take calls (Redis circuit open), else 0.
    pub store_unavailable: Gauge,
    /// Credits committed.
    pub credits_charged: Counter,
    /// Requests refused because the account's balance did not cover their
    /// credit cost (answered before any limit is decided, so not in
    /// `decisions`).
    pub credits_refused: Family<CreditLabels, Counter>,
    /// Live counters in the in-memory store.
    pub live_counters: Gauge,
    /// Policy reloads by result.
    pub reloads: Family<UpstreamLabels, Counter>,
    /// Open connections on the proxy listener.
    pub connections_open: Gauge,
    /// Proxy connections closed at once because `max_connections` were open.
    pub connections_refused: Counter,
    /// Webhook deliveries.
    pub webhooks: WebhookMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by plan, operation and outcome",
            decisions.clone(),
        );
        let limits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_results",
            "Per-limit results: within, over, soft crossing, shadow would-reject",
            limits.clone(),
        );
        let decision_seconds = LatencyHistogram::new(exponential_buckets(0.000_001, 4.0, 12));
        registry.register(
            "decision_seconds",
            "Time to decide a request",
            decision_seconds.clone(),
        );
        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_responses",
            "Upstream answers by status class",
            upstream.clone(),
        );
        let upstream_seconds = LatencyHistogram::new(exponential_buckets(0.000_1, 4.0, 12));
        registry.register(
            "upstream_seconds",
            "Upstream latency per attempt",
            upstream_seconds.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Upstream attempts repeated after a retryable answer",
            upstream_retries.clone(),
        );
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Decisions the counter store could not make, by kind of error",
            store_errors.clone(),
        );
        let fail_open = Counter::default();
        registry.register(
            "fail_open",
            "Requests admitted because the store failed and the limits fail open",
            fail_open.clone(),
        );
        let local_fallback = Counter::default();
        registry.register(
            "local_fallback",
            "Decisions made on this replica's local fallback counters while the store failed",
            local_fallback.clone(),
        );
        let store_unavailable = Gauge::default();
        registry.register(
            "store_unavailable",
            "1 while the counter store does not take calls (circuit open), else 0",
            store_unavailable.clone(),
        );
        let credits_charged = Counter::default();
        registry.register(
            "credits_charged",
            "Credits committed",
            credits_charged.clone(),
        );
        let credits_refused = Family::<CreditLabels, Counter>::default();
        registry.register(
            "credits_refused",
            "Requests refused because the balance did not cover their credit cost, by plan and operation",
            credits_refused.clone(),
        );
        let live_counters = Gauge::default();
        registry.register(
            "live_counters",
            "Live counters in the in-memory store",
            live_counters.clone(),
        );
        let reloads = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result (ok, invalid)",
            reloads.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Open connections on the proxy listener",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Proxy connections closed at once because max_connections were open",
            connections_refused.clone(),
        );
        let webhooks = WebhookMetrics::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by endpoint and outcome (accepted, failed, gone)",
            webhooks.deliveries.clone(),
        );
        registry.register(
            "webhook_events_given_up",
            "Events whose webhook delivery rounds ran out",
            webhooks.given_up.clone(),
        );
        Metrics {
            registry,
            decisions,
            limits,
            decision_seconds,
            upstream,
            upstream_seconds,
            upstream_retries,
            store_errors,
            fail_open,
            local_fallback,
            store_unavailable,
            credits_charged,
            credits_refused,
            live_counters,
            reloads,
            connections_open,
            connections_refused,
            webhooks,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The status class label of an HTTP status.
pub fn class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

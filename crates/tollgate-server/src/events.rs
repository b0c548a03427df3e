//! Usage events into the ledger's durable outbox: soft-limit crossings (one
//! per account, limit and minute), hard-limit rejections aggregated per
//! account, limit and flush period, credits low and credits exhausted.
//!
//! The in-memory bookkeeping is bounded: past [`MAX_TRACKED`] entries new
//! ones are not tracked (the metrics still count every rejection).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::json;
use tollgate_core::Nanos;
use tollgate_ledger::{Ledger, NewEvent};

/// Most (account, limit) pairs tracked between flushes.
pub const MAX_TRACKED: usize = 100_000;
const CROSSING_PERIOD_NS: u64 = 60 * Nanos::SECOND;

/// Event bookkeeping.
#[derive(Debug, Default)]
pub struct Events {
    crossings: Mutex<HashMap<(String, String), Nanos>>,
    rejections: Mutex<HashMap<(String, String), u64>>,
}

impl Events {
    /// A soft limit was crossed: returns whether this is a new crossing (an
    /// event is due), i.e. the first for this account and limit in a minute.
    pub fn soft_crossed(&self, account: &str, limit: &str, now: Nanos) -> bool {
        let mut map = self
            .crossings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (account.to_owned(), limit.to_owned());
        match map.get(&key) {
            Some(at) if now.0.saturating_sub(at.0) < CROSSING_PERIOD_NS => false,
            _ if map.len() >= MAX_TRACKED => false,
            _ => {
                map.insert(key, now);
                true
            }
        }
    }

    /// Counts a hard rejection, reported at the next flush.
    pub fn rejected(&self, account: &str, limit: &str) {
        let mut map = self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (account.to_owned(), limit.to_owned());
        if let Some(n) = map.get_mut(&key) {
            *n += 1;
        } else if map.len() < MAX_TRACKED {
            map.insert(key, 1);
        }
    }

    /// Writes aggregated rejections as events and forgets stale crossings.
    pub async fn flush(&self, ledger: &Ledger, now: Nanos) {
        let pending: Vec<((String, String), u64)> = {
            let mut map = self
                .rejections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.drain().collect()
        };
        for ((account, limit), count) in pending {
            let event = NewEvent {
                account: Some(account),
                kind: "limit_rejections".into(),
                data: json!({ "limit": limit, "count": count }),
            };
            if let Err(e) = ledger.record_event(&event).await {
                tracing::warn!(error = %e, "could not record rejection event");
            }
        }
        let mut map = self
            .crossings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, at| now.0.saturating_sub(at.0) < CROSSING_PERIOD_NS);
    }
}

/// Records one event, logging (not failing) when the database is down.
pub async fn record(ledger: &Ledger, account: &str, kind: &str, data: serde_json::Value) {
    let event = NewEvent {
        account: Some(account.to_owned()),
        kind: kind.to_owned(),
        data,
    };
    if let Err(e) = ledger.record_event(&event).await {
        tracing::warn!(error = %e, kind, "could not record event");
    }
}

/// The `soft_limit_crossed` events a decision made due ([`crate::metric_cache::count_decision`]):
/// each limit's name and quota.
#[derive(Debug, Default)]
#[must_use = "the events are recorded by `record`"]
pub struct SoftCrossings {
    crossed: Vec<(String, u64)>,
}

impl SoftCrossings {
    /// Notes an event for `limit` at `quota`.
    pub(crate) fn push(&mut self, limit: &str, quota: u64) {
        self.crossed.push((limit.to_owned(), quota));
    }

    /// Whether no event is due (nothing to record, nothing to wait for).
    pub fn is_empty(&self) -> bool {
        self.crossed.is_empty()
    }

    /// Records the events for `account`, in the order of the limits.
    pub async fn record(self, ledger: &Ledger, account: &str) {
        for (limit, quota) in self.crossed {
            record(
                ledger,
                account,
                "soft_limit_crossed",
                json!({ "limit": limit, "quota": quota }),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_crossing_event_per_account_limit_and_minute() {
        let e = Events::default();
        let t = Nanos::from_secs(1000);
        assert!(e.soft_crossed("a", "l", t));
        assert!(!e.soft_crossed("a", "l", t));
        assert!(e.soft_crossed("b", "l", t));
        assert!(e.soft_crossed("a", "l", Nanos::from_secs(1060)));
    }
}

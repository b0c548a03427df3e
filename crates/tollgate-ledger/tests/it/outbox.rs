//! The events outbox under webhook delivery (C10 and G5 of RELIABILITY-PLAN.md
//! on the ledger side): exclusive claims across replicas, leases that expire
//! after a crash, per-endpoint progress, and events written in the charge's
//! own transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tollgate_ledger::{CommitEvents, LedgerError, NewEvent};

use crate::common::{Kind, account, both, fresh, reserved};

const LONG: Duration = Duration::from_secs(60);
/// A lease or back-off that must outlast a few statements on a loaded machine.
const SHORT: Duration = Duration::from_secs(2);

async fn record(ledger: &tollgate_ledger::Ledger, n: usize) {
    for i in 0..n {
        ledger
            .record_event(&NewEvent {
                account: Some("acme".into()),
                kind: "credits_low".into(),
                data: serde_json::json!({ "n": i }),
            })
            .await
            .expect("record");
    }
}

/// Two replicas × 8 dispatchers claim at once: every event is claimed by
/// exactly one of them while its lease lives (no concurrent double delivery).
async fn claims_are_exclusive_across_replicas(kind: Kind) {
    let db = fresh(kind).await;
    account(&db.ledger, "acme", 0).await;
    record(&db.ledger, 200).await;
    let replicas = [db.ledger.clone(), db.location.open().await];
    let mut tasks = Vec::new();
    for (r, ledger) in replicas.iter().enumerate() {
        for t in 0..8 {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let owner = format!("replica-{r}-{t}");
                let mut got = Vec::new();
                loop {
                    let batch = ledger.claim_events(&owner, 7, LONG).await.expect("claim");
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch.into_iter().map(|c| c.event.id));
                }
            }));
        }
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in tasks {
        for id in t.await.expect("task") {
            total += 1;
            seen.insert(id);
        }
    }
    assert_eq!(seen.len(), 200, "every event claimed");
    assert_eq!(total, 200, "an event was claimed twice under a live lease");
    assert!(!db.ledger.has_due_events().await.expect("due"));
}
both!(
    outbox_claims_are_exclusive_across_replicas,
    super::claims_are_exclusive_across_replicas
);

/// Lease expiry (a killed dispatcher), retries with per-endpoint progress,
/// finishing, giving up, and a stale owner changing nothing.
async fn lifecycle(kind: Kind) {
    let db = fresh(kind).await;
    let l = &db.ledger;
    account(l, "acme", 0).await;
    record(l, 2).await;
    // A dispatcher claims both and "crashes": after the lease they are due again.
    let first = l.claim_events("dead", 10, SHORT).await.expect("claim");
    assert_eq!(first.len(), 2);
    assert!(
        l.claim_events("other", 10, LONG)
            .await
            .expect("claim")
            .is_empty()
    );
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    let again = l.claim_events("alive", 10, LONG).await.expect("claim");
    assert_eq!(
        again.len(),
        2,
        "events of a crashed dispatcher are redelivered"
    );
    let (a, b) = (&again[0].event.id, &again[1].event.id);
    // `a`: endpoint one accepted, two failed → retried later, only to two.
    l.record_delivery(a, "one", 200).await.expect("delivery");
    l.reschedule_event(a, "dead", Duration::ZERO, false)
        .await
        .expect("stale owner");
    l.reschedule_event(a, "alive", SHORT, false)
        .await
        .expect("reschedule");
    // `b`: finished.
    l.finish_event(b).await.expect("finish");
    assert!(
        !l.has_due_events().await.expect("due"),
        "not due before its back-off"
    );
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    let retry = l.claim_events("alive", 10, LONG).await.expect("claim");
    assert_eq!(retry.len(), 1);
    assert_eq!(&retry[0].event.id, a);
    assert_eq!(
        retry[0].attempts, 1,
        "the stale owner's reschedule did not count"
    );
    assert_eq!(retry[0].delivered_to, vec!["one".to_owned()]);
    l.reschedule_event(a, "alive", Duration::ZERO, true)
        .await
        .expect("give up");
    let stats = l.outbox_stats().await.expect("stats");
    assert_eq!((stats.pending, stats.delivered, stats.failed), (0, 1, 1));
    l.disable_endpoint("gone", 410).await.expect("disable");
    l.disable_endpoint("gone", 410).await.expect("idempotent");
    assert_eq!(
        l.disabled_endpoints().await.expect("list"),
        vec!["gone".to_owned()]
    );
    assert!(l.enable_endpoint("gone").await.expect("enable"));
    assert!(!l.enable_endpoint("gone").await.expect("enable again"));
    assert!(l.disabled_endpoints().await.expect("list").is_empty());
}
both!(outbox_lifecycle, super::lifecycle);

/// C10 (ledger side): a charge and its events commit together; a commit that
/// fails writes no event; `credits_low` fires once, on the crossing.
async fn charge_events_share_the_transaction(kind: Kind) {
    let db = fresh(kind).await;
    let l = Arc::new(db.ledger.clone());
    account(&l, "acme", 12).await;
    let events = CommitEvents {
        charged: true,
        low_below: Some(10),
    };
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = reserved(&l, "acme", 1, None, LONG).await;
        ids.push(id.clone());
        l.commit_with_events(id, 1, None, events)
            .await
            .expect("commit");
    }
    // A second commit of a settled reservation fails and writes nothing.
    let err = l
        .commit_with_events(ids[0].clone(), 1, None, events)
        .await
        .expect_err("settled");
    assert!(matches!(err, LedgerError::ReservationSettled));
    let all = l.events(Some("acme"), None, 100).await.expect("events");
    let charged: Vec<_> = all.iter().filter(|e| e.kind == "credits_charged").collect();
    let low: Vec<_> = all.iter().filter(|e| e.kind == "credits_low").collect();
    assert_eq!(charged.len(), 4);
    assert_eq!(low.len(), 1, "one crossing of 10: {low:?}");
    assert_eq!(low[0].data["balance"], 9);
    let reservations: HashSet<String> = charged
        .iter()
        .map(|e| {
            e.data["reservation"]
                .as_str()
                .expect("reservation")
                .to_owned()
        })
        .collect();
    assert_eq!(reservations.len(), 4);
    assert_eq!(l.audit("acme").await.expect("audit").drift(), 0);
}
both!(
    outbox_charge_events_share_the_transaction,
    super::charge_events_share_the_transaction
);

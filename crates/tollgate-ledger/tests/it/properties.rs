//! Invariant under random concurrent work: many tasks grant, reserve, commit,
//! release and replay idempotency keys at random (seeded) while an auditor checks,
//! at every observation, grants = balance + committed + open reservations.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tollgate_ledger::{GrantKind, Idempotency, ReserveOutcome, StoredResponse};

use crate::common::{Kind, Rng, account, both, double_charged_keys, drifting_accounts, fresh};

const TASKS: u64 = 16;
const OPS: u64 = 150;
const ACCOUNTS: [&str; 2] = ["p0", "p1"];

async fn invariant_under_random_concurrency(kind: Kind) {
    let db = fresh(kind).await;
    for a in ACCOUNTS {
        account(&db.ledger, a, 100).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let audits = Arc::new(AtomicU64::new(0));
    let auditor = {
        let (ledger, stop, audits) = (db.ledger.clone(), stop.clone(), audits.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for a in ACCOUNTS {
                    let audit = ledger.audit(a).await.expect("audit");
                    assert!(audit.is_consistent(), "{a}: {audit:?}");
                    audits.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let ledger = db.ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x5EED ^ t);
            for _ in 0..OPS {
                let acct = ACCOUNTS[rng.range(0, 2) as usize];
                match rng.range(0, 10) {
                    0 => {
                        let key = format!("g{}", rng.range(0, 20));
                        ledger
                            .grant(
                                acct,
                                rng.range(1, 50) as i64,
                                GrantKind::Purchase,
                                "p",
                                &key,
                            )
                            .await
                            .expect("grant");
                    }
                    1 => {
                        ledger.expire_reservations().await.expect("expire");
                    }
                    _ => {
                        let k = rng.range(0, 40);
                        let idem = (rng.range(0, 3) > 0).then(|| Idempotency {
                            key: format!("i{k}"),
                            fingerprint: format!("f{k}"),
                        });
                        let amount = rng.range(1, 15) as i64;
                        let ttl = if rng.range(0, 10) == 0 {
                            Duration::ZERO
                        } else {
                            Duration::from_secs(60)
                        };
                        match ledger
                            .reserve(acct, amount, idem.as_ref(), ttl)
                            .await
                            .expect("reserve")
                        {
                            ReserveOutcome::Reserved { id, balance } => {
                                assert!(balance >= 0);
                                let r = match rng.range(0, 3) {
                                    0 => ledger.release(id).await,
                                    _ => {
                                        let resp = StoredResponse {
                                            status: 200,
                                            content_type: None,
                                            body: vec![1],
                                        };
                                        ledger
                                            .commit(
                                                id,
                                                rng.range(0, amount as u64 + 1) as i64,
                                                Some(&resp),
                                            )
                                            .await
                                    }
                                };
                                match r {
                                    Ok(b) => assert!(b >= 0),
                                    Err(tollgate_ledger::LedgerError::ReservationSettled) => {} // expired first
                                    Err(e) => panic!("{e:?}"),
                                }
                            }
                            ReserveOutcome::Insufficient { balance } => assert!(balance >= 0),
                            ReserveOutcome::InProgress | ReserveOutcome::Completed(_) => {}
                            ReserveOutcome::Mismatch => panic!("fingerprints are per key"),
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    stop.store(true, Ordering::Relaxed);
    auditor.await.expect("auditor");
    println!(
        "properties {kind:?}: {} consistent audits during {} ops",
        audits.load(Ordering::Relaxed),
        TASKS * OPS
    );
    assert!(audits.load(Ordering::Relaxed) > 10);
    assert!(double_charged_keys(&db.ledger).await.is_empty());
    assert!(drifting_accounts(&db.ledger).await.is_empty());
}
both!(
    invariant_random_concurrency,
    super::invariant_under_random_concurrency
);

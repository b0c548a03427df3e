//! C1, C9 (with their read-modify-write teeth), C2, C7, C8 and plain credit rules.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tollgate_ledger::{
    GrantKind, Idempotency, Ledger, LedgerError, ReservationId, ReserveOutcome, StoredResponse,
};

use crate::common::{Kind, account, both, double_charged_keys, drifting_accounts, fresh, reserved};

const TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    successes: AtomicU64,
    insufficient: AtomicU64,
    /// Reserves that ran out of PostgreSQL's operation bound after getting a
    /// connection, and were made again: each may have left a reservation
    /// behind (see [`hammer`]).
    ambiguous: AtomicU64,
    min_balance: AtomicI64,
}

/// `call`, again while it fails only for want of a pooled connection
/// (`PoolTimedOut`: no statement ran, so nothing changed). [`hammer`]'s 64
/// tasks share the pool's 10 connections, and on a loaded 2-core machine a
/// task can wait past the pool's 1 s bound; a caller of the server would get
/// a 503 and retry, which is what this does.
async fn patiently<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, LedgerError>
where
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    loop {
        match call().await {
            Err(LedgerError::Database(sqlx::Error::PoolTimedOut)) => {}
            other => return other,
        }
    }
}

/// Commits `id` for 1 credit, again after a commit that ran out of
/// PostgreSQL's operation bound once connected (it may or may not have taken
/// effect): the balance after it, or `None` when a timed-out attempt had
/// committed it (only the hammer settles its reservations).
async fn commit_surely(ledger: &Ledger, id: &ReservationId) -> Option<i64> {
    let mut timed_out = false;
    loop {
        match patiently(|| ledger.commit(id.clone(), 1, None)).await {
            Ok(after) => return Some(after),
            Err(LedgerError::TimedOut { .. }) => timed_out = true,
            Err(LedgerError::ReservationSettled) if timed_out => return None,
            Err(e) => panic!("commit: {e:?}"),
        }
    }
}

/// 64 tasks share `attempts` reserve(1)+commit(1) tries on one account.
///
/// On a loaded machine a PostgreSQL call can run out of its 2 s bound after
/// getting its connection (`LedgerError::TimedOut`), and then whether it took
/// effect is unknown: a commit is made again until it is known settled; a
/// reserve is made again and counted in `ambiguous`, since the first may have
/// left an open reservation holding its credit (until its TTL) that no task
/// knows of. The tests account for those through the audit.
async fn hammer(ledger: &Ledger, acct: &str, attempts: u64, broken: bool) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (ledger, tally, acct) = (ledger.clone(), tally.clone(), acct.to_owned());
        tasks.push(tokio::spawn(async move {
            while tally.attempts.fetch_add(1, Ordering::Relaxed) < attempts {
                let outcome = loop {
                    let reserved = patiently(|| async {
                        if broken {
                            ledger
                                .reserve_read_modify_write_for_test(&acct, 1, TTL)
                                .await
                        } else {
                            ledger.reserve(&acct, 1, None, TTL).await
                        }
                    })
                    .await;
                    match reserved {
                        Err(LedgerError::TimedOut { .. }) => {
                            tally.ambiguous.fetch_add(1, Ordering::Relaxed);
                        }
                        other => break other.expect("reserve"),
                    }
                };
                match outcome {
                    ReserveOutcome::Reserved { id, balance } => {
                        tally.min_balance.fetch_min(balance, Ordering::Relaxed);
                        if let Some(after) = commit_surely(&ledger, &id).await {
                            tally.min_balance.fetch_min(after, Ordering::Relaxed);
                        }
                        tally.successes.fetch_add(1, Ordering::Relaxed);
                    }
                    ReserveOutcome::Insufficient { balance } => {
                        tally.min_balance.fetch_min(balance, Ordering::Relaxed);
                        tally.insufficient.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    tally
}

/// C1 (and C9 on PostgreSQL, which runs at READ COMMITTED): exactly the balance is
/// spent, never below zero.
async fn c1_concurrent_charges_never_overspend(kind: Kind) {
    let db = fresh(kind).await;
    account(&db.ledger, "c1", 10_000).await;
    let t = hammer(&db.ledger, "c1", 20_000, false).await;
    let (ok, denied) = (
        t.successes.load(Ordering::Relaxed),
        t.insufficient.load(Ordering::Relaxed),
    );
    let ambiguous = t.ambiguous.load(Ordering::Relaxed);
    println!(
        "C1 {kind:?}: successes {ok}, insufficient {denied}, timed-out reserves made again \
         {ambiguous}, min balance seen {}",
        t.min_balance.load(Ordering::Relaxed)
    );
    let audit = db.ledger.audit("c1").await.expect("audit");
    assert!(audit.is_consistent(), "{audit:?}");
    // Exactly the balance is spent: committed by the tasks, or held by a
    // reservation a timed-out reserve left behind (none without time-outs).
    let orphaned = audit.open_reserved;
    assert!(
        orphaned <= ambiguous as i64,
        "{audit:?}, {ambiguous} ambiguous"
    );
    assert_eq!(ok as i64 + orphaned, 10_000);
    assert_eq!(ok + denied, 20_000);
    assert!(t.min_balance.load(Ordering::Relaxed) >= 0);
    assert_eq!(db.ledger.balance("c1").await.expect("balance"), 0);
    assert_eq!(audit.committed, ok as i64);
    assert!(drifting_accounts(&db.ledger).await.is_empty());
}
both!(
    c1_concurrent_charges,
    super::c1_concurrent_charges_never_overspend
);

/// Teeth of C1/C9: the read-then-write variant over-spends (on PostgreSQL at READ
/// COMMITTED, this is the SELECT-then-UPDATE that C9 names).
async fn c1_teeth_read_modify_write_overspends(kind: Kind) {
    let db = fresh(kind).await;
    account(&db.ledger, "teeth", 2_000).await;
    let t = hammer(&db.ledger, "teeth", 4_000, true).await;
    let ok = t.successes.load(Ordering::Relaxed);
    println!("C1 teeth {kind:?}: successes {ok} of a 2000 balance");
    assert!(ok > 2_000, "the broken variant must over-spend, got {ok}");
    // and the audit catches it
    assert!(
        !db.ledger
            .audit("teeth")
            .await
            .expect("audit")
            .is_consistent()
    );
    assert!(!drifting_accounts(&db.ledger).await.is_empty());
}
both!(c1_teeth_rmw, super::c1_teeth_read_modify_write_overspends);

fn idem(key: &str, fingerprint: &str) -> Idempotency {
    Idempotency {
        key: key.to_owned(),
        fingerprint: fingerprint.to_owned(),
    }
}

/// C2: one idempotency key, 32 concurrent requests → one reservation; replays after
/// commit get the stored response; a different fingerprint is a mismatch; after a
/// release the key may reserve again.
async fn c2_idempotency(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "c2", 100).await;
    let key = idem("order-1", "fp-a");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (ledger, key) = (ledger.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            ledger
                .reserve("c2", 5, Some(&key), TTL)
                .await
                .expect("reserve")
        }));
    }
    let mut ids = Vec::new();
    let mut in_progress = 0;
    for t in tasks {
        match t.await.expect("task") {
            ReserveOutcome::Reserved { id, .. } => ids.push(id),
            ReserveOutcome::InProgress => in_progress += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(in_progress, 31);
    let response = StoredResponse {
        status: 201,
        content_type: Some("application/json".into()),
        body: br#"{"ok":true}"#.to_vec(),
    };
    let id = ids.pop().expect("one");
    assert_eq!(
        ledger.commit(id, 4, Some(&response)).await.expect("commit"),
        96
    );
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (ledger, key) = (ledger.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            ledger
                .reserve("c2", 5, Some(&key), TTL)
                .await
                .expect("replay")
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("task"),
            ReserveOutcome::Completed(response.clone())
        );
    }
    assert_eq!(
        ledger
            .reserve("c2", 5, Some(&idem("order-1", "fp-b")), TTL)
            .await
            .expect("mismatch"),
        ReserveOutcome::Mismatch
    );
    assert_eq!(ledger.balance("c2").await.expect("balance"), 96);

    // After a release the same key reserves again; it is then charged once.
    let key2 = idem("order-2", "fp");
    let id = reserved(ledger, "c2", 10, Some(&key2), TTL).await;
    assert_eq!(
        ledger.reserve("c2", 10, Some(&key2), TTL).await.expect("r"),
        ReserveOutcome::InProgress
    );
    ledger.release(id).await.expect("release");
    let id = reserved(ledger, "c2", 10, Some(&key2), TTL).await;
    ledger.commit(id, 10, None).await.expect("commit");
    assert_eq!(
        ledger.reserve("c2", 10, Some(&key2), TTL).await.expect("r"),
        ReserveOutcome::Completed(StoredResponse {
            status: 200,
            content_type: None,
            body: vec![]
        })
    );
    // An insufficient reservation leaves no idempotency record behind.
    let key3 = idem("order-3", "fp");
    assert!(matches!(
        ledger
            .reserve("c2", 1000, Some(&key3), TTL)
            .await
            .expect("r"),
        ReserveOutcome::Insufficient { balance: 86 }
    ));
    assert!(matches!(
        ledger.reserve("c2", 1, Some(&key3), TTL).await.expect("r"),
        ReserveOutcome::Reserved { .. }
    ));
    assert!(double_charged_keys(ledger).await.is_empty());
    assert!(ledger.audit("c2").await.expect("audit").is_consistent());
}
both!(c2_idempotency_one_charge, super::c2_idempotency);

/// Completed idempotency records are pruned after the retention; open ones stay,
/// so a request in flight still cannot be charged twice.
async fn idempotency_records_are_pruned(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "prune", 100).await;
    let done = idem("done", "fp");
    let id = reserved(ledger, "prune", 5, Some(&done), TTL).await;
    ledger.commit(id, 5, None).await.expect("commit");
    let open = idem("open", "fp");
    assert!(matches!(
        ledger
            .reserve("prune", 5, Some(&open), TTL)
            .await
            .expect("r"),
        ReserveOutcome::Reserved { .. }
    ));
    // Within the retention nothing goes.
    assert_eq!(
        ledger
            .prune_idempotency(Duration::from_secs(3600))
            .await
            .expect("prune"),
        0
    );
    assert!(matches!(
        ledger
            .reserve("prune", 5, Some(&done), TTL)
            .await
            .expect("r"),
        ReserveOutcome::Completed(_)
    ));
    // Past it the completed record goes; the open one stays.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        ledger
            .prune_idempotency(Duration::from_millis(1))
            .await
            .expect("prune"),
        1
    );
    assert_eq!(
        ledger
            .reserve("prune", 5, Some(&open), TTL)
            .await
            .expect("r"),
        ReserveOutcome::InProgress
    );
    // The pruned key is a new request now.
    assert!(matches!(
        ledger
            .reserve("prune", 5, Some(&done), TTL)
            .await
            .expect("r"),
        ReserveOutcome::Reserved { .. }
    ));
    assert!(ledger.audit("prune").await.expect("audit").is_consistent());
}
both!(idempotency_pruning, super::idempotency_records_are_pruned);

/// C8: commit vs release vs expiry of the same reservation, concurrently: exactly one
/// outcome every time; commit above the reservation is rejected and changes nothing.
async fn c8_settlement_races(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "c8", 1_000_000).await;
    let rounds = 200;
    let (mut commits, mut releases, mut expiries) = (0, 0, 0);
    for _ in 0..rounds {
        let id = reserved(ledger, "c8", 3, None, Duration::ZERO).await;
        let (l1, l2, l3) = (ledger.clone(), ledger.clone(), ledger.clone());
        let (i1, i2) = (id.clone(), id.clone());
        let c = tokio::spawn(async move { l1.commit(i1, 2, None).await });
        let r = tokio::spawn(async move { l2.release(i2).await });
        let e = tokio::spawn(async move { l3.expire_reservations().await });
        let (c, r, e) = (
            c.await.expect("c"),
            r.await.expect("r"),
            e.await.expect("e"),
        );
        let mut outcomes = 0;
        match c {
            Ok(_) => {
                outcomes += 1;
                commits += 1
            }
            Err(LedgerError::ReservationSettled) => {}
            Err(e) => panic!("commit: {e:?}"),
        }
        match r {
            Ok(_) => {
                outcomes += 1;
                releases += 1
            }
            Err(LedgerError::ReservationSettled) => {}
            Err(e) => panic!("release: {e:?}"),
        }
        let expired = e.expect("expire");
        outcomes += expired;
        expiries += expired;
        assert_eq!(outcomes, 1, "exactly one settlement of {id}");
    }
    println!(
        "C8 {kind:?}: {rounds} races → commits {commits}, releases {releases}, expiries {expiries}"
    );
    let settlements = ledger
        .query_strings_for_test("SELECT reservation FROM credit_journal WHERE kind IN ('commit','release','expire') GROUP BY reservation HAVING COUNT(*) <> 1")
        .await
        .expect("q");
    assert!(settlements.is_empty());
    let audit = ledger.audit("c8").await.expect("audit");
    assert!(audit.is_consistent(), "{audit:?}");
    assert_eq!(audit.open_reserved, 0);

    // Commit above the reservation: rejected, reservation untouched, then committable.
    let before = ledger.balance("c8").await.expect("b");
    let id = reserved(ledger, "c8", 5, None, TTL).await;
    for _ in 0..100 {
        assert!(matches!(
            ledger.commit(id.clone(), 6, None).await,
            Err(LedgerError::CommitAboveReservation {
                reserved: 5,
                amount: 6
            })
        ));
    }
    assert_eq!(
        ledger.commit(id.clone(), 5, None).await.expect("commit"),
        before - 5
    );
    assert!(matches!(
        ledger.commit(id.clone(), 5, None).await,
        Err(LedgerError::ReservationSettled)
    ));
    assert!(matches!(
        ledger.release(id).await,
        Err(LedgerError::ReservationSettled)
    ));
    assert!(matches!(
        ledger.release(ReservationId("nope".into())).await,
        Err(LedgerError::NotFound { .. })
    ));
}
both!(c8_races, super::c8_settlement_races);

/// C7: the reconciliation query finds no drift after normal work and finds a
/// deliberately corrupted balance.
async fn c7_reconciliation(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    for a in ["r1", "r2", "r3"] {
        account(ledger, a, 50).await;
        ledger
            .grant(a, 25, GrantKind::Purchase, "top-up", "p1")
            .await
            .expect("grant");
        let id = reserved(ledger, a, 10, None, TTL).await;
        ledger.commit(id, 7, None).await.expect("commit");
        let id = reserved(ledger, a, 10, None, TTL).await;
        ledger.release(id).await.expect("release");
        ledger.reserve(a, 4, None, TTL).await.expect("left open");
    }
    assert!(drifting_accounts(ledger).await.is_empty());
    let audit = ledger.audit("r1").await.expect("audit");
    assert_eq!(
        (
            audit.grants,
            audit.balance,
            audit.committed,
            audit.open_reserved
        ),
        (75, 64, 7, 4)
    );
    ledger
        .execute_for_test("UPDATE accounts SET balance = balance + 1 WHERE id = 'r2'")
        .await
        .expect("corrupt");
    assert_eq!(drifting_accounts(ledger).await, vec!["r2".to_owned()]);
    assert_eq!(ledger.audit("r2").await.expect("audit").drift(), -1);
}
both!(c7_reconcile, super::c7_reconciliation);

async fn grants_amounts_and_errors(kind: Kind) {
    let db = fresh(kind).await;
    let ledger = &db.ledger;
    account(ledger, "g", 0).await;
    assert_eq!(
        ledger
            .grant("g", 10, GrantKind::Purchase, "buy", "k1")
            .await
            .expect("g"),
        10
    );
    assert_eq!(
        ledger
            .grant("g", 10, GrantKind::Purchase, "buy", "k1")
            .await
            .expect("g"),
        10,
        "same key grants once"
    );
    assert_eq!(
        ledger
            .grant("g", 5, GrantKind::Allowance, "month", "k2")
            .await
            .expect("g"),
        15
    );
    for bad in [0, -1, 1_000_000_000_001, i64::MIN] {
        assert!(matches!(
            ledger.grant("g", bad, GrantKind::Free, "x", "k3").await,
            Err(LedgerError::InvalidAmount { .. })
        ));
        assert!(matches!(
            ledger.reserve("g", bad, None, TTL).await,
            Err(LedgerError::InvalidAmount { .. })
        ));
    }
    assert!(matches!(
        ledger.grant("nobody", 1, GrantKind::Free, "x", "k").await,
        Err(LedgerError::NotFound { .. })
    ));
    assert!(matches!(
        ledger.reserve("nobody", 1, None, TTL).await,
        Err(LedgerError::NotFound { .. })
    ));
    assert!(matches!(
        ledger.balance("nobody").await,
        Err(LedgerError::NotFound { .. })
    ));
    assert_eq!(
        ledger.reserve("g", 16, None, TTL).await.expect("r"),
        ReserveOutcome::Insufficient { balance: 15 }
    );
    // grants racing with one idempotency key: one grant
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let l = ledger.clone();
        tasks.push(tokio::spawn(async move {
            l.grant("g", 100, GrantKind::Purchase, "buy", "race").await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("grant");
    }
    assert_eq!(ledger.balance("g").await.expect("b"), 115);
    assert!(ledger.audit("g").await.expect("audit").is_consistent());
}
both!(grants_and_amounts, super::grants_amounts_and_errors);

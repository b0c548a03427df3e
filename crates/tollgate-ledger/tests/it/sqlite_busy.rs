//! C5: SQLite with WAL, `BEGIN IMMEDIATE` and a busy timeout: 16 writers never see
//! SQLITE_BUSY; the deferred-transaction teeth do.

use std::time::Duration;

use tollgate_ledger::{Ledger, LedgerError, ReserveOutcome};

use crate::common::{Kind, account, fresh};

const WRITERS: usize = 16;
const CHARGES: usize = 1_000;

async fn run(ledger: &Ledger, per_writer: usize, deferred: bool) -> (usize, Vec<LedgerError>) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let acct = format!("w{w}");
            let (mut ok, mut errors) = (0, Vec::new());
            for _ in 0..per_writer {
                let r = if deferred {
                    ledger
                        .reserve_deferred_for_test(&acct, 1, Duration::from_secs(60))
                        .await
                } else {
                    ledger
                        .reserve(&acct, 1, None, Duration::from_secs(60))
                        .await
                };
                match r {
                    Ok(ReserveOutcome::Reserved { id, .. }) => {
                        match ledger.commit(id, 1, None).await {
                            Ok(_) => ok += 1,
                            Err(e) => errors.push(e),
                        }
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(e) => errors.push(e),
                }
            }
            (ok, errors)
        }));
    }
    let (mut ok, mut errors) = (0, Vec::new());
    for t in tasks {
        let (o, e) = t.await.expect("task");
        ok += o;
        errors.extend(e);
    }
    (ok, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_sqlite_writers_never_see_busy() {
    let db = fresh(Kind::Sqlite).await;
    for w in 0..WRITERS {
        account(&db.ledger, &format!("w{w}"), 1_000_000).await;
    }
    let start = tokio::time::Instant::now();
    let (ok, errors) = run(&db.ledger, CHARGES, false).await;
    println!(
        "C5: {ok} charges by {WRITERS} writers in {:?}, errors {}",
        start.elapsed(),
        errors.len()
    );
    assert!(errors.is_empty(), "{:?}", errors.first());
    assert_eq!(ok, WRITERS * CHARGES);
    assert_eq!(
        db.ledger
            .query_strings_for_test("PRAGMA integrity_check")
            .await
            .expect("check"),
        vec!["ok"]
    );
    for w in 0..WRITERS {
        assert!(
            db.ledger
                .audit(&format!("w{w}"))
                .await
                .expect("audit")
                .is_consistent()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_teeth_deferred_transactions_show_busy() {
    let db = fresh(Kind::Sqlite).await;
    for w in 0..WRITERS {
        account(&db.ledger, &format!("w{w}"), 1_000_000).await;
    }
    let (ok, errors) = run(&db.ledger, 200, true).await;
    let busy = errors
        .iter()
        .filter(|e| matches!(e, LedgerError::Database(sqlx::Error::Database(d)) if d.code().is_some_and(|c| c == "5" || c == "517" || c == "6")))
        .count();
    println!(
        "C5 teeth: {ok} charges, {} errors of which SQLITE_BUSY {busy}",
        errors.len()
    );
    assert!(busy > 0, "deferred transactions must surface SQLITE_BUSY");
}

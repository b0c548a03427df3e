//! C3: a child process charges credits in a loop and is SIGKILLed at random seeded
//! moments, 20 times, then restarted; after every kill the invariant holds exactly,
//! no idempotency key is charged twice, and every acknowledged charge is committed.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use tollgate_ledger::{Idempotency, LedgerError, ReserveOutcome, StoredResponse};

use crate::common::{
    Kind, Location, Rng, account, both, double_charged_keys, drifting_accounts, fresh,
};

const CHILD_ENV: &str = "TOLLGATE_LEDGER_CRASH_CHILD";
const KILLS: usize = 20;
const WORKERS: usize = 4;
const ACCOUNT: &str = "crash";
const TTL: Duration = Duration::from_millis(300);

/// The child: does nothing unless started by the crash test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    let Ok(location) = std::env::var(CHILD_ENV) else {
        return;
    };
    let ledger = Location::decode(&location).open().await;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let done: usize = ledger
                .query_strings_for_test(&format!(
                    "SELECT CAST(COUNT(*) AS TEXT) FROM idempotency WHERE account = '{ACCOUNT}' AND key LIKE 'w{w}-%' AND state = 'completed'"
                ))
                .await
                .expect("count")[0]
                .parse()
                .expect("number");
            let mut rng = Rng::new(w as u64 ^ done as u64);
            // replay the last two completed keys: they must not charge again
            let mut i = done.saturating_sub(2);
            loop {
                let idem = Idempotency { key: format!("w{w}-{i}"), fingerprint: format!("fp-{i}") };
                let amount = rng.range(1, 10) as i64;
                match ledger.reserve(ACCOUNT, amount, Some(&idem), TTL).await {
                    Ok(ReserveOutcome::Reserved { id, .. }) => {
                        if rng.range(0, 5) == 0 {
                            let _ = ledger.release(id).await; // then retry the same key
                            continue;
                        }
                        let body = format!("charged {}", idem.key).into_bytes();
                        let response = StoredResponse { status: 200, content_type: None, body };
                        match ledger.commit(id, amount - rng.range(0, 2) as i64, Some(&response)).await {
                            Ok(_) => {
                                println!("ack {}", idem.key);
                                i += 1;
                            }
                            // expired before we committed: retry the key
                            Err(LedgerError::ReservationSettled) => {}
                            Err(e) => panic!("commit: {e:?}"),
                        }
                    }
                    Ok(ReserveOutcome::Completed(_)) => i += 1,
                    Ok(ReserveOutcome::InProgress) => {
                        // left open by a killed predecessor: wait for its TTL
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        ledger.expire_reservations().await.expect("expire");
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    // Workers charge until the parent kills the process; one that panics ends it.
    #[allow(clippy::never_loop)]
    for t in tasks {
        t.await.expect("worker");
    }
}

async fn c3_kill_nine_keeps_the_invariant(kind: Kind) {
    let db = fresh(kind).await;
    account(&db.ledger, ACCOUNT, 1_000_000_000).await;
    let mut rng = Rng::new(0xC3);
    let exe = std::env::current_exe().expect("test binary");
    let mut acked = Vec::new();
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "crash::child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, db.location.encode())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let wait = rng.range(200, 700);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        assert!(
            child.try_wait().expect("poll").is_none(),
            "child {kill} exited early"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        acked.extend(
            out.lines()
                .filter_map(|l| l.strip_prefix("ack "))
                .map(str::to_owned),
        );
        let audit = db.ledger.audit(ACCOUNT).await.expect("audit");
        assert!(audit.is_consistent(), "after kill {kill}: {audit:?}");
    }
    tokio::time::sleep(TTL + Duration::from_millis(50)).await;
    db.ledger.expire_reservations().await.expect("expire");
    let audit = db.ledger.audit(ACCOUNT).await.expect("audit");
    println!(
        "C3 {kind:?}: {KILLS} kills, {} acknowledged charges, audit {audit:?}",
        acked.len()
    );
    assert!(audit.is_consistent(), "{audit:?}");
    assert_eq!(audit.open_reserved, 0, "reservations older than the TTL");
    assert!(acked.len() >= KILLS, "the child did charge");
    assert!(
        double_charged_keys(&db.ledger).await.is_empty(),
        "a key charged twice"
    );
    assert!(drifting_accounts(&db.ledger).await.is_empty());
    let committed: std::collections::HashSet<String> = db
        .ledger
        .query_strings_for_test("SELECT idempotency_key FROM credit_journal WHERE kind = 'commit'")
        .await
        .expect("commits")
        .into_iter()
        .collect();
    for key in &acked {
        assert!(
            committed.contains(key),
            "acknowledged {key} without a committed charge"
        );
    }
    if kind == Kind::Sqlite {
        assert_eq!(
            db.ledger
                .query_strings_for_test("PRAGMA integrity_check")
                .await
                .expect("check"),
            vec!["ok"]
        );
    }
}
both!(c3_crash, super::c3_kill_nine_keeps_the_invariant);

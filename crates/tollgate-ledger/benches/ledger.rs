//! Throughput of reserve+commit on SQLite and PostgreSQL, beside the raw rate of a
//! single-row `UPDATE … SET balance = balance - 1` on the same database (same pool,
//! same durability settings): the ratio says what the ledger's bookkeeping costs.
//!
//! `cargo bench -p tollgate-ledger --bench ledger` (each figure runs
//! `TOLLGATE_BENCH_SECONDS`, default 3 s; PostgreSQL at `TOLLGATE_TEST_DATABASE_URL`,
//! default the local `test` database, in a throw-away schema).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tollgate_ledger::{Ledger, NewAccount, ReserveOutcome};

#[derive(Clone, Copy)]
enum Work {
    ReserveCommit,
    RawUpdate,
}

async fn measure(ledger: &Ledger, work: Work, tasks: usize, seconds: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (ledger, done, stop) = (ledger.clone(), done.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let acct = format!("bench{t}");
            let raw = format!("UPDATE accounts SET balance = balance - 1 WHERE id = '{acct}'");
            while !stop.load(Ordering::Relaxed) {
                match work {
                    Work::ReserveCommit => {
                        let ReserveOutcome::Reserved { id, .. } = ledger
                            .reserve(&acct, 1, None, Duration::from_secs(60))
                            .await
                            .expect("reserve")
                        else {
                            panic!("bench accounts hold plenty of credits")
                        };
                        ledger.commit(id, 1, None).await.expect("commit");
                    }
                    Work::RawUpdate => {
                        ledger.execute_for_test(&raw).await.expect("update");
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn run(name: &str, ledger: &Ledger, seconds: f64) {
    for t in 0..16 {
        ledger
            .create_account(&NewAccount {
                id: format!("bench{t}"),
                plan: "bench".into(),
                org: None,
                created_at: None,
                grant: 1_000_000_000_000,
            })
            .await
            .expect("account");
    }
    for tasks in [1, 16] {
        let ledger_rate = measure(ledger, Work::ReserveCommit, tasks, seconds).await;
        let raw_rate = measure(ledger, Work::RawUpdate, tasks, seconds).await;
        println!(
            "ledger/{name}/{tasks}-tasks: reserve+commit {ledger_rate:.0}/s, raw single-row UPDATE {raw_rate:.0}/s, ratio {:.2} (a reserve+commit is 2 transactions)",
            ledger_rate / raw_rate
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    let seconds: f64 = std::env::var("TOLLGATE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bench.db");
        let sqlite = Ledger::open(path.to_str().expect("utf-8"))
            .await
            .expect("sqlite");
        run("sqlite", &sqlite, seconds).await;

        let url = std::env::var("TOLLGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("tg_ledger_bench_{}", std::process::id());
        match Ledger::open_postgres_schema(&url, &schema).await {
            Ok(pg) => {
                run("postgres", &pg, seconds).await;
                pg.execute_for_test(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                    .await
                    .expect("drop schema");
            }
            Err(e) => println!("ledger/postgres: skipped ({e})"),
        }
    });
}

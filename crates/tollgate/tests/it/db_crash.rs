//! C4 and B9 of RELIABILITY-PLAN.md against the real binary: `kill -9` of
//! the PostgreSQL postmaster (a cluster of the test's own, on a free port)
//! while clients charge credits through `tollgate serve`, restarted once the
//! old backends are gone; then the same audit as C3.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_ledger::Ledger;

use crate::crash::{
    Clients, Consumer, LedgerFigures, Outcomes, Rng, Supervisor, free_port, open_accounts, policy,
};
use crate::support::Upstream;

/// A PostgreSQL cluster of the test's own: `initdb` into a temporary
/// directory, `postgres` on a free loopback port, trust authentication.
/// Run as the `postgres` user when the test runs as root (PostgreSQL refuses
/// root). Stopped (SIGQUIT) on drop.
struct OwnPostgres {
    root: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    starts: u32,
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // A test that stopped the cluster (B9's hang) and then failed must
        // not leave stopped processes behind.
        self.signal_all("CONT");
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

/// The directory of `initdb` and `postgres` (Debian keeps them per major
/// version under `/usr/lib/postgresql`; `scripts/test.sh` installs them).
fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect(
        "PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql: \
         apt-get install postgresql, or run scripts/test.sh",
    )
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("id");
    assert!(out.status.success(), "no `postgres` user to run PostgreSQL");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

impl OwnPostgres {
    fn init() -> OwnPostgres {
        let root = tempfile::Builder::new()
            .prefix("tollgate-c4-")
            .tempdir()
            .expect("dir");
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let run_as = is_root.then(|| (id_of("-u"), id_of("-g")));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(root.path(), Some(uid), Some(gid)).expect("chown");
        }
        let pg = OwnPostgres {
            root,
            bin: postgres_bin(),
            port: free_port(),
            run_as,
            child: None,
            starts: 0,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.current_dir(self.root.path());
        c
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn log(&self, n: u32) -> PathBuf {
        self.root.path().join(format!("postgres-{n}.log"))
    }

    /// Starts the postmaster and waits until it accepts connections. Right
    /// after a `kill -9` the old backends may still hold the shared memory
    /// (PostgreSQL then refuses to start): it is retried until they are gone.
    async fn start(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.starts += 1;
            let log = std::fs::File::create(self.log(self.starts)).expect("log");
            let mut child = self
                .command("postgres")
                .arg("-D")
                .arg(self.data())
                .args(["-p", &self.port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!(
                    "unix_socket_directories={}",
                    self.root.path().display()
                ))
                .args(["-c", "max_connections=60", "-c", "shared_buffers=16MB"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn postgres");
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // refused to start; try again
                }
                let ready = self
                    .command("pg_isready")
                    .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                if ready {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "postgres not ready in 60 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not restart in 60 s:\n{}",
                std::fs::read_to_string(self.log(self.starts)).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The postmaster and every process it started (backends, background
    /// workers), read from `/proc`.
    fn pids(&self) -> Vec<u32> {
        let Some(postmaster) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // `pid (comm) state ppid …`: the command name may hold spaces.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends `SIG<sig>` to the postmaster, then to all its children: read
    /// after the postmaster got it, so that a stopped postmaster cannot fork
    /// a backend that escapes the signal.
    fn signal_all(&self, sig: &str) {
        let kill = |pids: &[u32]| {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .args(pids.iter().map(u32::to_string))
                .status();
        };
        let pids = self.pids();
        if let Some((postmaster, _)) = pids.split_first() {
            kill(&[*postmaster]);
            kill(&self.pids()[1..]);
        }
    }

    /// `kill -9` of the postmaster (its backends notice and exit by themselves).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            let _ = c.wait();
        }
    }
}

/// `tollgate serve` on a PostgreSQL cluster of the test's own, with C3's
/// policy (its webhook consumer included) but the given request timeout
/// and reservation TTL (C4, B9). Fields drop in order: the server first,
/// its directory last.
struct OnOwnPostgres {
    sup: Supervisor,
    pg: OwnPostgres,
    up: Upstream,
    consumer: Consumer,
    dir: tempfile::TempDir,
}

async fn serve_on_own_postgres(request_timeout: &str, reservation_ttl: &str) -> OnOwnPostgres {
    let mut pg = OwnPostgres::init();
    pg.start().await;
    let dir = tempfile::tempdir().expect("dir");
    let up = Upstream::start().await;
    let (consumer, consumer_addr) = Consumer::start(0).await;
    let timeout = format!("request_timeout = \"{request_timeout}\"");
    let ttl = format!("reservation_ttl = \"{reservation_ttl}\"");
    let policy = policy(consumer_addr, "50ms")
        .replace("request_timeout = \"2s\"", &timeout)
        .replace("reservation_ttl = \"3s\"", &ttl);
    assert!(
        policy.contains(&timeout) && policy.contains(&ttl),
        "C3's policy changed: {policy}"
    );
    let mut sup = Supervisor::new(dir.path(), &policy, &up);
    sup.database = Some(pg.url());
    sup.start().await;
    OnOwnPostgres {
        sup,
        pg,
        up,
        consumer,
        dir,
    }
}

/// Whether `at` falls in an outage window, extended by `grace` after the
/// database was back.
fn in_outage(at: Instant, outages: &[(Instant, Instant)], grace: Duration) -> bool {
    outages
        .iter()
        .any(|(down, up)| at >= *down && at <= *up + grace)
}

/// C4 (with B9): the PostgreSQL postmaster is `kill -9`ed 5 times while 16
/// clients charge credits with Idempotency-Keys through `tollgate serve`.
/// Figures: Σ grants = balance + committed + open after every restart and
/// at the end, journal replay drift 0, duplicate charges 0, 2xx without a
/// charge 0, requests forwarded without a reservation 0, stale reservations
/// 0, charges without their event 0; requests that ended 5xx only during an
/// outage or within 2 s after the database was back, and those all 503
/// (B9: never forwarded unpaid); no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c4_kill_9_postgresql_keeps_the_ledger_exact() {
    const KILLS: usize = 5;
    const CLIENTS: usize = 16;
    const ACCOUNTS: usize = 4;
    const GRANT: i64 = 1_000_000;
    const GRACE: Duration = Duration::from_secs(2);
    let seed: u64 = std::env::var("C4_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc4c4_2026);
    eprintln!("C4 seed {seed}");
    let mut rng = Rng(seed);
    // A request makes at most two ledger calls (reserve, then commit or
    // release), each failing after at most the ledger's 2 s operation bound
    // while the database is down or slow: C4 allows 4.9 s per request
    // (C3's 2 s would turn some 503s into 504s), and reservations live 5 s
    // (they must outlive the request timeout).
    // Bound in this order so that they drop in the struct's (the server first).
    let OnOwnPostgres {
        dir: _dir,
        consumer: _consumer,
        up,
        mut pg,
        mut sup,
    } = serve_on_own_postgres("4900ms", "5s").await;
    let keys = open_accounts(&sup, ACCOUNTS, GRANT, "c4").await;
    let clients = Clients::start(sup.listen, &keys, CLIENTS);
    let auditor = Ledger::open(&pg.url()).await.expect("auditor");

    let mut outages = Vec::new();
    let mut audit_violations = 0;
    for round in 1..=KILLS {
        tokio::time::sleep(Duration::from_millis(rng.between(400, 1200))).await;
        let down = Instant::now();
        pg.kill();
        tokio::time::sleep(Duration::from_millis(rng.between(200, 1500))).await;
        pg.start().await;
        outages.push((down, Instant::now()));
        for (account, _) in &keys {
            let a = auditor.audit(account).await.expect("audit after restart");
            if !a.is_consistent() {
                eprintln!("after restart {round}: {account}: {a:?}");
                audit_violations += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let Outcomes {
        acked,
        acked_at,
        unfinished,
        attempts,
        failures,
    } = clients.finish().await;
    let acked: HashSet<(String, String)> = acked.into_iter().collect();
    // Expiry has run for more than TTL (5 s) + 1 s since the last request.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let figures = LedgerFigures::read(&auditor, &keys, &acked).await;

    // B9: every request the upstream saw (tollgate names the account in
    // `Tollgate-Account` and passes the Idempotency-Key on) holds a
    // reservation: nothing was forwarded unpaid.
    let reserved: HashSet<String> = auditor
        .query_strings_for_test(
            "SELECT account || ' ' || idempotency_key FROM reservations \
             WHERE idempotency_key IS NOT NULL",
        )
        .await
        .expect("reservations")
        .into_iter()
        .collect();
    let seen = up.seen();
    let unpaid = seen
        .iter()
        .filter(|s| {
            let h = |n: &str| s.headers.get(n).and_then(|v| v.to_str().ok());
            match (h("tollgate-account"), h("idempotency-key")) {
                (Some(a), Some(k)) => !reserved.contains(&format!("{a} {k}")),
                _ => true,
            }
        })
        .count();

    let late_failures: Vec<_> = failures
        .iter()
        .filter(|(at, _)| !in_outage(*at, &outages, GRACE))
        .collect();
    let mut by_status: HashMap<Option<u16>, usize> = HashMap::new();
    for (_, s) in &failures {
        *by_status.entry(*s).or_default() += 1;
    }
    // Recovery: from the database being back to the first 2xx.
    let recoveries: Vec<Duration> = outages
        .iter()
        .filter_map(|(_, up_at)| {
            acked_at
                .iter()
                .filter(|t| *t >= up_at)
                .min()
                .map(|t| *t - *up_at)
        })
        .collect();
    let panics = sup.panics();
    sup.kill();
    auditor.close().await;
    let violations = audit_violations + figures.violations;
    eprintln!(
        "C4: {KILLS} postmaster kills, {} charges acknowledged, {} committed, {attempts} attempts, \
         {} unfinished, upstream saw {}; violations {violations}, duplicate charges {}, \
         acked without commit {}, forwarded without reservation {unpaid}, stale reservations {}, \
         charges without event {}; failures by status {by_status:?}, outside outage + 2 s {}; \
         first 2xx after the database was back {recoveries:?}; panics {panics}",
        acked.len(),
        figures.committed.len(),
        unfinished.len(),
        seen.len(),
        figures.duplicates.len(),
        figures.acked_uncommitted,
        figures.stale.len(),
        figures.lost_events,
        late_failures.len(),
    );
    assert!(acked.len() > 50, "too little traffic to mean anything");
    assert!(
        by_status.get(&Some(503)).copied().unwrap_or(0) > 0,
        "no request met the outage: the kills did not bite"
    );
    assert_eq!(violations, 0, "Σ grants = balance + committed + open");
    assert_eq!(
        figures.duplicates,
        Vec::<String>::new(),
        "duplicate charges"
    );
    assert_eq!(figures.acked_uncommitted, 0, "2xx without a charge");
    assert_eq!(unpaid, 0, "requests forwarded without a reservation");
    assert_eq!(figures.stale, Vec::<String>::new(), "stale reservations");
    assert_eq!(figures.lost_events, 0, "charges whose event was lost");
    assert!(
        late_failures.is_empty(),
        "5xx or no answer outside outage + 2 s: {late_failures:?}"
    );
    assert_eq!(
        by_status.keys().copied().collect::<Vec<_>>(),
        vec![Some(503)],
        "during an outage a charging request is answered 503, nothing else"
    );
    assert_eq!(panics, 0, "panics:\n{}", sup.logs());
}

/// B9 (hang), two ways a database can stop answering while tollgate keeps
/// its connections: (1) another session holds an exclusive lock on the
/// accounts table, so a reservation waits inside its statement after the
/// pool handed out a healthy connection (the pool's 1 s acquire bound does
/// not cover this; the ledger's 2 s operation bound does); (2) every process of
/// the cluster is stopped (`SIGSTOP`). Figures, for both: a charging request
/// is answered 503 within the 2 s bound plus slack, never held until its
/// 5 s request timeout (504) or served late; nothing reaches the upstream
/// during the hang; after the lock ends / `SIGCONT`, charging succeeds again
/// within 5 s; the ledger audits exact; no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b9_a_locked_or_stopped_postgresql_costs_a_charging_request_one_bound() {
    const SLACK_BOUND: Duration = Duration::from_millis(3500);
    // Bound in this order so that they drop in the struct's (the server first).
    let OnOwnPostgres {
        dir: _dir,
        consumer: _consumer,
        up,
        pg,
        mut sup,
    } = serve_on_own_postgres("5s", "6s").await;
    let keys = open_accounts(&sup, 1, 1_000, "b9").await;
    let (account, key) = &keys[0];
    let auditor = Ledger::open(&pg.url()).await.expect("auditor");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let charge = |n: u32| {
        let req = hyper::Request::post(format!("http://{}/charge/{n}", sup.listen))
            .header("x-api-key", key.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let client = client.clone();
        async move {
            let t0 = Instant::now();
            let status = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|r| r.status().as_u16());
            (status, t0.elapsed())
        }
    };
    let recover = |from: u32| async move {
        let resumed = Instant::now();
        for n in from..from + 200 {
            if charge(n).await.0 == Some(200) {
                return Some(resumed.elapsed());
            }
            if resumed.elapsed() > Duration::from_secs(10) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    };
    // Warm: the caller is cached and the pool holds open connections.
    for n in 0..5 {
        assert_eq!(charge(n).await.0, Some(200), "before the hang");
    }

    // (1) A lock held by another session, for longer than the request timeout.
    let mut locker = pg
        .command("psql")
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", "postgres", "-d", "postgres"])
        .args(["-c", "BEGIN", "-c", "LOCK TABLE accounts IN EXCLUSIVE MODE"])
        .args(["-c", "SELECT pg_sleep(30)"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql");
    let held = Instant::now();
    loop {
        let granted = auditor
            .query_strings_for_test(
                "SELECT count(*)::text FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'accounts' AND l.mode = 'ExclusiveLock' AND l.granted",
            )
            .await
            .expect("pg_locks");
        if granted == ["1"] {
            break;
        }
        assert!(held.elapsed() < Duration::from_secs(10), "lock not taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen_before = up.seen().len();
    let mut locked = Vec::new();
    for n in 10..12 {
        locked.push(charge(n).await);
    }
    let seen_locked = up.seen().len() - seen_before;
    // Killing psql would not end its session before pg_sleep returns: end it
    // from the server side.
    auditor
        .query_strings_for_test(
            "SELECT pg_terminate_backend(pid)::text FROM pg_stat_activity \
             WHERE query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
        )
        .await
        .expect("end the locking session");
    let _ = locker.wait();
    let after_lock = recover(100).await;

    // (2) The whole cluster stopped.
    pg.signal_all("STOP");
    let seen_before = up.seen().len();
    let mut stopped = Vec::new();
    for n in 20..23 {
        stopped.push(charge(n).await);
    }
    let seen_stopped = up.seen().len() - seen_before;
    pg.signal_all("CONT");
    let after_stop = recover(300).await;

    let audit = auditor.audit(account).await.expect("audit");
    auditor.close().await;
    let panics = sup.panics();
    sup.kill();
    eprintln!(
        "B9 hang: locked {locked:?}, upstream saw {seen_locked}, first 2xx {after_lock:?} after \
         the lock ended; stopped {stopped:?}, upstream saw {seen_stopped}, first 2xx \
         {after_stop:?} after SIGCONT; audit {audit:?}; panics {panics}"
    );
    for (status, took) in locked.iter().chain(&stopped) {
        assert_eq!(
            *status,
            Some(503),
            "a hung database answers 503: locked {locked:?}, stopped {stopped:?}"
        );
        assert!(
            *took < SLACK_BOUND,
            "answered within the 2 s bound plus slack, not the 5 s request timeout: \
             locked {locked:?}, stopped {stopped:?}"
        );
    }
    assert_eq!(
        (seen_locked, seen_stopped),
        (0, 0),
        "nothing forwarded during a hang"
    );
    for recovery in [after_lock, after_stop] {
        assert!(
            recovery.is_some_and(|r| r < Duration::from_secs(5)),
            "charging again within 5 s: {after_lock:?}, {after_stop:?}"
        );
    }
    assert!(audit.is_consistent(), "{audit:?}");
    assert_eq!(panics, 0, "panics:\n{}", sup.logs());
}

#[test]
fn outage_windows_include_the_grace_period() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let outages = [(t0 + s, t0 + 3 * s)];
    assert!(!in_outage(t0, &outages, 2 * s));
    assert!(in_outage(t0 + 2 * s, &outages, 2 * s));
    assert!(in_outage(t0 + 5 * s, &outages, 2 * s));
    assert!(!in_outage(t0 + 6 * s, &outages, 2 * s));
}

//! Issue 5 / A5 end to end: three real `tollgate serve` processes share one
//! counter store (a redis-server of the test's own, or a 3-primary Redis
//! Cluster) and one database; many connections spread over the three ask
//! `POST /v1/check` on hard limits of each algorithm. Every counter admits
//! exactly its limit in its window: over-admission 0; under-admission
//! reported (and only allowed where the store answered with an error).
//!
//! A11 reuses the same harness with two replicas whose wall clocks are skewed
//! by libfaketime (−2 s and +3 s): the Redis scripts read Redis `TIME`, so
//! the skew changes nothing — over-admission 0, and every 429's
//! `Retry-After` lies in 1..=window length (a replica that computed it from
//! its own clock, 2 s behind, would answer more than the window).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::Instant;
use tollgate_redis::testing::{RedisCluster, RedisServer};

use crate::support::{Opts, Tollgate};

/// Limit of every counter (per account and algorithm).
const LIMIT: u64 = 150;
const ACCOUNTS: usize = 4;
const ALGORITHMS: [&str; 3] = ["bucket", "sliding", "calendar"];
/// Window length of every limit of [`POLICY`] (1 h; the bucket's refill of
/// one unit takes 1 h): the largest `Retry-After` a 429 may carry.
const WINDOW_S: u64 = 3_600;
/// Concurrent connections, spread over the three processes.
const CONNECTIONS: usize = 48;
/// Longest load per variant.
const MAX_LOAD: Duration = Duration::from_secs(10);

/// Hard limits of each algorithm, per account, none refilling within the
/// test: a token bucket of 150 refilling 1 an hour, 150 per sliding hour,
/// 150 per calendar hour. Store errors refuse (fail-closed), so an error
/// can never hide an over-admission; the store timeout is generous (the
/// default 50 ms fails decisions on a loaded 2-core machine, and a decision
/// that timed out may still have been counted by Redis: under-admission).
const POLICY: &str = r#"
[server]
store_timeout = "2s"

[policy]
name = "multi-process-accuracy"
key_header = "x-api-key"
default_plan = "default"

[operations.bucket]
method = "POST"
path = "/bucket"

[operations.sliding]
method = "POST"
path = "/sliding"

[operations.calendar]
method = "POST"
path = "/calendar"

[limits.bucket]
algorithm = "token_bucket"
capacity = 150
refill = 1
refill_every = "1h"
scope = ["account"]
operations = ["bucket"]
on_store_error = "deny"

[limits.sliding]
algorithm = "sliding_window"
limit = 150
window = "1h"
scope = ["account"]
operations = ["sliding"]
on_store_error = "deny"

[limits.calendar]
algorithm = "calendar_window"
limit = 150
window = "hour"
scope = ["account"]
operations = ["calendar"]
on_store_error = "deny"

[plans.default]
"#;

/// Per (algorithm, account): admitted, refused by the limit, store errors.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    admitted: u64,
    refused: u64,
    errors: u64,
    /// 429s whose `Retry-After` (header and `retry_after_s`) lies in
    /// 1..=[`WINDOW_S`], and the others.
    retry_ok: u64,
    retry_bad: u64,
    /// Smallest and largest `retry_after_s` seen on a 429.
    retry_min: Option<u64>,
    retry_max: u64,
}

/// Environment that makes libfaketime shift a child's wall clock by `offset`
/// (e.g. `"-2s"`, `"+3s"`), as `DONT_FAKE_MONOTONIC=1 faketime -f <offset>`
/// does, but set on the binary itself (the `faketime` wrapper forks, so
/// killing it would leave the server running). The library's path is the one
/// the installed `faketime` preloads. Panics with a clear message when
/// faketime is missing, and checks that the shift takes effect.
#[allow(
    clippy::disallowed_methods,
    reason = "compares the faked wall clock with the real one"
)]
fn faketime_env(offset: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("faketime")
        .args(["-f", "+0s", "sh", "-c", "printf %s \"$LD_PRELOAD\""])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "A11 needs faketime (Debian package `faketime`: apt-get install -y faketime; \
                 scripts/test.sh installs it): {e}"
            )
        });
    let lib = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && lib.contains("faketime"),
        "faketime did not preload libfaketime ({:?}): {lib:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let env = vec![
        ("LD_PRELOAD".to_owned(), lib),
        ("FAKETIME".to_owned(), offset.to_owned()),
        ("DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
    ];
    let faked = std::process::Command::new("date")
        .arg("+%s")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("date");
    let faked: i64 = String::from_utf8_lossy(&faked.stdout)
        .trim()
        .parse()
        .expect("date +%s");
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let want: f64 = offset.trim_end_matches('s').parse().expect("offset in s");
    assert!(
        ((faked - real) as f64 - want).abs() <= 1.5,
        "libfaketime did not shift the clock by {offset}: {faked} vs {real}"
    );
    env
}

/// Sleeps past the end of the current UTC hour if fewer than `margin`
/// seconds are left (the calendar limit's window).
#[allow(
    clippy::disallowed_methods,
    reason = "the server's calendar windows follow the wall clock"
)]
async fn avoid_hour_edge(margin: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let into = now.as_secs() % 3_600;
    if into + margin >= 3_600 {
        tokio::time::sleep(Duration::from_secs(3_600 - into) + Duration::from_millis(200)).await;
    }
}

/// `skews` has one entry per replica: `None` runs it on the real clock,
/// `Some(offset)` under libfaketime (see [`faketime_env`]). `algorithms` is
/// the subset of [`ALGORITHMS`] loaded.
async fn replicas_share_the_store(
    store_url: &str,
    variant: &str,
    skews: &[Option<&str>],
    algorithms: &'static [&'static str],
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let database = dir.path().join("shared.db").display().to_string();
    // One secret for every replica: the counters are shared only if each
    // derives the same keys from it (with a secret per replica, A5 measures
    // max admitted/L 3.000).
    let secret = format!("a5-secret-{}", std::process::id());
    let start = |i: usize| {
        let mut env = skews[i].map(faketime_env).unwrap_or_default();
        env.push(("TOLLGATE_STORE_SECRET".to_owned(), secret.clone()));
        Tollgate::start(Opts {
            env,
            config: Some(policy.clone()),
            args: vec![
                "--store".to_owned(),
                store_url.to_owned(),
                "--database".to_owned(),
                database.clone(),
            ],
            ..Opts::default()
        })
    };
    // The first creates the database and the accounts, then the others start.
    let first = start(0);
    let run = format!("{:08x}", first.pid());
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{run}-{i}")).collect();
    for a in &accounts {
        first.account(a, None).await;
    }
    let warm = format!("warm-{run}");
    first.account(&warm, None).await;
    let replicas: Vec<Tollgate> = std::iter::once(first)
        .chain((1..skews.len()).map(start))
        .collect();
    for (t, skew) in replicas.iter().zip(skews) {
        if skew.is_some() {
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).expect("maps");
            assert!(
                maps.contains("libfaketime"),
                "replica {} runs without libfaketime",
                t.pid()
            );
        }
    }
    for t in &replicas {
        assert!(
            !t.log().contains("public default seed"),
            "a replica ignored TOLLGATE_STORE_SECRET"
        );
    }
    let addrs: Vec<_> = replicas.iter().map(|t| t.addr).collect();
    // Warm-up, outside the figures: each process opens its store connections
    // (on a Cluster: the slot map, the scripts on each node) on an account of
    // its own before the load starts.
    for t in &replicas {
        for &op in algorithms {
            for _ in 0..3 {
                let body = json!({ "account": warm, "operation": op }).to_string();
                let r = t
                    .req(
                        "POST",
                        "/v1/check",
                        &[("content-type", "application/json")],
                        body,
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }
    }
    if algorithms.contains(&"calendar") {
        avoid_hour_edge(20).await;
    }

    let counts: Arc<Mutex<HashMap<(usize, usize), Count>>> = Arc::default();
    let load_start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let addr = addrs[c % addrs.len()];
        let (counts, accounts) = (counts.clone(), accounts.clone());
        tasks.push(tokio::spawn(async move {
            // One client per task: its own connection to its process.
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build_http();
            let mut i = c;
            while load_start.elapsed() < MAX_LOAD {
                let (alg, acct) = (i % algorithms.len(), (i / algorithms.len()) % ACCOUNTS);
                i += 1;
                // Stop asking once every counter is known to be exhausted
                // (refusals seen; a store error may have taken a unit).
                if i % 64 == 0 {
                    let done = {
                        let m = counts.lock().expect("counts");
                        m.len() == algorithms.len() * ACCOUNTS
                            && m.values()
                                .all(|n| n.admitted + n.errors >= LIMIT && n.refused > 0)
                    };
                    if done && load_start.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
                let body = json!({ "account": accounts[acct], "operation": algorithms[alg] });
                let req = hyper::Request::post(format!("http://{addr}/v1/check"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("request");
                let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                    .await
                    .expect("an answer within 10 s")
                    .expect("response");
                assert_eq!(resp.status(), 200, "/v1/check answers 200");
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                let v: Value = serde_json::from_slice(&body).expect("JSON");
                let mut m = counts.lock().expect("counts");
                let n = m.entry((alg, acct)).or_default();
                match (v["allowed"].as_bool(), v["status"].as_u64()) {
                    (Some(true), _) => n.admitted += 1,
                    (Some(false), Some(429)) => {
                        n.refused += 1;
                        let secs = v["retry_after_s"].as_u64();
                        let header = v["headers"].as_object().and_then(|h| {
                            h.iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                                .and_then(|(_, v)| v.as_str()?.trim().parse::<u64>().ok())
                        });
                        let ok = |s: Option<u64>| s.is_some_and(|s| (1..=WINDOW_S).contains(&s));
                        if ok(secs) && ok(header) {
                            n.retry_ok += 1;
                        } else {
                            n.retry_bad += 1;
                        }
                        let s = secs.unwrap_or(0);
                        n.retry_min = Some(n.retry_min.map_or(s, |m| m.min(s)));
                        n.retry_max = n.retry_max.max(s);
                    }
                    (Some(false), Some(503)) => n.errors += 1,
                    _ => panic!("unexpected decision: {v}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    let took = load_start.elapsed();
    let m = counts.lock().expect("counts").clone();
    let total: u64 = m.values().map(|n| n.admitted + n.refused + n.errors).sum();
    for (a, name) in algorithms.iter().enumerate() {
        let per: Vec<Count> = (0..ACCOUNTS)
            .map(|acct| m.get(&(a, acct)).copied().unwrap_or_default())
            .collect();
        let max = per.iter().map(|n| n.admitted).max().unwrap_or(0);
        let over: u64 = per.iter().map(|n| n.admitted.saturating_sub(LIMIT)).sum();
        let under: u64 = per.iter().map(|n| LIMIT.saturating_sub(n.admitted)).sum();
        let errors: u64 = per.iter().map(|n| n.errors).sum();
        let retry_ok: u64 = per.iter().map(|n| n.retry_ok).sum();
        let refused: u64 = per.iter().map(|n| n.refused).sum();
        let retry_min = per.iter().filter_map(|n| n.retry_min).min().unwrap_or(0);
        let retry_max = per.iter().map(|n| n.retry_max).max().unwrap_or(0);
        println!(
            "{variant} {name}: {} processes (clock skews {skews:?}), {CONNECTIONS} connections, \
             {ACCOUNTS} accounts × limit {LIMIT}: max admitted/L {:.3}, over-admission {over}, \
             under-admission {under}, store errors {errors}; 429s with 1 ≤ Retry-After ≤ \
             {WINDOW_S} s: {retry_ok}/{refused} ({:.1} %), Retry-After {retry_min}..={retry_max} s",
            replicas.len(),
            max as f64 / LIMIT as f64,
            100.0 * retry_ok as f64 / refused.max(1) as f64
        );
        for (acct, n) in per.iter().enumerate() {
            assert!(
                n.admitted <= LIMIT,
                "{variant} {name} account {acct}: over-admission {n:?}"
            );
            assert!(
                n.admitted + n.errors >= LIMIT,
                "{variant} {name} account {acct}: under-admission without store errors {n:?}"
            );
            assert!(
                n.refused > 0,
                "{variant} {name} account {acct}: never refused {n:?}"
            );
            assert_eq!(
                n.retry_bad, 0,
                "{variant} {name} account {acct}: Retry-After 0, missing or above the window {n:?}"
            );
        }
    }
    println!("{variant}: {total} checks in {took:?}");
    for t in &replicas {
        assert!(!t.log().contains("panicked"), "{}", t.log());
    }
}

/// Three `tollgate serve` processes on one standalone redis-server of the
/// test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_three_processes_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    replicas_share_the_store(&redis.url(), "A5 redis", &[None; 3], &ALGORITHMS).await;
}

/// The same on a 3-primary Redis Cluster (`--store redis-cluster://…`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_three_processes_redis_cluster_admit_exactly_the_limit() {
    let cluster = RedisCluster::start(3, 0);
    replicas_share_the_store(&cluster.url(), "A5 cluster", &[None; 3], &ALGORITHMS).await;
}

/// A11 (RELIABILITY-PLAN, CI size): two replicas whose wall clocks are
/// skewed by libfaketime, one 2 s behind and one 3 s ahead, share one
/// redis-server of the test's own and one SQLite database. On hard limits
/// (token bucket and sliding window): max admitted/L = 1.000 (over-admission
/// 0, the scripts use Redis `TIME`), and every 429 carries a `Retry-After` of
/// at least 1 s and at most the window length (100 %). Fails, never skips,
/// without faketime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a11_skewed_clocks_two_replicas_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    replicas_share_the_store(
        &redis.url(),
        "A11 redis",
        &[Some("-2s"), Some("+3s")],
        &["bucket", "sliding"],
    )
    .await;
}

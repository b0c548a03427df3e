//! Issue 5 / A5 end to end: three real `tollgate serve` processes share one
//! counter store (a redis-server of the test's own, or a 3-primary Redis
//! Cluster) and one database; many connections spread over the three ask
//! `POST /v1/check` on hard limits of each algorithm. Every counter admits
//! exactly its limit in its window: over-admission 0; under-admission
//! reported (and only allowed where the store answered with an error).

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
/// Concurrent connections, spread over the three processes.
const CONNECTIONS: usize = 48;
/// Longest load per variant.
const MAX_LOAD: Duration = Duration::from_secs(10);

/// Hard limits of each algorithm, per account, none refilling within the
/// test: a token bucket of 150 refilling 1 an hour, 150 per sliding hour,
/// 150 per calendar hour. Store errors refuse (fail-closed), so an error
/// can never hide an over-admission.
const POLICY: &str = r#"
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

async fn three_processes_share_the_store(store_url: &str, variant: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let database = dir.path().join("shared.db").display().to_string();
    let start = |_: usize| {
        Tollgate::start(Opts {
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
    let replicas = [first, start(1), start(2)];
    let addrs: Vec<_> = replicas.iter().map(|t| t.addr).collect();
    // Warm-up, outside the figures: each process opens its store connections
    // (on a Cluster: the slot map, the scripts on each node) on an account of
    // its own before the load starts.
    for t in &replicas {
        for op in ALGORITHMS {
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
    avoid_hour_edge(20).await;

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
                let (alg, acct) = (i % ALGORITHMS.len(), (i / ALGORITHMS.len()) % ACCOUNTS);
                i += 1;
                // Stop asking once every counter is known to be exhausted
                // (refusals seen; a store error may have taken a unit).
                if i % 64 == 0 {
                    let done = {
                        let m = counts.lock().expect("counts");
                        m.len() == ALGORITHMS.len() * ACCOUNTS
                            && m.values()
                                .all(|n| n.admitted + n.errors >= LIMIT && n.refused > 0)
                    };
                    if done && load_start.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
                let body = json!({ "account": accounts[acct], "operation": ALGORITHMS[alg] });
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
                    (Some(false), Some(429)) => n.refused += 1,
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
    for (a, name) in ALGORITHMS.iter().enumerate() {
        let per: Vec<Count> = (0..ACCOUNTS)
            .map(|acct| m.get(&(a, acct)).copied().unwrap_or_default())
            .collect();
        let max = per.iter().map(|n| n.admitted).max().unwrap_or(0);
        let over: u64 = per.iter().map(|n| n.admitted.saturating_sub(LIMIT)).sum();
        let under: u64 = per.iter().map(|n| LIMIT.saturating_sub(n.admitted)).sum();
        let errors: u64 = per.iter().map(|n| n.errors).sum();
        println!(
            "A5 {variant} {name}: 3 processes, {CONNECTIONS} connections, {ACCOUNTS} accounts × \
             limit {LIMIT}: max admitted/L {:.3}, over-admission {over}, under-admission {under}, \
             store errors {errors}",
            max as f64 / LIMIT as f64
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
        }
    }
    println!("A5 {variant}: {total} checks in {took:?}");
    for t in &replicas {
        assert!(!t.log().contains("panicked"), "{}", t.log());
    }
}

/// Three `tollgate serve` processes on one standalone redis-server of the
/// test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_three_processes_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    three_processes_share_the_store(&redis.url(), "redis").await;
}

/// The same on a 3-primary Redis Cluster (`--store redis-cluster://…`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_three_processes_redis_cluster_admit_exactly_the_limit() {
    let cluster = RedisCluster::start(3, 0);
    three_processes_share_the_store(&cluster.url(), "cluster").await;
}

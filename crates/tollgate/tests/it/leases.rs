//! RELIABILITY-PLAN A14 across processes: concurrency leases live in a
//! shared Redis (an own `redis-server`); when the replica holding them is
//! `kill -9`ed, the other replica gets them back once their TTL runs out.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tollgate_redis::testing::RedisServer;

use crate::support::{Opts, Tollgate, Upstream};

/// Lease TTL of [`POLICY`].
const LEASE_TTL: Duration = Duration::from_secs(3);

const POLICY: &str = r#"
[server]
store_timeout = "2s"

[policy]
name = "leases"
key_header = "x-api-key"
default_plan = "default"

[operations.hold]
method = "GET"
path = "/hold/*"

[limits.inflight]
algorithm = "concurrency"
limit = 4
lease_ttl = "3s"
scope = ["account"]
operations = ["hold"]
on_store_error = "deny"

[plans.default]
"#;

/// A14 (`kill -9`, CI size): two `tollgate serve` share an own Redis and an
/// SQLite database; four requests through replica A hold every lease of an
/// account (the upstream holds them 30 s), then A is `kill -9`ed. Figures:
/// replica B refuses while the leases live; the leaked leases are released
/// ≤ lease TTL (3 s) + 1 s after the kill (B admits again); requests in
/// flight at the upstream never exceed the limit of 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a14_leases_of_a_killed_replica_expire_within_their_ttl() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    let database = dir.path().join("shared.db").display().to_string();
    let start = || {
        Tollgate::start(Opts {
            config: Some(policy.clone()),
            upstream: Some(up.url()),
            args: vec![
                "--store".to_owned(),
                redis.url(),
                "--database".to_owned(),
                database.clone(),
            ],
            ..Opts::default()
        })
    };
    let a = start();
    let key = a.account_key("leased", None).await;
    let b = start();

    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(a.addr)
            .await
            .expect("connect");
        c.write_all(
            format!("GET /hold/30000 HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {key}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
        held.push(c);
    }
    let t0 = Instant::now();
    while up.count() < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "held requests not forwarded:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = b.call("x-api-key", &key, "GET", "/hold/10").await;
    assert_eq!(r.status, 429, "B sees A's leases: {}", r.text());
    let acquired = t0.elapsed();

    let killed = Instant::now();
    drop(a); // SIGKILL, reaped
    let mut refused = 0;
    let waited = loop {
        let r = b.call("x-api-key", &key, "GET", "/hold/10").await;
        match r.status {
            200 => break killed.elapsed(),
            429 => refused += 1,
            s => panic!("unexpected {s}: {}", r.text()),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "leases of the killed replica never released:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(held);
    let forwarded = up.count();
    println!(
        "A14 kill -9: leases taken {acquired:?} after the first request; B refused {refused} \
         times, admitted {waited:?} after the kill (lease TTL {LEASE_TTL:?}); upstream saw \
         {forwarded} requests"
    );
    assert!(refused > 0, "B admitted at once: the leases were not held");
    assert!(
        waited <= LEASE_TTL + Duration::from_secs(1),
        "leaked leases released {waited:?} after the kill; goal ≤ TTL + 1 s"
    );
    // 4 held by A and the one B finally admitted.
    assert_eq!(
        forwarded, 5,
        "requests beyond the limit reached the upstream"
    );
}

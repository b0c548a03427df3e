//! B1 through the server: two replicas share a redis-server of our own,
//! which is killed. Each limit follows its `on_store_error`: `local` limits
//! admit at most `local_share × L` per window on each replica (aggregate ≤ L),
//! `allow` limits admit everything (each counted in `fail_open_total`),
//! `deny` limits answer 503. Store errors are counted by kind, the
//! `store_unavailable` gauge is set within 1 s and cleared after recovery.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::{OwnRedis, Server, TOKEN};

/// L of the local limit, and each replica's share of it.
const L: usize = 20;
const SHARE: f64 = 0.5;

const POLICY: &str = r#"
[policy]
name = "outage"
key_header = "x-api-key"
default_plan = "basic"

[operations.local]
method = "GET"
path = "/local"

[operations.open]
method = "GET"
path = "/open"

[operations.closed]
method = "GET"
path = "/closed"

[limits.shared]
algorithm = "sliding_window"
limit = 20
window = "1m"
scope = ["account"]
operations = ["local"]
on_store_error = "local"
local_share = 0.5

[limits.lenient]
algorithm = "sliding_window"
limit = 1000
window = "1m"
scope = ["account"]
operations = ["open"]
on_store_error = "allow"

[limits.strict]
algorithm = "sliding_window"
limit = 1000
window = "1m"
scope = ["account"]
operations = ["closed"]

[plans.basic]
"#;

/// Sum of every sample of metric `name` whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(labels))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(s: &Server) -> String {
    s.call(true, "GET", "/metrics", &[], "").await.text
}

/// Sends `n` GETs to `path`; returns the count of each status.
async fn hits(s: &Server, key: &str, path: &str, n: usize) -> [usize; 3] {
    let mut counts = [0; 3]; // 200, 429, 503
    for _ in 0..n {
        let status = s
            .call(false, "GET", path, &[("x-api-key", key)], "")
            .await
            .status;
        match status {
            200 => counts[0] += 1,
            429 => counts[1] += 1,
            503 => counts[2] += 1,
            other => panic!("unexpected status {other} on {path}"),
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_outage_follows_each_limits_policy_and_local_share() {
    let port = OwnRedis::free_port();
    let redis = OwnRedis::start(port).await;
    let store = format!("redis://127.0.0.1:{port}/0");
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = dir.path().to_path_buf();
    let a = Server::with_config(
        Some(TOKEN),
        POLICY,
        None,
        shared.clone(),
        &store,
        tempfile::tempdir().expect("dir"),
    )
    .await;
    let b = Server::with_config(Some(TOKEN), POLICY, None, shared, &store, dir).await;
    let key = a.account_with_key("acme", "basic").await;
    for path in ["/local", "/open", "/closed"] {
        assert_eq!(
            hits(&a, &key, path, 1).await,
            [1, 0, 0],
            "{path} with Redis up"
        );
    }
    assert_eq!(
        metric(&metrics(&a).await, "tollgate_store_unavailable", ""),
        0.0
    );

    // Kill Redis; the gauge goes up within 1 s, with no traffic at all.
    drop(redis);
    let killed = Instant::now();
    let mut flagged = None;
    while killed.elapsed() < Duration::from_secs(3) {
        if metric(&metrics(&a).await, "tollgate_store_unavailable", "") == 1.0 {
            flagged = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flagged = flagged.expect("store_unavailable set");

    // Local limit: each replica admits its share of L in this window.
    let per_replica = (SHARE * L as f64) as usize;
    let on_a = hits(&a, &key, "/local", 2 * L).await;
    let on_b = hits(&b, &key, "/local", 2 * L).await;
    // Fail-open and fail-closed limits.
    let open = hits(&a, &key, "/open", 10).await;
    let closed = hits(&b, &key, "/closed", 10).await;
    let ma = metrics(&a).await;
    let mb = metrics(&b).await;
    let kinds: Vec<&str> = ma
        .lines()
        .chain(mb.lines())
        .filter(|l| l.starts_with("tollgate_store_errors_total{"))
        .collect();
    println!(
        "B1 outage: store_unavailable after {flagged:?}; /local admitted {} on A and {} on B \
         (share {SHARE} of L = {L}: {per_replica} each), 429 {} + {}; /open {open:?}; /closed {closed:?}; {kinds:?}",
        on_a[0], on_b[0], on_a[1], on_b[1]
    );
    assert!(flagged <= Duration::from_secs(1), "gauge after {flagged:?}");
    assert_eq!(on_a[2] + on_b[2], 0, "local limits never answer 503");
    assert!(
        on_a[0] <= per_replica && on_b[0] <= per_replica,
        "share exceeded"
    );
    assert!(on_a[0] + on_b[0] <= L, "aggregate above L");
    assert_eq!(
        (on_a[0], on_b[0]),
        (per_replica, per_replica),
        "each replica admits exactly its share"
    );
    assert_eq!(open, [10, 0, 0], "fail-open admits everything");
    assert_eq!(closed, [0, 0, 10], "fail-closed answers 503");
    let errors = |m: &str| metric(m, "tollgate_store_errors_total", "");
    assert!(
        errors(&ma) + errors(&mb) >= (4 * L + 20) as f64,
        "every failed decision counted"
    );
    for k in &kinds {
        assert!(
            ["connection", "circuit_open", "timeout"]
                .iter()
                .any(|kind| k.contains(&format!("kind=\"{kind}\""))),
            "a dead Redis is a connection error or an open circuit: {k}"
        );
    }
    assert_eq!(metric(&ma, "tollgate_fail_open_total", ""), 10.0);
    assert_eq!(
        metric(&ma, "tollgate_local_fallback_total", "") as usize,
        2 * L
    );
    assert_eq!(
        metric(&mb, "tollgate_local_fallback_total", "") as usize,
        2 * L
    );

    // Redis back: strict again within 2 s, gauge cleared.
    let _redis = OwnRedis::start(port).await;
    let back = Instant::now();
    loop {
        let m = metrics(&a).await;
        if metric(&m, "tollgate_store_unavailable", "") == 0.0
            && hits(&a, &key, "/closed", 1).await == [1, 0, 0]
        {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(2), "not strict again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "B1 outage: strict again {:?} after Redis came back",
        back.elapsed()
    );
    a.running.shutdown().await;
    b.running.shutdown().await;
}

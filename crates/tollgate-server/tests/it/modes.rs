//! RELIABILITY-PLAN H1 end to end through the proxy: one recorded trace
//! replayed against two servers that differ only in the limit's mode
//! (`enforce` and `shadow`). The shadow server refuses nothing and reports,
//! per limit, exactly as many would-rejects as the enforcing server refused.

use crate::support::{Server, TOKEN, Upstream};

/// A daily window, so the trace's timing cannot change any decision (the
/// two servers see each request within a millisecond of each other).
fn policy(mode: &str) -> String {
    format!(
        r#"
[policy]
name = "h1-{mode}"
key_header = "x-api-key"

[limits.daily]
algorithm = "calendar_window"
limit = 25
window = "day"
scope = ["account"]
mode = "{mode}"

[plans.default]
"#
    )
}

/// The value of the sample of `name` whose labels contain every `parts`
/// (0 when absent).
fn sample(metrics: &str, name: &str, parts: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// H1 (CI size: 300 requests, 3 accounts, seeded): the same trace through
/// the proxy of an enforcing and a shadow server. Figures: shadow rejections
/// → 0; shadow would-reject count (`tollgate_limit_results_total{result=
/// "shadow"}`) = enforce 429s = enforce `result="over"` → exact (each
/// account refused exactly beyond its 25); every shadow request reached the
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_shadow_would_rejects_equal_enforce_rejects() {
    const REQUESTS: usize = 300;
    let up_enforce = Upstream::start().await;
    let up_shadow = Upstream::start().await;
    let enforce =
        Server::with_upstream(Some(TOKEN), &policy("enforce"), Some(up_enforce.addr)).await;
    let shadow = Server::with_upstream(Some(TOKEN), &policy("shadow"), Some(up_shadow.addr)).await;
    let accounts = ["a", "b", "c"];
    let mut keys = Vec::new();
    for a in accounts {
        keys.push((
            enforce.account_with_key(a, "default").await,
            shadow.account_with_key(a, "default").await,
        ));
    }

    // The recorded trace: a seeded mix of accounts (splitmix64).
    let mut state: u64 = 0x4831_2026;
    let mut trace = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        trace.push(usize::try_from((z ^ (z >> 31)) % 3).expect("small"));
    }

    let mut enforce_rejected = [0usize; 3];
    let mut shadow_rejected = [0usize; 3];
    for (i, &a) in trace.iter().enumerate() {
        let path = format!("/work/{i}");
        let (ke, ks) = &keys[a];
        let e = enforce
            .call(false, "GET", &path, &[("x-api-key", ke)], "")
            .await;
        let s = shadow
            .call(false, "GET", &path, &[("x-api-key", ks)], "")
            .await;
        match e.status {
            200 => {}
            429 => enforce_rejected[a] += 1,
            other => panic!("enforce: unexpected {other}: {}", e.text),
        }
        match s.status {
            200 => {}
            other => {
                shadow_rejected[a] += 1;
                eprintln!("shadow answered {other}: {}", s.text);
            }
        }
    }

    let me = enforce.admin("GET", "/metrics", "").await.text;
    let ms = shadow.admin("GET", "/metrics", "").await.text;
    let results = "tollgate_limit_results_total";
    let limit = "limit=\"daily\"";
    let over = sample(&me, results, &[limit, "result=\"over\""]);
    let would = sample(&ms, results, &[limit, "result=\"shadow\""]);
    let shadow_over = sample(&ms, results, &[limit, "result=\"over\""]);
    let total_rejected: usize = enforce_rejected.iter().sum();
    println!(
        "H1: {REQUESTS} requests; enforce 429s {enforce_rejected:?} (total {total_rejected}, \
         metric over {over}); shadow 429s {shadow_rejected:?}, would-reject metric {would}, \
         upstream hits enforce {} shadow {}",
        up_enforce.hits(),
        up_shadow.hits()
    );
    assert_eq!(shadow_rejected, [0; 3], "shadow refused requests");
    assert_eq!(shadow_over, 0.0, "shadow counted an enforced rejection");
    // Each account sends about 100 requests at a limit of 25.
    for (a, n) in enforce_rejected.iter().enumerate() {
        let sent = trace.iter().filter(|&&t| t == a).count();
        assert_eq!(
            *n,
            sent - 25,
            "account {}: enforce rejects all beyond 25",
            accounts[a]
        );
    }
    #[allow(clippy::cast_precision_loss, reason = "a count of a few hundred")]
    let total = total_rejected as f64;
    assert_eq!(over, total, "enforce metric = client-side 429s");
    assert_eq!(would, total, "shadow would-rejects = enforce rejects");
    assert_eq!(up_shadow.hits(), REQUESTS, "shadow forwarded everything");
    assert_eq!(up_enforce.hits(), REQUESTS - total_rejected);
}

//! RELIABILITY-PLAN F1 and F4 at CI size (200 k distinct scope values), on
//! the in-process server: memory is bounded by `max_counters`, counters of
//! callers over their limit are never evicted (an attacker cannot flush their
//! own block by minting keys), and the metrics series count does not grow
//! with the number of keys.
//!
//! The first scope values come through the proxy listener (client IPs in
//! `X-Forwarded-For` from a trusted proxy); the bulk goes through the same
//! decision function the proxy handler calls (`proxy::decide`: engine,
//! metrics and events), without HTTP, so 200 k values fit the CI budget of a
//! debug build.

use std::net::Ipv4Addr;

use tollgate_server::proxy;

use crate::support::{Server, TOKEN};

/// One bucket per client IP: 2 requests, then one per hour. A caller that
/// used it stays live (not fresh) for the whole test, so sweeping can never
/// drop it: the cap is what bounds the store.
const POLICY: &str = r#"
[policy]
name = "f1-cardinality"

[limits.per_ip]
algorithm = "token_bucket"
capacity = 2
refill = 1
refill_every = "1h"
scope = ["ip"]
on_store_error = "deny"

[plans.default]
"#;

const CAP: usize = 100_000;
const KEYS: u32 = 200_000;
const MIB: u64 = 1 << 20;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The `i`-th minted client address, in 10.0.0.0/8.
fn minted(i: u32) -> String {
    Ipv4Addr::from(0x0a00_0000 + i).to_string()
}

/// Prometheus series (sample lines) in a `/metrics` text.
fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .collect()
}

/// F1 + F4 (CI size: 200 k distinct client IPs, cap 100 k counters).
/// Figures: live counters ≤ cap at every step → yes; RSS growth ≤ cap ×
/// 128 B + 10 % (plus 4 MiB for the test's own allocations); callers blocked
/// before the flood still blocked after it (evicted → 0), through the proxy
/// too; metrics series count after 120 k keys = after 200 k keys (≤ 64
/// series) and no IP in `/metrics`; teeth: without the cap the same flood
/// holds 200 k counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_f4_minted_ips_are_bounded_by_the_cap_and_never_flush_a_block() {
    let s = Server::configured(Some(TOKEN), POLICY, None, |c| {
        c.max_counters = CAP;
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let key = s.account_with_key("acme", "default").await;
    let st = &s.running.state;
    let store = st.engine.store();
    let via_proxy = |ip: String| {
        let key = key.clone();
        let s = &s;
        async move {
            s.call(
                false,
                "GET",
                "/f1",
                &[("x-api-key", &key), ("x-forwarded-for", &ip)],
                "",
            )
            .await
            .status
        }
    };

    // Blocked callers, through the proxy (client IP from X-Forwarded-For).
    let blocked: Vec<String> = (0..50).map(|i| format!("192.0.2.{}", i + 1)).collect();
    for ip in &blocked {
        for want in [200, 200, 429] {
            assert_eq!(via_proxy(ip.clone()).await, want, "{ip}");
        }
    }
    // 1 000 minted IPs through the proxy: each becomes its own counter.
    let before = store.live_counters();
    for i in 0..1_000 {
        assert_eq!(via_proxy(minted(i)).await, 200);
    }
    assert_eq!(
        store.live_counters() - before,
        1_000,
        "one counter per forwarded client IP"
    );

    // The flood, through the proxy's decision function.
    let policy = st.policy.load_full();
    let account = st
        .ledger
        .account("acme")
        .await
        .expect("ledger")
        .expect("account");
    let caller = st.account_caller(&account, &policy);
    let op = policy.default_operation();
    let no_attrs: Vec<Option<&str>> = vec![None; policy.attributes.len()];
    let rss_before = rss_bytes();
    let mut outcomes = [0usize; 3];
    let mut peak = 0;
    let mut metrics_mid = String::new();
    for i in 1_000..KEYS {
        let d = proxy::decide(st, &policy, op, &caller, &minted(i), &no_attrs).await;
        match d.outcome {
            tollgate_core::Outcome::Admitted => outcomes[0] += 1,
            tollgate_core::Outcome::StoreUnavailable => outcomes[1] += 1,
            _ => outcomes[2] += 1,
        }
        if i % 1_000 == 0 {
            peak = peak.max(store.live_counters());
        }
        if i == 120_000 {
            metrics_mid = s.admin("GET", "/metrics", "").await.text;
        }
    }
    peak = peak.max(store.live_counters());
    let grown = rss_bytes().saturating_sub(rss_before);
    let metrics_end = s.admin("GET", "/metrics", "").await.text;
    println!(
        "F1 {KEYS} minted IPs, cap {CAP}: admitted {}, refused at the cap {}, other {}; \
         peak live counters {peak}; RSS +{:.1} MiB ({} B per counter)",
        outcomes[0],
        outcomes[1],
        outcomes[2],
        grown as f64 / MIB as f64,
        grown / CAP as u64
    );
    assert!(peak <= CAP, "{peak} live counters, cap {CAP}");
    assert_eq!(outcomes[2], 0, "minted IPs are new: never rate limited");
    assert!(outcomes[1] > 0, "the flood reached the cap");
    let budget = (CAP as u64 * 128) * 11 / 10 + 4 * MIB;
    assert!(
        grown <= budget,
        "RSS grew {grown} B for a cap of {CAP} counters (budget {budget} B)"
    );

    // Blocked callers are still blocked: through the proxy, and directly.
    for ip in &blocked {
        assert_eq!(via_proxy(ip.clone()).await, 429, "{ip} was flushed");
        let d = proxy::decide(st, &policy, op, &caller, ip, &no_attrs).await;
        assert!(
            matches!(d.outcome, tollgate_core::Outcome::Rejected { .. }),
            "{ip}: {:?}",
            d.outcome
        );
    }

    // F4: the series count does not follow the key count; no IP in /metrics.
    let (mid, end) = (series(&metrics_mid), series(&metrics_end));
    println!(
        "F4 series after 120 k keys: {}, after 200 k: {}",
        mid.len(),
        end.len()
    );
    assert_eq!(mid, end, "series changed between 120 k and 200 k keys");
    assert!(end.len() <= 64, "{} series", end.len());
    for ip in blocked.iter().chain([&minted(0), &minted(KEYS - 1)]) {
        assert!(!metrics_end.contains(ip.as_str()), "{ip} in /metrics");
    }
    s.running.shutdown().await;

    // Teeth: the same flood without the cap keeps every counter.
    let unbounded = Server::configured(Some(TOKEN), POLICY, None, |c| {
        c.max_counters = usize::MAX;
    })
    .await;
    let st = &unbounded.running.state;
    let policy = st.policy.load_full();
    unbounded.account_with_key("acme", "default").await;
    let account = st
        .ledger
        .account("acme")
        .await
        .expect("ledger")
        .expect("account");
    let caller = st.account_caller(&account, &policy);
    let op = policy.default_operation();
    for i in 0..KEYS {
        proxy::decide(st, &policy, op, &caller, &minted(i), &no_attrs).await;
    }
    let held = st.engine.store().live_counters();
    println!("F1 teeth: without the cap the flood holds {held} counters");
    assert!(held > CAP, "the teeth run must exceed the cap: {held}");
    unbounded.running.shutdown().await;
}

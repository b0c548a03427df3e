//! tollgate-client and `tollgate load` against the real `tollgate serve`
//! on the weighted-bucket preset (bucket 400, refill 100/s, upload cost 20).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::Value;
use tollgate_client::reqwest::Method;
use tollgate_client::{Client, Pacer, RetryPolicy};

use crate::support::{Opts, Tollgate, preset};

fn weighted() -> Tollgate {
    Tollgate::start(Opts {
        config: Some(preset("weighted-bucket-api")),
        ..Opts::default()
    })
}

/// 60 uploads at cost 20; returns (429s seen, calls that ended in 200, time).
async fn uploads(
    client_builder: tollgate_client::ClientBuilder,
    url: String,
    key: String,
) -> (u64, u64, Duration) {
    let limited = Arc::new(AtomicU64::new(0));
    let l = limited.clone();
    let client = client_builder
        .with_observer(move |a| {
            if a.status.is_some_and(|s| s == 429) {
                l.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build();
    let t0 = Instant::now();
    let mut ok = 0;
    for _ in 0..60 {
        let req = client
            .request(Method::POST, &url)
            .header("x-api-key", &key)
            .body("asset bytes");
        if let Ok(r) = client.send(req).await
            && r.status() == 200
        {
            ok += 1;
        }
    }
    (limited.load(Ordering::Relaxed), ok, t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_client_never_sees_429_and_keeps_to_the_bucket_minimum() {
    let tg = weighted();
    let paced_key = tg.account_key("paced", Some("default")).await;
    let eager_key = tg.account_key("eager", Some("default")).await;
    let url = format!("http://{}/api/assets", tg.addr);

    // Both at once, on their own accounts (and buckets).
    let paced = tokio::spawn(uploads(
        Client::builder().with_pacer(Pacer::new()),
        url.clone(),
        paced_key,
    ));
    let eager = tokio::spawn(uploads(
        Client::builder().with_retry(RetryPolicy::new()),
        url,
        eager_key,
    ));
    let (paced_429, paced_ok, took) = paced.await.expect("paced");
    let (eager_429, _, _) = eager.await.expect("eager");

    assert_eq!(paced_429, 0, "the paced client was told 429");
    assert_eq!(paced_ok, 60);
    // (60 × 20 − 400) / 100 = 8 s at best; within 10 %.
    assert!(
        took >= Duration::from_millis(7900) && took <= Duration::from_millis(8800),
        "paced run took {took:?}"
    );
    // The retrying client waits ≥ 1 s after each 429, which refills at most
    // ~5 uploads: the 40 uploads past the first 400 tokens cost it ≥ 6 × 429.
    assert!(
        eager_429 >= 6,
        "the unpaced client saw only {eager_429} × 429"
    );
    eprintln!("paced: 0 × 429 in {took:?}; unpaced: {eager_429} × 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_prints_one_json_object_on_the_last_line() {
    let tg = weighted();
    let key = tg.account_key("loader", Some("default")).await;
    let url = format!("http://{}/api/assets/7/thumbnail", tg.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["load", &url, "--rate", "100", "--duration", "1s", "--json"])
            .args(["--header", &format!("x-api-key: {key}")])
            .output()
            .expect("run tollgate load")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a line");
    let v: Value = serde_json::from_str(last).expect("JSON on the last line");
    // Thumbnails cost 10: 40 pass from the full bucket, 10/s refill after.
    let ok = v["counts"]["200"].as_u64().expect("200 count");
    let limited = v["counts"]["429"].as_u64().expect("429 count");
    assert!((40..=60).contains(&ok), "{v}");
    assert!(limited >= 30, "{v}");
    assert_eq!(v["requests"].as_u64(), Some(ok + limited));
    // Every call due is answered, failed, dropped or unfinished.
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert_eq!(n("scheduled"), 100, "{v}");
    assert_eq!(
        ok + limited + n("errors") + n("dropped") + n("unfinished"),
        100,
        "{v}"
    );
    let share = v["share_429"].as_f64().expect("share");
    assert!((share - limited as f64 / (ok + limited) as f64).abs() < 1e-9);
    for p in ["p50", "p90", "p99"] {
        assert!(v["latency_ms"][p].as_f64().is_some(), "{v}");
    }
    assert!(
        v["requests_per_s"].as_f64().is_some_and(|r| r > 50.0),
        "{v}"
    );
}

//! The load generator against a local scripted server (real time, 1 s runs).

use std::num::NonZeroU32;
use std::time::Duration;

use reqwest::Method;
use tollgate_client::load::{LoadOptions, Mode, parse_header, run};

use crate::support::{Reply, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_run_counts_statuses_and_sends_headers_and_body() {
    let server = Server::start((0..10).map(|_| Reply::status(429)).collect()).await;
    let mut opts = LoadOptions::new(server.url("/load"));
    opts.mode = Mode::Rate(NonZeroU32::new(50).expect("50"));
    opts.duration = Duration::from_secs(1);
    opts.method = Method::POST;
    opts.headers
        .push(parse_header("x-api-key: k1").expect("header"));
    opts.body = Some("payload".into());
    let s = run(opts).await.expect("run");
    assert_eq!(s.count(429), 10, "{s}");
    let total = s.responses();
    assert!((40..=52).contains(&total), "{s}");
    assert_eq!(s.count(200), total - 10);
    assert!(s.elapsed >= Duration::from_secs(1) && s.elapsed < Duration::from_millis(1500));
    assert!((s.share_429() - 10.0 / total as f64).abs() < 1e-9);
    assert!(s.latency[0] <= s.latency[1] && s.latency[1] <= s.latency[2]);
    let seen = server.seen();
    assert!(
        seen.iter()
            .all(|r| r.method == "POST" && r.header("x-api-key") == Some("k1"))
    );
    let j = s.to_json();
    assert_eq!(j["counts"]["429"], 10);
    assert_eq!(j["requests"], total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_run_with_retry_counts_every_attempt() {
    // One 503: its retry waits at most 1 s (full jitter), within the run.
    let server = Server::start(vec![Reply::status(503)]).await;
    let mut opts = LoadOptions::new(server.url("/"));
    opts.mode = Mode::Concurrency(NonZeroU32::new(1).expect("1"));
    opts.duration = Duration::from_millis(1500);
    opts.retry = true;
    let s = run(opts).await.expect("run");
    assert_eq!(s.count(503), 1, "{s}");
    assert_eq!(s.retries, 1, "{s}");
    assert!(s.count(200) > 0, "{s}");
}

#[tokio::test]
async fn refuses_non_http_targets() {
    let err = run(LoadOptions::new("ftp://127.0.0.1:1/"))
        .await
        .expect_err("ftp is refused");
    assert!(
        err.to_string().contains("only http:// and https://"),
        "{err}"
    );
    assert!(run(LoadOptions::new("not a url")).await.is_err());
}

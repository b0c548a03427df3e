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
    assert!(seen.iter().all(|r| r.method == "POST"
        && r.header("x-api-key") == Some("k1")
        && r.header("host") == Some(server.addr.to_string().as_str())
        && r.body == "payload"));
    assert_eq!(s.errors, 0, "{s}");
    assert_eq!((s.calls_ok, s.calls_failed), (total - 10, 10), "{s}");
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

fn rate_opts(server: &Server, rate: u32, duration: Duration) -> LoadOptions {
    let mut opts = LoadOptions::new(server.url("/load?q=1"));
    opts.mode = Mode::Rate(NonZeroU32::new(rate).expect("rate > 0"));
    opts.duration = duration;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_the_schedule() {
    let server = Server::start(Vec::new()).await;
    let s = run(rate_opts(&server, 1000, Duration::from_secs(1)))
        .await
        .expect("run");
    // 1000 calls due, one every millisecond; each is answered, dropped or
    // unfinished, exactly. The bounds are wide: this runs in real time
    // beside other tests on 2 cores.
    assert_eq!(s.scheduled, 1000, "{s}");
    assert!((800..=1000).contains(&s.count(200)), "{s}");
    assert_eq!(s.errors, 0, "{s}");
    assert_eq!(s.count(200) + s.dropped + s.unfinished, 1000, "{s}");
    let seen = server.seen();
    assert!(seen.len() <= 1000, "{} sent", seen.len());
    assert!(seen.iter().all(|r| r.method == "GET"), "GET by default");
    // Calls leave at their due times, not in bursts on the timer's
    // millisecond ticks: the median gap between arrivals is 1 ms, and the
    // first half second saw half of them.
    let mut gaps = server.gaps();
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    assert!(
        median >= Duration::from_micros(500) && median <= Duration::from_micros(1500),
        "median gap {median:?}"
    );
    let first = seen[0].at;
    let early = seen
        .iter()
        .filter(|r| r.at - first < Duration::from_millis(500))
        .count();
    assert!((350..=650).contains(&early), "{early} in the first 0.5 s");
}

/// Coordinated omission: one connection, answers that take 20 ms, 100
/// calls due per second. Only ~50 can go; each waits for the one before,
/// and its latency counts from when it was due, not from when it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_counts_from_the_due_time() {
    let slow = (0..200)
        .map(|_| Reply::status(200).delay(Duration::from_millis(20)))
        .collect();
    let server = Server::start(slow).await;
    let mut opts = rate_opts(&server, 100, Duration::from_secs(1));
    opts.connections = NonZeroU32::new(1).expect("1");
    let s = run(opts).await.expect("run");
    let answered = s.count(200);
    // The call in flight at the end is answered within the grace.
    assert!((25..=51).contains(&answered), "{s}");
    // Call k is due at 10k ms and answered at about 20(k+1) ms.
    assert!(s.latency[0] >= Duration::from_millis(200), "{s}");
    assert!(s.latency[2] >= Duration::from_millis(400), "{s}");
    assert!(s.latency_max >= s.latency[2], "{s}");
    // Due but never sent: the connection was busy until the end. Every due
    // call is counted once (the connection, idle after the end, no longer
    // hides one of them).
    assert!(s.dropped >= 40, "{s}");
    assert_eq!((s.errors, s.unfinished), (0, 0), "{s}");
    assert_eq!((s.scheduled, answered + s.dropped), (100, 100), "{s}");
    assert!(s.requests_per_second() < 55.0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_reopens_connections_the_server_closes() {
    let closing = (0..5)
        .map(|_| Reply::status(200).header("connection", "close"))
        .collect();
    let server = Server::start(closing).await;
    let mut opts = rate_opts(&server, 100, Duration::from_millis(500));
    opts.connections = NonZeroU32::new(1).expect("1");
    let s = run(opts).await.expect("run");
    assert_eq!(s.errors, 0, "{s}");
    assert!((35..=50).contains(&s.count(200)), "{s}");
    assert_eq!(s.calls_ok, s.count(200), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_counts_refused_connections_as_errors() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut opts = LoadOptions::new(format!("http://{addr}/"));
    opts.mode = Mode::Rate(NonZeroU32::new(100).expect("100"));
    opts.duration = Duration::from_millis(300);
    let s = run(opts)
        .await
        .expect("a run against a closed port completes");
    assert_eq!(s.responses(), 0, "{s}");
    assert!((15..=30).contains(&s.errors), "{s}");
    assert_eq!(s.calls_failed, s.errors, "{s}");
}

/// Regression (issue 4): calls in flight when the duration ends were
/// counted as neither answered nor dropped. Three calls due at 0, 100 and
/// 200 ms, each answered 300 ms later: two are in flight at the end and are
/// answered within the grace, with their full latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_4_calls_in_flight_at_the_end_are_answered_within_the_grace() {
    let slow = (0..3)
        .map(|_| Reply::status(200).delay(Duration::from_millis(300)))
        .collect();
    let server = Server::start(slow).await;
    let s = run(rate_opts(&server, 10, Duration::from_millis(300)))
        .await
        .expect("run");
    assert_eq!(s.scheduled, 3, "{s}");
    assert_eq!(s.count(200), 3, "{s}");
    assert_eq!((s.errors, s.dropped, s.unfinished), (0, 0, 0), "{s}");
    assert!(s.latency[0] >= Duration::from_millis(300), "{s}");
    // The run lasted until the last answer, about 500 ms; well within the
    // 1 s grace.
    assert!(s.elapsed >= Duration::from_millis(500), "{s}");
    assert!(s.elapsed < Duration::from_millis(1300), "{s}");
}

/// Regression (issue 4): calls that outlast the grace are counted as
/// unfinished. The caller here runs a current-thread runtime: the open
/// loop brings its own thread.
#[tokio::test]
async fn regression_4_calls_open_after_the_grace_are_unfinished() {
    let hung = (0..3)
        .map(|_| Reply::status(200).delay(Duration::from_secs(5)))
        .collect();
    let server = Server::start(hung).await;
    let mut opts = rate_opts(&server, 10, Duration::from_millis(300));
    opts.grace = Duration::from_millis(200);
    let s = run(opts).await.expect("run");
    assert_eq!(s.scheduled, 3, "{s}");
    assert_eq!(s.responses(), 0, "{s}");
    assert_eq!((s.errors, s.dropped, s.unfinished), (0, 0, 3), "{s}");
    assert_eq!((s.calls_ok, s.calls_failed), (0, 0), "{s}");
    assert!(s.elapsed >= Duration::from_millis(500), "{s}");
    assert!(s.elapsed < Duration::from_secs(3), "{s}");
    assert_eq!(s.to_json()["unfinished"], 3);
}

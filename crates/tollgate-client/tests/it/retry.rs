//! The retry policy against a scripted server: what is retried, how long
//! each wait is (paused clock), what comes back when retries run out.

use std::time::Duration;

use reqwest::Method;
use tollgate_client::{Error, Jitter, RetryPolicy};

use crate::support::{Reply, Server, client};

const S: Duration = Duration::from_secs(1);

fn exact() -> RetryPolicy {
    RetryPolicy::new().with_jitter(Jitter::None)
}

async fn get(policy: RetryPolicy, server: &Server) -> Result<reqwest::Response, Error> {
    let c = client(policy);
    c.send(c.request(Method::GET, &server.url("/x"))).await
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_waited_at_least() {
    let server = Server::start(vec![
        Reply::status(429).header("Retry-After", 3),
        Reply::status(429).header("Retry-After", 5),
    ])
    .await;
    // Full jitter (the default): the back-off may be short, Retry-After is not.
    let r = get(RetryPolicy::new(), &server).await.expect("answer");
    assert_eq!(r.status(), 200);
    let gaps = server.gaps();
    assert_eq!(gaps.len(), 2);
    assert!(gaps[0] >= 3 * S && gaps[0] < 3 * S + S / 10, "{gaps:?}");
    assert!(gaps[1] >= 5 * S && gaps[1] < 5 * S + S / 10, "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn without_retry_after_the_backoff_doubles_from_one_second() {
    let server = Server::start(vec![
        Reply::status(429),
        Reply::status(429),
        Reply::status(429),
    ])
    .await;
    let r = get(exact(), &server).await.expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(server.gaps(), [S, 2 * S, 4 * S]);
}

#[tokio::test(start_paused = true)]
async fn delay_is_the_larger_of_retry_after_and_backoff() {
    // Retry 0: backoff 1 s < RA 2 s; retry 1: backoff 2 s > RA 1 s;
    // retry 2: backoff 4 s < RA 6 s.
    let server = Server::start(vec![
        Reply::status(503).header("Retry-After", 2),
        Reply::status(503).header("Retry-After", 1),
        Reply::status(429).header("Retry-After", 6),
    ])
    .await;
    get(exact(), &server).await.expect("answer");
    assert_eq!(server.gaps(), [2 * S, 2 * S, 6 * S]);
}

#[tokio::test(start_paused = true)]
async fn vendor_and_classic_reset_headers_are_waited_on_429() {
    let server = Server::start(vec![
        Reply::status(429)
            .header("X-Picsart-RateLimit-Limit", 500)
            .header("X-Picsart-RateLimit-Reset-Time", 7),
        Reply::status(429).header("X-RateLimit-Reset", 5),
        Reply::status(429)
            .header("RateLimit-Policy", "\"minute\";q=60;w=60")
            .header("RateLimit", "\"minute\";r=0;t=9"),
    ])
    .await;
    let r = get(RetryPolicy::new(), &server).await.expect("answer");
    assert_eq!(r.status(), 200);
    let gaps = server.gaps();
    for (gap, min) in gaps.iter().zip([7, 5, 9]) {
        assert!(*gap >= min * S && *gap < min * S + S / 10, "{gaps:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn gateway_errors_502_503_504_are_retried() {
    let server = Server::start(vec![
        Reply::status(502),
        Reply::status(503),
        Reply::status(504),
    ])
    .await;
    let r = get(exact(), &server).await.expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(server.seen().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_three_retries_with_the_last_response() {
    let server = Server::start(vec![
        Reply::status(503),
        Reply::status(503),
        Reply::status(429).header("Retry-After", 1),
        Reply::status(503).header("X-Last", "yes").body("fourth"),
        Reply::status(200),
    ])
    .await;
    let t0 = tokio::time::Instant::now();
    let err = get(exact(), &server).await.expect_err("gives up");
    assert_eq!(t0.elapsed(), 7 * S, "1 + 2 + 4 s of back-off");
    let Error::GaveUp { attempts, last } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*attempts, 4);
    assert_eq!(last.status, 503);
    assert_eq!(
        last.headers.get("x-last").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    assert_eq!(last.text(), "fourth");
    assert_eq!(server.seen().len(), 4, "no fifth attempt");
}

#[tokio::test(start_paused = true)]
async fn never_retries_400_402_or_other_errors() {
    for status in [400, 401, 402, 403, 404, 413, 422, 500, 501] {
        let server = Server::start(vec![
            Reply::status(status).header("Retry-After", 1),
            Reply::status(200),
        ])
        .await;
        let t0 = tokio::time::Instant::now();
        let r = get(exact(), &server).await.expect("answer");
        assert_eq!(r.status(), status);
        assert_eq!(server.seen().len(), 1, "{status} was retried");
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn retries_can_be_switched_off() {
    let server = Server::start(vec![Reply::status(429).header("Retry-After", 1)]).await;
    let err = get(RetryPolicy::none(), &server).await.expect_err("429");
    assert_eq!(err.attempts(), 1);
    assert_eq!(err.last_response().map(|l| l.status.as_u16()), Some(429));
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_is_not_retried() {
    let server = Server::start(vec![Reply::status(429).header("Retry-After", 3600)]).await;
    let t0 = tokio::time::Instant::now();
    let err = get(RetryPolicy::new(), &server).await.expect_err("429");
    assert_eq!((err.attempts(), t0.elapsed()), (1, Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_file_name_limit_is_never_retried() {
    let body = r#"{"error":{"code":"rate_limited","message":"...","limit":"file-name-per-hour"}}"#;
    let server = Server::start(vec![
        Reply::status(429).header("Retry-After", 1).body(body),
        Reply::status(429)
            .header("Retry-After", 1)
            .header("RateLimit", "\"file-name-per-hour\";r=0;t=1"),
    ])
    .await;
    let policy = RetryPolicy::new().with_never_retry_limit("file-name-per-hour");
    for _ in 0..2 {
        let err = get(policy.clone(), &server).await.expect_err("429");
        assert_eq!(err.attempts(), 1);
    }
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn retried_posts_keep_one_idempotency_key() {
    let server = Server::start(vec![
        Reply::status(503),
        Reply::status(429).header("Retry-After", 1),
        Reply::status(200),
        Reply::status(200),
    ])
    .await;
    let c = client(RetryPolicy::new());
    let url = server.url("/upload");
    let r = c
        .send(c.request(Method::POST, &url).body("image bytes"))
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    c.send(c.request(Method::POST, &url).body("another"))
        .await
        .expect("answer");
    c.send(c.request(Method::GET, &url)).await.expect("answer");
    c.send(
        c.request(Method::POST, &url)
            .header("Idempotency-Key", "mine"),
    )
    .await
    .expect("answer");

    let seen = server.seen();
    assert_eq!(seen.len(), 6);
    let keys: Vec<_> = seen.iter().map(|s| s.header("idempotency-key")).collect();
    let first = keys[0].expect("a key on the first attempt");
    assert_eq!(first.len(), 32);
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(keys[1], Some(first));
    assert_eq!(keys[2], Some(first));
    assert!(keys[3].is_some_and(|k| k != first), "a new call, a new key");
    assert_eq!(seen[4].method, "GET");
    assert_eq!(keys[4], None, "GETs need none");
    assert_eq!(keys[5], Some("mine"), "the caller's own key is kept");
}

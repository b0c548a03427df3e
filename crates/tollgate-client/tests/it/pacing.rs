//! The pacer against servers that enforce real limits on the (paused) tokio
//! clock: a paced client gets no 429 and stays close to the best time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use reqwest::Method;
use tokio::time::Instant;
use tollgate_client::{Client, Pacer, RetryPolicy};

use crate::support::http;

/// How the server limits.
#[derive(Clone, Copy)]
enum Limit {
    /// Token bucket: capacity, refill per second, cost per request; classic
    /// headers without a reset (as the weighted-bucket preset).
    Bucket {
        capacity: f64,
        refill: f64,
        cost: f64,
    },
    /// Fixed window of `n` requests per `w` seconds; IETF headers.
    Window { n: u64, w: u64 },
}

struct Model {
    limit: Limit,
    start: Instant,
    tokens: f64,
    at: Instant,
    window: u64,
    used: u64,
    rejected: u64,
}

async fn limited_server(limit: Limit) -> (String, Arc<Mutex<Model>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/x", listener.local_addr().expect("addr"));
    let now = Instant::now();
    let model = Arc::new(Mutex::new(Model {
        limit,
        start: now,
        tokens: match limit {
            Limit::Bucket { capacity, .. } => capacity,
            Limit::Window { .. } => 0.0,
        },
        at: now,
        window: 0,
        used: 0,
        rejected: 0,
    }));
    let m = model.clone();
    let app = axum::Router::new().fallback(move || {
        let m = m.clone();
        async move {
            let mut m = m.lock().expect("model");
            let now = Instant::now();
            let b = axum::response::Response::builder();
            let b = match m.limit {
                Limit::Bucket {
                    capacity,
                    refill,
                    cost,
                } => {
                    let dt = (now - m.at).as_secs_f64();
                    m.tokens = (m.tokens + dt * refill).min(capacity);
                    m.at = now;
                    let ok = m.tokens >= cost;
                    if ok {
                        m.tokens -= cost;
                    } else {
                        m.rejected += 1;
                    }
                    let b = b
                        .status(if ok { 200 } else { 429 })
                        .header("X-RateLimit-Limit", capacity as u64)
                        .header("X-RateLimit-Remaining", m.tokens.floor() as u64)
                        .header("X-RateLimit-Cost", cost as u64);
                    if ok {
                        b
                    } else {
                        let wait = ((cost - m.tokens) / refill).ceil().max(1.0);
                        b.header("Retry-After", wait as u64)
                    }
                }
                Limit::Window { n, w } => {
                    let window = (now - m.start).as_secs() / w;
                    if window != m.window {
                        m.window = window;
                        m.used = 0;
                    }
                    let ok = m.used < n;
                    if ok {
                        m.used += 1;
                    } else {
                        m.rejected += 1;
                    }
                    let end = m.start + Duration::from_secs((window + 1) * w);
                    let t = (end - now).as_secs_f64().ceil() as u64;
                    let b = b
                        .status(if ok { 200 } else { 429 })
                        .header("RateLimit-Policy", format!("\"window\";q={n};w={w}"))
                        .header("RateLimit", format!("\"window\";r={};t={t}", n - m.used));
                    if ok {
                        b
                    } else {
                        b.header("Retry-After", t.max(1))
                    }
                }
            };
            b.body(Body::empty()).expect("response")
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, model)
}

fn paced() -> Client {
    Client::builder()
        .with_http(http())
        .with_retry(RetryPolicy::none())
        .with_pacer(Pacer::new())
        .build()
}

#[tokio::test(start_paused = true)]
async fn bucket_without_reset_header_zero_429_near_the_best_time() {
    // 30 requests of cost 4 = 120 tokens; 40 in the bucket, 10/s refill:
    // at best (120 - 40) / 10 = 8 s.
    let (url, model) = limited_server(Limit::Bucket {
        capacity: 40.0,
        refill: 10.0,
        cost: 4.0,
    })
    .await;
    let c = paced();
    let t0 = Instant::now();
    for i in 0..30 {
        let r = c.send(c.request(Method::POST, &url)).await;
        assert!(r.is_ok_and(|r| r.status() == 200), "request {i}");
    }
    let took = t0.elapsed();
    assert_eq!(model.lock().expect("model").rejected, 0);
    assert!(took >= Duration::from_secs(8), "{took:?}");
    assert!(took <= Duration::from_millis(8800), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn unpaced_client_gets_429s_on_the_same_work() {
    let (url, model) = limited_server(Limit::Bucket {
        capacity: 40.0,
        refill: 10.0,
        cost: 4.0,
    })
    .await;
    let c = tollgate_client::Client::builder()
        .with_http(http())
        .with_retry(RetryPolicy::none())
        .build();
    for _ in 0..30 {
        let _ = c.send(c.request(Method::POST, &url)).await;
    }
    assert_eq!(model.lock().expect("model").rejected, 20);
}

#[tokio::test(start_paused = true)]
async fn window_with_reset_header_zero_429() {
    let (url, model) = limited_server(Limit::Window { n: 5, w: 2 }).await;
    let c = paced();
    let t0 = Instant::now();
    for i in 0..20 {
        let r = c.send(c.request(Method::GET, &url)).await;
        assert!(r.is_ok_and(|r| r.status() == 200), "request {i}");
    }
    assert_eq!(model.lock().expect("model").rejected, 0);
    // Four windows of 5: the 20th request goes at the start of the 4th (6 s).
    assert!(t0.elapsed() <= Duration::from_secs(7), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_pacer() {
    let (url, model) = limited_server(Limit::Bucket {
        capacity: 40.0,
        refill: 10.0,
        cost: 4.0,
    })
    .await;
    let c = paced();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..8 {
                let r = c.send(c.request(Method::POST, &url)).await;
                assert!(r.is_ok_and(|r| r.status() == 200));
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    assert_eq!(model.lock().expect("model").rejected, 0);
}

//! A polite API caller: retries as the limit pages ask and paces itself.
//!
//! ```text
//! cargo run -p tollgate-client --example polite                  # against a built-in demo server
//! cargo run -p tollgate-client --example polite -- URL API_KEY   # e.g. a `tollgate serve` on the weighted-bucket preset
//! ```
//! Sends 10 POSTs to URL with `x-api-key: API_KEY` and prints, for each, the
//! status and the rate-limit headers read back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tollgate_client::reqwest::Method;
use tollgate_client::{Client, Error, Pacer, RateLimitInfo, RetryPolicy};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (url, key) = match (args.next(), args.next()) {
        (Some(url), key) => (url, key.unwrap_or_default()),
        (None, _) => (demo_server().await?, "demo".to_owned()),
    };
    // The documents' policy (3 retries, 1 s doubling with full jitter, at
    // least Retry-After) and a pacer that watches the remaining count.
    let client = Client::builder()
        .with_retry(RetryPolicy::new())
        .with_pacer(Pacer::new())
        .with_observer(|a| {
            if a.retry > 0 {
                println!("  (retry {} answered {:?})", a.retry, a.status);
            }
        })
        .build();
    for i in 1..=10 {
        let req = client
            .request(Method::POST, &url)
            .header("x-api-key", &key)
            .body("image bytes");
        match client.send(req).await {
            Ok(resp) => {
                let info = RateLimitInfo::parse(resp.headers());
                println!(
                    "call {i}: {} remaining={:?} limit={:?} cost={:?}",
                    resp.status(),
                    info.remaining,
                    info.limit,
                    info.cost
                );
            }
            Err(Error::GaveUp { attempts, last }) => {
                println!(
                    "call {i}: gave up after {attempts} attempts: {}",
                    last.status
                );
            }
            Err(e) => println!("call {i}: {e}"),
        }
    }
    Ok(())
}

/// A local server that answers the 3rd request 429 with `Retry-After: 1`,
/// and every answer with a 5-request `X-RateLimit-*` budget.
async fn demo_server() -> std::io::Result<String> {
    let n = Arc::new(AtomicU32::new(0));
    let app = axum::Router::new().fallback(move || {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let b = axum::response::Response::builder()
                .header("X-RateLimit-Limit", "5")
                .header("X-RateLimit-Remaining", (4 - i % 5).to_string())
                .header("X-RateLimit-Cost", "1");
            let b = if i == 2 {
                b.status(429).header("Retry-After", "1")
            } else {
                b.status(200)
            };
            b.body(axum::body::Body::empty()).expect("response")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/upload", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

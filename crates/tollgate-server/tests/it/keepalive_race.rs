//! The upstream keep-alive race through the whole proxy: an upstream that
//! closes each kept-alive connection just as the next request arrives.
//! Idempotent requests with an empty body are resent once on a new
//! connection (no 502); a POST that was written is never resent, so the
//! upstream sees it once and the client gets the 502.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Server, TOKEN};

/// No policy retries: only the pool's own resend can save a request.
const POLICY: &str = r#"
[policy]
name = "keepalive-race"

[operations.read]
method = "GET"
path = "/items"

[operations.write]
method = "POST"
path = "/items"

[limits.roomy]
algorithm = "token_bucket"
capacity = 1000
refill = 1000
scope = ["account"]

[plans.default]
"#;

/// Answers the first request of each connection (keep-alive), then closes
/// the connection when the next request's head arrives. The request lines
/// received, answered or not.
async fn closing_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for answered in [true, false] {
                    let Some((line, len)) = read_head(&mut stream).await else {
                        return;
                    };
                    log.lock().expect("log").push(line);
                    if answered {
                        let mut body = vec![0u8; len];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// One request head: its first line and its content length.
async fn read_head(stream: &mut TcpStream) -> Option<(String, usize)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some((text.lines().next()?.to_owned(), len))
}

#[tokio::test]
async fn gets_survive_the_keepalive_race_and_posts_are_not_duplicated() {
    let (addr, seen) = closing_upstream().await;
    let s = Server::with_upstream(Some(TOKEN), POLICY, Some(addr)).await;
    let key = s.account_with_key("race", "default").await;
    let auth = [("x-api-key", key.as_str())];

    for i in 0..6 {
        let a = s.call(false, "GET", "/items", &auth, "").await;
        assert_eq!(a.status, 200, "GET {i}: {}", a.text);
        assert_eq!(a.text, "ok");
    }
    let gets = seen.lock().expect("log").len();
    assert_eq!(gets, 1 + 5 * 2, "each reused connection lost one GET");

    // The pool now holds a kept-alive connection the upstream will close
    // when the POST arrives: the POST is lost, and never sent twice.
    let a = s.call(false, "POST", "/items", &auth, "{}").await;
    assert_eq!(a.status, 502, "{}", a.text);
    let posts = seen
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.starts_with("post"))
        .count();
    assert_eq!(posts, 1, "the upstream saw the POST once");
    // A POST on a new connection goes through.
    let a = s.call(false, "POST", "/items", &auth, "{}").await;
    assert_eq!(a.status, 200, "{}", a.text);
}

//! RELIABILITY-PLAN E1: hyper's header-read timeout is wired (a timer is
//! configured), so a client that sends half its headers and goes silent is
//! cut off, while good traffic is served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_server::config::{DEFAULT_POLICY, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partial_headers_are_cut_off_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.path().to_path_buf(),
        header_read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let policy = tollgate_core::policy::parse(DEFAULT_POLICY, "default").expect("policy");
    let running = tollgate_server::start(config, policy)
        .await
        .expect("starts");

    let mut slow = tokio::net::TcpStream::connect(running.addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\nX-Slow: ")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();

    // Good traffic meanwhile.
    for _ in 0..5 {
        let mut ok = tokio::net::TcpStream::connect(running.addr)
            .await
            .expect("connect");
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        closed.is_ok(),
        "the slow connection was not closed within 5 s"
    );
    assert!(
        waited <= Duration::from_millis(2_500),
        "closed after {waited:?}; header timeout is 1 s"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    running.shutdown().await;
}

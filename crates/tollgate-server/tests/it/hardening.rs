//! RELIABILITY-PLAN E1 and E2: slow clients. hyper's header-read timeout is
//! wired (a timer is configured), so a client that sends half its headers and
//! goes silent is cut off; a body that stops or trickles gets 408 and its
//! connection closed; a client that never reads its answer is disconnected
//! after the send timeout; good traffic is served meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_server::config::{DEFAULT_POLICY, ServerConfig};

use crate::support::{Server, TOKEN};

/// The default policy served with a 1 s `header_read_timeout`; the data
/// directory lives as long as the returned guard.
async fn start_with_a_1s_header_timeout() -> (tempfile::TempDir, tollgate_server::Running) {
    start_with_header_timeout(Duration::from_secs(1)).await
}

/// The default policy served with `header_read_timeout` = `timeout`.
async fn start_with_header_timeout(
    timeout: Duration,
) -> (tempfile::TempDir, tollgate_server::Running) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.path().to_path_buf(),
        header_read_timeout: timeout,
        ..ServerConfig::default()
    };
    let policy = tollgate_core::policy::parse(DEFAULT_POLICY, "default").expect("policy");
    let running = tollgate_server::start(config, policy)
        .await
        .expect("starts");
    (dir, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partial_headers_are_cut_off_after_the_header_timeout() {
    let (_dir, running) = start_with_a_1s_header_timeout().await;

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

    is_cut_off_within_the_header_timeout(&mut slow, started).await;
    running.shutdown().await;
}

/// Asserts that the server closes `conn` (an unfinished head sent at
/// `since`) within 2.5 s of it, a 1 s header timeout plus slack, with a 408
/// or nothing.
async fn is_cut_off_within_the_header_timeout(
    conn: &mut tokio::net::TcpStream,
    since: tokio::time::Instant,
) {
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "not closed within 5 s");
    let waited = since.elapsed();
    assert!(
        waited <= Duration::from_millis(2_500),
        "closed after {waited:?}; header timeout is 1 s"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// The header timeout on a kept-alive connection: each request head gets
/// the whole `header_read_timeout` again (the connection's one timer is
/// moved to each new deadline, `connection::HeaderTimer`), so requests
/// 700 ms apart keep being served well past the first deadline; a partial
/// head after them is still cut off within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_gets_the_header_timeout_for_each_head() {
    let (_dir, running) = start_with_a_1s_header_timeout().await;
    let mut conn = tokio::net::TcpStream::connect(running.addr)
        .await
        .expect("connect");
    let request = b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\n\r\n";
    let started = tokio::time::Instant::now();
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        conn.write_all(request).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text}");
    }
    assert!(started.elapsed() >= Duration::from_millis(2_100));
    // Then a head that never ends.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("write");
    is_cut_off_within_the_header_timeout(&mut conn, tokio::time::Instant::now()).await;
    running.shutdown().await;
}

/// Shutdown tells every open connection to finish (hyper closes an idle
/// kept-alive one at once), and waits for them: a connection idle between
/// requests, with a header timeout far away, is closed and the shutdown is
/// over within a second or two, not when the header timeout or the 10 s
/// drain limit would end it (`connection::until_stopped`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_an_idle_kept_alive_connection_at_once() {
    let (_dir, running) = start_with_header_timeout(Duration::from_secs(30)).await;
    let mut conn = TcpStream::connect(running.addr).await.expect("connect");
    // Two requests, so the connection has been polled by its task before.
    for _ in 0..2 {
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    let started = tokio::time::Instant::now();
    let (closed, ()) = tokio::join!(
        async {
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(8), conn.read_to_end(&mut rest)).await
        },
        running.shutdown(),
    );
    assert!(matches!(closed, Ok(Ok(0))), "not closed: {closed:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

// ------------------------------------------------------------------ E2

/// Legit traffic while an attack runs: fresh connections (no pooled
/// keep-alive, so short idle timeouts never race a reused connection),
/// `GET /healthz` and `POST /v1/check`; returns (successes, attempts).
pub(crate) fn legit_traffic(
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        let (mut ok, mut total) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            for (method, path, body) in [
                ("GET", "/healthz", ""),
                ("POST", "/v1/check", r#"{"account":"legit"}"#),
            ] {
                let req = http::Request::builder()
                    .method(method)
                    .uri(format!("http://{addr}{path}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .expect("request");
                total += 1;
                let answered =
                    tokio::time::timeout(Duration::from_secs(5), client.request(req)).await;
                if let Ok(Ok(resp)) = answered {
                    let status = resp.status();
                    if resp.into_body().collect().await.is_ok() && status.is_success() {
                        ok += 1;
                    }
                }
            }
        }
        (ok, total)
    })
}

/// Reads until the server closes (EOF or reset) or `within` passes; returns
/// what arrived and whether the connection was closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (buf, closed)
}

/// One slow-body attacker: sends `head`, then `body_start`, then (if
/// `trickle`) one byte every 100 ms, never finishing the body. Returns the
/// answer, whether the server closed the connection, and the time from the
/// end of the headers to the close.
async fn slow_body(addr: SocketAddr, head: String, trickle: bool) -> (String, bool, Duration) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("headers");
    s.write_all(b"{\"account\":").await.expect("body start");
    let started = tokio::time::Instant::now();
    let (buf, closed) = if trickle {
        let (mut rd, mut wr) = s.into_split();
        let feeder = tokio::spawn(async move {
            // Stops when the server closes (write error) or after 30 s.
            for _ in 0..300 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if wr.write_all(b" ").await.is_err() {
                    break;
                }
            }
        });
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(15), rd.read_to_end(&mut buf))
            .await
            .is_ok();
        feeder.abort();
        (buf, closed)
    } else {
        read_until_closed(&mut s, Duration::from_secs(15)).await
    };
    (
        String::from_utf8_lossy(&buf).into_owned(),
        closed,
        started.elapsed(),
    )
}

/// E2 (slow body, CI size): a body that stops arriving is answered 408 and
/// its connection closed within `body_read_timeout` (1 s) + 1 s, on the
/// decision API and on a proxied route (streamed to the upstream); a body
/// that trickles in (a byte every 100 ms, which never trips the pause
/// timeout) within `body_timeout` (3 s) + 1 s; a silent connection within
/// `header_read_timeout` (1 s) + 1 s → 100 %. Legit traffic on the same
/// listener meanwhile: success ≥ 99.9 % (every request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2_slow_bodies_get_408_and_are_closed_within_their_timeouts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Server::configured(Some(TOKEN), DEFAULT_POLICY, None, |c| {
        c.header_read_timeout = Duration::from_secs(1);
        c.body_read_timeout = Duration::from_secs(1);
        c.body_timeout = Duration::from_secs(3);
    })
    .await;
    let key = s.account_with_key("acme", "pro").await;
    s.account_with_key("legit", "pro").await;
    let addr = s.running.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_traffic(addr, stop.clone());

    let check = "POST /v1/check HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n"
        .to_owned();
    let proxied = format!(
        "POST /upload HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {key}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    );
    let silent = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let started = tokio::time::Instant::now();
        let (buf, closed) = read_until_closed(&mut s, Duration::from_secs(15)).await;
        (buf, closed, started.elapsed())
    };
    let (stalled_check, stalled_proxy, trickled, silent) = tokio::join!(
        slow_body(addr, check.clone(), false),
        slow_body(addr, proxied, false),
        slow_body(addr, check, true),
        silent,
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, total) = legit.await.expect("legit traffic");

    for (what, (answer, closed, waited), limit) in [
        ("stalled /v1/check body", stalled_check, 2_000),
        ("stalled proxied body", stalled_proxy, 2_000),
        ("trickling /v1/check body", trickled, 4_000),
    ] {
        println!("E2 {what}: closed after {waited:?}");
        assert!(closed, "{what}: the connection was not closed");
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{what}: answered {answer:?}"
        );
        assert!(answer.contains("request_body_timeout"), "{answer}");
        assert!(
            waited <= Duration::from_millis(limit),
            "{what}: closed after {waited:?}, limit {limit} ms"
        );
    }
    let (buf, closed, waited) = silent;
    println!("E2 silent connection: closed after {waited:?}");
    assert!(closed && buf.is_empty(), "silent connection: {buf:?}");
    assert!(
        waited <= Duration::from_secs(2),
        "silent connection: {waited:?}"
    );

    println!("E2 legit traffic during the attack: {ok}/{total}");
    assert!(total >= 20, "too little legit traffic to judge: {total}");
    assert!(
        ok * 1000 >= total * 999,
        "legit success {ok}/{total} < 99.9 %"
    );
    s.running.shutdown().await;
}

/// E2 (slow read, CI size): a client that asks for a 32 MiB answer and never
/// reads it (4 KiB receive buffer) is disconnected once the server's write
/// has been blocked for `send_timeout` (1 s): its connection is released
/// within `send_timeout` + 3 s (margin for filling the socket buffers on a
/// loaded debug build) and it never gets the whole answer → 100 %. Legit
/// traffic meanwhile ≥ 99.9 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2_client_that_never_reads_is_dropped_after_the_send_timeout() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const BIG: usize = 32 << 20;
    let app = axum::Router::new().fallback(|| async { vec![b'x'; BIG] });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let s = Server::configured(Some(TOKEN), DEFAULT_POLICY, Some(upstream), |c| {
        c.send_timeout = Duration::from_secs(1);
    })
    .await;
    let key = s.account_with_key("acme", "pro").await;
    s.account_with_key("legit", "pro").await;
    let addr = s.running.addr;
    assert_eq!(s.running.connections.open(), 0);

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut attacker = socket.connect(addr).await.expect("connect");
    attacker
        .write_all(
            format!("GET /big HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {key}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
    let started = tokio::time::Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_traffic(addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, total) = legit.await.expect("legit traffic");

    // The attacker's connection is the only one left; wait for its release.
    while s.running.connections.open() > 0 && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = started.elapsed();
    println!("E2 slow read: connection released after {waited:?}");
    assert_eq!(
        s.running.connections.open(),
        0,
        "the non-reading client still holds its connection"
    );
    assert!(
        waited <= Duration::from_secs(4),
        "released after {waited:?}; send timeout 1 s + 3 s margin"
    );
    let (got, closed) = read_until_closed(&mut attacker, Duration::from_secs(15)).await;
    println!(
        "E2 slow read: {} of {BIG} bytes reached the client",
        got.len()
    );
    assert!(closed, "the connection must end");
    assert!(got.len() < BIG, "the whole answer was delivered");

    println!("E2 legit traffic during the slow read: {ok}/{total}");
    assert!(total >= 10, "too little legit traffic to judge: {total}");
    assert!(
        ok * 1000 >= total * 999,
        "legit success {ok}/{total} < 99.9 %"
    );
    s.running.shutdown().await;
}

//! RELIABILITY-PLAN E6: a connection flood. Idle connections from many
//! loopback sources fill the proxy listener's `max_connections`; every
//! connection beyond it is closed at once, file descriptors never run out,
//! the admin listener keeps answering, and legit traffic recovers as soon as
//! the flood goes away.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tollgate_server::config::DEFAULT_POLICY;

use crate::support::{Server, TOKEN};

/// Soft limit on open files, from `/proc/self/limits`.
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l["Max open files".len()..].split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

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

/// A connection from loopback source `127.0.0.(2 + i % 64)`.
async fn connect_from(i: usize, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 64) as u8);
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(addr).await
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn healthz(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.ok()?;
        Some(answer.starts_with("HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// E6 (CI size: 3 000 idle connections from 64 loopback sources against a
/// cap of 1 000, scaled down if `ulimit -n` is small). Figures: open
/// connections never exceed the cap → yes; every connection beyond it is
/// closed within 1 s → 100 %; open descriptors stay under the process limit
/// (server side ≤ cap + 64) → yes; memory per held connection ≤ 64 KiB; the
/// admin listener answers during the flood; legit traffic succeeds again
/// within 2 s of the flood ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e6_connection_flood_is_capped_and_traffic_recovers() {
    let limit = open_file_limit();
    // Client and server sockets share this process: keep both under the limit.
    let flood = 3_000.min(limit.saturating_sub(256) / 2);
    let cap = flood / 3;
    assert!(cap >= 50, "ulimit -n {limit} is too small for this test");
    let s = Server::configured(Some(TOKEN), DEFAULT_POLICY, None, |c| {
        c.max_connections = cap;
        // Idle connections stay for the whole test.
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let addr = s.running.addr;
    assert_eq!(s.running.connections.max(), cap);
    assert!(healthz(addr).await, "serves before the flood");
    // Let the legit connection's place be given back.
    while s.running.connections.open() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fds_before = open_fds();
    let rss_before = rss_bytes();

    let mut held = Vec::with_capacity(flood);
    let mut peak_open = 0;
    for i in 0..flood {
        held.push(connect_from(i, addr).await.expect("connect"));
        peak_open = peak_open.max(s.running.connections.open());
    }
    // The accept loop catches up with the backlog.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.running.connections.open() < cap && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fds_during = open_fds();
    let rss_during = rss_bytes();
    peak_open = peak_open.max(s.running.connections.open());

    // Which connections were turned away: closed by the server within 1 s.
    let started = tokio::time::Instant::now();
    let checks = futures_util::future::join_all(
        held.iter_mut()
            .map(|c| closed_within(c, Duration::from_secs(1))),
    )
    .await;
    let refused = checks.iter().filter(|&&c| c).count();
    let kept = flood - refused;
    println!(
        "E6 flood of {flood} (cap {cap}, ulimit -n {limit}): kept {kept}, closed {refused} \
         (checked in {:?}); peak open {peak_open}; fds {fds_before} → {fds_during}; \
         RSS +{} KiB",
        started.elapsed(),
        rss_during.saturating_sub(rss_before) / 1024
    );
    assert!(peak_open <= cap, "{peak_open} connections open, cap {cap}");
    assert_eq!(kept, cap, "exactly the cap is held");
    assert_eq!(
        refused,
        flood - cap,
        "every connection beyond the cap is closed at once"
    );
    // This process holds both ends: `flood` client sockets, and server side
    // at most `cap` plus a few (listeners, database, store).
    let server_side = fds_during.saturating_sub(fds_before + flood);
    assert!(
        server_side <= cap + 64,
        "{server_side} server-side descriptors for {cap} connections"
    );
    assert!(
        fds_during < limit,
        "descriptors exhausted: {fds_during}/{limit}"
    );
    let per_connection = rss_during.saturating_sub(rss_before) / cap as u64;
    assert!(
        per_connection <= 64 * 1024,
        "{per_connection} bytes of RSS per held connection"
    );

    // The admin listener has its own cap: operators still get /metrics.
    let m = s.admin("GET", "/metrics", "").await;
    assert_eq!(m.status, 200);
    let metric = |name: &str| -> f64 {
        m.text
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    assert_eq!(metric("tollgate_connections_open ") as usize, cap);
    assert!(metric("tollgate_connections_refused_total") as usize >= flood - cap);

    // The flood ends; legit traffic is served again.
    drop(held);
    let ended = tokio::time::Instant::now();
    let mut recovered = false;
    while ended.elapsed() < Duration::from_secs(2) {
        if healthz(addr).await {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("E6 legit traffic served again after {:?}", ended.elapsed());
    assert!(recovered, "legit traffic did not recover within 2 s");
    let mut ok = 0;
    for _ in 0..50 {
        if healthz(addr).await {
            ok += 1;
        }
    }
    assert_eq!(ok, 50, "after the flood every legit request succeeds");
    s.running.shutdown().await;
}

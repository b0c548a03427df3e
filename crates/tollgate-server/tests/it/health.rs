//! RELIABILITY-PLAN H3: `/readyz` reflects the counter store's state within
//! 1 s (down when Redis is killed or hangs, up again when it returns), and
//! `/healthz` (liveness) stays up while the store is degraded. The test runs
//! its own `redis-server` on a free loopback port and stops it on drop.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::{OwnRedis, Server, TOKEN};

async fn status(s: &Server, path: &str) -> u16 {
    s.call(false, "GET", path, &[], "").await.status
}

/// Polls `/readyz` until it answers `want`; returns the time it took (from
/// `since`), checking that `/healthz` answers 200 at every step. `None` if
/// `/readyz` did not change within 10 s.
async fn readyz_becomes(s: &Server, want: u16, since: Instant) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(10) {
        let got = status(s, "/readyz").await;
        assert_eq!(
            status(s, "/healthz").await,
            200,
            "liveness must not follow the store"
        );
        if got == want {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// H3: with Redis killed, `/readyz` turns 503 within 1 s; with Redis hung
/// (SIGSTOP) too; when it comes back (SIGCONT, restart on the same port)
/// `/readyz` turns 200 within 1 s. `/healthz` answers 200 throughout, and a
/// degraded store never takes the proxy listener down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_readyz_follows_the_store_within_1s_and_healthz_stays_up() {
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start(port).await;
    let store = format!("redis://127.0.0.1:{}/0", redis.port);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_path_buf();
    let s = Server::with_config(
        Some(TOKEN),
        tollgate_server::config::DEFAULT_POLICY,
        None,
        data,
        &store,
        dir,
    )
    .await;
    assert_eq!(status(&s, "/readyz").await, 200);
    assert_eq!(status(&s, "/healthz").await, 200);
    let limit = Duration::from_secs(1);

    // Hang: the process is stopped, connections stay open, nothing answers.
    redis.signal("-STOP");
    let hung = readyz_becomes(&s, 503, Instant::now()).await;
    println!("H3 Redis hung: /readyz 503 after {hung:?}");
    assert!(hung.is_some_and(|t| t <= limit), "hang seen after {hung:?}");
    // Degraded for a while: liveness keeps answering.
    let degraded = Instant::now();
    while degraded.elapsed() < Duration::from_millis(500) {
        assert_eq!(status(&s, "/healthz").await, 200);
        assert_eq!(status(&s, "/readyz").await, 503);
    }
    redis.signal("-CONT");
    let back = readyz_becomes(&s, 200, Instant::now()).await;
    println!("H3 Redis continued: /readyz 200 after {back:?}");
    assert!(
        back.is_some_and(|t| t <= limit),
        "recovery seen after {back:?}"
    );

    // Kill: connections are refused.
    redis.kill();
    let killed = readyz_becomes(&s, 503, Instant::now()).await;
    println!("H3 Redis killed: /readyz 503 after {killed:?}");
    assert!(
        killed.is_some_and(|t| t <= limit),
        "outage seen after {killed:?}"
    );
    let restarted_at = Instant::now();
    let redis = OwnRedis::start(port).await;
    let up = readyz_becomes(&s, 200, Instant::now()).await;
    println!(
        "H3 Redis restarted (took {:?}): /readyz 200 after {up:?}",
        restarted_at.elapsed()
    );
    assert!(up.is_some_and(|t| t <= limit), "restart seen after {up:?}");
    drop(redis);
    s.running.shutdown().await;
}

//! Two replicas sharing Redis (their own `redis-server` on a free loopback
//! port) and one database behave as one gateway: a limit holds across them.

use crate::support::{OwnRedis, Server, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // a black-box test measures real elapsed time
async fn two_replicas_share_one_limit_through_redis() {
    let redis = OwnRedis::start(OwnRedis::free_port()).await;
    let store = format!("redis://127.0.0.1:{}/0", redis.port);
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = dir.path().to_path_buf();
    let policy = tollgate_server::config::DEFAULT_POLICY;
    let a = Server::with_config(
        Some(TOKEN),
        policy,
        None,
        shared.clone(),
        &store,
        tempfile::tempdir().expect("dir"),
    )
    .await;
    let b = Server::with_config(Some(TOKEN), policy, None, shared, &store, dir).await;
    let key = a.account_with_key("acme", "pro").await;
    // The pro plan's burst bucket holds 50 and refills 10 per second.
    let mut admitted = 0;
    let started = std::time::Instant::now();
    for i in 0..120 {
        let server = if i % 2 == 0 { &a } else { &b };
        if server
            .call(false, "GET", "/x", &[("x-api-key", &key)], "")
            .await
            .status
            == 200
        {
            admitted += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bound = 50 + (elapsed * 10.0).ceil() as usize;
    assert!(
        admitted >= 50,
        "the bucket's capacity is admitted: {admitted}"
    );
    assert!(
        admitted <= bound,
        "{admitted} admitted across two replicas in {elapsed:.2} s; the shared bucket allows {bound}"
    );
    // Both replicas answer with the same, shared remaining count.
    let ra = a
        .call(false, "GET", "/v1/account", &[("x-api-key", &key)], "")
        .await;
    let rb = b
        .call(false, "GET", "/v1/account", &[("x-api-key", &key)], "")
        .await;
    let burst = |v: &serde_json::Value| {
        v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "burst")
            .unwrap()["remaining"]
            .clone()
    };
    assert!((burst(&ra.body).as_i64().unwrap() - burst(&rb.body).as_i64().unwrap()).abs() <= 1);
    assert_eq!(a.call(false, "GET", "/readyz", &[], "").await.status, 200);
    a.running.shutdown().await;
    b.running.shutdown().await;
}

//! B8: unexpected Redis errors become store errors, never "allowed".

use std::num::NonZeroU64;
use std::time::Duration;

use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::gcra::GcraRate;
use tollgate_core::{Check, CounterKey, Nanos, Params, Store, StoreError};
use tollgate_redis::{RedisStore, TimeSource, error_kind};

use crate::support::{OwnRedis, SHARED, free_port, raw, shared_store};

fn bucket_check(n: u128) -> Check {
    Check {
        key: CounterKey((9 << 64) | n),
        params: Params::Gcra(GcraRate::new(
            NonZeroU64::new(10).expect("non-zero"),
            NonZeroU64::new(1).expect("non-zero"),
            Duration::from_secs(1),
        )),
        cost: 1,
        blocking: true,
    }
}

#[tokio::test]
async fn b8_wrongtype_is_a_store_error() {
    let store = shared_store("wrongtype", TimeSource::Server).await;
    let c = bucket_check(1);
    let mut conn = raw(SHARED).await;
    let key = store.redis_key(c.key);
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&key)
        .arg("f")
        .arg("v")
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(60_000)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("hset");
    let mut out = [Evaluation::default(); 1];
    let err = store
        .decide(Nanos(0), &[c], 0, &mut out)
        .await
        .expect_err("a hash where a counter should be");
    println!("WRONGTYPE -> {err}");
    assert!(matches!(err, StoreError::Unavailable(m) if m.contains("WRONGTYPE")));
    assert_eq!(error_kind(&err), "wrongtype", "store_errors_total{{kind}}");
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("del");
}

#[tokio::test]
async fn b4_oom_is_a_store_error() {
    let server = OwnRedis::start(
        free_port(),
        &["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"],
    );
    let store = RedisStore::builder(server.url())
        .with_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("store");
    let mut out = [Evaluation::default(); 1];
    assert!(
        store
            .decide(Nanos(0), &[bucket_check(1)], 0, &mut out)
            .await
            .expect("decides")
    );
    // Fill memory past maxmemory (one big value is still accepted, then OOM).
    let mut conn = raw(&server.url()).await;
    let big = vec![b'x'; 4 << 20];
    let _: Result<(), _> = redis::cmd("SET")
        .arg("filler")
        .arg(big)
        .query_async(&mut conn)
        .await;
    let err = store
        .decide(Nanos(0), &[bucket_check(2)], 0, &mut out)
        .await
        .expect_err("OOM");
    println!("OOM -> {err}");
    assert!(matches!(err, StoreError::Unavailable(m) if m.contains("OOM")));
    assert_eq!(error_kind(&err), "oom", "store_errors_total{{kind}}");
}

/// B4: a `maxmemory-policy` that can evict live counters (`allkeys-*`) is
/// reported (the server logs a warning at startup); safe ones are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_evicting_policy_is_reported() {
    for (policy, reported) in [
        ("allkeys-lru", true),
        ("allkeys-random", true),
        ("noeviction", false),
        ("volatile-ttl", false),
    ] {
        let server = OwnRedis::start(free_port(), &["--maxmemory-policy", policy]);
        let store = RedisStore::builder(server.url())
            .connect()
            .await
            .expect("store");
        let got = store.evicting_policy().await;
        println!("B4: maxmemory-policy {policy}: reported {got:?}");
        assert_eq!(got.is_some(), reported, "{policy}");
        if reported {
            assert_eq!(got.as_deref(), Some(policy));
        }
    }
}

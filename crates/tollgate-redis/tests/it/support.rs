//! Test helpers: stores on the shared Redis under a unique prefix, and
//! redis-server processes of our own on free ports.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tollgate_redis::{RedisStore, TimeSource};

/// The shared Redis of this machine: never flushed, never killed.
pub const SHARED: &str = "redis://127.0.0.1:6379/0";

/// A key prefix no other test (or test run) uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).expect("randomness");
    format!(
        "tgtest:{test}:{}:{:08x}:{}:",
        std::process::id(),
        u32::from_le_bytes(r),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A store on the shared Redis, with a unique prefix and the given clock.
pub async fn shared_store(test: &str, time: TimeSource) -> RedisStore {
    RedisStore::builder(SHARED)
        .with_prefix(unique_prefix(test))
        .with_time_source(time)
        .with_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("store")
}

/// A plain connection to `url`, for inspecting keys.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Every key under `prefix`, with its TTL in ms (`-1`: none).
pub async fn keys_with_ttl(url: &str, prefix: &str) -> Vec<(String, i64)> {
    let mut c = raw(url).await;
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .expect("scan");
        for k in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&k)
                .query_async(&mut c)
                .await
                .expect("pttl");
            out.push((k, ttl));
        }
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// B7: no key under `prefix` lives without a TTL. Then deletes them, so
/// tests leave nothing behind on a shared Redis (a day-refill bucket's key
/// would otherwise live for its 100-day TTL). Returns how many there were.
pub async fn assert_every_key_expires(url: &str, prefix: &str) -> usize {
    let keys = keys_with_ttl(url, prefix).await;
    let without: Vec<_> = keys.iter().filter(|(_, t)| *t == -1).collect();
    assert!(without.is_empty(), "keys without TTL: {without:?}");
    let mut c = raw(url).await;
    for (k, _) in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut c)
            .await
            .expect("del");
    }
    keys.len()
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A redis-server child process of our own; killed (only it) on drop.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts redis-server on `port` and waits until it accepts connections.
    pub fn start(port: u16, extra: &[&str]) -> OwnRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let r = OwnRedis {
            port,
            child: Some(child),
        };
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on {port} did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The process id (for `SIGSTOP`/`SIGCONT`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to this server only, by its pid.
    /// Async: a blocking fork/exec would stall the runtime's timers.
    pub async fn signal(&self, signal: &str) {
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// `kill -9`, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

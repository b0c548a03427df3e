//! A server per test and a small HTTP client.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_server::config::{AdminToken, DEFAULT_POLICY, ServerConfig};
use tollgate_server::{Running, start};

pub const TOKEN: &str = "test-admin-token-0123456789";

pub struct Server {
    pub running: Running,
    pub client: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
    pub text: String,
}

impl Server {
    pub async fn start(token: Option<&str>) -> Server {
        Server::with_policy(token, DEFAULT_POLICY).await
    }

    pub async fn with_policy(token: Option<&str>, policy: &str) -> Server {
        Server::with_upstream(token, policy, None).await
    }

    pub async fn with_upstream(
        token: Option<&str>,
        policy: &str,
        upstream: Option<SocketAddr>,
    ) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().to_path_buf();
        Server::with_config(token, policy, upstream, data_dir, "memory", dir).await
    }

    /// A server on `store` keeping its database in `data_dir` (replicas share both).
    pub async fn with_config(
        token: Option<&str>,
        policy: &str,
        upstream: Option<SocketAddr>,
        data_dir: std::path::PathBuf,
        store: &str,
        dir: tempfile::TempDir,
    ) -> Server {
        let config = ServerConfig {
            store: store.to_owned(),
            upstream: upstream.map(|a| format!("http://{a}")),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            admin_token: token.and_then(|t| AdminToken::new(t.to_owned())),
            ..ServerConfig::default()
        };
        let policy = tollgate_core::policy::parse(policy, "test.toml").expect("valid policy");
        let running = start(config, policy).await.expect("server starts");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Server {
            running,
            client,
            _dir: dir,
        }
    }

    /// A server on the in-memory store whose settings `tweak` adjusts.
    pub async fn configured(
        token: Option<&str>,
        policy: &str,
        upstream: Option<SocketAddr>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig {
            upstream: upstream.map(|a| format!("http://{a}")),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.path().to_path_buf(),
            admin_token: token.and_then(|t| AdminToken::new(t.to_owned())),
            ..ServerConfig::default()
        };
        tweak(&mut config);
        let policy = tollgate_core::policy::parse(policy, "test.toml").expect("valid policy");
        let running = start(config, policy).await.expect("server starts");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Server {
            running,
            client,
            _dir: dir,
        }
    }

    /// `POST path` on the proxy listener with raw body bytes (any bytes, not
    /// only UTF-8) and an optional content type; the status and body bytes.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> (u16, Bytes) {
        let mut req = http::Request::post(format!("http://{}{path}", self.running.addr));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = self
            .client
            .request(req.body(Full::new(body.into())).expect("request"))
            .await
            .expect("answer");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes)
    }

    pub async fn call(
        &self,
        admin: bool,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let addr = if admin {
            self.running.admin_addr
        } else {
            self.running.addr
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let resp = self
            .client
            .request(
                req.body(Full::new(Bytes::from(body.to_owned())))
                    .expect("request"),
            )
            .await
            .expect("answer");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn admin(&self, method: &str, path: &str, body: &str) -> Answer {
        let auth = format!("Bearer {TOKEN}");
        self.call(true, method, path, &[("authorization", &auth)], body)
            .await
    }

    /// Creates an account on `plan` and returns a fresh API key for it.
    pub async fn account_with_key(&self, id: &str, plan: &str) -> String {
        let a = self
            .admin(
                "POST",
                "/admin/v1/accounts",
                &format!(r#"{{"id":"{id}","plan":"{plan}"}}"#),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.text);
        let k = self
            .admin("POST", &format!("/admin/v1/accounts/{id}/keys"), "")
            .await;
        assert_eq!(k.status, 201, "{}", k.text);
        k.body["key"].as_str().expect("key").to_owned()
    }

    /// Grants `amount` credits to account `id` through the admin API, once
    /// per `idempotency_key`; the grant must be accepted.
    pub async fn grant(&self, id: &str, amount: impl std::fmt::Display, idempotency_key: &str) {
        let g = self
            .admin(
                "POST",
                &format!("/admin/v1/accounts/{id}/credits"),
                &format!(r#"{{"amount":{amount},"idempotency_key":"{idempotency_key}"}}"#),
            )
            .await;
        assert_eq!(g.status, 200, "{}", g.text);
    }
}

/// A scripted upstream: counts requests; `/slow` waits 1 s, `/status/N`
/// answers N, anything else 200 with the request count.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        use std::sync::atomic::Ordering;
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |uri: http::Uri| {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let path = uri.path().to_owned();
                if path == "/slow" {
                    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
                }
                let status = path
                    .strip_prefix("/status/")
                    .and_then(|s| s.parse::<u16>().ok())
                    .unwrap_or(200);
                (
                    http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK),
                    format!("{{\"hit\":{n}}}"),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An upstream that holds each request before answering `held`: 20 ms, or
/// N ms for `/hold/N`. Returns its address and the number of requests it
/// holds now and the most it ever held at once.
pub async fn holding_upstream() -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let ms = uri
                .path()
                .strip_prefix("/hold/")
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(20);
            let held = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(held, Ordering::SeqCst);
            // Counted down also when the proxy gives up on the request.
            struct Done(Arc<AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _done = Done(n);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            "held"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, now, peak)
}

/// A PostgreSQL schema of the test's own on the machine's server
/// (`TOLLGATE_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`),
/// created and migrated on start, dropped on drop; never anyone else's.
pub struct PgSchema {
    base: String,
    /// The schema's name.
    pub schema: String,
}

impl PgSchema {
    pub async fn create(tag: &str) -> PgSchema {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var("TOLLGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let nanos = jiff::Timestamp::now().as_nanosecond() % 1_000_000_000;
        let schema = format!(
            "tg_srv_{tag}_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ledger = tollgate_ledger::Ledger::open_postgres_schema(&base, &schema)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (or TOLLGATE_TEST_DATABASE_URL)");
        ledger.close().await;
        PgSchema { base, schema }
    }

    /// A `postgres://` URL whose connections use only this schema.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.base, self.schema
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.schema.clone());
        // Drop runs inside the test's runtime: a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(l) = tollgate_ledger::Ledger::open_postgres_schema(&base, &schema).await {
                    let _ = l
                        .execute_for_test(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                        .await;
                    l.close().await;
                }
            });
        })
        .join();
    }
}

/// A `redis-server` of the test's own on a loopback port, killed on drop
/// (also when a test panics); never the machine's shared Redis.
pub struct OwnRedis {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
}

impl OwnRedis {
    /// A loopback port nothing listens on now.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    /// Starts `redis-server` on `port` (no persistence) and waits until it
    /// accepts connections.
    pub async fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        // Owned (and so killed on drop) before anything can panic.
        let redis = OwnRedis { child, port };
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return redis;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on {port}");
    }

    /// `kill -9`, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal such as `-STOP` or `-CONT`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        // A stopped process must be continued to die cleanly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        self.kill();
    }
}

/// Deterministic pseudo-random numbers (splitmix64) from a test's seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

//! Harness of the black-box `tollgate serve` tests: the real binary as a child
//! process (killed on drop), a scriptable upstream that records every request
//! it sees, a plain HTTP client and a raw-socket client for malformed input.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The admin token every test server gets (unless a test wants none).
pub const ADMIN_TOKEN: &str = "e2e-admin-token-7c1d5a90";

/// A preset of `examples/policies/`.
pub fn preset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/policies")
        .join(format!("{name}.toml"))
}

// ------------------------------------------------------------------ upstream

/// One request the upstream saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Bytes of body received (`None` if reading it failed).
    pub body_len: Option<usize>,
}

impl Seen {
    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A scripted upstream answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Reply {
    /// A status with a small JSON body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: format!("{{\"upstream_status\":{status}}}"),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A small HTTP server on 127.0.0.1:0: records every request, answers the
/// scripted replies in order, then 200 `{"ok":true}`; `/hold/N` answers
/// after N ms.
#[derive(Clone)]
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Upstream {
    /// Starts it on the current runtime.
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let up = Upstream {
            addr: listener.local_addr().expect("upstream addr"),
            seen: Arc::default(),
            script: Arc::default(),
        };
        let st = up.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let st = st.clone();
            async move { st.answer(req).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        up
    }

    async fn answer(&self, req: axum::extract::Request) -> axum::response::Response {
        let (parts, body) = req.into_parts();
        let body_len = body.collect().await.ok().map(|b| b.to_bytes().len());
        self.seen.lock().expect("seen").push(Seen {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.to_string()),
            headers: parts.headers,
            body_len,
        });
        // `/hold/N`: answer after N ms (a slow upstream).
        if let Some(ms) = parts
            .uri
            .path()
            .strip_prefix("/hold/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let reply = self
            .script
            .lock()
            .expect("script")
            .pop_front()
            .unwrap_or_else(|| Reply {
                status: 200,
                headers: Vec::new(),
                body: "{\"ok\":true}".to_owned(),
            });
        let mut b = axum::response::Response::builder()
            .status(reply.status)
            .header("content-type", "application/json");
        for (n, v) in &reply.headers {
            b = b.header(n.as_str(), v.as_str());
        }
        b.body(Body::from(reply.body)).expect("response")
    }

    /// Queues `reply` `times` times.
    pub fn push(&self, reply: Reply, times: usize) {
        let mut s = self.script.lock().expect("script");
        for _ in 0..times {
            s.push_back(reply.clone());
        }
    }

    /// Drops the replies not yet given.
    pub fn script_clear(&self) {
        self.script.lock().expect("script").clear();
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// How many requests were seen.
    pub fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

// ------------------------------------------------------------------ tollgate

/// How to start tollgate.
#[derive(Debug, Clone)]
pub struct Opts {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--admin-token`.
    pub token: Option<String>,
    /// Further arguments.
    pub args: Vec<String>,
    /// Further environment variables of the child (e.g. libfaketime's
    /// `LD_PRELOAD` and `FAKETIME`, to skew its wall clock: see
    /// `multi::faketime_env`). Set on the binary itself rather than through a
    /// wrapper command, so the child stays the process that drop kills.
    pub env: Vec<(String, String)>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            config: None,
            upstream: None,
            token: Some(ADMIN_TOKEN.to_owned()),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl Opts {
    /// A preset in front of `up`.
    pub fn preset(name: &str, up: &Upstream) -> Opts {
        Opts {
            config: Some(preset(name)),
            upstream: Some(up.url()),
            ..Opts::default()
        }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header parsed as an integer.
    pub fn header_num(&self, name: &str) -> Option<i64> {
        self.header(name).and_then(|v| v.trim().parse().ok())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A running `tollgate serve`, killed on drop.
pub struct Tollgate {
    child: Child,
    /// Proxy listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Its data directory (removed on drop).
    _dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    client: Client<HttpConnector, Full<Bytes>>,
    token: Option<String>,
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tollgate {
    /// Starts the binary and waits for its "listening" line.
    pub fn start(opts: Opts) -> Tollgate {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = &opts.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(u) = &opts.upstream {
            cmd.args(["--upstream", u]);
        }
        if let Some(t) = &opts.token {
            cmd.args(["--admin-token", t]);
        }
        cmd.args(&opts.args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().expect("spawn tollgate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("tollgate listening on http://") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().expect("log").push(line);
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "tollgate did not start ({status:?}):\n{}",
                    log.lock().expect("log").join("\n")
                );
            }
        };
        let addr = between(&line, "listening on http://", " ");
        let admin = between(&line, "(admin http://", ")");
        Tollgate {
            child,
            addr: addr.parse().expect("proxy addr"),
            admin: admin.parse().expect("admin addr"),
            _dir: dir,
            log,
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: opts.token,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// A request to `addr`.
    pub async fn send_to(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in 30 s"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e:?}\n{}", self.log()));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// A request to the proxy listener.
    pub async fn req(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        self.send_to(self.addr, method, path, headers, body).await
    }

    /// A request to the proxy listener with an API key in `key_header`.
    pub async fn call(&self, key_header: &str, key: &str, method: &str, path: &str) -> Resp {
        self.req(method, path, &[(key_header, key)], Bytes::new())
            .await
    }

    /// An admin call with the configured token.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let auth = format!("Bearer {}", self.token.as_deref().unwrap_or(""));
        let mut h = vec![("authorization", auth.as_str())];
        if body.is_some() {
            h.push(("content-type", "application/json"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send_to(self.admin, method, path, &h, body).await
    }

    /// Creates an account (asserting 201).
    pub async fn account(&self, id: &str, plan: Option<&str>) -> Value {
        let mut body = json!({ "id": id });
        if let Some(p) = plan {
            body["plan"] = json!(p);
        }
        let r = self.admin("POST", "/admin/v1/accounts", Some(body)).await;
        assert_eq!(r.status, 201, "create account {id}: {}", r.text());
        r.json()
    }

    /// Creates a key of an account (asserting 201); returns the key itself.
    pub async fn key(&self, account: &str) -> String {
        self.key_doc(account).await["key"]
            .as_str()
            .expect("key")
            .to_owned()
    }

    /// Creates a key; returns `{"id","key","prefix"}`.
    pub async fn key_doc(&self, account: &str) -> Value {
        let r = self
            .admin("POST", &format!("/admin/v1/accounts/{account}/keys"), None)
            .await;
        assert_eq!(r.status, 201, "create key: {}", r.text());
        let v = r.json();
        assert!(v["id"].is_string() && v["key"].is_string() && v["prefix"].is_string());
        v
    }

    /// An account and one key.
    pub async fn account_key(&self, id: &str, plan: Option<&str>) -> String {
        self.account(id, plan).await;
        self.key(id).await
    }

    /// PATCH an account (asserting 200).
    pub async fn patch(&self, id: &str, body: Value) {
        let r = self
            .admin("PATCH", &format!("/admin/v1/accounts/{id}"), Some(body))
            .await;
        assert_eq!(r.status, 200, "patch {id}: {}", r.text());
    }

    /// Grants credits (asserting 200); returns the new balance.
    pub async fn credits(&self, id: &str, amount: i64) -> i64 {
        let r = self
            .admin(
                "POST",
                &format!("/admin/v1/accounts/{id}/credits"),
                Some(json!({ "amount": amount, "reason": "test", "idempotency_key": format!("{id}-{amount}") })),
            )
            .await;
        assert_eq!(r.status, 200, "credits: {}", r.text());
        r.json()["balance"].as_i64().expect("balance")
    }

    /// The events of an account.
    pub async fn events(&self, account: &str) -> Vec<Value> {
        let r = self
            .admin("GET", &format!("/admin/v1/events?account={account}"), None)
            .await;
        assert_eq!(r.status, 200, "events: {}", r.text());
        r.json().as_array().expect("events array").clone()
    }

    /// `/metrics` on the admin listener.
    pub async fn metrics(&self) -> String {
        let r = self.send_to(self.admin, "GET", "/metrics", &[], "").await;
        assert_eq!(r.status, 200);
        r.text()
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let from = s.find(start).expect("start marker") + start.len();
    let rest = &s[from..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

/// The value of one Prometheus sample whose line contains every `parts`.
pub fn metric(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ------------------------------------------------------------------ raw HTTP

/// Sends raw bytes on a new connection (optionally from a given local IP)
/// and reads until the first response is complete, the server closes, or
/// 5 s pass. Write errors are ignored (the server may close early).
pub async fn raw_from(src: Option<IpAddr>, addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(ip) = src {
        socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
    }
    let mut stream = socket.connect(addr).await.expect("connect");
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if response_complete(&out) {
                    break;
                }
            }
        }
    }
    out
}

/// [`raw_from`] from 127.0.0.1.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    raw_from(None, addr, bytes).await
}

fn response_complete(b: &[u8]) -> bool {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    b.len() >= end + 4 + len
}

/// The status of a raw response, if there is one.
pub fn raw_status(b: &[u8]) -> Option<u16> {
    let s = String::from_utf8_lossy(b);
    let line = s.lines().next()?;
    let mut it = line.split(' ');
    if !it.next()?.starts_with("HTTP/1.") {
        return None;
    }
    it.next()?.parse().ok()
}

/// How many responses a raw read holds.
pub fn raw_responses(b: &[u8]) -> usize {
    String::from_utf8_lossy(b).matches("HTTP/1.1 ").count()
}

// ------------------------------------------------------------------ payloads

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The first bytes of a PNG declaring `width` × `height` (signature + IHDR).
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&width.to_be_bytes());
    chunk.extend_from_slice(&height.to_be_bytes());
    chunk.extend_from_slice(&[8, 6, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    // IEND, so it is a complete (if empty) image.
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(b"IEND");
    out.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    out
}

/// A GIF header.
pub fn gif() -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&[10, 0, 10, 0, 0, 0, 0]);
    g.extend_from_slice(b"\x2c\0\0\0\0\x0a\0\x0a\0\0\x02\x02\x44\x01\0\x3b");
    g
}

/// The multipart boundary of [`multipart`].
pub const BOUNDARY: &str = "tollgate-e2e-boundary";

/// A `multipart/form-data` body with one file part.
pub fn multipart(file_name: &str, content_type: &str, data: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image_file\"; filename=\"{file_name}\"\r\nContent-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(data);
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b
}

/// The content type of [`multipart`].
pub fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// Sleeps past the end of the current UTC minute if fewer than `margin`
/// seconds are left (calendar-minute limits reset on the boundary).
#[allow(
    clippy::disallowed_methods,
    reason = "the server's calendar windows follow the wall clock"
)]
pub async fn avoid_minute_edge(margin: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let into = now.as_secs() % 60;
    if into + margin >= 60 {
        tokio::time::sleep(Duration::from_secs(60 - into) + Duration::from_millis(100)).await;
    }
}

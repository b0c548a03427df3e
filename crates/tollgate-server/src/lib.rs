//! # tollgate-server
//!
//! tollgate's server as a library: the proxy (every route not tollgate's
//! own), the decision API (`POST /v1/check`), `GET /v1/account`, health
//! endpoints, and — on a separate listener — the admin API and `/metrics`.
//! Tests start it in-process on `127.0.0.1:0` with [`start`]; the `tollgate`
//! binary calls [`start`] and waits for a signal.
//!
//! Connections are served by hyper (HTTP/1.1, and HTTP/2 with prior
//! knowledge on the same port) with a header-read timeout (the timer is
//! wired, so slow-header clients are cut off), a bounded header buffer (431
//! beyond it), at most 200 concurrent HTTP/2 streams, body and send
//! timeouts, a cap on open connections, and a whole-request timeout (see
//! [`connection`]).

pub mod account;
pub mod admin;
pub mod check;
pub mod client_ip;
pub mod config;
pub mod connection;
pub mod error;
pub mod events;
pub mod guard;
pub mod histogram;
pub mod metric_cache;
pub mod metrics;
pub mod payload;
pub mod proxy;
pub mod state;
pub mod store;
pub mod webhooks;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use connection::{ConnLimits, Gate};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use store::AnyStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tollgate_core::policy::CompiledPolicy;
use tollgate_core::{Clock, Engine, MemoryStore};
use tollgate_ledger::Ledger;
use tower::ServiceExt;

pub use config::{AdminToken, ServerConfig};
use state::{AppState, Shared};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error("cannot open the database")]
    Database(#[source] tollgate_ledger::LedgerError),
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Bound proxy address.
    pub addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// The echo upstream's address, when the built-in one runs.
    pub echo_addr: Option<SocketAddr>,
    /// Shared state (tests inspect it).
    pub state: Shared,
    /// The proxy listener's connection cap (tests read its open count).
    pub connections: Gate,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (at most 10 s), returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Opens the database, binds both listeners and serves until [`Running::shutdown`].
///
/// # Errors
/// A listener cannot bind, the database cannot be opened, or a setting is invalid.
pub async fn start(config: ServerConfig, policy: CompiledPolicy) -> Result<Running, ServerError> {
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut echo_addr = None;
    let upstream = match &config.upstream {
        Some(u) => u
            .parse::<http::Uri>()
            .map_err(|_| ServerError::Config(format!("upstream `{u}` is not a URL")))?,
        None => {
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            let addr = listener.local_addr().map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
            echo_addr = Some(addr);
            let limits = ConnLimits::proxy(&config);
            tasks.push(tokio::spawn(serve(
                listener,
                echo_router(),
                None,
                rx.clone(),
                limits,
                Gate::new(limits.max_connections, None),
            )));
            format!("http://{addr}")
                .parse()
                .map_err(|_| ServerError::Config("echo address".into()))?
        }
    };
    let database = config.database_url();
    if config.database.is_none() {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            ServerError::Config(format!(
                "cannot create data dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
    }
    let ledger = Ledger::open(&database)
        .await
        .map_err(ServerError::Database)?;
    let client = upstream_client(&upstream, &config)?;
    let engine = if config.store == "memory" {
        Engine::new(AnyStore::Memory(MemoryStore::new(config.max_counters)))
    } else {
        let redis = tollgate_redis::RedisStore::builder(&config.store)
            .with_timeout(config.store_timeout)
            .with_max_in_flight(config.store_max_in_flight)
            .connect()
            .await
            .map_err(|e| {
                ServerError::Config(format!("store {}: {e}", redact_url(&config.store)))
            })?;
        if let Some(p) = redis.evicting_policy().await {
            tracing::warn!(
                maxmemory_policy = %p,
                "Redis may evict live counters under memory pressure, which hands their \
                 capacity out again; set maxmemory-policy to noeviction or volatile-ttl"
            );
        }
        let seed = match &config.store_secret {
            Some(secret) => secret.key_seed(),
            None => {
                tracing::warn!(
                    "counter keys on the shared store use the public default seed; set \
                     TOLLGATE_STORE_SECRET (the same on every replica) so that callers \
                     cannot craft scope values that land on other callers' counters"
                );
                store::SHARED_KEY_SEED
            }
        };
        Engine::new(AnyStore::redis(redis, config.max_counters)).with_key_seed(seed)
    };
    let state = Arc::new(AppState {
        policy: ArcSwap::from_pointee(policy),
        engine,
        ledger,
        client,
        upstream_host: upstream_host(&upstream),
        upstream,
        metrics: metrics::Metrics::new(),
        config: config.clone(),
        events: events::Events::default(),
        counters: metric_cache::CounterCache::default(),
        guard: guard::AuthGuard::new(
            config.auth_fail_limit,
            config.auth_fail_window,
            config.auth_guard_max_ips,
        ),
        upstream_counters: proxy::UpstreamCounters::default(),
    });
    let proxy_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let addr = proxy_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let proxy_limits = ConnLimits::proxy(&config);
    let connections = Gate::new(
        proxy_limits.max_connections,
        Some((
            state.metrics.connections_open.clone(),
            state.metrics.connections_refused.clone(),
        )),
    );
    tasks.push(tokio::spawn(serve(
        proxy_listener,
        proxy_router(state.clone()),
        Some(state.clone()),
        rx.clone(),
        proxy_limits,
        connections.clone(),
    )));
    let admin_limits = ConnLimits::admin(&config);
    tasks.push(tokio::spawn(serve(
        admin_listener,
        admin::router(state.clone()),
        None,
        rx.clone(),
        admin_limits,
        Gate::new(admin_limits.max_connections, None),
    )));
    tasks.push(tokio::spawn(housekeeping(state.clone(), rx.clone())));
    tasks.extend(webhooks::Dispatcher::spawn(
        state.ledger.clone(),
        config.webhooks.clone(),
        state.metrics.webhooks.clone(),
        rx.clone(),
    ));
    tasks.push(tokio::spawn(watch_reloads(state.clone(), rx)));
    tracing::info!(%addr, %admin_addr, upstream = %state.upstream, database = %redact_url(&database), "tollgate serving");
    Ok(Running {
        addr,
        admin_addr,
        echo_addr,
        state,
        connections,
        shutdown,
        tasks,
    })
}

/// The pooled client of the upstream `uri`: plain TCP for `http://`, TLS
/// (trusting the system's roots and `upstream_ca`) for `https://`.
fn upstream_client(
    uri: &http::Uri,
    config: &ServerConfig,
) -> Result<proxy::UpstreamClient, ServerError> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    if uri.scheme_str() != Some("https") {
        if !config.upstream_ca.is_empty() {
            tracing::warn!(
                upstream = %uri,
                "upstream_ca_file is set but the upstream is not https://; it is not used"
            );
        }
        return Ok(proxy::UpstreamClient::new(uri.clone(), http));
    }
    // The connector makes the TCP connection (to port 443 unless the URL
    // says otherwise); TLS follows it.
    http.enforce_http(false);
    let host = uri
        .host()
        .ok_or_else(|| ServerError::Config(format!("upstream `{uri}` has no host")))?;
    let tls =
        proxy::UpstreamTls::for_host(host, &config.upstream_ca).map_err(ServerError::Config)?;
    Ok(proxy::UpstreamClient::new(uri.clone(), http).with_tls(tls))
}

/// The `Host` value hyper's client would write for `uri`: the host, and the
/// port unless it is the scheme's default.
fn upstream_host(uri: &http::Uri) -> Option<http::HeaderValue> {
    let host = uri.host()?;
    let secure = matches!(uri.scheme_str(), Some("https" | "wss"));
    match uri.port() {
        Some(p) if !matches!((p.as_u16(), secure), (443, true) | (80, false)) => {
            http::HeaderValue::from_str(&format!("{host}:{}", p.as_u16())).ok()
        }
        _ => http::HeaderValue::from_str(host).ok(),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The proxy listener's own paths (every other path is proxied).
pub const OWN_PATHS: [&str; 5] = [
    "/healthz",
    "/readyz",
    CHECK_PATH,
    "/v1/check/release",
    "/v1/account",
];

/// The decision API's path.
pub const CHECK_PATH: &str = "/v1/check";

/// The proxy listener's routes.
pub fn proxy_router(st: Shared) -> Router {
    Router::new()
        .route(OWN_PATHS[0], get(|| async { "ok" }))
        .route(OWN_PATHS[1], get(readyz))
        .route(OWN_PATHS[2], post(check::check))
        .route(OWN_PATHS[3], post(check::release))
        .route(OWN_PATHS[4], get(account::get))
        .fallback(any(proxy::handle))
        .with_state(st)
}

/// Serves one request. On the proxy listener (`fast` set) the two busy
/// routes skip the router: `POST /v1/check` and every path that is not one
/// of [`OWN_PATHS`] (the proxy) are called directly, with the same answers
/// the router would give (it has no layers; its fallback is the proxy).
async fn route(
    router: &Router,
    fast: Option<&Shared>,
    peer: &proxy::Peer,
    mut req: http::Request<axum::body::Body>,
) -> http::Response<connection::ResponseBody> {
    use http_body_util::Either;
    if let Some(st) = fast {
        let path = req.uri().path();
        if path == CHECK_PATH {
            if req.method() == http::Method::POST {
                // Boxed (written into its box, not moved there): a check
                // comes here only when its body did not come whole with its
                // headers, and its future is large.
                let place = Box::new_uninit();
                return Box::into_pin(Box::write(place, check::check_direct(st, peer.addr(), req)))
                    .await
                    .map(Either::Right);
            }
        } else if !OWN_PATHS.contains(&path) {
            return proxy::handle_direct(st, peer, req).await;
        }
    }
    req.extensions_mut().insert(ConnectInfo(peer.addr()));
    match router.clone().oneshot(req).await {
        Ok(r) => r.map(Either::Right),
        Err(never) => match never {},
    }
}

/// `GET /readyz`: 200 when the counter store and the database answer, 503 otherwise.
pub async fn readyz(State(st): State<Shared>) -> Response {
    if !st.engine.store().is_ready().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "counter store unavailable").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(1), st.ledger.balance("readyz-probe")).await {
        Ok(Ok(_)) | Ok(Err(tollgate_ledger::LedgerError::NotFound { .. })) => {
            "ready".into_response()
        }
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response(),
    }
}

/// Accepts connections until shutdown, serving each with hyper's limits and
/// the defences of [`connection`].
async fn serve(
    listener: TcpListener,
    router: Router,
    fast: Option<Shared>,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnLimits,
    gate: Gate,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Over the cap: closed at once (dropping the socket).
        let Some(place) = gate.admit() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        // What every request of the connection shares: one reference count
        // per request.
        let conn = Arc::new(PerConnection {
            router: router.clone(),
            fast: fast.clone(),
            peer: proxy::Peer::new(peer),
            limits,
            timer: connection::RequestTimer::default(),
        });
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let conn = Arc::clone(&conn);
                async move { Ok::<_, Infallible>(serve_request(&conn, req).await) }
            });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(connection::HeaderTimer::default())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(64 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(connection::MAX_CONCURRENT_STREAMS)
            .max_header_list_size(64 * 1024);
        let watcher = graceful.watcher();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _place = place;
            // A connection that has sent nothing is not waited for at shutdown.
            let first = tokio::select! {
                first = connection::first_byte(&stream, limits.header_read_timeout) => first,
                _ = stop.changed() => false,
            };
            if !first {
                return;
            }
            let conn = builder
                .serve_connection(connection::io(stream, limits.send_timeout), service)
                .into_owned();
            // Told to finish by `stop`; `watcher` (held to the end) is what
            // the shutdown below waits for.
            let _ = connection::until_stopped(conn, stop).await;
            drop(watcher);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}

/// What the requests of one connection share.
struct PerConnection {
    router: Router,
    /// The proxy listener's state (see [`route`]).
    fast: Option<Shared>,
    /// The peer, and its text for the proxy, made once.
    peer: proxy::Peer,
    limits: ConnLimits,
    /// The request timeout's timer, kept between requests.
    timer: connection::RequestTimer,
}

/// Serves one request of a connection with the defences of [`connection`].
/// On the proxy listener (`fast` set) a `POST /v1/check` whose JSON body came
/// whole with its headers is answered at once ([`check::answer_whole`]): no
/// body guard (nothing is left to wait for), no router, the request timeout
/// set only if the check waits ([`connection::within`]). Every other request
/// gets the guarded body, [`route`] and the request timeout.
async fn serve_request(
    conn: &PerConnection,
    mut req: http::Request<hyper::body::Incoming>,
) -> http::Response<connection::ResponseBody> {
    use http_body_util::Either;
    let (fast, peer, limits) = (&conn.fast, &conn.peer, &conn.limits);
    let http1 = req.version() < http::Version::HTTP_2;
    if connection::target_too_long(req.uri()) {
        return connection::uri_too_long_response(http1).map(Either::Right);
    }
    let mut first = None;
    if let Some(st) = &fast
        && let Some(len) = check::one_piece_json(&req)
    {
        match connection::poll_first(req.body_mut(), len).await {
            connection::First::Whole(body) => {
                // The request's header map becomes the answer's (its room
                // reused, see `check::answer_now`).
                let headers = std::mem::take(req.headers_mut());
                drop(req);
                // Usually nothing waits: answered without a future.
                if let Some(answer) = check::answer_now(st, &body, headers) {
                    return match answer {
                        Ok(response) => response,
                        Err(answered) => Box::pin(answered.send(st, limits.request_timeout)).await,
                    };
                }
                // Boxed: in place, the check's future would size this one,
                // and so every proxied request's (measured under callgrind:
                // the proxy +680 instructions per request, the check -570).
                return Box::pin(check::answer_whole(
                    st,
                    peer.addr(),
                    body,
                    limits.request_timeout,
                ))
                .await;
            }
            connection::First::Taken(frame) => first = frame,
            connection::First::Pending => {}
        }
    }
    let (parts, body) = req.into_parts();
    let (body, body_timed_out) = connection::guard_body(body, first, limits, http1);
    let req = http::Request::from_parts(parts, body);
    let resp = match conn
        .timer
        .within(
            limits.request_timeout,
            route(&conn.router, fast.as_ref(), peer, req),
        )
        .await
    {
        Ok(r) => r,
        Err(_) => connection::request_timeout_response().map(Either::Right),
    };
    let timed_out = body_timed_out.is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
    if timed_out {
        connection::body_timeout_response(http1).map(Either::Right)
    } else {
        resp
    }
}

/// The built-in upstream used when none is configured: answers 200 with
/// what it received (method, path, body size), never the body itself.
fn echo_router() -> Router {
    Router::new().fallback(|req: axum::extract::Request| async move {
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let account = req.headers().get("tollgate-account").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = http_body_util::BodyExt::collect(req.into_body()).await.map(|b| b.to_bytes().len()).unwrap_or(0);
        error::json_response(
            StatusCode::OK,
            &serde_json::json!({ "echo": true, "method": method, "path": path, "account": account, "received_bytes": bytes }),
        )
    })
}

/// Expires unsettled reservations every second (so none outlives its TTL by
/// more than that); every 5 s also sweeps idle counters and flushes events;
/// every minute prunes idempotency records past their retention.
async fn housekeeping(st: Shared, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        ticks += 1;
        if ticks % 5 != 1 {
            if let Err(e) = st.ledger.expire_reservations().await {
                tracing::warn!(error = %e, "could not expire reservations");
            }
            continue;
        }
        let now = st.engine.clock().now();
        st.engine.store().sweep(now);
        st.guard.sweep(now);
        st.client.sweep(tokio::time::Instant::now());
        st.metrics
            .live_counters
            .set(i64::try_from(st.engine.store().live_counters()).unwrap_or(i64::MAX));
        if let Err(e) = st.ledger.expire_reservations().await {
            tracing::warn!(error = %e, "could not expire reservations");
        }
        st.events.flush(&st.ledger, now).await;
        if ticks % 60 == 1
            && let Err(e) = st
                .ledger
                .prune_idempotency(st.config.idempotency_retention)
                .await
        {
            tracing::warn!(error = %e, "could not prune idempotency records");
        }
    }
    st.events.flush(&st.ledger, st.engine.clock().now()).await;
}

/// Reloads the policy file; the old policy keeps serving if the new one is invalid.
///
/// # Errors
/// Every problem of the new file (also logged).
pub fn reload_policy(st: &Shared) -> Result<String, Vec<String>> {
    let Some(path) = &st.config.policy_path else {
        return Err(vec![
            "tollgate runs the built-in policy; start it with --config FILE to reload".to_owned(),
        ]);
    };
    match tollgate_core::policy::load(path) {
        Ok(p) => {
            let name = p.name.clone();
            st.policy.store(Arc::new(p));
            st.metrics
                .reloads
                .get_or_create(&metrics::UpstreamLabels { class: "ok".into() })
                .inc();
            tracing::info!(policy = %name, "policy reloaded");
            Ok(name)
        }
        Err(errors) => {
            st.metrics
                .reloads
                .get_or_create(&metrics::UpstreamLabels {
                    class: "invalid".into(),
                })
                .inc();
            let problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            for p in &problems {
                tracing::error!(problem = %p, "new policy refused; the previous one keeps serving");
            }
            Err(problems)
        }
    }
}

/// Reloads on SIGHUP and when the policy file changes.
async fn watch_reloads(st: Shared, mut shutdown: watch::Receiver<bool>) {
    let Some(path) = st.config.policy_path.clone() else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(4);
    let _watcher = file_watcher(&path, tx.clone());
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<()>();
        tokio::select! {
            _ = hup_fut => {}
            Some(()) = rx.recv() => {}
            _ = shutdown.changed() => break,
        }
        let _ = reload_policy(&st);
    }
}

fn file_watcher(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<Box<dyn std::any::Any + Send>> {
    let target = path.canonicalize().ok()?;
    let dir = target.parent()?.to_path_buf();
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(200),
        None,
        move |res: notify_debouncer_full::DebounceEventResult| {
            if let Ok(events) = res
                && events.iter().any(|e| e.paths.iter().any(|p| p == &target))
            {
                let _ = tx.try_send(());
            }
        },
    )
    .ok()?;
    debouncer
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .ok()?;
    Some(Box::new(debouncer))
}

/// A database URL with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_host_is_what_the_client_would_write() {
        let host = |u: &str| upstream_host(&u.parse().expect("uri")).expect("host");
        assert_eq!(host("http://127.0.0.1:9000"), "127.0.0.1:9000");
        assert_eq!(host("http://api.internal"), "api.internal");
        assert_eq!(host("http://api.internal:80/prefix"), "api.internal");
        assert_eq!(host("http://[::1]:8080"), "[::1]:8080");
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("tollgate-data/tollgate.db"),
            "tollgate-data/tollgate.db"
        );
    }
}

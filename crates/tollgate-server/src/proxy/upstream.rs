//! The upstream leg of the proxy: HTTP/1.1 connections from hyper's
//! `client::conn::http1`, kept alive in a small pool, each driven by the task
//! of the request that uses it.
//!
//! hyper-util's pooled `Client` runs every connection as a task of its own:
//! a request is handed to that task over a channel, the answer's head and
//! every body chunk come back over channels, and a further task per
//! response waits to put the connection back into the pool. Each proxied
//! request so paid two or three cross-task wake-ups and a spawn, which
//! measured (callgrind, BENCHMARKS.md "Server: decision API and proxy",
//! third round) as the largest share of the proxy's own work. Here the
//! request's task polls the connection itself: while it waits for the head,
//! and then from the response body ([`UpstreamBody`] owns the connection
//! until the body ends). A connection whose body ended cleanly, and which
//! hyper reports ready for the next request, goes back to the pool; one
//! that broke, was cut short (client gone, timeout) or was closed by the
//! upstream is dropped, which closes it.
//!
//! HTTP parsing, keep-alive and connection state stay hyper's; address
//! resolution and connecting stay hyper-util's `HttpConnector`, and TLS to
//! an `https://` upstream rustls's (see [`UpstreamTls`]): hyper's HTTP/1.1
//! handshake then runs over the TLS stream, and the connection is pooled
//! like a plain one. What is ours is the list of idle connections: last in,
//! first out, at most `max_idle`, each closed after [`IDLE_TIMEOUT`] unused.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use super::tls::UpstreamTls;

/// How long a connection may sit unused in the pool.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Most idle connections kept (more in flight at once are closed when they
/// end instead of being kept).
pub const MAX_IDLE: usize = 1024;

/// What failed on the way to the upstream's answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No connection could be made (address, refusal, connect timeout, a
    /// failed TLS handshake).
    #[error("cannot connect to the upstream")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed (closed early, malformed answer, request body broke).
    #[error("upstream exchange failed")]
    Http(#[source] hyper::Error),
    /// No answer's head by the deadline (see [`UpstreamClient::send_or_replay_by`]).
    #[error("the upstream did not answer in time")]
    Timeout,
}

/// Sends requests to one upstream over pooled HTTP/1.1 connections.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
    base: Uri,
    connector: HttpConnector,
    /// TLS for an `https://` upstream; `None`: plain TCP.
    tls: Option<Arc<UpstreamTls>>,
    builder: http1::Builder,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("base", &self.base)
            .field("tls", &self.tls)
            .field("idle", &self.idle())
            .finish_non_exhaustive()
    }
}

struct Pool {
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// One HTTP/1.1 connection: where requests go in, and the future that does
/// its reading and writing (polled by whoever uses the connection). Boxed
/// where it is kept, so that it moves as a pointer.
struct Conn {
    send: http1::SendRequest<Body>,
    driver: http1::Connection<TokioIo<Counted>, Body>,
    /// Bytes read from the upstream so far (see [`Counted`]).
    read: Arc<AtomicU64>,
    /// The deadline of the exchange under way, kept with the connection and
    /// moved to each new deadline (see [`Deadline`]).
    timer: Option<Pin<Box<Sleep>>>,
}

/// The deadline of one exchange, on the connection's own timer.
///
/// A new tokio timer per request registers in the timer wheel when first
/// polled and is taken out again when dropped, each under the driver's lock.
/// A connection's timer outlives its exchanges instead: moving a timer that
/// is still registered to a later deadline (the next request's, as deadlines
/// only grow) is one atomic update, and the wheel only moves the entry when
/// the earlier deadline comes. Fires as `tokio::time::timeout` would: the
/// exchange is polled first, the timer only while it is pending.
struct Deadline<'a> {
    timer: Option<&'a mut Pin<Box<Sleep>>>,
}

/// A connection's `timer` set to `deadline` (none: no deadline).
fn deadline_of(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Option<Instant>) -> Deadline<'_> {
    let Some(at) = deadline else {
        return Deadline { timer: None };
    };
    let timer = match timer {
        Some(t) => {
            t.as_mut().reset(at);
            t
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(at))),
    };
    Deadline { timer: Some(timer) }
}

impl Deadline<'_> {
    /// `Ready` once the deadline has passed (never without one).
    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.timer {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// An exchange that failed before the answer's head.
struct Failed {
    error: hyper::Error,
    /// The request, when it was never written.
    unsent: Option<Request<Body>>,
    /// Whether any byte came back from the upstream during the exchange.
    answered: bool,
}

/// The methods a client may resend after a failure (RFC 9110 §9.2.2),
/// less TRACE (never proxied usefully).
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// The upstream socket, counting the bytes read from it (after TLS: bytes
/// of HTTP, not of handshakes or session tickets): an exchange that failed
/// with no byte of an answer read may be resent; one where the upstream
/// started answering never is. Only the task using the connection reads it,
/// so the count needs no read-modify-write.
struct Counted {
    stream: Stream,
    read: Arc<AtomicU64>,
}

/// Plain TCP, or TLS over it. An enum rather than a boxed trait object, so
/// that a plain connection's reads and writes stay direct calls; the TLS
/// state (rustls's buffers) is boxed, so that it does not grow every plain
/// connection.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let total = self.read.load(Ordering::Relaxed);
            self.read.store(total + n, Ordering::Relaxed);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Conn {
    fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Lets the connection read and write; `Ready` once it has closed or
    /// failed (either way it is done; a failure reaches the request or the
    /// body, which own the error).
    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.driver).poll(cx).map(|_| ())
    }

    /// Lets an idle connection notice a close or an answer it did not ask
    /// for, waking no one; `true` while it is still open.
    fn poll_idle(&mut self) -> bool {
        self.poll_done(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    }
}

impl UpstreamClient {
    /// A client for `base` (its scheme, host and port; any path is the
    /// caller's business), connecting with `connector` over plain TCP (for
    /// an `https://` base, add [`UpstreamClient::with_tls`]; `connector`
    /// must then not enforce `http://`).
    pub fn new(base: Uri, connector: HttpConnector) -> UpstreamClient {
        UpstreamClient::with_max_idle(base, connector, MAX_IDLE)
    }

    /// [`UpstreamClient::new`] keeping at most `max_idle` idle connections.
    pub fn with_max_idle(base: Uri, connector: HttpConnector, max_idle: usize) -> UpstreamClient {
        UpstreamClient {
            pool: Arc::new(Pool {
                idle: Mutex::new(VecDeque::new()),
                max_idle,
            }),
            base,
            connector,
            tls: None,
            builder: http1::Builder::new(),
        }
    }

    /// The same client with every new connection secured by `tls` (the
    /// handshake is part of connecting, within the same deadline; one that
    /// fails is [`UpstreamError::Connect`]).
    pub fn with_tls(mut self, tls: UpstreamTls) -> UpstreamClient {
        self.tls = Some(Arc::new(tls));
        self
    }

    /// Idle connections in the pool.
    pub fn idle(&self) -> usize {
        self.pool.lock().len()
    }

    /// Closes the connections idle for [`IDLE_TIMEOUT`] or more by `now`.
    pub fn sweep(&self, now: Instant) {
        let expired = self.pool.take_expired(now);
        drop(expired);
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the answer's
    /// head; the body streams from the upstream as it is read, over the
    /// connection the body keeps until it ends.
    ///
    /// A pooled connection that turns out closed before the request was
    /// written is replaced by a new one, once. (See
    /// [`UpstreamClient::send_or_replay`] to also resend a request that was
    /// written.)
    ///
    /// # Errors
    /// No connection could be made, or the exchange failed before the head.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.send_or_replay(req, || None).await
    }

    /// [`UpstreamClient::send`], and when the request was written on a
    /// reused pooled connection that failed before a single byte of an
    /// answer came back (the upstream closed it as the request arrived: the
    /// keep-alive race), the request is sent once more on a new connection
    /// if that is safe: its method is idempotent (GET, HEAD, OPTIONS, PUT,
    /// DELETE) and `again` can build it anew (its body empty or buffered;
    /// `None` for a body that streamed and cannot be replayed). This is
    /// what browsers and mature proxies do; the upstream may then see an
    /// idempotent request twice, which is what idempotent means.
    ///
    /// # Errors
    /// No connection could be made, or the exchange failed before the head.
    pub async fn send_or_replay(
        &self,
        req: Request<Body>,
        again: impl FnOnce() -> Option<Request<Body>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.send_within(req, again, Instant::now(), None).await
    }

    /// [`UpstreamClient::send_or_replay`] with the answer's head due by
    /// `deadline` (connecting, the exchange and a resend included), as
    /// `tokio::time::timeout_at(deadline, send_or_replay(…))` would; past it,
    /// [`UpstreamError::Timeout`], and the connection is closed. `now` is
    /// the caller's reading of the clock (tokio's), taken just before: the
    /// pool measures its idle connections' ages from it instead of reading
    /// the clock once more.
    ///
    /// # Errors
    /// No connection could be made, the exchange failed before the head, or
    /// the head did not come in time.
    pub async fn send_or_replay_by(
        &self,
        req: Request<Body>,
        again: impl FnOnce() -> Option<Request<Body>>,
        now: Instant,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.send_within(req, again, now, Some(deadline)).await
    }

    async fn send_within(
        &self,
        req: Request<Body>,
        again: impl FnOnce() -> Option<Request<Body>>,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        // Connecting is boxed where awaited: its future (the connector's
        // resolution and handshake) is large and rarely used, and this
        // future is moved whole into the caller's timeout per request.
        let (conn, reused) = match self.checkout(now) {
            Some(c) => (c, true),
            None => (Box::pin(self.connect_by(deadline)).await?, false),
        };
        let idempotent = is_idempotent(req.method());
        let failed = match self.exchange(conn, req, deadline).await {
            Ok(r) => return Ok(r),
            Err(None) => return Err(UpstreamError::Timeout),
            Err(Some(f)) => f,
        };
        let req = match failed.unsent {
            // Never written: always safe to send elsewhere.
            Some(req) if reused => req,
            None if reused && !failed.answered && idempotent => match again() {
                Some(req) => req,
                None => return Err(UpstreamError::Http(failed.error)),
            },
            _ => return Err(UpstreamError::Http(failed.error)),
        };
        tracing::debug!(error = %failed.error, "pooled upstream connection was closed; resending on a new one");
        let conn = Box::pin(self.connect_by(deadline)).await?;
        self.exchange(conn, req, deadline)
            .await
            .map_err(|f| f.map_or(UpstreamError::Timeout, |f| UpstreamError::Http(f.error)))
    }

    /// Connects, within `deadline` if there is one.
    async fn connect_by(&self, deadline: Option<Instant>) -> Result<Box<Conn>, UpstreamError> {
        match deadline {
            Some(at) => tokio::time::timeout_at(at, self.connect())
                .await
                .unwrap_or(Err(UpstreamError::Timeout)),
            None => self.connect().await,
        }
    }

    /// Sends `req` on `conn`, polling the connection until the head comes;
    /// `Err(None)` when `deadline` came first.
    async fn exchange(
        &self,
        conn: Box<Conn>,
        req: Request<Body>,
        deadline: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, Option<Failed>> {
        let read_before = conn.bytes_read();
        let mut conn = conn;
        let mut answer = pin!(conn.send.try_send_request(req));
        // The connection's timer, taken for the exchange (the connection may
        // be dropped before the answer comes) and given back with it.
        let mut timer = conn.timer.take();
        let mut due = deadline_of(&mut timer, deadline);
        let mut conn = Some(conn);
        // Bytes read by the time the connection finished (it is dropped
        // then: a request it never took comes back through `answer`).
        let mut read_at_end = None;
        let mut woken = false;
        let head = std::future::poll_fn(|cx| {
            let polled = 'poll: {
                let mut idle = Context::from_waker(Waker::noop());
                let Some(c) = conn.as_mut() else {
                    break 'poll answer.as_mut().poll(cx);
                };
                // Woken again: the answer has most likely arrived. It is read
                // first with a waker that wakes no one: the wakers the
                // connection registers while it reads the answer stay with it,
                // and hyper's body channel wakes its sender's waker when the
                // body's first chunk is taken, which would otherwise poll this
                // task once more for nothing. If that read leaves the answer
                // pending, the connection is polled again with `cx` below, so
                // that the socket wakes this task (tokio remembers the socket
                // is not readable: no second read).
                let done = if woken {
                    if c.poll_done(&mut idle).is_ready() {
                        true
                    } else if let Poll::Ready(head) = answer.as_mut().poll(&mut idle) {
                        break 'poll Poll::Ready(head);
                    } else {
                        // The connection first: it writes the request and reads
                        // the head, which is the only way `answer` can complete;
                        // so `answer` needs no waker of its own (that would
                        // wake this task a second time for the same event).
                        c.poll_done(cx).is_ready()
                    }
                } else {
                    woken = true;
                    c.poll_done(cx).is_ready()
                };
                if done {
                    read_at_end = Some(c.bytes_read());
                    conn = None;
                    break 'poll answer.as_mut().poll(cx);
                }
                answer.as_mut().poll(&mut idle)
            };
            // As `tokio::time::timeout`: the exchange first, the timer only
            // while the exchange is pending.
            if polled.is_pending() && due.poll_elapsed(cx).is_ready() {
                return Poll::Ready(None);
            }
            polled.map(Some)
        })
        .await;
        let Some(head) = head else {
            // Too late: the connection closes (dropped), its request unanswered.
            return Err(None);
        };
        match head {
            Ok(resp) => {
                if let Some(c) = conn.as_mut() {
                    c.timer = timer;
                }
                Ok(resp.map(|body| UpstreamBody {
                    body,
                    conn,
                    pool: Arc::clone(&self.pool),
                }))
            }
            Err(mut e) => {
                let unsent = e.take_message();
                let read = read_at_end.or(conn.as_ref().map(|c| c.bytes_read()));
                Err(Some(Failed {
                    error: e.into_error(),
                    unsent,
                    answered: read != Some(read_before),
                }))
            }
        }
    }

    /// The most recently used idle connection still open, if any, by `now`
    /// (a recent reading of the clock).
    fn checkout(&self, now: Instant) -> Option<Box<Conn>> {
        loop {
            let idle = self.pool.lock().pop_back()?;
            if now.saturating_duration_since(idle.since) >= IDLE_TIMEOUT {
                // The newest is too old: so are all the others.
                drop(self.pool.take_expired(now));
                return None;
            }
            // Not polled here: whether the upstream closed it while it sat
            // idle (or sent something unasked) is seen by the exchange's
            // first poll, before the request is written, which then hands
            // the request back unsent and it goes on a new connection
            // (`send_or_replay`). Polling here as well cost a whole pass of
            // hyper's dispatcher per request.
            if idle.conn.send.is_ready() {
                return Some(idle.conn);
            }
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, UpstreamError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.base.clone())
            .await
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        let stream = match &self.tls {
            None => Stream::Plain(io.into_inner()),
            Some(tls) => Stream::Tls(Box::new(
                tls.handshake(io.into_inner())
                    .await
                    .map_err(|e| UpstreamError::Connect(Box::new(e)))?,
            )),
        };
        let read = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(Counted {
            stream,
            read: Arc::clone(&read),
        });
        let (send, driver) = self
            .builder
            .handshake(io)
            .await
            .map_err(UpstreamError::Http)?;
        Ok(Box::new(Conn {
            send,
            driver,
            read,
            timer: None,
        }))
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // A panic while holding the lock leaves a valid list.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a connection back, newest last; the oldest goes if the pool is full.
    fn put(&self, conn: Box<Conn>) {
        let since = Instant::now();
        let (expired, over) = {
            let mut idle = self.lock();
            let expired = take_expired(&mut idle, since);
            idle.push_back(Idle { conn, since });
            let over = if idle.len() > self.max_idle {
                idle.pop_front()
            } else {
                None
            };
            (expired, over)
        };
        // Closed outside the lock.
        drop((expired, over));
    }

    fn take_expired(&self, now: Instant) -> Vec<Idle> {
        take_expired(&mut self.lock(), now)
    }
}

/// Removes the connections idle for [`IDLE_TIMEOUT`] by `now` (the oldest
/// are at the front).
fn take_expired(idle: &mut VecDeque<Idle>, now: Instant) -> Vec<Idle> {
    // Usually none: the oldest alone tells, without counting or collecting.
    if idle
        .front()
        .is_none_or(|i| now.saturating_duration_since(i.since) < IDLE_TIMEOUT)
    {
        return Vec::new();
    }
    let n = idle
        .iter()
        .take_while(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT)
        .count();
    idle.drain(..n).collect()
}

/// An upstream answer's body; it drives its connection while it is read and
/// returns it to the pool when it ends cleanly.
pub struct UpstreamBody {
    body: Incoming,
    /// The connection, until it is done, back in the pool, or dropped.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("body", &self.body)
            .field("driving", &self.conn.is_some())
            .finish()
    }
}

impl UpstreamBody {
    /// The body has ended cleanly: the connection goes back to the pool if
    /// hyper has it ready for the next request.
    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Usually the pass of hyper's dispatcher that read the body's end
        // has gone on to ask for the next request already: the connection
        // is ready, and another pass (one read of the socket, which would
        // find nothing) is not needed. A close the upstream sends later is
        // seen at checkout, as for any connection that sat idle (the
        // exchange's first poll hands the request back unsent).
        if conn.send.is_ready() || (conn.poll_idle() && conn.send.is_ready()) {
            self.pool.put(conn);
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = match &mut this.conn {
            // Only the connection feeds the body: what it has read already
            // is taken without polling it; otherwise it is polled (with
            // `cx`, so that the socket wakes this task) and the body looked
            // at again. The body itself needs no waker while the connection
            // is driven from here.
            Some(conn) => {
                let mut idle = Context::from_waker(Waker::noop());
                match Pin::new(&mut this.body).poll_frame(&mut idle) {
                    Poll::Pending => {
                        if conn.poll_done(cx).is_ready() {
                            this.conn = None;
                            Pin::new(&mut this.body).poll_frame(cx)
                        } else {
                            Pin::new(&mut this.body).poll_frame(&mut idle)
                        }
                    }
                    ready => ready,
                }
            }
            None => Pin::new(&mut this.body).poll_frame(cx),
        };
        match frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing left (an empty one is never read) still hands
        // its connection back; one dropped unfinished closes it.
        if self.conn.is_some() && self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::StreamExt as _;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::service::service_fn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    type Answer = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

    /// An HTTP/1.1 upstream on a free port answering with `answer`; counts
    /// the connections it accepted.
    async fn upstream<F, Fut>(answer: F) -> (Uri, Arc<AtomicUsize>)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Answer> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let answer = answer.clone();
                        async move { Ok::<_, Infallible>(answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}").parse().expect("uri"), accepted)
    }

    fn text(s: &'static str) -> Answer {
        Response::new(
            http_body_util::Full::new(Bytes::from_static(s.as_bytes()))
                .map_err(|e| match e {})
                .boxed(),
        )
    }

    fn client(base: Uri, max_idle: usize) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        UpstreamClient::with_max_idle(base, http, max_idle)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header(http::header::HOST, "upstream")
            .body(Body::empty())
            .expect("request")
    }

    async fn read(resp: Response<UpstreamBody>) -> Bytes {
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (base, accepted) = upstream(|req: Request<Incoming>| async move {
            assert_eq!(req.uri().path(), "/a");
            text("hello")
        })
        .await;
        let c = client(base, MAX_IDLE);
        for _ in 0..5 {
            let resp = c.send(get("/a")).await.expect("answer");
            assert_eq!(resp.status(), 200);
            assert_eq!(read(resp).await, "hello");
            assert_eq!(c.idle(), 1, "back in the pool once its body ended");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn empty_body_hands_the_connection_back_unread() {
        let (base, accepted) = upstream(|_| async { text("") }).await;
        let c = client(base, MAX_IDLE);
        for _ in 0..3 {
            let resp = c.send(get("/")).await.expect("answer");
            assert!(resp.body().is_end_stream());
            drop(resp);
        }
        assert_eq!(c.idle(), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn body_is_driven_by_its_reader_and_streams() {
        // The second chunk is sent only after the reader has the first: the
        // connection must be polled from the body, there is no other task.
        let go = Arc::new(Notify::new());
        let signal = Arc::clone(&go);
        let (base, _) = upstream(move |_| {
            let go = Arc::clone(&signal);
            async move {
                let chunks = futures_util::stream::unfold(0, move |i| {
                    let go = Arc::clone(&go);
                    async move {
                        match i {
                            0 => Some((
                                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"one"))),
                                1,
                            )),
                            1 => {
                                go.notified().await;
                                Some((Ok(Frame::data(Bytes::from_static(b"two"))), 2))
                            }
                            _ => None,
                        }
                    }
                });
                Response::new(BodyExt::boxed(StreamBody::new(chunks)))
            }
        })
        .await;
        let c = client(base, MAX_IDLE);
        let mut body = c.send(get("/")).await.expect("answer").into_body();
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "one");
        go.notify_one();
        let second = body.frame().await.expect("frame").expect("data");
        assert_eq!(second.into_data().expect("data"), "two");
        assert!(body.frame().await.is_none());
        assert_eq!(c.idle(), 1);
    }

    #[tokio::test]
    async fn unfinished_body_closes_its_connection() {
        let (base, accepted) = upstream(|_| async {
            let chunks = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                Bytes::from_static(b"a"),
            ))])
            .chain(futures_util::stream::pending());
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        })
        .await;
        let c = client(base, MAX_IDLE);
        let mut body = c.send(get("/")).await.expect("answer").into_body();
        assert!(body.frame().await.is_some());
        drop(body);
        assert_eq!(c.idle(), 0, "a cut-short connection is not reused");
        let mut body = c.send(get("/")).await.expect("answer").into_body();
        assert!(body.frame().await.is_some());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn request_body_streams_to_the_upstream() {
        let (base, _) = upstream(|req: Request<Incoming>| async move {
            let got = req.into_body().collect().await.expect("body").to_bytes();
            let mut r = text("");
            *r.body_mut() = http_body_util::Full::new(Bytes::from(got.len().to_string()))
                .map_err(|e| match e {})
                .boxed();
            r
        })
        .await;
        let c = client(base, MAX_IDLE);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                tx.send(Ok(Bytes::from(vec![b'x'; 1000])))
                    .await
                    .expect("send");
            }
        });
        let req = Request::post("/upload")
            .header(http::header::HOST, "upstream")
            .body(Body::from_stream(tokio_stream_of(rx)))
            .expect("request");
        let resp = c.send(req).await.expect("answer");
        assert_eq!(read(resp).await, "100000");
        feeder.await.expect("feeder");
    }

    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn connection_closed_by_the_upstream_is_replaced() {
        // A raw upstream that answers one request per connection, keeps the
        // connection "alive" in its headers, then closes it.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = stream.shutdown().await;
            }
        });
        let c = client(format!("http://{addr}").parse().expect("uri"), MAX_IDLE);
        for _ in 0..3 {
            let resp = c.send(get("/")).await.expect("answer");
            assert_eq!(read(resp).await, "ok");
            // The close reaches this side before the next checkout, which
            // must see that the pooled connection is gone and not use it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A raw upstream that answers the first request of each connection
    /// with keep-alive, then closes the connection as soon as the next
    /// request's head arrives (the keep-alive race, made certain). Returns
    /// its address and the request lines it received, answered or not.
    async fn closing_upstream() -> (Uri, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    for answered in [true, false] {
                        let Some(line) = read_head(&mut stream).await else {
                            return;
                        };
                        log.lock().expect("log").push(line);
                        if answered {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                    // Dropped: closed with the second request unanswered.
                });
            }
        });
        (format!("http://{addr}").parse().expect("uri"), seen)
    }

    /// Reads one request head (and nothing of its body); its first line.
    async fn read_head(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(stream, &mut byte)
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        text.lines().next().map(str::to_owned)
    }

    fn post(path: &str, body: &'static str) -> Request<Body> {
        Request::post(path)
            .header(http::header::HOST, "upstream")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .expect("request")
    }

    #[tokio::test]
    async fn idempotent_request_lost_by_a_pooled_connection_is_resent_once() {
        let (base, seen) = closing_upstream().await;
        let c = client(base, MAX_IDLE);
        for i in 0..4 {
            let resp = c
                .send_or_replay(get("/g"), || Some(get("/g")))
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
            assert_eq!(read(resp).await, "ok");
        }
        // The first on a new connection; each later one lost once on the
        // reused connection, then answered on a new one.
        assert_eq!(seen.lock().expect("log").len(), 1 + 3 * 2);
        // Without a way to build it again, the loss is the caller's.
        let err = c.send(get("/g")).await.expect_err("lost");
        assert!(matches!(err, UpstreamError::Http(_)), "{err:?}");
    }

    #[tokio::test]
    async fn non_idempotent_request_written_on_a_pooled_connection_is_never_resent() {
        let (base, seen) = closing_upstream().await;
        let c = client(base, MAX_IDLE);
        let resp = c.send(get("/warm")).await.expect("answer");
        assert_eq!(read(resp).await, "ok");
        assert_eq!(c.idle(), 1);
        let mut rebuilt = false;
        let err = c
            .send_or_replay(post("/pay", "x"), || {
                rebuilt = true;
                Some(post("/pay", "x"))
            })
            .await
            .expect_err("lost, not resent");
        assert!(matches!(err, UpstreamError::Http(_)), "{err:?}");
        assert!(!rebuilt, "a POST is never built again");
        let posts = seen
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.starts_with("POST"))
            .count();
        assert_eq!(posts, 1);
    }

    #[tokio::test]
    async fn request_answered_in_part_is_not_resent() {
        // The upstream starts an answer and then closes: bytes came back,
        // so even a GET is not sent again.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    if read_head(&mut stream).await.is_none() {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    if read_head(&mut stream).await.is_none() {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(b"HTTP/1.1 200 O").await;
                });
            }
        });
        let c = client(format!("http://{addr}").parse().expect("uri"), MAX_IDLE);
        let resp = c.send(get("/")).await.expect("answer");
        assert_eq!(read(resp).await, "ok");
        let err = c
            .send_or_replay(get("/"), || Some(get("/")))
            .await
            .expect_err("cut short");
        assert!(matches!(err, UpstreamError::Http(_)), "{err:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn request_on_a_connection_closed_before_it_was_written_comes_back() {
        // The upstream closes each connection at once. A request sent on a
        // connection whose close arrives before the request is written
        // must come back unsent at once (the connection is dropped when it
        // ends), not wait for an answer that cannot come.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let c = client(format!("http://{addr}").parse().expect("uri"), MAX_IDLE);
        let conn = c.connect().await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let failed = tokio::time::timeout(Duration::from_secs(5), c.exchange(conn, get("/"), None))
            .await
            .expect("no hang")
            .expect_err("closed")
            .expect("failed, not timed out");
        assert!(failed.unsent.is_some(), "{:?}", failed.error);
        assert!(!failed.answered);
    }

    #[tokio::test]
    async fn answer_with_connection_close_is_not_pooled() {
        let (base, accepted) = upstream(|_| async {
            let mut r = text("bye");
            r.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            r
        })
        .await;
        let c = client(base, MAX_IDLE);
        for _ in 0..2 {
            let resp = c.send(get("/")).await.expect("answer");
            assert_eq!(read(resp).await, "bye");
            assert_eq!(c.idle(), 0);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn pool_keeps_at_most_max_idle_and_expires_them() {
        let (base, accepted) = upstream(|_| async { text("x") }).await;
        let c = client(base, 2);
        // Four at once: four connections; two are kept when they end.
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(c.send(get("/")).await.expect("answer"));
        }
        for resp in answers {
            assert_eq!(read(resp).await, "x");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(c.idle(), 2);
        c.sweep(Instant::now());
        assert_eq!(c.idle(), 2, "not idle long enough to expire");
        c.sweep(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(c.idle(), 0);
        let resp = c.send(get("/")).await.expect("answer");
        assert_eq!(read(resp).await, "x");
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    /// The pool measures its idle connections' ages from the caller's
    /// reading of the clock (`send_or_replay_by`'s `now`), not a reading of
    /// its own.
    #[tokio::test]
    async fn checkout_measures_idle_ages_from_the_callers_reading() {
        let (base, accepted) = upstream(|_| async { text("x") }).await;
        let c = client(base, MAX_IDLE);
        let resp = c.send(get("/")).await.expect("answer");
        assert_eq!(read(resp).await, "x");
        assert_eq!(c.idle(), 1);
        let send_at = |now: Instant| {
            let c = c.clone();
            async move {
                let far = now + Duration::from_secs(3_600);
                let resp = c
                    .send_or_replay_by(get("/"), || None, now, far)
                    .await
                    .expect("answer");
                assert_eq!(read(resp).await, "x");
            }
        };
        // Idle for just under the timeout by that reading: reused.
        send_at(Instant::now() + IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused");
        // Past it by that reading: expired, and a new connection is made.
        send_at(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1)).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "expired by the caller's reading"
        );
        assert_eq!(c.idle(), 1, "the new one is pooled, the expired one closed");
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let c = client(format!("http://{addr}").parse().expect("uri"), MAX_IDLE);
        let err = c.send(get("/")).await.expect_err("refused");
        assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");
    }

    #[tokio::test]
    async fn deadlines_on_the_connection_timer_time_out_like_tokio_timeout() {
        // `/slow` answers after 300 ms, anything else at once.
        let (base, accepted) = upstream(|req: Request<Incoming>| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            text("ok")
        })
        .await;
        let c = client(base, MAX_IDLE);
        let within = |ms| Instant::now() + Duration::from_millis(ms);
        let send = |path: &'static str, ms| {
            let c = c.clone();
            async move {
                c.send_or_replay_by(get(path), || None, Instant::now(), within(ms))
                    .await
            }
        };
        // The timer of one connection, moved to each new deadline: later
        // ones (extended in place), after the earlier one has passed while
        // the connection sat idle (registered again), and shorter ones.
        for (wait, ms) in [
            (0, 100),
            (0, 100),
            (150, 100),
            (0, 5_000),
            (0, 100),
            (120, 50),
        ] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let resp = send("/fast", ms).await.expect("in time");
            assert_eq!(read(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
        // Too slow: timed out at its deadline, and the connection closed.
        let t0 = Instant::now();
        let err = send("/slow", 100).await.expect_err("too slow");
        let took = t0.elapsed();
        assert!(matches!(err, UpstreamError::Timeout), "{err:?}");
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_millis(290),
            "{took:?}"
        );
        assert_eq!(c.idle(), 0, "a timed-out connection is not reused");
        // A deadline that has passed already: the exchange is polled first
        // (it cannot have its answer yet), then the timer, as
        // `tokio::time::timeout` does.
        let past = Instant::now() - Duration::from_secs(1);
        let err = c
            .send_or_replay_by(get("/fast"), || None, Instant::now(), past)
            .await
            .expect_err("past");
        assert!(matches!(err, UpstreamError::Timeout), "{err:?}");
        // Connecting counts too: none of this is left over for the next one.
        let resp = send("/fast", 1_000).await.expect("in time");
        assert_eq!(read(resp).await, "ok");
        let resp = send("/slow", 1_000).await.expect("in time");
        assert_eq!(read(resp).await, "ok");
    }
}

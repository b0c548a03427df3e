//! Connection-level defences of every listener (RELIABILITY-PLAN E1, E2, E5, E6).
//!
//! hyper parses HTTP/1 and HTTP/2 (h2c, with prior knowledge, on the same
//! port); this module bounds what a hostile client can hold:
//!
//! - **Open connections**: a [`Gate`] of `max_connections` permits per
//!   listener. A connection beyond it is closed as soon as it is accepted, so
//!   file descriptors never run out (the cap is also clamped to what
//!   `ulimit -n` allows, see [`effective_max_connections`]).
//! - **Silent and idle connections**: a new connection must send its first
//!   byte within `header_read_timeout`; hyper's HTTP/1 header timer then
//!   covers the headers and every keep-alive wait for the next request.
//! - **Slow bodies**: a request body must keep arriving (`body_read_timeout`
//!   between two pieces) and be complete within `body_timeout`; beyond either
//!   the request is answered 408 and the connection closed ([`guard_body`]).
//! - **Slow reads**: a response write that stays blocked (the client does
//!   not read) for `send_timeout` fails and the connection is closed
//!   ([`io`]).
//! - **Long request targets**: a path and query longer than
//!   [`MAX_REQUEST_TARGET`] (8 KiB, nginx's default line buffer) is answered
//!   414 and, on HTTP/1, the connection closed ([`uri_too_long_response`]);
//!   hyper alone accepts up to 64 KiB and tollgate would forward it.
//! - **HTTP/2**: at most [`MAX_CONCURRENT_STREAMS`] streams per connection,
//!   advertised in SETTINGS; hyper/h2 answer rapid resets and stream floods
//!   with GOAWAY (their defaults, which we keep).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutWriter;

use crate::config::ServerConfig;
use crate::error::ApiError;

/// `SETTINGS_MAX_CONCURRENT_STREAMS` advertised on every HTTP/2 connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;

/// Longest path and query (bytes) a request may carry; longer gets 414.
pub const MAX_REQUEST_TARGET: usize = 8 * 1024;

/// Whether `uri`'s path and query exceed [`MAX_REQUEST_TARGET`].
pub fn target_too_long(uri: &axum::http::Uri) -> bool {
    uri.path_and_query()
        .is_some_and(|pq| pq.as_str().len() > MAX_REQUEST_TARGET)
}

/// The 414 answer to a request whose target is too long; on HTTP/1 it
/// closes the connection (the request's body is never read).
pub fn uri_too_long_response(http1: bool) -> Response {
    let mut resp = ApiError::new(
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
        "the request target is longer than 8 KiB",
    )
    .into_response();
    if http1 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Open connections allowed on the admin listener (apart from the proxy's
/// cap, so a flood on the proxy never locks operators out).
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// File descriptors kept aside from the connection cap (database, store,
/// listeners, logs).
const RESERVED_FDS: usize = 128;

/// The timeouts and cap of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// First byte and request headers; idle keep-alive wait.
    pub header_read_timeout: Duration,
    /// A whole request, until its response starts.
    pub request_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_read_timeout: Duration,
    /// Longest time to receive a whole request body.
    pub body_timeout: Duration,
    /// Longest a response write may stay blocked.
    pub send_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
}

impl ConnLimits {
    /// The proxy listener's limits.
    pub fn proxy(config: &ServerConfig) -> ConnLimits {
        ConnLimits {
            header_read_timeout: config.header_read_timeout,
            request_timeout: config.request_timeout,
            body_read_timeout: config.body_read_timeout,
            body_timeout: config.body_timeout,
            send_timeout: config.send_timeout,
            max_connections: effective_max_connections(config.max_connections),
        }
    }

    /// The admin listener's limits: the proxy's timeouts, its own small cap.
    pub fn admin(config: &ServerConfig) -> ConnLimits {
        ConnLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..ConnLimits::proxy(config)
        }
    }
}

/// The cap on a listener's open connections.
#[derive(Debug, Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    max: usize,
    open: Option<Gauge>,
    refused: Option<Counter>,
}

/// An admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    open: Option<Gauge>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

impl Gate {
    /// A gate of `max` places, optionally reported as metrics.
    pub fn new(max: usize, metrics: Option<(Gauge, Counter)>) -> Gate {
        let (open, refused) = metrics.unzip();
        Gate {
            permits: Arc::new(Semaphore::new(max)),
            max,
            open,
            refused,
        }
    }

    /// A place for a new connection, or `None` when every place is taken
    /// (the caller closes the connection).
    pub fn admit(&self) -> Option<Admitted> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                if let Some(g) = &self.open {
                    g.inc();
                }
                Some(Admitted {
                    _permit: permit,
                    open: self.open.clone(),
                })
            }
            Err(_) => {
                if let Some(c) = &self.refused {
                    c.inc();
                }
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// Waits until a new connection sends its first byte (or closes); `false`
/// if it stays silent for `timeout`. hyper's auto (HTTP/1 or HTTP/2)
/// builder reads the first bytes to pick the protocol without any timer, so
/// without this a silent connection would be held forever.
pub async fn first_byte(stream: &TcpStream, timeout: Duration) -> bool {
    // `peek` (not `readable`, which may wake spuriously) waits for real data.
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut first)).await,
        Ok(Ok(1..))
    )
}

/// The connection's I/O for hyper: writes that stay blocked for
/// `send_timeout` (the client stopped reading) fail, and hyper closes the
/// connection.
pub fn io(
    stream: TcpStream,
    send_timeout: Duration,
) -> TokioIo<Pin<Box<TimeoutWriter<TcpStream>>>> {
    let mut w = TimeoutWriter::new(stream);
    w.set_timeout(Some(send_timeout));
    TokioIo::new(Box::pin(w))
}

/// The body every listener answers with: a `/v1/check` answer's bytes as they
/// are ([`crate::check::answer_whole`]: not boxed), the upstream's body of a
/// proxied answer as it is (not boxed, see [`crate::proxy::handle_direct`]),
/// or any other answer's axum body.
pub type ResponseBody = http_body_util::Either<
    http_body_util::Either<http_body_util::Full<Bytes>, crate::proxy::UpstreamBody>,
    Body,
>;

/// `body` as an axum body (boxed unless it is one already).
pub fn boxed(body: ResponseBody) -> Body {
    use http_body_util::Either;
    match body {
        Either::Left(Either::Left(whole)) => Body::new(whole),
        Either::Left(Either::Right(upstream)) => Body::new(upstream),
        Either::Right(body) => body,
    }
}

/// A request body's first frame, if it had come already.
pub type FirstFrame = Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>;

/// What one poll of a request body found ([`poll_first`]).
#[derive(Debug)]
pub enum First {
    /// The whole body, in one frame of its announced length (or nothing, when
    /// the body ended at once).
    Whole(Bytes),
    /// A frame (or an error) that is not the whole body: hand it to
    /// [`guard_body`], which gives it back before the rest.
    Taken(FirstFrame),
    /// Nothing had come yet; nothing was taken.
    Pending,
}

/// Polls `body`, which announced `len` bytes, once without waiting: the whole
/// body when it came in one frame with the headers (the usual small JSON
/// body), so it is served without a guard, a timer or a copy.
pub async fn poll_first(body: &mut hyper::body::Incoming, len: u64) -> First {
    let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
    match polled {
        Poll::Pending => First::Pending,
        Poll::Ready(None) => First::Whole(Bytes::new()),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if data.len() as u64 == len && body.is_end_stream() => First::Whole(data),
            Ok(data) => First::Taken(Some(Ok(hyper::body::Frame::data(data)))),
            Err(frame) => First::Taken(Some(Ok(frame))),
        },
        Poll::Ready(Some(Err(e))) => First::Taken(Some(Err(e))),
    }
}

/// `fut` within `limit`: `Err` when it has not finished by then. The future is
/// polled once first; the timer is set only if it then waits, so a request
/// answered in its first poll (a check on the in-memory store) never touches
/// the timer wheel. The limit counts from that first wait, a poll later than
/// `tokio::time::timeout` would count it (a poll never blocks). `fut` is
/// pinned by the caller, so a large future is not moved.
pub async fn within<F: Future>(
    limit: Duration,
    mut fut: Pin<&mut F>,
) -> Result<F::Output, RequestTimeout> {
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Ok(out);
    }
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| RequestTimeout)
}

/// The request timeout's timer of one connection, kept between its requests.
///
/// A new tokio timer per request (`tokio::time::timeout`) registers in the
/// timer wheel when first polled and is taken out again when dropped, each
/// under the timer driver's lock. This one outlives the request: the next
/// request moves it to its own deadline with `Sleep::reset`, which for a
/// timer still registered and a later deadline (as deadlines on one HTTP/1
/// connection only grow) is one atomic update; the wheel moves the entry
/// only when the earlier deadline comes (as the upstream's
/// `proxy::upstream::Deadline` does). Concurrent requests (HTTP/2 streams)
/// that find it taken get a timer of their own, as before.
#[derive(Default)]
pub struct RequestTimer {
    kept: Kept<Pin<Box<tokio::time::Sleep>>>,
}

/// One value a connection keeps between its requests (or heads) for reuse.
struct Kept<T>(std::sync::Mutex<Option<T>>);

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept(std::sync::Mutex::new(None))
    }
}

impl<T> Kept<T> {
    /// The kept value, if any (none is kept after this).
    fn take(&self) -> Option<T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Keeps `value` for the next use (if no other is kept).
    fn give_back(&self, value: T) {
        let mut kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.is_none() {
            *kept = Some(value);
        }
    }

    #[cfg(test)]
    fn is_some(&self) -> bool {
        self.0.lock().expect("lock").is_some()
    }
}

impl std::fmt::Debug for RequestTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTimer").finish_non_exhaustive()
    }
}

impl RequestTimer {
    /// The kept timer moved to `deadline`, or a new one.
    fn take(&self, deadline: tokio::time::Instant) -> Pin<Box<tokio::time::Sleep>> {
        match self.kept.take() {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Keeps `timer` for the next request (if no other is kept).
    fn give_back(&self, timer: Pin<Box<tokio::time::Sleep>>) {
        self.kept.give_back(timer);
    }

    /// `fut` within `limit` (counted from now), as
    /// `tokio::time::timeout(limit, fut)`: the future is polled first and the
    /// timer only while it is pending; `Err` once the limit has passed.
    ///
    /// # Errors
    /// [`RequestTimeout`] when `fut` has not finished within `limit`.
    pub async fn within<F: Future>(
        &self,
        limit: Duration,
        fut: F,
    ) -> Result<F::Output, RequestTimeout> {
        let now = tokio::time::Instant::now();
        // As tokio's `sleep`: a limit too far to represent is "never".
        let deadline = now
            .checked_add(limit)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        let mut timer = self.take(deadline);
        let mut fut = std::pin::pin!(fut);
        let out = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            timer.as_mut().poll(cx).map(|()| Err(RequestTimeout))
        })
        .await;
        self.give_back(timer);
        out
    }
}

/// hyper's timer for the header reads of one HTTP/1 connection.
///
/// hyper arms its `header_read_timeout` afresh for every request head: with
/// `hyper_util`'s `TokioTimer` that is a new boxed tokio timer per request,
/// registered in the timer wheel while hyper waits for the head and taken
/// out again when the head has arrived (about 1.6k instructions a request,
/// `BENCHMARKS.md` "check11"). This timer hands out the connection's one
/// kept tokio timer instead ([`HeadSlot`]), and moves it lazily: heads on
/// one connection come one after another, so each deadline is later than
/// the last, and the kept timer, still registered at an earlier deadline,
/// is left there. When that earlier deadline comes, the wheel wakes the
/// connection's task; a head still being read then moves the timer to its
/// own deadline (or times out if that has passed too), and anything else
/// ignores the wake-up. A head that is polled again by the same task while
/// the timer has not fired costs a comparison: the tokio timer already
/// holds that task's waker (about 0.7k instructions a request otherwise,
/// `BENCHMARKS.md` "check12").
#[derive(Clone, Default)]
pub struct HeaderTimer {
    slot: Arc<HeadSlot>,
}

impl std::fmt::Debug for HeaderTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderTimer").finish_non_exhaustive()
    }
}

/// Where a [`HeaderTimer`] keeps its tokio timer between heads.
#[derive(Default)]
struct HeadSlot {
    kept: Kept<KeptSleep>,
}

/// The kept tokio timer, and the waker it was last polled with (so it holds
/// that waker while it has not fired).
struct KeptSleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
    waker: Option<std::task::Waker>,
}

impl HeadSlot {
    /// The kept timer, registered no later than `deadline`, or a new one.
    fn take(&self, deadline: tokio::time::Instant) -> KeptSleep {
        match self.kept.take() {
            // Left at its earlier deadline (see `HeldSleep::poll`).
            Some(kept) if kept.sleep.deadline() <= deadline => kept,
            Some(mut kept) => {
                kept.sleep.as_mut().reset(deadline);
                kept.waker = None;
                kept
            }
            None => KeptSleep {
                sleep: Box::pin(tokio::time::sleep_until(deadline)),
                waker: None,
            },
        }
    }

    /// Keeps `timer` for the next head (if no other is kept).
    fn give_back(&self, timer: KeptSleep) {
        self.kept.give_back(timer);
    }
}

/// The kept timer while hyper holds it, for one head's `deadline`; back to
/// its slot when dropped.
struct HeldSleep {
    timer: Option<KeptSleep>,
    /// When this head's time is up; the kept timer may fire earlier.
    deadline: tokio::time::Instant,
    slot: Arc<HeadSlot>,
}

impl Future for HeldSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let Some(kept) = self.timer.as_mut() else {
            return Poll::Ready(());
        };
        // Registered with this task's waker and not fired: nothing to do.
        let same_waker = kept.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_waker && !kept.sleep.is_elapsed() {
            return Poll::Pending;
        }
        loop {
            // Outside the task's budget: a `Pending` from an exhausted
            // budget would not register the waker this poll keeps.
            let polled = std::pin::pin!(tokio::task::unconstrained(kept.sleep.as_mut())).poll(cx);
            match polled {
                Poll::Pending => {
                    if !same_waker {
                        kept.waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(()) if kept.sleep.deadline() >= deadline => return Poll::Ready(()),
                // An earlier head's deadline: now this head's.
                Poll::Ready(()) => kept.sleep.as_mut().reset(deadline),
            }
        }
    }
}

impl hyper::rt::Sleep for HeldSleep {}

impl Drop for HeldSleep {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            self.slot.give_back(timer);
        }
    }
}

impl HeaderTimer {
    fn held(&self, deadline: tokio::time::Instant) -> HeldSleep {
        HeldSleep {
            timer: Some(self.slot.take(deadline)),
            deadline,
            slot: Arc::clone(&self.slot),
        }
    }
}

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until((tokio::time::Instant::now() + duration).into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.held(deadline.into()))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeldSleep>() {
            Some(held) => {
                let held = Pin::get_mut(held);
                let deadline = new_deadline.into();
                held.deadline = deadline;
                if let Some(kept) = held.timer.as_mut()
                    && kept.sleep.deadline() > deadline
                {
                    kept.sleep.as_mut().reset(deadline);
                    kept.waker = None;
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> std::time::Instant {
        // tokio's clock, as `TokioTimer`: paused with the runtime in tests.
        tokio::time::Instant::now().into_std()
    }
}

/// `conn` served to its end, shut down gracefully (hyper finishes the
/// request in progress, then closes) once `stop` changes or closes.
///
/// As `hyper_util`'s `Watcher::watch`, without its cost on every poll of the
/// connection: that one polls its `watch::Receiver::changed` future each
/// time, which takes the channel's waiter-list lock to check the waker and
/// spends task budget. This one polls it only when the connection's task
/// (its waker) is new, or when the channel says it has changed, a load.
pub fn until_stopped<C>(conn: C, stop: tokio::sync::watch::Receiver<bool>) -> Graceful<C>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    let peek = stop.clone();
    let mut stop = stop;
    Graceful {
        conn: Box::pin(conn),
        stopped: Box::pin(async move {
            let _ = stop.changed().await;
        }),
        peek,
        waker: None,
        stopping: false,
    }
}

/// The future of [`until_stopped`].
pub struct Graceful<C> {
    conn: Pin<Box<C>>,
    /// Ready once `stop` has changed (or closed).
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The same channel, to see a change without polling `stopped`.
    peek: tokio::sync::watch::Receiver<bool>,
    /// The waker `stopped` was last polled with.
    waker: Option<std::task::Waker>,
    stopping: bool,
}

impl<C> Future for Graceful<C>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.stopping {
            let same_waker = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if !same_waker || this.peek.has_changed().unwrap_or(true) {
                // Outside the task's budget: a `Pending` from an exhausted
                // budget would not register the waker kept here.
                let polled =
                    std::pin::pin!(tokio::task::unconstrained(this.stopped.as_mut())).poll(cx);
                if polled.is_ready() {
                    this.stopping = true;
                    this.conn.as_mut().graceful_shutdown();
                } else if !same_waker {
                    this.waker = Some(cx.waker().clone());
                }
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

/// A request that took longer than `request_timeout` ([`within`]).
#[derive(Debug, thiserror::Error)]
#[error("the request took too long")]
pub struct RequestTimeout;

/// 504 for a request that took longer than `request_timeout`.
pub fn request_timeout_response() -> Response {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "request_timeout",
        "the request took too long",
    )
    .into_response()
}

/// A request body that must keep arriving: at most `body_read_timeout`
/// between two pieces and `body_timeout` in all (counted from now). Past
/// either it fails with [`BodyTimeout`] and sets the returned flag, and the
/// request is answered with [`body_timeout_response`]. `first` is a frame
/// already taken from `body` ([`poll_first`]), given back first. An empty
/// body gets no flag and keeps exact size hints: on HTTP/1 (`http1`) it is
/// axum's empty body (nothing to allocate; hyper's empty HTTP/1 body holds
/// nothing either), on HTTP/2 the stream's body passed through untouched.
pub fn guard_body(
    body: hyper::body::Incoming,
    first: FirstFrame,
    limits: &ConnLimits,
    http1: bool,
) -> (Body, Option<Arc<AtomicBool>>) {
    if first.is_none() && body.is_end_stream() {
        if http1 {
            return (Body::empty(), None);
        }
        return (Body::new(body), None);
    }
    let flag = Arc::new(AtomicBool::new(false));
    let guarded = GuardedBody {
        first,
        inner: body,
        read_timeout: limits.body_read_timeout,
        deadline: tokio::time::Instant::now() + limits.body_timeout,
        idle: None,
        total: None,
        timed_out: Arc::clone(&flag),
    };
    (Body::new(guarded), Some(flag))
}

/// The error of a request body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

/// The body of [`guard_body`]. The body is polled first and the timers are
/// armed only while it waits, so a body that came with its headers (the usual
/// small JSON body) never touches the timer wheel.
struct GuardedBody {
    /// A frame taken before the guard was set ([`poll_first`]), given back first.
    first: FirstFrame,
    inner: hyper::body::Incoming,
    read_timeout: Duration,
    deadline: tokio::time::Instant,
    /// Pause timer, armed when a wait starts and dropped when a piece arrives.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whole-body timer, armed at the first wait.
    total: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl hyper::body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first.map_err(Into::into)));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.idle = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let (read_timeout, deadline) = (this.read_timeout, this.deadline);
        let idle = this
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(read_timeout)));
        let idle_over = idle.as_mut().poll(cx).is_ready();
        let total = this
            .total
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if idle_over || total.as_mut().poll(cx).is_ready() {
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let rest = self.inner.size_hint();
        let taken = match &self.first {
            Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => return rest,
        };
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(rest.lower() + taken);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + taken);
        }
        hint
    }
}

/// 408 for a request whose body did not arrive in time; HTTP/1 connections
/// are closed after it (the rest of the body is never read).
pub fn body_timeout_response(http1: bool) -> Response {
    let mut resp = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_body_timeout",
        "the request body did not arrive in time",
    )
    .into_response();
    if http1 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Connections a listener may hold given the process's open-file limit:
/// `configured`, lowered (with a warning) when `ulimit -n` could not serve
/// it — a proxied connection may need a second descriptor for its upstream.
pub fn effective_max_connections(configured: usize) -> usize {
    let Some(limit) = open_file_limit() else {
        return configured;
    };
    let budget = (limit.saturating_sub(RESERVED_FDS) / 2).max(1);
    if configured > budget {
        tracing::warn!(
            configured,
            budget,
            open_file_limit = limit,
            "max_connections lowered to what the open-file limit allows; raise `ulimit -n` to allow more"
        );
        budget
    } else {
        configured
    }
}

/// The soft `RLIMIT_NOFILE`, from `/proc/self/limits` (Linux); `None`
/// elsewhere or when unlimited.
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&text)
}

fn parse_open_file_limit(text: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max cpu time              unlimited            unlimited            seconds\n\
                    Max open files            1024                 524288               files\n";
        assert_eq!(parse_open_file_limit(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_file_limit(unlimited), None);
        assert_eq!(parse_open_file_limit(""), None);
    }

    /// The kept timer fires as `tokio::time::timeout` would, whatever
    /// deadline it was registered with before: a later one (extended), an
    /// earlier one (moved back), or one that had fired already.
    #[tokio::test]
    async fn the_request_timer_is_reused_and_fires_at_each_requests_limit() {
        use tokio::time::Instant;
        let timer = RequestTimer::default();
        let kept = |t: &RequestTimer| t.kept.is_some();
        let nap = |ms| tokio::time::sleep(Duration::from_millis(ms));
        // Done at once: the answer, and the timer kept for the next request.
        assert_eq!(
            timer.within(Duration::from_secs(5), async { 7 }).await.ok(),
            Some(7)
        );
        assert!(kept(&timer));
        // Waits (the timer is registered at +300 ms) and finishes in time.
        assert!(
            timer
                .within(Duration::from_millis(300), nap(10))
                .await
                .is_ok()
        );
        // A later, longer request outlives that first deadline.
        let t0 = Instant::now();
        assert!(timer.within(Duration::from_secs(2), nap(500)).await.is_ok());
        assert!(t0.elapsed() >= Duration::from_millis(500));
        // A shorter limit than the one registered fires at its own time.
        let t0 = Instant::now();
        let slow = timer.within(Duration::from_millis(50), std::future::pending::<()>());
        assert!(slow.await.is_err());
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(1),
            "{took:?}"
        );
        // The fired timer is kept and serves again, and fires again.
        assert!(kept(&timer));
        assert!(
            timer
                .within(Duration::from_millis(200), nap(20))
                .await
                .is_ok()
        );
        let t0 = Instant::now();
        assert!(
            timer
                .within(Duration::from_millis(80), nap(5_000))
                .await
                .is_err()
        );
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(80) && took < Duration::from_secs(1),
            "{took:?}"
        );
        // Concurrent requests (HTTP/2): one gets the kept timer, the other
        // its own; both fire at their limits, and one timer is kept after.
        let (a, b) = tokio::join!(
            timer.within(Duration::from_millis(30), std::future::pending::<()>()),
            timer.within(Duration::from_millis(300), nap(10)),
        );
        assert!(a.is_err() && b.is_ok());
        assert!(kept(&timer));
    }

    /// hyper's header timer: each head's sleep is the one kept timer, moved
    /// to the new deadline; it fires at that deadline (not an earlier
    /// one's), and goes back to the slot when hyper drops it.
    #[tokio::test(flavor = "current_thread")]
    async fn the_header_timer_hands_out_the_kept_timer_at_each_deadline() {
        use hyper::rt::Timer;
        use tokio::time::Instant;
        let timer = HeaderTimer::default();
        let kept = |t: &HeaderTimer| t.slot.kept.is_some();
        let after = |ms| timer.sleep(Duration::from_millis(ms));
        // A head that arrives in time: the sleep is registered, then dropped
        // (hyper drops it once the head is read) and kept.
        let mut first = after(100);
        assert!(futures_poll_once(first.as_mut()).is_pending());
        drop(first);
        assert!(kept(&timer));
        // The next head's deadline is later; it fires then, not at +100 ms.
        let t0 = Instant::now();
        after(300).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(kept(&timer), "the fired timer is kept too");
        // A fired timer serves again, and hyper's reset moves it in place.
        let t0 = Instant::now();
        let mut s = after(5_000);
        assert!(futures_poll_once(s.as_mut()).is_pending());
        timer.reset(&mut s, timer.now() + Duration::from_millis(50));
        s.await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Two at once (never on one HTTP/1 connection, but allowed): the
        // second gets a timer of its own.
        let (a, b) = (after(20), after(40));
        let t0 = Instant::now();
        tokio::join!(a, b);
        assert!(t0.elapsed() >= Duration::from_millis(40));
        assert!(kept(&timer));
    }

    /// The kept timer is polled again only for a new waker or once it
    /// fired: a head polled again and again by one task still times out,
    /// waking that task; a head polled by another task wakes that one.
    #[tokio::test(flavor = "current_thread")]
    async fn the_header_timer_wakes_the_waker_it_was_last_polled_with() {
        use hyper::rt::Timer;
        use std::sync::atomic::AtomicUsize;
        use tokio::time::Instant;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let timer = HeaderTimer::default();
        let (a, b) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (wa, wb) = (
            std::task::Waker::from(Arc::clone(&a)),
            std::task::Waker::from(Arc::clone(&b)),
        );
        let mut s = timer.sleep(Duration::from_millis(60));
        for _ in 0..3 {
            assert!(s.as_mut().poll(&mut Context::from_waker(&wa)).is_pending());
        }
        // Another task polls it: that task is the one woken.
        assert!(s.as_mut().poll(&mut Context::from_waker(&wb)).is_pending());
        let t0 = Instant::now();
        while b.0.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(2), "never woken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(s.as_mut().poll(&mut Context::from_waker(&wb)).is_ready());
        assert_eq!(a.0.load(Ordering::SeqCst), 0);
        // The next head, polled by the first task only, wakes it at its own
        // deadline.
        drop(s);
        let mut s = timer.sleep(Duration::from_millis(60));
        for _ in 0..3 {
            assert!(s.as_mut().poll(&mut Context::from_waker(&wa)).is_pending());
        }
        let t0 = Instant::now();
        while a.0.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(2), "never woken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(t0.elapsed() >= Duration::from_millis(40));
        assert!(s.as_mut().poll(&mut Context::from_waker(&wa)).is_ready());
    }

    fn futures_poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx)
    }

    #[test]
    fn gate_refuses_beyond_its_cap_and_frees_places() {
        let gate = Gate::new(2, Some((Gauge::default(), Counter::default())));
        let a = gate.admit().expect("first");
        let _b = gate.admit().expect("second");
        assert!(gate.admit().is_none(), "third is refused");
        assert_eq!(gate.open(), 2);
        drop(a);
        assert_eq!(gate.open(), 1);
        assert!(gate.admit().is_some());
        assert_eq!(gate.refused.as_ref().map(Counter::get), Some(1));
    }
}

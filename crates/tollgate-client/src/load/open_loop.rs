//! The open-loop engine: a fixed schedule over persistent HTTP/1.1
//! connections, latency from each call's due time (see the module docs of
//! [`load`](super)).

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use indicatif::ProgressBar;
use reqwest::Method;
use reqwest::header::{HOST, HeaderMap, HeaderValue};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{LoadOptions, Stats};
use crate::RetryPolicy;
use crate::error::LoadError;

/// How long before a due time the engine stops sleeping and yields instead:
/// tokio's timer fires on millisecond ticks, up to 1 ms late.
const SPIN: Duration = Duration::from_millis(2);

/// How long a connection may take to open before the call counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the progress bar is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(200);

type Sender = SendRequest<Full<Bytes>>;

/// The one request of the run, built once.
pub(super) struct Target {
    addr: SocketAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Target {
    /// Resolves the URL's host (once) and builds the request.
    ///
    /// # Errors
    /// [`LoadError::Target`] when the URL has no host or it does not resolve.
    pub(super) async fn new(url: &reqwest::Url, opts: &LoadOptions) -> Result<Target, LoadError> {
        let bad = |reason: String| LoadError::Target {
            url: opts.url.clone(),
            reason,
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| bad("no port".into()))?;
        let host = url.host_str().ok_or_else(|| bad("no host".into()))?;
        // IPv6 literals come bracketed; lookups take them bare.
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| bad(format!("cannot resolve `{name}`: {e}")))?
            .next()
            .ok_or_else(|| bad(format!("`{name}` has no address")))?;
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        let uri = path.parse::<Uri>().map_err(|e| bad(format!("path: {e}")))?;
        let mut headers = HeaderMap::new();
        for (n, v) in &opts.headers {
            headers.append(n, v.clone());
        }
        if !headers.contains_key(HOST) {
            let host = match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            };
            let host = HeaderValue::from_str(&host).map_err(|e| bad(format!("host: {e}")))?;
            headers.insert(HOST, host);
        }
        Ok(Target {
            addr,
            method: opts.method.clone(),
            uri,
            headers,
            body: opts.body.clone().unwrap_or_default(),
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// When call `i` is due: `i / rate` after the start, in whole nanoseconds
/// (computed from `i`, so no rounding piles up).
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    rate: u64,
}

impl Schedule {
    fn offset(&self, i: u64) -> Duration {
        let ns = u128::from(i) * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn due(&self, i: u64) -> Instant {
        self.start + self.offset(i)
    }

    /// Calls due strictly before `d` after the start.
    fn calls_before(&self, d: Duration) -> u64 {
        let n = d.as_nanos() * u128::from(self.rate);
        u64::try_from(n.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
    }
}

/// What one call came back with.
struct Outcome {
    /// The connection, to reuse; `None` when it failed (the next call that
    /// takes this slot opens a new one).
    slot: Option<Sender>,
    due: Instant,
    /// Status and whether the whole body arrived; `None` when no answer came.
    answer: Option<(u16, bool)>,
    done: Instant,
}

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    // Ends when the connection closes: the server closed it, or every
    // `SendRequest` and call on it was dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

/// A connection ready for a call: `slot` when it still is, else a new one.
async fn ready(target: &Target, slot: Option<Sender>) -> Option<Sender> {
    if let Some(mut s) = slot
        && s.ready().await.is_ok()
    {
        return Some(s);
    }
    // Never opened, failed, or closed by the server since its last answer.
    let mut s = connect(target.addr).await?;
    s.ready().await.ok()?;
    Some(s)
}

/// One call on `slot` (reopened when it is not usable), due at `due`.
async fn exchange(target: &Target, slot: Option<Sender>, due: Instant) -> Outcome {
    let Some(mut sender) = ready(target, slot).await else {
        return Outcome {
            slot: None,
            due,
            answer: None,
            done: Instant::now(),
        };
    };
    let answer = async {
        let resp = sender.send_request(target.request()).await.ok()?;
        let status = resp.status().as_u16();
        // Read to the end so the connection can carry the next call.
        let complete = resp.into_body().collect().await.is_ok();
        Some((status, complete))
    }
    .await;
    let done = Instant::now();
    let usable = matches!(answer, Some((_, true)));
    Outcome {
        slot: usable.then_some(sender),
        due,
        answer,
        done,
    }
}

impl Stats {
    fn record_outcome(&mut self, o: &Outcome) {
        match o.answer {
            Some((status, complete)) => {
                self.record_answer(status, o.done.saturating_duration_since(o.due));
                if complete && !RetryPolicy::is_retryable_status(status) {
                    self.calls_ok += 1;
                } else {
                    self.calls_failed += 1;
                }
            }
            None => {
                self.errors += 1;
                self.calls_failed += 1;
            }
        }
    }
}

/// Runs `rate` calls per second for `duration` over `connections`
/// connections (opened before the clock starts); returns the counts and the
/// time the run took.
pub(super) async fn run(
    target: &Target,
    rate: NonZeroU32,
    duration: Duration,
    connections: NonZeroU32,
    bar: Option<&ProgressBar>,
) -> (Stats, Duration) {
    let opened: FuturesUnordered<_> = (0..connections.get())
        .map(|_| connect(target.addr))
        .collect();
    let mut idle: Vec<Option<Sender>> = opened.collect().await;

    let schedule = Schedule {
        start: Instant::now(),
        rate: u64::from(rate.get()),
    };
    let end = schedule.start + duration;
    let total = schedule.calls_before(duration);
    let mut next = 0u64;
    let mut in_flight = FuturesUnordered::new();
    let mut stats = Stats::default();
    let mut draw_at = schedule.start;
    // One timer, moved only when its deadline changes (not once per answer
    // while the run is behind and waits for answers or the end).
    let timer = tokio::time::sleep_until(end);
    tokio::pin!(timer);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(bar) = bar
            && now >= draw_at
        {
            draw_at = now + DRAW_EVERY;
            draw(bar, &stats, now - schedule.start);
        }
        // Every due call that has a connection goes now.
        while next < total && schedule.due(next) <= now {
            let Some(slot) = idle.pop() else { break };
            in_flight.push(exchange(target, slot, schedule.due(next)));
            next += 1;
        }
        // Next, wake for the next due call when a connection is free for it;
        // else (all busy, or nothing left to send) for an answer or the end.
        let wake = if next < total && !idle.is_empty() {
            schedule.due(next).min(end)
        } else {
            end
        };
        let answered = if wake.saturating_duration_since(now) > SPIN {
            if timer.deadline() != wake - SPIN {
                timer.as_mut().reset(wake - SPIN);
            }
            first_of(in_flight.next(), timer.as_mut()).await
        } else {
            first_of(in_flight.next(), tokio::task::yield_now()).await
        };
        if let Some(o) = answered {
            stats.record_outcome(&o);
            idle.push(o.slot);
        }
    }
    let elapsed = Instant::now().saturating_duration_since(schedule.start);
    // Calls still in flight are abandoned (dropping them closes their
    // connections). Unsent due calls count as dropped unless a connection
    // was free for them (they fell in the last instant before the end).
    stats.dropped = (total - next).saturating_sub(idle.len() as u64);
    (stats, elapsed)
}

/// An answer when one is ready first (answers take precedence), else `None`
/// once `wait` is over; an empty set of calls never answers.
async fn first_of<A, W>(answer: A, wait: W) -> Option<Outcome>
where
    A: Future<Output = Option<Outcome>>,
    W: Future<Output = ()>,
{
    tokio::select! {
        biased;
        Some(o) = answer => Some(o),
        () = wait => None,
    }
}

fn draw(bar: &ProgressBar, stats: &Stats, elapsed: Duration) {
    bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
    let n: u64 = stats.counts.values().sum();
    let limited = stats.counts.get(&429).copied().unwrap_or(0);
    bar.set_message(format!("{n} responses, {limited} × 429"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn schedule_is_exact_and_counts_calls_before_a_time() {
        let s = Schedule {
            start: Instant::now(),
            rate: 3,
        };
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(3), Duration::from_secs(1));
        assert_eq!(s.due(6), s.start + Duration::from_secs(2));
        // Due at 0, 1/3, 2/3: three before 1 s; a fourth just after.
        assert_eq!(s.calls_before(Duration::from_secs(1)), 3);
        assert_eq!(s.calls_before(Duration::from_nanos(1_000_000_001)), 4);
        assert_eq!(s.calls_before(Duration::ZERO), 0);
        let fast = Schedule {
            start: s.start,
            rate: 60_000,
        };
        assert_eq!(fast.calls_before(Duration::from_secs(10)), 600_000);
        assert_eq!(fast.offset(599_999), Duration::from_nanos(9_999_983_333));
        let max = Schedule {
            start: s.start,
            rate: u64::from(u32::MAX),
        };
        assert_eq!(
            max.calls_before(Duration::from_secs(3600)),
            3600 * u64::from(u32::MAX)
        );
        assert!(max.offset(3600 * u64::from(u32::MAX) - 1) < Duration::from_secs(3600));
    }
}

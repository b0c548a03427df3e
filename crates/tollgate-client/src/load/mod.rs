//! The load generator behind `tollgate load`: drives one URL at a fixed
//! rate (open loop) or with a fixed number of callers (closed loop) for a
//! duration, and sums up what came back.
//!
//! Two engines:
//!
//! - **Open loop on persistent connections** (a rate run to an `http://`
//!   target without retries or pacing): a fixed schedule (call `i` is due
//!   at `i / rate` after the start) sent over [`LoadOptions::connections`]
//!   keep-alive HTTP/1.1 connections driven by hyper. Latency runs from the
//!   moment a call was *due* to the end of its answer, so a call sent late
//!   (every connection busy, the tool or the server behind) counts its
//!   delay, as in wrk2: no coordinated omission. It runs on a thread of its
//!   own; see [Open loop](self#open-loop).
//! - **Through a [`Client`]** (closed loop, `https://`, `--retry` or
//!   `--pace`): reqwest with the SDK's retries and pacing on or off;
//!   latency runs from request sent to response headers. A rate run never
//!   keeps more than [`MAX_IN_FLIGHT`] calls open; ticks beyond that are
//!   dropped and counted.
//!
//! Counted: every answer on the wire (retries included) by status, with its
//! latency (in an HDR histogram, 3 significant digits); transport errors;
//! calls that ended with a non-error answer or failed (a 429, 502, 503 or
//! 504 not retried is a failed call). Calls still running at the end get
//! [`LoadOptions::grace`] to finish and count as usual; those still running
//! after it are abandoned and counted as unfinished. A rate run also counts
//! the calls its schedule made due and those it never started (dropped).
//!
//! # Open loop
//!
//! One thread with a current-thread tokio runtime (no call crosses
//! threads): a task per connection, hyper's task for each, and a pacer.
//! When a call falls due, the pacer hands it to a waiting connection,
//! every call due at one wake-up at once; a connection that ends a call
//! when the next is already due (the run is behind) takes it without the
//! pacer. tokio's timer ticks once a millisecond, so the pacer sleeps on it
//! until 1.2 ms before a due time, then sleeps on the thread (timer slack
//! lowered to 1 µs on Linux): to the due time when no call is in flight,
//! else 50 µs at a time, the runtime reading the sockets between naps. The
//! last 100 µs before a due time it yields to the runtime instead (a
//! thread sleep there would make the call late), so it spins only at high
//! rates: calls leave within microseconds of their due time, an answer is
//! read at most 50 µs late, and at low rates the thread is off the CPU
//! whenever it has nothing to do. A connection that
//! failed or that the server closed is reopened by the next call that
//! takes it (its connect time counts in that call's latency).
//!
//! Every call the schedule makes due before the end is exactly one of:
//! answered (counted by status), failed without an answer (`errors`),
//! never started because every connection was busy until the end
//! (`dropped`), or unanswered when the grace ran out (`unfinished`).

mod open_loop;

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::LoadError;
use crate::{Attempt, Client, Pacer, RetryPolicy};

/// Most calls a rate run through the [`Client`] keeps open at once.
pub const MAX_IN_FLIGHT: usize = 4096;

/// Connections of an open-loop run unless told otherwise.
pub const DEFAULT_CONNECTIONS: NonZeroU32 = NonZeroU32::new(32).expect("32 > 0");

/// How long calls still open at the end may take unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Start this many calls per second, whatever the answers take.
    Rate(NonZeroU32),
    /// Keep this many callers busy, each starting its next call when the last ends.
    Concurrency(NonZeroU32),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Target URL (`http://` or `https://`).
    pub url: String,
    /// Method (default GET).
    pub method: Method,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body.
    pub body: Option<Bytes>,
    /// Rate or concurrency (default 10 concurrent callers).
    pub mode: Mode,
    /// How long to run (default 10 s).
    pub duration: Duration,
    /// Retry per the default [`RetryPolicy`] (default off: every answer counts as it is).
    pub retry: bool,
    /// Pace with a [`Pacer`] (default off).
    pub pace: bool,
    /// Show a progress bar on stderr when it is a terminal (default off).
    pub progress: bool,
    /// Keep-alive connections of an open-loop run to an `http://` target
    /// without retries or pacing (default [`DEFAULT_CONNECTIONS`]); each
    /// carries one call at a time. Other runs leave connections to reqwest.
    pub connections: NonZeroU32,
    /// How long the calls still open when the duration is over may take to
    /// end and be counted (default [`DEFAULT_GRACE`]); those still open
    /// after it are abandoned and counted in [`Summary::unfinished`].
    pub grace: Duration,
}

impl LoadOptions {
    /// GET `url` with 10 concurrent callers for 10 s, no retries, no pacing.
    pub fn new(url: impl Into<String>) -> LoadOptions {
        LoadOptions {
            url: url.into(),
            method: Method::GET,
            headers: Vec::new(),
            body: None,
            mode: Mode::Concurrency(NonZeroU32::new(10).expect("10 > 0")),
            duration: Duration::from_secs(10),
            retry: false,
            pace: false,
            progress: false,
            connections: DEFAULT_CONNECTIONS,
            grace: DEFAULT_GRACE,
        }
    }
}

/// Parses `name: value`.
///
/// # Errors
/// [`LoadError::Header`] when there is no colon or the name or value is invalid.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), LoadError> {
    let bad = || LoadError::Header(s.to_owned());
    let (n, v) = s.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(n.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(v.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Answers by status code (every attempt on the wire).
    pub counts: BTreeMap<u16, u64>,
    /// Attempts that got no answer.
    pub errors: u64,
    /// Calls that ended with an answer that was not given up on.
    pub calls_ok: u64,
    /// Calls that ended in an error (retries exhausted, transport).
    pub calls_failed: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// Calls a rate run made due (its ticks); 0 for a concurrency run.
    pub scheduled: u64,
    /// Rate ticks never sent: through the [`Client`], because
    /// [`MAX_IN_FLIGHT`] calls were open; in the open loop, because every
    /// connection was busy from the tick to the end of the run.
    pub dropped: u64,
    /// Calls started but still open when the grace after the run ran out
    /// (abandoned: no answer, no error, no latency counted).
    pub unfinished: u64,
    /// Latency percentiles (p50, p90, p99) of the answers; in the open loop
    /// from the time each call was due (see the module docs).
    pub latency: [Duration; 3],
    /// Latency p99.9 of the answers.
    pub latency_p999: Duration,
    /// Highest latency of an answer.
    pub latency_max: Duration,
}

impl Summary {
    /// Answers received.
    pub fn responses(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Answers of one status.
    pub fn count(&self, status: u16) -> u64 {
        self.counts.get(&status).copied().unwrap_or(0)
    }

    /// Share of answers that were 429, in `[0, 1]`.
    pub fn share_429(&self) -> f64 {
        let n = self.responses();
        if n == 0 {
            0.0
        } else {
            self.count(429) as f64 / n as f64
        }
    }

    /// Answers per second of the run.
    pub fn requests_per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.responses() as f64 / s
        } else {
            0.0
        }
    }

    /// The summary as one JSON object; `counts` is keyed by status code as
    /// a string, latencies are in milliseconds.
    pub fn to_json(&self) -> Value {
        let counts: serde_json::Map<String, Value> = self
            .counts
            .iter()
            .map(|(s, n)| (s.to_string(), json!(n)))
            .collect();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        json!({
            "duration_s": self.elapsed.as_secs_f64(),
            "requests": self.responses(),
            "counts": counts,
            "errors": self.errors,
            "share_429": self.share_429(),
            "latency_ms": {
                "p50": ms(self.latency[0]),
                "p90": ms(self.latency[1]),
                "p99": ms(self.latency[2]),
                "p999": ms(self.latency_p999),
                "max": ms(self.latency_max),
            },
            "requests_per_s": self.requests_per_second(),
            "calls": { "ok": self.calls_ok, "failed": self.calls_failed },
            "retries": self.retries,
            "scheduled": self.scheduled,
            "dropped": self.dropped,
            "unfinished": self.unfinished,
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(
            f,
            "{} responses in {:.2} s ({:.1}/s), {} transport errors",
            self.responses(),
            self.elapsed.as_secs_f64(),
            self.requests_per_second(),
            self.errors
        )?;
        for (status, n) in &self.counts {
            writeln!(f, "  {status}  {n}")?;
        }
        writeln!(f, "429 share {:.1}%", self.share_429() * 100.0)?;
        writeln!(
            f,
            "latency p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            ms(self.latency[0]),
            ms(self.latency[1]),
            ms(self.latency[2]),
            ms(self.latency_p999),
            ms(self.latency_max)
        )?;
        write!(
            f,
            "calls ok {}, failed {}, unfinished {}; retries {}; scheduled {}, dropped ticks {}",
            self.calls_ok,
            self.calls_failed,
            self.unfinished,
            self.retries,
            self.scheduled,
            self.dropped
        )
    }
}

struct Stats {
    counts: BTreeMap<u16, u64>,
    errors: u64,
    retries: u64,
    calls_ok: u64,
    calls_failed: u64,
    scheduled: u64,
    dropped: u64,
    unfinished: u64,
    /// Nanoseconds, 3 significant digits, up to [`LATENCY_CAP_NS`] (longer
    /// ones are recorded as that); ~300 KB, allocated once.
    latency_ns: Histogram<u64>,
}

/// Longest latency told apart: one hour, in nanoseconds.
const LATENCY_CAP_NS: u64 = 3_600_000_000_000;

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            counts: BTreeMap::new(),
            errors: 0,
            retries: 0,
            calls_ok: 0,
            calls_failed: 0,
            scheduled: 0,
            dropped: 0,
            unfinished: 0,
            latency_ns: Histogram::new_with_bounds(1, LATENCY_CAP_NS, 3)
                .expect("1 ns to 1 h with 3 significant digits is a valid range"),
        }
    }
}

impl Stats {
    fn record(&mut self, a: &Attempt) {
        match a.status {
            Some(s) => self.record_answer(s.as_u16(), a.latency),
            None => self.errors += 1,
        }
        if a.retry > 0 {
            self.retries += 1;
        }
    }

    fn record_answer(&mut self, status: u16, latency: Duration) {
        *self.counts.entry(status).or_default() += 1;
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_ns.saturating_record(ns.max(1));
    }

    /// The latency below which a share `q` of the answers fell.
    fn latency_at(&self, q: f64) -> Duration {
        if self.latency_ns.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.latency_ns.value_at_quantile(q))
    }

    fn summary(self, elapsed: Duration) -> Summary {
        Summary {
            elapsed,
            latency: [0.5, 0.9, 0.99].map(|q| self.latency_at(q)),
            latency_p999: self.latency_at(0.999),
            latency_max: if self.latency_ns.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_nanos(self.latency_ns.max())
            },
            counts: self.counts,
            errors: self.errors,
            calls_ok: self.calls_ok,
            calls_failed: self.calls_failed,
            retries: self.retries,
            scheduled: self.scheduled,
            dropped: self.dropped,
            unfinished: self.unfinished,
        }
    }
}

/// Runs the load and returns what it saw.
///
/// # Errors
/// [`LoadError`] when the options are unusable (not an `http(s)://` URL, a
/// zero duration) or the open loop's thread cannot start; nothing is sent
/// then.
pub async fn run(opts: LoadOptions) -> Result<Summary, LoadError> {
    let url = reqwest::Url::parse(&opts.url).map_err(|e| LoadError::Target {
        url: opts.url.clone(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(LoadError::Target {
            url: opts.url.clone(),
            reason: "only http:// and https:// targets are supported".into(),
        });
    }
    if opts.duration.is_zero() {
        return Err(LoadError::Zero("--duration"));
    }
    if let Mode::Rate(rate) = opts.mode
        && url.scheme() == "http"
        && !opts.retry
        && !opts.pace
    {
        let target = open_loop::Target::new(&url, &opts).await?;
        let bar = opts.progress.then(|| progress(opts.duration));
        let plan = open_loop::Plan {
            rate,
            duration: opts.duration,
            connections: opts.connections,
            grace: opts.grace,
        };
        let (stats, elapsed) = open_loop::run(target, plan, bar.clone()).await?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        return Ok(stats.summary(elapsed));
    }
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut builder = Client::builder().with_retry(if opts.retry {
        RetryPolicy::default()
    } else {
        RetryPolicy::none()
    });
    if opts.pace {
        builder = builder.with_pacer(Pacer::new());
    }
    let s = stats.clone();
    let client = builder
        .with_observer(move |a| s.lock().expect("stats").record(a))
        .build();
    let call = Arc::new(Call {
        client,
        url,
        method: opts.method.clone(),
        headers: opts.headers.clone(),
        body: opts.body.clone(),
        stats: stats.clone(),
    });

    let started = Instant::now();
    let deadline = started + opts.duration;
    let bar = opts.progress.then(|| progress(opts.duration));
    let ticker = bar.clone().map(|bar| {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                let elapsed = started.elapsed();
                bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                let st = stats.lock().expect("stats");
                let n: u64 = st.counts.values().sum();
                let limited = st.counts.get(&429).copied().unwrap_or(0);
                drop(st);
                bar.set_message(format!("{n} responses, {limited} × 429"));
            }
        })
    });

    let mut calls = JoinSet::new();
    match opts.mode {
        Mode::Concurrency(n) => {
            for _ in 0..n.get() {
                let call = call.clone();
                calls.spawn(async move {
                    while Instant::now() < deadline {
                        call.once().await;
                    }
                });
            }
            tokio::time::sleep_until(deadline).await;
        }
        Mode::Rate(r) => {
            let period = Duration::from_secs(1) / r.get();
            let mut every = tokio::time::interval(period.max(Duration::from_nanos(1)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = tokio::time::sleep_until(deadline) => break,
                }
                if Instant::now() >= deadline {
                    break;
                }
                stats.lock().expect("stats").scheduled += 1;
                while calls.try_join_next().is_some() {}
                if calls.len() >= MAX_IN_FLIGHT {
                    stats.lock().expect("stats").dropped += 1;
                    continue;
                }
                let call = call.clone();
                calls.spawn(async move { call.once().await });
            }
        }
    }
    // Calls still open: they may end within the grace; the rest are
    // abandoned and counted as unfinished.
    let grace_end = deadline + opts.grace;
    while let Ok(Some(_)) = tokio::time::timeout_at(grace_end, calls.join_next()).await {}
    let unfinished = calls.len() as u64;
    calls.abort_all();
    while calls.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let mut st = std::mem::take(&mut *stats.lock().expect("stats"));
    st.unfinished = unfinished;
    Ok(st.summary(elapsed))
}

fn progress(duration: Duration) -> ProgressBar {
    let total = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    // `stderr()` draws nothing when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

struct Call {
    client: Client,
    url: reqwest::Url,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<Bytes>,
    stats: Arc<Mutex<Stats>>,
}

impl Call {
    async fn once(&self) {
        let mut rb = self.client.request(self.method.clone(), self.url.as_str());
        for (n, v) in &self.headers {
            rb = rb.header(n, v);
        }
        if let Some(b) = &self.body {
            rb = rb.body(b.clone());
        }
        let result = self.client.send(rb).await;
        let ok = match result {
            // Read the body so the connection is reused.
            Ok(resp) => resp.bytes().await.is_ok(),
            Err(_) => false,
        };
        let mut st = self.stats.lock().expect("stats");
        if ok {
            st.calls_ok += 1;
        } else {
            st.calls_failed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        let (n, v) = parse_header("X-Api-Key:  abc ").expect("valid");
        assert_eq!((n.as_str(), v.to_str().ok()), ("x-api-key", Some("abc")));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[test]
    fn percentiles_come_from_the_histogram_within_a_thousandth() {
        let mut st = Stats::default();
        for us in 1..=1000 {
            st.record_answer(200, Duration::from_micros(us));
        }
        st.record_answer(429, Duration::from_secs(90));
        let close = |got: Duration, us: u64| {
            let want = Duration::from_micros(us).as_secs_f64();
            assert!(
                (got.as_secs_f64() - want).abs() <= want * 1e-3,
                "{got:?} vs {us} us"
            );
        };
        let s = st.summary(Duration::from_secs(1));
        close(s.latency[0], 501);
        close(s.latency[1], 901);
        close(s.latency[2], 991);
        close(s.latency_p999, 1000);
        close(s.latency_max, 90_000_000);
        assert_eq!((s.count(200), s.count(429)), (1000, 1));
        let empty = Stats::default().summary(Duration::from_secs(1));
        assert_eq!(empty.latency, [Duration::ZERO; 3]);
        assert_eq!(empty.latency_max, Duration::ZERO);
    }

    #[test]
    fn json_counts_are_keyed_by_status_strings() {
        let mut s = Summary {
            elapsed: Duration::from_secs(2),
            ..Summary::default()
        };
        s.counts.insert(200, 3);
        s.counts.insert(429, 1);
        let j = s.to_json();
        assert_eq!(j["counts"]["200"], json!(3));
        assert_eq!(j["counts"]["429"], json!(1));
        assert_eq!(j["share_429"], json!(0.25));
        assert_eq!(j["requests_per_s"], json!(2.0));
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert_eq!(j["latency_ms"][p], json!(0.0), "{p}");
        }
    }
}

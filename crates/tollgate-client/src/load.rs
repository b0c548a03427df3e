//! The load generator behind `tollgate load`: drives one URL at a fixed
//! rate (open loop) or with a fixed number of callers (closed loop) for a
//! duration, through a [`Client`] with retries and pacing on or off, and
//! sums up what came back.
//!
//! Counted: every answer on the wire (retries included) by status, with its
//! latency (request sent → response headers); transport errors; calls that
//! ended with a non-error answer or failed. Calls still running at the end
//! are abandoned, not counted. A rate run never keeps more than
//! [`MAX_IN_FLIGHT`] calls open; ticks beyond that are dropped and counted.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::LoadError;
use crate::{Attempt, Client, Pacer, RetryPolicy};

/// Most calls a rate run keeps open at once.
pub const MAX_IN_FLIGHT: usize = 4096;

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
    /// Rate ticks dropped because [`MAX_IN_FLIGHT`] calls were open.
    pub dropped: u64,
    /// Latency percentiles (p50, p90, p99) of the answers.
    pub latency: [Duration; 3],
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
            },
            "requests_per_s": self.requests_per_second(),
            "calls": { "ok": self.calls_ok, "failed": self.calls_failed },
            "retries": self.retries,
            "dropped": self.dropped,
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
            "latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
            ms(self.latency[0]),
            ms(self.latency[1]),
            ms(self.latency[2])
        )?;
        write!(
            f,
            "calls ok {}, failed {}; retries {}; dropped ticks {}",
            self.calls_ok, self.calls_failed, self.retries, self.dropped
        )
    }
}

#[derive(Default)]
struct Stats {
    counts: BTreeMap<u16, u64>,
    errors: u64,
    retries: u64,
    calls_ok: u64,
    calls_failed: u64,
    dropped: u64,
    latencies_us: Vec<u64>,
}

impl Stats {
    fn record(&mut self, a: &Attempt) {
        match a.status {
            Some(s) => *self.counts.entry(s.as_u16()).or_default() += 1,
            None => self.errors += 1,
        }
        if a.retry > 0 {
            self.retries += 1;
        }
        if a.status.is_some() {
            self.latencies_us
                .push(u64::try_from(a.latency.as_micros()).unwrap_or(u64::MAX));
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Duration::from_micros(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Runs the load and returns what it saw.
///
/// # Errors
/// [`LoadError`] when the options are unusable (not an `http(s)://` URL, a
/// zero duration); nothing is sent then.
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
    st.latencies_us.sort_unstable();
    Ok(Summary {
        elapsed,
        latency: [0.5, 0.9, 0.99].map(|p| percentile(&st.latencies_us, p)),
        counts: st.counts,
        errors: st.errors,
        calls_ok: st.calls_ok,
        calls_failed: st.calls_failed,
        retries: st.retries,
        dropped: st.dropped,
    })
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
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_micros(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
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
    }
}

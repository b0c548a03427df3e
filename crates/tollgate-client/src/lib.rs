//! Client SDK for APIs behind tollgate (or any API with rate-limit headers):
//! calls them the way their limit pages ask.
//!
//! - [`Client`] wraps a [`reqwest::Client`] and retries only 429, 502, 503
//!   and 504, at most 3 times, after `max(Retry-After or reset header,
//!   exponential back-off with full jitter)`; it never retries 400, 402 or
//!   any other answer. See [`RetryPolicy`].
//! - Retried POSTs carry an `Idempotency-Key` (random, the same on every
//!   attempt of one call), so credits are charged once.
//! - When the retries run out, [`Error::GaveUp`] carries the last answer
//!   (status, headers, body).
//! - An optional [`Pacer`] watches the remaining count and holds requests
//!   before the server would answer 429.
//! - [`RateLimitInfo`] reads every header profile tollgate emits: IETF
//!   `RateLimit`/`RateLimit-Policy`, classic `X-RateLimit-*`, vendor names
//!   such as `X-Picsart-RateLimit-Available`, and `Retry-After`.
//! - [`load`] is the engine of `tollgate load`.
//!
//! Every wait is a `tokio::time` sleep, so tests run on a paused clock.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tollgate_client::{Client, Jitter, RetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A server that answers 503 once, then 200.
//! let calls = Arc::new(AtomicU32::new(0));
//! let c = calls.clone();
//! let app = axum::Router::new().route("/work", axum::routing::post(move || {
//!     let n = c.fetch_add(1, Ordering::SeqCst);
//!     async move { if n == 0 { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK } }
//! }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("http://{}/work", listener.local_addr()?);
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! let client = Client::builder()
//!     .with_retry(RetryPolicy::new().with_base(Duration::from_millis(10)).with_jitter(Jitter::None))
//!     .build();
//! let response = client.send(client.request(reqwest::Method::POST, &url).body("job")).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

pub mod error;
pub mod headers;
pub mod load;
pub mod pacer;
pub mod retry;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Request, RequestBuilder, Response, StatusCode};
use tokio::time::Instant;

pub use error::{Error, LastResponse, LoadError};
pub use headers::RateLimitInfo;
pub use pacer::Pacer;
/// The HTTP client this crate is built on, for building requests.
pub use reqwest;
pub use retry::{Jitter, RetryPolicy};

/// The idempotency header added to retried POSTs.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// One attempt of a call, as reported to an observer.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// 0 for the first attempt, then the retry number.
    pub retry: u32,
    /// The answer's status; `None` when no answer came.
    pub status: Option<StatusCode>,
    /// From sending the request to its response headers (pacing excluded).
    pub latency: Duration,
}

/// A function told about every attempt (for metrics and the load generator).
pub type Observer = Arc<dyn Fn(&Attempt) + Send + Sync>;

/// An HTTP client that retries and paces as the documents ask. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    retry: RetryPolicy,
    pacer: Option<Arc<Pacer>>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("retry", &self.retry)
            .field("pacer", &self.pacer.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// Builds a [`Client`].
#[derive(Default)]
pub struct ClientBuilder {
    http: Option<reqwest::Client>,
    retry: RetryPolicy,
    pacer: Option<Arc<Pacer>>,
    observer: Option<Observer>,
}

impl ClientBuilder {
    /// The HTTP client to send with (default `reqwest::Client::new()`).
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// The retry policy (default [`RetryPolicy::default`]).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Paces requests with `pacer` (default: no pacing).
    pub fn with_pacer(self, pacer: Pacer) -> Self {
        self.with_shared_pacer(Arc::new(pacer))
    }

    /// Paces requests with a pacer shared with other clients of one caller.
    pub fn with_shared_pacer(mut self, pacer: Arc<Pacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Tells `observer` about every attempt.
    pub fn with_observer(mut self, observer: impl Fn(&Attempt) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The client.
    pub fn build(self) -> Client {
        Client {
            http: self.http.unwrap_or_default(),
            retry: self.retry,
            pacer: self.pacer,
            observer: self.observer,
        }
    }
}

/// A failed attempt, inside the retry loop.
enum Failure {
    Status {
        last: LastResponse,
        retry: bool,
        wait: Duration,
    },
    Transport(reqwest::Error),
}

impl Client {
    /// A client with the default retry policy and no pacing.
    pub fn new() -> Client {
        Client::builder().build()
    }

    /// A builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The pacer, when pacing.
    pub fn pacer(&self) -> Option<&Arc<Pacer>> {
        self.pacer.as_ref()
    }

    /// Starts a request to send with [`Client::send`].
    pub fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// Builds and sends a request; see [`Client::execute`].
    ///
    /// # Errors
    /// As [`Client::execute`]; a request that cannot be built is
    /// [`Error::Transport`] with 0 attempts.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, Error> {
        let req = request.build().map_err(|source| Error::Transport {
            attempts: 0,
            source,
        })?;
        self.execute(req).await
    }

    /// Sends a request, retrying per the policy, pacing when a pacer is set.
    /// Any answer that is not retried is returned as it is (200, 400, 402…).
    ///
    /// # Errors
    /// [`Error::GaveUp`] with the last answer when a retryable status
    /// outlived the retries or asked for too long a wait;
    /// [`Error::Transport`] when no answer came.
    pub async fn execute(&self, request: Request) -> Result<Response, Error> {
        self.execute_with_cost(request, None).await
    }

    /// [`Client::execute`] for a request whose cost is known (the pacer
    /// reserves it; otherwise it assumes the last answer's
    /// `X-RateLimit-Cost`, or 1).
    ///
    /// # Errors
    /// As [`Client::execute`].
    pub async fn execute_with_cost(
        &self,
        mut request: Request,
        cost: Option<u64>,
    ) -> Result<Response, Error> {
        if request.method() == Method::POST
            && self.retry.has_idempotency_keys()
            && !request.headers().contains_key(IDEMPOTENCY_KEY)
        {
            request
                .headers_mut()
                .insert(IDEMPOTENCY_KEY, new_idempotency_key());
        }
        // A streaming body cannot be sent twice: such requests get one attempt.
        let clonable = request.try_clone().is_some();
        let policy = if clonable {
            self.retry.clone()
        } else {
            self.retry.clone().with_max_retries(0)
        };
        let slot = &Mutex::new(Some(request));
        let attempts = &AtomicU32::new(0);
        let this = self;
        let op = move || async move {
            let n = attempts.fetch_add(1, Ordering::Relaxed);
            let req = {
                let mut slot = slot.lock().expect("request slot");
                if clonable {
                    slot.as_ref().and_then(Request::try_clone)
                } else {
                    slot.take()
                }
            }
            .expect("a request for every attempt: non-clonable ones get one");
            this.attempt(req, cost, n).await
        };
        let result = op
            .retry(policy)
            .sleep(tokio::time::sleep)
            .when(|f: &Failure| matches!(f, Failure::Status { retry: true, .. }))
            .adjust(|f: &Failure, backoff| match f {
                Failure::Status { wait, .. } => backoff.map(|b| b.max(*wait)),
                Failure::Transport(_) => None,
            })
            .await;
        let attempts = attempts.load(Ordering::Relaxed);
        result.map_err(|f| match f {
            Failure::Status { last, .. } => Error::GaveUp {
                attempts,
                last: Box::new(last),
            },
            Failure::Transport(source) => Error::Transport { attempts, source },
        })
    }

    async fn attempt(
        &self,
        req: Request,
        cost: Option<u64>,
        retry: u32,
    ) -> Result<Response, Failure> {
        let permit = match &self.pacer {
            Some(p) => Some(p.acquire(cost).await),
            None => None,
        };
        let started = Instant::now();
        let result = self.http.execute(req).await;
        let latency = started.elapsed();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                if let (Some(p), Some(permit)) = (&self.pacer, permit) {
                    p.cancel(permit);
                }
                self.report(retry, None, latency);
                return Err(Failure::Transport(e));
            }
        };
        let status = resp.status();
        let info = RateLimitInfo::parse(resp.headers());
        if let (Some(p), Some(permit)) = (&self.pacer, permit) {
            p.observe(permit, status.as_u16(), &info);
        }
        self.report(retry, Some(status), latency);
        if !RetryPolicy::is_retryable_status(status.as_u16()) {
            return Ok(resp);
        }
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(Failure::Transport)?;
        let wait = info.server_wait(status.as_u16()).unwrap_or_default();
        let limit = info.name.clone().or_else(|| error_limit(&body));
        let retry_allowed = wait <= self.retry.max_wait()
            && !limit.is_some_and(|l| self.retry.is_never_retried(&l));
        Err(Failure::Status {
            last: LastResponse {
                status,
                headers,
                body,
            },
            retry: retry_allowed,
            wait,
        })
    }

    fn report(&self, retry: u32, status: Option<StatusCode>, latency: Duration) {
        if let Some(o) = &self.observer {
            o(&Attempt {
                retry,
                status,
                latency,
            });
        }
    }
}

/// `error.limit` of tollgate's JSON error body.
fn error_limit(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.get("limit")?.as_str().map(str::to_owned)
}

/// 128 random bits in hex.
fn new_idempotency_key() -> HeaderValue {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // Fall back to std's per-process random hasher keys.
        use std::hash::{BuildHasher, Hasher};
        for half in b.chunks_mut(8) {
            let v = std::hash::RandomState::new().build_hasher().finish();
            half.copy_from_slice(&v.to_le_bytes());
        }
    }
    HeaderValue::from_str(&hex::encode(b)).expect("hex is a valid header value")
}

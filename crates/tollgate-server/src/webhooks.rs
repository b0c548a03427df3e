//! Webhooks: delivers the events outbox to HTTP endpoints, signed per
//! [Standard Webhooks](https://www.standardwebhooks.com/), at least once.
//!
//! **Configuration** — the policy file's `[server.webhooks]` table:
//! ```toml
//! [server.webhooks]
//! timeout = "10s"        # per delivery attempt (default 10s)
//! max_attempts = 8       # delivery rounds before an event is given up (default 8)
//! retry_min = "5s"       # first retry delay; doubles each round (default 5s)
//! retry_max = "1h"       # longest retry delay (default 1h); each delay gets up to +100 % jitter
//! poll_interval = "1s"   # how often the outbox is polled when idle (default 1s)
//! charge_events = false  # also record a `credits_charged` event per charge (default false)
//! allow_private_targets = false  # allow loopback/private targets: tests and local use only
//! # ca_file = "/etc/tollgate/webhook-ca.pem"  # extra trusted CA certificates (PEM) for https
//!
//! [[server.webhooks.endpoints]]
//! id = "billing"                     # stable name (default: the URL)
//! url = "https://hooks.example.com/tollgate"
//! secrets_env = "TOLLGATE_WEBHOOK_SECRETS"  # env var with one or more whsec_ secrets
//! # secrets = ["whsec_…"]            # or inline (prefer the environment)
//! events = ["credits_low", "credits_exhausted"]  # default: every kind
//! ```
//!
//! **Signing** — every request carries `webhook-id` (the event id: the
//! consumer's dedupe key), `webhook-timestamp` (Unix seconds of this attempt)
//! and `webhook-signature`: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`
//! for each configured secret, space-separated. A secret is `whsec_` + base64
//! of 24–64 random bytes; to rotate, list the new secret beside the old one
//! (both sign) until every consumer verifies with the new one. Receivers
//! should refuse timestamps more than [`TOLERANCE`] (5 minutes) away from
//! their clock; [`verify`] does exactly what a receiver should do.
//!
//! **Delivery** — a dispatcher task claims due events from the outbox under a
//! lease (see `tollgate_ledger`'s outbox: replicas never send one event at the
//! same time), posts each to every endpoint that wants its kind and has not
//! accepted it yet, records each 2xx, and marks the event delivered only when
//! all did. Anything else (timeout, connection error, 3xx — redirects are
//! never followed — 4xx, 5xx) schedules another round after an exponential
//! back-off with jitter ([`retry_delay`]); after `max_attempts` rounds the
//! event is given up (kept in the outbox, marked failed). `410 Gone`
//! disables the endpoint for good (persisted; to resume, configure it under
//! a new `id`). A crash at any point only causes a redelivery: consumers must
//! dedupe on `webhook-id`.
//!
//! **SSRF guard** — unless `allow_private_targets = true`, a target is
//! refused when its address (an IP in the URL, or every address its name
//! resolves to) is not public: loopback, private, link-local (including the
//! 169.254.169.254 metadata service), CGNAT, ULA, multicast, documentation,
//! IPv4-mapped/compatible and NAT64/6to4/Teredo forms ([`is_public`]). The
//! connection goes to the addresses that were checked (no second lookup, so
//! DNS rebinding cannot swap them), redirects are not followed, no proxy is
//! used, and the response body is never read or stored.
//!
//! **TLS** — `https://` endpoints are verified against the system's trusted
//! roots (rustls with the platform verifier), plus the certificates of
//! `ca_file` when set (a private CA); a certificate that does not verify is a
//! failed attempt, retried like any other. `http://` endpoints are allowed:
//! the body is signed (integrity), not encrypted.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::StreamExt;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use tokio::sync::watch;
use tollgate_ledger::{ClaimedEvent, Event, Ledger};

use crate::error::ErrorChain;
use crate::metrics::WebhookMetrics;

/// How far a receiver should accept `webhook-timestamp` from its own clock.
pub const TOLERANCE: Duration = Duration::from_secs(300);
/// Most signatures [`verify`] looks at in one `webhook-signature` header.
pub const MAX_SIGNATURES: usize = 32;
/// Events claimed (and sent concurrently) per outbox poll.
const BATCH: u32 = 16;
const SECRET_PREFIX: &str = "whsec_";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

// ------------------------------------------------------------------ secrets

/// A signing secret (`whsec_` + base64 of 24–64 bytes). `Debug` prints `***`.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// Parses `whsec_<base64>`.
    ///
    /// # Errors
    /// A message saying what is wrong (never echoing the secret).
    pub fn parse(text: &str) -> Result<WebhookSecret, String> {
        let Some(b64) = text.trim().strip_prefix(SECRET_PREFIX) else {
            return Err("a webhook secret must start with `whsec_`".to_owned());
        };
        let key = B64
            .decode(b64)
            .map_err(|_| "a webhook secret must be `whsec_` followed by base64".to_owned())?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "a webhook secret must hold 24 to 64 bytes (this one holds {})",
                key.len()
            ));
        }
        Ok(WebhookSecret(key))
    }

    /// A new random secret (32 bytes).
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn generate() -> Result<(WebhookSecret, String), getrandom::Error> {
        let mut key = vec![0u8; 32];
        getrandom::fill(&mut key)?;
        let text = format!("{SECRET_PREFIX}{}", B64.encode(&key));
        Ok((WebhookSecret(key), text))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}"))`.
pub fn sign(secret: &WebhookSecret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = secret.mac();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    B64.encode(mac.finalize().into_bytes())
}

/// The `webhook-signature` value: `v1,<sig>` per secret, space-separated.
pub fn signature_header(
    secrets: &[WebhookSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|s| format!("v1,{}", sign(s, id, timestamp, body)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a webhook did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A required header is absent or not text.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not an integer.
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    /// Too old or too far in the future (replay protection).
    #[error("webhook-timestamp is more than 5 minutes from now")]
    OutsideTolerance,
    /// More than [`MAX_SIGNATURES`] entries.
    #[error("too many signatures")]
    TooManySignatures,
    /// No `v1` signature matches any secret.
    #[error("no valid signature")]
    NoMatch,
}

/// Verifies a webhook as a receiver should: timestamp within [`TOLERANCE`] of
/// `now_unix`, then any `v1,` signature of the header matching any secret
/// (constant-time comparison). Rotation: pass the old and the new secret.
///
/// # Errors
/// [`VerifyError`].
pub fn verify(
    secrets: &[WebhookSecret],
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let tolerance = i64::try_from(TOLERANCE.as_secs()).unwrap_or(300);
    if now_unix.abs_diff(ts) > tolerance.unsigned_abs() {
        return Err(VerifyError::OutsideTolerance);
    }
    let entries: Vec<&str> = signatures.split_ascii_whitespace().collect();
    if entries.len() > MAX_SIGNATURES {
        return Err(VerifyError::TooManySignatures);
    }
    for entry in entries {
        let Some(sig) = entry.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = B64.decode(sig) else { continue };
        for secret in secrets {
            let mut mac = secret.mac();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(ts.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            if mac.verify_slice(&sig).is_ok() {
                return Ok(());
            }
        }
    }
    Err(VerifyError::NoMatch)
}

/// [`verify`] reading the three `webhook-*` headers.
///
/// # Errors
/// [`VerifyError`].
pub fn verify_headers(
    secrets: &[WebhookSecret],
    headers: &http::HeaderMap,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let get = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(VerifyError::MissingHeader(name))
    };
    verify(
        secrets,
        get("webhook-id")?,
        get("webhook-timestamp")?,
        get("webhook-signature")?,
        body,
        now_unix,
    )
}

// ------------------------------------------------------------------ config

/// `[server.webhooks]` as written. Every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksSection {
    /// Per-attempt timeout (default `10s`).
    pub timeout: Option<String>,
    /// Delivery rounds before an event is given up (default 8).
    pub max_attempts: Option<u32>,
    /// First retry delay (default `5s`).
    pub retry_min: Option<String>,
    /// Longest retry delay (default `1h`).
    pub retry_max: Option<String>,
    /// Outbox poll period when idle (default `1s`).
    pub poll_interval: Option<String>,
    /// Record a `credits_charged` event per charge (default false).
    pub charge_events: Option<bool>,
    /// Allow loopback/private targets (default false; tests and local use).
    pub allow_private_targets: Option<bool>,
    /// A PEM file of CA certificates trusted for `https://` endpoints besides
    /// the system's roots (default: none, system roots only).
    pub ca_file: Option<std::path::PathBuf>,
    /// The endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointSection>,
}

/// One `[[server.webhooks.endpoints]]` entry as written.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSection {
    /// Stable name (default: the URL).
    pub id: Option<String>,
    /// `https://host[:port]/path` (or `http://`).
    pub url: String,
    /// Inline `whsec_` secrets (prefer `secrets_env`).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Name of an environment variable holding whitespace-separated secrets.
    pub secrets_env: Option<String>,
    /// Event kinds to send (default: all).
    pub events: Option<Vec<String>>,
}

impl std::fmt::Debug for EndpointSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSection")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("secrets", &"***")
            .field("secrets_env", &self.secrets_env)
            .field("events", &self.events)
            .finish()
    }
}

/// A validated endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Stable id (deliveries and the 410 state are recorded under it).
    pub id: String,
    /// Target URL.
    pub url: reqwest::Url,
    /// Signing secrets (all sign; several while rotating).
    pub secrets: Vec<WebhookSecret>,
    /// Kinds sent; `None` = all.
    pub events: Option<Vec<String>>,
}

impl Endpoint {
    fn wants(&self, kind: &str) -> bool {
        self.events
            .as_ref()
            .is_none_or(|k| k.iter().any(|x| x == kind))
    }
}

/// Resolved webhook settings (see the module docs for each default).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Endpoints; none = no dispatcher runs.
    pub endpoints: Vec<Endpoint>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Delivery rounds before giving up.
    pub max_attempts: u32,
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Idle poll period.
    pub poll_interval: Duration,
    /// Record `credits_charged` events.
    pub charge_events: bool,
    /// Skip the SSRF guard.
    pub allow_private_targets: bool,
    /// CA certificates trusted for `https://` endpoints besides the system's.
    pub extra_roots: Vec<reqwest::Certificate>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            endpoints: Vec::new(),
            timeout: Duration::from_secs(10),
            max_attempts: 8,
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(1),
            charge_events: false,
            allow_private_targets: false,
            extra_roots: Vec::new(),
        }
    }
}

impl WebhookSettings {
    /// Validates a section (reading `secrets_env` variables).
    ///
    /// # Errors
    /// One message per problem; secrets are never echoed.
    pub fn parse(s: &WebhooksSection) -> Result<WebhookSettings, Vec<String>> {
        let mut out = WebhookSettings::default();
        let mut errors = Vec::new();
        for (field, value, slot) in [
            ("timeout", &s.timeout, &mut out.timeout),
            ("retry_min", &s.retry_min, &mut out.retry_min),
            ("retry_max", &s.retry_max, &mut out.retry_max),
            ("poll_interval", &s.poll_interval, &mut out.poll_interval),
        ] {
            if let Some(v) = value {
                match humantime::parse_duration(v) {
                    Ok(d) if !d.is_zero() => *slot = d,
                    _ => errors.push(format!(
                        "[server.webhooks] {field} = \"{v}\" is not a duration such as \"5s\""
                    )),
                }
            }
        }
        if let Some(n) = s.max_attempts {
            if n == 0 {
                errors.push("[server.webhooks] max_attempts must be at least 1".to_owned());
            }
            out.max_attempts = n.max(1);
        }
        if out.retry_max < out.retry_min {
            errors.push("[server.webhooks] retry_max must not be below retry_min".to_owned());
        }
        out.charge_events = s.charge_events.unwrap_or(false);
        out.allow_private_targets = s.allow_private_targets.unwrap_or(false);
        if let Some(path) = &s.ca_file {
            match read_roots(path) {
                Ok(roots) => out.extra_roots = roots,
                Err(m) => errors.push(format!("[server.webhooks] ca_file: {m}")),
            }
        }
        let mut ids = HashSet::new();
        for (i, e) in s.endpoints.iter().enumerate() {
            let at = format!("[[server.webhooks.endpoints]] #{}", i + 1);
            let url = match reqwest::Url::parse(&e.url) {
                Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => u,
                _ => {
                    errors.push(format!(
                        "{at}: url \"{}\" must be an https:// or http:// URL such as \"https://hooks.example.com/tollgate\"",
                        e.url
                    ));
                    continue;
                }
            };
            if !url.username().is_empty() || url.password().is_some() {
                errors.push(format!("{at}: url must not carry credentials"));
                continue;
            }
            let mut texts: Vec<String> = e.secrets.clone();
            if let Some(var) = &e.secrets_env {
                match std::env::var(var) {
                    Ok(v) => texts.extend(v.split_ascii_whitespace().map(str::to_owned)),
                    Err(_) => errors.push(format!(
                        "{at}: secrets_env: environment variable {var} is not set"
                    )),
                }
            }
            let mut secrets = Vec::new();
            for t in &texts {
                match WebhookSecret::parse(t) {
                    Ok(k) => secrets.push(k),
                    Err(m) => errors.push(format!("{at}: {m}")),
                }
            }
            if texts.is_empty() {
                errors.push(format!(
                    "{at}: give at least one signing secret (secrets_env or secrets)"
                ));
            }
            let id = e.id.clone().unwrap_or_else(|| e.url.clone());
            if id.is_empty() || id.len() > 256 {
                errors.push(format!("{at}: id must be 1 to 256 bytes"));
            }
            if !ids.insert(id.clone()) {
                errors.push(format!("{at}: id \"{id}\" is used twice"));
            }
            out.endpoints.push(Endpoint {
                id,
                url,
                secrets,
                events: e.events.clone(),
            });
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// How long a claimed event stays leased to one dispatcher: longer than
    /// one round of attempts to every endpoint, so two replicas never send
    /// it at the same time.
    pub fn lease(&self) -> Duration {
        let n = u32::try_from(self.endpoints.len())
            .unwrap_or(u32::MAX)
            .max(1);
        self.timeout.saturating_mul(n + 1) + Duration::from_secs(1)
    }
}

/// The CA certificates of a PEM file (at least one; the file is read once,
/// at load).
fn read_roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(roots) if !roots.is_empty() => Ok(roots),
        Ok(_) => Err(format!(
            "{} holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        )),
        Err(e) => Err(format!(
            "{} is not a PEM certificate file: {e}",
            path.display()
        )),
    }
}

/// Delay before delivery round `round + 1` after `round` failed rounds
/// (`round ≥ 1`): `min(retry_min · 2^(round-1), retry_max)` plus a random
/// jitter of up to 100 % of that (backon's exponential back-off).
pub fn retry_delay(settings: &WebhookSettings, round: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(settings.retry_min)
        .with_max_delay(settings.retry_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(usize::try_from(round.max(1) - 1).unwrap_or(usize::MAX))
        .unwrap_or(settings.retry_max)
}

// ------------------------------------------------------------------ SSRF guard

/// Whether `ip` is a public unicast address a webhook may be sent to.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network"
        || a == 10                             // private
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || (a == 169 && b == 254)              // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // documentation
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // documentation
        || (a == 203 && b == 0 && c == 113)    // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d, incl. :: and ::1).
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return false;
    }
    !((s[0] & 0xfe00) == 0xfc00                 // ULA fc00::/7
        || (s[0] & 0xffc0) == 0xfe80           // link-local
        || (s[0] & 0xffc0) == 0xfec0           // site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00           // multicast
        || (s[0] == 0x64 && s[1] == 0xff9b)    // NAT64 (embeds IPv4)
        || (s[0] == 0x2001 && s[1] == 0x0db8)  // documentation
        || (s[0] == 0x2001 && s[1] == 0)       // Teredo (embeds IPv4)
        || s[0] == 0x2002                      // 6to4 (embeds IPv4)
        || (s[0] == 0x0100 && s[1..4] == [0; 3])) // discard-only
}

/// Looks up a host name's addresses (swappable in tests).
pub trait HostResolver: Send + Sync + 'static {
    /// The addresses of `host`.
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;
}

/// The system resolver (`getaddrinfo` via tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Why a target was refused.
#[derive(Debug, thiserror::Error)]
#[error("webhook target {host} has no public address (SSRF guard)")]
pub struct TargetRefused {
    /// The host name or address.
    pub host: String,
}

/// reqwest's resolver: resolves once, keeps only public addresses (unless
/// private targets are allowed), and hands exactly those to the connector,
/// so the address checked is the address connected to.
#[derive(Clone)]
pub struct GuardedResolver {
    inner: Arc<dyn HostResolver>,
    allow_private: bool,
}

impl GuardedResolver {
    /// A guard over `inner`.
    pub fn new(inner: Arc<dyn HostResolver>, allow_private: bool) -> GuardedResolver {
        GuardedResolver {
            inner,
            allow_private,
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let inner = self.inner.clone();
        let allow = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = inner.lookup(&host).await?;
            let ok: Vec<SocketAddr> = found
                .into_iter()
                .filter(|ip| allow || is_public(*ip))
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if ok.is_empty() {
                return Err(
                    Box::new(TargetRefused { host }) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

// ------------------------------------------------------------------ delivery

/// What one attempt to one endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx: accepted.
    Accepted(u16),
    /// 410: the endpoint is gone; disable it.
    Gone,
    /// Any other status (3xx included: redirects are not followed).
    Failed(u16),
    /// Refused by the SSRF guard.
    Refused,
    /// Connection error or timeout.
    Unreachable,
}

/// The delivery task: owns an HTTP client and a lease identity.
#[derive(Clone)]
pub struct Dispatcher {
    ledger: Ledger,
    settings: Arc<WebhookSettings>,
    client: reqwest::Client,
    owner: String,
    metrics: WebhookMetrics,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher using the system resolver.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(ledger: Ledger, settings: WebhookSettings) -> Result<Dispatcher, String> {
        Self::with_resolver(ledger, settings, Arc::new(SystemResolver))
    }

    /// A dispatcher with its own resolver (tests).
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn with_resolver(
        ledger: Ledger,
        settings: WebhookSettings,
        resolver: Arc<dyn HostResolver>,
    ) -> Result<Dispatcher, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .pool_max_idle_per_host(4)
            .tls_certs_merge(settings.extra_roots.iter().cloned())
            .user_agent(concat!("tollgate-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(GuardedResolver::new(
                resolver,
                settings.allow_private_targets,
            ))
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        Ok(Dispatcher {
            ledger,
            settings: Arc::new(settings),
            client,
            owner: uuid::Uuid::now_v7().to_string(),
            metrics: WebhookMetrics::default(),
        })
    }

    /// Counts deliveries into `metrics` (by default into handles no registry shows).
    pub fn with_metrics(mut self, metrics: WebhookMetrics) -> Dispatcher {
        self.metrics = metrics;
        self
    }

    /// Starts the delivery loop when endpoints are configured.
    pub fn spawn(
        ledger: Ledger,
        settings: WebhookSettings,
        metrics: WebhookMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if settings.endpoints.is_empty() {
            return None;
        }
        match Dispatcher::new(ledger, settings) {
            Ok(d) => Some(tokio::spawn(d.with_metrics(metrics).run(shutdown))),
            Err(e) => {
                tracing::error!(error = %e, "webhook delivery disabled");
                None
            }
        }
    }

    /// Delivers until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let busy = match self.round().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook outbox unavailable");
                    false
                }
            };
            if !busy {
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }

    /// One poll: claims due events and delivers them. Returns how many.
    ///
    /// # Errors
    /// The database failed.
    pub async fn round(&self) -> Result<usize, tollgate_ledger::LedgerError> {
        if !self.ledger.has_due_events().await? {
            return Ok(0);
        }
        let claimed = self
            .ledger
            .claim_events(&self.owner, BATCH, self.settings.lease())
            .await?;
        let n = claimed.len();
        let disabled: HashSet<String> = self
            .ledger
            .disabled_endpoints()
            .await?
            .into_iter()
            .collect();
        let disabled = &disabled;
        futures_util::stream::iter(claimed)
            .for_each_concurrent(None, |c| async move {
                if let Err(e) = self.deliver(c, disabled).await {
                    tracing::warn!(error = %e, "webhook bookkeeping failed; the event will be sent again");
                }
            })
            .await;
        Ok(n)
    }

    async fn deliver(
        &self,
        c: ClaimedEvent,
        disabled: &HashSet<String>,
    ) -> Result<(), tollgate_ledger::LedgerError> {
        let body = payload(&c.event);
        let mut failed = false;
        for ep in &self.settings.endpoints {
            if !ep.wants(&c.event.kind)
                || disabled.contains(&ep.id)
                || c.delivered_to.contains(&ep.id)
            {
                continue;
            }
            match self.send(ep, &c.event.id, body.clone()).await {
                Attempt::Accepted(status) => {
                    self.metrics.attempt(&ep.id, "accepted");
                    self.ledger
                        .record_delivery(&c.event.id, &ep.id, status)
                        .await?;
                }
                Attempt::Gone => {
                    self.metrics.attempt(&ep.id, "gone");
                    tracing::warn!(endpoint = %ep.id, "webhook endpoint answered 410 Gone; disabled");
                    self.ledger.disable_endpoint(&ep.id, 410).await?;
                }
                outcome => {
                    self.metrics.attempt(&ep.id, "failed");
                    tracing::debug!(endpoint = %ep.id, ?outcome, "webhook delivery failed");
                    failed = true;
                }
            }
        }
        if !failed {
            return self.ledger.finish_event(&c.event.id).await;
        }
        let round = c.attempts.saturating_add(1);
        let give_up = round >= self.settings.max_attempts;
        if give_up {
            self.metrics.given_up.inc();
            tracing::warn!(event = %c.event.id, rounds = round, "webhook event given up");
        }
        self.ledger
            .reschedule_event(
                &c.event.id,
                &self.owner,
                retry_delay(&self.settings, round),
                give_up,
            )
            .await
    }

    /// Sends one signed request; never reads the response body.
    pub async fn send(&self, ep: &Endpoint, id: &str, body: Bytes) -> Attempt {
        if !self.settings.allow_private_targets {
            // An address in the URL is connected to without a lookup: check it
            // here (the URL parser has already normalised forms like 2130706433).
            let Some(host) = ep.url.host_str() else {
                return Attempt::Refused;
            };
            let literal = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok();
            if literal.is_some_and(|ip| !is_public(ip)) {
                return Attempt::Refused;
            }
        }
        let ts = jiff::Timestamp::now().as_second();
        let signature = signature_header(&ep.secrets, id, ts, &body);
        let result = self
            .client
            .post(ep.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                drop(resp);
                match status {
                    200..=299 => Attempt::Accepted(status),
                    410 => Attempt::Gone,
                    s => Attempt::Failed(s),
                }
            }
            Err(e) if is_refusal(&e) => Attempt::Refused,
            Err(e) => {
                // Why (refused, timed out, a certificate that did not
                // verify); without the URL, which may hold a secret.
                tracing::warn!(
                    endpoint = %ep.id,
                    error = %ErrorChain(&e.without_url()),
                    "webhook endpoint unreachable"
                );
                Attempt::Unreachable
            }
        }
    }
}

fn is_refusal(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<TargetRefused>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The body sent for an event: `{"type", "timestamp", "data"}` (Standard
/// Webhooks' recommended shape), `data` being the event's details plus
/// `account`.
pub fn payload(e: &Event) -> Bytes {
    let mut data = match &e.data {
        serde_json::Value::Object(m) => m.clone(),
        other => {
            let mut m = serde_json::Map::new();
            m.insert("value".into(), other.clone());
            m
        }
    };
    if let Some(a) = &e.account {
        data.entry("account")
            .or_insert_with(|| serde_json::Value::String(a.clone()));
    }
    let doc = serde_json::json!({
        "type": e.kind,
        "timestamp": e.at.to_string(),
        "data": data,
    });
    Bytes::from(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> (WebhookSecret, String) {
        let text = format!("whsec_{}", B64.encode([byte; 32]));
        (WebhookSecret::parse(&text).expect("valid"), text)
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example of the Standard Webhooks specification (and svix's libraries).
        let s =
            WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("spec secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&s, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert!(WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        let short = format!("whsec_{}", B64.encode([7u8; 23]));
        assert!(WebhookSecret::parse(&short).is_err());
        let (s, text) = secret(1);
        assert_eq!(format!("{s:?}"), "***");
        let (_, generated) = WebhookSecret::generate().expect("random");
        assert!(WebhookSecret::parse(&generated).is_ok());
        assert!(!format!("{s:?}").contains(&text[6..]));
    }

    #[test]
    fn retry_delays_grow_with_jitter_and_stop_at_the_cap() {
        let s = WebhookSettings {
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(60),
            ..WebhookSettings::default()
        };
        for _ in 0..50 {
            for (round, base) in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (9, 60)] {
                let d = retry_delay(&s, round);
                let base = Duration::from_secs(base);
                assert!(d >= base && d < base * 2, "round {round}: {d:?}");
            }
        }
    }

    #[test]
    fn public_and_non_public_addresses() {
        for bad in [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
            "2001:db8::1",
        ] {
            let ip: IpAddr = bad.parse().expect(bad);
            assert!(!is_public(ip), "{bad} must be refused");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            let ip: IpAddr = good.parse().expect(good);
            assert!(is_public(ip), "{good} must be allowed");
        }
    }

    #[test]
    fn endpoint_config_is_validated() {
        let (_, text) = secret(3);
        let ok = WebhooksSection {
            endpoints: vec![EndpointSection {
                url: "http://hooks.example.com/x".into(),
                secrets: vec![text.clone()],
                ..EndpointSection::default()
            }],
            ..WebhooksSection::default()
        };
        let s = WebhookSettings::parse(&ok).expect("valid");
        assert_eq!(s.endpoints[0].id, "http://hooks.example.com/x");
        let bad = WebhooksSection {
            timeout: Some("soon".into()),
            endpoints: vec![
                EndpointSection {
                    url: "ftp://x".into(),
                    secrets: vec![text.clone()],
                    ..EndpointSection::default()
                },
                EndpointSection {
                    url: "http://a.example/".into(),
                    secrets: vec!["whsec_short".into()],
                    ..EndpointSection::default()
                },
                EndpointSection {
                    url: "http://b.example/".into(),
                    ..EndpointSection::default()
                },
            ],
            ..WebhooksSection::default()
        };
        let errors = WebhookSettings::parse(&bad).expect_err("invalid");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().all(|e| !e.contains(&text[6..])));
    }

    // ---------------------------------------------------------- G5

    fn headers_for(id: &str, ts: i64, sig: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("webhook-id", id.parse().expect("id"));
        h.insert("webhook-timestamp", ts.to_string().parse().expect("ts"));
        h.insert("webhook-signature", sig.parse().expect("sig"));
        h
    }

    /// G5: forged, replayed and tampered webhooks are refused; rotation works.
    #[test]
    fn g5_signature_verification_vectors() {
        let (old, _) = secret(1);
        let (new, _) = secret(2);
        let (wrong, _) = secret(3);
        let body = br#"{"type":"credits_low","data":{"balance":3}}"#;
        let (id, now) = ("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", 1_790_000_000i64);
        let one = signature_header(std::slice::from_ref(&new), id, now, body);
        let ok = |secrets: &[WebhookSecret], sig: &str, b: &[u8], ts: i64, at: i64| {
            verify_headers(secrets, &headers_for(id, ts, sig), b, at)
        };
        assert_eq!(ok(std::slice::from_ref(&new), &one, body, now, now), Ok(()));
        // wrong secret
        assert_eq!(
            ok(std::slice::from_ref(&wrong), &one, body, now, now),
            Err(VerifyError::NoMatch)
        );
        // every single-bit change of the body
        for i in 0..body.len() {
            for bit in 0..8 {
                let mut b = body.to_vec();
                b[i] ^= 1 << bit;
                assert_eq!(
                    ok(std::slice::from_ref(&new), &one, &b, now, now),
                    Err(VerifyError::NoMatch)
                );
            }
        }
        // timestamp tolerance: ±300 s accepted, ±301 s refused (replay)
        for (at, expect) in [
            (now + 300, Ok(())),
            (now - 300, Ok(())),
            (now + 301, Err(VerifyError::OutsideTolerance)),
            (now - 301, Err(VerifyError::OutsideTolerance)),
        ] {
            assert_eq!(
                ok(std::slice::from_ref(&new), &one, body, now, at),
                expect,
                "at {at}"
            );
        }
        // a signature replayed under another timestamp or id
        assert_eq!(
            ok(std::slice::from_ref(&new), &one, body, now + 1, now),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify(
                std::slice::from_ref(&new),
                "other-id",
                &now.to_string(),
                &one,
                body,
                now
            ),
            Err(VerifyError::NoMatch)
        );
        // missing headers
        for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut h = headers_for(id, now, &one);
            h.remove(missing);
            assert_eq!(
                verify_headers(std::slice::from_ref(&new), &h, body, now),
                Err(VerifyError::MissingHeader(missing))
            );
        }
        // 100 signatures in one header: refused without trying them all
        let junk = format!("v1,{}", B64.encode([0u8; 32]));
        let mut many = vec![junk.as_str(); 99];
        many.push(one.as_str());
        assert_eq!(
            ok(std::slice::from_ref(&new), &many.join(" "), body, now, now),
            Err(VerifyError::TooManySignatures)
        );
        assert_eq!(
            ok(
                std::slice::from_ref(&new),
                "v2,abc v1,!!! garbage",
                body,
                now,
                now
            ),
            Err(VerifyError::NoMatch)
        );
        // rotation: both secrets sign; a receiver on either one accepts
        let both = signature_header(&[old.clone(), new.clone()], id, now, body);
        assert_eq!(both.split(' ').count(), 2);
        assert_eq!(
            ok(std::slice::from_ref(&old), &both, body, now, now),
            Ok(())
        );
        assert_eq!(
            ok(std::slice::from_ref(&new), &both, body, now, now),
            Ok(())
        );
        assert_eq!(
            ok(&[old.clone(), new.clone()], &one, body, now, now),
            Ok(())
        );
        // after rotation (new only), a receiver still on the old secret refuses
        assert_eq!(
            ok(std::slice::from_ref(&old), &one, body, now, now),
            Err(VerifyError::NoMatch)
        );
    }

    /// A stub resolver: fixed answers per name; `rebind.test` answers a public
    /// address first and loopback afterwards (DNS rebinding).
    struct StubResolver(std::sync::Mutex<u32>);

    impl HostResolver for StubResolver {
        fn lookup(
            &self,
            host: &str,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
            let mut calls = self.0.lock().expect("calls");
            *calls += 1;
            let ips: Vec<IpAddr> = match host {
                "metadata.test" => vec!["169.254.169.254".parse().expect("ip")],
                "mixed.test" => vec!["10.1.2.3".parse().expect("ip"), "::1".parse().expect("ip")],
                "rebind.test" if *calls == 1 => vec!["93.184.216.34".parse().expect("ip")],
                "rebind.test" => vec!["127.0.0.1".parse().expect("ip")],
                _ => vec!["127.0.0.1".parse().expect("ip")],
            };
            Box::pin(async move { Ok(ips) })
        }
    }

    /// A test receiver: records every request, answers the given status (and
    /// `location` for redirects).
    #[derive(Clone, Default)]
    struct Receiver {
        seen: Arc<std::sync::Mutex<Vec<(http::HeaderMap, Bytes)>>>,
    }

    impl Receiver {
        async fn start(status: u16, location: Option<String>) -> (Receiver, SocketAddr) {
            let (r, app) = Receiver::app(status, location);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            (r, addr)
        }

        /// The same receiver behind TLS with `tls`'s certificate.
        async fn start_tls(
            status: u16,
            tls: tokio_rustls::rustls::ServerConfig,
        ) -> (Receiver, SocketAddr) {
            let (r, app) = Receiver::app(status, None);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    tokio::spawn(async move {
                        // A client that refuses the certificate ends here.
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |req| {
                            tower::ServiceExt::oneshot(app.clone(), req)
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                    });
                }
            });
            (r, addr)
        }

        fn app(status: u16, location: Option<String>) -> (Receiver, axum::Router) {
            let r = Receiver::default();
            let seen = r.seen.clone();
            let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                let seen = seen.clone();
                let location = location.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let bytes = http_body_util::BodyExt::collect(body)
                        .await
                        .expect("body")
                        .to_bytes();
                    seen.lock().expect("seen").push((parts.headers, bytes));
                    let mut b = http::Response::builder().status(status);
                    if let Some(l) = location {
                        b = b.header("location", l);
                    }
                    b.body(axum::body::Body::from("receiver says hello"))
                        .expect("response")
                }
            });
            (r, app)
        }

        fn count(&self) -> usize {
            self.seen.lock().expect("seen").len()
        }
    }

    async fn temp_ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.db");
        let ledger = Ledger::open(path.to_str().expect("utf-8"))
            .await
            .expect("ledger");
        (dir, ledger)
    }

    fn endpoint(id: &str, url: &str, secrets: Vec<WebhookSecret>) -> Endpoint {
        Endpoint {
            id: id.into(),
            url: reqwest::Url::parse(url).expect("url"),
            secrets,
            events: None,
        }
    }

    fn settings(endpoints: Vec<Endpoint>, allow_private: bool) -> WebhookSettings {
        WebhookSettings {
            endpoints,
            timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(20),
            retry_max: Duration::from_millis(40),
            allow_private_targets: allow_private,
            ..WebhookSettings::default()
        }
    }

    /// G5: no delivery reaches a non-public address, whether it is written in
    /// the URL or behind a name; the address checked is the one used.
    #[tokio::test]
    async fn g5_ssrf_guard_refuses_non_public_targets() {
        let (_dir, ledger) = temp_ledger().await;
        let (receiver, addr) = Receiver::start(200, None).await;
        let (key, _) = secret(4);
        let port = addr.port();
        let targets = [
            format!("http://127.0.0.1:{port}/"),
            format!("http://127.8.9.10:{port}/"),
            format!("http://2130706433:{port}/"), // 127.0.0.1 written as one number
            "http://10.0.0.1:9/".to_owned(),
            "http://172.16.0.1:9/".to_owned(),
            "http://172.31.255.254:9/".to_owned(),
            "http://192.168.0.1:9/".to_owned(),
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            format!("http://[::1]:{port}/"),
            "http://[fc00::1]:9/".to_owned(),
            "http://[fd12:3456::1]:9/".to_owned(),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("http://localhost.test:{port}/"),
            "http://metadata.test/".to_owned(),
            "http://mixed.test:9/".to_owned(),
        ];
        let resolver = Arc::new(StubResolver(std::sync::Mutex::new(0)));
        let d = Dispatcher::with_resolver(ledger.clone(), settings(vec![], false), resolver)
            .expect("dispatcher");
        for t in &targets {
            let ep = endpoint("t", t, vec![key.clone()]);
            assert_eq!(
                d.send(&ep, "evt", Bytes::from_static(b"{}")).await,
                Attempt::Refused,
                "{t}"
            );
        }
        assert_eq!(receiver.count(), 0, "a refused target was contacted");

        // Rebinding: each resolution is checked and its result is what the
        // connector gets; the second (private) answer is refused.
        let guard = GuardedResolver::new(Arc::new(StubResolver(std::sync::Mutex::new(0))), false);
        let name = |n: &str| n.parse::<reqwest::dns::Name>().expect("name");
        let first: Vec<SocketAddr> = reqwest::dns::Resolve::resolve(&guard, name("rebind.test"))
            .await
            .expect("public answer")
            .collect();
        assert_eq!(
            first,
            vec!["93.184.216.34:0".parse::<SocketAddr>().expect("addr")]
        );
        assert!(
            reqwest::dns::Resolve::resolve(&guard, name("rebind.test"))
                .await
                .is_err()
        );

        // The same loopback receiver with the explicit opt-in: delivered, so
        // the refusals above are the guard's doing.
        let open = Dispatcher::with_resolver(
            ledger,
            settings(vec![], true),
            Arc::new(StubResolver(std::sync::Mutex::new(0))),
        )
        .expect("dispatcher");
        let ep = endpoint("t", &format!("http://localhost.test:{port}/"), vec![key]);
        assert_eq!(
            open.send(&ep, "evt", Bytes::from_static(b"{}")).await,
            Attempt::Accepted(200)
        );
        assert_eq!(receiver.count(), 1);
    }

    /// G5: redirects are never followed (the event stays due and is retried);
    /// 410 disables the endpoint; a delivered event is signed and verifies.
    #[tokio::test]
    async fn g5_redirects_not_followed_and_gone_disables() {
        let (_dir, ledger) = temp_ledger().await;
        let (key, _) = secret(5);
        let (target, target_addr) = Receiver::start(200, None).await;
        let (redirector, r_addr) =
            Receiver::start(307, Some(format!("http://{target_addr}/stolen"))).await;
        let (gone, g_addr) = Receiver::start(410, None).await;
        let eps = vec![
            endpoint(
                "redirector",
                &format!("http://{r_addr}/hook"),
                vec![key.clone()],
            ),
            endpoint("gone", &format!("http://{g_addr}/hook"), vec![key.clone()]),
        ];
        let metrics = WebhookMetrics::default();
        let d = Dispatcher::new(ledger.clone(), settings(eps, true))
            .expect("dispatcher")
            .with_metrics(metrics.clone());
        let attempts = |endpoint: &str, outcome: &str| {
            metrics
                .deliveries
                .get_or_create(&crate::metrics::WebhookLabels {
                    endpoint: endpoint.to_owned(),
                    outcome: outcome.to_owned(),
                })
                .get()
        };
        ledger
            .record_event(&tollgate_ledger::NewEvent {
                account: Some("acme".into()),
                kind: "credits_low".into(),
                data: serde_json::json!({ "balance": 1 }),
            })
            .await
            .expect("event");
        for _ in 0..3 {
            d.round().await.expect("round");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            redirector.count() >= 2,
            "the redirecting endpoint is retried"
        );
        assert_eq!(target.count(), 0, "a redirect was followed");
        assert_eq!(gone.count(), 1, "a 410 endpoint got another request");
        assert_eq!(
            ledger.disabled_endpoints().await.expect("disabled"),
            vec!["gone".to_owned()]
        );
        assert_eq!(ledger.outbox_stats().await.expect("stats").pending, 1);
        assert_eq!(attempts("gone", "gone"), 1);
        assert_eq!(attempts("redirector", "failed"), redirector.count() as u64);
        assert_eq!(attempts("redirector", "accepted"), 0);
        // Enabled again, the endpoint gets the pending event (and, answering
        // 410 again, is disabled again).
        assert!(ledger.enable_endpoint("gone").await.expect("enable"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        d.round().await.expect("round");
        assert_eq!(gone.count(), 2, "an enabled endpoint was not sent to");
        assert_eq!(attempts("gone", "gone"), 2);
        let (headers, body) = redirector.seen.lock().expect("seen")[0].clone();
        let now = jiff::Timestamp::now().as_second();
        assert_eq!(verify_headers(&[key], &headers, &body, now), Ok(()));
        let doc: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(doc["type"], "credits_low");
        assert_eq!(doc["data"]["account"], "acme");
    }

    /// A private CA and a certificate it issued for `localhost`: the CA's
    /// PEM and the receiver's TLS settings.
    fn private_ca() -> (String, tokio_rustls::rustls::ServerConfig) {
        use tokio_rustls::rustls;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("leaf params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        )
        .expect("server config");
        (ca.pem(), tls)
    }

    /// `https://` endpoints: delivered when the certificate verifies against
    /// `ca_file`, refused (a failed attempt, nothing sent) when it does not.
    #[tokio::test]
    async fn https_endpoints_verify_the_receivers_certificate() {
        let (_dir, ledger) = temp_ledger().await;
        let (key, key_text) = secret(6);
        let (ca_pem, tls) = private_ca();
        let (receiver, addr) = Receiver::start_tls(200, tls).await;
        let url = format!("https://localhost:{}/hook", addr.port());
        let ca_dir = tempfile::tempdir().expect("dir");
        let ca_file = ca_dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write ca");
        let section = |ca_file: Option<std::path::PathBuf>| WebhooksSection {
            allow_private_targets: Some(true),
            ca_file,
            endpoints: vec![EndpointSection {
                id: Some("tls".into()),
                url: url.clone(),
                secrets: vec![key_text.clone()],
                ..EndpointSection::default()
            }],
            ..WebhooksSection::default()
        };
        let body = Bytes::from_static(b"{\"type\":\"credits_low\"}");

        let trusted = WebhookSettings::parse(&section(Some(ca_file))).expect("settings");
        assert_eq!(trusted.extra_roots.len(), 1);
        let ep = trusted.endpoints[0].clone();
        let d = Dispatcher::new(ledger.clone(), trusted).expect("dispatcher");
        assert_eq!(
            d.send(&ep, "evt_1", body.clone()).await,
            Attempt::Accepted(200)
        );
        assert_eq!(receiver.count(), 1);
        let (headers, seen) = receiver.seen.lock().expect("seen")[0].clone();
        let now = jiff::Timestamp::now().as_second();
        assert_eq!(verify_headers(&[key], &headers, &seen, now), Ok(()));

        // Without the CA the system roots do not know the certificate.
        let untrusted = WebhookSettings::parse(&section(None)).expect("settings");
        let d = Dispatcher::new(ledger, untrusted).expect("dispatcher");
        assert_eq!(d.send(&ep, "evt_2", body).await, Attempt::Unreachable);
        assert_eq!(
            receiver.count(),
            1,
            "a request went to an unverified server"
        );
    }

    #[test]
    fn ca_file_problems_are_reported() {
        let dir = tempfile::tempdir().expect("dir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        for (path, expect) in [
            (dir.path().join("missing.pem"), "cannot read"),
            (garbage, "holds no certificate"),
        ] {
            let errors = WebhookSettings::parse(&WebhooksSection {
                ca_file: Some(path),
                ..WebhooksSection::default()
            })
            .expect_err("invalid");
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with("[server.webhooks] ca_file: "),
                "{errors:?}"
            );
            assert!(errors[0].contains(expect), "{errors:?}");
        }
    }
}

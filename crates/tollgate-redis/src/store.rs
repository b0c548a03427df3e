//! [`RedisStore`]: the [`Store`] over Redis or Redis Cluster.
//!
//! See the crate docs for the key layout, the clock and the guarantees; the
//! script's `KEYS`/`ARGV` layout and return shape are in
//! `scripts/decide.lua` (and repeated in the crate docs).

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, ScriptInvocation, Value};
use tollgate_core::algorithm::Evaluation;
use tollgate_core::algorithm::sliding_window::Precision;
use tollgate_core::{Check, CounterKey, Nanos, Params, Store, StoreError};

use crate::health::{self, DEFAULT_MAX_IN_FLIGHT, Health};
mod cross_slot;

/// The decision script, loaded once per server and run by its SHA1.
static DECIDE: LazyLock<Script> = LazyLock::new(|| Script::new(crate::DECIDE_SCRIPT));
/// The lease release script.
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(crate::RELEASE_SCRIPT));

/// Shortest wait before a reconnection attempt (jittered up to twice as long).
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts before jitter.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// Default bound on one decision, connection wait included: 50 ms.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "tg:";

/// Whose clock the scripts use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeSource {
    /// The Redis server's clock (`TIME` inside the script): every replica of
    /// tollgate decides on the same clock, whatever its own skew (A11). The
    /// `now` passed to [`Store::decide`] is ignored. Default.
    #[default]
    Server,
    /// The `now` given by the caller (the engine's clock): for tests on a
    /// manual clock, such as the store conformance suite. Key TTLs are then
    /// relative to that clock while Redis expires keys in real time, so only
    /// use it where the caller's clock does not run behind real time.
    Caller,
}

/// How to reach Redis.
#[derive(Clone)]
enum Conn {
    /// One server (`redis://`): one multiplexed connection that pipelines
    /// concurrent decisions and reconnects with jittered back-off.
    Single(ConnectionManager),
    /// A Cluster (`redis-cluster://`): slot routing, MOVED/ASK handled by `redis`.
    Cluster(ClusterConnection),
}

/// Settings of a [`RedisStore`]; made by [`RedisStore::builder`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    time: TimeSource,
    max_in_flight: usize,
}

impl RedisStoreBuilder {
    /// Key prefix (default `tg:`): every key this store writes starts with it.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Longest wait for one decision or release, including waiting for a
    /// connection (default 50 ms); past it the call fails with
    /// [`StoreError::Timeout`] and the limit's `on_store_error` applies.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whose clock the scripts use (default [`TimeSource::Server`]).
    pub fn with_time_source(mut self, time: TimeSource) -> Self {
        self.time = time;
        self
    }

    /// Most calls waiting on Redis at once (default 1,024, at least 1); one
    /// more fails at once with the `overloaded` store error, so a hung Redis
    /// cannot pile up waiting decisions (B2).
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max;
        self
    }

    /// Creates the store. Does not need Redis to be up: connections are made
    /// in the background and on demand, so a gateway starts while Redis is
    /// away (B6), its decisions fail with [`StoreError`] until Redis answers,
    /// and [`RedisStore::ping`] reports readiness. If Redis answers within the
    /// timeout, the connection is opened and the scripts are loaded now.
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL cannot be parsed.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let conn = if let Some(nodes) = self.url.strip_prefix("redis-cluster://") {
            let nodes: Vec<String> = nodes
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| format!("redis://{n}"))
                .collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(Duration::from_millis(500))
                .min_retry_wait(10)
                .max_retry_wait(500)
                .build()
                .map_err(|_| StoreError::Unavailable("invalid redis-cluster:// URL"))?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(Duration::from_millis(500));
            Conn::Cluster(client.get_pending_async_connection_with_config(config))
        } else {
            let client = redis::Client::open(self.url.as_str())
                .map_err(|_| StoreError::Unavailable("invalid redis:// URL"))?;
            // Reconnect with jittered exponential back-off: the n-th retry
            // waits d·(1 + U[0,1)) with d = 100 ms, 200 ms, 400 ms, then
            // 500 ms: at least 100 ms between attempts (≤ 10 per second,
            // B5), and a Redis that is back is found within a second (B1).
            // After the last retry the next call (or the breaker's probe)
            // starts a new round.
            let config = ConnectionManagerConfig::new()
                .set_min_delay(RECONNECT_MIN_DELAY)
                .set_max_delay(RECONNECT_MAX_DELAY)
                .set_exponent_base(2.0)
                .set_number_of_retries(6)
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(None);
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|_| StoreError::Unavailable("invalid redis connection settings"))?;
            Conn::Single(manager)
        };
        let mut instance = [0u8; 8];
        getrandom::fill(&mut instance)
            .map_err(|_| StoreError::Unavailable("no randomness for the store instance id"))?;
        // The breaker (and its probe) serve a standalone server; in a Cluster
        // one node's trouble must not stop decisions on the others.
        let breaker = matches!(conn, Conn::Single(_));
        let health = Arc::new(Health::new(self.max_in_flight, breaker));
        if breaker {
            let conn = conn.clone();
            tokio::spawn(health::probe(
                Arc::downgrade(&health),
                self.timeout,
                move || raw_ping(conn.clone()),
            ));
        }
        let store = RedisStore {
            conn,
            prefix: self.prefix,
            timeout: self.timeout,
            time: self.time,
            instance: u64::from_le_bytes(instance),
            health,
        };
        // Warm up: open the connection and load the scripts if Redis is there.
        let _ = store.load_scripts().await;
        Ok(store)
    }
}

/// Counters in Redis or a Redis Cluster, shared by every tollgate replica.
///
/// Cheap to clone (the connection is shared and multiplexed).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    timeout: Duration,
    time: TimeSource,
    /// Random per store: lease owners are `<instance>:<lease>`, since lease
    /// ids are only unique within one process.
    instance: u64,
    /// In-flight cap and circuit breaker.
    health: Arc<Health>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No URL: it may carry a password.
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &match self.conn {
                    Conn::Single(_) => "standalone",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("time", &self.time)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Settings for a store at `url`: `redis://[user:password@]host:port[/db]`
    /// for one server, `redis-cluster://host:port,host:port,…` for the seed
    /// nodes of a Cluster.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            time: TimeSource::Server,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// A store at `url` with the default settings (prefix `tg:`, 50 ms
    /// timeout, server clock). See [`RedisStoreBuilder::connect`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL cannot be parsed.
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        RedisStore::builder(url).connect().await
    }

    /// The bound on one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether Redis answers a `PING` within the timeout: what `/readyz`
    /// shows. Not refused by an open breaker, nor counted in flight.
    ///
    /// # Errors
    /// The mapped Redis error, or [`StoreError::Timeout`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        match tokio::time::timeout(self.timeout, raw_ping(self.conn.clone())).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Redis's `maxmemory-policy` when it can evict keys that have no TTL
    /// relation to their windows (`allkeys-*`): evicting a live counter hands
    /// its capacity out again (RELIABILITY-PLAN B4). `None` when the policy
    /// is safe (`noeviction`, `volatile-*`: every counter has a TTL, and
    /// `volatile-ttl` evicts the ones closest to their fresh state first) or
    /// cannot be read (`CONFIG` disabled on managed Redis, or Redis away).
    pub async fn evicting_policy(&self) -> Option<String> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let reply = tokio::time::timeout(self.timeout, async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async::<Vec<String>>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<Vec<String>>(&mut c).await,
            }
        })
        .await
        .ok()?
        .ok()?;
        reply.get(1).filter(|p| p.starts_with("allkeys-")).cloned()
    }

    /// Whether the store is taking calls: `false` while the circuit breaker
    /// is open (Redis stopped answering; calls fail at once). What the
    /// server's `store_unavailable` gauge shows. Never blocks.
    pub fn is_available(&self) -> bool {
        !self.health.is_open()
    }

    /// Calls waiting on Redis now.
    pub fn in_flight(&self) -> usize {
        self.health.in_flight()
    }

    /// Most calls that were ever waiting on Redis at once (never above the cap).
    pub fn peak_in_flight(&self) -> usize {
        self.health.peak_in_flight()
    }

    /// How many times the circuit breaker opened.
    pub fn circuit_opened(&self) -> u64 {
        self.health.times_opened()
    }

    /// Whether [`RedisStore::ping`] succeeds.
    pub async fn is_ready(&self) -> bool {
        self.ping().await.is_ok()
    }

    /// The Redis key of a counter: `<prefix>{<scope>}:<counter>`, where the
    /// scope is the high 64 bits of the key (the hash of the scope values) and
    /// is the Cluster hash tag.
    pub fn redis_key(&self, key: CounterKey) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 36);
        s.push_str(&self.prefix);
        let _ = write!(s, "{{{:016x}}}:{:016x}", (key.0 >> 64) as u64, key.0 as u64);
        s
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        self.bounded(async {
            match self.conn.clone() {
                Conn::Single(mut c) => {
                    DECIDE.load_async(&mut c).await?;
                    RELEASE.load_async(&mut c).await.map(drop)
                }
                // In a Cluster the script is loaded on each node on first use
                // (NOSCRIPT → SCRIPT LOAD on that node, by `redis`).
                Conn::Cluster(mut c) => redis::cmd("PING").query_async::<()>(&mut c).await,
            }
        })
        .await
    }

    /// Runs `f` under the timeout, the in-flight cap and the breaker,
    /// mapping errors and telling the breaker whether Redis answered.
    async fn bounded<T>(
        &self,
        f: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        let _in_flight = self.health.enter()?;
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        match &r {
            Err(e) if health::is_unanswered(e) => self.health.unanswered(),
            _ => self.health.answered(),
        }
        r
    }

    fn now_arg(&self, now: Nanos) -> String {
        match self.time {
            TimeSource::Server => String::new(),
            TimeSource::Caller => now.0.to_string(),
        }
    }

    fn owner(&self, lease: u64) -> String {
        format!("{:016x}:{lease}", self.instance)
    }

    /// One script call deciding `checks[i]` for every `i` in `idx`; writes
    /// their evaluations into `out` and returns whether they all admit.
    async fn decide_group(
        &self,
        now: &str,
        owner: &str,
        checks: &[Check],
        idx: &[usize],
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        let mut inv = DECIDE.prepare_invoke();
        inv.arg(now).arg(owner);
        for &i in idx {
            add_check(&mut inv, self.redis_key(checks[i].key), &checks[i]);
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        parse_reply(&reply, idx, out)
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.bounded(async {
            match self.conn.clone() {
                Conn::Single(mut c) => inv.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
            }
        })
        .await
    }
}

fn add_check(inv: &mut ScriptInvocation<'_>, key: String, c: &Check) {
    inv.key(key);
    let (kind, p1, p2) = params_of(c);
    inv.arg(kind)
        .arg(c.cost)
        .arg(if c.blocking { "1" } else { "0" })
        .arg(p1)
        .arg(p2);
}

/// The scripts' kind letter and two numbers of a check (decide.lua's and
/// refund.lua's `kind, p1, p2`).
fn params_of(c: &Check) -> (&'static str, u64, u64) {
    match c.params {
        Params::Gcra(r) => ("g", r.capacity, r.interval),
        Params::Sliding(w) => (
            match w.precision() {
                Precision::Exact => "s",
                Precision::Approximate => "a",
            },
            w.limit,
            w.length,
        ),
        Params::Calendar { limit, end } => ("c", limit, end.0),
        Params::Concurrency { limit, ttl } => (
            "l",
            limit,
            u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        ),
    }
}

/// Reads `{admitted, now, (flags, remaining, reset, retry_after)*}`.
fn parse_reply(reply: &[Value], idx: &[usize], out: &mut [Evaluation]) -> Result<bool, StoreError> {
    const BAD: StoreError = StoreError::Unavailable(BAD_REPLY);
    if reply.len() != 2 + 4 * idx.len() {
        return Err(BAD);
    }
    let admitted = number(&reply[0]).ok_or(BAD)? == 1;
    for (j, &i) in idx.iter().enumerate() {
        let f = &reply[2 + 4 * j..6 + 4 * j];
        let flags = number(&f[0]).ok_or(BAD)?;
        out[i] = Evaluation {
            admit: flags & 1 != 0,
            never: flags & 2 != 0,
            remaining: number(&f[1]).ok_or(BAD)?,
            reset: Nanos(number(&f[2]).ok_or(BAD)?),
            retry_after: Nanos(number(&f[3]).ok_or(BAD)?),
        };
    }
    Ok(admitted)
}

/// A non-negative integer reply, or a decimal string one (saturating at `u64::MAX`).
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => {
            let s = std::str::from_utf8(b).ok()?;
            s.parse::<u64>().ok().or_else(|| {
                s.bytes()
                    .all(|c| c.is_ascii_digit())
                    .then_some(u64::MAX)
                    .filter(|_| !s.is_empty())
            })
        }
        _ => None,
    }
}

const CONNECTION_REFUSED: &str = "redis: connection refused";
const CONNECTION_LOST: &str = "redis: connection lost";
const BAD_REPLY: &str = "redis: unexpected script reply";

/// Every message of a [`StoreError::Unavailable`] this crate makes, with its
/// kind (the `kind` label of the server's `store_errors_total`).
const MESSAGES: &[(&str, &str)] = &[
    ("oom", "redis: out of memory, writes refused (OOM)"),
    (
        "readonly",
        "redis: connected to a read-only replica (READONLY)",
    ),
    (
        "crossslot",
        "redis: keys of one call in different slots (CROSSSLOT)",
    ),
    (
        "wrongtype",
        "redis: a counter key holds another type (WRONGTYPE)",
    ),
    ("loading", "redis: loading its dataset (LOADING)"),
    ("busy", "redis: busy running a script (BUSY)"),
    ("noscript", "redis: script missing after reload (NOSCRIPT)"),
    ("noperm", "redis: not allowed (ACL or password)"),
    ("cluster", "redis: cluster unavailable or resharding"),
    ("timeout", "redis: response timed out"),
    ("connection", CONNECTION_REFUSED),
    ("connection", CONNECTION_LOST),
    ("reply", BAD_REPLY),
    ("other", "redis: error reply"),
];

/// The message of `kind` in [`MESSAGES`].
fn message(kind: &str) -> &'static str {
    MESSAGES
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("redis: error reply", |(_, m)| m)
}

/// The kind of one of this crate's messages; `other` for any other.
pub(crate) fn kind_of_message(m: &str) -> &'static str {
    if m == health_message(&health::CIRCUIT_OPEN) {
        return "circuit_open";
    }
    if m == health_message(&health::IN_FLIGHT_FULL) {
        return "overloaded";
    }
    MESSAGES
        .iter()
        .find(|(_, msg)| *msg == m)
        .map_or("other", |(k, _)| k)
}

fn health_message(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(m) => m,
        _ => "",
    }
}

/// The kind of a store error, a short fixed label: `timeout`, `connection`,
/// `oom`, `readonly`, `crossslot`, `wrongtype`, `loading`, `busy`,
/// `noscript`, `noperm`, `cluster`, `reply`, `circuit_open`, `overloaded`,
/// `counter_cap` (in-memory store full) or `other`. For metrics: never a key
/// or an address.
pub fn error_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Timeout(_) => "timeout",
        StoreError::CounterCapReached { .. } => "counter_cap",
        StoreError::Unavailable(m) => kind_of_message(m),
        _ => "other",
    }
}

/// Maps a Redis error to what the engine decides on. Never "allowed":
/// every error is a [`StoreError`] and the limit's `on_store_error` applies.
pub fn store_error(e: &RedisError) -> StoreError {
    let code = e.code().unwrap_or("");
    let kind = match code {
        "OOM" => "oom",
        "READONLY" => "readonly",
        "CROSSSLOT" => "crossslot",
        "WRONGTYPE" => "wrongtype",
        "LOADING" => "loading",
        "BUSY" => "busy",
        "NOSCRIPT" => "noscript",
        "NOPERM" | "NOAUTH" | "WRONGPASS" => "noperm",
        "CLUSTERDOWN" | "MASTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK" => "cluster",
        _ if e.is_timeout() => "timeout",
        _ if e.is_connection_refusal() => return StoreError::Unavailable(CONNECTION_REFUSED),
        _ if e.is_io_error() || e.is_connection_dropped() => {
            return StoreError::Unavailable(CONNECTION_LOST);
        }
        _ if e.is_cluster_error() => "cluster",
        _ if e.to_string().contains("OOM") => "oom",
        _ if e.to_string().contains("WRONGTYPE") => "wrongtype",
        _ => "other",
    };
    StoreError::Unavailable(message(kind))
}

/// `PING` on a connection, errors mapped.
async fn raw_ping(conn: Conn) -> Result<(), StoreError> {
    let cmd = redis::cmd("PING");
    let r = match conn {
        Conn::Single(mut c) => cmd.query_async::<()>(&mut c).await,
        Conn::Cluster(mut c) => cmd.query_async::<()>(&mut c).await,
    };
    r.map_err(|e| store_error(&e))
}

impl Store for RedisStore {
    async fn decide(
        &self,
        now: Nanos,
        checks: &[Check],
        lease: u64,
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        if checks.is_empty() {
            return Ok(true);
        }
        let now = self.now_arg(now);
        let owner = self.owner(lease);
        let n = checks.len().min(out.len()).min(MAX_CHECKS);
        let all: [usize; MAX_CHECKS] = std::array::from_fn(|i| i);
        let scope = |c: &Check| (c.key.0 >> 64) as u64;
        let one_scope = checks[..n].iter().all(|c| scope(c) == scope(&checks[0]));
        if one_scope || matches!(self.conn, Conn::Single(_)) {
            // One server, or one hash slot: one atomic call, all-or-nothing.
            return self
                .decide_group(&now, &owner, checks, &all[..n], out)
                .await;
        }
        // Cluster, scopes in different slots: one atomic call per slot, in
        // turn; a refusal refunds the slots that took their cost.
        self.decide_cross_slot(&now, &owner, checks, n, out).await
    }

    async fn release(&self, now: Nanos, keys: &[CounterKey], lease: u64) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let now = self.now_arg(now);
        let owner = self.owner(lease);
        let scope = |k: &CounterKey| (k.0 >> 64) as u64;
        let one_scope = keys.iter().all(|k| scope(k) == scope(&keys[0]));
        if one_scope || matches!(self.conn, Conn::Single(_)) {
            let mut inv = RELEASE.prepare_invoke();
            inv.arg(&now).arg(&owner);
            for &k in keys {
                inv.key(self.redis_key(k));
            }
            return self.invoke::<i64>(&inv).await.map(drop);
        }
        for &k in keys {
            let mut inv = RELEASE.prepare_invoke();
            inv.arg(&now).arg(&owner).key(self.redis_key(k));
            self.invoke::<i64>(&inv).await?;
        }
        Ok(())
    }
}

/// Checks per request the store sizes its arrays for (the policy's maximum).
const MAX_CHECKS: usize = tollgate_core::policy::MAX_LIMITS_PER_REQUEST;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_maps_back_to_its_kind() {
        for (kind, m) in MESSAGES {
            assert_eq!(error_kind(&StoreError::Unavailable(m)), *kind, "{m}");
        }
        let mut seen: Vec<_> = MESSAGES.iter().map(|(_, m)| m).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), MESSAGES.len(), "messages are unique");
        assert_eq!(error_kind(&health::CIRCUIT_OPEN), "circuit_open");
        assert_eq!(error_kind(&health::IN_FLIGHT_FULL), "overloaded");
        assert_eq!(error_kind(&StoreError::Timeout(DEFAULT_TIMEOUT)), "timeout");
        assert_eq!(error_kind(&StoreError::Unavailable("elsewhere")), "other");
        for (code, kind) in [
            ("OOM", "oom"),
            ("READONLY", "readonly"),
            ("CROSSSLOT", "crossslot"),
            ("WRONGTYPE", "wrongtype"),
            ("LOADING", "loading"),
            ("BUSY", "busy"),
            ("NOSCRIPT", "noscript"),
            ("NOPERM", "noperm"),
            ("CLUSTERDOWN", "cluster"),
            ("MASTERDOWN", "cluster"),
            ("WHATEVER", "other"),
        ] {
            let e = redis::make_extension_error(code.to_owned(), Some("detail".to_owned()));
            assert_eq!(error_kind(&store_error(&e)), kind, "{code}");
        }
    }

    #[test]
    fn numbers_parse_from_ints_and_big_strings() {
        assert_eq!(number(&Value::Int(7)), Some(7));
        assert_eq!(number(&Value::Int(-1)), None);
        assert_eq!(
            number(&Value::BulkString(b"18446744073709551615".to_vec())),
            Some(u64::MAX)
        );
        assert_eq!(
            number(&Value::BulkString(b"18446744073709551616".to_vec())),
            Some(u64::MAX)
        );
        assert_eq!(number(&Value::BulkString(b"x".to_vec())), None);
    }
}

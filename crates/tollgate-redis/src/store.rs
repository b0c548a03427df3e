//! [`RedisStore`]: the [`Store`] over Redis or Redis Cluster.
//!
//! See the crate docs for the key layout, the clock and the guarantees; the
//! script's `KEYS`/`ARGV` layout and return shape are in
//! `scripts/decide.lua` (and repeated in the crate docs).

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, ScriptInvocation, Value};
use tollgate_core::algorithm::Evaluation;
use tollgate_core::{Check, CounterKey, Nanos, Params, Store, StoreError};

mod cross_slot;

/// The decision script, loaded once per server and run by its SHA1.
static DECIDE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/decide.lua")));
/// The lease release script.
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../scripts/release.lua")));

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
            // Reconnect with jittered exponential back-off, 20 ms up to 500 ms,
            // so recovery takes well under 2 s once Redis is back (B1, B5).
            let config = ConnectionManagerConfig::new()
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(500))
                .set_number_of_retries(4)
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(None);
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|_| StoreError::Unavailable("invalid redis connection settings"))?;
            Conn::Single(manager)
        };
        let mut instance = [0u8; 8];
        getrandom::fill(&mut instance)
            .map_err(|_| StoreError::Unavailable("no randomness for the store instance id"))?;
        let store = RedisStore {
            conn,
            prefix: self.prefix,
            timeout: self.timeout,
            time: self.time,
            instance: u64::from_le_bytes(instance),
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

    /// Whether Redis answers a `PING` within the timeout: what `/readyz` shows.
    ///
    /// # Errors
    /// The mapped Redis error, or [`StoreError::Timeout`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("PING");
        self.bounded(async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async::<()>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<()>(&mut c).await,
            }
        })
        .await
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

    /// Runs `f` under the timeout, mapping errors.
    async fn bounded<T>(
        &self,
        f: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
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
    let (kind, p1, p2) = match c.params {
        Params::Gcra(r) => ("g", r.capacity, r.interval),
        Params::Sliding(w) => ("s", w.limit, w.width),
        Params::Calendar { limit, end } => ("c", limit, end.0),
        Params::Concurrency { limit, ttl } => (
            "l",
            limit,
            u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        ),
    };
    inv.arg(kind)
        .arg(c.cost)
        .arg(if c.blocking { "1" } else { "0" })
        .arg(p1)
        .arg(p2);
}

/// Reads `{admitted, now, (flags, remaining, reset, retry_after)*}`.
fn parse_reply(reply: &[Value], idx: &[usize], out: &mut [Evaluation]) -> Result<bool, StoreError> {
    const BAD: StoreError = StoreError::Unavailable("redis: unexpected script reply");
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
            reset: Duration::from_nanos(number(&f[2]).ok_or(BAD)?),
            retry_after: Duration::from_nanos(number(&f[3]).ok_or(BAD)?),
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

/// Maps a Redis error to what the engine decides on. Never "allowed":
/// every error is a [`StoreError`] and the limit's `on_store_error` applies.
pub fn store_error(e: &RedisError) -> StoreError {
    let code = e.code().unwrap_or("");
    let what = match code {
        "OOM" => "redis: out of memory, writes refused (OOM)",
        "READONLY" => "redis: connected to a read-only replica (READONLY)",
        "CROSSSLOT" => "redis: keys of one call in different slots (CROSSSLOT)",
        "WRONGTYPE" => "redis: a counter key holds another type (WRONGTYPE)",
        "LOADING" => "redis: loading its dataset (LOADING)",
        "BUSY" => "redis: busy running a script (BUSY)",
        "NOSCRIPT" => "redis: script missing after reload (NOSCRIPT)",
        "NOPERM" | "NOAUTH" | "WRONGPASS" => "redis: not allowed (ACL or password)",
        "CLUSTERDOWN" | "MASTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK" => {
            "redis: cluster unavailable or resharding"
        }
        _ if e.is_timeout() => "redis: response timed out",
        _ if e.is_connection_refusal() => "redis: connection refused",
        _ if e.is_io_error() || e.is_connection_dropped() => "redis: connection lost",
        _ if e.is_cluster_error() => "redis: cluster unavailable or resharding",
        _ if e.to_string().contains("OOM") => "redis: out of memory, writes refused (OOM)",
        _ if e.to_string().contains("WRONGTYPE") => {
            "redis: a counter key holds another type (WRONGTYPE)"
        }
        _ => "redis: error reply",
    };
    StoreError::Unavailable(what)
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

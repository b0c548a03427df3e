//! # tollgate-redis
//!
//! [`RedisStore`]: a [`tollgate_core::Store`] over Redis (or Valkey) or a
//! Redis Cluster, so that several stateless tollgate replicas share their
//! counters.
//!
//! ```no_run
//! # async fn run() -> Result<(), tollgate_core::StoreError> {
//! use tollgate_core::{Engine, SystemClock};
//! use tollgate_redis::RedisStore;
//!
//! let store = RedisStore::builder("redis://127.0.0.1:6379/0")
//!     .with_prefix("tg:")
//!     .with_timeout(std::time::Duration::from_millis(50))
//!     .connect()
//!     .await?;
//! let ready = store.is_ready().await; // for /readyz
//! let engine = Engine::with_clock(store, SystemClock);
//! # let _ = (ready, engine); Ok(()) }
//! ```
//!
//! ## One round trip per decision
//!
//! [`Store::decide`](tollgate_core::Store::decide) runs `scripts/decide.lua`
//! once, with `EVALSHA` (`redis::Script`: loaded once, reloaded on
//! `NOSCRIPT`, never surfaced). The script reads every counter of the
//! request, evaluates them with the same math as `tollgate_core::algorithm`,
//! and writes them only if every blocking check admits: a rejected request
//! consumes nothing. Redis runs a script without interleaving other
//! commands, so no two decisions race (the read-then-write race is the
//! classic over-admission bug: Kong #5311, APISIX #12592, boulder #7780).
//! Concurrent decisions share one multiplexed connection and are pipelined
//! on it.
//!
//! ## Script layout
//!
//! `KEYS[i]` is the counter of check *i*. `ARGV[1]` is `now` in nanoseconds
//! since the epoch as decimal digits, or empty for the server clock;
//! `ARGV[2]` the lease owner; then five arguments per check: kind (`g` token
//! bucket, `s` exact and `a` approximate sliding window, `c` calendar window,
//! `l` concurrency), cost, blocking (`1`/`0`), and two numbers (capacity and
//! refill interval in ns; limit and window length in ns; limit and window end in ns since the
//! epoch; limit and lease TTL in ns). The reply is `{admitted, now, then per
//! check flags (bit 0 admit, bit 1 never), remaining, reset_ns,
//! retry_after_ns}`, numbers as integers or, above 2⁵³, decimal strings.
//! Lua numbers are doubles, so the script keeps instants as (seconds,
//! nanoseconds) pairs and computes only differences to `now` as numbers:
//! exact to the nanosecond when a bucket fills (or a sliding window lasts)
//! in under 104 days. A sliding window's state is its log of admissions
//! (`w <newest instant> (<age> <cost>)*`, the same rule as the in-memory
//! store): the script reads and rewrites it whole, so a decision costs
//! O(entries), at most 16 (approximate) or N ≤ 1,024 (exact).
//!
//! ## Keys, hash tags, TTLs
//!
//! A counter key is `<prefix>{<scope>}:<counter>`, both 16 hex digits: the
//! high and low 64 bits of the [`CounterKey`](tollgate_core::CounterKey).
//! The scope (the hash of the scope values, e.g. the account) is the hash
//! tag, so every counter of one scope lives in one Cluster slot. The tag is a
//! function of the counter alone, never of the request: a tag taken from
//! "the request's first limit" would store one global counter under a
//! different key per request and silently multiply the limit.
//!
//! Every key is written with `SET … PX` in the same script that changes it,
//! with the time until the counter is back to its fresh state (full bucket,
//! empty window, window ended, last lease expired): no key ever lives
//! without a TTL, and an expired key and a fresh counter are the same thing.
//! Run Redis with `maxmemory-policy noeviction` or `volatile-ttl`; an
//! `allkeys-*` policy may evict a live counter and hand out its capacity
//! again.
//!
//! ## Guarantees
//!
//! - **Standalone Redis**: exact. All checks of a request are decided in one
//!   script, whatever their scopes: never over-admits, a rejected request
//!   consumes nothing.
//! - **Cluster, all limits of a request in one scope** (the usual case:
//!   per-account limits): the same, one script on one slot.
//! - **Cluster, limits in different scopes** (e.g. per-account and global,
//!   in different hash slots): one script per scope, in the order the limits
//!   first appear, each exact on its own counters, so **no limit is ever
//!   over-admitted**. Once a scope refuses, the later scopes are only
//!   evaluated (nothing written); the scopes decided before it, which took
//!   their cost, get it back from `scripts/refund.lua`, so a refused request
//!   ends up consuming nothing:
//!   - sliding window, calendar window, concurrency lease: exactly its cost;
//!   - token bucket: its cost minus what the bucket refilled between the
//!     take and the refund (one round trip per later scope, about a
//!     millisecond): that sliver is kept back, since a full bucket may have
//!     absorbed it, and a refund must never hand out capacity twice.
//!
//!   Measured (`tests/it/cluster.rs`, three slots on three primaries, 32
//!   tasks through two stores, 1,280 attempts, 1,260 refused after taking
//!   their cost in two slots): units taken by refused requests, calendar 0,
//!   sliding 0, token bucket 1 (the floor of the kept-back refill, about
//!   1 s of a 1-per-day bucket over 1,260 refunds), over-admission 0.
//!
//!   What is not atomic: between the take and the refund the units are
//!   unavailable, so a concurrent request may be refused that a single-slot
//!   decision would have admitted (transient under-admission, at most the
//!   cost of the requests being refunded at that moment). A refund or later
//!   call that fails (node down, timeout) leaves the cost taken:
//!   under-admission by that request's cost until the counter refills,
//!   never over-admission. Keep the limits of one request in one scope where
//!   exactness matters.
//! - **Cluster failover** (`kill -9` of a primary, `cluster-node-timeout`
//!   1000 ms): decisions on that primary's slots fail as [`StoreError`]s
//!   (never as answers; MOVED/ASK are followed by `redis`, CLUSTERDOWN and
//!   lost connections are errors, so the limit's `on_store_error` applies)
//!   until a replica is promoted; measured 2.3 s. Redis replicates
//!   asynchronously, so admissions acknowledged just before the kill may be
//!   lost with the primary and handed out again: over-admission bounded by
//!   what the primary acknowledged in its last moments (measured 0 of the
//!   3,893 acknowledged in the last second, `b3_cluster_primary_kill_fails_over`).
//!
//! [`StoreError`]: tollgate_core::StoreError
//!
//! ## Clock
//!
//! By default ([`TimeSource::Server`]) the script reads the Redis server's
//! `TIME`, so replicas whose clocks are skewed still agree (A11); the `now`
//! the engine passes is ignored. [`TimeSource::Caller`] uses the engine's
//! `now` instead, for tests on a manual clock.
//!
//! Calendar windows are the exception: the engine resolves the window end
//! from its own clock and time zone and passes it in. A replica whose clock
//! runs ahead therefore starts the next window early, for everyone, by its
//! skew (the script keeps the later window once one exists, so a replica
//! behind never re-opens an old window): each window still admits at most
//! N, but its boundaries move by up to the largest skew among replicas.
//!
//! ## Failures
//!
//! Each call is bounded by the timeout (default 50 ms, waiting for a
//! connection included) and fails with [`StoreError::Timeout`]; every Redis
//! error (refused or lost connection, `OOM`, `READONLY`, `CROSSSLOT`,
//! `WRONGTYPE`, `LOADING`, `CLUSTERDOWN`, …) becomes
//! [`StoreError::Unavailable`] with a static description, never "allowed":
//! the limit's `on_store_error` decides. [`error_kind`] names the kind of
//! each (`timeout`, `connection`, `oom`, …) for metrics. Creating a store
//! does not need Redis to be up (see [`RedisStoreBuilder::connect`]).
//!
//! A hung or dead Redis costs a bounded amount (B2):
//!
//! - at most [`RedisStoreBuilder::with_max_in_flight`] calls (default
//!   1,024) wait on Redis at once; past that a call fails at once
//!   ([`IN_FLIGHT_FULL`], kind `overloaded`);
//! - a circuit breaker (standalone Redis) opens after
//!   [`FAILURES_TO_OPEN`] consecutive unanswered calls or one unanswered
//!   background probe, within a second of Redis going silent; while open,
//!   calls fail at once ([`CIRCUIT_OPEN`], kind `circuit_open`) instead of
//!   each waiting for the timeout, and [`RedisStore::is_available`] is
//!   false. A probe pings every ~100 ms (jittered) and the first answer
//!   closes it again.
//!
//! The connection reconnects by itself (`redis`'s `ConnectionManager`) with
//! jittered exponential back-off: the n-th retry waits `d·(1 + U[0,1))`
//! with `d` = 100, 200, 400, then 500 ms. Attempts are therefore at least
//! 100 ms apart (≤ 10 per second per store however many calls fail, B5),
//! replicas do not retry in step, and a Redis that comes back is reconnected
//! within about a second. Each store holds one multiplexed connection.
//!
//! Concurrency leases are owned by `<store instance>:<lease id>`, the
//! instance being random per [`RedisStore`], since lease ids are only unique
//! within one process; a lease not released expires with its TTL.
//!
//! [`StoreError::Timeout`]: tollgate_core::StoreError::Timeout
//! [`StoreError::Unavailable`]: tollgate_core::StoreError::Unavailable

mod health;
mod store;
#[cfg(feature = "test-util")]
pub mod testing;

pub use health::{
    CIRCUIT_OPEN, DEFAULT_MAX_IN_FLIGHT, FAILURES_TO_OPEN, IN_FLIGHT_FULL, PROBE_IDLE_EVERY,
    PROBE_OPEN_EVERY, PROBE_TIMEOUT,
};
pub use store::{
    DEFAULT_PREFIX, DEFAULT_TIMEOUT, RedisStore, RedisStoreBuilder, TimeSource, error_kind,
    store_error,
};

// Every script is its own text after `scripts/instants.lua` (instant
// arithmetic and `now`, written once for all three).

/// The decision script, for benchmarks and tools (`redis-benchmark`, `redis-cli --eval`).
pub const DECIDE_SCRIPT: &str = concat!(
    include_str!("../scripts/instants.lua"),
    include_str!("../scripts/decide.lua")
);
/// The lease release script.
pub const RELEASE_SCRIPT: &str = concat!(
    include_str!("../scripts/instants.lua"),
    include_str!("../scripts/release.lua")
);
/// The cross-slot refund script (Redis Cluster).
pub const REFUND_SCRIPT: &str = concat!(
    include_str!("../scripts/instants.lua"),
    include_str!("../scripts/refund.lua")
);

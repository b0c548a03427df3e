//! RELIABILITY-PLAN F3 at CI size: a flood of invalid API keys (random
//! garbage, wrong checksum, right prefix with a wrong secret, well-formed
//! unknown ids) against the proxy, with the ledger's database operation
//! counters (`Ledger::identity_lookups`: key and account reads; and
//! `Ledger::db_queries`: every database operation, background work included)
//! and the counter store's live counters.
//!
//! Figures asserted: database lookups for checksum-invalid keys = 0; for
//! well-formed unknown keys ≤ 1 per key id per negative-cache TTL
//! (`REVOCATION_BOUND`), also when the same key arrives concurrently; limiter
//! state created for unknown keys = 0; with the built-in guard on, one address
//! spraying keys costs at most its failure budget in lookups and then gets 429
//! before any database work, while valid keys keep working.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_ledger::key::forge_for_test;
use tollgate_server::config::{AdminToken, DEFAULT_POLICY, ServerConfig};
use tollgate_server::{Running, start};

use crate::support::TOKEN;

/// Invalid keys per test (RELIABILITY-PLAN's 1 M, scaled for CI).
const FLOOD: usize = 20_000;
/// Unknown keys sprayed from one address at the guard (it stops all but its
/// budget, so a smaller flood shows the same bound in less CI time).
const SPRAY: usize = 5_000;
/// Requests in flight at once.
const CONCURRENCY: usize = 16;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A small deterministic generator (no dependency needed for test data).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn base62(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| BASE62[(self.next() % 62) as usize] as char)
            .collect()
    }
}

/// Keys that fail the shape or checksum test: no database needed to refuse them.
fn checksum_invalid(rng: &mut Rng, i: usize) -> String {
    match i % 3 {
        // Right shape, one checksum character changed.
        0 => {
            let mut k = forge_for_test(&rng.base62(12), &rng.base62(32)).into_bytes();
            let last = k.len() - 1;
            k[last] = if k[last] == b'0' { b'1' } else { b'0' };
            String::from_utf8(k).expect("ascii")
        }
        // Random base62 of the right length after the prefix.
        1 => format!("tg_{}", rng.base62(50)),
        // Garbage of any length.
        _ => {
            let len = 1 + (rng.next() % 80) as usize;
            rng.base62(len)
        }
    }
}

struct Gate {
    running: Running,
    client: Client<HttpConnector, Empty<Bytes>>,
    _dir: tempfile::TempDir,
}

impl Gate {
    async fn start(auth_fail_limit: u64) -> Gate {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.path().to_path_buf(),
            admin_token: AdminToken::new(TOKEN.to_owned()),
            auth_fail_limit,
            ..ServerConfig::default()
        };
        let policy = tollgate_core::policy::parse(DEFAULT_POLICY, "default").expect("policy");
        let running = start(config, policy).await.expect("starts");
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(http);
        Gate {
            running,
            client,
            _dir: dir,
        }
    }

    /// An account on plan `free` and one of its keys (created through the ledger).
    async fn account_key(&self, id: &str) -> tollgate_ledger::CreatedKey {
        let ledger = &self.running.state.ledger;
        ledger
            .create_account(&tollgate_ledger::NewAccount {
                id: id.into(),
                plan: "free".into(),
                org: None,
                created_at: None,
                grant: 0,
            })
            .await
            .expect("account");
        ledger.create_key(id, None).await.expect("key")
    }

    fn queries(&self) -> u64 {
        self.running.state.ledger.identity_lookups()
    }

    /// Every database operation, housekeeping included.
    fn all_queries(&self) -> u64 {
        self.running.state.ledger.db_queries()
    }

    fn live_counters(&self) -> usize {
        self.running.state.engine.store().live_counters()
    }

    /// `GET /hello` with `key` through `client`; the status.
    async fn get(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr, key: &str) -> u16 {
        let req = http::Request::get(format!("http://{addr}/hello"))
            .header("x-api-key", key)
            .body(Empty::new())
            .expect("request");
        let resp = client.request(req).await.expect("answer");
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    }

    /// Sends every key, `CONCURRENCY` at a time; the statuses in order.
    async fn flood(&self, keys: Vec<String>) -> Vec<u16> {
        let addr = self.running.addr;
        let client = &self.client;
        futures_util::stream::iter(keys)
            .map(|k| async move { Gate::get(client, addr, &k).await })
            .buffered(CONCURRENCY)
            .collect()
            .await
    }
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// F3, guard off: lookups per kind of invalid key, and no limiter state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_invalid_keys_cost_no_lookups_and_no_limiter_state() {
    let gate = Gate::start(0).await;
    let real = gate.account_key("victim").await;
    assert_eq!(
        Gate::get(&gate.client, gate.running.addr, real.key.expose()).await,
        200
    );
    let live = gate.live_counters();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // 1. Checksum-invalid keys: no database operation at all.
    let before = gate.queries();
    let all_before = gate.all_queries();
    let keys: Vec<String> = (0..FLOOD).map(|i| checksum_invalid(&mut rng, i)).collect();
    let started = tokio::time::Instant::now();
    let statuses = gate.flood(keys).await;
    let lookups = gate.queries() - before;
    let all = gate.all_queries() - all_before;
    // Housekeeping (every second: expire reservations; every 5 s also flush
    // events) is the only other database work: at most two operations per
    // one-second tick.
    let ticks = started.elapsed().as_secs() + 2;
    println!(
        "F3 checksum-invalid: {FLOOD} keys in {:?}: {lookups} key lookups, {all} database operations in all ({ticks} housekeeping ticks)",
        started.elapsed()
    );
    assert_eq!(count(&statuses, 401), FLOOD, "every invalid key is 401");
    assert_eq!(
        lookups, 0,
        "checksum-invalid keys must not reach the database"
    );
    assert!(
        all <= 2 * ticks,
        "{all} database operations beside housekeeping"
    );

    // 2. Right prefix (a real key id), wrong secret: the id is cached, so no
    //    lookup either while it stays cached.
    let before = gate.queries();
    let wrong: Vec<String> = (0..2_000)
        .map(|_| forge_for_test(&real.id, &rng.base62(32)))
        .collect();
    let started = tokio::time::Instant::now();
    let statuses = gate.flood(wrong).await;
    let lookups = gate.queries() - before;
    let ttls = started.elapsed().as_secs_f64() / tollgate_ledger::REVOCATION_BOUND.as_secs_f64();
    println!(
        "F3 right prefix, wrong secret: 2000 keys in {:.1} TTLs, {lookups} key lookups",
        ttls
    );
    assert_eq!(count(&statuses, 401), 2_000);
    // One key id: at most one read per cache TTL while the flood runs.
    assert!(
        lookups as f64 <= ttls.ceil() + 1.0,
        "{lookups} lookups for one key id in {ttls:.1} TTLs"
    );

    // 3. Well-formed unknown ids, each sent three times, concurrently: at
    //    most one lookup per id per negative-cache TTL (the three copies
    //    arrive within milliseconds, far inside the 2 s TTL).
    let ids = 2_000;
    let unknown: Vec<String> = (0..ids)
        .map(|_| forge_for_test(&rng.base62(12), &rng.base62(32)))
        .collect();
    let tripled: Vec<String> = unknown
        .iter()
        .flat_map(|k| [k.clone(), k.clone(), k.clone()])
        .collect();
    let before = gate.queries();
    let statuses = gate.flood(tripled).await;
    let lookups = gate.queries() - before;
    println!(
        "F3 well-formed unknown: {ids} ids x 3 requests, {lookups} key lookups ({:.3} per id)",
        lookups as f64 / ids as f64
    );
    assert_eq!(count(&statuses, 401), 3 * ids);
    assert!(
        lookups <= ids as u64,
        "{lookups} lookups for {ids} unknown ids: more than one per id per TTL"
    );

    // 4. No limiter state for any of them; the real key still works.
    // (≤: the housekeeping sweep may drop the real key's counters meanwhile.)
    assert!(
        gate.live_counters() <= live,
        "unknown keys created limiter state: {} live counters, {live} before",
        gate.live_counters()
    );
    assert_eq!(
        Gate::get(&gate.client, gate.running.addr, real.key.expose()).await,
        200
    );
    gate.running.shutdown().await;
}

/// F3, guard on (defaults): one address spraying invalid keys is limited by
/// address before any database work; valid keys keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_invalid_keys_are_limited_by_address_before_the_database() {
    let defaults = ServerConfig::default();
    let budget = defaults.auth_fail_limit;
    assert!(budget > 0, "the guard is on by default");
    let gate = Gate::start(budget).await;
    let good = gate.account_key("good").await;
    let other = gate.account_key("other").await;
    assert_eq!(
        Gate::get(&gate.client, gate.running.addr, good.key.expose()).await,
        200
    );
    let live = gate.live_counters();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);

    // Well-formed unknown ids (the kind that needs a lookup), all distinct.
    let before = gate.queries();
    let keys: Vec<String> = (0..SPRAY)
        .map(|_| forge_for_test(&rng.base62(12), &rng.base62(32)))
        .collect();
    let started = tokio::time::Instant::now();
    let statuses = gate.flood(keys).await;
    let lookups = gate.queries() - before;
    let elapsed = started.elapsed();
    let (refused, limited) = (count(&statuses, 401), count(&statuses, 429));
    println!(
        "F3 guard: {SPRAY} unknown keys from one address: {refused} x 401, {limited} x 429, \
         {lookups} key lookups (budget {budget})"
    );
    assert_eq!(refused + limited, SPRAY);
    // The budget, plus what refills while the flood runs (budget per window).
    let window = defaults.auth_fail_window.as_secs_f64();
    let allowed = budget + (budget as f64 * elapsed.as_secs_f64() / window).ceil() as u64;
    println!("F3 guard: flood took {elapsed:?}; at most {allowed} lookups allowed");
    assert!(
        lookups <= allowed,
        "{lookups} lookups: the guard did not stop the flood before the database"
    );
    assert!(limited >= SPRAY - allowed as usize);
    assert!(
        gate.live_counters() <= live,
        "limiter state per unknown key: {} live counters, {live} before",
        gate.live_counters()
    );
    assert_eq!(gate.running.state.guard.tracked(), 1, "one address tracked");

    // The blocked address: 429 with Retry-After for unknown keys, but a real
    // key still passes (its id is known to the ledger; its cache entry has
    // expired long since, so this is a fresh lookup).
    let req = http::Request::get(format!("http://{}/hello", gate.running.addr))
        .header(
            "x-api-key",
            forge_for_test(&rng.base62(12), &rng.base62(32)),
        )
        .body(Empty::new())
        .expect("request");
    let resp = gate.client.request(req).await.expect("answer");
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["error"]["code"], "too_many_invalid_keys", "{v}");
    assert_eq!(
        Gate::get(&gate.client, gate.running.addr, good.key.expose()).await,
        200
    );

    // Another address is not affected, even with a key not yet cached.
    let mut http = HttpConnector::new();
    http.set_local_address(Some(IpAddr::from([127, 0, 0, 2])));
    let elsewhere: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    assert_eq!(
        Gate::get(&elsewhere, gate.running.addr, other.key.expose()).await,
        200,
        "a different client address is not blocked"
    );
    gate.running.shutdown().await;
}

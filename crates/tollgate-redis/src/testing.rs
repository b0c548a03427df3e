//! Test support (feature `test-util`): `redis-server` processes of a test's
//! own, standalone or as a Redis Cluster, on free loopback ports, stopped
//! (only they) when dropped, also on panic.
//!
//! ```no_run
//! use tollgate_redis::testing::RedisCluster;
//!
//! // 3 primaries, no replicas: cluster-enabled, node-timeout 1000 ms,
//! // created with `redis-cli --cluster create`, waited on until every node
//! // reports `cluster_state:ok`.
//! let cluster = RedisCluster::start(3, 0);
//! let url = cluster.url(); // redis-cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
//! # let _ = url;
//! ```
//!
//! Needs `redis-server` and `redis-cli` (Debian `redis-server`, `redis-tools`).
//! Ports are picked in 10000–21999 so that the Cluster bus port (port +
//! 10000) stays below the kernel's ephemeral range (32768+), where the port-0
//! listeners of other tests live.

#![allow(
    clippy::disallowed_methods,
    reason = "test support: waits for child processes in real time"
)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a cluster may take to form (slots assigned, every node `ok`).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// One `redis-server` child process of the test; `kill -9`ed on drop.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl RedisServer {
    /// A standalone server on a free port (no persistence).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A standalone server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        spawn_on_free_port(&scratch_dir("redis"), extra, false)
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether it was killed.
    pub fn is_killed(&self) -> bool {
        self.child.is_none()
    }

    /// `kill -9`, and reap (only this process).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A blocking connection (for set-up and inspection).
    pub fn connection(&self) -> redis::Connection {
        connect(self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `redis-server` processes on free loopback ports:
/// `cluster-enabled yes`, `cluster-node-timeout 1000`, slots spread by
/// `redis-cli --cluster create … --cluster-replicas R`. Every process is
/// `kill -9`ed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    /// Nodes in creation order: the first `primaries` are the primaries.
    pub nodes: Vec<RedisServer>,
    primaries: usize,
    root: PathBuf,
}

impl RedisCluster {
    /// Starts `primaries` primaries with `replicas` replicas each and waits
    /// until every node reports `cluster_state:ok` (and every replica is in
    /// sync). Panics with the nodes' view if it does not form in 30 s.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        assert!(primaries >= 3, "a Redis Cluster needs 3 primaries");
        let root = scratch_dir("cluster");
        let mut nodes = Vec::new();
        for i in 0..primaries * (1 + replicas) {
            let dir = root.join(i.to_string());
            nodes.push(spawn_on_free_port(
                &dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    // Keep serving the slots that still have a primary while
                    // one shard fails over (reads and writes of other slots).
                    "--cluster-require-full-coverage",
                    "no",
                ],
                true,
            ));
        }
        let cluster = RedisCluster {
            nodes,
            primaries,
            root,
        };
        cluster.create(replicas);
        cluster
    }

    fn create(&self, replicas: usize) {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &self.nodes {
            cmd.arg(n.addr());
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("redis-cli is installed");
        // `redis-cli` assigns the slots, then waits for the nodes to meet;
        // that wait has been seen to hang, so it is bounded and the meeting
        // is helped along below.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let deadline = std::time::Instant::now() + FORM_TIMEOUT;
        let mut round = 0u32;
        while !self.formed() {
            if std::time::Instant::now() > deadline {
                panic!("the Redis Cluster did not form:\n{}", self.describe());
            }
            round += 1;
            if round.is_multiple_of(40) {
                // Every 2 s: introduce every node to the first one again.
                let mut c = self.nodes[0].connection();
                for n in &self.nodes[1..] {
                    let _: redis::RedisResult<()> = redis::cmd("CLUSTER")
                        .arg("MEET")
                        .arg("127.0.0.1")
                        .arg(n.port)
                        .query(&mut c);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every live node knows every live node, says `cluster_state:ok`, and
    /// every live replica's link to its primary is up.
    fn formed(&self) -> bool {
        let live: Vec<&RedisServer> = self.nodes.iter().filter(|n| !n.is_killed()).collect();
        live.iter().all(|n| {
            let Ok(mut c) = try_connect(n.port) else {
                return false;
            };
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut c)
                .unwrap_or_default();
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut c)
                .unwrap_or_default();
            let known = nodes
                .lines()
                .filter(|l| !l.contains("fail") && !l.contains("handshake"))
                .count();
            let repl: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut c)
                .unwrap_or_default();
            let synced = !repl.contains("role:slave") || repl.contains("master_link_status:up");
            info.contains("cluster_state:ok") && known >= live.len() && synced
        })
    }

    /// Waits (up to `within`) until the live nodes form a healthy cluster
    /// again; returns whether they did.
    pub fn wait_healthy(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.formed() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `redis-cluster://127.0.0.1:<p1>,…` with every primary as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..self.primaries]
            .iter()
            .map(RedisServer::addr)
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot(&self, key: &str) -> u16 {
        let mut c = self.any_live().connection();
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT")
    }

    /// Index in [`RedisCluster::nodes`] of the primary serving `slot` now.
    pub fn primary_of(&self, slot: u16) -> usize {
        let mut c = self.any_live().connection();
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut c)
            .expect("CLUSTER NODES");
        for line in nodes.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            if serves {
                let port: u16 = f[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("node port");
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port == port)
                    .expect("a node of ours");
            }
        }
        panic!("no primary serves slot {slot}:\n{nodes}");
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Every key matching `pattern` on every live primary (for inspection).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| !n.is_killed()) {
            let mut c = n.connection();
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut c)
                .unwrap_or_default();
            if !role.contains("role:master") {
                continue;
            }
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query(&mut c)
                .unwrap_or_default();
            out.extend(keys);
        }
        out
    }

    fn any_live(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| !n.is_killed() && try_connect(n.port).is_ok())
            .expect("a live node")
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for n in self.nodes.iter().filter(|n| !n.is_killed()) {
            if let Ok(mut c) = try_connect(n.port) {
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut c)
                    .unwrap_or_default();
                s.push_str(&format!("-- node {}:\n{nodes}\n", n.port));
            }
        }
        s
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A fresh directory under the system temp dir, unique to this process and call.
fn scratch_dir(what: &str) -> PathBuf {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).expect("randomness");
    let dir = std::env::temp_dir().join(format!(
        "tollgate-test-{what}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(r)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A port in 10000–21999 whose port and port + 10000 are free now.
fn candidate_port() -> u16 {
    loop {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).expect("randomness");
        let port = 10_000 + u16::from_le_bytes(r) % 12_000;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// Starts `redis-server` in `dir` on a free port, retrying on another port
/// if it exits (someone took the port between the check and the bind).
fn spawn_on_free_port(dir: &Path, extra: &[&str], cluster: bool) -> RedisServer {
    std::fs::create_dir_all(dir).expect("node dir");
    for _ in 0..20 {
        let port = candidate_port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        for _ in 0..500 {
            if let Ok(Some(_)) = child.try_wait() {
                break; // exited: port taken
            }
            let listening = TcpStream::connect(("127.0.0.1", port)).is_ok()
                && (!cluster || TcpStream::connect(("127.0.0.1", port + 10_000)).is_ok());
            if listening {
                return RedisServer {
                    port,
                    child: Some(child),
                    dir: dir.to_owned(),
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start redis-server on a free port");
}

fn try_connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let c = client.get_connection_with_timeout(Duration::from_secs(1))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(c)
}

fn connect(port: u16) -> redis::Connection {
    try_connect(port).unwrap_or_else(|e| panic!("connect to redis on {port}: {e}"))
}

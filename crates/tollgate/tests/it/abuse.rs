//! RELIABILITY-PLAN E1, E2 and E5 against the real binary, with the figures
//! that need the server in a process of its own: the latency of legit
//! traffic while slow clients attack, compared with the same traffic without
//! them (E1/E2: p99 ≤ 2× baseline), the memory a hostile connection costs
//! (E3: ≤ 1 MiB, from `/proc/PID/status`) and the CPU the server spends on
//! an HTTP/2 CONTINUATION flood (E5: ≤ 1 core, from `/proc/PID/stat`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{Opts, Tollgate, Upstream, raw};

const POLICY: &str = r#"
[policy]
name = "abuse"
key_header = "x-api-key"

[limits.roomy]
algorithm = "token_bucket"
capacity = 1000000
refill = 1000000
scope = ["account"]

[operations.upload]
method = "POST"
path = "/upload"

[operations.upload.payload]
max_body = 1024

[plans.default]

[server]
header_read_timeout = "2s"
body_read_timeout = "2s"
body_timeout = "4s"
"#;

/// `tollgate serve` with [`POLICY`] in front of `up`, an account `legit`
/// and its key.
async fn server(dir: &tempfile::TempDir, up: &Upstream) -> (Tollgate, String) {
    let config = dir.path().join("policy.toml");
    std::fs::write(&config, POLICY).expect("policy");
    let tg = Tollgate::start(Opts {
        config: Some(config),
        upstream: Some(up.url()),
        ..Opts::default()
    });
    let key = tg.account_key("legit", Some("default")).await;
    (tg, key)
}

/// CPU time (user + system) the process has used, from `/proc/PID/stat`
/// (fields 14 and 15, in clock ticks of 1/100 s: Linux's `USER_HZ`).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// The `q` quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a slice of a few thousand samples"
    )]
    let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

/// Legit traffic like the plan's baseline (wrk with keep-alive
/// connections, here `workers` of them): alternately a proxied `GET` with
/// the API key and `POST /v1/check`, until `stop`. Returns the latency of
/// every success and the number of attempts.
fn legit(
    addr: SocketAddr,
    key: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Duration>, usize)> {
    tokio::spawn(async move {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let (client, key, stop) = (client.clone(), key.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut total) = (Vec::new(), 0);
                    while !stop.load(Ordering::Relaxed) {
                        for check in [false, true] {
                            let req = if check {
                                hyper::Request::post(format!("http://{addr}/v1/check"))
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(br#"{"account":"legit"}"#)))
                            } else {
                                hyper::Request::get(format!("http://{addr}/legit"))
                                    .header("x-api-key", &key)
                                    .body(Full::new(Bytes::new()))
                            }
                            .expect("request");
                            total += 1;
                            let t0 = Instant::now();
                            let answered = tokio::time::timeout(Duration::from_secs(5), async {
                                let resp = client.request(req).await.ok()?;
                                let status = resp.status();
                                resp.into_body().collect().await.ok()?;
                                status.is_success().then_some(())
                            })
                            .await;
                            if let Ok(Some(())) = answered {
                                ok.push(t0.elapsed());
                            }
                        }
                    }
                    (ok, total)
                })
            })
            .collect();
        let (mut ok, mut total) = (Vec::new(), 0);
        for t in tasks {
            let (o, n) = t.await.expect("legit worker");
            ok.extend(o);
            total += n;
        }
        (ok, total)
    })
}

/// Runs legit traffic for `for_` and returns (latencies, attempts).
async fn measure(addr: SocketAddr, key: &str, for_: Duration) -> (Vec<Duration>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let h = legit(addr, key.to_owned(), 2, stop.clone());
    tokio::time::sleep(for_).await;
    stop.store(true, Ordering::Relaxed);
    h.await.expect("legit traffic")
}

/// What the slow-client attackers saw: connections opened, connections the
/// server closed, and the longest time one lived.
#[derive(Default)]
struct Attack {
    opened: AtomicUsize,
    closed: AtomicUsize,
    longest_ms: AtomicUsize,
}

/// One slow client in a loop (slowhttptest style: a new connection as soon
/// as the server closes the last): sends `head`, then `drip` every 250 ms,
/// never finishing; records how long each connection lived.
async fn slow_client(
    addr: SocketAddr,
    head: Vec<u8>,
    drip: &'static [u8],
    st: Arc<Attack>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(s) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        st.opened.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let (mut rd, mut wr) = s.into_split();
        if wr.write_all(&head).await.is_err() {
            continue;
        }
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        let closed = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            if reader.is_finished() {
                break true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            // A failed write also means the server has closed it.
            if wr.write_all(drip).await.is_err() {
                break true;
            }
        };
        reader.abort();
        if closed {
            st.closed.fetch_add(1, Ordering::Relaxed);
            let lived = usize::try_from(t0.elapsed().as_millis()).unwrap_or(usize::MAX);
            st.longest_ms.fetch_max(lived, Ordering::Relaxed);
        }
    }
}

/// E1 + E2 (CI size): 300 slowloris connections (partial headers, a header
/// line every 250 ms) and 100 slow bodies (a byte every 250 ms of a 100 kB
/// body), each reconnecting when closed, against the real binary
/// (`header_read_timeout` and `body_read_timeout` 2 s, `body_timeout` 4 s).
/// Figures: legit success ≥ 99.9 %; legit p99 during the attack ≤ 2× the
/// p99 of the same traffic without it (baseline measured before and after
/// the attack; a 5 ms allowance for a shared 2-core machine, far below the
/// seconds a blocked server would add); every attacking connection closed
/// by the server within its timeout + 1 s (partial headers: 2 + 1 s; a
/// trickling body, which never pauses 2 s: the 4 s body timeout + 1 s).
///
/// Every figure is a latency, and on a shared 2-core machine another
/// process's burst can spoil one measurement: the whole trial (baseline,
/// attack, baseline) runs up to [`E1_TRIALS`] times and the test passes on
/// the first trial that meets every figure. A server that blocks under the
/// attack fails every trial; each trial's figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e1_e2_legit_p99_under_slow_clients_stays_within_twice_the_baseline() {
    let dir = tempfile::tempdir().expect("dir");
    let up = Upstream::start().await;
    let (tg, key) = server(&dir, &up).await;
    // Warm the connection pool and the server's caches.
    measure(tg.addr, &key, Duration::from_millis(300)).await;
    let mut failures = Vec::new();
    for trial in 1..=E1_TRIALS {
        match e1_e2_trial(tg.addr, &key).await {
            Ok(()) => return,
            Err(why) => {
                println!("E1/E2 trial {trial} of {E1_TRIALS} missed: {why}");
                failures.push(why);
            }
        }
    }
    panic!(
        "E1/E2: every trial missed a figure:\n{}",
        failures.join("\n")
    );
}

/// How many times the E1/E2 measurement may run before the test fails.
const E1_TRIALS: usize = 3;

/// One E1/E2 trial: baseline, attack, baseline; `Err` names the first
/// figure missed.
async fn e1_e2_trial(addr: SocketAddr, key: &str) -> Result<(), String> {
    const SLOWLORIS: usize = 300;
    const SLOW_BODIES: usize = 100;
    let (mut base, base_total1) = measure(addr, key, Duration::from_secs(2)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let loris = Arc::new(Attack::default());
    let bodies = Arc::new(Attack::default());
    let mut attackers = Vec::new();
    for i in 0..SLOWLORIS + SLOW_BODIES {
        let (head, drip, st): (Vec<u8>, &'static [u8], _) = if i < SLOWLORIS {
            (
                format!("GET /slow-{i} HTTP/1.1\r\nHost: tollgate\r\n").into_bytes(),
                b"X-Slow: 1\r\n",
                loris.clone(),
            )
        } else {
            (
                format!(
                    "POST /upload-{i} HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {key}\r\n\
                     Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
                )
                .into_bytes(),
                b"x",
                bodies.clone(),
            )
        };
        attackers.push(tokio::spawn(slow_client(
            addr,
            head,
            drip,
            st,
            stop.clone(),
        )));
    }
    // Let every attacker connect and start dripping.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (mut attack, attack_total) = measure(addr, key, Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.await.expect("attacker");
    }

    let (base2, base_total2) = measure(addr, key, Duration::from_secs(2)).await;
    base.extend(base2);
    let base_total = base_total1 + base_total2;

    let (b50, b99) = (quantile(&mut base, 0.50), quantile(&mut base, 0.99));
    let (a50, a99) = (quantile(&mut attack, 0.50), quantile(&mut attack, 0.99));
    #[allow(clippy::cast_precision_loss, reason = "a ratio for the log")]
    let ratio = a99.as_secs_f64() / b99.as_secs_f64();
    println!(
        "E1/E2 legit baseline: {}/{base_total} ok, p50 {b50:?} p99 {b99:?}; under attack: {}/{attack_total} ok, \
         p50 {a50:?} p99 {a99:?}; p99 ratio {ratio:.2}",
        base.len(),
        attack.len()
    );
    for (what, st, limit) in [("slowloris", &loris, 3_000), ("slow body", &bodies, 5_000)] {
        let (opened, closed, longest) = (
            st.opened.load(Ordering::Relaxed),
            st.closed.load(Ordering::Relaxed),
            st.longest_ms.load(Ordering::Relaxed),
        );
        println!(
            "E1/E2 {what}: {opened} connections opened, {closed} closed by the server, longest lived {longest} ms"
        );
        if closed < opened / 2 {
            return Err(format!(
                "{what}: the server closed too few attacking connections ({closed} of {opened})"
            ));
        }
        if longest > limit {
            return Err(format!(
                "{what}: a connection lived {longest} ms, longer than its timeout + 1 s ({limit} ms)"
            ));
        }
    }
    if attack_total < 200 || base_total < 200 {
        return Err(format!(
            "too little legit traffic to judge ({attack_total} under attack, {base_total} baseline)"
        ));
    }
    if attack.len() * 1000 < attack_total * 999 {
        return Err(format!(
            "legit success under attack {}/{attack_total} < 99.9 %",
            attack.len()
        ));
    }
    if a99 > b99 * 2 + Duration::from_millis(5) {
        return Err(format!(
            "legit p99 under attack {a99:?} > 2 × baseline {b99:?} (+5 ms allowance)"
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------ E5

/// One HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const CONTINUATION: u8 = 0x9;
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// How one flooding connection ended.
struct Flood {
    /// The GOAWAY error code, if one came.
    goaway: Option<u32>,
    /// From the first CONTINUATION to the server's close.
    closed_after: Option<Duration>,
    /// CONTINUATION frames written before the write failed or the close.
    sent: usize,
}

/// One connection of a CONTINUATION flood (CVE-2024-27316 pattern): the
/// client preface, a HEADERS frame without END_HEADERS, then up to `frames`
/// CONTINUATION frames carrying `payload` each, never ending the header
/// block. Reads the server's frames meanwhile.
async fn continuation_flood(addr: SocketAddr, payload: &'static [u8], frames: usize) -> Flood {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let mut goaway = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => return (goaway, Some(t0.elapsed())),
                Err(_) => return (goaway, None),
            }
            // Walk the complete frames received so far.
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == GOAWAY && len >= 8 {
                    goaway = Some(u32::from_be_bytes(buf[13..17].try_into().expect("4 bytes")));
                }
                buf.drain(..9 + len);
            }
        }
    });
    let mut head = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    head.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // HEADERS on stream 1 with END_STREAM but not END_HEADERS:
    // :method GET, :scheme http, :path / (static table 2, 6, 4).
    head.extend(frame(0x1, 0x1, 1, &[0x82, 0x86, 0x84]));
    let mut sent = 0;
    if wr.write_all(&head).await.is_ok() {
        let one = frame(CONTINUATION, 0, 1, payload);
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 16).collect();
        while sent < frames && !reader.is_finished() {
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            sent += 16;
        }
    }
    let (goaway, closed_after) = reader.await.expect("reader");
    Flood {
        goaway,
        closed_after,
        sent,
    }
}

/// 16,000 bytes of HPACK literal header fields (`x-a: a…a`, without
/// indexing): a full CONTINUATION frame's worth of header block.
fn big_fragment() -> &'static [u8] {
    static FRAGMENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FRAGMENT.get_or_init(|| {
        let mut one = vec![0x00, 0x03, b'x', b'-', b'a', 0x7e];
        one.extend(std::iter::repeat_n(b'a', 0x7e));
        one.iter().copied().cycle().take(one.len() * 120).collect()
    })
}

/// E5 (CONTINUATION flood, CI size): 8 attackers for 3 s, each opening
/// connection after connection that sends HEADERS and then up to 4,096
/// CONTINUATION frames (alternately 16 kB of headers and empty ones),
/// against the real binary. Figures: every flooding connection ends with
/// GOAWAY ENHANCE_YOUR_CALM within 1 s → 100 %; CPU of the server process
/// during the attack ≤ 1 core (from `/proc/PID/stat`); legit traffic
/// meanwhile ≥ 99 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e5_continuation_flood_gets_goaway_and_costs_under_one_core() {
    const ATTACKERS: usize = 8;
    const FRAMES: usize = 4_096;
    let dir = tempfile::tempdir().expect("dir");
    let up = Upstream::start().await;
    let (tg, key) = server(&dir, &up).await;
    let addr = tg.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let legit_run = legit(addr, key.clone(), 1, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu0 = cpu_time(tg.pid());
    let t0 = Instant::now();
    let attack_for = Duration::from_secs(3);
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|i| {
            tokio::spawn(async move {
                let mut floods = Vec::new();
                let started = Instant::now();
                while started.elapsed() < attack_for {
                    let payload: &'static [u8] = if (i + floods.len()) % 2 == 0 {
                        big_fragment()
                    } else {
                        &[]
                    };
                    floods.push(continuation_flood(addr, payload, FRAMES).await);
                }
                floods
            })
        })
        .collect();
    let mut floods = Vec::new();
    for a in attackers {
        floods.extend(a.await.expect("attacker"));
    }
    let wall = t0.elapsed();
    let cpu = cpu_time(tg.pid()) - cpu0;
    stop.store(true, Ordering::Relaxed);
    let (ok, total) = legit_run.await.expect("legit");

    let n = floods.len();
    let goaway_calm = floods
        .iter()
        .filter(|f| f.goaway == Some(ENHANCE_YOUR_CALM))
        .count();
    let slowest = floods
        .iter()
        .map(|f| f.closed_after.unwrap_or(Duration::MAX))
        .max()
        .unwrap_or_default();
    let most_sent = floods.iter().map(|f| f.sent).max().unwrap_or_default();
    let cores = cpu.as_secs_f64() / wall.as_secs_f64();
    println!(
        "E5 CONTINUATION flood: {n} connections, GOAWAY ENHANCE_YOUR_CALM on {goaway_calm}, \
         slowest close {slowest:?}, at most {most_sent} frames written on one; server CPU \
         {cpu:?} in {wall:?} = {cores:.2} cores; legit {}/{total}",
        ok.len()
    );
    assert!(n >= ATTACKERS * 2, "too few flooding connections: {n}");
    assert_eq!(
        goaway_calm, n,
        "every flood must end with GOAWAY ENHANCE_YOUR_CALM"
    );
    assert!(
        slowest <= Duration::from_secs(1),
        "a flooding connection stayed open {slowest:?}"
    );
    assert!(
        cores <= 1.0,
        "server CPU during the attack {cores:.2} cores > 1"
    );
    assert!(total >= 20, "too little legit traffic: {total}");
    assert!(
        ok.len() * 100 >= total * 99,
        "legit success {}/{total} < 99 %",
        ok.len()
    );
}

// ------------------------------------------------------------------ E3

/// Resident memory of a process in KiB (`VmRSS` of `/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The status code of the first response in `out`, if any.
fn status_of(out: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(out);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// E3 (CI size): oversize input against the real binary. Figures: 8 KiB
/// header → 200; 64 KiB header → 431; 150 headers → 431; 16 KiB request
/// line → 414; body over the operation's `max_body` (1 KiB), announced or
/// chunked → 413 → 100 %; 200 connections each holding 60 KiB of
/// unfinished headers cost ≤ 1 MiB of server RSS each; an 8 MiB chunked
/// body to a 1 KiB operation grows the server's RSS by ≤ 4 MiB (never
/// buffered beyond the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e3_oversize_input_gets_its_status_and_bounded_memory() {
    const HOLDERS: usize = 200;
    let dir = tempfile::tempdir().expect("dir");
    let up = Upstream::start().await;
    let (tg, key) = server(&dir, &up).await;
    let addr = tg.addr;
    let k = format!("x-api-key: {key}\r\n");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big_body = "b".repeat(4096);
    let cases = [
        (
            "8 KiB header",
            format!(
                "GET /ok HTTP/1.1\r\nHost: x\r\n{k}X-Pad: {}\r\n\r\n",
                "p".repeat(8 * 1024)
            ),
            200,
        ),
        (
            "64 KiB header",
            format!(
                "GET /ok HTTP/1.1\r\nHost: x\r\n{k}X-Big: {}\r\n\r\n",
                "a".repeat(64 * 1024)
            ),
            431,
        ),
        (
            "150 headers",
            format!("GET /ok HTTP/1.1\r\nHost: x\r\n{k}{many}\r\n"),
            431,
        ),
        (
            "16 KiB request line",
            format!(
                "GET /{} HTTP/1.1\r\nHost: x\r\n{k}\r\n",
                "u".repeat(16 * 1024)
            ),
            414,
        ),
        (
            "body over max_body",
            format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\n{k}Content-Length: {}\r\n\r\n{big_body}",
                big_body.len()
            ),
            413,
        ),
        (
            "chunked body over max_body",
            format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\n{k}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{big_body}\r\n0\r\n\r\n",
                big_body.len()
            ),
            413,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, bytes, want) in &cases {
        let got = status_of(&raw(addr, bytes.as_bytes()).await);
        println!("E3 {name}: {got:?} (goal {want})");
        if got != Some(*want) {
            wrong.push(format!("{name}: {got:?}, goal {want}"));
        }
    }

    // Memory of connections holding unfinished 60 KiB headers.
    let before = rss_kib(tg.pid());
    let mut holders = Vec::new();
    let partial = format!(
        "GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: {}",
        "a".repeat(60 * 1024)
    );
    for _ in 0..HOLDERS {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(partial.as_bytes()).await.expect("write");
        holders.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = rss_kib(tg.pid());
    drop(holders);
    let per_conn = held.saturating_sub(before) / HOLDERS as u64;

    // An 8 MiB chunked body to an operation of 1 KiB.
    let before_body = rss_kib(tg.pid());
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\n{k}Transfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("head");
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "c".repeat(64 * 1024));
    let (mut rd, mut wr) = c.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        for _ in 0..128 {
            if wr.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 64 * 1024;
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
        sent
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut answer)).await;
    let sent = writer.await.expect("writer");
    let after_body = rss_kib(tg.pid());
    let body_growth = after_body.saturating_sub(before_body);
    let body_status = status_of(&answer);
    println!(
        "E3 memory: {HOLDERS} connections with 60 KiB of unfinished headers: RSS {before} → {held} KiB, \
         {per_conn} KiB each; 8 MiB chunked body to a 1 KiB operation: {body_status:?} after \
         {sent} bytes written, RSS +{body_growth} KiB"
    );
    assert!(wrong.is_empty(), "wrong statuses:\n{}", wrong.join("\n"));
    assert!(
        per_conn <= 1024,
        "{per_conn} KiB per hostile connection (goal ≤ 1 MiB)"
    );
    assert_eq!(body_status, Some(413));
    assert!(
        body_growth <= 4 * 1024,
        "RSS grew {body_growth} KiB for a refused body"
    );
    // Still serving.
    let r = tg.call("x-api-key", &key, "GET", "/after").await;
    assert_eq!(r.status, 200);
}

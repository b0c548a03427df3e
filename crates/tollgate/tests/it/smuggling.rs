//! RELIABILITY-PLAN E4 against the real binary: a corpus of ambiguous or
//! hostile HTTP/1 framings and of requests tollgate answers early (401, 402,
//! 413, 429, 400) while their body is still on the wire. Every body carries
//! a complete request to `/smuggled-N` (with a valid key, so a server that
//! mistook it for a request would forward it), and every case is followed on
//! the same connection by the request the client means next,
//! `/intended-N`. The upstream records every request line.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Opts, Tollgate, Upstream};

const POLICY: &str = r#"
[policy]
name = "smuggling"
key_header = "x-api-key"
default_plan = "default"

[operations.upload]
method = "POST"
path = "/upload"

[operations.upload.payload]
max_body = 64

[operations.paid]
method = "POST"
path = "/paid"
credits = 1

[operations.tight]
method = "POST"
path = "/tight"

[limits.tight]
algorithm = "token_bucket"
capacity = 1
refill = 1
refill_every = "1h"
scope = ["account"]
operations = ["tight"]

[plans.default]
"#;

/// Writes `bytes` on a new connection and reads until the server closes it
/// (or 5 s pass); returns the status codes of the responses received and
/// how long that took.
async fn exchange(addr: SocketAddr, bytes: Vec<u8>) -> (Vec<u16>, Duration) {
    let t0 = tokio::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(&bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    // A status line may follow the previous body directly; no body here
    // holds "HTTP/1." (the upstream's and tollgate's answers are JSON).
    let text = String::from_utf8_lossy(&out);
    let statuses = text
        .match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect();
    (statuses, t0.elapsed())
}

/// The case whose follow-up is a request of its own (see its comment).
const UPGRADE: &str = "Upgrade without 101";

/// What the first answer of a case may be.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly this status (an early rejection).
    Status(u16),
    /// Any 4xx, or no answer and a closed connection.
    Refused,
    /// A 2xx (a framing the server may accept), a 4xx or a close.
    AnyButServerError,
}

/// E4 (CI size: 48 cases). Figures: requests seen by the upstream that the
/// client did not intend (`/smuggled-N`) → 0; after an early rejection the
/// body is drained (the pipelined `/intended-N` is answered and forwarded)
/// or the connection is closed (nothing further answered) → 100 %; never a
/// third response, never a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e4_smuggling_corpus_never_reaches_the_upstream() {
    use Expect::{AnyButServerError as Any, Refused, Status};
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("policy.toml");
    std::fs::write(&config, POLICY).expect("policy");
    let up = Upstream::start().await;
    let tg = Tollgate::start(Opts {
        config: Some(config),
        upstream: Some(up.url()),
        ..Opts::default()
    });
    let key = tg.account_key("main", None).await;
    tg.credits("main", 1000).await;
    let broke = tg.account_key("broke", None).await;
    let limited = tg.account_key("limited", None).await;
    let r = tg.call("x-api-key", &limited, "POST", "/tight").await;
    assert_eq!(r.status, 200, "{}", r.text());

    let smuggled =
        |n: usize| format!("GET /smuggled-{n} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n\r\n");
    let intended = |n: usize| {
        format!(
            "GET /intended-{n} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
        )
    };
    let chunk = |body: &str| format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    // (name, head lines after the request line, body, expectation); the
    // request line is `POST /forward-N HTTP/1.1` unless the head starts
    // with a request line of its own.
    let mut cases: Vec<(String, String, String, Expect)> = Vec::new();
    let mut add = |name: &str, head: String, body: String, e: Expect| {
        cases.push((name.to_owned(), head, body, e));
    };
    let k = format!("x-api-key: {key}\r\n");
    for (i, (name, te_lines)) in [
        ("CL + TE chunked", "Transfer-Encoding: chunked\r\n"),
        ("TE xchunked", "Transfer-Encoding: xchunked\r\n"),
        (
            "TE chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        ("TE identity", "Transfer-Encoding: identity\r\n"),
        ("TE gzip", "Transfer-Encoding: gzip\r\n"),
        ("TE CHUNKED", "Transfer-Encoding: CHUNKED\r\n"),
        ("TE with tab", "Transfer-Encoding:\tchunked\r\n"),
        ("TE obs-fold", "Transfer-Encoding:\r\n chunked\r\n"),
        ("space before colon", "Transfer-Encoding : chunked\r\n"),
        ("TE underscore", "Transfer_Encoding: chunked\r\n"),
        (
            "two TE headers",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        ),
        (
            "TE chunked twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
        ("TE with comma", "Transfer-Encoding: ,chunked\r\n"),
        ("TE quoted", "Transfer-Encoding: \"chunked\"\r\n"),
    ]
    .into_iter()
    .enumerate()
    {
        // A Content-Length covering the chunked "0" body plus the
        // smuggled request: whichever framing the server picks, the
        // smuggled bytes are body, or the request is refused.
        let n = 100 + i;
        let body = format!("0\r\n\r\n{}", smuggled(n));
        add(
            name,
            format!("{k}Content-Length: {}\r\n{te_lines}", body.len()),
            body,
            Any,
        );
    }
    for (j, (name, cl)) in [
        ("CL +N", "+{n}"),
        ("CL -1", "-1"),
        ("CL hex", "0x{x}"),
        ("CL two values", "{n} {n}"),
        ("CL list differing", "{n}, 0"),
        ("CL trailing comma", "{n},"),
        ("CL overflow", "99999999999999999999999"),
        ("CL with letters", "{n}abc"),
        ("CL empty", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let n = 200 + j;
        let body = smuggled(n);
        let v = cl
            .replace("{n}", &body.len().to_string())
            .replace("{x}", &format!("{:x}", body.len()));
        add(name, format!("{k}Content-Length: {v}\r\n"), body, Refused);
    }
    let n = 300;
    let body = smuggled(n);
    add(
        "duplicate differing CL",
        format!("{k}Content-Length: 0\r\nContent-Length: {}\r\n", body.len()),
        body,
        Refused,
    );
    let n = 301;
    let body = smuggled(n);
    add(
        "duplicate CL 0 first",
        format!("{k}Content-Length: {}\r\nContent-Length: 0\r\n", body.len()),
        body,
        Refused,
    );
    // Chunked bodies whose chunk framing is broken or hostile.
    for (name, body) in [
        (
            "huge chunk size",
            format!("ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n", smuggled(400)),
        ),
        (
            "negative chunk size",
            format!("-1\r\n{}\r\n0\r\n\r\n", smuggled(401)),
        ),
        (
            "chunk size 0x",
            format!("0x10\r\n{}\r\n0\r\n\r\n", smuggled(402)),
        ),
        (
            "chunk size too small",
            format!("3\r\n{}\r\n0\r\n\r\n", smuggled(403)),
        ),
        (
            "chunk without CRLF",
            format!("5\r\nabcdeX{}0\r\n\r\n", smuggled(404)),
        ),
        ("chunk bare LF", format!("5\nabcde\n0\n\n{}", smuggled(405))),
        (
            "chunk extension",
            chunk(&smuggled(406)).replacen("\r\n", ";ext=\"x\"\r\n", 1),
        ),
        (
            "trailer with CL",
            chunk(&smuggled(407)).replace("0\r\n\r\n", "0\r\nContent-Length: 5\r\n\r\n"),
        ),
    ] {
        add(
            name,
            format!("{k}Transfer-Encoding: chunked\r\n"),
            body,
            Any,
        );
    }
    // Oddities of the request itself.
    let body = smuggled(500);
    add(
        "HTTP/1.0 with body",
        format!(
            "POST /forward-500 HTTP/1.0\r\nHost: x\r\n{k}Content-Length: {}\r\n",
            body.len()
        ),
        body,
        Any,
    );
    let body = chunk(&smuggled(501));
    add(
        "HTTP/1.0 chunked",
        format!("POST /forward-501 HTTP/1.0\r\nHost: x\r\n{k}Transfer-Encoding: chunked\r\n"),
        body,
        Any,
    );
    // The upstream answers 200, not 101: the next bytes are a request of
    // their own, to be limited like any (a tunnel would pass it raw).
    add(
        UPGRADE,
        format!("{k}Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n"),
        format!(
            "POST /tight HTTP/1.1\r\nHost: x\r\nx-api-key: {limited}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        Any,
    );
    let body = smuggled(503);
    add(
        "bare LF head",
        format!("{k}Content-Length: {}\n", body.len()),
        body,
        Any,
    );
    let body = smuggled(504);
    add(
        "NUL in a header",
        format!("{k}X-Nul: a\0b\r\nContent-Length: {}\r\n", body.len()),
        body,
        Refused,
    );
    let body = smuggled(505);
    add(
        "header name with space",
        format!("{k}X Foo: 1\r\nContent-Length: {}\r\n", body.len()),
        body,
        Refused,
    );
    let body = smuggled(506);
    add(
        "obs-fold in a header",
        format!("{k}X-Folded: a\r\n b\r\nContent-Length: {}\r\n", body.len()),
        body,
        Any,
    );
    // Early rejections with the body still to come.
    let body = smuggled(600);
    add(
        "401 missing key, CL body",
        format!("Content-Length: {}\r\n", body.len()),
        body,
        Status(401),
    );
    let body = chunk(&smuggled(601));
    add(
        "401 unknown key, chunked body",
        "x-api-key: tg_live_nonsense\r\nTransfer-Encoding: chunked\r\n".to_owned(),
        body,
        Status(401),
    );
    let body = smuggled(602);
    add(
        "413 body over max_body",
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\n{k}Content-Length: {}\r\n",
            body.len()
        ),
        body,
        Status(413),
    );
    let body = chunk(&smuggled(603));
    add(
        "413 chunked body over max_body",
        format!("POST /upload HTTP/1.1\r\nHost: x\r\n{k}Transfer-Encoding: chunked\r\n"),
        body,
        Status(413),
    );
    let body = smuggled(604);
    add(
        "429 with CL body",
        format!(
            "POST /tight HTTP/1.1\r\nHost: x\r\nx-api-key: {limited}\r\nContent-Length: {}\r\n",
            body.len()
        ),
        body,
        Status(429),
    );
    let body = chunk(&smuggled(605));
    add(
        "429 with chunked body",
        format!(
            "POST /tight HTTP/1.1\r\nHost: x\r\nx-api-key: {limited}\r\nTransfer-Encoding: chunked\r\n"
        ),
        body,
        Status(429),
    );
    let body = smuggled(606);
    add(
        "402 with CL body",
        format!(
            "POST /paid HTTP/1.1\r\nHost: x\r\nx-api-key: {broke}\r\nContent-Length: {}\r\n",
            body.len()
        ),
        body,
        Status(402),
    );
    let body = smuggled(607);
    add(
        "402 with Expect: 100-continue",
        format!(
            "POST /paid HTTP/1.1\r\nHost: x\r\nx-api-key: {broke}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n",
            body.len()
        ),
        body,
        Status(402),
    );
    let body = format!("{{bad{}", smuggled(608));
    add(
        "400 /v1/check bad JSON",
        format!(
            "POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ),
        body,
        Status(400),
    );
    let body = smuggled(609);
    add(
        "401 with Expect: 100-continue",
        format!("Expect: 100-continue\r\nContent-Length: {}\r\n", body.len()),
        body,
        Status(401),
    );

    let total = cases.len();
    let addr = tg.addr;
    let runs: Vec<_> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, head, body, expect))| {
            let head = if head.starts_with("POST ") || head.starts_with("GET ") {
                head
            } else {
                format!("POST /forward-{i} HTTP/1.1\r\nHost: x\r\n{head}")
            };
            let next = if name == UPGRADE {
                String::new()
            } else {
                intended(i)
            };
            let bytes = format!("{head}\r\n{body}{next}").into_bytes();
            tokio::spawn(async move { (name, expect, i, exchange(addr, bytes).await) })
        })
        .collect();
    let mut results = Vec::new();
    for r in runs {
        results.push(r.await.expect("case"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<String> = up.seen().into_iter().map(|s| s.path).collect();

    let (mut drained, mut closed, mut bad) = (0, 0, Vec::new());
    for (name, expect, i, (statuses, took)) in &results {
        let first = statuses.first().copied();
        let ok_first = match expect {
            Expect::Status(s) => first == Some(*s),
            Expect::Refused => first.is_none_or(|s| (400..500).contains(&s)),
            Expect::AnyButServerError => first.is_none_or(|s| s < 500),
        };
        // A second answer must be the intended request's, forwarded.
        let intended_seen = seen.iter().any(|p| p == &format!("/intended-{i}"));
        let ok_rest = match statuses.len() {
            0 | 1 => true,
            2 if name == UPGRADE => statuses[1] == 429,
            2 => intended_seen,
            _ => false,
        };
        if matches!(expect, Expect::Status(_)) {
            if statuses.len() == 2 {
                drained += 1;
            } else {
                closed += 1;
            }
        }
        if !(ok_first && ok_rest) {
            bad.push(format!("{name}: {statuses:?} (expected {expect:?})"));
        }
        println!("E4 {name}: {statuses:?} in {took:?}");
    }
    let smuggled_seen: Vec<&String> = seen.iter().filter(|p| p.starts_with("/smuggled")).collect();
    println!(
        "E4: {total} cases; smuggled requests at the upstream {}; early rejections drained {drained}, closed {closed}; wrong answers {}",
        smuggled_seen.len(),
        bad.len()
    );
    println!("E4 upstream saw: {seen:?}");
    assert!(total >= 40, "corpus too small: {total}");
    let tight = seen.iter().filter(|p| *p == "/tight").count();
    assert_eq!(tight, 1, "a request after the Upgrade skipped its limit");
    assert!(smuggled_seen.is_empty(), "smuggled: {smuggled_seen:?}");
    assert!(bad.is_empty(), "wrong answers:\n{}", bad.join("\n"));
    // Still serving.
    let r = tg.call("x-api-key", &key, "GET", "/after").await;
    assert_eq!(r.status, 200);
}

//! `POST /v1/check` is served before the router (a body that came whole
//! with its headers straight from hyper's service, a borrowed parse,
//! axum's extractor as the fallback): its answers must be the router's.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Server, TOKEN};

async fn post(s: &Server, content_type: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let (status, bytes) = s.post_raw("/v1/check", content_type, body.to_owned()).await;
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, body)
}

fn message(v: &serde_json::Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn check_answers_match_the_router_for_every_body_shape() {
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "pro").await;
    let json = Some("application/json");

    // Plain strings (borrowed), escaped strings (owned fallback) and another
    // JSON content type (axum's extractor) decide the same way.
    let (st, plain) = post(&s, json, r#"{"account":"acme","cost":0}"#).await;
    assert_eq!(st, 200, "{plain}");
    let (st, escaped) = post(&s, json, r#"{"account":"ac\u006de","cost":0}"#).await;
    assert_eq!(st, 200, "{escaped}");
    let (st, charset) = post(
        &s,
        Some("application/json; charset=utf-8"),
        r#"{"account":"acme","cost":0}"#,
    )
    .await;
    assert_eq!(st, 200, "{charset}");
    for answer in [&escaped, &charset] {
        for field in ["allowed", "status", "operation", "reason", "retry_after_s"] {
            assert_eq!(answer[field], plain[field], "{field}");
        }
        assert_eq!(
            answer["headers"]
                .as_object()
                .map(|h| h.keys().collect::<Vec<_>>()),
            plain["headers"]
                .as_object()
                .map(|h| h.keys().collect::<Vec<_>>())
        );
        assert_eq!(answer["limits"].as_array().map(Vec::len), Some(2));
    }
    let (st, by_key) = post(&s, json, &format!(r#"{{"key":"{key}","cost":0}}"#)).await;
    assert_eq!((st, &by_key["allowed"]), (200, &serde_json::json!(true)));

    // Errors carry axum's messages, as before.
    let (st, e) = post(&s, Some("text/plain"), r#"{"account":"acme"}"#).await;
    assert_eq!(st, 400);
    assert_eq!(
        message(&e),
        "invalid check request: Expected request with `Content-Type: application/json`"
    );
    let (st, e) = post(&s, json, r#"{"account":"acme","bogus":1}"#).await;
    assert_eq!(st, 400);
    assert!(
        message(&e).starts_with(
            "invalid check request: Failed to deserialize the JSON body into the target type: "
        ) && message(&e).contains("unknown field `bogus`"),
        "{e}"
    );
    let (st, e) = post(&s, json, r#"{"account":"acme","#).await;
    assert_eq!(st, 400);
    assert!(
        message(&e).starts_with("invalid check request: Failed to parse the request body as JSON"),
        "{e}"
    );
    let (st, e) = post(&s, json, r#"{"account":1}"#).await;
    assert_eq!(st, 400);
    assert!(
        message(&e).contains("invalid type: integer `1`, expected a string"),
        "{e}"
    );
    let (st, e) = post(&s, json, r#"{"account":"nobody"}"#).await;
    assert_eq!((st, message(&e)), (404, "unknown account `nobody`"));

    // Other methods still reach the router (405), other paths the proxy.
    let a = s.call(false, "GET", "/v1/check", &[], "").await;
    assert_eq!(a.status, 405);
    let a = s.call(false, "GET", "/v1/check/", &[], "").await;
    assert_eq!(
        a.status, 401,
        "proxied, so the key is asked for: {}",
        a.text
    );
    s.running.shutdown().await;
}

/// How a raw check request sends its body.
#[derive(Clone, Copy, Debug)]
enum Sent {
    /// With `Content-Length`, in one write with the headers: answered
    /// straight from hyper's service.
    Whole,
    /// Chunked (no announced length): through the guarded body and the
    /// route, read by axum's extractor.
    Chunked,
    /// With `Expect: 100-continue`, the body sent only after the server
    /// asks: its first poll finds nothing, so it takes the guarded path.
    AfterContinue,
}

/// One raw HTTP/1.1 `POST /v1/check` (`Connection: close`); the answer as
/// text, without its `date` header (and without a `100 Continue` before it).
async fn raw_check(addr: SocketAddr, body: &[u8], sent: Sent) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut head = String::from(
        "POST /v1/check HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/json\r\n\
         Connection: close\r\n",
    );
    let mut wire = Vec::new();
    match sent {
        Sent::Whole | Sent::AfterContinue => {
            head += &format!("Content-Length: {}\r\n", body.len());
            if let Sent::AfterContinue = sent {
                head += "Expect: 100-continue\r\n";
            }
            wire.extend_from_slice(body);
        }
        Sent::Chunked => {
            head += "Transfer-Encoding: chunked\r\n";
            if !body.is_empty() {
                wire.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                wire.extend_from_slice(body);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
        }
    }
    head += "\r\n";
    let mut answer = Vec::new();
    let read = async {
        if let Sent::AfterContinue = sent {
            s.write_all(head.as_bytes()).await.expect("head");
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                assert_eq!(s.read(&mut b).await.expect("read"), 1, "closed early");
                got.push(b[0]);
            }
            if got.starts_with(b"HTTP/1.1 100 Continue") {
                s.write_all(&wire).await.expect("body");
            } else {
                // Answered without reading the body (an empty one): no
                // `100 Continue`, the answer has begun.
                assert!(body.is_empty(), "{got:?}");
                answer = got;
            }
        } else {
            let mut all = head.into_bytes();
            all.extend_from_slice(&wire);
            s.write_all(&all).await.expect("request");
        }
        s.read_to_end(&mut answer).await.expect("answer");
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered within 10 s");
    String::from_utf8_lossy(&answer)
        .split("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The same check sent whole (hyper's service answers it), chunked and after
/// `100 Continue` (the guarded body and the route) gets the same status,
/// headers and bytes, for answers and for every kind of error.
#[tokio::test]
async fn checks_answered_from_the_service_match_the_routed_ones_byte_for_byte() {
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "pro").await;
    let bodies: Vec<Vec<u8>> = [
        r#"{"account":"acme","operation":"default","cost":0}"#.to_owned(),
        format!(r#"{{"key":"{key}","cost":0}}"#),
        r#" { "account" : "acme" , "ip" : "10.0.0.1", "attributes": {} , "cost" : 0 } "#.to_owned(),
        r#"{"account":"ac\u006de","cost":0}"#.to_owned(),
        r#"{"account":"acme","cost":1000000000000}"#.to_owned(),
        r#"{"account":"acme","cost":-1}"#.to_owned(),
        r#"{"account":"acme","bogus":1}"#.to_owned(),
        r#"{"account":"acme","account":"acme"}"#.to_owned(),
        r#"{"account":"acme","#.to_owned(),
        r#"{"account":1}"#.to_owned(),
        r#"{"account":"nobody"}"#.to_owned(),
        r#"{"key":"tg_nope.nope"}"#.to_owned(),
        r#"{"account":"acme","operation":"nope"}"#.to_owned(),
        r#"{"account":"acme","attributes":{"nope":"x"}}"#.to_owned(),
        r#"{}"#.to_owned(),
        String::new(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .chain([b"{\"account\":\"\xff\"}".to_vec()])
    .collect();
    for body in &bodies {
        // A reset in seconds may tick between two calls: a few tries.
        let mut last = None;
        for _ in 0..3 {
            let whole = raw_check(s.running.addr, body, Sent::Whole).await;
            let chunked = raw_check(s.running.addr, body, Sent::Chunked).await;
            let after = raw_check(s.running.addr, body, Sent::AfterContinue).await;
            if whole == chunked && whole == after {
                last = None;
                break;
            }
            last = Some((whole, chunked, after));
        }
        assert_eq!(last, None, "{}", String::from_utf8_lossy(body));
    }
    // The answers are what the contract says.
    let ok = raw_check(s.running.addr, &bodies[0], Sent::Whole).await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("\r\ncontent-type: application/json\r\n"),
        "{ok}"
    );
    assert!(ok.contains(r#"{"allowed":true,"headers":{"#), "{ok}");
    let bad = raw_check(s.running.addr, &bodies[6], Sent::Whole).await;
    assert!(bad.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{bad}");
    assert!(bad.contains(r#"{"error":{"code":"bad_request","message":"invalid check request: "#));
    s.running.shutdown().await;
}

/// One answer read from a kept-alive connection: status line and headers
/// (without `date`) and the body of its `Content-Length`.
async fn read_one_answer(c: &mut TcpStream) -> String {
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.expect("read"), 1, "closed early");
        got.push(b[0]);
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    let len: usize = head
        .split("\r\n")
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .expect("content-length")
        .parse()
        .expect("a length");
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).await.expect("body");
    let head: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect();
    format!("{}{}", head.join("\r\n"), String::from_utf8_lossy(&body))
}

/// Checks answered from hyper's service reuse the request's header map for
/// the answer's headers (and hyper then reads the next request into it):
/// on one kept-alive connection, requests with many headers (repeated
/// names, a second `Content-Type`) and without, answers and errors in turn,
/// each answer has the status, headers and bytes of the same check through
/// the route (sent chunked on a connection of its own).
#[tokio::test]
async fn checks_on_one_connection_answer_with_only_their_own_headers() {
    let s = Server::start(Some(TOKEN)).await;
    s.account_with_key("acme", "pro").await;
    let bodies = [
        r#"{"account":"acme","operation":"default","cost":0}"#,
        r#"{"account":"nobody"}"#,
        r#"{"account":"acme","cost":0,"ip":"10.0.0.1"}"#,
        r#"{"account":"acme","bogus":1}"#,
    ];
    let mut c = TcpStream::connect(s.running.addr).await.expect("connect");
    for round in 0..12 {
        let body = bodies[round % bodies.len()];
        let mut head = String::from("POST /v1/check HTTP/1.1\r\nHost: tollgate\r\n");
        // Every other round, 40 more headers (the map grows), a name
        // repeated and a second content type after the first.
        if round % 2 == 0 {
            for i in 0..40 {
                head += &format!("X-Pad-{i}: {}\r\n", "v".repeat(i));
            }
            head += "X-Twice: 1\r\nX-Twice: 2\r\n";
        }
        head += "Content-Type: application/json\r\n";
        if round % 2 == 0 {
            head += "Content-Type: text/plain\r\n";
        }
        head += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
        let mut last = None;
        for _ in 0..3 {
            c.write_all(head.as_bytes()).await.expect("request");
            let kept = tokio::time::timeout(Duration::from_secs(10), read_one_answer(&mut c))
                .await
                .expect("answered within 10 s");
            let routed = raw_check(s.running.addr, body.as_bytes(), Sent::Chunked).await;
            // The routed answer came with `Connection: close`.
            let routed = routed.replacen("\r\nconnection: close", "", 1);
            if kept == routed {
                last = None;
                break;
            }
            // A reset in seconds may tick between the two: again.
            last = Some((kept, routed));
        }
        assert_eq!(last, None, "round {round}: {body}");
    }
    s.running.shutdown().await;
}

/// A small check body that stops arriving is still answered 408 and its
/// connection closed (the body is guarded when it did not come whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_small_check_body_gets_408() {
    let s = Server::configured(
        Some(TOKEN),
        tollgate_server::config::DEFAULT_POLICY,
        None,
        |c| {
            c.body_read_timeout = Duration::from_secs(1);
            c.body_timeout = Duration::from_secs(3);
        },
    )
    .await;
    for split in [false, true] {
        let mut c = TcpStream::connect(s.running.addr).await.expect("connect");
        let head = "POST /v1/check HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/json\r\n\
                    Content-Length: 40\r\n\r\n";
        if split {
            // Headers, then part of the body (the first poll may find it).
            c.write_all(head.as_bytes()).await.expect("head");
            c.write_all(br#"{"account":"#).await.expect("part");
        } else {
            // Headers and part of the body in one write.
            c.write_all(format!("{head}{{\"account\":").as_bytes())
                .await
                .expect("head and part");
        }
        let started = tokio::time::Instant::now();
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
            .await
            .is_ok();
        let answer = String::from_utf8_lossy(&answer);
        assert!(closed, "not closed: {answer}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_body_timeout"), "{answer}");
        assert!(
            started.elapsed() <= Duration::from_secs(3),
            "closed after {:?}",
            started.elapsed()
        );
    }
    s.running.shutdown().await;
}

/// A soft limit crossed by checks answered without a future (the caller read
/// lately, the store in memory) is counted and recorded as by the routed
/// path: one `soft_limit_crossed` event per account, limit and minute, in
/// the ledger by the time the answer arrives.
#[tokio::test]
async fn a_soft_limit_crossed_by_checks_is_recorded_once_before_the_answer() {
    let policy = "[limits.hard]\nalgorithm = \"sliding_window\"\nlimit = 100\nwindow = \"60s\"\n\
                  [limits.soft]\nalgorithm = \"sliding_window\"\nlimit = 1\nwindow = \"60s\"\nmode = \"soft\"\n";
    let s = Server::with_policy(Some(TOKEN), policy).await;
    let key = s.account_with_key("acme", "default").await;
    let json = Some("application/json");
    let bodies = [
        r#"{"account":"acme"}"#.to_owned(),
        r#"{"account":"acme"}"#.to_owned(),
        format!(r#"{{"key":"{key}"}}"#),
        r#"{"account":"acme"}"#.to_owned(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let (st, answer) = post(&s, json, body).await;
        assert_eq!(
            (st, &answer["allowed"]),
            (200, &serde_json::json!(true)),
            "{answer}"
        );
        let soft = answer["limits"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == "soft"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(soft["exceeded"], serde_json::json!(i > 0), "{answer}");
        let events = s.admin("GET", "/admin/v1/events?account=acme", "").await;
        let crossings: Vec<&serde_json::Value> = events
            .body
            .as_array()
            .map(|e| {
                e.iter()
                    .filter(|e| e["kind"] == "soft_limit_crossed")
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            crossings.len(),
            usize::from(i > 0),
            "after check {i}: {}",
            events.text
        );
        if let Some(c) = crossings.first() {
            assert_eq!(
                c["data"],
                serde_json::json!({ "limit": "soft", "quota": 1 })
            );
        }
    }
}

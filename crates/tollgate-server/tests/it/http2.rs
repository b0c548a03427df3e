//! RELIABILITY-PLAN E5: HTTP/2 abuse against the proxy listener (which also
//! serves `/v1/check`), driven by the `h2` crate's client over h2c with prior
//! knowledge. The server advertises at most 200 concurrent streams; a rapid
//! reset flood and a connection that opens 10 k streams at once are answered
//! with GOAWAY within hyper/h2's limits; a client that ignores the limit
//! (raw frames) never gets more than it running; legit traffic keeps
//! succeeding.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;

use crate::hardening::legit_traffic;
use crate::support::{Server, TOKEN, holding_upstream};

const POLICY: &str = r#"
[policy]
name = "h2-abuse"

[limits.roomy]
algorithm = "token_bucket"
capacity = 1000000
refill = 1000000
scope = ["account"]

[plans.default]
"#;

/// An h2c connection (prior knowledge) with `initial_max_send_streams`
/// streams allowed before the server's SETTINGS arrive; the connection task's
/// result comes back through the handle.
async fn h2c(
    addr: SocketAddr,
    initial_max_send_streams: usize,
) -> (
    SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::Builder::new()
        .initial_max_send_streams(initial_max_send_streams)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    (send, tokio::spawn(conn))
}

fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::get(format!("http://{addr}{path}"));
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(()).expect("request")
}

/// The status of one request on an h2 connection (body read to the end).
async fn h2_status(
    send: &mut SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<&'static str>,
) -> Result<u16, h2::Error> {
    let mut ready = send.clone().ready().await?;
    let (resp, mut stream) = ready.send_request(req, body.is_none())?;
    if let Some(b) = body {
        stream.send_data(Bytes::from_static(b.as_bytes()), true)?;
    }
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

/// Legit HTTP/2 traffic on its own connection: `/v1/check` and a proxied
/// route; returns (successes, attempts).
fn legit_h2(
    addr: SocketAddr,
    key: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let (mut send, _conn) = h2c(addr, 100).await;
        let (mut ok, mut total) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let mut check = http::Request::post(format!("http://{addr}/v1/check"));
            check = check.header("content-type", "application/json");
            let check = check.body(()).expect("request");
            for (req, body) in [
                (check, Some(r#"{"account":"legit"}"#)),
                (get(addr, "/hold", Some(&key)), None),
            ] {
                total += 1;
                if let Ok(Ok(200)) =
                    tokio::time::timeout(Duration::from_secs(5), h2_status(&mut send, req, body))
                        .await
                {
                    ok += 1;
                }
            }
        }
        (ok, total)
    })
}

async fn server() -> (Server, String, String, Arc<AtomicUsize>) {
    let (upstream, _, peak) = holding_upstream().await;
    let s = Server::with_upstream(Some(TOKEN), POLICY, Some(upstream)).await;
    let attacker = s.account_with_key("attacker", "default").await;
    let legit = s.account_with_key("legit", "default").await;
    (s, attacker, legit, peak)
}

/// A socket whose reads wait until `hold` has elapsed (writes go through),
/// so an h2 client sends before it has read the server's SETTINGS.
struct HeldReads {
    io: TcpStream,
    hold: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for HeldReads {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.hold.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeldReads {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How the connection ended (GOAWAY, a close or reset), or `None` if it is
/// still open after 10 s.
async fn ended(conn: tokio::task::JoinHandle<Result<(), h2::Error>>) -> Option<String> {
    match tokio::time::timeout(Duration::from_secs(10), conn).await {
        Ok(Ok(Ok(()))) => Some("closed".to_owned()),
        Ok(Ok(Err(e))) => Some(format!("{e}")),
        Ok(Err(_)) => Some("connection task failed".to_owned()),
        Err(_) => None,
    }
}

/// E5: HTTP/2 with prior knowledge is served on the proxy listener (proxied
/// routes and `/v1/check`), and `SETTINGS_MAX_CONCURRENT_STREAMS` advertised
/// is ≤ 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e5_h2c_is_served_and_advertises_at_most_200_streams() {
    let (s, key, _, _) = server().await;
    let addr = s.running.addr;
    let (mut send, _conn) = h2c(addr, 1).await;
    assert_eq!(
        h2_status(&mut send, get(addr, "/healthz", None), None)
            .await
            .expect("healthz"),
        200
    );
    let check = http::Request::post(format!("http://{addr}/v1/check"))
        .header("content-type", "application/json")
        .body(())
        .expect("request");
    assert_eq!(
        h2_status(&mut send, check, Some(r#"{"account":"attacker"}"#))
            .await
            .expect("check"),
        200
    );
    assert_eq!(
        h2_status(&mut send, get(addr, "/hold", Some(&key)), None)
            .await
            .expect("proxied"),
        200
    );
    let advertised = send.current_max_send_streams();
    println!("E5 advertised SETTINGS_MAX_CONCURRENT_STREAMS = {advertised}");
    assert!(
        (1..=200).contains(&advertised),
        "advertised {advertised} concurrent streams"
    );
    s.running.shutdown().await;
}

/// E5 (rapid reset, CVE-2023-44487 pattern): HEADERS immediately followed by
/// RST_STREAM, up to 20 k times on one connection, against `/v1/check` and a
/// proxied route. Figures: the connection ends with GOAWAY (h2's limit on
/// remotely reset streams) before the flood completes → 100 %; legit HTTP/1
/// and HTTP/2 traffic meanwhile ≥ 99 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e5_rapid_reset_flood_is_cut_off_with_goaway() {
    const FLOOD: usize = 20_000;
    let (s, key, legit_key, _) = server().await;
    let addr = s.running.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let legit1 = legit_traffic(addr, stop.clone());
    let legit2 = legit_h2(addr, legit_key, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut send, conn) = h2c(addr, 200).await;
    let mut reset = 0;
    for i in 0..FLOOD {
        let req = if i % 2 == 0 {
            http::Request::post(format!("http://{addr}/v1/check"))
                .body(())
                .expect("request")
        } else {
            get(addr, "/hold", Some(&key))
        };
        let Ok(mut ready) = send.clone().ready().await else {
            break;
        };
        let Ok((resp, mut stream)) = ready.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        drop(resp);
        reset += 1;
        if i % 64 == 0 {
            // Let the connection task write what is queued.
            tokio::task::yield_now().await;
        }
        send = ready;
    }
    let end = ended(conn).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok1, total1) = legit1.await.expect("legit h1");
    let (ok2, total2) = legit2.await.expect("legit h2");
    println!("E5 rapid reset: {reset} of {FLOOD} HEADERS+RST_STREAM sent; connection: {end:?}");
    println!("E5 legit during rapid reset: h1 {ok1}/{total1}, h2 {ok2}/{total2}");
    // The client never closes it: any end (GOAWAY, or the close that follows
    // it, seen as a broken pipe or reset) is the server's doing.
    assert!(
        end.is_some(),
        "the flooding connection must be ended by the server"
    );
    assert!(reset < FLOOD, "all {FLOOD} resets were accepted");
    let (ok, total) = (ok1 + ok2, total1 + total2);
    assert!(total >= 20, "too little legit traffic to judge: {total}");
    assert!(ok * 100 >= total * 99, "legit success {ok}/{total} < 99 %");
    // The server still serves HTTP/2 afterwards.
    let (mut send, _conn) = h2c(addr, 1).await;
    assert_eq!(
        h2_status(&mut send, get(addr, "/healthz", None), None)
            .await
            .expect("healthz after the flood"),
        200
    );
    s.running.shutdown().await;
}

/// E5 (stream flood): one connection opens 10 k streams at once (the client
/// sends them before it learns the server's limit). Figures: at most 200 of
/// them ever run at once (peak requests held by the upstream ≤ 200), the
/// streams beyond the limit are refused and the connection ends with GOAWAY
/// (h2's limit on refused streams) → 100 %; legit traffic meanwhile ≥ 99 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e5_ten_thousand_streams_on_one_connection_get_goaway() {
    const STREAMS: usize = 10_000;
    let (s, key, legit_key, peak) = server().await;
    let addr = s.running.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let legit1 = legit_traffic(addr, stop.clone());
    let legit2 = legit_h2(addr, legit_key, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let legit_peak = peak.load(Ordering::SeqCst);

    // The client reads nothing for its first second, so it never learns the
    // server's limit and sends all 10 k HEADERS frames at once.
    let tcp = HeldReads {
        io: TcpStream::connect(addr).await.expect("connect"),
        hold: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
    };
    let (mut send, conn) = h2::client::Builder::new()
        .initial_max_send_streams(STREAMS)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let mut responses = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        match send.send_request(get(addr, "/hold", Some(&key)), true) {
            Ok((resp, _)) => responses.push(resp),
            Err(_) => break,
        }
    }
    let opened = responses.len();
    let conn = tokio::spawn(conn);
    let (mut answered, mut refused) = (0, 0);
    for r in responses {
        match tokio::time::timeout(Duration::from_secs(20), r).await {
            Ok(Ok(_)) => answered += 1,
            _ => refused += 1,
        }
    }
    let end = ended(conn).await;
    stop.store(true, Ordering::Relaxed);
    let (ok1, total1) = legit1.await.expect("legit h1");
    let (ok2, total2) = legit2.await.expect("legit h2");
    let peak = peak.load(Ordering::SeqCst);
    println!(
        "E5 stream flood: {opened} streams opened, {answered} answered, {refused} refused; \
         peak held upstream {peak} (legit alone {legit_peak}); connection: {end:?}"
    );
    println!("E5 legit during stream flood: h1 {ok1}/{total1}, h2 {ok2}/{total2}");
    assert_eq!(opened, STREAMS, "the client sends every stream");
    // The client never closes it: any end (GOAWAY, or the close that follows
    // it, seen as a broken pipe or reset) is the server's doing.
    assert!(
        end.is_some(),
        "the flooding connection must be ended by the server"
    );
    assert!(refused > 0, "streams beyond the limit must be refused");
    // The legit h2 connection may add a request or two upstream.
    assert!(peak <= 200 + 2, "{peak} requests ran at once");
    let (ok, total) = (ok1 + ok2, total1 + total2);
    assert!(total >= 20, "too little legit traffic to judge: {total}");
    assert!(ok * 100 >= total * 99, "legit success {ok}/{total} < 99 %");
    s.running.shutdown().await;
}

/// One HTTP/2 frame: 9-byte header (length, type, flags, stream) + payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// An HPACK string literal (no Huffman; short strings only).
fn hpack_string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127, "one-byte length prefix");
    out.push(s.len() as u8);
    out.extend(s.as_bytes());
}

/// Reads one frame: (type, flags, stream, payload).
async fn read_frame(io: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

/// E5 (streams beyond the limit, after the SETTINGS exchange): a client
/// that ignores the advertised `SETTINGS_MAX_CONCURRENT_STREAMS` (raw
/// frames; a library client would queue them) opens 300 streams whose
/// upstream answers take 3 s. Figures: streams running at once upstream
/// ≤ the advertised limit, and every stream beyond it refused
/// (RST_STREAM or GOAWAY) → 100 %, none of them forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e5_streams_beyond_the_advertised_limit_never_run() {
    use tokio::io::AsyncWriteExt;
    const STREAMS: u32 = 300;
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const GOAWAY: u8 = 0x7;
    let (s, key, _, peak) = server().await;
    let addr = s.running.addr;
    let mut io = TcpStream::connect(addr).await.expect("connect");
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    io.write_all(&frame(SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    // The server's SETTINGS: its limit, then our ACK (from here on the
    // limit is in force for the streams we open).
    let advertised = loop {
        let (kind, flags, _, payload) =
            tokio::time::timeout(Duration::from_secs(5), read_frame(&mut io))
                .await
                .expect("server settings in time")
                .expect("read");
        if kind == SETTINGS && flags & 0x1 == 0 {
            let limit = payload
                .chunks(6)
                .find(|p| u16::from_be_bytes([p[0], p[1]]) == 0x3)
                .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
                .expect("SETTINGS_MAX_CONCURRENT_STREAMS advertised");
            break limit;
        }
    };
    io.write_all(&frame(SETTINGS, 0x1, 0, &[]))
        .await
        .expect("ack");
    let authority = addr.to_string();
    let mut burst = Vec::new();
    for i in 0..STREAMS {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        block.push(0x04); // :path, literal without indexing
        hpack_string(&mut block, "/hold/3000");
        block.push(0x01); // :authority
        hpack_string(&mut block, &authority);
        block.push(0x00); // x-api-key, new name
        hpack_string(&mut block, "x-api-key");
        hpack_string(&mut block, &key);
        // END_STREAM | END_HEADERS on stream 2i + 1.
        burst.extend(frame(HEADERS, 0x5, 2 * i + 1, &block));
    }
    io.write_all(&burst).await.expect("burst");
    let (mut answered, mut reset, mut goaway) = (0u32, 0u32, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while answered + reset < STREAMS && !goaway {
        let Ok(read) = tokio::time::timeout_at(deadline, read_frame(&mut io)).await else {
            break;
        };
        let Ok((kind, _, stream, _)) = read else {
            break;
        };
        match kind {
            HEADERS if stream != 0 => answered += 1,
            RST_STREAM => reset += 1,
            GOAWAY => goaway = true,
            _ => {}
        }
    }
    let peak = peak.load(Ordering::SeqCst);
    println!(
        "E5 beyond the limit: advertised {advertised}, {STREAMS} streams opened; \
         {answered} answered, {reset} reset, GOAWAY {goaway}; peak held upstream {peak}"
    );
    assert!((1..=200).contains(&advertised));
    assert!(
        peak <= advertised as usize,
        "{peak} streams ran at once over a limit of {advertised}"
    );
    assert!(answered <= advertised, "{answered} answered");
    // Every stream beyond the limit is refused: reset one by one, or all
    // at once by a GOAWAY.
    assert!(
        goaway || reset >= STREAMS - advertised,
        "{reset} of the {} streams beyond the limit were refused",
        STREAMS - advertised
    );
    // The ones within the limit did run (the limit is not refusing everything).
    assert!(
        peak as u32 >= advertised / 2,
        "only {peak} of {advertised} allowed streams reached the upstream"
    );
    drop(io);
    s.running.shutdown().await;
}

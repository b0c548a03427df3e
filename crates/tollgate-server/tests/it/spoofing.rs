//! RELIABILITY-PLAN G1 at CI size, in process through the proxy: a per-IP
//! limit under thousands of seeded random forwarding headers from an
//! untrusted peer (127.0.0.9), then from a trusted proxy (127.0.0.20), and a
//! victim whose address the attacker claims (127.0.0.10).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::support::{Rng, Server, TOKEN, Upstream};

/// Per client address: 50 requests an hour.
const LIMIT: usize = 50;

const POLICY: &str = r#"
[policy]
name = "xff"
key_header = "x-api-key"

[limits.per-ip]
algorithm = "sliding_window"
limit = 50
window = "1h"
scope = ["ip"]

[plans.default]
"#;

/// One forged address in one of the forms clients and proxies write.
fn forged(rng: &mut Rng) -> String {
    let v4 = |rng: &mut Rng| {
        format!(
            "{}.{}.{}.{}",
            rng.below(256),
            rng.below(256),
            rng.below(256),
            rng.below(256)
        )
    };
    match rng.below(9) {
        0 => v4(rng),
        1 => format!("{}:{}", v4(rng), rng.below(65_536)),
        2 => format!("[2001:db8::{:x}]:{}", rng.below(65_536), rng.below(65_536)),
        3 => format!("2001:db8::{:x}", rng.below(65_536)),
        4 => "127.0.0.10".to_owned(), // the victim
        5 => format!("127.0.0.{}", rng.below(256)),
        6 => "unknown".to_owned(),
        7 => format!("garbage-{}", rng.next()),
        _ => format!("::ffff:{}", v4(rng)),
    }
}

/// Random forwarding headers: `X-Forwarded-For` (one or several headers,
/// lists), `Forwarded`, `X-Real-IP`, `True-Client-IP`, `CF-Connecting-IP`.
fn spoof_headers(rng: &mut Rng) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    for _ in 0..=rng.below(3) {
        let list: Vec<String> = (0..=rng.below(4)).map(|_| forged(rng)).collect();
        match rng.below(6) {
            0 | 1 => h.push(("x-forwarded-for", list.join(", "))),
            2 => h.push((
                "forwarded",
                list.iter()
                    .map(|a| format!("for=\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            3 => h.push(("x-real-ip", list[0].clone())),
            4 => h.push(("true-client-ip", list[0].clone())),
            _ => h.push(("cf-connecting-ip", list[0].clone())),
        }
    }
    h
}

/// A client whose connections come from `ip`.
fn client_from(ip: IpAddr) -> Client<HttpConnector, Full<Bytes>> {
    let mut c = HttpConnector::new();
    c.set_local_address(Some(ip));
    Client::builder(TokioExecutor::new()).build(c)
}

async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    key: &str,
    headers: &[(&str, String)],
) -> u16 {
    let mut req = http::Request::get(format!("http://{addr}/work")).header("x-api-key", key);
    for (n, v) in headers {
        req = req.header(*n, v.as_str());
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("answer");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// G1 (CI size: 2,000 requests with seeded random forwarding headers from
/// an untrusted peer, 500 from a trusted proxy). Figures: admitted for the
/// attacker = L exactly (bypasses 0; the key is the peer address whatever
/// the headers say → 100 %); the victim, whose address the attacker
/// claimed, is admitted L times (lockouts 0); behind the trusted proxy the
/// first untrusted address from the right is the key → 100 % (L admitted
/// for it, whatever forged entries precede it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_forged_forwarding_headers_neither_bypass_nor_lock_out() {
    const ATTACK: usize = 2_000;
    const PROXIED: usize = 500;
    let up = Upstream::start().await;
    let s = Server::configured(Some(TOKEN), POLICY, Some(up.addr), |c| {
        c.trusted_proxies = vec!["127.0.0.20/32".parse().expect("cidr")];
    })
    .await;
    let key = s.account_with_key("shared", "default").await;
    let addr = s.running.addr;
    let mut rng = Rng(0x6761_2026);

    let attacker = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
    let mut admitted = 0;
    for _ in 0..ATTACK {
        let h = spoof_headers(&mut rng);
        match get(&attacker, addr, &key, &h).await {
            200 => admitted += 1,
            429 => {}
            other => panic!("attacker got {other} for {h:?}"),
        }
    }

    let victim = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)));
    let mut victim_ok = 0;
    for _ in 0..LIMIT {
        if get(&victim, addr, &key, &[]).await == 200 {
            victim_ok += 1;
        }
    }
    let victim_over = get(&victim, addr, &key, &[]).await;

    // Behind the trusted proxy: forged entries, then the real client
    // 127.0.0.31 appended by the proxy (the rightmost untrusted hop).
    let proxy = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 20)));
    let mut proxied_ok = 0;
    for _ in 0..PROXIED {
        let forged_list: Vec<String> = (0..=rng.below(3)).map(|_| forged(&mut rng)).collect();
        let xff = format!("{}, 127.0.0.31", forged_list.join(", "));
        match get(&proxy, addr, &key, &[("x-forwarded-for", xff.clone())]).await {
            200 => proxied_ok += 1,
            429 => {}
            other => panic!("proxied request got {other} for {xff}"),
        }
    }

    println!(
        "G1: attacker 127.0.0.9 with {ATTACK} forged header sets: {admitted} admitted (L = {LIMIT}); \
         victim 127.0.0.10: {victim_ok}/{LIMIT} admitted, then {victim_over}; behind the trusted \
         proxy: {proxied_ok} of {PROXIED} admitted for 127.0.0.31"
    );
    assert_eq!(
        admitted, LIMIT,
        "bypasses: the attacker got more or less than L"
    );
    assert_eq!(
        victim_ok, LIMIT,
        "the victim was locked out by forged headers"
    );
    assert_eq!(victim_over, 429, "the victim's own limit still applies");
    assert_eq!(
        proxied_ok, LIMIT,
        "the key behind a trusted proxy is the rightmost untrusted hop"
    );
}

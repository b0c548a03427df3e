//! G6 of RELIABILITY-PLAN.md on the stable toolchain. cargo-fuzz needs a
//! nightly compiler, which this project's machines do not have, so every
//! parser that reads bytes a caller controls gets seeded mutation runs here
//! instead: valid seeds (presets, images, multipart and JSON bodies,
//! forwarding headers, signed webhooks) are bit-flipped, truncated, spliced
//! with dictionary tokens and fed to the parser. A panic fails the test;
//! every input must finish within 1 s. Each target runs for `G6_SECONDS`
//! (default 4) or 50,000 inputs, whichever ends first; `G6_SEED` replays a
//! run. Nesting bombs are checked separately: rejected in ≤ 10 ms.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use tokio::time::Instant;
use tollgate_server::{client_ip, payload, webhooks};

use crate::support::{Rng, Server, TOKEN};

const MAX_INPUTS: u64 = 50_000;
const MAX_PER_INPUT: Duration = Duration::from_secs(1);

/// Mutates seeds (splitmix64 from the run's seed).
struct Mutator(Rng);

impl Mutator {
    fn from_env() -> Mutator {
        let seed = std::env::var("G6_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6666_2026);
        eprintln!("G6 seed {seed}");
        Mutator(Rng(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.next()
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::try_from(self.0.below(n as u64)).expect("fits")
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// One to four random edits of `seed`.
    fn mutate(&mut self, seed: &[u8], dict: &[&[u8]]) -> Vec<u8> {
        const SPECIAL: &[u8] = b"\0\xff\x7f\"\\{}[],;=:\r\n -.0129";
        let mut v = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(v.len() + 1);
            match self.below(7) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                1 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = *self.pick(SPECIAL);
                }
                2 => {
                    let n = 1 + self.below(8);
                    let bytes: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                    v.splice(at..at, bytes);
                }
                3 if !v.is_empty() => {
                    let end = (at + 1 + self.below(16)).min(v.len());
                    v.drain(at.min(end)..end);
                }
                4 if !v.is_empty() => {
                    let from = self.below(v.len());
                    let end = (from + 1 + self.below(64)).min(v.len());
                    let chunk = v[from..end].to_vec();
                    v.splice(at..at, chunk);
                }
                5 if !dict.is_empty() => {
                    let token = self.pick(dict).to_vec();
                    v.splice(at..at, token);
                }
                _ => v.truncate(at),
            }
        }
        v
    }
}

/// Runs `one` on mutated inputs until the budget ends; returns how many ran.
async fn run<F, Fut>(name: &str, seeds: &[Vec<u8>], dict: &[&[u8]], mut one: F) -> u64
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let seconds = std::env::var("G6_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut m = Mutator::from_env();
    let t0 = Instant::now();
    let budget = Duration::from_secs(seconds);
    let (mut n, mut slowest) = (0u64, Duration::ZERO);
    // The seeds themselves first, then mutations.
    for seed in seeds {
        one(seed.clone()).await;
    }
    while n < MAX_INPUTS && t0.elapsed() < budget {
        let seed = m.pick(seeds).clone();
        let input = m.mutate(&seed, dict);
        let shown = String::from_utf8_lossy(&input[..input.len().min(200)]).into_owned();
        let t = Instant::now();
        one(input).await;
        let took = t.elapsed();
        assert!(
            took <= MAX_PER_INPUT,
            "{name}: one input took {took:?}: {shown:?}"
        );
        slowest = slowest.max(took);
        n += 1;
    }
    eprintln!(
        "G6 {name}: {n} inputs in {:?}, slowest {slowest:?}",
        t0.elapsed()
    );
    assert!(n >= 100, "{name}: only {n} inputs ran");
    n
}

/// A PNG of `w`×`h` (signature and IHDR: all a header reader looks at).
fn png(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    v.extend(w.to_be_bytes());
    v.extend(h.to_be_bytes());
    v.extend([8, 6, 0, 0, 0, 0, 0, 0, 0]);
    v
}

/// A JPEG whose first frame header says `w`×`h`.
fn jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut v = vec![0xff, 0xd8, 0xff, 0xe0, 0, 16];
    v.extend(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    v.extend([0xff, 0xc0, 0, 17, 8]);
    v.extend(h.to_be_bytes());
    v.extend(w.to_be_bytes());
    v.extend([3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xff, 0xd9]);
    v
}

/// A WEBP (VP8X) of `w`×`h`.
fn webp(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"RIFF\x24\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
    v.extend(&(w - 1).to_le_bytes()[..3]);
    v.extend(&(h - 1).to_le_bytes()[..3]);
    v
}

fn multipart(file: &[u8]) -> Vec<u8> {
    let mut v = b"--XyZ\r\nContent-Disposition: form-data; name=\"image_file\"; filename=\"cat.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
    v.extend(file);
    v.extend(
        b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\nfull\r\n--XyZ--\r\n",
    );
    v
}

/// Payload inspection (multipart, JSON, raw images) and the image rules
/// (format sniffing, header dimensions) of the photoroom preset's
/// remove-background operation: every input ends in a verdict or a 4xx.
#[tokio::test]
async fn g6_payload_inspection_and_image_headers() {
    let policy = tollgate_core::policy::parse(
        include_str!("../../../../examples/policies/photoroom-api.toml"),
        "photoroom-api.toml",
    )
    .expect("preset");
    let rules: Vec<_> = policy
        .operations
        .iter()
        .filter_map(|o| o.payload.clone())
        .collect();
    assert!(!rules.is_empty(), "the preset has payload rules");
    let images = [png(640, 480), jpeg(6001, 10), webp(300, 7000)];
    let mut seeds: Vec<Vec<u8>> = images.to_vec();
    seeds.extend(images.iter().map(|i| multipart(i)));
    seeds.push(br#"{"image_name":"cat.png","options":{"size":[1,2,3]}}"#.to_vec());
    let dict: &[&[u8]] = &[
        b"--XyZ\r\n",
        b"--XyZ--",
        b"\r\n\r\n",
        b"filename=\"",
        b"Content-Disposition: form-data; ",
        b"IHDR",
        b"\xff\xc0",
        b"VP8X",
        b"ftypheic",
        b"{\"",
        b"\":",
    ];
    let types = [
        "multipart/form-data; boundary=XyZ",
        "image/png",
        "application/json",
        "image/jpeg",
    ];
    let mut k = 0usize;
    run("payload", &seeds, dict, |input| {
        k += 1;
        let ct = types[k % types.len()];
        let rules = &rules;
        async move {
            let _ = payload::sniff(&input);
            match payload::inspect(Some(ct), Bytes::from(input)).await {
                Ok(ins) => {
                    for r in rules {
                        if let Err(e) = payload::check(r, &ins) {
                            assert!(e.status.is_client_error(), "{}", e.status);
                        }
                    }
                }
                Err(e) => assert!(e.status.is_client_error(), "{}", e.status),
            }
        }
    })
    .await;
}

/// `X-Forwarded-For` behind a trusted proxy: whatever the header holds, the
/// answer is the peer or an address written in the header, never a
/// trusted hop's neighbour invented from junk.
#[tokio::test]
async fn g6_forwarded_for_parser() {
    let peer: IpAddr = "10.0.0.1".parse().expect("ip");
    let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
    let seeds: Vec<Vec<u8>> = [
        "203.0.113.7, 10.0.0.2",
        "198.51.100.1, 203.0.113.7, 10.1.2.3",
        "[2001:db8::1]:443, 10.0.0.9",
        "unknown, 10.0.0.3",
        "2001:db8::17",
        "192.0.2.43:4711",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let dict: &[&[u8]] = &[b", ", b"10.0.0.1", b"[", b"]", b":80", b"::ffff:", b"%eth0"];
    run("x-forwarded-for", &seeds, dict, |input| {
        let trusted = &trusted;
        async move {
            let Ok(value) = HeaderValue::from_bytes(&input) else {
                return;
            };
            let text = String::from_utf8_lossy(&input).to_lowercase();
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", value.clone());
            h.append("x-forwarded-for", value);
            let ip = client_ip::client_ip(peer, &h, trusted);
            let written = match ip {
                IpAddr::V4(v4) => text.contains(&v4.to_string()),
                IpAddr::V6(v6) => {
                    text.contains(&v6.to_string())
                        || v6
                            .to_ipv4_mapped()
                            .is_some_and(|v4| text.contains(&v4.to_string()))
                }
            };
            assert!(
                ip == peer || written || text.contains(':'),
                "{ip} from {text:?}"
            );
        }
    })
    .await;
}

/// Webhook signatures: no mutation of the id, timestamp or body verifies
/// (the signature header may change: another valid entry beside it still
/// verifies, as rotation needs).
#[tokio::test]
async fn g6_webhook_signature_parser() {
    let (secret, _) = webhooks::WebhookSecret::generate().expect("secret");
    let secrets = [secret];
    let (id, ts, body) = ("msg_2Kq", 1_700_000_000_i64, br#"{"type":"credits_low"}"#);
    let sig = webhooks::signature_header(&secrets, id, ts, body);
    let original = [
        id.as_bytes().to_vec(),
        ts.to_string().into_bytes(),
        sig.into_bytes(),
        body.to_vec(),
    ];
    let seeds = vec![original.join(&b'\n')];
    let dict: &[&[u8]] = &[b"v1,", b" ", b"=", b"\n", b"v1a,", b"+/"];
    let secrets = &secrets;
    run("webhook-signature", &seeds, dict, |input| {
        let original = &original;
        async move {
            let parts: Vec<&[u8]> = input.splitn(4, |b| *b == b'\n').collect();
            let [id, ts, sig, body] = parts[..] else {
                return;
            };
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let ok = webhooks::verify(
                secrets,
                &text(id),
                &text(ts),
                &text(sig),
                body,
                1_700_000_000,
            )
            .is_ok();
            // The timestamp is signed as the number it reads as (" 0170…"
            // and "+170…" are the same instant), so only its value counts.
            let same_instant = text(ts).trim().parse::<i64>() == Ok(1_700_000_000);
            let unchanged =
                id == original[0].as_slice() && same_instant && body == original[3].as_slice();
            assert!(!ok || unchanged, "a forged webhook verified: {input:?}");
        }
    })
    .await;
}

/// The policy file parser over mutated presets: a policy or a list of
/// problems, each naming the file (line and column where known).
#[tokio::test]
async fn g6_policy_file_parser() {
    let seeds: Vec<Vec<u8>> = [
        include_str!("../../../../examples/policies/photoshop-api.toml"),
        include_str!("../../../../examples/policies/picsart-creative-api.toml"),
        include_str!("../../../../examples/policies/photoroom-api.toml"),
        include_str!("../../../../examples/policies/enhance-api.toml"),
        include_str!("../../../../examples/policies/weighted-bucket-api.toml"),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let dict: &[&[u8]] = &[
        b"\n[limits.x]\n",
        b"\n[[x]]\n",
        b" = ",
        b"\"",
        b"0",
        b"-1",
        b"18446744073709551616",
        b"algorithm = \"sliding_window\"",
        b"scope = [\"account\", \"ip\"]",
        b"path = \"/*/*\"",
        b"{a={b=1}}",
        b"1d",
    ];
    run("policy", &seeds, dict, |input| async move {
        let text = String::from_utf8_lossy(&input);
        if let Err(errors) = tollgate_core::policy::parse(&text, "fuzz.toml") {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                let shown = e.to_string();
                assert!(shown.starts_with("fuzz.toml"), "{shown}");
            }
        }
    })
    .await;
}

async fn post_check(s: &Server, body: Vec<u8>) -> (u16, Duration) {
    let t = Instant::now();
    let (status, _) = s
        .post_raw("/v1/check", Some("application/json"), body)
        .await;
    (status, t.elapsed())
}

/// `POST /v1/check` bodies (JSON parse, identity by account or API key,
/// attributes): every answer is 2xx or 4xx, and the server answers a good
/// request afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g6_check_api_bodies_and_keys() {
    let s = Server::start(Some(TOKEN)).await;
    let key = s.account_with_key("acme", "pro").await;
    let good = format!(r#"{{"key":"{key}","operation":"default","cost":0}}"#);
    let seeds: Vec<Vec<u8>> = vec![
        good.clone().into_bytes(),
        br#"{"account":"acme","operation":"default","cost":1}"#.to_vec(),
        format!(
            r#"{{"key":"{key}","operation":"default","attributes":{{"ip":"203.0.113.9","filename":"a.png"}}}}"#
        )
        .into_bytes(),
    ];
    let dict: &[&[u8]] = &[
        b"\\u0000",
        b"\\ud800",
        b"[",
        b"{\"a\":",
        b"null",
        b"-0",
        b"1e999",
        b"tg_",
        key.as_bytes(),
    ];
    let s = &s;
    run("check-api", &seeds, dict, |input| async move {
        let (status, _) = post_check(s, input.clone()).await;
        assert!(
            status < 500,
            "{status} for {:?}",
            String::from_utf8_lossy(&input)
        );
    })
    .await;
    assert_eq!(post_check(s, good.into_bytes()).await.0, 200);
}

/// Nesting bombs: 10,000 levels of JSON arrays and objects to
/// `/v1/check`, and of TOML arrays and inline tables to the policy parser,
/// are rejected in ≤ 10 ms (the best of 5 tries: the parse's own cost, not
/// the shared machine's scheduling; this is a debug build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g6_nesting_bombs_are_rejected_fast() {
    const DEPTH: usize = 10_000;
    let best = |v: Vec<Duration>| v.into_iter().min().expect("tries");
    let s = Server::start(Some(TOKEN)).await;
    for (name, bomb) in [
        (
            "json arrays",
            format!(
                r#"{{"account":{}{}}}"#,
                "[".repeat(DEPTH),
                "]".repeat(DEPTH)
            ),
        ),
        (
            "json objects",
            format!(
                r#"{{"account":"acme","attributes":{}1{}}}"#,
                r#"{"a":"#.repeat(DEPTH),
                "}".repeat(DEPTH)
            ),
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let (status, took) = post_check(&s, bomb.clone().into_bytes()).await;
            assert_eq!(status, 400, "{name}");
            times.push(took);
        }
        let m = best(times);
        eprintln!("G6 bomb {name}: 400 in {m:?} (best of 5)");
        assert!(m <= Duration::from_millis(10), "{name}: {m:?}");
    }
    for (name, bomb) in [
        (
            "toml arrays",
            format!("a = {}{}\n", "[".repeat(DEPTH), "]".repeat(DEPTH)),
        ),
        (
            "toml inline tables",
            format!("a = {}1{}\n", "{b=".repeat(DEPTH), "}".repeat(DEPTH)),
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let errors = tollgate_core::policy::parse(&bomb, "bomb.toml").expect_err(name);
            times.push(t.elapsed());
            assert!(errors.to_string().starts_with("bomb.toml:1:"), "{errors}");
        }
        let m = best(times);
        eprintln!("G6 bomb {name}: refused in {m:?} (best of 5)");
        assert!(m <= Duration::from_millis(10), "{name}: {m:?}");
    }
}

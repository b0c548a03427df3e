//! `https://` upstreams through the whole proxy: an upstream behind TLS
//! whose certificate a private CA issued, trusted through
//! `[server] upstream_ca_file`. Verified: answered as over `http://` (body,
//! rate-limit headers), SNI the URL's host, ALPN `http/1.1`; unverified
//! (CA not given, certificate for another name) refused before any HTTP,
//! as a connect failure (502, retried where the policy retries 502); one
//! TLS handshake for many requests (keep-alive); a handshake that never
//! ends bounded by the upstream timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;
use tollgate_server::config::{DEFAULT_POLICY, ServerConfig, server_section};

use crate::support::{Answer, Server, TOKEN};

/// A private CA: its PEM, and the issuer to sign server certificates with.
struct PrivateCa {
    pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl PrivateCa {
    fn new() -> PrivateCa {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "tollgate test CA");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key"))
                .expect("ca");
        PrivateCa {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// TLS settings of a server whose certificate this CA issued for `name`;
    /// it offers h2 before http/1.1, so that it would pick h2 if the client
    /// offered it.
    fn server(&self, name: &str) -> rustls::ServerConfig {
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("leaf params")
            .signed_by(&key, &self.issuer)
            .expect("leaf");
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tls
    }

    /// The CA's PEM in a file of `dir`.
    fn file(&self, dir: &tempfile::TempDir) -> std::path::PathBuf {
        let path = dir.path().join("upstream-ca.pem");
        std::fs::write(&path, &self.pem).expect("write CA");
        path
    }
}

/// What one TLS handshake at the upstream negotiated: the server name the
/// client sent (SNI) and the application protocol (ALPN).
type Negotiated = (Option<String>, Option<Vec<u8>>);

/// An HTTP/1.1 upstream behind TLS; counts TCP connections accepted, TLS
/// handshakes completed and HTTP requests answered, and keeps what each
/// handshake negotiated (SNI, ALPN).
struct TlsUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    negotiated: Arc<Mutex<Vec<Negotiated>>>,
}

impl TlsUpstream {
    async fn start(tls: rustls::ServerConfig) -> TlsUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up = TlsUpstream {
            addr: listener.local_addr().expect("addr"),
            accepted: Arc::default(),
            handshakes: Arc::default(),
            requests: Arc::default(),
            negotiated: Arc::default(),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (accepted, handshakes, requests, negotiated) = (
            up.accepted.clone(),
            up.handshakes.clone(),
            up.requests.clone(),
            up.negotiated.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, handshakes, requests, negotiated) = (
                    acceptor.clone(),
                    handshakes.clone(),
                    requests.clone(),
                    negotiated.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let conn = tls.get_ref().1;
                    negotiated.lock().expect("negotiated").push((
                        conn.server_name().map(str::to_owned),
                        conn.alpn_protocol().map(<[u8]>::to_vec),
                    ));
                    let service =
                        hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                            let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                            async move {
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    bytes::Bytes::from(format!("{{\"hit\":{n}}}")),
                                )))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        up
    }

    fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    /// `https://localhost:PORT`: the name the certificates are issued for.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// A proxy on `policy` in front of `upstream` (a URL), configured through
/// the `[server]` settings `extra` as a policy file would (so that
/// `upstream_ca_file` is read as in `tollgate serve`), and the API key of
/// an account on it.
async fn proxy(policy: &str, upstream: &str, extra: &str) -> (Server, String) {
    let section = server_section(&format!("[server]\nupstream = \"{upstream}\"\n{extra}\n"))
        .expect("[server] parses");
    let s = Server::configured(Some(TOKEN), policy, None, |c: &mut ServerConfig| {
        c.apply(&section).expect("valid [server]");
    })
    .await;
    let key = s.account_with_key("acme", "free").await;
    (s, key)
}

/// A private CA, and an upstream whose certificate it issued for `name`.
async fn ca_issued(name: &str) -> (PrivateCa, TlsUpstream) {
    let ca = PrivateCa::new();
    let up = TlsUpstream::start(ca.server(name)).await;
    (ca, up)
}

/// The upstream, and a proxy on the default policy in front of it that
/// trusts its CA through `upstream_ca_file` (in the directory returned,
/// kept while the proxy runs), with an account's key.
async fn trusting_the_ca_of(
    (ca, up): (PrivateCa, TlsUpstream),
) -> (TlsUpstream, Server, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let (s, key) = proxy(DEFAULT_POLICY, &up.url(), &with_ca(&ca.file(&dir))).await;
    (up, s, key, dir)
}

/// `r` is the answer to an upstream that was not trusted: 502
/// `upstream_unreachable`, and the upstream completed no TLS handshake and
/// saw no HTTP request.
fn refused_before_any_request(r: &Answer, up: &TlsUpstream) {
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(
        r.body["error"]["code"], "upstream_unreachable",
        "{}",
        r.text
    );
    assert_eq!(
        TlsUpstream::count(&up.requests),
        0,
        "an HTTP request went to an unverified upstream"
    );
    assert_eq!(TlsUpstream::count(&up.handshakes), 0);
}

/// `GET /hello` through the proxy with `key`.
async fn hello(s: &Server, key: &str) -> Answer {
    s.call(false, "GET", "/hello", &[("x-api-key", key)], "")
        .await
}

fn with_ca(path: &std::path::Path) -> String {
    format!("upstream_ca_file = \"{}\"", path.display())
}

/// The default policy, retrying failed upstream attempts twice.
fn retrying_policy() -> String {
    format!(
        "{DEFAULT_POLICY}\n[upstream]\nretries = 2\nbackoff = \"10ms\"\nmax_backoff = \"20ms\"\n"
    )
}

#[tokio::test]
async fn https_upstream_signed_by_the_ca_file_answers_like_http() {
    let (up, s, key, _dir) = trusting_the_ca_of(ca_issued("localhost").await).await;

    let r = hello(&s, &key).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, "{\"hit\":1}", "the upstream's own body");
    let policy = r.headers.get("ratelimit-policy").expect("RateLimit-Policy");
    assert!(
        policy.to_str().expect("ascii").contains("\"burst\";q=5"),
        "{policy:?}"
    );
    assert!(r.headers.contains_key("ratelimit"), "{:?}", r.headers);
    assert_eq!(TlsUpstream::count(&up.requests), 1);
    assert_eq!(
        up.negotiated.lock().expect("negotiated").as_slice(),
        [(Some("localhost".to_owned()), Some(b"http/1.1".to_vec()))],
        "SNI is the URL's host; ALPN offers http/1.1 only"
    );
}

#[tokio::test]
async fn https_upstream_not_signed_by_a_trusted_ca_is_refused_before_any_request() {
    let (_ca, up) = ca_issued("localhost").await;
    // The system's roots only: they do not know the private CA.
    let (s, key) = proxy(&retrying_policy(), &up.url(), "").await;

    refused_before_any_request(&hello(&s, &key).await, &up);
    // A connect failure: retried as the policy retries 502 (one attempt
    // and two retries, each a new connection).
    assert_eq!(TlsUpstream::count(&up.accepted), 3);
}

#[tokio::test]
async fn https_upstream_whose_certificate_names_another_host_is_refused() {
    let (up, s, key, _dir) = trusting_the_ca_of(ca_issued("api.example.com").await).await;

    refused_before_any_request(&hello(&s, &key).await, &up);
    assert_eq!(TlsUpstream::count(&up.accepted), 1, "no retry by policy");
}

#[tokio::test]
async fn requests_to_an_https_upstream_share_one_tls_connection() {
    const N: usize = 5;
    let (up, s, key, _dir) = trusting_the_ca_of(ca_issued("localhost").await).await;

    for i in 1..=N {
        let r = hello(&s, &key).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
        assert_eq!(r.text, format!("{{\"hit\":{i}}}"));
    }
    assert_eq!(TlsUpstream::count(&up.requests), N);
    assert_eq!(TlsUpstream::count(&up.accepted), 1, "one connection");
    assert_eq!(TlsUpstream::count(&up.handshakes), 1, "one TLS handshake");
}

#[tokio::test]
async fn tls_handshake_that_never_ends_is_bounded_by_the_upstream_timeout() {
    // Accepts TCP connections and never answers the TLS ClientHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let ca = PrivateCa::new();
    let dir = tempfile::tempdir().expect("dir");
    let policy = format!("{DEFAULT_POLICY}\n[upstream]\ntimeout = \"300ms\"\n");
    let (s, key) = proxy(
        &policy,
        &format!("https://localhost:{port}"),
        &with_ca(&ca.file(&dir)),
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(5), hello(&s, &key))
        .await
        .expect("answered within the upstream timeout, not hanging on the handshake");
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "upstream_timeout", "{}", r.text);
}

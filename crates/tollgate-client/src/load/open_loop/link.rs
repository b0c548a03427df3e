//! One keep-alive HTTP/1.1 connection of the open loop and the one request
//! it sends; hyper speaks HTTP.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use reqwest::Method;
use reqwest::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use crate::error::LoadError;
use crate::load::LoadOptions;

/// How long a connection may take to open before the call counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The one request of the run, built once; each call clones its parts
/// (the body and the path are shared `Bytes`, the header map is copied).
pub(crate) struct Target {
    pub(super) addr: SocketAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Target {
    /// Resolves the URL's host (once) and builds the request.
    ///
    /// # Errors
    /// [`LoadError::Target`] when the URL has no host or it does not resolve.
    pub(crate) async fn new(url: &reqwest::Url, opts: &LoadOptions) -> Result<Target, LoadError> {
        let bad = |reason: String| LoadError::Target {
            url: opts.url.clone(),
            reason,
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| bad("no port".into()))?;
        let host = url.host_str().ok_or_else(|| bad("no host".into()))?;
        // IPv6 literals come bracketed; lookups take them bare.
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| bad(format!("cannot resolve `{name}`: {e}")))?
            .next()
            .ok_or_else(|| bad(format!("`{name}` has no address")))?;
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        let uri = path.parse::<Uri>().map_err(|e| bad(format!("path: {e}")))?;
        let mut headers = HeaderMap::new();
        for (n, v) in &opts.headers {
            headers.append(n, v.clone());
        }
        if !headers.contains_key(HOST) {
            let host = match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            };
            let host = HeaderValue::from_str(&host).map_err(|e| bad(format!("host: {e}")))?;
            headers.insert(HOST, host);
        }
        let body = opts.body.clone().unwrap_or_default();
        // hyper would add this to every request (formatting the number into
        // a new header value each time); built once here, it is only copied.
        if !body.is_empty() && !headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        Ok(Target {
            addr,
            method: opts.method.clone(),
            uri,
            headers,
            body,
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// An open connection: hyper's request handle. hyper's connection future
/// runs as a task of its own on the same thread (polled only when its
/// socket or a call needs it); it ends when the server closes the
/// connection or the handle is dropped.
pub(super) struct Link {
    sender: SendRequest<Full<Bytes>>,
}

/// What one call came back with: the status and whether the whole body
/// arrived; `None` when no answer came (no connection, or it broke).
pub(super) type Answer = Option<(u16, bool)>;

impl Link {
    /// Opens a connection to `addr`; `None` when that fails or takes longer
    /// than [`CONNECT_TIMEOUT`].
    pub(super) async fn open(addr: SocketAddr) -> Option<Link> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        stream.set_nodelay(true).ok()?;
        // One write per request (head and body copied into one buffer): a
        // body of a few hundred bytes costs less to copy than to queue.
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(Link { sender })
    }

    /// Whether the connection can take a request now (it may have been
    /// closed by the server since its last answer).
    async fn ready(&mut self) -> bool {
        self.sender.is_ready() || self.sender.ready().await.is_ok()
    }
}

/// One call of `target` on `link`, opening a connection first when there is
/// none or the one given can no longer be used (its connect time then
/// counts in this call). Returns the answer and the connection when it can
/// carry the next call.
pub(super) async fn exchange(target: &Target, link: &mut Option<Link>) -> Answer {
    let reusable = match link {
        Some(l) => l.ready().await,
        None => false,
    };
    if !reusable {
        // Never opened, failed, or closed by the server since its last answer.
        *link = Link::open(target.addr).await;
    }
    let Some(l) = link else {
        return None;
    };
    if !reusable && !l.ready().await {
        *link = None;
        return None;
    }
    let answer = async {
        let resp = l.sender.send_request(target.request()).await.ok()?;
        let status = resp.status().as_u16();
        // Read to the end (frame by frame, keeping none) so the connection
        // can carry the next call.
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return Some((status, false));
            }
        }
        Some((status, true))
    }
    .await;
    if !matches!(answer, Some((_, true))) {
        *link = None;
    }
    answer
}

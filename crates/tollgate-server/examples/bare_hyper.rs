//! Bare hyper 1 server returning a fixed body: the baseline for the decision-API
//! and proxy benchmarks (see `BENCHMARKS.md`, "Server: decision API and proxy").
//!
//! ```text
//! cargo run --release -p tollgate-server --example bare_hyper -- 127.0.0.1:18190
//! ```
//!
//! Answers every request (any method, any path) with `200 OK` and a small fixed
//! JSON body, after reading the request body. Same runtime shape as `tollgate
//! serve` (multi-threaded tokio, hyper-util auto connection builder).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

const BODY: &[u8] = br#"{"allowed":true,"remaining":999,"reset_after_ms":0}"#;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Drain the request body so POSTs are handled like a real endpoint would.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18190".to_owned())
        .parse()?;
    let listener = TcpListener::bind(addr).await?;
    eprintln!("bare_hyper listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(io, service_fn(handle))
                .await;
        });
    }
}

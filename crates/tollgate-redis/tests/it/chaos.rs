//! A small TCP proxy between a store and a redis-server of our own: counts
//! every connection a client opens (B5: reconnect attempts per replica) and
//! can blackhole traffic (B2: accept, never answer). Loopback only; the
//! proxy's tasks end when it is dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Default)]
struct Shared {
    /// When each client connection was accepted.
    accepts: Mutex<Vec<Instant>>,
    /// Client connections open now.
    open: AtomicUsize,
    /// Hold every byte in both directions (a hang on the wire).
    blackhole: AtomicBool,
}

/// A proxy listening on a free loopback port, forwarding to `127.0.0.1:upstream`.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                s.accepts.lock().expect("lock").push(Instant::now());
                let s = s.clone();
                conns.spawn(async move {
                    s.open.fetch_add(1, Ordering::Relaxed);
                    // Redis down: the client's connection is closed at once.
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = pipe(cr, sw, &s.blackhole) => {}
                            _ = pipe(sr, cw, &s.blackhole) => {}
                        }
                    }
                    s.open.fetch_sub(1, Ordering::Relaxed);
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy { port, shared, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Connections accepted so far, with their times.
    pub fn accepts(&self) -> Vec<Instant> {
        self.shared.accepts.lock().expect("lock").clone()
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Holds (or releases) every byte in both directions.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either side closes; while `hold` is set,
/// bytes read are kept until it is cleared.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hold: &AtomicBool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while hold.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The most events in any window of length `w` (events sorted).
pub fn max_in_window(times: &[Instant], w: Duration) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i].duration_since(times[j]) >= w {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

//! Integration tests of tollgate-core: one binary, one module per area.

mod concurrency;
mod in_memory;
mod memory;
mod modes;
mod presets;
mod properties;

/// Polls a future that never waits for anything to completion (the
/// conformance suite's `block_on` needs the `test-util` feature, which
/// `cargo test -p tollgate-core` alone does not turn on).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

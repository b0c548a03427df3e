//! # alloc-count
//!
//! A global allocator that forwards to [`std::alloc::System`] and counts, so
//! tests can assert "no allocation on the decision path" and measure live
//! heap bytes. It lives in its own crate because the workspace forbids
//! `unsafe_code` and a [`GlobalAlloc`] impl needs `unsafe`; tests install it
//! without writing any:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: alloc_count::CountingAlloc = alloc_count::CountingAlloc::new();
//!
//! let before = alloc_count::thread_allocations();
//! work();
//! assert_eq!(alloc_count::thread_allocations(), before);
//! ```
//!
//! Counts are of what callers *request*. [`CountingAlloc::live_chunk_bytes`]
//! also estimates what glibc's malloc really holds (8-byte header, 16-byte
//! granularity, 32-byte minimum), which is closer to the process's footprint.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

thread_local! {
    // `const`, `Copy` and without `Drop`: reading it never allocates and
    // works during thread teardown.
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Allocations (including reallocations) made by the calling thread so far.
pub fn thread_allocations() -> u64 {
    THREAD_ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
}

/// Counting wrapper around the system allocator. All counters are process-wide
/// except [`thread_allocations`].
#[derive(Debug)]
pub struct CountingAlloc {
    allocations: AtomicU64,
    live_bytes: AtomicI64,
    live_chunk_bytes: AtomicI64,
}

impl CountingAlloc {
    /// A counter at zero.
    pub const fn new() -> CountingAlloc {
        CountingAlloc {
            allocations: AtomicU64::new(0),
            live_bytes: AtomicI64::new(0),
            live_chunk_bytes: AtomicI64::new(0),
        }
    }

    /// Allocations (including reallocations) made by every thread so far.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Bytes requested and not yet freed.
    pub fn live_bytes(&self) -> i64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// Estimate of the bytes glibc's malloc holds for the live blocks.
    pub fn live_chunk_bytes(&self) -> i64 {
        self.live_chunk_bytes.load(Ordering::Relaxed)
    }

    fn counted(&self, grown: Option<usize>, shrunk: Option<usize>) {
        if grown.is_some() {
            self.allocations.fetch_add(1, Ordering::Relaxed);
            let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        }
        let bytes = grown.unwrap_or(0) as i64 - shrunk.unwrap_or(0) as i64;
        let chunks = grown.map_or(0, chunk) as i64 - shrunk.map_or(0, chunk) as i64;
        self.live_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.live_chunk_bytes.fetch_add(chunks, Ordering::Relaxed);
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        CountingAlloc::new()
    }
}

/// glibc malloc chunk size for a request of `size` bytes (64-bit).
fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; counting touches only atomics and a const thread-local, which
// never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.counted(Some(layout.size()), None);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.counted(Some(layout.size()), None);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        self.counted(None, Some(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.counted(Some(new_size), Some(layout.size()));
        }
        p
    }
}

//! Latency histograms under concurrent recording (BENCHMARKS.md, "Latency
//! histogram"): prometheus-client's `Histogram` (one mutex) against
//! tollgate's `LatencyHistogram` (a shard per thread), side by side in one
//! run, 1 and N threads each recording the same observations.
//!
//! Usage: `histogram_threads [THREADS] [OBSERVATIONS_PER_THREAD] [ROUNDS]`
//! (defaults 2, 5,000,000 and 5). Prints nanoseconds per observation
//! (wall time of the slowest thread / observations per thread) per round,
//! alternating the two kinds.

#![allow(clippy::disallowed_methods)] // times itself with `Instant::now`

use std::hint::black_box;
use std::time::Instant;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tollgate_server::histogram::LatencyHistogram;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map_or(default, |a| a.parse().expect("a number"))
}

/// Wall time per observation when `threads` threads each record `n`.
fn run(threads: u64, n: u64, observe: &(dyn Fn(f64) + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..n {
                    // Decision-like latencies, 20 to 83 µs.
                    observe(black_box(0.000_020 + ((i + t) % 64) as f64 * 1e-6));
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let threads = arg(1, 2);
    let n = arg(2, 5_000_000);
    let rounds = arg(3, 5);
    let buckets = || exponential_buckets(0.000_001, 4.0, 12);
    let theirs = Histogram::new(buckets());
    let ours = LatencyHistogram::new(buckets());
    println!("threads  kind                      ns/observation (per round)");
    for t in [1, threads] {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..rounds {
            a.push(run(t, n, &|v| theirs.observe(v)));
            b.push(run(t, n, &|v| ours.observe(v)));
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!("{t:>7}  prometheus-client Histogram {a:.1?}");
        println!("{t:>7}  LatencyHistogram            {b:.1?}");
        let (ma, mb) = (med(&mut a), med(&mut b));
        println!("{t:>7}  median {ma:.1} vs {mb:.1} ns: {:.2}x", ma / mb);
    }
}

//! A latency histogram that request workers record into without sharing a
//! lock or a cache line.
//!
//! prometheus-client's `Histogram` keeps its buckets behind one mutex, which
//! every worker takes on every request. Here each thread records into its
//! own shard (a cache-line-aligned set of atomic counters, picked once per
//! thread); a scrape adds the shards up. The exposition is the one
//! prometheus-client writes for its own histogram (`_sum`, `_count`,
//! cumulative `_bucket{le=…}` with `+Inf`).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds per histogram, `+Inf` not included (prometheus-client's
/// exponential buckets of tollgate's two histograms have 12).
const MAX_BOUNDS: usize = 15;

/// Most shards a histogram keeps; threads beyond share them.
const MAX_SHARDS: usize = 64;

/// One thread's counters: observations per bucket (the last one is `+Inf`)
/// and the sum in nanoseconds. Aligned so two shards never share a line.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    buckets: [AtomicU64; MAX_BOUNDS + 1],
    sum_nanos: AtomicU64,
}

struct Inner {
    /// Upper bounds in seconds, ascending.
    bounds: Box<[f64]>,
    shards: Box<[Shard]>,
}

/// Latency in seconds, cumulative buckets; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct LatencyHistogram {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("bounds", &self.inner.bounds)
            .finish_non_exhaustive()
    }
}

/// Hands every thread its shard number, in the order threads first record.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

fn thread_number() -> usize {
    THREAD.with(|t| match t.get() {
        Some(n) => n,
        None => {
            let n = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            t.set(Some(n));
            n
        }
    })
}

impl LatencyHistogram {
    /// A histogram with the given ascending upper bounds in seconds (at
    /// most 15; `+Inf` is added), one shard per CPU.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> LatencyHistogram {
        let bounds: Box<[f64]> = bounds.into_iter().collect();
        assert!(bounds.len() <= MAX_BOUNDS, "at most {MAX_BOUNDS} bounds");
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (0..cpus.min(MAX_SHARDS))
            .map(|_| Shard::default())
            .collect();
        LatencyHistogram {
            inner: Arc::new(Inner { bounds, shards }),
        }
    }

    /// Records one observation of `seconds` (negative and NaN add nothing
    /// to the sum).
    pub fn observe(&self, seconds: f64) {
        let inner = &*self.inner;
        let bucket = inner
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(inner.bounds.len());
        let shard = &inner.shards[thread_number() % inner.shards.len()];
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // Rounded to the nearest nanosecond; the cast saturates, so NaN
        // and negatives become 0.
        let nanos = (seconds * 1e9 + 0.5) as u64;
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far, per bucket (not cumulative; the last is
    /// `+Inf`), and their sum in seconds.
    fn totals(&self) -> (Vec<(f64, u64)>, f64) {
        let inner = &*self.inner;
        let mut buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|b| (b, 0))
            .collect();
        let mut nanos: u64 = 0;
        for shard in &inner.shards {
            for (total, n) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += n.load(Ordering::Relaxed);
            }
            nanos = nanos.wrapping_add(shard.sum_nanos.load(Ordering::Relaxed));
        }
        (buckets, nanos as f64 / 1e9)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, sum) = self.totals();
        // The count is the buckets' total, so the two never disagree in a
        // scrape taken while workers record.
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use prometheus_client::registry::Registry;

    fn exposition(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::with_prefix("tollgate");
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    fn split_sum(text: &str) -> (f64, Vec<&str>) {
        let (sums, rest): (Vec<&str>, Vec<&str>) = text
            .lines()
            .partition(|l| l.starts_with("tollgate_decision_seconds_sum "));
        let sum = sums[0].rsplit(' ').next().unwrap().parse().unwrap();
        (sum, rest)
    }

    const SAMPLES: [f64; 9] = [
        0.0, 0.000_001, 0.000_003, 0.000_004, 0.000_005, 0.000_017, 0.001, 0.25, 30.0,
    ];

    #[test]
    fn exposition_matches_prometheus_clients_histogram() {
        let ours = LatencyHistogram::new(exponential_buckets(0.000_001, 4.0, 12));
        let theirs = Histogram::new(exponential_buckets(0.000_001, 4.0, 12));
        for s in SAMPLES {
            ours.observe(s);
            theirs.observe(s);
        }
        let a = exposition(|r| r.register("decision_seconds", "Time", ours.clone()));
        let b = exposition(|r| r.register("decision_seconds", "Time", theirs.clone()));
        // Every line is the same but the sum's, whose last digits depend on
        // the order of float additions: compare that one by value.
        let (sum_a, rest_a) = split_sum(&a);
        let (sum_b, rest_b) = split_sum(&b);
        assert_eq!(rest_a, rest_b);
        assert!((sum_a - sum_b).abs() < 1e-9, "{sum_a} vs {sum_b}");
        assert!(a.contains("tollgate_decision_seconds_count 9\n"), "{a}");
        assert!(a.contains("le=\"+Inf\"} 9\n"), "{a}");
    }

    #[test]
    fn threads_record_into_their_own_shards_and_nothing_is_lost() {
        let h = LatencyHistogram::new(exponential_buckets(0.000_1, 4.0, 12));
        let threads = 8;
        let per_thread = 10_000u64;
        std::thread::scope(|s| {
            for t in 0..threads {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..per_thread {
                        h.observe(((t * per_thread + i) % 7) as f64 * 0.000_1);
                    }
                });
            }
        });
        let (buckets, sum) = h.totals();
        let count: u64 = buckets.iter().map(|b| b.1).sum();
        assert_eq!(count, threads * per_thread);
        // Each observation is a whole number of 0.1 ms steps.
        let steps: u64 = (0..threads * per_thread).map(|k| k % 7).sum();
        let expected = steps as f64 * 0.000_1;
        assert!(
            (sum - expected).abs() < 1e-9 * expected,
            "{sum} vs {expected}"
        );
    }

    #[test]
    fn out_of_range_observations_land_in_the_outer_buckets() {
        let h = LatencyHistogram::new([0.001, 0.01]);
        h.observe(f64::NAN);
        h.observe(-1.0);
        h.observe(1e9);
        let (buckets, _) = h.totals();
        // NaN compares false with every bound: like prometheus-client, it
        // goes to +Inf; a negative value goes to the first bucket.
        assert_eq!(buckets, vec![(0.001, 1), (0.01, 0), (f64::INFINITY, 2)]);
    }
}

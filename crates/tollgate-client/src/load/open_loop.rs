//! The open-loop engine: a fixed schedule over persistent HTTP/1.1
//! connections, latency from each call's due time (see the module docs of
//! [`load`](super)).
//!
//! One thread, one current-thread tokio runtime, one task per connection
//! (and one for hyper's side of it) plus a pacer. The pacer owns the clock: when a call falls due and a
//! connection waits, it hands the call over (every call due at one wake-up
//! goes at that wake-up). A connection that ends a call while the next one
//! is already due takes it itself, without the pacer: a run behind its
//! schedule costs no wake-ups beyond the sockets'. State is shared through
//! `Cell`s: nothing crosses threads, nothing is locked.

mod link;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;
use indicatif::ProgressBar;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

pub(super) use link::Target;
use link::{Answer, Link, exchange};

use super::Stats;
use crate::RetryPolicy;
use crate::error::LoadError;

/// How long before a due time the pacer stops sleeping on tokio's timer:
/// it fires on millisecond ticks, up to 1 ms late.
const TIMER_MARGIN: Duration = Duration::from_micros(1200);

/// The longest the pacer blocks its thread while a call is in flight (an
/// answer that arrives meanwhile is read at most this late).
const NAP: Duration = Duration::from_micros(50);

/// A due time closer than this is waited for by yielding to the runtime
/// (which reads the sockets on every yield), not by blocking the thread: a
/// sleep costs a system call and a wake-up, which at tens of thousands of
/// calls per second makes the calls late and the tool fall behind.
const YIELD_BELOW: Duration = Duration::from_micros(100);

/// Timer slack asked for the load thread, in nanoseconds (Linux's default
/// is 50 µs, which would make every short sleep 50 µs late).
const TIMER_SLACK_NS: &str = "1000";

/// How often the progress bar is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(200);

/// What to run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// Calls due per second.
    pub(super) rate: NonZeroU32,
    /// How long calls fall due.
    pub(super) duration: Duration,
    /// Keep-alive connections, each carrying one call at a time.
    pub(super) connections: NonZeroU32,
    /// How long calls in flight at the end may still take to answer.
    pub(super) grace: Duration,
}

/// Runs `plan` against `target` on a thread of its own (so the caller's
/// runtime, whatever its kind, adds no hops to a call); returns the counts
/// and the time from the first due call to the last answer (or the end of
/// the grace period).
///
/// # Errors
/// [`LoadError::Runtime`] when the thread or its runtime cannot start.
pub(super) async fn run(
    target: Target,
    plan: Plan,
    bar: Option<ProgressBar>,
) -> Result<(Stats, Duration), LoadError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("tollgate-load".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            let out = local.block_on(&runtime, drive(target, plan, bar));
            // The caller may have given up waiting; nothing to do then.
            let _ = tx.send(out);
            Ok::<(), std::io::Error>(())
        })
        .map_err(LoadError::Runtime)?;
    match rx.await {
        Ok(out) => Ok(out),
        // The thread ended without a result: it could not build its
        // runtime, or it panicked (the panic goes on here).
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(LoadError::Runtime(e)),
            Ok(Ok(())) => Err(LoadError::Runtime(std::io::Error::other(
                "the load thread ended without a result",
            ))),
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// When call `i` is due: `i / rate` after the start, in whole nanoseconds
/// (computed from `i`, so no rounding piles up).
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    rate: u64,
}

impl Schedule {
    fn offset(&self, i: u64) -> Duration {
        let ns = match i.checked_mul(1_000_000_000) {
            Some(n) => n / self.rate,
            None => {
                let n = u128::from(i) * 1_000_000_000 / u128::from(self.rate);
                u64::try_from(n).unwrap_or(u64::MAX)
            }
        };
        Duration::from_nanos(ns)
    }

    fn due(&self, i: u64) -> Instant {
        self.start + self.offset(i)
    }

    /// Calls due strictly before `d` after the start.
    fn calls_before(&self, d: Duration) -> u64 {
        let n = d.as_nanos() * u128::from(self.rate);
        u64::try_from(n.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
    }
}

/// What the pacer and the connections of one run share (one thread).
///
/// Every due call is, at any time, exactly one of: not yet taken
/// (`next..total`), handed to a waiting connection (`handed`), in flight
/// (`in_flight`), or recorded in `stats`. At the end the first kind are the
/// dropped calls and the second and third the unfinished ones.
struct Run {
    target: Target,
    schedule: Schedule,
    /// No call is taken from here on.
    end: Instant,
    /// Calls due before `end`.
    total: u64,
    /// The first call not taken yet.
    next: Cell<u64>,
    /// Due times of the calls the pacer handed out, not yet taken by a
    /// connection; never more than `idle`.
    handed: RefCell<VecDeque<Instant>>,
    /// Connections waiting for a call.
    idle: Cell<usize>,
    /// Calls taken by a connection and not recorded yet.
    in_flight: Cell<u64>,
    /// The schedule is over: connections take no new call (handed ones
    /// still go, they were due before the end).
    stopped: Cell<bool>,
    /// The pacer waits on `freed` for a connection.
    pacer_waits: Cell<bool>,
    /// A call was handed out (or the run stopped).
    work: Notify,
    /// A connection came free for the pacer.
    freed: Notify,
    stats: RefCell<Stats>,
}

impl Run {
    fn has_idle(&self) -> bool {
        self.handed.borrow().len() < self.idle.get()
    }

    /// Nothing in flight and nothing handed out: a blocking sleep delays
    /// no call and no answer.
    fn is_quiet(&self) -> bool {
        self.in_flight.get() == 0 && self.handed.borrow().is_empty()
    }

    /// Hands every call due by `now` to a waiting connection, as long as
    /// one waits; whether it handed any.
    fn hand_out(&self, now: Instant) -> bool {
        let mut handed = self.handed.borrow_mut();
        let first = self.next.get();
        let mut next = first;
        while handed.len() < self.idle.get() && next < self.total {
            let due = self.schedule.due(next);
            if due > now {
                break;
            }
            handed.push_back(due);
            next += 1;
            self.work.notify_one();
        }
        self.next.set(next);
        next > first
    }

    fn wake_pacer(&self) {
        if self.pacer_waits.get() {
            self.freed.notify_one();
        }
    }

    fn take_handed(&self) -> Option<Instant> {
        let due = self.handed.borrow_mut().pop_front()?;
        self.in_flight.set(self.in_flight.get() + 1);
        Some(due)
    }

    /// The next call of a connection whose last call ended at `done`: one
    /// handed out, else the next one when it is already due (the run is
    /// behind), else whatever the pacer hands it. `None` when the run is
    /// over.
    async fn next_call(&self, done: Instant) -> Option<Instant> {
        if let Some(due) = self.take_handed() {
            // Fewer calls wait for a connection: the pacer may hand another.
            self.wake_pacer();
            return Some(due);
        }
        let i = self.next.get();
        if !self.stopped.get() && done < self.end && i < self.total {
            let due = self.schedule.due(i);
            if due <= done {
                self.next.set(i + 1);
                self.in_flight.set(self.in_flight.get() + 1);
                return Some(due);
            }
        }
        self.idle.set(self.idle.get() + 1);
        self.wake_pacer();
        self.wait_for_call().await
    }

    /// Waits, as one of the `idle` connections, for a call handed out.
    async fn wait_for_call(&self) -> Option<Instant> {
        loop {
            if let Some(due) = self.take_handed() {
                self.idle.set(self.idle.get() - 1);
                return Some(due);
            }
            if self.stopped.get() {
                self.idle.set(self.idle.get() - 1);
                return None;
            }
            self.work.notified().await;
        }
    }

    fn record(&self, due: Instant, answer: Answer, done: Instant) {
        self.in_flight.set(self.in_flight.get() - 1);
        let mut stats = self.stats.borrow_mut();
        match answer {
            Some((status, complete)) => {
                stats.record_answer(status, done.saturating_duration_since(due));
                if complete && !RetryPolicy::is_retryable_status(status) {
                    stats.calls_ok += 1;
                } else {
                    stats.calls_failed += 1;
                }
            }
            None => {
                stats.errors += 1;
                stats.calls_failed += 1;
            }
        }
    }
}

/// The whole run, on the load thread: connections opened before the clock
/// starts, then the schedule, then up to `plan.grace` for the calls still
/// in flight.
async fn drive(target: Target, plan: Plan, bar: Option<ProgressBar>) -> (Stats, Duration) {
    precise_timers();
    let links = join_all((0..plan.connections.get()).map(|_| Link::open(target.addr))).await;
    let schedule = Schedule {
        start: Instant::now(),
        rate: u64::from(plan.rate.get()),
    };
    let run = Rc::new(Run {
        target,
        schedule,
        end: schedule.start + plan.duration,
        total: schedule.calls_before(plan.duration),
        next: Cell::new(0),
        handed: RefCell::new(VecDeque::with_capacity(links.len())),
        // Every connection starts waiting for a call.
        idle: Cell::new(links.len()),
        in_flight: Cell::new(0),
        stopped: Cell::new(false),
        pacer_waits: Cell::new(false),
        work: Notify::new(),
        freed: Notify::new(),
        stats: RefCell::new(Stats::default()),
    });
    let tasks: Vec<_> = links
        .into_iter()
        .map(|link| tokio::task::spawn_local(connection(run.clone(), link)))
        .collect();
    pace(&run, bar.as_ref()).await;
    if let Ok(ended) = tokio::time::timeout_at(run.end + plan.grace, join_all(tasks)).await {
        for e in ended.into_iter().filter_map(Result::err) {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    // Calls still open now are abandoned (their connections close when
    // the runtime drops their tasks).
    let elapsed = Instant::now().saturating_duration_since(schedule.start);
    let mut stats = run.stats.take();
    stats.scheduled = run.total;
    stats.dropped = run.total - run.next.get();
    stats.unfinished = run.in_flight.get() + run.handed.borrow().len() as u64;
    (stats, elapsed)
}

/// One connection: waits for a call, makes it, records it, and so on until
/// the run is over.
async fn connection(run: Rc<Run>, mut link: Option<Link>) {
    let mut call = run.wait_for_call().await;
    while let Some(due) = call {
        let answer = exchange(&run.target, &mut link).await;
        let done = Instant::now();
        run.record(due, answer, done);
        call = run.next_call(done).await;
    }
}

/// Hands out the calls as they fall due until the end, then stops the run.
///
/// While a connection waits for the next call, the pacer sleeps on tokio's
/// timer until [`TIMER_MARGIN`] before it; from there it sleeps on the
/// thread (precise to a few µs with the timer slack of [`precise_timers`]):
/// to the due time when no call is in flight (nothing to miss meanwhile),
/// else [`NAP`] at a time, letting the runtime read the sockets between
/// naps. The last [`YIELD_BELOW`] before a due time it yields to the
/// runtime instead (at high rates, every gap): it spins only then. While
/// every connection is busy, it waits for one to come free. So calls leave
/// within microseconds of their due time, an answer is read at most [`NAP`]
/// late, and at low rates the thread is off the CPU whenever it has nothing
/// to do (on a shared core, a thread that spins is scheduled as a hog:
/// late, in bursts).
async fn pace(run: &Run, bar: Option<&ProgressBar>) {
    let mut timer = pin!(tokio::time::sleep_until(run.end));
    let start = run.schedule.start;
    let mut draw_at = start;
    loop {
        let now = Instant::now();
        if now >= run.end {
            break;
        }
        let mut wake = run.end;
        if let Some(bar) = bar {
            if now >= draw_at {
                draw_at = now + DRAW_EVERY;
                draw(bar, &run.stats.borrow(), now - start);
            }
            wake = wake.min(draw_at);
        }
        if run.hand_out(now) {
            // Let the connections send what was handed out first.
            tokio::task::yield_now().await;
            continue;
        }
        let next = run.next.get();
        if next < run.total && run.has_idle() {
            let gap = run.schedule.due(next).saturating_duration_since(now);
            if gap > TIMER_MARGIN {
                sleep_until(timer.as_mut(), wake.min(now + (gap - TIMER_MARGIN))).await;
            } else if gap < YIELD_BELOW {
                tokio::task::yield_now().await;
            } else {
                std::thread::sleep(if run.is_quiet() { gap } else { gap.min(NAP) });
                tokio::task::yield_now().await;
            }
            continue;
        }
        // Every connection is busy (wait for one, or the end), or every
        // call is taken (wait for the end).
        run.pacer_waits.set(next < run.total);
        let freed = run.freed.notified();
        tokio::select! {
            biased;
            () = freed => {}
            () = sleep_until(timer.as_mut(), wake) => {}
        }
        run.pacer_waits.set(false);
    }
    run.stopped.set(true);
    run.work.notify_waiters();
}

/// Asks Linux for a timer slack of [`TIMER_SLACK_NS`] on the calling thread
/// (through `/proc`, no system call wrapper needed), so its short sleeps
/// end within a few microseconds. Best effort: where that fails, sleeps
/// only end later (by the default slack).
fn precise_timers() {
    // `/proc/thread-self` links to `PID/task/TID`; `/proc/TID` is the thread.
    if let Ok(me) = std::fs::read_link("/proc/thread-self")
        && let Some(tid) = me.file_name()
    {
        let path = std::path::Path::new("/proc")
            .join(tid)
            .join("timerslack_ns");
        let _ = std::fs::write(path, TIMER_SLACK_NS);
    }
}

/// Sleeps on `timer` until `at`, moving its deadline only when it changes.
async fn sleep_until(mut timer: Pin<&mut Sleep>, at: Instant) {
    if timer.deadline() != at {
        timer.as_mut().reset(at);
    }
    timer.await;
}

fn draw(bar: &ProgressBar, stats: &Stats, elapsed: Duration) {
    bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
    let n: u64 = stats.counts.values().sum();
    let limited = stats.counts.get(&429).copied().unwrap_or(0);
    bar.set_message(format!("{n} responses, {limited} × 429"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn schedule_is_exact_and_counts_calls_before_a_time() {
        let s = Schedule {
            start: Instant::now(),
            rate: 3,
        };
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(3), Duration::from_secs(1));
        assert_eq!(s.due(6), s.start + Duration::from_secs(2));
        // Due at 0, 1/3, 2/3: three before 1 s; a fourth just after.
        assert_eq!(s.calls_before(Duration::from_secs(1)), 3);
        assert_eq!(s.calls_before(Duration::from_nanos(1_000_000_001)), 4);
        assert_eq!(s.calls_before(Duration::ZERO), 0);
        let fast = Schedule {
            start: s.start,
            rate: 60_000,
        };
        assert_eq!(fast.calls_before(Duration::from_secs(10)), 600_000);
        assert_eq!(fast.offset(599_999), Duration::from_nanos(9_999_983_333));
        let max = Schedule {
            start: s.start,
            rate: u64::from(u32::MAX),
        };
        assert_eq!(
            max.calls_before(Duration::from_secs(3600)),
            3600 * u64::from(u32::MAX)
        );
        assert!(max.offset(3600 * u64::from(u32::MAX) - 1) < Duration::from_secs(3600));
        // Past u64 nanoseconds in the product, the wide path gives the same.
        let i = u64::MAX / 1_000_000_000 + 7;
        assert_eq!(
            max.offset(i).as_nanos(),
            u128::from(i) * 1_000_000_000 / u128::from(u32::MAX)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn precise_timers_sets_the_slack_of_the_calling_thread_only() {
        let slack = |tid: &std::ffi::OsStr| {
            let path = std::path::Path::new("/proc")
                .join(tid)
                .join("timerslack_ns");
            std::fs::read_to_string(path).expect("timerslack_ns")
        };
        let main = std::fs::read_link("/proc/thread-self").expect("thread-self");
        let main = main.file_name().expect("tid").to_owned();
        let before = slack(&main);
        let seen = std::thread::spawn(|| {
            precise_timers();
            let me = std::fs::read_link("/proc/thread-self").expect("thread-self");
            let seen = std::path::Path::new("/proc")
                .join(me.file_name().expect("tid"))
                .join("timerslack_ns");
            std::fs::read_to_string(seen).expect("timerslack_ns")
        })
        .join()
        .expect("thread");
        assert_eq!(seen.trim(), TIMER_SLACK_NS);
        assert_eq!(slack(&main), before, "other threads keep theirs");
    }
}

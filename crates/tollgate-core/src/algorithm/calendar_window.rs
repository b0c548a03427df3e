//! N per calendar minute, hour or day, resetting exactly on the boundary.
//!
//! Boundaries are local to a time zone (default UTC), read from the tz
//! database through `jiff`. That matters on days when clocks change: a day
//! window in `Europe/Paris` lasts 23 hours on the last Sunday of March and 25
//! on the last Sunday of October, and still starts at local midnight; an hour
//! window in a zone with a half-hour offset (`Asia/Kolkata`) starts at :30
//! UTC. In UTC (and any zone whose offset is a whole number of units) the
//! boundaries are plain arithmetic and no tz lookup happens.
//!
//! Exact within a window. Like every fixed window it allows a burst of up to
//! 2N across a boundary (N at the end of one window, N at the start of the
//! next); use a sliding window when that matters.
//!
//! The state is the end of the window it counts and the cost used in it; a
//! state whose window has ended is fresh.

use jiff::tz::TimeZone;
use jiff::{RoundMode, Timestamp, ToSpan, Unit, ZonedRound};

use super::Evaluation;
use crate::clock::Nanos;

/// The calendar unit of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarUnit {
    /// A minute, starting at second 0.
    Minute,
    /// An hour, starting at minute 0.
    Hour,
    /// A day, starting at local midnight.
    Day,
}

impl CalendarUnit {
    fn nanos(self) -> u64 {
        match self {
            CalendarUnit::Minute => 60 * Nanos::SECOND,
            CalendarUnit::Hour => 3_600 * Nanos::SECOND,
            CalendarUnit::Day => 86_400 * Nanos::SECOND,
        }
    }
}

/// A calendar window's unit and time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Calendar {
    /// Minute, hour or day.
    pub unit: CalendarUnit,
    /// The zone whose local clock draws the boundaries.
    pub time_zone: TimeZone,
    /// Whether the zone is UTC, so boundaries are arithmetic.
    is_utc: bool,
}

impl Calendar {
    /// A calendar in `time_zone`.
    pub fn new(unit: CalendarUnit, time_zone: TimeZone) -> Calendar {
        let is_utc = time_zone == TimeZone::UTC;
        Calendar {
            unit,
            time_zone,
            is_utc,
        }
    }

    /// The length of every window when the zone is UTC (boundaries are then
    /// plain arithmetic on the epoch); `None` for other zones.
    pub fn utc_length(&self) -> Option<u64> {
        self.is_utc.then(|| self.unit.nanos())
    }

    /// The window `[start, end)` containing `now`.
    pub fn window(&self, now: Nanos) -> (Nanos, Nanos) {
        if self.is_utc {
            let len = self.unit.nanos();
            let start = now.0 - now.0 % len;
            return (Nanos(start), Nanos(start.saturating_add(len)));
        }
        self.zoned_window(now).unwrap_or_else(|| {
            // Out of jiff's range (after year 9999): fall back to UTC arithmetic.
            let len = self.unit.nanos();
            let start = now.0 - now.0 % len;
            (Nanos(start), Nanos(start.saturating_add(len)))
        })
    }

    fn zoned_window(&self, now: Nanos) -> Option<(Nanos, Nanos)> {
        let ts = Timestamp::from_nanosecond(i128::from(now.0)).ok()?;
        let zoned = ts.to_zoned(self.time_zone.clone());
        let (start, end) = match self.unit {
            CalendarUnit::Day => {
                let start = zoned.start_of_day().ok()?;
                let end = start.checked_add(1.day()).ok()?;
                (start, end)
            }
            CalendarUnit::Hour | CalendarUnit::Minute => {
                let unit = if self.unit == CalendarUnit::Hour {
                    Unit::Hour
                } else {
                    Unit::Minute
                };
                let start = zoned
                    .round(ZonedRound::new().smallest(unit).mode(RoundMode::Trunc))
                    .ok()?;
                let step = if self.unit == CalendarUnit::Hour {
                    1.hour()
                } else {
                    1.minute()
                };
                let end = start.checked_add(step).ok()?;
                (start, end)
            }
        };
        let to_nanos = |t: Timestamp| u64::try_from(t.as_nanosecond()).ok();
        Some((
            Nanos(to_nanos(start.timestamp())?),
            Nanos(to_nanos(end.timestamp())?),
        ))
    }
}

/// The state of one calendar counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CalendarState {
    /// End of the window the count belongs to.
    pub end: Nanos,
    /// Cost admitted in that window.
    pub count: u64,
}

/// Evaluates `cost` at `now` in the window ending at `end` with `limit` units.
/// Returns the evaluation and the state to store if admitted.
pub fn evaluate(
    state: Option<&CalendarState>,
    now: Nanos,
    cost: u64,
    limit: u64,
    end: Nanos,
) -> (Evaluation, CalendarState) {
    // A state from an earlier window counts nothing; one from a later window
    // (the clock stepped back) is kept as it is, so nothing is handed out twice.
    let state = match state {
        Some(s) if s.end >= end => *s,
        _ => CalendarState { end, count: 0 },
    };
    let reset = Nanos(state.end.0.saturating_sub(now.0));
    let left = limit.saturating_sub(state.count);
    if cost > limit {
        return (Evaluation::never(left, reset), state);
    }
    if cost <= left {
        let next = CalendarState {
            end: state.end,
            count: state.count + cost,
        };
        let eval = Evaluation {
            admit: true,
            never: false,
            remaining: left - cost,
            reset,
            retry_after: Nanos::ZERO,
        };
        return (eval, next);
    }
    let eval = Evaluation {
        admit: false,
        never: false,
        remaining: left,
        reset,
        retry_after: reset,
    };
    (eval, state)
}

/// Whether a stored state's window has ended at `now` (safe to drop).
pub fn is_fresh(state: &CalendarState, now: Nanos) -> bool {
    state.end <= now || state.count == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Nanos {
        let ts: Timestamp = s.parse().unwrap();
        Nanos(u64::try_from(ts.as_nanosecond()).unwrap())
    }

    #[test]
    fn utc_day_resets_at_midnight() {
        let cal = Calendar::new(CalendarUnit::Day, TimeZone::UTC);
        let (start, end) = cal.window(at("2026-03-05T13:14:15Z"));
        assert_eq!(start, at("2026-03-05T00:00:00Z"));
        assert_eq!(end, at("2026-03-06T00:00:00Z"));
    }

    #[test]
    fn paris_day_is_23_hours_on_spring_forward() {
        let cal = Calendar::new(CalendarUnit::Day, TimeZone::get("Europe/Paris").unwrap());
        let (start, end) = cal.window(at("2026-03-29T12:00:00Z"));
        assert_eq!(start, at("2026-03-28T23:00:00Z"));
        assert_eq!(end, at("2026-03-29T22:00:00Z"));
        let (start, end) = cal.window(at("2026-10-25T12:00:00Z"));
        assert_eq!(end.0 - start.0, 25 * 3_600 * Nanos::SECOND);
    }

    #[test]
    fn kolkata_hours_start_at_half_past_utc() {
        let cal = Calendar::new(CalendarUnit::Hour, TimeZone::get("Asia/Kolkata").unwrap());
        let (start, end) = cal.window(at("2026-01-01T10:10:00Z"));
        assert_eq!(start, at("2026-01-01T09:30:00Z"));
        assert_eq!(end, at("2026-01-01T10:30:00Z"));
    }

    #[test]
    fn thirty_per_hour_resets_exactly_on_the_hour() {
        let cal = Calendar::new(CalendarUnit::Hour, TimeZone::UTC);
        let t0 = at("2026-01-01T10:59:00Z");
        let (_, end) = cal.window(t0);
        let mut s = None;
        for _ in 0..30 {
            let (e, n) = evaluate(s.as_ref(), t0, 1, 30, end);
            assert!(e.admit);
            s = Some(n);
        }
        let (e, _) = evaluate(s.as_ref(), t0, 1, 30, end);
        assert!(!e.admit);
        assert_eq!(e.retry_after, Nanos::from_secs(60));
        let just_before = Nanos(at("2026-01-01T11:00:00Z").0 - 1);
        let (_, end_b) = cal.window(just_before);
        assert!(!evaluate(s.as_ref(), just_before, 1, 30, end_b).0.admit);
        let on = at("2026-01-01T11:00:00Z");
        let (_, end_on) = cal.window(on);
        assert!(evaluate(s.as_ref(), on, 1, 30, end_on).0.admit);
    }
}

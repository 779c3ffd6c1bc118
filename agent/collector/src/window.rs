//! Listing windows. Invariant: every window sent is at most 24 h long, starts strictly before it ends,
//! and starts no earlier than `now − 7 days + RETENTION_MARGIN` (the API rejects older starts).

use time::{Duration, OffsetDateTime};

/// Microsoft keeps listings 7 days.
pub const RETENTION: Duration = Duration::days(7);
/// Safety margin against clock skew and request delay.
pub const RETENTION_MARGIN: Duration = Duration::minutes(10);
/// Longest window the API accepts.
pub const MAX_WINDOW: Duration = Duration::hours(24);
/// Shortest window a collector narrows to after cut listings (see `collector`): a listing of one hour
/// past the caps of `api::MAX_ITEMS_PER_WINDOW` is no real tenant's, and narrower windows would only
/// multiply the requests of every later cycle.
pub const MIN_WINDOW: Duration = Duration::hours(1);

/// A half-open listing window `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Inclusive start.
    pub start: OffsetDateTime,
    /// Exclusive end.
    pub end: OffsetDateTime,
}

/// The earliest start the API accepts at `now`.
pub fn oldest_start(now: OffsetDateTime) -> OffsetDateTime {
    now - RETENTION + RETENTION_MARGIN
}

/// Slices `[from, now)` into windows of at most 24 h, clamped to the retention.
pub fn plan(from: OffsetDateTime, now: OffsetDateTime) -> Vec<Window> {
    plan_sized(from, now, MAX_WINDOW)
}

/// Slices `[from, now)` into windows of at most `len` (itself kept within [`MIN_WINDOW`, `MAX_WINDOW`]),
/// clamped to the retention.
pub fn plan_sized(from: OffsetDateTime, now: OffsetDateTime, len: Duration) -> Vec<Window> {
    let len = len.clamp(MIN_WINDOW, MAX_WINDOW);
    let mut start = from.max(oldest_start(now));
    let mut out = Vec::new();
    while start < now {
        let end = (start + len).min(now);
        out.push(Window { start, end });
        start = end;
    }
    out
}

/// Re-clamps a window just before it is sent (time passed since it was planned). `None` when nothing
/// of it is still listable.
pub fn clamp(w: Window, now: OffsetDateTime) -> Option<Window> {
    let start = w.start.max(oldest_start(now));
    let end = w.end.min(start + MAX_WINDOW);
    (start < end).then_some(Window { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_short_contiguous_and_within_retention() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        let w = plan(now - Duration::days(9), now);
        assert_eq!(w.first().map(|w| w.start), Some(oldest_start(now)));
        assert_eq!(w.last().map(|w| w.end), Some(now));
        for pair in w.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert!(w
            .iter()
            .all(|w| w.end - w.start <= MAX_WINDOW && w.start < w.end));
        assert_eq!(w.len(), 7);
        assert!(plan(now, now).is_empty());
    }

    #[test]
    fn narrowed_windows_tile_the_same_span_within_their_bounds() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        let from = now - Duration::hours(10);
        let w = plan_sized(from, now, Duration::hours(3));
        assert_eq!(w.len(), 4);
        assert_eq!(w.first().map(|w| w.start), Some(from));
        assert_eq!(w.last().map(|w| w.end), Some(now));
        for pair in w.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert_eq!(plan_sized(from, now, Duration::minutes(1)).len(), 10);
        assert_eq!(plan_sized(from, now, Duration::days(3)), plan(from, now));
    }

    #[test]
    fn clamp_moves_an_aged_window_forward() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        let w = Window {
            start: oldest_start(now),
            end: oldest_start(now) + Duration::hours(1),
        };
        let later = now + Duration::minutes(30);
        let c = clamp(w, later).expect("still listable");
        assert_eq!(c.start, oldest_start(later));
        assert!(clamp(w, now + Duration::hours(2)).is_none());
    }
}

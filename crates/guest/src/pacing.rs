//! Pacing the dirty writer: how many pages to write now, or how long to sleep, so that
//! the rate is smooth at the scale of a hundredth of a second (waking more often costs a
//! TCG guest more CPU than the writing).
//!
//! The writer asks [`Pacer::next`] what to do, does it, and reports the pages written
//! with [`Pacer::wrote`]. Work is measured against the clock from the start: after `t`
//! seconds `rate * t` pages are due. A writer that falls behind (the CPU cannot keep up,
//! or the VM was paused) is owed at most [`MAX_DEBT_NS`] worth of pages; the rest is
//! forgiven, so it never bursts to "catch up" on seconds of lost time.

use std::time::Duration;

use crate::pattern::PAGE_SIZE;

/// Length of a pacing slice: the writer writes at most this much time's worth of pages
/// between two looks at the clock, and sleeps about this long when ahead.
pub const SLICE_NS: u64 = 10_000_000;

/// The most time's worth of pages a late writer is still owed.
pub const MAX_DEBT_NS: u64 = 100_000_000;

const NS_PER_SEC: u64 = 1_000_000_000;
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE as u64;

/// What the writer should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write this many pages (at least 1), then ask again.
    Write(u64),
    /// Ahead of schedule: sleep this long, then ask again.
    Sleep(Duration),
}

/// Paces page writes at a fixed rate.
#[derive(Debug, Clone)]
pub struct Pacer {
    pages_per_sec: u64,
    start_ns: u64,
    /// Pages written or forgiven since the start.
    credited: u64,
}

/// `count * num / den` without overflow, rounded down (saturating at `u64::MAX`).
fn mul_div(count: u64, num: u64, den: u64) -> u64 {
    let r = u128::from(count) * u128::from(num) / u128::from(den.max(1));
    u64::try_from(r).unwrap_or(u64::MAX)
}

impl Pacer {
    /// A pacer for `rate_mib_s` MiB/s of 4 KiB pages, starting at `start_ns` (a
    /// monotonic clock reading).
    pub fn new(rate_mib_s: u32, start_ns: u64) -> Self {
        Pacer { pages_per_sec: u64::from(rate_mib_s) * PAGES_PER_MIB, start_ns, credited: 0 }
    }

    /// Pages per second this pacer aims for.
    pub fn pages_per_sec(&self) -> u64 {
        self.pages_per_sec
    }

    /// Pages that should have been written by `now_ns` since the start.
    pub fn due(&self, now_ns: u64) -> u64 {
        mul_div(now_ns.saturating_sub(self.start_ns), self.pages_per_sec, NS_PER_SEC)
    }

    /// Pages written in one slice at this rate (at least 1).
    pub fn batch(&self) -> u64 {
        mul_div(SLICE_NS, self.pages_per_sec, NS_PER_SEC).max(1)
    }

    /// What to do at `now_ns`: write some pages, or sleep.
    pub fn next(&mut self, now_ns: u64) -> Step {
        let due = self.due(now_ns);
        let max_debt = mul_div(MAX_DEBT_NS, self.pages_per_sec, NS_PER_SEC).max(1);
        if due > self.credited.saturating_add(max_debt) {
            self.credited = due - max_debt;
        }
        if due > self.credited {
            return Step::Write((due - self.credited).min(self.batch()));
        }
        // Sleep until one batch more is due (rounded up to the next nanosecond).
        let target = self.credited.saturating_add(self.batch());
        let target_ns = mul_div(target, NS_PER_SEC, self.pages_per_sec).saturating_add(1);
        let elapsed = now_ns.saturating_sub(self.start_ns);
        Step::Sleep(Duration::from_nanos(target_ns.saturating_sub(elapsed).clamp(1, SLICE_NS)))
    }

    /// Records that `pages` pages were written.
    pub fn wrote(&mut self, pages: u64) {
        self.credited = self.credited.saturating_add(pages);
    }
}

/// The rate, in MiB/s, of `pages` 4 KiB pages written in `elapsed_ns` (0 if no time).
pub fn mib_per_sec(pages: u64, elapsed_ns: u64) -> f64 {
    if elapsed_ns == 0 {
        return 0.0;
    }
    // Precision loss only beyond 2^53 pages or ns, far beyond any run.
    #[allow(clippy::cast_precision_loss)]
    let (pages, secs) = (pages as f64, elapsed_ns as f64 / NS_PER_SEC as f64);
    pages / PAGES_PER_MIB as f64 / secs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn one_mib_per_second_is_256_pages_per_second() {
        let pacer = Pacer::new(1, 0);
        assert_eq!(pacer.pages_per_sec(), 256);
    }

    #[test]
    fn due_grows_linearly_from_the_start() {
        let pacer = Pacer::new(32, 5 * MS);
        assert_eq!(pacer.due(5 * MS + 500 * MS), 32 * 256 / 2);
    }

    #[test]
    fn nothing_is_due_before_the_start() {
        let pacer = Pacer::new(32, 5 * MS);
        assert_eq!(pacer.due(MS), 0);
    }

    #[test]
    fn batch_is_one_slice_of_pages() {
        // 32 MiB/s = 8192 pages/s; 10 ms of that is 81.92 pages.
        assert_eq!(Pacer::new(32, 0).batch(), 81);
    }

    #[test]
    fn batch_is_at_least_one_page() {
        assert_eq!(Pacer::new(0, 0).batch(), 1);
    }

    #[test]
    fn writer_on_time_writes_what_is_due() {
        let mut pacer = Pacer::new(32, 0);
        assert_eq!(pacer.next(MS), Step::Write(8));
    }

    #[test]
    fn late_writer_writes_at_most_one_batch() {
        let mut pacer = Pacer::new(32, 0);
        assert_eq!(pacer.next(50 * MS), Step::Write(81));
    }

    #[test]
    fn writer_ahead_sleeps_until_a_batch_is_due() {
        let mut pacer = Pacer::new(32, 0);
        pacer.wrote(8); // all that is due at 1 ms
                        // 89 pages are due at 89/8192 s = 10.8643 ms.
        assert_eq!(pacer.next(MS), Step::Sleep(Duration::from_nanos(9_864_258)));
    }

    #[test]
    fn sleep_never_exceeds_a_slice() {
        let mut pacer = Pacer::new(1, 0);
        pacer.wrote(100);
        assert_eq!(pacer.next(0), Step::Sleep(Duration::from_nanos(SLICE_NS)));
    }

    #[test]
    fn debt_beyond_the_cap_is_forgiven() {
        let mut pacer = Pacer::new(32, 0);
        let _ = pacer.next(10_000 * MS); // 10 s late; 100 ms (819 pages) still owed
        pacer.wrote(818);
        assert_eq!(pacer.next(10_000 * MS), Step::Write(1));
    }

    #[test]
    fn huge_rate_does_not_overflow() {
        let mut pacer = Pacer::new(u32::MAX, 0);
        assert_eq!(pacer.next(u64::MAX), Step::Write(pacer.batch()));
    }

    #[test]
    fn rate_of_256_pages_in_a_second_is_one_mib_per_second() {
        assert!((mib_per_sec(256, 1_000_000_000) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn rate_over_no_time_is_zero() {
        assert_eq!(mib_per_sec(256, 0), 0.0);
    }
}

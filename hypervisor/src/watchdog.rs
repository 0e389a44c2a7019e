//! The hang watchdog's bookkeeping: when each guest's control channel last carried a
//! heartbeat (a load report; Lavender sends one at least every 100 ms), and whether a guest
//! has been silent past its deadline (`watchdog_ms` in the partition configuration).
//!
//! Pure logic, host-tested: the caller passes the time (TSC ticks). The BSP acts on the
//! verdict (`faults::poll`).

use core::sync::atomic::{AtomicU64, Ordering};

/// The last heartbeat of each of `N` guests, in TSC ticks (0: none yet). A guest is watched
/// from its first heartbeat on, so the time it takes to boot and attach its channel is not
/// counted against it.
pub struct Heartbeats<const N: usize> {
    last: [AtomicU64; N],
}

impl<const N: usize> Default for Heartbeats<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Heartbeats<N> {
    pub const fn new() -> Self {
        Self {
            last: [const { AtomicU64::new(0) }; N],
        }
    }

    /// Guest `guest` showed a sign of life at `now`.
    pub fn beat(&self, guest: usize, now: u64) {
        if let Some(last) = self.last.get(guest) {
            // Never 0, which means "no heartbeat yet".
            last.fetch_max(now.max(1), Ordering::AcqRel);
        }
    }

    /// When `guest` last beat, if it ever did.
    pub fn last(&self, guest: usize) -> Option<u64> {
        let last = self.last.get(guest)?.load(Ordering::Acquire);
        (last != 0).then_some(last)
    }

    /// The ticks `guest` has been silent at `now` if that is more than `deadline` ticks:
    /// it is hung. `None` while it beats in time or before its first heartbeat.
    pub fn overdue(&self, guest: usize, now: u64, deadline: u64) -> Option<u64> {
        let silent = now.saturating_sub(self.last(guest)?);
        (silent > deadline).then_some(silent)
    }
}

/// How often the BSP looks at a watchdog of `deadline_ms`: four times per deadline (so a
/// hang is reported at most a quarter of the deadline late), at least every 10 ms.
pub fn check_period_ms(deadline_ms: u32) -> u32 {
    (deadline_ms / 4).max(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_is_watched_from_its_first_heartbeat() {
        let beats = Heartbeats::<2>::new();
        assert_eq!(beats.overdue(0, u64::MAX, 10), None, "no heartbeat yet");
        beats.beat(0, 100);
        assert_eq!(beats.overdue(0, 110, 10), None, "exactly at the deadline");
        assert_eq!(beats.overdue(0, 111, 10), Some(11));
        assert_eq!(
            beats.overdue(1, 1_000, 10),
            None,
            "the other guest is not watched"
        );
    }

    #[test]
    fn each_heartbeat_restarts_the_deadline_and_time_never_runs_back() {
        let beats = Heartbeats::<1>::new();
        beats.beat(0, 100);
        beats.beat(0, 150);
        assert_eq!(beats.overdue(0, 155, 10), None);
        // A stale stamp (another core's clock read earlier) does not move the beat back.
        beats.beat(0, 120);
        assert_eq!(beats.last(0), Some(150));
        assert_eq!(beats.overdue(0, 200, 10), Some(50));
        // A beat at TSC 0 still counts as a beat.
        let beats = Heartbeats::<1>::new();
        beats.beat(0, 0);
        assert_eq!(beats.last(0), Some(1));
    }

    #[test]
    fn guests_out_of_range_are_ignored() {
        let beats = Heartbeats::<1>::new();
        beats.beat(5, 100);
        assert_eq!(beats.last(5), None);
        assert_eq!(beats.overdue(5, 1_000, 1), None);
    }

    #[test]
    fn the_check_period_is_a_quarter_of_the_deadline_and_at_least_10_ms() {
        assert_eq!(check_period_ms(1000), 250);
        assert_eq!(check_period_ms(500), 125);
        assert_eq!(check_period_ms(20), 10);
    }
}

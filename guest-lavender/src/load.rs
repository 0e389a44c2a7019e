//! Load accounting for the cooperative policy: how busy each core was over a report window,
//! how many cores Lavender would like, and whether a report differs enough from the last one
//! to be worth a console marker between periodic reports.

use vmcall_proto::cores::{CoreId, CoreSet, MAX_CORES};

/// A change in one core's busy fraction this large (in per-mille) is significant.
pub const SIGNIFICANT_BUSY_CHANGE: u16 = 250;

/// `busy` ticks out of `window` ticks, in per-mille, clamped to 0..=1000.
pub fn permille(busy: u64, window: u64) -> u16 {
    if window == 0 {
        return 0;
    }
    (u128::from(busy.min(window)) * 1000 / u128::from(window)) as u16
}

/// How many cores Lavender asks to gain (positive) or give back (negative): one core per
/// runnable thread, at least one core, within the cores it may hold.
pub fn wanted_delta(runnable: u32, held: u32, allowed: u32) -> i16 {
    let wanted = runnable.clamp(1, allowed.max(1));
    (i64::from(wanted) - i64::from(held)).clamp(i64::from(i16::MIN), i64::from(i16::MAX)) as i16
}

/// Whether Lavender declines a negotiable revoke: without the core, the threads it has
/// runnable (`runnable`, queued and running) would exceed the cores it schedules on
/// (`scheduling`, the revoked one included).
pub fn declines_revoke(runnable: u32, scheduling: u32) -> bool {
    runnable > scheduling.saturating_sub(1)
}

/// One window's load, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub runnable: u32,
    pub delta: i16,
    pub cores: CoreSet,
    busy: [u16; MAX_CORES],
}

impl Summary {
    pub fn new(runnable: u32, delta: i16) -> Self {
        Self {
            runnable,
            delta,
            cores: CoreSet::EMPTY,
            busy: [0; MAX_CORES],
        }
    }

    pub fn set_busy(&mut self, core: CoreId, permille: u16) {
        self.cores = self.cores.with(core);
        self.busy[core.index()] = permille.min(1000);
    }

    pub fn busy(&self, core: CoreId) -> u16 {
        self.busy[core.index()]
    }

    /// Whether this summary differs from `previous` in a way a reader of the console cares
    /// about: another thread count, request or core set, or a large swing on any core.
    pub fn significant_since(&self, previous: Option<&Summary>) -> bool {
        let Some(previous) = previous else {
            return true;
        };
        self.runnable != previous.runnable
            || self.delta != previous.delta
            || self.cores != previous.cores
            || self.cores.iter().any(|core| {
                self.busy(core).abs_diff(previous.busy(core)) >= SIGNIFICANT_BUSY_CHANGE
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoke_is_declined_only_when_the_threads_would_exceed_the_cores_left() {
        // 8 threads on 2 cores: 1 core left is too few.
        assert!(declines_revoke(8, 2));
        assert!(declines_revoke(2, 2));
        // One thread fits on the core that stays; none or one thread on one core gives it up
        // (the boot core is never revoked, so a revoke of the last core is not negotiated).
        assert!(!declines_revoke(1, 2));
        assert!(!declines_revoke(0, 2));
        assert!(!declines_revoke(3, 4));
        assert!(declines_revoke(4, 4));
    }

    fn core(index: u64) -> CoreId {
        CoreId::new(index).unwrap()
    }

    #[test]
    fn permille_is_clamped_and_safe() {
        assert_eq!(permille(0, 100), 0);
        assert_eq!(permille(50, 100), 500);
        assert_eq!(permille(150, 100), 1000);
        assert_eq!(permille(5, 0), 0);
        assert_eq!(permille(u64::MAX, u64::MAX), 1000);
    }

    #[test]
    fn one_core_per_runnable_thread_within_limits() {
        assert_eq!(wanted_delta(8, 1, 3), 2);
        assert_eq!(wanted_delta(2, 1, 3), 1);
        assert_eq!(wanted_delta(1, 3, 3), -2);
        assert_eq!(wanted_delta(0, 2, 3), -1, "an idle guest keeps one core");
        assert_eq!(wanted_delta(3, 3, 3), 0);
    }

    #[test]
    fn significance() {
        let mut first = Summary::new(8, 2);
        first.set_busy(core(1), 900);
        assert!(first.significant_since(None));
        let mut same = first;
        same.set_busy(core(1), 1000);
        assert!(!same.significant_since(Some(&first)));
        let mut swing = first;
        swing.set_busy(core(1), 600);
        assert!(swing.significant_since(Some(&first)));
        let mut more_cores = first;
        more_cores.set_busy(core(2), 900);
        assert!(more_cores.significant_since(Some(&first)));
        let fewer_threads = Summary {
            runnable: 7,
            ..first
        };
        assert!(fewer_threads.significant_since(Some(&first)));
    }
}

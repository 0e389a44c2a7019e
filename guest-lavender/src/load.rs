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

/// How many cores Lavender wants now: one core per runnable thread, at least one core,
/// within the cores it may hold (`vmcall_proto::demand` steadies it into a request).
pub fn wanted(runnable: u32, allowed: u32) -> u32 {
    runnable.clamp(1, allowed.max(1))
}

/// Whether an offer of `-request` of the `scheduling` cores Lavender holds is final: the
/// cores it keeps are still as many as it wants for `peak` threads, the most its live
/// processes have run at once (and no fewer than it wants for the `usable` ones runnable
/// now), so no live work has used the cores it offers: the work that ran on them ended. A
/// job between two phases has used them and will ask for them again: its offer is not final.
pub fn final_offer(request: i16, scheduling: u32, peak: u32, usable: u32, allowed: u32) -> bool {
    request < 0
        && i64::from(scheduling) + i64::from(request)
            >= i64::from(wanted(peak.max(usable), allowed))
}

/// Counts the threads that can run at once: every runnable thread, except that a process
/// limited to `n` cores (`vmctl exec --cores n`) counts for at most `n`, so Lavender does
/// not ask for cores a process could not use. Fixed size: processes beyond the first
/// [`UsableThreads::TRACKED`] limited ones count whole.
#[derive(Clone, Copy, Debug)]
pub struct UsableThreads {
    /// (pid, core limit, runnable threads) of each limited process seen.
    limited: [(u32, u32, u32); Self::TRACKED],
    tracked: usize,
    unlimited: u32,
}

impl UsableThreads {
    pub const TRACKED: usize = 16;

    pub const fn new() -> Self {
        Self {
            limited: [(0, 0, 0); Self::TRACKED],
            tracked: 0,
            unlimited: 0,
        }
    }

    /// One runnable thread of `owner`: its process's pid and core limit (0: none), `None` for
    /// a kernel thread.
    pub fn add(&mut self, owner: Option<(u32, u32)>) {
        let Some((pid, limit)) = owner.filter(|&(_, limit)| limit > 0) else {
            self.unlimited = self.unlimited.saturating_add(1);
            return;
        };
        if let Some(entry) = self.limited[..self.tracked]
            .iter_mut()
            .find(|entry| entry.0 == pid)
        {
            entry.2 = entry.2.saturating_add(1);
        } else if self.tracked < Self::TRACKED {
            self.limited[self.tracked] = (pid, limit, 1);
            self.tracked += 1;
        } else {
            self.unlimited = self.unlimited.saturating_add(1);
        }
    }

    /// One runnable thread of `owner` that a sibling waits to join: it and its joiner. The
    /// joiner runs the moment the thread ends, so the two want cores as two runnable threads
    /// do. A job that joins its workers at the end of each round thus keeps its cores while
    /// its last worker finishes (a straggler of some 15 to 45 ms under Bochs, `primes`), rather
    /// than offering one for the pool to take and give back at the next round.
    pub fn add_awaited(&mut self, owner: Option<(u32, u32)>) {
        self.add(owner);
        self.add(owner);
    }

    pub fn total(&self) -> u32 {
        self.limited[..self.tracked]
            .iter()
            .fold(self.unlimited, |sum, &(_, limit, threads)| {
                sum.saturating_add(threads.min(limit))
            })
    }
}

impl Default for UsableThreads {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether Lavender declines a negotiable revoke: the cores its load needs (`needs`: the
/// steadied mean of the cores it wanted, `SteadyRequest::needs`; 0 when no thread can run)
/// exceed what it would schedule on without the core (`scheduling`, the revoked one
/// included, less one). So a revoke is not declined because a thread woke up just then, nor
/// accepted because the threads of a busy job wait a moment, nor declined once the job ended.
pub fn declines_revoke(needs: u32, scheduling: u32) -> bool {
    needs > scheduling.saturating_sub(1)
}

/// One window's load, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub runnable: u32,
    pub delta: i16,
    /// Whether the offer (a negative `delta`) is final: none of the live work can use the
    /// cores offered (the load report's `final_offer`).
    pub final_offer: bool,
    pub cores: CoreSet,
    busy: [u16; MAX_CORES],
}

impl Summary {
    pub fn new(runnable: u32, delta: i16) -> Self {
        Self {
            runnable,
            delta,
            final_offer: false,
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
    fn an_offer_is_final_only_when_no_live_work_used_the_cores_offered() {
        // Lavender may hold 2 cores and holds 2. The job that ran 2 threads ended; the idle
        // program's one thread is all that lives: offering one core is final.
        assert!(final_offer(-1, 2, 1, 0, 2));
        // The job lives, between two phases (one thread in a delegated call, none runnable):
        // it ran on both cores and will want them again.
        assert!(!final_offer(-1, 2, 3, 0, 2));
        // No offer, or an offer that would leave fewer cores than the threads runnable now.
        assert!(!final_offer(0, 2, 1, 1, 2));
        assert!(!final_offer(-1, 2, 0, 2, 2));
        // Holding 4 with work that used at most 2 at once: offering 2 is final, 3 is not.
        assert!(final_offer(-2, 4, 2, 0, 4));
        assert!(!final_offer(-3, 4, 2, 0, 4));
        // With nothing live at all, every core but one may go.
        assert!(final_offer(-3, 4, 0, 0, 4));
    }

    #[test]
    fn a_revoke_is_declined_only_when_the_need_would_exceed_the_cores_left() {
        // A need of 8 cores on 2: 1 core left is too few.
        assert!(declines_revoke(8, 2));
        assert!(declines_revoke(2, 2));
        // A need of one core fits on the core that stays
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
    fn a_process_held_to_fewer_cores_counts_for_its_limit() {
        let mut usable = UsableThreads::new();
        // 8 threads of pid 1 held to one core, 3 of pid 2 to two, 2 unlimited, 1 kernel.
        for _ in 0..8 {
            usable.add(Some((1, 1)));
        }
        for _ in 0..3 {
            usable.add(Some((2, 2)));
        }
        usable.add(Some((3, 0)));
        usable.add(Some((3, 0)));
        usable.add(None);
        assert_eq!(usable.total(), 1 + 2 + 2 + 1);
        // Beyond the tracked processes, threads count whole: never fewer than the truth.
        let mut many = UsableThreads::new();
        for pid in 0..(UsableThreads::TRACKED as u32 + 4) {
            many.add(Some((pid, 1)));
            many.add(Some((pid, 1)));
        }
        assert_eq!(many.total(), UsableThreads::TRACKED as u32 + 8);
        assert_eq!(UsableThreads::default().total(), 0);
    }

    #[test]
    fn a_thread_a_sibling_waits_to_join_counts_its_joiner_too() {
        // The last worker of a round, its main thread waiting to join it: two cores wanted,
        // within the process's limit.
        let mut straggler = UsableThreads::new();
        straggler.add_awaited(Some((1, 2)));
        assert_eq!(straggler.total(), 2);
        let mut limited = UsableThreads::new();
        limited.add_awaited(Some((1, 1)));
        assert_eq!(
            limited.total(),
            1,
            "held to one core, it still asks for one"
        );
        // A busy round: eight workers, the main thread waiting on the first one.
        let mut busy = UsableThreads::new();
        busy.add_awaited(Some((1, 0)));
        for _ in 1..8 {
            busy.add(Some((1, 0)));
        }
        assert_eq!(busy.total(), 9);
    }

    #[test]
    fn one_core_per_runnable_thread_within_limits() {
        assert_eq!(wanted(8, 3), 3);
        assert_eq!(wanted(2, 3), 2);
        assert_eq!(wanted(0, 3), 1, "an idle guest keeps one core");
        assert_eq!(wanted(5, 0), 1);
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

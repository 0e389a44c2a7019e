//! Scheduling policy of the SMP scheduler, as pure functions over run-queue lengths: where a
//! new or woken thread goes, which core an idle core steals from, and where the threads of a
//! core that is leaving go. The kernel's scheduler (`kernel::sched`) holds the queues and calls
//! these with a snapshot of their lengths; a snapshot may be stale by the time it is used, which
//! only makes a choice less balanced, never wrong (every queue is locked when it is touched).
//!
//! A process may be limited to a number of cores (`vmctl exec --cores N`): it holds a set of
//! slots (bit `slot` of a mask), at most N of them online, and its threads run only there.
//! [`permitted`] says where one of its threads may go, [`claim`] adds the slot it went to.

/// The load of one online core as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreLoad {
    /// Lavender's slot of the core.
    pub slot: usize,
    /// Threads waiting in its run queue.
    pub queued: usize,
    /// Whether it is running a thread (not idle).
    pub running: bool,
    /// Whether it accepts threads: online and not being drained for a revoke.
    pub accepting: bool,
    /// Processes limited to a number of cores that hold the slot (see [`claim`]), running
    /// or not: their threads come back to it whenever they wake.
    pub pinned: usize,
}

impl CoreLoad {
    fn weight(&self) -> usize {
        self.queued + usize::from(self.running)
    }
}

/// Where a new or woken thread goes: the accepting core with the fewest threads, preferring
/// `local` on a tie (its caches are warm). `None` when no core accepts threads.
pub fn place(local: usize, cores: &[CoreLoad]) -> Option<usize> {
    cores
        .iter()
        .filter(|core| core.accepting)
        .min_by_key(|core| (core.weight(), core.slot != local))
        .map(|core| core.slot)
}

/// Where the thread of a core-limited process goes when it takes a slot its process does not
/// hold yet ([`claim`]): it keeps that slot for the process's life, so the slot held by the
/// fewest such processes comes first, then the fewest threads, then `local`. By the threads
/// alone, a process asleep (waiting for a file, a timer) leaves its core looking idle, so
/// processes started one after another would all claim that core and share it for good while
/// others idle. `None` when no core accepts threads.
pub fn place_claim(local: usize, cores: &[CoreLoad]) -> Option<usize> {
    cores
        .iter()
        .filter(|core| core.accepting)
        .min_by_key(|core| (core.pinned, core.weight(), core.slot != local))
        .map(|core| core.slot)
}

/// Which core the idle core `thief` steals a thread from: the one with the longest queue, if
/// that queue holds at least one waiting thread. A draining core is a victim too: taking its
/// threads early only helps it leave.
pub fn steal_victim(thief: usize, cores: impl IntoIterator<Item = CoreLoad>) -> Option<usize> {
    cores
        .into_iter()
        .filter(|core| core.slot != thief && core.queued > 0)
        .max_by_key(|core| (core.queued, core.running))
        .map(|core| core.slot)
}

/// Where a thread of the leaving core `leaving` goes: the accepting core with the fewest
/// threads other than `leaving`, lowest slot on a tie.
pub fn migration_target(leaving: usize, cores: &[CoreLoad]) -> Option<usize> {
    cores
        .iter()
        .filter(|core| core.accepting && core.slot != leaving)
        .min_by_key(|core| (core.weight(), core.slot))
        .map(|core| core.slot)
}

/// The slots a thread of a process limited to `limit` cores (0: no limit) may be placed on
/// or taken by: the online slots it holds once it holds `limit` of them, else any online
/// slot. `held` is the process's slot mask; `online` the slots accepting threads. A held slot
/// that is not online (its core left or is leaving) no longer counts, so a process whose
/// cores all left moves on to others.
pub fn permitted(limit: u32, held: u32, online: u32) -> u32 {
    let held = held & online;
    if limit == 0 || held.count_ones() < limit {
        online
    } else {
        held
    }
}

/// The process's slot mask once one of its threads runs on `slot`, or `None` if that would
/// put it on more than `limit` online slots. Held slots that are not online are dropped.
pub fn claim(limit: u32, held: u32, online: u32, slot: usize) -> Option<u32> {
    if limit == 0 {
        return Some(held);
    }
    let held = held & online;
    let bit = 1u32 << slot;
    if held & bit != 0 {
        Some(held)
    } else if held.count_ones() < limit {
        Some(held | bit)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limited_process_stays_on_the_slots_it_holds() {
        // One core of three: the first placement may go anywhere, then only there.
        assert_eq!(permitted(1, 0, 0b111), 0b111);
        let held = claim(1, 0, 0b111, 1).unwrap();
        assert_eq!(held, 0b010);
        assert_eq!(permitted(1, held, 0b111), 0b010);
        assert_eq!(claim(1, held, 0b111, 1), Some(0b010));
        assert_eq!(claim(1, held, 0b111, 2), None);
        // Two cores: a second slot may be taken, a third not.
        let held = claim(2, claim(2, 0, 0b111, 0).unwrap(), 0b111, 2).unwrap();
        assert_eq!(held, 0b101);
        assert_eq!(permitted(2, held, 0b111), 0b101);
        assert_eq!(claim(2, held, 0b111, 1), None);
    }

    #[test]
    fn a_process_whose_core_left_moves_to_another() {
        // Slot 1 went offline: it no longer counts, and any online slot may be taken.
        assert_eq!(permitted(1, 0b010, 0b101), 0b101);
        assert_eq!(claim(1, 0b010, 0b101, 2), Some(0b100));
        // A process may use cores that came online while it held fewer than its limit.
        assert_eq!(permitted(2, 0b001, 0b011), 0b011);
    }

    #[test]
    fn an_unlimited_process_goes_anywhere_online() {
        assert_eq!(permitted(0, 0, 0b1011), 0b1011);
        assert_eq!(claim(0, 0, 0b1011, 3), Some(0));
    }

    fn core(slot: usize, queued: usize, running: bool) -> CoreLoad {
        CoreLoad {
            slot,
            queued,
            running,
            accepting: true,
            pinned: 0,
        }
    }

    #[test]
    fn a_claimed_slot_goes_where_the_fewest_limited_processes_are_held() {
        // Every core idle, as when the processes holding them sleep: the threads alone
        // would send each new process to the local core.
        let mut cores = [core(0, 0, false), core(1, 0, false), core(2, 0, false)];
        cores[0].pinned = 1;
        cores[1].pinned = 1;
        assert_eq!(place(1, &cores), Some(1));
        assert_eq!(place_claim(1, &cores), Some(2));
        // Equal pins: the least loaded, then the local core.
        cores[2].pinned = 1;
        cores[0].running = true;
        assert_eq!(place_claim(0, &cores), Some(1));
        assert_eq!(place_claim(2, &cores), Some(2));
        cores[2].accepting = false;
        cores[1].pinned = 2;
        assert_eq!(place_claim(1, &cores), Some(0));
    }

    #[test]
    fn placement_prefers_the_least_loaded_then_the_local_core() {
        let cores = [core(0, 2, true), core(1, 0, true), core(2, 0, true)];
        assert_eq!(place(0, &cores), Some(1));
        assert_eq!(place(2, &cores), Some(2));
        let idle = [core(0, 0, false), core(1, 0, false)];
        assert_eq!(place(1, &idle), Some(1));
    }

    #[test]
    fn draining_cores_get_no_new_threads() {
        let mut cores = [core(0, 0, false), core(1, 5, true)];
        cores[0].accepting = false;
        assert_eq!(place(0, &cores), Some(1));
        cores[1].accepting = false;
        assert_eq!(place(0, &cores), None);
    }

    #[test]
    fn thieves_take_from_the_longest_queue_only() {
        let cores = [core(0, 0, false), core(1, 1, true), core(2, 3, true)];
        assert_eq!(steal_victim(0, cores), Some(2));
        assert_eq!(steal_victim(2, cores), Some(1));
        let nothing_waiting = [core(0, 0, false), core(1, 0, true)];
        assert_eq!(steal_victim(0, nothing_waiting), None);
    }

    #[test]
    fn a_leaving_core_sends_its_threads_elsewhere() {
        let cores = [core(0, 4, true), core(1, 1, true), core(2, 0, true)];
        assert_eq!(migration_target(0, &cores), Some(2));
        assert_eq!(migration_target(2, &cores), Some(1));
        assert_eq!(migration_target(0, &cores[..1]), None);
    }
}

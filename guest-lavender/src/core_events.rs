//! Which cores Lavender holds, and what to do about each core event: the state machine behind
//! dynamic bring-up and teardown, free of hardware so every sequence of grants and revokes can
//! be tested on the host.
//!
//! A core moves `Absent -> Starting -> Online -> Draining -> Absent`. `Grant` starts it
//! (a STARTUP IPI), its check-in makes it `Online`, `Revoke` makes it `Draining` (the core migrates
//! its threads away and releases itself), and its release makes it `Absent` again, so the next
//! grant of the same core takes the same path. Each held core has a *slot*: Lavender's index of
//! its per-core state (descriptor tables, run queue, idle stack). A released core keeps its
//! slot's claim: its next grant gets the same slot, and other cores take slots never used before
//! they take a released core's. A leaving core marks itself released *before* its
//! `CoreRelease` hypercall, and a core that stays frees its slot here, so for a moment the
//! leaving core may still run on its slot's stack after the table freed the slot; only its own
//! next grant proves it stopped (the hypervisor grants parked cores only).

use vmcall_proto::cores::{CoreId, CoreSet, MAX_CORES};

use crate::descriptors::MAX_CORE_SLOTS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreState {
    Absent,
    /// STARTUP sent at `since` (TSC); `revoke` holds a revoke that came meanwhile.
    Starting {
        slot: usize,
        since: u64,
        startups: u8,
        revoke: bool,
    },
    Online {
        slot: usize,
    },
    /// Asked to leave at `since` (TSC).
    Draining {
        slot: usize,
        since: u64,
    },
}

/// Why an event changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Granted a core the boot info does not allow Lavender to hold.
    NotAllowed,
    /// Granted a core Lavender already holds.
    AlreadyHeld,
    /// Revoked a core Lavender does not hold.
    NotHeld,
    /// Revoked the last core that schedules threads: Lavender cannot give it back.
    LastCore,
    /// Revoked a core that is already leaving.
    AlreadyDraining,
    /// Every slot is in use.
    NoFreeSlot,
    /// Revoked a core that is still starting: it leaves as soon as it checks in.
    Deferred,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAllowed => "core not allowed",
            Self::AlreadyHeld => "core already held",
            Self::NotHeld => "core not held",
            Self::LastCore => "last scheduling core",
            Self::AlreadyDraining => "core already leaving",
            Self::NoFreeSlot => "no free core slot",
            Self::Deferred => "core still starting, leaves after its check-in",
        }
    }
}

/// What the kernel must do after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send STARTUP to `core`, which will run in `slot`.
    BringUp {
        core: CoreId,
        slot: usize,
    },
    /// The core has not checked in: send a second STARTUP.
    ResendStartup {
        core: CoreId,
    },
    /// Make the core leave: it stops scheduling, migrates its threads and releases itself.
    Drain {
        core: CoreId,
        slot: usize,
    },
    Ignore {
        core: CoreId,
        why: Ignored,
    },
}

/// The held cores and their slots.
#[derive(Clone, Debug)]
pub struct CoreTable {
    allowed: CoreSet,
    states: [CoreState; MAX_CORES],
    slots: [Option<CoreId>; MAX_CORE_SLOTS],
    /// The core each slot last held, kept after its release.
    last_held: [Option<CoreId>; MAX_CORE_SLOTS],
}

impl CoreTable {
    /// The table right after boot: only `boot_core` held, online, in slot 0.
    pub fn new(boot_core: CoreId, allowed: CoreSet) -> Self {
        let mut table = Self {
            allowed,
            states: [CoreState::Absent; MAX_CORES],
            slots: [None; MAX_CORE_SLOTS],
            last_held: [None; MAX_CORE_SLOTS],
        };
        table.states[boot_core.index()] = CoreState::Online { slot: 0 };
        table.slots[0] = Some(boot_core);
        table.last_held[0] = Some(boot_core);
        table
    }

    pub fn state(&self, core: CoreId) -> CoreState {
        self.states[core.index()]
    }

    /// Cores that schedule threads: online and not draining.
    pub fn scheduling(&self) -> CoreSet {
        self.matching(|state| matches!(state, CoreState::Online { .. }))
    }

    fn matching(&self, wanted: impl Fn(&CoreState) -> bool) -> CoreSet {
        self.held()
            .filter(|core| wanted(&self.states[core.index()]))
            .fold(CoreSet::EMPTY, CoreSet::with)
    }

    /// The cores in a slot: every core that is not `Absent`. Walking the slots rather than
    /// every possible core keeps the checks on the revoke path to a handful of loads (at
    /// 50 instructions per microsecond of Bochs's virtual time, a walk over 64 states cost
    /// more than the rest of handling a revoke).
    fn held(&self) -> impl Iterator<Item = CoreId> + '_ {
        self.slots.iter().flatten().copied()
    }

    /// `Grant { core }` arrived at TSC `now`.
    pub fn grant(&mut self, core: CoreId, now: u64) -> Action {
        if !self.allowed.contains(core) {
            return Action::Ignore {
                core,
                why: Ignored::NotAllowed,
            };
        }
        if self.states[core.index()] != CoreState::Absent {
            return Action::Ignore {
                core,
                why: Ignored::AlreadyHeld,
            };
        }
        let Some(slot) = self.free_slot_for(core) else {
            return Action::Ignore {
                core,
                why: Ignored::NoFreeSlot,
            };
        };
        self.slots[slot] = Some(core);
        self.last_held[slot] = Some(core);
        self.states[core.index()] = CoreState::Starting {
            slot,
            since: now,
            startups: 1,
            revoke: false,
        };
        Action::BringUp { core, slot }
    }

    /// The slot for `core`: the one it held before, else one never used, else any free one.
    /// One walk over the slots: a grant is on the path a bring-up is timed by.
    fn free_slot_for(&self, core: CoreId) -> Option<usize> {
        let (mut never_used, mut other) = (None, None);
        for (slot, last) in self.last_held.iter().enumerate() {
            if self.slots[slot].is_some() {
                continue;
            }
            match last {
                Some(last) if *last == core => return Some(slot),
                None => {
                    never_used.get_or_insert(slot);
                }
                Some(_) => {
                    other.get_or_insert(slot);
                }
            }
        }
        never_used.or(other)
    }

    /// `Revoke { core }` arrived at TSC `now`.
    pub fn revoke(&mut self, core: CoreId, now: u64) -> Action {
        let ignore = |why| Action::Ignore { core, why };
        match self.states[core.index()] {
            CoreState::Absent => ignore(Ignored::NotHeld),
            CoreState::Draining { .. } => ignore(Ignored::AlreadyDraining),
            CoreState::Starting { revoke: true, .. } => ignore(Ignored::AlreadyDraining),
            CoreState::Starting {
                slot,
                since,
                startups,
                revoke: false,
            } => {
                self.states[core.index()] = CoreState::Starting {
                    slot,
                    since,
                    startups,
                    revoke: true,
                };
                // Acted on at check-in: only a running core can release itself.
                ignore(Ignored::Deferred)
            }
            CoreState::Online { slot } => {
                let others_schedule = self.held().any(|other| {
                    other != core && matches!(self.states[other.index()], CoreState::Online { .. })
                });
                if !others_schedule {
                    return ignore(Ignored::LastCore);
                }
                self.states[core.index()] = CoreState::Draining { slot, since: now };
                Action::Drain { core, slot }
            }
        }
    }

    /// The core in `Starting` reached its scheduler. Returns the revoke that waited for it.
    pub fn checked_in(&mut self, core: CoreId, now: u64) -> Option<Action> {
        let CoreState::Starting { slot, revoke, .. } = self.states[core.index()] else {
            return None;
        };
        self.states[core.index()] = CoreState::Online { slot };
        revoke.then(|| self.revoke(core, now))
    }

    /// A bring-up that could not even be attempted: forget the core and free its slot.
    pub fn abandon(&mut self, core: CoreId) {
        if let CoreState::Starting { slot, .. } = self.states[core.index()] {
            self.states[core.index()] = CoreState::Absent;
            self.slots[slot] = None;
        }
    }

    /// The draining core hands itself back (noted by a core that stays): forget it and free its
    /// slot.
    pub fn released(&mut self, core: CoreId) {
        if let CoreState::Draining { slot, .. } = self.states[core.index()] {
            self.states[core.index()] = CoreState::Absent;
            self.slots[slot] = None;
        }
    }

    /// The hypervisor took `core` by force (it missed a release deadline): forget it whatever
    /// its state and free its slot, since the core is parked and the slot's next core may
    /// use its stack. The slot it held, for the kernel to pick up what is queued there;
    /// `None` if it was not held (its release was noted first).
    pub fn taken(&mut self, core: CoreId) -> Option<usize> {
        let slot = match self.states[core.index()] {
            CoreState::Absent => return None,
            CoreState::Starting { slot, .. }
            | CoreState::Online { slot }
            | CoreState::Draining { slot, .. } => slot,
        };
        self.states[core.index()] = CoreState::Absent;
        self.slots[slot] = None;
        Some(slot)
    }

    /// Periodic check at TSC `now`: a core still starting `resend_after` ticks after its first
    /// STARTUP gets a second one (the MP initialization protocol's retry, Intel SDM Vol. 3A
    /// §9.4.4.1), once.
    pub fn tick(&mut self, now: u64, resend_after: u64) -> Option<Action> {
        let core = self.held().find(|core| {
            matches!(self.states[core.index()], CoreState::Starting { since, startups: 1, .. }
                if now.wrapping_sub(since) >= resend_after)
        })?;
        if let CoreState::Starting { startups, .. } = &mut self.states[core.index()] {
            *startups = 2;
        }
        Some(Action::ResendStartup { core })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(index: u64) -> CoreId {
        CoreId::new(index).unwrap()
    }

    fn table() -> CoreTable {
        CoreTable::new(core(1), CoreSet(0b1110))
    }

    #[test]
    fn a_core_taken_by_force_is_forgotten_and_can_be_granted_again() {
        let mut cores = table();
        assert_eq!(cores.taken(core(2)), None, "not held");
        cores.grant(core(2), 10);
        cores.checked_in(core(2), 20);
        cores.revoke(core(2), 30);
        assert_eq!(cores.taken(core(2)), Some(1));
        assert_eq!(cores.state(core(2)), CoreState::Absent);
        // Noted once: a release noted later changes nothing.
        cores.released(core(2));
        assert_eq!(cores.taken(core(2)), None);
        assert_eq!(
            cores.grant(core(2), 40),
            Action::BringUp {
                core: core(2),
                slot: 1
            }
        );
        // A core taken while still online (its kernel never acted on the revoke).
        cores.checked_in(core(2), 50);
        assert_eq!(cores.taken(core(2)), Some(1));
        assert_eq!(cores.scheduling(), CoreSet(0b0010));
    }

    #[test]
    fn grant_check_in_revoke_release_and_again() {
        let mut cores = table();
        for round in 0..3 {
            assert_eq!(
                cores.grant(core(2), 10),
                Action::BringUp {
                    core: core(2),
                    slot: 1
                },
                "round {round}"
            );
            assert_eq!(cores.scheduling(), CoreSet(0b0010));
            assert_eq!(cores.checked_in(core(2), 20), None);
            assert_eq!(cores.scheduling(), CoreSet(0b0110));
            assert_eq!(
                cores.revoke(core(2), 30),
                Action::Drain {
                    core: core(2),
                    slot: 1
                }
            );
            assert_eq!(cores.scheduling(), CoreSet(0b0010));
            assert_eq!(
                cores.state(core(2)),
                CoreState::Draining { slot: 1, since: 30 }
            );
            cores.released(core(2));
            assert_eq!(cores.state(core(2)), CoreState::Absent);
        }
    }

    #[test]
    fn the_boot_core_may_leave_but_not_the_last_core() {
        let mut cores = table();
        assert_eq!(
            cores.revoke(core(1), 0),
            Action::Ignore {
                core: core(1),
                why: Ignored::LastCore
            }
        );
        cores.grant(core(3), 0);
        // A starting core schedules nothing yet: the boot core is still the last one.
        assert!(matches!(
            cores.revoke(core(1), 0),
            Action::Ignore {
                why: Ignored::LastCore,
                ..
            }
        ));
        cores.checked_in(core(3), 1);
        assert_eq!(
            cores.revoke(core(1), 2),
            Action::Drain {
                core: core(1),
                slot: 0
            }
        );
        cores.released(core(1));
        // Slot 0 is free again and goes to the next grant.
        assert_eq!(
            cores.grant(core(1), 3),
            Action::BringUp {
                core: core(1),
                slot: 0
            }
        );
    }

    #[test]
    fn bad_events_are_ignored_with_a_reason() {
        let mut cores = table();
        let why = |action| match action {
            Action::Ignore { why, .. } => Some(why),
            _ => None,
        };
        assert_eq!(why(cores.grant(core(0), 0)), Some(Ignored::NotAllowed));
        assert_eq!(why(cores.grant(core(1), 0)), Some(Ignored::AlreadyHeld));
        assert_eq!(why(cores.revoke(core(3), 0)), Some(Ignored::NotHeld));
        cores.grant(core(2), 0);
        cores.checked_in(core(2), 0);
        cores.revoke(core(2), 0);
        assert_eq!(
            why(cores.revoke(core(2), 0)),
            Some(Ignored::AlreadyDraining)
        );
        assert_eq!(why(cores.grant(core(2), 0)), Some(Ignored::AlreadyHeld));
        // A release of a core that is not draining changes nothing.
        cores.released(core(1));
        assert_eq!(cores.state(core(1)), CoreState::Online { slot: 0 });
    }

    #[test]
    fn a_revoke_during_bring_up_waits_for_the_check_in() {
        let mut cores = table();
        cores.grant(core(2), 0);
        assert_eq!(
            cores.revoke(core(2), 1),
            Action::Ignore {
                core: core(2),
                why: Ignored::Deferred
            }
        );
        assert_eq!(
            cores.checked_in(core(2), 5),
            Some(Action::Drain {
                core: core(2),
                slot: 1
            })
        );
        assert_eq!(
            cores.state(core(2)),
            CoreState::Draining { slot: 1, since: 5 }
        );
    }

    #[test]
    fn a_silent_core_gets_one_more_startup() {
        let mut cores = table();
        cores.grant(core(3), 100);
        assert_eq!(cores.tick(150, 100), None);
        assert_eq!(
            cores.tick(200, 100),
            Some(Action::ResendStartup { core: core(3) })
        );
        assert_eq!(cores.tick(10_000, 100), None);
        cores.checked_in(core(3), 10_001);
        assert_eq!(cores.tick(20_000, 100), None);
    }

    #[test]
    fn a_core_gets_its_own_slot_back_and_others_take_fresh_ones() {
        let mut cores = table();
        let slot_of = |action| match action {
            Action::BringUp { slot, .. } => slot,
            other => panic!("{other:?}"),
        };
        assert_eq!(slot_of(cores.grant(core(2), 0)), 1);
        cores.checked_in(core(2), 0);
        cores.revoke(core(2), 0);
        cores.released(core(2));
        // Core 3 does not take core 2's slot: core 2 may still be finishing its release there.
        assert_eq!(slot_of(cores.grant(core(3), 0)), 2);
        assert_eq!(slot_of(cores.grant(core(2), 0)), 1);
    }

    #[test]
    fn an_abandoned_bring_up_frees_the_slot() {
        let mut cores = table();
        cores.grant(core(2), 0);
        cores.abandon(core(2));
        assert_eq!(cores.state(core(2)), CoreState::Absent);
        assert!(matches!(
            cores.grant(core(2), 1),
            Action::BringUp { slot: 1, .. }
        ));
    }

    #[test]
    fn slots_run_out_at_the_slot_count() {
        let mut cores = CoreTable::new(core(0), CoreSet(u64::MAX));
        for index in 1..MAX_CORE_SLOTS as u64 {
            assert!(matches!(
                cores.grant(core(index), 0),
                Action::BringUp { .. }
            ));
        }
        assert_eq!(
            cores.grant(core(63), 0),
            Action::Ignore {
                core: core(63),
                why: Ignored::NoFreeSlot
            }
        );
    }
}

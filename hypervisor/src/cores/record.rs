//! The record of the current move of each core: who asked, why, and when each stage
//! happened (TSC). Written by the manager as it moves the core, read by whoever measures
//! moves (the seeded core test, the benchmark).

use super::sync::{AtomicU64, Ordering};

/// The stages of a core's tenure, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Stage {
    /// The grant was made.
    Granted,
    /// The guest's STARTUP IPI to the core was handled.
    Startup,
    /// The parked core took the start request from its mailbox.
    Woken,
    /// The vCPU entered (the core is `Owned`).
    Entered,
    /// The core was revoked (asked back).
    Revoked,
    /// The guest's `CORE_RELEASE` on the core was handled.
    ReleaseCalled,
    /// The vCPU ended and the core is parked.
    Parked,
}

pub const STAGES: usize = 7;

/// Who asked for a move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Requester {
    /// The partition configuration (a guest's initial cores).
    Config = 0,
    /// The hypervisor's policy (the seeded core test).
    Hypervisor = 1,
    /// The owning guest itself (release, offline, halt).
    Guest = 2,
    /// A guest's holder, through the management call (`vmctl move-core` in Linux).
    Holder = 3,
}

/// Why a core moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    Boot = 0,
    Grant = 1,
    Revoke = 2,
    /// The guest gave the core back (`CORE_RELEASE`).
    Released = 3,
    /// The guest missed its release deadline.
    Deadline = 4,
    /// A grant the guest did not start in time.
    Withdrawn = 5,
    /// The guest halted on its last core, or took the core offline.
    Halted = 6,
    /// The hypervisor stopped the guest.
    Stopped = 7,
    /// A revoke was called off: the guest could not give the core back in time, or refused.
    Cancelled = 8,
}

impl Requester {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Config,
            1 => Self::Hypervisor,
            3 => Self::Holder,
            _ => Self::Guest,
        }
    }
}

impl Reason {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Boot,
            1 => Self::Grant,
            2 => Self::Revoke,
            3 => Self::Released,
            4 => Self::Deadline,
            5 => Self::Withdrawn,
            6 => Self::Halted,
            8 => Self::Cancelled,
            _ => Self::Stopped,
        }
    }
}

/// A copy of one core's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveRecord {
    pub generation: u32,
    /// Who asked for the last move, and why.
    pub by: Requester,
    pub why: Reason,
    /// TSC of each [`Stage`] of the current tenure (0: not reached).
    pub at: [u64; STAGES],
}

impl MoveRecord {
    pub fn at(&self, stage: Stage) -> u64 {
        self.at[stage as usize]
    }

    /// Ticks from stage `from` to stage `to`, 0 unless both happened in that order.
    pub fn between(&self, from: Stage, to: Stage) -> u64 {
        self.at(to).saturating_sub(self.at(from))
    }
}

/// One core's record, in atomics: stages are stamped by different cores.
pub(super) struct Record {
    /// Generation << 16 | by << 8 | why.
    last: AtomicU64,
    at: [AtomicU64; STAGES],
}

impl Record {
    #[cfg(not(loom))]
    pub(super) const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            at: [const { AtomicU64::new(0) }; STAGES],
        }
    }

    #[cfg(loom)]
    pub(super) fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            at: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// A new tenure (a grant): the stages of the last one are cleared.
    pub(super) fn begin(&self, generation: u32, by: Requester, why: Reason, now: u64) {
        for stamp in &self.at {
            stamp.store(0, Ordering::Relaxed);
        }
        self.note(generation, by, why);
        self.stamp(Stage::Granted, now);
    }

    pub(super) fn note(&self, generation: u32, by: Requester, why: Reason) {
        let packed = u64::from(generation) << 16 | (by as u64) << 8 | why as u64;
        self.last.store(packed, Ordering::Release);
    }

    pub(super) fn stamp(&self, stage: Stage, now: u64) {
        self.at[stage as usize].store(now, Ordering::Release);
    }

    pub(super) fn at(&self, stage: Stage) -> u64 {
        self.at[stage as usize].load(Ordering::Acquire)
    }

    pub(super) fn read(&self) -> MoveRecord {
        let last = self.last.load(Ordering::Acquire);
        MoveRecord {
            generation: (last >> 16) as u32,
            by: Requester::from_u8((last >> 8) as u8),
            why: Reason::from_u8(last as u8),
            at: core::array::from_fn(|i| self.at[i].load(Ordering::Acquire)),
        }
    }
}

//! VM-exit reasons and exit qualifications (Intel SDM Vol. 3C §28.2, Appendix C).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::partition::MAX_GUESTS;

/// Basic exit reasons (SDM Vol. 3C Appendix C), the ones this hypervisor names.
/// Any other number is kept as `Other` and is unexpected by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    ExceptionOrNmi,
    ExternalInterrupt,
    TripleFault,
    Init,
    Sipi,
    Cpuid,
    Hlt,
    Vmcall,
    CrAccess,
    IoInstruction,
    Rdmsr,
    Wrmsr,
    InvalidGuestState,
    EptViolation,
    EptMisconfiguration,
    PreemptionTimer,
    Xsetbv,
    Other(u16),
}

/// Number of distinct counters: one per named reason plus one for everything else.
pub const COUNTED_REASONS: usize = 18;

impl ExitReason {
    /// From bits 15:0 of the exit-reason field.
    pub fn from_basic(basic: u16) -> Self {
        match basic {
            0 => Self::ExceptionOrNmi,
            1 => Self::ExternalInterrupt,
            2 => Self::TripleFault,
            3 => Self::Init,
            4 => Self::Sipi,
            10 => Self::Cpuid,
            12 => Self::Hlt,
            18 => Self::Vmcall,
            28 => Self::CrAccess,
            30 => Self::IoInstruction,
            31 => Self::Rdmsr,
            32 => Self::Wrmsr,
            33 => Self::InvalidGuestState,
            48 => Self::EptViolation,
            49 => Self::EptMisconfiguration,
            52 => Self::PreemptionTimer,
            55 => Self::Xsetbv,
            other => Self::Other(other),
        }
    }

    /// Counter slot and stable name, used in the `exit_counters` marker.
    pub fn slot(self) -> (usize, &'static str) {
        match self {
            Self::ExceptionOrNmi => (0, "exception_or_nmi"),
            Self::ExternalInterrupt => (1, "external_interrupt"),
            Self::TripleFault => (2, "triple_fault"),
            Self::Init => (3, "init"),
            Self::Sipi => (4, "sipi"),
            Self::Cpuid => (5, "cpuid"),
            Self::Hlt => (6, "hlt"),
            Self::Vmcall => (7, "vmcall"),
            Self::CrAccess => (8, "cr_access"),
            Self::IoInstruction => (9, "io_instruction"),
            Self::Rdmsr => (10, "rdmsr"),
            Self::Wrmsr => (11, "wrmsr"),
            Self::InvalidGuestState => (12, "invalid_guest_state"),
            Self::EptViolation => (13, "ept_violation"),
            Self::EptMisconfiguration => (14, "ept_misconfiguration"),
            Self::PreemptionTimer => (15, "preemption_timer"),
            Self::Xsetbv => (16, "xsetbv"),
            Self::Other(_) => (17, "other"),
        }
    }

    pub fn name(self) -> &'static str {
        self.slot().1
    }
}

/// Exit counts per reason; lock-free so any core can bump them and any core read them.
pub struct ExitCounters([AtomicU64; COUNTED_REASONS]);

impl ExitCounters {
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; COUNTED_REASONS])
    }

    /// Counts one exit of the reason in counter slot `slot` ([`ExitReason::slot`]).
    #[inline(always)]
    pub fn count(&self, slot: usize) {
        if let Some(counter) = self.0.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts at one instant, so a report's total and its parts agree while the
    /// guest keeps exiting.
    pub fn snapshot(&self) -> ExitSnapshot {
        ExitSnapshot(core::array::from_fn(|slot| {
            self.0[slot].load(Ordering::Relaxed)
        }))
    }
}

/// Exit counts read at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitSnapshot([u64; COUNTED_REASONS]);

impl ExitSnapshot {
    /// (name, count) for every reason with a non-zero count.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        (0..COUNTED_REASONS)
            .filter(|slot| self.0[*slot] > 0)
            .map(|slot| (REASON_NAMES[slot], self.0[slot]))
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Default for ExitCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// One core's VM exits per guest and reason with the TSC cycles spent handling them (from
/// the exit to the next VM entry, or to the core parking). Only the core itself writes its
/// accounts, with a plain load and store (no locked instruction on the exit path); any core
/// reads them. A reader may see a count without its cycles yet: the figures are a moving
/// sum, read as such.
pub struct ExitTimes([GuestExitTimes; MAX_GUESTS]);

/// One guest's accounts on one core, per reason (in [`ExitReason::slot`] order).
pub struct GuestExitTimes([Account; COUNTED_REASONS]);

struct Account {
    count: AtomicU64,
    cycles: AtomicU64,
}

/// Count and cycles per reason of one guest on one core, in [`ExitReason::slot`] order.
pub type ExitTimesSnapshot = [(u64, u64); COUNTED_REASONS];

impl ExitTimes {
    pub const fn new() -> Self {
        Self(
            [const {
                GuestExitTimes(
                    [const {
                        Account {
                            count: AtomicU64::new(0),
                            cycles: AtomicU64::new(0),
                        }
                    }; COUNTED_REASONS],
                )
            }; MAX_GUESTS],
        )
    }

    /// Guest `guest`'s accounts on this core (`None` for a guest id past the table): a vCPU
    /// looks them up once and records every exit there.
    pub fn of_guest(&self, guest: u8) -> Option<&GuestExitTimes> {
        self.0.get(usize::from(guest))
    }

    /// Guest `guest`'s accounts on this core; zeros for an unknown guest.
    pub fn snapshot(&self, guest: u8) -> ExitTimesSnapshot {
        let Some(GuestExitTimes(row)) = self.of_guest(guest) else {
            return [(0, 0); COUNTED_REASONS];
        };
        core::array::from_fn(|slot| {
            (
                row[slot].count.load(Ordering::Relaxed),
                row[slot].cycles.load(Ordering::Relaxed),
            )
        })
    }
}

impl GuestExitTimes {
    /// Adds one exit of the reason in counter slot `slot` that took `cycles` (the owning core
    /// only).
    #[inline(always)]
    pub fn record(&self, slot: usize, cycles: u64) {
        let Some(account) = self.0.get(slot) else {
            return;
        };
        // Single writer: a load and a store are enough, and cost less than a locked add.
        let count = account.count.load(Ordering::Relaxed);
        account.count.store(count + 1, Ordering::Relaxed);
        let spent = account.cycles.load(Ordering::Relaxed);
        account
            .cycles
            .store(spent.wrapping_add(cycles), Ordering::Relaxed);
    }
}

impl Default for ExitTimes {
    fn default() -> Self {
        Self::new()
    }
}

/// The stable name of counter slot `slot` (see [`ExitReason::slot`]).
pub fn reason_name(slot: usize) -> &'static str {
    REASON_NAMES.get(slot).copied().unwrap_or("other")
}

const REASON_NAMES: [&str; COUNTED_REASONS] = [
    "exception_or_nmi",
    "external_interrupt",
    "triple_fault",
    "init",
    "sipi",
    "cpuid",
    "hlt",
    "vmcall",
    "cr_access",
    "io_instruction",
    "rdmsr",
    "wrmsr",
    "invalid_guest_state",
    "ept_violation",
    "ept_misconfiguration",
    "preemption_timer",
    "xsetbv",
    "other",
];

/// Exit qualification of a control-register access (SDM Vol. 3C Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CR`cr` from general-purpose register `gpr` (0 = RAX .. 15 = R15).
    MovTo {
        cr: u8,
        gpr: u8,
    },
    MovFrom {
        cr: u8,
        gpr: u8,
    },
    Clts,
    Lmsw {
        source_data: u16,
    },
}

impl CrAccess {
    pub fn decode(qualification: u64) -> Self {
        let cr = (qualification & 0xf) as u8;
        let gpr = ((qualification >> 8) & 0xf) as u8;
        match (qualification >> 4) & 3 {
            0 => Self::MovTo { cr, gpr },
            1 => Self::MovFrom { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw {
                source_data: (qualification >> 16) as u16,
            },
        }
    }
}

/// Exit qualification of an I/O instruction (SDM Vol. 3C Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub is_in: bool,
    /// INS/OUTS: the hypervisor never emulates string I/O.
    pub string: bool,
}

impl IoAccess {
    pub fn decode(qualification: u64) -> Self {
        Self {
            port: (qualification >> 16) as u16,
            size: (qualification & 7) as u8 + 1,
            is_in: qualification & (1 << 3) != 0,
            string: qualification & (1 << 4) != 0,
        }
    }
}

/// Exit qualification of an EPT violation (SDM Vol. 3C Table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolation {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// The guest-physical address was mapped with some access (vs. not present at all).
    pub mapped: bool,
}

impl EptViolation {
    pub fn decode(qualification: u64) -> Self {
        Self {
            read: qualification & 1 != 0,
            write: qualification & 2 != 0,
            fetch: qualification & 4 != 0,
            mapped: qualification & (7 << 3) != 0,
        }
    }

    pub fn kind(&self) -> &'static str {
        match (self.fetch, self.write) {
            (true, _) => "fetch",
            (false, true) => "write",
            (false, false) => "read",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_to_distinct_slots() {
        let mut seen = [false; COUNTED_REASONS];
        for basic in 0..70u16 {
            let (slot, name) = ExitReason::from_basic(basic).slot();
            assert_eq!(REASON_NAMES[slot], name);
            seen[slot] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn exit_times_add_up_per_guest_and_reason() {
        let times = ExitTimes::new();
        let cpuid = ExitReason::Cpuid.slot().0;
        let hlt = ExitReason::Hlt.slot().0;
        times.of_guest(1).unwrap().record(cpuid, 100);
        times.of_guest(1).unwrap().record(cpuid, 50);
        times.of_guest(0).unwrap().record(hlt, 7);
        // A guest id past the table has no accounts; a slot past the reasons is ignored.
        assert!(times.of_guest(MAX_GUESTS as u8).is_none());
        times.of_guest(0).unwrap().record(COUNTED_REASONS, 7);
        let linux = times.snapshot(1);
        assert_eq!(linux[ExitReason::Cpuid.slot().0], (2, 150));
        assert_eq!(linux[ExitReason::Hlt.slot().0], (0, 0));
        assert_eq!(times.snapshot(0)[ExitReason::Hlt.slot().0], (1, 7));
        assert_eq!(times.snapshot(9), [(0, 0); COUNTED_REASONS]);
        assert_eq!(reason_name(ExitReason::Hlt.slot().0), "hlt");
    }

    #[test]
    fn counters_count() {
        let counters = ExitCounters::new();
        counters.count(ExitReason::Cpuid.slot().0);
        counters.count(ExitReason::Cpuid.slot().0);
        counters.count(ExitReason::Other(99).slot().0);
        counters.count(COUNTED_REASONS);
        let snapshot = counters.snapshot();
        let v: std::vec::Vec<_> = snapshot.nonzero().collect();
        assert_eq!(v, [("cpuid", 2), ("other", 1)]);
        assert_eq!(snapshot.total(), 3);
    }

    #[test]
    fn decodes_qualifications() {
        assert_eq!(
            CrAccess::decode(0x0000_0304),
            CrAccess::MovTo { cr: 4, gpr: 3 }
        );
        assert_eq!(
            CrAccess::decode(0x0000_0013),
            CrAccess::MovFrom { cr: 3, gpr: 0 }
        );
        let io = IoAccess::decode((0x3f8 << 16) | (1 << 3));
        assert_eq!(
            io,
            IoAccess {
                port: 0x3f8,
                size: 1,
                is_in: true,
                string: false
            }
        );
        let v = EptViolation::decode(0b10);
        assert_eq!((v.kind(), v.mapped), ("write", false));
        assert_eq!(EptViolation::decode(0b100 | (1 << 3)).kind(), "fetch");
    }
}

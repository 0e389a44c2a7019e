//! Which of a guest's writes to its x2APIC ICR (Intel SDM Vol. 3A §11.12.9, the fields
//! of §11.6.1) the hypervisor carries out. Pure: the decision depends only on the ICR
//! value, the sender and the core manager's view of the target, so it is host-tested.
//!
//! A guest's x2APIC IDs are core indices (the hypervisor virtualizes the ID register).
//! Only physical destinations are accepted, and only cores of the sender:
//! - fixed interrupts (vectors 32..=255: 0..=31 are exceptions, SDM Vol. 3A §7.2) and
//!   NMIs reach cores where the sender's vCPUs run (`Owned` or `Releasing`), or the
//!   sender's own core through the self shorthand;
//! - INIT and STARTUP reach cores granted to the sender, where they are emulated;
//! - broadcasts, logical destinations, lowest priority, SMI and the reserved delivery
//!   modes could reach cores of others or the platform: refused.

use vmcall_proto::hypercall::CoreState;

use crate::cores::CoreWord;

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u64 = 8;
const LOGICAL_DESTINATION: u64 = 1 << 11;
const LEVEL_ASSERT: u64 = 1 << 14;
const SHORTHAND_SHIFT: u64 = 18;

/// The first vector an interrupt may use: 0..=31 are the processor's exceptions.
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;

/// Delivery modes (ICR bits 8..=10).
const FIXED: u64 = 0;
const NMI: u64 = 4;
const INIT: u64 = 5;
const STARTUP: u64 = 6;

/// What to do with one ICR write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiDecision {
    /// Send this ICR value (destination still a core index, see [`Self::Send`]'s `core`)
    /// unchanged but for the destination: rebuilt from the checked fields only.
    Send {
        core: Option<usize>,
        icr_low: u32,
    },
    /// INIT to a core granted to the sender: emulated (the core is not reset; it awaits a
    /// STARTUP IPI again).
    Init {
        core: usize,
    },
    /// INIT level de-assert: no effect on current processors (SDM Vol. 3A §11.6.1).
    Ignore,
    /// STARTUP to a core granted to the sender: its vCPU starts at `vector << 12` if the
    /// core awaits a STARTUP (a granted core does, with or without an INIT first).
    Startup {
        core: usize,
        vector: u8,
    },
    Refuse(IpiRefusal),
}

/// Why an ICR write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiRefusal {
    /// All-including-self or all-excluding-self shorthand.
    Broadcast,
    LogicalDestination,
    /// Lowest priority, SMI or a reserved delivery mode.
    DeliveryMode(u8),
    /// A fixed interrupt with an exception vector.
    Vector(u8),
    /// The self shorthand with anything but a fixed interrupt (SDM Vol. 3A §11.6.1).
    SelfNotFixed,
    /// The destination is not a core of the sender (another guest's, the hypervisor's,
    /// or none).
    NotOwner,
    /// A fixed interrupt or NMI to a core of the sender where its vCPU does not run.
    NotRunning,
}

impl IpiRefusal {
    /// A short name for markers and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Broadcast => "broadcast",
            Self::LogicalDestination => "logical_destination",
            Self::DeliveryMode(_) => "delivery_mode",
            Self::Vector(_) => "exception_vector",
            Self::SelfNotFixed => "self_not_fixed",
            Self::NotOwner => "not_owner",
            Self::NotRunning => "not_running",
        }
    }
}

/// Decides an ICR write of guest `sender`; `word` is the core manager's view of a core
/// (`None` for a core index that does not exist).
#[inline]
pub fn decide(icr: u64, sender: u8, word: impl Fn(usize) -> Option<CoreWord>) -> IpiDecision {
    let vector = (icr & VECTOR_MASK) as u8;
    let mode = (icr >> DELIVERY_MODE_SHIFT) & 7;
    let fixed_low = |mode: u64| {
        let vector = if mode == FIXED { u64::from(vector) } else { 0 };
        (vector | mode << DELIVERY_MODE_SHIFT | LEVEL_ASSERT) as u32
    };
    match (icr >> SHORTHAND_SHIFT) & 3 {
        0 => {}
        1 if mode != FIXED => return IpiDecision::Refuse(IpiRefusal::SelfNotFixed),
        1 if vector < FIRST_INTERRUPT_VECTOR => {
            return IpiDecision::Refuse(IpiRefusal::Vector(vector))
        }
        1 => {
            return IpiDecision::Send {
                core: None,
                icr_low: fixed_low(FIXED) | 1 << SHORTHAND_SHIFT,
            }
        }
        _ => return IpiDecision::Refuse(IpiRefusal::Broadcast),
    }
    if icr & LOGICAL_DESTINATION != 0 {
        return IpiDecision::Refuse(IpiRefusal::LogicalDestination);
    }
    let core = (icr >> 32) as usize;
    let Some(target) = word(core).filter(|w| w.owner == Some(sender)) else {
        return IpiDecision::Refuse(IpiRefusal::NotOwner);
    };
    let running = target.runs(sender);
    match mode {
        FIXED if vector < FIRST_INTERRUPT_VECTOR => IpiDecision::Refuse(IpiRefusal::Vector(vector)),
        FIXED | NMI if running => IpiDecision::Send {
            core: Some(core),
            icr_low: fixed_low(mode),
        },
        FIXED | NMI => IpiDecision::Refuse(IpiRefusal::NotRunning),
        INIT if icr & LEVEL_ASSERT == 0 => IpiDecision::Ignore,
        // INIT and STARTUP to a core already running: the second STARTUP of the SDM's
        // sequence (Vol. 3A §9.4.4.1) finds the core started, as on hardware.
        INIT | STARTUP if target.state != CoreState::Granted => IpiDecision::Ignore,
        INIT => IpiDecision::Init { core },
        STARTUP => IpiDecision::Startup { core, vector },
        // Lowest priority, SMI and the reserved modes 3 and 7.
        _ => IpiDecision::Refuse(IpiRefusal::DeliveryMode(mode as u8)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cores::{CoreManager, Reason, Requester};

    /// Guest 0 runs on core 1, holds core 2 granted; guest 1 runs on core 3; core 0 is
    /// the hypervisor's.
    fn machine() -> CoreManager<4> {
        let m = CoreManager::new();
        let by = Requester::Config;
        for (core, guest, enter) in [(1, 0, true), (2, 0, false), (3, 1, true)] {
            let g = m.grant(core, guest, by, Reason::Boot, 0).unwrap();
            if enter {
                m.enter(core, guest, g, 0).unwrap();
            }
        }
        m
    }

    fn decide_on(m: &CoreManager<4>, icr: u64) -> IpiDecision {
        decide(icr, 0, |c| (c < 4).then(|| m.word(c)))
    }

    fn to(core: u64, low: u64) -> u64 {
        core << 32 | low
    }

    #[test]
    fn fixed_and_nmi_reach_only_the_senders_running_cores() {
        let m = machine();
        assert_eq!(
            decide_on(&m, to(1, 0x4030)),
            IpiDecision::Send {
                core: Some(1),
                icr_low: 0x4030
            }
        );
        // Trigger mode and other stray bits are not carried over.
        assert_eq!(
            decide_on(&m, to(1, 0xc030)),
            IpiDecision::Send {
                core: Some(1),
                icr_low: 0x4030
            }
        );
        assert_eq!(
            decide_on(&m, to(1, 0x4400 | 0x55)),
            IpiDecision::Send {
                core: Some(1),
                icr_low: 0x4400
            }
        );
        let refused = |r| IpiDecision::Refuse(r);
        assert_eq!(decide_on(&m, to(2, 0x30)), refused(IpiRefusal::NotRunning));
        assert_eq!(decide_on(&m, to(3, 0x30)), refused(IpiRefusal::NotOwner));
        assert_eq!(decide_on(&m, to(0, 0x30)), refused(IpiRefusal::NotOwner));
        assert_eq!(decide_on(&m, to(99, 0x30)), refused(IpiRefusal::NotOwner));
        assert_eq!(
            decide_on(&m, to(1, 0x1f)),
            refused(IpiRefusal::Vector(0x1f))
        );
        assert_eq!(
            decide_on(&m, to(1, 0x200)),
            refused(IpiRefusal::DeliveryMode(2))
        );
        assert_eq!(
            decide_on(&m, to(1, 0x130)),
            refused(IpiRefusal::DeliveryMode(1))
        );
        assert_eq!(
            decide_on(&m, to(1, 0x330)),
            refused(IpiRefusal::DeliveryMode(3))
        );
        assert_eq!(
            decide_on(&m, to(1, 0x830)),
            refused(IpiRefusal::LogicalDestination)
        );
        assert_eq!(decide_on(&m, 0x8_0030), refused(IpiRefusal::Broadcast));
        assert_eq!(decide_on(&m, 0xc_0030), refused(IpiRefusal::Broadcast));
    }

    #[test]
    fn self_ipis_are_fixed_with_interrupt_vectors() {
        let m = machine();
        assert_eq!(
            decide_on(&m, 0x4_4040),
            IpiDecision::Send {
                core: None,
                icr_low: 0x4_4040
            }
        );
        assert_eq!(
            decide_on(&m, 0x4_0002),
            IpiDecision::Refuse(IpiRefusal::Vector(2))
        );
        assert_eq!(
            decide_on(&m, 0x4_0400),
            IpiDecision::Refuse(IpiRefusal::SelfNotFixed)
        );
    }

    #[test]
    fn init_and_startup_only_to_granted_cores_of_the_sender() {
        let m = machine();
        assert_eq!(decide_on(&m, to(2, 0x4500)), IpiDecision::Init { core: 2 });
        assert_eq!(decide_on(&m, to(2, 0x0500)), IpiDecision::Ignore);
        assert_eq!(
            decide_on(&m, to(2, 0x4608)),
            IpiDecision::Startup { core: 2, vector: 8 }
        );
        // Already running: a second STARTUP, or an INIT, does nothing.
        assert_eq!(decide_on(&m, to(1, 0x4608)), IpiDecision::Ignore);
        assert_eq!(decide_on(&m, to(1, 0x4500)), IpiDecision::Ignore);
        // Another guest's core, or the hypervisor's.
        assert_eq!(
            decide_on(&m, to(3, 0x4500)),
            IpiDecision::Refuse(IpiRefusal::NotOwner)
        );
        assert_eq!(
            decide_on(&m, to(0, 0x4608)),
            IpiDecision::Refuse(IpiRefusal::NotOwner)
        );
    }

    /// Carries out ICR writes of guest 0 as the VM-exit handler does (`send_ipi`): the
    /// generations of the starts posted.
    fn starts(m: &CoreManager<4>, icrs: &[u64]) -> Vec<u32> {
        icrs.iter()
            .filter_map(|&icr| match decide_on(m, icr) {
                IpiDecision::Init { core } => m.init(core, 0).err().map(|_| u32::MAX),
                IpiDecision::Startup { core, .. } => m.startup(core, 0, 1).ok(),
                _ => None,
            })
            .collect()
    }

    /// A granted core starts on a STARTUP IPI alone (Lavender's bring-up) or on INIT,
    /// STARTUP, STARTUP (Linux's), once either way: the second STARTUP is ignored.
    #[test]
    fn one_start_per_grant_with_or_without_init() {
        let generation = |m: &CoreManager<4>| m.word(2).generation;
        let m = machine();
        assert_eq!(starts(&m, &[to(2, 0x4608)]), [generation(&m)]);
        let m = machine();
        let linux = [to(2, 0x4500), to(2, 0x0500), to(2, 0x4608), to(2, 0x4608)];
        assert_eq!(starts(&m, &linux), [generation(&m)]);
        // An INIT after a start makes the core await a STARTUP again.
        assert_eq!(
            starts(&m, &[to(2, 0x4608), to(2, 0x4500), to(2, 0x4608)]),
            [generation(&m)]
        );
    }
}

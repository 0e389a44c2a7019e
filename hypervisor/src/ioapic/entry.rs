//! One redirection-table entry of the I/O APIC (82093AA datasheet §3.2.4; the layout every
//! x86 IOAPIC keeps) and the decision whether, and how, a guest's entry may reach the
//! hardware.
//!
//! A guest names destinations by its own APIC IDs, which are core indices (the hypervisor
//! reports `vcpu.core` as the x2APIC ID). The hardware needs the physical APIC ID of that
//! core, and the core must be one the guest runs on now: anything else would interrupt
//! another partition or a core parked in the hypervisor.

use crate::platform::MAX_CPUS;

/// Bits of the low half.
const VECTOR: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE: u64 = 0b111 << DELIVERY_MODE_SHIFT;
const LOGICAL_DESTINATION: u64 = 1 << 11;
/// Delivery status (bit 12) and remote IRR (bit 14) are read-only: the hardware's.
pub const READ_ONLY: u64 = (1 << 12) | (1 << 14);
pub const MASKED: u64 = 1 << 16;
/// Trigger mode: level (1) or edge (0).
pub const LEVEL_TRIGGERED: u64 = 1 << 15;
/// The destination field, bits 63:56 (physical mode: an APIC ID).
const DESTINATION_SHIFT: u32 = 56;

/// The first vector that is not an exception (SDM Vol. 3A §6.2): 0..31 are the CPU's, and
/// on a core in the hypervisor 16..31 would run its exception handlers.
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;

/// Delivery modes (82093AA §3.2.4, bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    ExtInt,
    Reserved(u8),
}

impl DeliveryMode {
    fn from_bits(bits: u8) -> Self {
        match bits {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            7 => Self::ExtInt,
            other => Self::Reserved(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::LowestPriority => "lowest_priority",
            Self::Smi => "smi",
            Self::Nmi => "nmi",
            Self::Init => "init",
            Self::ExtInt => "extint",
            Self::Reserved(_) => "reserved",
        }
    }
}

/// A 64-bit redirection-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectionEntry(pub u64);

impl RedirectionEntry {
    /// What the IOAPIC holds after reset: masked, everything else zero.
    pub const MASKED: Self = Self(MASKED);

    pub fn vector(self) -> u8 {
        (self.0 & VECTOR) as u8
    }

    pub fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits(((self.0 & DELIVERY_MODE) >> DELIVERY_MODE_SHIFT) as u8)
    }

    pub fn is_logical(self) -> bool {
        self.0 & LOGICAL_DESTINATION != 0
    }

    pub fn is_level_triggered(self) -> bool {
        self.0 & LEVEL_TRIGGERED != 0
    }

    pub fn is_masked(self) -> bool {
        self.0 & MASKED != 0
    }

    pub fn destination(self) -> u8 {
        (self.0 >> DESTINATION_SHIFT) as u8
    }

    pub fn low(self) -> u32 {
        self.0 as u32
    }

    pub fn high(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub fn with_low(self, low: u32) -> Self {
        Self((self.0 & !0xffff_ffff) | u64::from(low))
    }

    pub fn with_high(self, high: u32) -> Self {
        Self((self.0 & 0xffff_ffff) | (u64::from(high) << 32))
    }
}

/// Why an entry the guest unmasked does not reach the hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Vectors 0..31 are exceptions: on a core in the hypervisor they would run its
    /// exception handlers.
    ExceptionVector(u8),
    /// SMI, NMI, INIT, ExtINT and the reserved modes reach past the guest's IDT (INIT
    /// resets the core).
    DeliveryMode(DeliveryMode),
    /// Logical destinations name sets of cores the hypervisor cannot confine.
    LogicalDestination,
    /// The destination is not a core the guest runs on now.
    NotOwnersCore(u8),
    /// The core's physical APIC ID does not fit the 8-bit destination field.
    UnaddressableCore(u8),
}

impl Refusal {
    /// A short name for markers and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::ExceptionVector(_) => "exception_vector",
            Self::DeliveryMode(_) => "delivery_mode",
            Self::LogicalDestination => "logical_destination",
            Self::NotOwnersCore(_) => "not_owners_core",
            Self::UnaddressableCore(_) => "unaddressable_core",
        }
    }
}

/// Which cores a guest runs on now, and where they are physically.
pub trait Topology {
    /// Bit `i` set: the guest runs on core `i` (it owns it, or is giving it back and has not
    /// left it yet).
    fn current_cores(&self) -> u64;
    /// The physical APIC ID of core `core`.
    fn physical_apic_id(&self, core: usize) -> u32;
}

/// A guest entry as the hardware gets it: which core it interrupts and the entry itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub core: usize,
    pub hardware: RedirectionEntry,
}

/// Checks an unmasked (or about to be unmasked) guest entry and translates it for the
/// hardware: fixed delivery, a vector >= 32, physical destination mode, a destination
/// the guest runs on now, rewritten to that core's physical APIC ID. Lowest-priority
/// delivery to one core is fixed delivery to it. Trigger mode and polarity pass as they
/// are; the read-only bits are cleared.
pub fn route(entry: RedirectionEntry, cores: &impl Topology) -> Result<Route, Refusal> {
    match entry.delivery_mode() {
        DeliveryMode::Fixed | DeliveryMode::LowestPriority => {}
        other => return Err(Refusal::DeliveryMode(other)),
    }
    if entry.vector() < FIRST_INTERRUPT_VECTOR {
        return Err(Refusal::ExceptionVector(entry.vector()));
    }
    if entry.is_logical() {
        return Err(Refusal::LogicalDestination);
    }
    let core = usize::from(entry.destination());
    if core >= MAX_CPUS || cores.current_cores() & (1 << core) == 0 {
        return Err(Refusal::NotOwnersCore(entry.destination()));
    }
    retarget_to(entry, core, cores).ok_or(Refusal::UnaddressableCore(entry.destination()))
}

/// `entry` (already checked by `route`) sent to core `core` instead.
fn retarget_to(entry: RedirectionEntry, core: usize, cores: &impl Topology) -> Option<Route> {
    let physical = u8::try_from(cores.physical_apic_id(core)).ok()?;
    let low = entry.0 & 0xffff_ffff & !(DELIVERY_MODE | READ_ONLY);
    Some(Route {
        core,
        hardware: RedirectionEntry(low | (u64::from(physical) << DESTINATION_SHIFT)),
    })
}

/// Re-targets a routed entry whose core has left the guest: to the guest's lowest current
/// core, or `None` when it runs on none (the entry must then be masked in the hardware).
pub fn retarget(entry: RedirectionEntry, cores: &impl Topology) -> Option<Route> {
    let current = cores.current_cores();
    let core = (0..MAX_CPUS).find(|c| current & (1 << c) != 0)?;
    retarget_to(entry, core, cores)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Cores `current` of a guest; physical APIC IDs are `core * 2 + 1` (anything but the
    /// identity, so a missing translation shows).
    pub struct FakeTopology {
        pub current: u64,
    }

    impl Topology for FakeTopology {
        fn current_cores(&self) -> u64 {
            self.current
        }
        fn physical_apic_id(&self, core: usize) -> u32 {
            if core == 15 {
                300
            } else {
                core as u32 * 2 + 1
            }
        }
    }

    pub fn fixed(vector: u8, destination: u8) -> RedirectionEntry {
        RedirectionEntry(u64::from(vector) | (u64::from(destination) << 56))
    }

    #[test]
    fn fixed_entry_to_a_current_core_is_translated_to_its_physical_apic_id() {
        let cores = FakeTopology { current: 0b1010 };
        // Level-triggered, active low: those bits pass.
        let entry = RedirectionEntry(fixed(0x31, 3).0 | (1 << 15) | (1 << 13));
        let route = route(entry, &cores).unwrap();
        assert_eq!(route.core, 3);
        assert_eq!(route.hardware.destination(), 7);
        assert_eq!(route.hardware.vector(), 0x31);
        assert_eq!(route.hardware.0 & 0xffff_ffff, 0x31 | (1 << 15) | (1 << 13));
    }

    #[test]
    fn lowest_priority_becomes_fixed_to_that_core_and_read_only_bits_are_dropped() {
        let cores = FakeTopology { current: 0b10 };
        let entry = RedirectionEntry(fixed(0x40, 1).0 | (1 << 8) | READ_ONLY);
        let route = route(entry, &cores).unwrap();
        assert_eq!(route.hardware.delivery_mode(), DeliveryMode::Fixed);
        assert_eq!(route.hardware.0 & READ_ONLY, 0);
        assert_eq!(route.hardware.destination(), 3);
    }

    #[test]
    fn exception_vectors_are_refused() {
        let cores = FakeTopology { current: 0b10 };
        for vector in [0, 2, 16, 18, 31] {
            assert_eq!(
                route(fixed(vector, 1), &cores),
                Err(Refusal::ExceptionVector(vector))
            );
        }
        assert!(route(fixed(32, 1), &cores).is_ok());
    }

    #[test]
    fn delivery_modes_past_the_idt_are_refused() {
        let cores = FakeTopology { current: 0b10 };
        for (bits, mode) in [
            (2, DeliveryMode::Smi),
            (3, DeliveryMode::Reserved(3)),
            (4, DeliveryMode::Nmi),
            (5, DeliveryMode::Init),
            (6, DeliveryMode::Reserved(6)),
            (7, DeliveryMode::ExtInt),
        ] {
            let entry = RedirectionEntry(fixed(0x40, 1).0 | (bits << 8));
            assert_eq!(route(entry, &cores), Err(Refusal::DeliveryMode(mode)));
        }
    }

    #[test]
    fn other_partitions_cores_and_logical_destinations_are_refused() {
        let cores = FakeTopology { current: 0b10 };
        assert_eq!(
            route(fixed(0x40, 2), &cores),
            Err(Refusal::NotOwnersCore(2))
        );
        // Beyond the machine's cores, and the broadcast ID.
        assert_eq!(
            route(fixed(0x40, 200), &cores),
            Err(Refusal::NotOwnersCore(200))
        );
        assert_eq!(
            route(fixed(0x40, 0xff), &cores),
            Err(Refusal::NotOwnersCore(0xff))
        );
        let logical = RedirectionEntry(fixed(0x40, 1).0 | (1 << 11));
        assert_eq!(route(logical, &cores), Err(Refusal::LogicalDestination));
    }

    #[test]
    fn a_core_whose_apic_id_does_not_fit_is_refused() {
        let cores = FakeTopology { current: 1 << 15 };
        assert_eq!(
            route(fixed(0x40, 15), &cores),
            Err(Refusal::UnaddressableCore(15))
        );
    }

    #[test]
    fn retarget_picks_the_lowest_current_core_or_none() {
        let entry = fixed(0x40, 1);
        let route = retarget(entry, &FakeTopology { current: 0b1100 }).unwrap();
        assert_eq!((route.core, route.hardware.destination()), (2, 5));
        assert_eq!(retarget(entry, &FakeTopology { current: 0 }), None);
    }
}

//! The mediated I/O APIC. The guest that owns the IOAPIC device sees its register page,
//! but the page is not mapped in that guest's EPT: every access exits, and the hypervisor
//! emulates it here against a shadow of the redirection table. An entry reaches the
//! hardware only when `entry::route` accepts it, translated to the physical APIC ID of a
//! core the guest runs on; a refused entry stays masked in the hardware. When a core
//! leaves the guest, entries aimed at it are re-targeted to a core the guest keeps (or
//! masked when it keeps none).
//!
//! A guest moves a live entry to another CPU in two writes, the high half (the new
//! destination) and then the low half (the vector it allocated on that CPU): Linux's
//! `__ioapic_write_entry`. In between, the entry names the new CPU with the old CPU's
//! vector, which the new CPU has no handler for; an edge that fires then is lost (Linux
//! counts it as spurious). On hardware the gap is two MMIO writes; here each write is a VM
//! exit, tens of microseconds under Bochs; Linux's console stalled for good as it took CPUs
//! offline, most likely on a UART transmit interrupt lost this way. So a high-half write
//! that changes a live entry's destination leaves the entry masked in the hardware
//! (`held`) until the guest writes its low half, or another entry; the IOAPIC keeps an
//! edge that comes while its pin is masked and delivers it at the unmask (Bochs does; an
//! 82093AA drops it, as it would during the mask every reprogramming starts with).
//!
//! The register interface (82093AA datasheet §3.1): the index register IOREGSEL at
//! offset 0x00 selects a register, read and written through the window IOWIN at 0x10;
//! IOAPICs of version 0x20 and later also have an EOI register at 0x40. Registers: 0x00
//! ID, 0x01 version (bits 23:16: the highest entry's index), 0x02 arbitration, and from
//! 0x10 two per redirection entry (low half, then high half).
//!
//! **The EOI register, always.** A level-triggered entry's interrupt that reaches a CPU as
//! an edge (its local APIC's trigger-mode bit clear, so the CPU's EOI does not reach the
//! IOAPIC) must be ended at the IOAPIC by the guest. Every interrupt the hypervisor raises
//! on a virtual pin arrives so (it is an IPI), and Linux routes the doorbell device's INTx
//! level-triggered, as PCI wants. Linux ends it through the EOI register of an IOAPIC of
//! version 0x20 or later, and otherwise by rewriting the entry masked and edge-triggered,
//! then as it was (`__eoi_ioapic_pin`): a read and two writes of the entry, a dozen VM
//! exits per doorbell (about 12 µs each under Bochs, whose IOAPIC is version 0x11), and
//! the doorbell's route masked in between. So the guest sees a version of at
//! least 0x20 and its EOI register: an EOI for a vector ends it in the hardware (the
//! hardware's own EOI register, or the same mask-and-edge rewrite done here, without
//! exits) on the live level-triggered entries that carry it; virtual pins, always masked
//! in the hardware, need nothing.
//!
//! This part is pure logic over a `Registers` trait (the hardware on the machine, a fake
//! in tests); `vcpu::ioapic_access` wires it to VM exits.

pub mod entry;

use entry::{RedirectionEntry, Refusal, Route, Topology, READ_ONLY};

/// Offsets of the registers in the MMIO page.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const EOI: u64 = 0x40;

const REGISTER_ID: u8 = 0x00;
const REGISTER_VERSION: u8 = 0x01;
const REGISTER_ARBITRATION: u8 = 0x02;
const REGISTER_FIRST_ENTRY: u8 = 0x10;

/// The first IOAPIC version with an EOI register.
const VERSION_WITH_EOI: u32 = 0x20;

/// Most redirection entries an IOAPIC can have: the register index is 8 bits, so entries
/// end at register 0xff.
pub const MAX_PINS: usize = (256 - REGISTER_FIRST_ENTRY as usize) / 2;

/// The IOAPIC's registers, by index (through IOREGSEL/IOWIN), and its EOI register.
pub trait Registers {
    fn read(&mut self, index: u8) -> u32;
    fn write(&mut self, index: u8, value: u32);
    fn eoi(&mut self, vector: u8);
}

/// An access the mediator does not emulate: only aligned 32-bit accesses to the three
/// register offsets exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedOffset(pub u64);

/// An entry the guest wrote that did not reach the hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub pin: usize,
    pub entry: RedirectionEntry,
    pub refusal: Refusal,
}

/// An entry moved off a core that left the guest: to `to`, or masked (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retargeted {
    pub pin: usize,
    pub from: usize,
    pub to: Option<usize>,
}

/// The guest's view of the IOAPIC and which core each of its live entries interrupts.
pub struct Mediator {
    /// The hardware's version register (bits 23:16: the highest entry's index).
    version: u32,
    pins: usize,
    /// The guest's IOREGSEL.
    select: u8,
    /// Each entry as the guest wrote it (its APIC IDs, its delivery mode).
    shadow: [RedirectionEntry; MAX_PINS],
    /// The core each entry interrupts in the hardware, when it is unmasked there.
    routed: [Option<usize>; MAX_PINS],
    /// Pins whose interrupts the hypervisor raises itself (bit `pin`): their entries are
    /// checked and routed like any other, but the hardware entry stays masked, so a device
    /// wired to the physical pin reaches no guest ([`Mediator::virtual_route`]).
    virtual_pins: u128,
    /// Pins whose live entry's destination the guest has just rewritten (bit `pin`): masked
    /// in the hardware until it writes the low half (see the module's comment).
    held: u128,
}

impl Mediator {
    /// Takes the IOAPIC over: reads its size and masks every entry, so nothing the
    /// firmware left programmed fires before the guest sets it up.
    pub fn new(hw: &mut impl Registers) -> Self {
        let version = hw.read(REGISTER_VERSION);
        let pins = (usize::from((version >> 16) as u8) + 1).min(MAX_PINS);
        let mut mediator = Self {
            version,
            pins,
            select: 0,
            shadow: [RedirectionEntry::MASKED; MAX_PINS],
            routed: [None; MAX_PINS],
            virtual_pins: 0,
            held: 0,
        };
        for pin in 0..pins {
            mediator.program(hw, pin, RedirectionEntry::MASKED);
        }
        mediator
    }

    pub fn pins(&self) -> usize {
        self.pins
    }

    /// Makes `pin` one the hypervisor raises itself (a virtual device's interrupt line); a pin
    /// beyond this IOAPIC's entries is ignored.
    pub fn with_virtual_pin(mut self, pin: usize) -> Self {
        if pin < self.pins {
            self.virtual_pins |= 1 << pin;
        }
        self
    }

    /// Where an interrupt raised on virtual pin `pin` goes: the core the guest's entry names
    /// (checked by `entry::route` when it was written) and its vector; `None` while the entry
    /// is masked, refused or its core has left the guest. Only edge-triggered delivery is
    /// modelled: the caller sends the vector to that core as a fixed interrupt.
    pub fn virtual_route(&self, pin: usize) -> Option<(usize, u8)> {
        if pin >= self.pins || self.virtual_pins & (1 << pin) == 0 {
            return None;
        }
        self.routed[pin].map(|core| (core, self.shadow[pin].vector()))
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The version register as the guest reads it: the hardware's, with an EOI register
    /// (see the module's comment).
    fn guest_version(&self) -> u32 {
        (self.version & !0xff) | (self.version & 0xff).max(VERSION_WITH_EOI)
    }

    /// The guest's EOI for `vector`: ends it on the live level-triggered entries that
    /// carry it, in the hardware.
    fn end_of_interrupt(&mut self, vector: u8, hw: &mut impl Registers) {
        if self.version & 0xff >= VERSION_WITH_EOI {
            // Only entries of this guest carry its vectors: the EOI reaches no one else's.
            hw.eoi(vector);
            return;
        }
        for pin in 0..self.pins {
            let guest = self.shadow[pin];
            if self.routed[pin].is_none()
                || self.virtual_pins & (1 << pin) != 0
                || !guest.is_level_triggered()
                || guest.vector() != vector
            {
                continue;
            }
            // Edge-triggered clears remote IRR (what Linux does on these IOAPICs); masked
            // meanwhile, so the pin's level does not fire an edge.
            let low = REGISTER_FIRST_ENTRY + 2 * pin as u8;
            let live = hw.read(low);
            let ending = (u64::from(live) | entry::MASKED) & !entry::LEVEL_TRIGGERED;
            hw.write(low, ending as u32);
            hw.write(low, live);
        }
    }

    /// A 32-bit read at `offset` in the register page.
    pub fn read(&mut self, offset: u64, hw: &mut impl Registers) -> Result<u32, UnsupportedOffset> {
        match offset {
            IOREGSEL => Ok(self.select.into()),
            IOWIN => Ok(match self.selected_entry() {
                Some((pin, false)) => {
                    // The read-only status bits are the hardware's (Linux polls remote IRR).
                    let live = u64::from(hw.read(self.select)) & READ_ONLY;
                    ((self.shadow[pin].0 & 0xffff_ffff & !READ_ONLY) | live) as u32
                }
                Some((pin, true)) => self.shadow[pin].high(),
                None => match self.select {
                    REGISTER_VERSION => self.guest_version(),
                    REGISTER_ID | REGISTER_ARBITRATION => hw.read(self.select),
                    _ => 0,
                },
            }),
            EOI => Ok(0),
            other => Err(UnsupportedOffset(other)),
        }
    }

    /// A 32-bit write of `value` at `offset`. Returns the entry refused, if the write
    /// completed one the hardware must not get.
    pub fn write(
        &mut self,
        offset: u64,
        value: u32,
        cores: &impl Topology,
        hw: &mut impl Registers,
    ) -> Result<Option<Refused>, UnsupportedOffset> {
        match offset {
            IOREGSEL => {
                self.select = value as u8;
                Ok(None)
            }
            IOWIN => Ok(match self.selected_entry() {
                Some((pin, high)) => {
                    // The guest has moved on from an entry it left half written: apply it as
                    // it stands.
                    let mut refused = None;
                    let others = self.held & !(1 << pin);
                    for other in (0..self.pins).filter(|&p| others & (1 << p) != 0) {
                        self.held &= !(1 << other);
                        refused = refused.or(self.apply(other, cores, hw));
                    }
                    let old = self.shadow[pin];
                    self.shadow[pin] = if high {
                        old.with_high(value)
                    } else {
                        old.with_low(value & !(READ_ONLY as u32))
                    };
                    if high && !old.is_masked() && old.high() != value {
                        self.held |= 1 << pin;
                        self.routed[pin] = None;
                        self.program(hw, pin, RedirectionEntry::MASKED);
                        refused
                    } else {
                        self.held &= !(1 << pin);
                        self.apply(pin, cores, hw).or(refused)
                    }
                }
                // The ID and the read-only registers are the platform's: writes are dropped.
                None => None,
            }),
            EOI => {
                self.end_of_interrupt(value as u8, hw);
                Ok(None)
            }
            other => Err(UnsupportedOffset(other)),
        }
    }

    /// Moves every live entry aimed at `leaving` to a core the guest keeps, or masks it in
    /// the hardware if it keeps none (the guest's shadow is unchanged: it is unmasked again
    /// when the guest next writes it with a destination it runs on).
    pub fn retarget(
        &mut self,
        leaving: usize,
        cores: &impl Topology,
        hw: &mut impl Registers,
        mut report: impl FnMut(Retargeted),
    ) {
        let remaining = Without {
            cores,
            core: leaving,
        };
        for pin in 0..self.pins {
            if self.routed[pin] != Some(leaving) {
                continue;
            }
            let to = match entry::retarget(self.shadow[pin], &remaining) {
                Some(route) => {
                    self.program(hw, pin, route.hardware);
                    self.routed[pin] = Some(route.core);
                    Some(route.core)
                }
                None => {
                    self.program(hw, pin, RedirectionEntry::MASKED);
                    self.routed[pin] = None;
                    None
                }
            };
            report(Retargeted {
                pin,
                from: leaving,
                to,
            });
        }
    }

    /// The entry IOREGSEL selects: its pin and whether the high half.
    fn selected_entry(&self) -> Option<(usize, bool)> {
        let index = usize::from(self.select.checked_sub(REGISTER_FIRST_ENTRY)?);
        (index / 2 < self.pins).then_some((index / 2, index % 2 == 1))
    }

    /// Brings the hardware entry of `pin` in line with the shadow.
    fn apply(
        &mut self,
        pin: usize,
        cores: &impl Topology,
        hw: &mut impl Registers,
    ) -> Option<Refused> {
        let guest = self.shadow[pin];
        let decision = entry::route(guest, cores);
        let (hardware, refused) = match decision {
            Ok(Route { core, hardware }) if !guest.is_masked() => {
                self.routed[pin] = Some(core);
                (hardware, None)
            }
            // Masked: the hardware gets the translated entry, still masked, when there is
            // one (the guest unmasks it next), else a plain masked entry.
            Ok(Route { hardware, .. }) => {
                self.routed[pin] = None;
                (RedirectionEntry(hardware.0 | entry::MASKED), None)
            }
            Err(_) if guest.is_masked() => {
                self.routed[pin] = None;
                (RedirectionEntry::MASKED, None)
            }
            Err(refusal) => {
                self.routed[pin] = None;
                let refused = Refused {
                    pin,
                    entry: guest,
                    refusal,
                };
                (RedirectionEntry::MASKED, Some(refused))
            }
        };
        self.program(hw, pin, hardware);
        refused
    }

    /// Writes an entry so that no half-written combination is ever live: masked first,
    /// then the destination, then the low half as it should be.
    fn program(&mut self, hw: &mut impl Registers, pin: usize, value: RedirectionEntry) {
        let value = if self.virtual_pins & (1 << pin) != 0 {
            RedirectionEntry(value.0 | entry::MASKED)
        } else {
            value
        };
        let low = REGISTER_FIRST_ENTRY + 2 * pin as u8;
        hw.write(low, value.low() | entry::MASKED as u32);
        hw.write(low + 1, value.high());
        if !value.is_masked() {
            hw.write(low, value.low());
        }
    }
}

/// A guest's cores but one (the core leaving it).
struct Without<'a, T> {
    cores: &'a T,
    core: usize,
}

impl<T: Topology> Topology for Without<'_, T> {
    fn current_cores(&self) -> u64 {
        self.cores.current_cores() & !(1 << self.core)
    }
    fn physical_apic_id(&self, core: usize) -> u32 {
        self.cores.physical_apic_id(core)
    }
}

#[cfg(test)]
mod tests {
    use super::entry::tests::{fixed, FakeTopology};
    use super::entry::DeliveryMode;
    use super::*;

    /// A 24-pin IOAPIC: its registers, and every write in order.
    struct FakeIoApic {
        registers: [u32; 256],
        writes: Vec<(u8, u32)>,
        eois: Vec<u8>,
    }

    impl FakeIoApic {
        fn new() -> Self {
            let mut registers = [0; 256];
            registers[1] = 0x0017_0011;
            // Firmware left pin 0 unmasked (ExtINT).
            registers[0x10] = 0x700;
            Self {
                registers,
                writes: Vec::new(),
                eois: Vec::new(),
            }
        }

        fn entry(&self, pin: usize) -> RedirectionEntry {
            RedirectionEntry(
                u64::from(self.registers[0x10 + 2 * pin])
                    | u64::from(self.registers[0x11 + 2 * pin]) << 32,
            )
        }
    }

    impl Registers for FakeIoApic {
        fn read(&mut self, index: u8) -> u32 {
            self.registers[usize::from(index)]
        }
        fn write(&mut self, index: u8, value: u32) {
            self.writes.push((index, value));
            self.registers[usize::from(index)] = value;
        }
        fn eoi(&mut self, vector: u8) {
            self.eois.push(vector);
        }
    }

    /// Writes a whole entry the way Linux does: high half, then low half. Returns what the
    /// low half's write refused (the high half's may refuse its mix with the old low half).
    fn guest_write(
        m: &mut Mediator,
        hw: &mut FakeIoApic,
        cores: &FakeTopology,
        pin: u8,
        entry: RedirectionEntry,
    ) -> Option<Refused> {
        m.write(IOREGSEL, u32::from(0x11 + 2 * pin), cores, hw)
            .unwrap();
        m.write(IOWIN, entry.high(), cores, hw).unwrap();
        m.write(IOREGSEL, u32::from(0x10 + 2 * pin), cores, hw)
            .unwrap();
        m.write(IOWIN, entry.low(), cores, hw).unwrap()
    }

    /// Writes only the high half (the destination) of pin `pin`'s entry to `entry`'s.
    fn guest_write_high(
        m: &mut Mediator,
        hw: &mut FakeIoApic,
        cores: &FakeTopology,
        pin: u8,
        entry: RedirectionEntry,
    ) {
        m.write(IOREGSEL, u32::from(0x11 + 2 * pin), cores, hw)
            .unwrap();
        m.write(IOWIN, entry.high(), cores, hw).unwrap();
    }

    fn guest_read(
        m: &mut Mediator,
        hw: &mut FakeIoApic,
        cores: &FakeTopology,
        register: u8,
    ) -> u32 {
        m.write(IOREGSEL, register.into(), cores, hw).unwrap();
        m.read(IOWIN, hw).unwrap()
    }

    #[test]
    fn a_virtual_pin_is_routed_for_the_hypervisor_and_masked_in_the_hardware() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0110 };
        let mut m = Mediator::new(&mut hw).with_virtual_pin(10);
        assert_eq!(m.virtual_route(10), None, "not programmed yet");
        assert_eq!(
            guest_write(&mut m, &mut hw, &cores, 10, fixed(0x41, 2)),
            None
        );
        assert_eq!(m.virtual_route(10), Some((2, 0x41)));
        assert!(hw.entry(10).is_masked(), "the physical pin reaches no one");
        // Other pins are the hardware's as before, and not virtual.
        assert_eq!(
            guest_write(&mut m, &mut hw, &cores, 4, fixed(0x42, 1)),
            None
        );
        assert!(!hw.entry(4).is_masked());
        assert_eq!(m.virtual_route(4), None);
        // The guest masks it, or aims it at a core it does not run on: nowhere to go.
        let masked = RedirectionEntry(fixed(0x41, 2).0 | entry::MASKED);
        assert_eq!(guest_write(&mut m, &mut hw, &cores, 10, masked), None);
        assert_eq!(m.virtual_route(10), None);
        assert!(guest_write(&mut m, &mut hw, &cores, 10, fixed(0x41, 3)).is_some());
        assert_eq!(m.virtual_route(10), None);
        // Re-targeted with the guest when its core leaves.
        assert_eq!(
            guest_write(&mut m, &mut hw, &cores, 10, fixed(0x41, 2)),
            None
        );
        m.retarget(2, &cores, &mut hw, |_| {});
        assert_eq!(m.virtual_route(10), Some((1, 0x41)));
        assert!(hw.entry(10).is_masked());
        // A pin the IOAPIC does not have is never virtual.
        let m = Mediator::new(&mut hw).with_virtual_pin(30);
        assert_eq!(m.virtual_route(30), None);
    }

    #[test]
    fn taking_over_masks_every_entry() {
        let mut hw = FakeIoApic::new();
        let m = Mediator::new(&mut hw);
        assert_eq!(m.pins(), 24);
        for pin in 0..24 {
            assert!(hw.entry(pin).is_masked(), "pin {pin}");
        }
    }

    #[test]
    fn a_valid_entry_reaches_the_hardware_translated_and_reads_back_as_written() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0010 };
        let mut m = Mediator::new(&mut hw);
        let entry = fixed(0x31, 1);
        assert_eq!(guest_write(&mut m, &mut hw, &cores, 2, entry), None);
        assert_eq!(hw.entry(2), fixed(0x31, 3));
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 0x14), entry.low());
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 0x15), entry.high());
        // The version register is the hardware's, with an EOI register (0x20; 24 entries);
        // the ID cannot be changed.
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 1), 0x0017_0020);
        m.write(IOREGSEL, 0, &cores, &mut hw).unwrap();
        m.write(IOWIN, 0x0f00_0000, &cores, &mut hw).unwrap();
        assert_eq!(hw.registers[0], 0);
    }

    #[test]
    fn the_hardware_never_holds_a_live_half_written_entry() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0110 };
        let mut m = Mediator::new(&mut hw);
        guest_write(&mut m, &mut hw, &cores, 3, fixed(0x31, 1));
        let (mut low, mut high) = (hw.registers[0x16], hw.registers[0x17]);
        hw.writes.clear();
        // Linux moves the entry to another CPU, with the vector it allocated there.
        guest_write(&mut m, &mut hw, &cores, 3, fixed(0x32, 2));
        // After every write the hardware held either the old entry or the new one, or
        // nothing live: never the new destination with the old vector.
        let (old, new) = (fixed(0x31, 3), fixed(0x32, 5));
        for &(register, value) in &hw.writes {
            match register {
                0x16 => low = value,
                0x17 => high = value,
                other => panic!("register {other:#x} written"),
            }
            let live = RedirectionEntry(u64::from(low) | u64::from(high) << 32);
            assert!(
                live.is_masked() || live == old || live == new,
                "live {live:x?} after {:x?}",
                hw.writes
            );
        }
        assert_eq!(hw.entry(3), new);
        assert_eq!(m.held, 0);
    }

    #[test]
    fn a_destination_rewritten_alone_goes_live_once_the_guest_moves_on() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0110 };
        let mut m = Mediator::new(&mut hw);
        guest_write(&mut m, &mut hw, &cores, 3, fixed(0x31, 1));
        guest_write_high(&mut m, &mut hw, &cores, 3, fixed(0x31, 2));
        assert!(hw.entry(3).is_masked(), "held until the low half");
        assert_eq!(m.held, 1 << 3);
        // The guest writes another entry instead: this one goes live as it stands.
        guest_write(&mut m, &mut hw, &cores, 4, fixed(0x41, 1));
        assert_eq!(hw.entry(3), fixed(0x31, 5));
        assert_eq!(hw.entry(4), fixed(0x41, 3));
        assert_eq!(m.held, 0);
        // A masked entry's destination is not held: it is not live anyway.
        let masked = RedirectionEntry(fixed(0x51, 1).0 | entry::MASKED);
        guest_write(&mut m, &mut hw, &cores, 5, masked);
        guest_write_high(&mut m, &mut hw, &cores, 5, fixed(0x51, 2));
        assert_eq!(m.held, 0);
    }

    #[test]
    fn refused_entries_stay_masked_in_the_hardware_and_are_reported() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0010 };
        let mut m = Mediator::new(&mut hw);
        let cases = [
            (fixed(0x31, 2), Refusal::NotOwnersCore(2)),
            (fixed(0x12, 1), Refusal::ExceptionVector(0x12)),
            // INIT ignores the vector: the delivery mode is what is refused.
            (
                RedirectionEntry(fixed(0, 2).0 | (5 << 8)),
                Refusal::DeliveryMode(DeliveryMode::Init),
            ),
            (
                RedirectionEntry(fixed(0x31, 1).0 | (1 << 11)),
                Refusal::LogicalDestination,
            ),
        ];
        for (entry, refusal) in cases {
            let refused = guest_write(&mut m, &mut hw, &cores, 5, entry).unwrap();
            assert_eq!(
                refused,
                Refused {
                    pin: 5,
                    entry,
                    refusal
                }
            );
            assert_eq!(hw.entry(5), RedirectionEntry::MASKED);
        }
    }

    #[test]
    fn masked_entries_are_kept_but_never_refused() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0010 };
        let mut m = Mediator::new(&mut hw);
        // Linux masks an entry by writing only the mask bit (vector 0).
        assert_eq!(
            guest_write(&mut m, &mut hw, &cores, 4, RedirectionEntry::MASKED),
            None
        );
        let masked = RedirectionEntry(fixed(0x40, 1).0 | entry::MASKED);
        assert_eq!(guest_write(&mut m, &mut hw, &cores, 4, masked), None);
        assert_eq!(
            hw.entry(4),
            RedirectionEntry(fixed(0x40, 3).0 | entry::MASKED)
        );
        // Unmasking it (a low-half write only) makes it live.
        m.write(IOREGSEL, 0x18, &cores, &mut hw).unwrap();
        assert_eq!(m.write(IOWIN, 0x40, &cores, &mut hw).unwrap(), None);
        assert_eq!(hw.entry(4), fixed(0x40, 3));
    }

    /// `vector`, level-triggered, to the guest's APIC ID `apic_id`.
    fn level(vector: u8, apic_id: u8) -> RedirectionEntry {
        RedirectionEntry(fixed(vector, apic_id).0 | entry::LEVEL_TRIGGERED)
    }

    #[test]
    fn an_eoi_ends_the_live_level_entries_of_its_vector_on_an_ioapic_without_the_register() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0110 };
        let mut m = Mediator::new(&mut hw).with_virtual_pin(10);
        guest_write(&mut m, &mut hw, &cores, 9, level(0x41, 1));
        guest_write(&mut m, &mut hw, &cores, 5, fixed(0x41, 1));
        guest_write(&mut m, &mut hw, &cores, 10, level(0x41, 2));
        guest_write(&mut m, &mut hw, &cores, 11, level(0x42, 1));
        let live = hw.entry(9);
        assert!(!live.is_masked() && live.is_level_triggered());
        hw.writes.clear();
        m.write(EOI, 0x41, &cores, &mut hw).unwrap();
        // Pin 9 only: rewritten masked and edge-triggered (which clears remote IRR), then as
        // it was. Not the edge entry 5, the virtual pin 10 (always masked in the hardware),
        // nor pin 11 of another vector; nothing went to a hardware EOI register.
        let ending = (live.low() | entry::MASKED as u32) & !(entry::LEVEL_TRIGGERED as u32);
        assert_eq!(hw.writes, [(0x22, ending), (0x22, live.low())]);
        assert_eq!(hw.entry(9), live);
        assert_eq!(hw.eois, []);
        // A masked level entry has no interrupt to end.
        guest_write(
            &mut m,
            &mut hw,
            &cores,
            9,
            RedirectionEntry(level(0x41, 1).0 | entry::MASKED),
        );
        hw.writes.clear();
        m.write(EOI, 0x41, &cores, &mut hw).unwrap();
        assert_eq!(hw.writes, []);
    }

    #[test]
    fn an_eoi_goes_to_the_hardwares_register_where_it_has_one() {
        let mut hw = FakeIoApic::new();
        hw.registers[1] = 0x0017_0020;
        let cores = FakeTopology { current: 0b0010 };
        let mut m = Mediator::new(&mut hw);
        guest_write(&mut m, &mut hw, &cores, 9, level(0x41, 1));
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 1), 0x0017_0020);
        hw.writes.clear();
        m.write(EOI, 0x41, &cores, &mut hw).unwrap();
        assert_eq!(hw.eois, [0x41]);
        assert_eq!(hw.writes, []);
    }

    #[test]
    fn read_only_bits_come_from_the_hardware() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0010 };
        let mut m = Mediator::new(&mut hw);
        // The guest cannot set remote IRR; the hardware's remote IRR shows through.
        guest_write(
            &mut m,
            &mut hw,
            &cores,
            1,
            RedirectionEntry(fixed(0x41, 1).0 | (1 << 14)),
        );
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 0x12), 0x41);
        hw.registers[0x12] |= 1 << 14;
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 0x12), 0x41 | (1 << 14));
    }

    #[test]
    fn only_the_three_register_offsets_exist() {
        let mut hw = FakeIoApic::new();
        let cores = FakeTopology { current: 0b0010 };
        let mut m = Mediator::new(&mut hw);
        assert_eq!(m.read(0x20, &mut hw), Err(UnsupportedOffset(0x20)));
        assert_eq!(
            m.write(0x4, 1, &cores, &mut hw),
            Err(UnsupportedOffset(0x4))
        );
        // The EOI register exists for the guest (here ending no entry: none carries 0x41).
        m.write(EOI, 0x41, &cores, &mut hw).unwrap();
        assert_eq!(hw.eois, []);
        // Registers past the last entry read as zero and ignore writes.
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 0x10 + 48), 0);
    }

    /// Any sequence of guest accesses and core departures: every entry live in the hardware
    /// is fixed delivery, physical mode, vector >= 32, aimed at the physical APIC ID of a
    /// core the guest runs on.
    #[test]
    fn random_guest_accesses_never_make_a_forbidden_entry_live() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut hw = FakeIoApic::new();
        let mut cores = FakeTopology { current: 0b0110 };
        let mut m = Mediator::new(&mut hw);
        let (mut live_seen, mut refused) = (0, 0);
        for _ in 0..200_000 {
            let r = next();
            match r % 8 {
                0 => {
                    let register = 0x10 + (r >> 8) as u8 % 52;
                    m.write(IOREGSEL, register.into(), &cores, &mut hw).unwrap();
                }
                1 => {
                    let leaving = (r >> 8) as usize % 4;
                    cores.current &= !(1 << leaving);
                    m.retarget(leaving, &cores, &mut hw, |_| {});
                }
                2 => cores.current |= 1 << ((r >> 8) % 4),
                _ => {
                    // Bias towards plausible entries: small destinations, few mode bits.
                    let value = (r >> 16) as u32 & 0x0003_ffff | ((r >> 48) as u32 & 3) << 24;
                    let value = if r & (1 << 60) != 0 {
                        value
                    } else {
                        (r >> 20) as u32
                    };
                    refused +=
                        usize::from(m.write(IOWIN, value, &cores, &mut hw).unwrap().is_some());
                }
            }
            for pin in 0..24 {
                let live = hw.entry(pin);
                if live.is_masked() {
                    continue;
                }
                assert_eq!(live.delivery_mode(), DeliveryMode::Fixed, "{live:x?}");
                assert!(!live.is_logical() && live.vector() >= 32, "{live:x?}");
                let core = (0..4)
                    .find(|c| cores.physical_apic_id(*c) == u32::from(live.destination()))
                    .expect("a physical APIC ID");
                assert!(cores.current & (1 << core) != 0, "{live:x?} on core {core}");
                live_seen += 1;
            }
        }
        // Both outcomes were exercised, many times.
        assert!(
            live_seen > 10_000 && refused > 10_000,
            "{live_seen} {refused}"
        );
    }

    #[test]
    fn retarget_moves_entries_off_a_leaving_core_or_masks_them() {
        let mut hw = FakeIoApic::new();
        let mut cores = FakeTopology { current: 0b1110 };
        let mut m = Mediator::new(&mut hw);
        guest_write(&mut m, &mut hw, &cores, 0, fixed(0x30, 2));
        guest_write(&mut m, &mut hw, &cores, 1, fixed(0x31, 3));
        guest_write(
            &mut m,
            &mut hw,
            &cores,
            2,
            RedirectionEntry(fixed(0x32, 2).0 | entry::MASKED),
        );
        let mut moves = Vec::new();
        // Core 2 leaves (the caller may not have updated ownership yet).
        m.retarget(2, &cores, &mut hw, |r| moves.push(r));
        assert_eq!(
            moves,
            [Retargeted {
                pin: 0,
                from: 2,
                to: Some(1)
            }]
        );
        assert_eq!(hw.entry(0), fixed(0x30, 3));
        assert_eq!(hw.entry(1), fixed(0x31, 7), "not on the leaving core");
        assert!(hw.entry(2).is_masked());
        // The guest still reads its own destination.
        assert_eq!(guest_read(&mut m, &mut hw, &cores, 0x11), 2 << 24);
        // Then its last cores leave: the entries are masked, not left aimed at a parked core.
        cores.current = 0b1000;
        moves.clear();
        m.retarget(1, &cores, &mut hw, |r| moves.push(r));
        assert_eq!(moves[0].to, Some(3));
        cores.current = 0;
        moves.clear();
        m.retarget(3, &cores, &mut hw, |r| moves.push(r));
        assert_eq!(moves.len(), 2);
        assert!(moves.iter().all(|r| r.to.is_none()));
        assert!(hw.entry(0).is_masked() && hw.entry(1).is_masked());
    }
}

//! The I/O APIC's registers through its MMIO page (82093AA datasheet §3.1): IOREGSEL at
//! offset 0x00 selects a register, IOWIN at 0x10 reads or writes it, EOI at 0x40. Only
//! `vcpu::ioapic_access` uses it, under its lock, so the select-then-access pairs of
//! different cores never interleave.

use crate::ioapic::{Registers, EOI, IOREGSEL, IOWIN};
use crate::partition::Device;

/// The IOAPIC every configuration names (`Device::IoApic`).
pub struct IoApicMmio {
    base: u64,
}

impl IoApicMmio {
    /// The machine's IOAPIC. Callers must hold the one lock that serializes its users.
    pub fn platform() -> Self {
        let (base, _) = Device::IoApic
            .mmio()
            .expect("the IOAPIC device has an MMIO page");
        Self { base }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        // SAFETY: the IOAPIC page is identity-mapped (first 4 GiB) and uncached by the
        // firmware's MTRRs; `offset` is one of its architectural registers, and no guest
        // maps the page (its owner's accesses exit and come here).
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn read32(&mut self, offset: u64) -> u32 {
        // SAFETY: as in `write32`.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }
}

impl Registers for IoApicMmio {
    fn read(&mut self, index: u8) -> u32 {
        self.write32(IOREGSEL, index.into());
        self.read32(IOWIN)
    }

    fn write(&mut self, index: u8, value: u32) {
        self.write32(IOREGSEL, index.into());
        self.write32(IOWIN, value);
    }

    fn eoi(&mut self, vector: u8) {
        self.write32(EOI, vector.into());
    }
}

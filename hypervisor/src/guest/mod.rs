//! The guests: their partitions (memory, EPT, VPID, bitmaps), their boot state, their
//! exit counters and console, and which core each runs on.
//!
//! `console` and `lavender` are pure logic (host-tested); the registry of
//! running guests and their construction need the machine.

pub mod console;
#[cfg(test)]
pub mod fake_memory;
pub mod lavender;
pub mod mmio_instruction;
pub mod page_walk;

#[cfg(target_os = "none")]
pub mod build;
#[cfg(target_os = "none")]
pub mod control;
#[cfg(target_os = "none")]
mod registry;
#[cfg(target_os = "none")]
pub use registry::*;

/// Byte access to a guest's RAM by guest-physical address (the hypervisor's view through
/// `arch::guest_memory::GuestRam`; a `Vec` in unit tests).
pub trait GuestPhysicalMemory {
    /// Fails if the range is not entirely inside the guest's RAM.
    fn write(&self, guest_physical: u64, bytes: &[u8]) -> Result<(), OutsideGuest>;
    fn zero(&self, guest_physical: u64, len: u64) -> Result<(), OutsideGuest>;
}

/// A guest-physical range that is not entirely inside one of the guest's RAM ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideGuest {
    pub guest_physical: u64,
    pub len: u64,
}

/// Register state a guest's boot core starts with, in 64-bit mode with flat segments:
/// Lavender's contract (`lavender`) or the Linux 64-bit boot protocol (`crate::linux`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    /// Lavender: the boot-info page.
    pub rdi: u64,
    /// Linux: the zero page (`struct boot_params`).
    pub rsi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Code selector (64-bit code) and the selector of every data segment.
    pub code_selector: u16,
    pub data_selector: u16,
    pub gdt_base: u64,
    pub gdt_limit: u16,
}

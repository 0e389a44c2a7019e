//! What the machine looks like: memory map, boot modules and processors, as the boot
//! loader and the ACPI tables describe them. Plain data, filled by `arch::firmware`.

use core::fmt;

use heapless::{String, Vec};

/// Most processors the hypervisor manages (the per-CPU table is sized by it).
pub const MAX_CPUS: usize = 16;
const MAX_MEMORY_REGIONS: usize = 64;
const MAX_MODULES: usize = 8;
const MODULE_NAME_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Available,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Defective,
}

impl MemoryKind {
    /// From a multiboot2 / e820 memory type number (Multiboot2 spec §3.6.8).
    pub fn from_multiboot(kind: u32) -> Self {
        match kind {
            1 => Self::Available,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Defective,
            _ => Self::Reserved,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Reserved => "reserved",
            Self::AcpiReclaimable => "acpi_reclaimable",
            Self::AcpiNvs => "acpi_nvs",
            Self::Defective => "defective",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub base: u64,
    pub length: u64,
    pub kind: MemoryKind,
}

/// A file GRUB loaded next to the hypervisor (`module2 /boot/FILE NAME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootModule {
    pub name: String<MODULE_NAME_LEN>,
    pub start: u64,
    pub end: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuEntry {
    pub apic_id: u32,
    /// MADT flag bit 0: the processor is ready to use.
    pub enabled: bool,
    /// MADT flag bit 1: not enabled now but may be brought online later.
    pub online_capable: bool,
}

impl CpuEntry {
    pub fn from_madt(apic_id: u32, flags: u32) -> Self {
        Self {
            apic_id,
            enabled: flags & 1 != 0,
            online_capable: flags & 2 != 0,
        }
    }
}

pub type CpuList = Vec<CpuEntry, MAX_CPUS>;
pub type MemoryMap = Vec<MemoryRegion, MAX_MEMORY_REGIONS>;
pub type ModuleList = Vec<BootModule, MAX_MODULES>;

/// Why the platform description could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformError {
    NotMultiboot2 { magic: u32 },
    BadBootInformation,
    NoMemoryMap,
    NoAcpi,
    NoMadt,
}

impl PlatformError {
    pub fn code(self) -> &'static str {
        match self {
            Self::NotMultiboot2 { .. } => "not_multiboot2",
            Self::BadBootInformation => "bad_boot_information",
            Self::NoMemoryMap => "no_memory_map",
            Self::NoAcpi => "no_acpi",
            Self::NoMadt => "no_madt",
        }
    }
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMultiboot2 { magic } => {
                write!(f, "not started by a multiboot2 boot loader (magic {magic:#x}); boot the image with GRUB 2")
            }
            Self::BadBootInformation => {
                f.write_str("the multiboot2 boot information is missing or malformed")
            }
            Self::NoMemoryMap => f.write_str("the boot loader gave no memory map"),
            Self::NoAcpi => f.write_str(
                "no valid ACPI RSDP found; the hypervisor needs ACPI to find the processors",
            ),
            Self::NoMadt => f.write_str("the ACPI tables have no MADT; cannot find the processors"),
        }
    }
}

/// Builds the module list, truncating over-long names (they are labels, not paths).
pub fn module_from(name: &str, start: u64, end: u64) -> BootModule {
    let mut label = String::new();
    for c in name.chars() {
        if label.push(c).is_err() {
            break;
        }
    }
    BootModule {
        name: label,
        start,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madt_flags_decode() {
        assert_eq!(
            CpuEntry::from_madt(3, 1),
            CpuEntry {
                apic_id: 3,
                enabled: true,
                online_capable: false
            }
        );
        assert_eq!(
            CpuEntry::from_madt(4, 2),
            CpuEntry {
                apic_id: 4,
                enabled: false,
                online_capable: true
            }
        );
    }

    #[test]
    fn memory_kinds_follow_multiboot_numbers() {
        assert_eq!(MemoryKind::from_multiboot(1), MemoryKind::Available);
        assert_eq!(MemoryKind::from_multiboot(2), MemoryKind::Reserved);
        assert_eq!(MemoryKind::from_multiboot(99), MemoryKind::Reserved);
    }

    #[test]
    fn long_module_names_are_truncated_not_rejected() {
        let m = module_from(&"x".repeat(100), 0x1000, 0x2000);
        assert_eq!(m.name.len(), MODULE_NAME_LEN);
    }
}

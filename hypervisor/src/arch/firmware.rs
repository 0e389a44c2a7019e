//! Reading what the boot loader and the firmware left in physical memory: the
//! multiboot2 boot information and the ACPI tables. The hypervisor identity-maps the
//! first 4 GiB, so a physical address is directly a pointer.

use core::ptr::NonNull;

use acpi::{madt::Madt, AcpiHandler, AcpiTables, PhysicalMapping};
use multiboot2::{BootInformation, BootInformationHeader};

use crate::platform::{BootModule, CpuEntry, CpuList, PlatformError};

/// Identity-mapped physical memory covers the first 4 GiB (see `boot`).
const IDENTITY_MAPPED_LIMIT: usize = 1 << 32;

/// Loads the multiboot2 boot information GRUB passed in EBX.
pub fn load_boot_information(address: usize) -> Result<BootInformation<'static>, PlatformError> {
    if address == 0 || !address.is_multiple_of(8) || address >= IDENTITY_MAPPED_LIMIT {
        return Err(PlatformError::BadBootInformation);
    }
    // SAFETY: the multiboot2 loader guarantees EBX points at a valid, 8-byte aligned
    // boot information structure (Multiboot2 spec §3.3) below 4 GiB, which is
    // identity-mapped; the hypervisor never writes to it. `load` checks its sizes.
    unsafe { BootInformation::load(address as *const BootInformationHeader) }
        .map_err(|_| PlatformError::BadBootInformation)
}

extern "C" {
    /// Bounds of the hypervisor image, from `boot/linker.ld`.
    static __image_start: u8;
    static __image_end: u8;
}

/// Host-physical [start, end) of the hypervisor image (code, data, bss, pools).
pub fn hypervisor_image() -> (u64, u64) {
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

/// The bytes of a boot module GRUB loaded.
pub fn module_bytes(module: &BootModule) -> &'static [u8] {
    assert!(
        module.start <= module.end && module.end <= IDENTITY_MAPPED_LIMIT as u64,
        "module outside the identity map"
    );
    // SAFETY: GRUB loaded the module at [start, end) in RAM below 4 GiB (asserted), which is
    // identity-mapped; nothing writes module memory (guest RAM is checked not to overlap it
    // before kernels are loaded), so a shared 'static view is sound.
    unsafe {
        core::slice::from_raw_parts(
            module.start as *const u8,
            (module.end - module.start) as usize,
        )
    }
}

/// ACPI tables are read in place through the identity map.
#[derive(Clone, Copy, Debug)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        assert!(
            physical_address
                .checked_add(size)
                .is_some_and(|end| end <= IDENTITY_MAPPED_LIMIT),
            "ACPI table at {physical_address:#x}+{size:#x} lies outside the identity map"
        );
        let virtual_start =
            NonNull::new(physical_address as *mut T).expect("ACPI table at address 0");
        // SAFETY: the region is identity-mapped (asserted above) and firmware tables are
        // not written while the hypervisor reads them.
        unsafe { PhysicalMapping::new(physical_address, virtual_start, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The processors the firmware's MADT lists (SDM-independent: ACPI 6.5 §5.2.12).
pub fn read_processors(rsdp_address: Option<usize>) -> Result<CpuList, PlatformError> {
    // SAFETY: the RSDP address comes from the boot loader's RSDP tag (a copy inside the
    // boot information) or, failing that, from the BIOS search area scan the acpi crate
    // performs; both lie in identity-mapped memory, and `from_rsdp` validates the
    // signature and checksum before following any pointer.
    let tables = unsafe {
        match rsdp_address {
            Some(address) => AcpiTables::from_rsdp(IdentityMapped, address),
            None => AcpiTables::search_for_rsdp_bios(IdentityMapped),
        }
    }
    .map_err(|_| PlatformError::NoAcpi)?;
    let madt = tables
        .find_table::<Madt>()
        .map_err(|_| PlatformError::NoMadt)?;
    let mut cpus = CpuList::new();
    for entry in madt.get().entries() {
        let cpu = match entry {
            acpi::madt::MadtEntry::LocalApic(e) => {
                CpuEntry::from_madt(u32::from(e.apic_id), e.flags)
            }
            acpi::madt::MadtEntry::LocalX2Apic(e) => CpuEntry::from_madt(e.x2apic_id, e.flags),
            _ => continue,
        };
        if cpus.iter().any(|c: &CpuEntry| c.apic_id == cpu.apic_id) {
            continue; // the same core listed as both LocalApic and LocalX2Apic
        }
        if cpus.push(cpu).is_err() {
            log::warn!(
                "MADT lists more processors than the hypervisor supports; ignoring APIC ID {}",
                cpu.apic_id
            );
        }
    }
    Ok(cpus)
}

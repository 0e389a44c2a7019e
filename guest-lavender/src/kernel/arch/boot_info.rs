//! Reading the boot-info page the hypervisor left in Lavender's memory.

use core::fmt;

use vmcall_proto::bootinfo::{BootInfo, BootInfoError, BOOT_INFO_SIZE};

#[derive(Clone, Copy, Debug)]
pub enum BootInfoFault {
    /// RDI at entry was 0 or the page would wrap around the address space.
    BadAddress(u64),
    Invalid(BootInfoError),
}

impl fmt::Display for BootInfoFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadAddress(address) => write!(f, "no boot-info page can lie at {address:#x}"),
            Self::Invalid(error) => error.fmt(f),
        }
    }
}

/// Copies and validates the boot-info page at guest-physical `address` (as RDI held at entry).
pub fn read(address: u64) -> Result<BootInfo, BootInfoFault> {
    let fits = address != 0 && address.checked_add(BOOT_INFO_SIZE as u64).is_some();
    if !fits {
        return Err(BootInfoFault::BadAddress(address));
    }
    // SAFETY: by the entry contract the page lies in one of Lavender's `Loaded` regions, which
    // the current page tables identity-map, and the hypervisor wrote it before entry and never
    // writes it again; no Rust object lives there, so a shared byte view of it aliases nothing
    // mutable. It is only read, once, here, and `BootInfo::read` validates every field.
    let page =
        unsafe { core::slice::from_raw_parts(address as usize as *const u8, BOOT_INFO_SIZE) };
    BootInfo::read(page).map_err(BootInfoFault::Invalid)
}

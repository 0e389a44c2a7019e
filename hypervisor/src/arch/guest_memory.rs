//! Reading and writing a guest's RAM from the hypervisor (loading its kernel, writing
//! its boot structures, reading hypercall buffers), by guest-physical address through the
//! partition's memory ranges.

use heapless::Vec;

use crate::guest::{GuestPhysicalMemory, OutsideGuest};
use crate::partition::{MemoryRange, MAX_RANGES_PER_GUEST};

/// The RAM of one guest, as the hypervisor sees it.
#[derive(Clone, Debug)]
pub struct GuestRam {
    ranges: Vec<MemoryRange, MAX_RANGES_PER_GUEST>,
}

impl GuestRam {
    /// # Safety contract (checked by the caller, `partition::validate`)
    /// The host ranges are RAM below 4 GiB (identity-mapped), disjoint from the hypervisor
    /// image and pools and from every other guest's private ranges.
    pub fn new(ranges: &[MemoryRange]) -> Self {
        Self {
            ranges: ranges.iter().copied().collect(),
        }
    }

    /// The host-physical address behind `[guest_physical, guest_physical + len)`, if the
    /// whole range lies inside one of this guest's RAM ranges.
    fn host_address(&self, guest_physical: u64, len: u64) -> Result<u64, OutsideGuest> {
        let outside = OutsideGuest {
            guest_physical,
            len,
        };
        let end = guest_physical.checked_add(len).ok_or(outside)?;
        let range = self
            .ranges
            .iter()
            .find(|r| guest_physical >= r.guest && end <= r.guest + r.size)
            .ok_or(outside)?;
        Ok(range.host + (guest_physical - range.guest))
    }

    /// Copies guest RAM at `guest_physical` into `bytes` (page tables, instruction bytes).
    pub fn read(&self, guest_physical: u64, bytes: &mut [u8]) -> Result<(), OutsideGuest> {
        let host = self.host_address(guest_physical, bytes.len() as u64)?;
        // SAFETY: see the note on the `GuestPhysicalMemory` impl below.
        unsafe { core::ptr::copy(host as *const u8, bytes.as_mut_ptr(), bytes.len()) };
        Ok(())
    }
}

// SAFETY (for the copies in this file, `read` included): the host range lies inside one
// of this guest's RAM ranges (`host_address` checks it), which `partition::validate`
// proved to be identity-mapped RAM owned by this guest alone, never the hypervisor's
// memory. The guest may change those bytes concurrently (it runs on other cores), so no
// Rust reference to them is ever formed: only raw copies, which see some mix of old and
// new bytes at worst.
impl GuestPhysicalMemory for GuestRam {
    fn write(&self, guest_physical: u64, bytes: &[u8]) -> Result<(), OutsideGuest> {
        let host = self.host_address(guest_physical, bytes.len() as u64)?;
        // SAFETY: see the note above this impl.
        unsafe { core::ptr::copy(bytes.as_ptr(), host as *mut u8, bytes.len()) };
        Ok(())
    }

    fn zero(&self, guest_physical: u64, len: u64) -> Result<(), OutsideGuest> {
        let host = self.host_address(guest_physical, len)?;
        // SAFETY: see the note above this impl.
        unsafe { core::ptr::write_bytes(host as *mut u8, 0, len as usize) };
        Ok(())
    }
}

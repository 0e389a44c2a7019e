//! Shared-memory regions named in the boot-info page, as `vmcall_proto` region views.

use vmcall_proto::bootinfo::SharedRegionInfo;
use vmcall_proto::region::{LayoutError, SharedRegion};

/// The region `info` describes, for the kernel's lifetime.
pub fn region(info: &SharedRegionInfo) -> Result<SharedRegion<'static>, LayoutError> {
    let len = usize::try_from(info.size).map_err(|_| LayoutError::LengthNotWords { len: 0 })?;
    // SAFETY: the boot-info reader checked the region is page-aligned and overlaps none of
    // Lavender's memory; `memory::init` identity-mapped it (readable, writable) and it is never
    // unmapped. Lavender touches it only through `SharedRegion`, i.e. atomically.
    unsafe { SharedRegion::from_raw_parts(info.guest_physical as usize as *mut u8, len) }
}
